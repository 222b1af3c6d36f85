import Kernels
import Platform
import XCTest

/// RAR's kernels (AdaLN.swift, SPEC section 9): each fast forward against its Double twin, and
/// each fast backward against central finite differences of that twin (L = <forward, dy>).
final class AdaLNTests: XCTestCase {
    func testLayerNormWithAndWithoutAffine() {
        var g = TestRNG(11)
        let n = 5
        let d = 37  // two 16-lane blocks and a tail of the row reductions (FastMath.swift)
        let eps = 1e-6
        let x = g.doubles(n * d).map { $0 * 2 + 0.5 }
        let w = g.doubles(d).map { 1 + 0.3 * $0 }
        let b = g.doubles(d, scale: 0.2)
        let dy = g.doubles(n * d)
        for affine in [true, false] {
            let (ww, bb) = affine ? (w, b) : (nil, nil)
            let what = affine ? "layernorm" : "layernorm (no affine)"
            withFloats([
                x, w, b, [Double](repeating: 0, count: n * d), [Double](repeating: 0, count: 2 * n), dy,
                [Double](repeating: 0, count: n * d), [Double](repeating: 0, count: 2 * d),
            ]) { p in
                layernormForward(
                    p[3], p[4], p[4] + n, p[0], affine ? p[1] : nil, affine ? p[2] : nil, n: n, d: d, eps: Float(eps))
                assertClose(read(p[3], n * d), Reference.layernorm(x, ww, bb, n: n, d: d, eps: eps), "\(what) forward")
                layernormBackward(
                    p[6], affine ? p[7] : nil, affine ? p[7] + d : nil, p[5], p[0], affine ? p[1] : nil, p[4], p[4] + n,
                    n: n, d: d)
                let ndx = Reference.numericGradient(x) {
                    dot(Reference.layernorm($0, ww, bb, n: n, d: d, eps: eps), dy)
                }
                assertClose(read(p[6], n * d), ndx, rtol: 1e-3, atol: 1e-4, "\(what) dx finite differences")
                if affine {
                    let ndw = Reference.numericGradient(w) {
                        dot(Reference.layernorm(x, $0, b, n: n, d: d, eps: eps), dy)
                    }
                    let ndb = Reference.numericGradient(b) {
                        dot(Reference.layernorm(x, w, $0, n: n, d: d, eps: eps), dy)
                    }
                    assertClose(read(p[7], d), ndw, rtol: 1e-3, atol: 1e-4, "layernorm dw finite differences")
                    assertClose(read(p[7] + d, d), ndb, rtol: 1e-3, atol: 1e-4, "layernorm db finite differences")
                }
            }
        }
    }

