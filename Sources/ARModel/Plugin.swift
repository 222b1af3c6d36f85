import Kernels
import Platform

extension Transformer {
    /// SPEC section 3's plug-in table (the "plugin" group), after the base's entries.
    static func addPluginParameters(_ c: ModelConfig, to t: inout ParameterTable) {
        let D = c.dim
        let k = c.window
        let d = c.pluginDepth
        let projInit: ParameterInit = c.residual ? .zeros : .normal(0.02)
        t.add("tensorar.in_query", [D], .plugin, .normal(0.02))
        t.add("tensorar.in_pos", [k, D], .plugin, .normal(0.02))
        // over RAR (SPEC section 9): RAR blocks, LayerNorms with weight and bias (the reference's
        // names, Tests/Reference/README.md "Plug-in parameter names over RAR"); proj has no bias
        let rar = c.base == RAR.name
        t.add("tensorar.in_pad", [D], .plugin, .normal(0.02))
        for i in 0..<d {
            if rar {
                t.addRARBlock("tensorar.encoder.layers.\(i)", c, .plugin)
            } else {
                t.addBlock("tensorar.encoder.layers.\(i)", c, .plugin)
            }
        }
        t.add("tensorar.encoder.norm.weight", [D], .plugin, .ones)
        if rar { t.add("tensorar.encoder.norm.bias", [D], .plugin, .zeros) }
        t.add("tensorar.encoder.proj.weight", [D, D], .plugin, projInit)
        t.add("tensorar.out_pos", [k, D], .plugin, .normal(0.02))
        for i in 0..<d {
            if rar {
                t.addRARBlock("tensorar.decoder.layers.\(i)", c, .plugin)
            } else {
                t.addBlock("tensorar.decoder.layers.\(i)", c, .plugin)
            }
        }
        t.add("tensorar.decoder.norm.weight", [D], .plugin, .ones)
        if rar { t.add("tensorar.decoder.norm.bias", [D], .plugin, .zeros) }
        t.add("tensorar.decoder.proj.weight", [D, D], .plugin, projInit)
    }
}

/// The plug-in's blocks over `sequences` of `seqLen` vectors: SPEC section 3's base blocks with a
/// full mask and no rotary (`BlockStack`), or over RAR its blocks conditioned on the position's
/// c_q (`RARPluginBlocks`, SPEC section 9).
protocol PluginBlocks: AnyObject {
    func bindSequences(_ t: ActivationTable, prefix: String, sequences: Int, seqLen: Int)
    func forwardSequences(_ x: FlatBuffer, params p: FloatPtr, sequences: Int, seqLen: Int, dropout: DropoutPlan?)
    func backwardSequences(_ dx: FlatBuffer, params p: FloatPtr, grads gp: FloatPtr)
}

extension BlockStack: PluginBlocks {
    func bindSequences(_ t: ActivationTable, prefix: String, sequences: Int, seqLen: Int) {
        bind(t, prefix: prefix, sequences: sequences, seqLen: seqLen)
    }
    func forwardSequences(_ x: FlatBuffer, params p: FloatPtr, sequences: Int, seqLen: Int, dropout: DropoutPlan?) {
        forward(x, params: p, sequences: sequences, seqLen: seqLen, dropout: dropout)
    }
    func backwardSequences(_ dx: FlatBuffer, params p: FloatPtr, grads gp: FloatPtr) {
        backward(dx, params: p, grads: gp)
    }
}

/// The plug-in's blocks of `prefix` (SPEC section 3, or section 9 over RAR).
private func pluginBlocks(
    _ prefix: String, _ c: ModelConfig, _ t: ParameterTable, siteBase: Int, base: any BaseModel, encoder: Bool
) -> any PluginBlocks {
    if let rar = base as? RAR {
        let stack = RARBlockStack(
            weights: (0..<c.pluginDepth).map { RARBlockWeights(t, prefix: "\(prefix).layers.\($0)") }, causal: false,
            conditionPerSequence: true, dim: c.dim, heads: c.nHead, ffn: c.ffnHidden, eps: c.normEps,
            siteBase: siteBase)
        return RARPluginBlocks(stack, rar: rar, encoder: encoder)
    }
    return BlockStack(
        weights: (0..<c.pluginDepth).map { BlockWeights(t, prefix: "\(prefix).layers.\($0)") }, causal: false,
        rotary: nil, dim: c.dim, heads: c.nHead, ffn: c.ffnHidden, eps: c.normEps, siteBase: siteBase)
}

