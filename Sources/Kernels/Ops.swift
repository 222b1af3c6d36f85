import Foundation
import Platform

// Fast Float32 kernels, llm.c style: each `*Forward` sits above its `*Backward`. Argument order:
// outputs, values cached for backward, inputs and weights, dimensions. Backward ADDS into
// gradients (gradients are zeroed once per step). Shapes are in the comments: (N, D) means N rows
// of D floats, row-major. Every kernel has a slow generic twin in Reference.swift and a test.
// Every kernel runs on the rank's threads, split so that results do not depend on their number
// (Parallel.swift).

public typealias FloatPtr = UnsafeMutablePointer<Float>
public typealias ConstFloatPtr = UnsafePointer<Float>

// MARK: - embedding

/// out (N, D) = table[ids] (V, D); an id < 0 writes zeros (callers handle pads themselves).
public func embeddingForward(_ out: FloatPtr, _ ids: UnsafePointer<Int32>, _ table: ConstFloatPtr, n: Int, d: Int) {
    parallelRanges(n, cost: d) { rows in
        for i in rows {
            let id = Int(ids[i])
            if id < 0 {
                (out + i * d).update(repeating: 0, count: d)
            } else {
                (out + i * d).update(from: table + id * d, count: d)
            }
        }
    }
}

/// dtable[ids[i]] += dout[i]. Split by columns: each part adds its columns over all rows in order.
public func embeddingBackward(_ dtable: FloatPtr, _ dout: ConstFloatPtr, _ ids: UnsafePointer<Int32>, n: Int, d: Int) {
    parallelRanges(d, cost: n, align: 16) { cols in
        for i in 0..<n {
            let id = Int(ids[i])
            if id < 0 { continue }
            let g = dtable + id * d
            let s = dout + i * d
            for j in cols { g[j] += s[j] }
        }
    }
}

// MARK: - RMSNorm  y = x / sqrt(mean(x^2) + eps) * w

/// out (N, D), rstd (N) cached; inp (N, D), weight (D).
public func rmsnormForward(
    _ out: FloatPtr, _ rstd: FloatPtr, _ inp: ConstFloatPtr, _ weight: ConstFloatPtr, n: Int, d: Int, eps: Float
) {
    parallelRanges(n, cost: 2 * d) { rows in
        for i in rows {
            let x = inp + i * d
            let y = out + i * d
            let ss = laneDot(x, x, count: d)
            let r = 1 / (ss / Float(d) + eps).squareRoot()
            rstd[i] = r
            for j in 0..<d { y[j] = x[j] * r * weight[j] }
        }
    }
}

/// dx = r (w dy) - x r^3 / D * sum(w dy x);  dw += sum_rows dy x r. On one thread one pass;
/// on several, dx by rows, then dw by columns (each column summed over the rows in row order,
/// as the single pass does: the same bits).
public func rmsnormBackward(
    _ dinp: FloatPtr, _ dweight: FloatPtr, _ dout: ConstFloatPtr, _ inp: ConstFloatPtr, _ weight: ConstFloatPtr,
    _ rstd: ConstFloatPtr, n: Int, d: Int
) {
    if partCount(n, cost: 3 * d) == 1 {
        for i in 0..<n {
            rmsnormRowBackward(dinp, dout, inp, weight, rstd, row: i, d: d)
            let x = inp + i * d
            let dy = dout + i * d
            let r = rstd[i]
            for j in 0..<d { dweight[j] += dy[j] * x[j] * r }
        }
        return
    }
    parallelRanges(n, cost: 3 * d) { rows in
        for i in rows { rmsnormRowBackward(dinp, dout, inp, weight, rstd, row: i, d: d) }
    }
    parallelRanges(d, cost: n, align: 16) { cols in
        for i in 0..<n {
            let x = inp + i * d
            let dy = dout + i * d
            let r = rstd[i]
            for j in cols { dweight[j] += dy[j] * x[j] * r }
        }
    }
}

