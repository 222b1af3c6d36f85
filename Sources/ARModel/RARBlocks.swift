import Kernels
import Platform

/// Offsets of one RAR block's weights (SPEC section 9 names under `prefix`).
struct RARBlockWeights {
    let norm1W, norm1B, qkvW, qkvB, qNormW, qNormB, kNormW, kNormB, projW, projB: Int
    let norm2W, norm2B, fc1W, fc1B, fc2W, fc2B, adaW, adaB: Int
    init(_ t: ParameterTable, prefix p: String) {
        norm1W = t.offset("\(p).norm1.weight")
        norm1B = t.offset("\(p).norm1.bias")
        qkvW = t.offset("\(p).attn.qkv.weight")
        qkvB = t.offset("\(p).attn.qkv.bias")
        qNormW = t.offset("\(p).attn.q_norm.weight")
        qNormB = t.offset("\(p).attn.q_norm.bias")
        kNormW = t.offset("\(p).attn.k_norm.weight")
        kNormB = t.offset("\(p).attn.k_norm.bias")
        projW = t.offset("\(p).attn.proj.weight")
        projB = t.offset("\(p).attn.proj.bias")
        norm2W = t.offset("\(p).norm2.weight")
        norm2B = t.offset("\(p).norm2.bias")
        fc1W = t.offset("\(p).mlp.fc1.weight")
        fc1B = t.offset("\(p).mlp.fc1.bias")
        fc2W = t.offset("\(p).mlp.fc2.weight")
        fc2B = t.offset("\(p).mlp.fc2.bias")
        adaW = t.offset("\(p).adaLN_modulation.1.weight")
        adaB = t.offset("\(p).adaLN_modulation.1.bias")
    }
}

extension ParameterTable {
    /// One RAR block's entries under `prefix`, in the released state_dict's order (SPEC section 9).
    mutating func addRARBlock(_ prefix: String, _ c: ModelConfig, _ g: ParameterGroup) {
        let D = c.dim
        let F = c.ffnHidden
        let hd = c.headDim
        add("\(prefix).norm1.weight", [D], g, .ones)
        add("\(prefix).norm1.bias", [D], g, .zeros)
        add("\(prefix).attn.qkv.weight", [3 * D, D], g, .normal(0.02))
        add("\(prefix).attn.qkv.bias", [3 * D], g, .zeros)
        add("\(prefix).attn.q_norm.weight", [hd], g, .ones)
        add("\(prefix).attn.q_norm.bias", [hd], g, .zeros)
        add("\(prefix).attn.k_norm.weight", [hd], g, .ones)
        add("\(prefix).attn.k_norm.bias", [hd], g, .zeros)
        add("\(prefix).attn.proj.weight", [D, D], g, .normal(0.02))
        add("\(prefix).attn.proj.bias", [D], g, .zeros)
        add("\(prefix).norm2.weight", [D], g, .ones)
        add("\(prefix).norm2.bias", [D], g, .zeros)
        add("\(prefix).mlp.fc1.weight", [F, D], g, .normal(0.02))
        add("\(prefix).mlp.fc1.bias", [F], g, .zeros)
        add("\(prefix).mlp.fc2.weight", [D, F], g, .normal(0.02))
        add("\(prefix).mlp.fc2.bias", [D], g, .zeros)
        add("\(prefix).adaLN_modulation.1.weight", [6 * D, D], g, .zeros)
        add("\(prefix).adaLN_modulation.1.bias", [6 * D], g, .zeros)
    }
}