/// The activations of the plug-in blocks of `prefix`.
private func addPluginBlockActivations(
    _ prefix: String, _ c: ModelConfig, sequences n: Int, seqLen S: Int, to a: inout ActivationLayout
) {
    if c.base == RAR.name {
        RARPluginBlocks.addActivations(prefix, c, sequences: n, seqLen: S, to: &a)
    } else {
        BlockStack.addActivations(prefix, layers: c.pluginDepth, sequences: n, seqLen: S, c, to: &a)
    }
}

/// The plug-in's encoder and decoder norm: RMSNorm (SPEC section 3) or, over RAR, a LayerNorm
/// with weight and bias (SPEC section 9). `stats` holds rstd (n), or mean and rstd (2n).
struct PluginNorm {
    let weight: Int
    let bias: Int?
    let eps: Float
    init(_ t: ParameterTable, prefix: String, eps: Float) {
        weight = t.offset("\(prefix).norm.weight")
        bias = t.entry("\(prefix).norm.bias").map { $0.offset }
        self.eps = eps
    }
    static func statsRows(_ c: ModelConfig) -> Int { c.base == RAR.name ? 2 : 1 }

    func forward(_ out: FloatPtr, _ stats: FloatPtr, _ inp: ConstFloatPtr, n: Int, d: Int, params p: FloatPtr) {
        if let bias {
            layernormForward(out, stats, stats + n, inp, p + weight, p + bias, n: n, d: d, eps: eps)
        } else {
            rmsnormForward(out, stats, inp, p + weight, n: n, d: d, eps: eps)
        }
    }
    func backward(
        _ dinp: FloatPtr, _ dout: ConstFloatPtr, _ inp: ConstFloatPtr, _ stats: ConstFloatPtr, n: Int, d: Int,
        params p: FloatPtr, grads gp: FloatPtr
    ) {
        if let bias {
            layernormBackward(dinp, gp + weight, gp + bias, dout, inp, p + weight, stats, stats + n, n: n, d: d)
        } else {
            rmsnormBackward(dinp, gp + weight, dout, inp, p + weight, stats, n: n, d: d)
        }
    }
}

/// The input encoder (SPEC section 3), for n tensors t (n, k): per tensor the sequence
/// [in_query, e_0..e_{k-1}] with e_j = embed(t_j) + in_pos[j] (in_pad + in_pos[j] for a pad),
/// u = proj(norm(slot 0)); the base's input is embed(t_0) + u (residual) or u.
final class EncoderStage {
    let base: any BaseModel
    let D, k: Int
    let eps: Float
    let residual: Bool
    let blocks: any PluginBlocks
    let norm: PluginNorm
    let oQuery, oPos, oPad, oProj: Int
    /// Flat range of the encoder's parameters, final after `backward`.
    let range: Range<Int>
    private var n = 0
    private var seqs, slot0, rstd, normed, u: FlatBuffer?
    private var tensors: [Int32] = []
    private var table: ActivationTable?

    init(base: any BaseModel, config c: ModelConfig, table t: ParameterTable, siteBase: Int) {
        self.base = base
        D = c.dim
        k = c.window
        eps = c.normEps
        residual = c.residual
        blocks = pluginBlocks("tensorar.encoder", c, t, siteBase: siteBase, base: base, encoder: true)
        norm = PluginNorm(t, prefix: "tensorar.encoder", eps: c.normEps)
        oQuery = t.offset("tensorar.in_query")
        oPos = t.offset("tensorar.in_pos")
        oPad = t.offset("tensorar.in_pad")
        oProj = t.offset("tensorar.encoder.proj.weight")
        range = t.span("tensorar.in_query", "tensorar.encoder.proj.weight")
    }

    /// The activations for n tensors.
    static func addActivations(_ c: ModelConfig, n: Int, to a: inout ActivationLayout) {
        let D = c.dim
        let S = c.window + 1
        addPluginBlockActivations("encoder.blocks", c, sequences: n, seqLen: S, to: &a)
        a.add("encoder.seqs", [n, S, D])  // [in_query, e_0..e_{k-1}]
        a.add("encoder.slot0", [n, D])
        a.add("encoder.rstd", PluginNorm.statsRows(c) == 1 ? [n] : [2, n])  // the norm's statistics
        a.add("encoder.normed", [n, D])
        a.add("encoder.u", [n, D])  // proj(norm(slot 0))
        a.add("encoder.du", [n, D], .backward)
        a.add("encoder.dNormed", [n, D], .backward)
        a.add("encoder.dSlot0", [n, D], .backward)
        a.add("encoder.dSeqs", [n, S, D], .backward)
    }

    func bind(_ t: ActivationTable, n count: Int) {
        blocks.bindSequences(t, prefix: "encoder.blocks", sequences: count, seqLen: k + 1)
        table = t
        n = count
        seqs = t["encoder.seqs"]
        slot0 = t["encoder.slot0"]
        rstd = t["encoder.rstd"]
        normed = t["encoder.normed"]
        u = t["encoder.u"]
    }

