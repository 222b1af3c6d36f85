import Foundation
import Kernels
import Platform

/// ZeRO's parameter allgather (issue 15): after the sharded AdamW step each rank has updated only
/// its own slice of the flat parameters; this brings every rank's slice to every rank, in buckets,
/// so that the next forward can start on the first buckets while the rest are in flight.
///
/// One step, the same calls on every rank:
///
///     try gather.start(params)          // right after the sharded AdamW step
///     try gather.waitFor(range) ...     // from the next forward, before each stage reads `range`
///     try gather.finish()               // before anything else reads the parameters
///
/// - `buckets` come in the order the next forward reads them (the trainer passes the gradient
///   buckets reversed, i.e. packed from `Transformer.parameterNeededOrder`), the same on every rank:
///   the collectives run in that order. Bucket b is one MPI_Allgatherv of the trained part of each
///   rank's slice inside it (nothing when it holds no trained parameter: a frozen group).
/// - `blocking`: `start` gathers every bucket on the calling thread before it returns.
/// - `overlapped`: a communication thread with its own duplicate of the communicator runs the
///   buckets in order while the caller goes on; `waitFor(range)` blocks until every bucket meeting
///   `range` has landed. The main thread runs other collectives meanwhile (the stop agreement), so
///   this needs MPI_THREAD_MULTIPLE: below it, and on one rank, it falls back to blocking (`note`).
/// `then(bucket)`, when given to `start`, runs after each bucket has landed, on the gathering
/// thread (the trainer's per-bucket EMA update).
/// If a gather fails, the remaining buckets are skipped and count as landed, so no wait hangs;
/// `waitFor` and `finish` throw the error, and the ranks are out of step (end the job).
public final class ParameterGather {
    public enum Mode: String, Sendable { case blocking, overlapped }

    /// Sums since creation.
    public struct Timings: Equatable, Sendable {
        /// Time the caller was blocked: the whole gather when blocking; in `waitFor` and `finish`
        /// when overlapped (what the overlap did not hide).
        public var waitSeconds = 0.0
        /// Time inside the allgather calls (and `then`), overlapped or not.
        public var commSeconds = 0.0
        public var gathers = 0
        public init() {}
    }

    /// The buckets (flat ranges covering the buffer once), in gathering order.
    public let buckets: [Range<Int>]
    /// The mode in effect (overlapped may have fallen back to blocking, see `note`).
    public let mode: Mode
    /// Why the requested mode was changed, for the start-up log; nil if it was not.
    public let note: String?
    public private(set) var total = Timings()
    /// Whether a gather was started and not yet finished (the same on every rank).
    public private(set) var isInFlight = false

    /// Per bucket, per rank: the trained part of that rank's slice inside the bucket.
    private let parts: [[Range<Int>]]
    /// The buckets by where they start, to find the buckets a range meets.
    private let index: BucketIndex
    private let communicator: Communicator
    private let thread: CommunicationThread?
    /// Overlapped: buckets known (by the calling thread) to have landed in this gather.
    private var landed = 0
    private var failure: Error?
    /// Test-only fault injection: runs before bucket b's allgather, on the gathering thread.
    var injectFailure: ((Int) throws -> Void)?

