import Kernels
import Platform

@testable import ARModel

/// A tiny model of `base` (D 16, 2 heads, 3 layers, FFN 32, V 64, 3 classes) whose heads,
/// projections and RAR's adaLN gates, which start at zero, get N(0, 0.3^2) values: every parameter
/// then reaches the loss, so every gradient is non-zero (RecomputeTests, ParametersNeededTests).
func liveSmallModel(
    _ base: String, window: Int, depth: Int, gridSize: Int, factorizedLayers: Int, initSeed: UInt64,
    valueSeed: UInt64
) throws -> Transformer {
    var c = try ModelConfig.preset("tiny", base: base, vocabSize: 64, numClasses: 3, gridSize: gridSize)
    c.dim = 16
    c.nHead = 2
    c.nLayer = 3
    c.ffnHidden = 32
    c.window = window
    c.pluginDepth = depth
    if base == "open-magvit2" { c.factorizedNLayer = factorizedLayers }
    let m = try Transformer(config: c)
    m.initialise(seed: initSeed)
    var rng = CounterRNG(seed: valueSeed)
    for e in m.table.entries
    where e.name.hasSuffix("proj.weight") || e.name.hasPrefix("head.") || e.name == "output.weight"
        || e.name.hasSuffix("adaLN_modulation.1.weight")
    {
        for i in 0..<e.count { m.params[e.offset + i] = 0.3 * rng.normal() }
    }
    return m
}

/// Two samples of `c` with random tokens (`seed`) and their input tensors under replace noise
/// (seed 1, step 4, sample positions 3 and 8).
func noisedPairBatch(_ c: ModelConfig, seed: UInt64, labels: [Int32]) -> ModelBatch {
    var rng = CounterRNG(seed: seed)
    let B = 2
    let tokens = (0..<(B * c.seqLen)).map { _ in Int32(rng.below(c.vocabSize)) }
    var tensors = Windows.inputTensors(tokens: tokens, batch: B, seqLen: c.seqLen, window: c.window)
    let noiser = TensorNoiser(type: .replace, schedule: .sine, window: c.window, vocabSize: c.vocabSize)
    _ = noiser.apply(&tensors, batch: B, seqLen: c.seqLen, seed: 1, step: 4, samplePositions: [3, 8])
    return ModelBatch(batch: B, tokens: tokens, labels: labels, tensors: tensors)
}
