import ARModel
import ArgumentParser
import Foundation
import Kernels
import Platform
import Training

/// Prints speed figures measured in one run, so ratios are meaningful on a noisy shared machine:
/// the machine's sgemm peak (before and after the model runs), training steps and sampling at 1
/// and N threads, interleaved, against that peak (model FLOPs utilisation), and the thread scaling.
@main
struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tensorar-bench",
        abstract: "Measure sgemm peak and model speed (tokens/s, GFLOP/s, MFU, thread scaling).")

    @Option(help: "Threads N for the model runs, each timed beside 1 thread (default: the cores).")
    var threads = ProcessInfo.processInfo.activeProcessorCount
    @Option(help: "Comma-separated presets to time a training step of (empty: none).") var presets = "small,B"
    @Option(help: "Comma-separated batch sizes (images of 256 tokens for B; grid 16).") var batches = "4,8"
    @Option(help: "Timed repetitions per configuration and thread count (after one warm-up); the best is kept.")
    var steps = 2
    @Option(help: "Plug-in window k for the TensorAR comparison (0 skips it).") var window = 4
    @Option(help: "Plug-in depth d.") var depth = 2
    @Option(help: "Comma-separated presets to time sampling of, with the plug-in (empty: none).") var samplePresets = ""
    @Option(help: "Sampling: images per batch.") var sampleBatch = 64
    @Option(help: "Sampling: positions sampled per timed run (the FLOP count covers exactly those).")
    var sampleSteps = 16
    @Option(help: "Sampling: classifier-free guidance scale (above 1: null rows double the batch).")
    var cfgScale: Float = 4
    @Option(help: "Seconds each sgemm peak trial runs (best of 3 trials per shape).") var peakSeconds = 0.3
    @Option(
        help: """
            Comma-separated base models to time, \(BaseRegistry.names.joined(separator: ", ")): with two, each preset \
            of both in one interleaved run, and the step-time and FLOP ratios of the second to the first.
            """) var bases = "llamagen"
    @Flag(help: "Only print parameter counts.") var params = false
    @Option(help: "Only print one rank's memory for training this preset (nothing is allocated).") var memory: String?
    @Option(
        help: ArgumentHelp(
            "Only time ZeRO-2's gradient page release for this preset (with --window/--depth), 4 KB against "
                + "huge pages, beside a resident buffer (--steps + 1 rounds).")) var pageRelease: String?
    @Option(help: "With --memory: MPI ranks.") var ranks = 1
    @Option(help: "With --memory: samples per micro-batch.") var microBatch = 8
    @Option(help: "With --memory: samples per rank per step (default: one micro-batch).") var localBatch: Int?
    @Option(help: "With --memory: none | states | states+grads (dist.shard_optimizer).") var shard = "none"
    @Option(
        help: """
            none | blocks (train.recompute); timing also takes both: every training configuration with and \
            without recompute, interleaved, and the step-time and activation ratios.
            """) var recompute = "none"

    /// The recompute settings each training configuration is timed under (`--recompute`).
    var recomputeSettings: [ActivationRecompute] {
        recompute == "both" ? [.none, .blocks] : ActivationRecompute(rawValue: recompute).map { [$0] } ?? []
    }

    @Flag(
        help: """
            Also time each base model's training step with sgemm's tiles chosen from the shape alone (as \
            under Haswell/Zen kernels), interleaved, where the kernel lets them follow the thread count.
            """) var compareTiling = false

    @Flag(
        help: """
            Serve training steps of the first preset and batch (the base model, no plug-in) over standard \
            input and output: each line read is a thread count, each line written that step's seconds. \
            `Launch/bench_torch.py --ours` times them in pairs with the PyTorch peer's steps.
            """) var serve = false

    func validate() throws {
        if recomputeSettings.isEmpty {
            throw ValidationError("--recompute must be one of none, blocks, both, got '\(recompute)'")
        }
        if threads < 1 { throw ValidationError("--threads must be at least 1") }
        if steps < 1 { throw ValidationError("--steps must be at least 1") }
    }

    func run() throws {
        BLAS.ensureBestKernel()
        print(BLAS.describe())
        if params {
            printParams()
            return
        }
        if let memory {
            try printMemory(preset: memory)
            return
        }
        if let pageRelease {
            try timePageRelease(preset: pageRelease)
            return
        }
        if serve {
            try serveSteps()
            return
        }
        let counts = threads == 1 ? [1] : [1, threads]
        let before = counts.map { SgemmPeak.measure(threads: $0, seconds: peakSeconds) }
        var rows: [Row] = []
        for name in list(presets) {
            for b in list(batches).compactMap({ Int($0) }) { rows += try timeTraining(name, batch: b, counts: counts) }
        }
        for name in list(samplePresets) { rows += try timeSampling(name, counts: counts) }
        let after = counts.map { SgemmPeak.measure(threads: $0, seconds: peakSeconds) }
        let peaks = report(counts: counts, before: before, after: after)
        printRows(rows, counts: counts, peaks: peaks)
    }

    func list(_ s: String) -> [String] {
        s.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
    }

    func printParams() {
        for name in ["B", "L", "XL", "XXL"] {
            var c = try! ModelConfig.preset(name)
            let base = ParameterTable(c).total
            c.window = 4
            c.pluginDepth = 2
            print("\(name): base \(base) parameters; with plug-in k=4 d=2: \(ParameterTable(c).total)")
        }
        for name in ["B", "L", "XL"] {  // SPEC section 8
            var c = try! ModelConfig.preset(name, base: "open-magvit2")
            let base = ParameterTable(c).total
            c.window = 4
            c.pluginDepth = 2
            print("open-magvit2 \(name): base \(base) parameters; with plug-in k=4 d=2: \(ParameterTable(c).total)")
        }
        for name in ["B", "L", "XL", "XXL"] {  // SPEC section 9
            var c = try! ModelConfig.preset(name, base: "rar")
            let base = ParameterTable(c).total
            c.window = 4
            c.pluginDepth = 2
            print("rar \(name): base \(base) parameters; with plug-in k=4 d=2: \(ParameterTable(c).total)")
        }
    }

    /// `--memory`: the trainer's own per-rank estimate (`Trainer.MemoryBreakdown.estimate`) for a
    /// preset of the first of --bases in its ImageNet shape (16x16 grid, C 1000; LlamaGen V 16384,
    /// Open-MAGVIT2 V 2^18), with the plug-in of --window/--depth.
    func printMemory(preset: String) throws {
        guard let zero = ShardOptimizer(rawValue: shard) else {
            throw ValidationError("--shard must be one of none, states, states+grads, got '\(shard)'")
        }
        guard let recomputed = ActivationRecompute(rawValue: recompute) else {
            throw ValidationError("--recompute with --memory must be one of none, blocks, got '\(recompute)'")
        }
        guard ranks >= 1, microBatch >= 1, window >= 0, depth >= 0 else {
            throw ValidationError("--ranks and --micro-batch must be at least 1, --window and --depth at least 0")
        }
        let base = list(bases).first ?? "llamagen"
        var c = try ModelConfig.preset(preset, base: base)
        if window > 0 {
            c.window = window
            c.pluginDepth = depth
        }
        var tc = TrainConfig()
        tc.train.microBatch = microBatch
        tc.train.globalBatch = (localBatch ?? microBatch) * ranks
        tc.dist.shardOptimizer = zero
        tc.train.recompute = recomputed
        let m = Trainer.MemoryBreakdown.estimate(c, config: tc, ranks: ranks)
        let plugin = window > 0 ? "k=\(window) d=\(depth)" : "no plug-in"
        print(
            "\(base) \(preset) (\(ParameterTable(c).total) parameters, \(plugin)), \(ranks) rank(s), "
                + "micro-batch \(microBatch) x \(c.seqLen) tokens, shard \(zero.rawValue), "
                + "recompute \(recomputed.rawValue):")
        for (name, bytes) in [
            ("parameters", m.parameters), ("gradients", m.gradients), ("AdamW moments", m.moments),
            ("activations", m.activations), ("buffers", m.buffers),
        ] {
            let padded = name.padding(toLength: 14, withPad: " ", startingAt: 0)
            print("  " + padded + String(format: "%8.2f GB", Double(bytes) / 1e9))
        }
        print(String(format: "total: %.2f GB per rank", Double(m.total) / 1e9))
    }

    /// Prints both peak measurements; returns the peak per thread count (the higher of the two).
    func report(counts: [Int], before: [SgemmPeak], after: [SgemmPeak]) -> [Double] {
        var peaks: [Double] = []
        for (i, n) in counts.enumerated() {
            let best = max(before[i].best, after[i].best)
            peaks.append(best)
            print(
                String(
                    format: "sgemm peak, %d thread(s): before %@, after %@ -> %.1f GFLOP/s", n,
                    before[i].text as NSString, after[i].text as NSString, best))
        }
        return peaks
    }

    /// A base's preset in the shape its users train (the Fashion-MNIST shape for small).
    func config(_ name: String, base: String = "llamagen") throws -> ModelConfig {
        let small = name == "small"
        let V: Int
        switch base {
        case "open-magvit2": V = small ? 4096 : 262_144
        case "rar": V = small ? 512 : 1024  // SPEC section 9: MaskGIT VQGAN codes
        default: V = small ? 512 : 16384
        }
        return try ModelConfig.preset(
            name, base: base, vocabSize: V, numClasses: small ? 10 : 1000,
            gridSize: small ? 7 : 16)
    }

    func label(_ name: String, base: String) -> String {
        "train " + (base == "llamagen" ? name : (base == "open-magvit2" ? "omg-" : base + "-") + name)
    }

    /// Training steps of each base and its plug-in model, at each thread count, all interleaved
    /// (so ratios between bases are fair too).
    /// With `--recompute both`, the recompute rows come after all the others, labelled " +rc".
    func timeTraining(_ name: String, batch b: Int, counts: [Int]) throws -> [Row] {
        var timers: [(String, StepTimer)] = []
        for r in recomputeSettings {
            let suffix = r == .blocks && recomputeSettings.count > 1 ? Bench.recomputeSuffix : ""
            for base in list(bases) {
                let baseCfg = try config(name, base: base)
                let tag = label(name, base: base) + suffix
                timers.append((tag, try StepTimer(baseCfg, batch: b, noise: false, recompute: r)))
                if window > 0 {
                    var cfg = baseCfg
                    cfg.window = window
                    cfg.pluginDepth = depth
                    timers.append((tag, try StepTimer(cfg, batch: b, noise: true, recompute: r)))
                }
                if compareTiling && BLAS.tilesMatchOneCall {
                    let shapeTiled = try StepTimer(baseCfg, batch: b, noise: false, recompute: r)
                    shapeTiled.shapeTilesOnly = true
                    timers.append((tag + Bench.shapeTilesSuffix, shapeTiled))
                }
            }
        }
        let jobs = timers.map { t in { s in t.1.step(s) } }
        let best = interleave(jobs, counts: counts)
        let use = threadUse(jobs, counts: counts)
        return timers.enumerated().map { i, t in
            Row(
                label: t.0, config: t.1.cfg, batch: b, tokens: b * t.1.cfg.seqLen,
                flops: t.1.cfg.trainingFLOPs(batch: b), seconds: best[i], threadUse: use[i])
        }
    }

    /// Sampling `sampleSteps` positions of a batch with the plug-in, at each thread count.
    func timeSampling(_ name: String, counts: [Int]) throws -> [Row] {
        var cfg = try config(name)
        cfg.window = max(window, 1)
        cfg.pluginDepth = window > 1 ? depth : 0
        let model = try Transformer(config: cfg)
        var rng = CounterRNG(seed: 2)
        for e in model.table.entries {
            let isNorm = e.name.hasSuffix("norm.weight")
            for i in 0..<e.count { model.params[e.offset + i] = isNorm ? 1 : 0.0693 * (rng.uniform() - 0.5) }
        }
        let sampler = Sampler(model: model)
        sampler.keepsPackedWeights = true  // the weights never change here
        let labels = (0..<sampleBatch).map { Int32($0 % cfg.numClasses) }
        let options = SamplingOptions(cfgScale: cfgScale, temperature: 1, topK: 0, topP: 1, seed: 1)
        let positions = min(sampleSteps, cfg.seqLen)
        // with and without the packed weights (PackedWeightCache), interleaved
        let packings = PackedWeights.available ? [true, false] : [false]
        let runs = packings.map { packed in
            { (_: Int) in
                PackedWeightCache.enabled = packed
                defer { PackedWeightCache.enabled = true }
                _ = sampler.sample(
                    labels: labels, sampleIds: Array(0..<labels.count), options: options, steps: positions)
            }
        }
        let best = interleave(runs, counts: counts)
        let use = threadUse(runs, counts: counts)
        let flops = cfg.samplingFLOPs(batch: sampleBatch, guided: cfgScale != 1, steps: positions)
        return packings.indices.map { j in
            Row(
                label: "sample \(name)" + (packings[j] ? "" : " (sgemm)"), config: cfg, batch: sampleBatch,
                tokens: sampleBatch * positions, flops: flops, seconds: best[j], threadUse: use[j])
        }
    }

    /// `--serve`: one timed step per thread count read from standard input, its seconds written back.
    /// A step at a new thread count is timed as it comes (the caller warms up). "ready" says the model
    /// is built; a line that is not a positive count ends the loop.
    func serveSteps() throws {
        guard let name = list(presets).first, let b = list(batches).compactMap({ Int($0) }).first else {
            throw ValidationError("--serve needs a preset in --presets and a batch in --batches")
        }
        let timer = try StepTimer(try config(name), batch: b, noise: false)
        print("ready")
        fflush(stdout)
        var s = 0
        while let line = readLine(), let n = Int(line.trimmingCharacters(in: .whitespaces)), n >= 1 {
            BLAS.threads = n
            let t0 = DispatchTime.now().uptimeNanoseconds
            timer.step(s)
            s += 1
            print(String(format: "%.6f", Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9))
            fflush(stdout)
        }
    }

    /// Each job's `ThreadUse` on the highest of `counts` (nil when that is one thread).
    func threadUse(_ jobs: [(Int) -> Void], counts: [Int]) -> [ThreadUse?] {
        guard let n = counts.last, n > 1 else { return jobs.map { _ in nil } }
        return jobs.map { ThreadUse.measure($0, threads: n) }
    }

    /// Runs every job at every thread count in turn, `steps` times after a warm-up, so that load
    /// from other processes affects them alike; returns the best seconds [job][count].
    func interleave(_ jobs: [(Int) -> Void], counts: [Int]) -> [[Double]] {
        var best = jobs.map { _ in counts.map { _ in Double.infinity } }
        for s in 0...steps {
            for (c, n) in counts.enumerated() {
                BLAS.threads = n
                for (j, job) in jobs.enumerated() {
                    let t0 = DispatchTime.now().uptimeNanoseconds
                    job(s)
                    let dt = Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9
                    if s > 0 { best[j][c] = min(best[j][c], dt) }
                }
            }
        }
        return best
    }

    /// One timed configuration: seconds at each thread count.
    struct Row {
        let label: String
        let config: ModelConfig
        let batch, tokens: Int
        let flops: Double
        let seconds: [Double]
        let threadUse: ThreadUse?
    }

    func printRows(_ rows: [Row], counts: [Int], peaks: [Double]) {
        print("what            k d  batch thr    seconds   tokens/s   GFLOP/s    MFU  scaling (t1 / tN)")
        for r in rows {
            for (c, n) in counts.enumerated() {
                let gf = r.flops / r.seconds[c] / 1e9
                let scaling = c == 0 ? "" : String(format: "  %.2fx", r.seconds[0] / r.seconds[c])
                print(
                    String(
                        format: "%-14@ %2d %d %6d %3d %10.3f %10.0f %9.1f %5.1f%%", r.label as NSString,
                        r.config.window, r.config.pluginDepth, r.batch, n, r.seconds[c],
                        Double(r.tokens) / r.seconds[c], gf, 100 * gf / peaks[c]) + scaling)
            }
        }
        printThreadUse(rows)
        printPluginRatios(rows, counts: counts)
        printBaseRatios(rows, counts: counts)
        printRecomputeRatios(rows, counts: counts)
        printTilingRatios(rows, counts: counts)
    }

    /// Each row's accounted run on N threads (`ThreadUse`): the serial share and what it allows.
    func printThreadUse(_ rows: [Row]) {
        for r in rows {
            guard let b = r.threadUse else { continue }
            let format =
                "%@ k=%d d=%d batch %d, %d threads, fastest of 2 accounted runs %.3f s: serial %.1f%% of the work, "
                + "%d jobs %.1f%% busy (idle %.0f us of thread time a job) -> %.2f threads busy on average "
                + "(Amdahl at this serial share: %.2fx)"
            print(
                String(
                    format: format, r.label as NSString, r.config.window, r.config.pluginDepth, r.batch, b.threads,
                    b.seconds, 100 * b.serialShare, b.jobCount, 100 * b.jobEfficiency, 1e6 * b.idlePerJob,
                    b.busyThreads, b.amdahlLimit))
        }
    }

    static let shapeTilesSuffix = " shp"

    /// `--compare-tiling`: each base's step with sgemm's tiles from the shape alone over its step
    /// with tiles by the thread count, at each thread count.
    func printTilingRatios(_ rows: [Row], counts: [Int]) {
        for shape in rows where shape.label.hasSuffix(Bench.shapeTilesSuffix) {
            let label = String(shape.label.dropLast(Bench.shapeTilesSuffix.count))
            let base = rows.first { $0.label == label && $0.batch == shape.batch && !$0.config.hasPlugin }
            guard let byThreads = base else { continue }
            for (c, n) in counts.enumerated() {
                print(
                    String(
                        format: "%@ batch %d, %d thread(s): sgemm tiles by the shape / by the thread count: %.3fx",
                        label as NSString, shape.batch, n, shape.seconds[c] / byThreads.seconds[c]))
            }
        }
    }

    static let recomputeSuffix = " +rc"

    /// With `--recompute both`: each configuration's step time and activation bytes (the layout
    /// a step allocates, dropout on) under recompute blocks against none.
    func printRecomputeRatios(_ rows: [Row], counts: [Int]) {
        for r in rows where r.label.hasSuffix(Bench.recomputeSuffix) {
            let plain = String(r.label.dropLast(Bench.recomputeSuffix.count))
            guard let ref = rows.first(where: { $0.label == plain && $0.batch == r.batch && $0.config == r.config })
            else { continue }
            let none = r.config.trainingActivationBytes(batch: r.batch, dropout: true)
            let blocks = r.config.trainingActivationBytes(batch: r.batch, dropout: true, recompute: .blocks)
            for (c, n) in counts.enumerated() {
                let format =
                    "%@ k=%d d=%d batch %d, %d thread(s): recompute blocks step time %.3fx, "
                    + "activations %.2f / %.2f GB = %.3f"
                print(
                    String(
                        format: format, plain as NSString, r.config.window, r.config.pluginDepth, r.batch, n,
                        r.seconds[c] / ref.seconds[c], Double(blocks) / 1e9, Double(none) / 1e9,
                        Double(blocks) / Double(none)))
            }
        }
    }

    /// With several bases: each base model's step time and FLOPs against the first base's, same
    /// preset and batch.
    func printBaseRatios(_ rows: [Row], counts: [Int]) {
        let baseRows = rows.filter { $0.label.hasPrefix("train") && !$0.config.hasPlugin }
        for r in baseRows where r.config.base != baseRows.first?.config.base {
            guard let ref = baseRows.first(where: { $0.batch == r.batch && $0.config.base != r.config.base }) else {
                continue
            }
            for (c, n) in counts.enumerated() {
                print(
                    String(
                        format: "%@ against %@, batch %d, %d thread(s): step time %.2fx, FLOP ratio %.2fx",
                        r.label as NSString, ref.label as NSString, r.batch, n, r.seconds[c] / ref.seconds[c],
                        r.flops / ref.flops))
            }
        }
    }

    /// For each training pair (base, plug-in): the plug-in's time ratio against its FLOP ratio.
    func printPluginRatios(_ rows: [Row], counts: [Int]) {
        for (base, plugin) in zip(rows, rows.dropFirst())
        where base.label == plugin.label
            && base.label.hasPrefix("train") && base.batch == plugin.batch && plugin.config.hasPlugin
        {
            for (c, n) in counts.enumerated() {
                let ratio = plugin.seconds[c] / base.seconds[c]
                let flopRatio = plugin.flops / base.flops
                let format = "%@ batch %d, %d thread(s): plug-in k=%d d=%d time ratio %.2fx, FLOP ratio %.2fx -> %.2f"
                print(
                    String(
                        format: format,
                        base.label as NSString, base.batch, n, plugin.config.window, plugin.config.pluginDepth,
                        ratio, flopRatio, ratio / flopRatio))
            }
        }
    }

    /// One model's training-step timer: the noise (when asked) plus forward and backward.
    final class StepTimer {
        let cfg: ModelConfig, model: Transformer, batch: Int, noise: Bool
        let tokens: [Int32], labels: [Int32]
        let noiser: TensorNoiser
        /// `BLAS.shapeTilesOnly` during this timer's steps (`--compare-tiling`).
        var shapeTilesOnly = false
        init(_ cfg: ModelConfig, batch: Int, noise: Bool, recompute: ActivationRecompute = .none) throws {
            self.cfg = cfg
            self.batch = batch
            self.noise = noise
            model = try Transformer(config: cfg)
            model.recompute = recompute
            model.initialise(seed: 1)
            var rng = CounterRNG(seed: 7)
            tokens = (0..<(batch * cfg.seqLen)).map { _ in Int32(rng.below(cfg.vocabSize)) }
            labels = (0..<batch).map { _ in Int32(rng.below(cfg.numClasses)) }
            noiser = TensorNoiser(type: .replace, schedule: .sine, window: cfg.window, vocabSize: cfg.vocabSize)
        }
        func step(_ s: Int) {
            BLAS.shapeTilesOnly = shapeTilesOnly
            defer { BLAS.shapeTilesOnly = false }
            let T = cfg.seqLen
            var tensors = Windows.inputTensors(tokens: tokens, batch: batch, seqLen: T, window: cfg.window)
            if noise {
                _ = noiser.apply(&tensors, batch: batch, seqLen: T, seed: 1, step: s, samplePositions: Array(0..<batch))
            }
            model.grads.zero()
            let dropout = DropoutSettings(p: 0.1, seed: 1, step: s, samplePositions: Array(0..<batch))
            model.forward(
                ModelBatch(batch: batch, tokens: tokens, labels: labels, tensors: tensors),
                dropout: dropout, gradientScale: 1 / Float(batch * T))
            model.backward()
        }
    }
}

