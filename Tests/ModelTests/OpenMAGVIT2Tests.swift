import Foundation
import Kernels
import Platform
import XCTest

@testable import ARModel

/// The Open-MAGVIT2 base (SPEC section 8) against the independent JAX reference
/// (Tests/Reference/reference_omg.py, fixtures in Fixtures/OpenMAGVIT2): logits (pre, then post
/// given the target's pre), loss and its two parts, per-slot losses, every gradient, and greedy
/// sampling with a guidance scale per sub-token. Tolerances as FixtureTests.
let omgFixtureDir = fixtureDir + "/OpenMAGVIT2"

func omgFixtureFiles() -> [String] {
    let all = (try? FileManager.default.contentsOfDirectory(atPath: omgFixtureDir)) ?? []
    return all.filter { $0.hasSuffix(".safetensors") }.sorted()
}

final class OpenMAGVIT2FixtureTests: XCTestCase {
    func load(_ file: String) throws -> FixtureCase {
        let c = try loadFixture(omgFixtureDir + "/" + file)
        XCTAssertEqual(c.model.config.base, "open-magvit2")
        return c
    }

    func testFixturesExist() {
        XCTAssertEqual(omgFixtureFiles().count, 5, "Open-MAGVIT2 fixtures are committed under Fixtures/OpenMAGVIT2")
    }

    func testForwardLogitsLossAndPartsMatchReference() throws {
        for f in omgFixtureFiles() {
            let c = try load(f)
            let cfg = c.model.config
            XCTAssertEqual(c.model.logitsWidth, 4 + 8)
            var logits = [Float](repeating: 0, count: c.batch.batch * cfg.seqLen * cfg.window * c.model.logitsWidth)
            let r = logits.withUnsafeMutableBufferPointer { c.model.forward(c.batch, logits: $0.baseAddress!) }
            let (w, i) = worstError(logits, try c.st.floats("output.logits"), rtol: 1e-4, atol: 1e-5)
            XCTAssertLessThanOrEqual(w, 1, "\(f): logits, worst element \(i)")
            let loss = Double(try c.st.floats("output.loss")[0])
            XCTAssertEqual(r.loss, loss, accuracy: 1e-4 * abs(loss), "\(f): loss")
            let parts = try c.st.floats("output.part_losses").map(Double.init)
            XCTAssertEqual(r.partLosses.count, 2, "\(f): two loss parts")
            for p in 0..<2 {
                XCTAssertEqual(r.partLosses[p], parts[p], accuracy: 1e-4 * abs(parts[p]), "\(f): part \(p)")
            }
            XCTAssertEqual(r.partLosses[0] + r.partLosses[1], r.loss, accuracy: 1e-6 * r.loss, "\(f): parts add up")
            let slots = try c.st.floats("output.slot_losses").map(Double.init)
            for j in slots.indices {
                XCTAssertEqual(r.slotLosses[j], slots[j], accuracy: 1e-4 * abs(slots[j]), "\(f): slot \(j) loss")
            }
        }
    }

    func testEveryGradientMatchesReference() throws {
        for f in omgFixtureFiles() {
            let c = try load(f)
            let scales = try checkGradientsAgainstFixture(c, f, atolFloor: 1e-9)
            for (name, scale) in scales where name != "tensorar.in_pad" || c.model.config.window > 2 {
                XCTAssertGreaterThan(scale, 0, "\(f): \(name) has a gradient")  // no pad entry with k <= 2
            }
        }
    }