/// Buffers one RAR block keeps for its backward (R = N*S rows), views into an `ActivationTable`:
/// block l's own buffers, or (recompute blocks) the shared workspace with block l's input.
private struct RARBlockCache {
    let xIn, n1, stats1, mod, m1, qkvRaw, qkStats, qkv, probs, attY, ya, h, n2, stats2, m2, a1, g1, ym: FlatBuffer
    /// The dropout masks' names (their part is allocated by the first forward with dropout).
    let maskP, maskProj, maskGelu, maskFc2: String
    init(_ t: ActivationTable, _ names: BlockActivationNames, _ l: Int) {
        xIn = t[names.input(l)]
        n1 = t[names.own(l, "n1")]
        stats1 = t[names.own(l, "stats1")]
        mod = t[names.own(l, "mod")]
        m1 = t[names.own(l, "m1")]
        qkvRaw = t[names.own(l, "qkvRaw")]
        qkStats = t[names.own(l, "qkStats")]
        qkv = t[names.own(l, "qkv")]
        probs = t[names.own(l, "probs")]
        attY = t[names.own(l, "attY")]
        ya = t[names.own(l, "ya")]
        h = t[names.own(l, "h")]
        n2 = t[names.own(l, "n2")]
        stats2 = t[names.own(l, "stats2")]
        m2 = t[names.own(l, "m2")]
        a1 = t[names.own(l, "a1")]
        g1 = t[names.own(l, "g1")]
        ym = t[names.own(l, "ym")]
        maskP = names.own(l, "maskP")
        maskProj = names.own(l, "maskProj")
        maskGelu = names.own(l, "maskGelu")
        maskFc2 = names.own(l, "maskFc2")
    }
}

/// A stack of RAR blocks (SPEC section 9) over N sequences of S slots, each slot with its own
/// condition: per slot `(sh_a, sc_a, g_a, sh_m, sc_m, g_m) = split6(adaLN(silu(c)))`,
/// `h = x + g_a * Attn(LN1(x) (1 + sc_a) + sh_a)`, `out = h + g_m * fc2(gelu(fc1(LN2(h) (1 + sc_m) +
/// sh_m)))`; LayerNorms with weight and bias, QK-norm over the head width, biased linears. The
/// RAR trunk (causal, a condition per slot) and the plug-in over RAR (full mask, one condition per
/// sequence: section 9's last paragraph; `conditionPerSequence`) use it.
/// Dropout (training): on the attention probabilities, after proj, after the GELU and after fc2,
/// sites `siteBase + 4 l + 0...3`. Runs under either `train.recompute` layout (`RecomputableStack`);
/// under blocks each block keeps fc2's output beside its input (`keptUnderRecompute`).
final class RARBlockStack: RecomputableStack {
    let weights: [RARBlockWeights]
    let causal: Bool
    /// All S slots of a sequence share one condition (the plug-in over RAR): the modulation
    /// (the 6D x D adaLN matmul) runs once per sequence, its gradient summed over the slots.
    let conditionPerSequence: Bool
    let D, NH, F: Int
    let eps: Float
    let siteBase: Int
    /// What a block keeps of its own under recompute blocks beside its input (issue 15; choice):
    /// fc2's output (dropped), which backward reads for the MLP gate's gradient, so the recompute
    /// skips fc2 (as `BlockStack` skips w2): F multiply-adds spared per float kept. Keeping the
    /// modulation (6D floats a slot), proj's output or fc1's would spare D per float, a quarter.
    static let keptUnderRecompute: Set<String> = ["ym"]
    private(set) var N = 0, S = 0
    private(set) var recompute = ActivationRecompute.none
    private var table: ActivationTable?
    var activationTable: ActivationTable? { table }
    private var names = BlockActivationNames(prefix: "", recompute: .none)
    private var caches: [RARBlockCache] = []
    /// What the last forward ran with, for backward and for recomputing a block.
    private var params: FloatPtr?
    private var cond: ConstFloatPtr?
    private var dropout: DropoutPlan?
    /// The gradient w.r.t. the condition that the running backward adds into.
    private var dcond: FloatPtr?

    init(
        weights: [RARBlockWeights], causal: Bool, conditionPerSequence: Bool = false, dim: Int, heads: Int, ffn: Int,
        eps: Float, siteBase: Int
    ) {
        self.weights = weights
        self.causal = causal
        self.conditionPerSequence = conditionPerSequence
        D = dim
        NH = heads
        F = ffn
        self.eps = eps
        self.siteBase = siteBase
    }

