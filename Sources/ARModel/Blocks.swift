import Kernels
import Platform

/// Offsets of one transformer block's weights in the flat buffer (SPEC section 2 names).
/// `w13` is w1 followed by w3: the table keeps them adjacent, so one sgemm computes both.
struct BlockWeights {
    let attnNorm, wqkv, wo, ffnNorm, w13, w2: Int
    init(_ t: ParameterTable, prefix: String) {
        attnNorm = t.offset("\(prefix).attention_norm.weight")
        wqkv = t.offset("\(prefix).attention.wqkv.weight")
        wo = t.offset("\(prefix).attention.wo.weight")
        ffnNorm = t.offset("\(prefix).ffn_norm.weight")
        w13 = t.offset("\(prefix).feed_forward.w1.weight")
        precondition(t.offset("\(prefix).feed_forward.w3.weight") == w13 + t.entry("\(prefix).feed_forward.w1.weight")!.count)
        w2 = t.offset("\(prefix).feed_forward.w2.weight")
    }
}

/// Dropout for one forward pass: which samples the rows belong to, keyed for rank invariance.
struct DropoutPlan {
    let p: Float
    let seed: UInt64
    let step: Int
    let samplePositions: [Int]  // global position of each local sample within the global batch
}

/// Activations one block keeps for its backward pass; R = N*S rows.
final class BlockCache {
    let xIn, n1, rstd1, qkv, probs, attY, h, n2, rstd2, ab, g: FlatBuffer
    var mask1: FlatBuffer?, mask2: FlatBuffer?
    init(rows R: Int, sequences N: Int, seqLen S: Int, dim D: Int, heads NH: Int, ffn F: Int) {
        xIn = FlatBuffer(count: R * D); n1 = FlatBuffer(count: R * D); rstd1 = FlatBuffer(count: R)
        qkv = FlatBuffer(count: R * 3 * D); probs = FlatBuffer(count: N * NH * S * S)
        attY = FlatBuffer(count: R * D); h = FlatBuffer(count: R * D); n2 = FlatBuffer(count: R * D)
        rstd2 = FlatBuffer(count: R); ab = FlatBuffer(count: R * 2 * F); g = FlatBuffer(count: R * F)
    }
}

/// Scratch shared by all blocks of a stack during backward (R rows).
final class BlockScratch {
    let tmp, dh, dn, dattY, dqkv, dab, dg, attn: FlatBuffer
    init(rows R: Int, seqLen S: Int, dim D: Int, ffn F: Int) {
        tmp = FlatBuffer(count: R * D); dh = FlatBuffer(count: R * D); dn = FlatBuffer(count: R * D)
        dattY = FlatBuffer(count: R * D); dqkv = FlatBuffer(count: R * 3 * D)
        dab = FlatBuffer(count: R * 2 * F); dg = FlatBuffer(count: R * F); attn = FlatBuffer(count: S * S)
    }
}

/// A stack of base blocks over N sequences of S vectors: the base transformer (causal, 2D rotary)
/// or a plug-in encoder/decoder (full mask, no rotary; SPEC section 3).
final class BlockStack {
    let weights: [BlockWeights]
    let causal: Bool
    let rotary: RotaryTable?
    let D, NH, F: Int
    let eps: Float
    let siteBase: Int  // dropout site ids: siteBase + 2*layer (+1 for the FFN)
    private(set) var N = 0, S = 0
    private var caches: [BlockCache] = []
    private var scratch: BlockScratch?

    init(weights: [BlockWeights], causal: Bool, rotary: RotaryTable?, dim: Int, heads: Int, ffn: Int, eps: Float, siteBase: Int) {
        self.weights = weights; self.causal = causal; self.rotary = rotary
        D = dim; NH = heads; F = ffn; self.eps = eps; self.siteBase = siteBase
    }

    private func prepare(sequences: Int, seqLen: Int) {
        if sequences == N && seqLen == S && caches.count == weights.count { return }
        N = sequences; S = seqLen
        let R = N * S
        caches = weights.map { _ in BlockCache(rows: R, sequences: N, seqLen: S, dim: D, heads: NH, ffn: F) }
        scratch = BlockScratch(rows: R, seqLen: S, dim: D, ffn: F)
    }

