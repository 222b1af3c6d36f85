import ARModel
// tensorar-data: builds, checks and looks at token caches (SPEC 7).
//   fashion-mnist    tokenise Fashion-MNIST with a k-means patch VQ -> OUT/train, OUT/val
//   import-llamagen  convert LlamaGen's extracted codes (its --code-path roots) into a cache
//   inspect, verify  counts and histograms; the full integrity check
//   decode           tokens back to an image (PNG or PGM) with the cache's codebook
//   bench            loader throughput
// Errors in the input print `error: <file>: <problem>` and exit 1.
import ArgumentParser
import Foundation
import Platform
import TokenData

/// A progress line, flushed at once (stdout is block-buffered when piped).
func say(_ line: String) {
    print(line)
    fflush(stdout)
}

struct TensorARData: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tensorar-data",
        abstract: "Build, check and look at TensorAR token caches (SPEC section 7).",
        subcommands: [FashionMNIST.self, ImportLlamaGen.self, Inspect.self, Verify.self, Decode.self, Bench.self])

    /// Like `main()`, but input errors read `error: <file>: <problem>` rather than a trace.
    static func runMain() {
        do {
            var command = try parseAsRoot()
            try exitingOnInputError(exitCode: 1) { try command.run() }
        } catch {
            exit(withError: error)
        }
    }
}

struct FashionMNIST: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "fashion-mnist",
        abstract: "Tokenise Fashion-MNIST with a k-means patch VQ into OUT/train and OUT/val (each with codebook.h5).",
        discussion:
            "Augmentations: A = 2 (original, horizontal flip). OUT/tokenizer.json records the options and the "
            + "reconstruction error. Does nothing when OUT already holds a build with the same options that "
            + "verifies (use --force to rebuild)."
    )

    @Option(help: "Output folder.") var out: String
    @Option(help: "Folder with the IDX files (plain or .gz).") var source = "/usr/share/datasets/fashion-mnist"
    @Option(help: "Patch side in pixels (grid = 28 / patch).") var patch = 4
    @Option(help: "Codebook size V.") var codebookSize = 512
    @Option(help: "Seed of the patch sample and k-means.") var seed: UInt64 = 0
    @Option(help: "Patches (originals and flips) used to learn the codebook.") var kmeansSamples = 200_000
    @Option(help: "Maximum Lloyd iterations.") var kmeansIterations = 20
    @Option(help: "Samples per shard.") var shardSize = 10_000
    @Flag(help: "Rebuild even when a verified build exists.") var force = false

    func validate() throws {
        guard patch >= 1, 28 % patch == 0 else { throw ValidationError("--patch must divide 28") }
        guard (2...65535).contains(codebookSize) else { throw ValidationError("--codebook-size must be in 2...65535") }
        guard kmeansSamples >= codebookSize else {
            throw ValidationError("--kmeans-samples must be at least --codebook-size")
        }
        guard kmeansIterations >= 1, shardSize >= 1 else {
            throw ValidationError("--kmeans-iterations and --shard-size must be at least 1")
        }
    }

    func run() throws {
        BLAS.ensureBestKernel()  // k-means and encoding are sgemm-bound
        let start = Date()
        say(BLAS.describe())
        var o = PatchVQOptions()
        o.patch = patch
        o.codebookSize = codebookSize
        o.seed = seed
        o.kmeansSamples = kmeansSamples
        o.kmeansIterations = kmeansIterations
        o.shardSize = shardSize
        let (r, reused) = try buildFashionMNIST(source: source, out: out, options: o, force: force, log: say)
        if reused { say("\(out) already holds this build and it verifies; nothing to do (--force rebuilds)") }
        say(
            "V = \(r.vocabSize), grid \(r.gridH)x\(r.gridW) (T = \(r.gridH * r.gridW)), patch \(r.options.patch), "
                + "A = 2; \(r.usedCodes) codes used"
        )
        say(
            String(
                format: "reconstruction (val, decoded from the cache): MSE %.5f, PSNR %.2f dB; train MSE %.5f",
                r.valMSE, r.valPSNR, r.trainMSE))
        say(
            String(
                format: "train unigram entropy: %.4f nats (%.4f bits)", r.trainUnigramEntropyNats,
                r.trainUnigramEntropyNats / log(2.0)))
        say("caches: \(out)/train (\(r.trainSamples)), \(out)/val (\(r.valSamples)); report \(out)/tokenizer.json")
        say(String(format: "time: %.1f s", Date().timeIntervalSince(start)))
    }
}

