import ARModel
import Foundation
import Platform

/// Loads a model for sampling or evaluation from either a safetensors file or a checkpoint folder
/// (a `step-NNNNNNNN` folder, or a run folder meaning its `latest`). `fallback` gives the shape
/// of a safetensors file without `tensorar.config` (a converted LlamaGen checkpoint).
public func loadModel(from path: String, fallback: ModelConfig? = nil) throws -> Transformer {
    var isDir: ObjCBool = false
    guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir) else {
        throw InputError(path, "no such file or folder (expected weights .safetensors or a checkpoint folder)")
    }
    if !isDir.boolValue { return try Transformer.load(path, fallback: fallback) }
    var notes: [String] = []
    let dir = try CheckpointStore.resolve(path: path, allowFallback: false, notes: &notes)
    let manifest = try CheckpointStore.readManifest(dir)
    let model = try Transformer(config: manifest.model)
    _ = try CheckpointStore.load(from: dir, model: manifest.model, table: model.table, params: model.params, optimizer: nil)
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
