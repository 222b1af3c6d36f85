import ARModel
import Foundation
import Kernels

/// One value per parameter group (SPEC section 3: everything of section 2 is "base", the
/// plug-in is "plugin").
public struct PerGroup<T> {
    public var base: T
    public var plugin: T
    public init(base: T, plugin: T) {
        self.base = base
        self.plugin = plugin
    }
    public subscript(_ g: ParameterGroup) -> T {
        get { g == .base ? base : plugin }
        set { if g == .base { base = newValue } else { plugin = newValue } }
    }
    public static var groups: [ParameterGroup] { [.base, .plugin] }
}
extension PerGroup: Equatable where T: Equatable {}
extension PerGroup: Sendable where T: Sendable {}

/// AdamW hyper-parameters (SPEC section 6 defaults).
public struct AdamWSettings: Equatable, Sendable {
    public var beta1: Float = 0.9
    public var beta2: Float = 0.95
    public var eps: Float = 1e-8
    public var weightDecay: Float = 0.05
    public init(beta1: Float = 0.9, beta2: Float = 0.95, eps: Float = 1e-8, weightDecay: Float = 0.05) {
        self.beta1 = beta1
        self.beta2 = beta2
        self.eps = eps
        self.weightDecay = weightDecay
    }
}

/// What one optimizer step did.
public struct AdamWStepResult: Equatable, Sendable {
    /// Global L2 norm of the gradients of the trained groups, before clipping (computed in Double).
    public var gradNorm: Double
    /// The factor the gradients were multiplied by: min(1, clip / (norm + 1e-6)), or 1 without clipping.
    public var clipScale: Float
    /// False when the norm was NaN or infinite: nothing was changed (parameters, moments, step
    /// counts), and the caller should skip the step (and count such skips).
    public var applied: Bool
}

/// AdamW exactly as PyTorch's `torch.optim.AdamW` computes it (SPEC section 6), over the flat
/// parameter buffer, with two groups each stepped at its own learning rate:
///
///     p *= 1 - lr * wd                        (decoupled decay, where entry.decay: the group's rule)
///     m  = b1 m + (1 - b1) g
///     v  = b2 v + (1 - b2) g^2
///     p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
///
/// with `g` the clipped gradient and `t` the group's step count (1 on the first update).
///
/// A group that is not trainable (its learning rate is 0 for the whole run: frozen) has no
/// moments at all and is never written, so its parameters stay bit-identical. Because the two
/// groups are contiguous and together cover the buffer, the trained groups are one contiguous
/// flat range, `momentRange`; `m` and `v` hold exactly that range (index `i - momentRange.lowerBound`).
public final class AdamW {
    public let table: ParameterTable
    public let settings: AdamWSettings
    public let trainable: PerGroup<Bool>
    /// Flat parameter range [start, end) that has moments: the union of the trained groups.
    public let momentRange: Range<Int>
    /// First moments, `momentRange.count` floats.
    public let m: FlatBuffer
    /// Second moments, `momentRange.count` floats.
    public let v: FlatBuffer
    /// Updates applied so far, per group (0 for a frozen group). Bias correction uses these.
    public private(set) var steps: PerGroup<Int>
    /// Threads for the update loop (1: the calling thread only). Under `mpirun` each rank owns a
    /// core; raise it when a rank has several.
    public var threads: Int = 1

    /// Runs of consecutive parameters with the same group and the same decay rule, so the update
    /// loop sees a few long ranges instead of hundreds of small entries.
    private struct Segment {
        let range: Range<Int>
        let group: ParameterGroup
        let decay: Bool
    }
    private let segments: [Segment]

    /// Flat range of the trained groups (`momentRange` is the part of it this rank owns).
    public let trainedRange: Range<Int>

