import Foundation

// Slow, obviously-correct Double twins of the kernels in Ops.swift, written from the equations
// (SPEC section 2) with plain nested loops. Tests check fast == reference, and reference
// backward == finite differences of reference forward. Arrays are row-major like the kernels.

public enum Reference {
    public static func embedding(_ table: [Double], _ ids: [Int], d: Int) -> [Double] {
        ids.flatMap { id in id < 0 ? [Double](repeating: 0, count: d) : Array(table[(id * d)..<((id + 1) * d)]) }
    }
    public static func embeddingBackward(_ dout: [Double], _ ids: [Int], v: Int, d: Int) -> [Double] {
        var g = [Double](repeating: 0, count: v * d)
        for (i, id) in ids.enumerated() where id >= 0 { for j in 0..<d { g[id * d + j] += dout[i * d + j] } }
        return g
    }

    public static func rmsnorm(_ x: [Double], _ w: [Double], n: Int, d: Int, eps: Double) -> [Double] {
        var y = x
        for i in 0..<n {
            let row = x[(i * d)..<((i + 1) * d)]
            let ms = row.reduce(0) { $0 + $1 * $1 } / Double(d)
            for j in 0..<d { y[i * d + j] = x[i * d + j] / (ms + eps).squareRoot() * w[j] }
        }
        return y
    }
    /// Returns (dx, dw) by the chain rule written out per element.
    public static func rmsnormBackward(
        _ dy: [Double], _ x: [Double], _ w: [Double], n: Int, d: Int, eps: Double
    ) -> ([Double], [Double]) {
        var dx = [Double](repeating: 0, count: n * d)
        var dw = [Double](repeating: 0, count: d)
        for i in 0..<n {
            let ms = (0..<d).reduce(0.0) { $0 + x[i * d + $1] * x[i * d + $1] } / Double(d)
            let r = 1 / (ms + eps).squareRoot()
            // y_j = x_j r w_j ; dr/dx_m = -r^3 x_m / d
            var s = 0.0
            for j in 0..<d { s += dy[i * d + j] * x[i * d + j] * w[j] }
            for m in 0..<d {
                dx[i * d + m] = dy[i * d + m] * r * w[m] - s * r * r * r * x[i * d + m] / Double(d)
                dw[m] += dy[i * d + m] * x[i * d + m] * r
            }
        }
        return (dx, dw)
    }

    /// y (n, oc) = x (n, ic) W^T, W (oc, ic)
    public static func linear(_ x: [Double], _ w: [Double], n: Int, ic: Int, oc: Int) -> [Double] {
        var y = [Double](repeating: 0, count: n * oc)
        for i in 0..<n {
            for o in 0..<oc {
                var s = 0.0
                for c in 0..<ic { s += x[i * ic + c] * w[o * ic + c] }
                y[i * oc + o] = s
            }
        }
        return y
    }
    public static func linearBackward(
        _ dy: [Double], _ x: [Double], _ w: [Double], n: Int, ic: Int, oc: Int
    ) -> ([Double], [Double]) {
        var dx = [Double](repeating: 0, count: n * ic)
        var dw = [Double](repeating: 0, count: oc * ic)
        for i in 0..<n {
            for o in 0..<oc {
                let g = dy[i * oc + o]
                for c in 0..<ic {
                    dx[i * ic + c] += g * w[o * ic + c]
                    dw[o * ic + c] += g * x[i * ic + c]
                }
            }
        }
        return (dx, dw)
    }

    /// LlamaGen 2D rotary on one vector of width hd at sequence position p (class slot p = 0).
    public static func rotate(
        _ x: [Double], position p: Int, gridW: Int, base: Double, inverse: Bool = false
    ) -> [Double] {
        let hd = x.count
        let n = hd / 4
        var angles = [Double](repeating: 0, count: hd / 2)
        var zero = true
        if p >= 1 {
            zero = false
            let r = Double((p - 1) / gridW)
            let c = Double((p - 1) % gridW)
            for i in 0..<n {
                let f = pow(base, -4.0 * Double(i) / Double(hd))
                angles[i] = r * f
                angles[n + i] = c * f
            }
        }
        var y = x
        for i in 0..<(hd / 2) {
            let co = zero ? 0 : cos(angles[i])
            let si = zero ? 0 : (inverse ? -1 : 1) * sin(angles[i])
            y[2 * i] = x[2 * i] * co - x[2 * i + 1] * si
            y[2 * i + 1] = x[2 * i + 1] * co + x[2 * i] * si
        }
        return y
    }

    /// Multi-head attention from qkv (B*S, 3D) to (B*S, D); q and k already rotated.
    public static func attention(
        _ qkv: [Double], batch: Int, seqLen S: Int, dim D: Int, heads NH: Int, causal: Bool
    ) -> [Double] {
        let hd = D / NH
        var out = [Double](repeating: 0, count: batch * S * D)
        for b in 0..<batch {
            for h in 0..<NH {
                for i in 0..<S {
                    var scores = [Double](repeating: -.infinity, count: S)
                    for j in 0..<S where !causal || j <= i {
                        var s = 0.0
                        for t in 0..<hd {
                            s += qkv[(b * S + i) * 3 * D + h * hd + t] * qkv[(b * S + j) * 3 * D + D + h * hd + t]
                        }
                        scores[j] = s / Double(hd).squareRoot()
                    }
                    let mx = scores.max()!
                    let e = scores.map { $0 == -.infinity ? 0 : exp($0 - mx) }
                    let z = e.reduce(0, +)
                    for j in 0..<S {
                        for t in 0..<hd {
                            out[(b * S + i) * D + h * hd + t] +=
                                e[j] / z * qkv[(b * S + j) * 3 * D + 2 * D + h * hd + t]
                        }
                    }
                }
            }
        }
        return out
    }

