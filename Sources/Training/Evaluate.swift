import ARModel
import Foundation
import Kernels
import Platform
import TokenData

/// Which noise a loss is measured under (SPEC section 4, "Validation loss").
public struct LossNoise {
    public var noiser: TensorNoiser
    public var seed: UInt64
    /// The VQ codebook (V, Dc) when `discrete` noise uses `noise.embedding: codebook`.
    public var codebook: [Float]?
    public var codebookDim: Int = 0
    public init(noiser: TensorNoiser, seed: UInt64, codebook: [Float]? = nil, codebookDim: Int = 0) {
        self.noiser = noiser; self.seed = seed; self.codebook = codebook; self.codebookDim = codebookDim
    }
}

/// The model config a cache implies, with the model shape from `shape` (SPEC sections 1, 7).
public func checkDataMatchesModel(_ info: CacheInfo, _ c: ModelConfig, cachePath: String) throws {
    if info.gridH != info.gridW { throw InputError(cachePath, "grid \(info.gridH)x\(info.gridW) is not square; the 2D rotary table needs H == W (SPEC section 1)") }
    if info.gridH != c.gridSize { throw InputError(cachePath, "grid \(info.gridH)x\(info.gridW) does not match the model's grid_size \(c.gridSize)") }
    if info.vocabSize > c.vocabSize { throw InputError(cachePath, "vocab_size \(info.vocabSize) is larger than the model's \(c.vocabSize)") }
    if info.numClasses > c.numClasses { throw InputError(cachePath, "num_classes \(info.numClasses) is larger than the model's \(c.numClasses)") }
}

/// Builds the model's input for a batch of image tokens: windows (SPEC section 3), then noise
/// (SPEC section 4) keyed by `samplePositions` and `step` under `purpose`.
public func makeModelBatch(model: Transformer, codes: [Int32], labels: [Int32], noise: LossNoise?, step: Int, samplePositions: [Int], purpose: RandomPurpose) -> ModelBatch {
    let c = model.config
    let n = labels.count
    var tensors = Windows.inputTensors(tokens: codes, batch: n, seqLen: c.seqLen, window: c.window)
    var embeddingNoise: [Float]?
    if let noise, noise.noiser.type != .none {
        if noise.noiser.type == .discrete {
            if let cb = noise.codebook {
                embeddingNoise = cb.withUnsafeBufferPointer { noise.noiser.apply(&tensors, batch: n, seqLen: c.seqLen, seed: noise.seed, step: step, samplePositions: samplePositions, purpose: purpose, embedding: $0.baseAddress!, embeddingDim: noise.codebookDim) }
            } else {
                let e = model.table.entry("tok_embeddings.weight")!
                embeddingNoise = noise.noiser.apply(&tensors, batch: n, seqLen: c.seqLen, seed: noise.seed, step: step, samplePositions: samplePositions, purpose: purpose, embedding: model.params.base + e.offset, embeddingDim: c.dim)
            }
        } else {
            embeddingNoise = noise.noiser.apply(&tensors, batch: n, seqLen: c.seqLen, seed: noise.seed, step: step, samplePositions: samplePositions, purpose: purpose, modelDim: c.dim)
        }
    }
    return ModelBatch(batch: n, tokens: codes, labels: labels, tensors: tensors, embeddingNoise: embeddingNoise)
}

/// Evaluation-mode loss (no dropout, no label drop) over `range` of a cache, augmentation 0.
/// With noise, each sample is noised keyed by its dataset index (step 0, the validation purpose):
/// deterministic and the same on any rank count. Returns this rank's sums (reduce them across ranks).
public func evaluateLoss(model: Transformer, cache: TokenCache, range: Range<Int>, batchSize: Int, noise: LossNoise?, progress: ((Int) -> Void)? = nil) throws -> LossReport {
    var total = LossReport(slots: model.config.window)
    var done = 0
    try forEachValidationBatch(cache: cache, range: range, batchSize: batchSize) { b in
        let mb = makeModelBatch(model: model, codes: b.codes, labels: b.labels, noise: noise, step: 0, samplePositions: b.sampleIndices, purpose: .validationNoise)
        total.add(model.forward(mb))
        done += b.count
        progress?(done)
    }
    return total
}