    func testGreedySamplingWithTwoScalesMatchesReference() throws {
        for f in omgFixtureFiles() {
            let c = try load(f)
            let sample = c.fixture["sample"] as! [String: Any]
            let scales = (sample["cfg_scales"] as! [Double]).map(Float.init)
            XCTAssertNotEqual(scales[0], scales[1], "\(f): the two sub-tokens get different scales")
            let labels = try c.st.ints("sample.labels")
            var o = SamplingOptions(topK: 1)
            o.partCfgScales = scales
            let s = Sampler(model: c.model).sample(labels: labels, sampleIds: Array(0..<labels.count), options: o)
            XCTAssertEqual(s.tokens, try c.st.ints("sample.tokens"), "\(f): sampled tokens (full indices)")
            XCTAssertEqual(s.trajectories, try c.st.ints("sample.trajectories"), "\(f): trajectories")
            // a negative control: one scale for both sub-tokens samples something else
            var one = SamplingOptions(topK: 1)
            one.cfgScale = scales.max()!
            let other = Sampler(model: c.model).sample(labels: labels, sampleIds: Array(0..<labels.count), options: one)
            XCTAssertNotEqual(other.tokens, s.tokens, "\(f): the per-sub-token scales matter")
        }
    }
}

/// SPEC section 8's presets, the k = 1 identity, and the sampler against the teacher-forced model.
final class OpenMAGVIT2ModelTests: XCTestCase {
    func testPresetParameterCounts() throws {
        let want = ["B": 343_570_432, "L": 804_362_240, "XL": 1_486_679_040]
        for (name, count) in want {
            let c = try ModelConfig.preset(name, base: "open-magvit2")
            XCTAssertEqual(c.vocabSize, 262_144)
            XCTAssertEqual(c.factorizedBits, [6, 12])
            XCTAssertEqual(c.headDim, 64, "\(name): head width 64")
            XCTAssertEqual(ParameterTable(c).total, count, "Open-MAGVIT2 \(name)")
        }
        let b = try ModelConfig.preset("B", base: "open-magvit2")
        XCTAssertEqual([b.dim, b.nLayer, b.factorizedNLayer, b.nHead, b.ffnHidden], [1024, 24, 2, 16, 2816])
        for name in ["tiny", "small"] {
            let c = try ModelConfig.preset(name, base: "open-magvit2", vocabSize: 64)
            XCTAssertNoThrow(try c.validate(), name)
            XCTAssertEqual(c.factorizedBits, [2, 4])
        }
        XCTAssertThrowsError(try ModelConfig.preset("XXL", base: "open-magvit2"))
    }

