import ARModel
import ArgumentParser
import Foundation
import Platform
import TokenData
import Training

/// `mpirun -n R .build/release/tensorar-sample --weights W --classes 0,1,2 --per-class 16 --out s.h5`
///
/// KV-cached sampling (SPEC section 5), data-parallel: the N = classes x per-class images are
/// numbered class-major (image i has class classes[i / per_class]); rank r samples the contiguous
/// range [r N / R, (r + 1) N / R) and keys each image's randomness by its global index, so the
/// output does not depend on the number of ranks or the batch size. Each rank writes a part file
/// next to `--out`; rank 0 merges them after a barrier (a shared folder, as for checkpoints).
@main
struct Sample: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tensorar-sample",
        abstract:
            "Sample images (tokens and refinement trajectories) from a TensorAR model, data-parallel over MPI ranks.",
        discussion: """
            Output (HDF5): tokens int32 [N, T], labels int32 [N], trajectories int32 [N, T, k] (entry [n, q, s] \
            is the prediction of token q made at slot s, at step q - s; -1 where none), and attributes: the \
            sampling settings (cfg_scale, cfg_schedule, cfg_power, temperature, top_p and seed as text, top_k, \
            cfg_interval and per_class as integers, \
            all of them in `sampling` as JSON) and the model shape in `config` (JSON, SPEC section 7).

            --npy-dir also writes LlamaGen-compatible codes: codes.npy int64 [N, T] and labels.npy int64 [N].

            --bench measures sampling speed instead (random weights; no --weights needed).
            """)

    @Option(help: "Weights (.safetensors) or a checkpoint folder (a step folder, or a run folder meaning its latest).")
    var weights: String?
    @Option(
        help: """
            Model shape for a .safetensors without tensorar.config metadata: \
            \(ModelConfig.presetNames.joined(separator: ", ")) \
            (with --vocab-size, --num-classes, --grid-size or --data).
            """) var preset: String?
    @Option(help: "Codebook size V: the preset's, or an error when the weights have another.") var vocabSize: Int?
    @Option(help: "Number of classes C: the preset's, or an error when the weights have another.") var numClasses: Int?
    @Option(help: "Token grid side: the preset's, or an error when the weights have another.") var gridSize: Int?
    @Option(
        help: """
            Token cache (SPEC section 7) the model is for: its grid, vocabulary and classes must fit the \
            weights (as tensorar-eval checks), and they give a --preset its shape.
            """) var data: String?
    @Option(help: "With --preset: the base model, \(BaseRegistry.names.joined(separator: " or ")).")
    var base = "llamagen"
    @Option(help: "Expected window k; an error when the weights have another.") var window: Int?
    @Option(help: "raw: the trained weights; ema: a checkpoint's moving average of them (train.ema_decay).")
    var weightsKind: WeightsKind = .raw
    @Option(help: "Classes to sample, comma-separated, ranges allowed (0,3,5-7); default: all of the model's classes.")
    var classes: String?
    @Option(help: "Images per class.") var perClass = 10
    @Option(
        help: """
            Classifier-free guidance scale, A or A,B: one per sub-token for Open-MAGVIT2 (pre, post; one value \
            means both). As LlamaGen, guidance only above 1 (at 1 or below: no guidance, no null-class rows, \
            the conditioned logits as they are).
            """) var cfgScale = PartValues([1])
    @Option(
        help: """
            LlamaGen's --cfg-interval: -1 guides every step; N >= 0 guides steps 0 ... N + 1 only (LlamaGen's \
            first token and its next N + 1), the later ones use the conditioned logits.
            """) var cfgInterval = -1
    @Option(
        help: """
            How the guidance weight moves over the steps s = 0 ... T-1: constant (w_s = the scale g) or \
            power-cosine (RAR's: w_s = (g - 1)(1 - cos(pi (s / T)^P)) / 2 + 1, from 1 at s = 0 towards g; \
            needs --cfg-power). Each sub-token's scale gets the same schedule; --cfg-interval still applies.
            """) var cfgSchedule = GuidanceSchedule.constant
    @Option(help: "--cfg-schedule power-cosine: the power P >= 0 (0: constant; RAR-B samples with 2.75).")
    var cfgPower: Float?
    @Option(help: "Softmax temperature (0: greedy), A or A,B as --cfg-scale.") var temperature = PartValues([1])
    @Option(help: "Keep the K most likely tokens (0: all; 1: greedy, deterministic).") var topK = 0
    @Option(help: "Keep the smallest set of most likely tokens whose probability reaches P (1: all).") var topP: Float =
        1
    @Option(help: "Seed; with the same seed a run is reproduced exactly, on any number of ranks.") var seed: UInt64 = 0
    @Option(help: "Images sampled together per rank (guidance doubles the rows).") var batchSize = 64
    @Option(help: "Output HDF5 file.") var out = "samples.h5"
    @Option(help: "Also write LlamaGen-compatible codes here: codes.npy int64 [N, T], labels.npy int64 [N].")
    var npyDir: String?
    @Option(help: "BLAS threads per rank (default: cores / ranks on the node).") var threads: Int?
    @Flag(help: "Only errors on stderr; no progress lines.") var quiet = false

    @Flag(
        help: "Measure sampling speed (images/s, GFLOP/s against the sgemm peak, k against k = 1) instead of sampling.")
    var bench = false
    @Option(
        help: ArgumentHelp(
            "--bench: models, comma-separated: default (the Fashion-MNIST default shape: small, V 512, grid 7, k 4, "
                + "d 1) and presets (V 16384, C 1000, grid 16, k = --bench-window, d = --bench-depth)."
        )
    ) var benchModels = "default,B"
    @Option(help: "--bench: plug-in window k for presets.") var benchWindow = 4
    @Option(help: "--bench: plug-in depth d for presets.") var benchDepth = 2
    @Option(help: "--bench: positions to sample for presets (0: the whole image); the FLOP count covers exactly those.")
    var benchSteps = 0
    @Option(help: "--bench: timed repetitions per model (best is kept), after one warm-up.") var benchReps = 1

    func validate() throws {
        if !bench && weights == nil { throw ValidationError("--weights is required (or --bench)") }
        if perClass < 1 { throw ValidationError("--per-class must be at least 1, got \(perClass)") }
        if batchSize < 1 { throw ValidationError("--batch-size must be at least 1, got \(batchSize)") }
        if !temperature.values.allSatisfy({ $0 >= 0 && $0.isFinite }) {
            throw ValidationError("--temperature must be finite numbers >= 0, got \(temperature)")
        }
        if topK < 0 { throw ValidationError("--top-k must be >= 0 (0: all), got \(topK)") }
        if !(topP > 0 && topP <= 1) { throw ValidationError("--top-p must be in (0, 1], got \(topP)") }
        if !cfgScale.values.allSatisfy(\.isFinite) {
            throw ValidationError("--cfg-scale must be finite, got \(cfgScale)")
        }
        if cfgInterval < -1 {
            throw ValidationError("--cfg-interval must be -1 (every step) or >= 0, got \(cfgInterval)")
        }
        if let p = cfgPower, !(p >= 0 && p.isFinite) {
            throw ValidationError("--cfg-power must be a finite number >= 0, got \(p)")
        }
        if cfgSchedule == .powerCosine && cfgPower == nil {
            throw ValidationError("--cfg-schedule power-cosine needs --cfg-power P (P >= 0)")
        }
        if cfgSchedule == .constant && cfgPower != nil {
            throw ValidationError("--cfg-power applies to --cfg-schedule power-cosine only")
        }
        if let threads, threads < 1 { throw ValidationError("--threads must be at least 1") }
        if let window, window < 1 { throw ValidationError("--window must be at least 1") }
    }

    /// One value: every head part's; two: Open-MAGVIT2's pre and post (SPEC section 8).
    var options: SamplingOptions {
        var o = SamplingOptions(
            cfgScale: cfgScale.values[0], temperature: temperature.values[0], topK: topK,
            topP: topP, seed: seed)
        if cfgScale.values.count > 1 { o.partCfgScales = cfgScale.values }
        if temperature.values.count > 1 { o.partTemperatures = temperature.values }
        o.cfgInterval = cfgInterval
        o.cfgSchedule = cfgSchedule
        o.cfgPower = cfgPower ?? 0
        return o
    }

    func run() throws {
        BLAS.ensureBestKernel()
        let comm: Communicator
        do { comm = try MPI.initialize() } catch {
            FileHandle.standardError.write("error: \(error)\n".data(using: .utf8)!)
            throw ExitCode(1)
        }
        let local = MPI.ranksOnThisNode
        BLAS.threads = threads ?? max(1, ProcessInfo.processInfo.activeProcessorCount / max(1, local))
        if bench {
            do { try runBench(comm: comm) } catch {
                FileHandle.standardError.write("error: \(error)\n".data(using: .utf8)!)
                try? MPI.finalize()
                throw ExitCode(1)
            }
            try? MPI.finalize()
            return
        }
        // Set-up errors (missing weights, bad classes, unwritable output) happen alike on every
        // rank: rank 0 reports, every rank exits non-zero. Later errors may hit one rank only:
        // that rank reports and ends the job so no rank waits forever in a collective.
        let plan: Plan
        do { plan = try prepare(comm: comm) } catch {
            if comm.isRoot { FileHandle.standardError.write("error: \(error)\n".data(using: .utf8)!) }
            try? MPI.finalize()
            throw ExitCode(2)
        }
        do {
            try sample(plan, comm: comm)
            try? MPI.finalize()
        } catch {
            FileHandle.standardError.write("error: rank \(comm.rank) of \(comm.size): \(error)\n".data(using: .utf8)!)
            if comm.size > 1 { MPI.abort(1) }
            throw ExitCode(1)
        }
    }

    struct Plan {
        let model: Transformer
        let classes: [Int]
        let total: Int
    }

    /// Loads the model and checks every input before any work.
    func prepare(comm: Communicator) throws -> Plan {
        let w = weights!
        let cache = try data.map { try TokenCache(directory: $0) }
        let model = try loadModel(from: w, fallback: try presetShape(cache: cache?.info), kind: weightsKind)
        let c = model.config
        try checkShapeFlags(c, weights: w)
        if let cache, let data { try checkDataMatchesModel(cache.info, c, cachePath: data) }
        if let window, window != c.window {
            throw InputError(
                w,
                "the weights have window k = \(c.window) (plugin_depth \(c.pluginDepth)) but "
                    + "--window \(window) was asked"
            )
        }
        let cls = try parseClasses(classes, numClasses: c.numClasses, weights: w)
        let parts = model.headPartCount  // Open-MAGVIT2 chooses pre, then post (SPEC section 8)
        for (flag, v) in [("--cfg-scale", cfgScale), ("--temperature", temperature)] where v.values.count > parts {
            let problem = "\(flag) \(v) gives \(v.values.count) values; this model chooses a token in \(parts) part(s)"
            throw InputError(w, problem)
        }
        if topK > c.vocabSize { throw InputError(w, "--top-k \(topK) exceeds the model's vocab_size \(c.vocabSize)") }
        try checkOutputFile(out, what: "--out samples file")
        if let npyDir {
            if pathKind(npyDir) == .file {
                throw InputError(npyDir, "--npy-dir names a file, not a folder (nothing was written)")
            }
            if comm.isRoot {
                try? FileManager.default.createDirectory(atPath: npyDir, withIntermediateDirectories: true)
            }
            try comm.barrier()
            for name in ["codes.npy", "labels.npy"] { try checkOutputFile(npyDir + "/" + name, what: "--npy-dir file") }
        }
        return Plan(model: model, classes: cls, total: cls.count * perClass)
    }

    /// The --preset shape, its V, C and grid from the flags, else from --data's cache; no silent default.
    func presetShape(cache: CacheInfo?) throws -> ModelConfig? {
        guard let preset else { return nil }
        let v = vocabSize ?? cache?.vocabSize
        let n = numClasses ?? cache?.numClasses
        let g = gridSize ?? cache?.gridH
        guard let v, let n, let g else {
            throw InputError(
                "--preset",
                "\(preset) needs the data's shape: give --vocab-size, --num-classes and "
                    + "--grid-size, or --data CACHE")
        }
        return try ModelConfig.preset(preset, base: base, vocabSize: v, numClasses: n, gridSize: g)
    }

    /// --vocab-size, --num-classes, --grid-size given beside weights of another shape: an error naming both.
    func checkShapeFlags(_ c: ModelConfig, weights w: String) throws {
        let given: [(String, Int?, Int)] = [
            ("--vocab-size", vocabSize, c.vocabSize), ("--num-classes", numClasses, c.numClasses),
            ("--grid-size", gridSize, c.gridSize),
        ]
        for (flag, value, has) in given {
            if let value, value != has {
                let key = flag.dropFirst(2).replacingOccurrences(of: "-", with: "_")
                throw InputError(w, "\(flag) \(value) contradicts the weights' \(key) \(has)")
            }
        }
    }

    /// "0,3,5-7" -> [0, 3, 5, 6, 7]; nil -> every class. Each part is a class number or a range
    /// A-B of them (digits only: "-1", "3-", "5-2" are errors); out-of-range classes name the weights.
    func parseClasses(_ s: String?, numClasses C: Int, weights w: String) throws -> [Int] {
        guard let s else { return Array(0..<C) }
        var out: [Int] = []
        let parts = s.split(separator: ",", omittingEmptySubsequences: false)
        for raw in parts {
            let part = raw.trimmingCharacters(in: .whitespaces)
            let ends = part.split(separator: "-", maxSplits: 1, omittingEmptySubsequences: false)
                .map { $0.trimmingCharacters(in: .whitespaces) }
            let numbers = ends.compactMap { e -> Int? in
                e.isEmpty || !e.allSatisfy(\.isASCII) || !e.allSatisfy(\.isNumber) ? nil : Int(e)
            }
            guard numbers.count == ends.count, let a = numbers.first, let b = numbers.last, a <= b else {
                throw InputError(
                    "--classes",
                    "cannot read '\(part)' in '\(s)'; "
                        + "expected class numbers or ranges like 0,3,5-7")
            }
            guard b < C else {
                throw InputError(w, "class \(b) is outside the model's \(C) classes [0, \(C)) (--classes \(s))")
            }
            out += Array(a...b)
        }
        return out
    }

    func partPath(rank r: Int, size: Int) -> String { out + String(format: ".rank-%05d-of-%05d.h5", r, size) }

    func sample(_ plan: Plan, comm: Communicator) throws {
        let say: (String) -> Void = { s in
            if comm.isRoot && !quiet {
                print(s)
                fflush(stdout)
            }
        }
        let c = plan.model.config
        let T = c.seqLen
        let k = c.window
        let N = plan.total
        let lo = comm.rank * N / comm.size
        let hi = (comm.rank + 1) * N / comm.size
        say("tensorar-sample: \(comm.size) rank(s), \(BLAS.threads) BLAS thread(s) per rank; \(BLAS.describe())")
        say("model: \(c.jsonString())")
        let schedule = cfgSchedule == .constant ? "constant" : "power-cosine p \(options.cfgPower)"
        let guided = options.guided(parts: 2) ? "guided" : "unguided"
        let guidance = "cfg \(cfgScale) (\(guided), interval \(cfgInterval), schedule \(schedule))"
        say(
            "sampling \(N) images (\(plan.classes.count) classes x \(perClass)), \(T) steps of k = \(k); \(guidance), "
                + "temperature \(temperature), top-k \(topK), top-p \(topP), seed \(seed); batch \(batchSize) per rank")
        let sampler = Sampler(model: plan.model)
        sampler.keepsPackedWeights = true  // the weights never change here
        var tokens: [Int32] = []
        var traj: [Int32] = []
        var labels: [Int32] = []
        let t0 = monotonicSeconds()
        var start = lo
        while start < hi {
            let end = min(hi, start + batchSize)
            let ids = Array(start..<end)
            let lab = ids.map { Int32(plan.classes[$0 / perClass]) }
            let r = sampler.sample(labels: lab, sampleIds: ids, options: options)
            tokens += r.tokens
            traj += r.trajectories
            labels += lab
            let dt = monotonicSeconds() - t0
            say(
                String(
                    format: "  rank 0: %d/%d of its images, %.2f images/s per rank (%.0f s)", end - lo, hi - lo,
                    Double(end - lo) / dt, dt))
            start = end
        }
        // this rank's part, then rank 0 merges every part in rank order
        let part = partPath(rank: comm.rank, size: comm.size)
        do {
            let f = try HDF5File.create(part)
            try f.write("tokens", tokens, shape: [hi - lo, T])
            try f.write("labels", labels, shape: [hi - lo])
            try f.write("trajectories", traj, shape: [hi - lo, T, k])
            try f.setAttribute("start", int: lo)
            try f.flush()
        }
        try comm.barrier()
        if comm.isRoot {
            var allTokens: [Int32] = []
            var allTraj: [Int32] = []
            var allLabels: [Int32] = []
            for r in 0..<comm.size {
                let p = partPath(rank: r, size: comm.size)
                let f = try HDF5File.open(p)
                guard try f.intAttribute("start") == r * N / comm.size else {
                    throw InputError(p, "part starts at the wrong image")
                }
                allTokens += try f.read("tokens", as: Int32.self).values
                allLabels += try f.read("labels", as: Int32.self).values
                allTraj += try f.read("trajectories", as: Int32.self).values
            }
            guard allLabels.count == N else { throw InputError(out, "merged \(allLabels.count) images, expected \(N)") }
            try writeOutput(tokens: allTokens, labels: allLabels, trajectories: allTraj, config: c, total: N)
            for r in 0..<comm.size { try? FileManager.default.removeItem(atPath: partPath(rank: r, size: comm.size)) }
            if let npyDir {
                try writeNPY(npyDir + "/codes.npy", allTokens.map { Int64($0) }, shape: [N, T])
                try writeNPY(npyDir + "/labels.npy", allLabels.map { Int64($0) }, shape: [N])
                say("wrote \(npyDir)/codes.npy (int64 [\(N), \(T)]) and \(npyDir)/labels.npy (int64 [\(N)])")
            }
            let dt = monotonicSeconds() - t0
            say(
                String(
                    format: "wrote %@: %d images in %.1f s (%.2f images/s on %d rank(s))", out, N, dt, Double(N) / dt,
                    comm.size))
        }
        try comm.barrier()
    }

    func writeOutput(
        tokens: [Int32], labels: [Int32], trajectories: [Int32], config c: ModelConfig, total N: Int
    ) throws {
        let tmp = out + ".tmp"
        do {
            let f = try HDF5File.create(tmp)
            try f.write("tokens", tokens, shape: [N, c.seqLen])
            try f.write("labels", labels, shape: [N])
            try f.write("trajectories", trajectories, shape: [N, c.seqLen, c.window])
            try f.setAttribute("format_version", int: 1)
            try f.setAttribute("cfg_scale", string: "\(cfgScale)")
            try f.setAttribute("cfg_interval", int: cfgInterval)
            try f.setAttribute("cfg_schedule", string: cfgSchedule.rawValue)
            try f.setAttribute("cfg_power", string: "\(options.cfgPower)")
            try f.setAttribute("temperature", string: "\(temperature)")
            try f.setAttribute("top_p", string: "\(topP)")
            try f.setAttribute("seed", string: "\(seed)")
            try f.setAttribute("top_k", int: topK)
            try f.setAttribute("per_class", int: perClass)
            try f.setAttribute("window", int: c.window)
            try f.setAttribute("grid_size", int: c.gridSize)
            try f.setAttribute("vocab_size", int: c.vocabSize)
            try f.setAttribute("num_classes", int: c.numClasses)
            try f.setAttribute("config", string: c.jsonString())
            var sampling: [String: Any] = [
                "cfg_scale": Double(cfgScale.values[0]), "cfg_interval": cfgInterval,
                "cfg_schedule": cfgSchedule.rawValue, "cfg_power": Double(options.cfgPower),
                "temperature": Double(temperature.values[0]), "top_k": topK, "top_p": Double(topP),
                "seed": seed, "per_class": perClass, "classes": Array(Set(labels.map { Int($0) })).sorted(),
                "weights": weights ?? "",
            ]
            // per sub-token values (Open-MAGVIT2, SPEC section 8) when two were given
            if cfgScale.values.count > 1 { sampling["cfg_scales"] = cfgScale.values.map(Double.init) }
            if temperature.values.count > 1 { sampling["temperatures"] = temperature.values.map(Double.init) }
            try f.setAttribute(
                "sampling",
                string: String(
                    data: try JSONSerialization.data(withJSONObject: sampling, options: [.sortedKeys]),
                    encoding: .utf8)!
            )
            try f.flush()
        }
        try replaceFile(out, with: tmp)
    }

    func writeNPY(_ path: String, _ values: [Int64], shape: [Int]) throws {
        try checkOutputFile(path, what: "--npy-dir file")
        let tmp = path + ".tmp"
        guard FileManager.default.createFile(atPath: tmp, contents: npyData(int64: values, shape: shape)) else {
            throw InputError(tmp, "cannot write the file (disk full?)")
        }
        try replaceFile(path, with: tmp)
    }
}

extension WeightsKind: ExpressibleByArgument {}
extension GuidanceSchedule: ExpressibleByArgument {}

/// A flag of one value or two, comma-separated (`--cfg-scale 1.9,2.0`): one per head part.
struct PartValues: ExpressibleByArgument, CustomStringConvertible {
    let values: [Float]
    init(_ values: [Float]) { self.values = values }
    init?(argument: String) {
        let v = argument.split(separator: ",", omittingEmptySubsequences: false).map {
            Float($0.trimmingCharacters(in: .whitespaces))
        }
        guard (1...2).contains(v.count), v.allSatisfy({ $0 != nil }) else { return nil }
        values = v.map { $0! }
    }
    /// As given: "2.0" or "1.9,2.0" (the output file's attribute text).
    var description: String { values.map { "\($0)" }.joined(separator: ",") }
}
