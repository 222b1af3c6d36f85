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
        precondition(
            t.offset("\(prefix).feed_forward.w3.weight") == w13 + t.entry("\(prefix).feed_forward.w1.weight")!.count)
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

/// Activations one block keeps for its backward pass, views into an `ActivationTable`: block l's
/// own buffers, or (recompute blocks) the stack's workspace with block l's input (`addBlocks`).
struct BlockCache {
    let xIn, n1, rstd1, qkv, probs, attY, h, n2, rstd2, ab, g: FlatBuffer
    /// The dropout masks' names (their part is allocated by the first forward with dropout).
    let mask1, mask2: String
    init(_ t: ActivationTable, _ names: BlockActivationNames, _ l: Int) {
        xIn = t[names.input(l)]
        n1 = t[names.own(l, "n1")]
        rstd1 = t[names.own(l, "rstd1")]
        qkv = t[names.own(l, "qkv")]
        probs = t[names.own(l, "probs")]
        attY = t[names.own(l, "attY")]
        h = t[names.own(l, "h")]
        n2 = t[names.own(l, "n2")]
        rstd2 = t[names.own(l, "rstd2")]
        ab = t[names.own(l, "ab")]
        g = t[names.own(l, "g")]
        mask1 = names.own(l, "mask1")
        mask2 = names.own(l, "mask2")
    }
}

/// Scratch shared by all blocks of a stack during backward (R rows), views into the table.
/// Under recompute blocks they are shared by every stack, sized for the largest: only a stack's
/// R rows are used (zeroed) each time.
private struct BackwardScratch {
    let tmp, dh, dn, dattY, dqkv, dab, dg: FlatBuffer
    init(_ t: ActivationTable, _ names: BlockActivationNames) {
        tmp = t[names.scratch("tmp")]
        dh = t[names.scratch("dh")]
        dn = t[names.scratch("dn")]
        dattY = t[names.scratch("dattY")]
        dqkv = t[names.scratch("dqkv")]
        dab = t[names.scratch("dab")]
        dg = t[names.scratch("dg")]
    }
}

/// A stack of base blocks over N sequences of S vectors: the base transformer (causal, 2D rotary)
/// or a plug-in encoder/decoder (full mask, no rotary; SPEC section 3). Runs under either
/// `train.recompute` layout (`RecomputableStack`).
final class BlockStack: RecomputableStack {
    let weights: [BlockWeights]
    let causal: Bool
    let rotary: RotaryTable?
    let D, NH, F: Int
    let eps: Float
    let siteBase: Int  // dropout site ids: siteBase + 2*layer (+1 for the FFN)
    private(set) var N = 0, S = 0
    private(set) var recompute = ActivationRecompute.none
    private var table: ActivationTable?
    var activationTable: ActivationTable? { table }
    private var names = BlockActivationNames(prefix: "", recompute: .none)
    private var caches: [BlockCache] = []
    private var tmp: FlatBuffer?
    /// What the last forward ran with, for backward and for recomputing a block.
    private var params: FloatPtr?
    private var dropout: DropoutPlan?
    private var scratch: BackwardScratch?

    init(
        weights: [BlockWeights], causal: Bool, rotary: RotaryTable?, dim: Int, heads: Int, ffn: Int, eps: Float,
        siteBase: Int
    ) {
        self.weights = weights
        self.causal = causal
        self.rotary = rotary
        D = dim
        NH = heads
        F = ffn
        self.eps = eps
        self.siteBase = siteBase
    }

    var blockCount: Int { weights.count }

    /// The activations of L blocks over N sequences of S vectors (R = N*S rows), under `prefix`,
    /// laid out for `a.recompute`.
    static func addActivations(
        _ prefix: String, layers L: Int, sequences N: Int, seqLen S: Int, _ c: ModelConfig,
        to a: inout ActivationLayout
    ) {
        let R = N * S
        let D = c.dim
        let F = c.ffnHidden
        let names = BlockActivationNames(prefix: prefix, recompute: a.recompute)
        a.addBlocks(
            names, layers: L, input: [R, D],  // the block's input
            [
                ("n1", [R, D], .forward), ("rstd1", [R], .forward),  // norm1
                ("qkv", [R, 3 * D], .forward),  // after rotary
                ("probs", [N, c.nHead, S, S], .forward),  // softmax
                ("attY", [R, D], .forward),  // heads joined
                ("h", [R, D], .forward),  // x + attn
                ("n2", [R, D], .forward), ("rstd2", [R], .forward),  // norm2
                ("ab", [R, 2 * F], .forward),  // w1|w3 outputs
                ("g", [R, F], .forward),  // swiglu
                ("mask1", [R, D], .dropout), ("mask2", [R, D], .dropout),  // after wo; after w2
            ])
        a.addScratch(names, "tmp", [R, D], .forward)  // wo / w2 outputs, then backward scratch
        a.addScratch(names, "dh", [R, D], .backward)
        a.addScratch(names, "dn", [R, D], .backward)
        a.addScratch(names, "dattY", [R, D], .backward)
        a.addScratch(names, "dqkv", [R, 3 * D], .backward)
        a.addScratch(names, "dab", [R, 2 * F], .backward)
        a.addScratch(names, "dg", [R, F], .backward)
    }

