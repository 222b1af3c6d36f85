import Foundation
import Platform

/// Seconds on a monotonic clock (for durations only; unaffected by changes to the wall clock).
public func monotonicSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) * 1e-9
}

/// One value in a metrics record.
public enum MetricValue: Equatable, Sendable, ExpressibleByIntegerLiteral, ExpressibleByFloatLiteral,
    ExpressibleByStringLiteral, ExpressibleByBooleanLiteral
{
    case int(Int)
    case double(Double)
    case string(String)
    case bool(Bool)
    case doubles([Double])
    public init(integerLiteral v: Int) { self = .int(v) }
    public init(floatLiteral v: Double) { self = .double(v) }
    public init(stringLiteral v: String) { self = .string(v) }
    public init(booleanLiteral v: Bool) { self = .bool(v) }

    /// JSON text. NaN and infinities are not JSON: they become null (a diverged loss reads as null).
    var json: String {
        switch self {
        case .int(let v): return String(v)
        case .double(let v): return v.isFinite ? "\(v)" : "null"
        case .bool(let v): return v ? "true" : "false"
        case .string(let v): return MetricValue.quote(v)
        case .doubles(let v): return "[" + v.map { MetricValue.double($0).json }.joined(separator: ", ") + "]"
        }
    }

    static func quote(_ s: String) -> String {
        var out = "\""
        for u in s.unicodeScalars {
            switch u {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            default:
                if u.value < 0x20 { out += String(format: "\\u%04x", u.value) } else { out.unicodeScalars.append(u) }
            }
        }
        return out + "\""
    }
}

/// `metrics.jsonl`: one JSON object per line, keys in the order given, each line written with one
/// `write(2)` so it reaches the file at once (a crashed run keeps every line it logged).
/// Only rank 0 should write one.
public final class MetricsLog {
    public let path: String
    private let handle: FileHandle
    /// Also every record's numbers as TensorBoard scalars (train.tensorboard).
    public var tensorboard: TensorBoardWriter?

    /// Opens `path` for appending (created if missing), so a resumed run continues the same file.
    public init(path: String) throws {
        self.path = path
        let fm = FileManager.default
        try fm.createDirectory(atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        if !fm.fileExists(atPath: path) { _ = fm.createFile(atPath: path, contents: nil) }
        guard let h = FileHandle(forWritingAtPath: path) else {
            throw CocoaError(.fileWriteNoPermission, userInfo: [NSFilePathErrorKey: path])
        }
        handle = h
        try handle.seekToEnd()
    }
    deinit { try? handle.close() }

    /// Removes the records of steps after `step` from the log at `path` (if it exists), keeping
    /// every other line as it is: a run resumed from a checkpoint at `step` logs those steps again.
    /// The file is replaced atomically.
    public static func dropRecords(after step: Int, path: String) throws {
        guard let data = FileManager.default.contents(atPath: path) else { return }
        let lines = String(decoding: data, as: UTF8.self).split(separator: "\n", omittingEmptySubsequences: true)
        let kept = lines.filter { line in
            let record = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any]
            return ((record?["step"] as? Int) ?? Int.min) <= step
        }
        if kept.count == lines.count { return }
        do {
            try Data(kept.map { $0 + "\n" }.joined().utf8).write(to: URL(fileURLWithPath: path), options: .atomic)
        } catch {
            throw InputError(path, "cannot rewrite the metrics log (\(error.localizedDescription))")
        }
    }

    /// The JSON line for a record (without the newline).
    public static func line<S: Sequence>(_ fields: S) -> String where S.Element == (key: String, value: MetricValue) {
        "{" + fields.map { "\(MetricValue.quote($0.key)): \($0.value.json)" }.joined(separator: ", ") + "}"
    }

    /// Appends one record, e.g. `log(["step": 10, "loss": 3.21, "lr_plugin": 1e-4])`.
    public func log(_ fields: KeyValuePairs<String, MetricValue>) throws {
        try handle.write(contentsOf: Data((MetricsLog.line(fields) + "\n").utf8))
        let (step, values) = MetricsLog.scalars(fields)
        if let tensorboard, let step, !values.isEmpty { try tensorboard.scalars(step: step, values) }
    }

