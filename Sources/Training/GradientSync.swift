import Foundation
import Kernels
import Platform

/// Averages the gradient buffer across data-parallel ranks, in fixed buckets of the flat buffer
/// (TOOLCHAIN.md: 25 MB blocking buckets beat one large allreduce).
///
/// One step, the same calls on every rank:
///
///     sync.begin(grads)               // after the last micro-batch's forward, before its backward
///     sync.markReady(range) ...       // from backward, as each parameter's gradient is final
///     let timings = try sync.finish() // before the optimizer step
///
/// - `blocking`: `markReady` only records; `finish()` allreduces every bucket in order.
/// - `overlapped`: a dedicated communication thread owns the gradient MPI calls (Iallreduce makes
///   no progress without one, TOOLCHAIN.md). A bucket is handed to it as soon as all its elements
///   are marked ready, and it runs a blocking allreduce on it while backward continues.
///   `finish()` hands over any buckets never marked (in index order) and waits for all.
///
/// Rules: each element is marked at most once per step, and all ranks must mark the same ranges
/// in the same order (the same backward code does), because buckets are reduced in the order they
/// complete. Backward must not write to an element after marking it, so with gradient
/// accumulation call `begin` on the last micro-batch only. The thread uses its own duplicate of
/// the communicator, so the main thread may run other collectives meanwhile (with
/// MPI_THREAD_MULTIPLE; at a lower level overlapped mode falls back to blocking, see `note`).
///
/// Afterwards every element is `sum over ranks * scale`, scale 1/worldSize unless given; with a
/// `Shard` (ZeRO) only the rank's own slice is reduced, into `shard.gradients`, by one
/// MPI_Reduce_scatter per bucket (an MPI_Reduce to the owner when the bucket lies in one slice);
/// with states+grads in blocking mode run from `markReady`, as soon as the bucket is complete, so
/// that its pages go back while backward continues.
/// If an allreduce fails, the remaining buckets are skipped and `finish()` throws; the ranks are
/// then out of step and the caller should end the job (`MPI.abort`).
public final class GradientSync {
    public enum Mode: String, Codable, Sendable { case blocking, overlapped }

    /// ZeRO (`dist.shard_optimizer`): instead of allreducing, each bucket is reduce-scattered
    /// (MPI_Reduce_scatter) so rank r receives the sum of the bucket's part inside `slices[r]`
    /// (its checkpoint slice), added into `gradients` (that slice, `slices[r].count` floats).
    /// With `releaseSource` (ZeRO-2, `states+grads`) the bucket's pages of the full gradient
    /// buffer are handed back right after (it must be `FlatBuffer(pages:)` to save memory).
    public final class Shard {
        public let slices: [Range<Int>]
        public let rank: Int
        /// This rank's reduced gradients, `owned.count` floats: flat offset i is at i - owned.lowerBound.
        public let gradients: FlatBuffer
        public let releaseSource: Bool
        let scratch: FlatBuffer
        /// ZeRO-2: the buckets, and which of them (by position in address order) this micro-batch
        /// has released. A page (granule) that straddles buckets goes back with the last of them to be
        /// released, so none stays resident (with 2 MB pages, one per bucket boundary would be: for XXL's
        /// 224 buckets of 25 MB, 0.45 GB by count).
        private var index = BucketIndex([])
        private var released: [Bool] = []
        public var owned: Range<Int> { slices[rank] }
        public init(slices: [Range<Int>], rank: Int, releaseSource: Bool, bucketElements: Int) {
            self.slices = slices
            self.rank = rank
            self.releaseSource = releaseSource
            gradients = FlatBuffer(count: slices[rank].count)
            scratch = FlatBuffer(count: min(bucketElements, slices[rank].count))
        }

        func useBuckets(_ index: BucketIndex) {
            self.index = index
            released = Array(repeating: false, count: index.buckets.count)
        }

        /// Before a micro-batch's backward: nothing released yet (all pages read as zeros).
        func startReleasing() {
            for i in released.indices { released[i] = false }
        }

