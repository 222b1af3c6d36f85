import Foundation
import Platform

// Fast Float32 kernels, llm.c style: each `*Forward` sits above its `*Backward`. Argument order:
// outputs, values cached for backward, inputs and weights, dimensions. Backward ADDS into
// gradients (gradients are zeroed once per step). Shapes are in the comments: (N, D) means N rows
// of D floats, row-major. Every kernel has a slow generic twin in Reference.swift and a test.

public typealias FloatPtr = UnsafeMutablePointer<Float>
public typealias ConstFloatPtr = UnsafePointer<Float>

// MARK: - embedding

/// out (N, D) = table[ids] (V, D); an id < 0 writes zeros (callers handle pads themselves).
public func embeddingForward(_ out: FloatPtr, _ ids: UnsafePointer<Int32>, _ table: ConstFloatPtr, n: Int, d: Int) {
    for i in 0..<n {
        let id = Int(ids[i])
        if id < 0 { (out + i * d).update(repeating: 0, count: d) } else { (out + i * d).update(from: table + id * d, count: d) }
    }
}

/// dtable[ids[i]] += dout[i]
public func embeddingBackward(_ dtable: FloatPtr, _ dout: ConstFloatPtr, _ ids: UnsafePointer<Int32>, n: Int, d: Int) {
    for i in 0..<n {
        let id = Int(ids[i])
        if id < 0 { continue }
        let g = dtable + id * d, s = dout + i * d
        for j in 0..<d { g[j] += s[j] }
    }
}

// MARK: - RMSNorm  y = x / sqrt(mean(x^2) + eps) * w

/// out (N, D), rstd (N) cached; inp (N, D), weight (D).
public func rmsnormForward(_ out: FloatPtr, _ rstd: FloatPtr, _ inp: ConstFloatPtr, _ weight: ConstFloatPtr, n: Int, d: Int, eps: Float) {
    for i in 0..<n {
        let x = inp + i * d, y = out + i * d
        var ss: Float = 0
        for j in 0..<d { ss += x[j] * x[j] }
        let r = 1 / (ss / Float(d) + eps).squareRoot()
        rstd[i] = r
        for j in 0..<d { y[j] = x[j] * r * weight[j] }
    }
}

/// dx = r (w dy) - x r^3 / D * sum(w dy x);  dw += sum_rows dy x r
public func rmsnormBackward(_ dinp: FloatPtr, _ dweight: FloatPtr, _ dout: ConstFloatPtr, _ inp: ConstFloatPtr, _ weight: ConstFloatPtr, _ rstd: ConstFloatPtr, n: Int, d: Int) {
    for i in 0..<n {
        let x = inp + i * d, dy = dout + i * d, dx = dinp + i * d
        let r = rstd[i]
        var dot: Float = 0
        for j in 0..<d { dot += weight[j] * dy[j] * x[j] }
        let c = dot * r * r * r / Float(d)
        for j in 0..<d {
            dx[j] += r * weight[j] * dy[j] - x[j] * c
            dweight[j] += dy[j] * x[j] * r
        }
    }
}

// MARK: - linear  y = x W^T, W stored (out, in)

/// out (N, OC) = inp (N, IC) W^T, weight (OC, IC). `accumulate` adds into out.
public func matmulForward(_ out: FloatPtr, _ inp: ConstFloatPtr, _ weight: ConstFloatPtr, n: Int, ic: Int, oc: Int, accumulate: Bool = false) {
    BLAS.sgemm(transA: false, transB: true, m: n, n: oc, k: ic, inp, lda: ic, weight, ldb: ic, beta: accumulate ? 1 : 0, out, ldc: oc)
}

/// dinp (N, IC) += dout W; dweight (OC, IC) += dout^T inp. Either may be nil (not needed).
public func matmulBackward(_ dinp: FloatPtr?, _ dweight: FloatPtr?, _ dout: ConstFloatPtr, _ inp: ConstFloatPtr, _ weight: ConstFloatPtr, n: Int, ic: Int, oc: Int) {
    if let dinp { BLAS.sgemm(transA: false, transB: false, m: n, n: ic, k: oc, dout, lda: oc, weight, ldb: ic, beta: 1, dinp, ldc: ic) }
    if let dweight { BLAS.sgemm(transA: true, transB: false, m: oc, n: ic, k: n, dout, lda: oc, inp, ldb: ic, beta: 1, dweight, ldc: ic) }
}

