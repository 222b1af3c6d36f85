import ARModel
import Foundation
import Kernels
import Platform
import TokenData

/// The data-parallel training loop (issue: tensorar-train). Every rank runs the same code on its
/// share of each global batch; gradients are summed across ranks (each rank already scales by
/// 1 / the global batch's total loss weight, so the sum is the global mean's gradient).
public final class Trainer {
    public let config: TrainConfig
    public let comm: Communicator
    public let model: Transformer
    /// `train.parallel_micro_batches` (`TrainConfig.lanes`): the models that run this rank's
    /// micro-batches side by side. Lane 0 is `model`; the others share its parameters and have
    /// their own activations and gradients. One lane: micro-batches one after another.
    let lanes: [Transformer]
    public let optimizer: AdamW
    /// The exponential moving average of the parameters (`train.ema_decay`; nil when off), full on
    /// every rank like the parameters: after each applied step `ema = d ema + (1 - d) params`.
    public let ema: FlatBuffer?
    public let loader: TokenLoader
    public let trainCache: TokenCache
    public let valCache: TokenCache?
    public let sync: GradientSync
    /// ZeRO (`dist.shard_optimizer`): the allgather of the updated slices (nil when replicated).
    /// Overlapped (`dist.overlap_gather`), `trainStep` returns with it in flight and the next
    /// step's forward waits for each range before reading it; anything else that reads the
    /// parameters or the EMA in between must call `finishParameterGather()` first.
    public let gather: ParameterGather?
    let noise: LossNoise
    /// The model's input for each micro-batch (label drop, windows, noise, dropout keys).
    let batches: BatchBuilder
    let weightPerImage: Double
    public private(set) var step = 0
    /// Batches the loader reads ahead.
    static let prefetch = 2
    /// Set by a signal handler: finish the step, save, exit cleanly.
    public static let stopRequested = ManagedAtomicFlag()

    /// Seconds summed over steps: forward/backward (`compute`), waiting for the gradient
    /// allreduce after backward (`allreduceWait`: all of it when blocking, what overlap did not
    /// hide otherwise; it includes waiting for a slower rank), waiting for the loader, and AdamW.
    public struct Timing {
        public var compute = 0.0, allreduceWait = 0.0, dataWait = 0.0, optimizer = 0.0, steps = 0
        /// ZeRO: waiting for the updated slices of every rank: all of the allgather when blocking
        /// (after AdamW); overlapped, what the next forward waited for, plus the waits of other
        /// readers between steps (validation, checkpoints, the end of the run).
        public var gather = 0.0
        public var total: Double { compute + allreduceWait + dataWait + optimizer + gather }
        mutating func add(_ o: Timing) {
            compute += o.compute
            allreduceWait += o.allreduceWait
            dataWait += o.dataWait
            optimizer += o.optimizer
            steps += o.steps
            gather += o.gather
        }
    }
    /// Every step of this process except its first (which allocates the activations and warms
    /// the caches), so short benchmark runs measure the steady state; `firstStep` holds that one.
    public private(set) var timing = Timing()
    public private(set) var firstStep = Timing()
    /// Bytes of FlatBuffers the first step allocated (the model's activations and backward
    /// scratch), measured; compare `memory.activations`, the estimate made before it.
    public private(set) var activationBytesMeasured: Int?
    let hooks = TestHooks.fromEnvironment()
    /// Watches this rank's collectives (set by the program on more than one rank; nil: unwatched).
    public var watchdog: CollectiveWatchdog?

    /// `body`, a collective of step `step`, under the watchdog if there is one.
    public func watched<T>(step: Int, _ what: String, _ body: () throws -> T) rethrows -> T {
        guard let watchdog else { return try body() }
        return try watchdog.wait(step: step, what: what, body)
    }