        /// Hands bucket `r`'s pages back, with the granules it shares with neighbours already released:
        /// the range grows over released buckets on either side up to the granule boundary (several
        /// small buckets may share one granule; it goes back with the last of them).
        func release(_ r: Range<Int>, of grads: FlatBuffer) {
            let i = index.position(of: r.lowerBound)
            guard i < released.count, index.bucket(at: i) == r else { return grads.release(r) }
            released[i] = true
            let granule = max(1, grads.releaseGranule)
            var lo = r.lowerBound
            let floor = lo / granule * granule
            var below = i - 1
            while lo > floor && below >= 0 && released[below] {
                lo = max(floor, index.bucket(at: below).lowerBound)
                below -= 1
            }
            var hi = r.upperBound
            let ceiling = min(grads.count, (hi + granule - 1) / granule * granule)
            var above = i + 1
            while hi < ceiling && above < released.count && released[above] {
                hi = min(ceiling, index.bucket(at: above).upperBound)
                above += 1
            }
            grads.release(lo..<hi)
        }
    }

    /// Time spent in one step (or summed over steps in `total`).
    public struct Timings: Equatable, Sendable {
        /// Time the caller sat in `finish()` waiting for communication (the exposed cost).
        public var waitSeconds: Double = 0
        /// Time spent inside allreduce calls (and scaling), overlapped or not.
        public var commSeconds: Double = 0
        public var buckets: Int = 0
        public init() {}
    }

    public let count: Int
    public let bucketElements: Int
    /// The buckets, in the order they are reduced: consecutive ranges of `bucketElements` from
    /// element 0 (the last one shorter), or packed in backward order (`packBuckets`).
    public let buckets: [Range<Int>]
    /// The buckets by where they start, to find the buckets a range touches.
    private let index: BucketIndex
    /// The mode in effect (overlapped may have fallen back to blocking, see `note`).
    public let mode: Mode
    /// Why the requested mode was changed, for the start-up log; nil if it was not.
    public let note: String?
    /// Sums over all steps since creation.
    public private(set) var total = Timings()

    /// ZeRO's reduce-scatter target, nil for a plain allreduce.
    public let shard: Shard?
    private let communicator: Communicator
    /// The communication thread (overlapped mode); it holds nothing of this object.
    private let worker: CommunicationThread?
    // Per-step state of the calling thread.
    private var grads: FlatBuffer?
    private var scale: Float = 1
    /// Elements of each bucket not yet marked; 0 once the bucket is handed over.
    private var remaining: [Int] = []
    /// Blocking and sharded: time in reductions run from `markReady`, and the first error.
    private var eagerSeconds = 0.0
    private var failure: Error?

    /// - Parameters:
    ///   - count: floats in the gradient buffer.
    ///   - bucketMB: bucket size in MB (10^6 bytes) of Float32; 25 is a good default.
    public convenience init(communicator: Communicator, count: Int, bucketMB: Double, mode: Mode) throws {
        precondition(bucketMB > 0, "bucket size must be positive")
        try self.init(
            communicator: communicator, count: count, bucketElements: max(1, Int(bucketMB * 1e6 / 4)), mode: mode)
    }

    /// Buckets formed from `readyOrder` (`Transformer.gradientReadyOrder`), see `packBuckets`.
    /// With `shard`, the buckets are reduce-scattered into it (ZeRO) rather than allreduced.
    public convenience init(
        communicator: Communicator, count: Int, bucketMB: Double, readyOrder: [Range<Int>],
        mode: Mode, shard: Shard? = nil
    ) throws {
        precondition(bucketMB > 0, "bucket size must be positive")
        let size = max(1, Int(bucketMB * 1e6 / 4))
        try self.init(
            communicator: communicator, count: count, bucketElements: size,
            buckets: GradientSync.packBuckets(readyOrder: readyOrder, size: size), mode: mode, shard: shard)
    }

    /// Bucket size in floats for `bucketMB` MB.
    public static func bucketElements(mb: Double) -> Int { max(1, Int(mb * 1e6 / 4)) }

    /// The same with the bucket size in floats and fixed buckets from element 0 up. Collective
    /// when overlapped on several ranks (it duplicates the communicator): every rank must create
    /// it, in the same order.
    public convenience init(communicator: Communicator, count: Int, bucketElements size: Int, mode: Mode) throws {
        precondition(size > 0, "bucket size must be positive")
        try self.init(
            communicator: communicator, count: count, bucketElements: size,
            buckets: stride(from: 0, to: count, by: size).map { $0..<min(count, $0 + size) }, mode: mode)
    }

