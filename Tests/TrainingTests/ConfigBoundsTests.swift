import ARModel
import Foundation
import Platform
import XCTest

@testable import Training

/// Issue 17: numbers that parse but make no sense are errors naming the key and the range; a
/// folder given as the config is named; a model too big for memory is refused before allocation.
final class ConfigBoundsTests: XCTestCase {
    func assertRejected(_ setting: String, _ words: [String], line: UInt = #line) {
        assertInputError(["run.yaml"] + words, line: line) {
            let c = try TrainConfig.resolve(yaml: "", source: "run.yaml", overrides: [setting])
            try c.validate(worldSize: 1, source: "run.yaml")
        }
    }

    func testAbsurdNumbersNameTheKeyAndTheRange() throws {
        assertRejected("optim.weight_decay=1e6", ["optim.weight_decay must be in [0.0, 1.0]", "got 1000000.0"])
        assertRejected("optim.lr_plugin=.inf", ["optim.lr_plugin must be in [0.0, 1.0]", "got inf"])
        assertRejected("optim.lr_base=.nan", ["optim.lr_base must be in [0.0, 1.0]", "got nan"])
        assertRejected("optim.clip=.inf", ["optim.clip must be in [0.0, 1000000.0]"])
        assertRejected("optim.final_lr_base=-1", ["optim.final_lr_base must be in [0.0, 1.0]"])
        assertRejected("optim.eps=0", ["optim.eps must be in"])
        assertRejected("train.label_drop=2", ["train.label_drop must be in [0.0, 1.0]"])
        assertRejected("train.seed=-4", ["train.seed must be in [0, 2147483647]"])
        assertRejected("train.max_skipped_steps=-1", ["train.max_skipped_steps must be in [0, 1048576]"])
        assertRejected("model.dim=1000000", ["model.dim must be in [1, 65536]"])
        assertRejected("model.plugin_depth=-2", ["model.plugin_depth must be in [0, 256] (d)"])
        assertRejected("loss.slot_weights=[1, .inf, 1, 1]", ["loss.slot_weights must be numbers in [0, 1000]"])
        assertRejected("dist.bucket_mb=.inf", ["dist.bucket_mb must be in (0, 65536]"])
        assertRejected("dist.threads_per_rank=100000", ["dist.threads_per_rank must be in [1, 4096] or auto"])
        assertRejected("checkpoint.keep_last=0", ["checkpoint.keep_last must be in [1, 1048576]"])
        assertRejected("data.val_samples=0", ["data.val_samples must be in [1, "])
        assertRejected("train.log_every=0", ["train.log_every must be at least 1"])
        assertRejected("train.parallel_micro_batches=0", ["train.parallel_micro_batches must be in [1, 256]"])
        assertInputError(["run.yaml", "train.parallel_micro_batches 2 needs dist.shard_optimizer none or states"]) {
            let c = try TrainConfig.resolve(
                yaml: "", source: "run.yaml",
                overrides: ["train.parallel_micro_batches=2", "dist.shard_optimizer=states+grads"])
            try c.validate(worldSize: 1, source: "run.yaml")
        }
        // The defaults pass.
        XCTAssertNoThrow(try TrainConfig().validate(worldSize: 1))
    }

    func testAFolderGivenAsTheConfigIsNamed() throws {
        let folder = try temporaryFolder(self)
        assertInputError([folder, "is a folder, not a config file"]) { _ = try TrainConfig.load(file: folder) }
    }

    func testAModelTooBigForMemoryIsRefusedBeforeAllocatingAndSaysWhatFits() throws {
        var huge = testModel()
        huge.dim = 65536
        huge.nLayer = 48
        huge.ffnHidden = 4 * 65536
        var tc = TrainConfig()
        tc.train.microBatch = 4
        tc.train.globalBatch = 4
        tc.train.dropout = 0
        assertInputError([
            "config", "the model needs about", "per rank", "Even the weights do not fit",
            "parameters or less would",
        ]) {
            try MemoryCheck.check(
                huge, config: tc, ranks: 1, ranksOnNode: 1, source: "config",
                available: .init(node: 64_000_000_000, nodeSource: "MemAvailable"))
        }
        // Weights fit, activations do not: a smaller micro-batch is suggested, and it does fit;
        // so does recompute, at the configured micro-batch, when its estimate fits.
        let m = testModel(dim: 256, ffn: 1024, layers: 4, vocab: 512)
        tc.train.dropout = 0.1
        tc.train.globalBatch = 64
        tc.train.microBatch = 16
        let budget = Trainer.MemoryBreakdown.estimate(m, config: tc, ranks: 1).total
        let available = MemoryCheck.Available(node: 2 * budget, nodeSource: "MemAvailable")
        tc.train.microBatch = 64
        assertInputError(["config", "for 2 rank(s)", "train.micro_batch 16 or less would fit"]) {
            try MemoryCheck.check(m, config: tc, ranks: 1, ranksOnNode: 2, source: "config", available: available)
        }
        tc.train.microBatch = 16
        XCTAssertNoThrow(
            try MemoryCheck.check(m, config: tc, ranks: 1, ranksOnNode: 2, source: "config", available: available))
        tc.train.microBatch = 17
        var blocks = tc
        blocks.train.recompute = .blocks
        let withRecompute = Trainer.MemoryBreakdown.estimate(m, config: blocks, ranks: 1).total
        XCTAssertLessThan(withRecompute, budget, "recompute at micro-batch 17 keeps less than none at 16")
        assertInputError(["train.micro_batch 16 or less would fit", "train.recompute: blocks would fit"]) {
            try MemoryCheck.check(m, config: tc, ranks: 1, ranksOnNode: 2, source: "config", available: available)
        }
        XCTAssertNoThrow(
            try MemoryCheck.check(m, config: blocks, ranks: 1, ranksOnNode: 2, source: "config", available: available))
        tc.train.microBatch = 64
        assertInputError(["ulimit -v"]) {
            try MemoryCheck.check(
                m, config: tc, ranks: 1, ranksOnNode: 1, source: "config", available: .init(node: nil, process: budget))
        }
    }
}
