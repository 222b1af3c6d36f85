import Kernels
import Platform
import XCTest

/// Worst-element comparison with relative and absolute tolerance; the message names the element.
func assertClose(
    _ a: [Float], _ e: [Double], rtol: Double = 1e-4, atol: Double = 1e-5, _ what: String,
    file: StaticString = #filePath, line: UInt = #line
) {
    XCTAssertEqual(a.count, e.count, "\(what): length", file: file, line: line)
    var worst = 0.0
    var wi = -1
    for i in 0..<min(a.count, e.count) {
        let err = abs(Double(a[i]) - e[i]) / (atol + rtol * abs(e[i]))
        if err > worst || a[i].isNaN {
            worst = a[i].isNaN ? .infinity : err
            wi = i
        }
    }
    XCTAssertLessThanOrEqual(
        worst, 1, "\(what): worst element \(wi): got \(wi >= 0 ? a[wi] : 0) expected \(wi >= 0 ? e[wi] : 0)",
        file: file, line: line)
}
func assertClose(
    _ a: [Double], _ e: [Double], rtol: Double, atol: Double, _ what: String, file: StaticString = #filePath,
    line: UInt = #line
) {
    assertClose(a.map { Float($0) }, e, rtol: rtol, atol: atol, what, file: file, line: line)
}

struct TestRNG {
    var r: CounterRNG
    init(_ seed: UInt64) { r = CounterRNG(seed: seed, 99) }
    mutating func doubles(_ n: Int, scale: Double = 1) -> [Double] { (0..<n).map { _ in Double(r.normal()) * scale } }
}

func dot(_ a: [Double], _ b: [Double]) -> Double { zip(a, b).reduce(0) { $0 + $1.0 * $1.1 } }

/// Runs a fast kernel on Float copies of Double inputs.
func withFloats<R>(_ arrays: [[Double]], _ body: ([UnsafeMutablePointer<Float>]) -> R) -> R {
    let bufs = arrays.map { a -> UnsafeMutablePointer<Float> in
        let p = UnsafeMutablePointer<Float>.allocate(capacity: max(a.count, 1))
        for (i, v) in a.enumerated() { p[i] = Float(v) }
        return p
    }
    defer { bufs.forEach { $0.deallocate() } }
    return body(bufs)
}
func read(_ p: UnsafeMutablePointer<Float>, _ n: Int) -> [Float] { Array(UnsafeBufferPointer(start: p, count: n)) }

final class KernelTests: XCTestCase {
    func testEmbeddingForwardBackward() {
        var g = TestRNG(1)
        let v = 7
        let d = 5
        let ids = [3, 0, 6, 3, -1]
        let table = g.doubles(v * d)
        let dout = g.doubles(ids.count * d)
        let ids32 = ids.map { Int32($0) }
        withFloats([table, [Double](repeating: 0, count: ids.count * d), [Double](repeating: 0, count: v * d), dout]) {
            b in
            embeddingForward(b[1], ids32, b[0], n: ids.count, d: d)
            assertClose(read(b[1], ids.count * d), Reference.embedding(table, ids, d: d), "embedding forward")
            embeddingBackward(b[2], b[3], ids32, n: ids.count, d: d)
            let ref = Reference.embeddingBackward(dout, ids, v: v, d: d)
            assertClose(read(b[2], v * d), ref, "embedding backward")
            // gradient check: L = <emb(table), dout>
            let num = Reference.numericGradient(table) { dot(Reference.embedding($0, ids, d: d), dout) }
            assertClose(ref, num, rtol: 1e-6, atol: 1e-8, "embedding finite differences")
        }
    }