    func testQKNormOverTheHeadWidth() {
        var g = TestRNG(12)
        let n = 3
        let D = 16
        let NH = 2
        let hd = D / NH
        let eps = 1e-6
        let qkv = g.doubles(n * 3 * D)
        let wq = g.doubles(hd).map { 1 + 0.3 * $0 }
        let bq = g.doubles(hd, scale: 0.2)
        let wk = g.doubles(hd).map { 1 + 0.3 * $0 }
        let bk = g.doubles(hd, scale: 0.2)
        let dy = g.doubles(n * 3 * D)
        func f(_ a: [Double], _ b: [Double], _ c: [Double], _ d: [Double], _ e: [Double]) -> Double {
            dot(Reference.qkNorm(a, wq: b, bq: c, wk: d, bk: e, n: n, dim: D, heads: NH, eps: eps), dy)
        }
        withFloats([
            qkv, wq, bq, wk, bk, [Double](repeating: 0, count: n * 2 * D), [Double](repeating: 0, count: 4 * n * NH),
            dy,
            [Double](repeating: 0, count: 4 * hd),
        ]) { p in
            qkNormForward(
                p[0], raw: p[5], mean: p[6], rstd: p[6] + 2 * n * NH, qWeight: p[1], qBias: p[2], kWeight: p[3],
                kBias: p[4], n: n, dim: D, heads: NH, eps: Float(eps))
            let want = Reference.qkNorm(qkv, wq: wq, bq: bq, wk: wk, bk: bk, n: n, dim: D, heads: NH, eps: eps)
            assertClose(read(p[0], n * 3 * D), want, "qk norm forward (v untouched)")
            qkNormBackward(
                p[7], raw: p[5], mean: p[6], rstd: p[6] + 2 * n * NH, qWeight: p[1], kWeight: p[3], dqWeight: p[8],
                dqBias: p[8] + hd, dkWeight: p[8] + 2 * hd, dkBias: p[8] + 3 * hd, n: n, dim: D, heads: NH)
            var ndx = Reference.numericGradient(qkv) { f($0, wq, bq, wk, bk) }
            // v's gradient is dy itself (qkNormBackward leaves those columns as they are)
            for i in 0..<n { for j in (2 * D)..<(3 * D) { ndx[i * 3 * D + j] = dy[i * 3 * D + j] } }
            assertClose(read(p[7], n * 3 * D), ndx, rtol: 1e-3, atol: 1e-4, "qk norm dqkv finite differences")
            let nd = [
                Reference.numericGradient(wq) { f(qkv, $0, bq, wk, bk) },
                Reference.numericGradient(bq) { f(qkv, wq, $0, wk, bk) },
                Reference.numericGradient(wk) { f(qkv, wq, bq, $0, bk) },
                Reference.numericGradient(bk) { f(qkv, wq, bq, wk, $0) },
            ]
            for (i, name) in ["wq", "bq", "wk", "bk"].enumerated() {
                assertClose(
                    read(p[8] + i * hd, hd), nd[i], rtol: 1e-3, atol: 1e-4, "qk norm d\(name) finite differences")
            }
        }
    }

    func testGELUAndSiLU() {
        var g = TestRNG(13)
        let n = 40
        let x = g.doubles(n, scale: 3)
        let dy = g.doubles(n)
        withFloats([x, dy, [Double](repeating: 0, count: n), [Double](repeating: 0, count: n)]) { p in
            geluForward(p[2], p[0], count: n)
            assertClose(read(p[2], n), Reference.gelu(x), rtol: 1e-5, atol: 1e-6, "gelu forward")
            geluBackward(p[3], p[1], p[0], count: n)
            let ng = Reference.numericGradient(x) { dot(Reference.gelu($0), dy) }
            assertClose(read(p[3], n), ng, rtol: 1e-4, atol: 1e-5, "gelu finite differences")
            siluForward(p[2], p[0], count: n)
            assertClose(read(p[2], n), Reference.silu(x), rtol: 1e-5, atol: 1e-6, "silu forward")
            p[3].update(repeating: 0, count: n)
            siluBackward(p[3], p[1], p[0], count: n)
            let ns = Reference.numericGradient(x) { dot(Reference.silu($0), dy) }
            assertClose(read(p[3], n), ns, rtol: 1e-4, atol: 1e-5, "silu finite differences")
        }
    }

    /// Modulation and gate read columns of a (n / g, ld) matrix: shift at column 0, scale at d, gate
    /// at 2d; row i reads modulation row i / g (g rows share one: the plug-in over RAR), whose
    /// gradient is the sum over its rows.
    func testModulateAndGate() {
        for g in [1, 2, 4] {
            modulateAndGate(rowsPerModulation: g)
        }
    }