    public init(config: TrainConfig, comm: Communicator) throws {
        self.config = config
        self.comm = comm
        trainCache = try TokenCache(directory: config.data.train)
        valCache = try config.data.val.map { try TokenCache(directory: $0) }
        let info = trainCache.info
        if info.gridH != info.gridW {
            throw InputError(
                config.data.train,
                "grid \(info.gridH)x\(info.gridW) is not square; the 2D rotary table needs H == W (SPEC section 1)")
        }
        let mc = try config.model.resolve(vocabSize: info.vocabSize, numClasses: info.numClasses, gridSize: info.gridH)
        if let v = valCache { try checkDataMatchesModel(v.info, mc, cachePath: v.directory) }
        if let n = config.data.valSamples, let v = valCache, n > v.count {
            throw InputError(
                v.directory,
                "data.val_samples is \(n) but this validation cache holds only "
                    + "\(v.count) samples")
        }
        try MemoryCheck.check(
            mc, config: config, ranks: comm.size, ranksOnNode: MPI.ranksOnThisNode,
            source: "config (model, train.micro_batch)")
        model = try Trainer.buildModel(mc, config: config)
        model.recompute = config.train.recompute
        let params = model.params
        ema = config.train.emaDecay.map { _ in FlatBuffer(count: params.count) }
        ema?.base.update(from: params.base, count: params.count)  // starts at the initial weights
        let zero = config.dist.shardOptimizer
        if zero == .statesAndGrads { model.usePageBackedGradients() }
        _ = model.grads  // allocated now (lazy), so it counts as gradients, not as the first step's activations
        if let w = config.loss.slotWeights { model.slotWeights = w.map { Float($0) } }
        weightPerImage = model.slotWeights.enumerated().reduce(0.0) {
            $0 + Double(max(0, mc.seqLen - $1.offset)) * Double($1.element)
        }
        lanes = try [model] + Trainer.extraLanes(config.lanes(worldSize: comm.size) - 1, like: model)
        // ZeRO: each rank owns its checkpoint slice (SPEC section 7) of the flat buffer: its
        // moments, its update and, after the reduce-scatter, its gradients.
        let total = model.table.total
        let ranks = comm.size
        let slices = (0..<ranks).map { CheckpointStore.slice(rank: $0, worldSize: ranks, count: total) }
        let owned = zero == .none ? nil : slices[comm.rank]
        optimizer = AdamW(
            table: model.table.decaying { config.decayRules[$0] }, settings: config.adamWSettings,
            trainable: config.trainableGroups, owned: owned)
        optimizer.threads = BLAS.threads  // the rank's threads (dist.threads_per_rank, set before this)
        loader = try TokenLoader(
            cache: trainCache, globalBatch: config.train.globalBatch, rank: comm.rank, worldSize: comm.size,
            seed: UInt64(config.train.seed), shuffle: true, augment: config.data.augment,
            prefetch: Trainer.prefetch)
        let shard =
            zero == .none
            ? nil
            : GradientSync.Shard(
                slices: slices, rank: comm.rank, releaseSource: zero == .statesAndGrads,
                bucketElements: GradientSync.bucketElements(mb: config.dist.bucketMB))
        sync = try GradientSync(
            communicator: comm, count: model.table.total, bucketMB: config.dist.bucketMB,
            readyOrder: model.gradientReadyOrder,
            mode: config.dist.overlap ? .overlapped : .blocking, shard: shard)
        // The gradient buckets reversed: packed from backward's order, so in the order the next
        // forward reads them (`parameterNeededOrder`), and the same on every rank.
        gather =
            zero == .none
            ? nil
            : try ParameterGather(
                communicator: comm, buckets: sync.buckets.reversed(), slices: slices,
                trained: optimizer.trainedRange, mode: config.dist.overlapGather ? .overlapped : .blocking)
        var codebook: [Float]?
        var cbDim = 0
        if config.noise.type == .discrete && config.noise.embedding == .codebook {
            guard let path = trainCache.codebookPath else {
                throw InputError(config.data.train, "noise.embedding: codebook needs a codebook.h5 in the cache")
            }
            let cb = try Codebook.load(path: path)
            codebook = cb.vectors
            cbDim = cb.Dc
        }
        noise = LossNoise(
            noiser: TensorNoiser(
                type: config.noise.type, schedule: config.noise.schedule, window: mc.window, vocabSize: mc.vocabSize),
            seed: UInt64(config.train.seed), codebook: codebook, codebookDim: cbDim)
        batches = BatchBuilder(
            model: model, noise: noise, seed: UInt64(config.train.seed),
            labelDrop: config.train.labelDrop, dropout: config.train.dropout, randomOrder: config.train.randomOrder)
    }