    var blockCount: Int { weights.count }

    /// Rows of the condition and of the modulation: one a sequence, or one a slot.
    private var conditionRows: Int { conditionPerSequence ? N : N * S }
    /// Slots that share a modulation row (the kernels' `rowsPerModulation`).
    private var slotsPerCondition: Int { conditionPerSequence ? S : 1 }

    /// The activations of L blocks over N sequences of S slots (R = N*S rows), under `prefix`,
    /// laid out for `a.recompute` (under none the same entries, in the same order, as before
    /// recompute came to RAR; the modulation has N rows with `conditionPerSequence`).
    static func addActivations(
        _ prefix: String, layers L: Int, sequences N: Int, seqLen S: Int, conditionPerSequence: Bool = false,
        _ c: ModelConfig, to a: inout ActivationLayout
    ) {
        let R = N * S
        let M = conditionPerSequence ? N : R
        let D = c.dim
        let F = c.ffnHidden
        let NH = c.nHead
        var names = BlockActivationNames(prefix: prefix, recompute: a.recompute)
        names.kept = keptUnderRecompute
        a.addBlocks(
            names, layers: L, input: [R, D],  // block input
            [
                ("n1", [R, D], .forward), ("stats1", [2, R], .forward),  // LN1 output; its mean, rstd
                ("mod", [M, 6 * D], .forward),  // adaLN(silu(c)): shift, scale, gate (attention, MLP)
                ("m1", [R, D], .forward),  // modulated LN1
                ("qkvRaw", [R, 2 * D], .forward),
                ("qkStats", [2, R, 2 * NH], .forward),  // q, k before QK-norm; their mean, rstd
                ("qkv", [R, 3 * D], .forward),  // after QK-norm
                ("probs", [N, NH, S, S], .forward),  // softmax (undropped)
                ("attY", [R, D], .forward),  // heads joined
                ("ya", [R, D], .forward),  // proj output (dropped)
                ("h", [R, D], .forward),  // x + g_a ya
                ("n2", [R, D], .forward), ("stats2", [2, R], .forward),
                ("m2", [R, D], .forward),  // modulated LN2
                ("a1", [R, F], .forward), ("g1", [R, F], .forward),  // fc1 output; GELU (dropped)
                ("ym", [R, D], .forward),  // fc2 output (dropped)
                ("maskP", [N, NH, S, S], .dropout), ("maskProj", [R, D], .dropout),
                ("maskGelu", [R, F], .dropout), ("maskFc2", [R, D], .dropout),
            ])
        a.addScratch(names, "dh", [R, D], .backward)
        a.addScratch(names, "dn", [R, D], .backward)
        a.addScratch(names, "dm", [R, D], .backward)
        a.addScratch(names, "dy", [R, D], .backward)
        a.addScratch(names, "dattY", [R, D], .backward)
        a.addScratch(names, "dqkv", [R, 3 * D], .backward)
        a.addScratch(names, "dg1", [R, F], .backward)
        a.addScratch(names, "dmod", [M, 6 * D], .backward)
    }

    func bind(_ t: ActivationTable, prefix: String, sequences: Int, seqLen: Int) {
        table = t
        N = sequences
        S = seqLen
        recompute = t.layout.recompute
        names = BlockActivationNames(prefix: prefix, recompute: recompute)
        names.kept = Self.keptUnderRecompute
        caches = (0..<weights.count).map { RARBlockCache(t, names, $0) }
    }

    /// Draws the dropout mask `name` of `site` over `rows` x `width` (keyed: the same bits each time).
    private func makeMask(_ name: String, _ plan: DropoutPlan, rows: Int, width: Int, site: Int) -> FlatBuffer {
        let mask = table![name]
        dropoutMask(
            mask.base, p: plan.p, rows: rows, d: width, rowsPerSample: rows / plan.samplePositions.count,
            samplePositions: plan.samplePositions, seed: plan.seed, step: plan.step, site: site)
        return mask
    }

