import Foundation
import Kernels
import Platform

/// Sampling settings (SPEC section 5).
public struct SamplingOptions: Sendable {
    public var cfgScale: Float = 1
    public var temperature: Float = 1
    public var topK: Int = 0      // 0: all; 1: greedy (lowest index on a tie)
    public var topP: Float = 1    // 1: all
    public var seed: UInt64 = 0
    public init(cfgScale: Float = 1, temperature: Float = 1, topK: Int = 0, topP: Float = 1, seed: UInt64 = 0) {
        self.cfgScale = cfgScale; self.temperature = temperature; self.topK = topK; self.topP = topP; self.seed = seed
    }
}

/// Sampled images: tokens (N, T), and each token's refinement trajectory (N, T, k): entry
/// [n, q, s] is the prediction of token q made at slot s (at step q - s); -1 where none.
public struct SampleResult {
    public var tokens: [Int32]
    public var trajectories: [Int32]
    public var labels: [Int32]
}

/// KV-cached next-tensor sampling (SPEC section 5). Null-class rows for guidance are batched
/// with the conditioned rows and fed the same sampled tensors. Randomness is keyed by
/// (seed, sample id, step, slot), so a sample does not depend on its batch or rank.
public final class Sampler {
    let m: Transformer
    let encoder: BlockStack?
    let decoder: BlockStack?
    public init(model: Transformer) {
        m = model
        let c = model.config
        if c.hasPlugin {
            encoder = BlockStack(weights: model.encoder!.weights, causal: false, rotary: nil, dim: c.dim, heads: c.nHead, ffn: c.ffnHidden, eps: c.normEps, siteBase: 0)
            decoder = BlockStack(weights: model.decoder!.weights, causal: false, rotary: nil, dim: c.dim, heads: c.nHead, ffn: c.ffnHidden, eps: c.normEps, siteBase: 0)
        } else { encoder = nil; decoder = nil }
    }

