import Kernels
import Platform

/// bytedance's RAR class-to-image decoder (SPEC section 9) as a TensorAR base. One table E
/// (`embeddings.weight`) holds the codes, a mask row, the classes at V + 1 + c and the none class
/// at V + 1 + C. The trunk runs T + 1 slots per sequence: slot 0 `cls_token + P[0]`, slot q >= 1
/// the input of SPEC position q - 1 plus the position rows of the order (`P`, `A`); each slot is
/// conditioned (adaLN) on c_q = E[y] + S[q]. Slot T + 1, whose output SPEC discards, is not
/// computed. The head is RAR's final layer: the adaLN of the condition of the target's slot
/// (scale first), a LayerNorm without parameters, `lm_head`, cross entropy.
final class RAR: BaseModel {
    static let name = "rar"

    /// Rows of the position tables and of the timestep table beyond T (SPEC section 9: T + 1024 and T + 100).
    static let extraPositionRows = 1024
    static let extraTimestepRows = 100

    /// SPEC section 9's table, in the released state_dict's order (the "base" group).
    static func addParameters(_ c: ModelConfig, to t: inout ParameterTable) {
        let D = c.dim
        let T = c.seqLen
        t.add("cls_token", [1, 1, D], .base, .zeros)
        t.add("embeddings.weight", [c.vocabSize + c.numClasses + 2, D], .base, .normal(0.02))
        t.add("pos_embed", [1, T + extraPositionRows, D], .base, .normal(0.02))
        t.add("target_aware_pos_embed", [1, T + extraPositionRows, D], .base, .normal(0.02))
        t.add("timesteps_embeddings", [1, T + extraTimestepRows, D], .base, .normal(0.02))
        for l in 0..<c.nLayer { t.addRARBlock("blocks.\(l)", c, .base) }
        t.add("adaln_before_head.adaLN_modulation.1.weight", [2 * D, D], .base, .zeros)
        t.add("adaln_before_head.adaLN_modulation.1.bias", [2 * D], .base, .zeros)
        t.add("lm_head.weight", [c.vocabSize, D], .base, .normal(0.02))
        t.add("lm_head.bias", [c.vocabSize], .base, .zeros)
    }

    let config: ModelConfig
    let D, V, C, T: Int
    let oCls, oEmb, oPos, oTarget, oTime, oFinalW, oFinalB, oHeadW, oHeadB: Int
    let trunk: RARBlockStack
    let layerRanges: [Range<Int>]
    let embeddingRange: Range<Int>
    let headRange: Range<Int>
    var headParts: [Int] { [V] }
    /// SPEC section 9: no dropout on embeddings; TensorAR over RAR keeps that (choice: section 3's
    /// token dropout is not applied to the sequence entering RAR's blocks either).
    static var tokenDropout: Bool { false }
    static var defaultDecayRule: DecayRule { .rar }
    static var readsSampleOrders: Bool { true }
    var classConditionsPlugin: Bool { true }
    /// The last `condition(_:)`.
    private(set) var conditioning = Conditioning(labels: [], orders: nil, headSequence: [], headStep: [])

    init(config c: ModelConfig, table: ParameterTable) {
        config = c
        D = c.dim
        V = c.vocabSize
        C = c.numClasses
        T = c.seqLen
        oCls = table.offset("cls_token")
        oEmb = table.offset("embeddings.weight")
        oPos = table.offset("pos_embed")
        oTarget = table.offset("target_aware_pos_embed")
        oTime = table.offset("timesteps_embeddings")
        oFinalW = table.offset("adaln_before_head.adaLN_modulation.1.weight")
        oFinalB = table.offset("adaln_before_head.adaLN_modulation.1.bias")
        oHeadW = table.offset("lm_head.weight")
        oHeadB = table.offset("lm_head.bias")
        trunk = RARBlockStack(
            weights: (0..<c.nLayer).map { RARBlockWeights(table, prefix: "blocks.\($0)") }, causal: true, dim: D,
            heads: c.nHead, ffn: c.ffnHidden, eps: c.normEps, siteBase: 0)
        layerRanges = (0..<c.nLayer).map {
            table.span("blocks.\($0).norm1.weight", "blocks.\($0).adaLN_modulation.1.bias")
        }
        embeddingRange = table.span("cls_token", "timesteps_embeddings")
        headRange = table.span("adaln_before_head.adaLN_modulation.1.weight", "lm_head.bias")
    }

