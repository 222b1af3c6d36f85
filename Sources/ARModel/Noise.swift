import Foundation
import Kernels
import Platform

/// Discrete tensor noising (SPEC section 4) and the other training-time input changes.
public enum NoiseType: String, CaseIterable, Sendable { case replace, discrete, continuous, none }
public enum NoiseSchedule: String, CaseIterable, Sendable {
    case linear, sine, sqrt, exponential
    /// gamma(u), rising from 0 (SPEC section 4: the paper's formulas are not recoverable).
    public func gamma(_ u: Double) -> Double {
        switch self {
        case .linear: return u
        case .sine: return Foundation.sin(Double.pi * u / 2)
        case .sqrt: return u.squareRoot()
        case .exponential: return (Foundation.exp(u) - 1) / (M_E - 1)
        }
    }
    /// beta_j = gamma(j / k) for the k entries of a tensor; beta_0 = 0.
    public func strengths(window k: Int) -> [Double] { (0..<k).map { gamma(Double($0) / Double(k)) } }
}

public enum Windows {
    /// Clean input tensors (B, T-1, k): position p = 1..T-1 gets t_{p-1} = (x_{p-1}, .., x_{p+k-2}),
    /// -1 (pad) past the image end (SPEC section 3).
    public static func inputTensors(tokens: [Int32], batch: Int, seqLen T: Int, window k: Int) -> [Int32] {
        var out = [Int32](repeating: -1, count: batch * (T - 1) * k)
        for b in 0..<batch {
            for q in 0..<(T - 1) {
                for j in 0..<k where q + j < T { out[(b * (T - 1) + q) * k + j] = tokens[b * T + q + j] }
            }
        }
        return out
    }

    /// Class label replaced by the null class C with probability p (SPEC section 2), keyed by
    /// (seed, step, global sample position): the same on any rank count.
    public static func dropLabels(
        _ labels: [Int32], nullClass: Int, p: Double, seed: UInt64, step: Int, samplePositions: [Int]
    ) -> [Int32] {
        guard p > 0 else { return labels }
        return labels.enumerated().map { i, c in
            var rng = CounterRNG(seed: seed, UInt64(step), UInt64(samplePositions[i]), RandomPurpose.labelDrop.rawValue)
            return Double(rng.uniform()) < p ? Int32(nullClass) : c
        }
    }
}

/// One embedding table `discrete` noise mixes and picks in (SPEC section 4): a token's row is
/// (token / stride) % rows, and the noised token the sum of each table's pick times its stride.
public struct NoiseTable {
    public let embedding: UnsafePointer<Float>
    public let rows: Int
    public let dim: Int
    public let stride: Int
    public init(embedding: UnsafePointer<Float>, rows: Int, dim: Int, stride: Int) {
        self.embedding = embedding
        self.rows = rows
        self.dim = dim
        self.stride = stride
    }
}

/// Applies SPEC section 4 to a batch of input tensors. Randomness: one counter stream per
/// (seed, step, sample position, purpose), drawn in (position, entry) order with a fixed number
/// of draws per entry, so every (sample, position, entry) has its own numbers on any rank count.
public struct TensorNoiser {
    public var type: NoiseType
    public var schedule: NoiseSchedule
    public let window: Int
    public let vocabSize: Int
    public let betas: [Double]

    public init(type: NoiseType, schedule: NoiseSchedule, window: Int, vocabSize: Int) {
        self.type = type
        self.schedule = schedule
        self.window = window
        self.vocabSize = vocabSize
        betas = schedule.strengths(window: window)
    }

    /// Noises `tensors` (B, T-1, k) in place for `replace` and `discrete`; returns the additive
    /// embedding noise (B, T-1, k, D) for `continuous`. `embedding` (V, Dm) is the noise embedding
    /// E for `discrete` (the model's tok_embeddings or the codebook; read, no gradient).
    public func apply(
        _ tensors: inout [Int32], batch: Int, seqLen T: Int, seed: UInt64, step: Int, samplePositions: [Int],
        purpose: RandomPurpose = .noise, embedding: UnsafePointer<Float>? = nil, embeddingDim: Int = 0,
        modelDim: Int = 0
    ) -> [Float]? {
        let tables = embedding.map { [NoiseTable(embedding: $0, rows: vocabSize, dim: embeddingDim, stride: 1)] } ?? []
        return apply(
            &tensors, batch: batch, seqLen: T, seed: seed, step: step, samplePositions: samplePositions,
            purpose: purpose, tables: tables, modelDim: modelDim)
    }