    /// Samples one image per label; `sampleIds` (global, e.g. the index in the whole run) key the
    /// randomness. `onStep(p)` reports progress.
    public func sample(labels: [Int32], sampleIds: [Int], options o: SamplingOptions, onStep: ((Int) -> Void)? = nil) -> SampleResult {
        let c = m.config, T = c.seqLen, D = c.dim, V = c.vocabSize, k = c.window, F = c.ffnHidden
        let NH = c.nHead, hd = c.headDim, L = c.nLayer
        let n = labels.count
        let guided = o.cfgScale != 1
        let NB = guided ? 2 * n : n
        let p = m.params.base
        var tokens = [Int32](repeating: 0, count: n * T)
        var traj = [Int32](repeating: -1, count: n * T * k)
        var prev = [Int32](repeating: -1, count: n * k)  // t_{p-1} per image
        // KV cache (L, NB, T, D) for keys and values
        let kc = FlatBuffer(count: L * NB * T * D), vc = FlatBuffer(count: L * NB * T * D)
        let x = FlatBuffer(count: NB * D), n1 = FlatBuffer(count: NB * D), rstd = FlatBuffer(count: NB)
        let qkv = FlatBuffer(count: NB * 3 * D), att = FlatBuffer(count: NB * D), tmp = FlatBuffer(count: NB * D)
        let ab = FlatBuffer(count: NB * 2 * F), g = FlatBuffer(count: NB * F)
        let scores = FlatBuffer(count: T)
        let rows = c.hasPlugin ? k : 1
        let fn = FlatBuffer(count: NB * rows * D), frstd = FlatBuffer(count: NB * rows), logits = FlatBuffer(count: NB * rows * V)
        let scale = 1 / Float(hd).squareRoot()

        for pos in 0..<T {
            // 1. the input vector of position pos, for every row
            if pos == 0 {
                for r in 0..<NB {
                    let cls = r < n ? Int(labels[r]) : c.numClasses
                    (x.base + r * D).update(from: p + m.oCls + cls * D, count: D)
                }
            } else {
                var t = [Int32](repeating: -1, count: NB * k)
                for r in 0..<NB { for j in 0..<k { t[r * k + j] = prev[(r % n) * k + j] } }
                embedInputs(t, rows: NB, into: x)
            }
            // 2. the base transformer, one position, with the KV cache
            for l in 0..<L {
                let w = m.base.weights[l]
                rmsnormForward(n1.base, rstd.base, x.base, p + w.attnNorm, n: NB, d: D, eps: c.normEps)
                matmulForward(qkv.base, n1.base, p + w.wqkv, n: NB, ic: D, oc: 3 * D)
                rotaryApply(qkv.base, m.base.rotary!, batch: NB, seqLen: 1, dim: D, heads: NH, position: pos)
                for r in 0..<NB {
                    let slot = ((l * NB + r) * T + pos) * D
                    (kc.base + slot).update(from: qkv.base + r * 3 * D + D, count: D)
                    (vc.base + slot).update(from: qkv.base + r * 3 * D + 2 * D, count: D)
                    for h in 0..<NH {
                        let q = qkv.base + r * 3 * D + h * hd
                        let kb = kc.base + (l * NB + r) * T * D + h * hd, vb = vc.base + (l * NB + r) * T * D + h * hd
                        var mx = -Float.infinity
                        for j in 0...pos {
                            var s: Float = 0
                            for i in 0..<hd { s += q[i] * kb[j * D + i] }
                            scores[j] = s * scale; mx = max(mx, s * scale)
                        }
                        var sum: Float = 0
                        for j in 0...pos { scores[j] = expf(scores[j] - mx); sum += scores[j] }
                        let o = att.base + r * D + h * hd
                        o.update(repeating: 0, count: hd)
                        for j in 0...pos { let wgt = scores[j] / sum; for i in 0..<hd { o[i] += wgt * vb[j * D + i] } }
                    }
                }
                matmulForward(tmp.base, att.base, p + w.wo, n: NB, ic: D, oc: D)
                for i in 0..<(NB * D) { x[i] += tmp[i] }
                rmsnormForward(n1.base, rstd.base, x.base, p + w.ffnNorm, n: NB, d: D, eps: c.normEps)
                matmulForward(ab.base, n1.base, p + w.w13, n: NB, ic: D, oc: 2 * F)
                swigluForward(g.base, ab.base, n: NB, f: F)
                matmulForward(tmp.base, g.base, p + w.w2, n: NB, ic: F, oc: D)
                for i in 0..<(NB * D) { x[i] += tmp[i] }
            }
            // 3. decode the k slot logits of every row: (NB, rows, V)
            if let decoder {
                let S = k + 1
                let dx = FlatBuffer(count: NB * S * D)
                for r in 0..<NB {
                    (dx.base + r * S * D).update(from: x.base + r * D, count: D)
                    (dx.base + (r * S + 1) * D).update(from: p + m.oOutPos, count: k * D)
                }
                decoder.forward(dx, params: p, sequences: NB, seqLen: S, dropout: nil)
                let slots = FlatBuffer(count: NB * k * D), sn = FlatBuffer(count: NB * k * D), sr = FlatBuffer(count: NB * k)
                for r in 0..<NB { (slots.base + r * k * D).update(from: dx.base + (r * S + 1) * D, count: k * D) }
                rmsnormForward(sn.base, sr.base, slots.base, p + m.oDecNorm, n: NB * k, d: D, eps: c.normEps)
                let gz = FlatBuffer(count: NB * k * D)
                matmulForward(gz.base, sn.base, p + m.oDecProj, n: NB * k, ic: D, oc: D)
                if c.residual { for r in 0..<NB { for j in 0..<k { for i in 0..<D { gz[(r * k + j) * D + i] += x[r * D + i] } } } }
                rmsnormForward(fn.base, frstd.base, gz.base, p + m.oNorm, n: NB * k, d: D, eps: c.normEps)
            } else {
                rmsnormForward(fn.base, frstd.base, x.base, p + m.oNorm, n: NB, d: D, eps: c.normEps)
            }
            matmulForward(logits.base, fn.base, p + m.oOut, n: NB * rows, ic: D, oc: V)
            // 4. guidance, then choose each valid slot's token
            var row = [Float](repeating: 0, count: V)
            for b in 0..<n {
                for j in 0..<rows {
                    if pos + j >= T { prev[b * k + j] = -1; continue }
                    let cond = logits.base + (b * rows + j) * V
                    if guided {
                        let un = logits.base + ((n + b) * rows + j) * V
                        for v in 0..<V { row[v] = un[v] + o.cfgScale * (cond[v] - un[v]) }
                    } else {
                        for v in 0..<V { row[v] = cond[v] }
                    }
                    var rng = CounterRNG(seed: o.seed, UInt64(sampleIds[b]), RandomPurpose.sampling.rawValue, UInt64(pos * k + j))
                    let tok = Int32(Sampler.choose(&row, options: o, uniform: rng.uniform()))
                    prev[b * k + j] = tok
                    traj[(b * T + pos + j) * k + j] = tok
                }
                tokens[b * T + pos] = prev[b * k]
            }
            onStep?(pos)
        }
        return SampleResult(tokens: tokens, trajectories: traj, labels: labels)
    }

