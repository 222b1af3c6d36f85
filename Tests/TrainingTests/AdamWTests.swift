import ARModel
import Kernels
import Platform
import XCTest

@testable import Training

/// PyTorch's AdamW written out element by element in Double: the slow, obvious reference.
private struct ReferenceAdamW {
    let table: ParameterTable
    let s: AdamWSettings
    let trainable: PerGroup<Bool>
    var p: [Double], m: [Double], v: [Double]
    var t = PerGroup(base: 0, plugin: 0)

    init(table: ParameterTable, settings: AdamWSettings, trainable: PerGroup<Bool>, params: [Float]) {
        self.table = table
        s = settings
        self.trainable = trainable
        p = params.map(Double.init)
        m = Array(repeating: 0, count: params.count)
        v = m
    }

    /// Returns the pre-clip norm.
    mutating func step(_ grads: [Float], lr: PerGroup<Float>, clip: Double?) -> Double {
        var sq = 0.0
        for e in table.entries where trainable[e.group] {
            for i in e.offset..<(e.offset + e.count) { sq += Double(grads[i]) * Double(grads[i]) }
        }
        let norm = sq.squareRoot()
        let scale = clip.map { min(1, $0 / (norm + 1e-6)) } ?? 1
        for g in PerGroup<Int>.groups where trainable[g] { t[g] += 1 }
        let b1 = Double(s.beta1)
        let b2 = Double(s.beta2)
        for e in table.entries where trainable[e.group] {
            let rate = Double(lr[e.group])
            let step = Double(t[e.group])
            for i in e.offset..<(e.offset + e.count) {
                let g = Double(grads[i]) * scale
                m[i] = b1 * m[i] + (1 - b1) * g
                v[i] = b2 * v[i] + (1 - b2) * g * g
                if e.decay { p[i] *= 1 - rate * Double(s.weightDecay) }
                let mHat = m[i] / (1 - pow(b1, step))
                let vHat = v[i] / (1 - pow(b2, step))
                p[i] -= rate * mHat / (vHat.squareRoot() + Double(s.eps))
            }
        }
        return norm
    }
}

final class AdamWTests: XCTestCase {
    let settings = AdamWSettings(beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0.05)

    func testMatchesReferenceOverSeveralSteps() {
        let table = ParameterTable(testModel())
        XCTAssertGreaterThan(table.count(of: .plugin), 0)
        let params = randomBuffer(table.total, seed: 1, scale: 0.5)
        let opt = AdamW(table: table, settings: settings, trainable: PerGroup(base: true, plugin: true))
        var ref = ReferenceAdamW(table: table, settings: settings, trainable: opt.trainable, params: params.array)
        let lrs = [
            PerGroup<Float>(base: 1e-3, plugin: 3e-3), PerGroup(base: 2e-3, plugin: 1e-3),
            PerGroup(base: 5e-4, plugin: 5e-4),
            PerGroup(base: 1e-3, plugin: 0), PerGroup(base: 1e-2, plugin: 2e-3),
        ]
        for (k, lr) in lrs.enumerated() {
            let grads = randomBuffer(table.total, seed: 100 + UInt64(k))
            let result = opt.step(params: params, grads: grads, lr: lr, clip: nil)
            let norm = ref.step(grads.array, lr: lr, clip: nil)
            XCTAssertTrue(result.applied)
            XCTAssertEqual(result.clipScale, 1)
            XCTAssertEqual(result.gradNorm, norm, accuracy: norm * 1e-12)
            assertClose(params.array, ref.p, rtol: 2e-6, atol: 1e-7, "params after step \(k + 1)")
            assertClose(opt.m.array, ref.m, rtol: 1e-5, atol: 1e-7, "m after step \(k + 1)")
            assertClose(opt.v.array, ref.v, rtol: 1e-5, atol: 1e-9, "v after step \(k + 1)")
        }
        XCTAssertEqual(opt.steps, PerGroup(base: 5, plugin: 5))
    }