    /// Memory of one rank by purpose, in bytes: exact for parameters, gradients and moments, an
    /// estimate (`ModelConfig.trainingActivationBytes`, checked by a test) for activations.
    public struct MemoryBreakdown: CustomStringConvertible {
        public var parameters = 0, gradients = 0, moments = 0, activations = 0
        /// Token batches in flight (the loader reads ahead) and MPI's scratch for one bucket.
        public var buffers = 0
        public var total: Int { parameters + gradients + moments + activations + buffers }
        /// With ZeRO: which stage, and the ranks the state is split over (for the description).
        public var zero = ShardOptimizer.none
        public var ranks = 1
        /// `train.recompute`: the activations' layout.
        public var recompute = ActivationRecompute.none
        public var description: String {
            func mb(_ b: Int) -> String { String(format: b < 10_000_000 ? "%.1f MB" : "%.0f MB", Double(b) / 1e6) }
            let sharded = zero == .none ? "" : " (ZeRO \(zero.rawValue) over \(ranks) rank(s))"
            let recomputed = recompute == .none ? "" : " (recompute \(recompute.rawValue))"
            return "memory per rank (estimate\(sharded)): parameters \(mb(parameters)), gradients \(mb(gradients)), "
                + "AdamW moments \(mb(moments)), "
                + "activations \(mb(activations))\(recomputed), buffers \(mb(buffers)) "
                + "(data read-ahead, allreduce scratch); total \(mb(total)) "
                + "+ the runtime, MPI and BLAS"
        }
    }

    public var memory: MemoryBreakdown {
        MemoryBreakdown.estimate(model.config, config: config, ranks: comm.size)
    }

    /// Models beside `model` for side-by-side micro-batches: the same parameters, slot weights and
    /// recompute layout; gradients of their own (allocated now, so they count as gradients).
    static func extraLanes(_ n: Int, like model: Transformer) throws -> [Transformer] {
        try (0..<max(n, 0)).map { _ in
            let lane = try Transformer(config: model.config, params: model.params)
            lane.recompute = model.recompute
            lane.slotWeights = model.slotWeights
            _ = lane.grads
            return lane
        }
    }

    /// Fresh weights from the seed (the same on every rank), or `model.init_from`: a full model,
    /// or a base model (e.g. converted LlamaGen) under a fresh plug-in (the paper's plug-and-play).
    static func buildModel(_ mc: ModelConfig, config: TrainConfig) throws -> Transformer {
        let model = try Transformer(config: mc)
        model.initialise(seed: UInt64(config.train.seed))
        guard let path = config.model.initFrom else { return model }
        let st = try Safetensors.read(path)
        if let json = st.metadata["tensorar.config"] {
            let fileConfig: ModelConfig
            do { fileConfig = try JSONDecoder().decode(ModelConfig.self, from: Data(json.utf8)) } catch {
                throw InputError(path, "metadata tensorar.config is not a valid model config: \(error)")
            }
            try fileConfig.validate(source: "\(path) (tensorar.config)")
            var a = fileConfig
            var b = mc
            a.window = 1
            a.pluginDepth = 0
            b.window = 1
            b.pluginDepth = 0
            a.residual = true
            b.residual = true
            if a != b {
                throw InputError(
                    path,
                    "its base model \(fileConfig.jsonString()) does not match the configured one \(mc.jsonString())")
            }
            if fileConfig.hasPlugin
                && (fileConfig.window != mc.window || fileConfig.pluginDepth != mc.pluginDepth
                    || fileConfig.residual != mc.residual)
            {
                throw InputError(
                    path,
                    "its plug-in (window \(fileConfig.window), depth \(fileConfig.pluginDepth), "
                        + "residual \(fileConfig.residual)) does not match the config's "
                        + "(\(mc.window), \(mc.pluginDepth), \(mc.residual))"
                )
            }
        }
        let hasPlugin = st.tensors.keys.contains { $0.hasPrefix("tensorar.") }
        try model.loadWeights(st, allowMissingPlugin: !hasPlugin)
        return model
    }

    // MARK: one step

    public struct StepResult {
        public var report: LossReport
        public var gradNorm: Double
        public var applied: Bool
        public var seconds: Double
    }