/// Where one run on N threads spent its time (`ComputePool.accounting`), independent of how fast
/// the host ran it: serial time S (the caller alone, outside the pool's jobs), the jobs' wall time
/// P and the sum of their parts' times W. A thread count's speed-up cannot exceed Amdahl's
/// 1 / (s + (1 - s) / N) with the serial share s = S / (S + W), and (S + W) / (S + P) is how many
/// threads were busy on average: the speed-up this run would have shown if its parts had run as
/// fast on one thread.
struct ThreadUse {
    let threads: Int
    let seconds, serial, jobs, parts: Double
    /// Jobs the run split over the threads.
    let jobCount: Int
    /// Thread time the jobs left idle, per job: hand-offs and uneven ends.
    var idlePerJob: Double { jobCount > 0 ? max(Double(threads) * jobs - parts, 0) / Double(jobCount) : 0 }
    var serialShare: Double { serial / (serial + parts) }
    var jobEfficiency: Double { jobs > 0 ? parts / (Double(threads) * jobs) : 1 }
    var busyThreads: Double { (serial + parts) / seconds }
    var amdahlLimit: Double { 1 / (serialShare + (1 - serialShare) / Double(threads)) }

    /// The fastest of `runs` accounted runs of `job` on n threads.
    static func measure(_ job: (Int) -> Void, threads n: Int, runs: Int = 2) -> ThreadUse {
        BLAS.threads = n
        let pool = ComputePool.shared
        defer { pool.accounting = false }
        var fastest: ThreadUse?
        for _ in 0..<runs {
            pool.accounting = true
            let jobsBefore = pool.parallelJobs
            let t0 = monotonicSeconds()
            job(1)
            let seconds = monotonicSeconds() - t0
            let counted = pool.busy
            let jobs = Double(counted.jobNanoseconds) / 1e9
            let parts = Double(counted.partNanoseconds) / 1e9
            let run = ThreadUse(
                threads: n, seconds: seconds, serial: max(seconds - jobs, 0), jobs: jobs, parts: parts,
                jobCount: pool.parallelJobs - jobsBefore)
            if fastest.map({ run.seconds < $0.seconds }) ?? true { fastest = run }
        }
        return fastest!
    }
}