    func testWeightDecayOnlyOnMatrices() {
        let table = ParameterTable(testModel())
        let params = randomBuffer(table.total, seed: 2)
        let before = params.array
        let opt = AdamW(table: table, settings: settings, trainable: PerGroup(base: true, plugin: true))
        // Zero gradients: the Adam term is 0/(0+eps) = 0, only the decay moves anything.
        opt.step(params: params, grads: FlatBuffer(count: table.total), lr: PerGroup(base: 0.1, plugin: 0.2), clip: 1)
        for e in table.entries {
            let factor: Float = e.isMatrix ? 1 - (e.group == .base ? 0.1 : 0.2) * 0.05 : 1
            for i in e.offset..<(e.offset + e.count) where params[i] != before[i] * factor {
                XCTFail("\(e.name)[\(i - e.offset)]: \(params[i]) != \(before[i]) * \(factor)")
                return
            }
        }
    }

    /// `optim.decay_rule_*`: the project rule (SPEC section 6) and RAR's (section 9 Recipe, a
    /// case-sensitive substring match), on RAR's own names and shapes and a few made-up ones.
    func testDecayRulesOnNamesAndShapes() {
        let D = 8
        let cases: [(String, [Int], project: Bool, rar: Bool)] = [
            ("adaln_before_head.adaLN_modulation.1.weight", [2 * D, D], true, false),  // "ln" in "adaln"
            ("adaln_before_head.adaLN_modulation.1.bias", [2 * D], false, false),
            ("blocks.0.adaLN_modulation.1.weight", [6 * D, D], true, true),  // "LN" is not "ln"
            ("blocks.0.adaLN_modulation.1.bias", [6 * D], false, false),
            ("cls_token", [1, 1, D], true, true),  // three dimensions, no exempt name
            ("pos_embed", [1, 1040, D], true, false),
            ("target_aware_pos_embed", [1, 1040, D], true, false),
            ("timesteps_embeddings", [1, 356, D], true, false),
            ("embeddings.weight", [2026, D], true, false),
            ("blocks.3.norm1.weight", [D], false, false),
            ("blocks.3.attn.qkv.weight", [3 * D, D], true, true),
            ("blocks.3.attn.qkv.bias", [3 * D], false, false),
            ("blocks.3.attn.q_norm.weight", [D / 2], false, false),
            ("blocks.3.attn.proj.weight", [D, D], true, true),
            ("blocks.3.mlp.fc1.weight", [4 * D, D], true, true),
            ("lm_head.weight", [1024, D], true, true),
            ("lm_head.bias", [1024], false, false),
            ("tok_embeddings.weight", [24, D], true, false),  // LlamaGen's tables under the rar rule
            ("cls_embedding.embedding_table.weight", [4, D], true, false),
            ("layers.0.attention.wqkv.weight", [3 * D, D], true, true),
            ("x.gamma", [2, 2], true, false),
            ("mask_token", [1, 1, D], true, false),
            ("latent_tokens", [32, D], true, false),
            ("block.Norm.weight", [2, 2], true, true),  // case-sensitive
            ("some_bias_table", [2, 2], true, false),
        ]
        for (name, shape, project, rar) in cases {
            XCTAssertEqual(DecayRule.project.decays(name: name, shape: shape), project, "project: \(name) \(shape)")
            XCTAssertEqual(DecayRule.rar.decays(name: name, shape: shape), rar, "rar: \(name) \(shape)")
        }
        // the table's own flags are the project rule's; `decaying` re-rules one group only
        let table = ParameterTable(testModel())
        XCTAssertTrue(table.entries.allSatisfy { $0.decay == $0.isMatrix })
        XCTAssertEqual(table.decaying { _ in .project }.entries, table.entries)
        let ruled = table.decaying { $0 == .base ? .rar : .project }
        for (e, r) in zip(table.entries, ruled.entries) {
            let want = e.group == .base ? DecayRule.rar.decays(name: e.name, shape: e.shape) : e.isMatrix
            XCTAssertEqual(r.decay, want, e.name)
            XCTAssertEqual([r.name, "\(r.shape)", "\(r.offset)"], [e.name, "\(e.shape)", "\(e.offset)"])
        }
        XCTAssertFalse(ruled.entry("tok_embeddings.weight")!.decay)
        XCTAssertTrue(ruled.entry("tensorar.in_pos")!.decay, "the plug-in keeps the project rule")
        // a checkpoint's table does not store the flag: it reads back with the project rule's
        let json = try! JSONEncoder().encode(ruled.entries)
        XCTAssertFalse(String(decoding: json, as: UTF8.self).contains("decay"))
        XCTAssertEqual(try! JSONDecoder().decode([ParameterEntry].self, from: json), table.entries)
    }

