import ARModel
import Foundation
import Platform
import TokenData
import Training

/// The run loop's policy around `Trainer.trainStep` (issue 11): a step whose loss or gradient is
/// not finite is skipped and counted (too many in a row stop the job on every rank), a progress
/// line and a metrics record every `train.log_every` steps (and the first and last), validation
/// every `train.val_every` (and at the end), a checkpoint every `checkpoint.every` (and at the end),
/// and a stop request (SIGTERM, SIGINT) honoured at the next step boundary, after a checkpoint.
final class RunLoop {
    let trainer: Trainer
    let cfg: TrainConfig
    let store: CheckpointStore
    let metrics: MetricsLog?
    let say: (String) -> Void
    let tokensPerStep: Double
    /// Seconds of the last 20 steps: the progress line's rates are their mean.
    private var window: [Double] = []
    /// Non-finite steps in a row.
    private var skipped = 0

    enum Outcome { case finished, stopped }

    init(
        trainer: Trainer, config: TrainConfig, store: CheckpointStore, metrics: MetricsLog?,
        say: @escaping (String) -> Void
    ) {
        self.trainer = trainer
        self.cfg = config
        self.store = store
        self.metrics = metrics
        self.say = say
        tokensPerStep = Double(config.train.globalBatch * trainer.model.config.seqLen)
    }

    /// Steps until `train.steps`, or until a stop request (then `.stopped`, checkpoint saved).
    func run() throws -> Outcome {
        while trainer.step < cfg.train.steps {
            let lr = cfg.learningRates(at: trainer.step)
            let r = try trainer.trainStep()
            window.append(r.seconds)
            if window.count > 20 { window.removeFirst() }
            let s = trainer.step
            try countSkips(r, step: s)
            if s % cfg.train.logEvery == 0 || s == cfg.train.steps || s == 1 { try log(r, lr: lr, step: s) }
            let valDue = (cfg.train.valEvery > 0 && s % cfg.train.valEvery == 0) || s == cfg.train.steps
            if valDue { try validate(step: s) }
            let stop = try trainer.stopAgreed()
            if stop || s == cfg.train.steps || (cfg.checkpoint.every > 0 && s % cfg.checkpoint.every == 0) {
                let why = s == cfg.train.steps ? "end of run" : "every \(cfg.checkpoint.every) steps"
                try save(stop ? "stop requested" : why)
            }
            if stop {
                say("stopped cleanly at step \(s); resume with the same command (or --resume)")
                return .stopped
            }
        }
        return .finished
    }

    /// A skipped (not applied) step counts; more than `train.max_skipped_steps` in a row stop the
    /// run. Loss and gradient norm are reduced over all ranks, so every rank stops at this step.
    private func countSkips(_ r: Trainer.StepResult, step s: Int) throws {
        guard !r.applied else {
            skipped = 0
            return
        }
        skipped += 1
        say(
            "step \(s): loss \(r.report.loss), gradient norm \(r.gradNorm): not finite, "
                + "step skipped (\(skipped) in a row)")
        if skipped > cfg.train.maxSkippedSteps {
            throw CollectiveStop(
                "step \(s): \(skipped) steps in a row had a non-finite loss or gradient "
                    + "(train.max_skipped_steps is \(cfg.train.maxSkippedSteps)): stopping. "
                    + "Lower the learning rate or check the data; the last good checkpoint is kept.")
        }
    }

