import Foundation
import Kernels
import Platform

/// One micro-batch as the model sees it. Noise and label drop happen before (Noise.swift).
public struct ModelBatch {
    public var batch: Int
    /// (B, T) the clean image tokens: the targets.
    public var tokens: [Int32]
    /// (B) class in [0, C]; C is the null class.
    public var labels: [Int32]
    /// (B, T-1, k) input tensor t_{p-1} of position p = 1..T-1 (SPEC section 3); -1 is pad.
    public var tensors: [Int32]
    /// (B, T-1, k, D) optional additive noise on the encoder's token embeddings ("continuous").
    public var embeddingNoise: [Float]?
    public init(batch: Int, tokens: [Int32], labels: [Int32], tensors: [Int32], embeddingNoise: [Float]? = nil) {
        self.batch = batch; self.tokens = tokens; self.labels = labels; self.tensors = tensors; self.embeddingNoise = embeddingNoise
    }
}

/// Loss sums, poolable over micro-batches and ranks (SPEC section 3: sum w_j CE / sum w_j).
public struct LossReport: Equatable {
    public var weightedSum: Double = 0
    public var weightSum: Double = 0
    public var slotSums: [Double]
    public var slotCounts: [Double]
    public init(slots: Int) { slotSums = Array(repeating: 0, count: slots); slotCounts = slotSums }
    public var loss: Double { weightedSum / max(weightSum, 1e-30) }
    public var slotLosses: [Double] { zip(slotSums, slotCounts).map { $0 / max($1, 1e-30) } }
    public var tokens: Int { Int(slotCounts.reduce(0, +)) }
    public mutating func add(_ o: LossReport) {
        weightedSum += o.weightedSum; weightSum += o.weightSum
        for j in slotSums.indices { slotSums[j] += o.slotSums[j]; slotCounts[j] += o.slotCounts[j] }
    }
    /// Flat form for one allreduce: [weightedSum, weightSum, slotSums..., slotCounts...].
    public var packed: [Double] { [weightedSum, weightSum] + slotSums + slotCounts }
    public init(packed p: [Double]) {
        let k = (p.count - 2) / 2
        weightedSum = p[0]; weightSum = p[1]
        slotSums = Array(p[2..<(2 + k)]); slotCounts = Array(p[(2 + k)...])
    }
}

/// Training-mode regularisation for one forward pass (SPEC section 2). Masks are keyed by
/// (seed, step, global sample position, site): the same on any rank count.
public struct DropoutSettings {
    public var p: Float
    public var seed: UInt64
    public var step: Int
    public var samplePositions: [Int]
    public init(p: Float, seed: UInt64, step: Int, samplePositions: [Int]) {
        self.p = p; self.seed = seed; self.step = step; self.samplePositions = samplePositions
    }
}

/// The LlamaGen GPT (SPEC section 2) with the optional TensorAR plug-in (SPEC section 3).
/// Parameters and gradients are flat buffers laid out by `ParameterTable`.
public final class Transformer {
    public let config: ModelConfig
    public let table: ParameterTable
    public let params: FlatBuffer
    public private(set) lazy var grads = FlatBuffer(count: table.total)
    /// w_j, the per-slot loss weights (SPEC section 3; default all ones).
    public var slotWeights: [Float]

    let T, D, V, k: Int
    let base: BlockStack
    let encoder: BlockStack?
    let decoder: BlockStack?
    // offsets of the non-block parameters
    let oCls, oTok, oNorm, oOut: Int
    let oInQuery, oInPos, oInPad, oEncNorm, oEncProj, oOutPos, oDecNorm, oDecProj: Int
    /// Flat range of each base layer's weights (one gradient bucket hand-over per layer).
    let layerRanges: [Range<Int>]