    func testRMSNormForwardBackward() {
        var g = TestRNG(2)
        let n = 4
        let d = 37  // two 16-lane blocks and a tail of the row reductions (FastMath.swift)
        let eps = 1e-5
        let x = g.doubles(n * d)
        let w = g.doubles(d).map { 1 + 0.3 * $0 }
        let dy = g.doubles(n * d)
        let (rdx, rdw) = Reference.rmsnormBackward(dy, x, w, n: n, d: d, eps: eps)
        assertClose(
            rdx, Reference.numericGradient(x) { dot(Reference.rmsnorm($0, w, n: n, d: d, eps: eps), dy) }, rtol: 1e-6,
            atol: 1e-8, "rmsnorm dx finite differences")
        assertClose(
            rdw, Reference.numericGradient(w) { dot(Reference.rmsnorm(x, $0, n: n, d: d, eps: eps), dy) }, rtol: 1e-6,
            atol: 1e-8, "rmsnorm dw finite differences")
        withFloats([
            x, w, [Double](repeating: 0, count: n * d), [Double](repeating: 0, count: n), dy,
            [Double](repeating: 0, count: n * d), [Double](repeating: 0, count: d),
        ]) { b in
            rmsnormForward(b[2], b[3], b[0], b[1], n: n, d: d, eps: Float(eps))
            assertClose(read(b[2], n * d), Reference.rmsnorm(x, w, n: n, d: d, eps: eps), "rmsnorm forward")
            rmsnormBackward(b[5], b[6], b[4], b[0], b[1], b[3], n: n, d: d)
            assertClose(read(b[5], n * d), rdx, "rmsnorm dx")
            assertClose(read(b[6], d), rdw, "rmsnorm dw")
        }
    }

    func testLinearForwardBackward() {
        var g = TestRNG(3)
        let n = 5
        let ic = 7
        let oc = 3
        let x = g.doubles(n * ic)
        let w = g.doubles(oc * ic)
        let dy = g.doubles(n * oc)
        let (rdx, rdw) = Reference.linearBackward(dy, x, w, n: n, ic: ic, oc: oc)
        assertClose(
            rdx, Reference.numericGradient(x) { dot(Reference.linear($0, w, n: n, ic: ic, oc: oc), dy) }, rtol: 1e-6,
            atol: 1e-8, "linear dx finite differences")
        assertClose(
            rdw, Reference.numericGradient(w) { dot(Reference.linear(x, $0, n: n, ic: ic, oc: oc), dy) }, rtol: 1e-6,
            atol: 1e-8, "linear dw finite differences")
        withFloats([
            x, w, [Double](repeating: 0, count: n * oc), dy, [Double](repeating: 0, count: n * ic),
            [Double](repeating: 0, count: oc * ic),
        ]) { b in
            matmulForward(b[2], b[0], b[1], n: n, ic: ic, oc: oc)
            assertClose(read(b[2], n * oc), Reference.linear(x, w, n: n, ic: ic, oc: oc), "linear forward")
            matmulBackward(b[4], b[5], b[3], b[0], b[1], n: n, ic: ic, oc: oc)
            assertClose(read(b[4], n * ic), rdx, "linear dx")
            assertClose(read(b[5], oc * ic), rdw, "linear dw")
        }
    }

    func testRotaryMatchesReferenceAndInverseIsTranspose() {
        var g = TestRNG(4)
        let batch = 2
        let S = 10
        let D = 16
        let NH = 2
        let hd = 8
        let gridW = 3
        let table = RotaryTable(seqLen: S, gridW: gridW, headDim: hd, base: 10000)
        let qkv = g.doubles(batch * S * 3 * D)
        let dy = g.doubles(batch * S * 3 * D)
        // reference: rotate each head of q and k
        func refRotate(_ a: [Double], inverse: Bool) -> [Double] {
            var out = a
            for b in 0..<batch {
                for p in 0..<S {
                    for part in 0..<2 {
                        for h in 0..<NH {
                            let o = (b * S + p) * 3 * D + part * D + h * hd
                            let r = Reference.rotate(
                                Array(a[o..<(o + hd)]), position: p, gridW: gridW, base: 10000, inverse: inverse)
                            for t in 0..<hd { out[o + t] = r[t] }
                        }
                    }
                }
            }
            return out
        }
        withFloats([qkv, dy]) { b in
            rotaryApply(b[0], table, batch: batch, seqLen: S, dim: D, heads: NH)
            assertClose(read(b[0], qkv.count), refRotate(qkv, inverse: false), "rotary forward")
            // class position: q and k are zero, v untouched
            XCTAssertEqual(read(b[0], 2 * D).allSatisfy { $0 == 0 }, true, "class slot q, k must be zero")
            rotaryApply(b[1], table, batch: batch, seqLen: S, dim: D, heads: NH, inverse: true)
            // backward == gradient of <rotate(x), dy>
            let num = Reference.numericGradient(qkv) { dot(refRotate($0, inverse: false), dy) }
            assertClose(read(b[1], qkv.count), num, rtol: 1e-4, atol: 1e-5, "rotary backward (finite differences)")
        }
    }

