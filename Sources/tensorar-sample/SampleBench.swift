import ARModel
import Foundation
import Platform
import Training

/// `tensorar-sample --bench`: sampling speed, measured in one run beside the machine's sgemm peak
/// (same thread count), for each model with the plug-in (k) and as the base (k = 1), same batch.
/// Weights are random (speed does not depend on their values); the FLOPs are those the sampler
/// does (`ModelConfig.samplingFLOPs`).
extension Sample {
    func benchConfigs(_ name: String) throws -> (plugin: ModelConfig, base: ModelConfig) {
        var plugin: ModelConfig
        if name == "default" {
            plugin = try ModelConfig.preset("small", vocabSize: 512, numClasses: 10, gridSize: 7)
            plugin.window = 4
            plugin.pluginDepth = 1
        } else {
            plugin = try ModelConfig.preset(name, vocabSize: 16384, numClasses: 1000, gridSize: 16)
            plugin.window = benchWindow
            plugin.pluginDepth = benchWindow > 1 ? benchDepth : 0
        }
        var base = plugin
        base.window = 1
        base.pluginDepth = 0
        return (plugin, base)
    }

    func runBench(comm: Communicator) throws {
        guard comm.isRoot else { return }
        let threads = BLAS.threads
        print(BLAS.describe())
        let peak = BLAS.sgemmPeakGFLOPs(threads: threads, cpuTime: useCPUTime)
        print(
            String(
                format: "sgemm peak: %.1f GFLOP/s on %d thread(s), measured now; times are %@", peak, threads,
                useCPUTime ? "CPU seconds (one thread: not inflated by other processes)" : "wall seconds"))
        let rows = options.guided(parts: 2) ? "null rows double the batch" : "no null rows"
        print(
            String(
                format: "sampling: batch %d images, cfg %@ (%@), temperature %@, top-k %d, top-p %.2f", batchSize,
                cfgScale.description, rows, temperature.description, topK, topP))
        print("model    k d  batch  steps   seconds    wall s   images/s  GFLOP/s  of peak")
        for name in benchModels.split(separator: ",").map({ String($0).trimmingCharacters(in: .whitespaces) }) {
            let (plugin, base) = try benchConfigs(name)
            let steps = name == "default" || benchSteps <= 0 ? plugin.seqLen : min(benchSteps, plugin.seqLen)
            let tb = try timeSampling(base, name: name, steps: steps, peak: peak)
            if plugin.window == 1 { continue }
            let tp = try timeSampling(plugin, name: name, steps: steps, peak: peak)
            let guided = options.guided(parts: 2)
            let flopRatio =
                plugin.samplingFLOPs(batch: batchSize, guided: guided, steps: steps)
                / base.samplingFLOPs(batch: batchSize, guided: guided, steps: steps)
            print(
                String(
                    format:
                        "         k=%d d=%d against k=1: time ratio %.2fx, FLOP ratio %.2fx -> %.2f (target <= 1.10)",
                    plugin.window, plugin.pluginDepth, tp / tb, flopRatio, tp / tb / flopRatio))
        }
    }

    /// One BLAS thread: time by this process's CPU clock, which a busy shared machine does not
    /// inflate; more threads: wall time.
    var useCPUTime: Bool { BLAS.threads == 1 }
    func clock() -> Double { useCPUTime ? processCPUSeconds() : monotonicSeconds() }

    /// Best seconds over `benchReps` timed runs (after one warm-up) of sampling a batch; prints a row.
    func timeSampling(_ c: ModelConfig, name: String, steps: Int, peak: Double) throws -> Double {
        // random weights of the init's scale (uniform, std 0.02; norms 1), cheaper than
        // `initialise` for a 100M-parameter model; every matrix non-zero so logits differ
        let model = try Transformer(config: c)
        var rng = CounterRNG(seed: 2)
        for e in model.table.entries {
            let isNorm = e.name.hasSuffix("norm.weight")
            for i in 0..<e.count { model.params[e.offset + i] = isNorm ? 1 : 0.0693 * (rng.uniform() - 0.5) }
        }
        let sampler = Sampler(model: model)
        sampler.keepsPackedWeights = true  // the weights never change here
        let labels = (0..<batchSize).map { Int32($0 % c.numClasses) }
        let ids = Array(0..<batchSize)
        var best = Double.infinity
        var bestWall = Double.infinity
        for rep in 0...benchReps {
            let warm = rep == 0
            let t0 = clock()
            let w0 = monotonicSeconds()
            _ = sampler.sample(labels: labels, sampleIds: ids, options: options, steps: warm ? min(steps, 4) : steps)
            let dt = clock() - t0
            let wall = monotonicSeconds() - w0
            if !warm && dt < best {
                best = dt
                bestWall = wall
            }
        }
        let flops = c.samplingFLOPs(batch: batchSize, guided: options.guided(parts: 2), steps: steps)
        let gf = flops / best / 1e9
        let imagesPerS = Double(batchSize) / best * Double(steps) / Double(c.seqLen)
        print(
            String(
                format: "%-7@ %2d %d %6d %3d/%-3d %9.2f %9.2f %10.2f %8.1f %7.1f%%", name as NSString, c.window,
                c.pluginDepth, batchSize, steps, c.seqLen,
                best, bestWall, imagesPerS, gf, 100 * gf / peak))
        fflush(stdout)
        return best
    }
}
