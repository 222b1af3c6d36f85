import Foundation
import Platform

// LlamaGen's extract_codes_c2i.py writes one sample per file under its --code-path ROOT:
// `ROOT/<dataset><size>_codes/{i}.npy` int64 of shape (1, A, T) (A = 2: the image and its flip;
// 10 with --ten-crop) and `ROOT/<dataset><size>_labels/{i}.npy` int64 of shape (1,). LlamaGen's
// dataset also draws half the time from a companion root (`..._ten_crop_105`, a wider crop).
// Several roots go into one cache as further augmentation views: sample i's views are root 1's
// A_1 views, then root 2's, ... (the same sample numbers and labels in every root). The importer
// lists the folders (no assumed dataset size), orders samples by i, and converts them in
// parallel into shards of a chosen size.

/// One root's pair of folders.
public struct LlamaGenFolders: Sendable, Equatable {
    public var codes: String
    public var labels: String
    public init(codes: String, labels: String) {
        self.codes = codes
        self.labels = labels
    }
}

public struct LlamaGenImportOptions: Sendable {
    /// One entry per root; their views are concatenated in this order.
    public var views: [LlamaGenFolders]
    public var out: String
    public var shardSize = 10_000
    public var numClasses: Int
    public var vocabSize: Int
    /// Where the two limits came from, for errors ("--vocab-size", "--like W", ...).
    public var limitsFrom = "--vocab-size and --num-classes"
    public var jobs = 2
    public init(views: [LlamaGenFolders], out: String, vocabSize: Int, numClasses: Int) {
        self.views = views
        self.out = out
        self.vocabSize = vocabSize
        self.numClasses = numClasses
    }
}

/// The codes and labels folders of a LlamaGen --code-path root: its one `*_codes` folder and the
/// `*_labels` folder of the same prefix.
public func findLlamaGenFolders(codePath root: String) throws -> LlamaGenFolders {
    let names: [String]
    do { names = try FileManager.default.contentsOfDirectory(atPath: root) } catch {
        throw InputError(root, "cannot list the --code-path folder (missing?)")
    }
    let codeFolders = names.filter { $0.hasSuffix("_codes") }.sorted()
    let pairs = codeFolders.filter { names.contains(String($0.dropLast(6)) + "_labels") }
    guard pairs.count == 1, let codes = pairs.first else {
        let found = pairs.isEmpty ? "none" : pairs.joined(separator: ", ")
        throw InputError(
            root,
            "expected one <name>_codes folder beside its <name>_labels (as LlamaGen's "
                + "extract_codes_c2i.py writes them, e.g. imagenet256_codes and imagenet256_labels); found \(found)")
    }
    let join = { (name: String) in (root as NSString).appendingPathComponent(name) }
    return LlamaGenFolders(codes: join(codes), labels: join(String(codes.dropLast(6)) + "_labels"))
}

/// The sample numbers of the first root's codes; every other root must hold the same ones.
/// A --codes folder that is a LlamaGen root (it holds `*_codes`) gets a hint at --code-path.
func sampleNumbers(_ views: [LlamaGenFolders]) throws -> [Int] {
    let ids = try listNumberedNPY(views[0].codes)
    if ids.isEmpty, (try? findLlamaGenFolders(codePath: views[0].codes)) != nil {
        throw InputError(
            views[0].codes,
            "no {i}.npy files found: this is a LlamaGen --code-path root "
                + "(it holds the codes and labels folders); pass it as --code-path")
    }
    for v in views.dropFirst() {
        let other = try listNumberedNPY(v.codes)
        if other != ids {
            let extra = Set(other).symmetricDifference(ids).min() ?? 0
            throw InputError(
                v.codes,
                "holds \(other.count) samples, \(views[0].codes) \(ids.count) "
                    + "(sample \(extra) is in one only): every root needs the same sample numbers")
        }
    }
    return ids
}

/// The sample numbers `i` of the `{i}.npy` files in a folder, ascending.
func listNumberedNPY(_ folder: String) throws -> [Int] {
    let names: [String]
    do { names = try FileManager.default.contentsOfDirectory(atPath: folder) } catch {
        throw InputError(folder, "cannot list folder (missing?)")
    }
    return names.compactMap { name -> Int? in
        guard name.hasSuffix(".npy") else { return nil }
        let stem = name.dropLast(4)
        guard !stem.isEmpty, stem.allSatisfy(\.isASCII), stem.allSatisfy(\.isNumber) else { return nil }
        return Int(stem)
    }.sorted()
}