    func condition(_ c: Conditioning) { conditioning = c }

    /// E's row of class `label` in [0, C] (C: the none class).
    private func classRow(_ label: Int32) -> Int { V + 1 + Int(label) }

    // MARK: inputs: SPEC position 0 is E[y], position p >= 1 E[x] (the trunk adds the positions)

    func embedClass(_ out: FloatPtr, label: Int, params p: FloatPtr) {
        out.update(from: p + oEmb + classRow(Int32(label)) * D, count: D)
    }
    func embedClassBackward(_ dout: ConstFloatPtr, label: Int, grads gp: FloatPtr) {
        let g = gp + oEmb + classRow(Int32(label)) * D
        for i in 0..<D { g[i] += dout[i] }
    }
    func embedTokens(_ out: FloatPtr, _ ids: UnsafePointer<Int32>, n: Int, params p: FloatPtr) {
        embeddingForward(out, ids, p + oEmb, n: n, d: D)
    }
    func embedTokensBackward(_ dout: ConstFloatPtr, _ ids: UnsafePointer<Int32>, n: Int, grads gp: FloatPtr) {
        embeddingBackward(gp + oEmb, dout, ids, n: n, d: D)
    }

    // MARK: conditions c = E[y] + S[slot], and silu(c)

    /// c (n, D) for rows whose class is `labels[seq[r]]` and whose timestep row is `slot[r]`. A
    /// slot past the table (only head rows past the image end, whose loss is unused, with k > 100)
    /// reads the last row (choice; SPEC section 9's table has T + 100 rows, the plug-in reads up
    /// to S[T + k - 1]).
    func conditionsForward(_ c: FloatPtr, _ cs: FloatPtr, seq: [Int32], slot: [Int32], params p: FloatPtr) {
        let labels = conditioning.labels
        let lastRow = T + RAR.extraTimestepRows - 1
        for r in 0..<seq.count {
            let e = p + oEmb + classRow(labels[Int(seq[r])]) * D
            let s = p + oTime + min(Int(slot[r]), lastRow) * D
            let o = c + r * D
            for i in 0..<D { o[i] = e[i] + s[i] }
        }
        siluForward(cs, c, count: seq.count * D)
    }

    /// dcs (n, D): the gradient w.r.t. silu(c); adds E's and S's gradients (serial, row order).
    func conditionsBackward(
        _ dcs: ConstFloatPtr, _ c: ConstFloatPtr, scratch dc: FloatPtr, seq: [Int32], slot: [Int32],
        grads gp: FloatPtr
    ) {
        let n = seq.count
        let labels = conditioning.labels
        let lastRow = T + RAR.extraTimestepRows - 1
        dc.update(repeating: 0, count: n * D)
        siluBackward(dc, dcs, c, count: n * D)
        let classIds = seq.map { Int32(classRow(labels[Int($0)])) }
        let slotIds = slot.map { Int32(min(Int($0), lastRow)) }
        embeddingBackward(gp + oEmb, dc, classIds, n: n, d: D)
        embeddingBackward(gp + oTime, dc, slotIds, n: n, d: D)
    }

    // MARK: trunk: T + 1 slots, positions of the order, the causal RAR blocks

    private var B = 0
    private var table: ActivationTable?
    /// Per trunk row (b, q), q = 0 ..< T + 1: its sequence, its slot, its P row and its A row (-1: none).
    private var slotSeq: [Int32] = [], slotIndex: [Int32] = [], posRows: [Int32] = [], targetRows: [Int32] = []

    static func addActivations(_ c: ModelConfig, sequences B: Int, headRows n: Int, to a: inout ActivationLayout) {
        let S = c.seqLen + 1
        let D = c.dim
        RARBlockStack.addActivations("trunk", layers: c.nLayer, sequences: B, seqLen: S, c, to: &a)
        a.add("rar.seq", [B, S, D])  // the slots' inputs, then the blocks' outputs
        a.add("rar.c", [B, S, D])
        a.add("rar.cs", [B, S, D])  // c_q, silu(c_q)
        a.add("rar.dseq", [B, S, D], .backward)
        a.add("rar.dcs", [B, S, D], .backward)
        a.add("rar.dc", [B, S, D], .backward)
        a.add("head.c", [n, D])
        a.add("head.cs", [n, D])  // the target slot's condition, silu
        a.add("head.mod", [n, 2 * D])  // scale, shift
        a.add("head.ln", [n, D])
        a.add("head.stats", [2, n])  // LN(h) without parameters; mean, rstd
        a.add("head.m", [n, D])  // modulated
        a.add("head.logits", [n, c.vocabSize])  // then their gradient
        a.add("head.loss", [n])
        a.add("head.dm", [n, D], .backward)
        a.add("head.dln", [n, D], .backward)
        a.add("head.dmod", [n, 2 * D], .backward)
        a.add("head.dcs", [n, D], .backward)
        a.add("head.dc", [n, D], .backward)
    }