    func modulateAndGate(rowsPerModulation g: Int) {
        var rng = TestRNG(14)
        let n = 4
        let d = 6
        let ld = 3 * d
        let m = n / g
        let x = rng.doubles(n * d)
        let h = rng.doubles(n * d)
        let mod = rng.doubles(m * ld)
        let dy = rng.doubles(n * d)
        func cols(_ mm: [Double], _ c: Int) -> [Double] {
            (0..<(n * d)).map { mm[($0 / d / g) * ld + c * d + $0 % d] }
        }
        let want = Reference.modulate(x, shift: cols(mod, 0), scale: cols(mod, 1))
        let what = "\(g) rows per modulation"
        withFloats([
            x, mod, [Double](repeating: 0, count: n * d), dy, [Double](repeating: 0, count: n * d),
            [Double](repeating: 0, count: m * ld), h,
        ]) { p in
            modulateForward(p[2], p[0], shift: p[1], scale: p[1] + d, ld: ld, n: n, d: d, rowsPerModulation: g)
            assertClose(read(p[2], n * d), want, "modulate forward, \(what)")
            modulateBackward(
                p[4], dshift: p[5], dscale: p[5] + d, p[3], p[0], scale: p[1] + d, ld: ld, n: n, d: d,
                rowsPerModulation: g)
            let nx = Reference.numericGradient(x) {
                dot(Reference.modulate($0, shift: cols(mod, 0), scale: cols(mod, 1)), dy)
            }
            let nm = Reference.numericGradient(mod) {
                dot(Reference.modulate(x, shift: cols($0, 0), scale: cols($0, 1)), dy)
            }
            assertClose(read(p[4], n * d), nx, rtol: 1e-4, atol: 1e-5, "modulate dx finite differences, \(what)")
            // the gate's columns (2d..<3d) get no gradient from the modulation
            assertClose(
                read(p[5], m * ld), nm, rtol: 1e-4, atol: 1e-5, "modulate dshift, dscale finite differences, \(what)")
            // gate: h + g * y with y = x
            gatedAddForward(p[6], p[0], gate: p[1] + 2 * d, ld: ld, n: n, d: d, rowsPerModulation: g)
            assertClose(read(p[6], n * d), Reference.gatedAdd(h, x, gate: cols(mod, 2)), "gated add forward, \(what)")
            p[5].update(repeating: 0, count: m * ld)
            gatedAddBackward(
                p[4], dgate: p[5] + 2 * d, p[3], p[0], gate: p[1] + 2 * d, ld: ld, n: n, d: d, rowsPerModulation: g)
            let ny = Reference.numericGradient(x) { dot(Reference.gatedAdd(h, $0, gate: cols(mod, 2)), dy) }
            let ng = Reference.numericGradient(mod) { dot(Reference.gatedAdd(h, x, gate: cols($0, 2)), dy) }
            assertClose(read(p[4], n * d), ny, rtol: 1e-4, atol: 1e-5, "gated add dy finite differences, \(what)")
            assertClose(read(p[5], m * ld), ng, rtol: 1e-4, atol: 1e-5, "gated add dgate finite differences, \(what)")
        }
    }

    func testBiasAndAddedRows() {
        var g = TestRNG(15)
        let n = 5
        let oc = 7
        let x = g.doubles(n * oc)
        let bias = g.doubles(oc)
        let dy = g.doubles(n * oc)
        let ids: [Int32] = [2, 0, -1, 2, 1]
        let table = g.doubles(3 * oc)
        withFloats([x, bias, dy, [Double](repeating: 0, count: oc), table, [Double](repeating: 0, count: 3 * oc)]) {
            p in
            biasAddForward(p[0], p[1], n: n, oc: oc)
            assertClose(read(p[0], n * oc), Reference.biasAdd(x, bias, n: n, oc: oc), "bias add forward")
            biasBackward(p[3], p[2], n: n, oc: oc)
            let nb = Reference.numericGradient(bias) { dot(Reference.biasAdd(x, $0, n: n, oc: oc), dy) }
            assertClose(read(p[3], oc), nb, rtol: 1e-4, atol: 1e-5, "bias column sums finite differences")
            // positions: x + table[ids]
            func added(_ t: [Double]) -> [Double] {
                Reference.add(x, Reference.embedding(t, ids.map { Int($0) }, d: oc))
            }
            for i in 0..<(n * oc) { p[0][i] = Float(x[i]) }
            addRowsForward(p[0], ids, p[4], n: n, d: oc)
            assertClose(read(p[0], n * oc), added(table), "added rows forward")
            embeddingBackward(p[5], p[2], ids, n: n, d: oc)
            let nt = Reference.numericGradient(table) { dot(added($0), dy) }
            assertClose(read(p[5], 3 * oc), nt, rtol: 1e-4, atol: 1e-5, "added rows finite differences")
        }
    }

