import Foundation

/// How a group's learning rate moves over the run (SPEC section 6).
public enum ScheduleKind: String, Codable, CaseIterable, Sendable {
    case constant, linear, cosine
}

/// A learning-rate schedule: optional linear warm-up, then constant / linear / cosine.
///
/// `lr(at: s)` is the rate for update `s` (0-based index of the update being applied; a run has
/// `total` updates, s = 0 ..< total):
/// - warm-up (`s < warmup`): `peak * (s + 1) / warmup` (the first update already moves; update
///   `warmup - 1` runs at the peak);
/// - afterwards, with `progress = (s - warmup) / (total - warmup)` in [0, 1):
///   - constant: `peak`
///   - linear:   `final + (peak - final) * (1 - progress)`
///   - cosine:   `final + (peak - final) * 0.5 * (1 + cos(pi * progress))`
///
/// So the decay starts at the peak and the last update runs one step short of `final`
/// (as PyTorch's LinearLR/LambdaLR do). Steps past `total` are clamped to `progress = 1`.
public struct LRSchedule: Equatable, Sendable, CustomStringConvertible {
    public var kind: ScheduleKind
    public var peak: Double
    public var final: Double
    public var warmup: Int
    public var total: Int

    public init(kind: ScheduleKind, peak: Double, final: Double = 0, warmup: Int = 0, total: Int) {
        self.kind = kind
        self.peak = peak
        self.final = final
        self.warmup = warmup
        self.total = total
    }

    public func lr(at step: Int) -> Double {
        if step < warmup { return peak * Double(step + 1) / Double(warmup) }
        let span = total - warmup
        let progress = span > 0 ? min(1, Double(step - warmup) / Double(span)) : 1
        switch kind {
        case .constant: return peak
        case .linear: return final + (peak - final) * (1 - progress)
        case .cosine: return final + (peak - final) * 0.5 * (1 + cos(Double.pi * progress))
        }
    }

    /// True when the rate is 0 at every step: the group is frozen (AdamW keeps no moments for it).
    public var isZeroThroughout: Bool { peak == 0 && (kind == .constant || final == 0) }

    public var description: String {
        var s = "\(kind.rawValue) \(peak)"
        if kind != .constant { s += " -> \(final)" }
        if warmup > 0 { s += ", warm-up \(warmup)" }
        return s + " over \(total) steps"
    }
}