    private func applyDropout(_ x: FloatPtr, _ name: String, rows: Int, width: Int, site: Int) {
        guard let plan = dropout else { return }
        dropoutApply(x, makeMask(name, plan, rows: rows, width: width, site: site).base, count: rows * width)
    }

    /// x (N*S, D) in: the input; out: the output (in place). cond (N*S, D): silu(c) per slot, or
    /// (N, D) per sequence with `conditionPerSequence`; kept as it is until the backward.
    /// `beforeBlock(l)`: before block l reads its weights.
    func forward(
        _ x: FlatBuffer, cond: ConstFloatPtr, params p: FloatPtr, sequences: Int, seqLen: Int, dropout: DropoutPlan?,
        beforeBlock: ((Int) -> Void)? = nil
    ) {
        precondition(sequences == N && seqLen == S, "RAR blocks bound for \(N) x \(S), run on \(sequences) x \(seqLen)")
        params = p
        self.cond = cond
        self.dropout = (dropout?.p ?? 0) > 0 ? dropout : nil
        if self.dropout != nil { table!.allocate(.dropout) }
        forwardBlocks(x, beforeBlock: beforeBlock)
    }

    /// Block l from its input (copied in from `x` first when given) to its activations; with `x`,
    /// the block's output is written back to it. Without (recompute), fc2 and the last gated add
    /// are skipped: backward reads fc2's output, which the block keeps of its own under recompute
    /// blocks (`keptUnderRecompute`), and nothing after it.
    func blockForward(_ l: Int, output x: FlatBuffer?) {
        let R = N * S
        let M = conditionRows
        let g = slotsPerCondition
        let p = params!
        let w = weights[l]
        let c = caches[l]
        if let x { copyFloats(c.xIn.base, from: x.base, count: R * D) }
        matmulForward(c.mod.base, cond!, p + w.adaW, n: M, ic: D, oc: 6 * D)
        biasAddForward(c.mod.base, p + w.adaB, n: M, oc: 6 * D)
        let mod = c.mod.base
        layernormForward(
            c.n1.base, c.stats1.base, c.stats1.base + R, c.xIn.base, p + w.norm1W, p + w.norm1B, n: R, d: D, eps: eps)
        modulateForward(c.m1.base, c.n1.base, shift: mod, scale: mod + D, ld: 6 * D, n: R, d: D, rowsPerModulation: g)
        matmulForward(c.qkv.base, c.m1.base, p + w.qkvW, n: R, ic: D, oc: 3 * D)
        biasAddForward(c.qkv.base, p + w.qkvB, n: R, oc: 3 * D)
        qkNormForward(
            c.qkv.base, raw: c.qkvRaw.base, mean: c.qkStats.base, rstd: c.qkStats.base + R * 2 * NH,
            qWeight: p + w.qNormW, qBias: p + w.qNormB, kWeight: p + w.kNormW, kBias: p + w.kNormB, n: R,
            dim: D, heads: NH, eps: eps)
        let maskP = dropout.map {
            UnsafePointer(makeMask(c.maskP, $0, rows: N * NH * S, width: S, site: siteBase + 4 * l).base)
        }
        attentionForward(
            c.attY.base, c.probs.base, c.qkv.base, batch: N, seqLen: S, dim: D, heads: NH, causal: causal,
            dropMask: maskP)
        matmulForward(c.ya.base, c.attY.base, p + w.projW, n: R, ic: D, oc: D)
        biasAddForward(c.ya.base, p + w.projB, n: R, oc: D)
        applyDropout(c.ya.base, c.maskProj, rows: R, width: D, site: siteBase + 4 * l + 1)
        // h = x + g_a ya, formed in h (the same additions as in x before recompute came to RAR)
        copyFloats(c.h.base, from: c.xIn.base, count: R * D)
        gatedAddForward(c.h.base, c.ya.base, gate: mod + 2 * D, ld: 6 * D, n: R, d: D, rowsPerModulation: g)
        mlpForward(c, w, layer: l, params: p, fc2: x != nil)
        guard let x else { return }
        copyFloats(x.base, from: c.h.base, count: R * D)
        gatedAddForward(x.base, c.ym.base, gate: mod + 5 * D, ld: 6 * D, n: R, d: D, rowsPerModulation: g)
    }