    /// Dropout on the probabilities: out = (P * M) V against the Double attention with the mask
    /// folded in, and the backward against finite differences; a mask of ones is the plain kernel.
    func testAttentionWithProbabilityDropout() {
        for (S, causal) in [(5, false), (5, true), (70, true), (20, false)] {
            var g = TestRNG(16 + UInt64(S))
            let B = 2
            let D = 8
            let NH = 2
            let qkv = g.doubles(B * S * 3 * D)
            let dy = g.doubles(B * S * D)
            var mr = CounterRNG(seed: 5, UInt64(S))
            let mask = (0..<(B * NH * S * S)).map { _ in mr.uniform() < 0.3 ? 0.0 : 1 / 0.7 }
            func ref(_ q: [Double]) -> [Double] { droppedAttention(q, mask, B: B, S: S, D: D, NH: NH, causal: causal) }
            withFloats([
                qkv, mask, [Double](repeating: 0, count: B * S * D), [Double](repeating: 0, count: B * NH * S * S), dy,
                [Double](repeating: 0, count: B * S * 3 * D), [Double](repeating: 1, count: B * NH * S * S),
                [Double](repeating: 0, count: B * S * D),
            ]) { p in
                attentionForward(
                    p[2], p[3], p[0], batch: B, seqLen: S, dim: D, heads: NH, causal: causal, dropMask: p[1])
                assertClose(read(p[2], B * S * D), ref(qkv), "dropped attention S=\(S) forward")
                attentionBackward(
                    p[5], p[4], p[0], p[3], batch: B, seqLen: S, dim: D, heads: NH, causal: causal, dropMask: p[1])
                // finite differences at every element for short sequences, at 97 spread ones for S = 70
                let picked = S < 64 ? Array(0..<qkv.count) : (0..<97).map { $0 * 7919 % qkv.count }
                let got = read(p[5], B * S * 3 * D)
                var x = qkv
                let nd = picked.map { i -> Double in
                    let old = x[i]
                    x[i] = old + 1e-5
                    let a = dot(ref(x), dy)
                    x[i] = old - 1e-5
                    let b = dot(ref(x), dy)
                    x[i] = old
                    return (a - b) / 2e-5
                }
                assertClose(picked.map { got[$0] }, nd, rtol: 1e-3, atol: 1e-4, "dropped attention S=\(S) backward")
                attentionForward(
                    p[7], p[3], p[0], batch: B, seqLen: S, dim: D, heads: NH, causal: causal, dropMask: p[6])
                attentionForward(p[2], p[3], p[0], batch: B, seqLen: S, dim: D, heads: NH, causal: causal)
                assertClose(
                    read(p[7], B * S * D), read(p[2], B * S * D).map { Double($0) }, rtol: 1e-5, atol: 1e-6,
                    "mask of ones S=\(S)")
            }
        }
    }

    /// Double attention with dropout on the probabilities (after the softmax, before V).
    private func droppedAttention(
        _ qkv: [Double], _ mask: [Double], B: Int, S: Int, D: Int, NH: Int, causal: Bool
    ) -> [Double] {
        let hd = D / NH
        var out = [Double](repeating: 0, count: B * S * D)
        for b in 0..<B {
            for h in 0..<NH {
                for i in 0..<S {
                    var sc = [Double](repeating: -.infinity, count: S)
                    for j in 0..<S where !causal || j <= i {
                        var s = 0.0
                        for t in 0..<hd {
                            s += qkv[(b * S + i) * 3 * D + h * hd + t] * qkv[(b * S + j) * 3 * D + D + h * hd + t]
                        }
                        sc[j] = s / Double(hd).squareRoot()
                    }
                    let mx = sc.max()!
                    let e = sc.map { $0 == -.infinity ? 0 : exp($0 - mx) }
                    let z = e.reduce(0, +)
                    for j in 0..<S {
                        let pm = e[j] / z * mask[((b * NH + h) * S + i) * S + j]
                        for t in 0..<hd {
                            out[(b * S + i) * D + h * hd + t] += pm * qkv[(b * S + j) * 3 * D + 2 * D + h * hd + t]
                        }
                    }
                }
            }
        }
        return out
    }
}