struct ImportLlamaGen: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "import-llamagen",
        abstract: "Convert LlamaGen's extracted codes (its --code-path folders, or codes/ and labels/) into a cache.",
        discussion: """
            LlamaGen's extract_codes_c2i.py writes ROOT/<dataset><size>_codes/{i}.npy (int64 (1, A, T)) and \
            ROOT/<dataset><size>_labels/{i}.npy (int64 (1,)). Give ROOT with --code-path; give --code-path again \
            for each further root of the same images (the flip and ten-crop folders, e.g. ..._ten_crop and \
            ..._ten_crop_105): their views are concatenated into one cache of A = A_1 + A_2 + ... views. \
            The vocabulary and class count have no defaults: give --vocab-size and --num-classes, or --like W \
            with weights (.safetensors with tensorar.config) of the model the cache is for.
            """)

    @Option(help: "A LlamaGen --code-path folder (repeatable: one per augmentation root).") var codePath: [String] = []
    @Option(help: "Folder of {i}.npy code files (instead of --code-path).") var codes: String?
    @Option(help: "Folder of {i}.npy label files (with --codes).") var labels: String?
    @Option(help: "Output cache folder.") var out: String
    @Option(help: "Samples per shard.") var shardSize = 10_000
    @Option(help: "Number of classes C (or --like).") var numClasses: Int?
    @Option(help: "Codebook size V of the tokenizer that made the codes (or --like).") var vocabSize: Int?
    @Option(help: "Weights (.safetensors with tensorar.config) whose vocab_size and num_classes to use.")
    var like: String?
    @Option(help: "Parallel workers (one shard each at a time).") var jobs = 2

    func validate() throws {
        guard shardSize >= 1, jobs >= 1, (numClasses ?? 1) >= 1, (vocabSize ?? 1) >= 1 else {
            throw ValidationError("--shard-size, --num-classes, --vocab-size and --jobs must be at least 1")
        }
        if codePath.isEmpty == (codes == nil) {
            throw ValidationError("give --code-path ROOT (LlamaGen's layout) or --codes with --labels")
        }
        if (codes == nil) != (labels == nil) { throw ValidationError("--codes and --labels go together") }
        if like == nil && (numClasses == nil || vocabSize == nil) {
            throw ValidationError(
                "give --vocab-size and --num-classes (the tokenizer's codebook size and the class "
                    + "count), or --like W.safetensors")
        }
    }

    /// V and C: the flags, else the weights' recorded shape; a flag contradicting the weights is an error.
    func limits() throws -> (vocab: Int, classes: Int, from: String) {
        guard let like else {
            return (vocabSize!, numClasses!, "--vocab-size \(vocabSize!) and --num-classes \(numClasses!)")
        }
        guard let c = try recordedModelConfig(like) else {
            throw InputError(like, "has no tensorar.config metadata: give --vocab-size and --num-classes")
        }
        let given = [("--vocab-size", vocabSize, c.vocabSize), ("--num-classes", numClasses, c.numClasses)]
        for (flag, value, has) in given {
            if let value, value != has { throw InputError(like, "\(flag) \(value) contradicts the weights' \(has)") }
        }
        return (c.vocabSize, c.numClasses, "--like \(like) (vocab_size \(c.vocabSize), num_classes \(c.numClasses))")
    }

    func run() throws {
        let start = Date()
        let views =
            try codes.map { [LlamaGenFolders(codes: $0, labels: labels!)] }
            ?? codePath.map { try findLlamaGenFolders(codePath: $0) }
        let (v, c, from) = try limits()
        var o = LlamaGenImportOptions(views: views, out: out, vocabSize: v, numClasses: c)
        o.shardSize = shardSize
        o.jobs = jobs
        o.limitsFrom = from
        for f in views { say("codes \(f.codes), labels \(f.labels)") }
        let info = try importLlamaGen(o, log: say)
        say(
            "wrote \(out): \(info.numSamples) samples in \(info.shards.count) shard(s), A = \(info.augmentations), "
                + "grid \(info.gridH)x\(info.gridW), codes \(info.codesKind.rawValue)")
        say(String(format: "time: %.1f s", Date().timeIntervalSince(start)))
    }
}

struct Inspect: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Counts, shapes, class histogram and token statistics of a cache.")
    @Argument(help: "Cache folder.") var directory: String

    func run() throws {
        let r = try inspectCache(directory: directory)
        say(directory)
        say(r.summary())
        let cb = (directory as NSString).appendingPathComponent(CacheInfo.codebookFileName)
        if FileManager.default.fileExists(atPath: cb) {
            let c = try Codebook.load(path: cb)
            say(
                "codebook.h5: V = \(c.V), Dc = \(c.Dc), patch \(c.patchSize), image "
                    + "\(c.imageH)x\(c.imageW)x\(c.channels)"
            )
            if c.V != r.info.vocabSize {
                throw InputError(cb, "codebook has V = \(c.V) but dataset.json says vocab_size \(r.info.vocabSize)")
            }
        } else {
            say("no codebook.h5")
        }
    }
}

struct Verify: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Full check of a cache: checksums, shapes, dtypes, every token < V and label < C.")
    @Argument(help: "Cache folder.") var directory: String

    func run() throws {
        let r = try verifyCache(directory: directory)
        let mb = Double(r.bytesHashed) / 1e6
        say(
            String(
                format: "ok: %@: %d samples in %d shard(s), %.1f MB hashed, %.2f s (sha256 %.2f s, %.0f MB/s; "
                    + "every value read and checked %.2f s)", directory, r.samplesChecked, r.shardsChecked, mb,
                r.seconds,
                r.hashSeconds, mb / max(r.hashSeconds, 1e-9), r.seconds - r.hashSeconds))
    }
}

