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
/// with the conditioned rows and fed the same sampled tensors (so the plug-in encoder, which does
/// not see the class, runs on the conditioned rows only and its output is copied). Randomness is
/// keyed by (seed, sample id, step, slot), so a sample does not depend on its batch or rank.
///
/// Hot loops: every matmul is one sgemm over all rows. Attention over the cache is memory-bound
/// (each cached key and value is read once per step): every (layer, row, head) keeps its keys and
/// values as one contiguous (T, hd) block, read by two sgemv calls, which stream it about twice
/// as fast as plain loops did. All buffers are allocated once per batch size.
public final class Sampler {
    let m: Transformer
    let encoder: BlockStack?
    let decoder: BlockStack?
    private var ws: Workspace?
    private var chooser: TokenChooser

    public init(model: Transformer) {
        m = model
        let c = model.config
        if c.hasPlugin {
            encoder = BlockStack(weights: model.encoder!.weights, causal: false, rotary: nil, dim: c.dim, heads: c.nHead, ffn: c.ffnHidden, eps: c.normEps, siteBase: 0)
            decoder = BlockStack(weights: model.decoder!.weights, causal: false, rotary: nil, dim: c.dim, heads: c.nHead, ffn: c.ffnHidden, eps: c.normEps, siteBase: 0)
        } else { encoder = nil; decoder = nil }
        chooser = TokenChooser(vocabSize: c.vocabSize)
    }

    /// Every buffer one batch of NB rows (n images, times 2 with guidance) needs.
    final class Workspace {
        let n, NB: Int
        let kC, vC: FlatBuffer            // keys and values (L, NB, NH, T, hd): each head's cache contiguous
        let x, n1, rstd, qkv, att, tmp, ab, g, scores: FlatBuffer
        let ex, es0, esn, esr, eu: FlatBuffer  // encoder: (n, k+1, D), slot 0, its norm, rstd, projection
        let dx, slots, dsn, dsr, gz: FlatBuffer  // decoder: (NB, k+1, D), (NB, k, D) ...
        let fn, frstd, logits: FlatBuffer
        var row: [Float]
        init(_ c: ModelConfig, n: Int, NB: Int) {
            let T = c.seqLen, D = c.dim, F = c.ffnHidden, L = c.nLayer, k = c.window, V = c.vocabSize
            self.n = n; self.NB = NB
            kC = FlatBuffer(count: L * NB * T * D); vC = FlatBuffer(count: L * NB * T * D)
            x = FlatBuffer(count: NB * D); n1 = FlatBuffer(count: NB * D); rstd = FlatBuffer(count: NB)
            qkv = FlatBuffer(count: NB * 3 * D); att = FlatBuffer(count: NB * D); tmp = FlatBuffer(count: NB * D)
            ab = FlatBuffer(count: NB * 2 * F); g = FlatBuffer(count: NB * F); scores = FlatBuffer(count: T)
            let S = k + 1, pl = c.hasPlugin
            ex = FlatBuffer(count: pl ? n * S * D : 0); es0 = FlatBuffer(count: pl ? n * D : 0); esn = FlatBuffer(count: pl ? n * D : 0)
            esr = FlatBuffer(count: pl ? n : 0); eu = FlatBuffer(count: pl ? n * D : 0)
            dx = FlatBuffer(count: pl ? NB * S * D : 0); slots = FlatBuffer(count: pl ? NB * k * D : 0)
            dsn = FlatBuffer(count: pl ? NB * k * D : 0); dsr = FlatBuffer(count: pl ? NB * k : 0); gz = FlatBuffer(count: pl ? NB * k * D : 0)
            let rows = pl ? k : 1
            fn = FlatBuffer(count: NB * rows * D); frstd = FlatBuffer(count: NB * rows); logits = FlatBuffer(count: NB * rows * V)
            row = [Float](repeating: 0, count: V)
        }
    }