// MARK: - 2D rotary embedding (LlamaGen), applied in place to q and k inside qkv

/// The table (S, hd/2) of cos and sin for a sequence whose position 0 is the class slot
/// (cos = sin = 0, SPEC section 2) and position p >= 1 sits at grid cell ((p-1)/W, (p-1)%W).
public struct RotaryTable {
    public let cos: [Float], sin: [Float]
    public let seqLen: Int, half: Int
    public init(seqLen: Int, gridW: Int, headDim: Int, base: Float) {
        let n = headDim / 4, half = headDim / 2
        var c = [Float](repeating: 0, count: seqLen * half), s = c
        for p in 1..<max(seqLen, 1) {
            let r = Double((p - 1) / gridW), col = Double((p - 1) % gridW)
            for i in 0..<n {
                let f = pow(Double(base), -4.0 * Double(i) / Double(headDim))
                let a1 = r * f, a2 = col * f
                c[p * half + i] = Float(Foundation.cos(a1)); s[p * half + i] = Float(Foundation.sin(a1))
                c[p * half + n + i] = Float(Foundation.cos(a2)); s[p * half + n + i] = Float(Foundation.sin(a2))
            }
        }
        self.cos = c; self.sin = s; self.seqLen = seqLen; self.half = half
    }
}

/// Rotates q and k (the first 2D columns of each qkv row (B*S, 3D)) by +angle (forward) or by
/// -angle (`inverse`, which is the backward pass: the rotation's transpose).
/// `position` offsets the table: a KV-cached decoding step passes seqLen 1 and its position.
public func rotaryApply(_ qkv: FloatPtr, _ table: RotaryTable, batch: Int, seqLen: Int, dim: Int, heads: Int, inverse: Bool = false, position: Int = 0) {
    let hd = dim / heads, half = hd / 2
    let sgn: Float = inverse ? -1 : 1
    table.cos.withUnsafeBufferPointer { cp in
        table.sin.withUnsafeBufferPointer { sp in
            for b in 0..<batch {
                for p in 0..<seqLen {
                    let row = qkv + (b * seqLen + p) * 3 * dim
                    let c = cp.baseAddress! + (p + position) * half, s = sp.baseAddress! + (p + position) * half
                    for part in 0..<2 {  // q then k
                        for h in 0..<heads {
                            let x = row + part * dim + h * hd
                            for i in 0..<half {
                                let x0 = x[2 * i], x1 = x[2 * i + 1], si = sgn * s[i]
                                x[2 * i] = x0 * c[i] - x1 * si
                                x[2 * i + 1] = x1 * c[i] + x0 * si
                            }
                        }
                    }
                }
            }
        }
    }
}

// MARK: - multi-head attention over qkv (B*S, 3D) -> out (B*S, D)