    /// One optimizer step over one global batch: micro-batches with gradient accumulation, the
    /// last one's backward overlapped with the allreduce, then AdamW. A step whose loss or
    /// gradient is not finite (on any rank: both are reduced first) is not applied on any rank.
    ///
    /// ZeRO with an overlapped gather: returns with the updated parameters still being gathered
    /// (`gather`); the next `trainStep` waits for them range by range. Call
    /// `finishParameterGather()` before reading `model.params` or `ema` otherwise.
    public func trainStep() throws -> StepResult {
        let t0 = monotonicSeconds()
        let batch = try loader.next()
        let tData = monotonicSeconds()
        let waitedBefore = gather?.total.waitSeconds ?? 0
        let liveBefore = FlatBuffer.liveBytes
        try hooks.failIfAsked(rank: comm.rank, step: step + 1)
        earlyCommWait = 0
        let local = try accumulateGradients(batch, sync: sync)
        let forwardGatherWait = (gather?.total.waitSeconds ?? 0) - waitedBefore
        var packed = local.packed
        let commWait = try watched(step: step + 1, "the gradient allreduce") {
            let wait = try sync.finish().waitSeconds + earlyCommWait
            try comm.allreduce(&packed)
            return wait
        }
        let report = LossReport(packed: packed, parts: model.lossPartNames.count)
        let first = activationBytesMeasured == nil
        if first { activationBytesMeasured = FlatBuffer.liveBytes - liveBefore }
        let tOpt = monotonicSeconds()
        let waitedBeforeStep = gather?.total.waitSeconds ?? 0
        var applied = false
        var norm = Double.nan
        if report.loss.isFinite {
            let res = try optimizerStep(lr: config.learningRates(at: step))
            applied = res.applied
            norm = res.gradNorm
            // overlapped ZeRO updates the EMA bucket by bucket as the gather lands (`optimizerStep`)
            if applied && gather?.mode != .overlapped { updateEMA() }
        }
        let t1 = monotonicSeconds()
        let stepGatherWait = (gather?.total.waitSeconds ?? 0) - waitedBeforeStep
        var t = Timing(
            compute: (tOpt - tData) - commWait - forwardGatherWait, allreduceWait: commWait, dataWait: tData - t0,
            optimizer: t1 - tOpt - stepGatherWait, steps: 1)
        t.gather = forwardGatherWait + stepGatherWait
        if first { firstStep = t } else { timing.add(t) }
        step += 1
        return StepResult(report: report, gradNorm: norm, applied: applied, seconds: t1 - t0)
    }

    /// AdamW on the averaged gradients. Sharded (ZeRO): the global norm from one allreduce of
    /// the owners' squared sums, the update of this rank's slice only, then every slice gathered
    /// back into the full parameters bucket by bucket (`gather`): blocking, here; overlapped, on
    /// the communication thread while the next step begins, with the EMA of each bucket updated
    /// there as it lands (elementwise, so the same bits as `updateEMA` after the whole gather).
    func optimizerStep(lr: PerGroup<Float>) throws -> AdamWStepResult {
        guard let shard = sync.shard, let gather else {
            return optimizer.step(params: model.params, grads: model.grads, lr: lr, clip: config.clipNorm)
        }
        let g = shard.gradients.base - shard.owned.lowerBound  // indexed by flat offset over the owned slice
        let norm = try comm.allreduce(optimizer.squaredGradientSum(g)).squareRoot()
        let result = optimizer.step(params: model.params, gradients: g, norm: norm, lr: lr, clip: config.clipNorm)
        if result.applied {
            let emaPerBucket = gather.mode == .overlapped ? emaUpdate() : nil
            try gather.start(model.params, then: emaPerBucket)
        }
        return result
    }

    /// Waits until every rank's updated parameters (and the EMA) are in place: call it before
    /// reading `model.params` or `ema` after a `trainStep` other than through the next
    /// `trainStep`. Returns at once when no gather is in flight (replicated, blocking, or done).
    /// The wait counts as gather time. Throws the gather's MPI error (the ranks are then out of step).
    public func finishParameterGather() throws {
        guard let gather, gather.isInFlight else { return }
        timing.gather += try watched(step: step, "the parameter allgather") { try gather.finish() }
    }

