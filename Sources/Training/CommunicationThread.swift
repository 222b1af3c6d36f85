import Foundation
import Platform

/// A thread that owns one communicator's MPI calls and runs jobs on it in the order they are
/// queued (TOOLCHAIN.md: non-blocking collectives make no progress without such a thread). Used
/// by `GradientSync` (bucket reductions during backward) and `ParameterGather` (ZeRO's allgather
/// during the next forward).
///
/// One batch of jobs at a time: `begin()`, then `enqueue` jobs, then `wait(until:)` the number of
/// finished jobs reaches n. Jobs finish in queue order, so "n done" means "the first n done". After
/// a job throws, the rest of the batch is skipped (counted as done, so no waiter hangs: the ranks
/// are out of step and the caller ends the job); `wait` returns the first error.
final class CommunicationThread {
    private let cond = NSCondition()
    /// The batch's jobs; each is dropped (nil) once taken, with what it captured.
    private var queue: [(() throws -> Void)?] = []
    private var head = 0
    private var done = 0
    private var seconds = 0.0
    private var error: Error?
    private var stopping = false

    init(name: String) {
        let t = Thread { [self] in self.loop() }
        t.name = name
        t.start()
    }

    /// Starts a batch: the counters, the time and the error go back to zero. The previous batch
    /// must be finished (waited for).
    func begin() {
        cond.lock()
        precondition(done == queue.count, "a communication batch begun before the last one finished")
        queue.removeAll(keepingCapacity: true)
        head = 0
        done = 0
        seconds = 0
        error = nil
        cond.unlock()
    }

    func enqueue(_ job: @escaping () throws -> Void) {
        cond.lock()
        queue.append(job)
        cond.broadcast()
        cond.unlock()
    }

    /// Blocks until the first `n` jobs of the batch are done. Returns the seconds spent in jobs
    /// so far (this batch) and the first error of the batch.
    @discardableResult
    func wait(until n: Int) -> (seconds: Double, error: Error?) {
        cond.lock()
        while done < n { cond.wait() }
        let result = (seconds, error)
        cond.unlock()
        return result
    }

    /// Jobs of this batch done so far (never blocks).
    var finished: Int {
        cond.lock()
        defer { cond.unlock() }
        return done
    }

    /// Ends the thread once the queued jobs are done.
    func stop() {
        cond.lock()
        stopping = true
        cond.broadcast()
        cond.unlock()
    }

    private func loop() {
        while true {
            cond.lock()
            while head == queue.count && !stopping { cond.wait() }
            if head == queue.count && stopping {
                cond.unlock()
                return
            }
            let job = queue[head]!
            queue[head] = nil
            head += 1
            let failed = error != nil
            cond.unlock()

            let t0 = monotonicSeconds()
            var err: Error? = nil
            if !failed {
                do { try job() } catch { err = error }
            }
            let dt = monotonicSeconds() - t0

            cond.lock()
            if error == nil { error = err }
            seconds += dt
            done += 1
            cond.broadcast()
            cond.unlock()
        }
    }
}
