import XCTest

@testable import ARModel
@testable import Training

/// Gradient buckets packed from the model's ready order (PyTorch DDP style).
final class BucketTests: XCTestCase {
    func testPackedBucketsCoverOnceInBackwardOrder() throws {
        let c = ModelConfig(
            vocabSize: 64, numClasses: 3, gridSize: 4, dim: 32, nLayer: 3, nHead: 2, ffnHidden: 64, window: 3,
            pluginDepth: 1)
        let m = try Transformer(config: c)
        let order = m.gradientReadyOrder
        for size in [1000, 5000, 20000, m.table.total] {
            let buckets = GradientSync.packBuckets(readyOrder: order, size: size)
            XCTAssertTrue(buckets.allSatisfy { $0.count <= size && !$0.isEmpty })
            let sorted = buckets.sorted { $0.lowerBound < $1.lowerBound }
            XCTAssertEqual(sorted.first?.lowerBound, 0)
            XCTAssertEqual(sorted.last?.upperBound, m.table.total)
            XCTAssertTrue(zip(sorted, sorted.dropFirst()).allSatisfy { $0.upperBound == $1.lowerBound })
            // the first bucket holds only head gradients (norm, output): it can go out first
            XCTAssertTrue(
                order[0].contains(buckets[0].lowerBound) && buckets[0].upperBound <= order[0].upperBound, "size \(size)"
            )
            // each bucket is complete once the last ready range touching it is: those ranges are
            // consecutive in the ready order, so buckets complete in their own order
            var last = -1
            for b in buckets {
                let touching = order.indices.filter { order[$0].overlaps(b) }
                XCTAssertGreaterThanOrEqual(touching.max()!, last, "bucket \(b) completes before an earlier one")
                last = touching.max()!
            }
        }
        // the old fixed layout is unchanged
        XCTAssertEqual(GradientSync.packBuckets(readyOrder: [0..<10], size: 10), [0..<10])
    }
}