    /// x (N*S, D) in: the stack's input; out: its output (overwritten in place).
    func forward(_ x: FlatBuffer, params p: FloatPtr, sequences: Int, seqLen: Int, dropout: DropoutPlan?) {
        prepare(sequences: sequences, seqLen: seqLen)
        let R = N * S
        let tmp = scratch!.tmp.base
        for (l, w) in weights.enumerated() {
            let c = caches[l]
            c.xIn.base.update(from: x.base, count: R * D)
            rmsnormForward(c.n1.base, c.rstd1.base, c.xIn.base, p + w.attnNorm, n: R, d: D, eps: eps)
            matmulForward(c.qkv.base, c.n1.base, p + w.wqkv, n: R, ic: D, oc: 3 * D)
            if let rotary { rotaryApply(c.qkv.base, rotary, batch: N, seqLen: S, dim: D, heads: NH) }
            attentionForward(c.attY.base, c.probs.base, c.qkv.base, batch: N, seqLen: S, dim: D, heads: NH, causal: causal)
            matmulForward(tmp, c.attY.base, p + w.wo, n: R, ic: D, oc: D)
            c.mask1 = applyDropout(tmp, c.mask1, dropout, site: siteBase + 2 * l)
            for i in 0..<(R * D) { c.h.base[i] = c.xIn.base[i] + tmp[i] }
            rmsnormForward(c.n2.base, c.rstd2.base, c.h.base, p + w.ffnNorm, n: R, d: D, eps: eps)
            matmulForward(c.ab.base, c.n2.base, p + w.w13, n: R, ic: D, oc: 2 * F)
            swigluForward(c.g.base, c.ab.base, n: R, f: F)
            matmulForward(tmp, c.g.base, p + w.w2, n: R, ic: F, oc: D)
            c.mask2 = applyDropout(tmp, c.mask2, dropout, site: siteBase + 2 * l + 1)
            for i in 0..<(R * D) { x.base[i] = c.h.base[i] + tmp[i] }
        }
    }

    private func applyDropout(_ t: FloatPtr, _ old: FlatBuffer?, _ plan: DropoutPlan?, site: Int) -> FlatBuffer? {
        guard let plan, plan.p > 0 else { return nil }
        let R = N * S
        let mask = (old?.count == R * D) ? old! : FlatBuffer(count: R * D)
        dropoutMask(mask.base, p: plan.p, rows: R, d: D, rowsPerSample: R / plan.samplePositions.count, samplePositions: plan.samplePositions, seed: plan.seed, step: plan.step, site: site)
        dropoutApply(t, mask.base, count: R * D)
        return mask
    }

    /// dx (N*S, D) in: gradient w.r.t. the stack's output; out: w.r.t. its input (in place).
    /// `onLayerDone(l)` fires when block l's weight gradients are complete (for bucketed allreduce).
    func backward(_ dx: FlatBuffer, params p: FloatPtr, grads gp: FloatPtr, onLayerDone: ((Int) -> Void)? = nil) {
        let R = N * S
        let s = scratch!
        for l in stride(from: weights.count - 1, through: 0, by: -1) {
            let w = weights[l], c = caches[l]
            // out = h + drop(w2(swiglu(w13(norm2(h)))))
            s.dh.base.update(from: dx.base, count: R * D)
            s.tmp.base.update(from: dx.base, count: R * D)
            if let m = c.mask2 { dropoutApply(s.tmp.base, m.base, count: R * D) }
            s.dg.zero()
            matmulBackward(s.dg.base, gp + w.w2, s.tmp.base, c.g.base, p + w.w2, n: R, ic: F, oc: D)
            swigluBackward(s.dab.base, s.dg.base, c.ab.base, n: R, f: F)
            s.dn.zero()
            matmulBackward(s.dn.base, gp + w.w13, s.dab.base, c.n2.base, p + w.w13, n: R, ic: D, oc: 2 * F)
            rmsnormBackward(s.dh.base, gp + w.ffnNorm, s.dn.base, c.h.base, p + w.ffnNorm, c.rstd2.base, n: R, d: D)
            // h = x + drop(wo(attention(rope(wqkv(norm1(x))))))
            s.tmp.base.update(from: s.dh.base, count: R * D)
            if let m = c.mask1 { dropoutApply(s.tmp.base, m.base, count: R * D) }
            s.dattY.zero()
            matmulBackward(s.dattY.base, gp + w.wo, s.tmp.base, c.attY.base, p + w.wo, n: R, ic: D, oc: D)
            s.dqkv.zero()
            attentionBackward(s.dqkv.base, s.attn.base, s.dattY.base, c.qkv.base, c.probs.base, batch: N, seqLen: S, dim: D, heads: NH, causal: causal)
            if let rotary { rotaryApply(s.dqkv.base, rotary, batch: N, seqLen: S, dim: D, heads: NH, inverse: true) }
            s.dn.zero()
            matmulBackward(s.dn.base, gp + w.wqkv, s.dqkv.base, c.n1.base, p + w.wqkv, n: R, ic: D, oc: 3 * D)
            dx.base.update(from: s.dh.base, count: R * D)
            rmsnormBackward(dx.base, gp + w.attnNorm, s.dn.base, c.xIn.base, p + w.attnNorm, c.rstd1.base, n: R, d: D)
            onLayerDone?(l)
        }
    }
}

