import Foundation
import Platform

// The small built-in dataset: Fashion-MNIST (28x28 grey, 10 classes) tokenised by a patch VQ
// learnt with k-means. Layout written under `out`:
//   out/train/  token cache (SPEC 7), 60k samples, A = 2 (original, horizontal flip), + codebook.h5
//   out/val/    token cache of the 10k test images, same codebook.h5 (an identical copy, so each
//               cache folder decodes on its own)
//   out/tokenizer.json  how it was built and how well it reconstructs

public struct PatchVQOptions: Codable, Equatable, Sendable {
    public var patch = 4  // patch side in pixels: grid = 28 / patch
    public var codebookSize = 512  // V
    public var seed: UInt64 = 0
    public var kmeansSamples = 200_000  // patches drawn (with flips) from the training images
    public var kmeansIterations = 20
    public var shardSize = 10_000
    public init() {}
    enum CodingKeys: String, CodingKey {
        case patch
        case codebookSize = "codebook_size"
        case seed
        case kmeansSamples = "kmeans_samples"
        case kmeansIterations = "kmeans_iterations"
        case shardSize = "shard_size"
    }
}

/// tokenizer.json: the options and what came out.
public struct PatchVQReport: Codable, Sendable {
    public var options: PatchVQOptions
    public var vocabSize: Int
    public var gridH: Int
    public var gridW: Int
    public var trainSamples: Int
    public var valSamples: Int
    public var trainMSE: Double  // per pixel, [0, 1] scale, original images (augmentation 0)
    public var valMSE: Double  // measured by decoding the written val cache
    public var valPSNR: Double  // dB, peak 1
    public var usedCodes: Int  // codes appearing in the train cache
    public var trainUnigramEntropyNats: Double
    public var seconds: Double
    enum CodingKeys: String, CodingKey {
        case options
        case vocabSize = "vocab_size"
        case gridH = "grid_h"
        case gridW = "grid_w"
        case trainSamples = "train_samples"
        case valSamples = "val_samples"
        case trainMSE = "train_mse"
        case valMSE = "val_mse"
        case valPSNR = "val_psnr_db"
        case usedCodes = "used_codes"
        case trainUnigramEntropyNats = "train_unigram_entropy_nats"
        case seconds
    }
}

/// Images [n, 28, 28] as floats in [0, 1] and labels [n], checked.
struct LabelledImages {
    let images: [Float]
    let labels: [Int32]
    let height: Int
    let width: Int
    var count: Int { labels.count }
}

func loadIDXPair(source: String, images: [String], labels: [String], numClasses: Int) throws -> LabelledImages {
    let ip = try findMaybeGzip(folder: source, names: images)
    let lp = try findMaybeGzip(folder: source, names: labels)
    let im = try readIDX(path: ip)
    let lb = try readIDX(path: lp)
    guard im.shape.count == 3 else { throw InputError(ip, "expected images of shape [n, h, w], got \(im.shape)") }
    guard lb.shape == [im.shape[0]] else {
        throw InputError(lp, "expected \(im.shape[0]) labels (as many as images), got shape \(lb.shape)")
    }
    if let bad = lb.values.firstIndex(where: { Int($0) >= numClasses }) {
        throw InputError(lp, "label \(lb.values[bad]) of sample \(bad) is not below \(numClasses)")
    }
    return LabelledImages(
        images: im.values.map { Float($0) / 255 }, labels: lb.values.map { Int32($0) },
        height: im.shape[1], width: im.shape[2])
}