/// probs (B, NH, S, S) cached. Causal or full mask. Long sequences use sgemm per (batch, head);
/// short ones (the plug-in's k+1 slots) use direct loops, where sgemm's call overhead dominates.
public func attentionForward(_ out: FloatPtr, _ probs: FloatPtr, _ qkv: ConstFloatPtr, batch: Int, seqLen S: Int, dim D: Int, heads NH: Int, causal: Bool) {
    let hd = D / NH
    let scale = 1 / Float(hd).squareRoot()
    let ld = 3 * D
    for b in 0..<batch {
        let base = qkv + b * S * ld
        for h in 0..<NH {
            let q = base + h * hd, k = base + D + h * hd, v = base + 2 * D + h * hd
            let P = probs + (b * NH + h) * S * S
            let o = out + b * S * D + h * hd
            if S >= 16 {
                BLAS.sgemm(transA: false, transB: true, m: S, n: S, k: hd, alpha: scale, q, lda: ld, k, ldb: ld, beta: 0, P, ldc: S)
            } else {
                for i in 0..<S {
                    for j in 0..<S {
                        var s: Float = 0
                        let qi = q + i * ld, kj = k + j * ld
                        for t in 0..<hd { s += qi[t] * kj[t] }
                        P[i * S + j] = s * scale
                    }
                }
            }
            for i in 0..<S {
                let row = P + i * S
                let last = causal ? i : S - 1
                var mx = -Float.infinity
                for j in 0...last { mx = max(mx, row[j]) }
                var sum: Float = 0
                for j in 0...last { let e = fexp(row[j] - mx); row[j] = e; sum += e }
                let inv = 1 / sum
                for j in 0...last { row[j] *= inv }
                if last + 1 < S { for j in (last + 1)..<S { row[j] = 0 } }
            }
            if S >= 16 {
                BLAS.sgemm(transA: false, transB: false, m: S, n: hd, k: S, P, lda: S, v, ldb: ld, beta: 0, o, ldc: D)
            } else {
                for i in 0..<S {
                    let oi = o + i * D
                    oi.update(repeating: 0, count: hd)
                    for j in 0..<S {
                        let p = P[i * S + j], vj = v + j * ld
                        if p == 0 { continue }
                        for t in 0..<hd { oi[t] += p * vj[t] }
                    }
                }
            }
        }
    }
}

/// dqkv (B*S, 3D) += gradients through attention; scratch needs S*S floats.
public func attentionBackward(_ dqkv: FloatPtr, _ scratch: FloatPtr, _ dout: ConstFloatPtr, _ qkv: ConstFloatPtr, _ probs: ConstFloatPtr, batch: Int, seqLen S: Int, dim D: Int, heads NH: Int, causal: Bool) {
    let hd = D / NH
    let scale = 1 / Float(hd).squareRoot()
    let ld = 3 * D
    for b in 0..<batch {
        let base = qkv + b * S * ld, dbase = dqkv + b * S * ld
        for h in 0..<NH {
            let q = base + h * hd, k = base + D + h * hd, v = base + 2 * D + h * hd
            let dq = dbase + h * hd, dk = dbase + D + h * hd, dv = dbase + 2 * D + h * hd
            let P = probs + (b * NH + h) * S * S
            let dO = dout + b * S * D + h * hd
            let dP = scratch
            if S >= 16 {
                // dP = dO V^T (S, S); dV += P^T dO
                BLAS.sgemm(transA: false, transB: true, m: S, n: S, k: hd, dO, lda: D, v, ldb: ld, beta: 0, dP, ldc: S)
                BLAS.sgemm(transA: true, transB: false, m: S, n: hd, k: S, P, lda: S, dO, ldb: D, beta: 1, dv, ldc: ld)
            } else {
                for i in 0..<S {
                    let oi = dO + i * D
                    for j in 0..<S {
                        let vj = v + j * ld
                        var s: Float = 0
                        for t in 0..<hd { s += oi[t] * vj[t] }
                        dP[i * S + j] = s
                        let p = P[i * S + j]
                        if p != 0 { let dvj = dv + j * ld; for t in 0..<hd { dvj[t] += p * oi[t] } }
                    }
                }
            }
            // softmax backward: dS = P (dP - sum_j P dP), then times the scale
            for i in 0..<S {
                let pr = P + i * S, dr = dP + i * S
                let last = causal ? i : S - 1
                var dot: Float = 0
                for j in 0...last { dot += pr[j] * dr[j] }
                for j in 0...last { dr[j] = pr[j] * (dr[j] - dot) * scale }
                if last + 1 < S { for j in (last + 1)..<S { dr[j] = 0 } }
            }
            if S >= 16 {
                // dQ += dS K; dK += dS^T Q
                BLAS.sgemm(transA: false, transB: false, m: S, n: hd, k: S, dP, lda: S, k, ldb: ld, beta: 1, dq, ldc: ld)
                BLAS.sgemm(transA: true, transB: false, m: S, n: hd, k: S, dP, lda: S, q, ldb: ld, beta: 1, dk, ldc: ld)
            } else {
                for i in 0..<S {
                    let dqi = dq + i * ld, qi = q + i * ld
                    for j in 0..<S {
                        let g = dP[i * S + j]
                        if g == 0 { continue }
                        let kj = k + j * ld, dkj = dk + j * ld
                        for t in 0..<hd { dqi[t] += g * kj[t]; dkj[t] += g * qi[t] }
                    }
                }
            }
        }
    }
}