    public init(config: ModelConfig, params: FlatBuffer? = nil) throws {
        try config.validate()
        self.config = config
        let table = ParameterTable(config)
        self.table = table
        if let params { precondition(params.count == table.total); self.params = params } else { self.params = FlatBuffer(count: table.total) }
        T = config.seqLen; D = config.dim; V = config.vocabSize; k = config.window
        slotWeights = Array(repeating: 1, count: k)
        let rot = RotaryTable(seqLen: T, gridW: config.gridSize, headDim: config.headDim, base: config.ropeBase)
        base = BlockStack(weights: (0..<config.nLayer).map { BlockWeights(table, prefix: "layers.\($0)") }, causal: true, rotary: rot,
                          dim: D, heads: config.nHead, ffn: config.ffnHidden, eps: config.normEps, siteBase: 0)
        layerRanges = (0..<config.nLayer).map { l in
            let last = table.entry("layers.\(l).feed_forward.w2.weight")!
            return table.offset("layers.\(l).attention_norm.weight")..<(last.offset + last.count)
        }
        oCls = table.offset("cls_embedding.embedding_table.weight"); oTok = table.offset("tok_embeddings.weight")
        oNorm = table.offset("norm.weight"); oOut = table.offset("output.weight")
        if config.hasPlugin {
            let d = config.pluginDepth
            encoder = BlockStack(weights: (0..<d).map { BlockWeights(table, prefix: "tensorar.encoder.layers.\($0)") }, causal: false, rotary: nil,
                                 dim: D, heads: config.nHead, ffn: config.ffnHidden, eps: config.normEps, siteBase: 10_000)
            decoder = BlockStack(weights: (0..<d).map { BlockWeights(table, prefix: "tensorar.decoder.layers.\($0)") }, causal: false, rotary: nil,
                                 dim: D, heads: config.nHead, ffn: config.ffnHidden, eps: config.normEps, siteBase: 20_000)
            oInQuery = table.offset("tensorar.in_query"); oInPos = table.offset("tensorar.in_pos"); oInPad = table.offset("tensorar.in_pad")
            oEncNorm = table.offset("tensorar.encoder.norm.weight"); oEncProj = table.offset("tensorar.encoder.proj.weight")
            oOutPos = table.offset("tensorar.out_pos"); oDecNorm = table.offset("tensorar.decoder.norm.weight"); oDecProj = table.offset("tensorar.decoder.proj.weight")
        } else {
            encoder = nil; decoder = nil
            oInQuery = -1; oInPos = -1; oInPad = -1; oEncNorm = -1; oEncProj = -1; oOutPos = -1; oDecNorm = -1; oDecProj = -1
        }
    }

    /// SPEC "init" column, drawn from a counter-based stream per parameter: the same on every rank.
    public func initialise(seed: UInt64) {
        for (i, e) in table.entries.enumerated() {
            let p = params.base + e.offset
            switch table.inits[i] {
            case .ones: p.update(repeating: 1, count: e.count)
            case .zeros: p.update(repeating: 0, count: e.count)
            case .normal(let std):
                var rng = CounterRNG(seed: seed, RandomPurpose.initialise.rawValue, UInt64(i))
                for j in 0..<e.count { p[j] = std * rng.normal() }
            }
        }
    }

    public func view(_ name: String) -> UnsafeMutableBufferPointer<Float> {
        let e = table.entry(name)!
        return UnsafeMutableBufferPointer(start: params.base + e.offset, count: e.count)
    }

    // MARK: activations, sized for a batch of B

    private var B = 0
    private var encX, encSlot0, encRstd, encN, u: FlatBuffer?
    private var x, tokMask, hidden, decX, decSlots, decRstd, decN, g, fn, frstd, dfn: FlatBuffer?
    private var headIn, headLogits, headLoss, dHeadIn: FlatBuffer?
    private var rowTargets: [Int32] = [], rowWeights: [Float] = []
    private var batchCopy: ModelBatch?
    private var dropoutUsed: DropoutSettings?
    private var gradientScale: Float?
    private let headChunk = 256
    private var temps: [String: FlatBuffer] = [:]

