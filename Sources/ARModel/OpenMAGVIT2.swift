import Kernels
import Platform

/// TencentARC's Open-MAGVIT2 class-to-image model (SPEC section 8) as a TensorAR base. A code
/// x in [0, 2^(b0+b1)) is two sub-tokens, pre = x & (2^b0 - 1) (the LOW bits) and post = x >> b0.
/// Inputs are pre_emb[pre] + post_emb[post]; the trunk is `n_layer` LlamaGen blocks with the 2D
/// rotary table; the head runs, per hidden state h, the causal 2-slot sequence
/// [h, pre_emb[pre(target)]] through the `factorized_n_layer` blocks (rotary rows 0 and 1),
/// then one shared norm, head.0 on slot 0 (pre logits) and head.1 on slot 1 (post logits given
/// the pre sub-token). The loss of a row is CE(pre) + CE(post).
final class OpenMAGVIT2: RotaryTrunkBase {
    static let name = "open-magvit2"

    /// SPEC section 8's table, in its order (the "base" group).
    static func addParameters(_ c: ModelConfig, to t: inout ParameterTable) {
        let D = c.dim
        let preV = 1 << c.factorizedBits[0]
        let postV = 1 << c.factorizedBits[1]
        t.add("class_emb.embedding_table.weight", [c.numClasses + 1, D], .base, .normal(0.02))
        t.add("pre_emb.weight", [preV, D], .base, .normal(0.02))
        t.add("post_emb.weight", [postV, D], .base, .normal(0.02))
        for l in 0..<c.nLayer { t.addBlock("spatial_blocks.\(l)", c, .base) }
        for m in 0..<c.factorizedNLayer { t.addBlock("factorized_blocks.\(m)", c, .base) }
        t.add("norm.weight", [D], .base, .ones)
        t.add("head.0.weight", [preV, D], .base, .zeros)
        t.add("head.1.weight", [postV, D], .base, .zeros)
    }

    let config: ModelConfig
    let D: Int
    /// Sub-vocabulary sizes 2^b0 and 2^b1, and the pre mask 2^b0 - 1.
    let preV, postV: Int
    let preBits: Int32
    let preMask: Int32
    let oCls, oPre, oPost, oNorm, oHead0, oHead1: Int
    let trunk: BlockStack
    /// The factorized stack: causal over 2 slots, rotary rows 0 (class row: q, k zero) and 1
    /// (cell (0, 0): the identity), SPEC section 8.
    let factorized: BlockStack
    let layerRanges: [Range<Int>]
    let embeddingRange: Range<Int>
    let headRange: Range<Int>
    var headParts: [Int] { [preV, postV] }
    var lossPartNames: [String] { ["pre", "post"] }

    init(config c: ModelConfig, table: ParameterTable) {
        config = c
        D = c.dim
        preV = 1 << c.factorizedBits[0]
        postV = 1 << c.factorizedBits[1]
        preBits = Int32(c.factorizedBits[0])
        preMask = Int32(preV - 1)
        oCls = table.offset("class_emb.embedding_table.weight")
        oPre = table.offset("pre_emb.weight")
        oPost = table.offset("post_emb.weight")
        oNorm = table.offset("norm.weight")
        oHead0 = table.offset("head.0.weight")
        oHead1 = table.offset("head.1.weight")
        (trunk, layerRanges) = OpenMAGVIT2.rotaryTrunk(c, table, prefix: "spatial_blocks")
        // Rows 0 and 1 of the section 2 table; its own 2-row copy so a 1x1 grid works too.
        let rot2 = RotaryTable(seqLen: 2, gridW: c.gridSize, headDim: c.headDim, base: c.ropeBase)
        let fw = (0..<c.factorizedNLayer).map { BlockWeights(table, prefix: "factorized_blocks.\($0)") }
        // dropout sites of their own (SPEC 8: dropout after wo and w2 in the factorized blocks too)
        factorized = BlockStack(
            weights: fw, causal: true, rotary: rot2, dim: D, heads: c.nHead,
            ffn: c.ffnHidden, eps: c.normEps, siteBase: 40_000)
        embeddingRange = table.span("class_emb.embedding_table.weight", "post_emb.weight")
        let headFirst = c.factorizedNLayer > 0 ? "factorized_blocks.0.attention_norm.weight" : "norm.weight"
        headRange = table.span(headFirst, "head.1.weight")
    }

