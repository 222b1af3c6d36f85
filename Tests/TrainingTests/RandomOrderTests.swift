import ARModel
import Foundation
import Platform
import TokenData
import XCTest

@testable import Training

/// `train.random_order` (SPEC section 9 "Random order"): the annealed ratio, the per-sample draw
/// and the carrier into `ModelBatch.orders`.
final class RandomOrderTests: XCTestCase {
    func testRatioScheduleIsOneThenLinearThenZero() {
        let r = RandomOrder(start: 100, end: 200)
        let steps = [0, 99, 100, 101, 150, 175, 199, 200, 201, 1_000_000]
        let want = [1, 1, 1, 0.99, 0.5, 0.25, 0.01, 0, 0, 0]
        for (s, w) in zip(steps, want) { XCTAssertEqual(r.ratio(at: s), w, accuracy: 1e-12, "step \(s)") }
        // RAR's own schedule: 125,000 to 187,500 of 250,000 steps; half way at 156,250
        XCTAssertEqual(RandomOrder(start: 125_000, end: 187_500).ratio(at: 156_250), 0.5)
        // start == end: a switch at that step
        let s = RandomOrder(start: 50, end: 50)
        XCTAssertEqual([49, 50, 51].map { s.ratio(at: $0) }, [1, 0, 0])
        XCTAssertEqual(RandomOrder(start: 0, end: 0).ratio(at: 0), 0)
    }

    func testDrawsAreDeterministicPermutations() {
        let r = RandomOrder(start: 1000, end: 2000)
        let T = 16
        var distinct = Set<[Int32]>()
        for sample in 0..<200 {
            guard let pi = r.order(seed: 7, step: 3, sample: sample, seqLen: T) else {
                return XCTFail("ratio 1: every sample is in a random order (sample \(sample))")
            }
            XCTAssertEqual(pi.sorted(), (0..<Int32(T)).map { $0 }, "a permutation of 0..<T (sample \(sample))")
            XCTAssertEqual(r.order(seed: 7, step: 3, sample: sample, seqLen: T), pi, "the same draw twice")
            distinct.insert(pi)
        }
        XCTAssertEqual(distinct.count, 200, "200 random orders of 16 tokens: all different")
        let raster = (0..<Int32(T)).map { $0 }
        XCTAssertFalse(distinct.contains(raster))
        // another seed, step or sample: another order
        let a = r.order(seed: 7, step: 3, sample: 0, seqLen: T)
        XCTAssertNotEqual(r.order(seed: 8, step: 3, sample: 0, seqLen: T), a)
        XCTAssertNotEqual(r.order(seed: 7, step: 4, sample: 0, seqLen: T), a)
        XCTAssertNotEqual(r.order(seed: 7, step: 3, sample: 1, seqLen: T), a)
        // ratio 0: raster for everyone
        XCTAssertTrue((0..<200).allSatisfy { r.order(seed: 7, step: 2000, sample: $0, seqLen: T) == nil })
        // T = 1: the only order
        XCTAssertEqual(r.order(seed: 7, step: 0, sample: 0, seqLen: 1), [0])
    }

    /// Over many samples the share in a random order is r(step), within 4.5 standard deviations.
    func testShareOfRandomOrdersFollowsTheRatio() {
        let r = RandomOrder(start: 100, end: 200)
        let n = 20_000
        for step in [130, 150, 185] {
            let p = r.ratio(at: step)
            let random = (0..<n).filter { r.order(seed: 3, step: step, sample: $0, seqLen: 4) != nil }.count
            let sd = (p * (1 - p) / Double(n)).squareRoot()
            XCTAssertEqual(Double(random) / Double(n), p, accuracy: 4.5 * sd, "step \(step): ratio \(p)")
        }
    }

