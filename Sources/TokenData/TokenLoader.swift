import Foundation
import Platform

/// One rank's part of one global batch.
public struct TokenBatch: Sendable {
    public let codes: [Int32]  // [n, T]
    public let labels: [Int32]  // [n]
    public let sampleIndices: [Int]  // [n] dataset indices
    public let globalPositions: [Int]  // [n] index within the global batch, 0..<G: key per-sample randomness with it
    public let step: Int  // global batch number: stream position of its first sample / G
    public let epoch: Int  // epoch of the batch's first sample (a batch may run into the next epoch)
    public var count: Int { labels.count }

    public init(codes: [Int32], labels: [Int32], sampleIndices: [Int], globalPositions: [Int], step: Int, epoch: Int) {
        self.codes = codes
        self.labels = labels
        self.sampleIndices = sampleIndices
        self.globalPositions = globalPositions
        self.step = step
        self.epoch = epoch
    }
}

/// The training sample stream, the same for any number of ranks.
///
/// Stream position s is sample permutation_e[s % N] of epoch e = s / N, where permutation_e is a
/// Fisher-Yates shuffle drawn from CounterRNG(seed, e, shuffle) (identity without shuffling).
/// Global batch b is positions [b*G, (b+1)*G), so every batch is full and batches run across epoch
/// boundaries; rank r of W reads the contiguous slice [r*G/W, (r+1)*G/W). A sample's augmentation
/// is CounterRNG(seed, e, index, augmentation).below(A). Nothing depends on W, so concatenating
/// the ranks' batches gives the W = 1 batch, and `restore(position:)` replays a run exactly.
public final class TokenLoader {
    public let cache: TokenCache
    public let globalBatch: Int  // G
    public let localBatch: Int  // G / W
    public let rank: Int
    public let worldSize: Int
    public let seed: UInt64
    public let shuffle: Bool
    public let augment: Bool
    public let prefetch: Int

    /// Samples consumed in the global stream (by all ranks together): the start of the next batch.
    public private(set) var position: Int = 0

    let stream: SampleStream
    private let queue = DispatchQueue(label: "tensorar.token-loader")  // serial: batches are read in order
    private var pending: [PendingBatch] = []  // batches in flight, in stream order
    private var scheduled = 0  // stream position of the next batch to schedule

    public init(
        cache: TokenCache, globalBatch: Int, rank: Int, worldSize: Int, seed: UInt64,
        shuffle: Bool = true, augment: Bool = true, prefetch: Int = 2
    ) throws {
        guard globalBatch >= 1 else {
            throw InputError(cache.directory, "global batch must be at least 1, got \(globalBatch)")
        }
        guard worldSize >= 1, rank >= 0, rank < worldSize else {
            throw InputError(cache.directory, "rank \(rank) is not in 0..<\(worldSize)")
        }
        guard globalBatch % worldSize == 0 else {
            throw InputError(
                cache.directory,
                "global batch \(globalBatch) is not divisible by the number of ranks \(worldSize): every rank must "
                    + "read the same number of samples"
            )
        }
        guard prefetch >= 0 else { throw InputError(cache.directory, "prefetch must be 0 or more, got \(prefetch)") }
        self.cache = cache
        self.globalBatch = globalBatch
        self.localBatch = globalBatch / worldSize
        self.rank = rank
        self.worldSize = worldSize
        self.seed = seed
        self.shuffle = shuffle
        self.augment = augment
        self.prefetch = prefetch
        stream = SampleStream(
            cache: cache, globalBatch: globalBatch, slice: rank * localBatch..<(rank + 1) * localBatch,
            seed: seed, shuffle: shuffle, augment: augment)
    }

    deinit { pending.forEach { $0.item.cancel() } }

    /// The next batch of this rank. With prefetch > 0 the following `prefetch` batches are read
    /// in the background while the caller works on this one. On an error the position stays put.
    public func next() throws -> TokenBatch {
        if prefetch == 0 {
            let b = try stream.readBatch(at: position)
            position += globalBatch
            return b
        }
        while pending.count < prefetch + 1 { schedule() }  // the one we wait for, plus `prefetch` ahead
        let p = pending.removeFirst()
        p.done.wait()
        switch p.result! {
        case .success(let b):
            position += globalBatch
            return b
        case .failure(let e):
            restore(position: position)  // drop what was read ahead; a retry starts here again
            throw e
        }
    }

    private func schedule() {
        let (start, stream, p) = (scheduled, stream, PendingBatch())
        scheduled += globalBatch
        p.item = DispatchWorkItem {  // captures the stream, not the loader
            p.result = Result { try stream.readBatch(at: start) }
            p.done.signal()
        }
        pending.append(p)
        queue.async(execute: p.item)
    }

