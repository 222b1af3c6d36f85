import Foundation
import Platform

/// Writes a token cache (SPEC 7): shards of `shardSize` samples, each with its sha256, then
/// dataset.json last and atomically. Until `finish()` the folder has no dataset.json, so a crash
/// midway never leaves something that looks like a cache.
///
/// Two ways to feed it: `append` (sequential, any amounts) or `writeShard(index:)` (one whole
/// shard at a time, safe to call from several threads); use one or the other.
public final class CacheWriter {
    public let directory: String
    public let shardSize: Int
    /// The dataset facts; `numSamples` and `shards` are filled in by `finish()`.
    public private(set) var info: CacheInfo

    private let lock = NSLock()
    private var written: [Int: ShardInfo] = [:]  // shard index -> entry, under `lock`
    private var pendingCodes: [Int32] = []  // append buffer, [n, A, T]
    private var pendingLabels: [Int32] = []
    private var nextAppendShard = 0

    /// Creates `directory` if needed and removes an old dataset.json and old shards in it.
    public init(
        directory: String, vocabSize: Int, gridH: Int, gridW: Int, numClasses: Int, augmentations: Int,
        shardSize: Int = 10_000
    ) throws {
        self.directory = directory
        self.shardSize = shardSize
        info = CacheInfo(
            vocabSize: vocabSize, gridH: gridH, gridW: gridW, numClasses: numClasses,
            augmentations: augmentations, numSamples: 0, shards: [])
        guard shardSize >= 1 else { throw InputError(directory, "shard size must be at least 1, got \(shardSize)") }
        try info.validateFields(path: directory, requireSamples: false)  // the field checks a reader applies
        let fm = FileManager.default
        do { try fm.createDirectory(atPath: directory, withIntermediateDirectories: true) } catch {
            throw InputError(directory, "cannot create the cache folder: \(error.localizedDescription)")
        }
        // Old contents go first, dataset.json before the shards it names.
        let old = (try? fm.contentsOfDirectory(atPath: directory)) ?? []
        for name in [CacheInfo.fileName]
            + old.filter({ $0.hasPrefix("shard-") && ($0.hasSuffix(".h5") || $0.hasSuffix(".h5.tmp")) })
        {
            let p = (directory as NSString).appendingPathComponent(name)
            if fm.fileExists(atPath: p) { try? fm.removeItem(atPath: p) }
        }
    }

    public static func shardFileName(_ index: Int) -> String { String(format: "shard-%05d.h5", index) }

    /// Appends samples: `codes` [n, A, T], `labels` [n]. Writes each shard as it fills.
    public func append(codes: [Int32], labels: [Int32]) throws {
        let row = info.augmentations * info.seqLen
        guard codes.count == labels.count * row else {
            throw InputError(
                directory, "append: \(codes.count) codes for \(labels.count) samples; expected \(labels.count) x \(row)"
            )
        }
        pendingCodes += codes
        pendingLabels += labels
        while pendingLabels.count >= shardSize { try flushPending(count: shardSize) }
    }

    private func flushPending(count n: Int) throws {
        let row = info.augmentations * info.seqLen
        try writeShard(
            index: nextAppendShard, codes: Array(pendingCodes[0..<n * row]), labels: Array(pendingLabels[0..<n]))
        pendingCodes.removeFirst(n * row)
        pendingLabels.removeFirst(n)
        nextAppendShard += 1
    }

    /// Writes shard `index` holding `codes` [n, A, T] and `labels` [n] (n >= 1). Thread-safe.
    public func writeShard(index: Int, codes: [Int32], labels: [Int32]) throws {
        let name = CacheWriter.shardFileName(index)
        let path = (directory as NSString).appendingPathComponent(name)
        let n = labels.count
        let (a, t, v, c) = (info.augmentations, info.seqLen, info.vocabSize, info.numClasses)
        guard n >= 1, codes.count == n * a * t else {
            throw InputError(
                path, "shard needs n >= 1 samples with n x \(a) x \(t) codes; got \(n) labels and \(codes.count) codes")
        }
        // Refuse out-of-range values here, so every cache this writer makes is valid.
        for i in 0..<n where labels[i] < 0 || Int(labels[i]) >= c {
            throw InputError(path, "sample \(i): label \(labels[i]) outside [0, \(c))")
        }
        for j in 0..<codes.count where codes[j] < 0 || Int(codes[j]) >= v {
            throw InputError(path, "sample \(j / (a * t)): token \(codes[j]) outside [0, \(v))")
        }

        let tmp = path + ".tmp"
        do {
            let f = try HDF5File.create(tmp)
            // Chunks of about 32 KiB of whole rows: small enough that reading one sample's row
            // touches little, large enough for a sequential scan.
            let rowBytes = a * t * (info.codesKind == .uint16 ? 2 : 4)
            let chunkRows = max(1, min(n, 32_768 / rowBytes))
            if info.codesKind == .uint16 {
                try f.write(
                    "codes", codes.map { UInt16(truncatingIfNeeded: $0) }, shape: [n, a, t], chunkRows: chunkRows)
            } else {
                try f.write("codes", codes, shape: [n, a, t], chunkRows: chunkRows)
            }
            try f.write("labels", labels, shape: [n])
            for (key, value) in info.shardAttributes(numSamples: n) { try f.setAttribute(key, int: value) }
            try f.flush()
        }  // closed here, before hashing
        let sha = try SHA256.hash(file: tmp)
        try moveIntoPlace(tmp, path)
        lock.lock()
        defer { lock.unlock() }
        guard written[index] == nil else { throw InputError(path, "shard \(index) written twice") }
        written[index] = ShardInfo(file: name, numSamples: n, sha256: sha)
    }

    /// Writes what `append` still holds, then dataset.json (atomically). Returns the final info.
    @discardableResult
    public func finish() throws -> CacheInfo {
        if !pendingLabels.isEmpty { try flushPending(count: pendingLabels.count) }
        lock.lock()
        let shards = written.keys.sorted().map { written[$0]! }
        let contiguous = written.keys.sorted() == Array(0..<written.count)
        lock.unlock()
        guard !shards.isEmpty else {
            throw InputError(directory, "no samples were written; a cache needs at least one")
        }
        guard contiguous else { throw InputError(directory, "shard indices are not 0..<\(shards.count)") }
        info.shards = shards
        info.numSamples = shards.reduce(0) { $0 + $1.numSamples }
        try info.save(directory: directory)
        return info
    }
}
