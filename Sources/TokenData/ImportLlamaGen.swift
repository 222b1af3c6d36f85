import Foundation
import Platform

// LlamaGen's extract_codes_c2i.py writes one sample per file: `codes/{i}.npy` int64 of shape
// (1, A, T) (A = 1, 2 with flip, 10 or 20 with ten-crop) and `labels/{i}.npy` int64 of shape (1,).
// The importer lists the folder (no assumed dataset size), orders samples by i, and converts
// them in parallel into shards of a chosen size.

public struct LlamaGenImportOptions: Sendable {
    public var codes: String
    public var labels: String
    public var out: String
    public var shardSize = 10_000
    public var numClasses = 1000
    public var vocabSize = 16384
    public var jobs = 2
    public init(codes: String, labels: String, out: String) { self.codes = codes; self.labels = labels; self.out = out }
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

/// One sample's codes [A, T] and label, checked against the options.
private func readSample(_ i: Int, _ o: LlamaGenImportOptions) throws -> (codes: NPYArray, label: Int32) {
    let cp = (o.codes as NSString).appendingPathComponent("\(i).npy")
    let lp = (o.labels as NSString).appendingPathComponent("\(i).npy")
    let c = try readNPY(path: cp)
    guard (c.shape.count == 3 && c.shape[0] == 1) || c.shape.count == 2 else {
        throw InputError(cp, "codes have shape \(c.shape); expected (1, A, T)")
    }
    if let bad = c.values.firstIndex(where: { $0 < 0 || $0 >= Int64(o.vocabSize) }) {
        throw InputError(cp, "token \(c.values[bad]) at flat index \(bad) is outside [0, vocab_size \(o.vocabSize))")
    }
    guard FileManager.default.fileExists(atPath: lp) else { throw InputError(lp, "missing: every codes file needs a labels file of the same name") }
    let l = try readNPY(path: lp)
    guard l.values.count == 1 else { throw InputError(lp, "label has shape \(l.shape); expected (1,)") }
    guard l.values[0] >= 0 && l.values[0] < Int64(o.numClasses) else {
        throw InputError(lp, "label \(l.values[0]) is outside [0, num_classes \(o.numClasses))")
    }
    return (c, Int32(l.values[0]))
}

/// Converts the folders into a token cache at `o.out`; returns its dataset.json.
public func importLlamaGen(_ o: LlamaGenImportOptions, log: @escaping (String) -> Void) throws -> CacheInfo {
    let started = Date()
    let ids = try listNumberedNPY(o.codes)
    guard let first = ids.first else { throw InputError(o.codes, "no {i}.npy files found") }
    guard o.shardSize >= 1, o.jobs >= 1 else { throw InputError(o.out, "shard size and jobs must be at least 1") }
    // Shape from the first sample; every other must agree.
    let probe = try readSample(first, o)
    let (a, t) = (probe.codes.shape[probe.codes.shape.count - 2], probe.codes.shape[probe.codes.shape.count - 1])
    let side = Int(Double(t).squareRoot().rounded())
    let firstPath = (o.codes as NSString).appendingPathComponent("\(first).npy")
    guard side * side == t else { throw InputError(firstPath, "T = \(t) tokens is not a square grid") }
    if ids.last! - first + 1 != ids.count {
        log("note: sample numbers run \(first)...\(ids.last!) with gaps; \(ids.count) files are imported in number order")
    }
    log("importing \(ids.count) samples: A = \(a), T = \(t) (\(side)x\(side) grid), V = \(o.vocabSize), C = \(o.numClasses)")

    let writer = try CacheWriter(directory: o.out, vocabSize: o.vocabSize, gridH: side, gridW: side,
                                 numClasses: o.numClasses, augmentations: a, shardSize: o.shardSize)
    let shards = (ids.count + o.shardSize - 1) / o.shardSize
    // Workers take shard numbers from a shared counter; the first error stops the rest.
    let lock = NSLock()
    var nextShard = 0, failure: Error?, done = 0
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
                var codes: [Int32] = [], labels: [Int32] = []
                codes.reserveCapacity(part.count * a * t)
                for i in part {
                    let sample = try readSample(i, o)
                    let shape = Array(sample.codes.shape.suffix(2))
                    guard shape == [a, t] else {
                        throw InputError((o.codes as NSString).appendingPathComponent("\(i).npy"),
                                         "codes have shape \(sample.codes.shape) but \(first).npy has (1, \(a), \(t)): all samples need the same A and T")
                    }
                    codes += sample.codes.values.map { Int32($0) }
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
