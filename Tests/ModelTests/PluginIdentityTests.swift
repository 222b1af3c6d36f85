import Kernels
import Platform
import XCTest

@testable import ARModel

/// Properties SPEC section 3 promises, checked on a small model with random (not fresh) base weights.
final class PluginIdentityTests: XCTestCase {
    let baseConfig = ModelConfig(vocabSize: 24, numClasses: 3, gridSize: 3, dim: 16, nLayer: 2, nHead: 2, ffnHidden: 40)

    func randomBatch(_ c: ModelConfig, batch: Int, seed: UInt64) -> ModelBatch {
        var rng = CounterRNG(seed: seed)
        let tokens = (0..<(batch * c.seqLen)).map { _ in Int32(rng.below(c.vocabSize)) }
        let labels = (0..<batch).map { _ in Int32(rng.below(c.numClasses + 1)) }
        return ModelBatch(
            batch: batch, tokens: tokens, labels: labels,
            tensors: Windows.inputTensors(tokens: tokens, batch: batch, seqLen: c.seqLen, window: c.window))
    }

    /// A model with the base weights of `base` and a fresh plug-in (SPEC init, proj = 0).
    func withFreshPlugin(_ base: Transformer, window: Int, depth: Int) throws -> Transformer {
        var c = base.config
        c.window = window
        c.pluginDepth = depth
        let m = try Transformer(config: c)
        m.initialise(seed: 5)
        for e in base.table.entries {
            m.view(e.name).baseAddress!.update(from: base.view(e.name).baseAddress!, count: e.count)
        }
        return m
    }

    func logits(_ m: Transformer, _ b: ModelBatch) -> [Float] {
        let n = b.batch * m.config.seqLen * m.config.window * m.config.vocabSize
        var out = [Float](repeating: 0, count: n)
        out.withUnsafeMutableBufferPointer { _ = m.forward(b, logits: $0.baseAddress!) }
        return out
    }

    func testFreshPluginWithWindowOneIsTheBaseModel() throws {
        let base = try Transformer(config: baseConfig)
        base.initialise(seed: 1)
        for e in base.table.entries where e.name == "output.weight" {  // non-zero head so logits matter
            var rng = CounterRNG(seed: 3)
            for i in 0..<e.count { base.params[e.offset + i] = 0.1 * rng.normal() }
        }
        let batch = randomBatch(baseConfig, batch: 2, seed: 2)
        let plug = try withFreshPlugin(base, window: 1, depth: 2)
        let a = logits(base, batch)
        let b = logits(plug, randomBatchTensorsFor(plug.config, from: batch))
        XCTAssertEqual(a, b, "k = 1 with a fresh residual plug-in must reproduce the base model exactly")
        XCTAssertEqual(base.forward(batch).loss, plug.forward(randomBatchTensorsFor(plug.config, from: batch)).loss)
    }

    func randomBatchTensorsFor(_ c: ModelConfig, from b: ModelBatch) -> ModelBatch {
        ModelBatch(
            batch: b.batch, tokens: b.tokens, labels: b.labels,
            tensors: Windows.inputTensors(tokens: b.tokens, batch: b.batch, seqLen: c.seqLen, window: c.window))
    }

    func testFreshPluginSlotZeroEqualsBaseForAnyWindow() throws {
        let base = try Transformer(config: baseConfig)
        base.initialise(seed: 1)
        let out = base.table.entry("output.weight")!
        var rng = CounterRNG(seed: 3)
        for i in 0..<out.count { base.params[out.offset + i] = 0.1 * rng.normal() }
        let batch = randomBatch(baseConfig, batch: 2, seed: 4)
        let a = logits(base, batch)
        let V = baseConfig.vocabSize
        let T = baseConfig.seqLen
        for k in [2, 4] {
            let plug = try withFreshPlugin(base, window: k, depth: 1)
            let pb = randomBatchTensorsFor(plug.config, from: batch)
            let l = logits(plug, pb)
            var worst: Float = 0
            for b in 0..<2 {
                for p in 0..<T {
                    for v in 0..<V {
                        worst = max(worst, abs(l[((b * T + p) * k) * V + v] - a[(b * T + p) * V + v]))
                    }
                }
            }
            XCTAssertLessThan(
                worst, 1e-5, "k = \(k): slot 0 of a fresh plug-in must equal the base model (worst |diff| \(worst))")
            // and the plug-in's slot-0 loss equals the base loss
            let r = plug.forward(pb)
            XCTAssertEqual(r.slotLosses[0], base.forward(batch).loss, accuracy: 1e-5)
        }
    }