    /// LN2, modulation, fc1, GELU, fc2 of block l (into c.ym), with their dropouts. Without
    /// `fc2` (recompute: c.ym is the block's own and holds it already) only fc2's dropout mask is
    /// drawn again, for the backward.
    private func mlpForward(
        _ c: RARBlockCache, _ w: RARBlockWeights, layer l: Int, params p: FloatPtr, fc2: Bool
    ) {
        let R = N * S
        let mod = c.mod.base
        layernormForward(
            c.n2.base, c.stats2.base, c.stats2.base + R, c.h.base, p + w.norm2W, p + w.norm2B, n: R, d: D, eps: eps)
        modulateForward(
            c.m2.base, c.n2.base, shift: mod + 3 * D, scale: mod + 4 * D, ld: 6 * D, n: R, d: D,
            rowsPerModulation: slotsPerCondition)
        matmulForward(c.a1.base, c.m2.base, p + w.fc1W, n: R, ic: D, oc: F)
        biasAddForward(c.a1.base, p + w.fc1B, n: R, oc: F)
        geluForward(c.g1.base, c.a1.base, count: R * F)
        applyDropout(c.g1.base, c.maskGelu, rows: R, width: F, site: siteBase + 4 * l + 2)
        guard fc2 else {
            precondition(recompute == .blocks, "RAR block \(l) recomputed without its fc2 output kept")
            if let plan = dropout { _ = makeMask(c.maskFc2, plan, rows: R, width: D, site: siteBase + 4 * l + 3) }
            return
        }
        matmulForward(c.ym.base, c.g1.base, p + w.fc2W, n: R, ic: F, oc: D)
        biasAddForward(c.ym.base, p + w.fc2B, n: R, oc: D)
        applyDropout(c.ym.base, c.maskFc2, rows: R, width: D, site: siteBase + 4 * l + 3)
    }

    /// dx (N*S, D) in: gradient w.r.t. the output; out: w.r.t. the input (in place). dcond
    /// (the shape of `cond`) += the gradient w.r.t. silu(c), the `cond` of the forward. `onLayerDone(l)` fires
    /// when block l's weight gradients are final.
    func backward(
        _ dx: FlatBuffer, dcond: FloatPtr, cond: ConstFloatPtr, params p: FloatPtr, grads gp: FloatPtr,
        onLayerDone: ((Int) -> Void)? = nil
    ) {
        precondition(params == p && self.cond == cond, "RAR blocks' backward with other inputs than their forward")
        table!.allocate(.backward)
        self.dcond = dcond
        defer { self.dcond = nil }
        backwardBlocks(dx, grads: gp, onLayerDone: onLayerDone)
    }