    /// The same for fields built up in order (some only for some bases).
    public func log(_ fields: [(key: String, value: MetricValue)]) throws {
        try handle.write(contentsOf: Data((MetricsLog.line(fields) + "\n").utf8))
        let (step, values) = MetricsLog.scalars(fields)
        if let tensorboard, let step, !values.isEmpty { try tensorboard.scalars(step: step, values) }
    }
}

/// The one-line progress report a run prints every `log_every` steps.
public enum ProgressLine {
    /// e.g. `step   120/500 (24.0%) | loss 3.2145 | 12.3k tok/s | 0.412 s/step | ETA 2m37s`.
    /// `secondsPerStep` is the recent average; the ETA is `(total - step) * secondsPerStep`.
    public static func format(
        step: Int, total: Int, loss: Double, tokensPerSecond: Double, secondsPerStep: Double, extra: String = ""
    ) -> String {
        let width = String(total).count
        let pct = total > 0 ? 100 * Double(step) / Double(total) : 0
        var s = "step \(pad(String(step), width))/\(total) (\(String(format: "%.1f", pct))%)"
        s += " | loss " + (loss.isFinite ? String(format: "%.4f", loss) : "\(loss)")
        s += " | \(rate(tokensPerSecond)) tok/s"
        s += " | " + String(format: "%.3f", secondsPerStep) + " s/step"
        s += " | ETA " + duration(Double(max(0, total - step)) * secondsPerStep)
        if !extra.isEmpty { s += " | " + extra }
        return s
    }

    /// 950 -> "950", 12345 -> "12.3k", 4.2e6 -> "4.20M".
    public static func rate(_ r: Double) -> String {
        if !r.isFinite { return "-" }
        if r >= 1e6 { return String(format: "%.2fM", r / 1e6) }
        if r >= 1e4 { return String(format: "%.1fk", r / 1e3) }
        return String(format: "%.0f", r)
    }

    /// 42 -> "42s", 157 -> "2m37s", 7384 -> "2h03m".
    public static func duration(_ seconds: Double) -> String {
        if !seconds.isFinite { return "?" }
        let t = Int(seconds.rounded())
        if t < 60 { return "\(t)s" }
        if t < 3600 { return "\(t / 60)m" + pad2(t % 60) + "s" }
        return "\(t / 3600)h" + pad2((t % 3600) / 60) + "m"
    }

    private static func pad(_ s: String, _ w: Int) -> String { String(repeating: " ", count: max(0, w - s.count)) + s }
    private static func pad2(_ v: Int) -> String { v < 10 ? "0\(v)" : "\(v)" }
}

/// Memory use of this process from /proc/self/status (Linux; nil elsewhere or if unreadable).
public enum ProcessMemory {
    /// Peak resident set size in bytes (VmHWM).
    public static func peakResidentBytes() -> Int? { field("VmHWM:") }
    /// Current resident set size in bytes (VmRSS).
    public static func residentBytes() -> Int? { field("VmRSS:") }

    static func field(_ name: String, status: String? = nil) -> Int? {
        guard let text = status ?? (try? String(contentsOfFile: "/proc/self/status", encoding: .utf8)) else {
            return nil
        }
        for line in text.split(separator: "\n") where line.hasPrefix(name) {
            // "VmHWM:\t  123456 kB"
            let parts = line.dropFirst(name.count).split(separator: " ", omittingEmptySubsequences: true)
                .flatMap { $0.split(separator: "\t") }
            guard let n = parts.first.flatMap({ Int($0) }) else { return nil }
            let unit = parts.count > 1 ? parts[1].lowercased() : "b"
            switch unit {
            case "kb": return n * 1024
            case "mb": return n * 1024 * 1024
            default: return n
            }
        }
        return nil
    }
}
