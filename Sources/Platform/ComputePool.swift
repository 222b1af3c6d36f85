import CSupport
import Foundation
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// The rank's compute threads: one persistent pool (threads are started once, when the thread
/// count first grows, and never per call), sized by the rank's thread setting (`BLAS.threads`
/// sets OpenBLAS and this pool together, `dist.threads_per_rank`).
///
/// `run(parts:)` calls `body(part)` once for every part in `0..<parts`, spread over the pool's
/// threads, the caller's included, and returns when all are done. Which thread runs a part is
/// not fixed, so a kernel must make each part's result independent of who runs it and of how
/// many parts there are next to it (split by rows, heads or columns; no shared accumulator):
/// then its results are bit-identical at any thread count.
///
/// A job ends when its last part is done, not when every worker has looked at it: a worker that
/// the system has descheduled (a busy shared machine) never holds the others up unless it is in
/// the middle of a part. Parts are claimed from one counter that also holds the job's generation,
/// so a worker that wakes late cannot claim a part of a later job by mistake.
///
/// Waiting: a worker that finishes a job spins (yielding the core to others) for a short while,
/// so that the next kernel's job, usually microseconds away, starts without a wake-up; then it
/// sleeps on a condition variable, so idle workers cost nothing while OpenBLAS runs.
/// Calls from inside a part, or from a second thread while a job runs, run their parts serially
/// on the calling thread (same results, no deadlock).
public final class ComputePool: @unchecked Sendable {
    /// Created at the first use of the pool or of BLAS: its size starts as the thread count OpenBLAS
    /// chose by itself (the cores, or OPENBLAS_NUM_THREADS; one under a binding to one core), as
    /// a program that never sets `BLAS.threads` (tensorar-eval, tensorar-data) had before; then
    /// OpenBLAS is put on one thread for good.
    public static let shared: ComputePool = {
        let pool = ComputePool()
        let openblasDefault = Int(openblas_get_num_threads())
        openblas_set_num_threads(1)
        pool.setThreads(openblasDefault)
        return pool
    }()

    /// Threads a job may use, the caller's included.
    public private(set) var threads = 1
    /// The threads a job started by the calling thread gets: 1 inside a part of a job (a nested
    /// job runs serially on the part's thread), else `threads`. Kernels size their parts by it, so
    /// that a part that runs a whole model (the trainer's side-by-side micro-batches) does not
    /// cut its kernels into pieces that one thread then runs one after another.
    public var threadsHere: Int { tar_thread_in_part() != 0 ? 1 : threads }
    /// Jobs that ran on more than one thread so far (tests check that work was split).
    public private(set) var parallelJobs = 0
    /// How long an idle worker spins before it sleeps.
    public static let spinNanoseconds: UInt64 = 100_000

    /// Where a stretch of the calling thread's time went, for the benchmark: `jobs` is the wall
    /// time inside jobs that ran on more than one thread, `parts` the sum of their parts' run times
    /// (on every thread). The rest of the stretch ran on the caller alone (serial by Amdahl's law).
    public struct Busy: Sendable {
        public var jobNanoseconds = 0
        public var partNanoseconds = 0
    }
    /// Counts `Busy` while set (off by default: two clock reads a part and two a job when on).
    public var accounting = false {
        didSet {
            jobClock.store(0, ordering: .relaxed)
            partClock.store(0, ordering: .relaxed)
        }
    }
    /// What was counted since `accounting` was last set.
    public var busy: Busy {
        Busy(
            jobNanoseconds: jobClock.load(ordering: .acquiring), partNanoseconds: partClock.load(ordering: .acquiring))
    }
    private let jobClock = Atomic<Int>(0)
    private let partClock = Atomic<Int>(0)

    /// generation * 256 + helpers: the workers 1...helpers take part in that generation's job.
    private let ticket = Atomic<Int>(0)
    /// generation << 32 | the next part to claim.
    private let cursor = Atomic<UInt64>(0)
    /// Parts of the current job done.
    private let completed = Atomic<Int>(0)
    private let sleepers = Atomic<Int>(0)
    private let wake = NSCondition()
    private let entry = NSLock()
    private var started = 0  // workers started so far (never stopped)
    private var parts = 0
    private var body: ((Int) -> Void)?

    private init() {}