    func blockBackward(_ l: Int, _ dx: FlatBuffer, grads gp: FloatPtr) {
        let R = N * S
        let M = conditionRows
        let g = slotsPerCondition
        let t = table!
        let p = params!
        let dh = t[names.scratch("dh")].base
        let dn = t[names.scratch("dn")].base
        let dm = t[names.scratch("dm")].base
        let dy = t[names.scratch("dy")].base
        let dmod = t[names.scratch("dmod")].base
        let w = weights[l]
        let c = caches[l]
        let dropped = dropout != nil
        let mod = c.mod.base
        zeroFloats(dmod, count: M * 6 * D)
        // out = h + g_m * ym
        copyFloats(dh, from: dx.base, count: R * D)
        gatedAddBackward(
            dy, dgate: dmod + 5 * D, dx.base, c.ym.base, gate: mod + 5 * D, ld: 6 * D, n: R, d: D, rowsPerModulation: g)
        mlpBackward(c, w, dym: dy, dmod: dmod, into: dh, params: p, grads: gp)
        // h = x + g_a * ya
        gatedAddBackward(
            dy, dgate: dmod + 2 * D, dh, c.ya.base, gate: mod + 2 * D, ld: 6 * D, n: R, d: D, rowsPerModulation: g)
        if dropped { dropoutApply(dy, t[c.maskProj].base, count: R * D) }
        let dattY = t.zeroed(names.scratch("dattY")).base
        matmulBackward(dattY, gp + w.projW, dy, c.attY.base, p + w.projW, n: R, ic: D, oc: D)
        biasBackward(gp + w.projB, dy, n: R, oc: D)
        let dqkv = t.zeroed(names.scratch("dqkv")).base
        attentionBackward(
            dqkv, dattY, c.qkv.base, c.probs.base, batch: N, seqLen: S, dim: D, heads: NH, causal: causal,
            dropMask: dropped ? UnsafePointer(t[c.maskP].base) : nil)
        qkNormBackward(
            dqkv, raw: c.qkvRaw.base, mean: c.qkStats.base, rstd: c.qkStats.base + R * 2 * NH,
            qWeight: p + w.qNormW, kWeight: p + w.kNormW, dqWeight: gp + w.qNormW, dqBias: gp + w.qNormB,
            dkWeight: gp + w.kNormW, dkBias: gp + w.kNormB, n: R, dim: D, heads: NH)
        matmulBackward(dm, gp + w.qkvW, dqkv, c.m1.base, p + w.qkvW, n: R, ic: D, oc: 3 * D, addToInput: false)
        biasBackward(gp + w.qkvB, dqkv, n: R, oc: 3 * D)
        zeroFloats(dn, count: R * D)
        modulateBackward(
            dn, dshift: dmod, dscale: dmod + D, dm, c.n1.base, scale: mod + D, ld: 6 * D, n: R, d: D,
            rowsPerModulation: g)
        copyFloats(dx.base, from: dh, count: R * D)
        layernormBackward(
            dx.base, gp + w.norm1W, gp + w.norm1B, dn, c.xIn.base, p + w.norm1W, c.stats1.base,
            c.stats1.base + R, n: R, d: D)
        // mod = silu(c) adaW^T + adaB (M rows: a sequence's slots' gradients are summed in dmod)
        matmulBackward(dcond!, gp + w.adaW, dmod, cond!, p + w.adaW, n: M, ic: D, oc: 6 * D)
        biasBackward(gp + w.adaB, dmod, n: M, oc: 6 * D)
    }

    /// The MLP branch's backward: dym (R, D) the gradient w.r.t. ym (overwritten as scratch);
    /// adds LN2's input gradient into `into`, and the modulation's into dmod.
    private func mlpBackward(
        _ c: RARBlockCache, _ w: RARBlockWeights, dym: FloatPtr, dmod: FloatPtr, into dh: FloatPtr,
        params p: FloatPtr, grads gp: FloatPtr
    ) {
        let R = N * S
        let t = table!
        let mod = c.mod.base
        let dropped = dropout != nil
        if dropped { dropoutApply(dym, t[c.maskFc2].base, count: R * D) }
        let dg1 = t.zeroed(names.scratch("dg1")).base
        matmulBackward(dg1, gp + w.fc2W, dym, c.g1.base, p + w.fc2W, n: R, ic: F, oc: D)
        biasBackward(gp + w.fc2B, dym, n: R, oc: D)
        if dropped { dropoutApply(dg1, t[c.maskGelu].base, count: R * F) }
        geluBackward(dg1, dg1, c.a1.base, count: R * F)
        let dm = t.zeroed(names.scratch("dm")).base
        matmulBackward(dm, gp + w.fc1W, dg1, c.m2.base, p + w.fc1W, n: R, ic: D, oc: F)
        biasBackward(gp + w.fc1B, dg1, n: R, oc: F)
        let dn = t.zeroed(names.scratch("dn")).base
        modulateBackward(
            dn, dshift: dmod + 3 * D, dscale: dmod + 4 * D, dm, c.n2.base, scale: mod + 4 * D, ld: 6 * D, n: R, d: D,
            rowsPerModulation: slotsPerCondition)
        layernormBackward(
            dh, gp + w.norm2W, gp + w.norm2B, dn, c.h.base, p + w.norm2W, c.stats2.base, c.stats2.base + R, n: R,
            d: D)
    }
}