    /// `owned`: with a sharded optimizer (ZeRO, `dist.shard_optimizer`), the flat range this rank
    /// updates; it keeps moments for that part of the trained range only. nil: all of it.
    public init(
        table: ParameterTable, settings: AdamWSettings = AdamWSettings(), trainable: PerGroup<Bool>,
        owned: Range<Int>? = nil
    ) {
        self.table = table
        self.settings = settings
        self.trainable = trainable
        steps = PerGroup(base: 0, plugin: 0)
        var ranges = PerGroup<Range<Int>>.groups.filter { trainable[$0] }.map { table.range(of: $0) }.filter {
            !$0.isEmpty
        }
        ranges.sort { $0.lowerBound < $1.lowerBound }
        var trained = 0..<0
        if let first = ranges.first, let last = ranges.last {
            trained = first.lowerBound..<last.upperBound
            precondition(
                ranges.reduce(0) { $0 + $1.count } == trained.count,
                "trained parameter groups are not contiguous")
        }
        trainedRange = trained
        momentRange = owned.map { AdamW.clamp(trained, to: $0) } ?? trained
        m = FlatBuffer(count: momentRange.count)
        v = FlatBuffer(count: momentRange.count)
        var segs: [Segment] = []
        for e in table.entries where trainable[e.group] && e.count > 0 {
            let r = AdamW.clamp(e.offset..<(e.offset + e.count), to: momentRange)
            if r.isEmpty { continue }
            if let last = segs.last, last.group == e.group, last.decay == e.decay,
                last.range.upperBound == r.lowerBound
            {
                segs[segs.count - 1] = Segment(
                    range: last.range.lowerBound..<r.upperBound, group: e.group, decay: e.decay)
            } else {
                segs.append(Segment(range: r, group: e.group, decay: e.decay))
            }
        }
        segments = segs
    }

    /// Whether a group keeps moments (it is trained).
    public func hasMoments(_ g: ParameterGroup) -> Bool { trainable[g] }

    /// Sets the step counts after loading a checkpoint (moments are loaded into `m`/`v` directly).
    public func restore(steps: PerGroup<Int>) {
        for g in PerGroup<Int>.groups { precondition(trainable[g] || steps[g] == 0, "a frozen group has no steps") }
        self.steps = steps
    }

    static func clamp(_ r: Range<Int>, to bounds: Range<Int>) -> Range<Int> {
        let lo = min(max(r.lowerBound, bounds.lowerBound), bounds.upperBound)
        return lo..<max(lo, min(r.upperBound, bounds.upperBound))
    }

    /// Global L2 norm of the trained groups' gradients, accumulated in Double. A frozen group's
    /// gradients are ignored (as PyTorch's clip_grad_norm_ skips parameters without gradients).
    public func gradientNorm(_ grads: FlatBuffer) -> Double {
        precondition(grads.count == table.total, "gradient buffer has \(grads.count) floats, the table \(table.total)")
        return squaredGradientSum(grads.base).squareRoot()
    }

    /// The sum of squares of the gradients over `momentRange` (this rank's part with a sharded
    /// optimizer: the global norm is the root of the sum over ranks). `g` is indexed by flat
    /// offset and read over `momentRange` only.
    public func squaredGradientSum(_ g: UnsafeMutablePointer<Float>) -> Double {
        var i = momentRange.lowerBound
        let end = momentRange.upperBound
        // Two independent SIMD accumulators: Swift does not reassociate floating point, so a
        // single scalar sum would serialise on the add latency.
        var s0 = SIMD4<Double>()
        var s1 = SIMD4<Double>()
        while i + 8 <= end {
            let a = SIMD4<Double>(UnsafeRawPointer(g + i).loadUnaligned(as: SIMD4<Float>.self))
            let b = SIMD4<Double>(UnsafeRawPointer(g + i + 4).loadUnaligned(as: SIMD4<Float>.self))
            s0 += a * a
            s1 += b * b
            i += 8
        }
        var sum = (s0 + s1).sum()
        while i < end {
            let a = Double(g[i])
            sum += a * a
            i += 1
        }
        return sum
    }

    /// One update of both groups. `lr` is each group's rate for this update (from its schedule);
    /// a frozen group's must be 0. `clip` is the maximum global norm (nil or <= 0: no clipping).
    /// The gradient buffer is read, never written: clipping is folded into the update.
    @discardableResult
    public func step(params: FlatBuffer, grads: FlatBuffer, lr: PerGroup<Float>, clip: Float?) -> AdamWStepResult {
        precondition(
            params.count == table.total && grads.count == table.total,
            "buffers hold \(params.count) / \(grads.count) floats, the table \(table.total)")
        precondition(
            momentRange == trainedRange,
            "a sharded optimizer needs the global norm: step(params:gradients:norm:)")
        return step(params: params, gradients: grads.base, norm: gradientNorm(grads), lr: lr, clip: clip)
    }