    func checkAttention(S: Int, causal: Bool, batch: Int = 2) {
        var g = TestRNG(UInt64(5 + S))
        let D = 8
        let NH = 2
        let qkv = g.doubles(batch * S * 3 * D)
        let dy = g.doubles(batch * S * D)
        let ref = Reference.attention(qkv, batch: batch, seqLen: S, dim: D, heads: NH, causal: causal)
        let num = Reference.numericGradient(qkv) {
            dot(Reference.attention($0, batch: batch, seqLen: S, dim: D, heads: NH, causal: causal), dy)
        }
        withFloats([
            qkv, [Double](repeating: 0, count: batch * S * D), [Double](repeating: 0, count: batch * NH * S * S), dy,
            [Double](repeating: 0, count: qkv.count),
        ]) { b in
            attentionForward(b[1], b[2], b[0], batch: batch, seqLen: S, dim: D, heads: NH, causal: causal)
            assertClose(read(b[1], batch * S * D), ref, "attention forward S=\(S) causal=\(causal)")
            attentionBackward(b[4], b[3], b[0], b[2], batch: batch, seqLen: S, dim: D, heads: NH, causal: causal)
            assertClose(
                read(b[4], qkv.count), num, rtol: 1e-3, atol: 1e-4, "attention backward S=\(S) causal=\(causal)")
        }
    }
    func testAttentionShortAndLong() {
        for causal in [true, false] {
            checkAttention(S: 5, causal: causal)
            checkAttention(S: 20, causal: causal)
        }
    }

    /// Causal attention blocked by query rows: 70 rows are blocks of 64 and 6, each multiplying
    /// only the keys up to its last row; the FLOP count follows the blocks.
    func testCausalAttentionOverSeveralBlocks() {
        XCTAssertLessThan(attentionBlockRows, 70, "the test must span two blocks")
        checkAttention(S: 70, causal: true, batch: 1)
        let full: Double = 4 * 150 * 150 * 4
        let pairs: Int = 64 * 64 + 64 * 128 + 22 * 150
        XCTAssertEqual(attentionFLOPs(seqLen: 150, headDim: 4, causal: true), 16 * Double(pairs))
        XCTAssertLessThan(attentionFLOPs(seqLen: 150, headDim: 4, causal: true), 0.7 * full)
        XCTAssertEqual(attentionFLOPs(seqLen: 150, headDim: 4, causal: false), full)
    }

    /// KV-cached decoding: stepping positions 0..S-1 one at a time gives, at each position, the
    /// last row of causal attention over the positions so far.
    func testAttentionStepMatchesCausalAttention() {
        var g = TestRNG(21)
        let rows = 3
        let S = 9
        let D = 8
        let NH = 2
        let hd = D / NH
        let qkv = g.doubles(rows * S * 3 * D)
        let keys = UnsafeMutablePointer<Float>.allocate(capacity: rows * NH * S * hd)
        let values = UnsafeMutablePointer<Float>.allocate(capacity: rows * NH * S * hd)
        defer {
            keys.deallocate()
            values.deallocate()
        }
        for p in 0..<S {
            // the inputs of position p of every row, (rows, 3D)
            let width = 3 * D
            var step: [Double] = []
            var prefix: [Double] = []
            for r in 0..<rows {
                let first = r * S * width
                let at = first + p * width
                step += qkv[at..<(at + width)]
                prefix += qkv[first..<(at + width)]
            }
            let ref = Reference.attentionLastRow(prefix, batch: rows, seqLen: p + 1, dim: D, heads: NH)
            withFloats([step, [Double](repeating: 0, count: rows * D)]) { b in
                attentionStepForward(
                    b[1], keys, values, b[0], rows: rows, dim: D, heads: NH, cacheLength: S,
                    position: p)
                assertClose(read(b[1], rows * D), ref, "attention step at position \(p)")
            }
        }
    }

    func testAdd() {
        var g = TestRNG(22)
        let a = g.doubles(100)
        let b = g.doubles(100)
        withFloats([a, b, [Double](repeating: 0, count: 100)]) { p in
            addForward(p[2], p[0], p[1], count: 100)
            assertClose(read(p[2], 100), Reference.add(a, b), "add")
            addForward(p[0], p[0], p[1], count: 100)
            assertClose(read(p[0], 100), Reference.add(a, b), "add in place")
        }
    }