    /// - Parameters:
    ///   - buckets: contiguous ranges covering 0..<count once, in gathering order.
    ///   - slices: each rank's owned slice (ascending, contiguous, covering the buffer).
    ///   - trained: the flat range the optimizer updates; only it is gathered.
    /// Collective when overlapped on several ranks (it duplicates the communicator).
    public init(
        communicator: Communicator, buckets: [Range<Int>], slices: [Range<Int>], trained: Range<Int>, mode: Mode
    ) throws {
        let sorted = buckets.sorted { $0.lowerBound < $1.lowerBound }
        precondition(
            sorted.first?.lowerBound == 0 && sorted.last?.upperBound == slices.last?.upperBound
                && zip(sorted, sorted.dropFirst()).allSatisfy { $0.upperBound == $1.lowerBound },
            "parameter buckets must cover the buffer exactly once")
        precondition(slices.count == communicator.size, "\(slices.count) slices for \(communicator.size) ranks")
        self.buckets = buckets
        parts = buckets.map { b in
            slices.map { AdamW.clamp(AdamW.clamp(b, to: $0), to: trained) }
        }
        index = BucketIndex(buckets)
        var mode = mode
        var note: String? = nil
        if mode == .overlapped && communicator.size == 1 {
            mode = .blocking
            note = "one rank: nothing to gather"
        } else if mode == .overlapped && communicator.usesMPI && MPI.threadLevel < .multiple {
            mode = .blocking
            note =
                "MPI granted only \(MPI.threadLevel); overlapping the gather with the next step needs "
                + "MPI_THREAD_MULTIPLE, using blocking"
        }
        self.mode = mode
        self.note = note
        if mode == .overlapped {
            self.communicator = try communicator.duplicate()
            thread = CommunicationThread(name: "parameter-gather")
        } else {
            self.communicator = communicator
            thread = nil
        }
    }

    deinit { thread?.stop() }  // the thread ends after the queued buckets

    /// Starts gathering `params` (every rank, once its slice is updated). Blocking: gathers
    /// everything now and throws the first MPI error.
    public func start(_ params: FlatBuffer, then: ((Range<Int>) -> Void)? = nil) throws {
        precondition(!isInFlight, "ParameterGather.start() before the last gather finished")
        precondition(params.count == buckets.map(\.count).reduce(0, +), "parameter buffer does not match the buckets")
        total.gathers += 1
        guard let thread else {
            let t0 = monotonicSeconds()
            defer {
                total.waitSeconds += monotonicSeconds() - t0
                total.commSeconds += monotonicSeconds() - t0
            }
            for b in buckets.indices { try job(b, params, then: then)() }
            return
        }
        isInFlight = true
        landed = 0
        failure = nil
        thread.begin()
        for b in buckets.indices { thread.enqueue(job(b, params, then: then)) }
    }

    /// Bucket b's allgather (skipped when it holds no trained parameter), then `then`; the job
    /// holds what it needs, not this object.
    private func job(_ b: Int, _ params: FlatBuffer, then: ((Range<Int>) -> Void)?) -> () throws -> Void {
        let (blocks, bucket, communicator, inject) = (parts[b], buckets[b], communicator, injectFailure)
        return {
            try inject?(b)
            if blocks.contains(where: { !$0.isEmpty }) {
                try communicator.allgather(inPlace: params.base, blocks: blocks)
            }
            then?(bucket)
        }
    }

    /// Blocks until every bucket meeting `range` has landed (at once when none is in flight).
    /// Throws the gather's error, if one bucket failed.
    public func waitFor(_ range: Range<Int>) throws {
        guard isInFlight, let thread, !range.isEmpty else { return }
        let need = lastBucket(meeting: range) + 1
        if need > landed {
            let t0 = monotonicSeconds()
            let (_, error) = thread.wait(until: need)
            total.waitSeconds += monotonicSeconds() - t0
            landed = need
            if failure == nil { failure = error }
        }
        if let failure { throw failure }
    }

    /// The largest index (gathering order) of a bucket meeting the non-empty `range`.
    func lastBucket(meeting range: Range<Int>) -> Int {
        guard let last = index.meeting(range).max() else {
            preconditionFailure("range \(range) outside the parameter buffer")
        }
        return last
    }

    /// Waits for the whole gather (nothing when none is in flight) and ends it; returns the
    /// seconds waited. Throws the gather's error (once; the gather is over either way).
    @discardableResult
    public func finish() throws -> Double {
        guard isInFlight, let thread else { return 0 }
        let t0 = monotonicSeconds()
        let (comm, error) = thread.wait(until: buckets.count)
        let waited = monotonicSeconds() - t0
        total.waitSeconds += waited
        total.commSeconds += comm
        isInFlight = false
        let failed = failure ?? error
        failure = nil
        if let failed { throw failed }
        return waited
    }
}