    func bind(_ t: ActivationTable, sequences: Int, headRows n: Int) {
        trunk.bind(t, prefix: "trunk", sequences: sequences, seqLen: T + 1)
        table = t
        B = sequences
        rows = n
    }

    /// The P and A rows of every slot (SPEC section 9): slot 0 P[0]; slot 1 P[1] + A[2 + pi(0)];
    /// slot 2 + i P[2 + pi(i)] + A[2 + pi(i + 1)]. Raster: slot q has P[q] + A[q + 1].
    private func slotRows() {
        let S = T + 1
        slotSeq = (0..<(B * S)).map { Int32($0 / S) }
        slotIndex = (0..<(B * S)).map { Int32($0 % S) }
        posRows = [Int32](repeating: 0, count: B * S)
        targetRows = [Int32](repeating: -1, count: B * S)
        for b in 0..<B {
            let order = { (i: Int) -> Int in self.conditioning.orders.map { Int($0[b * self.T + i]) } ?? i }
            posRows[b * S + 1] = 1
            targetRows[b * S + 1] = Int32(2 + order(0))
            for i in 0..<(T - 1) {
                posRows[b * S + 2 + i] = Int32(2 + order(i))
                targetRows[b * S + 2 + i] = Int32(2 + order(i + 1))
            }
        }
    }

    func trunkForward(
        _ x: FlatBuffer, sequences: Int, dropout: DropoutPlan?, params p: FloatPtr, needed: ((Range<Int>) -> Void)?
    ) {
        precondition(sequences == B && conditioning.labels.count == B, "RAR trunk bound for \(B) sequences")
        let t = table!
        let S = T + 1
        let seq = t["rar.seq"].base
        slotRows()
        for b in 0..<B {
            (seq + b * S * D).update(from: p + oCls, count: D)
            (seq + (b * S + 1) * D).update(from: x.base + b * T * D, count: T * D)
        }
        posRows.withUnsafeBufferPointer { addRowsForward(seq, $0.baseAddress!, p + oPos, n: B * S, d: D) }
        targetRows.withUnsafeBufferPointer { addRowsForward(seq, $0.baseAddress!, p + oTarget, n: B * S, d: D) }
        let cs = t["rar.cs"].base
        conditionsForward(t["rar.c"].base, cs, seq: slotSeq, slot: slotIndex, params: p)
        let before = needed.map { needed in { [layerRanges] (l: Int) in needed(layerRanges[l]) } }
        trunk.forward(t["rar.seq"], cond: cs, params: p, sequences: B, seqLen: S, dropout: dropout, beforeBlock: before)
        for b in 0..<B { (x.base + b * T * D).update(from: seq + (b * S + 1) * D, count: T * D) }
    }

    func trunkBackward(_ dx: FlatBuffer, params p: FloatPtr, grads gp: FloatPtr, onReady: ((Range<Int>) -> Void)?) {
        let t = table!
        t.allocate(.backward)
        let S = T + 1
        let dseq = t.zeroed("rar.dseq")
        for b in 0..<B { (dseq.base + (b * S + 1) * D).update(from: dx.base + b * T * D, count: T * D) }
        let dcs = t.zeroed("rar.dcs").base
        trunk.backward(dseq, dcond: dcs, cond: t["rar.cs"].base, params: p, grads: gp) { [layerRanges] l in
            onReady?(layerRanges[l])
        }
        let d = dseq.base
        for b in 0..<B {
            let g = gp + oCls
            let s = d + b * S * D
            for i in 0..<D { g[i] += s[i] }
        }
        posRows.withUnsafeBufferPointer { embeddingBackward(gp + oPos, d, $0.baseAddress!, n: B * S, d: D) }
        targetRows.withUnsafeBufferPointer { embeddingBackward(gp + oTarget, d, $0.baseAddress!, n: B * S, d: D) }
        conditionsBackward(dcs, t["rar.c"].base, scratch: t["rar.dc"].base, seq: slotSeq, slot: slotIndex, grads: gp)
        for b in 0..<B { (dx.base + b * T * D).update(from: d + (b * S + 1) * D, count: T * D) }
    }