    func testSwiGLU() {
        var g = TestRNG(6)
        let n = 3
        let f = 6
        let ab = g.doubles(n * 2 * f, scale: 2)
        let dy = g.doubles(n * f)
        let num = Reference.numericGradient(ab) { dot(Reference.swiglu($0, n: n, f: f), dy) }
        withFloats([ab, [Double](repeating: 0, count: n * f), dy, [Double](repeating: 0, count: n * 2 * f)]) { b in
            swigluForward(b[1], b[0], n: n, f: f)
            assertClose(read(b[1], n * f), Reference.swiglu(ab, n: n, f: f), "swiglu forward")
            swigluBackward(b[3], b[2], b[0], n: n, f: f)
            assertClose(read(b[3], n * 2 * f), num, rtol: 1e-4, atol: 1e-5, "swiglu backward")
        }
    }

    func testCrossEntropy() {
        var g = TestRNG(7)
        let n = 4
        let v = 37  // two 16-lane blocks and a tail
        let logits = g.doubles(n * v, scale: 3)
        let targets = [2, -1, 36, 0]
        let weights: [Double] = [1, 1, 0.5, 2]
        let ref = Reference.crossEntropy(logits, targets, v: v)
        let scale = 0.25
        let num = Reference.numericGradient(logits) {
            zip(Reference.crossEntropy($0, targets, v: v), weights).reduce(0) { $0 + $1.0 * $1.1 } * scale
        }
        withFloats([logits, [Double](repeating: 0, count: n), weights, [Double](repeating: 0, count: n * v)]) { b in
            let t32 = targets.map { Int32($0) }
            crossEntropyForwardBackward(b[1], b[3], b[0], t32, b[2], scale: Float(scale), n: n, v: v)
            assertClose(read(b[1], n), ref, "cross entropy")
            assertClose(read(b[3], n * v), num, rtol: 1e-4, atol: 1e-6, "cross entropy gradient")
            // aliasing dlogits onto logits gives the same, losses too (the target is read first)
            (b[1]).update(repeating: 0, count: n)
            crossEntropyForwardBackward(b[1], b[0], b[0], t32, b[2], scale: Float(scale), n: n, v: v)
            assertClose(read(b[1], n), ref, "cross entropy in place")
            assertClose(read(b[0], n * v), num, rtol: 1e-4, atol: 1e-6, "cross entropy gradient in place")
        }
    }

    /// Dropout's backward is the same mask applied to the gradient: checked against finite
    /// differences of L = <x * mask, dy> (the reference is the plain product in Double).
    func testDropoutBackwardIsTheMask() {
        let rows = 6
        let d = 5
        let n = rows * d
        let mask = UnsafeMutablePointer<Float>.allocate(capacity: n)
        defer { mask.deallocate() }
        dropoutMask(
            mask, p: 0.3, rows: rows, d: d, rowsPerSample: 3, samplePositions: [4, 9], seed: 1, step: 2, site: 3)
        let m = read(mask, n).map { Double($0) }
        var g = TestRNG(8)
        let x = g.doubles(n)
        let dy = g.doubles(n)
        let num = Reference.numericGradient(x) { xs in
            zip(zip(xs, m).map { $0 * $1 }, dy).reduce(0) { $0 + $1.0 * $1.1 }
        }
        withFloats([x, dy]) { b in
            dropoutApply(b[0], mask, count: n)
            assertClose(read(b[0], n), zip(x, m).map { $0 * $1 }, "dropout forward")
            dropoutApply(b[1], mask, count: n)
            assertClose(read(b[1], n), num, rtol: 1e-5, atol: 1e-6, "dropout backward vs finite differences")
        }
    }

