import Kernels
import Platform
import XCTest

@testable import ARModel

/// `Transformer.forward(parametersNeeded:)` (issue 15: ZeRO's overlapped parameter gather waits
/// in it). Proven by starving the model: every parameter starts as NaN and a range gets its real
/// values only when the forward announces it. If any stage read a parameter before announcing
/// it, a NaN would reach the loss or the logits; instead loss, logits and the backward's gradients
/// are bit-identical to an ordinary step, for every base, with and without the plug-in, with and
/// without recompute (dropout on). The ranges are disjoint, cover the whole buffer, and come in
/// `parameterNeededOrder` (gradientReadyOrder reversed). Negative control: withholding any one
/// announced range until the forward is over changes the loss or the logits (each range is read).
final class ParametersNeededTests: XCTestCase {
    func model(_ base: String, window: Int, depth: Int) throws -> Transformer {
        try liveSmallModel(
            base, window: window, depth: depth, gridSize: 4, factorizedLayers: 1, initSeed: 21, valueSeed: 22)
    }

    func batch(_ c: ModelConfig) -> ModelBatch {
        noisedPairBatch(c, seed: 23, labels: [1, 3])
    }

    /// One step's loss sums, logits and gradients; `needed` as the forward's callback.
    func step(_ m: Transformer, _ b: ModelBatch, needed: ((Range<Int>) -> Void)?) -> (LossReport, [Float], [Float]) {
        _ = m.grads
        m.grads.zero()
        var logits = [Float](repeating: 0, count: b.batch * m.config.seqLen * m.config.window * m.logitsWidth)
        let report = logits.withUnsafeMutableBufferPointer {
            m.forward(
                b, dropout: DropoutSettings(p: 0.1, seed: 2, step: 4, samplePositions: [3, 8]), gradientScale: 0.01,
                logits: $0.baseAddress!, parametersNeeded: needed)
        }
        m.backward()
        return (report, logits, m.grads.array)
    }

    func bitsEqual(_ a: [Float], _ b: [Float]) -> Bool {
        a.count == b.count && zip(a, b).allSatisfy { $0.bitPattern == $1.bitPattern }
    }

    func testForwardAnnouncesEveryParameterRangeBeforeReadingIt() throws {
        for base in BaseRegistry.names {
            for (k, d) in [(1, 0), (3, 1)] {
                for recompute in [ActivationRecompute.none, .blocks] {
                    let what = "\(base) k \(k) d \(d) recompute \(recompute)"
                    let m = try model(base, window: k, depth: d)
                    m.recompute = recompute
                    let b = batch(m.config)
                    let (want, wantLogits, wantGrads) = step(m, b, needed: nil)
                    XCTAssertTrue(want.loss.isFinite, what)
                    let real = m.params.array
                    // starved: NaN until announced
                    m.params.base.update(repeating: .nan, count: real.count)
                    var seen: [Range<Int>] = []
                    let (got, gotLogits, gotGrads) = step(m, b) { r in
                        seen.append(r)
                        for i in r { m.params[i] = real[i] }
                    }
                    XCTAssertEqual(got, want, "\(what): the loss of a starved model")
                    XCTAssertTrue(bitsEqual(gotLogits, wantLogits), "\(what): logits")
                    XCTAssertTrue(bitsEqual(gotGrads, wantGrads), "\(what): gradients")
                    XCTAssertEqual(seen, m.parameterNeededOrder, "\(what): announced in parameterNeededOrder")
                    let sorted = seen.sorted { $0.lowerBound < $1.lowerBound }
                    XCTAssertEqual(sorted.first?.lowerBound, 0, what)
                    XCTAssertEqual(sorted.last?.upperBound, m.table.total, what)
                    XCTAssertTrue(
                        zip(sorted, sorted.dropFirst()).allSatisfy { $0.upperBound == $1.lowerBound },
                        "\(what): the ranges are disjoint and leave no gap: \(sorted)")
                    XCTAssertEqual(m.parameterNeededOrder, m.gradientReadyOrder.reversed(), what)
                }
            }
        }
    }

    /// The negative control: each announced range is read by the forward, so handing it over only
    /// after the forward (a skipped wait) shows in the loss or the logits.
    func testWithholdingAnyAnnouncedRangeChangesTheForward() throws {
        for base in BaseRegistry.names {
            let m = try model(base, window: 3, depth: 1)
            let b = batch(m.config)
            let (want, wantLogits, _) = step(m, b, needed: nil)
            let real = m.params.array
            for (i, withheld) in m.parameterNeededOrder.enumerated() {
                m.params.base.update(repeating: .nan, count: real.count)
                var n = 0
                var logits = [Float](repeating: 0, count: wantLogits.count)
                let report = logits.withUnsafeMutableBufferPointer {
                    m.forward(
                        b, dropout: DropoutSettings(p: 0.1, seed: 2, step: 4, samplePositions: [3, 8]),
                        logits: $0.baseAddress!
                    ) { r in
                        if n != i { for j in r { m.params[j] = real[j] } }
                        n += 1
                    }
                }
                m.params.base.update(from: real, count: real.count)
                XCTAssertFalse(
                    report == want && bitsEqual(logits, wantLogits),
                    "\(base): withholding range \(i) (\(withheld)) went unnoticed")
            }
        }
    }
}