    @inline(__always) func pre(_ x: Int32) -> Int { Int(x & preMask) }
    @inline(__always) func post(_ x: Int32) -> Int { Int(x >> preBits) }

    // MARK: inputs (SPEC section 8: position 0 the class (`RotaryTrunkBase`), p >= 1 pre_emb[pre] + post_emb[post])

    func embedTokens(_ out: FloatPtr, _ ids: UnsafePointer<Int32>, n: Int, params p: FloatPtr) {
        for r in 0..<n {
            let o = out + r * D
            let a = p + oPre + pre(ids[r]) * D
            let b = p + oPost + post(ids[r]) * D
            for i in 0..<D { o[i] = a[i] + b[i] }
        }
    }
    func embedTokensBackward(_ dout: ConstFloatPtr, _ ids: UnsafePointer<Int32>, n: Int, grads gp: FloatPtr) {
        for r in 0..<n {
            let d = dout + r * D
            let a = gp + oPre + pre(ids[r]) * D
            let b = gp + oPost + post(ids[r]) * D
            for i in 0..<D {
                a[i] += d[i]
                b[i] += d[i]
            }
        }
    }

    // the trunk (the spatial blocks, as LlamaGen's layers): `RotaryTrunkBase`

    // MARK: head: the factorized stack, norm, head.0 / head.1, CE(pre) + CE(post)

    private var rows = 0
    private var table: ActivationTable?
    private var targets: [Int32] = []
    private(set) var partLosses: [[Float]] = []

    /// Per head row n: the 2-slot sequence, each slot's output, norm and logits (SPEC section 8).
    static func addActivations(_ c: ModelConfig, sequences B: Int, headRows n: Int, to a: inout ActivationLayout) {
        BlockStack.addActivations("trunk", layers: c.nLayer, sequences: B, seqLen: c.seqLen, c, to: &a)
        BlockStack.addActivations("fact", layers: c.factorizedNLayer, sequences: n, seqLen: 2, c, to: &a)
        let D = c.dim
        let preV = 1 << c.factorizedBits[0]
        let postV = 1 << c.factorizedBits[1]
        a.add("head.seq", [n, 2, D])  // [h, pre_emb[pre]], then the stack's output
        for s in 0..<2 {
            a.add("head.out\(s)", [n, D])  // slot s's output
            a.add("head.rstd\(s)", [n])  // the shared norm's
            a.add("head.norm\(s)", [n, D])
            a.add("head.logits\(s)", [n, s == 0 ? preV : postV])  // then their gradients
            a.add("head.loss\(s)", [n])  // CE(pre), CE(post)
        }
        a.add("head.dnorm", [n, D], .backward)
        a.add("head.dout", [n, D], .backward)
        a.add("head.dseq", [n, 2, D], .backward)
    }

    func bind(_ t: ActivationTable, sequences B: Int, headRows n: Int) {
        trunk.bind(t, prefix: "trunk", sequences: B, seqLen: config.seqLen)
        factorized.bind(t, prefix: "fact", sequences: n, seqLen: 2)
        table = t
        rows = n
    }

    /// The pre sub-token slot 1 reads for a target: its own, or 0 for a row with no target
    /// (rows past the image end; choice: any fixed value, their loss is not used).
    private func slotOnePre(_ target: Int32) -> Int32 { target >= 0 ? target & preMask : 0 }

