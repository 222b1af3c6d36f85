import ARModel
import ArgumentParser
import Foundation
import Platform
import Training

/// `tensorar-export --checkpoint DIR --out FILE.safetensors`: a checkpoint's model as the weights
/// exchange file of SPEC section 7 (float32, the SPEC names, `tensorar.config` metadata), for
/// sampling, evaluation, LlamaGen users, or `tensorar-train --init-from`.
@main
struct Export: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tensorar-export",
        abstract: "Export a checkpoint's weights as safetensors; measure checkpoint speed.",
        subcommands: [Weights.self, CheckpointBench.self],
        defaultSubcommand: Weights.self)
}

struct Weights: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "weights",
        abstract: "Write a checkpoint's model as .safetensors (the default command).",
        discussion:
            "The file loads in tensorar-eval, tensorar-sample and tensorar-train --init-from, and "
            + "in LlamaGen (base tensors)."
    )

    @Option(help: "A checkpoint folder (step-NNNNNNNN), or a run folder meaning its newest checkpoint (`latest`).")
    var checkpoint: String
    @Option(help: "The .safetensors file to write (a file is replaced atomically; a folder is refused).")
    var out: String
    @Option(help: "raw: the trained weights; ema: a checkpoint's moving average of them (train.ema_decay).")
    var weightsKind: WeightsKind = .raw

    func run() throws {
        try exitingOnInputError(exitCode: 2) {
            try checkOutputFile(out, what: "--out weights file")
            guard let (dir, manifest) = try checkpointManifest(at: checkpoint) else {
                let exists = FileManager.default.fileExists(atPath: checkpoint)
                throw InputError(
                    checkpoint,
                    (exists ? "a file, not a folder" : "no such folder")
                        + ": expected a checkpoint folder (step-NNNNNNNN) or a run folder with checkpoints")
            }
            let model = try loadModel(from: dir, kind: weightsKind)
            try model.save(
                out,
                extraMetadata: [
                    "tensorar.checkpoint": dir, "tensorar.step": String(manifest.step),
                    "tensorar.weights_kind": weightsKind.rawValue,
                ])
            print(
                "\(out): \(model.table.total) parameters (\(weightsKind.rawValue) weights) from \(dir) "
                    + "(step \(manifest.step)); "
                    + "model \(model.config.jsonString())")
        }
    }
}

extension WeightsKind: ExpressibleByArgument {}