/// One row of RMSNorm's input gradient: dx += r (w dy) - x r^3 / D * sum(w dy x).
@inline(__always)
private func rmsnormRowBackward(
    _ dinp: FloatPtr, _ dout: ConstFloatPtr, _ inp: ConstFloatPtr, _ weight: ConstFloatPtr,
    _ rstd: ConstFloatPtr, row i: Int, d: Int
) {
    let x = inp + i * d
    let dy = dout + i * d
    let dx = dinp + i * d
    let r = rstd[i]
    let dot = laneDot(weight, dy, x, count: d)
    let c = dot * r * r * r / Float(d)
    for j in 0..<d { dx[j] += r * weight[j] * dy[j] - x[j] * c }
}

// MARK: - linear  y = x W^T, W stored (out, in)

/// out (N, OC) = inp (N, IC) W^T, weight (OC, IC). `accumulate` adds into out. Inside
/// `PackedWeightCache.using` (sampling) a weight of the model goes through its packed copy.
public func matmulForward(
    _ out: FloatPtr, _ inp: ConstFloatPtr, _ weight: ConstFloatPtr, n: Int, ic: Int, oc: Int, accumulate: Bool = false
) {
    if let packed = PackedWeightCache.weights(weight, n: oc, k: ic) {
        return packed.multiply(inp, rows: n, ldx: ic, into: out, ldy: oc, accumulate: accumulate)
    }
    BLAS.sgemm(
        transA: false, transB: true, m: n, n: oc, k: ic, inp, lda: ic, weight, ldb: ic, beta: accumulate ? 1 : 0, out,
        ldc: oc)
}

/// dinp (N, IC) += dout W; dweight (OC, IC) += dout^T inp. Either may be nil (not needed).
/// `addToInput: false` writes dinp = dout W instead (the same bits as adding to zeros, without
/// a serial pass to zero it first: sgemm's own zeroing runs on its tiles' threads).
public func matmulBackward(
    _ dinp: FloatPtr?, _ dweight: FloatPtr?, _ dout: ConstFloatPtr, _ inp: ConstFloatPtr, _ weight: ConstFloatPtr,
    n: Int, ic: Int, oc: Int, addToInput: Bool = true
) {
    if let dinp {
        BLAS.sgemm(
            transA: false, transB: false, m: n, n: ic, k: oc, dout, lda: oc, weight, ldb: ic, beta: addToInput ? 1 : 0,
            dinp, ldc: ic)
    }
    if let dweight {
        BLAS.sgemm(
            transA: true, transB: false, m: oc, n: ic, k: n, dout, lda: oc, inp, ldb: ic, beta: 1, dweight, ldc: ic)
    }
}

// MARK: - 2D rotary embedding (LlamaGen), applied in place to q and k inside qkv

/// The table (S, hd/2) of cos and sin for a sequence whose position 0 is the class slot
/// (cos = sin = 0, SPEC section 2) and position p >= 1 sits at grid cell ((p-1)/W, (p-1)%W).
public struct RotaryTable {
    public let cos: [Float], sin: [Float]
    public let seqLen: Int, half: Int
    public init(seqLen: Int, gridW: Int, headDim: Int, base: Float) {
        let n = headDim / 4
        let half = headDim / 2
        var c = [Float](repeating: 0, count: seqLen * half)
        var s = c
        for p in 1..<max(seqLen, 1) {
            let r = Double((p - 1) / gridW)
            let col = Double((p - 1) % gridW)
            for i in 0..<n {
                let f = pow(Double(base), -4.0 * Double(i) / Double(headDim))
                let a1 = r * f
                let a2 = col * f
                c[p * half + i] = Float(Foundation.cos(a1))
                s[p * half + i] = Float(Foundation.sin(a1))
                c[p * half + n + i] = Float(Foundation.cos(a2))
                s[p * half + n + i] = Float(Foundation.sin(a2))
            }
        }
        self.cos = c
        self.sin = s
        self.seqLen = seqLen
        self.half = half
    }
}