/// Keys, values and scratch for KV-cached steps of one `BlockStack` over NB rows (SPEC section
/// 5). Every (layer, row, head) keeps its keys and values as one contiguous (T, hd) block, read
/// by two sgemv calls, which stream it about twice as fast as plain loops did.
public final class KVCache {
    let rows, seqLen: Int
    let keys, values: FlatBuffer  // (L, NB, NH, T, hd)
    let n1, rstd, qkv, att, tmp, ab, g, scores: FlatBuffer
    init(layers L: Int, rows NB: Int, seqLen T: Int, dim D: Int, ffn F: Int) {
        rows = NB; seqLen = T
        keys = FlatBuffer(count: L * NB * T * D); values = FlatBuffer(count: L * NB * T * D)
        n1 = FlatBuffer(count: NB * D); rstd = FlatBuffer(count: NB)
        qkv = FlatBuffer(count: NB * 3 * D); att = FlatBuffer(count: NB * D); tmp = FlatBuffer(count: NB * D)
        ab = FlatBuffer(count: NB * 2 * F); g = FlatBuffer(count: NB * F); scores = FlatBuffer(count: T)
    }
}

extension BlockStack {
    func makeCache(rows: Int, seqLen: Int) -> KVCache {
        KVCache(layers: weights.count, rows: rows, seqLen: seqLen, dim: D, ffn: F)
    }

    /// One position `pos` of NB causal sequences with the KV cache (sampling; no dropout):
    /// x (NB, D) in: the inputs at `pos`; out: the stack's outputs there. The same block as
    /// `forward`, the attention reading the cached positions 0...pos.
    func step(_ x: FloatPtr, cache c: KVCache, position pos: Int, params p: FloatPtr) {
        let NB = c.rows, hd = D / NH
        let kC = c.keys.base, vC = c.values.base, qkv = c.qkv.base, att = c.att.base, tmp = c.tmp.base
        let sc = c.scores.base
        let scale = 1 / Float(hd).squareRoot()
        let headBlock = c.seqLen * hd  // floats per (layer, row, head) in either cache
        for (l, bw) in weights.enumerated() {
            rmsnormForward(c.n1.base, c.rstd.base, x, p + bw.attnNorm, n: NB, d: D, eps: eps)
            matmulForward(qkv, c.n1.base, p + bw.wqkv, n: NB, ic: D, oc: 3 * D)
            if let rotary { rotaryApply(qkv, rotary, batch: NB, seqLen: 1, dim: D, heads: NH, position: pos) }
            for r in 0..<NB {
                for h in 0..<NH {
                    let blk = ((l * NB + r) * NH + h) * headBlock
                    let kh = kC + blk, vh = vC + blk
                    let q = qkv + r * 3 * D + h * hd
                    (kh + pos * hd).update(from: q + D, count: hd)
                    (vh + pos * hd).update(from: q + 2 * D, count: hd)
                    // scores over cached positions 0...pos: sc = scale K q; out = V^T softmax(sc)
                    BLAS.sgemv(trans: false, m: pos + 1, n: hd, alpha: scale, kh, lda: hd, q, beta: 0, sc)
                    var mx = -Float.infinity
                    for j in 0...pos { mx = max(mx, sc[j]) }
                    var sum: Float = 0
                    for j in 0...pos { let e = fexp(sc[j] - mx); sc[j] = e; sum += e }
                    BLAS.sgemv(trans: true, m: pos + 1, n: hd, alpha: 1 / sum, vh, lda: hd, sc, beta: 0, att + r * D + h * hd)
                }
            }
            matmulForward(tmp, att, p + bw.wo, n: NB, ic: D, oc: D)
            for i in 0..<(NB * D) { x[i] += tmp[i] }
            rmsnormForward(c.n1.base, c.rstd.base, x, p + bw.ffnNorm, n: NB, d: D, eps: eps)
            matmulForward(c.ab.base, c.n1.base, p + bw.w13, n: NB, ic: D, oc: 2 * F)
            swigluForward(c.g.base, c.ab.base, n: NB, f: F)
            matmulForward(tmp, c.g.base, p + bw.w2, n: NB, ic: F, oc: D)
            for i in 0..<(NB * D) { x[i] += tmp[i] }
        }
    }
}