/// Keys, values and scratch for KV-cached steps of one `RARBlockStack` over NB rows.
final class RARCache: TrunkCache {
    let rows, seqLen: Int
    let keys, values: FlatBuffer  // (L, NB, NH, S, hd)
    let n, stats, mod, m, qkv, raw, qkStats, att, tmp, a1, g1: FlatBuffer
    init(layers L: Int, rows NB: Int, seqLen S: Int, dim D: Int, heads NH: Int, ffn F: Int) {
        rows = NB
        seqLen = S
        keys = FlatBuffer(count: L * NB * S * D)
        values = FlatBuffer(count: L * NB * S * D)
        n = FlatBuffer(count: NB * D)
        stats = FlatBuffer(count: 2 * NB)
        mod = FlatBuffer(count: NB * 6 * D)
        m = FlatBuffer(count: NB * D)
        qkv = FlatBuffer(count: NB * 3 * D)
        raw = FlatBuffer(count: NB * 2 * D)
        qkStats = FlatBuffer(count: 2 * NB * 2 * NH)
        att = FlatBuffer(count: NB * D)
        tmp = FlatBuffer(count: NB * D)
        a1 = FlatBuffer(count: NB * F)
        g1 = FlatBuffer(count: NB * F)
    }
}

extension RARBlockStack {
    func makeCache(rows: Int, seqLen: Int) -> RARCache {
        RARCache(layers: weights.count, rows: rows, seqLen: seqLen, dim: D, heads: NH, ffn: F)
    }

    /// One slot `pos` of NB causal sequences with the KV cache (sampling; no dropout): x (NB, D)
    /// in place; cond (NB, D) silu(c) of that slot. The same block as `forward`.
    func step(_ x: FloatPtr, cond: ConstFloatPtr, cache c: RARCache, position pos: Int, params p: FloatPtr) {
        let NB = c.rows
        let layerBlock = NB * c.seqLen * D
        let mod = c.mod.base
        for (l, w) in weights.enumerated() {
            matmulForward(mod, cond, p + w.adaW, n: NB, ic: D, oc: 6 * D)
            biasAddForward(mod, p + w.adaB, n: NB, oc: 6 * D)
            layernormForward(
                c.n.base, c.stats.base, c.stats.base + NB, x, p + w.norm1W, p + w.norm1B, n: NB, d: D, eps: eps)
            modulateForward(c.m.base, c.n.base, shift: mod, scale: mod + D, ld: 6 * D, n: NB, d: D)
            matmulForward(c.qkv.base, c.m.base, p + w.qkvW, n: NB, ic: D, oc: 3 * D)
            biasAddForward(c.qkv.base, p + w.qkvB, n: NB, oc: 3 * D)
            qkNormForward(
                c.qkv.base, raw: c.raw.base, mean: c.qkStats.base, rstd: c.qkStats.base + NB * 2 * NH,
                qWeight: p + w.qNormW, qBias: p + w.qNormB, kWeight: p + w.kNormW, kBias: p + w.kNormB, n: NB,
                dim: D, heads: NH, eps: eps)
            attentionStepForward(
                c.att.base, c.keys.base + l * layerBlock, c.values.base + l * layerBlock, c.qkv.base, rows: NB,
                dim: D, heads: NH, cacheLength: c.seqLen, position: pos)
            matmulForward(c.tmp.base, c.att.base, p + w.projW, n: NB, ic: D, oc: D)
            biasAddForward(c.tmp.base, p + w.projB, n: NB, oc: D)
            gatedAddForward(x, c.tmp.base, gate: mod + 2 * D, ld: 6 * D, n: NB, d: D)
            layernormForward(
                c.n.base, c.stats.base, c.stats.base + NB, x, p + w.norm2W, p + w.norm2B, n: NB, d: D, eps: eps)
            modulateForward(c.m.base, c.n.base, shift: mod + 3 * D, scale: mod + 4 * D, ld: 6 * D, n: NB, d: D)
            matmulForward(c.a1.base, c.m.base, p + w.fc1W, n: NB, ic: D, oc: F)
            biasAddForward(c.a1.base, p + w.fc1B, n: NB, oc: F)
            geluForward(c.g1.base, c.a1.base, count: NB * F)
            matmulForward(c.tmp.base, c.g1.base, p + w.fc2W, n: NB, ic: F, oc: D)
            biasAddForward(c.tmp.base, p + w.fc2B, n: NB, oc: D)
            gatedAddForward(x, c.tmp.base, gate: mod + 5 * D, ld: 6 * D, n: NB, d: D)
        }
    }
}

