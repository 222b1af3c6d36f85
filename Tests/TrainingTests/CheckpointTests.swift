import ARModel
import Foundation
import Kernels
import Platform
import XCTest

@testable import Training

final class CheckpointTests: XCTestCase {
    let model = testModel()
    lazy var table = ParameterTable(model)

    /// Parameters and an optimizer with non-trivial moments after two steps.
    func trainedState(
        seed: UInt64, trainable: PerGroup<Bool> = PerGroup(base: true, plugin: true)
    ) -> (FlatBuffer, AdamW) {
        let params = randomBuffer(table.total, seed: seed)
        let opt = AdamW(table: table, trainable: trainable)
        for k in 0..<2 {
            let lr = PerGroup<Float>(base: trainable.base ? 1e-3 : 0, plugin: trainable.plugin ? 1e-3 : 0)
            opt.step(params: params, grads: randomBuffer(table.total, seed: seed + 10 + UInt64(k)), lr: lr, clip: 1)
        }
        return (params, opt)
    }

    func config(_ run: String, root: String) -> TrainConfig {
        var c = TrainConfig()
        c.checkpoint.dir = root
        c.checkpoint.run = run
        return c
    }

    /// Writes a checkpoint as `worldSize` ranks would, in-process: each rank's writer, then rank 0's commit.
    @discardableResult
    func saveAsRanks(
        _ store: CheckpointStore, step: Int, worldSize: Int, params: FlatBuffer, opt: AdamW?,
        config: TrainConfig, keepLast: Int = 10, keepEvery: Int = 0
    ) throws -> String {
        try store.prepareStaging(step: step)
        for r in 0..<worldSize {
            try store.writeShard(step: step, rank: r, worldSize: worldSize, params: params, optimizer: opt)
        }
        let progress = TrainingProgress(step: step, samplesSeen: step * 64, dataEpoch: 1, dataOffset: 17, seed: 5)
        try store.commit(
            CheckpointManifest(
                progress: progress, worldSize: worldSize, model: model, config: config, table: table, optimizer: opt),
            keepLast: keepLast, keepEvery: keepEvery)
        return store.path(step: step)
    }

    func testSaveOnTwoRanksLoadOnOneAndFour() throws {
        let root = try temporaryFolder(self)
        let cfg = config("run", root: root)
        let store = CheckpointStore(config: cfg)
        let (params, opt) = trainedState(seed: 1)
        let dir = try saveAsRanks(store, step: 20, worldSize: 2, params: params, opt: opt, config: cfg)

        XCTAssertEqual(dir, root + "/run/step-00000020")
        XCTAssertEqual(store.latestName(), "step-00000020")
        let files = try FileManager.default.contentsOfDirectory(atPath: dir).sorted()
        XCTAssertEqual(files, ["manifest.json", "rank-00000-of-00002.h5", "rank-00001-of-00002.h5"])
        let shard = try HDF5File.open(dir + "/rank-00001-of-00002.h5")
        XCTAssertEqual(try shard.intAttribute("param_start"), table.total / 2)
        XCTAssertEqual(try shard.intAttribute("param_end"), table.total)

        // A fresh "rank" of any world size rebuilds the full buffers.
        for _ in [1, 4] {
            let p2 = FlatBuffer(count: table.total)
            let o2 = AdamW(table: table, trainable: PerGroup(base: true, plugin: true))
            let loaded = try CheckpointStore.load(from: dir, model: model, table: table, params: p2, optimizer: o2)
            XCTAssertEqual(p2.array, params.array)
            XCTAssertEqual(o2.m.array, opt.m.array)
            XCTAssertEqual(o2.v.array, opt.v.array)
            XCTAssertEqual(o2.steps, opt.steps)
            XCTAssertEqual(
                loaded.progress, TrainingProgress(step: 20, samplesSeen: 1280, dataEpoch: 1, dataOffset: 17, seed: 5))
            XCTAssertEqual(loaded.manifest.config, cfg)
            XCTAssertEqual(loaded.manifest.worldSize, 2)
            XCTAssertTrue(loaded.notes.isEmpty)
        }
        // Resharding reads: each new rank's slice, for 1, 3 and 4 new ranks, spanning old shards.
        let manifest = try CheckpointStore.readManifest(dir)
        for newWorld in [1, 3, 4] {
            for r in 0..<newWorld {
                let s = CheckpointStore.slice(rank: r, worldSize: newWorld, count: table.total)
                var got = [Float](repeating: .nan, count: s.count)
                try got.withUnsafeMutableBufferPointer {
                    try CheckpointStore.read(.params, range: s, from: dir, manifest: manifest, into: $0.baseAddress!)
                }
                XCTAssertEqual(got, Array(params.array[s]), "new world \(newWorld) rank \(r)")
            }
        }
    }