    /// A zeroed scratch buffer for backward, kept between steps (no allocation in the hot loop).
    private func temp(_ key: String, _ count: Int) -> FlatBuffer {
        if let t = temps[key], t.count == count { t.zero(); return t }
        let t = FlatBuffer(count: count)
        temps[key] = t
        return t
    }

    /// Rows entering the output head: B*T*k with the plug-in, B*T without.
    private var headRows: Int { B * T * (config.hasPlugin ? k : 1) }

    private func prepare(_ b: Int) {
        if b == B { return }
        B = b
        let R = B * T
        x = FlatBuffer(count: R * D); hidden = FlatBuffer(count: R * D)
        fn = FlatBuffer(count: headRows * D); frstd = FlatBuffer(count: headRows); dfn = FlatBuffer(count: headRows * D)
        headIn = FlatBuffer(count: headChunk * D); dHeadIn = FlatBuffer(count: headChunk * D)
        headLogits = FlatBuffer(count: headChunk * V); headLoss = FlatBuffer(count: headChunk)
        if config.hasPlugin {
            let ne = B * (T - 1)
            encX = FlatBuffer(count: ne * (k + 1) * D); encSlot0 = FlatBuffer(count: ne * D); encRstd = FlatBuffer(count: ne)
            encN = FlatBuffer(count: ne * D); u = FlatBuffer(count: ne * D)
            decX = FlatBuffer(count: R * (k + 1) * D); decSlots = FlatBuffer(count: R * k * D)
            decRstd = FlatBuffer(count: R * k); decN = FlatBuffer(count: R * k * D); g = FlatBuffer(count: R * k * D)
        } else {
            g = hidden
        }
    }

    // MARK: forward

    /// Runs the model; returns the loss sums. With `gradientScale` the output head's backward is
    /// fused in (llm.c style) and `backward()` must follow; gradients are then d(sum w CE)/dθ
    /// times gradientScale (1 / the global batch's total weight gives the mean loss's gradient).
    /// `logits` (B, T, k, V), when given, receives every position's logits (invalid pairs too).
    @discardableResult
    public func forward(_ batch: ModelBatch, dropout: DropoutSettings? = nil, gradientScale: Float? = nil, logits: UnsafeMutablePointer<Float>? = nil) -> LossReport {
        precondition(batch.tokens.count == batch.batch * T && batch.labels.count == batch.batch && batch.tensors.count == batch.batch * (T - 1) * k,
                     "batch arrays do not match B=\(batch.batch), T=\(T), k=\(k)")
        prepare(batch.batch)
        batchCopy = batch
        let drop = (dropout?.p ?? 0) > 0 ? dropout : nil
        dropoutUsed = drop
        self.gradientScale = gradientScale
        let p = params.base
        let plan = drop.map { DropoutPlan(p: $0.p, seed: $0.seed, step: $0.step, samplePositions: $0.samplePositions) }
        let x = self.x!.base

        // 1. inputs of the base transformer, (B, T, D)
        batch.labels.withUnsafeBufferPointer { lb in
            for b in 0..<B { (x + b * T * D).update(from: p + oCls + Int(lb[b]) * D, count: D) }
        }
        if let encoder {
            encodeInputs(batch, encoder: encoder, dropout: plan)
        } else {
            batch.tensors.withUnsafeBufferPointer { tp in
                for b in 0..<B { embeddingForward(x + (b * T + 1) * D, tp.baseAddress! + b * (T - 1), p + oTok, n: T - 1, d: D) }
            }
        }
        // token dropout on the whole input sequence, class slot included (SPEC section 2)
        if let plan {
            if tokMask?.count != B * T * D { tokMask = FlatBuffer(count: B * T * D) }
            dropoutMask(tokMask!.base, p: plan.p, rows: B * T, d: D, rowsPerSample: T, samplePositions: plan.samplePositions, seed: plan.seed, step: plan.step, site: 30_000)
            dropoutApply(x, tokMask!.base, count: B * T * D)
        }

        // 2. the base transformer
        base.forward(self.x!, params: p, sequences: B, seqLen: T, dropout: plan)
        hidden!.base.update(from: x, count: B * T * D)

        // 3. the output decoder (plug-in) or nothing (base model): g (rows, D)
        if let decoder { decodeOutputs(decoder: decoder, dropout: plan) }

        // 4. final norm and the output head with the loss
        let rows = headRows
        rmsnormForward(fn!.base, frstd!.base, g!.base, p + oNorm, n: rows, d: D, eps: config.normEps)
        buildTargets(batch)
        return head(rows: rows, logits: logits)
    }

