import ArgumentParser
import ARModel
import Foundation
import Kernels
import Platform
import Training

/// Prints speed figures measured in one run, so ratios are meaningful on a noisy shared machine:
/// the machine's sgemm peak, then model steps against it (model FLOPs utilisation).
@main
struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "tensorar-bench", abstract: "Measure sgemm peak and model speed (tokens/s, GFLOP/s, ratio to peak).")

    @Option(help: "BLAS threads for the model runs (default: 1, the per-rank setting under mpirun).") var threads = 1
    @Option(help: "Comma-separated presets to time.") var presets = "small,B"
    @Option(help: "Comma-separated batch sizes (images of 256 tokens for B; grid 16).") var batches = "4,8"
    @Option(help: "Timed steps per configuration (after one warm-up).") var steps = 2
    @Option(help: "Plug-in window k for the TensorAR comparison (0 skips it).") var window = 4
    @Option(help: "Plug-in depth d.") var depth = 2
    @Option(help: """
        Comma-separated base models to time, \(BaseRegistry.names.joined(separator: ", ")): with two, each preset \
        of both in one interleaved run, and the step-time and FLOP ratios of the second to the first.
        """) var bases = "llamagen"
    @Flag(help: "Only print parameter counts.") var params = false
    @Option(help: "Only print one rank's memory for training this preset (nothing is allocated).") var memory: String?
    @Option(help: "With --memory: MPI ranks.") var ranks = 1
    @Option(help: "With --memory: samples per micro-batch.") var microBatch = 8
    @Option(help: "With --memory: samples per rank per step (default: one micro-batch).") var localBatch: Int?
    @Option(help: "With --memory: none | states | states+grads (dist.shard_optimizer).") var shard = "none"

    func run() throws {
        BLAS.ensureBestKernel()
        print(BLAS.describe())
        if params { printParams(); return }
        if let memory { try printMemory(preset: memory); return }
        let peak1 = sgemmPeak(threads: 1)
        let peakAll = sgemmPeak(threads: ProcessInfo.processInfo.activeProcessorCount)
        print(String(format: "sgemm peak: %.1f GFLOP/s on 1 thread, %.1f GFLOP/s on %d threads", peak1, peakAll, ProcessInfo.processInfo.activeProcessorCount))
        BLAS.threads = threads
        let peak = threads == 1 ? peak1 : peakAll
        print("model runs on \(threads) thread(s); MFU is against \(String(format: "%.1f", peak)) GFLOP/s")
        print("preset  k d  batch tokens   fwd+bwd s   tokens/s   GFLOP/s   MFU    time ratio / FLOP ratio vs base")
        let baseNames = bases.split(separator: ",").map { String($0).trimmingCharacters(in: .whitespaces) }
        for name in presets.split(separator: ",").map(String.init) {
            for b in batches.split(separator: ",").compactMap({ Int($0) }) {
                // every base's model and plug-in timed interleaved, so their ratios are fair
                let pairs = try baseNames.map { try timerPair(base: $0, preset: name, batch: b) }
                timeInterleaved(pairs.flatMap { $0 })
                for (i, timers) in pairs.enumerated() {
                    let label = baseNames[i] == "llamagen" ? name : "\(shortName(baseNames[i]))-\(name)"
                    timers.forEach { $0.report(peak: peak, label: label) }
                    if timers.count == 2 {
                        let ratio = timers[1].best / timers[0].best
                        let flopRatio = timers[1].cfg.trainingFLOPs(batch: b) / timers[0].cfg.trainingFLOPs(batch: b)
                        let line = "        plug-in k=%d d=%d: time ratio %.2fx, FLOP ratio %.2fx -> %.2f "
                            + "(target <= 1.10)"
                        print(String(format: line, window, depth, ratio, flopRatio, ratio / flopRatio))
                    }
                }
                for i in pairs.indices.dropFirst() {
                    let a = pairs[0][0]
                    let o = pairs[i][0]
                    let flops = o.cfg.trainingFLOPs(batch: b) / a.cfg.trainingFLOPs(batch: b)
                    let line = "        \(baseNames[i]) \(name) against \(baseNames[0]) \(name): "
                        + "step time %.2fx, FLOP ratio %.2fx"
                    print(String(format: line, o.best / a.best, flops))
                }
            }
        }
    }

    /// A base's preset (the Fashion-MNIST shape for small), then the same with the plug-in.
    func timerPair(base: String, preset name: String, batch b: Int) throws -> [StepTimer] {
        let small = name == "small"
        let V = base == "open-magvit2" ? (small ? 4096 : 262_144) : (small ? 512 : 16384)
        let baseCfg = try ModelConfig.preset(name, base: base, vocabSize: V, numClasses: small ? 10 : 1000,
                                             gridSize: small ? 7 : 16)
        var timers = [try StepTimer(baseCfg, batch: b, noise: false)]
        if window > 0 {
            var cfg = baseCfg
            cfg.window = window
            cfg.pluginDepth = depth
            timers.append(try StepTimer(cfg, batch: b, noise: true))
        }
        return timers
    }

    func shortName(_ base: String) -> String { base == "open-magvit2" ? "omg" : base }

    /// `--memory`: the trainer's own per-rank estimate (`Trainer.MemoryBreakdown.estimate`) for a
    /// preset of the first of --bases in its ImageNet shape (16x16 grid, C 1000; LlamaGen V 16384,
    /// Open-MAGVIT2 V 2^18), with the plug-in of --window/--depth.
    func printMemory(preset: String) throws {
        guard let zero = ShardOptimizer(rawValue: shard) else {
            throw ValidationError("--shard must be one of none, states, states+grads, got '\(shard)'")
        }
        guard ranks >= 1, microBatch >= 1, window >= 0, depth >= 0 else {
            throw ValidationError("--ranks and --micro-batch must be at least 1, --window and --depth at least 0")
        }
        let base = bases.split(separator: ",").first.map(String.init) ?? "llamagen"
        var c = try ModelConfig.preset(preset, base: base)
        if window > 0 {
            c.window = window
            c.pluginDepth = depth
        }
        var tc = TrainConfig()
        tc.train.microBatch = microBatch
        tc.train.globalBatch = (localBatch ?? microBatch) * ranks
        tc.dist.shardOptimizer = zero
        let m = Trainer.MemoryBreakdown.estimate(c, config: tc, ranks: ranks)
        let plugin = window > 0 ? "k=\(window) d=\(depth)" : "no plug-in"
        print("\(base) \(preset) (\(ParameterTable(c).total) parameters, \(plugin)), \(ranks) rank(s), micro-batch \(microBatch) x "
              + "\(c.seqLen) tokens, shard \(zero.rawValue):")
        for (name, bytes) in [("parameters", m.parameters), ("gradients", m.gradients), ("AdamW moments", m.moments),
                              ("activations", m.activations), ("buffers", m.buffers)] {
            print("  " + name.padding(toLength: 14, withPad: " ", startingAt: 0) + String(format: "%8.2f GB", Double(bytes) / 1e9))
        }
        print(String(format: "total: %.2f GB per rank", Double(m.total) / 1e9))
    }

    func printParams() {
        for name in ["B", "L", "XL", "XXL"] {
            var c = try! ModelConfig.preset(name)
            let base = ParameterTable(c).total
            c.window = 4; c.pluginDepth = 2
            print("\(name): base \(base) parameters; with plug-in k=4 d=2: \(ParameterTable(c).total)")
        }
        for name in ["B", "L", "XL"] {  // SPEC section 8
            var c = try! ModelConfig.preset(name, base: "open-magvit2")
            let base = ParameterTable(c).total
            c.window = 4
            c.pluginDepth = 2
            print("open-magvit2 \(name): base \(base) parameters; with plug-in k=4 d=2: \(ParameterTable(c).total)")
        }
    }

    func sgemmPeak(threads: Int) -> Double {
        BLAS.threads = threads
        var best = 0.0
        for (m, n, k) in [(1024, 1024, 1024), (2048, 768, 768), (1024, 2048, 768)] {
            let a = FlatBuffer(count: m * k), b = FlatBuffer(count: k * n), c = FlatBuffer(count: m * n)
            for i in 0..<a.count { a[i] = Float(i % 7) * 0.1 }
            for i in 0..<b.count { b[i] = Float(i % 5) * 0.1 }
            BLAS.sgemm(transA: false, transB: false, m: m, n: n, k: k, a.base, lda: k, b.base, ldb: n, beta: 0, c.base, ldc: n)
            let reps = 5
            let t0 = DispatchTime.now().uptimeNanoseconds
            for _ in 0..<reps { BLAS.sgemm(transA: false, transB: false, m: m, n: n, k: k, a.base, lda: k, b.base, ldb: n, beta: 0, c.base, ldc: n) }
            let s = Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9
            best = max(best, 2 * Double(m * n * k) * Double(reps) / s / 1e9)
        }
        return best
    }

    /// One model's training-step timer: the noise (when asked) plus forward and backward.
    final class StepTimer {
        let cfg: ModelConfig, model: Transformer, batch: Int, noise: Bool
        let tokens: [Int32], labels: [Int32]
        let noiser: TensorNoiser
        var best = Double.infinity, noiseTime = 0.0
        init(_ cfg: ModelConfig, batch: Int, noise: Bool) throws {
            self.cfg = cfg; self.batch = batch; self.noise = noise
            model = try Transformer(config: cfg)
            model.initialise(seed: 1)
            var rng = CounterRNG(seed: 7)
            tokens = (0..<(batch * cfg.seqLen)).map { _ in Int32(rng.below(cfg.vocabSize)) }
            labels = (0..<batch).map { _ in Int32(rng.below(cfg.numClasses)) }
            noiser = TensorNoiser(type: .replace, schedule: .sine, window: cfg.window, vocabSize: cfg.vocabSize)
        }
        func step(_ s: Int, timed: Bool) {
            let T = cfg.seqLen
            let t0 = DispatchTime.now().uptimeNanoseconds
            var tensors = Windows.inputTensors(tokens: tokens, batch: batch, seqLen: T, window: cfg.window)
            if noise { _ = noiser.apply(&tensors, batch: batch, seqLen: T, seed: 1, step: s, samplePositions: Array(0..<batch)) }
            let tn = Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9
            model.grads.zero()
            model.forward(ModelBatch(batch: batch, tokens: tokens, labels: labels, tensors: tensors),
                          dropout: DropoutSettings(p: 0.1, seed: 1, step: s, samplePositions: Array(0..<batch)), gradientScale: 1 / Float(batch * T))
            model.backward()
            let dt = Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9
            if timed && dt < best { best = dt; noiseTime = tn }
        }
        func report(peak: Double, label: String) {
            let gf = cfg.trainingFLOPs(batch: batch) / best / 1e9
            print(String(format: "%-6@ %2d %d %5d %6d  %9.3f  %9.0f  %8.1f  %5.1f%%", label as NSString, cfg.window, cfg.pluginDepth, batch, batch * cfg.seqLen, best, Double(batch * cfg.seqLen) / best, gf, 100 * gf / peak)
                  + (noise ? String(format: "   (noise: %.2f%% of the step)", 100 * noiseTime / best) : ""))
        }
    }

    /// Times the models' steps interleaved (best of `steps` after a warm-up each), so that load
    /// from other processes on a shared machine affects them alike and their ratio stays fair.
    func timeInterleaved(_ timers: [StepTimer]) {
        for s in 0...steps { for t in timers { t.step(s, timed: s > 0) } }
    }
}
