import XCTest

@testable import Training

final class ScheduleTests: XCTestCase {
    func testConstant() {
        let s = LRSchedule(kind: .constant, peak: 1e-3, total: 10)
        XCTAssertEqual((0..<12).map { s.lr(at: $0) }, Array(repeating: 1e-3, count: 12))
    }

    func testWarmupThenLinearDecay() {
        let s = LRSchedule(kind: .linear, peak: 1.0, final: 0, warmup: 4, total: 12)
        XCTAssertEqual((0..<4).map { s.lr(at: $0) }, [0.25, 0.5, 0.75, 1.0])
        // After warm-up: 8 steps from the peak, each 1/8 lower; the last runs at 1/8.
        XCTAssertEqual(s.lr(at: 4), 1.0)
        XCTAssertEqual(s.lr(at: 8), 0.5, accuracy: 1e-12)
        XCTAssertEqual(s.lr(at: 11), 0.125, accuracy: 1e-12)
        XCTAssertEqual(s.lr(at: 50), 0.0)  // past the end: clamped at final
    }

    func testLinearToFinal() {
        let s = LRSchedule(kind: .linear, peak: 1.0, final: 0.2, total: 10)
        XCTAssertEqual(s.lr(at: 0), 1.0)
        XCTAssertEqual(s.lr(at: 5), 0.6, accuracy: 1e-12)
    }

    func testCosine() {
        let s = LRSchedule(kind: .cosine, peak: 1.0, final: 0.1, warmup: 2, total: 12)
        XCTAssertEqual(s.lr(at: 0), 0.5)
        XCTAssertEqual(s.lr(at: 2), 1.0, accuracy: 1e-12)
        XCTAssertEqual(s.lr(at: 7), 0.55, accuracy: 1e-12)  // half way: the mean of peak and final
        XCTAssertEqual(s.lr(at: 12), 0.1, accuracy: 1e-12)
        XCTAssertTrue((2..<12).allSatisfy { s.lr(at: $0 + 1) <= s.lr(at: $0) })
    }

    func testFrozenDetection() {
        XCTAssertTrue(LRSchedule(kind: .constant, peak: 0, final: 5, total: 3).isZeroThroughout)
        XCTAssertTrue(LRSchedule(kind: .cosine, peak: 0, final: 0, total: 3).isZeroThroughout)
        XCTAssertFalse(LRSchedule(kind: .linear, peak: 0, final: 1e-4, total: 3).isZeroThroughout)
        XCTAssertFalse(LRSchedule(kind: .constant, peak: 1e-5, total: 3).isZeroThroughout)
    }
}
