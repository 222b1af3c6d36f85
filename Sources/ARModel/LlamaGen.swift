import Kernels
import Platform

/// The LlamaGen class-to-image GPT (SPEC section 2) as a TensorAR base: class and token
/// embeddings, the causal trunk of `n_layer` blocks with the 2D rotary table, and the head
/// `output(norm(h))` with cross entropy.
final class LlamaGen: RotaryTrunkBase {
    static let name = "llamagen"

    /// SPEC section 2's table, in LlamaGen's order (the "base" group).
    static func addParameters(_ c: ModelConfig, to t: inout ParameterTable) {
        let D = c.dim
        let V = c.vocabSize
        t.add("cls_embedding.embedding_table.weight", [c.numClasses + 1, D], .base, .normal(0.02))
        t.add("tok_embeddings.weight", [V, D], .base, .normal(0.02))
        for l in 0..<c.nLayer { t.addBlock("layers.\(l)", c, .base) }
        t.add("norm.weight", [D], .base, .ones)
        t.add("output.weight", [V, D], .base, .zeros)
    }

    let config: ModelConfig
    let D, V: Int
    let oCls, oTok, oNorm, oOut: Int
    let trunk: BlockStack
    /// Flat range of each layer's weights (one gradient bucket hand-over per layer).
    let layerRanges: [Range<Int>]
    let embeddingRange: Range<Int>
    let headRange: Range<Int>
    var headParts: [Int] { [V] }

    init(config c: ModelConfig, table: ParameterTable) {
        config = c
        D = c.dim
        V = c.vocabSize
        oCls = table.offset("cls_embedding.embedding_table.weight")
        oTok = table.offset("tok_embeddings.weight")
        oNorm = table.offset("norm.weight")
        oOut = table.offset("output.weight")
        (trunk, layerRanges) = LlamaGen.rotaryTrunk(c, table, prefix: "layers")
        embeddingRange = table.span("cls_embedding.embedding_table.weight", "tok_embeddings.weight")
        headRange = table.span("norm.weight", "output.weight")
    }

    // MARK: inputs (SPEC section 2: position 0 the class (`RotaryTrunkBase`), p >= 1 tok_embeddings[x_{p-1}])

    func embedTokens(_ out: FloatPtr, _ ids: UnsafePointer<Int32>, n: Int, params p: FloatPtr) {
        embeddingForward(out, ids, p + oTok, n: n, d: D)
    }
    func embedTokensBackward(_ dout: ConstFloatPtr, _ ids: UnsafePointer<Int32>, n: Int, grads gp: FloatPtr) {
        embeddingBackward(gp + oTok, dout, ids, n: n, d: D)
    }

    // the trunk: `RotaryTrunkBase`

    // MARK: head: logits = output(norm(h)), cross entropy per row

    /// Rows go through the output matmul in chunks of this many (bounded scratch for large V).
    private static let chunkRows = 256
    private var chunk: Int { LlamaGen.chunkRows }
    private var rows = 0
    private var fn, frstd, chunkIn, chunkLogits, chunkLoss: FlatBuffer?
    private var table: ActivationTable?
    private var input: FlatBuffer?  // h of the last forward
    /// Whether the last forward formed the gradient that `headBackward` finishes.
    private var hasGradient = false

    static func addActivations(_ c: ModelConfig, sequences B: Int, headRows n: Int, to a: inout ActivationLayout) {
        BlockStack.addActivations("trunk", layers: c.nLayer, sequences: B, seqLen: c.seqLen, c, to: &a)
        let D = c.dim
        a.add("head.fn", [n, D])
        a.add("head.rstd", [n])  // norm(h) of every row
        let m = chunkRows
        a.add("head.chunkIn", [m, D])
        a.add("head.chunkLoss", [m])  // one chunk's rows
        a.add("head.chunkLogits", [m, c.vocabSize])  // and its logits
        a.add("head.dfn", [n, D], .backward)
        a.add("head.dChunkIn", [m, D], .backward)
    }

    func bind(_ t: ActivationTable, sequences B: Int, headRows n: Int) {
        trunk.bind(t, prefix: "trunk", sequences: B, seqLen: config.seqLen)
        table = t
        rows = n
        fn = t["head.fn"]
        frstd = t["head.rstd"]
        chunkIn = t["head.chunkIn"]
        chunkLogits = t["head.chunkLogits"]
        chunkLoss = t["head.chunkLoss"]
    }

    /// Gathers the rows `rowsOfChunk` of fn into chunkIn and runs the output matmul into chunkLogits.
    private func chunkForward(_ rowsOfChunk: ArraySlice<Int>, params p: FloatPtr) {
        let inp = chunkIn!.base
        for (i, r) in rowsOfChunk.enumerated() { (inp + i * D).update(from: fn!.base + r * D, count: D) }
        matmulForward(chunkLogits!.base, inp, p + oOut, n: rowsOfChunk.count, ic: D, oc: V)
    }