    func headForward(
        _ h: FlatBuffer, rows n: Int, targets: [Int32], losses: inout [Float],
        logits: UnsafeMutablePointer<Float>?, dropout: DropoutPlan?, gradient: HeadGradient?,
        params p: FloatPtr
    ) {
        precondition(n == rows, "head bound for \(rows) rows, run on \(n)")
        let t = table!
        self.targets = targets
        dloss = gradient?.dloss
        let seq = t["head.seq"]
        for r in 0..<n {
            (seq.base + 2 * r * D).update(from: h.base + r * D, count: D)
            let e = p + oPre + Int(slotOnePre(targets[r])) * D
            (seq.base + (2 * r + 1) * D).update(from: e, count: D)
        }
        // Every row runs (rows past the image end too: then the dropout masks keep their
        // per-sample layout); the loss skips them.
        factorized.forward(seq, params: p, sequences: n, seqLen: 2, dropout: dropout)
        for s in 0..<2 { slotHeadForward(slot: s, n: n, params: p) }
        let l0 = t["head.loss0"].base
        let l1 = t["head.loss1"].base
        let lg0 = t["head.logits0"].base
        let lg1 = t["head.logits1"].base
        if let logits {
            let W = preV + postV
            for r in 0..<n {
                (logits + r * W).update(from: lg0 + r * preV, count: preV)
                (logits + r * W + preV).update(from: lg1 + r * postV, count: postV)
            }
        }
        var pre = [Int32](repeating: -1, count: n)
        var post = pre
        for r in 0..<n where targets[r] >= 0 {
            pre[r] = targets[r] & preMask
            post[r] = targets[r] >> preBits
        }
        let ones = [Float](repeating: 1, count: n)
        crossEntropyForwardBackward(l0, nil, lg0, pre, ones, scale: 0, n: n, v: preV)
        crossEntropyForwardBackward(l1, nil, lg1, post, ones, scale: 0, n: n, v: postV)
        partLosses = [Array(UnsafeBufferPointer(start: l0, count: n)), Array(UnsafeBufferPointer(start: l1, count: n))]
        for r in 0..<n { losses[r] = l0[r] + l1[r] }
    }

    /// Slot s's output rows out of the stack, the shared norm, and head.s.
    private func slotHeadForward(slot s: Int, n: Int, params p: FloatPtr) {
        let t = table!
        let seq = t["head.seq"].base
        let out = t["head.out\(s)"].base
        for r in 0..<n { (out + r * D).update(from: seq + (2 * r + s) * D, count: D) }
        let normed = t["head.norm\(s)"].base
        rmsnormForward(normed, t["head.rstd\(s)"].base, out, p + oNorm, n: n, d: D, eps: config.normEps)
        let V = s == 0 ? preV : postV
        matmulForward(t["head.logits\(s)"].base, normed, p + (s == 0 ? oHead0 : oHead1), n: n, ic: D, oc: V)
    }

    /// The loss weights of the backward that follows the last forward (`HeadGradient.dloss`).
    private var dloss: [Float]?

    func headBackward(_ dh: FlatBuffer, params p: FloatPtr, grads gp: FloatPtr) {
        guard let dloss else { preconditionFailure("OpenMAGVIT2.headBackward needs a headForward given a gradient") }
        self.dloss = nil
        let t = table!
        t.allocate(.backward)
        let n = rows
        let dseq = t.zeroed("head.dseq")
        var pre = [Int32](repeating: -1, count: n)
        var post = pre
        for r in 0..<n where targets[r] >= 0 {
            pre[r] = targets[r] & preMask
            post[r] = targets[r] >> preBits
        }
        slotHeadBackward(slot: 0, targets: pre, dloss: dloss, into: dseq, params: p, grads: gp)
        slotHeadBackward(slot: 1, targets: post, dloss: dloss, into: dseq, params: p, grads: gp)
        factorized.backward(dseq, params: p, grads: gp)
        for r in 0..<n {
            (dh.base + r * D).update(from: dseq.base + 2 * r * D, count: D)
            if targets[r] < 0 { continue }
            let g = gp + oPre + Int(targets[r] & preMask) * D
            let d = dseq.base + (2 * r + 1) * D
            for i in 0..<D { g[i] += d[i] }
        }
    }