    /// The progress line and the step's metrics record.
    private func log(_ r: Trainer.StepResult, lr: PerGroup<Float>, step s: Int) throws {
        let secs = window.reduce(0, +) / Double(window.count)
        let slots = r.report.slotLosses.map { String(format: "%.3f", $0) }.joined(separator: " ")
        let rest = String(format: " | lr %.2e/%.2e | gnorm %.3f", lr.plugin, lr.base, r.gradNorm)
        say(
            ProgressLine.format(
                step: s, total: cfg.train.steps, loss: r.report.loss,
                tokensPerSecond: tokensPerStep / secs, secondsPerStep: secs,
                extra: "slots " + slots + rest))
        var record: [(key: String, value: MetricValue)] = [
            ("step", .int(s)), ("loss", .double(r.report.loss)), ("slot_losses", .doubles(r.report.slotLosses)),
            ("lr_plugin", .double(Double(lr.plugin))), ("lr_base", .double(Double(lr.base))),
            ("grad_norm", .double(r.gradNorm)), ("tokens_per_s", .double(tokensPerStep / secs)),
            ("seconds_per_step", .double(secs)), ("samples_seen", .int(trainer.progress.samplesSeen)),
        ]
        // a loss made of parts (Open-MAGVIT2: CE(pre) + CE(post), SPEC section 8) logs each
        if !r.report.partSums.isEmpty { record.append(("loss_parts", .doubles(r.report.partLosses))) }
        try metrics?.log(record)
    }

    /// Validation losses (training noise under a fixed seed, and clean inputs: SPEC section 4).
    private func validate(step s: Int) throws {
        guard let v = try trainer.validate() else { return }
        let slots = v.noised.slotLosses.map { String(format: "%.3f", $0) }.joined(separator: " ")
        say(
            String(
                format: "validation at step %d: loss %.4f (training noise, fixed seed), clean-input loss %.4f; "
                    + "slots %@", s, v.noised.loss, v.clean.loss, slots))
        var record: [(key: String, value: MetricValue)] = [
            ("step", .int(s)), ("val_loss", .double(v.noised.loss)),
            ("val_slot_losses", .doubles(v.noised.slotLosses)), ("val_loss_clean", .double(v.clean.loss)),
            ("val_slot_losses_clean", .doubles(v.clean.slotLosses)),
        ]
        if !v.noised.partSums.isEmpty {
            record.append(("val_loss_parts", .doubles(v.noised.partLosses)))
            record.append(("val_loss_parts_clean", .doubles(v.clean.partLosses)))
        }
        try metrics?.log(record)
        try logSamples(step: s)
        guard let e = try trainer.validateEMA() else { return }
        say(
            String(
                format: "validation at step %d, EMA weights: loss %.4f, clean-input loss %.4f", s, e.noised.loss,
                e.clean.loss))
        try metrics?.log([
            "step": .int(s), "val_loss_ema": .double(e.noised.loss),
            "val_slot_losses_ema": .doubles(e.noised.slotLosses),
            "val_loss_clean_ema": .double(e.clean.loss),
        ])
    }

    /// Rank 0, with TensorBoard and a codebook in the train cache: a strip of greedy samples of the
    /// first classes (up to 8), decoded to pixels, as the image "samples".
    private func logSamples(step s: Int) throws {
        guard let tb = metrics?.tensorboard, let path = trainer.trainCache.codebookPath else { return }
        try trainer.finishParameterGather()  // the sampler reads the parameters (validate() waited already)
        let codebook = try Codebook.load(path: path)
        let labels = (0..<min(8, trainer.model.config.numClasses)).map { Int32($0) }
        let strip = try greedySampleStrip(model: trainer.model, codebook: codebook, labels: labels)
        try tb.image(
            step: s, tag: "samples", png: strip.png, width: strip.width, height: strip.height,
            channels: strip.channels)
    }

    /// Every rank writes its slice of the checkpoint (SPEC section 7), once the parameters and
    /// the EMA have landed (ZeRO's overlapped gather).
    func save(_ why: String) throws {
        try trainer.finishParameterGather()
        let t0 = monotonicSeconds()
        let m = trainer.model
        let dir = try trainer.watched(step: trainer.step, "the checkpoint save") {
            try store.save(
                progress: trainer.progress, config: cfg, model: m.config, table: m.table,
                params: m.params, optimizer: trainer.optimizer, ema: trainer.ema, communicator: trainer.comm)
        }
        say(String(format: "checkpoint (%@): %@ in %.2f s", why, dir, monotonicSeconds() - t0))
    }
}
