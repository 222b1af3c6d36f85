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
    /// (B, T) each sample's token order pi (SPEC section 9 "Random order"): entry [b, i] is the
    /// grid index fed and predicted as sample b's i-th token; raster samples hold the identity.
    /// nil: raster order for every sample. Filled by the batch builder under `train.random_order`
    /// (the config refuses it for a base that reads raster order only; the model asserts it).
    /// `tokens` and `tensors` stay in raster order: the model reorders them (`reordered`).
    public var orders: [Int32]?
    public init(
        batch: Int, tokens: [Int32], labels: [Int32], tensors: [Int32], embeddingNoise: [Float]? = nil,
        orders: [Int32]? = nil
    ) {
        self.batch = batch
        self.tokens = tokens
        self.labels = labels
        self.tensors = tensors
        self.embeddingNoise = embeddingNoise
        self.orders = orders
    }

    /// The batch in its `orders` (k = 1): tokens[b, i] = x_{pi(i)}, the input of step i >= 1 the
    /// token of step i - 1 (for k = 1 the input tensor is the clean previous token, SPEC section 4).
    func reordered() -> ModelBatch {
        guard let orders else { return self }
        let T = tokens.count / max(batch, 1)
        var out = self
        for b in 0..<batch {
            for i in 0..<T { out.tokens[b * T + i] = tokens[b * T + Int(orders[b * T + i])] }
            for i in 1..<T { out.tensors[b * (T - 1) + i - 1] = out.tokens[b * T + i - 1] }
        }
        return out
    }
}

/// Loss sums, poolable over micro-batches and ranks (SPEC section 3: sum w_j CE / sum w_j).
/// A base whose loss is a sum of parts (Open-MAGVIT2: CE(pre) + CE(post), SPEC section 8) also
/// gets each part's weighted sum, pooled the same way, so the parts add up to the loss.
public struct LossReport: Equatable {
    public var weightedSum: Double = 0
    public var weightSum: Double = 0
    public var slotSums: [Double]
    public var slotCounts: [Double]
    /// Per loss part (`Transformer.lossPartNames`), sum of w_j times that part; empty for LlamaGen.
    public var partSums: [Double]
    public init(slots: Int, parts: Int = 0) {
        slotSums = Array(repeating: 0, count: slots)
        slotCounts = slotSums
        partSums = Array(repeating: 0, count: parts)
    }
    public var loss: Double { weightedSum / max(weightSum, 1e-30) }
    public var slotLosses: [Double] { zip(slotSums, slotCounts).map { $0 / max($1, 1e-30) } }
    /// Each part's pooled mean (they add up to `loss`).
    public var partLosses: [Double] { partSums.map { $0 / max(weightSum, 1e-30) } }
    public var tokens: Int { Int(slotCounts.reduce(0, +)) }
    public mutating func add(_ o: LossReport) {
        weightedSum += o.weightedSum
        weightSum += o.weightSum
        for j in slotSums.indices {
            slotSums[j] += o.slotSums[j]
            slotCounts[j] += o.slotCounts[j]
        }
        if partSums.isEmpty { partSums = Array(repeating: 0, count: o.partSums.count) }
        for i in o.partSums.indices { partSums[i] += o.partSums[i] }
    }
    /// Flat form for one allreduce: [weightedSum, weightSum, slotSums..., slotCounts..., partSums...].
    public var packed: [Double] { [weightedSum, weightSum] + slotSums + slotCounts + partSums }
    public init(packed p: [Double], parts: Int = 0) {
        let k = (p.count - 2 - parts) / 2
        weightedSum = p[0]
        weightSum = p[1]
        slotSums = Array(p[2..<(2 + k)])
        slotCounts = Array(p[(2 + k)..<(2 + 2 * k)])
        partSums = Array(p[(2 + 2 * k)...])
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
        self.p = p
        self.seed = seed
        self.step = step
        self.samplePositions = samplePositions
    }
}

/// A TensorAR model (SPEC section 3): a base model (`BaseModel`, chosen by `model.base`: SPEC
/// section 2's LlamaGen or section 8's Open-MAGVIT2) with the optional plug-in, run as stages,
/// each with its backward:
/// inputs (class slot, step inputs through the base embedding or the plug-in encoder, token
/// dropout), the base's causal trunk, the plug-in decoder (or nothing), the base's head per
/// (position, slot) row, and the windowed loss. Parameters and gradients are flat buffers laid
/// out by `ParameterTable`.
public final class Transformer {
    public let config: ModelConfig
    public let table: ParameterTable
    public let params: FlatBuffer
    public private(set) lazy var grads = FlatBuffer(count: table.total)
    /// Makes `grads` whole OS pages that are resident only while written and not yet handed
    /// back (`FlatBuffer(pages:)`): ZeRO-2 releases each bucket once reduced. Call before training.
    public func usePageBackedGradients() { grads = FlatBuffer(pages: table.total) }
    /// w_j, the per-slot loss weights (SPEC section 3; default all ones).
    public var slotWeights: [Float]
    /// `train.recompute`: the block stacks' activation layout (`ActivationRecompute`). Changing
    /// it drops the activation buffers; the next forward lays them out again.
    public var recompute = ActivationRecompute.none {
        didSet {
            if recompute != oldValue { B = 0 }
        }
    }