struct Decode: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract:
            "Decode samples back to pixels with the codebook: one image, or a row of them, as PNG "
            + "(or PGM with a .pgm name)."
    )
    @Option(help: "Cache folder.") var cache: String
    @Option(parsing: .upToNextOption, help: "Sample index or indices.") var index: [Int]
    @Option(help: "Decode this many consecutive samples from each index.") var count = 1
    @Option(help: "Augmentation index.") var augmentation = 0
    @Flag(help: "Show every augmentation of each sample side by side.") var allAugmentations = false
    @Option(help: "Codebook file (default: CACHE/codebook.h5).") var codebook: String?
    @Option(help: "Enlarge each pixel this many times.") var scale = 4
    @Option(help: "Images per row of the grid.") var columns = 8
    @Option(help: "Output file, .png or .pgm.") var out: String

    func validate() throws {
        guard !index.isEmpty, count >= 1, scale >= 1, columns >= 1 else {
            throw ValidationError("need --index, and --count, --scale, --columns >= 1")
        }
    }

    func run() throws {
        let tc = try TokenCache(directory: cache)
        guard let cbPath = codebook ?? tc.codebookPath else {
            throw InputError(cache, "no codebook.h5 here; name one with --codebook")
        }
        let cb = try Codebook.load(path: cbPath)
        guard cb.V == tc.info.vocabSize else {
            throw InputError(cbPath, "codebook has V = \(cb.V) but the cache has vocab_size \(tc.info.vocabSize)")
        }
        let samples = index.flatMap { i in (i..<(i + count)) }
        let augs = allAugmentations ? Array(0..<tc.info.augmentations) : [augmentation]
        var wanted: [(Int, Int)] = []
        for i in samples { for a in augs { wanted.append((i, a)) } }
        let (codes, labels) = try tc.read(indices: wanted.map(\.0), augmentations: wanted.map(\.1))
        let t = tc.seqLen
        let images = (0..<wanted.count).map { k in
            cb.decode(tokens: Array(codes[(k * t)..<((k + 1) * t)]), gridH: tc.info.gridH, gridW: tc.info.gridW)
        }
        let (h, w) = (tc.info.gridH * cb.patchSize, tc.info.gridW * cb.patchSize)
        let cols = allAugmentations ? augs.count * max(1, columns / augs.count) : columns
        let g = imageGrid(
            images, height: h, width: w, channels: cb.channels, columns: cols, pad: images.count == 1 ? 0 : 2,
            scale: scale)
        if out.lowercased().hasSuffix(".pgm") || out.lowercased().hasSuffix(".ppm") {
            try writePNM(path: out, pixels: g.pixels, width: g.width, height: g.height, channels: cb.channels)
        } else {
            try writePNG(path: out, pixels: g.pixels, width: g.width, height: g.height, channels: cb.channels)
        }
        say("wrote \(out): \(wanted.count) image(s) of \(h)x\(w); samples \(samples), labels \(Array(labels))")
    }
}

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Loader throughput (samples/s per rank), with and without prefetch.")
    @Option(help: "Cache folder.") var cache: String
    @Option(help: "Global batch G.") var batch = 256
    @Option(help: "Ranks W to simulate (this process plays rank 0).") var worldSize = 1
    @Option(help: "Batches to time per setting.") var batches = 100
    @Option(help: "Simulated compute per batch, ms (prefetch overlaps reading with it).") var workMs = 0.0

    func validate() throws {
        guard batch >= 1, worldSize >= 1, batches >= 1, workMs >= 0 else {
            throw ValidationError("--batch, --world-size, --batches must be >= 1")
        }
        guard batch % worldSize == 0 else { throw ValidationError("--batch must be divisible by --world-size") }
    }

    func run() throws {
        let tc = try TokenCache(directory: cache)
        say(
            "\(cache): \(tc.count) samples, T = \(tc.seqLen), A = \(tc.info.augmentations); G = \(batch), W = "
                + "\(worldSize) (rank 0 reads \(batch / worldSize) per batch), \(batches) batches, "
                + "simulated work \(workMs) ms"
        )
        for prefetch in [0, 2] {
            let loader = try TokenLoader(
                cache: tc, globalBatch: batch, rank: 0, worldSize: worldSize, seed: 1, prefetch: prefetch)
            _ = try loader.next()  // warm-up: permutation, page cache
            let start = Date()
            var reading = 0.0
            for _ in 0..<batches {
                let t0 = Date()
                _ = try loader.next()
                reading += Date().timeIntervalSince(t0)
                if workMs > 0 { Thread.sleep(forTimeInterval: workMs / 1000) }
            }
            let s = Date().timeIntervalSince(start)
            let n = Double(batches * loader.localBatch)
            say(
                String(
                    format:
                        "prefetch %d: %.0f samples/s per rank overall, %.0f samples/s while waiting on the loader "
                        + "(%.2f ms per batch waited)",
                    prefetch, n / s, n / max(reading, 1e-9), 1000 * reading / Double(batches)))
        }
    }
}

TensorARData.runMain()