    /// Uses the buffers of `addActivations(prefix, ...)` in `t` (its forward part allocated).
    func bind(_ t: ActivationTable, prefix: String, sequences: Int, seqLen: Int) {
        table = t
        N = sequences
        S = seqLen
        recompute = t.layout.recompute
        names = BlockActivationNames(prefix: prefix, recompute: recompute)
        caches = (0..<weights.count).map { BlockCache(t, names, $0) }
        tmp = t[names.scratch("tmp")]
    }

    /// x (N*S, D) in: the stack's input; out: its output (overwritten in place). `beforeBlock(l)`
    /// is called before block l reads its weights (`forwardBlocks`).
    func forward(
        _ x: FlatBuffer, params p: FloatPtr, sequences: Int, seqLen: Int, dropout: DropoutPlan?,
        beforeBlock: ((Int) -> Void)? = nil
    ) {
        precondition(sequences == N && seqLen == S, "BlockStack bound for \(N) x \(S), run on \(sequences) x \(seqLen)")
        params = p
        self.dropout = (dropout?.p ?? 0) > 0 ? dropout : nil
        if self.dropout != nil { table!.allocate(.dropout) }
        forwardBlocks(x, beforeBlock: beforeBlock)
    }

    /// Block l from its input (copied in from `x` first when given) to its activations; with `x`,
    /// the block's output is written back to it. Without, w2 and the last residual add are
    /// skipped: backward reads nothing after mask2.
    func blockForward(_ l: Int, output x: FlatBuffer?) {
        let R = N * S
        let p = params!
        let tmp = self.tmp!.base
        let w = weights[l]
        let c = caches[l]
        if let x { copyFloats(c.xIn.base, from: x.base, count: R * D) }
        rmsnormForward(c.n1.base, c.rstd1.base, c.xIn.base, p + w.attnNorm, n: R, d: D, eps: eps)
        matmulForward(c.qkv.base, c.n1.base, p + w.wqkv, n: R, ic: D, oc: 3 * D)
        if let rotary { rotaryApply(c.qkv.base, rotary, batch: N, seqLen: S, dim: D, heads: NH) }
        attentionForward(
            c.attY.base, c.probs.base, c.qkv.base, batch: N, seqLen: S, dim: D, heads: NH, causal: causal)
        matmulForward(tmp, c.attY.base, p + w.wo, n: R, ic: D, oc: D)
        applyDropout(tmp, c.mask1, site: siteBase + 2 * l)
        addForward(c.h.base, c.xIn.base, tmp, count: R * D)
        rmsnormForward(c.n2.base, c.rstd2.base, c.h.base, p + w.ffnNorm, n: R, d: D, eps: eps)
        matmulForward(c.ab.base, c.n2.base, p + w.w13, n: R, ic: D, oc: 2 * F)
        swigluForward(c.g.base, c.ab.base, n: R, f: F)
        guard let x else {
            makeMask(c.mask2, site: siteBase + 2 * l + 1)
            return
        }
        matmulForward(tmp, c.g.base, p + w.w2, n: R, ic: F, oc: D)
        applyDropout(tmp, c.mask2, site: siteBase + 2 * l + 1)
        addForward(x.base, c.h.base, tmp, count: R * D)
    }

    /// Draws the dropout mask `name` of `site` (keyed: the same bits each time), if dropout is on.
    @discardableResult
    private func makeMask(_ name: String, site: Int) -> FlatBuffer? {
        guard let plan = dropout else { return nil }
        let R = N * S
        let mask = table![name]
        dropoutMask(
            mask.base, p: plan.p, rows: R, d: D, rowsPerSample: R / plan.samplePositions.count,
            samplePositions: plan.samplePositions, seed: plan.seed, step: plan.step, site: site)
        return mask
    }

    /// out = g * the mask `name` (R x D), for the backward through a dropout.
    private func masked(_ out: FloatPtr, _ g: ConstFloatPtr, _ name: String) -> ConstFloatPtr {
        dropoutApply(out, g, table![name].base, count: N * S * D)
        return UnsafePointer(out)
    }

    private func applyDropout(_ t: FloatPtr, _ name: String, site: Int) {
        guard let mask = makeMask(name, site: site) else { return }
        dropoutApply(t, mask.base, count: N * S * D)
    }

    /// dx (N*S, D) in: gradient w.r.t. the stack's output; out: w.r.t. its input (in place).
    /// `onLayerDone(l)` fires when block l's weight gradients are complete (for bucketed allreduce).
    func backward(_ dx: FlatBuffer, params p: FloatPtr, grads gp: FloatPtr, onLayerDone: ((Int) -> Void)? = nil) {
        precondition(params == p, "BlockStack.backward with other parameters than its forward")
        table!.allocate(.backward)
        scratch = BackwardScratch(table!, names)
        backwardBlocks(dx, grads: gp, onLayerDone: onLayerDone)
    }

