import Foundation
import Kernels
import Platform
import XCTest

@testable import ARModel

/// The RAR base (SPEC section 9) against the independent JAX reference
/// (Tests/Reference/reference_rar.py, fixtures in Fixtures/RAR): logits, loss, per-slot losses,
/// every gradient, in raster order and in a fixed random order per sample, and greedy sampling.
/// Tolerances as the Open-MAGVIT2 tests.
let rarFixtureDir = fixtureDir + "/RAR"

/// The base-only fixture files (the plug-in over RAR is not implemented yet).
let rarBaseFixtures = ["rar_base_order.safetensors", "rar_base_raster.safetensors"]

func loadRARFixture(_ file: String) throws -> FixtureCase {
    let c = try loadFixture(rarFixtureDir + "/" + file)
    XCTAssertEqual(c.model.config.base, "rar")
    var batch = c.batch
    if c.st.tensors["input.orders"] != nil { batch.orders = try c.st.ints("input.orders") }
    return FixtureCase(name: c.name, st: c.st, model: c.model, batch: batch, fixture: c.fixture)
}

final class RARFixtureTests: XCTestCase {
    func testFixturesExist() {
        let files = (try? FileManager.default.contentsOfDirectory(atPath: rarFixtureDir)) ?? []
        XCTAssertEqual(files.filter { $0.hasSuffix(".safetensors") }.count, 6, "RAR fixtures under Fixtures/RAR")
    }

    func testForwardLogitsAndLossMatchReference() throws {
        for f in rarBaseFixtures {
            let c = try loadRARFixture(f)
            let cfg = c.model.config
            var logits = [Float](repeating: 0, count: c.batch.batch * cfg.seqLen * cfg.vocabSize)
            let r = logits.withUnsafeMutableBufferPointer { c.model.forward(c.batch, logits: $0.baseAddress!) }
            let (w, i) = worstError(logits, try c.st.floats("output.logits"), rtol: 1e-4, atol: 1e-5)
            XCTAssertLessThanOrEqual(w, 1, "\(f): logits, worst element \(i)")
            let loss = Double(try c.st.floats("output.loss")[0])
            XCTAssertEqual(r.loss, loss, accuracy: 1e-4 * abs(loss), "\(f): loss")
            let slots = try c.st.floats("output.slot_losses").map(Double.init)
            XCTAssertEqual(r.slotLosses[0], slots[0], accuracy: 1e-4 * abs(slots[0]), "\(f): slot loss")
        }
    }

    /// The order matters: the random-order file's batch read in raster order gives another loss.
    func testTheOrderChangesTheLoss() throws {
        let c = try loadRARFixture("rar_base_order.safetensors")
        XCTAssertNotNil(c.batch.orders)
        var raster = c.batch
        let T = c.model.config.seqLen
        raster.orders = (0..<(raster.batch * T)).map { Int32($0 % T) }  // the identity (rebuilds the inputs)
        let a = c.model.forward(c.batch).loss
        let b = c.model.forward(raster).loss
        XCTAssertGreaterThan(abs(a - b), 1e-3, "random order \(a) vs raster \(b)")
        let r = try loadRARFixture("rar_base_raster.safetensors")
        XCTAssertEqual(b, Double(try r.st.floats("output.loss")[0]), accuracy: 1e-4 * b, "raster file's loss")
    }

    func testEveryGradientMatchesReference() throws {
        for f in rarBaseFixtures {
            let c = try loadRARFixture(f)
            // floor 1e-7: k_norm.bias's gradient is exactly 0 (it shifts a query's scores by a
            // constant), float32 leaves a few 1e-9 of rounding
            let scales = try checkGradientsAgainstFixture(c, f, atolFloor: 1e-7)
            for (name, scale) in scales { XCTAssertGreaterThan(scale, 0, "\(f): \(name) has a gradient") }
        }
    }

    func testGreedySamplingMatchesReference() throws {
        let c = try loadRARFixture("rar_base_raster.safetensors")
        let samples = c.fixture["samples"] as! [String: Any]
        for set in ["sample", "sample_g1", "sample_pc"] {
            let info = samples[set] as! [String: Any]
            let labels = try c.st.ints("\(set).labels")
            var o = SamplingOptions(cfgScale: Float(info["cfg_scale"] as! Double), topK: 1)
            o.cfgSchedule = GuidanceSchedule(rawValue: info["cfg_schedule"] as! String)!
            o.cfgPower = Float(info["cfg_power"] as? Double ?? 0)
            XCTAssertEqual(o.cfgSchedule == .powerCosine, set == "sample_pc", set)
            let s = Sampler(model: c.model).sample(labels: labels, sampleIds: Array(0..<labels.count), options: o)
            XCTAssertEqual(s.tokens, try c.st.ints("\(set).tokens"), "\(set): sampled tokens")
            XCTAssertEqual(s.trajectories, try c.st.ints("\(set).trajectories"), "\(set): trajectories")
        }
    }
}

