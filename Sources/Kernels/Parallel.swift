import Foundation
import Platform

// How the kernels use the rank's threads (`ComputePool`, sized by `dist.threads_per_rank`). A
// kernel splits its work into parts by rows, heads or columns: every output element is computed
// by exactly one part, with the same operations in the same order as on one thread, so results
// are bit-identical at any thread count. A reduction over rows into one parameter gradient
// (RMSNorm's weight, an embedding table) is split by columns, each part summing its columns over
// all rows in row order, as the serial loop does.

/// Below about this many floats touched, or multiply-adds, a part is not worth a thread. A
/// variable so that tests can split even tiny shapes (set it between jobs only).
nonisolated(unsafe) public var kernelSerialWork = 1 << 15

/// At most this many parts per thread: finer parts even out the load when a thread is slowed
/// down (a shared machine), at a few atomic operations each.
let partsPerThread = 4

/// The parts for `n` items of about `cost` floats (or multiply-adds) each: 1 when the work is small.
@inline(__always)
func partCount(_ n: Int, cost: Int) -> Int {
    let threads = ComputePool.shared.threadsHere
    if threads == 1 || n < 2 { return 1 }
    let byWork = max(1, n * max(cost, 1) / kernelSerialWork)
    return min(n, byWork, threads * partsPerThread)
}

/// Calls body(range) for contiguous ranges covering 0..<n, in parallel when the work is large
/// enough. Range bounds are multiples of `align` (except the end), e.g. 16 floats for columns,
/// so that parts do not write the same cache line.
@inline(__always)
func parallelRanges(_ n: Int, cost: Int, align: Int = 1, _ body: (Range<Int>) -> Void) {
    let units = (n + align - 1) / align
    let parts = partCount(units, cost: cost * align)
    if parts == 1 {
        body(0..<n)
        return
    }
    ComputePool.shared.run(parts: parts) { part in
        let lo = min(n, units * part / parts * align)
        let hi = min(n, units * (part + 1) / parts * align)
        if lo < hi { body(lo..<hi) }
    }
}

/// As `parallelRanges`, also passing the part's index (below `maxParts()`: for scratch of the
/// part's own). A part may call BLAS: `BLAS.sgemm` inside a part runs its tiles on that part's
/// thread (the pool runs nested jobs serially), with the same results.
@inline(__always)
public func parallelParts(_ n: Int, cost: Int, _ body: (Range<Int>, Int) -> Void) {
    let parts = partCount(n, cost: cost)
    if parts == 1 {
        body(0..<n, 0)
        return
    }
    ComputePool.shared.run(parts: parts) { part in
        let lo = n * part / parts
        let hi = n * (part + 1) / parts
        if lo < hi { body(lo..<hi, part) }
    }
}

/// The most parts `parallelParts` makes: the scratch to reserve before a job.
@inline(__always)
public func maxParts() -> Int { ComputePool.shared.threadsHere * partsPerThread }

/// Scratch floats for each part of a job, grown (never shrunk) by the serial code before the job,
/// so that the parts only read their own pointer. Each calling thread has its own set: two
/// threads may run kernels at once (the trainer's side-by-side micro-batches, each inside a part
/// of one job). Not counted in `FlatBuffer.liveBytes`: a few (S, S) blocks, not activations.
final class PartScratch: @unchecked Sendable {
    private final class Buffers {
        var buffers: [FloatPtr] = []
        var floats = 0
    }
    private var sets: [UInt: Buffers] = [:]  // by pthread_self()
    private let lock = NSLock()

    /// At least `parts` buffers of `count` floats each, the calling thread's.
    func reserve(parts: Int, floats count: Int) -> [FloatPtr] {
        lock.lock()
        let key = UInt(pthread_self())
        let set = sets[key] ?? Buffers()
        sets[key] = set
        lock.unlock()
        if count > set.floats {
            set.buffers.forEach { $0.deallocate() }
            set.buffers = []
            set.floats = count
        }
        while set.buffers.count < parts {
            set.buffers.append(FloatPtr.allocate(capacity: max(set.floats, 1)))
        }
        return set.buffers
    }
}