    func testPluginParameterCountOfPresetB() throws {
        var c = try ModelConfig.preset("B")
        XCTAssertEqual(ParameterTable(c).total, 110_888_448, "LlamaGen GPT-B")
        c.window = 4
        c.pluginDepth = 2
        let t = ParameterTable(c)
        XCTAssertEqual(t.total, 140_395_008)
        XCTAssertEqual(t.count(of: .plugin), 140_395_008 - 110_888_448)
        XCTAssertEqual(t.range(of: .base), 0..<110_888_448, "base group first, one contiguous range")
    }
}

final class NoiseTests: XCTestCase {
    func tensors(_ seed: UInt64, batch: Int, T: Int, k: Int, V: Int) -> [Int32] {
        var rng = CounterRNG(seed: seed)
        let tokens = (0..<(batch * T)).map { _ in Int32(rng.below(V)) }
        return Windows.inputTensors(tokens: tokens, batch: batch, seqLen: T, window: k)
    }

    func testSchedulesRiseFromZero() {
        for s in NoiseSchedule.allCases {
            let b = s.strengths(window: 4)
            XCTAssertEqual(b[0], 0, "\(s): entry 0 is never noised")
            XCTAssertEqual(b, b.sorted(), "\(s) rises")
            XCTAssertEqual(s.gamma(1), 1, accuracy: 1e-12)
        }
        XCTAssertEqual(NoiseSchedule.sine.gamma(0.5), 0.5.squareRoot(), accuracy: 1e-12)
    }

    func testWindowOneOrNoneNoiseReturnsInput() {
        let t = tensors(1, batch: 3, T: 9, k: 1, V: 50)
        for type in [NoiseType.replace, .discrete] {
            var n = t
            let E = [Float](repeating: 1, count: 50 * 4)
            E.withUnsafeBufferPointer { e in
                _ = TensorNoiser(type: type, schedule: .sine, window: 1, vocabSize: 50).apply(
                    &n, batch: 3, seqLen: 9, seed: 1, step: 0, samplePositions: [0, 1, 2], embedding: e.baseAddress!,
                    embeddingDim: 4)
            }
            XCTAssertEqual(n, t, "beta = 0 everywhere: \(type) must return the input")
        }
        var n = tensors(1, batch: 3, T: 9, k: 4, V: 50)
        let clean = n
        _ = TensorNoiser(type: .none, schedule: .sine, window: 4, vocabSize: 50).apply(
            &n, batch: 3, seqLen: 9, seed: 1, step: 0, samplePositions: [0, 1, 2])
        XCTAssertEqual(n, clean)
    }

    func testReplaceRatesFollowBetaAndEntryZeroAndPadsAreUntouched() {
        let B = 512
        let T = 17
        let k = 4
        let V = 1000
        let clean = tensors(2, batch: B, T: T, k: k, V: V)
        var n = clean
        let noiser = TensorNoiser(type: .replace, schedule: .linear, window: k, vocabSize: V)
        _ = noiser.apply(&n, batch: B, seqLen: T, seed: 3, step: 1, samplePositions: Array(0..<B))
        var changed = [Int](repeating: 0, count: k)
        var total = [Int](repeating: 0, count: k)
        for i in 0..<clean.count {
            let j = i % k
            if clean[i] < 0 {
                XCTAssertEqual(n[i], -1, "pads stay pads")
                continue
            }
            total[j] += 1
            if n[i] != clean[i] { changed[j] += 1 }
        }
        XCTAssertEqual(changed[0], 0, "entry 0 is never noised")
        for j in 1..<k {
            // replaced with probability beta, and a replacement equals the old token with prob 1/V
            let rate = Double(changed[j]) / Double(total[j])
            XCTAssertEqual(rate, Double(j) / Double(k) * (1 - 1.0 / Double(V)), accuracy: 0.015, "entry \(j)")
        }
    }

