import ARModel
import Foundation
import Kernels
import Platform
import TokenData

/// The model config a cache implies, with the model shape from `shape` (SPEC sections 1, 7).
public func checkDataMatchesModel(_ info: CacheInfo, _ c: ModelConfig, cachePath: String) throws {
    if info.gridH != info.gridW {
        throw InputError(
            cachePath,
            "grid \(info.gridH)x\(info.gridW) is not square; the 2D rotary table needs H == W (SPEC section 1)")
    }
    if info.gridH != c.gridSize {
        throw InputError(
            cachePath, "grid \(info.gridH)x\(info.gridW) does not match the model's grid_size \(c.gridSize)")
    }
    if info.vocabSize > c.vocabSize {
        throw InputError(cachePath, "vocab_size \(info.vocabSize) is larger than the model's \(c.vocabSize)")
    }
    if info.numClasses > c.numClasses {
        throw InputError(cachePath, "num_classes \(info.numClasses) is larger than the model's \(c.numClasses)")
    }
}

/// Evaluation-mode loss (no dropout, no label drop) over `range` of a cache, augmentation 0.
/// With noise, each sample is noised keyed by its dataset index (step 0, the validation purpose):
/// deterministic and the same on any rank count. Returns this rank's sums (reduce them across ranks).
public func evaluateLoss(
    model: Transformer, cache: TokenCache, range: Range<Int>, batchSize: Int, noise: LossNoise?,
    progress: ((Int) -> Void)? = nil
) throws -> LossReport {
    var total = LossReport(slots: model.config.window, parts: model.lossPartNames.count)
    var done = 0
    let builder = BatchBuilder(model: model, noise: nil)
    try forEachValidationBatch(cache: cache, range: range, batchSize: batchSize) { b in
        let mb = builder.evaluation(codes: b.codes, labels: b.labels, sampleIndices: b.sampleIndices, noise: noise)
        total.add(model.forward(mb))
        done += b.count
        progress?(done)
    }
    return total
}