/// Builds (or, when it already exists with the same options and verifies, keeps) the tokenised
/// Fashion-MNIST caches. `log` receives progress lines. `reused` says the build was already there.
public func buildFashionMNIST(
    source: String, out: String, options o: PatchVQOptions, force: Bool = false,
    log: (String) -> Void
) throws -> (report: PatchVQReport, reused: Bool) {
    let started = Date()
    let trainDir = (out as NSString).appendingPathComponent("train")
    let valDir = (out as NSString).appendingPathComponent("val")
    let reportPath = (out as NSString).appendingPathComponent("tokenizer.json")

    if !force,
        let existing = try? existingBuild(
            reportPath: reportPath, trainDir: trainDir, valDir: valDir, options: o, log: log)
    {
        return (existing, true)
    }

    let numClasses = 10
    let train = try loadIDXPair(
        source: source, images: ["train-images-idx3-ubyte", "train-images.idx3-ubyte"],
        labels: ["train-labels-idx1-ubyte", "train-labels.idx1-ubyte"], numClasses: numClasses)
    let test = try loadIDXPair(
        source: source, images: ["t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"],
        labels: ["t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"], numClasses: numClasses)
    let (h, w) = (train.height, train.width)
    guard test.height == h, test.width == w else {
        throw InputError(source, "train images are \(h)x\(w) but test images \(test.height)x\(test.width)")
    }
    guard o.patch >= 1, h % o.patch == 0, w % o.patch == 0 else {
        throw InputError(source, "patch \(o.patch) does not divide the \(h)x\(w) images")
    }
    guard o.codebookSize >= 2, o.codebookSize <= 65535 else {
        throw InputError(out, "codebook size must be in 2...65535, got \(o.codebookSize)")
    }
    log("read \(train.count) train and \(test.count) test images of \(h)x\(w) from \(source) (\(elapsed(started)))")

    // 1. k-means over the patches of randomly drawn training images, each flipped or not.
    let p = o.patch
    let dc = p * p
    let perImage = (h / p) * (w / p)
    let samples = min(o.kmeansSamples, train.count * perImage * 2)
    var rng = CounterRNG(seed: o.seed, RandomPurpose.initialise.rawValue, 0x7061_7463_6865_73)  // "patches"
    var points: [Float] = []
    points.reserveCapacity(samples * dc + perImage * dc)
    train.images.withUnsafeBufferPointer { all in
        while points.count < samples * dc {
            let i = rng.below(train.count)
            let flip = rng.below(2) == 1
            let image = UnsafeBufferPointer(rebasing: all[(i * h * w)..<((i + 1) * h * w)])
            points += imagePatches(image, count: 1, height: h, width: w, channels: 1, patch: p, flip: flip)
        }
    }
    points.removeLast(points.count - samples * dc)
    log("k-means: \(samples) patches of \(p)x\(p), V = \(o.codebookSize), up to \(o.kmeansIterations) iterations")
    let centroids = kMeans(points: points, dim: dc, k: o.codebookSize, iterations: o.kmeansIterations, seed: o.seed) {
        st in
        log(
            String(
                format: "  iteration %2d: patch MSE %.5f, %d reassigned (%@)", st.iteration, st.meanSquaredError,
                st.changed, elapsed(started)))
    }
    let codebook = try Codebook(vectors: centroids, patchSize: p, imageH: h, imageW: w, channels: 1)

    // 2. Tokenise both splits, original and flipped (A = 2), into caches with the codebook.
    let description = "Fashion-MNIST patch VQ: k-means, \(p)x\(p) patches, V = \(o.codebookSize), seed \(o.seed)"
    var trainMSE = 0.0
    for (name, dir, split) in [("train", trainDir, train), ("val", valDir, test)] {
        let mse = try tokenise(split, codebook: codebook, dir: dir, numClasses: numClasses, shardSize: o.shardSize) {
            log("  \(name): \($0) (\(elapsed(started)))")
        }
        try codebook.save(
            path: (dir as NSString).appendingPathComponent(CacheInfo.codebookFileName), description: description)
        if name == "train" { trainMSE = mse }
        log(
            String(format: "%@: %d samples -> %@ (tokenisation MSE %.5f, original images)", name, split.count, dir, mse)
        )
    }

    // 3. Reconstruction error measured the long way: read the val cache back, decode, compare.
    let valMSE = try reconstructionMSE(cacheDir: valDir, images: test)
    let psnr = 10 * log10(1 / valMSE)
    let stats = try inspectCache(directory: trainDir)
    let report = PatchVQReport(
        options: o, vocabSize: o.codebookSize, gridH: codebook.gridH, gridW: codebook.gridW,
        trainSamples: train.count, valSamples: test.count, trainMSE: trainMSE, valMSE: valMSE,
        valPSNR: psnr, usedCodes: o.codebookSize - stats.unusedCodes.count,
        trainUnigramEntropyNats: stats.entropyNats, seconds: Date().timeIntervalSince(started))
    let enc = JSONEncoder()
    enc.outputFormatting = [.prettyPrinted, .sortedKeys]
    try writeAtomically(path: reportPath, data: try enc.encode(report) + Data("\n".utf8))
    return (report, false)
}