/// SPEC section 9's presets and parameter table.
final class RARModelTests: XCTestCase {
    func testPresetParameterCounts() throws {
        let want = ["B": 260_923_648, "L": 461_668_352, "XL": 955_425_024, "XXL": 1_498_520_704]
        for (name, count) in want {
            let c = try ModelConfig.preset(name, base: "rar")
            XCTAssertEqual([c.vocabSize, c.numClasses, c.gridSize, c.nHead], [1024, 1000, 16, 16], name)
            XCTAssertEqual(c.ffnHidden, name == "XXL" ? 6144 : 4 * c.dim, name)
            XCTAssertEqual(c.normEps, 1e-6, name)
            XCTAssertNoThrow(try c.validate(), name)
            XCTAssertEqual(ParameterTable(c).total, count, "RAR \(name)")
        }
        let b = ParameterTable(try ModelConfig.preset("B", base: "rar"))
        XCTAssertEqual(b.entry("embeddings.weight")?.shape, [1024 + 1000 + 2, 768])
        XCTAssertEqual(b.entry("pos_embed")?.shape, [1, 256 + 1024, 768])
        XCTAssertEqual(b.entry("timesteps_embeddings")?.shape, [1, 256 + 100, 768])
        XCTAssertEqual(b.entry("blocks.23.attn.q_norm.weight")?.shape, [48])
        XCTAssertEqual(b.entry("adaln_before_head.adaLN_modulation.1.weight")?.shape, [2 * 768, 768])
        let json = try ModelConfig.preset("B", base: "rar").jsonString()
        XCTAssertTrue(json.contains(#""base":"rar""#) && json.contains(#""ffn_hidden":3072"#), json)
        XCTAssertFalse(json.contains("factorized"), json)
    }
}

/// A random tiny RAR model (every tensor random: SPEC's zero adaLN would make the blocks the
/// identity), its training batch, and the checks that need no reference.
final class RARBehaviourTests: XCTestCase {
    /// 9 x 9 grid: 82 trunk slots, so causal attention spans two blocks of query rows.
    static func model(grid: Int = 9, seed: UInt64 = 3) throws -> Transformer {
        var c = try ModelConfig.preset("tiny", base: "rar", vocabSize: 48, numClasses: 3, gridSize: grid)
        c.dim = 32
        c.ffnHidden = 64
        let m = try Transformer(config: c)
        m.initialise(seed: seed)
        var rng = CounterRNG(seed: seed + 100)
        for (i, e) in m.table.entries.enumerated() where m.table.inits[i] == .zeros {
            for j in 0..<e.count { m.params[e.offset + j] = 0.2 * rng.normal() }
        }
        return m
    }

    static func batch(_ c: ModelConfig, samples B: Int, seed: UInt64, orders: Bool = false) -> ModelBatch {
        let T = c.seqLen
        var rng = CounterRNG(seed: seed)
        let tokens = (0..<(B * T)).map { _ in Int32(rng.below(c.vocabSize)) }
        let labels = (0..<B).map { Int32($0 % (c.numClasses + 1)) }
        let tensors = Windows.inputTensors(tokens: tokens, batch: B, seqLen: T, window: 1)
        var order: [Int32]?
        if orders {
            order = (0..<B).flatMap { _ -> [Int32] in
                var pi = (0..<T).map { Int32($0) }
                for i in stride(from: T - 1, to: 0, by: -1) { pi.swapAt(i, rng.below(i + 1)) }
                return pi
            }
        }
        return ModelBatch(batch: B, tokens: tokens, labels: labels, tensors: tensors, orders: order)
    }

    func testTrainingStepAndSamplingAreBitIdenticalAtAnyThreadCount() throws {
        let m0 = try Self.model()
        let b = Self.batch(m0.config, samples: 2, seed: 5, orders: true)
        let T = m0.config.seqLen
        try assertSameAtAnyThreadCount("RAR training step") {
            let m = try Self.model()
            let r = m.forward(
                b, dropout: DropoutSettings(p: 0.1, seed: 2, step: 4, samplePositions: [3, 8]),
                gradientScale: 1 / Float(2 * T))
            m.backward()
            XCTAssertTrue(r.loss.isFinite && r.loss > 0)
            return [Float(r.loss)] + m.grads.array
        }
        let o = SamplingOptions(cfgScale: 2, temperature: 1, topK: 20, topP: 0.9, seed: 7)
        try assertSameAtAnyThreadCount("RAR sampling") {
            let s = Sampler(model: try Self.model()).sample(labels: [0, 2, 1], sampleIds: [4, 5, 6], options: o)
            XCTAssertFalse(s.tokens.contains(-1))
            return s.tokens.map { Float($0) }
        }
    }

    /// Dropout (probabilities, after proj, after GELU, after fc2) is keyed by each sample's global
    /// position: a sample's loss is the same alone or beside another, and dropout changes it.
    func testDropoutIsKeyedBySample() throws {
        let m = try Self.model(grid: 4)
        let c = m.config
        let T = c.seqLen
        let pair = Self.batch(c, samples: 2, seed: 9)
        var lossOf: [Double] = []
        for s in 0..<2 {
            let one = ModelBatch(
                batch: 1, tokens: Array(pair.tokens[(s * T)..<((s + 1) * T)]), labels: [pair.labels[s]],
                tensors: Array(pair.tensors[(s * (T - 1))..<((s + 1) * (T - 1))]))
            let keyed = DropoutSettings(p: 0.3, seed: 4, step: 2, samplePositions: [10 + s])
            lossOf.append(m.forward(one, dropout: keyed).loss)
            XCTAssertNotEqual(lossOf[s], m.forward(one).loss, "dropout changes sample \(s)'s loss")
        }
        let both = m.forward(pair, dropout: DropoutSettings(p: 0.3, seed: 4, step: 2, samplePositions: [10, 11]))
        XCTAssertEqual(both.loss, (lossOf[0] + lossOf[1]) / 2, accuracy: 1e-5 * both.loss)
    }

    /// The activation table is what a training step allocates.
    func testActivationLayoutIsWhatAStepAllocates() throws {
        let m = try Self.model(grid: 4)
        _ = m.grads
        let b = Self.batch(m.config, samples: 2, seed: 4)
        let before = FlatBuffer.liveBytes
        m.forward(b, dropout: DropoutSettings(p: 0.1, seed: 1, step: 0, samplePositions: [0, 1]), gradientScale: 1)
        m.backward()
        XCTAssertEqual(FlatBuffer.liveBytes - before, m.config.trainingActivationBytes(batch: 2, dropout: true))
    }

    /// Backward hands over exactly `gradientReadyOrder` and covers every parameter once.
    func testReadyOrderCoversEveryParameterOnce() throws {
        let m = try Self.model(grid: 4)
        var seen: [Range<Int>] = []
        m.forward(Self.batch(m.config, samples: 1, seed: 2), gradientScale: 1)
        m.backward { seen.append($0) }
        XCTAssertEqual(seen, m.gradientReadyOrder)
        XCTAssertEqual(seen.map(\.count).reduce(0, +), m.table.total)
        XCTAssertEqual(Set(seen.flatMap { Array($0) }).count, m.table.total)
    }
}

/// TensorAR over RAR (SPEC section 9's last paragraph) against the reference's plug-in files.
final class RARPluginFixtureTests: XCTestCase {
    let files = [
        "rar_k1_d1_nores.safetensors", "rar_k1_d1_res.safetensors", "rar_k4_d1_nores_weighted.safetensors",
        "rar_k4_d2_res.safetensors",
    ]

    func testLogitsLossesAndGradientsMatchReference() throws {
        for f in files {
            let c = try loadRARFixture(f)
            let m = c.model
            let cfg = m.config
            XCTAssertTrue(cfg.hasPlugin, f)
            var logits = [Float](repeating: 0, count: c.batch.batch * cfg.seqLen * cfg.window * cfg.vocabSize)
            let r = logits.withUnsafeMutableBufferPointer { m.forward(c.batch, logits: $0.baseAddress!) }
            let (w, i) = worstError(logits, try c.st.floats("output.logits"), rtol: 1e-4, atol: 1e-5)
            XCTAssertLessThanOrEqual(w, 1, "\(f): logits, worst element \(i)")
            let loss = Double(try c.st.floats("output.loss")[0])
            XCTAssertEqual(r.loss, loss, accuracy: 1e-4 * abs(loss), "\(f): loss")
            let slots = try c.st.floats("output.slot_losses").map(Double.init)
            for j in slots.indices {
                XCTAssertEqual(r.slotLosses[j], slots[j], accuracy: 1e-4 * abs(slots[j]), "\(f): slot \(j) loss")
            }
            try checkGradientsAgainstFixture(c, f, atolFloor: 1e-7)
        }
    }

    func testGreedySamplingMatchesReference() throws {
        for f in files {
            let c = try loadRARFixture(f)
            let samples = c.fixture["samples"] as! [String: Any]
            for set in ["sample", "sample_g1", "sample_pc"] {
                let info = samples[set] as! [String: Any]
                let labels = try c.st.ints("\(set).labels")
                var o = SamplingOptions(cfgScale: Float(info["cfg_scale"] as! Double), topK: 1)
                o.cfgSchedule = GuidanceSchedule(rawValue: info["cfg_schedule"] as! String)!
                o.cfgPower = Float(info["cfg_power"] as? Double ?? 0)
                let s = Sampler(model: c.model).sample(labels: labels, sampleIds: Array(0..<labels.count), options: o)
                XCTAssertEqual(s.tokens, try c.st.ints("\(set).tokens"), "\(f) \(set): sampled tokens")
                XCTAssertEqual(s.trajectories, try c.st.ints("\(set).trajectories"), "\(f) \(set): trajectories")
            }
        }
    }
}

extension RARBehaviourTests {
    /// The plug-in's blocks over RAR condition every vector of a short sequence on one c_q (SPEC
    /// section 9), so their modulation (and its gradient, and its adaLN matmul's FLOPs) has one
    /// row a sequence, the trunk's one a slot; the fixtures above check the values.
    func testPluginModulationRunsOncePerSequence() throws {
        var c = try Self.model(grid: 4).config
        c.window = 4
        c.pluginDepth = 2
        let B = 3
        let T = c.seqLen
        let D = c.dim
        for r in ActivationRecompute.allCases {
            let layout = Transformer.activationLayout(c, batch: B, recompute: r)
            let shape = { (name: String) in layout.entries.first { $0.name == name }?.shape }
            if r == .none {
                XCTAssertEqual(shape("encoder.blocks.1.mod"), [B * (T - 1), 6 * D])
                XCTAssertEqual(shape("decoder.blocks.0.mod"), [B * T, 6 * D])
                XCTAssertEqual(shape("trunk.0.mod"), [B * (T + 1), 6 * D])
                XCTAssertEqual(shape("decoder.blocks.cs"), [B * T, D])
            } else {
                // the workspace holds the largest: the trunk's, a row a slot
                XCTAssertEqual(shape("blocks.mod"), [B * (T + 1), 6 * D])
                XCTAssertEqual(shape("decoder.blocks.1.ym"), [B * T * 5, D], "fc2's output kept per block")
            }
        }
        // FLOPs of the decoder's 2 blocks over B T sequences of 5 vectors: the adaLN matmul a sequence
        let adaLN = 2 * Double(D) * 6 * Double(D)
        let attention = Double(B * T * c.nHead) * attentionFLOPs(seqLen: 5, headDim: c.headDim, causal: false)
        let want = 2 * (Double(B * T * 5) * (c.blockLinearFLOPsPerRow - adaLN) + Double(B * T) * adaLN + attention)
        let got = c.stackFLOPs(sequences: B * T, seqLen: 5, layers: 2, causal: false)
        XCTAssertEqual(got, want, accuracy: 1e-12 * want, "the plug-in's adaLN runs once a sequence")
    }

    /// k = 1 with a fresh residual plug-in (proj = 0) is the RAR base bit for bit: logits, loss,
    /// every base gradient and greedy and random samples (SPEC sections 3, 9).
    func testFreshPluginWithWindowOneIsTheBase() throws {
        let base = try Self.model(grid: 4)
        var c = base.config
        c.pluginDepth = 2
        let plug = try Transformer(config: c)
        plug.initialise(seed: 5)
        for e in base.table.entries {
            plug.view(e.name).baseAddress!.update(from: base.view(e.name).baseAddress!, count: e.count)
        }
        let b = Self.batch(base.config, samples: 2, seed: 6)
        let T = c.seqLen
        var la = [Float](repeating: 0, count: 2 * T * c.vocabSize)
        var lb = la
        let ra = la.withUnsafeMutableBufferPointer { base.forward(b, gradientScale: 0.5, logits: $0.baseAddress!) }
        base.backward()
        let rb = lb.withUnsafeMutableBufferPointer { plug.forward(b, gradientScale: 0.5, logits: $0.baseAddress!) }
        plug.backward()
        XCTAssertEqual(la, lb, "logits")
        XCTAssertEqual(ra.loss, rb.loss, "loss")
        let n = base.table.total
        XCTAssertEqual(Array(base.grads.array[0..<n]), Array(plug.grads.array[0..<n]), "base gradients")
        for o in [SamplingOptions(cfgScale: 3, topK: 1), SamplingOptions(cfgScale: 2, topK: 10, seed: 4)] {
            let sa = Sampler(model: base).sample(labels: [1, 3], sampleIds: [0, 1], options: o)
            let sb = Sampler(model: plug).sample(labels: [1, 3], sampleIds: [0, 1], options: o)
            XCTAssertEqual(sa.tokens, sb.tokens, "samples")
        }
    }
}