// MARK: - SwiGLU  out = silu(a) * b, with ab (N, 2F) holding [a | b] per row (w1 and w3 fused)

public func swigluForward(_ out: FloatPtr, _ ab: ConstFloatPtr, n: Int, f: Int) {
    for i in 0..<n {
        let a = ab + i * 2 * f, b = a + f, o = out + i * f
        for j in 0..<f { let x = a[j]; o[j] = x / (1 + fexp(-x)) * b[j] }
    }
}

/// dab (N, 2F) = d[a | b] (overwritten, not added: it is a fresh intermediate).
public func swigluBackward(_ dab: FloatPtr, _ dout: ConstFloatPtr, _ ab: ConstFloatPtr, n: Int, f: Int) {
    for i in 0..<n {
        let a = ab + i * 2 * f, b = a + f, g = dout + i * f
        let da = dab + i * 2 * f, db = da + f
        for j in 0..<f {
            let x = a[j], s = 1 / (1 + fexp(-x))
            db[j] = g[j] * x * s
            da[j] = g[j] * b[j] * s * (1 + x * (1 - s))
        }
    }
}

// MARK: - softmax cross entropy, fused with its backward (llm.c style)

/// For each row i with target y_i >= 0 and weight w_i: loss_i = -log softmax(logits_i)[y_i].
/// When `dlogits` is given it is set to w_i * scale * (softmax - onehot) (may alias logits).
/// Returns the per-row losses in `losses` (N). Rows with target < 0 get loss 0 and zero gradient.
public func crossEntropyForwardBackward(_ losses: FloatPtr, _ dlogits: FloatPtr?, _ logits: FloatPtr, _ targets: UnsafePointer<Int32>, _ weights: ConstFloatPtr, scale: Float, n: Int, v: Int) {
    for i in 0..<n {
        let row = logits + i * v
        let y = Int(targets[i])
        if y < 0 { losses[i] = 0; if let d = dlogits { (d + i * v).update(repeating: 0, count: v) }; continue }
        var mx = -Float.infinity
        for j in 0..<v { mx = max(mx, row[j]) }
        var sum: Float = 0
        for j in 0..<v { sum += fexp(row[j] - mx) }
        let logZ = mx + logf(sum)
        let target = row[y]
        losses[i] = logZ - target
        if let d = dlogits {
            let dr = d + i * v
            let g = weights[i] * scale
            for j in 0..<v { dr[j] = g * fexp(row[j] - logZ) }
            dr[y] -= g
        }
    }
}

// MARK: - dropout (inverted): out = x * mask, mask in {0, 1/(1-p)}

/// Applies a precomputed mask (N*D) in place: x *= mask. The mask comes from `dropoutMask`.
public func dropoutApply(_ x: FloatPtr, _ mask: ConstFloatPtr, count: Int) {
    for i in 0..<count { x[i] *= mask[i] }
}

/// Fills mask (rows, D) for rows belonging to samples: row r belongs to sample `rowSample[r]`,
/// whose stream is keyed (seed, step, global sample position, site), so masks do not depend on
/// how the batch is split across ranks. Rows of one sample are drawn in row order.
public func dropoutMask(_ mask: FloatPtr, p: Float, rows: Int, d: Int, rowsPerSample: Int, samplePositions: [Int], seed: UInt64, step: Int, site: Int) {
    let keep = 1 / (1 - p)
    let nSamples = rows / rowsPerSample
    for s in 0..<nSamples {
        var rng = CounterRNG(seed: seed, UInt64(step), UInt64(samplePositions[s]), RandomPurpose.dropout.rawValue, UInt64(site))
        let m = mask + s * rowsPerSample * d
        for i in 0..<(rowsPerSample * d) { m[i] = rng.uniform() < p ? 0 : keep }
    }
}