    func testFrozenGroupMomentsAreNotStoredAndStartAtZeroWhenUnfrozen() throws {
        let root = try temporaryFolder(self)
        let cfg = config("frozen", root: root)
        let store = CheckpointStore(config: cfg)
        let (params, opt) = trainedState(seed: 2, trainable: PerGroup(base: false, plugin: true))
        let dir = try saveAsRanks(store, step: 3, worldSize: 3, params: params, opt: opt, config: cfg)
        let m = try CheckpointStore.readManifest(dir)
        XCTAssertEqual(m.optimizer.base, .init(steps: 0, hasMoments: false))
        XCTAssertEqual(m.optimizer.plugin, .init(steps: 2, hasMoments: true))
        XCTAssertEqual(m.optimizer.momentStart..<m.optimizer.momentEnd, table.range(of: .plugin))
        XCTAssertEqual(m.shards.reduce(0) { $0 + $1.momentEnd - $1.momentStart }, table.count(of: .plugin))

        // Resumed with both groups trained: base moments zero, plugin moments as saved.
        let p2 = FlatBuffer(count: table.total)
        let o2 = AdamW(table: table, trainable: PerGroup(base: true, plugin: true))
        let loaded = try CheckpointStore.load(from: dir, model: model, table: table, params: p2, optimizer: o2)
        XCTAssertEqual(p2.array, params.array)
        XCTAssertEqual(o2.steps, PerGroup(base: 0, plugin: 2))
        let base = table.range(of: .base)
        let plugin = table.range(of: .plugin)
        XCTAssertTrue(base.allSatisfy { o2.m[$0] == 0 && o2.v[$0] == 0 })
        XCTAssertEqual(Array(o2.m.array[plugin]), opt.m.array)
        XCTAssertEqual(Array(o2.v.array[plugin]), opt.v.array)
        XCTAssertEqual(loaded.notes.count, 1)
        XCTAssertTrue(loaded.notes[0].contains("base"))
    }

    func testDamagedCheckpointsAreReportedWithTheFile() throws {
        let root = try temporaryFolder(self)
        let cfg = config("bad", root: root)
        let store = CheckpointStore(config: cfg)
        let (params, opt) = trainedState(seed: 3)
        let fm = FileManager.default
        func load(_ dir: String, model m: ModelConfig? = nil) throws {
            let mm = m ?? model
            let t = ParameterTable(mm)
            _ = try CheckpointStore.load(
                from: dir, model: mm, table: t, params: FlatBuffer(count: t.total),
                optimizer: AdamW(table: t, trainable: PerGroup(base: true, plugin: true)))
        }

        // Missing shard.
        var dir = try saveAsRanks(store, step: 1, worldSize: 2, params: params, opt: opt, config: cfg)
        try fm.removeItem(atPath: dir + "/rank-00001-of-00002.h5")
        assertInputError(["rank-00001-of-00002.h5", "shard missing", "checkpoint is damaged"]) { try load(dir) }

        // Truncated shard.
        dir = try saveAsRanks(store, step: 2, worldSize: 2, params: params, opt: opt, config: cfg)
        let shard = dir + "/rank-00000-of-00002.h5"
        let size = try fm.attributesOfItem(atPath: shard)[.size] as! Int
        try FileHandle(forWritingTo: URL(fileURLWithPath: shard)).truncate(atOffset: UInt64(size / 2))
        assertInputError(["rank-00000-of-00002.h5", "cannot open HDF5 file", "checkpoint is damaged"]) { try load(dir) }

        // Manifest missing, unparseable, or describing another model.
        dir = try saveAsRanks(store, step: 3, worldSize: 2, params: params, opt: opt, config: cfg)
        var other = model
        other.dim = 32
        assertInputError([dir + "/manifest.json", "model shape", "\"dim\":16", "\"dim\":32"]) {
            try load(dir, model: other)
        }
        try "{\"format_version\": 1, \"step\": ".write(
            toFile: dir + "/manifest.json", atomically: false, encoding: .utf8)
        assertInputError([dir + "/manifest.json", "cannot be read"]) { try load(dir) }
        try fm.removeItem(atPath: dir + "/manifest.json")
        assertInputError([dir + "/manifest.json", "missing"]) { try load(dir) }

        // A shard whose slice attributes disagree with the manifest.
        dir = try saveAsRanks(store, step: 4, worldSize: 2, params: params, opt: opt, config: cfg)
        let f = try HDF5File.open(dir + "/rank-00001-of-00002.h5", writable: true)
        try f.setAttribute("param_start", int: 5)
        assertInputError(["rank-00001-of-00002.h5", "param_start is 5"]) { try load(dir) }
    }

