import ARModel
import Foundation
import Kernels
import Platform
import XCTest

@testable import Training

/// Issue 17: checkpoints that used to be accepted although wrong: a shard from another step,
/// manifest numbers out of range, non-finite parameters (neither loaded nor saved).
final class CheckpointFaultTests: XCTestCase {
    let model = testModel()
    lazy var table = ParameterTable(model)

    func save(
        _ store: CheckpointStore, step: Int, params: FlatBuffer, opt: AdamW,
        config: TrainConfig
    ) throws -> String {
        try store.save(
            progress: TrainingProgress(step: step, samplesSeen: step * 8, dataOffset: step * 8, seed: 0),
            config: config, model: model, table: table, params: params, optimizer: opt, communicator: .solo)
    }

    func setUpRun() throws -> (CheckpointStore, TrainConfig, FlatBuffer, AdamW) {
        var cfg = TrainConfig()
        cfg.checkpoint.dir = try temporaryFolder(self)
        cfg.checkpoint.run = "run"
        let params = randomBuffer(table.total, seed: 3)
        let opt = AdamW(table: table, trainable: PerGroup(base: true, plugin: true))
        return (CheckpointStore(config: cfg), cfg, params, opt)
    }

    func testAShardFromAnotherStepIsRejectedNamingIt() throws {
        let (store, cfg, params, opt) = try setUpRun()
        let four = try save(store, step: 4, params: params, opt: opt, config: cfg)
        let eight = try save(store, step: 8, params: params, opt: opt, config: cfg)
        let shard = eight + "/rank-00000-of-00001.h5"
        try FileManager.default.removeItem(atPath: shard)
        try FileManager.default.copyItem(atPath: four + "/rank-00000-of-00001.h5", toPath: shard)
        assertInputError([shard, "attribute step is 4, the manifest says 8"]) { try CheckpointStore.verify(eight) }
        XCTAssertNoThrow(try CheckpointStore.verify(four), "the step-4 checkpoint is untouched")
    }

    func testManifestNumbersOutOfRangeAreErrorsNamingTheManifest() throws {
        let (store, cfg, params, opt) = try setUpRun()
        let dir = try save(store, step: 4, params: params, opt: opt, config: cfg)
        let path = dir + "/manifest.json"
        let original = try Data(contentsOf: URL(fileURLWithPath: path))
        let cases: [(String, Any, String)] = [
            ("data_offset", -5, "data_offset -5 is negative"),
            ("step", -1, "step -1 is negative"),
            ("world_size", 0, "world_size 0 is outside"),
            ("samples_seen", -3, "samples_seen -3 is negative"),
        ]
        for (key, value, words) in cases {
            var json = try JSONSerialization.jsonObject(with: original) as! [String: Any]
            json[key] = value
            try JSONSerialization.data(withJSONObject: json).write(to: URL(fileURLWithPath: path))
            assertInputError([path, words]) { try CheckpointStore.verify(dir) }
        }
        var json = try JSONSerialization.jsonObject(with: original) as! [String: Any]
        var o = json["optimizer"] as! [String: Any]
        o["moment_end"] = table.total + 10
        json["optimizer"] = o
        try JSONSerialization.data(withJSONObject: json).write(to: URL(fileURLWithPath: path))
        assertInputError([path, "moment range"]) { try CheckpointStore.verify(dir) }
    }

    func testNonFiniteParametersAreNeverSavedNorLoaded() throws {
        let (store, cfg, params, opt) = try setUpRun()
        let good = try save(store, step: 4, params: params, opt: opt, config: cfg)
        // Loading: a NaN written into the shard through HDF5 (checksums still hold).
        let copy = store.runDirectory + "/../nan-copy"
        try FileManager.default.copyItem(atPath: good, toPath: copy)
        let h = try HDF5File.open(copy + "/rank-00000-of-00001.h5", writable: true)
        let e = table.entries[1]
        var nan = Float.nan
        try h.writeRows("params", kind: .float32, start: e.offset + 2, rows: 1, from: &nan)
        let p = FlatBuffer(count: table.total)
        assertInputError([copy, "parameters are not finite", "tensor '\(e.name)' element 2"]) {
            _ = try CheckpointStore.load(from: copy, model: model, table: table, params: p, optimizer: nil)
        }
        // Saving: refused, the earlier checkpoint and `latest` kept.
        params[e.offset + 2] = .infinity
        assertInputError([store.path(step: 8), "not finite", "tensor '\(e.name)'", "earlier checkpoints are kept"]) {
            _ = try save(store, step: 8, params: params, opt: opt, config: cfg)
        }
        XCTAssertEqual(store.latestName(), "step-00000004")
        XCTAssertEqual(store.completeCheckpoints().map(\.step), [4])
        XCTAssertNoThrow(try CheckpointStore.verify(good))
    }
}