    /// The rule decides the step: under `rar` the base's embedding tables are not decayed, the
    /// rest as before; each matches the Double reference with that rule.
    func testRarDecayRuleChangesTheStep() {
        let table = ParameterTable(testModel())
        let start = randomBuffer(table.total, seed: 4, scale: 0.5)
        let lr = PerGroup<Float>(base: 0.05, plugin: 0.02)
        var results: [DecayRule: [Float]] = [:]
        for rule in DecayRule.allCases {
            let ruled = table.decaying { $0 == .base ? rule : .project }
            let params = FlatBuffer(count: table.total)
            params.base.update(from: start.base, count: table.total)
            let opt = AdamW(table: ruled, settings: settings, trainable: PerGroup(base: true, plugin: true))
            var ref = ReferenceAdamW(table: ruled, settings: settings, trainable: opt.trainable, params: start.array)
            for k in 0..<3 {
                let grads = randomBuffer(table.total, seed: 300 + UInt64(k))
                opt.step(params: params, grads: grads, lr: lr, clip: 1)
                _ = ref.step(grads.array, lr: lr, clip: 1)
            }
            assertClose(params.array, ref.p, rtol: 2e-6, atol: 1e-7, "params under \(rule)")
            results[rule] = params.array
        }
        let tok = table.entry("tok_embeddings.weight")!
        let changed = table.entries.filter { e in
            (e.offset..<(e.offset + e.count)).contains { results[.project]![$0] != results[.rar]![$0] }
        }.map(\.name)
        XCTAssertEqual(changed, ["cls_embedding.embedding_table.weight", tok.name], "only the exempt matrices differ")
    }

    func testFrozenGroupKeepsNoMomentsAndStaysBitIdentical() {
        let table = ParameterTable(testModel())
        let params = randomBuffer(table.total, seed: 3)
        let before = params.array
        let opt = AdamW(table: table, settings: settings, trainable: PerGroup(base: false, plugin: true))
        XCTAssertEqual(opt.momentRange, table.range(of: .plugin))
        XCTAssertEqual(opt.m.count, table.count(of: .plugin))
        XCTAssertEqual(opt.v.count, table.count(of: .plugin))
        var ref = ReferenceAdamW(table: table, settings: settings, trainable: opt.trainable, params: before)
        for k in 0..<3 {
            let grads = randomBuffer(table.total, seed: 200 + UInt64(k))
            let r = opt.step(params: params, grads: grads, lr: PerGroup(base: 0, plugin: 1e-3), clip: 1.0)
            XCTAssertEqual(
                r.gradNorm, ref.step(grads.array, lr: PerGroup(base: 0, plugin: 1e-3), clip: 1.0), accuracy: 1e-9)
        }
        let base = table.range(of: .base)
        XCTAssertTrue(base.allSatisfy { params[$0].bitPattern == before[$0].bitPattern }, "a frozen parameter changed")
        let plugin = table.range(of: .plugin)
        assertClose(Array(params.array[plugin]), Array(ref.p[plugin]), rtol: 2e-6, atol: 1e-7, "plugin params")
        XCTAssertEqual(opt.steps, PerGroup(base: 0, plugin: 3))
    }

