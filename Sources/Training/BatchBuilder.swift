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
        self.noiser = noiser
        self.seed = seed
        self.codebook = codebook
        self.codebookDim = codebookDim
    }
}

/// Where the model and the trainer meet: the one place a batch of image tokens becomes the
/// model's input. Training: label drop (SPEC section 2), windows (section 3), noise (section 4)
/// and dropout keys. Validation and eval: no label drop, no dropout, noise (if any) at step 0 under
/// the validation purpose. Every random choice is keyed by a sample's position (in the global
/// batch, or its dataset index when evaluating), so how a batch is split over ranks changes no number.
public struct BatchBuilder {
    public let model: Transformer
    /// The training noise; evaluation takes its own (nil: clean inputs).
    public var noise: LossNoise?
    public var seed: UInt64
    public var labelDrop: Double
    public var dropout: Double
    /// `train.random_order`: training samples' token orders (nil: raster, `ModelBatch.orders` nil).
    public var randomOrder: RandomOrder?

    public init(
        model: Transformer, noise: LossNoise?, seed: UInt64 = 0, labelDrop: Double = 0, dropout: Double = 0,
        randomOrder: RandomOrder? = nil
    ) {
        self.model = model
        self.noise = noise
        self.seed = seed
        self.labelDrop = labelDrop
        self.dropout = dropout
        self.randomOrder = randomOrder
    }

    /// The ranges of the flat parameters that `training` reads: the base's token tables under
    /// `discrete` noise measured in the model's own embedding (`assemble`); none otherwise.
    public var parameterRanges: [Range<Int>] {
        guard let noise, noise.noiser.type == .discrete, noise.codebook == nil else { return [] }
        return model.tokenFactors.map { f in
            let e = model.table.entry(f.name)!
            return e.offset..<(e.offset + e.count)
        }
    }

    /// A training micro-batch and the dropout keys of its samples.
    public struct Training {
        public var batch: ModelBatch
        public var dropout: DropoutSettings
    }

    /// Samples `range` of a rank's share `batch` of a global batch, keyed by their global positions
    /// and the batch's step.
    public func training(_ batch: TokenBatch, range r: Range<Int>) -> Training {
        let c = model.config
        let T = c.seqLen
        let positions = Array(batch.globalPositions[r])
        let labels = Windows.dropLabels(
            Array(batch.labels[r]), nullClass: c.numClasses, p: labelDrop, seed: seed,
            step: batch.step, samplePositions: positions)
        let codes = Array(batch.codes[(r.lowerBound * T)..<(r.upperBound * T)])
        let mb = assemble(
            codes: codes, labels: labels, noise: noise, step: batch.step, samplePositions: positions,
            purpose: .noise)
        let keys = DropoutSettings(p: Float(dropout), seed: seed, step: batch.step, samplePositions: positions)
        var out = Training(batch: mb, dropout: keys)
        out.batch.orders = randomOrder?.orders(seed: seed, step: batch.step, samples: positions, seqLen: T)
        return out
    }

    /// An evaluation batch: the labels as they are, `noise` keyed by each sample's dataset index at
    /// step 0 (SPEC section 4 "Validation loss": the same on any rank count).
    public func evaluation(codes: [Int32], labels: [Int32], sampleIndices: [Int], noise: LossNoise?) -> ModelBatch {
        assemble(
            codes: codes, labels: labels, noise: noise, step: 0, samplePositions: sampleIndices,
            purpose: .validationNoise)
    }

    /// Windows (SPEC section 3), then noise (SPEC section 4) keyed by `samplePositions` and `step`.
    func assemble(
        codes: [Int32], labels: [Int32], noise: LossNoise?, step: Int, samplePositions: [Int],
        purpose: RandomPurpose
    ) -> ModelBatch {
        let c = model.config
        let n = labels.count
        var tensors = Windows.inputTensors(tokens: codes, batch: n, seqLen: c.seqLen, window: c.window)
        var embeddingNoise: [Float]?
        if let noise, noise.noiser.type != .none {
            let nz = noise.noiser
            func apply(_ e: UnsafePointer<Float>?, _ dim: Int) -> [Float]? {
                let modelDim = nz.type == .continuous ? c.dim : 0
                return nz.apply(
                    &tensors, batch: n, seqLen: c.seqLen, seed: noise.seed, step: step,
                    samplePositions: samplePositions, purpose: purpose, embedding: e, embeddingDim: dim,
                    modelDim: modelDim)
            }
            if nz.type != .discrete {
                embeddingNoise = apply(nil, 0)
            } else if let cb = noise.codebook {
                // noise.embedding: codebook measures similarity in the VQ codebook (SPEC section 4)
                embeddingNoise = cb.withUnsafeBufferPointer { apply($0.baseAddress!, noise.codebookDim) }
            } else {
                // the base's own input tables (LlamaGen: tok_embeddings; Open-MAGVIT2: pre_emb and
                // post_emb, each mixed and picked separately, SPEC section 8)
                let tables = model.tokenFactors.map { f in
                    NoiseTable(
                        embedding: UnsafePointer(model.params.base + model.table.offset(f.name)), rows: f.rows,
                        dim: c.dim, stride: f.stride)
                }
                embeddingNoise = nz.apply(
                    &tensors, batch: n, seqLen: c.seqLen, seed: noise.seed, step: step,
                    samplePositions: samplePositions, purpose: purpose, tables: tables)
            }
        }
        return ModelBatch(batch: n, tokens: codes, labels: labels, tensors: tensors, embeddingNoise: embeddingNoise)
    }
}
