import ARModel
import Foundation
import Platform

/// `train.random_order: {start: S0, end: S1}` (SPEC section 9 "Random order"): each training sample
/// is fed in a random token order with probability r(step), else in raster order. RAR anneals it:
/// r = 1 until step S0, linear to 0 at S1, 0 after (RAR: 125,000 and 187,500 of 250,000 steps).
///
/// The draw of a sample is keyed by (run seed, step, the sample's global position), as label drop
/// and noise are: the same on any rank count, on any micro-batch split and after a resume.
public struct RandomOrder: Codable, Equatable, Sendable {
    /// S0: r is 1 at steps (0-based optimizer updates) up to this one (when S0 < S1).
    public var start: Int
    /// S1: the first step at which every sample is in raster order (r = 0).
    public var end: Int

    public init(start: Int, end: Int) {
        self.start = start
        self.end = end
    }

    /// r(step): 1 at steps <= start, (end - step) / (end - start) between, 0 at steps >= end
    /// (start == end: a switch from 1 to 0 at that step). `step` is 0-based, as `TokenBatch.step`.
    public func ratio(at step: Int) -> Double {
        if step >= end { return 0 }
        if step <= start { return 1 }
        return Double(end - step) / Double(end - start)
    }

    /// The order of the sample at global position `sample` of step `step`: nil for raster order,
    /// else a permutation of 0..<seqLen (entry i: the grid index fed and predicted as the i-th
    /// token). One uniform decides (random when below r(step)); a Fisher-Yates shuffle of the same
    /// stream gives the permutation.
    public func order(seed: UInt64, step: Int, sample: Int, seqLen T: Int) -> [Int32]? {
        var rng = CounterRNG(seed: seed, RandomPurpose.order.rawValue, UInt64(step), UInt64(sample))
        guard Double(rng.uniform()) < ratio(at: step) else { return nil }
        var pi = (0..<T).map { Int32($0) }
        var i = T - 1
        while i > 0 {
            pi.swapAt(i, rng.below(i + 1))
            i -= 1
        }
        return pi
    }

    /// The orders of a batch, flat (B, T) as `ModelBatch.orders` holds them (raster samples get the
    /// identity); nil when every sample is in raster order.
    public func orders(seed: UInt64, step: Int, samples: [Int], seqLen T: Int) -> [Int32]? {
        let drawn = samples.map { order(seed: seed, step: step, sample: $0, seqLen: T) }
        if drawn.allSatisfy({ $0 == nil }) { return nil }
        let raster = (0..<T).map { Int32($0) }
        return drawn.flatMap { $0 ?? raster }
    }

    /// What is wrong with this setting for a run of `base` with a plug-in of `pluginDepth` blocks
    /// (config validation; the messages name the keys).
    func problems(base: String, pluginDepth: Int) -> [String] {
        var out: [String] = []
        if !BaseRegistry.readsSampleOrders(base: base) {
            out.append(
                "train.random_order needs a base trained in random order (model.base rar, SPEC section 9); "
                    + "model.base \(base) reads raster order only")
        }
        if pluginDepth > 0 {
            out.append(
                "train.random_order is for base training only: set model.plugin_depth 0 and model.window 1 "
                    + "(TensorAR over RAR runs in raster order), got model.plugin_depth \(pluginDepth)")
        }
        if start < 0 || end < 0 { out.append("train.random_order: start and end must be >= 0, got \(start), \(end)") }
        if start > end { out.append("train.random_order: start (\(start)) must not be after end (\(end))") }
        return out
    }

    enum CodingKeys: String, CodingKey, CaseIterable { case start, end }
    /// Both keys required; any other is an error naming the keys there are.
    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: AnyKey.self)
        let known = CodingKeys.allCases.map(\.rawValue)
        if let bad = c.allKeys.first(where: { !known.contains($0.stringValue) }) {
            throw DecodingError.dataCorrupted(
                .init(
                    codingPath: c.codingPath,
                    debugDescription: "unknown key '\(bad.stringValue)'; keys are: \(known.joined(separator: ", "))"))
        }
        let k = try decoder.container(keyedBy: CodingKeys.self)
        start = try k.decode(Int.self, forKey: .start)
        end = try k.decode(Int.self, forKey: .end)
    }

    private struct AnyKey: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }
}
