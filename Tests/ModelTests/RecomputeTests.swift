import Kernels
import Platform
import XCTest

@testable import ARModel

/// `train.recompute: blocks` (activation checkpointing, issue 15): the same loss and the same
/// gradient bits as recompute none, for every base, with the plug-in (k 4, d 2) and without, with
/// dropout on, at 1 and 2 threads; and the activation table is what such a step allocates.
final class RecomputeTests: XCTestCase {
    /// A small model of `base` whose heads and projections are not zero (so every gradient is).
    func model(_ base: String, window: Int, depth: Int) throws -> Transformer {
        try liveSmallModel(
            base, window: window, depth: depth, gridSize: 5, factorizedLayers: 2, initSeed: 11, valueSeed: 111)
    }

    func batch(_ c: ModelConfig) -> ModelBatch {
        noisedPairBatch(c, seed: 12, labels: [2, 3])
    }

    /// Loss sums and every gradient of one step under `recompute` (dropout `p`), and the bytes
    /// allocated meanwhile (the activations, on a model that has not run a step yet).
    func step(_ m: Transformer, _ b: ModelBatch, recompute: ActivationRecompute, p: Float) -> ([Float], Int) {
        m.recompute = recompute
        _ = m.grads
        m.grads.zero()
        let before = FlatBuffer.liveBytes
        let report = m.forward(
            b, dropout: DropoutSettings(p: p, seed: 2, step: 4, samplePositions: [3, 8]), gradientScale: 0.01)
        m.backward()
        let bytes = FlatBuffer.liveBytes - before
        XCTAssertTrue(report.loss.isFinite && report.loss > 0)
        return (report.packed.map { Float($0) } + m.grads.array, bytes)
    }

    func firstDifference(_ a: [Float], _ b: [Float]) -> Int? {
        if a.count != b.count { return -1 }
        return zip(a, b).enumerated().first { $0.element.0.bitPattern != $0.element.1.bitPattern }?.offset
    }

    func testRecomputeGivesTheSameGradientBitsForEveryBaseWithAndWithoutThePlugin() throws {
        let savedThreads = BLAS.threads
        let savedWork = kernelSerialWork
        defer {
            BLAS.threads = savedThreads
            kernelSerialWork = savedWork
        }
        kernelSerialWork = 64  // this small model's kernels split at 2 threads
        for base in BaseRegistry.names {
            for (k, d) in [(1, 0), (4, 2)] {
                let what = "\(base) k \(k) d \(d)"
                let reference = try model(base, window: k, depth: d)
                let b = batch(reference.config)
                BLAS.threads = 1
                let (want, _) = step(reference, b, recompute: .none, p: 0.1)
                let (undropped, _) = step(reference, b, recompute: .none, p: 0)
                XCTAssertNotNil(firstDifference(undropped, want), "\(what): dropout changes the gradients")
                let grads = want.suffix(reference.grads.count)
                for e in reference.table.entries {
                    let slice = grads[(grads.startIndex + e.offset)..<(grads.startIndex + e.offset + e.count)]
                    XCTAssertTrue(slice.contains { $0 != 0 }, "\(what): \(e.name)'s gradient is zero")
                }
                for threads in [1, 2] {
                    BLAS.threads = threads
                    let m = try model(base, window: k, depth: d)
                    let (got, bytes) = step(m, b, recompute: .blocks, p: 0.1)
                    let differ = firstDifference(got, want)
                    XCTAssertNil(differ, "\(what), \(threads) thread(s): recompute differs at \(differ ?? 0)")
                    let layout = m.config.trainingActivationBytes(batch: 2, dropout: true, recompute: .blocks)
                    XCTAssertEqual(bytes, layout, "\(what): the recompute layout is what the step allocates")
                    let (again, _) = step(m, b, recompute: .none, p: 0.1)
                    XCTAssertNil(firstDifference(again, want), "\(what), \(threads) thread(s): back to none")
                    let (twice, _) = step(m, b, recompute: .blocks, p: 0.1)
                    XCTAssertNil(firstDifference(twice, want), "\(what), \(threads) thread(s): blocks again")
                }
            }
        }
    }