    /// Cross entropy of every selected row, chunk by chunk. With `gradient`, this is also the
    /// head's backward up to norm(h): the head is the last stage, so the weight of each row's loss
    /// (`dloss`) is known before it runs, and forming each chunk's logit gradient while its logits
    /// are in hand costs no second output matmul (5.9% of a preset-B k4 d2 step) and keeps no
    /// (rows, V) logits (0.5 GB there). It fills head.dfn and adds output.weight's gradient;
    /// `headBackward` finishes with the norm.
    func headForward(
        _ h: FlatBuffer, rows n: Int, targets: [Int32], losses: inout [Float],
        logits: UnsafeMutablePointer<Float>?, dropout: DropoutPlan?, gradient: HeadGradient?,
        params p: FloatPtr
    ) {
        precondition(n == rows, "head bound for \(rows) rows, run on \(n)")
        input = h
        rmsnormForward(fn!.base, frstd!.base, h.base, p + oNorm, n: n, d: D, eps: config.normEps)
        let selected = logits != nil ? Array(0..<n) : (0..<n).filter { targets[$0] >= 0 }
        var dfn: FlatBuffer?
        if gradient != nil {
            table!.allocate(.backward)
            dfn = table!.zeroed("head.dfn")
        }
        let lg = chunkLogits!.base
        let loss = chunkLoss!.base
        var tg = [Int32](repeating: 0, count: chunk)
        var wt = [Float](repeating: 0, count: chunk)
        var start = 0
        while start < selected.count {
            let m = min(chunk, selected.count - start)
            let rowsOfChunk = selected[start..<(start + m)]
            chunkForward(rowsOfChunk, params: p)
            for (i, r) in rowsOfChunk.enumerated() {
                tg[i] = targets[r]
                wt[i] = gradient?.dloss[r] ?? 1
            }
            if let logits {
                for (i, r) in rowsOfChunk.enumerated() { (logits + r * V).update(from: lg + i * V, count: V) }
            }
            let dlogits = gradient == nil ? nil : lg  // the gradient overwrites the logits in place
            tg.withUnsafeBufferPointer { tp in
                wt.withUnsafeBufferPointer {
                    crossEntropyForwardBackward(
                        loss, dlogits, lg, tp.baseAddress!, $0.baseAddress!,
                        scale: gradient == nil ? 0 : 1, n: m, v: V)
                }
            }
            for (i, r) in rowsOfChunk.enumerated() { losses[r] = loss[i] }
            if let gradient, let dfn { chunkBackward(rowsOfChunk, into: dfn, params: p, grads: gradient.grads) }
            start += m
        }
        hasGradient = gradient != nil
    }

    /// The output matmul's backward for one chunk: dlogits (in chunkLogits) to output.weight's
    /// gradient and to the chunk's rows of dfn.
    private func chunkBackward(
        _ rowsOfChunk: ArraySlice<Int>, into dfn: FlatBuffer, params p: FloatPtr,
        grads gp: FloatPtr
    ) {
        let m = rowsOfChunk.count
        let d = table!["head.dChunkIn"].base
        matmulBackward(d, gp + oOut, chunkLogits!.base, chunkIn!.base, p + oOut, n: m, ic: D, oc: V, addToInput: false)
        for (i, r) in rowsOfChunk.enumerated() { (dfn.base + r * D).update(from: d + i * D, count: D) }
    }

    /// The norm's backward: dfn (formed by the forward) to dh, and norm.weight's gradient.
    func headBackward(_ dh: FlatBuffer, params p: FloatPtr, grads gp: FloatPtr) {
        precondition(hasGradient, "LlamaGen.headBackward needs a headForward given a gradient")
        let dfn = table!["head.dfn"]
        rmsnormBackward(dh.base, gp + oNorm, dfn.base, input!.base, p + oNorm, frstd!.base, n: rows, d: D)
        hasGradient = false
    }

    func headLogits(
        _ out: FloatPtr, _ h: ConstFloatPtr, rows n: Int, part: Int, chosen: [[Int32]],
        params p: FloatPtr
    ) {
        if sampleNorm?.count != n * D {
            sampleNorm = FlatBuffer(count: n * D)
            sampleRstd = FlatBuffer(count: n)
        }
        rmsnormForward(sampleNorm!.base, sampleRstd!.base, h, p + oNorm, n: n, d: D, eps: config.normEps)
        matmulForward(out, sampleNorm!.base, p + oOut, n: n, ic: D, oc: V)
    }
    private var sampleNorm, sampleRstd: FlatBuffer?

    func token(parts: [Int32]) -> Int32 { parts[0] }

    // MARK: discrete noise tables and FLOPs

    static func tokenFactors(_ c: ModelConfig) -> [TokenFactor] {
        [TokenFactor(name: "tok_embeddings.weight", rows: c.vocabSize, stride: 1)]
    }
    /// The output matmul on the rows with a target only (`headForward` skips the others).
    static func headFLOPs(_ c: ModelConfig, rows: Int, validRows: Int) -> Double {
        2 * Double(validRows) * Double(c.dim) * Double(c.vocabSize)
    }
    static func samplingHeadFLOPs(_ c: ModelConfig, rows: Int) -> Double {
        2 * Double(rows) * Double(c.dim) * Double(c.vocabSize)
    }
}
