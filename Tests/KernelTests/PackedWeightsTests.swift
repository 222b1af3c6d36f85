import Platform
import XCTest

@testable import Kernels

/// Sampling's packed-weight products (`PackedWeights`, `PackedWeightCache`): against the slow
/// reference, the same bits whatever the rows around a row and the thread count, and only the
/// model's parameters go through the packed copy. (Forward only: sampling has no backward.)
final class PackedWeightsTests: XCTestCase {
    func randoms(_ n: Int, seed: UInt64) -> [Float] {
        var r = CounterRNG(seed: seed)
        return (0..<n).map { _ in r.normal() }
    }

    /// y (m, n) = x W^T (+ y0) through a packed W.
    func packedProduct(_ x: [Float], _ w: [Float], m: Int, n: Int, k: Int, y0: [Float]?) -> [Float] {
        var y = y0 ?? [Float](repeating: .nan, count: m * n)
        let p = w.withUnsafeBufferPointer { PackedWeights($0.baseAddress!, n: n, k: k) }
        x.withUnsafeBufferPointer { xp in
            y.withUnsafeMutableBufferPointer {
                p.multiply(xp.baseAddress!, rows: m, ldx: k, into: $0.baseAddress!, ldy: n, accumulate: y0 != nil)
            }
        }
        return y
    }

    func testPackedProductMatchesTheReference() throws {
        guard PackedWeights.available else { return }  // the cache test covers the fallback
        for (m, n, k) in [(1, 1, 1), (5, 63, 17), (6, 64, 64), (7, 65, 100), (13, 130, 33), (64, 200, 96)] {
            let x = randoms(m * k, seed: 1)
            let w = randoms(n * k, seed: 2)
            let y0 = randoms(m * n, seed: 3)
            let want = Reference.linear(x.map(Double.init), w.map(Double.init), n: m, ic: k, oc: n)
            for accumulate in [false, true] {
                let got = packedProduct(x, w, m: m, n: n, k: k, y0: accumulate ? y0 : nil)
                for i in 0..<(m * n) {
                    let expect = want[i] + (accumulate ? Double(y0[i]) : 0)
                    XCTAssertEqual(
                        Double(got[i]), expect, accuracy: 1e-5 * Double(k).squareRoot() + 1e-6,
                        "\(m)x\(n)x\(k) accumulate \(accumulate) element \(i)")
                }
            }
        }
    }

    /// A row's result is the same bits alone, in any batch and at 1, 2 and 3 threads.
    func testRowsAndThreadsDoNotChangeTheBits() throws {
        guard PackedWeights.available else { return }  // the cache test covers the fallback
        let (m, n, k) = (37, 300, 128)  // m n k > 2^20: split over the pool's threads
        let x = randoms(m * k, seed: 4)
        let w = randoms(n * k, seed: 5)
        let saved = BLAS.threads
        defer { BLAS.threads = saved }
        BLAS.threads = 1
        let want = packedProduct(x, w, m: m, n: n, k: k, y0: nil)
        for threads in [2, 3] {
            BLAS.threads = threads
            let jobs = ComputePool.shared.parallelJobs
            let got = packedProduct(x, w, m: m, n: n, k: k, y0: nil)
            XCTAssertGreaterThan(ComputePool.shared.parallelJobs, jobs, "the product was not split")
            XCTAssertEqual(got.map(\.bitPattern), want.map(\.bitPattern), "\(threads) threads")
        }
        let some = Array(x[(5 * k)..<(20 * k)])
        let alone = packedProduct(some, w, m: 15, n: n, k: k, y0: nil)
        XCTAssertEqual(alone.map(\.bitPattern), Array(want[(5 * n)..<(20 * n)]).map(\.bitPattern))
        XCTAssertFalse(want.contains { !$0.isFinite })
    }

    /// Inside `using`, a weight in the parameter buffer is packed once and reused; any other
    /// operand (here a weight outside the buffer) still goes to sgemm, bit for bit.
    func testCachePacksOnlyTheModelsParametersAndOnlyWhileActive() throws {
        let (m, n, k) = (9, 70, 40)
        let params = FlatBuffer(count: n * k + 16)
        let w = randoms(n * k, seed: 6)
        for i in 0..<(n * k) { params[16 + i] = w[i] }
        let x = randoms(m * k, seed: 7)
        let outside = FlatBuffer(count: n * k)
        for i in 0..<(n * k) { outside[i] = w[i] }
        func product(_ weight: ConstFloatPtr) -> [Float] {
            var y = [Float](repeating: 0, count: m * n)
            x.withUnsafeBufferPointer { xp in
                y.withUnsafeMutableBufferPointer {
                    matmulForward($0.baseAddress!, xp.baseAddress!, weight, n: m, ic: k, oc: n)
                }
            }
            return y
        }
        let plain = product(params.base + 16)
        let (inside, outsideResult, packedCount) = PackedWeightCache.using(params: params) {
            let a = product(params.base + 16)
            let b = product(params.base + 16)
            XCTAssertEqual(a.map(\.bitPattern), b.map(\.bitPattern))
            return (a, product(outside.base), PackedWeightCache.active?.count ?? -1)
        }
        XCTAssertNil(PackedWeightCache.active, "the cache ends with using")
        XCTAssertEqual(outsideResult.map(\.bitPattern), plain.map(\.bitPattern), "not a parameter: sgemm")
        XCTAssertEqual(packedCount, PackedWeights.available ? 1 : -1, "one weight packed once")
        for i in 0..<(m * n) { XCTAssertEqual(inside[i], plain[i], accuracy: 1e-4) }
        if !PackedWeights.available { XCTAssertEqual(inside.map(\.bitPattern), plain.map(\.bitPattern)) }
    }
}
