import Foundation
import Platform
import XCTest

@testable import TokenData

/// The training stream: independent of the number of ranks, each sample once per epoch,
/// reproducible from a position, the same with and without prefetch.
final class LoaderTests: XCTestCase {
    static let n = 60, g = 24  // N not a multiple of G: batches 2 and 4 straddle epochs
    private var cache: TokenCache!

    override func setUpWithError() throws {
        cache = try TokenCache(
            directory: makeCache(temporaryFolder(self), n: LoaderTests.n, augmentations: 3, shardSize: 7))
    }

    private func loader(
        rank: Int = 0, world: Int = 1, seed: UInt64 = 42, prefetch: Int = 0, shuffle: Bool = true,
        augment: Bool = true
    ) throws -> TokenLoader {
        try TokenLoader(
            cache: cache, globalBatch: LoaderTests.g, rank: rank, worldSize: world, seed: seed,
            shuffle: shuffle, augment: augment, prefetch: prefetch)
    }

    private func batches(_ l: TokenLoader, _ count: Int) throws -> [TokenBatch] {
        try (0..<count).map { _ in try l.next() }
    }

    private func assertSame(_ a: TokenBatch, _ b: TokenBatch, _ what: String, line: UInt = #line) {
        XCTAssertEqual(a.sampleIndices, b.sampleIndices, what, line: line)
        XCTAssertEqual(a.globalPositions, b.globalPositions, what, line: line)
        XCTAssertEqual(a.codes, b.codes, what, line: line)
        XCTAssertEqual(a.labels, b.labels, what, line: line)
        XCTAssertEqual(a.step, b.step, what, line: line)
        XCTAssertEqual(a.epoch, b.epoch, what, line: line)
    }

    func testIndependentOfWorldSizeAndEachSampleOncePerEpoch() throws {
        let steps = 5  // 120 stream positions = exactly 2 epochs of 60
        let reference = try batches(loader(), steps)
        for world in [1, 2, 3, 8] {
            let ranks = try (0..<world).map { try loader(rank: $0, world: world) }
            var seen = [[Int]](repeating: [], count: 2)  // per epoch, over all ranks
            for step in 0..<steps {
                let parts = try ranks.map { try $0.next() }
                XCTAssertTrue(parts.allSatisfy { $0.count == LoaderTests.g / world })
                let joined = TokenBatch(
                    codes: parts.flatMap(\.codes), labels: parts.flatMap(\.labels),
                    sampleIndices: parts.flatMap(\.sampleIndices), globalPositions: parts.flatMap(\.globalPositions),
                    step: parts[0].step, epoch: parts[0].epoch)
                assertSame(joined, reference[step], "W = \(world), step \(step)")
                for part in parts {
                    for (p, i) in zip(part.globalPositions, part.sampleIndices) {
                        seen[(step * LoaderTests.g + p) / LoaderTests.n].append(i)
                    }
                }
            }
            XCTAssertEqual(seen[0].sorted(), Array(0..<LoaderTests.n), "W = \(world), epoch 0")
            XCTAssertEqual(seen[1].sorted(), Array(0..<LoaderTests.n), "W = \(world), epoch 1")
            XCTAssertNotEqual(seen[0], seen[1], "each epoch has its own order")
            XCTAssertEqual(ranks[0].position, steps * LoaderTests.g)
        }
        XCTAssertEqual(reference.map(\.step), [0, 1, 2, 3, 4])
        XCTAssertEqual(reference.map(\.epoch), [0, 0, 0, 1, 1])
    }

    /// Codes are those of the sample under its keyed augmentation; augmentations vary.
    func testAugmentationsAreKeyedAndUsed() throws {
        let l = try loader()
        var used = Set<Int>()
        for b in try batches(l, 5) {
            for (k, i) in b.sampleIndices.enumerated() {
                let e = (b.step * LoaderTests.g + b.globalPositions[k]) / LoaderTests.n
                var rng = CounterRNG(seed: 42, UInt64(e), UInt64(i), RandomPurpose.augmentation.rawValue)
                let a = rng.below(3)
                used.insert(a)
                XCTAssertEqual(
                    Array(b.codes[(k * 4)..<((k + 1) * 4)]), (0..<4).map { syntheticCode(i, a, $0, vocab: 16) })
                XCTAssertEqual(b.labels[k], syntheticLabel(i, classes: 5))
            }
        }
        XCTAssertEqual(used, [0, 1, 2])
        for b in try batches(loader(augment: false), 3) {
            for (k, i) in b.sampleIndices.enumerated() {
                XCTAssertEqual(
                    Array(b.codes[(k * 4)..<((k + 1) * 4)]), (0..<4).map { syntheticCode(i, 0, $0, vocab: 16) })
            }
        }
    }

    func testNoShuffleIsStreamOrder() throws {
        let b = try batches(loader(shuffle: false), 3)
        XCTAssertEqual(b[0].sampleIndices, Array(0..<24))
        XCTAssertEqual(b[2].sampleIndices, Array(48..<60) + Array(0..<12))
        XCTAssertEqual(b[2].epoch, 0)
    }