    /// Base-transformer input vectors for step inputs t (rows, k): the plug-in encoder or the
    /// plain token embedding (SPEC section 3).
    func embedInputs(_ t: [Int32], rows: Int, into x: FlatBuffer) {
        let c = m.config, D = c.dim, k = c.window, p = m.params.base
        guard let encoder else {
            t.withUnsafeBufferPointer { embeddingForward(x.base, $0.baseAddress!, p + m.oTok, n: rows, d: D) }
            return
        }
        let S = k + 1
        let ex = FlatBuffer(count: rows * S * D)
        for r in 0..<rows {
            let seq = ex.base + r * S * D
            seq.update(from: p + m.oInQuery, count: D)
            for j in 0..<k {
                let tok = Int(t[r * k + j]), e = seq + (j + 1) * D
                let src = tok < 0 ? p + m.oInPad : p + m.oTok + tok * D, pos = p + m.oInPos + j * D
                for i in 0..<D { e[i] = src[i] + pos[i] }
            }
        }
        encoder.forward(ex, params: p, sequences: rows, seqLen: S, dropout: nil)
        let s0 = FlatBuffer(count: rows * D), sn = FlatBuffer(count: rows * D), sr = FlatBuffer(count: rows)
        for r in 0..<rows { (s0.base + r * D).update(from: ex.base + r * S * D, count: D) }
        rmsnormForward(sn.base, sr.base, s0.base, p + m.oEncNorm, n: rows, d: D, eps: c.normEps)
        matmulForward(x.base, sn.base, p + m.oEncProj, n: rows, ic: D, oc: D)
        if c.residual {
            for r in 0..<rows { let e = p + m.oTok + Int(t[r * k]) * D; for i in 0..<D { x[r * D + i] += e[i] } }
        }
    }

    /// Temperature, top-k, top-p, then inverse-CDF sampling with `uniform`; top-k 1 (or
    /// temperature 0) is greedy with the lowest index on a tie.
    public static func choose(_ logits: inout [Float], options o: SamplingOptions, uniform u: Float) -> Int {
        let V = logits.count
        if o.topK == 1 || o.temperature <= 0 {
            var best = 0
            for v in 1..<V where logits[v] > logits[best] { best = v }
            return best
        }
        // candidates sorted by logit, high first, lower index first on ties
        var order = Array(0..<V)
        order.sort { logits[$0] > logits[$1] || (logits[$0] == logits[$1] && $0 < $1) }
        if o.topK > 0 && o.topK < V { order.removeLast(V - o.topK) }
        let mx = logits[order[0]]
        var probs = order.map { expf((logits[$0] - mx) / o.temperature) }
        var z = probs.reduce(0, +)
        for i in probs.indices { probs[i] /= z }
        if o.topP < 1 {
            var cum: Float = 0, keep = probs.count
            for (i, q) in probs.enumerated() { cum += q; if cum >= o.topP { keep = i + 1; break } }
            probs.removeLast(probs.count - keep); order.removeLast(order.count - keep)
            z = probs.reduce(0, +)
            for i in probs.indices { probs[i] /= z }
        }
        var cum: Float = 0
        for (i, q) in probs.enumerated() { cum += q; if u < cum { return order[i] } }
        return order[order.count - 1]
    }
}