    /// As above, `discrete` mixing and picking in each of `tables` separately (Open-MAGVIT2's
    /// pre_emb and post_emb, SPEC section 8; one table of V rows for LlamaGen or a codebook).
    public func apply(
        _ tensors: inout [Int32], batch: Int, seqLen T: Int, seed: UInt64, step: Int,
        samplePositions: [Int], purpose: RandomPurpose = .noise, tables: [NoiseTable],
        modelDim: Int = 0
    ) -> [Float]? {
        let k = window
        switch type {
        case .none:
            return nil
        case .replace:
            for b in 0..<batch {
                var rng = CounterRNG(seed: seed, UInt64(step), UInt64(samplePositions[b]), purpose.rawValue)
                for q in 0..<(T - 1) {
                    for j in 1..<max(k, 1) {
                        let u = rng.uniform()
                        let n = rng.below(vocabSize)
                        let i = (b * (T - 1) + q) * k + j
                        if tensors[i] >= 0 && Double(u) < betas[j] { tensors[i] = Int32(n) }
                    }
                }
            }
            return nil
        case .discrete:
            precondition(!tables.isEmpty, "discrete noise needs an embedding")
            // gather every entry to noise (j >= 1, not pad): m = (1-beta) E[t] + beta E[n], per table
            var which: [Int] = []
            var mix = [[Float]](repeating: [], count: tables.count)
            for b in 0..<batch {
                var rng = CounterRNG(seed: seed, UInt64(step), UInt64(samplePositions[b]), purpose.rawValue)
                for q in 0..<(T - 1) {
                    for j in 1..<max(k, 1) {
                        let n = rng.below(vocabSize)
                        let i = (b * (T - 1) + q) * k + j
                        let t = Int(tensors[i])
                        if t < 0 || betas[j] == 0 { continue }
                        which.append(i)
                        let beta = Float(betas[j])
                        for (f, e) in tables.enumerated() {
                            let E = e.embedding
                            let Dm = e.dim
                            let tr = t / e.stride % e.rows
                            let nr = n / e.stride % e.rows
                            for c in 0..<Dm { mix[f].append((1 - beta) * E[tr * Dm + c] + beta * E[nr * Dm + c]) }
                        }
                    }
                }
            }
            var tokens = [Int](repeating: 0, count: which.count)
            for (f, e) in tables.enumerated() {
                let nearest = TensorNoiser.nearestByCosine(
                    mix[f], rows: which.count, embedding: e.embedding,
                    vocab: e.rows, dim: e.dim)
                for r in which.indices { tokens[r] += nearest[r] * e.stride }
            }
            for (r, i) in which.enumerated() { tensors[i] = Int32(tokens[r]) }
            return nil
        case .continuous:
            // e_j = tok_emb[t_j] + beta_j sqrt(0.1) eps + in_pos[j]
            var noise = [Float](repeating: 0, count: batch * (T - 1) * k * modelDim)
            for b in 0..<batch {
                var rng = CounterRNG(seed: seed, UInt64(step), UInt64(samplePositions[b]), purpose.rawValue)
                for q in 0..<(T - 1) {
                    for j in 0..<k {
                        let scale = Float(betas[j] * 0.1.squareRoot())
                        let i = (b * (T - 1) + q) * k + j
                        for c in 0..<modelDim {
                            let e = rng.normal()
                            if tensors[i] >= 0 { noise[i * modelDim + c] = scale * e }
                        }
                    }
                }
            }
            return noise
        }
    }

    /// argmax_v cos(m_r, E[v]) for each row: one sgemm against the row-normalised embedding
    /// (norms clamped at 1e-8), lowest index on a tie. |m_r| does not change the argmax.
    public static func nearestByCosine(
        _ m: [Float], rows: Int, embedding E: UnsafePointer<Float>, vocab V: Int, dim Dm: Int
    ) -> [Int] {
        if rows == 0 { return [] }
        var En = [Float](repeating: 0, count: V * Dm)
        for v in 0..<V {
            var s: Float = 0
            for c in 0..<Dm { s += E[v * Dm + c] * E[v * Dm + c] }
            let inv = 1 / max(s.squareRoot(), 1e-8)
            for c in 0..<Dm { En[v * Dm + c] = E[v * Dm + c] * inv }
        }
        var result = [Int](repeating: 0, count: rows)
        let chunk = 1024
        var scores = [Float](repeating: 0, count: min(rows, chunk) * V)
        m.withUnsafeBufferPointer { mp in
            En.withUnsafeBufferPointer { ep in
                scores.withUnsafeMutableBufferPointer { sp in
                    var start = 0
                    while start < rows {
                        let n = min(chunk, rows - start)
                        matmulForward(
                            sp.baseAddress!, mp.baseAddress! + start * Dm, ep.baseAddress!, n: n, ic: Dm, oc: V)
                        for r in 0..<n {
                            var best = 0
                            var bestScore = -Float.infinity
                            for v in 0..<V where sp[r * V + v] > bestScore {
                                bestScore = sp[r * V + v]
                                best = v
                            }
                            result[start + r] = best
                        }
                        start += n
                    }
                }
            }
        }
        return result
    }
}