    func testSameSeedSameNoiseWhateverTheRankSplit() {
        let B = 8
        let T = 10
        let k = 4
        let V = 40
        let clean = tensors(4, batch: B, T: T, k: k, V: V)
        let E = (0..<(V * 6)).map { Float(sin(Double($0))) }
        for type in [NoiseType.replace, .discrete, .continuous] {
            let noiser = TensorNoiser(type: type, schedule: .sine, window: k, vocabSize: V)
            var whole = clean
            let wn = E.withUnsafeBufferPointer {
                noiser.apply(
                    &whole, batch: B, seqLen: T, seed: 9, step: 5, samplePositions: Array(0..<B),
                    embedding: $0.baseAddress!, embeddingDim: 6, modelDim: 3)
            }
            // 4 "ranks" of 2 samples each
            var parts: [Int32] = []
            var partNoise: [Float] = []
            let per = (T - 1) * k
            for r in 0..<4 {
                var mine = Array(clean[(2 * r * per)..<(2 * (r + 1) * per)])
                let pn = E.withUnsafeBufferPointer {
                    noiser.apply(
                        &mine, batch: 2, seqLen: T, seed: 9, step: 5, samplePositions: [2 * r, 2 * r + 1],
                        embedding: $0.baseAddress!, embeddingDim: 6, modelDim: 3)
                }
                parts += mine
                partNoise += pn ?? []
            }
            XCTAssertEqual(parts, whole, "\(type): noised tokens must not depend on the split")
            XCTAssertEqual(partNoise, wn ?? [], "\(type): embedding noise must not depend on the split")
            if type != .continuous { XCTAssertNotEqual(whole, clean, "\(type) changed something") }
        }
    }

    func testNearestByCosineMatchesALoopAndBreaksTiesLow() {
        var rng = CounterRNG(seed: 11)
        let V = 30
        let Dm = 5
        let rows = 40
        var E = (0..<(V * Dm)).map { _ in rng.normal() }
        for c in 0..<Dm { E[7 * Dm + c] = E[3 * Dm + c] * 2 }  // 3 and 7 point the same way: tie -> 3
        let m = (0..<(rows * Dm)).map { _ in rng.normal() } + Array(E[(3 * Dm)..<(4 * Dm)])
        let got = E.withUnsafeBufferPointer {
            TensorNoiser.nearestByCosine(m, rows: rows + 1, embedding: $0.baseAddress!, vocab: V, dim: Dm)
        }
        for r in 0..<(rows + 1) {
            var best = 0
            var bs = -Double.infinity
            for v in 0..<V {
                var dot = 0.0
                var nm = 0.0
                var ne = 0.0
                for c in 0..<Dm {
                    dot += Double(m[r * Dm + c] * E[v * Dm + c])
                    nm += Double(m[r * Dm + c] * m[r * Dm + c])
                    ne += Double(E[v * Dm + c] * E[v * Dm + c])
                }
                let cs = dot / max(nm.squareRoot(), 1e-8) / max(ne.squareRoot(), 1e-8)
                if cs > bs + 1e-9 {
                    bs = cs
                    best = v
                }
            }
            XCTAssertEqual(got[r], best, "row \(r)")
        }
        XCTAssertEqual(got[rows], 3, "tie between 3 and 7 goes to the lowest index")
    }

    func testDiscreteNoiseIsAHardSwitchNearHalf() {
        // SPEC section 4: on random embeddings entries with beta < 0.5 are never changed.
        let B = 16
        let T = 20
        let k = 4
        let V = 256
        let Dm = 32
        var rng = CounterRNG(seed: 12)
        let E = (0..<(V * Dm)).map { _ in rng.normal() }
        let clean = tensors(5, batch: B, T: T, k: k, V: V)
        var n = clean
        let noiser = TensorNoiser(type: .discrete, schedule: .linear, window: k, vocabSize: V)  // betas 0, .25, .5, .75
        _ = E.withUnsafeBufferPointer {
            noiser.apply(
                &n, batch: B, seqLen: T, seed: 1, step: 0, samplePositions: Array(0..<B), embedding: $0.baseAddress!,
                embeddingDim: Dm)
        }
        var changed = [Int](repeating: 0, count: k)
        for i in 0..<clean.count where clean[i] >= 0 && n[i] != clean[i] { changed[i % k] += 1 }
        XCTAssertEqual(changed[0], 0)
        XCTAssertEqual(changed[1], 0, "beta 0.25 < 0.5 never changes")
        XCTAssertGreaterThan(changed[3], 0, "beta 0.75 changes entries")
    }

    func testLabelDropRateAndInvariance() {
        let labels = [Int32](repeating: 2, count: 4000)
        let d = Windows.dropLabels(labels, nullClass: 10, p: 0.1, seed: 1, step: 3, samplePositions: Array(0..<4000))
        XCTAssertEqual(Double(d.filter { $0 == 10 }.count) / 4000, 0.1, accuracy: 0.02)
        let second = Windows.dropLabels(
            Array(labels[2000...]), nullClass: 10, p: 0.1, seed: 1, step: 3, samplePositions: Array(2000..<4000))
        XCTAssertEqual(second, Array(d[2000...]))
    }
}
