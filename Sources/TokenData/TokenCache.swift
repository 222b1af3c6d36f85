import Foundation
import Platform

/// A token cache opened for reading (SPEC 7). Opening checks dataset.json, that every shard exists
/// and that its attributes, shapes and dtypes agree with dataset.json; every read checks the
/// values it returns (token < V, label < C). `verifyCache` does the full check, checksums included.
public final class TokenCache {
    public let directory: String
    public let info: CacheInfo
    /// Tokens per image, T.
    public var seqLen: Int { info.seqLen }
    public var count: Int { info.numSamples }

    private let files: [HDF5File]  // one open handle per shard
    private let labels: [[Int32]]  // per shard, [n_s]; small, read once at open
    private let starts: [Int]  // first global sample index of each shard, plus N at the end

    public init(directory: String) throws {
        self.directory = directory
        let info = try CacheInfo.load(directory: directory)
        self.info = info
        var files: [HDF5File] = []
        var labels: [[Int32]] = []
        var starts = [0]
        for s in info.shards {
            let path = (directory as NSString).appendingPathComponent(s.file)
            guard FileManager.default.fileExists(atPath: path) else {
                throw InputError(path, "missing: dataset.json lists this shard but the file is not there")
            }
            let f = try HDF5File.open(path)
            try TokenCache.checkShard(f, info: info, entry: s)
            labels.append(try f.read("labels", as: Int32.self).values)
            files.append(f)
            starts.append(starts.last! + s.numSamples)
        }
        self.files = files
        self.labels = labels
        self.starts = starts
    }

    /// A shard's attributes, dataset shapes and dtypes against dataset.json.
    static func checkShard(_ f: HDF5File, info: CacheInfo, entry: ShardInfo) throws {
        let path = f.path
        for (key, want) in info.shardAttributes(numSamples: entry.numSamples) {
            guard f.hasAttribute(key) else { throw InputError(path, "missing attribute '\(key)' (SPEC 7)") }
            let got = try f.intAttribute(key)
            guard got == want else {
                let what = key == "num_samples" ? "this shard's num_samples in dataset.json" : "dataset.json"
                throw InputError(path, "attribute \(key) = \(got) but \(what) says \(want)")
            }
        }
        for name in ["codes", "labels"] where !f.has(name) { throw InputError(path, "missing dataset '\(name)'") }
        let n = entry.numSamples
        let codesShape = try f.shape(of: "codes")
        guard codesShape == [n, info.augmentations, info.seqLen] else {
            throw InputError(
                path, "codes has shape \(codesShape); expected [\(n), \(info.augmentations), \(info.seqLen)] (N, A, T)")
        }
        let labelsShape = try f.shape(of: "labels")
        guard labelsShape == [n] else { throw InputError(path, "labels has shape \(labelsShape); expected [\(n)]") }
        let wantCodes = HDF5StoredType(info.codesKind)
        let codesType = try f.storedType(of: "codes")
        guard codesType == wantCodes else {
            throw InputError(
                path, "codes are stored as \(codesType); vocab_size \(info.vocabSize) needs \(wantCodes) (SPEC 7)")
        }
        let labelsType = try f.storedType(of: "labels")
        guard labelsType == HDF5StoredType(.int32) else {
            throw InputError(path, "labels are stored as \(labelsType); expected int32 (SPEC 7)")
        }
    }

    /// Shard holding global sample `i`, and the row inside it.
    @inline(__always) func locate(_ i: Int) -> (shard: Int, row: Int) {
        var lo = 0
        var hi = files.count - 1  // last shard whose start <= i
        while lo < hi {
            let mid = (lo + hi + 1) / 2
            if starts[mid] <= i { lo = mid } else { hi = mid - 1 }
        }
        return (lo, i - starts[lo])
    }

    public func shardPath(_ shard: Int) -> String { files[shard].path }