/// Rotates q and k (the first 2D columns of each qkv row (B*S, 3D)) by +angle (forward) or by
/// -angle (`inverse`, which is the backward pass: the rotation's transpose).
/// `position` offsets the table: a KV-cached decoding step passes seqLen 1 and its position.
public func rotaryApply(
    _ qkv: FloatPtr, _ table: RotaryTable, batch: Int, seqLen: Int, dim: Int, heads: Int, inverse: Bool = false,
    position: Int = 0
) {
    let hd = dim / heads
    let half = hd / 2
    let sgn: Float = inverse ? -1 : 1
    table.cos.withUnsafeBufferPointer { cp in
        table.sin.withUnsafeBufferPointer { sp in
            parallelRanges(batch * seqLen, cost: 4 * dim) { rows in
                for bp in rows {
                    let p = bp % seqLen
                    let row = qkv + bp * 3 * dim
                    let c = cp.baseAddress! + (p + position) * half
                    let s = sp.baseAddress! + (p + position) * half
                    for part in 0..<2 {  // q then k
                        for h in 0..<heads {
                            let x = row + part * dim + h * hd
                            for i in 0..<half {
                                let x0 = x[2 * i]
                                let x1 = x[2 * i + 1]
                                let si = sgn * s[i]
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

/// Query rows per block of causal attention: a block multiplies only the keys up to its last
/// row, so about half of the S x S scores (the masked ones) are never computed.
public let attentionBlockRows = 64

/// Matmul FLOPs attention's forward does for one (sequence, head), 2 per multiply-add: scores
/// and weighted sum over the (row, key) pairs computed. Backward does twice this (dP, dV, dQ, dK
/// over the same pairs). Short sequences (the direct loops) and full masks compute all S x S.
public func attentionFLOPs(seqLen S: Int, headDim hd: Int, causal: Bool) -> Double {
    if S < 16 || !causal { return 4 * Double(S * S * hd) }
    var pairs = 0
    for r0 in stride(from: 0, to: S, by: attentionBlockRows) {
        let r1 = min(S, r0 + attentionBlockRows)
        pairs += (r1 - r0) * r1
    }
    return 4 * Double(pairs * hd)
}

/// Where one (sequence, head) of attention reads and writes: q, k, v (and their gradients)
/// inside qkv rows of 3D floats, o inside rows of D, P its (S, S) probabilities.
private struct HeadView {
    let q, k, v: FloatPtr
    let o: FloatPtr
    let P: FloatPtr
}

/// Scale, shape and mask of one attention call.
private struct AttentionShape {
    let S, D, hd, ld: Int
    let scale: Float
    let causal: Bool
    init(seqLen S: Int, dim D: Int, heads NH: Int, causal: Bool) {
        self.S = S
        self.D = D
        hd = D / NH
        ld = 3 * D
        scale = 1 / Float(D / NH).squareRoot()
        self.causal = causal
    }
    /// Query rows per block: blocks only pay off under a causal mask.
    var block: Int { causal ? attentionBlockRows : S }
    /// The keys a block of rows ending at r1 sees.
    func cols(_ r1: Int) -> Int { causal ? r1 : S }
}

private let attentionScratch = PartScratch()

/// probs (B, NH, S, S) cached. Causal or full mask. Split by (sequence, head) over the threads.
/// Long sequences use sgemm, blocked by query rows under the causal mask; short ones (the plug-in's
/// k+1 slots) use direct loops, where sgemm's call overhead dominates.
/// `dropMask` (B, NH, S, S), when given, is an inverted-dropout mask on the probabilities (RAR,
/// SPEC section 9): out = (P * mask) V, with P (undropped) still cached in probs. Without it the
/// code path is the one the LlamaGen models always ran.
public func attentionForward(
    _ out: FloatPtr, _ probs: FloatPtr, _ qkv: ConstFloatPtr, batch: Int, seqLen S: Int,
    dim D: Int, heads NH: Int, causal: Bool, dropMask: ConstFloatPtr? = nil
) {
    let a = AttentionShape(seqLen: S, dim: D, heads: NH, causal: causal)
    let src = UnsafeMutablePointer(mutating: qkv)
    let dropped = dropMask.map { _ in droppedScratch.reserve(parts: maxParts(), floats: S * S) }
    parallelParts(batch * NH, cost: 2 * S * S * a.hd) { tasks, part in
        for task in tasks {
            let (b, h) = task.quotientAndRemainder(dividingBy: NH)
            let base = src + b * S * a.ld + h * a.hd
            let view = HeadView(
                q: base, k: base + D, v: base + 2 * D, o: out + b * S * D + h * a.hd,
                P: probs + task * S * S)
            if let dropMask, let dropped {
                headForwardBlocked(view, a, drop: ProbabilityDropout(mask: dropMask + task * S * S, W: dropped[part]))
            } else if S >= 16 {
                headForwardBlocked(view, a)
            } else {
                headForwardDirect(view, a)
            }
        }
    }
}

/// Attention dropout on one head's probabilities (SPEC section 9): the keyed mask (S, S), already
/// scaled, and scratch W (S, S) for P * mask. P itself stays undropped (the softmax backward reads it).
private struct ProbabilityDropout {
    let mask: ConstFloatPtr
    let W: FloatPtr
}

/// With `drop`, the weighted sum is taken over W = P * mask (any S).
private func headForwardBlocked(_ t: HeadView, _ a: AttentionShape, drop: ProbabilityDropout? = nil) {
    let S = a.S
    for r0 in stride(from: 0, to: S, by: a.block) {
        let r1 = min(S, r0 + a.block)
        let cols = a.cols(r1)
        BLAS.sgemm(
            transA: false, transB: true, m: r1 - r0, n: cols, k: a.hd, alpha: a.scale, t.q + r0 * a.ld,
            lda: a.ld, t.k, ldb: a.ld, beta: 0, t.P + r0 * S, ldc: S)
        softmaxRows(t.P, r0..<r1, a)
        var weights = t.P
        if let drop {
            for i in r0..<r1 {
                for j in 0..<cols { drop.W[i * S + j] = t.P[i * S + j] * drop.mask[i * S + j] }
            }
            weights = drop.W
        }
        BLAS.sgemm(
            transA: false, transB: false, m: r1 - r0, n: a.hd, k: cols, weights + r0 * S, lda: S, t.v, ldb: a.ld,
            beta: 0, t.o + r0 * a.D, ldc: a.D)
    }
}

private func headForwardDirect(_ t: HeadView, _ a: AttentionShape) {
    let S = a.S
    for i in 0..<S {
        let qi = t.q + i * a.ld
        for j in 0..<S {
            let kj = t.k + j * a.ld
            t.P[i * S + j] = laneDot(qi, kj, count: a.hd) * a.scale
        }
    }
    softmaxRows(t.P, 0..<S, a)
    for i in 0..<S {
        let oi = t.o + i * a.D
        oi.update(repeating: 0, count: a.hd)
        for j in 0..<S {
            let p = t.P[i * S + j]
            if p == 0 { continue }
            let vj = t.v + j * a.ld
            for c in 0..<a.hd { oi[c] += p * vj[c] }
        }
    }
}

/// row[j] = exp(row[j] - max) for j < n, in place; returns their sum (a softmax's unnormalised
/// half, shared by the training and the cached attention).
@inline(__always)
private func exponentiateShifted(_ row: FloatPtr, count n: Int) -> Float {
    shiftedExps(row, row, shift: laneMax(row, count: n), count: n)
}

/// Masked softmax of the score rows `rows` of P (S, S), in place; masked entries become 0.
@inline(__always)
private func softmaxRows(_ P: FloatPtr, _ rows: Range<Int>, _ a: AttentionShape) {
    let S = a.S
    for i in rows {
        let row = P + i * S
        let last = a.causal ? i : S - 1
        let sum = exponentiateShifted(row, count: last + 1)
        let inv = 1 / sum
        for j in 0...last { row[j] *= inv }
        if last + 1 < S { (row + last + 1).update(repeating: 0, count: S - last - 1) }
    }
}

/// dqkv (B*S, 3D) += gradients through attention. Split by (sequence, head); each part has its
/// own (S, S) scratch for the score gradients.
/// `dropMask`: the mask the forward was given (nil: the original path).
public func attentionBackward(
    _ dqkv: FloatPtr, _ dout: ConstFloatPtr, _ qkv: ConstFloatPtr, _ probs: ConstFloatPtr,
    batch: Int, seqLen S: Int, dim D: Int, heads NH: Int, causal: Bool, dropMask: ConstFloatPtr? = nil
) {
    let a = AttentionShape(seqLen: S, dim: D, heads: NH, causal: causal)
    let scratch = attentionScratch.reserve(parts: maxParts(), floats: S * S)
    let src = UnsafeMutablePointer(mutating: qkv)
    let dO = UnsafeMutablePointer(mutating: dout)
    let P = UnsafeMutablePointer(mutating: probs)
    let dropped = dropMask.map { _ in droppedScratch.reserve(parts: maxParts(), floats: S * S) }
    parallelParts(batch * NH, cost: 4 * S * S * a.hd) { tasks, part in
        for task in tasks {
            let (b, h) = task.quotientAndRemainder(dividingBy: NH)
            let base = src + b * S * a.ld + h * a.hd
            let dbase = dqkv + b * S * a.ld + h * a.hd
            let view = HeadView(
                q: base, k: base + D, v: base + 2 * D, o: dO + b * S * D + h * a.hd,
                P: P + task * S * S)
            let grad = HeadView(q: dbase, k: dbase + D, v: dbase + 2 * D, o: dO, P: scratch[part])
            if let dropMask, let dropped {
                let drop = ProbabilityDropout(mask: dropMask + task * S * S, W: dropped[part])
                headBackwardBlocked(view, grad, a, drop: drop)
            } else if S >= 16 {
                headBackwardBlocked(view, grad, a)
            } else {
                headBackwardDirect(view, grad, a)
            }
        }
    }
}

/// One head's backward with sgemm. `t.o` is dO; `g` holds dq, dk, dv and, in g.P, dP's scratch.
/// By query blocks: dP = dO V^T, the softmax backward, dQ += dS K (keys up to the block's last
/// row). Then by key blocks: dV += P^T dO, dK += dS^T Q over the rows from the block's first
/// key on (the rows above are masked: their P and dS are exactly 0).
/// With `drop` (the backward of `headForwardBlocked` with dropout): dP = (dO V^T) * mask, the
/// softmax backward with the undropped P, and dV += W^T dO with W = P * mask rebuilt in `drop.W`.
private func headBackwardBlocked(_ t: HeadView, _ g: HeadView, _ a: AttentionShape, drop: ProbabilityDropout? = nil) {
    let S = a.S
    let D = a.D
    let ld = a.ld
    let hd = a.hd
    let dP = g.P
    for r0 in stride(from: 0, to: S, by: a.block) {
        let r1 = min(S, r0 + a.block)
        let cols = a.cols(r1)
        BLAS.sgemm(
            transA: false, transB: true, m: r1 - r0, n: cols, k: hd, t.o + r0 * D, lda: D, t.v, ldb: ld,
            beta: 0, dP + r0 * S, ldc: S)
        if let drop { maskBlock(drop, t.P, dP, r0..<r1, cols: cols, S: S) }
        softmaxRowsBackward(t.P, dP, r0..<r1, a)
        BLAS.sgemm(
            transA: false, transB: false, m: r1 - r0, n: hd, k: cols, dP + r0 * S, lda: S, t.k, ldb: ld,
            beta: 1, g.q + r0 * ld, ldc: ld)
    }
    let weights = drop?.W ?? UnsafeMutablePointer(mutating: t.P)
    for c0 in stride(from: 0, to: S, by: a.block) {
        let c1 = min(S, c0 + a.block)
        let r = a.causal ? c0 : 0
        BLAS.sgemm(
            transA: true, transB: false, m: c1 - c0, n: hd, k: S - r, weights + r * S + c0, lda: S, t.o + r * D,
            ldb: D, beta: 1, g.v + c0 * ld, ldc: ld)
        BLAS.sgemm(
            transA: true, transB: false, m: c1 - c0, n: hd, k: S - r, dP + r * S + c0, lda: S, t.q + r * ld,
            ldb: ld, beta: 1, g.k + c0 * ld, ldc: ld)
    }
}

private func headBackwardDirect(_ t: HeadView, _ g: HeadView, _ a: AttentionShape) {
    let S = a.S
    let D = a.D
    let ld = a.ld
    let hd = a.hd
    let dP = g.P
    for i in 0..<S {
        let oi = t.o + i * D
        for j in 0..<S {
            let vj = t.v + j * ld
            dP[i * S + j] = laneDot(oi, vj, count: hd)
            let p = t.P[i * S + j]
            if p == 0 { continue }
            let dvj = g.v + j * ld
            for c in 0..<hd { dvj[c] += p * oi[c] }
        }
    }
    softmaxRowsBackward(t.P, dP, 0..<S, a)
    for i in 0..<S {
        let dqi = g.q + i * ld
        let qi = t.q + i * ld
        for j in 0..<S {
            let d = dP[i * S + j]
            if d == 0 { continue }
            let kj = t.k + j * ld
            let dkj = g.k + j * ld
            for c in 0..<hd {
                dqi[c] += d * kj[c]
                dkj[c] += d * qi[c]
            }
        }
    }
}

private let droppedScratch = PartScratch()

/// Dropout's part of a query block's backward: dP *= mask, and W = P * mask for dV (zero past
/// the block's keys, which the key-block products read under the causal mask).
@inline(__always)
private func maskBlock(
    _ drop: ProbabilityDropout, _ P: ConstFloatPtr, _ dP: FloatPtr, _ rows: Range<Int>, cols: Int, S: Int
) {
    for i in rows {
        for j in 0..<cols {
            dP[i * S + j] *= drop.mask[i * S + j]
            drop.W[i * S + j] = P[i * S + j] * drop.mask[i * S + j]
        }
        if cols < S { (drop.W + i * S + cols).update(repeating: 0, count: S - cols) }
    }
}

/// Softmax backward on rows `rows`, in place in dP: dS = P (dP - sum_j P dP) times the scale;
/// masked entries become 0.
@inline(__always)
private func softmaxRowsBackward(_ P: ConstFloatPtr, _ dP: FloatPtr, _ rows: Range<Int>, _ a: AttentionShape) {
    let S = a.S
    for i in rows {
        let pr = P + i * S
        let dr = dP + i * S
        let last = a.causal ? i : S - 1
        let dot = laneDot(pr, dr, count: last + 1)
        for j in 0...last { dr[j] = pr[j] * (dr[j] - dot) * a.scale }
        if last + 1 < S { (dr + last + 1).update(repeating: 0, count: S - last - 1) }
    }
}

private let stepScratch = PartScratch()

/// One KV-cached decoding position of causal attention for NB rows (SPEC section 5). keys and
/// values (NB, NH, T, hd): one layer's cache, each (row, head) a contiguous (T, hd) block; qkv
/// (NB, 3D) after rotary; out (NB, D). Stores each row's key and value at `position`, then
/// attends over positions 0...position with two sgemv calls per (row, head), which stream the
/// cache about twice as fast as plain loops. Split by (row, head) over the threads.
public func attentionStepForward(
    _ out: FloatPtr, _ keys: FloatPtr, _ values: FloatPtr, _ qkv: ConstFloatPtr,
    rows NB: Int, dim D: Int, heads NH: Int, cacheLength T: Int, position pos: Int
) {
    let hd = D / NH
    let scale = 1 / Float(hd).squareRoot()
    let scratch = stepScratch.reserve(parts: maxParts(), floats: T)
    parallelParts(NB * NH, cost: 4 * (pos + 1) * hd) { tasks, part in
        let sc = scratch[part]
        for task in tasks {
            let (r, h) = task.quotientAndRemainder(dividingBy: NH)
            let kh = keys + task * T * hd
            let vh = values + task * T * hd
            let q = qkv + r * 3 * D + h * hd
            (kh + pos * hd).update(from: q + D, count: hd)
            (vh + pos * hd).update(from: q + 2 * D, count: hd)
            BLAS.sgemv(trans: false, m: pos + 1, n: hd, alpha: scale, kh, lda: hd, q, beta: 0, sc)
            let sum = exponentiateShifted(sc, count: pos + 1)
            BLAS.sgemv(trans: true, m: pos + 1, n: hd, alpha: 1 / sum, vh, lda: hd, sc, beta: 0, out + r * D + h * hd)
        }
    }
}

// MARK: - SwiGLU  out = silu(a) * b, with ab (N, 2F) holding [a | b] per row (w1 and w3 fused)

public func swigluForward(_ out: FloatPtr, _ ab: ConstFloatPtr, n: Int, f: Int) {
    parallelRanges(n, cost: 8 * f) { rows in
        for i in rows {
            let a = ab + i * 2 * f
            let b = a + f
            let o = out + i * f
            for j in 0..<f {
                let x = a[j]
                o[j] = x / (1 + fexp(-x)) * b[j]
            }
        }
    }
}

/// dab (N, 2F) = d[a | b] (overwritten, not added: it is a fresh intermediate).
public func swigluBackward(_ dab: FloatPtr, _ dout: ConstFloatPtr, _ ab: ConstFloatPtr, n: Int, f: Int) {
    parallelRanges(n, cost: 10 * f) { rows in
        for i in rows {
            let a = ab + i * 2 * f
            let b = a + f
            let g = dout + i * f
            let da = dab + i * 2 * f
            let db = da + f
            for j in 0..<f {
                let x = a[j]
                let s = 1 / (1 + fexp(-x))
                db[j] = g[j] * x * s
                da[j] = g[j] * b[j] * s * (1 + x * (1 - s))
            }
        }
    }
}

// MARK: - softmax cross entropy, fused with its backward (llm.c style)

/// For each row i with target y_i >= 0 and weight w_i: loss_i = -log softmax(logits_i)[y_i].
/// When `dlogits` is given it is set to w_i * scale * (softmax - onehot) (may alias logits).
/// Returns the per-row losses in `losses` (N). Rows with target < 0 get loss 0 and zero gradient.
public func crossEntropyForwardBackward(
    _ losses: FloatPtr, _ dlogits: FloatPtr?, _ logits: FloatPtr, _ targets: UnsafePointer<Int32>,
    _ weights: ConstFloatPtr, scale: Float, n: Int, v: Int
) {
    parallelRanges(n, cost: 6 * v) { rows in
        for i in rows {
            crossEntropyRow(losses, dlogits, logits, targets, weights, scale: scale, row: i, v: v)
        }
    }
}

@inline(__always)
private func crossEntropyRow(
    _ losses: FloatPtr, _ dlogits: FloatPtr?, _ logits: FloatPtr,
    _ targets: UnsafePointer<Int32>, _ weights: ConstFloatPtr, scale: Float,
    row i: Int, v: Int
) {
    let row = logits + i * v
    let y = Int(targets[i])
    if y < 0 {
        losses[i] = 0
        if let d = dlogits { (d + i * v).update(repeating: 0, count: v) }
        return
    }
    let mx = laneMax(row, count: v)
    let target = row[y]  // read first: dlogits may be the logits themselves
    // the exps go where the gradient goes (or to scratch), so the sum is one vector pass and the
    // gradient a multiply: softmax = exp(x - max) / sum
    guard let d = dlogits else {
        let sum = withUnsafeTemporaryAllocation(of: Float.self, capacity: v) { e in
            shiftedExps(e.baseAddress!, row, shift: mx, count: v)
        }
        losses[i] = mx + logf(sum) - target
        return
    }
    let dr = d + i * v
    let sum = shiftedExps(dr, row, shift: mx, count: v)
    losses[i] = mx + logf(sum) - target
    let g = weights[i] * scale
    let c = g / sum
    for j in 0..<v { dr[j] *= c }
    dr[y] -= g
}

// MARK: - residual add: out = a + b (out may be a or b); its backward passes the gradient to both

public func addForward(_ out: FloatPtr, _ a: ConstFloatPtr, _ b: ConstFloatPtr, count: Int) {
    parallelRanges(count, cost: 1, align: 16) { range in
        for i in range { out[i] = a[i] + b[i] }
    }
}

// MARK: - copies and zeroing, split over the threads
// A step copies and zeros a few MB per block (residual streams, backward scratch); done on the
// calling thread they were part of what kept a step from scaling with threads.

/// dst[i] = src[i] for i < count (not overlapping).
public func copyFloats(_ dst: FloatPtr, from src: ConstFloatPtr, count: Int) {
    parallelRanges(count, cost: 1, align: 16) { range in
        (dst + range.lowerBound).update(from: src + range.lowerBound, count: range.count)
    }
}

/// p[i] = 0 for i < count.
public func zeroFloats(_ p: FloatPtr, count: Int) {
    parallelRanges(count, cost: 1, align: 16) { range in
        (p + range.lowerBound).update(repeating: 0, count: range.count)
    }
}

// MARK: - dropout (inverted): out = x * mask, mask in {0, 1/(1-p)}

/// Applies a precomputed mask (N*D) in place: x *= mask. The mask comes from `dropoutMask`.
public func dropoutApply(_ x: FloatPtr, _ mask: ConstFloatPtr, count: Int) {
    dropoutApply(x, x, mask, count: count)
}

/// out = x * mask (out may be x).
public func dropoutApply(_ out: FloatPtr, _ x: ConstFloatPtr, _ mask: ConstFloatPtr, count: Int) {
    parallelRanges(count, cost: 1, align: 16) { range in
        for i in range { out[i] = x[i] * mask[i] }
    }
}

/// Fills mask (rows, D) for rows belonging to samples: row r belongs to sample `rowSample[r]`,
/// whose stream is keyed (seed, step, global sample position, site), so masks do not depend on
/// how the batch is split across ranks. Rows of one sample are drawn in row order. Split by
/// ranges of the mask: a range inside a sample starts its stream where the draws before it end.
public func dropoutMask(
    _ mask: FloatPtr, p: Float, rows: Int, d: Int, rowsPerSample: Int, samplePositions: [Int],
    seed: UInt64, step: Int, site: Int
) {
    let keep = 1 / (1 - p)
    let perSample = rowsPerSample * d
    let total = rows / rowsPerSample * perSample
    samplePositions.withUnsafeBufferPointer { positions in
        parallelRanges(total, cost: 4, align: 16) { range in
            var i = range.lowerBound
            while i < range.upperBound {
                let (s, offset) = i.quotientAndRemainder(dividingBy: perSample)
                let end = min(range.upperBound, (s + 1) * perSample)
                var rng = CounterRNG(
                    seed: seed, UInt64(step), UInt64(positions[s]), RandomPurpose.dropout.rawValue,
                    UInt64(site))
                rng.skip(offset)
                for j in i..<end { mask[j] = rng.uniform() < p ? 0 : keep }
                i = end
            }
        }
    }
}
