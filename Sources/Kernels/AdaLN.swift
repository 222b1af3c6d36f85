import Foundation
import Platform

// Kernels of RAR's DiT-style block (SPEC section 9): LayerNorm with and without weight and bias,
// the QK LayerNorm over the head width, exact (erf) GELU, SiLU, adaLN modulation and gates, bias
// add with its column-sum gradient, and table rows added by index (learned positions). Same
// conventions as Ops.swift: outputs first, backward adds into parameter gradients, every output
// element computed by one part in the serial order (bit-identical at any thread count), a slow
// Double twin of each in Reference.swift.

// MARK: - LayerNorm  y = (x - mean) / sqrt(var + eps) * w + b  (w, b optional)

/// One row: writes y, returns (mean, rstd).
@inline(__always)
private func layernormRow(
    _ y: FloatPtr, _ x: ConstFloatPtr, _ w: ConstFloatPtr?, _ b: ConstFloatPtr?, d: Int, eps: Float
) -> (Float, Float) {
    let mean = laneSum(x, count: d) / Float(d)
    let ss = laneSum(
        count: d,
        lanes: {
            let c = load16(x + $0) - mean
            return c * c
        },
        one: {
            let c = x[$0] - mean
            return c * c
        })
    let r = 1 / (ss / Float(d) + eps).squareRoot()
    if let w, let b {
        for j in 0..<d { y[j] = (x[j] - mean) * r * w[j] + b[j] }
    } else {
        for j in 0..<d { y[j] = (x[j] - mean) * r }
    }
    return (mean, r)
}

/// One row's input gradient, added: dx += r (g - mean(g) - xhat mean(g xhat)), g = dy w (or dy).
@inline(__always)
private func layernormRowBackward(
    _ dx: FloatPtr, _ dy: ConstFloatPtr, _ x: ConstFloatPtr, _ w: ConstFloatPtr?, mean: Float, rstd r: Float,
    d: Int
) {
    // g = dy w (or dy); sums of g and of g xhat, each in lanes (FastMath.swift)
    let sg = w.map { laneDot(dy, $0, count: d) } ?? laneSum(dy, count: d)
    let sgx = laneSum(
        count: d,
        lanes: { j in
            let g = w.map { load16(dy + j) * load16($0 + j) } ?? load16(dy + j)
            return g * (load16(x + j) - mean) * r
        },
        one: { j in
            let g = w.map { dy[j] * $0[j] } ?? dy[j]
            return g * (x[j] - mean) * r
        })
    let mg = sg / Float(d)
    let mgx = sgx / Float(d)
    for j in 0..<d {
        let g = w.map { dy[j] * $0[j] } ?? dy[j]
        let xhat = (x[j] - mean) * r
        dx[j] += r * (g - mg - xhat * mgx)
    }
}

/// out (N, D), mean and rstd (N) cached; inp (N, D); weight and bias (D), both or neither.
public func layernormForward(
    _ out: FloatPtr, _ mean: FloatPtr, _ rstd: FloatPtr, _ inp: ConstFloatPtr, _ weight: ConstFloatPtr?,
    _ bias: ConstFloatPtr?, n: Int, d: Int, eps: Float
) {
    parallelRanges(n, cost: 3 * d) { rows in
        for i in rows {
            let (m, r) = layernormRow(out + i * d, inp + i * d, weight, bias, d: d, eps: eps)
            mean[i] = m
            rstd[i] = r
        }
    }
}

