import Foundation
import Platform

/// What `verifyCache` checked.
public struct VerifyReport: Sendable {
    public let info: CacheInfo
    public let shardsChecked: Int
    public let samplesChecked: Int
    public let bytesHashed: Int
    /// Of `seconds`, the time spent hashing the shard files.
    public let hashSeconds: Double
    public let seconds: Double
}

/// The full check of a cache: everything `TokenCache` checks when opening, plus the sha256 of
/// every shard file against dataset.json, and every token < V and every label < C.
public func verifyCache(directory: String) throws -> VerifyReport {
    let start = Date()
    let cache = try TokenCache(directory: directory)
    var bytes = 0
    for (s, entry) in cache.info.shards.enumerated() {
        let path = cache.shardPath(s)
        let sha = try SHA256.hash(file: path)
        guard sha == entry.sha256.lowercased() else {
            throw InputError(
                path,
                "sha256 mismatch: file has \(sha), dataset.json says \(entry.sha256) (changed or "
                    + "damaged since it was written)"
            )
        }
        bytes += (try? FileManager.default.attributesOfItem(atPath: path)[.size] as? Int) ?? 0
    }
    let hashSeconds = Date().timeIntervalSince(start)
    try scanCache(cache) { _, _, _ in }  // the reads check every value
    return VerifyReport(
        info: cache.info, shardsChecked: cache.shardCount, samplesChecked: cache.count,
        bytesHashed: bytes, hashSeconds: hashSeconds, seconds: Date().timeIntervalSince(start))
}

/// Calls `body(shard, codes [n, A, T], labels [n])` over the whole cache in blocks of rows.
func scanCache(_ cache: TokenCache, rowsPerBlock: Int = 4096, _ body: (Int, [Int32], [Int32]) throws -> Void) throws {
    for s in 0..<cache.shardCount {
        var start = 0
        while start < cache.shardSamples(s) {
            let n = min(rowsPerBlock, cache.shardSamples(s) - start)
            let (codes, labels) = try cache.readShardRows(shard: s, start: start, count: n)
            try body(s, codes, labels)
            start += n
        }
    }
}

/// Counts and histograms of a cache, for a person (`tensorar-data inspect`) and for the trainer's
/// reference point: the unigram entropy is the loss of a model that ignores all context.
public struct InspectReport: Sendable {
    public let info: CacheInfo
    public let shardSamples: [Int]
    public let classCounts: [Int]  // [C]
    public let tokenCounts: [Int]  // [V], over every sample and every augmentation
    public let totalTokens: Int

    /// Entropy of the token unigram distribution, in nats (compare with cross-entropy loss).
    public var entropyNats: Double {
        let total = Double(totalTokens)
        return tokenCounts.reduce(0.0) { h, c in c == 0 ? h : h - Double(c) / total * log(Double(c) / total) }
    }
    public var entropyBits: Double { entropyNats / log(2.0) }
    public var unusedCodes: [Int] { tokenCounts.indices.filter { tokenCounts[$0] == 0 } }
    /// The `k` most used codes, (code, count), most first; ties by lower code.
    public func mostUsed(_ k: Int) -> [(code: Int, count: Int)] {
        Array(
            tokenCounts.enumerated().sorted {
                $0.element != $1.element ? $0.element > $1.element : $0.offset < $1.offset
            }
            .prefix(k).map { (code: $0.offset, count: $0.element) })
    }
    /// The `k` least used codes among those used at least once, least first.
    public func leastUsed(_ k: Int) -> [(code: Int, count: Int)] {
        Array(
            tokenCounts.enumerated().filter { $0.element > 0 }
                .sorted { $0.element != $1.element ? $0.element < $1.element : $0.offset < $1.offset }
                .prefix(k).map { (code: $0.offset, count: $0.element) })
    }

    /// A few lines for a person.
    public func summary(top k: Int = 8) -> String {
        let i = info
        var lines: [String] = []
        lines.append(
            "samples \(i.numSamples) in \(i.shards.count) shard(s) \(shardSamples); augmentations "
                + "\(i.augmentations); grid \(i.gridH)x\(i.gridW) (T = \(i.seqLen)); vocab_size \(i.vocabSize); "
                + "num_classes \(i.numClasses); codes \(i.codesKind.rawValue)"
        )
        lines.append("classes: " + classCounts.enumerated().map { "\($0.offset):\($0.element)" }.joined(separator: " "))
        lines.append(
            String(
                format:
                    "tokens: %d counted (all augmentations); unigram entropy %.4f nats = %.4f bits (perplexity "
                    + "%.1f; uniform would be %.4f nats)",
                totalTokens, entropyNats, entropyBits, exp(entropyNats), log(Double(i.vocabSize))))
        let pct = { (c: Int) in String(format: "%.2f%%", 100 * Double(c) / Double(max(1, self.totalTokens))) }
        lines.append("most used: " + mostUsed(k).map { "\($0.code) (\(pct($0.count)))" }.joined(separator: ", "))
        lines.append("least used: " + leastUsed(k).map { "\($0.code) (\($0.count))" }.joined(separator: ", "))
        let unused = unusedCodes
        lines.append(
            "unused codes: \(unused.count) of \(i.vocabSize)"
                + (unused.isEmpty
                    ? ""
                    : ": " + unused.prefix(20).map(String.init).joined(separator: ", ")
                        + (unused.count > 20 ? ", ..." : "")))
        return lines.joined(separator: "\n")
    }
}

/// Reads the whole cache (every value checked) and counts classes and tokens.
public func inspectCache(directory: String) throws -> InspectReport {
    let cache = try TokenCache(directory: directory)
    var classCounts = [Int](repeating: 0, count: cache.info.numClasses)
    var tokenCounts = [Int](repeating: 0, count: cache.info.vocabSize)
    var total = 0
    try scanCache(cache) { _, codes, labels in
        for y in labels { classCounts[Int(y)] += 1 }
        for x in codes { tokenCounts[Int(x)] += 1 }
        total += codes.count
    }
    return InspectReport(
        info: cache.info, shardSamples: (0..<cache.shardCount).map(cache.shardSamples),
        classCounts: classCounts, tokenCounts: tokenCounts, totalTokens: total)
}

/// Entropy (nats) of the cache's token unigram distribution over all samples and augmentations:
/// the validation loss a model must beat to have learned anything beyond token frequencies.
public func unigramEntropy(directory: String) throws -> Double {
    try inspectCache(directory: directory).entropyNats
}