    /// One KV-cached decoding step is the last row of causal attention over positions 0...p: the
    /// reference for `attentionStepForward` is `attention` itself, row p of each sequence.
    public static func attentionLastRow(
        _ qkv: [Double], batch: Int, seqLen S: Int, dim D: Int,
        heads NH: Int
    ) -> [Double] {
        let all = attention(qkv, batch: batch, seqLen: S, dim: D, heads: NH, causal: true)
        var last: [Double] = []
        for b in 0..<batch {
            let start = (b * S + S - 1) * D
            last += all[start..<(start + D)]
        }
        return last
    }

    public static func add(_ a: [Double], _ b: [Double]) -> [Double] { zip(a, b).map { $0 + $1 } }

    public static func swiglu(_ ab: [Double], n: Int, f: Int) -> [Double] {
        var y = [Double](repeating: 0, count: n * f)
        for i in 0..<n {
            for j in 0..<f {
                let a = ab[i * 2 * f + j]
                let b = ab[i * 2 * f + f + j]
                y[i * f + j] = a / (1 + exp(-a)) * b
            }
        }
        return y
    }

    /// Per-row cross entropy; rows with target < 0 give 0.
    public static func crossEntropy(_ logits: [Double], _ targets: [Int], v: Int) -> [Double] {
        targets.enumerated().map { i, y in
            if y < 0 { return 0 }
            let row = logits[(i * v)..<((i + 1) * v)]
            let mx = row.max()!
            return mx + log(row.reduce(0) { $0 + exp($1 - mx) }) - logits[i * v + y]
        }
    }

    /// Central finite differences of a scalar function: the gradient check used by every test.
    public static func numericGradient(_ x: [Double], h: Double = 1e-5, _ f: ([Double]) -> Double) -> [Double] {
        var x = x
        return (0..<x.count).map { i in
            let old = x[i]
            x[i] = old + h
            let a = f(x)
            x[i] = old - h
            let b = f(x)
            x[i] = old
            return (a - b) / (2 * h)
        }
    }
}

// Twins of AdaLN.swift (SPEC section 9), in Double, from the equations.
extension Reference {
    /// LayerNorm of each row of width d: (x - mean) / sqrt(var + eps), times w plus b when given.
    public static func layernorm(_ x: [Double], _ w: [Double]?, _ b: [Double]?, n: Int, d: Int, eps: Double) -> [Double]
    {
        var y = x
        for i in 0..<n {
            let row = Array(x[(i * d)..<((i + 1) * d)])
            let mean = row.reduce(0, +) / Double(d)
            let variance = row.reduce(0) { $0 + ($1 - mean) * ($1 - mean) } / Double(d)
            for j in 0..<d {
                let xhat = (row[j] - mean) / (variance + eps).squareRoot()
                y[i * d + j] = w.map { xhat * $0[j] + b![j] } ?? xhat
            }
        }
        return y
    }

    /// QK-norm: a LayerNorm over each head's q (weights wq, bq) and k (wk, bk) in qkv (n, 3D).
    public static func qkNorm(
        _ qkv: [Double], wq: [Double], bq: [Double], wk: [Double], bk: [Double], n: Int, dim D: Int, heads NH: Int,
        eps: Double
    ) -> [Double] {
        let hd = D / NH
        var y = qkv
        for i in 0..<n {
            for s in 0..<(2 * NH) {
                let start = i * 3 * D + s * hd
                let normed = layernorm(
                    Array(qkv[start..<(start + hd)]), s < NH ? wq : wk, s < NH ? bq : bk, n: 1, d: hd, eps: eps)
                for j in 0..<hd { y[start + j] = normed[j] }
            }
        }
        return y
    }

    public static func gelu(_ x: [Double]) -> [Double] { x.map { 0.5 * $0 * (1 + erf($0 / 2.0.squareRoot())) } }
    public static func silu(_ x: [Double]) -> [Double] { x.map { $0 / (1 + exp(-$0)) } }

    /// Row i: x * (1 + scale_i) + shift_i, shift and scale (n, d).
    public static func modulate(_ x: [Double], shift: [Double], scale: [Double]) -> [Double] {
        (0..<x.count).map { x[$0] * (1 + scale[$0]) + shift[$0] }
    }

    /// h + gate * y, elementwise.
    public static func gatedAdd(_ h: [Double], _ y: [Double], gate: [Double]) -> [Double] {
        (0..<h.count).map { h[$0] + gate[$0] * y[$0] }
    }

    /// Each row of (n, oc) plus bias (oc).
    public static func biasAdd(_ x: [Double], _ bias: [Double], n: Int, oc: Int) -> [Double] {
        (0..<(n * oc)).map { x[$0] + bias[$0 % oc] }
    }
}
