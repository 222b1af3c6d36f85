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
    public let optimizer: AdamW
    public let loader: TokenLoader
    public let trainCache: TokenCache
    public let valCache: TokenCache?
    let sync: GradientSync
    let noise: LossNoise
    let weightPerImage: Double
    public private(set) var step = 0
    var metrics: MetricsLog?
    let say: (String) -> Void
    /// Set by a signal handler: finish the step, save, exit cleanly.
    public static let stopRequested = ManagedAtomicFlag()

    public struct Timing { public var compute = 0.0, allreduceWait = 0.0, dataWait = 0.0, optimizer = 0.0, steps = 0 }
    public private(set) var timing = Timing()

    public init(config: TrainConfig, comm: Communicator, say: @escaping (String) -> Void) throws {
        self.config = config; self.comm = comm; self.say = say
        trainCache = try TokenCache(directory: config.data.train)
        valCache = try config.data.val.map { try TokenCache(directory: $0) }
        let info = trainCache.info
        if info.gridH != info.gridW { throw InputError(config.data.train, "grid \(info.gridH)x\(info.gridW) is not square; the 2D rotary table needs H == W (SPEC section 1)") }
        let mc = try config.model.resolve(vocabSize: info.vocabSize, numClasses: info.numClasses, gridSize: info.gridH)
        if let v = valCache { try checkDataMatchesModel(v.info, mc, cachePath: v.directory) }
        model = try Trainer.buildModel(mc, config: config)
        if let w = config.loss.slotWeights { model.slotWeights = w.map { Float($0) } }
        weightPerImage = model.slotWeights.enumerated().reduce(0.0) { $0 + Double(max(0, mc.seqLen - $1.offset)) * Double($1.element) }
        optimizer = AdamW(table: model.table, settings: config.adamWSettings, trainable: config.trainableGroups)
        loader = try TokenLoader(cache: trainCache, globalBatch: config.train.globalBatch, rank: comm.rank, worldSize: comm.size,
                                 seed: UInt64(config.train.seed), shuffle: true, augment: config.data.augment, prefetch: 2)
        sync = try GradientSync(communicator: comm, count: model.table.total, bucketMB: config.dist.bucketMB, mode: config.dist.overlap ? .overlapped : .blocking)
        var codebook: [Float]?, cbDim = 0
        if config.noise.type == .discrete && config.noise.embedding == .codebook {
            guard let path = trainCache.codebookPath else { throw InputError(config.data.train, "noise.embedding: codebook needs a codebook.h5 in the cache") }
            let cb = try Codebook.load(path: path)
            codebook = cb.vectors; cbDim = cb.Dc
        }
        noise = LossNoise(noiser: TensorNoiser(type: config.noise.type, schedule: config.noise.schedule, window: mc.window, vocabSize: mc.vocabSize),
                          seed: UInt64(config.train.seed), codebook: codebook, codebookDim: cbDim)
    }

    /// Fresh weights from the seed (the same on every rank), or `model.init_from`: a full model,
    /// or a base model (e.g. converted LlamaGen) under a fresh plug-in (the paper's plug-and-play).
    static func buildModel(_ mc: ModelConfig, config: TrainConfig) throws -> Transformer {
        let model = try Transformer(config: mc)
        model.initialise(seed: UInt64(config.train.seed))
        guard let path = config.model.initFrom else { return model }
        let st = try Safetensors.read(path)
        if let json = st.metadata["tensorar.config"], let fileConfig = try? JSONDecoder().decode(ModelConfig.self, from: Data(json.utf8)) {
            var a = fileConfig, b = mc
            a.window = 1; a.pluginDepth = 0; b.window = 1; b.pluginDepth = 0; a.residual = true; b.residual = true
            if a != b { throw InputError(path, "its base model \(fileConfig.jsonString()) does not match the configured one \(mc.jsonString())") }
            if fileConfig.hasPlugin && (fileConfig.window != mc.window || fileConfig.pluginDepth != mc.pluginDepth || fileConfig.residual != mc.residual) {
                throw InputError(path, "its plug-in (window \(fileConfig.window), depth \(fileConfig.pluginDepth), residual \(fileConfig.residual)) does not match the config's (\(mc.window), \(mc.pluginDepth), \(mc.residual))")
            }
        }
        let hasPlugin = st.tensors.keys.contains { $0.hasPrefix("tensorar.") }
        try model.loadWeights(st, allowMissingPlugin: !hasPlugin)
        return model
    }

    // MARK: one step

    public struct StepResult { public var report: LossReport; public var gradNorm: Double; public var applied: Bool; public var seconds: Double }

    /// One optimizer step over one global batch: micro-batches with gradient accumulation, the
    /// last one's backward overlapped with the allreduce, then AdamW.
    public func trainStep() throws -> StepResult {
        let t0 = monotonicSeconds()
        let batch = try loader.next()
        let tData = monotonicSeconds()
        timing.dataWait += tData - t0
        let c = model.config, T = c.seqLen
        let micro = config.train.microBatch
        let accum = batch.count / micro
        let scale = Float(1 / (Double(config.train.globalBatch) * weightPerImage))
        var local = LossReport(slots: c.window)
        model.grads.zero()
        var commWait = 0.0
        for a in 0..<accum {
            let r = (a * micro)..<((a + 1) * micro)
            let positions = Array(batch.globalPositions[r])
            let labels = Windows.dropLabels(Array(batch.labels[r]), nullClass: c.numClasses, p: config.train.labelDrop, seed: UInt64(config.train.seed), step: batch.step, samplePositions: positions)
            let codes = Array(batch.codes[(r.lowerBound * T)..<(r.upperBound * T)])
            let mb = makeModelBatch(model: model, codes: codes, labels: labels, noise: noise, step: batch.step, samplePositions: positions, purpose: .noise)
            let dropout = DropoutSettings(p: Float(config.train.dropout), seed: UInt64(config.train.seed), step: batch.step, samplePositions: positions)
            local.add(model.forward(mb, dropout: dropout, gradientScale: scale))
            if a == accum - 1 {
                sync.begin(model.grads, scale: 1)
                model.backward { [sync] range in sync.markReady(range) }
                let t = try sync.finish()
                commWait = t.waitSeconds
            } else {
                model.backward()
            }
        }
        var packed = local.packed
        try comm.allreduce(&packed)
        let report = LossReport(packed: packed)
        let tOpt = monotonicSeconds()
        var applied = false, norm = Double.nan
        if report.loss.isFinite {
            let res = optimizer.step(params: model.params, grads: model.grads, lr: config.learningRates(at: step), clip: config.clipNorm)
            applied = res.applied; norm = res.gradNorm
        }
        let t1 = monotonicSeconds()
        timing.allreduceWait += commWait
        timing.optimizer += t1 - tOpt
        timing.compute += (tOpt - tData) - commWait
        timing.steps += 1
        step += 1
        return StepResult(report: report, gradNorm: norm, applied: applied, seconds: t1 - t0)
    }

    /// Validation loss over the validation cache (or its first `val_samples`), split across ranks,
    /// with the training noise under a fixed seed (SPEC section 4) and, beside it, clean inputs.
    public func validate() throws -> (noised: LossReport, clean: LossReport)? {
        guard let v = valCache else { return nil }
        let range = validationShard(cache: v, limit: config.data.valSamples, rank: comm.rank, worldSize: comm.size)
        var noised = try evaluateLoss(model: model, cache: v, range: range, batchSize: config.train.microBatch, noise: noise).packed
        var clean = try evaluateLoss(model: model, cache: v, range: range, batchSize: config.train.microBatch, noise: nil).packed
        try comm.allreduce(&noised)
        try comm.allreduce(&clean)
        return (LossReport(packed: noised), LossReport(packed: clean))
    }
}

/// A flag set from a signal handler and read by the loop.
public final class ManagedAtomicFlag: @unchecked Sendable {
    private var value: Int32 = 0
    private let lock = NSLock()
    public init() {}
    public func set() { lock.lock(); value = 1; lock.unlock() }
    public var isSet: Bool { lock.lock(); defer { lock.unlock() }; return value != 0 }
}

extension Trainer {
    /// Where training stands, for the checkpoint manifest: step, samples seen and the loader's
    /// position in the global sample stream (SPEC section 7).
    public var progress: TrainingProgress {
        let pos = loader.position
        return TrainingProgress(step: step, samplesSeen: pos, dataEpoch: pos / max(trainCache.count, 1), dataOffset: pos, seed: config.train.seed)
    }

    /// Continues from a checkpoint: the step, and the data stream exactly where it was.
    public func restore(progress p: TrainingProgress) {
        step = p.step
        loader.restore(position: p.dataOffset)
    }

    /// Whether any rank was asked to stop (all ranks agree, so they stop at the same step).
    public func stopAgreed() throws -> Bool {
        var flag: [Int64] = [Trainer.stopRequested.isSet ? 1 : 0]
        try comm.allreduce(&flag, op: .max)
        return flag[0] != 0
    }
}