    deinit { try? gather?.finish() }  // no gather left writing into the parameters

    /// The next forward's `parametersNeeded`: waits (watched) until `range` has landed. A failed
    /// gather is not thrown here (the forward cannot throw): `accumulateGradients` calls
    /// `gather.finish()` right after the forward, which throws it.
    private func waitForParameters(_ range: Range<Int>) {
        guard let gather else { return }
        try? watched(step: step + 1, "the parameter allgather") { try gather.waitFor(range) }
    }

    /// ZeRO-2 (states+grads): seconds waited for the reduce-scatters of the micro-batches before
    /// the last one, in this step.
    private var earlyCommWait = 0.0

    /// This rank's part of the step's gradient: its share `batch` of the global batch, in
    /// micro-batches, summed into `model.grads` (zeroed first) and scaled by 1 / the global
    /// batch's total loss weight, so that the sum over ranks is the gradient of the global mean
    /// loss. Label drop, noise and dropout are keyed by each sample's position in the global batch,
    /// so the sum does not depend on how the batch is split over ranks. With `sync`, the last
    /// micro-batch's backward hands each finished range to it (`begin`/`markReady`); the caller
    /// then calls `sync.finish()`. With ZeRO-2 (`states+grads`) every micro-batch's backward is
    /// reduce-scattered (each rank keeps only its slice), all but the last finished here. Returns
    /// this rank's loss sums.
    func accumulateGradients(_ batch: TokenBatch, sync: GradientSync?) throws -> LossReport {
        let micro = config.train.microBatch
        precondition(
            batch.count % micro == 0,
            "a rank's batch of \(batch.count) is not a whole number of micro-batches of \(micro)")
        let scale = Float(1 / (Double(config.train.globalBatch) * weightPerImage))
        model.grads.zero()
        sync?.shard?.gradients.zero()
        // Test-only fault injection (TestHooks): a NaN added before any backward stays NaN (it
        // goes into a trained group's element: a frozen group's gradient is never looked at).
        let poison = hooks.nan(rank: comm.rank, worldSize: comm.size, step: batch.step + 1)
        if poison != nil { model.grads[optimizer.trainedRange.lowerBound] = .nan }
        var local: LossReport
        if lanes.count > 1 {
            local = try accumulateInLanes(batch, micro: micro, scale: scale)
            if let sync {
                sync.begin(model.grads, scale: 1)
                model.gradientReadyOrder.forEach(sync.markReady)
            }
        } else {
            local = try accumulateInOrder(batch, micro: micro, scale: scale, sync: sync)
        }
        if poison == .loss { local.weightedSum = .nan }
        return local
    }

    /// `accumulateGradients` one micro-batch after another into `model.grads`, the last one's
    /// backward (every one's with ZeRO-2) handing its ranges to `sync` as they are done.
    private func accumulateInOrder(
        _ batch: TokenBatch, micro: Int, scale: Float, sync: GradientSync?
    ) throws -> LossReport {
        let accum = batch.count / micro
        var local = LossReport(slots: model.config.window, parts: model.lossPartNames.count)
        let everyMicroBatch = sync?.shard?.releaseSource ?? false
        // ZeRO, overlapped: the last step's parameters are still landing. The first micro-batch's
        // input (discrete noise reads the token tables) and forward wait for each range before
        // reading it; that forward reads every parameter, so the gather is over after it.
        let inFlight = gather?.isInFlight ?? false
        for a in 0..<accum {
            let needed: ((Range<Int>) -> Void)? =
                a == 0 && inFlight ? { [unowned self] in self.waitForParameters($0) } : nil
            if let needed { batches.parameterRanges.forEach(needed) }
            let input = batches.training(batch, range: (a * micro)..<((a + 1) * micro))
            local.add(
                model.forward(input.batch, dropout: input.dropout, gradientScale: scale, parametersNeeded: needed))
            if needed != nil { try gather?.finish() }  // every bucket has landed; throws the gather's error
            if let sync, a == accum - 1 || everyMicroBatch {
                // Backward must not write a range after marking it, so only the last micro-batch's
                // backward hands ranges over (GradientSync's rules), except with ZeRO-2, whose
                // reduce-scatter adds each micro-batch into the owners' slices and zeroes the source.
                sync.begin(model.grads, scale: 1)
                model.backward { range in sync.markReady(range) }
                if a < accum - 1 { earlyCommWait += try sync.finish().waitSeconds }
            } else {
                model.backward()
            }
        }
        return local
    }