    /// Encoder (SPEC section 3): per position p >= 1 the sequence [in_query, e_0..e_{k-1}];
    /// u = proj(norm(slot 0)); base input = tok_emb[t_0] + u (residual) or u.
    private func encodeInputs(_ batch: ModelBatch, encoder: BlockStack, dropout: DropoutPlan?) {
        let p = params.base, S = k + 1, ne = B * (T - 1)
        let ex = encX!.base
        batch.tensors.withUnsafeBufferPointer { tp in
            for s in 0..<ne {
                let seq = ex + s * S * D
                seq.update(from: p + oInQuery, count: D)
                for j in 0..<k {
                    let t = Int(tp[s * k + j]), e = seq + (j + 1) * D
                    let src = t < 0 ? p + oInPad : p + oTok + t * D
                    let pos = p + oInPos + j * D
                    for i in 0..<D { e[i] = src[i] + pos[i] }
                    if t >= 0, let noise = batch.embeddingNoise {
                        noise.withUnsafeBufferPointer { nb in
                            let nz = nb.baseAddress! + (s * k + j) * D
                            for i in 0..<D { e[i] += nz[i] }
                        }
                    }
                }
            }
        }
        encoder.forward(encX!, params: p, sequences: ne, seqLen: S, dropout: dropout)
        for s in 0..<ne { (encSlot0!.base + s * D).update(from: ex + s * S * D, count: D) }
        rmsnormForward(encN!.base, encRstd!.base, encSlot0!.base, p + oEncNorm, n: ne, d: D, eps: config.normEps)
        matmulForward(u!.base, encN!.base, p + oEncProj, n: ne, ic: D, oc: D)
        let x = self.x!.base
        batch.tensors.withUnsafeBufferPointer { tp in
            for b in 0..<B {
                for q in 1..<T {
                    let s = b * (T - 1) + (q - 1)
                    let dst = x + (b * T + q) * D, us = u!.base + s * D
                    if config.residual {
                        let t0 = p + oTok + Int(tp[s * k]) * D
                        for i in 0..<D { dst[i] = t0[i] + us[i] }
                    } else {
                        dst.update(from: us, count: D)
                    }
                }
            }
        }
    }

    /// Decoder (SPEC section 3): per position the sequence [h_p, out_pos_0..out_pos_{k-1}];
    /// z_j = proj(norm(slot j+1)); g_j = h_p + z_j (residual) or z_j.
    private func decodeOutputs(decoder: BlockStack, dropout: DropoutPlan?) {
        let p = params.base, S = k + 1, R = B * T
        let dx = decX!.base, h = hidden!.base
        for r in 0..<R {
            let seq = dx + r * S * D
            seq.update(from: h + r * D, count: D)
            (seq + D).update(from: p + oOutPos, count: k * D)
        }
        decoder.forward(decX!, params: p, sequences: R, seqLen: S, dropout: dropout)
        for r in 0..<R { (decSlots!.base + r * k * D).update(from: dx + (r * S + 1) * D, count: k * D) }
        rmsnormForward(decN!.base, decRstd!.base, decSlots!.base, p + oDecNorm, n: R * k, d: D, eps: config.normEps)
        matmulForward(g!.base, decN!.base, p + oDecProj, n: R * k, ic: D, oc: D)
        if config.residual {
            let gp = g!.base
            for r in 0..<R {
                let hr = h + r * D
                for j in 0..<k { let gr = gp + (r * k + j) * D; for i in 0..<D { gr[i] += hr[i] } }
            }
        }
    }