    /// Shards carry checksums: bytes flipped in the data leave the file openable (verify passes)
    /// but loading fails naming the shard; resuming refuses, or falls back when allowed.
    func testCorruptedShardDataFailsItsChecksum() throws {
        let root = try temporaryFolder(self)
        let cfg = config("corrupt", root: root)
        let store = CheckpointStore(config: cfg)
        let (params, opt) = trainedState(seed: 8)
        let first = try saveAsRanks(store, step: 1, worldSize: 2, params: params, opt: opt, config: cfg)
        let dir = try saveAsRanks(store, step: 2, worldSize: 2, params: params, opt: opt, config: cfg)
        let shard = dir + "/rank-00000-of-00002.h5"
        try corruptMiddle(of: shard)
        XCTAssertNoThrow(try CheckpointStore.verify(dir))

        func fresh() -> (FlatBuffer, AdamW) {
            (FlatBuffer(count: table.total), AdamW(table: table, trainable: PerGroup(base: true, plugin: true)))
        }
        var (p2, o2) = fresh()
        assertInputError([shard, "reading dataset", "checkpoint is damaged"]) {
            _ = try CheckpointStore.load(from: dir, model: model, table: table, params: p2, optimizer: o2)
        }
        var notes: [String] = []
        assertInputError([shard, "--fallback", "checkpoint.fallback: true"]) {
            _ = try store.loadLatest(
                allowFallback: false, model: model, table: table, params: p2, optimizer: o2, notes: &notes)
        }
        (p2, o2) = fresh()
        let loaded = try store.loadLatest(
            allowFallback: true, model: model, table: table, params: p2, optimizer: o2, notes: &notes)
        XCTAssertEqual(loaded?.directory, first)
        XCTAssertEqual(p2.array, params.array)
        XCTAssertEqual(o2.m.array, opt.m.array)
        XCTAssertEqual(notes.count, 2, "\(notes)")
    }

    func testRetentionKeepsLastAndEveryMth() throws {
        let root = try temporaryFolder(self)
        let cfg = config("keep", root: root)
        let store = CheckpointStore(config: cfg)
        let (params, opt) = trainedState(seed: 4)
        for step in 1...7 {
            try saveAsRanks(
                store, step: step * 10, worldSize: 1, params: params, opt: opt, config: cfg, keepLast: 2, keepEvery: 30)
        }
        XCTAssertEqual(store.completeCheckpoints().map(\.step), [30, 60, 70])
        XCTAssertEqual(store.latestName(), "step-00000070")
    }