    /// The activation table under both settings is what a step allocates, and recompute keeps
    /// less: per block only its input, plus one block's worth.
    func testActivationLayoutIsWhatAStepAllocatesUnderBothSettings() throws {
        for base in BaseRegistry.names {
            var bytes: [ActivationRecompute: Int] = [:]
            for r in ActivationRecompute.allCases {
                let m = try model(base, window: 4, depth: 2)
                let (_, allocated) = step(m, batch(m.config), recompute: r, p: 0.1)
                XCTAssertEqual(
                    allocated, m.config.trainingActivationBytes(batch: 2, dropout: true, recompute: r), "\(base) \(r)")
                bytes[r] = allocated
            }
            XCTAssertLessThan(bytes[.blocks]!, bytes[.none]!, base)
        }
    }

    /// Recompute drops each block's own activations but its input: the difference in the layout is
    /// (L - 1) blocks' worth per stack, counted here by hand for the trunk of a base without plug-in.
    func testRecomputeSavesAllButOneBlockOfEachStackByHand() throws {
        var c = try ModelConfig.preset("tiny", vocabSize: 64, numClasses: 3, gridSize: 5)
        c.nLayer = 4
        let B = 3
        let R = B * c.seqLen
        let D = c.dim
        let F = c.ffnHidden
        let S = c.seqLen
        let perBlock = R * (7 * D + 2 + 3 * F) + B * c.nHead * S * S  // n1 rstd1 qkv probs attY h n2 rstd2 ab g
        let masks = 2 * R * D
        for dropout in [false, true] {
            let none = c.trainingActivationBytes(batch: B, dropout: dropout)
            let blocks = c.trainingActivationBytes(batch: B, dropout: dropout, recompute: .blocks)
            let saved = (c.nLayer - 1) * (perBlock + (dropout ? masks : 0)) * 4
            XCTAssertEqual(none - blocks, saved, "dropout \(dropout)")
        }
    }

    /// The same by hand for the RAR trunk (SPEC section 9 blocks: T + 1 slots, adaLN, QK-norm,
    /// four dropout masks; under blocks each block keeps its fc2 output ym beside its input), and
    /// the saving at 12 layers: under blocks the trunk keeps each block's input and ym and one
    /// block's worth, well under a third of recompute none.
    func testRecomputeSavesAllButOneRARBlockByHand() throws {
        var c = try ModelConfig.preset("tiny", base: "rar", vocabSize: 64, numClasses: 3, gridSize: 5)
        c.nLayer = 4
        let B = 3
        let S = c.seqLen + 1
        let R = B * S
        let D = c.dim
        let F = c.ffnHidden
        let NH = c.nHead
        // n1 stats1 mod m1 qkvRaw qkStats qkv probs attY ya h n2 stats2 m2 a1 g1 ym
        let perBlock = R * (19 * D + 4 + 4 * NH + 2 * F) + B * NH * S * S
        let masks = B * NH * S * S + R * (2 * D + F)  // maskP maskProj maskGelu maskFc2
        let kept = R * D  // ym: every block's own under both settings, so not in the workspace
        for dropout in [false, true] {
            let none = c.trainingActivationBytes(batch: B, dropout: dropout)
            let blocks = c.trainingActivationBytes(batch: B, dropout: dropout, recompute: .blocks)
            let saved = (c.nLayer - 1) * (perBlock - kept + (dropout ? masks : 0)) * 4
            XCTAssertEqual(none - blocks, saved, "dropout \(dropout)")
        }
        c.nLayer = 12
        let none = c.trainingActivationBytes(batch: B, dropout: true)
        let blocks = c.trainingActivationBytes(batch: B, dropout: true, recompute: .blocks)
        XCTAssertLessThan(3 * blocks, none, "RAR 12 layers: blocks \(blocks) bytes, none \(none)")
    }
}