/// The machine's sgemm speed on n threads, robustly: square-ish transformer shapes, each run
/// repeatedly for `seconds` per trial, best of 3 trials; both `BLAS.sgemm` (the tiles the model
/// uses, over the pool) and OpenBLAS's own threading; the best of all is the peak.
struct SgemmPeak {
    let tiled, native: Double
    var best: Double { max(tiled, native) }
    var text: String { String(format: "%.1f (tiles) / %.1f (OpenBLAS threads)", tiled, native) }

    static func measure(threads n: Int, seconds: Double) -> SgemmPeak {
        BLAS.threads = n
        var tiled = 0.0
        var native = 0.0
        for (m, nn, k) in [(1024, 1024, 1024), (2048, 768, 768), (1024, 2304, 768)] {
            let a = FlatBuffer(count: m * k)
            let b = FlatBuffer(count: k * nn)
            let c = FlatBuffer(count: m * nn)
            for i in 0..<a.count { a[i] = Float(i % 7) * 0.1 }
            for i in 0..<b.count { b[i] = Float(i % 5) * 0.1 }
            let flops = 2 * Double(m * nn * k)
            tiled = max(
                tiled,
                rate(flops, seconds) {
                    BLAS.sgemm(
                        transA: false, transB: false, m: m, n: nn, k: k, a.base, lda: k, b.base, ldb: nn, beta: 0,
                        c.base, ldc: nn)
                })
            native = max(
                native,
                BLAS.withNativeThreads(n) {
                    rate(flops, seconds) {
                        BLAS.sgemmOneCall(
                            transA: false, transB: false, m: m, n: nn, k: k, a.base, lda: k, b.base, ldb: nn,
                            beta: 0, c.base, ldc: nn)
                    }
                })
        }
        return SgemmPeak(tiled: tiled, native: native)
    }

    /// GFLOP/s of `call` (flops each): one warm-up, then the best of 3 trials of `seconds` each.
    static func rate(_ flops: Double, _ seconds: Double, _ call: () -> Void) -> Double {
        call()
        var best = 0.0
        for _ in 0..<3 {
            let t0 = DispatchTime.now().uptimeNanoseconds
            var calls = 0
            var dt = 0.0
            repeat {
                call()
                calls += 1
                dt = Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9
            } while dt < seconds
            best = max(best, flops * Double(calls) / dt / 1e9)
        }
        return best
    }
}
