import ArgumentParser
import ARModel
import Dispatch
import Foundation
import Platform
import TokenData
import Training

/// `mpirun -n 8 .build/release/tensorar-train [CONFIG] [--set key.path=value ...]`
@main
struct Train: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tensorar-train",
        abstract: "Train a TensorAR model, data-parallel over MPI ranks.",
        discussion: """
        With no arguments: the default config (Configs/default.yaml) on the built-in Fashion-MNIST cache
        (Launch/quickstart.sh prepares it). Precedence: built-in defaults < CONFIG < --set flags.
        A run continues from its newest complete checkpoint when there is one (checkpoint.resume: auto).
        """)

    @Argument(help: "YAML config (default: Configs/default.yaml when it exists).") var config: String?
    @Option(name: .customLong("set"), help: "Override one setting, e.g. --set train.steps=100 (repeatable).") var overrides: [String] = []
    @Flag(help: "Resume from the run's newest complete checkpoint (an error when there is none).") var resume = false
    @Option(help: "Resume from this checkpoint folder (a step folder, or a run folder meaning its latest).") var resumeFrom: String?
    @Flag(help: "Start from scratch even if the run folder holds checkpoints.") var fresh = false
    @Flag(help: "When the newest checkpoint is damaged, resume from the one before it.") var fallback = false
    @Option(help: "Initialise from weights (.safetensors): a base model under a fresh plug-in, or a full model.") var initFrom: String?

    func validate() throws {
        if [resume, resumeFrom != nil, fresh].filter({ $0 }).count > 1 { throw ValidationError("--resume, --resume-from and --fresh exclude each other") }
    }

    func run() throws {
        BLAS.ensureBestKernel()
        let comm: Communicator
        do { comm = try MPI.initialize() } catch { FileHandle.standardError.write("error: \(error)\n".data(using: .utf8)!); throw ExitCode(1) }
        let say: (String) -> Void = { s in if comm.isRoot { print(s); fflush(stdout) } }
        do {
            try train(comm: comm, say: say)
            try? MPI.finalize()
        } catch let e as CollectiveStop {
            // Every rank decided this at the same step: no rank is left waiting, so end normally
            // (one message, every rank exits 1) instead of aborting.
            if comm.isRoot { FileHandle.standardError.write("error: \(e)\n".data(using: .utf8)!) }
            try? MPI.finalize()
            throw ExitCode(1)
        } catch {
            let msg = "error: rank \(comm.rank) of \(comm.size): \(error)\n"
            FileHandle.standardError.write(msg.data(using: .utf8)!)
            // One failing rank ends the whole job: no rank waits forever in a collective.
            if comm.size > 1 { MPI.abort(1) }
            throw ExitCode(1)
        }
    }

    func train(comm: Communicator, say: @escaping (String) -> Void) throws {
        // Stop cleanly on SIGTERM / SIGINT: finish the step, save, exit (from the start: a
        // signal during start-up stops the run after its first step).
        let signals = [SIGTERM, SIGINT].map { sig -> DispatchSourceSignal in
            signal(sig, SIG_IGN)
            let s = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            s.setEventHandler { Trainer.stopRequested.set() }
            s.resume()
            return s
        }
        defer { signals.forEach { $0.cancel() } }

        let file = config ?? (FileManager.default.fileExists(atPath: "Configs/default.yaml") ? "Configs/default.yaml" : nil)
        var extra = overrides
        if let initFrom { extra.append("model.init_from=\(initFrom)") }
        if fresh { extra.append("checkpoint.resume=never") }
        if let resumeFrom { extra.append("checkpoint.resume=\(resumeFrom)") }
        if fallback { extra.append("checkpoint.fallback=true") }
        var cfg = try TrainConfig.load(file: file, overrides: extra)
        if cfg.checkpoint.run == nil { cfg.checkpoint.run = file.map { (($0 as NSString).lastPathComponent as NSString).deletingPathExtension } ?? "default" }
        try cfg.validate(worldSize: comm.size, source: file ?? "built-in defaults")

        // Threads: ranks x threads must not exceed the cores of a node.
        let local = MPI.ranksOnThisNode
        BLAS.threads = cfg.dist.threadsPerRank.resolve(ranksOnNode: local)
        say("tensorar-train: \(comm.size) rank(s), \(BLAS.threads) BLAS thread(s) per rank; \(BLAS.describe())")
        guard FileManager.default.fileExists(atPath: cfg.data.train + "/dataset.json") else {
            throw InputError(cfg.data.train, "no token cache here (dataset.json missing). For the built-in default run `Launch/quickstart.sh`, or build it with `tensorar-data fashion-mnist --out Data/fashion-mnist`")
        }
        let trainer = try Trainer(config: cfg, comm: comm)
        let mc = trainer.model.config
        say("model: \(mc.jsonString())")
        say("parameters: \(trainer.model.table.total) (base \(trainer.model.table.count(of: .base)), plug-in \(trainer.model.table.count(of: .plugin))); "
            + "accumulation \(cfg.accumulationSteps(worldSize: comm.size)) x micro-batch \(cfg.train.microBatch) x \(comm.size) rank(s) = global batch \(cfg.train.globalBatch)")
        say(trainer.memory.description)
        say("gradient sync: \(trainer.sync.mode) allreduce in \(trainer.sync.buckets.count) bucket(s) of up to \(String(format: "%.1f", Double(trainer.sync.bucketElements) * 4 / 1e6)) MB"
            + (trainer.sync.note.map { " (\($0))" } ?? ""))

        // Resume: every rank reads its slice of the checkpoint, whatever rank count wrote it.
        let store = CheckpointStore(config: cfg)
        var notes: [String] = []
        let loaded: LoadedCheckpoint?
        let (params, table) = (trainer.model.params, trainer.model.table)
        switch cfg.checkpoint.resume {
        case "never": loaded = nil
        case "auto":
            loaded = try store.loadLatest(allowFallback: cfg.checkpoint.fallback, model: mc, table: table, params: params,
                                          optimizer: trainer.optimizer, communicator: comm, notes: &notes)
            if resume && loaded == nil { throw InputError(store.runDirectory, "--resume: no complete checkpoint in this run folder") }
        default:
            loaded = try CheckpointStore.load(path: cfg.checkpoint.resume, allowFallback: cfg.checkpoint.fallback, model: mc, table: table,
                                              params: params, optimizer: trainer.optimizer, communicator: comm, notes: &notes)
        }
        notes.forEach { say("note: \($0)") }
        if let loaded {
            loaded.notes.forEach { say("note: \($0)") }
            trainer.restore(progress: loaded.progress)
            say("resumed from \(loaded.directory) at step \(trainer.step) (written by \(loaded.manifest.worldSize) rank(s))")
        }
        if trainer.step >= cfg.train.steps {
            say("run '\(cfg.checkpoint.run!)' is already complete at step \(trainer.step)/\(cfg.train.steps); start another with --set checkpoint.run=NAME, or --fresh")
            return
        }

        // Run folder: resolved config, metrics
        var metrics: MetricsLog?
        if comm.isRoot {
            try FileManager.default.createDirectory(atPath: store.runDirectory, withIntermediateDirectories: true)
            try cfg.yamlString().write(toFile: store.runDirectory + "/config.yaml", atomically: true, encoding: .utf8)
            // A resumed run logs the steps after its checkpoint again: drop the old records of those.
            if let loaded { try MetricsLog.dropRecords(after: loaded.progress.step, path: store.runDirectory + "/metrics.jsonl") }
            metrics = try MetricsLog(path: store.runDirectory + "/metrics.jsonl")
            say("resolved config (saved to \(store.runDirectory)/config.yaml):\n" + cfg.yamlString())
        }
        if comm.isRoot, let entropy = try? unigramEntropy(directory: cfg.data.train) {
            say(String(format: "train cache unigram entropy: %.4f nats (a model must beat this)", entropy))
        }

        let save = { (why: String) throws in
            let t0 = monotonicSeconds()
            let dir = try store.save(progress: trainer.progress, config: cfg, model: mc, table: trainer.model.table,
                                     params: trainer.model.params, optimizer: trainer.optimizer, communicator: comm)
            say(String(format: "checkpoint (%@): %@ in %.2f s", why, dir, monotonicSeconds() - t0))
        }

        let tokensPerStep = Double(cfg.train.globalBatch * mc.seqLen)
        var window: [Double] = []
        var skipped = 0
        while trainer.step < cfg.train.steps {
            let lr = cfg.learningRates(at: trainer.step)
            let r = try trainer.trainStep()
            window.append(r.seconds); if window.count > 20 { window.removeFirst() }
            let s = trainer.step
            if !r.applied {
                skipped += 1
                say("step \(s): loss \(r.report.loss), gradient norm \(r.gradNorm): not finite, step skipped (\(skipped) in a row)")
                if skipped > cfg.train.maxSkippedSteps {
                    // Loss and gradient norm are reduced over all ranks, so every rank stops here.
                    throw CollectiveStop("step \(s): \(skipped) steps in a row had a non-finite loss or gradient (train.max_skipped_steps is \(cfg.train.maxSkippedSteps)): stopping. "
                        + "Lower the learning rate or check the data; the last good checkpoint is kept.")
                }
            } else { skipped = 0 }
            let secs = window.reduce(0, +) / Double(window.count)
            if s % cfg.train.logEvery == 0 || s == cfg.train.steps || s == 1 {
                say(ProgressLine.format(step: s, total: cfg.train.steps, loss: r.report.loss, tokensPerSecond: tokensPerStep / secs, secondsPerStep: secs,
                                        extra: "slots " + r.report.slotLosses.map { String(format: "%.3f", $0) }.joined(separator: " ") + String(format: " | lr %.2e/%.2e | gnorm %.3f", lr.plugin, lr.base, r.gradNorm)))
                try metrics?.log(["step": .int(s), "loss": .double(r.report.loss), "slot_losses": .doubles(r.report.slotLosses),
                                  "lr_plugin": .double(Double(lr.plugin)), "lr_base": .double(Double(lr.base)), "grad_norm": .double(r.gradNorm),
                                  "tokens_per_s": .double(tokensPerStep / secs), "seconds_per_step": .double(secs), "samples_seen": .int(trainer.progress.samplesSeen)])
            }
            let valDue = (cfg.train.valEvery > 0 && s % cfg.train.valEvery == 0) || s == cfg.train.steps
            if valDue, let v = try trainer.validate() {
                say(String(format: "validation at step %d: loss %.4f (training noise, fixed seed), clean-input loss %.4f; slots %@", s, v.noised.loss, v.clean.loss,
                           v.noised.slotLosses.map { String(format: "%.3f", $0) }.joined(separator: " ")))
                try metrics?.log(["step": .int(s), "val_loss": .double(v.noised.loss), "val_slot_losses": .doubles(v.noised.slotLosses),
                                  "val_loss_clean": .double(v.clean.loss), "val_slot_losses_clean": .doubles(v.clean.slotLosses)])
            }
            let stop = try trainer.stopAgreed()
            if stop || s == cfg.train.steps || (cfg.checkpoint.every > 0 && s % cfg.checkpoint.every == 0) {
                try save(stop ? "stop requested" : (s == cfg.train.steps ? "end of run" : "every \(cfg.checkpoint.every) steps"))
            }
            if stop { say("stopped cleanly at step \(s); resume with the same command (or --resume)"); return }
        }
        let t = trainer.timing.steps > 0 ? trainer.timing : trainer.firstStep
        let n = Double(max(t.steps, 1))
        let alone = try trainer.measureAllreduce()
        say(String(format: "time per step: compute %.3f s, allreduce wait %.3f s (%.1f%%), data wait %.4f s, optimizer %.3f s (rank 0, mean of %d step(s) after the first); "
                   + "allreduce alone %.3f s for %.0f MB", t.compute / n, t.allreduceWait / n, 100 * t.allreduceWait / max(t.total, 1e-12), t.dataWait / n,
                   t.optimizer / n, trainer.timing.steps, alone, Double(trainer.model.grads.count * 4) / 1e6))
        say(String(format: "memory: peak resident %.0f MB (rank 0); activations measured %.0f MB",
                   Double(ProcessMemory.peakResidentBytes() ?? 0) / 1e6, Double(trainer.activationBytesMeasured ?? 0) / 1e6))
        if comm.isRoot {
            let out = store.runDirectory + "/model.safetensors"
            try trainer.model.save(out)
            say("weights: \(out)")
        }
    }
}
