import ARModel
import ArgumentParser
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
    @Option(name: .customLong("set"), help: "Override one setting, e.g. --set train.steps=100 (repeatable).")
    var overrides: [String] = []
    @Flag(help: "Resume from the run's newest complete checkpoint (an error when there is none).") var resume = false
    @Option(help: "Resume from this checkpoint folder (a step folder, or a run folder meaning its latest).")
    var resumeFrom: String?
    @Flag(help: "Start from scratch even if the run folder holds checkpoints.") var fresh = false
    @Flag(help: "When the newest checkpoint is damaged, resume from the one before it.") var fallback = false
    @Option(
        help: """
            Initialise from weights (.safetensors): a base model under a fresh plug-in, or a full model. Its recorded \
            shape (tensorar.config) is the base's unless CONFIG or --set gives one; then they must agree.
            """) var initFrom: String?

    func validate() throws {
        if [resume, resumeFrom != nil, fresh].filter({ $0 }).count > 1 {
            throw ValidationError("--resume, --resume-from and --fresh exclude each other")
        }
    }

    func run() throws {
        BLAS.ensureBestKernel()
        let comm: Communicator
        do { comm = try MPI.initialize() } catch {
            FileHandle.standardError.write("error: \(error)\n".data(using: .utf8)!)
            throw ExitCode(1)
        }
        let say: (String) -> Void = { s in
            if comm.isRoot {
                print(s)
                fflush(stdout)
            }
        }
        do {
            try train(comm: comm, say: say)
            try? MPI.finalize()
        } catch is ReportedStop {
            // A set-up error every rank agreed on: reported once already; every rank exits 1.
            try? MPI.finalize()
            throw ExitCode(1)
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

        let cfg = try agreedSetup(comm: comm)
        // Threads: ranks x threads must not exceed the cores of a node.
        BLAS.threads = cfg.dist.threadsPerRank.resolve(ranksOnNode: MPI.ranksOnThisNode)
        say("tensorar-train: \(comm.size) rank(s), \(BLAS.threads) BLAS thread(s) per rank; \(BLAS.describe())")
        let store = CheckpointStore(config: cfg)
        let lock = try prepareRunFolder(cfg, store: store, isRoot: comm.isRoot, say: say)
        defer { lock?.release() }
        let trainer = try Trainer(config: cfg, comm: comm)
        if comm.size > 1 {
            trainer.watchdog = CollectiveWatchdog(
                runDirectory: store.runDirectory, rank: comm.rank, size: comm.size,
                timeout: cfg.dist.collectiveTimeoutSeconds)
        }
        defer { trainer.watchdog?.stop() }
        describe(trainer, say: say)
        let loaded = try resumeIfAsked(trainer, store: store, say: say)
        if trainer.step >= cfg.train.steps {
            say(
                "run '\(cfg.checkpoint.run!)' is already complete at step \(trainer.step)/\(cfg.train.steps); "
                    + "start another with --set checkpoint.run=NAME, or --fresh")
            return
        }
        let metrics = try openRunFolder(
            cfg, store: store, resumedAt: loaded?.progress.step, isRoot: comm.isRoot,
            say: say)
        let loop = RunLoop(trainer: trainer, config: cfg, store: store, metrics: metrics, say: say)
        if try loop.run() == .stopped { return }
        try finish(trainer, store: store, say: say)
    }

    /// Thrown once a set-up error has been printed by the one rank that reports it.
    struct ReportedStop: Error {}

    /// The config and the checks of its files, before any collective. Errors there (a bad config, a
    /// missing cache, unreadable init weights) reach every rank alike: one allreduce agrees on them, and
    /// only the lowest failing rank prints (rank 0 when all fail), so `-n 8` prints one line, not eight.
    private func agreedSetup(comm: Communicator) throws -> TrainConfig {
        var cfg: TrainConfig?
        var failure: Error?
        do {
            let c = try resolvedConfig(worldSize: comm.size)
            guard FileManager.default.fileExists(atPath: c.data.train + "/dataset.json") else {
                throw InputError(
                    c.data.train,
                    "no token cache here (dataset.json missing). For the built-in default "
                        + "run `Launch/quickstart.sh`, or build it with "
                        + "`tensorar-data fashion-mnist --out Data/fashion-mnist`")
            }
            cfg = c
        } catch {
            failure = error
        }
        let none = Int64(comm.size)
        let reporter = try comm.allreduce(failure == nil ? none : Int64(comm.rank), op: .min)
        if reporter == none { return cfg! }
        if reporter == Int64(comm.rank), let failure {
            let who = comm.rank == 0 ? "" : "rank \(comm.rank) of \(comm.size) (rank 0 had no error): "
            FileHandle.standardError.write("error: \(who)\(failure)\n".data(using: .utf8)!)
        }
        throw ReportedStop()
    }

    /// Before anything is allocated or written (issue 17): the final weights' path must not be a
    /// folder, `--fresh` must not start over a folder holding another run's checkpoints, and rank 0
    /// takes the run folder's lock (a second trainer on it is refused, naming the holder).
    private func prepareRunFolder(
        _ cfg: TrainConfig, store: CheckpointStore, isRoot: Bool,
        say: (String) -> Void
    ) throws -> RunLock? {
        let weights = store.runDirectory + "/model.safetensors"
        if pathKind(weights) == .folder {
            throw InputError(
                weights,
                "is a folder: the run's final weights cannot be written there "
                    + "(nothing was removed)")
        }
        if cfg.checkpoint.resume == "never" { try store.refuseFreshOverExistingRun() }
        guard isRoot else { return nil }
        let lock = try RunLock(runDirectory: store.runDirectory)
        if let note = lock.note { say("note: \(note)") }
        return lock
    }

    /// Defaults < CONFIG < --set flags, with this command's flags as `--set`s; validated.
    private func resolvedConfig(worldSize: Int) throws -> TrainConfig {
        let shipped = "Configs/default.yaml"
        let file = config ?? (FileManager.default.fileExists(atPath: shipped) ? shipped : nil)
        var extra = overrides
        if let initFrom { extra.append("model.init_from=\(initFrom)") }
        if fresh { extra.append("checkpoint.resume=never") }
        if let resumeFrom { extra.append("checkpoint.resume=\(resumeFrom)") }
        if fallback { extra.append("checkpoint.fallback=true") }
        var cfg = try TrainConfig.load(file: file, overrides: extra)
        if let w = cfg.model.initFrom, let recorded = try recordedModelConfig(w) {
            // The user's own config file and --set flags state a shape; the shipped default's preset does not.
            let yaml = try config.map { try String(contentsOfFile: $0, encoding: .utf8) } ?? ""
            let given = TrainConfig.givenShapeKeys(yaml: yaml, overrides: overrides)
            cfg.model = try cfg.model.adoptingShape(of: recorded, path: w, given: given)
        }
        if cfg.checkpoint.run == nil {
            cfg.checkpoint.run =
                file.map { (($0 as NSString).lastPathComponent as NSString).deletingPathExtension }
                ?? "default"
        }
        try cfg.validate(worldSize: worldSize, source: file ?? "built-in defaults")
        return cfg
    }

    /// The start-up line's note on `train.parallel_micro_batches`, with what it leaves idle.
    private func sideBySide(lanes: Int) -> String {
        guard lanes > 1 else { return "" }
        let threads = BLAS.threads
        let idle =
            threads > lanes
            ? "; \(threads - lanes) of the rank's \(threads) threads \(threads - lanes == 1 ? "stays" : "stay") idle "
                + "(each micro-batch runs on one thread: "
                + "set train.parallel_micro_batches to the threads per rank, or to 1)" : ""
        return ", \(lanes) micro-batches side by side (train.parallel_micro_batches)\(idle)"
    }

    /// The model, its parameters, the batch split, memory and gradient sync.
    private func describe(_ trainer: Trainer, say: (String) -> Void) {
        let cfg = trainer.config
        let size = trainer.comm.size
        let table = trainer.model.table
        let sync = trainer.sync
        say("model: \(trainer.model.config.jsonString())")
        say(
            "parameters: \(table.total) (base \(table.count(of: .base)), plug-in \(table.count(of: .plugin))); "
                + "accumulation \(cfg.accumulationSteps(worldSize: size)) x micro-batch \(cfg.train.microBatch) "
                + "x \(size) rank(s) "
                + "= global batch \(cfg.train.globalBatch)"
                + sideBySide(lanes: cfg.lanes(worldSize: size)))
        say(trainer.memory.description)
        let reduction = sync.shard == nil ? "allreduce" : "reduce-scatter (ZeRO \(cfg.dist.shardOptimizer.rawValue))"
        say(
            "gradient sync: \(sync.mode) \(reduction) in \(sync.buckets.count) bucket(s) of up to "
                + "\(String(format: "%.1f", Double(sync.bucketElements) * 4 / 1e6)) MB"
                + (sync.note.map { " (\($0))" } ?? ""))
        if let gather = trainer.gather {
            say(
                "parameter gather: \(gather.mode) allgather in \(gather.buckets.count) bucket(s)"
                    + (gather.mode == .overlapped ? " during the next step's forward" : " after AdamW")
                    + (gather.note.map { " (\($0))" } ?? ""))
        }
    }

    /// Resume (checkpoint.resume): every rank reads its slice of the checkpoint, whatever rank
    /// count wrote it.
    private func resumeIfAsked(
        _ trainer: Trainer, store: CheckpointStore,
        say: (String) -> Void
    ) throws -> LoadedCheckpoint? {
        let cfg = trainer.config
        let comm = trainer.comm
        let mc = trainer.model.config
        var notes: [String] = []
        let loaded: LoadedCheckpoint?
        let (params, table) = (trainer.model.params, trainer.model.table)
        switch cfg.checkpoint.resume {
        case "never": loaded = nil
        case "auto":
            loaded = try store.loadLatest(
                allowFallback: cfg.checkpoint.fallback, model: mc, table: table,
                params: params, optimizer: trainer.optimizer, ema: trainer.ema,
                communicator: comm, notes: &notes)
            if resume && loaded == nil {
                throw InputError(store.runDirectory, "--resume: no complete checkpoint in this run folder")
            }
        default:
            loaded = try CheckpointStore.load(
                path: cfg.checkpoint.resume, allowFallback: cfg.checkpoint.fallback,
                model: mc, table: table, params: params,
                optimizer: trainer.optimizer, ema: trainer.ema, communicator: comm,
                notes: &notes)
        }
        notes.forEach { say("note: \($0)") }
        if let loaded {
            loaded.notes.forEach { say("note: \($0)") }
            try trainer.checkDataPosition(loaded)
            try cfg.checkResumable(loaded.manifest, path: loaded.directory + "/manifest.json")
            trainer.restore(progress: loaded.progress)
            say(
                "resumed from \(loaded.directory) at step \(trainer.step) "
                    + "(written by \(loaded.manifest.worldSize) rank(s))")
        }
        return loaded
    }

    /// Run folder (root only): the resolved config, and the metrics log (a resumed run logs the
    /// steps after its checkpoint again: the old records of those go).
    private func openRunFolder(
        _ cfg: TrainConfig, store: CheckpointStore, resumedAt: Int?, isRoot: Bool,
        say: (String) -> Void
    ) throws -> MetricsLog? {
        var metrics: MetricsLog?
        if isRoot {
            try FileManager.default.createDirectory(atPath: store.runDirectory, withIntermediateDirectories: true)
            try cfg.yamlString().write(toFile: store.runDirectory + "/config.yaml", atomically: true, encoding: .utf8)
            if let resumedAt {
                try MetricsLog.dropRecords(after: resumedAt, path: store.runDirectory + "/metrics.jsonl")
            }
            metrics = try MetricsLog(path: store.runDirectory + "/metrics.jsonl")
            if cfg.train.tensorboard {
                metrics?.tensorboard = try TensorBoardWriter(directory: store.runDirectory + "/tensorboard")
                let folder = store.runDirectory + "/tensorboard"
                say("TensorBoard: \(metrics!.tensorboard!.path) (tensorboard --logdir \(folder))")
            }
            say("resolved config (saved to \(store.runDirectory)/config.yaml):\n" + cfg.yamlString())
        }
        if isRoot, let entropy = try? unigramEntropy(directory: cfg.data.train) {
            say(String(format: "train cache unigram entropy: %.4f nats (a model must beat this)", entropy))
        }
        return metrics
    }

    /// Time per step, memory, and the final weights.
    private func finish(_ trainer: Trainer, store: CheckpointStore, say: (String) -> Void) throws {
        try trainer.finishParameterGather()  // the last step's parameters (counted as gather time)
        let t = trainer.timing.steps > 0 ? trainer.timing : trainer.firstStep
        let n = Double(max(t.steps, 1))
        let alone = try trainer.measureAllreduce()
        var gather = ""
        if let g = trainer.gather {
            // overlapped: what the next forward (and the end) waited; the gather itself beside it
            let perGather = g.total.commSeconds / Double(max(g.total.gathers, 1))
            gather = String(format: ", parameter allgather %.3f s", t.gather / n)
            if g.mode == .overlapped { gather += String(format: " waited (%.3f s each, overlapped)", perGather) }
        }
        say(
            String(
                format: "time per step: compute %.3f s, allreduce wait %.3f s (%.1f%%), data wait %.4f s, "
                    + "optimizer %.3f s%@ (rank 0, mean of %d step(s) after the first); "
                    + "allreduce alone %.3f s for %.0f MB",
                t.compute / n, t.allreduceWait / n, 100 * t.allreduceWait / max(t.total, 1e-12), t.dataWait / n,
                t.optimizer / n, gather as NSString, trainer.timing.steps, alone,
                Double(trainer.model.grads.count * 4) / 1e6))
        let peak = Double(ProcessMemory.peakResidentBytes() ?? 0) / 1e6
        say(
            String(
                format: "memory: peak resident %.0f MB (rank 0); activations measured %.0f MB",
                peak, Double(trainer.activationBytesMeasured ?? 0) / 1e6))
        if trainer.comm.isRoot {
            let out = store.runDirectory + "/model.safetensors"
            try trainer.model.save(out)
            say("weights: \(out)")
        }
    }
}
