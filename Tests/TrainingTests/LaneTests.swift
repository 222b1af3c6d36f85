import ARModel
import Foundation
import Kernels
import Platform
import XCTest

@testable import Training

/// `train.parallel_micro_batches`: a rank's micro-batches run side by side, each lane with its own
/// activations and gradients, summed in a fixed order (`Trainer.accumulateInLanes`).
final class LaneTests: XCTestCase {
    /// The step's loss sums and gradients with L lanes (6 micro-batches of 2): the same bits on 1, 2
    /// and 3 threads (the lanes run one after another on 1, side by side on more); the loss sums are
    /// those of one micro-batch at a time, bit for bit, and the gradients the same sum in another
    /// order (within 1e-6 of the largest element). A lane whose gradient were left out, or a
    /// micro-batch run twice, would be off by about 1/6 of the gradient (checked: 0.66). LlamaGen
    /// with the plug-in, RAR with the plug-in, and RAR without it in per-sample random orders.
    func testSideBySideMicroBatchesDependOnTheLaneCountNotOnTheThreads() throws {
        let tmp = try temporaryFolder(self)
        try writeTinyCache(tmp + "/cache")
        let llamagen = tinyTrainConfig(cache: tmp + "/cache", checkpoints: tmp + "/ckpt")
        var rar = llamagen
        rar.model.base = "rar"
        var ordered = rar
        ordered.model.window = 1
        ordered.model.pluginDepth = 0
        ordered.train.randomOrder = RandomOrder(start: 0, end: 10)
        for (name, cfg) in [("llamagen", llamagen), ("rar", rar), ("rar, random orders", ordered)] {
            try checkLanes(cfg, name)
        }
    }

    private func checkLanes(_ cfg: TrainConfig, _ name: String) throws {
        let savedThreads = BLAS.threads
        defer { BLAS.threads = savedThreads }
        BLAS.threads = 1
        let plain = try Trainer(config: cfg, comm: .solo)
        XCTAssertEqual(plain.lanes.count, 1)
        let batch = try plain.loader.next()
        let want = try plain.accumulateGradients(batch, sync: nil)
        let wantGrads = plain.model.grads.array
        XCTAssertGreaterThan(wantGrads.map { abs($0) }.max()!, 0, name)
        for lanes in [2, 3] {
            var c = cfg
            c.train.parallelMicroBatches = lanes
            let trainer = try Trainer(config: c, comm: .solo)
            XCTAssertEqual(trainer.lanes.count, lanes)
            var first: [Float]?
            for threads in [1, 2, 3] {
                BLAS.threads = threads
                let jobs = ComputePool.shared.parallelJobs
                let got = try trainer.accumulateGradients(batch, sync: nil)
                let what = "\(name), \(lanes) lanes, \(threads) threads"
                if threads > 1 { XCTAssertGreaterThan(ComputePool.shared.parallelJobs, jobs, "\(what): one job") }
                XCTAssertEqual(got.packed, want.packed, "\(what): loss sums")
                let grads = trainer.model.grads.array
                if let first {
                    let differ = grads.indices.first { grads[$0].bitPattern != first[$0].bitPattern }
                    XCTAssertNil(differ, "\(what): differs from 1 thread at \(differ ?? -1)")
                } else {
                    first = grads
                }
                XCTAssertLessThan(relativeMaxDifference(grads, wantGrads), 1e-6, "\(what): gradient vs one at a time")
            }
            BLAS.threads = 1
        }
    }

    /// The memory estimate counts each lane: the first step allocates lanes x one model's
    /// activations, and the gradients are one buffer per lane. Lanes never exceed the micro-batches.
    func testMemoryEstimateCountsEachLane() throws {
        let tmp = try temporaryFolder(self)
        try writeTinyCache(tmp + "/cache", samples: 24)
        var cfg = tinyTrainConfig(cache: tmp + "/cache", checkpoints: tmp + "/ckpt", globalBatch: 6, microBatch: 2)
        cfg.train.parallelMicroBatches = 1
        let one = try Trainer(config: cfg, comm: .solo).memory
        cfg.train.parallelMicroBatches = 2
        let trainer = try Trainer(config: cfg, comm: .solo)
        let m = trainer.memory
        XCTAssertEqual(m.activations, 2 * one.activations)
        XCTAssertEqual(m.gradients, 2 * trainer.model.table.total * 4)
        _ = try trainer.trainStep()
        XCTAssertEqual(trainer.activationBytesMeasured, m.activations)
        cfg.train.parallelMicroBatches = 5
        XCTAssertEqual(try Trainer(config: cfg, comm: .solo).lanes.count, 3, "6 samples / micro-batch 2 = 3")
    }
}