    /// Continues the stream at `position` (samples consumed, e.g. from a checkpoint): the batches
    /// that follow are exactly those a run that never stopped would have read.
    public func restore(position: Int) {
        for p in pending { p.item.cancel() }
        pending.removeAll()
        self.position = max(0, position)
        scheduled = self.position
    }
}

/// The pure part of the loader: which samples, which augmentations, for any stream position.
struct SampleStream {
    let cache: TokenCache
    let globalBatch: Int
    let slice: Range<Int>  // this rank's positions within a global batch
    let seed: UInt64
    let shuffle: Bool
    let augment: Bool
    let permutations = PermutationCache()

    /// Stream position `s` -> (epoch, dataset index).
    func sample(at s: Int) -> (epoch: Int, index: Int) {
        let n = cache.count
        let e = s / n
        return (e, shuffle ? Int(permutations.get(epoch: e, n: n, seed: seed)[s % n]) : s % n)
    }

    /// The augmentation a sample gets in an epoch.
    func augmentation(epoch: Int, index: Int) -> Int {
        guard augment, cache.info.augmentations > 1 else { return 0 }
        var rng = CounterRNG(seed: seed, UInt64(epoch), UInt64(index), RandomPurpose.augmentation.rawValue)
        return rng.below(cache.info.augmentations)
    }

    /// This rank's slice of the global batch starting at stream position `start`.
    func readBatch(at start: Int) throws -> TokenBatch {
        var indices: [Int] = []
        var augs: [Int] = []
        indices.reserveCapacity(slice.count)
        augs.reserveCapacity(slice.count)
        for p in slice {
            let (e, i) = sample(at: start + p)
            indices.append(i)
            augs.append(augmentation(epoch: e, index: i))
        }
        let (codes, labels) = try cache.read(indices: indices, augmentations: augs)
        return TokenBatch(
            codes: codes, labels: labels, sampleIndices: indices, globalPositions: Array(slice),
            step: start / globalBatch, epoch: start / cache.count)
    }
}

private final class PendingBatch {
    var item: DispatchWorkItem!
    let done = DispatchSemaphore(value: 0)
    var result: Result<TokenBatch, Error>?  // written before `done` is signalled
}

/// Permutations of the last two epochs used (a batch may straddle two), computed on demand.
final class PermutationCache {
    private let lock = NSLock()
    private var cached: [(epoch: Int, perm: [Int32])] = []

    func get(epoch: Int, n: Int, seed: UInt64) -> [Int32] {
        lock.lock()
        defer { lock.unlock() }
        if let hit = cached.first(where: { $0.epoch == epoch }) { return hit.perm }
        let perm = shufflePermutation(n: n, seed: seed, epoch: epoch)
        cached.append((epoch, perm))
        if cached.count > 2 { cached.removeFirst() }
        return perm
    }
}

/// Fisher-Yates shuffle of 0..<n drawn from CounterRNG(seed, epoch, shuffle).
public func shufflePermutation(n: Int, seed: UInt64, epoch: Int) -> [Int32] {
    var perm = (0..<n).map { Int32($0) }
    var rng = CounterRNG(seed: seed, UInt64(epoch), RandomPurpose.shuffle.rawValue)
    var i = n - 1
    while i > 0 {
        perm.swapAt(i, rng.below(i + 1))
        i -= 1
    }
    return perm
}

// MARK: validation

/// This rank's part of a fixed, unshuffled validation set: the first `limit` samples (all when
/// nil) split into contiguous ranges, sizes differing by at most one. Weight per-rank losses by
/// their counts when combining.
public func validationShard(cache: TokenCache, limit: Int? = nil, rank: Int, worldSize: Int) -> Range<Int> {
    let n = min(max(0, limit ?? cache.count), cache.count)
    let w = max(1, worldSize)
    let r = min(max(0, rank), w - 1)
    return (r * n / w)..<((r + 1) * n / w)
}

/// Reads `range` in order, augmentation 0, in batches of up to `batchSize`. `globalPositions` are
/// the dataset indices (stable keys for per-sample validation randomness); step and epoch are 0.
public func forEachValidationBatch(
    cache: TokenCache, range: Range<Int>, batchSize: Int,
    _ body: (TokenBatch) throws -> Void
) throws {
    guard batchSize >= 1 else { throw InputError(cache.directory, "validation batch size must be at least 1") }
    var start = range.lowerBound
    while start < range.upperBound {
        let indices = Array(start..<min(start + batchSize, range.upperBound))
        let (codes, labels) = try cache.read(indices: indices, augmentations: [Int](repeating: 0, count: indices.count))
        try body(
            TokenBatch(
                codes: codes, labels: labels, sampleIndices: indices, globalPositions: indices, step: 0, epoch: 0))
        start += batchSize
    }
}