/// The report of an earlier build when it has the requested options and both caches verify.
private func existingBuild(
    reportPath: String, trainDir: String, valDir: String, options: PatchVQOptions,
    log: (String) -> Void
) throws -> PatchVQReport? {
    guard let data = FileManager.default.contents(atPath: reportPath) else { return nil }
    guard let old = try? JSONDecoder().decode(PatchVQReport.self, from: data) else {
        log("\(reportPath) is unreadable: rebuilding")
        return nil
    }
    guard old.options == options else {
        log("existing build used other options \(old.options): rebuilding")
        return nil
    }
    do {
        for dir in [trainDir, valDir] {
            _ = try verifyCache(directory: dir)
            _ = try Codebook.load(path: (dir as NSString).appendingPathComponent(CacheInfo.codebookFileName))
        }
    } catch {
        log("existing build does not verify (\(error)): rebuilding")
        return nil
    }
    return old
}

/// Writes one split's cache; returns the mean squared pixel error of the original images.
private func tokenise(
    _ split: LabelledImages, codebook: Codebook, dir: String, numClasses: Int, shardSize: Int,
    progress: (String) -> Void
) throws -> Double {
    let t = codebook.gridH * codebook.gridW
    let px = split.height * split.width
    let writer = try CacheWriter(
        directory: dir, vocabSize: codebook.V, gridH: codebook.gridH, gridW: codebook.gridW,
        numClasses: numClasses, augmentations: 2, shardSize: shardSize)
    let block = 2000
    var squaredError = 0.0
    var done = 0
    try split.images.withUnsafeBufferPointer { all in
        while done < split.count {
            let n = min(block, split.count - done)
            let imgs = UnsafeBufferPointer(rebasing: all[(done * px)..<((done + n) * px)])
            let (orig, err) = codebook.encode(images: imgs, count: n)
            let (flip, _) = codebook.encode(images: imgs, count: n, flip: true)
            squaredError += err
            var codes = [Int32](repeating: 0, count: n * 2 * t)  // [n, A = 2, T]
            for i in 0..<n {
                for j in 0..<t {
                    codes[(i * 2) * t + j] = orig[i * t + j]
                    codes[(i * 2 + 1) * t + j] = flip[i * t + j]
                }
            }
            try writer.append(codes: codes, labels: Array(split.labels[done..<(done + n)]))
            done += n
            if done % 10_000 == 0 || done == split.count { progress("tokenised \(done)/\(split.count)") }
        }
    }
    try writer.finish()
    return squaredError / Double(split.count * px)
}

/// Mean squared pixel error between the images and their decoded augmentation-0 tokens.
func reconstructionMSE(cacheDir: String, images: LabelledImages) throws -> Double {
    let cache = try TokenCache(directory: cacheDir)
    let cb = try Codebook.load(path: (cacheDir as NSString).appendingPathComponent(CacheInfo.codebookFileName))
    let px = images.height * images.width
    var se = 0.0
    try forEachValidationBatch(cache: cache, range: 0..<cache.count, batchSize: 1000) { b in
        for (k, i) in b.sampleIndices.enumerated() {
            let img = cb.decode(
                tokens: Array(b.codes[(k * cache.seqLen)..<((k + 1) * cache.seqLen)]), gridH: cb.gridH, gridW: cb.gridW)
            for j in 0..<px {
                let d = Double(img[j] - images.images[i * px + j])
                se += d * d
            }
        }
    }
    return se / Double(cache.count * px)
}

func elapsed(_ since: Date) -> String { String(format: "%.1f s", Date().timeIntervalSince(since)) }