    /// The batch builder fills `ModelBatch.orders` keyed by (seed, step, global position): the same
    /// orders whether a global batch is read by 1, 2 or 4 ranks and in any micro-batches.
    func testBatchOrdersDoNotDependOnTheRankCount() throws {
        let c = testModel(window: 1, depth: 0)
        let model = try Transformer(config: c)
        let T = c.seqLen
        let G = 8
        let builder = BatchBuilder(model: model, noise: nil, seed: 11, randomOrder: RandomOrder(start: 1, end: 5))
        func orders(ranks: Int, micro: Int, step: Int) -> [Int: [Int32]] {
            var out: [Int: [Int32]] = [:]
            for rank in 0..<ranks {
                let slice = (rank * G / ranks)..<((rank + 1) * G / ranks)
                let n = slice.count
                let batch = TokenBatch(
                    codes: [Int32](repeating: 0, count: n * T), labels: [Int32](repeating: 0, count: n),
                    sampleIndices: Array(slice), globalPositions: Array(slice), step: step, epoch: 0)
                for lo in stride(from: 0, to: n, by: micro) {
                    let r = lo..<min(n, lo + micro)
                    // nil: every sample of this micro-batch in raster order
                    let raster = (0..<r.count).flatMap { _ in (0..<Int32(T)).map { $0 } }
                    let o = builder.training(batch, range: r).batch.orders ?? raster
                    XCTAssertEqual(o.count, r.count * T)
                    for (i, p) in r.enumerated() { out[slice.lowerBound + p] = Array(o[(i * T)..<((i + 1) * T)]) }
                }
            }
            return out
        }
        for step in [0, 3] {
            let one = orders(ranks: 1, micro: G, step: step)
            XCTAssertEqual(one.count, G, "step \(step): every sample has an order")
            XCTAssertEqual(orders(ranks: 2, micro: 4, step: step), one)
            XCTAssertEqual(orders(ranks: 4, micro: 1, step: step), one)
        }
        // at step 3 (ratio 0.5) some samples are raster (the identity in the batch), some not
        let mixed = orders(ranks: 1, micro: G, step: 3).values
        let raster = (0..<Int32(T)).map { $0 }
        XCTAssertTrue(mixed.contains(raster) && mixed.contains { $0 != raster }, "\(mixed)")
        let b5 = TokenBatch(
            codes: [Int32](repeating: 0, count: G * T), labels: [Int32](repeating: 0, count: G),
            sampleIndices: Array(0..<G), globalPositions: Array(0..<G), step: 5, epoch: 0)
        XCTAssertNil(builder.training(b5, range: 0..<G).batch.orders, "ratio 0: orders nil")
        // off (the default): no orders
        let off = BatchBuilder(model: model, noise: nil, seed: 11)
        let b = TokenBatch(
            codes: [Int32](repeating: 0, count: T), labels: [0], sampleIndices: [0], globalPositions: [0], step: 0,
            epoch: 0)
        XCTAssertNil(off.training(b, range: 0..<1).batch.orders)
    }

    func testConfigReadsAndChecksTheSetting() throws {
        let c = try TrainConfig.resolve(
            yaml: "train:\n  random_order: {start: 10, end: 20}\n", source: "r.yaml")
        XCTAssertEqual(c.train.randomOrder, RandomOrder(start: 10, end: 20))
        let flag = try TrainConfig.resolve(yaml: "", source: "d", overrides: ["train.random_order={start: 1, end: 2}"])
        XCTAssertEqual(flag.train.randomOrder, RandomOrder(start: 1, end: 2))
        XCTAssertNil(TrainConfig().train.randomOrder, "off by default")
        assertInputError(["r.yaml", "train.random_order", "end", "missing"]) {
            _ = try TrainConfig.resolve(yaml: "train:\n  random_order: {start: 10}\n", source: "r.yaml")
        }
        assertInputError(["r.yaml", "train.random_order", "unknown key 'stop'", "start, end"]) {
            _ = try TrainConfig.resolve(yaml: "train:\n  random_order: {start: 1, end: 2, stop: 3}\n", source: "r.yaml")
        }
        // no base on this branch reads orders: refused, with the plug-in and range problems listed too
        var bad = c
        bad.train.randomOrder = RandomOrder(start: 30, end: -1)
        assertInputError([
            "train.random_order needs a base trained in random order", "model.base llamagen",
            "model.plugin_depth 0", "start and end must be >= 0", "start (30) must not be after end (-1)",
        ]) { try bad.validate(worldSize: 1) }
        var om = c
        om.model.base = "open-magvit2"
        om.model.preset = "tiny"
        om.model.pluginDepth = 0
        om.model.window = 1
        XCTAssertFalse(BaseRegistry.readsSampleOrders(base: "open-magvit2"))
        assertInputError(["train.random_order needs", "model.base open-magvit2"]) { try om.validate(worldSize: 1) }
        do {
            try om.validate(worldSize: 1)
        } catch let e as InputError {
            XCTAssertFalse(e.problem.contains("plugin_depth"), "no plug-in: only the base is wrong: \(e.problem)")
        }
    }
}
