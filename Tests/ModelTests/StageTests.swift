import Kernels
import Platform
import XCTest

@testable import ARModel

/// The sampler's step (`Sampler.slotStates`: the base's class and token embedding or the plug-in
/// encoder, one KV-cached trunk step, the decoder; then the base's head) against the training
/// forward over the same teacher-forced tensors: the same logits, within float rounding (the
/// two run different sgemm shapes), at every step and slot, conditioned and null rows alike.
final class StageTests: XCTestCase {
    func check(
        window k: Int, depth: Int, residual: Bool = true, base: String = LlamaGen.name,
        file: StaticString = #filePath, line: UInt = #line
    ) throws {
        var c = ModelConfig(
            vocabSize: 20, numClasses: 3, gridSize: 3, dim: 16, nLayer: 2, nHead: 2, ffnHidden: 32,
            window: k, pluginDepth: depth, residual: residual)
        c.base = base
        let m = try Transformer(config: c)
        m.initialise(seed: 7)
        var rng = CounterRNG(seed: 107)
        for (i, e) in m.table.entries.enumerated()
        where e.name.hasSuffix("proj.weight") || e.name == "output.weight"
            || (base == RAR.name && m.table.inits[i] == .zeros)  // RAR's adaLN and biases start at 0
        {
            for i in 0..<e.count { m.params[e.offset + i] = 0.3 * rng.normal() }
        }
        let n = 2
        let T = c.seqLen
        let V = c.vocabSize
        let slots = depth > 0 ? k : 1
        let labels: [Int32] = [1, 2]
        let null = [Int32](repeating: Int32(c.numClasses), count: n)
        let tokens = (0..<(n * T)).map { _ in Int32(rng.next() % UInt64(V)) }
        let tensors = Windows.inputTensors(tokens: tokens, batch: n, seqLen: T, window: k)
        func trainingLogits(_ lab: [Int32]) -> [Float] {
            var out = [Float](repeating: 0, count: n * T * slots * V)
            out.withUnsafeMutableBufferPointer {
                _ = m.forward(
                    ModelBatch(batch: n, tokens: tokens, labels: lab, tensors: tensors), logits: $0.baseAddress!)
            }
            return out
        }
        let want = [trainingLogits(labels), trainingLogits(null)]

        let s = Sampler(model: m)
        s.prepare(n: n, NB: 2 * n)  // guided layout: rows n..<2n hold the null class
        var got = [Float](repeating: 0, count: 2 * n * slots * V)
        var worst: Float = 0
        for pos in 0..<T {
            // t_{pos-1} of each image, as the sampler would have fed it back
            var inputs: [Int32] = []
            if pos > 0 {
                for b in 0..<n {
                    let start = (b * (T - 1) + pos - 1) * k
                    inputs += tensors[start..<(start + k)]
                }
            }
            let h = s.slotStates(position: pos, labels: labels, inputs: inputs)
            got.withUnsafeMutableBufferPointer {
                m.base.headLogits($0.baseAddress!, h, rows: 2 * n * slots, part: 0, chosen: [], params: m.params.base)
            }
            for r in 0..<(2 * n) {
                for j in 0..<slots where pos + j < T {
                    let b = r % n
                    let set = r / n
                    for v in 0..<V {
                        let a = got[(r * slots + j) * V + v]
                        let e = want[set][((b * T + pos) * slots + j) * V + v]
                        worst = max(worst, abs(a - e) / max(1, abs(e)))
                    }
                }
            }
        }
        XCTAssertLessThan(
            worst, 1e-5, "window \(k), depth \(depth): worst relative logit difference", file: file, line: line)
    }

    func testSamplerStepMatchesTrainingForwardAtEveryStepAndSlot() throws {
        try check(window: 1, depth: 0)
        try check(window: 3, depth: 1)
        try check(window: 3, depth: 2, residual: false)
        try check(window: 9, depth: 1)  // windows as long as the image: pads in every late tensor
        try check(window: 1, depth: 0, base: RAR.name)  // slots 0 and 1 at step 0, then one slot a step
        try check(window: 3, depth: 1, base: RAR.name)  // the encoder of the null rows sees their class
        try check(window: 3, depth: 2, residual: false, base: RAR.name)
    }

    /// Backward hands over exactly `gradientReadyOrder`, in that order, and it covers the flat
    /// gradient once (what `GradientSync.packBuckets` needs).
    func testBackwardReportsTheReadyOrderCoveringEveryParameterOnce() throws {
        for (k, d) in [(1, 0), (3, 1), (2, 2)] {
            let c = ModelConfig(
                vocabSize: 20, numClasses: 3, gridSize: 3, dim: 16, nLayer: 2, nHead: 2, ffnHidden: 32, window: k,
                pluginDepth: d)
            let m = try Transformer(config: c)
            m.initialise(seed: 1)
            let tokens = (0..<(2 * c.seqLen)).map { Int32($0 % 20) }
            let batch = ModelBatch(
                batch: 2, tokens: tokens, labels: [0, 3],
                tensors: Windows.inputTensors(tokens: tokens, batch: 2, seqLen: c.seqLen, window: k))
            m.forward(batch, gradientScale: 1)
            var seen: [Range<Int>] = []
            m.backward { seen.append($0) }
            XCTAssertEqual(seen, m.gradientReadyOrder, "k \(k), d \(d)")
            let sorted = seen.sorted { $0.lowerBound < $1.lowerBound }
            XCTAssertEqual(sorted.first?.lowerBound, 0)
            XCTAssertEqual(sorted.last?.upperBound, m.table.total)
            XCTAssertTrue(
                zip(sorted, sorted.dropFirst()).allSatisfy { $0.upperBound == $1.lowerBound },
                "k \(k), d \(d): gaps or overlaps")
        }
    }
}