    func testFailedSaveLeavesPreviousCheckpointAndLatest() throws {
        let root = try temporaryFolder(self)
        let cfg = config("full", root: root)
        var store = CheckpointStore(config: cfg)
        let (params, opt) = trainedState(seed: 5)
        let good = try store.save(
            progress: TrainingProgress(step: 5, samplesSeen: 320, seed: 0), config: cfg, model: model, table: table,
            params: params, optimizer: opt, communicator: .solo)
        struct DiskFull: Error, CustomStringConvertible { var description: String { "No space left on device" } }
        store.injectShardWriteFailure = { _ in throw DiskFull() }
        assertInputError([
            "rank-00000-of-00001.h5", "No space left on device", "MB free on that disk", "earlier ones are intact",
        ]) {
            try store.save(
                progress: TrainingProgress(step: 6, samplesSeen: 384, seed: 0), config: cfg, model: model, table: table,
                params: params, optimizer: opt, communicator: .solo)
        }
        XCTAssertEqual(
            try FileManager.default.contentsOfDirectory(atPath: store.runDirectory).sorted(),
            ["latest", "step-00000005"])
        XCTAssertEqual(store.latestName(), "step-00000005")
        XCTAssertNoThrow(try CheckpointStore.verify(good))
        var notes: [String] = []
        XCTAssertEqual(try store.resolveLatest(allowFallback: false, notes: &notes), good)
    }

    func testLatestResolutionAndFallback() throws {
        let root = try temporaryFolder(self)
        let cfg = config("latest", root: root)
        let store = CheckpointStore(config: cfg)
        var notes: [String] = []
        XCTAssertNil(try store.resolveLatest(allowFallback: false, notes: &notes))  // a fresh run
        let (params, opt) = trainedState(seed: 6)
        let first = try saveAsRanks(store, step: 100, worldSize: 2, params: params, opt: opt, config: cfg)
        let second = try saveAsRanks(store, step: 200, worldSize: 2, params: params, opt: opt, config: cfg)
        // An interrupted save leaves only a hidden temporary folder: never a candidate.
        try store.prepareStaging(step: 300)
        try store.writeShard(step: 300, rank: 0, worldSize: 2, params: params, optimizer: opt)
        XCTAssertEqual(try store.resolveLatest(allowFallback: false, notes: &notes), second)
        XCTAssertEqual(
            try CheckpointStore.resolve(path: store.runDirectory, allowFallback: false, notes: &notes), second)
        XCTAssertEqual(try CheckpointStore.resolve(path: first, allowFallback: false, notes: &notes), first)

        // The newest is damaged: an error that says how to fall back, or the fallback when allowed.
        try FileManager.default.removeItem(atPath: second + "/rank-00000-of-00002.h5")
        assertInputError([second, "checkpoint.fallback"]) {
            _ = try store.resolveLatest(allowFallback: false, notes: &notes)
        }
        notes = []
        XCTAssertEqual(try store.resolveLatest(allowFallback: true, notes: &notes), first)
        XCTAssertEqual(notes.count, 2)

        // A save after the interrupted one cleans its leftovers.
        try saveAsRanks(store, step: 400, worldSize: 1, params: params, opt: opt, config: cfg)
        XCTAssertFalse(
            try FileManager.default.contentsOfDirectory(atPath: store.runDirectory).contains { $0.hasPrefix(".") })
    }

    func testResavingAnExistingStepReplacesIt() throws {
        let root = try temporaryFolder(self)
        let cfg = config("again", root: root)
        let store = CheckpointStore(config: cfg)
        let (params, opt) = trainedState(seed: 7)
        try saveAsRanks(store, step: 9, worldSize: 2, params: params, opt: opt, config: cfg)
        params[0] = 42
        let dir = try saveAsRanks(store, step: 9, worldSize: 3, params: params, opt: opt, config: cfg)
        let p2 = FlatBuffer(count: table.total)
        let loaded = try CheckpointStore.load(from: dir, model: model, table: table, params: p2, optimizer: nil)
        XCTAssertEqual(loaded.manifest.worldSize, 3)
        XCTAssertEqual(p2[0], 42)
        XCTAssertEqual(
            try FileManager.default.contentsOfDirectory(atPath: store.runDirectory).sorted(),
            ["latest", "step-00000009"])
    }
}