    /// Writes tensor s's base input to `output(s)`. `noise` (n, k, D): "continuous" noise on the
    /// token entries (SPEC section 4).
    func forward(
        _ t: [Int32], n count: Int, noise: [Float]?, dropout: DropoutPlan?, params p: FloatPtr,
        output: (Int) -> FloatPtr
    ) {
        precondition(count == n, "encoder bound for \(n) tensors, run on \(count)")
        tensors = t
        let S = k + 1
        let ex = seqs!.base
        t.withUnsafeBufferPointer { tp in
            for s in 0..<n {
                let seq = ex + s * S * D
                seq.update(from: p + oQuery, count: D)
                for j in 0..<k {
                    let e = seq + (j + 1) * D
                    let pos = p + oPos + j * D
                    if tp[s * k + j] < 0 {
                        e.update(from: p + oPad, count: D)
                    } else {
                        base.embedTokens(e, tp.baseAddress! + s * k + j, n: 1, params: p)
                    }
                    for i in 0..<D { e[i] += pos[i] }
                    if tp[s * k + j] >= 0, let noise {
                        noise.withUnsafeBufferPointer { nb in
                            let nz = nb.baseAddress! + (s * k + j) * D
                            for i in 0..<D { e[i] += nz[i] }
                        }
                    }
                }
            }
            blocks.forwardSequences(seqs!, params: p, sequences: n, seqLen: S, dropout: dropout)
            for s in 0..<n { (slot0!.base + s * D).update(from: ex + s * S * D, count: D) }
            norm.forward(normed!.base, rstd!.base, slot0!.base, n: n, d: D, params: p)
            matmulForward(u!.base, normed!.base, p + oProj, n: n, ic: D, oc: D)
            for s in 0..<n {
                let dst = output(s)
                let us = u!.base + s * D
                if residual {
                    base.embedTokens(dst, tp.baseAddress! + s * k, n: 1, params: p)
                    for i in 0..<D { dst[i] += us[i] }
                } else {
                    dst.update(from: us, count: D)
                }
            }
        }
    }

    /// `doutput(s)`: the gradient w.r.t. tensor s's base input. Adds every encoder gradient and
    /// the token embeddings' (the residual's first, then the entries', as before the refactor).
    func backward(_ doutput: (Int) -> ConstFloatPtr, params p: FloatPtr, grads gp: FloatPtr) {
        let S = k + 1
        let a = table!
        a.allocate(.backward)
        let du = a.zeroed("encoder.du")
        tensors.withUnsafeBufferPointer { tp in
            for s in 0..<n {
                let src = doutput(s)
                (du.base + s * D).update(from: src, count: D)
                if residual { base.embedTokensBackward(src, tp.baseAddress! + s * k, n: 1, grads: gp) }
            }
            let dNormed = a.zeroed("encoder.dNormed")
            matmulBackward(dNormed.base, gp + oProj, du.base, normed!.base, p + oProj, n: n, ic: D, oc: D)
            let dSlot0 = a.zeroed("encoder.dSlot0")
            norm.backward(dSlot0.base, dNormed.base, slot0!.base, rstd!.base, n: n, d: D, params: p, grads: gp)
            let dSeqs = a.zeroed("encoder.dSeqs")
            for s in 0..<n { (dSeqs.base + s * S * D).update(from: dSlot0.base + s * D, count: D) }
            blocks.backwardSequences(dSeqs, params: p, grads: gp)
            for s in 0..<n {
                let seq = dSeqs.base + s * S * D
                let q = gp + oQuery
                for i in 0..<D { q[i] += seq[i] }
                for j in 0..<k {
                    let e = seq + (j + 1) * D
                    let pos = gp + oPos + j * D
                    if tp[s * k + j] < 0 {
                        let pad = gp + oPad
                        for i in 0..<D { pad[i] += e[i] }
                    } else {
                        base.embedTokensBackward(e, tp.baseAddress! + s * k + j, n: 1, grads: gp)
                    }
                    for i in 0..<D { pos[i] += e[i] }
                }
            }
        }
    }
}

/// The output decoder (SPEC section 3), for n hidden states h (n, D): per state the sequence
/// [h, out_pos_0..out_pos_{k-1}], z_j = proj(norm(slot j+1)), g_j = h + z_j (residual) or z_j.
final class DecoderStage {
    let D, k: Int
    let eps: Float
    let residual: Bool
    let blocks: any PluginBlocks
    let norm: PluginNorm
    let oPos, oProj: Int
    /// Flat range of the decoder's parameters, final after `backward`.
    let range: Range<Int>
    private var n = 0
    private var seqs, slots, rstd, normed, g: FlatBuffer?
    private var table: ActivationTable?