    /// Row targets x_{p+j} (-1 past the image end) and weights w_j, rows ordered (b, p, j).
    private func buildTargets(_ batch: ModelBatch) {
        let kk = config.hasPlugin ? k : 1
        rowTargets = Array(repeating: -1, count: B * T * kk)
        rowWeights = Array(repeating: 0, count: B * T * kk)
        for b in 0..<B {
            for q in 0..<T {
                for j in 0..<kk where q + j < T {
                    let r = (b * T + q) * kk + j
                    rowTargets[r] = batch.tokens[b * T + q + j]
                    rowWeights[r] = slotWeights[j]
                }
            }
        }
    }

    /// The output head over the rows with a target, in chunks; loss sums per slot. With a
    /// gradient scale it also writes dfn and adds output.weight's gradient.
    private func head(rows: Int, logits: UnsafeMutablePointer<Float>?) -> LossReport {
        let kk = config.hasPlugin ? k : 1
        var report = LossReport(slots: kk)
        let training = gradientScale != nil
        let selected = logits != nil ? Array(0..<rows) : (0..<rows).filter { rowTargets[$0] >= 0 }
        if training { dfn!.zero() }
        let W = params.base + oOut
        let inp = headIn!.base, lg = headLogits!.base, loss = headLoss!.base
        var tg = [Int32](repeating: 0, count: headChunk), wt = [Float](repeating: 0, count: headChunk)
        var start = 0
        while start < selected.count {
            let n = min(headChunk, selected.count - start)
            for i in 0..<n {
                let r = selected[start + i]
                (inp + i * D).update(from: fn!.base + r * D, count: D)
                tg[i] = rowTargets[r]; wt[i] = rowWeights[r]
            }
            matmulForward(lg, inp, W, n: n, ic: D, oc: V)
            if let logits { for i in 0..<n { (logits + selected[start + i] * V).update(from: lg + i * V, count: V) } }
            tg.withUnsafeBufferPointer { tp in
                wt.withUnsafeBufferPointer { wp in
                    crossEntropyForwardBackward(loss, training ? lg : nil, lg, tp.baseAddress!, wp.baseAddress!, scale: gradientScale ?? 0, n: n, v: V)
                }
            }
            for i in 0..<n where tg[i] >= 0 {
                let j = selected[start + i] % kk
                report.weightedSum += Double(wt[i]) * Double(loss[i]); report.weightSum += Double(wt[i])
                report.slotSums[j] += Double(loss[i]); report.slotCounts[j] += 1
            }
            if training {
                let d = dHeadIn!.base
                d.update(repeating: 0, count: n * D)
                matmulBackward(d, grads.base + oOut, lg, inp, W, n: n, ic: D, oc: V)
                for i in 0..<n { (dfn!.base + selected[start + i] * D).update(from: d + i * D, count: D) }
            }
            start += n
        }
        return report
    }

    // MARK: backward