    /// Buckets in the order backward completes them, as PyTorch DDP builds its buckets: walks
    /// `readyOrder` (ranges of the flat gradient, each final at once, in backward order; together
    /// they cover it once) and packs them into contiguous buckets of at most `size` floats. A
    /// bucket grows by the part of the next range adjacent to it, else a new one starts at that
    /// range's top, so each bucket is complete as soon as the last range it touches is marked.
    public static func packBuckets(readyOrder: [Range<Int>], size: Int) -> [Range<Int>] {
        precondition(size > 0, "bucket size must be positive")
        var out: [Range<Int>] = []
        var cur: Range<Int>? = nil
        for r in readyOrder {
            var rest = r
            while !rest.isEmpty {
                if let c = cur, c.count < size, c.lowerBound == rest.upperBound {
                    let take = min(size - c.count, rest.count)
                    cur = (c.lowerBound - take)..<c.upperBound
                    rest = rest.lowerBound..<(rest.upperBound - take)
                } else if let c = cur, c.count < size, c.upperBound == rest.lowerBound {
                    let take = min(size - c.count, rest.count)
                    cur = c.lowerBound..<(c.upperBound + take)
                    rest = (rest.lowerBound + take)..<rest.upperBound
                } else {
                    if let c = cur { out.append(c) }
                    let take = min(size, rest.count)
                    cur = (rest.upperBound - take)..<rest.upperBound
                    rest = rest.lowerBound..<(rest.upperBound - take)
                }
            }
        }
        if let c = cur { out.append(c) }
        return out
    }

    private init(
        communicator: Communicator, count: Int, bucketElements size: Int, buckets: [Range<Int>],
        mode: Mode, shard: Shard? = nil
    ) throws {
        let index = BucketIndex(buckets)
        let sorted = index.byStart.map { buckets[$0] }  // address order
        precondition(
            sorted.first?.lowerBound ?? 0 == 0 && sorted.last?.upperBound ?? 0 == count
                && zip(sorted, sorted.dropFirst()).allSatisfy { $0.upperBound == $1.lowerBound },
            "gradient buckets must cover 0..<\(count) exactly once")
        if let shard {
            precondition(
                shard.slices.count == communicator.size && shard.rank == communicator.rank
                    && shard.slices.last?.upperBound == count, "ZeRO slices do not match the ranks and the buffer")
        }
        shard?.useBuckets(index)
        self.shard = shard
        self.count = count
        bucketElements = size
        self.buckets = buckets
        self.index = index
        var mode = mode
        var note: String? = nil
        if mode == .overlapped && communicator.size == 1 {
            mode = .blocking
            note = "one rank: no gradient communication to overlap"
        } else if mode == .overlapped && communicator.usesMPI && MPI.threadLevel < .serialized {
            mode = .blocking
            note =
                "MPI granted only \(MPI.threadLevel); overlapped gradient sync needs a communication thread, "
                + "using blocking"
        } else if mode == .overlapped && MPI.threadLevel < .multiple {
            note = "MPI granted \(MPI.threadLevel): do not run MPI calls on other threads between begin() and finish()"
        }
        self.mode = mode
        self.note = note
        if mode == .overlapped {
            self.communicator = try communicator.duplicate()
            worker = CommunicationThread(name: "gradient-sync")
        } else {
            self.communicator = communicator
            worker = nil
        }
    }

    deinit { worker?.stop() }

    /// Starts a step on `grads` (every rank, same order as all other collectives).
    public func begin(_ grads: FlatBuffer, scale: Float? = nil) {
        precondition(grads.count == count, "gradient buffer has \(grads.count) floats, expected \(count)")
        precondition(self.grads == nil, "begin() called twice without finish()")
        self.grads = grads
        self.scale = scale ?? 1 / Float(communicator.size)
        remaining = buckets.map(\.count)
        shard?.startReleasing()
        eagerSeconds = 0
        failure = nil
        worker?.begin()
    }

    /// Overlapped: bucket b's reduction, on the communication thread.
    private func handOver(_ b: Int) {
        guard let worker, let grads else { return }
        let (range, scale, communicator, shard) = (buckets[b], scale, communicator, shard)
        worker.enqueue { try GradientSync.reduce(grads, range, scale: scale, communicator, shard: shard) }
    }

    /// Marks `range` of the gradient buffer final. In overlapped mode, each bucket this completes
    /// goes to the communication thread at once; sharded and blocking, it is reduce-scattered at
    /// once when ZeRO-2 (states+grads), so that its pages go back before backward goes on.
    public func markReady(_ range: Range<Int>) {
        precondition(grads != nil, "markReady() outside begin()/finish()")
        precondition(range.lowerBound >= 0 && range.upperBound <= count, "range \(range) outside 0..<\(count)")
        if range.isEmpty { return }
        for b in index.meeting(range) {
            let overlap = min(range.upperBound, buckets[b].upperBound) - max(range.lowerBound, buckets[b].lowerBound)
            precondition(remaining[b] >= overlap, "bucket \(b) marked ready twice (range \(range))")
            remaining[b] -= overlap
            if remaining[b] == 0, worker != nil { handOver(b) }
            if remaining[b] == 0, worker == nil, shard?.releaseSource == true { reduceNow(b) }
        }
    }