    var trunkRanges: [Range<Int>] { layerRanges.reversed() }

    func makeTrunkCache(rows: Int) -> any TrunkCache { trunk.makeCache(rows: rows, seqLen: T + 1) }

    /// SPEC section 9's cached sampling, raster order: position 0 runs slots 0 (cls) and 1 (the
    /// class input x), position p >= 1 runs slot p + 1; x (rows, D) in: the input of SPEC
    /// position p; out: the output of slot p + 1.
    func trunkStep(_ x: FloatPtr, cache: any TrunkCache, position pos: Int, params p: FloatPtr) {
        let cache = cache as! RARCache
        let NB = cache.rows
        precondition(
            conditioning.labels.count == NB, "RAR trunk step: \(NB) cached rows, \(conditioning.labels.count) labels")
        if stepCond?.count != NB * D {
            stepCond = FlatBuffer(count: NB * D)
            stepCondSilu = FlatBuffer(count: NB * D)
            stepCls = FlatBuffer(count: NB * D)
        }
        let seq = (0..<NB).map { Int32($0) }
        if pos == 0 {
            let cls = stepCls!.base
            for r in 0..<NB {
                let o = cls + r * D
                for i in 0..<D { o[i] = p[oCls + i] + p[oPos + i] }
            }
            stepSlot(cls, slot: 0, seq: seq, cache: cache, params: p)
        }
        let q = pos + 1
        let P = p + oPos + q * D
        let A = p + oTarget + (q + 1) * D
        for r in 0..<NB {
            let o = x + r * D
            for i in 0..<D { o[i] += P[i] + A[i] }
        }
        stepSlot(x, slot: q, seq: seq, cache: cache, params: p)
    }
    private var stepCond, stepCondSilu, stepCls: FlatBuffer?

    private func stepSlot(_ x: FloatPtr, slot q: Int, seq: [Int32], cache: RARCache, params p: FloatPtr) {
        let slots = [Int32](repeating: Int32(q), count: seq.count)
        conditionsForward(stepCond!.base, stepCondSilu!.base, seq: seq, slot: slots, params: p)
        trunk.step(x, cond: stepCondSilu!.base, cache: cache, position: q, params: p)
    }

    // MARK: head: final adaLN (scale, shift) of the target slot's condition, LN, lm_head, CE

    private var rows = 0
    private var headInput: FlatBuffer?
    private var headSlots: [Int32] = []
    private var targets: [Int32] = []
    private var dloss: [Float]?

    /// logits (n, V) of hidden states h (n, D) with conditions of `slot` (RAR slot = step + 1).
    private func finalLayer(
        _ logits: FloatPtr, _ h: ConstFloatPtr, n: Int, seq: [Int32], slot: [Int32], bufs: HeadBuffers,
        params p: FloatPtr
    ) {
        conditionsForward(bufs.c, bufs.cs, seq: seq, slot: slot, params: p)
        matmulForward(bufs.mod, bufs.cs, p + oFinalW, n: n, ic: D, oc: 2 * D)
        biasAddForward(bufs.mod, p + oFinalB, n: n, oc: 2 * D)
        layernormForward(bufs.ln, bufs.stats, bufs.stats + n, h, nil, nil, n: n, d: D, eps: config.normEps)
        // SCALE FIRST (SPEC section 9): columns [0, D) scale, [D, 2D) shift
        modulateForward(bufs.m, bufs.ln, shift: bufs.mod + D, scale: bufs.mod, ld: 2 * D, n: n, d: D)
        matmulForward(logits, bufs.m, p + oHeadW, n: n, ic: D, oc: V)
        biasAddForward(logits, p + oHeadB, n: n, oc: V)
    }

    /// Pointers of the head's per-row buffers (training: the activation table; sampling: its own).
    struct HeadBuffers {
        let c, cs, mod, ln, stats, m: FloatPtr
    }

    private func trainingHeadBuffers() -> HeadBuffers {
        let t = table!
        return HeadBuffers(
            c: t["head.c"].base, cs: t["head.cs"].base, mod: t["head.mod"].base, ln: t["head.ln"].base,
            stats: t["head.stats"].base, m: t["head.m"].base)
    }