    /// Sets the thread count (at least 1, at most 255), starting workers if there are too few.
    /// Call between jobs, from the thread that runs them.
    public func setThreads(_ n: Int) {
        let want = min(max(n, 1), 255)
        entry.lock()
        defer { entry.unlock() }
        while started < want - 1 {
            started += 1
            let index = started
            let seen = ticket.load(ordering: .acquiring)
            let t = Thread { [unowned self] in
                // named from inside, by the system call itself: Foundation's `Thread.current.name = ...`
                // here reached the system (/proc, top, perf, gdb) only now and then on a loaded
                // machine (it names the OS thread only once its Thread knows its pthread, which races
                // with the start; ThreadTests saw a worker left unnamed)
                tar_name_this_thread("compute-\(index)")
                self.workerLoop(index: index, seen: seen)
            }
            t.stackSize = 8 << 20
            t.start()
        }
        threads = want
    }

    /// Calls body(part) for every part in 0..<parts across the pool, and waits for all of them.
    public func run(parts count: Int, _ work: (Int) -> Void) {
        let helpers = min(threads, count) - 1
        if helpers <= 0 || tar_thread_in_part() != 0 || !entry.try() {
            for part in 0..<count { work(part) }
            return
        }
        defer { entry.unlock() }
        parallelJobs += 1
        let counting = accounting
        let jobStart = counting ? ComputePool.now() : 0
        defer { if counting { jobClock.add(ComputePool.now() - jobStart, ordering: .relaxed) } }
        withoutActuallyEscaping(work) { escaping in
            body = escaping
            parts = count
            completed.store(0, ordering: .relaxed)
            let generation = ticket.load(ordering: .relaxed) >> 8 + 1
            cursor.store(UInt64(generation & 0xFFFF_FFFF) << 32, ordering: .releasing)
            wake.lock()
            ticket.store(generation << 8 | helpers, ordering: .releasing)
            if sleepers.load(ordering: .relaxed) > 0 { wake.broadcast() }
            wake.unlock()
            drain(generation)
            var spins = 0
            while completed.load(ordering: .acquiring) < count {
                spins += 1
                if spins > 64 { sched_yield() }
            }
            // Close the job before `body` and `parts` change: a worker that loaded the cursor of
            // this job just before its end could otherwise pass the `part >= parts` check against
            // the next job's count and claim a part with the next job's body (or a nil one).
            cursor.store(UInt64(generation & 0xFFFF_FFFF) << 32 | 0xFFFF_FFFF, ordering: .releasing)
            body = nil
        }
    }

    /// Claims and runs parts of job `generation` until none is left (or a later job started).
    private func drain(_ generation: Int) {
        while true {
            let v = cursor.load(ordering: .acquiring)
            if Int(v >> 32) != generation & 0xFFFF_FFFF { return }  // the cursor keeps 32 bits of it
            let part = Int(v & 0xFFFF_FFFF)
            if part >= parts { return }
            let claim = cursor.compareExchange(expected: v, desired: v + 1, ordering: .acquiringAndReleasing)
            if !claim.exchanged { continue }
            tar_set_thread_in_part(1)
            if accounting {
                let t0 = ComputePool.now()
                body!(part)
                partClock.add(ComputePool.now() - t0, ordering: .relaxed)
            } else {
                body!(part)
            }
            tar_set_thread_in_part(0)
            completed.add(1, ordering: .releasing)
        }
    }

    private static func now() -> Int { Int(DispatchTime.now().uptimeNanoseconds) }

    private func workerLoop(index: Int, seen start: Int) {
        var seen = start
        while true {
            seen = awaitTicket(after: seen)
            if index <= seen & 255 { drain(seen >> 8) }
        }
    }

    /// Spins (yielding) for `spinNanoseconds`, then sleeps, until the ticket moves on.
    private func awaitTicket(after seen: Int) -> Int {
        let t0 = DispatchTime.now().uptimeNanoseconds
        var spins = 0
        while true {
            let t = ticket.load(ordering: .acquiring)
            if t != seen { return t }
            spins += 1
            if spins < 128 { continue }
            if spins & 15 == 0 && DispatchTime.now().uptimeNanoseconds - t0 > ComputePool.spinNanoseconds { break }
            sched_yield()
        }
        wake.lock()
        sleepers.add(1, ordering: .relaxed)
        while ticket.load(ordering: .acquiring) == seen { wake.wait() }
        sleepers.subtract(1, ordering: .relaxed)
        wake.unlock()
        return ticket.load(ordering: .acquiring)
    }
}