    func testClippingScalesToTheClipNorm() {
        let table = ParameterTable(testModel())
        let params = randomBuffer(table.total, seed: 4)
        let opt = AdamW(table: table, settings: settings, trainable: PerGroup(base: true, plugin: true))
        var ref = ReferenceAdamW(table: table, settings: settings, trainable: opt.trainable, params: params.array)
        for k in 0..<3 {
            let grads = randomBuffer(table.total, seed: 300 + UInt64(k), scale: 10)  // norm far above 1
            let norm = ref.step(grads.array, lr: PerGroup(base: 1e-3, plugin: 1e-3), clip: 1.0)
            let r = opt.step(params: params, grads: grads, lr: PerGroup(base: 1e-3, plugin: 1e-3), clip: 1.0)
            XCTAssertEqual(r.gradNorm, norm, accuracy: norm * 1e-12)
            XCTAssertGreaterThan(norm, 100)
            XCTAssertEqual(Double(r.clipScale), 1 / (norm + 1e-6), accuracy: 1e-6 / norm)
            assertClose(params.array, ref.p, rtol: 2e-6, atol: 1e-7, "params after clipped step \(k + 1)")
            assertClose(opt.v.array, ref.v, rtol: 1e-5, atol: 1e-9, "v after clipped step \(k + 1)")
        }
        // Below the threshold nothing is scaled.
        let small = randomBuffer(table.total, seed: 9, scale: 1e-4)
        XCTAssertEqual(
            opt.step(params: params, grads: small, lr: PerGroup(base: 1e-3, plugin: 1e-3), clip: 1.0).clipScale, 1)
    }

    func testNonFiniteGradientIsReportedAndNothingChanges() {
        let table = ParameterTable(testModel())
        let params = randomBuffer(table.total, seed: 5)
        let opt = AdamW(table: table, settings: settings, trainable: PerGroup(base: true, plugin: true))
        opt.step(
            params: params, grads: randomBuffer(table.total, seed: 6), lr: PerGroup(base: 1e-3, plugin: 1e-3), clip: 1)
        let (p0, m0, v0) = (params.array, opt.m.array, opt.v.array)
        for bad in [Float.nan, .infinity] {
            let grads = randomBuffer(table.total, seed: 7)
            grads[table.total - 1] = bad
            let r = opt.step(params: params, grads: grads, lr: PerGroup(base: 1e-3, plugin: 1e-3), clip: 1)
            XCTAssertFalse(r.applied)
            XCTAssertFalse(r.gradNorm.isFinite)
        }
        XCTAssertEqual(params.array, p0)
        XCTAssertEqual(opt.m.array, m0)
        XCTAssertEqual(opt.v.array, v0)
        XCTAssertEqual(opt.steps, PerGroup(base: 1, plugin: 1))
    }

    func testThreadedUpdateIsBitIdentical() {
        // Large enough that three threads each get a chunk (chunks are at least 65536 floats).
        let table = ParameterTable(testModel(dim: 32, ffn: 512, layers: 2, vocab: 64))
        XCTAssertGreaterThan(table.total, 3 * 65536)
        let a = randomBuffer(table.total, seed: 8)
        let b = randomBuffer(table.total, seed: 8)
        let one = AdamW(table: table, settings: settings, trainable: PerGroup(base: true, plugin: true))
        let three = AdamW(table: table, settings: settings, trainable: PerGroup(base: true, plugin: true))
        three.threads = 3
        for k in 0..<2 {
            let g = randomBuffer(table.total, seed: 400 + UInt64(k))
            one.step(params: a, grads: g, lr: PerGroup(base: 1e-3, plugin: 2e-3), clip: 1)
            three.step(params: b, grads: g, lr: PerGroup(base: 1e-3, plugin: 2e-3), clip: 1)
        }
        XCTAssertTrue(a.array == b.array && one.m.array == three.m.array && one.v.array == three.v.array)
    }
}