    /// CE of slot s (logits turned into their gradient in place), head.s, the norm, into dseq.
    private func slotHeadBackward(
        slot s: Int, targets tg: [Int32], dloss: [Float], into dseq: FlatBuffer,
        params p: FloatPtr, grads gp: FloatPtr
    ) {
        let t = table!
        let n = rows
        let V = s == 0 ? preV : postV
        let lg = t["head.logits\(s)"].base
        crossEntropyForwardBackward(t["head.loss\(s)"].base, lg, lg, tg, dloss, scale: 1, n: n, v: V)
        let dnorm = t.zeroed("head.dnorm")
        let w = s == 0 ? oHead0 : oHead1
        matmulBackward(dnorm.base, gp + w, lg, t["head.norm\(s)"].base, p + w, n: n, ic: D, oc: V)
        let dout = t.zeroed("head.dout")
        rmsnormBackward(
            dout.base, gp + oNorm, dnorm.base, t["head.out\(s)"].base, p + oNorm, t["head.rstd\(s)"].base,
            n: n, d: D)
        for r in 0..<n { (dseq.base + (2 * r + s) * D).update(from: dout.base + r * D, count: D) }
    }

    // MARK: sampling: slot 0 from h with a fresh factorized cache, then slot 1 from the chosen pre

    private var sampleCache: KVCache?
    private var sampleX, sampleNorm, sampleRstd: FlatBuffer?

    func headLogits(
        _ out: FloatPtr, _ h: ConstFloatPtr, rows n: Int, part: Int, chosen: [[Int32]],
        params p: FloatPtr
    ) {
        if sampleCache?.rows != n {
            sampleCache = factorized.makeCache(rows: n, seqLen: 2)
            sampleX = FlatBuffer(count: n * D)
            sampleNorm = FlatBuffer(count: n * D)
            sampleRstd = FlatBuffer(count: n)
        }
        let x = sampleX!.base
        if part == 0 {
            x.update(from: h, count: n * D)
        } else {
            // the chosen pre sub-token (-1 for a slot past the image end: any row will do)
            for r in 0..<n { (x + r * D).update(from: p + oPre + Int(max(chosen[0][r], 0)) * D, count: D) }
        }
        // position 0 overwrites the cache's slot 0: every step starts a fresh factorized cache
        factorized.step(x, cache: sampleCache!, position: part, params: p)
        rmsnormForward(sampleNorm!.base, sampleRstd!.base, x, p + oNorm, n: n, d: D, eps: config.normEps)
        let w = part == 0 ? oHead0 : oHead1
        matmulForward(out, sampleNorm!.base, p + w, n: n, ic: D, oc: part == 0 ? preV : postV)
    }

    /// x = pre + 2^b0 post (SPEC section 8).
    func token(parts: [Int32]) -> Int32 { parts[0] | (parts[1] << preBits) }

    // MARK: discrete noise tables and FLOPs

    static func tokenFactors(_ c: ModelConfig) -> [TokenFactor] {
        let b0 = c.factorizedBits[0]
        return [
            TokenFactor(name: "pre_emb.weight", rows: 1 << b0, stride: 1),
            TokenFactor(name: "post_emb.weight", rows: 1 << c.factorizedBits[1], stride: 1 << b0),
        ]
    }

    /// Every head row runs the factorized stack over 2 slots and both heads (`headForward`).
    static func headFLOPs(_ c: ModelConfig, rows: Int, validRows: Int) -> Double {
        let width = Double((1 << c.factorizedBits[0]) + (1 << c.factorizedBits[1]))
        let stack = c.stackFLOPs(sequences: rows, seqLen: 2, layers: c.factorizedNLayer, causal: true)
        return stack + 2 * Double(rows) * Double(c.dim) * width
    }

    /// Two cached steps of the factorized stack and both heads per row.
    static func samplingHeadFLOPs(_ c: ModelConfig, rows: Int) -> Double {
        let D = Double(c.dim)
        let F = Double(c.ffnHidden)
        let perRowBlock = 2 * (D * 3 * D + D * D + D * 2 * F + F * D)
        let attention = 2 * 2 * Double(c.nHead) * 3 * Double(c.headDim)  // positions 0, then 0 and 1
        let width = Double((1 << c.factorizedBits[0]) + (1 << c.factorizedBits[1]))
        let stack = Double(rows) * Double(c.factorizedNLayer) * (2 * perRowBlock + attention)
        return stack + 2 * Double(rows) * D * width
    }
}