    /// Samples one image per label; `sampleIds` (global, e.g. the index in the whole run) key the
    /// randomness. `onStep(p)` reports progress. `steps` (benchmarks only) stops after that many
    /// positions, leaving the rest of the image unsampled (-1).
    public func sample(labels: [Int32], sampleIds: [Int], options o: SamplingOptions, steps: Int? = nil, onStep: ((Int) -> Void)? = nil) -> SampleResult {
        let c = m.config, T = c.seqLen, D = c.dim, V = c.vocabSize, k = c.window, F = c.ffnHidden
        let NH = c.nHead, hd = c.headDim, L = c.nLayer
        let n = labels.count
        precondition(sampleIds.count == n, "one sample id per label")
        let guided = o.cfgScale != 1
        let NB = guided ? 2 * n : n
        let p = m.params.base
        var tokens = [Int32](repeating: -1, count: n * T)
        var traj = [Int32](repeating: -1, count: n * T * k)
        var prev = [Int32](repeating: -1, count: n * k)  // t_{p-1} per image
        if n == 0 { return SampleResult(tokens: tokens, trajectories: traj, labels: labels) }
        if ws == nil || ws!.n != n || ws!.NB != NB { ws = nil; ws = Workspace(c, n: n, NB: NB) }
        let w = ws!
        let kC = w.kC.base, vC = w.vC.base, x = w.x.base, qkv = w.qkv.base, att = w.att.base, tmp = w.tmp.base, sc = w.scores.base
        let rows = c.hasPlugin ? k : 1
        let scale = 1 / Float(hd).squareRoot()
        let headBlock = T * hd  // floats per (layer, row, head) in either cache

        for pos in 0..<min(T, steps ?? T) {
            // 1. the input vector of position pos, for every row
            if pos == 0 {
                for r in 0..<NB {
                    let cls = r < n ? Int(labels[r]) : c.numClasses
                    (x + r * D).update(from: p + m.oCls + cls * D, count: D)
                }
            } else {
                embedInputs(prev, rows: n, into: w)
                if guided { (x + n * D).update(from: x, count: n * D) }  // null rows: same tensors, same input
            }
            // 2. the base transformer, one position, with the KV cache
            for l in 0..<L {
                let bw = m.base.weights[l]
                rmsnormForward(w.n1.base, w.rstd.base, x, p + bw.attnNorm, n: NB, d: D, eps: c.normEps)
                matmulForward(qkv, w.n1.base, p + bw.wqkv, n: NB, ic: D, oc: 3 * D)
                rotaryApply(qkv, m.base.rotary!, batch: NB, seqLen: 1, dim: D, heads: NH, position: pos)
                for r in 0..<NB {
                    for h in 0..<NH {
                        let blk = ((l * NB + r) * NH + h) * headBlock
                        let kh = kC + blk, vh = vC + blk
                        let q = qkv + r * 3 * D + h * hd
                        (kh + pos * hd).update(from: q + D, count: hd)
                        (vh + pos * hd).update(from: q + 2 * D, count: hd)
                        // scores over cached positions 0...pos: sc = scale K q; out = V^T softmax(sc)
                        BLAS.sgemv(trans: false, m: pos + 1, n: hd, alpha: scale, kh, lda: hd, q, beta: 0, sc)
                        var mx = -Float.infinity
                        for j in 0...pos { mx = max(mx, sc[j]) }
                        var sum: Float = 0
                        for j in 0...pos { let e = fexp(sc[j] - mx); sc[j] = e; sum += e }
                        BLAS.sgemv(trans: true, m: pos + 1, n: hd, alpha: 1 / sum, vh, lda: hd, sc, beta: 0, att + r * D + h * hd)
                    }
                }
                matmulForward(tmp, att, p + bw.wo, n: NB, ic: D, oc: D)
                for i in 0..<(NB * D) { x[i] += tmp[i] }
                rmsnormForward(w.n1.base, w.rstd.base, x, p + bw.ffnNorm, n: NB, d: D, eps: c.normEps)
                matmulForward(w.ab.base, w.n1.base, p + bw.w13, n: NB, ic: D, oc: 2 * F)
                swigluForward(w.g.base, w.ab.base, n: NB, f: F)
                matmulForward(tmp, w.g.base, p + bw.w2, n: NB, ic: F, oc: D)
                for i in 0..<(NB * D) { x[i] += tmp[i] }
            }
            // 3. decode the k slot logits of every row: (NB, rows, V)
            if let decoder {
                let S = k + 1, dx = w.dx.base
                for r in 0..<NB {
                    (dx + r * S * D).update(from: x + r * D, count: D)
                    (dx + (r * S + 1) * D).update(from: p + m.oOutPos, count: k * D)
                }
                decoder.forward(w.dx, params: p, sequences: NB, seqLen: S, dropout: nil)
                for r in 0..<NB { (w.slots.base + r * k * D).update(from: dx + (r * S + 1) * D, count: k * D) }
                rmsnormForward(w.dsn.base, w.dsr.base, w.slots.base, p + m.oDecNorm, n: NB * k, d: D, eps: c.normEps)
                let gz = w.gz.base
                matmulForward(gz, w.dsn.base, p + m.oDecProj, n: NB * k, ic: D, oc: D)
                if c.residual {
                    for r in 0..<NB { for j in 0..<k { let gr = gz + (r * k + j) * D, xr = x + r * D; for i in 0..<D { gr[i] += xr[i] } } }
                }
                rmsnormForward(w.fn.base, w.frstd.base, gz, p + m.oNorm, n: NB * k, d: D, eps: c.normEps)
            } else {
                rmsnormForward(w.fn.base, w.frstd.base, x, p + m.oNorm, n: NB, d: D, eps: c.normEps)
            }
            let logits = w.logits.base
            matmulForward(logits, w.fn.base, p + m.oOut, n: NB * rows, ic: D, oc: V)
            // 4. guidance, then choose each valid slot's token
            w.row.withUnsafeMutableBufferPointer { rowBuf in
                let row = rowBuf.baseAddress!
                for b in 0..<n {
                    for j in 0..<rows {
                        if pos + j >= T { prev[b * k + j] = -1; continue }
                        let cond = logits + (b * rows + j) * V
                        if guided {
                            let un = logits + ((n + b) * rows + j) * V, s = o.cfgScale
                            for v in 0..<V { row[v] = un[v] + s * (cond[v] - un[v]) }
                        } else {
                            row.update(from: cond, count: V)
                        }
                        var rng = CounterRNG(seed: o.seed, UInt64(sampleIds[b]), RandomPurpose.sampling.rawValue, UInt64(pos * k + j))
                        let tok = Int32(chooser.choose(row, options: o, uniform: rng.uniform()))
                        prev[b * k + j] = tok
                        traj[(b * T + pos + j) * k + j] = tok
                    }
                    tokens[b * T + pos] = prev[b * k]
                }
            }
            onStep?(pos)
        }
        return SampleResult(tokens: tokens, trajectories: traj, labels: labels)
    }

