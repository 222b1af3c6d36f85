import ARModel
import Foundation
import Kernels
import Platform
import XCTest

@testable import Training

/// `train.ema_decay`: the moving average of the weights, its checkpoint and its uses.
final class EMATests: XCTestCase {
    func trainer(decay: Double?, _ tmp: String, validate: Bool = false) throws -> Trainer {
        if !FileManager.default.fileExists(atPath: tmp + "/cache/dataset.json") { try writeTinyCache(tmp + "/cache") }
        var cfg = tinyTrainConfig(cache: tmp + "/cache", checkpoints: tmp + "/ckpt")
        cfg.train.emaDecay = decay
        if validate { cfg.data.val = tmp + "/cache" }
        return try Trainer(config: cfg, comm: .solo)
    }

    func testOffByDefault() throws {
        XCTAssertNil(TrainConfig().train.emaDecay)
        XCTAssertNil(try trainer(decay: nil, try temporaryFolder(self)).ema)
        var bad = TrainConfig()
        bad.train.emaDecay = 1.5
        assertInputError(["train.ema_decay must be in [0, 1]"]) { try bad.validate(worldSize: 1) }
    }

    func testDecayZeroIsTheWeightsAndDecayOneKeepsTheInitialOnes() throws {
        let tmp = try temporaryFolder(self)
        let zero = try trainer(decay: 0, tmp)
        let one = try trainer(decay: 1, tmp)
        let initial = one.model.params.array
        XCTAssertEqual(one.ema!.array, initial, "the average starts at the initial weights")
        for _ in 0..<3 {
            XCTAssertTrue(try zero.trainStep().applied)
            XCTAssertTrue(try one.trainStep().applied)
        }
        XCTAssertEqual(zero.ema!.array, zero.model.params.array, "decay 0: the weights, bit for bit")
        XCTAssertEqual(one.ema!.array, initial, "decay 1: the initial weights, bit for bit")
        XCTAssertNotEqual(one.model.params.array, initial, "the weights themselves moved")
    }

    func testTheAverageFollowsItsRecursion() throws {
        let t = try trainer(decay: 0.75, try temporaryFolder(self))
        var expected = t.model.params.array
        for _ in 0..<3 {
            XCTAssertTrue(try t.trainStep().applied)
            let p = t.model.params.array
            for i in expected.indices { expected[i] = expected[i] * 0.75 + p[i] * 0.25 }
        }
        XCTAssertEqual(t.ema!.array, expected)
        XCTAssertNotEqual(expected, t.model.params.array)
    }

    /// Saved sharded beside the parameters, restored bit for bit, and after resuming the same
    /// steps give the same average as an uninterrupted run.
    func testResumeRestoresTheAverageBitForBit() throws {
        let tmp = try temporaryFolder(self)
        let a = try trainer(decay: 0.9, tmp)
        for _ in 0..<2 { _ = try a.trainStep() }
        let store = CheckpointStore(config: a.config)
        let m = a.model
        let dir = try store.save(
            progress: a.progress, config: a.config, model: m.config, table: m.table,
            params: m.params, optimizer: a.optimizer, ema: a.ema, communicator: .solo)
        XCTAssertEqual(try CheckpointStore.verify(dir).hasEMA, true)
        let emaAtSave = a.ema!.array
        for _ in 0..<2 { _ = try a.trainStep() }

        let b = try trainer(decay: 0.9, tmp)
        let loaded = try CheckpointStore.load(
            from: dir, model: b.model.config, table: b.model.table,
            params: b.model.params, optimizer: b.optimizer, ema: b.ema)
        b.restore(progress: loaded.progress)
        XCTAssertEqual(b.ema!.array, emaAtSave)
        for _ in 0..<2 { _ = try b.trainStep() }
        XCTAssertEqual(b.ema!.array, a.ema!.array)
        XCTAssertEqual(b.model.params.array, a.model.params.array)
        // the EMA weights as a model (tensorar-eval/-sample/-export --weights-kind ema)
        XCTAssertEqual(try loadModel(from: dir, kind: .ema).params.array, emaAtSave)
        XCTAssertNotEqual(try loadModel(from: dir, kind: .raw).params.array, emaAtSave)
    }

    func testWithoutAnAverageInTheCheckpoint() throws {
        let tmp = try temporaryFolder(self)
        let a = try trainer(decay: nil, tmp)
        _ = try a.trainStep()
        let m = a.model
        let dir = try CheckpointStore(config: a.config).save(
            progress: a.progress, config: a.config, model: m.config,
            table: m.table, params: m.params, optimizer: a.optimizer,
            communicator: .solo)
        XCTAssertNil(try CheckpointStore.readManifest(dir).hasEMA)
        assertInputError(["holds no EMA weights"]) { _ = try loadModel(from: dir, kind: .ema) }
        // turning EMA on at resume: the average starts from the checkpoint's weights (noted)
        let b = try trainer(decay: 0.5, tmp)
        let loaded = try CheckpointStore.load(
            from: dir, model: b.model.config, table: b.model.table,
            params: b.model.params, optimizer: b.optimizer, ema: b.ema)
        XCTAssertEqual(b.ema!.array, a.model.params.array)
        XCTAssertTrue(loaded.notes.contains { $0.contains("no EMA weights") })
    }

    func testValidationOfTheAverageLeavesTheWeights() throws {
        let t = try trainer(decay: 1, try temporaryFolder(self), validate: true)
        for _ in 0..<2 { _ = try t.trainStep() }
        let before = t.model.params.array
        let raw = try t.validate()!
        let ema = try t.validateEMA()!
        XCTAssertEqual(t.model.params.array, before)
        XCTAssertNotEqual(raw.noised.loss, ema.noised.loss)
        // decay 1 keeps the initial weights: their loss is a fresh trainer's
        let fresh = try trainer(decay: nil, try temporaryFolder(self), validate: true)
        XCTAssertEqual(try fresh.validate()!.noised.loss, ema.noised.loss)
    }
}
