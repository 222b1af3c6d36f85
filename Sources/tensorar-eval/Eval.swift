import ARModel
import ArgumentParser
import Foundation
import Platform
import TokenData
import Training

/// Loss of a model over a token cache in evaluation mode (no dropout, no label drop):
/// clean inputs (`--noise none`, the exact numerical check) or the training noise under a fixed
/// seed (`--noise train`, the validation loss training logs). SPEC sections 3-4.
@main
struct Eval: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tensorar-eval", abstract: "Evaluate a model's loss (total and per window slot) on a token cache.")

    enum NoiseMode: String, ExpressibleByArgument, CaseIterable { case none, train }

    @Option(help: "Weights (.safetensors) or a checkpoint folder (a step folder, or a run folder meaning its latest).")
    var weights: String
    @Option(help: "Token cache folder (SPEC section 7).") var data: String
    @Option(help: "raw: the trained weights; ema: a checkpoint's moving average of them (train.ema_decay).")
    var weightsKind: WeightsKind = .raw
    @Option(
        help: ArgumentHelp(
            "Model shape for a file without tensorar.config metadata: "
                + "\(ModelConfig.presetNames.joined(separator: ", "))."
        )
    ) var preset: String?
    @Option(help: "With --preset: the base model, \(BaseRegistry.names.joined(separator: " or ")).")
    var base = "llamagen"
    @Option(help: "none: clean inputs; train: the training noise under a fixed seed.") var noise: NoiseMode = .none
    @Option(
        help: ArgumentHelp(
            "Noise type for --noise train: \(NoiseType.allCases.map(\.rawValue).joined(separator: ", ")) (default: "
                + "a checkpoint's noise.type, else replace)."
        )
    ) var noiseType: String?
    @Option(
        help: ArgumentHelp(
            "Noise schedule for --noise train: \(NoiseSchedule.allCases.map(\.rawValue).joined(separator: ", ")) "
                + "(default: a checkpoint's noise.schedule, else sine)."
        )
    ) var noiseSchedule: String?
    @Option(help: "Seed of the validation noise (default: a checkpoint's train.seed, else 0).") var noiseSeed: UInt64?
    @Option(help: "Images per forward pass.") var batchSize = 32
    @Option(help: "Evaluate only the first N samples.") var limit: Int?
    @Flag(help: "Print one JSON object (and nothing else on stdout).") var json = false

    func validate() throws {
        if batchSize < 1 { throw ValidationError("--batch-size must be at least 1") }
        if let limit, limit < 1 {
            throw ValidationError("--limit must be at least 1 (leave it out for all samples), got \(limit)")
        }
        if let t = noiseType, NoiseType(rawValue: t) == nil { throw ValidationError("unknown --noise-type '\(t)'") }
        if let s = noiseSchedule, NoiseSchedule(rawValue: s) == nil {
            throw ValidationError("unknown --noise-schedule '\(s)'")
        }
    }

    func run() throws {
        BLAS.ensureBestKernel()
        try exitingOnInputError(exitCode: 2) { try evaluate() }
    }

    func evaluate() throws {
        let log: (String) -> Void = { s in FileHandle.standardError.write((s + "\n").data(using: .utf8)!) }
        log(BLAS.describe())
        let cache = try TokenCache(directory: data)
        let fallback = try preset.map {
            try ModelConfig.preset(
                $0, base: base, vocabSize: cache.info.vocabSize, numClasses: cache.info.numClasses,
                gridSize: cache.info.gridH)
        }
        // A checkpoint folder also gives the run's settings: with --noise train, its noise and seed
        // make this the validation loss the trainer logged for that checkpoint.
        let checkpoint = try checkpointManifest(at: weights)
        let model = try loadModel(from: checkpoint?.directory ?? weights, fallback: fallback, kind: weightsKind)
        try checkDataMatchesModel(cache.info, model.config, cachePath: data)
        let lossNoise: LossNoise?
        if noise == .train {
            let trained = checkpoint?.manifest.config
            let type = noiseType.flatMap(NoiseType.init) ?? trained?.noise.type ?? .replace
            let schedule = noiseSchedule.flatMap(NoiseSchedule.init) ?? trained?.noise.schedule ?? .sine
            var ln = LossNoise(
                noiser: TensorNoiser(
                    type: type, schedule: schedule, window: model.config.window, vocabSize: model.config.vocabSize),
                seed: noiseSeed ?? trained.map { UInt64($0.train.seed) } ?? 0)
            if type == .discrete && trained?.noise.embedding == .codebook {
                // The trainer's codebook: its training cache's (else this cache's, the same tokenizer's).
                guard let path = (try? TokenCache(directory: trained!.data.train))?.codebookPath ?? cache.codebookPath
                else {
                    throw InputError(
                        data,
                        "the checkpoint's discrete noise uses the VQ codebook (noise.embedding: codebook), but "
                            + "neither this cache nor \(trained!.data.train) has a codebook.h5"
                    )
                }
                let cb = try Codebook.load(path: path)
                ln.codebook = cb.vectors
                ln.codebookDim = cb.Dc
            }
            lossNoise = ln
            log(
                "validation noise: \(type.rawValue), schedule \(schedule.rawValue), seed \(ln.seed)"
                    + (checkpoint.map { " (from \($0.directory)/manifest.json unless given)" } ?? ""))
        } else {
            lossNoise = nil
        }
        if let limit, limit > cache.count {
            throw InputError(data, "--limit \(limit) is more than the \(cache.count) samples this cache holds")
        }
        let range = validationShard(cache: cache, limit: limit, rank: 0, worldSize: 1)
        let t0 = Date()
        let report = try evaluateLoss(model: model, cache: cache, range: range, batchSize: batchSize, noise: lossNoise)
        { done in
            if !json || isatty(2) != 0 {
                FileHandle.standardError.write("\r  evaluated \(done)/\(range.count) samples".data(using: .utf8)!)
            }
        }
        FileHandle.standardError.write("\n".data(using: .utf8)!)
        let values = [report.loss] + report.slotLosses
        if let bad = values.first(where: { !$0.isFinite }) {
            throw InputError(
                weights,
                "the loss over \(range.count) samples of \(data) is not finite (\(bad)): "
                    + "the model overflows on this data (weights too large, or not trained for this cache)")
        }
        var out: [String: Any] = [
            "loss": report.loss, "slot_losses": report.slotLosses, "samples": range.count, "tokens": report.tokens,
            "noise": noise.rawValue, "weights": weights, "data": data, "seconds": Date().timeIntervalSince(t0),
            "config": try JSONSerialization.jsonObject(with: Data(model.config.jsonString().utf8)),
        ]
        // Open-MAGVIT2 (SPEC section 8): `loss` is the per-token mean of CE(pre) + CE(post); its parts too
        let parts = Dictionary(uniqueKeysWithValues: zip(model.lossPartNames, report.partLosses))
        if !parts.isEmpty { out["loss_parts"] = parts }
        if json {
            print(
                String(data: try JSONSerialization.data(withJSONObject: out, options: [.sortedKeys]), encoding: .utf8)!)
        } else {
            print(
                String(
                    format: "loss %.5f over %d samples (%d tokens), noise %@", report.loss, range.count, report.tokens,
                    noise.rawValue))
            for (j, l) in report.slotLosses.enumerated() { print(String(format: "  slot %d: %.5f", j, l)) }
            for (name, l) in zip(model.lossPartNames, report.partLosses) {
                print(String(format: "  %@: %.5f", name, l))
            }
        }
    }
}

extension WeightsKind: ExpressibleByArgument {}