/// dinp (N, D) += the input gradient; dweight, dbias (D) += sum over rows of dy xhat and dy
/// (split by columns, each summed over the rows in row order). Pass nil weight for none.
public func layernormBackward(
    _ dinp: FloatPtr, _ dweight: FloatPtr?, _ dbias: FloatPtr?, _ dout: ConstFloatPtr, _ inp: ConstFloatPtr,
    _ weight: ConstFloatPtr?, _ mean: ConstFloatPtr, _ rstd: ConstFloatPtr, n: Int, d: Int
) {
    parallelRanges(n, cost: 4 * d) { rows in
        for i in rows {
            layernormRowBackward(
                dinp + i * d, dout + i * d, inp + i * d, weight, mean: mean[i], rstd: rstd[i], d: d)
        }
    }
    guard let dweight, let dbias else { return }
    parallelRanges(d, cost: 2 * n, align: 16) { cols in
        for i in 0..<n {
            let x = inp + i * d
            let dy = dout + i * d
            let m = mean[i]
            let r = rstd[i]
            for j in cols {
                dweight[j] += dy[j] * (x[j] - m) * r
                dbias[j] += dy[j]
            }
        }
    }
}

// MARK: - QK LayerNorm: q and k of every head (the first 2D columns of qkv rows), over hd

/// Normalises, in place, each head's q and k (width hd) of qkv (N, 3D) with the q weights and
/// bias (hd) on q and the k ones on k. raw (N, 2D) keeps the values before, mean and rstd
/// (N, 2 NH) their statistics (q heads, then k heads).
public func qkNormForward(
    _ qkv: FloatPtr, raw: FloatPtr, mean: FloatPtr, rstd: FloatPtr, qWeight: ConstFloatPtr, qBias: ConstFloatPtr,
    kWeight: ConstFloatPtr, kBias: ConstFloatPtr, n: Int, dim D: Int, heads NH: Int, eps: Float
) {
    let hd = D / NH
    parallelRanges(n, cost: 6 * D) { rows in
        for i in rows {
            let row = qkv + i * 3 * D
            (raw + i * 2 * D).update(from: row, count: 2 * D)
            for s in 0..<(2 * NH) {
                let w = s < NH ? qWeight : kWeight
                let b = s < NH ? qBias : kBias
                let (m, r) = layernormRow(row + s * hd, raw + i * 2 * D + s * hd, w, b, d: hd, eps: eps)
                mean[i * 2 * NH + s] = m
                rstd[i * 2 * NH + s] = r
            }
        }
    }
}

/// In place in dqkv (N, 3D): the gradient w.r.t. the normed q, k becomes the one w.r.t. the raw
/// q, k; the four parameter gradients (hd each) are added, each column summed over rows, then
/// heads, in order.
public func qkNormBackward(
    _ dqkv: FloatPtr, raw: ConstFloatPtr, mean: ConstFloatPtr, rstd: ConstFloatPtr, qWeight: ConstFloatPtr,
    kWeight: ConstFloatPtr, dqWeight: FloatPtr, dqBias: FloatPtr, dkWeight: FloatPtr, dkBias: FloatPtr,
    n: Int, dim D: Int, heads NH: Int
) {
    let hd = D / NH
    // parameter gradients first: they read the gradient w.r.t. the normed values
    parallelRanges(hd, cost: 4 * n * NH, align: 16) { cols in
        for i in 0..<n {
            for s in 0..<(2 * NH) {
                let dy = dqkv + i * 3 * D + s * hd
                let x = raw + i * 2 * D + s * hd
                let m = mean[i * 2 * NH + s]
                let r = rstd[i * 2 * NH + s]
                let dw = s < NH ? dqWeight : dkWeight
                let db = s < NH ? dqBias : dkBias
                for j in cols {
                    dw[j] += dy[j] * (x[j] - m) * r
                    db[j] += dy[j]
                }
            }
        }
    }
    parallelRanges(n, cost: 8 * D) { rows in
        var dxBuf = [Float](repeating: 0, count: hd)
        dxBuf.withUnsafeMutableBufferPointer { dxp in
            let dx = dxp.baseAddress!
            for i in rows {
                for s in 0..<(2 * NH) {
                    let dy = dqkv + i * 3 * D + s * hd
                    dx.update(repeating: 0, count: hd)
                    layernormRowBackward(
                        dx, dy, raw + i * 2 * D + s * hd, s < NH ? qWeight : kWeight, mean: mean[i * 2 * NH + s],
                        rstd: rstd[i * 2 * NH + s], d: hd)
                    dy.update(from: dx, count: hd)
                }
            }
        }
    }
}