    /// `accumulateGradients` with several lanes: lane l runs micro-batches l, l + L, l + 2L, ...
    /// (L lanes) into its own gradients, the lanes side by side on the rank's threads, each lane's
    /// kernels on its own thread (`ComputePool.threadsHere`); then lane 0's gradients (`model`'s)
    /// get lanes 1, 2, ... added in that order, and the loss sums are added in micro-batch order.
    /// So the result depends on L and never on the thread count. The gradients are final only at
    /// the end: the allreduce does not overlap this backward. An overlapped ZeRO gather is waited
    /// for first, whole (every lane reads every parameter from its first forward); the wait counts
    /// as the forward's gather wait, as the serial path's range-by-range waits do.
    private func accumulateInLanes(_ batch: TokenBatch, micro: Int, scale: Float) throws -> LossReport {
        let accum = batch.count / micro
        if let gather, gather.isInFlight {
            try watched(step: step + 1, "the parameter allgather") { _ = try gather.finish() }
        }
        for lane in lanes.dropFirst() { lane.grads.zero() }
        var reports = [LossReport?](repeating: nil, count: accum)
        let n = lanes.count
        reports.withUnsafeMutableBufferPointer { out in
            ComputePool.shared.run(parts: n) { l in
                for a in stride(from: l, to: accum, by: n) {
                    let input = batches.training(batch, range: (a * micro)..<((a + 1) * micro))
                    out[a] = lanes[l].forward(input.batch, dropout: input.dropout, gradientScale: scale)
                    lanes[l].backward()
                }
            }
        }
        let g = model.grads
        for lane in lanes.dropFirst() { addForward(g.base, g.base, lane.grads.base, count: g.count) }
        var local = LossReport(slots: model.config.window, parts: model.lossPartNames.count)
        for r in reports { local.add(r!) }
        return local
    }

    /// Seconds one gradient allreduce takes by itself: all ranks start it together (after a
    /// barrier), nothing else runs; mean of `repeats`. The step's allreduce wait also holds the
    /// time spent waiting for a slower rank; this is the transfer alone. Overwrites the gradients
    /// (call it after training).
    public func measureAllreduce(repeats: Int = 3) throws -> Double {
        try finishParameterGather()
        guard comm.size > 1, repeats > 0 else { return 0 }
        var total = 0.0
        for _ in 0..<repeats {
            try comm.barrier()
            let t0 = monotonicSeconds()
            try sync.allreduce(model.grads, scale: 1)
            total += monotonicSeconds() - t0
        }
        return total / Double(repeats)
    }

    /// `ema = d ema + (1 - d) params` (as LlamaGen's update_ema): d = 0 copies the weights exactly,
    /// d = 1 keeps the average exactly as it was.
    func updateEMA() {
        emaUpdate()?(0..<model.params.count)
    }

    /// The EMA update of one flat range (nil without EMA): elementwise, so applying it bucket by
    /// bucket gives the same bits as over the whole buffer at once.
    func emaUpdate() -> ((Range<Int>) -> Void)? {
        guard let ema, let decay = config.train.emaDecay else { return nil }
        let d = Float(decay)
        let keep = Float(1 - decay)
        let params = model.params
        return { range in
            let e = ema.base
            let p = params.base
            for i in range { e[i] = e[i] * d + p[i] * keep }
        }
    }

    /// `validate()` with the EMA weights in place of the parameters (nil without EMA or validation).
    public func validateEMA() throws -> (noised: LossReport, clean: LossReport)? {
        try finishParameterGather()
        guard let ema, valCache != nil else { return nil }
        let p = model.params
        let saved = FlatBuffer(count: p.count)
        saved.base.update(from: p.base, count: p.count)
        p.base.update(from: ema.base, count: p.count)
        defer { p.base.update(from: saved.base, count: p.count) }
        return try validate()
    }

