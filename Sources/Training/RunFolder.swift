import Foundation
import Platform

/// The lock a trainer holds on its run folder (issue 17): `<run>/lock` holds "HOST PID". A second
/// trainer on the same folder is refused with a message naming the holder; a lock left by a
/// process that is gone (same host, pid not alive: a crash or kill -9) is taken over. A lock from
/// another host cannot be checked from here: the message says to remove it by hand if that job
/// has ended.
public final class RunLock {
    public let path: String
    private let owner: String
    /// What taking the lock found worth a log line (a stale lock taken over).
    public private(set) var note: String?

    public static func fileName() -> String { "lock" }

    /// Takes the lock of `runDirectory` (created if missing), or throws naming the holder.
    public init(runDirectory: String) throws {
        path = (runDirectory as NSString).appendingPathComponent(RunLock.fileName())
        owner = "\(RunLock.hostName()) \(getpid())"
        do { try FileManager.default.createDirectory(atPath: runDirectory, withIntermediateDirectories: true) } catch {
            throw InputError(runDirectory, "cannot create the run folder (\(error.localizedDescription))")
        }
        if try create() { return }
        let holder =
            (try? String(contentsOfFile: path, encoding: .utf8))?
            .trimmingCharacters(in: .whitespacesAndNewlines) ?? ""
        let parts = holder.split(separator: " ")
        let host = parts.first.map(String.init) ?? "?"
        let pid = parts.count > 1 ? Int32(parts[1]) : nil
        if host == RunLock.hostName(), let pid, RunLock.endsSoon(pid) {
            try? FileManager.default.removeItem(atPath: path)
            if try create() {
                note = "took over the lock \(path) of pid \(pid) on \(host), which is no longer running"
                return
            }
        }
        throw InputError(
            path,
            "the run folder is in use by another trainer: pid \(pid.map(String.init) ?? "?") "
                + "on host \(host). Wait for it to end, or use another run (--set checkpoint.run=NAME); "
                + "if that job has ended, remove this lock file")
    }

    deinit { release() }

    /// Removes the lock file if it is still this process's.
    public func release() {
        let text = (try? String(contentsOfFile: path, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines)
        if text == owner { try? FileManager.default.removeItem(atPath: path) }
    }

    /// Creates the lock file exclusively; false when it exists.
    private func create() throws -> Bool {
        let fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0o644)
        if fd < 0 {
            if errno == EEXIST { return false }
            throw InputError(path, "cannot create the run lock: \(String(cString: strerror(errno)))")
        }
        defer { close(fd) }
        let bytes = Array((owner + "\n").utf8)
        guard write(fd, bytes, bytes.count) == bytes.count else {
            throw InputError(path, "cannot write the run lock: \(String(cString: strerror(errno)))")
        }
        return true
    }

    static func hostName() -> String {
        var buf = [CChar](repeating: 0, count: 256)
        guard gethostname(&buf, buf.count - 1) == 0 else { return "unknown-host" }
        return String(cString: buf)
    }

    /// Whether process `pid` runs on this host (EPERM: it exists, owned by someone else); a zombie
    /// (ended, not yet reaped) does not count.
    static func alive(_ pid: Int32) -> Bool {
        guard kill(pid, 0) == 0 || errno == EPERM else { return false }
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
            let close = stat.lastIndex(of: ")")
        else { return true }
        let state = stat[stat.index(after: close)...].split(separator: " ").first
        return state != "Z" && state != "X"
    }

    /// Whether `pid` is gone or goes within a few seconds (a job just killed: mpirun may return
    /// before its ranks have ended).
    static func endsSoon(_ pid: Int32, seconds: Double = 5) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while alive(pid) {
            if Date() > deadline { return false }
            usleep(100_000)
        }
        return true
    }
}

extension CheckpointStore {
    /// `--fresh` (checkpoint.resume: never) on a folder that already holds a run's checkpoints
    /// would mix two runs (same step numbers overwritten, `latest` and `--fallback` then naming
    /// the wrong one): refused. The old run stays untouched.
    public func refuseFreshOverExistingRun() throws {
        let existing = completeCheckpoints()
        guard let last = existing.last else { return }
        throw InputError(
            runDirectory,
            "--fresh (checkpoint.resume: never): this run folder already holds "
                + "\(existing.count) checkpoint(s) of another run, up to \((last.path as NSString).lastPathComponent); "
                + "starting afresh here would mix the two runs. "
                + "Use another run name (--set checkpoint.run=NAME), or move or remove this folder"
        )
    }
}