// MARK: - GELU (exact)  y = x/2 (1 + erf(x / sqrt 2))

public func geluForward(_ out: FloatPtr, _ inp: ConstFloatPtr, count: Int) {
    parallelRanges(count, cost: 16, align: 16) { range in
        for i in range {
            let x = inp[i]
            out[i] = 0.5 * x * (1 + erff(x * 0.707_106_781_186_547_5))
        }
    }
}

/// dinp = dout * gelu'(x) (overwritten: a fresh intermediate; dinp may alias dout).
public func geluBackward(_ dinp: FloatPtr, _ dout: ConstFloatPtr, _ inp: ConstFloatPtr, count: Int) {
    parallelRanges(count, cost: 20, align: 16) { range in
        for i in range {
            let x = inp[i]
            let cdf = 0.5 * (1 + erff(x * 0.707_106_781_186_547_5))
            let pdf = fexp(-0.5 * x * x) * 0.398_942_280_401_432_7
            dinp[i] = dout[i] * (cdf + x * pdf)
        }
    }
}

// MARK: - SiLU  y = x sigmoid(x)

public func siluForward(_ out: FloatPtr, _ inp: ConstFloatPtr, count: Int) {
    parallelRanges(count, cost: 8, align: 16) { range in
        for i in range {
            let x = inp[i]
            out[i] = x / (1 + fexp(-x))
        }
    }
}

/// dinp += dout * silu'(x).
public func siluBackward(_ dinp: FloatPtr, _ dout: ConstFloatPtr, _ inp: ConstFloatPtr, count: Int) {
    parallelRanges(count, cost: 10, align: 16) { range in
        for i in range {
            let x = inp[i]
            let s = 1 / (1 + fexp(-x))
            dinp[i] += dout[i] * s * (1 + x * (1 - s))
        }
    }
}

// MARK: - adaLN modulation  y = x (1 + scale) + shift, per row its own scale and shift

// Rows may share a modulation row: with `rowsPerModulation` g, row i reads modulation row i / g
// (the plug-in over RAR conditions all k + 1 vectors of a short sequence on one c_q, SPEC section
// 9). The backward's modulation gradient of a shared row is then the sum over its g rows, each
// column added in row order (a group never splits across parts). g = 1: each row its own.

/// out (N, D) = x (N, D) * (1 + scale) + shift, where row i reads `shift + (i / g) * ld` and
/// `scale + (i / g) * ld` (columns of a modulation matrix (N / g, ld)). out may alias x.
public func modulateForward(
    _ out: FloatPtr, _ x: ConstFloatPtr, shift: ConstFloatPtr, scale: ConstFloatPtr, ld: Int, n: Int, d: Int,
    rowsPerModulation g: Int = 1
) {
    precondition(g >= 1 && n % g == 0, "modulate: \(n) rows in groups of \(g)")
    parallelRanges(n, cost: 2 * d) { rows in
        for i in rows {
            let xi = x + i * d
            let o = out + i * d
            let sh = shift + (i / g) * ld
            let sc = scale + (i / g) * ld
            for j in 0..<d { o[j] = xi[j] * (1 + sc[j]) + sh[j] }
        }
    }
}