    let T, D, k: Int
    let base: any BaseModel
    let encoder: EncoderStage?
    let decoder: DecoderStage?

    public init(config: ModelConfig, params: FlatBuffer? = nil) throws {
        try config.validate()
        self.config = config
        let table = ParameterTable(config)
        self.table = table
        if let params {
            precondition(params.count == table.total)
            self.params = params
        } else {
            self.params = FlatBuffer(count: table.total)
        }
        T = config.seqLen
        D = config.dim
        k = config.window
        slotWeights = Array(repeating: 1, count: k)
        base = BaseRegistry.type(named: config.base)!.init(config: config, table: table)
        if config.hasPlugin {
            encoder = EncoderStage(base: base, config: config, table: table, siteBase: 10_000)
            decoder = DecoderStage(base: base, config: config, table: table, siteBase: 20_000)
        } else {
            encoder = nil
            decoder = nil
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
    private var x, hidden: FlatBuffer?
    /// Every activation buffer of a batch of B (`activationLayout`), sized once per B.
    private var activations: ActivationTable?
    private var rowTargets: [Int32] = [], rowWeights: [Float] = []
    private var batchCopy: ModelBatch?
    private var dropoutUsed: DropoutSettings?
    private var gradientScale: Float?

    /// Slots per position: k with the plug-in, 1 without.
    private var slots: Int { config.hasPlugin ? k : 1 }
    /// Rows entering the head: B*T*k with the plug-in, B*T without, ordered (b, p, j).
    private var headRows: Int { B * T * slots }

    /// The activation buffers of every stage for a batch of B: what a model allocates, and
    /// what `ModelConfig.trainingActivationBytes` reports.
    static func activationLayout(
        _ c: ModelConfig, batch B: Int, recompute: ActivationRecompute = .none
    ) -> ActivationLayout {
        let T = c.seqLen
        let D = c.dim
        let rows = B * T * (c.hasPlugin ? c.window : 1)
        var a = ActivationLayout(recompute: recompute)
        a.add("x", [B, T, D])  // the trunk's input, then its output (in place)
        a.add("hidden", [B, T, D])  // h: the trunk's output, kept for the decoder
        let baseType = BaseRegistry.type(named: c.base)!
        if baseType.tokenDropout { a.add("tokMask", [B, T, D], .dropout) }  // token dropout (SPEC section 2)
        a.add("dg", [rows, D], .backward)  // gradient w.r.t. the head's input rows
        a.add("dx", [B, T, D], .backward)  // gradient w.r.t. h, then the trunk's input
        baseType.addActivations(c, sequences: B, headRows: rows, to: &a)
        if c.hasPlugin {
            EncoderStage.addActivations(c, n: B * (T - 1), to: &a)
            DecoderStage.addActivations(c, n: B * T, to: &a)
        }
        return a
    }

    private func prepare(_ b: Int) {
        if b == B { return }
        B = b
        activations = nil  // the old batch's buffers go first
        let t = ActivationTable(Transformer.activationLayout(config, batch: b, recompute: recompute))
        t.allocate(.forward)
        activations = t
        x = t["x"]
        hidden = t["hidden"]
        base.bind(t, sequences: B, headRows: headRows)
        encoder?.bind(t, n: B * (T - 1))
        decoder?.bind(t, n: B * T)
    }

    // MARK: forward

    /// The base's input-embedding tables (`BaseModel.tokenFactors`), for `discrete` noise.
    public var tokenFactors: [TokenFactor] { type(of: base).tokenFactors(config) }
    /// The parts a row's loss is the sum of (`BaseModel.lossPartNames`; empty for LlamaGen).
    public var lossPartNames: [String] { base.lossPartNames }
    /// How many parts a token is chosen in when sampling (`BaseModel.headParts`: LlamaGen 1,
    /// Open-MAGVIT2 2, pre then post).
    public var headPartCount: Int { base.headParts.count }
    /// Floats of one row of `forward`'s logits: V for LlamaGen; 2^b0 + 2^b1 for Open-MAGVIT2
    /// (pre logits, then post logits given the target's pre sub-token, SPEC section 8).
    public var logitsWidth: Int { base.headParts.reduce(0, +) }

    /// Runs the model; returns the loss sums. With `gradientScale`, `backward()` may follow;
    /// gradients are then d(sum w CE)/dθ times gradientScale (1 / the global batch's total
    /// weight gives the mean loss's gradient). `logits` (B, T, k, logitsWidth), when given,
    /// receives every position's logits (invalid pairs too).
    ///
    /// `parametersNeeded(range)`, mirroring `backward`'s `onReady`, is called with each range of
    /// the flat parameter buffer before any stage reads it, in `parameterNeededOrder` (the
    /// embeddings, the encoder, each trunk block, the decoder, the head): ZeRO's overlapped
    /// allgather blocks there until that range has landed. A range is announced once, before the
    /// first stage that reads it (RAR's trunk, decoder and head and Open-MAGVIT2's head also read
    /// the embedding tables, announced with the inputs). Without it nothing changes.
    @discardableResult
    public func forward(
        _ batch: ModelBatch, dropout: DropoutSettings? = nil, gradientScale: Float? = nil,
        logits: UnsafeMutablePointer<Float>? = nil, parametersNeeded: ((Range<Int>) -> Void)? = nil
    ) -> LossReport {
        precondition(
            batch.tokens.count == batch.batch * T && batch.labels.count == batch.batch
                && batch.tensors.count == batch.batch * (T - 1) * k,
            "batch arrays do not match B=\(batch.batch), T=\(T), k=\(k)")
        if let orders = batch.orders {
            precondition(
                type(of: base).readsSampleOrders && !config.hasPlugin && orders.count == batch.batch * T,
                "a per-sample order needs the RAR base without a plug-in and (B, T) orders")
        }
        let batch = batch.reordered()
        prepare(batch.batch)
        batchCopy = batch
        base.condition(.training(labels: batch.labels, orders: batch.orders, seqLen: T, slots: slots))
        let drop = (dropout?.p ?? 0) > 0 ? dropout : nil
        dropoutUsed = drop
        self.gradientScale = gradientScale
        let p = params.base
        let plan = drop.map { DropoutPlan(p: $0.p, seed: $0.seed, step: $0.step, samplePositions: $0.samplePositions) }
        parametersNeeded?(base.embeddingRange)
        if let encoder { parametersNeeded?(encoder.range) }
        inputsForward(batch, dropout: plan)
        base.trunkForward(x!, sequences: B, dropout: plan, params: p, needed: parametersNeeded)
        copyFloats(hidden!.base, from: x!.base, count: B * T * D)
        var g = hidden!
        if let decoder {
            parametersNeeded?(decoder.range)
            g = decoder.forward(hidden!.base, n: B * T, dropout: plan, params: p)
        }
        parametersNeeded?(base.headRange)
        buildTargets(batch)
        var losses = [Float](repeating: 0, count: headRows)
        let gradient = gradientScale.map { scale in
            HeadGradient(dloss: rowWeights.map { $0 * scale }, grads: grads.base)
        }
        base.headForward(
            g, rows: headRows, targets: rowTargets, losses: &losses, logits: logits, dropout: plan,
            gradient: gradient, params: p)
        return windowedLoss(losses)
    }

    /// Continues from a `forward` with a gradient scale: adds every parameter's gradient into
    /// `grads`, stage by stage in reverse. `onReady(range)` fires as soon as a contiguous range of
    /// the flat gradient buffer is final, in backward order, so an allreduce can start while
    /// backward goes on.
    public func backward(onReady: ((Range<Int>) -> Void)? = nil) {
        precondition(gradientScale != nil, "backward() needs a forward(gradientScale:) first")
        let p = params.base
        let gp = grads.base
        let a = activations!
        a.allocate(.backward)
        let dg = a.zeroed("dg")
        base.headBackward(dg, params: p, grads: gp)
        onReady?(base.headRange)
        let dx = a.zeroed("dx")  // gradient w.r.t. the trunk's output h
        if let decoder {
            decoder.backward(dg, dh: dx, params: p, grads: gp)
            onReady?(decoder.range)
        } else {
            copyFloats(dx.base, from: dg.base, count: B * T * D)
        }
        base.trunkBackward(dx, params: p, grads: gp, onReady: onReady)
        inputsBackward(dx, onReady: onReady)
        gradientScale = nil
    }

    /// The ranges `backward` hands to `onReady`, in its order: each stage's parameters as its
    /// backward completes them (head, decoder, trunk, encoder, embeddings). Together they cover
    /// the flat buffer once: `GradientSync` packs its buckets from them.
    public var gradientReadyOrder: [Range<Int>] {
        Transformer.readyOrder(base: base, encoder: encoder, decoder: decoder)
    }

    /// The ranges `forward` hands to `parametersNeeded`, in its order: `gradientReadyOrder`
    /// reversed (embeddings, encoder, trunk blocks from the first, decoder, head).
    public var parameterNeededOrder: [Range<Int>] { gradientReadyOrder.reversed() }

    /// `gradientReadyOrder` for a model of shape `c`, without allocating it (memory estimates).
    public static func gradientReadyOrder(_ c: ModelConfig) -> [Range<Int>] {
        let table = ParameterTable(c)
        let base = BaseRegistry.type(named: c.base)!.init(config: c, table: table)
        let encoder = c.hasPlugin ? EncoderStage(base: base, config: c, table: table, siteBase: 0) : nil
        let decoder = c.hasPlugin ? DecoderStage(base: base, config: c, table: table, siteBase: 0) : nil
        return readyOrder(base: base, encoder: encoder, decoder: decoder)
    }

    private static func readyOrder(
        base: any BaseModel, encoder: EncoderStage?,
        decoder: DecoderStage?
    ) -> [Range<Int>] {
        [base.headRange] + (decoder.map { [$0.range] } ?? []) + base.trunkRanges
            + (encoder.map { [$0.range] } ?? []) + [base.embeddingRange]
    }

    // MARK: stage: inputs (SPEC section 2 positions; section 3 encoder; token dropout)

    /// x (B, T, D): position 0 the class, p >= 1 the input for step p, then the token dropout on
    /// the whole sequence, class slot included (SPEC section 2).
    private func inputsForward(_ batch: ModelBatch, dropout plan: DropoutPlan?) {
        let p = params.base
        let x = self.x!.base
        let T = T
        let D = D
        for b in 0..<B { base.embedClass(x + b * T * D, label: Int(batch.labels[b]), params: p) }
        if let encoder {
            encoder.forward(batch.tensors, n: B * (T - 1), noise: batch.embeddingNoise, dropout: plan, params: p) { s in
                x + (s / (T - 1) * T + s % (T - 1) + 1) * D
            }
        } else {
            batch.tensors.withUnsafeBufferPointer { tp in
                for b in 0..<B {
                    base.embedTokens(x + (b * T + 1) * D, tp.baseAddress! + b * (T - 1), n: T - 1, params: p)
                }
            }
        }
        if let plan, type(of: base).tokenDropout {
            activations!.allocate(.dropout)
            let tokMask = activations!["tokMask"]
            dropoutMask(
                tokMask.base, p: plan.p, rows: B * T, d: D, rowsPerSample: T, samplePositions: plan.samplePositions,
                seed: plan.seed, step: plan.step, site: 30_000)
            dropoutApply(x, tokMask.base, count: B * T * D)
        }
    }

    /// dx (B, T, D): the gradient w.r.t. the trunk's input.
    private func inputsBackward(_ dx: FlatBuffer, onReady: ((Range<Int>) -> Void)?) {
        let gp = grads.base
        let batch = batchCopy!
        let T = T
        let D = D
        if dropoutUsed != nil && type(of: base).tokenDropout {
            dropoutApply(dx.base, activations!["tokMask"].base, count: B * T * D)
        }
        for b in 0..<B { base.embedClassBackward(dx.base + b * T * D, label: Int(batch.labels[b]), grads: gp) }
        if let encoder {
            let row = { (s: Int) in UnsafePointer(dx.base + (s / (T - 1) * T + s % (T - 1) + 1) * D) }
            encoder.backward(row, params: params.base, grads: gp)
            onReady?(encoder.range)
        } else {
            batch.tensors.withUnsafeBufferPointer { tp in
                for b in 0..<B {
                    base.embedTokensBackward(
                        dx.base + (b * T + 1) * D, tp.baseAddress! + b * (T - 1), n: T - 1, grads: gp)
                }
            }
        }
        onReady?(base.embeddingRange)
    }

    // MARK: stage: windowed loss (SPEC section 3)

    /// Row targets x_{p+j} (-1 past the image end) and weights w_j, rows ordered (b, p, j).
    private func buildTargets(_ batch: ModelBatch) {
        let kk = slots
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

    /// sum w_j CE / sum w_j over the valid rows, and the per-slot sums. Its backward is the
    /// per-row weight times the gradient scale (`backward`'s dloss).
    private func windowedLoss(_ losses: [Float]) -> LossReport {
        let parts = base.partLosses
        var report = LossReport(slots: slots, parts: parts.count)
        for r in 0..<headRows where rowTargets[r] >= 0 {
            let j = r % slots
            let w = rowWeights[r]
            report.weightedSum += Double(w) * Double(losses[r])
            report.weightSum += Double(w)
            report.slotSums[j] += Double(losses[r])
            report.slotCounts[j] += 1
            for i in parts.indices { report.partSums[i] += Double(w) * Double(parts[i][r]) }
        }
        return report
    }
}