    /// Validation loss over the validation cache (or its first `val_samples`), split across ranks,
    /// with the training noise under a fixed seed (SPEC section 4) and, beside it, clean inputs.
    public func validate() throws -> (noised: LossReport, clean: LossReport)? {
        try finishParameterGather()
        guard let v = valCache else { return nil }
        let range = validationShard(cache: v, limit: config.data.valSamples, rank: comm.rank, worldSize: comm.size)
        var noised = try evaluateLoss(
            model: model, cache: v, range: range, batchSize: config.train.microBatch, noise: noise
        ).packed
        var clean = try evaluateLoss(
            model: model, cache: v, range: range, batchSize: config.train.microBatch, noise: nil
        ).packed
        try watched(step: step, "the validation loss allreduce") {
            try comm.allreduce(&noised)
            try comm.allreduce(&clean)
        }
        let parts = model.lossPartNames.count
        return (LossReport(packed: noised, parts: parts), LossReport(packed: clean, parts: parts))
    }
}

extension Trainer.MemoryBreakdown {
    /// One rank's memory for `config` on `ranks` ranks, without allocating anything: exact for
    /// parameters and moments (16 bytes a parameter replicated: weights, gradients, m, v; ZeRO
    /// shards m and v, states+grads the gradients too), the activation table for activations.
    /// states+grads keeps the rank's gradient slice plus what backward has written and not yet
    /// reduced: at most the largest range backward completes at once (`readyOrder`) and two
    /// buckets (measured against the resident peak in the README, Scaling).
    public static func estimate(_ model: ModelConfig, config: TrainConfig, ranks: Int) -> Self {
        let table = ParameterTable(model)
        let total = table.total
        let owned = (total + ranks - 1) / max(ranks, 1)  // the largest slice (CheckpointStore.slice)
        let trained = PerGroup<Int>.groups.filter { config.trainableGroups[$0] }.reduce(0) { $0 + table.count(of: $1) }
        let bucket = min(GradientSync.bucketElements(mb: config.dist.bucketMB), total)
        var m = Self()
        m.zero = config.dist.shardOptimizer
        m.ranks = ranks
        m.parameters = total * 4
        switch m.zero {
        case .none:
            m.gradients = total * 4
            m.moments = 2 * trained * 4
        case .states:
            m.gradients = (total + owned) * 4
            m.moments = 2 * min(owned, trained) * 4
        case .statesAndGrads:
            let largestRange = Transformer.gradientReadyOrder(model).map(\.count).max() ?? 0
            // plus a partial huge page at each end of the written window (FlatBuffer.release), when
            // the buffer is large enough to get them
            let pages = Pages.granule(bytes: total * 4)
            let granule = pages > Pages.size ? pages / 4 : 0
            let inFlight = min(total, largestRange + 2 * bucket + 2 * granule)
            m.gradients = (owned + inFlight) * 4
            m.moments = 2 * min(owned, trained) * 4
        }
        m.recompute = config.train.recompute
        // side-by-side micro-batches: a model's activations and a dense gradient buffer per extra lane
        let lanes = config.lanes(worldSize: max(ranks, 1))
        m.gradients += (lanes - 1) * total * 4
        m.activations =
            lanes
            * model.trainingActivationBytes(
                batch: config.train.microBatch, dropout: config.train.dropout > 0, recompute: m.recompute)
        let batchBytes = config.train.globalBatch / max(ranks, 1) * model.seqLen * 4
        // MPI's scratch for a bucket in flight (and ZeRO's receive buffer), the loader's read-ahead
        let scratch = ranks > 1 ? (m.zero == .none ? 2 : 3) * bucket * 4 : 0
        m.buffers = (Trainer.prefetch + 2) * batchBytes + scratch
        return m
    }
}

/// An error every rank raises at the same step from the same reduced values (e.g. too many
/// non-finite steps in a row), so the job can end without MPI_Abort: no rank is left waiting.
public struct CollectiveStop: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// A flag set from a signal handler and read by the loop.
public final class ManagedAtomicFlag: @unchecked Sendable {
    private var value: Int32 = 0
    private let lock = NSLock()
    public init() {}
    public func set() {
        lock.lock()
        value = 1
        lock.unlock()
    }
    public var isSet: Bool {
        lock.lock()
        defer { lock.unlock() }
        return value != 0
    }
}