    /// Continues from a `forward` with a gradient scale: adds every parameter's gradient into
    /// `grads`. `onReady(range)` fires as soon as a contiguous range of the flat gradient buffer
    /// is final, in backward order, so an allreduce can start while backward goes on.
    public func backward(onReady: ((Range<Int>) -> Void)? = nil) {
        precondition(gradientScale != nil, "backward() needs a forward(gradientScale:) first")
        let p = params.base, gp = grads.base
        let batch = batchCopy!
        let R = B * T
        let rows = headRows
        let dOutRange = oNorm..<(oOut + V * D)
        // final norm
        let dg = temp("dg", rows * D)
        rmsnormBackward(dg.base, gp + oNorm, dfn!.base, g!.base, p + oNorm, frstd!.base, n: rows, d: D)
        onReady?(dOutRange)
        // decoder
        let dx = temp("dx", R * D)  // gradient w.r.t. the base transformer's output h
        if let decoder {
            let S = k + 1
            if config.residual {
                for r in 0..<R {
                    let d = dx.base + r * D
                    for j in 0..<k { let s = dg.base + (r * k + j) * D; for i in 0..<D { d[i] += s[i] } }
                }
            }
            let dDecN = temp("dDecN", R * k * D)
            matmulBackward(dDecN.base, gp + oDecProj, dg.base, decN!.base, p + oDecProj, n: R * k, ic: D, oc: D)
            let dSlots = temp("dSlots", R * k * D)
            rmsnormBackward(dSlots.base, gp + oDecNorm, dDecN.base, decSlots!.base, p + oDecNorm, decRstd!.base, n: R * k, d: D)
            let dDecX = temp("dDecX", R * S * D)
            for r in 0..<R { (dDecX.base + (r * S + 1) * D).update(from: dSlots.base + r * k * D, count: k * D) }
            decoder.backward(dDecX, params: p, grads: gp)
            for r in 0..<R {
                let s = dDecX.base + r * S * D, d = dx.base + r * D
                for i in 0..<D { d[i] += s[i] }
                let dpos = gp + oOutPos
                for i in 0..<(k * D) { dpos[i] += s[D + i] }
            }
            onReady?(oOutPos..<(oDecProj + D * D))
        } else {
            dx.base.update(from: dg.base, count: R * D)
        }
        // base transformer
        base.backward(dx, params: p, grads: gp) { [layerRanges] l in onReady?(layerRanges[l]) }
        if let m = tokMask, dropoutUsed != nil { dropoutApply(dx.base, m.base, count: R * D) }
        // inputs
        for b in 0..<B { let c = gp + oCls + Int(batch.labels[b]) * D, s = dx.base + b * T * D; for i in 0..<D { c[i] += s[i] } }
        batch.tensors.withUnsafeBufferPointer { tp in
            if let encoder {
                let ne = B * (T - 1), S = k + 1
                let du = temp("du", ne * D)
                for b in 0..<B {
                    for q in 1..<T {
                        let s = b * (T - 1) + (q - 1)
                        let src = dx.base + (b * T + q) * D
                        (du.base + s * D).update(from: src, count: D)
                        if config.residual { let t0 = gp + oTok + Int(tp[s * k]) * D; for i in 0..<D { t0[i] += src[i] } }
                    }
                }
                let dEncN = temp("dEncN", ne * D)
                matmulBackward(dEncN.base, gp + oEncProj, du.base, encN!.base, p + oEncProj, n: ne, ic: D, oc: D)
                let dSlot0 = temp("dSlot0", ne * D)
                rmsnormBackward(dSlot0.base, gp + oEncNorm, dEncN.base, encSlot0!.base, p + oEncNorm, encRstd!.base, n: ne, d: D)
                let dEncX = temp("dEncX", ne * S * D)
                for s in 0..<ne { (dEncX.base + s * S * D).update(from: dSlot0.base + s * D, count: D) }
                encoder.backward(dEncX, params: p, grads: gp)
                for s in 0..<ne {
                    let seq = dEncX.base + s * S * D
                    let q = gp + oInQuery
                    for i in 0..<D { q[i] += seq[i] }
                    for j in 0..<k {
                        let t = Int(tp[s * k + j]), e = seq + (j + 1) * D
                        let dst = t < 0 ? gp + oInPad : gp + oTok + t * D
                        let pos = gp + oInPos + j * D
                        for i in 0..<D { dst[i] += e[i]; pos[i] += e[i] }
                    }
                }
                onReady?(oInQuery..<(oEncProj + D * D))
            } else {
                for b in 0..<B { embeddingBackward(gp + oTok, dx.base + (b * T + 1) * D, tp.baseAddress! + b * (T - 1), n: T - 1, d: D) }
            }
        }
        onReady?(oCls..<(oTok + V * D))
        gradientScale = nil
    }
}