    func headForward(
        _ h: FlatBuffer, rows n: Int, targets: [Int32], losses: inout [Float],
        logits: UnsafeMutablePointer<Float>?, dropout: DropoutPlan?, gradient: HeadGradient?,
        params p: FloatPtr
    ) {
        precondition(n == rows && conditioning.headStep.count == n, "RAR head bound for \(rows) rows, run on \(n)")
        let t = table!
        headInput = h
        self.targets = targets
        dloss = gradient?.dloss
        headSlots = conditioning.headStep.map { $0 + 1 }
        let lg = t["head.logits"].base
        finalLayer(
            lg, h.base, n: n, seq: conditioning.headSequence, slot: headSlots, bufs: trainingHeadBuffers(), params: p)
        logits?.update(from: lg, count: n * V)
        let loss = t["head.loss"].base
        let ones = [Float](repeating: 1, count: n)
        crossEntropyForwardBackward(loss, nil, lg, targets, ones, scale: 0, n: n, v: V)
        for r in 0..<n { losses[r] = loss[r] }
    }

    func headBackward(_ dh: FlatBuffer, params p: FloatPtr, grads gp: FloatPtr) {
        guard let dloss else { preconditionFailure("RAR.headBackward needs a headForward given a gradient") }
        self.dloss = nil
        let t = table!
        t.allocate(.backward)
        let n = rows
        let b = trainingHeadBuffers()
        let lg = t["head.logits"].base
        crossEntropyForwardBackward(t["head.loss"].base, lg, lg, targets, dloss, scale: 1, n: n, v: V)
        let dm = t.zeroed("head.dm").base
        matmulBackward(dm, gp + oHeadW, lg, b.m, p + oHeadW, n: n, ic: D, oc: V)
        biasBackward(gp + oHeadB, lg, n: n, oc: V)
        let dln = t.zeroed("head.dln").base
        let dmod = t.zeroed("head.dmod").base
        modulateBackward(dln, dshift: dmod + D, dscale: dmod, dm, b.ln, scale: b.mod, ld: 2 * D, n: n, d: D)
        layernormBackward(dh.base, nil, nil, dln, headInput!.base, nil, b.stats, b.stats + n, n: n, d: D)
        let dcs = t.zeroed("head.dcs").base
        matmulBackward(dcs, gp + oFinalW, dmod, b.cs, p + oFinalW, n: n, ic: D, oc: 2 * D)
        biasBackward(gp + oFinalB, dmod, n: n, oc: 2 * D)
        conditionsBackward(
            dcs, b.c, scratch: t["head.dc"].base, seq: conditioning.headSequence, slot: headSlots, grads: gp)
    }

    // MARK: sampling head

    private var sample: [FlatBuffer] = []

    func headLogits(
        _ out: FloatPtr, _ h: ConstFloatPtr, rows n: Int, part: Int, chosen: [[Int32]],
        params p: FloatPtr
    ) {
        precondition(
            conditioning.headStep.count == n, "RAR head: \(n) rows, \(conditioning.headStep.count) conditioned")
        if sample.first?.count != n * D {
            sample = [n * D, n * D, 2 * n * D, n * D, 2 * n, n * D].map { FlatBuffer(count: $0) }
        }
        let bufs = HeadBuffers(
            c: sample[0].base, cs: sample[1].base, mod: sample[2].base, ln: sample[3].base, stats: sample[4].base,
            m: sample[5].base)
        let slots = conditioning.headStep.map { $0 + 1 }
        finalLayer(out, h, n: n, seq: conditioning.headSequence, slot: slots, bufs: bufs, params: p)
    }

    func token(parts: [Int32]) -> Int32 { parts[0] }

    // MARK: noise tables and FLOPs

    static func tokenFactors(_ c: ModelConfig) -> [TokenFactor] {
        [TokenFactor(name: "embeddings.weight", rows: c.vocabSize, stride: 1)]
    }

    /// Per row: the final adaLN (D x 2D) and lm_head (D x V); every row runs (`headForward`).
    static func headFLOPs(_ c: ModelConfig, rows: Int, validRows: Int) -> Double {
        2 * Double(rows) * Double(c.dim) * Double(2 * c.dim + c.vocabSize)
    }
    static func samplingHeadFLOPs(_ c: ModelConfig, rows: Int) -> Double {
        2 * Double(rows) * Double(c.dim) * Double(2 * c.dim + c.vocabSize)
    }
}
