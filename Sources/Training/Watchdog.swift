import Foundation
import Platform

/// The collective watchdog (issue 17): a rank that stops responding (kill -STOP, a hung node)
/// used to leave the others waiting in an allreduce forever. Each watched wait (the step's
/// gradient allreduce, the stop agreement, validation and checkpoint collectives) is announced in
/// `<run>/watchdog/rank-NNNNN.txt` ("SEQ STEP WHAT": the number of watched waits this rank has
/// entered); every rank enters the same sequence. A wait that has not finished after
/// `dist.collective_timeout_s` ends the job (MPI_Abort) with a message naming the step and the
/// ranks whose count is behind, i.e. that never arrived. Needs the run folder on a file system
/// all ranks see (as checkpoints do).
public final class CollectiveWatchdog: @unchecked Sendable {
    public let timeout: Double
    let rank: Int
    let size: Int
    let folder: String
    private let lock = NSLock()
    private var seq = 0
    private var waiting: (step: Int, what: String, since: Double)?
    private var fd: Int32 = -1
    private var stopped = false

    public init(runDirectory: String, rank: Int, size: Int, timeout: Double) {
        self.timeout = timeout
        self.rank = rank
        self.size = size
        folder = (runDirectory as NSString).appendingPathComponent("watchdog")
        try? FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
        fd = open(CollectiveWatchdog.file(folder, rank: rank), O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        let t = Thread { [weak self] in self?.watch() }
        t.name = "tensorar-watchdog"
        t.start()
    }

    deinit { stop() }

    /// Ends the watch (the run is over) and removes this rank's file.
    public func stop() {
        lock.lock()
        let wasStopped = stopped
        stopped = true
        lock.unlock()
        if wasStopped { return }
        if fd >= 0 { close(fd) }
        try? FileManager.default.removeItem(atPath: CollectiveWatchdog.file(folder, rank: rank))
        rmdir(folder)  // the last rank out removes the (then empty) folder
    }

    static func file(_ folder: String, rank: Int) -> String {
        (folder as NSString).appendingPathComponent(String(format: "rank-%05d.txt", rank))
    }

    /// Runs `body`, a collective of step `step`, under the watch.
    public func wait<T>(step: Int, what: String, _ body: () throws -> T) rethrows -> T {
        lock.lock()
        seq += 1
        waiting = (step, what, monotonicSeconds())
        let line = "\(seq) \(step) \(what)".padding(toLength: 63, withPad: " ", startingAt: 0) + "\n"
        lock.unlock()
        if fd >= 0 { _ = line.withCString { pwrite(fd, $0, 64, 0) } }
        defer {
            lock.lock()
            waiting = nil
            lock.unlock()
        }
        return try body()
    }

    /// Seconds between the watch thread's looks, which are also this rank's heartbeats.
    var interval: Double { max(0.05, min(1, timeout / 4)) }

    private func watch() {
        while true {
            usleep(UInt32(interval * 1e6))
            lock.lock()
            let (w, n, done) = (waiting, seq, stopped)
            lock.unlock()
            if done { return }
            // Heartbeat: the file's modification time. A stopped process (kill -STOP, a hung
            // node) stops beating even when it had entered the collective before it stopped.
            if fd >= 0 { futimens(fd, nil) }
            guard let w, monotonicSeconds() - w.since > timeout else { continue }
            fire(w, seq: n)
        }
    }

    /// What every rank last announced: (seq, the rest of the line), nil when unreadable.
    func arrivals() -> [(rank: Int, seq: Int, last: String)?] {
        (0..<size).map { r in
            let path = CollectiveWatchdog.file(folder, rank: r)
            guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return nil }
            let parts = text.trimmingCharacters(in: .whitespacesAndNewlines).split(separator: " ", maxSplits: 2)
            guard parts.count == 3, let s = Int(parts[0]), let step = Int(parts[1]) else { return nil }
            return (r, s, "step \(step), \(parts[2])")
        }
    }

    /// Seconds since rank r's last heartbeat, nil when unknown.
    func silence(rank r: Int) -> Double? {
        let path = CollectiveWatchdog.file(folder, rank: r)
        guard let d = try? FileManager.default.attributesOfItem(atPath: path)[.modificationDate] as? Date else {
            return nil
        }
        return Date().timeIntervalSince(d)
    }

    private func fire(_ w: (step: Int, what: String, since: Double), seq: Int) -> Never {
        let quiet = max(2, 4 * interval)  // no heartbeat for this long: the rank has stopped
        let late = arrivals().enumerated().compactMap { r, a -> String? in
            guard let a else { return "\(r) (never announced a collective)" }
            if a.seq < seq { return "\(r) (last seen at \(a.last))" }
            if r != rank, let s = silence(rank: r), s > quiet {
                return "\(r) (last seen at \(a.last), no sign of life for " + String(format: "%.0f", s) + " s)"
            }
            return nil
        }
        let who =
            late.isEmpty
            ? "every rank arrived, so the collective itself is stuck (network?)"
            : "rank(s) \(late.joined(separator: ", ")) did not arrive or stopped responding"
        let msg =
            "error: rank \(rank) of \(size): step \(w.step): \(w.what) has not finished after "
            + String(format: "%.0f", timeout) + " s (dist.collective_timeout_s): \(who); ending the job\n"
        FileHandle.standardError.write(Data(msg.utf8))
        MPI.abort(1)
    }
}
