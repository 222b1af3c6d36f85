import ARModel
import Foundation
import Platform

/// Which weights of a checkpoint: the trained ones, or their exponential moving average.
public enum WeightsKind: String, CaseIterable, Sendable { case raw, ema }

/// Loads a model for sampling or evaluation from either a safetensors file or a checkpoint folder
/// (a `step-NNNNNNNN` folder, or a run folder meaning its `latest`). `fallback` gives the shape
/// of a safetensors file without `tensorar.config` (a converted LlamaGen checkpoint).
/// `kind: .ema` takes a checkpoint's moving average of the weights (train.ema_decay) instead.
public func loadModel(from path: String, fallback: ModelConfig? = nil, kind: WeightsKind = .raw) throws -> Transformer {
    var isDir: ObjCBool = false
    guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir) else {
        throw InputError(path, "no such file or folder (expected weights .safetensors or a checkpoint folder)")
    }
    if !isDir.boolValue {
        if kind == .ema {
            throw InputError(
                path,
                "--weights-kind ema needs a checkpoint folder: a .safetensors file holds one set of "
                    + "weights (export the EMA ones with tensorar-export --weights-kind ema)")
        }
        return try Transformer.load(path, fallback: fallback)
    }
    var notes: [String] = []
    let dir = try CheckpointStore.resolve(path: path, allowFallback: false, notes: &notes)
    let manifest = try CheckpointStore.readManifest(dir)
    let model = try Transformer(config: manifest.model)
    _ = try CheckpointStore.load(
        from: dir, model: manifest.model, table: model.table, params: model.params,
        optimizer: nil, weights: kind == .ema ? .ema : .params)
    if let w = manifest.config.loss.slotWeights { model.slotWeights = w.map { Float($0) } }
    return model
}

/// The checkpoint a model path names, if it is a checkpoint folder (a step folder, or a run folder
/// meaning its `latest`); nil for a weights file. Gives a program the training run's settings, e.g.
/// the noise and seed of the validation loss.
public func checkpointManifest(at path: String) throws -> (directory: String, manifest: CheckpointManifest)? {
    var isDir: ObjCBool = false
    guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir), isDir.boolValue else { return nil }
    var notes: [String] = []
    let dir = try CheckpointStore.resolve(path: path, allowFallback: false, notes: &notes)
    return (dir, try CheckpointStore.readManifest(dir))
}
