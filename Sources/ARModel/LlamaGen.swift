import Kernels
import Platform

/// The LlamaGen class-to-image GPT (SPEC section 2) as a TensorAR base: class and token
/// embeddings, the causal trunk of `n_layer` blocks with the 2D rotary table, and the head
/// `output(norm(h))` with cross entropy.
final class LlamaGen: RotaryTrunkBase {
    static let name = "llamagen"

    /// SPEC section 2's table, in LlamaGen's order (the "base" group).
    static func addParameters(_ c: ModelConfig, to t: inout ParameterTable) {
        let D = c.dim, V = c.vocabSize
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
        config = c; D = c.dim; V = c.vocabSize
        oCls = table.offset("cls_embedding.embedding_table.weight"); oTok = table.offset("tok_embeddings.weight")
        oNorm = table.offset("norm.weight"); oOut = table.offset("output.weight")
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
    /// The rows the last forward ran through the output matmul, in order.
    private var selected: [Int] = []
    private var targets: [Int32] = []
    private var input: FlatBuffer?  // h of the last forward

    static func addActivations(_ c: ModelConfig, sequences B: Int, headRows n: Int, to a: inout ActivationLayout) {
        BlockStack.addActivations("trunk", layers: c.nLayer, sequences: B, seqLen: c.seqLen, c, to: &a)
        let D = c.dim
        a.add("head.fn", [n, D]); a.add("head.rstd", [n])                  // norm(h) of every row
        let m = chunkRows
        a.add("head.chunkIn", [m, D]); a.add("head.chunkLoss", [m])           // one chunk's rows
        a.add("head.chunkLogits", [m, c.vocabSize])                            // and its logits
        a.add("head.dfn", [n, D], .backward); a.add("head.dChunkIn", [m, D], .backward)
    }

    func bind(_ t: ActivationTable, sequences B: Int, headRows n: Int) {
        trunk.bind(t, prefix: "trunk", sequences: B, seqLen: config.seqLen)
        table = t; rows = n
        fn = t["head.fn"]; frstd = t["head.rstd"]
        chunkIn = t["head.chunkIn"]; chunkLogits = t["head.chunkLogits"]; chunkLoss = t["head.chunkLoss"]
    }

    /// Gathers chunk rows selected[start..<start+n] of fn into chunkIn and runs the output matmul.
    private func chunkForward(start: Int, n: Int, params p: FloatPtr) {
        let inp = chunkIn!.base
        for i in 0..<n { (inp + i * D).update(from: fn!.base + selected[start + i] * D, count: D) }
        matmulForward(chunkLogits!.base, inp, p + oOut, n: n, ic: D, oc: V)
    }

    func headForward(_ h: FlatBuffer, rows n: Int, targets: [Int32], losses: inout [Float],
                     logits: UnsafeMutablePointer<Float>?, dropout: DropoutPlan?, params p: FloatPtr) {
        precondition(n == rows, "head bound for \(rows) rows, run on \(n)")
        self.targets = targets; input = h
        rmsnormForward(fn!.base, frstd!.base, h.base, p + oNorm, n: n, d: D, eps: config.normEps)
        selected = logits != nil ? Array(0..<n) : (0..<n).filter { targets[$0] >= 0 }
        let lg = chunkLogits!.base, loss = chunkLoss!.base
        var tg = [Int32](repeating: 0, count: chunk), one = [Float](repeating: 1, count: chunk)
        var start = 0
        while start < selected.count {
            let m = min(chunk, selected.count - start)
            chunkForward(start: start, n: m, params: p)
            for i in 0..<m { tg[i] = targets[selected[start + i]] }
            if let logits { for i in 0..<m { (logits + selected[start + i] * V).update(from: lg + i * V, count: V) } }
            tg.withUnsafeBufferPointer { tp in
                one.withUnsafeBufferPointer {
                    crossEntropyForwardBackward(loss, nil, lg, tp.baseAddress!, $0.baseAddress!, scale: 0, n: m, v: V)
                }
            }
            for i in 0..<m { losses[selected[start + i]] = loss[i] }
            start += m
        }
    }

    /// Recomputes each chunk's logits (one output matmul more per step) rather than keeping
    /// (rows, V) of them: for preset B with k = 4 that would be 0.5 GB (README, Memory).
    func headBackward(_ dh: FlatBuffer, dloss: [Float], params p: FloatPtr, grads gp: FloatPtr) {
        table!.allocate(.backward)
        let dfn = table!.zeroed("head.dfn")
        let lg = chunkLogits!.base, loss = chunkLoss!.base, d = table!["head.dChunkIn"].base
        var tg = [Int32](repeating: 0, count: chunk), wt = [Float](repeating: 0, count: chunk)
        var start = 0
        while start < selected.count {
            let m = min(chunk, selected.count - start)
            chunkForward(start: start, n: m, params: p)
            for i in 0..<m { tg[i] = targets[selected[start + i]]; wt[i] = dloss[selected[start + i]] }
            tg.withUnsafeBufferPointer { tp in
                wt.withUnsafeBufferPointer {
                    crossEntropyForwardBackward(loss, lg, lg, tp.baseAddress!, $0.baseAddress!, scale: 1, n: m, v: V)
                }
            }
            d.update(repeating: 0, count: m * D)
            matmulBackward(d, gp + oOut, lg, chunkIn!.base, p + oOut, n: m, ic: D, oc: V)
            for i in 0..<m { (dfn.base + selected[start + i] * D).update(from: d + i * D, count: D) }
            start += m
        }
        rmsnormBackward(dh.base, gp + oNorm, dfn.base, input!.base, p + oNorm, frstd!.base, n: rows, d: D)
    }

    func headLogits(_ out: FloatPtr, _ h: ConstFloatPtr, rows n: Int, part: Int, chosen: [[Int32]],
                    params p: FloatPtr) {
        if sampleNorm?.count != n * D { sampleNorm = FlatBuffer(count: n * D); sampleRstd = FlatBuffer(count: n) }
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
    static let recomputesHeadInBackward = true
    static func samplingHeadFLOPs(_ c: ModelConfig, rows: Int) -> Double {
        2 * Double(rows) * Double(c.dim) * Double(c.vocabSize)
    }
}