/// One root's sample: codes [A, T] and label, checked against the options.
private func readView(
    _ i: Int, _ f: LlamaGenFolders,
    _ o: LlamaGenImportOptions
) throws -> (codes: NPYArray, label: Int32) {
    let cp = (f.codes as NSString).appendingPathComponent("\(i).npy")
    let lp = (f.labels as NSString).appendingPathComponent("\(i).npy")
    guard FileManager.default.fileExists(atPath: cp) else {
        throw InputError(cp, "missing: every root needs the same sample numbers (\(o.views[0].codes) has \(i).npy)")
    }
    let c = try readNPY(path: cp)
    guard (c.shape.count == 3 && c.shape[0] == 1) || c.shape.count == 2 else {
        throw InputError(cp, "codes have shape \(c.shape); expected (1, A, T)")
    }
    if let bad = c.values.firstIndex(where: { $0 < 0 || $0 >= Int64(o.vocabSize) }) {
        throw InputError(
            cp,
            "token \(c.values[bad]) at flat index \(bad) is outside [0, vocab_size \(o.vocabSize)): "
                + "the vocab_size of \(o.limitsFrom) is smaller than the data holds")
    }
    guard FileManager.default.fileExists(atPath: lp) else {
        throw InputError(lp, "missing: every codes file needs a labels file of the same name")
    }
    let l = try readNPY(path: lp)
    guard l.values.count == 1 else { throw InputError(lp, "label has shape \(l.shape); expected (1,)") }
    guard l.values[0] >= 0 && l.values[0] < Int64(o.numClasses) else {
        throw InputError(
            lp,
            "label \(l.values[0]) is outside [0, num_classes \(o.numClasses)): "
                + "the num_classes of \(o.limitsFrom) is smaller than the data holds")
    }
    return (c, Int32(l.values[0]))
}

/// Sample i of every root: its views concatenated ([A, T], A = the roots' A summed), one label.
private func readSample(
    _ i: Int,
    _ o: LlamaGenImportOptions
) throws -> (codes: [Int64], views: [Int], t: Int, label: Int32) {
    var codes: [Int64] = []
    var views: [Int] = []
    var t = 0
    var label: Int32 = -1
    for f in o.views {
        let v = try readView(i, f, o)
        let shape = v.codes.shape
        views.append(shape[shape.count - 2])
        t = shape[shape.count - 1]
        if label >= 0 && v.label != label {
            let lp = (f.labels as NSString).appendingPathComponent("\(i).npy")
            throw InputError(
                lp,
                "label \(v.label) but \(o.views[0].labels)/\(i).npy says \(label): "
                    + "the roots are not views of the same images")
        }
        label = v.label
        codes += v.codes.values
    }
    return (codes, views, t, label)
}

/// Converts the folders into a token cache at `o.out`; returns its dataset.json.
public func importLlamaGen(_ o: LlamaGenImportOptions, log: @escaping (String) -> Void) throws -> CacheInfo {
    let started = Date()
    guard let main = o.views.first else { throw InputError(o.out, "no codes folder given") }
    let ids = try sampleNumbers(o.views)
    guard let first = ids.first else { throw InputError(main.codes, "no {i}.npy files found") }
    guard o.shardSize >= 1, o.jobs >= 1 else { throw InputError(o.out, "shard size and jobs must be at least 1") }
    // Shape from the first sample; every other must agree.
    let probe = try readSample(first, o)
    let a = probe.views.reduce(0, +)
    let t = probe.t
    let side = Int(Double(t).squareRoot().rounded())
    let firstPath = (main.codes as NSString).appendingPathComponent("\(first).npy")
    guard side * side == t else { throw InputError(firstPath, "T = \(t) tokens is not a square grid") }
    if ids.last! - first + 1 != ids.count {
        log(
            "note: sample numbers run \(first)...\(ids.last!) with gaps; \(ids.count) files "
                + "are imported in number order"
        )
    }
    let perRoot = probe.views.map(String.init).joined(separator: " + ")
    let roots = o.views.count > 1 ? " from \(o.views.count) roots (views \(perRoot))" : ""
    log(
        "importing \(ids.count) samples: A = \(a)\(roots), T = \(t) (\(side)x\(side) grid), "
            + "V = \(o.vocabSize), C = \(o.numClasses)")

    let writer = try CacheWriter(
        directory: o.out, vocabSize: o.vocabSize, gridH: side, gridW: side,
        numClasses: o.numClasses, augmentations: a, shardSize: o.shardSize)
    let shards = (ids.count + o.shardSize - 1) / o.shardSize
    // Workers take shard numbers from a shared counter; the first error stops the rest.
    let lock = NSLock()
    var nextShard = 0
    var failure: Error?
    var done = 0
    DispatchQueue.concurrentPerform(iterations: min(o.jobs, shards)) { _ in
        while true {
            lock.lock()
            let s = nextShard
            nextShard += 1
            let stop = failure != nil || s >= shards
            lock.unlock()
            if stop { return }
            do {
                let part = ids[(s * o.shardSize)..<min(ids.count, (s + 1) * o.shardSize)]
                var codes: [Int32] = []
                var labels: [Int32] = []
                codes.reserveCapacity(part.count * a * t)
                for i in part {
                    let sample = try readSample(i, o)
                    let other = (0..<o.views.count).first { sample.views[$0] != probe.views[$0] }
                    if let r = other ?? (sample.t != t ? 0 : nil) {
                        throw InputError(
                            (o.views[r].codes as NSString).appendingPathComponent("\(i).npy"),
                            "codes have shape (1, \(sample.views[r]), \(sample.t)) but \(first).npy has "
                                + "(1, \(probe.views[r]), \(t)): all samples need the same A and T")
                    }
                    codes += sample.codes.map { Int32($0) }
                    labels.append(sample.label)
                }
                try writer.writeShard(index: s, codes: codes, labels: labels)
                lock.lock()
                done += 1
                log("  shard \(s + 1)/\(shards) written (\(done) done, \(elapsed(started)))")
                lock.unlock()
            } catch {
                lock.lock()
                if failure == nil { failure = error }
                lock.unlock()
                return
            }
        }
    }
    if let failure { throw failure }
    return try writer.finish()
}