    func testConfigJSONRoundTripsAndLlamaGenStaysAsItWas() throws {
        let c = try ModelConfig.preset("B", base: "open-magvit2")
        let json = c.jsonString()
        XCTAssertTrue(json.contains(#""base":"open-magvit2""#))
        XCTAssertTrue(json.contains(#""factorized_bits":[6,12]"#))
        XCTAssertTrue(json.contains(#""factorized_n_layer":2"#))
        XCTAssertEqual(try JSONDecoder().decode(ModelConfig.self, from: Data(json.utf8)), c)
        let l = try ModelConfig.preset("B").jsonString()
        XCTAssertFalse(l.contains("factorized") || l.contains(#""base""#), "LlamaGen's JSON has no new keys: \(l)")
        var bad = c
        bad.factorizedBits = [6, 11]
        XCTAssertThrowsError(try bad.validate()) { XCTAssertTrue("\($0)".contains("262144")) }
        bad = c
        bad.factorizedNLayer = 0
        XCTAssertThrowsError(try bad.validate()) { XCTAssertTrue("\($0)".contains("factorized_n_layer")) }
    }

    static func model(window: Int, depth: Int, residual: Bool = true, seed: UInt64 = 1) throws -> Transformer {
        var c = try ModelConfig.preset("tiny", base: "open-magvit2", vocabSize: 64, numClasses: 3, gridSize: 3)
        c.dim = 16
        c.nHead = 2
        c.ffnHidden = 32
        c.window = window
        c.pluginDepth = depth
        c.residual = residual
        c.factorizedNLayer = 2
        let m = try Transformer(config: c)
        m.initialise(seed: seed)
        // non-zero heads and projections so the checks mean something
        var rng = CounterRNG(seed: seed + 100)
        for e in m.table.entries where e.name.hasSuffix("proj.weight") || e.name.hasPrefix("head.") {
            for i in 0..<e.count { m.params[e.offset + i] = 0.3 * rng.normal() }
        }
        return m
    }

    func batch(_ c: ModelConfig, seed: UInt64) -> ModelBatch {
        var rng = CounterRNG(seed: seed)
        let tokens = (0..<(2 * c.seqLen)).map { _ in Int32(rng.below(c.vocabSize)) }
        return ModelBatch(
            batch: 2, tokens: tokens, labels: [1, 3],
            tensors: Windows.inputTensors(tokens: tokens, batch: 2, seqLen: c.seqLen, window: c.window))
    }

    func logits(_ m: Transformer, _ b: ModelBatch) -> ([Float], LossReport) {
        var out = [Float](repeating: 0, count: b.batch * m.config.seqLen * m.config.window * m.logitsWidth)
        let r = out.withUnsafeMutableBufferPointer { m.forward(b, logits: $0.baseAddress!) }
        return (out, r)
    }

    func testFreshPluginWithWindowOneIsTheBaseBitForBit() throws {
        let base = try Self.model(window: 1, depth: 0)
        var c = base.config
        c.pluginDepth = 2
        let plug = try Transformer(config: c)
        plug.initialise(seed: 9)
        for e in base.table.entries {
            plug.view(e.name).baseAddress!.update(from: base.view(e.name).baseAddress!, count: e.count)
        }
        let b = batch(c, seed: 2)
        let (la, ra) = logits(base, b)
        let (lb, rb) = logits(plug, b)
        XCTAssertEqual(la, lb, "k = 1 with a fresh residual plug-in is the Open-MAGVIT2 base exactly")
        XCTAssertEqual(ra, rb)
        // and it learns the same first step: equal gradients on the base's parameters
        base.grads.zero()
        plug.grads.zero()
        base.forward(b, gradientScale: 0.01)
        base.backward()
        plug.forward(b, gradientScale: 0.01)
        plug.backward()
        for e in base.table.entries {
            let ga = Array(UnsafeBufferPointer(start: base.grads.base + e.offset, count: e.count))
            let gb = Array(UnsafeBufferPointer(start: plug.grads.base + e.offset, count: e.count))
            XCTAssertEqual(ga, gb, "gradient of \(e.name)")
        }
        // and samples the same images (random sampling, a scale and a temperature per sub-token)
        var o = SamplingOptions(topK: 0, seed: 8)
        o.partCfgScales = [2, 1.5]
        o.partTemperatures = [1, 0.8]
        let sa = Sampler(model: base).sample(labels: [0, 1, 2], sampleIds: [0, 1, 2], options: o)
        let sb = Sampler(model: plug).sample(labels: [0, 1, 2], sampleIds: [0, 1, 2], options: o)
        XCTAssertEqual(sa.tokens, sb.tokens)
        var other = o
        other.partTemperatures = [1, 0.3]
        XCTAssertNotEqual(
            Sampler(model: base).sample(labels: [0, 1, 2], sampleIds: [0, 1, 2], options: other).tokens,
            sa.tokens, "the post temperature matters")
    }

    /// The sampler's choices (greedy, a scale per sub-token) against the teacher-forced forward
    /// over the tensors it produced: slot j of step p predicted t_p[j] = trajectory[p + j][j], so
    /// a forward whose targets are the slot-j predictions gives, at (p, j), the pre logits and the
    /// post logits given the sampled pre.
    func checkSamplerMatchesTeacherForcing(
        _ m: Transformer, scales: [Float], file: StaticString = #filePath,
        line: UInt = #line
    ) {
        let c = m.config
        let T = c.seqLen
        let k = c.window
        let P = m.base.headParts
        let labels: [Int32] = [0, 2, 1]
        var o = SamplingOptions(topK: 1)
        o.partCfgScales = scales
        let s = Sampler(model: m).sample(labels: labels, sampleIds: [0, 1, 2], options: o)
        var tensors = [Int32](repeating: -1, count: 3 * (T - 1) * k)
        for b in 0..<3 {
            for q in 0..<(T - 1) {
                for j in 0..<k where q + j < T {
                    tensors[(b * (T - 1) + q) * k + j] = s.trajectories[(b * T + q + j) * k + j]
                }
            }
        }
        let W = m.logitsWidth
        var checked = 0
        for j in 0..<k {
            // targets: token q's prediction at slot j (0 where there is none: those rows are unused)
            var targets = [Int32](repeating: 0, count: 3 * T)
            for b in 0..<3 { for q in j..<T { targets[b * T + q] = s.trajectories[(b * T + q) * k + j] } }
            func run(_ lab: [Int32]) -> [Float] {
                var out = [Float](repeating: 0, count: 3 * T * k * W)
                out.withUnsafeMutableBufferPointer {
                    let batch = ModelBatch(batch: 3, tokens: targets, labels: lab, tensors: tensors)
                    _ = m.forward(batch, logits: $0.baseAddress!)
                }
                return out
            }
            let lc = run(labels)
            let lu = run([Int32](repeating: Int32(c.numClasses), count: 3))
            for b in 0..<3 {
                for p in 0..<(T - j) {
                    let tok = s.trajectories[(b * T + p + j) * k + j]
                    let want = [Int(tok) % P[0], Int(tok) / P[0]]
                    for part in 0..<2 {
                        let off = ((b * T + p) * k + j) * W + (part == 0 ? 0 : P[0])
                        var row = (0..<P[part]).map { v -> Float in
                            let a = lc[off + v]
                            let u = lu[off + v]
                            return scales[part] > 1 ? u + scales[part] * (a - u) : a
                        }
                        let got = Sampler.choose(&row, options: SamplingOptions(topK: 1), uniform: 0)
                        let what = "image \(b) step \(p) slot \(j) part \(part)"
                        XCTAssertEqual(got, want[part], what, file: file, line: line)
                        checked += 1
                    }
                }
            }
        }
        XCTAssertEqual(checked, 3 * 2 * (0..<k).reduce(0) { $0 + T - $1 }, file: file, line: line)
    }

    func testCachedSamplingMatchesTheTeacherForcedModel() throws {
        checkSamplerMatchesTeacherForcing(try Self.model(window: 1, depth: 0), scales: [1, 1])
        checkSamplerMatchesTeacherForcing(try Self.model(window: 1, depth: 0), scales: [2.5, 1.5])
        checkSamplerMatchesTeacherForcing(try Self.model(window: 3, depth: 1), scales: [1, 3])
        checkSamplerMatchesTeacherForcing(try Self.model(window: 3, depth: 2, residual: false), scales: [2, 0.5])
    }

    /// `Sampler.slotStates` then the head part by part (the KV-cached trunk and factorized steps)
    /// against the training forward's logits, at every step, slot and part, for both row sets.
    func testSamplerStepMatchesTrainingForwardAtEveryStepSlotAndPart() throws {
        for (k, d) in [(1, 0), (3, 1), (9, 2)] {
            let m = try Self.model(window: k, depth: d, seed: 7)
            let c = m.config
            let T = c.seqLen
            let n = 2
            let W = m.logitsWidth
            let P = m.base.headParts
            let b = batch(c, seed: 11)
            let null = ModelBatch(batch: n, tokens: b.tokens, labels: [3, 3], tensors: b.tensors)
            let want = [logits(m, b).0, logits(m, null).0]
            let s = Sampler(model: m)
            s.prepare(n: n, NB: 2 * n)
            var worst: Float = 0
            for pos in 0..<T {
                var inputs: [Int32] = []
                if pos > 0 {
                    for i in 0..<n {
                        let start: Int = (i * (T - 1) + pos - 1) * k
                        inputs += b.tensors[start..<(start + k)]
                    }
                }
                let h = s.slotStates(position: pos, labels: b.labels, inputs: inputs)
                // part 1 reads the pre sub-token of each row's target (teacher forcing)
                var pre = [Int32](repeating: 0, count: 2 * n * k)
                for r in 0..<(2 * n) {
                    for j in 0..<k where pos + j < T { pre[r * k + j] = b.tokens[(r % n) * T + pos + j] % Int32(P[0]) }
                }
                for part in 0..<2 {
                    var got = [Float](repeating: 0, count: 2 * n * k * P[part])
                    got.withUnsafeMutableBufferPointer {
                        m.base.headLogits(
                            $0.baseAddress!, h, rows: 2 * n * k, part: part, chosen: [pre],
                            params: m.params.base)
                    }
                    for r in 0..<(2 * n) {
                        for j in 0..<k where pos + j < T {
                            for v in 0..<P[part] {
                                let e = want[r / n][(((r % n) * T + pos) * k + j) * W + (part == 0 ? 0 : P[0]) + v]
                                worst = max(worst, abs(got[(r * k + j) * P[part] + v] - e) / max(1, abs(e)))
                            }
                        }
                    }
                }
            }
            XCTAssertLessThan(worst, 1e-5, "k \(k), d \(d): worst relative logit difference")
        }
    }

    func testBackwardReportsTheReadyOrderCoveringEveryParameterOnce() throws {
        for (k, d) in [(1, 0), (3, 1)] {
            let m = try Self.model(window: k, depth: d)
            m.forward(batch(m.config, seed: 3), gradientScale: 1)
            var seen: [Range<Int>] = []
            m.backward { seen.append($0) }
            XCTAssertEqual(seen, m.gradientReadyOrder)
            let sorted = seen.sorted { $0.lowerBound < $1.lowerBound }
            XCTAssertEqual(sorted.first?.lowerBound, 0)
            XCTAssertEqual(sorted.last?.upperBound, m.table.total)
            XCTAssertTrue(zip(sorted, sorted.dropFirst()).allSatisfy { $0.upperBound == $1.lowerBound })
        }
    }

    /// SPEC section 8's noise: `discrete` picks pre and post each by cosine in its own table.
    func testDiscreteNoisePicksEachSubTokenInItsOwnTable() throws {
        let m = try Self.model(window: 4, depth: 1)
        let c = m.config
        XCTAssertEqual(m.tokenFactors.map(\.name), ["pre_emb.weight", "post_emb.weight"])
        XCTAssertEqual(m.tokenFactors.map(\.stride), [1, 4])
        let b = batch(c, seed: 5)
        var noised = b.tensors
        let tables = m.tokenFactors.map { f in
            NoiseTable(
                embedding: UnsafePointer(m.params.base + m.table.offset(f.name)), rows: f.rows, dim: c.dim,
                stride: f.stride)
        }
        let noiser = TensorNoiser(type: .discrete, schedule: .linear, window: 4, vocabSize: c.vocabSize)
        _ = noiser.apply(
            &noised, batch: 2, seqLen: c.seqLen, seed: 1, step: 0, samplePositions: [0, 1], tables: tables)
        var changed = 0
        for i in noised.indices where i % 4 == 3 && noised[i] != b.tensors[i] { changed += 1 }
        XCTAssertGreaterThan(changed, 0, "beta 0.75 changes entries")
        for i in noised.indices where i % 4 == 0 { XCTAssertEqual(noised[i], b.tensors[i], "entry 0 is never noised") }
        XCTAssertTrue(noised.allSatisfy { $0 >= -1 && $0 < Int32(c.vocabSize) })
    }

    /// Dropout reaches the factorized blocks (SPEC section 8) and stays keyed by sample: a batch of
    /// two gives the losses of the two samples run alone, and another step gives other masks.
    func testHeadDropoutIsKeyedBySampleWhateverTheSplit() throws {
        let m = try Self.model(window: 2, depth: 1)
        let c = m.config
        let T = c.seqLen
        let b = batch(c, seed: 13)
        func loss(_ idx: [Int], step: Int, p: Float = 0.5) -> Double {
            let tokens = idx.flatMap { Array(b.tokens[($0 * T)..<(($0 + 1) * T)]) }
            let per = (T - 1) * c.window
            let tensors = idx.flatMap { Array(b.tensors[($0 * per)..<(($0 + 1) * per)]) }
            let mb = ModelBatch(batch: idx.count, tokens: tokens, labels: idx.map { b.labels[$0] }, tensors: tensors)
            let d = DropoutSettings(p: p, seed: 3, step: step, samplePositions: idx)
            return m.forward(mb, dropout: d).weightedSum
        }
        let both = loss([0, 1], step: 1)
        XCTAssertEqual(both, loss([0], step: 1) + loss([1], step: 1), accuracy: 1e-5 * abs(both))
        XCTAssertNotEqual(both, loss([0, 1], step: 2), "another step, other masks")
        XCTAssertNotEqual(both, loss([0, 1], step: 1, p: 0), "dropout changes the loss")
        // the head alone (the model bound for this batch by the forward above): its blocks' dropout
        let rows = 2 * T * c.window
        let h = FlatBuffer(count: rows * c.dim)
        var rng = CounterRNG(seed: 21)
        for i in 0..<h.count { h[i] = rng.normal() }
        let targets = (0..<rows).map { Int32($0 * 7919 % c.vocabSize) }
        func headLoss(_ plan: DropoutPlan?) -> [Float] {
            var losses = [Float](repeating: 0, count: rows)
            m.base.headForward(
                h, rows: rows, targets: targets, losses: &losses, logits: nil, dropout: plan,
                gradient: nil, params: m.params.base)
            return losses
        }
        let none = headLoss(nil)
        XCTAssertEqual(headLoss(DropoutPlan(p: 0, seed: 1, step: 0, samplePositions: [0, 1])), none)
        XCTAssertNotEqual(
            headLoss(DropoutPlan(p: 0.5, seed: 1, step: 0, samplePositions: [0, 1])), none,
            "dropout after wo and w2 in the factorized blocks (SPEC section 8)")
    }

    /// The activation table is what a training step allocates (SPEC section 8's head included).
    func testActivationLayoutIsWhatAStepAllocates() throws {
        for (k, d) in [(1, 0), (3, 1)] {
            let m = try Self.model(window: k, depth: d)
            _ = m.grads
            let b = batch(m.config, seed: 4)
            let before = FlatBuffer.liveBytes
            m.forward(b, dropout: DropoutSettings(p: 0.1, seed: 1, step: 0, samplePositions: [0, 1]), gradientScale: 1)
            m.backward()
            let want = m.config.trainingActivationBytes(batch: 2, dropout: true)
            XCTAssertEqual(FlatBuffer.liveBytes - before, want, "k \(k), d \(d)")
        }
    }

    /// FLOPs: each factorized block costs one section-2 block over 2 slots per head row, forward
    /// and twice that backward (no head recomputation), counted by hand here.
    func testFactorizedFLOPsByHand() throws {
        var c = try ModelConfig.preset("B", base: "open-magvit2")
        let B = 2
        let rows = Double(B * c.seqLen * 2)
        let D = Double(c.dim)
        let F = Double(c.ffnHidden)
        let hd = Double(c.headDim)
        let NH = Double(c.nHead)
        let block = rows * 2 * (3 * D * D + D * D + 3 * D * F) + Double(B * c.seqLen) * NH * 2 * 2 * 4 * hd
        let two = c.trainingFLOPs(batch: B)
        c.factorizedNLayer = 1
        XCTAssertEqual(two - c.trainingFLOPs(batch: B), 3 * block, accuracy: 1e-9 * two)
        // the heads: 2 D (64 + 4096) per row and pass, three passes
        var plain = c
        plain.factorizedNLayer = 1
        let heads = 3 * 2 * Double(B * c.seqLen) * D * (64 + 4096)
        let withoutHeads = plain.trainingFLOPs(batch: B) - heads
        let trunk = c.stackFLOPs(sequences: B, seqLen: c.seqLen, layers: c.nLayer, causal: true)
        XCTAssertEqual(
            withoutHeads, 3 * (trunk + block),
            accuracy: 1e-9 * two)
    }
}