/// dx (N, D) += dout (1 + scale); dshift += dout; dscale += dout x (rows of a modulation
/// gradient (N / g, ld): each row its own for g = 1, else the sum over its g rows in order).
public func modulateBackward(
    _ dx: FloatPtr, dshift: FloatPtr, dscale: FloatPtr, _ dout: ConstFloatPtr, _ x: ConstFloatPtr,
    scale: ConstFloatPtr, ld: Int, n: Int, d: Int, rowsPerModulation g: Int = 1
) {
    precondition(g >= 1 && n % g == 0, "modulate backward: \(n) rows in groups of \(g)")
    parallelRanges(n / g, cost: 4 * d * g) { groups in
        for m in groups {
            let sc = scale + m * ld
            let dsh = dshift + m * ld
            let dsc = dscale + m * ld
            for i in (m * g)..<((m + 1) * g) {
                let dy = dout + i * d
                let xi = x + i * d
                let dxi = dx + i * d
                for j in 0..<d {
                    dxi[j] += dy[j] * (1 + sc[j])
                    dsh[j] += dy[j]
                    dsc[j] += dy[j] * xi[j]
                }
            }
        }
    }
}

/// Gated residual: h (N, D) += gate * y, row i's gate at `gate + (i / g) * ld`.
public func gatedAddForward(
    _ h: FloatPtr, _ y: ConstFloatPtr, gate: ConstFloatPtr, ld: Int, n: Int, d: Int, rowsPerModulation g: Int = 1
) {
    precondition(g >= 1 && n % g == 0, "gated add: \(n) rows in groups of \(g)")
    parallelRanges(n, cost: 2 * d) { rows in
        for i in rows {
            let hi = h + i * d
            let yi = y + i * d
            let gi = gate + (i / g) * ld
            for j in 0..<d { hi[j] += gi[j] * yi[j] }
        }
    }
}

/// Backward of the gated residual for the branch: dy (N, D) = dh * gate (overwritten);
/// dgate += dh * y (summed over a group's rows in order). The residual's own gradient is dh itself.
public func gatedAddBackward(
    _ dy: FloatPtr, dgate: FloatPtr, _ dh: ConstFloatPtr, _ y: ConstFloatPtr, gate: ConstFloatPtr, ld: Int, n: Int,
    d: Int, rowsPerModulation g: Int = 1
) {
    precondition(g >= 1 && n % g == 0, "gated add backward: \(n) rows in groups of \(g)")
    parallelRanges(n / g, cost: 3 * d * g) { groups in
        for m in groups {
            let gm = gate + m * ld
            let dg = dgate + m * ld
            for i in (m * g)..<((m + 1) * g) {
                let dhi = dh + i * d
                let yi = y + i * d
                let dyi = dy + i * d
                for j in 0..<d {
                    dyi[j] = dhi[j] * gm[j]
                    dg[j] += dhi[j] * yi[j]
                }
            }
        }
    }
}

// MARK: - bias of a linear layer

/// out (N, OC) += bias (OC) on every row.
public func biasAddForward(_ out: FloatPtr, _ bias: ConstFloatPtr, n: Int, oc: Int) {
    parallelRanges(n, cost: oc) { rows in
        for i in rows {
            let o = out + i * oc
            for j in 0..<oc { o[j] += bias[j] }
        }
    }
}

/// dbias (OC) += the column sums of dout (N, OC), each column over the rows in row order.
public func biasBackward(_ dbias: FloatPtr, _ dout: ConstFloatPtr, n: Int, oc: Int) {
    parallelRanges(oc, cost: n, align: 16) { cols in
        for i in 0..<n {
            let d = dout + i * oc
            for j in cols { dbias[j] += d[j] }
        }
    }
}

// MARK: - table rows added by index (learned positions)

/// out[i] (D) += table[ids[i]] for N rows; an id < 0 adds nothing. Backward is
/// `embeddingBackward` (dtable[ids[i]] += dout[i]).
public func addRowsForward(_ out: FloatPtr, _ ids: UnsafePointer<Int32>, _ table: ConstFloatPtr, n: Int, d: Int) {
    parallelRanges(n, cost: d) { rows in
        for i in rows where ids[i] >= 0 {
            let o = out + i * d
            let t = table + Int(ids[i]) * d
            for j in 0..<d { o[j] += t[j] }
        }
    }
}