    /// Codes of sample `indices[k]` under augmentation `augmentations[k]`, row-major [n, T], and
    /// their labels [n]. Reads one row at a time in file order (TOOLCHAIN.md: faster than one
    /// union hyperslab, which also returns rows in file order).
    public func read(indices: [Int], augmentations: [Int]) throws -> (codes: [Int32], labels: [Int32]) {
        let n = indices.count
        let t = seqLen
        guard augmentations.count == n else {
            throw InputError(directory, "read: \(n) indices but \(augmentations.count) augmentation indices")
        }
        for (i, a) in zip(indices, augmentations) {
            guard i >= 0 && i < count else { throw InputError(directory, "sample index \(i) outside 0..<\(count)") }
            guard a >= 0 && a < info.augmentations else {
                throw InputError(directory, "augmentation \(a) outside 0..<\(info.augmentations) (sample \(i))")
            }
        }
        var codes = [Int32](repeating: 0, count: n * t)
        var outLabels = [Int32](repeating: 0, count: n)
        let order = (0..<n).sorted { indices[$0] < indices[$1] }
        var row16 = [UInt16](repeating: 0, count: t)
        try codes.withUnsafeMutableBufferPointer { out in
            for k in order {
                let (s, r) = locate(indices[k])
                let dst = out.baseAddress! + k * t
                if info.codesKind == .uint16 {
                    try row16.withUnsafeMutableBytes {
                        try files[s].readSlab(
                            "codes", kind: .uint16, offset: [r, augmentations[k], 0], count: [1, 1, t],
                            into: $0.baseAddress!)
                    }
                    for j in 0..<t { dst[j] = Int32(row16[j]) }
                } else {
                    try files[s].readSlab(
                        "codes", kind: .int32, offset: [r, augmentations[k], 0], count: [1, 1, t],
                        into: UnsafeMutableRawPointer(dst))
                }
                try checkTokens(
                    UnsafeBufferPointer(start: dst, count: t), shard: s, row: r, augmentation: augmentations[k])
                outLabels[k] = try label(shard: s, row: r)
            }
        }
        return (codes, outLabels)
    }

    /// Rows [start, start + n) of one shard, all augmentations: codes [n, A, T], labels [n], checked.
    public func readShardRows(shard s: Int, start: Int, count n: Int) throws -> (codes: [Int32], labels: [Int32]) {
        let row = info.augmentations * seqLen
        var codes = [Int32](repeating: 0, count: n * row)
        if info.codesKind == .uint16 {
            var raw = [UInt16](repeating: 0, count: n * row)
            try raw.withUnsafeMutableBytes {
                try files[s].readRows("codes", kind: .uint16, start: start, rows: n, into: $0.baseAddress!)
            }
            for j in 0..<raw.count { codes[j] = Int32(raw[j]) }
        } else {
            try codes.withUnsafeMutableBytes {
                try files[s].readRows("codes", kind: .int32, start: start, rows: n, into: $0.baseAddress!)
            }
        }
        var outLabels = [Int32](repeating: 0, count: n)
        try codes.withUnsafeBufferPointer { all in
            for i in 0..<n {
                for a in 0..<info.augmentations {
                    let base = all.baseAddress! + i * row + a * seqLen
                    try checkTokens(
                        UnsafeBufferPointer(start: base, count: seqLen), shard: s, row: start + i, augmentation: a)
                }
                outLabels[i] = try label(shard: s, row: start + i)
            }
        }
        return (codes, outLabels)
    }

    /// Number of shards and samples in shard `s`.
    public var shardCount: Int { files.count }
    public func shardSamples(_ s: Int) -> Int { starts[s + 1] - starts[s] }

    private func checkTokens(_ row: UnsafeBufferPointer<Int32>, shard s: Int, row r: Int, augmentation a: Int) throws {
        let v = Int32(truncatingIfNeeded: info.vocabSize)
        for (j, x) in row.enumerated() where x < 0 || x >= v {
            throw InputError(
                files[s].path,
                "sample \(r) (global \(starts[s] + r)), augmentation \(a), position \(j): token \(x) outside [0, "
                    + "vocab_size \(info.vocabSize))"
            )
        }
    }

    private func label(shard s: Int, row r: Int) throws -> Int32 {
        let y = labels[s][r]
        guard y >= 0 && Int(y) < info.numClasses else {
            throw InputError(
                files[s].path,
                "sample \(r) (global \(starts[s] + r)): label \(y) outside [0, num_classes \(info.numClasses))")
        }
        return y
    }

    /// Path of the cache's codebook.h5 when there is one.
    public var codebookPath: String? {
        let p = (directory as NSString).appendingPathComponent(CacheInfo.codebookFileName)
        return FileManager.default.fileExists(atPath: p) ? p : nil
    }
}