    /// The same with the global gradient norm given (a sharded optimizer: the root of the ranks'
    /// summed `squaredGradientSum`), updating `momentRange` only. `g` is indexed by flat offset
    /// and read over `momentRange` only (a ZeRO rank's gradient slice, offset to match).
    @discardableResult
    public func step(
        params: FlatBuffer, gradients g: UnsafeMutablePointer<Float>, norm: Double, lr: PerGroup<Float>,
        clip: Float?
    ) -> AdamWStepResult {
        precondition(
            params.count == table.total,
            "parameter buffer holds \(params.count) floats, the table \(table.total)")
        for g in PerGroup<Float>.groups where !trainable[g] {
            precondition(lr[g] == 0, "group \(g) was frozen when the optimizer was built but got lr \(lr[g])")
        }
        guard norm.isFinite else { return AdamWStepResult(gradNorm: norm, clipScale: 1, applied: false) }
        var scale: Float = 1
        if let clip, clip > 0 { scale = Float(min(1, Double(clip) / (norm + 1e-6))) }

        // Per-group constants, in Double where powers are taken.
        struct Constants {
            var decay: Float
            var stepSize: Float
            var invSqrtBC2: Float
        }
        var constants = PerGroup(
            base: Constants(decay: 1, stepSize: 0, invSqrtBC2: 1),
            plugin: Constants(decay: 1, stepSize: 0, invSqrtBC2: 1))
        for g in PerGroup<Float>.groups where trainable[g] {
            steps[g] += 1
            let t = Double(steps[g])
            let bc1 = 1 - pow(Double(settings.beta1), t)
            let bc2 = 1 - pow(Double(settings.beta2), t)
            constants[g] = Constants(
                decay: Float(1 - Double(lr[g]) * Double(settings.weightDecay)),
                stepSize: Float(Double(lr[g]) / bc1),
                invSqrtBC2: Float(1 / bc2.squareRoot()))
        }

        let work = momentRange
        let chunks = max(1, min(threads, work.count / 65536))
        let p = params.base
        let mb = m.base - work.lowerBound
        let vb = v.base - work.lowerBound
        let s = settings
        let run = { (chunk: Int) in
            let lo = work.lowerBound + work.count * chunk / chunks
            let hi = work.lowerBound + work.count * (chunk + 1) / chunks
            for seg in self.segments where seg.range.upperBound > lo && seg.range.lowerBound < hi {
                let c = constants[seg.group]
                let from = max(lo, seg.range.lowerBound)
                let to = min(hi, seg.range.upperBound)
                AdamW.update(
                    p + from, g + from, mb + from, vb + from, count: to - from,
                    decay: seg.decay ? c.decay : 1, gradScale: scale, beta1: s.beta1, beta2: s.beta2,
                    stepSize: c.stepSize, invSqrtBC2: c.invSqrtBC2, eps: s.eps)
            }
        }
        if chunks == 1 { run(0) } else { DispatchQueue.concurrentPerform(iterations: chunks, execute: run) }
        return AdamWStepResult(gradNorm: norm, clipScale: scale, applied: true)
    }

    /// The inner loop: one pass over `count` parameters, reading each gradient once. Written with
    /// SIMD8 because LLVM does not vectorise the scalar loop (four pointers that might alias);
    /// the tail runs the same operations one element at a time, so results are identical either way.
    @inline(__always)
    private static func update(
        _ p: UnsafeMutablePointer<Float>, _ g: UnsafeMutablePointer<Float>, _ m: UnsafeMutablePointer<Float>,
        _ v: UnsafeMutablePointer<Float>, count: Int, decay: Float, gradScale: Float, beta1: Float, beta2: Float,
        stepSize: Float, invSqrtBC2: Float, eps: Float
    ) {
        typealias V8 = SIMD8<Float>
        let a1 = 1 - beta1
        let a2 = 1 - beta2
        var i = 0
        while i + 8 <= count {
            let gi = UnsafeRawPointer(g + i).loadUnaligned(as: V8.self) * gradScale
            let mi = beta1 * UnsafeRawPointer(m + i).loadUnaligned(as: V8.self) + a1 * gi
            let vi = beta2 * UnsafeRawPointer(v + i).loadUnaligned(as: V8.self) + a2 * gi * gi
            let pi =
                UnsafeRawPointer(p + i).loadUnaligned(as: V8.self) * decay - stepSize * mi
                / (vi.squareRoot() * invSqrtBC2 + eps)
            UnsafeMutableRawPointer(m + i).storeBytes(of: mi, as: V8.self)
            UnsafeMutableRawPointer(v + i).storeBytes(of: vi, as: V8.self)
            UnsafeMutableRawPointer(p + i).storeBytes(of: pi, as: V8.self)
            i += 8
        }
        while i < count {
            let gi = g[i] * gradScale
            let mi = beta1 * m[i] + a1 * gi
            let vi = beta2 * v[i] + a2 * gi * gi
            m[i] = mi
            v[i] = vi
            p[i] = p[i] * decay - stepSize * mi / (vi.squareRoot() * invSqrtBC2 + eps)
            i += 1
        }
    }
}
