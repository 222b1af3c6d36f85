import ARModel
import Foundation
import Kernels
import Platform
import XCTest

@testable import Training

/// ZeRO's parameter gather as the trainer sets it up (one process; the gather itself across real
/// ranks is in MPITests, the whole program overlapped against blocking in ShardedOptimizerTests).
final class ParameterGatherTests: XCTestCase {
    /// The forward's waits (`parameterNeededOrder`, see ParametersNeededTests) meet the gather's
    /// buckets in gathering order: the last bucket each range needs never goes down, the first
    /// range needs bucket 0's, the head the last bucket, and every bucket is needed by some range
    /// (so the first forward after a step leaves nothing in flight). For every base, many buckets.
    func testForwardWaitsFollowTheGatherBucketOrder() throws {
        let tmp = try temporaryFolder(self)
        try writeTinyCache(tmp + "/cache", samples: 24)
        for base in BaseRegistry.names {
            var cfg = tinyTrainConfig(cache: tmp + "/cache", checkpoints: tmp + "/ckpt")
            cfg.model.base = base
            if base == "open-magvit2" { cfg.model.factorizedNLayer = 1 }
            cfg.dist.shardOptimizer = .states
            let trainer = try Trainer(config: cfg, comm: .solo)
            let gather = try XCTUnwrap(trainer.gather)
            XCTAssertEqual(gather.mode, .blocking, "one rank: nothing to overlap")
            XCTAssertEqual(gather.buckets, trainer.sync.buckets.reversed())
            XCTAssertGreaterThan(gather.buckets.count, 10, base)
            let last = trainer.model.parameterNeededOrder.map { gather.lastBucket(meeting: $0) }
            XCTAssertEqual(last, last.sorted(), "\(base): waits in bucket order: \(last)")
            XCTAssertEqual(last.last, gather.buckets.count - 1, base)
            var needed = Set<Int>()
            for range in trainer.model.parameterNeededOrder {
                for (b, bucket) in gather.buckets.enumerated() where bucket.overlaps(range) { needed.insert(b) }
            }
            XCTAssertEqual(needed, Set(gather.buckets.indices), "\(base): every bucket is read by the forward")
            let firstRange = trainer.model.parameterNeededOrder[0]
            XCTAssertTrue(gather.buckets[0].overlaps(firstRange), "\(base): the first bucket is the embeddings'")
        }
    }

    /// One rank, sharded: a step leaves nothing in flight, and `finishParameterGather` is a no-op;
    /// the EMA follows the blocking gather as it does replicated.
    func testOneRankShardedStepMatchesReplicatedWithEMA() throws {
        let tmp = try temporaryFolder(self)
        try writeTinyCache(tmp + "/cache", samples: 24)
        var cfg = tinyTrainConfig(cache: tmp + "/cache", checkpoints: tmp + "/ckpt")
        cfg.train.emaDecay = 0.9
        let replicated = try Trainer(config: cfg, comm: .solo)
        cfg.dist.shardOptimizer = .states
        let sharded = try Trainer(config: cfg, comm: .solo)
        for _ in 0..<2 {
            XCTAssertTrue(try replicated.trainStep().applied)
            XCTAssertTrue(try sharded.trainStep().applied)
            XCTAssertEqual(sharded.gather?.isInFlight, false)
        }
        try sharded.finishParameterGather()
        XCTAssertEqual(sharded.model.params.array, replicated.model.params.array)
        XCTAssertEqual(sharded.ema!.array, replicated.ema!.array)
        XCTAssertNotEqual(sharded.ema!.array, sharded.model.params.array)
    }
}
