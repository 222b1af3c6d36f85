import Kernels
import Platform
import XCTest

@testable import Training

/// ZeRO-2 hands the gradient buffer's pages back bucket by bucket (`FlatBuffer(pages:)`, 2 MB
/// transparent huge pages where the kernel allows them): released ranges read as zeros, nothing
/// else changes, and after a whole backward no page of the buffer is left resident.
final class PageReleaseTests: XCTestCase {
    private func resident(_ b: FlatBuffer) -> Int {
        Pages.residentBytes(UnsafeRawPointer(b.base), bytes: b.count * 4) ?? -1
    }

    func testReleaseZeroesTheRangeAndGivesBackItsWholeGranules() throws {
        let probe = FlatBuffer(pages: 1 << 20)  // 4 MB: holds a huge page if the kernel has them
        let granule = probe.releaseGranule
        XCTAssertEqual(granule * 4 % Pages.size, 0, "granule \(granule) floats is not whole pages")
        XCTAssertEqual(Int(bitPattern: probe.base) % (granule * 4), 0, "buffer not aligned to its granule")
        let b = FlatBuffer(pages: 3 * granule + 1000)
        XCTAssertEqual(b.releaseGranule, granule)
        XCTAssertEqual(resident(b), 0, "fresh pages are not resident")
        for i in 0..<b.count { b[i] = 1 }
        XCTAssertGreaterThanOrEqual(resident(b), b.count * 4)
        b.release(100..<(2 * granule + 7))
        let mapped = (b.count * 4 + Pages.size - 1) / Pages.size * Pages.size
        XCTAssertEqual(resident(b), mapped - granule * 4, "exactly the one whole granule inside went back")
        b.release((2 * granule + 7)..<b.count)  // to the end: the partial last granule goes too
        XCTAssertEqual(resident(b), 2 * granule * 4, "[0, g) and [2g, 3g) were written (zeros), the rest went back")
        // read only now: reading a released page maps the zero page, which mincore counts
        for i in 0..<b.count where b[i] != (i < 100 ? 1 : 0) {
            return XCTFail("element \(i) is \(b[i]) after releasing from 100 on")
        }
        b.zero()
        XCTAssertEqual(resident(b), 0)
        XCTAssertFalse((0..<b.count).contains { b[$0] != 0 })
    }

    /// Buckets that start and end inside granules, reduced as backward completes them (blocking
    /// ZeRO-2 on one rank): the values not yet reduced are never touched, each bucket's sum lands
    /// in the owned gradients, and at the end no page of the full gradient buffer is resident.
    func testZeRO2BackwardLeavesNoGradientPageResident() throws {
        // huge pages (where the kernel has them) and 4 KB pages; buckets larger than a granule,
        // and buckets of a tenth of one (several share a granule)
        for huge in [true, false] {
            let g = FlatBuffer(pages: 1 << 20, hugePages: huge).releaseGranule
            let count = 5 * g + 4321
            let cuts = [0, g * 3 / 4, g + 5, 2 * g + g / 3, 4 * g - 3, count]
            let ranges = zip(cuts, cuts.dropFirst()).map { $0..<$1 }
            // top down (as backward completes them), bottom up (straddling granules go back with
            // the upper and with the lower neighbour)
            // and out of address order, as a model's ready order is (its embeddings come last)
            let shuffled = [2, 0, 4, 1, 3].map { ranges[$0] }
            for readyOrder in [ranges.reversed(), ranges, shuffled] {
                for bucket in [g + g / 4 + 45, g / 10 + 7] {
                    try checkZeRO2Release(count: count, readyOrder: readyOrder, bucket: bucket, hugePages: huge)
                }
            }
        }
    }

    private func checkZeRO2Release(count: Int, readyOrder: [Range<Int>], bucket: Int, hugePages: Bool) throws {
        let shard = GradientSync.Shard(slices: [0..<count], rank: 0, releaseSource: true, bucketElements: bucket)
        let sync = try GradientSync(
            communicator: .solo, count: count, bucketMB: Double(bucket) * 4 / 1e6, readyOrder: readyOrder,
            mode: .blocking, shard: shard)
        XCTAssertGreaterThan(sync.buckets.count, 3)
        let grads = FlatBuffer(pages: count, hugePages: hugePages)
        for step in 0..<2 {
            sync.begin(grads, scale: 0.5)
            for i in 0..<count { grads[i] = Float(i % 7 + 1) }
            var ready = [Bool](repeating: false, count: count)
            for r in readyOrder {
                sync.markReady(r)
                for i in r { ready[i] = true }
                let changed = (0..<count).first { !ready[$0] && grads[$0] != Float($0 % 7 + 1) }
                XCTAssertNil(changed, "step \(step): a value not yet ready changed after marking \(r)")
            }
            try sync.finish()
            XCTAssertEqual(resident(grads), 0, "step \(step), bucket \(bucket): gradient pages left resident")
            XCTAssertNil((0..<count).first { grads[$0] != 0 })
        }
        let owned = shard.gradients
        XCTAssertNil((0..<count).first { owned[$0] != Float($0 % 7 + 1) }, "two steps of 0.5 x the gradient")
    }
}
