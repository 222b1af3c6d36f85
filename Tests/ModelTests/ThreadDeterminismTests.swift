import Kernels
import Platform
import XCTest

@testable import ARModel

/// A training step (loss and every gradient) and sampling (tokens, trajectories and logits) give
/// the same bits on 1, 2 and 3 threads. The kernels' work threshold is lowered so that this small
/// model's kernels are all split; the image is 9 x 9 so that causal attention spans two blocks.
final class ThreadDeterminismTests: XCTestCase {
    let config = ModelConfig(
        vocabSize: 48, numClasses: 3, gridSize: 9, dim: 32, nLayer: 2, nHead: 2, ffnHidden: 64,
        window: 3, pluginDepth: 1)

    func model() throws -> Transformer {
        let m = try Transformer(config: config)
        m.initialise(seed: 3)
        var rng = CounterRNG(seed: 103)
        for e in m.table.entries where e.name.hasSuffix("proj.weight") || e.name == "output.weight" {
            for i in 0..<e.count { m.params[e.offset + i] = 0.3 * rng.normal() }
        }
        return m
    }

    func sameAtAnyThreadCount(_ what: String, _ body: () throws -> [Float]) rethrows {
        try assertSameAtAnyThreadCount(what, body)
    }
}

/// body's floats at 1 thread, then at 2 and 3, compared bit for bit (the kernels' work threshold
/// lowered so that small shapes are split).
func assertSameAtAnyThreadCount(_ what: String, _ body: () throws -> [Float]) rethrows {
    let savedThreads = BLAS.threads
    let savedWork = kernelSerialWork
    defer {
        BLAS.threads = savedThreads
        kernelSerialWork = savedWork
    }
    kernelSerialWork = 64
    BLAS.threads = 1
    let want = try body()
    XCTAssertFalse(want.isEmpty)
    for threads in [2, 3] {
        BLAS.threads = threads
        let jobs = ComputePool.shared.parallelJobs
        let got = try body()
        XCTAssertGreaterThan(ComputePool.shared.parallelJobs, jobs + 50, "\(what): too few jobs were split")
        XCTAssertEqual(got.count, want.count, what)
        let differ = zip(got, want).enumerated().first { $0.element.0.bitPattern != $0.element.1.bitPattern }
        XCTAssertNil(differ, "\(what): \(threads) threads differ from 1 at element \(differ?.offset ?? -1)")
    }
}

extension ThreadDeterminismTests {
    func testTrainingStepIsBitIdenticalAtAnyThreadCount() throws {
        let B = 2
        let T = config.seqLen
        var rng = CounterRNG(seed: 5)
        let tokens = (0..<(B * T)).map { _ in Int32(rng.below(config.vocabSize)) }
        var tensors = Windows.inputTensors(tokens: tokens, batch: B, seqLen: T, window: config.window)
        let noiser = TensorNoiser(type: .replace, schedule: .sine, window: config.window, vocabSize: config.vocabSize)
        _ = noiser.apply(&tensors, batch: B, seqLen: T, seed: 1, step: 4, samplePositions: [3, 8])
        let batch = ModelBatch(batch: B, tokens: tokens, labels: [2, 3], tensors: tensors)
        try sameAtAnyThreadCount("training step") {
            let m = try model()
            let report = m.forward(
                batch, dropout: DropoutSettings(p: 0.1, seed: 2, step: 4, samplePositions: [3, 8]),
                gradientScale: 1 / Float(B * T))
            m.backward()
            XCTAssertTrue(report.loss.isFinite && report.loss > 0)
            return report.packed.map { Float($0) } + [Float(report.loss)] + m.grads.array
        }
    }

    func testSamplingIsBitIdenticalAtAnyThreadCount() throws {
        let labels: [Int32] = [0, 2, 1]
        // top-k and top-p choose through the sorted path; neither (every base's published setting)
        // through the bucket path (`TokenChooser.inverseCDFByBuckets`)
        let settings = [
            ("top-k 20, top-p 0.9", SamplingOptions(cfgScale: 2, temperature: 1, topK: 20, topP: 0.9, seed: 7)),
            ("no top-k or top-p", SamplingOptions(cfgScale: 2, temperature: 1, topK: 0, topP: 1, seed: 7)),
        ]
        for (name, options) in settings {
            var batched: SampleResult?
            try sameAtAnyThreadCount("sampling tokens, \(name)") {
                let s = Sampler(model: try model()).sample(labels: labels, sampleIds: [4, 5, 6], options: options)
                XCTAssertFalse(s.tokens.contains(-1))
                batched = s
                return (s.tokens + s.trajectories).map { Float($0) }
            }
            // an image's tokens do not depend on the batch it is sampled in
            let alone = Sampler(model: try model()).sample(labels: [2], sampleIds: [5], options: options)
            let T = config.seqLen
            XCTAssertEqual(alone.tokens, Array(batched!.tokens[T..<(2 * T)]), "\(name): image 5 alone and in a batch")
        }
        try sameAtAnyThreadCount("sampling logits") {
            let m = try model()
            let s = Sampler(model: m)
            let n = labels.count
            let k = config.window
            let V = config.vocabSize
            s.prepare(n: n, NB: 2 * n)
            var logits = [Float](repeating: 0, count: 2 * n * k * V)
            var all: [Float] = []
            var inputs: [Int32] = []
            for pos in 0..<config.seqLen {
                let h = s.slotStates(position: pos, labels: labels, inputs: inputs)
                logits.withUnsafeMutableBufferPointer {
                    m.base.headLogits($0.baseAddress!, h, rows: 2 * n * k, part: 0, chosen: [], params: m.params.base)
                }
                all += logits
                inputs = (0..<(n * k)).map { Int32(($0 * 7 + pos) % V) }  // fixed tensors fed back
            }
            return all
        }
    }
}