    /// Base-transformer input vectors (the first `rows` rows of w.x) for step inputs t (rows, k):
    /// the plug-in encoder or the plain token embedding (SPEC section 3).
    func embedInputs(_ t: [Int32], rows: Int, into w: Workspace) {
        let c = m.config, D = c.dim, k = c.window, p = m.params.base
        let x = w.x.base
        guard let encoder else {
            t.withUnsafeBufferPointer { embeddingForward(x, $0.baseAddress!, p + m.oTok, n: rows, d: D) }
            return
        }
        let S = k + 1, ex = w.ex.base
        for r in 0..<rows {
            let seq = ex + r * S * D
            seq.update(from: p + m.oInQuery, count: D)
            for j in 0..<k {
                let tok = Int(t[r * k + j]), e = seq + (j + 1) * D
                let src = tok < 0 ? p + m.oInPad : p + m.oTok + tok * D, pos = p + m.oInPos + j * D
                for i in 0..<D { e[i] = src[i] + pos[i] }
            }
        }
        encoder.forward(w.ex, params: p, sequences: rows, seqLen: S, dropout: nil)
        for r in 0..<rows { (w.es0.base + r * D).update(from: ex + r * S * D, count: D) }
        rmsnormForward(w.esn.base, w.esr.base, w.es0.base, p + m.oEncNorm, n: rows, d: D, eps: c.normEps)
        matmulForward(x, w.esn.base, p + m.oEncProj, n: rows, ic: D, oc: D)
        if c.residual {
            for r in 0..<rows { let e = p + m.oTok + Int(t[r * k]) * D, xr = x + r * D; for i in 0..<D { xr[i] += e[i] } }
        }
    }

    /// Temperature, top-k, top-p, then inverse-CDF sampling with `uniform` over the candidates
    /// sorted by logit (high first, lower index first on a tie); top-k 1 (or temperature 0) is
    /// greedy with the lowest index on a tie.
    public static func choose(_ logits: inout [Float], options o: SamplingOptions, uniform u: Float) -> Int {
        var c = TokenChooser(vocabSize: logits.count)
        return logits.withUnsafeBufferPointer { c.choose($0.baseAddress!, options: o, uniform: u) }
    }
}

/// The token choice of `Sampler.choose` with its scratch kept between calls. Candidates are
/// 64-bit keys (order-reversed logit bits above the index), so ordering the keys orders the
/// candidates by logit, high first, lower index first on a tie. Top-k first selects the k smallest
/// keys in linear time; the candidates are then put in order by a radix sort, with no comparisons (on the logit bits
/// alone when the keys are still in index order, since the sort is stable).
struct TokenChooser {
    private var keys: [UInt64]
    private var spare: [UInt64]
    private var probs: [Float]
    init(vocabSize V: Int) {
        keys = [UInt64](repeating: 0, count: V)
        spare = keys
        probs = [Float](repeating: 0, count: V)
    }

    /// Maps a float to a key that sorts descending by value (ascending key = larger float).
    @inline(__always) static func descendingKey(_ f: Float) -> UInt32 {
        let b = f.bitPattern
        let ascending = (b & 0x8000_0000) != 0 ? ~b : b | 0x8000_0000
        return ~ascending
    }

