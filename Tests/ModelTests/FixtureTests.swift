import Foundation
import Kernels
import XCTest

@testable import ARModel

/// The model against the independent JAX reference (Tests/Reference): logits, loss, per-slot
/// losses, every parameter's gradient, and greedy guided sampling, for every fixture file.
/// Tolerances: loss and slot losses relative 1e-4 (the float32 bar); logits 1e-4 relative +
/// 1e-5 absolute; gradients 1e-4 relative + 1e-5 of the tensor's largest entry absolute
/// (float32 accumulation over hundreds of terms, against float64).
let fixtureDir = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("Fixtures").path

func fixtureFiles() -> [String] {
    ((try? FileManager.default.contentsOfDirectory(atPath: fixtureDir)) ?? []).filter { $0.hasSuffix(".safetensors") }
        .sorted()
}

func worstError(_ a: [Float], _ e: [Float], rtol: Float, atol: Float) -> (Float, Int) {
    var worst: Float = 0
    var wi = 0
    for i in 0..<min(a.count, e.count) {
        let err = abs(a[i] - e[i]) / (atol + rtol * abs(e[i]))
        if err > worst || a[i].isNaN {
            worst = a[i].isNaN ? .infinity : err
            wi = i
        }
    }
    return (worst, wi)
}

/// 1 / the batch's total slot weight (sum over slots j of w_j * the T - j valid positions, times
/// the samples): the gradient scale of the mean loss that the fixtures' gradients are of.
func meanLossScale(_ m: Transformer, samples: Int) -> Float {
    let T = m.config.seqLen
    let valid = m.slotWeights.enumerated().reduce(0.0) { $0 + Double(max(0, T - $1.offset)) * Double($1.element) }
    return Float(1 / (valid * Double(samples)))
}

/// One forward and backward of the fixture's batch at the mean loss's gradient scale, then every
/// parameter's gradient against the fixture's `grad.*`: rtol 1e-4, atol max(1e-5 x the tensor's
/// largest reference magnitude, `atolFloor`). Returns that magnitude per entry name.
@discardableResult
func checkGradientsAgainstFixture(_ c: FixtureCase, _ f: String, atolFloor: Float) throws -> [String: Float] {
    let m = c.model
    m.grads.zero()
    m.forward(c.batch, gradientScale: meanLossScale(m, samples: c.batch.batch))
    m.backward()
    var scales: [String: Float] = [:]
    for e in m.table.entries {
        let want = try c.st.floats("grad." + e.name)
        let got = Array(UnsafeBufferPointer(start: m.grads.base + e.offset, count: e.count))
        let scale = want.map { abs($0) }.max() ?? 0
        let (w, i) = worstError(got, want, rtol: 1e-4, atol: max(1e-5 * scale, atolFloor))
        XCTAssertLessThanOrEqual(w, 1, "\(f): gradient of \(e.name), worst element \(i): \(got[i]) vs \(want[i])")
        scales[e.name] = scale
    }
    return scales
}

/// One fixture file: its tensors, the model it holds (with its slot weights), the input batch and
/// the `fixture` metadata.
struct FixtureCase {
    let name: String
    let st: Safetensors
    let model: Transformer
    let batch: ModelBatch
    let fixture: [String: Any]
}

func loadFixture(_ path: String) throws -> FixtureCase {
    let st = try Safetensors.read(path)
    let model = try Transformer.load(path, ignoring: ["input.", "output.", "grad.", "adamw.", "sample.", "sample_"])
    let fixture = try JSONSerialization.jsonObject(with: Data(st.metadata["fixture"]!.utf8)) as! [String: Any]
    XCTAssertEqual(fixture["format_version"] as? Int, 1, "fixture format version")
    model.slotWeights = try st.floats("input.slot_weights")
    let tokens = try st.ints("input.tokens")
    let b = st.tensors["input.tokens"]!.shape[0]
    let batch = ModelBatch(
        batch: b, tokens: tokens, labels: try st.ints("input.labels"),
        tensors: try st.ints("input.tensors"))
    return FixtureCase(name: (path as NSString).lastPathComponent, st: st, model: model, batch: batch, fixture: fixture)
}

final class FixtureTests: XCTestCase {
    func load(_ file: String) throws -> FixtureCase { try loadFixture(fixtureDir + "/" + file) }

    func testFixturesExist() {
        XCTAssertGreaterThanOrEqual(
            fixtureFiles().count, 6, "reference fixtures are committed under Tests/ModelTests/Fixtures")
    }

    func testForwardLogitsAndLossesMatchReference() throws {
        for f in fixtureFiles() {
            let c = try load(f)
            let cfg = c.model.config
            var logits = [Float](repeating: 0, count: c.batch.batch * cfg.seqLen * cfg.window * cfg.vocabSize)
            let r = logits.withUnsafeMutableBufferPointer { c.model.forward(c.batch, logits: $0.baseAddress!) }
            let (w, i) = worstError(logits, try c.st.floats("output.logits"), rtol: 1e-4, atol: 1e-5)
            XCTAssertLessThanOrEqual(w, 1, "\(f): logits, worst element \(i)")
            let loss = try c.st.floats("output.loss")[0]
            XCTAssertEqual(r.loss, Double(loss), accuracy: 1e-4 * Double(abs(loss)), "\(f): loss")
            let slots = try c.st.floats("output.slot_losses")
            for j in slots.indices {
                XCTAssertEqual(
                    r.slotLosses[j], Double(slots[j]), accuracy: 1e-4 * Double(abs(slots[j])), "\(f): slot \(j) loss")
            }
        }
    }

    func testEveryGradientMatchesReference() throws {
        for f in fixtureFiles() {
            let c = try load(f)
            try checkGradientsAgainstFixture(c, f, atolFloor: 1e-9)
        }
    }

    func testGreedyGuidedSamplingMatchesReference() throws {
        for f in fixtureFiles() {
            let c = try load(f)
            let sample = c.fixture["sample"] as! [String: Any]
            let labels = try c.st.ints("sample.labels")
            let o = SamplingOptions(cfgScale: Float(sample["cfg_scale"] as! Double), topK: 1)
            let s = Sampler(model: c.model).sample(labels: labels, sampleIds: Array(0..<labels.count), options: o)
            XCTAssertEqual(s.tokens, try c.st.ints("sample.tokens"), "\(f): sampled tokens")
            XCTAssertEqual(s.trajectories, try c.st.ints("sample.trajectories"), "\(f): trajectories")
        }
    }
}