extension Trainer {
    /// Where training stands, for the checkpoint manifest: step, samples seen and the loader's
    /// position in the global sample stream (SPEC section 7).
    public var progress: TrainingProgress {
        let pos = loader.position
        return TrainingProgress(
            step: step, samplesSeen: pos, dataEpoch: pos / max(trainCache.count, 1), dataOffset: pos,
            seed: config.train.seed)
    }

    /// Continues from a checkpoint: the step, and the data stream exactly where it was.
    /// Whether a checkpoint's data position fits this run's training cache: data_epoch must be
    /// data_offset / N for the N samples of the cache (else another cache, or a damaged manifest).
    public func checkDataPosition(_ c: LoadedCheckpoint) throws {
        let m = c.manifest
        let n = max(trainCache.count, 1)
        guard m.dataEpoch == m.dataOffset / n else {
            let path = (c.directory as NSString).appendingPathComponent("manifest.json")
            throw InputError(
                path,
                "data_epoch \(m.dataEpoch) does not match data_offset \(m.dataOffset) over the "
                    + "\(n) samples of \(config.data.train) (expected epoch \(m.dataOffset / n)): another cache, "
                    + "or a damaged manifest")
        }
    }

    public func restore(progress p: TrainingProgress) {
        step = p.step
        loader.restore(position: p.dataOffset)
    }

    /// Whether any rank was asked to stop (all ranks agree, so they stop at the same step).
    public func stopAgreed() throws -> Bool {
        var flag: [Int64] = [Trainer.stopRequested.isSet ? 1 : 0]
        try watched(step: step, "the stop agreement") { try comm.allreduce(&flag, op: .max) }
        return flag[0] != 0
    }
}

/// Test-only fault injection, read from the environment once per Trainer. These variables exist
/// for Tests/TrainingTests/DistributedTrainingTests.swift, which proves under real mpirun that a
/// NaN step is skipped on every rank and that a failing rank ends the whole job; they are not a
/// user feature (not in the config, not in --help). Unset, they cost nothing.
///
///     TENSORAR_TEST_NAN_AT_STEP=3      the step (1-based, as logged) whose gradient becomes NaN;
///                               =3-     every step from 3 on
///     TENSORAR_TEST_NAN_IN=loss        loss (default): the loss and the gradient; grad: the gradient only
///     TENSORAR_TEST_NAN_RANK=1         the rank it happens on (default 1; 0 when alone)
///     TENSORAR_TEST_FAIL_RANK=1        this rank throws at the start of a step ...
///     TENSORAR_TEST_FAIL_AT_STEP=2     ... this one (default 2)
struct TestHooks {
    enum Poison: String { case loss, grad }
    var nanSteps: ClosedRange<Int>?
    var nanIn = Poison.loss
    var nanRank: Int?
    var failRank: Int?
    var failStep = 2

    static func fromEnvironment(_ env: [String: String] = ProcessInfo.processInfo.environment) -> TestHooks {
        var h = TestHooks()
        if let s = env["TENSORAR_TEST_NAN_AT_STEP"] {
            if s.hasSuffix("-"), let from = Int(s.dropLast()) {
                h.nanSteps = from...Int.max
            } else if let n = Int(s) {
                h.nanSteps = n...n
            }
        }
        if let s = env["TENSORAR_TEST_NAN_IN"], let p = Poison(rawValue: s) { h.nanIn = p }
        h.nanRank = env["TENSORAR_TEST_NAN_RANK"].flatMap { Int($0) }
        h.failRank = env["TENSORAR_TEST_FAIL_RANK"].flatMap { Int($0) }
        if let s = env["TENSORAR_TEST_FAIL_AT_STEP"], let n = Int(s) { h.failStep = n }
        return h
    }

    /// What to poison on this rank at this step, if anything.
    func nan(rank: Int, worldSize: Int, step: Int) -> Poison? {
        guard let r = nanSteps, r.contains(step), rank == (nanRank ?? min(1, worldSize - 1)) else { return nil }
        return nanIn
    }

    func failIfAsked(rank: Int, step: Int) throws {
        if let f = failRank, f == rank, step == failStep {
            throw InputError(
                "TENSORAR_TEST_FAIL_RANK", "rank \(rank) fails at step \(step) on purpose (test-only fault injection)")
        }
    }
}
