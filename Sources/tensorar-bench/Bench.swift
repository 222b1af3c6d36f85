import ArgumentParser
import ARModel
import Foundation
import Kernels
import Platform

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
    @Flag(help: "Only print parameter counts.") var params = false

    func run() throws {
        BLAS.ensureBestKernel()
        print(BLAS.describe())
        if params { printParams(); return }
        let peak1 = sgemmPeak(threads: 1)
        let peakAll = sgemmPeak(threads: ProcessInfo.processInfo.activeProcessorCount)
        print(String(format: "sgemm peak: %.1f GFLOP/s on 1 thread, %.1f GFLOP/s on %d threads", peak1, peakAll, ProcessInfo.processInfo.activeProcessorCount))
        BLAS.threads = threads
        let peak = threads == 1 ? peak1 : peakAll
        print("model runs on \(threads) thread(s); MFU is against \(String(format: "%.1f", peak)) GFLOP/s")
        print("preset  k d  batch tokens   fwd+bwd s   tokens/s   GFLOP/s   MFU    time ratio / FLOP ratio vs base")
        for name in presets.split(separator: ",").map(String.init) {
            for b in batches.split(separator: ",").compactMap({ Int($0) }) {
                var cfg = try ModelConfig.preset(name, vocabSize: name == "small" ? 512 : 16384, numClasses: name == "small" ? 10 : 1000, gridSize: name == "small" ? 7 : 16)
                let baseT = try timeStep(cfg, batch: b, peak: peak, label: name)
                if window > 0 {
                    cfg.window = window; cfg.pluginDepth = depth
                    let pt = try timeStep(cfg, batch: b, peak: peak, label: name, noise: true)
                    var baseCfg = cfg; baseCfg.window = 1; baseCfg.pluginDepth = 0
                    let flopRatio = cfg.trainingFLOPs(batch: b) / baseCfg.trainingFLOPs(batch: b)
                    print(String(format: "        plug-in k=%d d=%d: time ratio %.2fx, FLOP ratio %.2fx -> %.2f (target <= 1.10)", window, depth, pt / baseT, flopRatio, pt / baseT / flopRatio))
                }
            }
        }
    }

    func printParams() {
        for name in ["B", "L", "XL", "XXL"] {
            var c = try! ModelConfig.preset(name)
            let base = ParameterTable(c).total
            c.window = 4; c.pluginDepth = 2
            print("\(name): base \(base) parameters; with plug-in k=4 d=2: \(ParameterTable(c).total)")
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

    /// Seconds per forward+backward step (best of `steps`), printing one table row.
    func timeStep(_ cfg: ModelConfig, batch: Int, peak: Double, label: String, noise: Bool = false) throws -> Double {
        let model = try Transformer(config: cfg)
        model.initialise(seed: 1)
        let T = cfg.seqLen
        var rng = CounterRNG(seed: 7)
        let tokens = (0..<(batch * T)).map { _ in Int32(rng.below(cfg.vocabSize)) }
        let labels = (0..<batch).map { _ in Int32(rng.below(cfg.numClasses)) }
        let noiser = TensorNoiser(type: .replace, schedule: .sine, window: cfg.window, vocabSize: cfg.vocabSize)
        var best = Double.infinity, noiseTime = 0.0
        for s in 0...steps {
            let t0 = DispatchTime.now().uptimeNanoseconds
            var tensors = Windows.inputTensors(tokens: tokens, batch: batch, seqLen: T, window: cfg.window)
            if noise { _ = noiser.apply(&tensors, batch: batch, seqLen: T, seed: 1, step: s, samplePositions: Array(0..<batch)) }
            let tn = Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9
            let mb = ModelBatch(batch: batch, tokens: tokens, labels: labels, tensors: tensors)
            model.grads.zero()
            model.forward(mb, dropout: DropoutSettings(p: 0.1, seed: 1, step: s, samplePositions: Array(0..<batch)), gradientScale: 1 / Float(batch * T))
            model.backward()
            let dt = Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9
            if s > 0 && dt < best { best = dt; noiseTime = tn }
        }
        let flops = cfg.trainingFLOPs(batch: batch)
        let gf = flops / best / 1e9
        print(String(format: "%-6@ %2d %d %5d %6d  %9.3f  %9.0f  %8.1f  %5.1f%%", label as NSString, cfg.window, cfg.pluginDepth, batch, batch * T, best, Double(batch * T) / best, gf, 100 * gf / peak)
              + (noise ? String(format: "   (noise: %.2f%% of the step)", 100 * noiseTime / best) : ""))
        return best
    }
}