    /// Blocking and ZeRO-2: the bucket's reduce-scatter, now; a failure is kept for `finish()`.
    private func reduceNow(_ b: Int) {
        let t0 = monotonicSeconds()
        reduceBucket(b)
        eagerSeconds += monotonicSeconds() - t0
    }

    /// Bucket b's reduction on the calling thread, unless an earlier one of this step failed (the
    /// ranks are then out of step); the first failure is kept for `finish()`.
    private func reduceBucket(_ b: Int) {
        guard failure == nil, let grads else { return }
        do {
            try GradientSync.reduce(grads, buckets[b], scale: scale, communicator, shard: shard)
        } catch {
            failure = error
        }
    }

    /// Completes the step: reduces whatever is left and waits for all buckets. Throws the first
    /// MPI error of the step.
    @discardableResult
    public func finish() throws -> Timings {
        guard let grads else { preconditionFailure("finish() without begin()") }
        defer { self.grads = nil }
        let t0 = monotonicSeconds()
        var step = Timings()
        step.buckets = buckets.count
        if let worker {
            for b in buckets.indices where remaining[b] > 0 {
                remaining[b] = 0
                handOver(b)
            }
            let (comm, error) = worker.wait(until: buckets.count)
            step.commSeconds = comm
            step.waitSeconds = monotonicSeconds() - t0
            accumulate(step)
            if let error { throw error }
        } else {
            for b in buckets.indices where shard?.releaseSource != true || remaining[b] > 0 {
                remaining[b] = 0
                reduceBucket(b)
            }
            step.waitSeconds = monotonicSeconds() - t0
            step.commSeconds = step.waitSeconds + eagerSeconds
            accumulate(step)
            if let failure { throw failure }
        }
        return step
    }

    /// begin + finish in one call: blocking average of the whole buffer.
    @discardableResult
    public func allreduce(_ grads: FlatBuffer, scale: Float? = nil) throws -> Timings {
        begin(grads, scale: scale)
        return try finish()
    }

    private func accumulate(_ s: Timings) {
        total.waitSeconds += s.waitSeconds
        total.commSeconds += s.commSeconds
        total.buckets += s.buckets
    }

    /// Allreduce one bucket in place, then scale it; or with `shard`, reduce-scatter it.
    static func reduce(_ grads: FlatBuffer, _ r: Range<Int>, scale: Float, _ comm: Communicator, shard: Shard?) throws {
        if let shard { return try reduceScatter(grads, r, scale: scale, comm, shard) }
        let p = grads.base + r.lowerBound
        if comm.size > 1 { try comm.allreduce(p, count: r.count, op: .sum) }
        if scale != 1 { for i in 0..<r.count { p[i] *= scale } }
    }

    /// ZeRO: the bucket's parts inside each rank's slice are consecutive in rank order (slices
    /// are contiguous and ascending), which is MPI_Reduce_scatter's layout; this rank adds its
    /// part, scaled, into its slice of gradients (adds: ZeRO-2 reduces every micro-batch).
    static func reduceScatter(
        _ grads: FlatBuffer, _ r: Range<Int>, scale: Float, _ comm: Communicator,
        _ shard: Shard
    ) throws {
        let parts = shard.slices.map { CheckpointStore.clamp(r, to: $0) }
        let mine = parts[shard.rank]
        let owners = parts.indices.filter { !parts[$0].isEmpty }
        if owners.count == 1 {
            // Inside one rank's slice (most buckets): a reduce to that rank. Reducing B's whole
            // gradient by Reduce_scatter with every count on one rank took 4.0 s here, against 0.9 s
            // by allreduce (two runs, loaded machine; not a controlled comparison).
            try comm.reduce(grads.base + r.lowerBound, into: shard.scratch.base, count: r.count, root: owners[0])
        } else {
            try comm.reduceScatter(grads.base + r.lowerBound, into: shard.scratch.base, counts: parts.map(\.count))
        }
        let dst = shard.gradients.base + (mine.lowerBound - shard.owned.lowerBound)
        let src = shard.scratch.base
        for i in 0..<mine.count { dst[i] += src[i] * scale }
        if shard.releaseSource { shard.release(r, of: grads) }
    }
}