/// The plug-in's blocks over RAR (SPEC section 9's last paragraph): RAR blocks with a full mask,
/// every vector of a sequence conditioned on c_{p+1} of the SPEC position p that the sequence
/// belongs to (`Conditioning.encoderPosition` / `decoderPosition`): one condition a sequence, so
/// the stack's modulation runs once a sequence (`RARBlockStack.conditionPerSequence`).
final class RARPluginBlocks: PluginBlocks {
    let stack: RARBlockStack
    unowned let rar: RAR
    let encoder: Bool
    private var table: ActivationTable?
    private var prefix = ""
    /// Per sequence: the image it belongs to and its RAR slot p + 1 (the rows of its condition).
    private var conditionSeq: [Int32] = [], conditionSlot: [Int32] = []

    init(_ stack: RARBlockStack, rar: RAR, encoder: Bool) {
        self.stack = stack
        self.rar = rar
        self.encoder = encoder
    }

    static func addActivations(
        _ prefix: String, _ c: ModelConfig, sequences N: Int, seqLen S: Int, to a: inout ActivationLayout
    ) {
        RARBlockStack.addActivations(
            prefix, layers: c.pluginDepth, sequences: N, seqLen: S, conditionPerSequence: true, c, to: &a)
        a.add("\(prefix).c", [N, c.dim])
        a.add("\(prefix).cs", [N, c.dim])  // each sequence's condition, silu
        a.add("\(prefix).dcs", [N, c.dim], .backward)
        a.add("\(prefix).dc", [N, c.dim], .backward)
    }

    func bindSequences(_ t: ActivationTable, prefix: String, sequences: Int, seqLen: Int) {
        stack.bind(t, prefix: prefix, sequences: sequences, seqLen: seqLen)
        table = t
        self.prefix = prefix
    }

    func forwardSequences(_ x: FlatBuffer, params p: FloatPtr, sequences N: Int, seqLen S: Int, dropout: DropoutPlan?) {
        let c = rar.conditioning
        let seq = encoder ? c.encoderSequence : c.decoderSequence
        let pos = encoder ? c.encoderPosition : c.decoderPosition
        precondition(seq.count == N, "RAR plug-in blocks: \(N) sequences, \(seq.count) conditioned")
        precondition(stack.conditionPerSequence, "RAR plug-in blocks condition each sequence once")
        conditionSeq = seq
        conditionSlot = pos.map { $0 + 1 }
        let t = table!
        let cs = t["\(prefix).cs"].base
        rar.conditionsForward(t["\(prefix).c"].base, cs, seq: conditionSeq, slot: conditionSlot, params: p)
        stack.forward(x, cond: cs, params: p, sequences: N, seqLen: S, dropout: dropout)
    }

    func backwardSequences(_ dx: FlatBuffer, params p: FloatPtr, grads gp: FloatPtr) {
        let t = table!
        t.allocate(.backward)
        let dcs = t.zeroed("\(prefix).dcs").base
        stack.backward(dx, dcond: dcs, cond: t["\(prefix).cs"].base, params: p, grads: gp)
        rar.conditionsBackward(
            dcs, t["\(prefix).c"].base, scratch: t["\(prefix).dc"].base, seq: conditionSeq, slot: conditionSlot,
            grads: gp)
    }
}