    mutating func choose(_ logits: UnsafePointer<Float>, options o: SamplingOptions, uniform u: Float) -> Int {
        let V = keys.count
        if o.topK == 1 || o.temperature <= 0 {
            var best = 0
            for v in 1..<V where logits[v] > logits[best] { best = v }
            return best
        }
        let K = o.topK > 0 && o.topK < V ? o.topK : V
        var mx = -Float.infinity
        for v in 0..<V { mx = max(mx, logits[v]) }
        let invT = 1 / o.temperature
        return keys.withUnsafeMutableBufferPointer { kb -> Int in
            spare.withUnsafeMutableBufferPointer { sb -> Int in
                probs.withUnsafeMutableBufferPointer { pb -> Int in
                    let key = kb.baseAddress!, pr = pb.baseAddress!
                    // unnormalised probabilities in index order (vectorised exp)
                    for v in 0..<V { pr[v] = fexp((logits[v] - mx) * invT) }
                    for v in 0..<V { key[v] = UInt64(TokenChooser.descendingKey(logits[v])) << 32 | UInt64(v) }
                    if K < V {
                        // selection scrambles the index order: sort by the index bits too
                        TokenChooser.selectSmallest(key, count: V, k: K)
                        TokenChooser.radixSort(key, spare: sb.baseAddress!, count: K, lowBits: Int.bitWidth - (V - 1).leadingZeroBitCount)
                    } else {
                        TokenChooser.radixSort(key, spare: sb.baseAddress!, count: K)
                    }
                    @inline(__always) func p(_ i: Int) -> Float { pr[Int(key[i] & 0xFFFF_FFFF)] }
                    var z: Float = 0
                    for i in 0..<K { z += p(i) }
                    var keep = K
                    if o.topP < 1 {
                        // the smallest prefix whose normalised mass reaches top_p
                        let target = o.topP * z
                        var cum: Float = 0
                        for i in 0..<K { cum += p(i); if cum >= target { keep = i + 1; break } }
                        z = 0
                        for i in 0..<keep { z += p(i) }
                    }
                    let target = u * z
                    var cum: Float = 0
                    for i in 0..<keep { cum += p(i); if target < cum { return Int(key[i] & 0xFFFF_FFFF) } }
                    return Int(key[keep - 1] & 0xFFFF_FFFF)
                }
            }
        }
    }

    /// LSD radix sort of a[0..<n] by the upper 32 bits and the lowest `lowBits` bits (passes of 11
    /// bits, low digits first; a pass where every key has the same digit is skipped). Stable, so
    /// with lowBits 0 keys equal in the upper half keep their order. `spare` holds n keys.
    static func radixSort(_ a: UnsafeMutablePointer<UInt64>, spare: UnsafeMutablePointer<UInt64>, count n: Int, lowBits: Int = 0) {
        if n < 2 { return }
        var shifts: [UInt64] = stride(from: 0, to: lowBits, by: 11).map { UInt64($0) }
        shifts += [32, 43, 54]
        var src = a, dst = spare
        withUnsafeTemporaryAllocation(of: Int.self, capacity: 2048) { cb in
            let cnt = cb.baseAddress!
            for shift in shifts {
                cnt.initialize(repeating: 0, count: 2048)
                for i in 0..<n { cnt[Int((src[i] >> shift) & 0x7FF)] += 1 }
                if cnt[Int((src[0] >> shift) & 0x7FF)] == n { continue }
                var total = 0
                for b in 0..<2048 { let c = cnt[b]; cnt[b] = total; total += c }
                for i in 0..<n { let kv = src[i], b = Int((kv >> shift) & 0x7FF); dst[cnt[b]] = kv; cnt[b] += 1 }
                swap(&src, &dst)
            }
        }
        if src != a { a.update(from: src, count: n) }
    }

    /// Moves the k smallest of a[0..<n] (distinct values) to a[0..<k], in any order (quickselect,
    /// median-of-three pivots).
    static func selectSmallest(_ a: UnsafeMutablePointer<UInt64>, count n: Int, k: Int) {
        var lo = 0, hi = n - 1  // the k-th smallest (index k - 1) lies in [lo, hi]
        let target = k - 1
        while hi > lo {
            let mid = lo + (hi - lo) / 2
            var x = a[lo], y = a[mid], z = a[hi]
            if x > y { swap(&x, &y) }
            if y > z { swap(&y, &z) }
            if x > y { swap(&x, &y) }
            let pivot = y
            var i = lo, j = hi
            while i <= j {
                while a[i] < pivot { i += 1 }
                while a[j] > pivot { j -= 1 }
                if i <= j { let t = a[i]; a[i] = a[j]; a[j] = t; i += 1; j -= 1 }
            }
            if target <= j { hi = j } else if target >= i { lo = i } else { return }
        }
    }
}
