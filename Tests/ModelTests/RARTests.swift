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
            let m = c.model
            m.grads.zero()
            let T = m.config.seqLen
            m.forward(c.batch, gradientScale: Float(1 / Double(T * c.batch.batch)))
            m.backward()
            for e in m.table.entries {
                let want = try c.st.floats("grad." + e.name)
                let got = Array(UnsafeBufferPointer(start: m.grads.base + e.offset, count: e.count))
                let scale = want.map { abs($0) }.max() ?? 0
                // floor 1e-7: k_norm.bias's gradient is exactly 0 (it shifts a query's scores by a
                // constant), float32 leaves a few 1e-9 of rounding
                let (w, i) = worstError(got, want, rtol: 1e-4, atol: max(1e-5 * scale, 1e-7))
                XCTAssertLessThanOrEqual(w, 1, "\(f): gradient of \(e.name), worst element \(i): \(got[i]) vs \(want[i])")
                XCTAssertGreaterThan(scale, 0, "\(f): \(e.name) has a gradient")
            }
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