    func testDropoutMaskIsRankInvariantAndUnbiased() {
        let d = 50
        let rowsPerSample = 40
        let p: Float = 0.1
        // 4 samples in one call vs the same samples split 2 + 2
        let all = UnsafeMutablePointer<Float>.allocate(capacity: 4 * rowsPerSample * d)
        defer { all.deallocate() }
        dropoutMask(
            all, p: p, rows: 4 * rowsPerSample, d: d, rowsPerSample: rowsPerSample, samplePositions: [0, 1, 2, 3],
            seed: 9, step: 3, site: 1)
        let half = UnsafeMutablePointer<Float>.allocate(capacity: 2 * rowsPerSample * d)
        defer { half.deallocate() }
        dropoutMask(
            half, p: p, rows: 2 * rowsPerSample, d: d, rowsPerSample: rowsPerSample, samplePositions: [2, 3], seed: 9,
            step: 3, site: 1)
        XCTAssertEqual(
            read(half, 2 * rowsPerSample * d), Array(read(all, 4 * rowsPerSample * d)[(2 * rowsPerSample * d)...]))
        let m = read(all, 4 * rowsPerSample * d)
        let dropped = Double(m.filter { $0 == 0 }.count) / Double(m.count)
        XCTAssertEqual(dropped, 0.1, accuracy: 0.02, "drop rate")
        XCTAssertEqual(m.reduce(0, +) / Float(m.count), 1, accuracy: 0.03, "inverted dropout keeps the mean")
        XCTAssertTrue(m.allSatisfy { $0 == 0 || abs($0 - 1 / 0.9) < 1e-6 })
        // another site or step differs
        dropoutMask(
            half, p: p, rows: 2 * rowsPerSample, d: d, rowsPerSample: rowsPerSample, samplePositions: [2, 3], seed: 9,
            step: 4, site: 1)
        XCTAssertNotEqual(read(half, 2 * rowsPerSample * d), Array(m[(2 * rowsPerSample * d)...]))
    }
}

final class FastMathTests: XCTestCase {
    func testVectorExpIsAccurate() {
        var worst = 0.0
        var x: Float = -87
        while x < 88 {
            for i in 0..<16 {
                let e = Foundation.exp(Double(x + Float(i) * 0.0037))
                worst = max(worst, abs(Double(fexp(x + Float(i) * 0.0037)) - e) / e)
            }
            x += 0.05
        }
        XCTAssertLessThan(worst, 3e-7, "relative error of fexp")
        XCTAssertEqual(fexp(0), 1)
        XCTAssertEqual(fexp(-1000), fexp(-87.3), "clamped, no garbage")
    }

    /// The 16-lane row reductions against Double sums, at lengths with and without a block and a tail;
    /// the order is lane by lane (lane l takes j = l, l + 16, ...), which a serial sum does not follow.
    func testLaneReductionsMatchDoubleSums() {
        var g = TestRNG(31)
        let count = 100
        let a = g.doubles(count).map { Float($0) }
        let b = g.doubles(count).map { Float($0) }
        let c = g.doubles(count).map { Float($0) }
        for n in [0, 1, 15, 16, 17, 40, 100] {
            let sum = (0..<n).reduce(0.0) { $0 + Double(a[$1]) }
            let dot = (0..<n).reduce(0.0) { $0 + Double(a[$1]) * Double(b[$1]) }
            let dot3 = (0..<n).reduce(0.0) { $0 + Double(a[$1]) * Double(b[$1]) * Double(c[$1]) }
            XCTAssertEqual(Double(laneSum(a, count: n)), sum, accuracy: 1e-5, "laneSum n=\(n)")
            XCTAssertEqual(Double(laneDot(a, b, count: n)), dot, accuracy: 1e-5, "laneDot n=\(n)")
            XCTAssertEqual(Double(laneDot(a, b, c, count: n)), dot3, accuracy: 1e-5, "laneDot3 n=\(n)")
            XCTAssertEqual(laneMax(a, count: n), a.prefix(n).max() ?? -.infinity, "laneMax n=\(n)")
        }
        // the largest in every lane position and in the tail is found
        for at in [0, 7, 15, 16, 31, 95, 99] {
            var x = a
            x[at] = 9
            XCTAssertEqual(laneMax(x, count: count), 9, "laneMax finds index \(at)")
        }
        // the lane order itself: 2^24 then 31 ones. One chain loses every 1 (2^24 + 1 rounds to
        // 2^24); in lanes only lane 0's one is lost and lanes 1-15 hold 2 each, exactly
        var e = [Float](repeating: 1, count: 32)
        e[0] = 16_777_216
        XCTAssertEqual(laneSum(e, count: 32), 16_777_216 + 30, "the lane order")
        var exps = [Float](repeating: 0, count: 37)
        let src = (0..<37).map { Float($0) * 0.1 }
        let z = shiftedExps(&exps, src, shift: 3.6, count: 37)
        for j in 0..<37 { XCTAssertEqual(Double(exps[j]), Foundation.exp(Double(src[j]) - 3.6), accuracy: 1e-6) }
        XCTAssertEqual(Double(z), exps.reduce(0.0) { $0 + Double($1) }, accuracy: 1e-5)
    }
}