    func testPermutationIsFisherYatesFromKeyedRNG() {
        let p = shufflePermutation(n: 10, seed: 7, epoch: 3)
        var expect = Array(0..<10)
        var rng = CounterRNG(seed: 7, 3, RandomPurpose.shuffle.rawValue)
        for i in stride(from: 9, to: 0, by: -1) { expect.swapAt(i, rng.below(i + 1)) }
        XCTAssertEqual(p.map(Int.init), expect)
        XCTAssertNotEqual(shufflePermutation(n: 10, seed: 7, epoch: 4), p)
    }

    func testRestoreReproducesTheFollowingBatches() throws {
        let run = try batches(loader(), 7)
        for prefetch in [0, 2] {
            let fresh = try loader(prefetch: prefetch)
            fresh.restore(position: 3 * LoaderTests.g)
            for (k, b) in try batches(fresh, 4).enumerated() {
                assertSame(b, run[3 + k], "fresh loader, prefetch \(prefetch)")
            }
            // Restoring a loader in mid-stream, backwards and forwards, drops what it read ahead.
            let used = try loader(prefetch: prefetch)
            _ = try batches(used, 2)
            used.restore(position: 5 * LoaderTests.g)
            assertSame(try used.next(), run[5], "forwards, prefetch \(prefetch)")
            used.restore(position: LoaderTests.g)
            for k in 1..<4 { assertSame(try used.next(), run[k], "backwards, prefetch \(prefetch)") }
            XCTAssertEqual(used.position, 4 * LoaderTests.g)
        }
        // A rank of a larger world restores the same way.
        let r1 = try loader(rank: 1, world: 3)
        r1.restore(position: 4 * LoaderTests.g)
        XCTAssertEqual(try r1.next().sampleIndices, Array(run[4].sampleIndices[8..<16]))
    }

    func testPrefetchGivesTheSameBatches() throws {
        let sync = try batches(loader(rank: 1, world: 2, prefetch: 0), 7)
        for prefetch in [1, 2, 5] {
            let ahead = try batches(loader(rank: 1, world: 2, prefetch: prefetch), 7)
            for k in 0..<7 { assertSame(ahead[k], sync[k], "prefetch \(prefetch), batch \(k)") }
        }
    }

    func testBatchLargerThanDataset() throws {
        let l = try TokenLoader(cache: cache, globalBatch: 150, rank: 0, worldSize: 1, seed: 1, prefetch: 0)
        let b = try l.next()
        XCTAssertEqual(b.count, 150)
        XCTAssertEqual(Array(b.sampleIndices[0..<60]).sorted(), Array(0..<60))
        XCTAssertEqual(Array(b.sampleIndices[60..<120]).sorted(), Array(0..<60))
    }

    func testBadLoaderArguments() {
        assertInputError(
            { _ = try self.loader(world: 5) }, file: cache.directory,
            contains: ["global batch 24 is not divisible by the number of ranks 5"])
        assertInputError(
            { _ = try self.loader(rank: 2, world: 2) }, file: cache.directory, contains: ["rank 2 is not in 0..<2"])
    }

    func testReadErrorSurfacesThroughPrefetch() throws {
        let dir = try makeCache(temporaryFolder(self), n: 10, shardSize: 4)
        var bad: [Int32] = [9, 9, 9, 9]
        try bad.withUnsafeMutableBytes {
            try HDF5File.open(path(dir, "shard-00001.h5"), writable: true).writeRows(
                "labels", kind: .int32, start: 0, rows: 4, from: $0.baseAddress!)
        }
        let l = try TokenLoader(
            cache: TokenCache(directory: dir), globalBatch: 10, rank: 0, worldSize: 1, seed: 1, prefetch: 2)
        assertInputError({ _ = try l.next() }, file: "shard-00001.h5", contains: ["label 9"])
        XCTAssertEqual(l.position, 0)
    }

    func testValidationSplit() throws {
        for world in [1, 3, 7] {
            let parts = (0..<world).map { validationShard(cache: cache, limit: 50, rank: $0, worldSize: world) }
            XCTAssertEqual(parts.flatMap { Array($0) }, Array(0..<50), "W = \(world)")
            XCTAssertLessThanOrEqual(parts.map(\.count).max()! - parts.map(\.count).min()!, 1)
        }
        XCTAssertEqual(validationShard(cache: cache, limit: nil, rank: 0, worldSize: 1), 0..<60)
        XCTAssertEqual(validationShard(cache: cache, limit: 1000, rank: 1, worldSize: 2), 30..<60)
        var seen: [Int] = []
        try forEachValidationBatch(cache: cache, range: 5..<22, batchSize: 8) { b in
            XCTAssertLessThanOrEqual(b.count, 8)
            for (k, i) in b.sampleIndices.enumerated() {
                XCTAssertEqual(
                    Array(b.codes[(k * 4)..<((k + 1) * 4)]), (0..<4).map { syntheticCode(i, 0, $0, vocab: 16) })
            }
            seen += b.sampleIndices
        }
        XCTAssertEqual(seen, Array(5..<22))
    }
}