    func blockBackward(_ l: Int, _ dx: FlatBuffer, grads gp: FloatPtr) {
        let R = N * S
        let p = params!
        let s = scratch!
        let w = weights[l]
        let c = caches[l]
        let dropped = dropout != nil
        // out = h + drop(w2(swiglu(w13(norm2(h))))); input gradients are written, not added to
        // zeroed scratch (`addToInput: false`), and the gradient reaches wo and w2 through the
        // dropout mask (into tmp) or as it is
        copyFloats(s.dh.base, from: dx.base, count: R * D)
        let d2 = dropped ? masked(s.tmp.base, dx.base, c.mask2) : UnsafePointer(dx.base)
        matmulBackward(s.dg.base, gp + w.w2, d2, c.g.base, p + w.w2, n: R, ic: F, oc: D, addToInput: false)
        swigluBackward(s.dab.base, s.dg.base, c.ab.base, n: R, f: F)
        matmulBackward(
            s.dn.base, gp + w.w13, s.dab.base, c.n2.base, p + w.w13, n: R, ic: D, oc: 2 * F, addToInput: false)
        rmsnormBackward(s.dh.base, gp + w.ffnNorm, s.dn.base, c.h.base, p + w.ffnNorm, c.rstd2.base, n: R, d: D)
        // h = x + drop(wo(attention(rope(wqkv(norm1(x))))))
        let d1 = dropped ? masked(s.tmp.base, s.dh.base, c.mask1) : UnsafePointer(s.dh.base)
        matmulBackward(s.dattY.base, gp + w.wo, d1, c.attY.base, p + w.wo, n: R, ic: D, oc: D, addToInput: false)
        zeroFloats(s.dqkv.base, count: R * 3 * D)
        attentionBackward(
            s.dqkv.base, s.dattY.base, c.qkv.base, c.probs.base, batch: N, seqLen: S, dim: D,
            heads: NH, causal: causal)
        if let rotary { rotaryApply(s.dqkv.base, rotary, batch: N, seqLen: S, dim: D, heads: NH, inverse: true) }
        matmulBackward(
            s.dn.base, gp + w.wqkv, s.dqkv.base, c.n1.base, p + w.wqkv, n: R, ic: D, oc: 3 * D, addToInput: false)
        copyFloats(dx.base, from: s.dh.base, count: R * D)
        rmsnormBackward(dx.base, gp + w.attnNorm, s.dn.base, c.xIn.base, p + w.attnNorm, c.rstd1.base, n: R, d: D)
    }
}

/// Keys, values and scratch for KV-cached steps of one `BlockStack` over NB rows (SPEC section
/// 5). Every (layer, row, head) keeps its keys and values as one contiguous (T, hd) block, read
/// by two sgemv calls, which stream it about twice as fast as plain loops did.
public final class KVCache: TrunkCache {
    let rows, seqLen: Int
    let keys, values: FlatBuffer  // (L, NB, NH, T, hd)
    let n1, rstd, qkv, att, tmp, ab, g: FlatBuffer
    init(layers L: Int, rows NB: Int, seqLen T: Int, dim D: Int, ffn F: Int) {
        rows = NB
        seqLen = T
        keys = FlatBuffer(count: L * NB * T * D)
        values = FlatBuffer(count: L * NB * T * D)
        n1 = FlatBuffer(count: NB * D)
        rstd = FlatBuffer(count: NB)
        qkv = FlatBuffer(count: NB * 3 * D)
        att = FlatBuffer(count: NB * D)
        tmp = FlatBuffer(count: NB * D)
        ab = FlatBuffer(count: NB * 2 * F)
        g = FlatBuffer(count: NB * F)
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
        let NB = c.rows
        let qkv = c.qkv.base
        let att = c.att.base
        let tmp = c.tmp.base
        let layerBlock = NB * c.seqLen * D  // floats per layer in either cache
        for (l, bw) in weights.enumerated() {
            rmsnormForward(c.n1.base, c.rstd.base, x, p + bw.attnNorm, n: NB, d: D, eps: eps)
            matmulForward(qkv, c.n1.base, p + bw.wqkv, n: NB, ic: D, oc: 3 * D)
            if let rotary { rotaryApply(qkv, rotary, batch: NB, seqLen: 1, dim: D, heads: NH, position: pos) }
            attentionStepForward(
                att, c.keys.base + l * layerBlock, c.values.base + l * layerBlock, qkv, rows: NB,
                dim: D, heads: NH, cacheLength: c.seqLen, position: pos)
            matmulForward(tmp, att, p + bw.wo, n: NB, ic: D, oc: D)
            addForward(x, x, tmp, count: NB * D)
            rmsnormForward(c.n1.base, c.rstd.base, x, p + bw.ffnNorm, n: NB, d: D, eps: eps)
            matmulForward(c.ab.base, c.n1.base, p + bw.w13, n: NB, ic: D, oc: 2 * F)
            swigluForward(c.g.base, c.ab.base, n: NB, f: F)
            matmulForward(tmp, c.g.base, p + bw.w2, n: NB, ic: F, oc: D)
            addForward(x, x, tmp, count: NB * D)
        }
    }
}