    init(base: any BaseModel, config c: ModelConfig, table t: ParameterTable, siteBase: Int) {
        D = c.dim
        k = c.window
        eps = c.normEps
        residual = c.residual
        blocks = pluginBlocks("tensorar.decoder", c, t, siteBase: siteBase, base: base, encoder: false)
        norm = PluginNorm(t, prefix: "tensorar.decoder", eps: c.normEps)
        oPos = t.offset("tensorar.out_pos")
        oProj = t.offset("tensorar.decoder.proj.weight")
        range = t.span("tensorar.out_pos", "tensorar.decoder.proj.weight")
    }

    /// The activations for n hidden states.
    static func addActivations(_ c: ModelConfig, n: Int, to a: inout ActivationLayout) {
        let D = c.dim
        let k = c.window
        let S = k + 1
        addPluginBlockActivations("decoder.blocks", c, sequences: n, seqLen: S, to: &a)
        a.add("decoder.seqs", [n, S, D])  // [h, out_pos_0..out_pos_{k-1}]
        a.add("decoder.slots", [n, k, D])
        a.add("decoder.rstd", PluginNorm.statsRows(c) == 1 ? [n, k] : [2, n, k])  // the norm's statistics
        a.add("decoder.normed", [n, k, D])
        a.add("decoder.g", [n, k, D])  // the output g_j
        a.add("decoder.dNormed", [n, k, D], .backward)
        a.add("decoder.dSlots", [n, k, D], .backward)
        a.add("decoder.dSeqs", [n, S, D], .backward)
    }

    func bind(_ t: ActivationTable, n count: Int) {
        blocks.bindSequences(t, prefix: "decoder.blocks", sequences: count, seqLen: k + 1)
        table = t
        n = count
        seqs = t["decoder.seqs"]
        slots = t["decoder.slots"]
        rstd = t["decoder.rstd"]
        normed = t["decoder.normed"]
        g = t["decoder.g"]
    }

    @discardableResult
    func forward(_ h: ConstFloatPtr, n count: Int, dropout: DropoutPlan?, params p: FloatPtr) -> FlatBuffer {
        precondition(count == n, "decoder bound for \(n) states, run on \(count)")
        let S = k + 1
        let dx = seqs!.base
        for r in 0..<n {
            let seq = dx + r * S * D
            seq.update(from: h + r * D, count: D)
            (seq + D).update(from: p + oPos, count: k * D)
        }
        blocks.forwardSequences(seqs!, params: p, sequences: n, seqLen: S, dropout: dropout)
        for r in 0..<n { (slots!.base + r * k * D).update(from: dx + (r * S + 1) * D, count: k * D) }
        norm.forward(normed!.base, rstd!.base, slots!.base, n: n * k, d: D, params: p)
        let gp = g!.base
        matmulForward(gp, normed!.base, p + oProj, n: n * k, ic: D, oc: D)
        if residual {
            for r in 0..<n {
                let hr = h + r * D
                for j in 0..<k {
                    let gr = gp + (r * k + j) * D
                    for i in 0..<D { gr[i] += hr[i] }
                }
            }
        }
        return g!
    }

    /// dg (n, k, D) in; adds the gradient w.r.t. h into dh (n, D) and every decoder gradient.
    func backward(_ dg: FlatBuffer, dh: FlatBuffer, params p: FloatPtr, grads gp: FloatPtr) {
        let S = k + 1
        if residual {
            for r in 0..<n {
                let d = dh.base + r * D
                for j in 0..<k {
                    let s = dg.base + (r * k + j) * D
                    for i in 0..<D { d[i] += s[i] }
                }
            }
        }
        let a = table!
        a.allocate(.backward)
        let dNormed = a.zeroed("decoder.dNormed")
        matmulBackward(dNormed.base, gp + oProj, dg.base, normed!.base, p + oProj, n: n * k, ic: D, oc: D)
        let dSlots = a.zeroed("decoder.dSlots")
        norm.backward(dSlots.base, dNormed.base, slots!.base, rstd!.base, n: n * k, d: D, params: p, grads: gp)
        let dSeqs = a.zeroed("decoder.dSeqs")
        for r in 0..<n { (dSeqs.base + (r * S + 1) * D).update(from: dSlots.base + r * k * D, count: k * D) }
        blocks.backwardSequences(dSeqs, params: p, grads: gp)
        for r in 0..<n {
            let s = dSeqs.base + r * S * D
            let d = dh.base + r * D
            for i in 0..<D { d[i] += s[i] }
            let dpos = gp + oPos
            for i in 0..<(k * D) { dpos[i] += s[D + i] }
        }
    }
}
