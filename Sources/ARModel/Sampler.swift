import Foundation
import Kernels
import Platform

/// How the guidance weight moves over the sampling steps (SPEC section 9 "Sampling", for every
/// base): `constant` w_s = g (SPEC section 5); `power-cosine` (RAR's)
/// w_s = (g - 1) (1 - cos(pi (s / T)^p)) / 2 + 1, rising from 1 at s = 0 towards g.
public enum GuidanceSchedule: String, CaseIterable, Sendable {
    case constant
    case powerCosine = "power-cosine"
}

/// Sampling settings (SPEC section 5). A base whose tokens are chosen in parts (Open-MAGVIT2:
/// pre, then post, SPEC section 8) may take a guidance scale and a temperature per part.
public struct SamplingOptions: Sendable {
    /// Classifier-free guidance scale; as LlamaGen, guidance (and its null-class rows) only above 1.
    public var cfgScale: Float = 1
    /// The guidance weight's schedule over the steps: w_s from each part's scale g, at the steps
    /// `guides` allows (so it composes with per-part scales and `cfgInterval`). Whether there
    /// are null-class rows, and whether a part is guided, follow g alone (SPEC section 5), not w_s.
    public var cfgSchedule = GuidanceSchedule.constant
    /// p of `power-cosine` (>= 0; 0 is the constant schedule).
    public var cfgPower: Float = 0
    /// LlamaGen's `--cfg-interval`: -1 guides every step; N >= 0 guides steps 0 ... N + 1 only
    /// (LlamaGen's prefill step and its decode steps 0 ... N), later steps use the conditioned logits.
    public var cfgInterval = -1
    public var temperature: Float = 1
    public var topK: Int = 0  // 0: all; 1: greedy (lowest index on a tie)
    public var topP: Float = 1  // 1: all
    public var seed: UInt64 = 0
    /// Per head part (`BaseModel.headParts`); nil, or a part past the end: `cfgScale`.
    public var partCfgScales: [Float]?
    /// Per head part; nil, or a part past the end: `temperature`.
    public var partTemperatures: [Float]?
    public init(cfgScale: Float = 1, temperature: Float = 1, topK: Int = 0, topP: Float = 1, seed: UInt64 = 0) {
        self.cfgScale = cfgScale
        self.temperature = temperature
        self.topK = topK
        self.topP = topP
        self.seed = seed
    }
    /// Part `part`'s guidance scale: guidance applies only above 1 (SPEC section 5).
    public func cfgScale(part: Int) -> Float {
        guard let s = partCfgScales, part < s.count else { return cfgScale }
        return s[part]
    }
    public func temperature(part: Int) -> Float {
        guard let t = partTemperatures, part < t.count else { return temperature }
        return t[part]
    }
    /// The settings part `part` is chosen with.
    func forPart(_ part: Int) -> SamplingOptions {
        var o = self
        o.cfgScale = cfgScale(part: part)
        o.temperature = temperature(part: part)
        return o
    }
    /// Whether any of `parts` parts is guided: then null-class rows run (SPEC sections 5, 8).
    public func guided(parts: Int) -> Bool { (0..<parts).contains { cfgScale(part: $0) > 1 } }
    /// Whether part `part` mixes in the null-class logits at step `position`: its scale is above
    /// 1 and the step is inside `cfgInterval`.
    public func guides(part: Int, position: Int) -> Bool {
        cfgScale(part: part) > 1 && (cfgInterval < 0 || position <= cfgInterval + 1)
    }
    /// w_s, the weight of `l_u + w_s (l_c - l_u)` for scale `g` at step `step` of `steps` (T):
    /// g itself under `constant` or p = 0; else SPEC section 9's power-cosine in Double (s / T,
    /// not s / (T - 1): w_0 = 1).
    public func guidanceWeight(scale g: Float, step: Int, steps: Int) -> Float {
        if cfgSchedule == .constant || cfgPower == 0 { return g }
        let u = pow(Double(step) / Double(steps), Double(cfgPower))
        return Float((Double(g) - 1) * (1 - cos(Double.pi * u)) / 2 + 1)
    }
}

/// Sampled images: tokens (N, T), and each token's refinement trajectory (N, T, k): entry
/// [n, q, s] is the prediction of token q made at slot s (at step q - s); -1 where none.
public struct SampleResult {
    public var tokens: [Int32]
    public var trajectories: [Int32]
    public var labels: [Int32]
}

/// KV-cached next-tensor sampling (SPEC section 5), through the model's own stages: the base's
/// class and token embedding, the plug-in encoder, one cached step of the base's trunk, the
/// plug-in decoder and the base's head, part by part (`BaseModel.headParts`). Null-class rows
/// for guidance are batched with the conditioned rows and fed the same sampled tensors (so the
/// plug-in encoder, which does not see the class, runs on the conditioned rows only and its
/// output is copied). Randomness is keyed by (seed, sample id, step, slot), so a sample does not
/// depend on its batch or rank. Every matmul is one sgemm over all rows; buffers are allocated
/// once per batch size.
public final class Sampler {
    let m: Transformer
    let encoder: EncoderStage?
    let decoder: DecoderStage?
    private var ws: Workspace?
    /// Per part of the token choice (`parallelParts`): its choosers (one per head part) and row.
    private var choosers: [ChooserSlot] = []

    /// Keep the weights packed for the sampling matmuls (`PackedWeightCache`) from one `sample`
    /// call to the next, instead of packing them again in each: only while the model's parameters
    /// do not change (tensorar-sample; not previews during training). Costs one copy of the weights.
    public var keepsPackedWeights = false
    private var packedWeights: PackedWeightCache?

    public init(model: Transformer) {
        m = model
        let c = model.config
        // stages of their own (their buffers are sized for sampling rows), the same weights
        if c.hasPlugin {
            encoder = EncoderStage(base: model.base, config: c, table: model.table, siteBase: 0)
            decoder = DecoderStage(base: model.base, config: c, table: model.table, siteBase: 0)
        } else {
            encoder = nil
            decoder = nil
        }
    }

    /// Scratch of one part of the token choice: a chooser per head part and a guided-logits row.
    final class ChooserSlot {
        var choosers: [TokenChooser]
        var row: [Float]
        init(parts: [Int]) {
            choosers = parts.map { TokenChooser(vocabSize: $0) }
            row = [Float](repeating: 0, count: parts.max()!)
        }
    }

    /// Every buffer one batch of NB rows (n images, times 2 with guidance) needs.
    final class Workspace {
        let n, NB: Int
        let cache: any TrunkCache
        let x: FlatBuffer  // (NB, D) the trunk's rows at the current position
        let logits: FlatBuffer  // (NB, slots, widest part)
        /// The plug-in stages' buffers: the encoder over n images, the decoder over NB rows.
        let stages: ActivationTable
        init(_ m: Transformer, n: Int, NB: Int) {
            let c = m.config
            let widest = m.base.headParts.max()!
            self.n = n
            self.NB = NB
            var a = ActivationLayout()
            if c.hasPlugin {
                // a class-conditioned encoder (RAR) runs on the null rows too
                EncoderStage.addActivations(c, n: m.base.classConditionsPlugin ? NB : n, to: &a)
                DecoderStage.addActivations(c, n: NB, to: &a)
            }
            stages = ActivationTable(a)
            stages.allocate(.forward)
            cache = m.base.makeTrunkCache(rows: NB)
            x = FlatBuffer(count: NB * c.dim)
            logits = FlatBuffer(count: NB * (c.hasPlugin ? c.window : 1) * widest)
        }
    }

    /// Samples one image per label; `sampleIds` (global, e.g. the index in the whole run) key the
    /// randomness. `onStep(p)` reports progress. `steps` (benchmarks only) stops after that many
    /// positions, leaving the rest of the image unsampled (-1).
    public func sample(
        labels: [Int32], sampleIds: [Int], options o: SamplingOptions, steps: Int? = nil,
        onStep: ((Int) -> Void)? = nil
    ) -> SampleResult {
        let c = m.config
        let T = c.seqLen
        let k = c.window
        let n = labels.count
        precondition(sampleIds.count == n, "one sample id per label")
        let guided = o.guided(parts: m.base.headParts.count)
        let NB = guided ? 2 * n : n
        var tokens = [Int32](repeating: -1, count: n * T)
        var traj = [Int32](repeating: -1, count: n * T * k)
        var prev = [Int32](repeating: -1, count: n * k)  // t_{p-1} per image
        if n == 0 { return SampleResult(tokens: tokens, trajectories: traj, labels: labels) }
        prepare(n: n, NB: NB)

        // the weights packed once for this call's steps, or kept for the sampler's life (PackedWeightCache)
        let cache = (keepsPackedWeights ? packedWeights : nil) ?? PackedWeightCache(params: m.params)
        packedWeights = keepsPackedWeights ? cache : nil
        PackedWeightCache.using(cache) {
            samplePositions(
                min(T, steps ?? T), labels: labels, sampleIds: sampleIds, options: o, NB: NB, tokens: &tokens,
                trajectories: &traj, inputs: &prev, onStep: onStep)
        }
        return SampleResult(tokens: tokens, trajectories: traj, labels: labels)
    }

    /// `sample`'s loop over the first `count` positions.
    private func samplePositions(
        _ count: Int, labels: [Int32], sampleIds: [Int], options o: SamplingOptions, NB: Int, tokens: inout [Int32],
        trajectories traj: inout [Int32], inputs prev: inout [Int32], onStep: ((Int) -> Void)?
    ) {
        let c = m.config
        let T = c.seqLen
        let k = c.window
        let n = labels.count
        let rows = c.hasPlugin ? k : 1
        for pos in 0..<count {
            let h = slotStates(position: pos, labels: labels, inputs: prev)
            let chosen = chooseTokens(h, n: n, NB: NB, position: pos, sampleIds: sampleIds, options: o)
            for b in 0..<n {
                for j in 0..<rows {
                    if pos + j >= T {
                        prev[b * k + j] = -1
                        continue
                    }
                    let tok = m.base.token(parts: chosen.map { $0[b * rows + j] })
                    prev[b * k + j] = tok
                    traj[(b * T + pos + j) * k + j] = tok
                }
                tokens[b * T + pos] = prev[b * k]
            }
            onStep?(pos)
        }
    }

    /// Allocates the buffers for n images in NB rows (kept while the sizes stay).
    func prepare(n: Int, NB: Int) {
        if ws != nil && ws!.n == n && ws!.NB == NB { return }
        ws = nil
        let w = Workspace(m, n: n, NB: NB)
        encoder?.bind(w.stages, n: m.base.classConditionsPlugin ? NB : n)
        decoder?.bind(w.stages, n: NB)
        ws = w
    }

    /// One sampling step through the model's stages: the inputs of position `pos` (the class at
    /// 0; else the step inputs t_{pos-1}, `inputs` (n, k), for the n conditioned rows, copied to
    /// the null rows), one cached trunk step, then the decoder. Returns the hidden states of
    /// every (row, slot), (NB, slots, D), for the head. Rows n..<NB hold the null class.
    func slotStates(position pos: Int, labels: [Int32], inputs: [Int32]) -> ConstFloatPtr {
        let c = m.config
        let D = c.dim
        let p = m.params.base
        let w = ws!
        let n = w.n
        let NB = w.NB
        let x = w.x.base
        let rowLabels = (0..<NB).map { $0 < n ? labels[$0] : Int32(c.numClasses) }
        m.base.condition(.sampling(labels: rowLabels, slots: c.hasPlugin ? c.window : 1, position: pos))
        if pos == 0 {
            for r in 0..<NB { m.base.embedClass(x + r * D, label: r < n ? Int(labels[r]) : c.numClasses, params: p) }
        } else {
            if encoder != nil && m.base.classConditionsPlugin {
                // RAR's encoder sees the class (c_q, SPEC section 9): the null rows run it on the same tensors
                embedInputs(NB > n ? inputs + inputs : inputs, rows: NB, into: x)
            } else {
                embedInputs(inputs, rows: n, into: x)
                if NB > n { (x + n * D).update(from: x, count: n * D) }  // null rows: same tensors, same input
            }
        }
        m.base.trunkStep(x, cache: w.cache, position: pos, params: p)
        guard let decoder else { return UnsafePointer(x) }
        return UnsafePointer(decoder.forward(x, n: NB, dropout: nil, params: p).base)
    }

    /// For each head part in turn: the logits of every (row, slot), guidance, then each valid
    /// slot's choice (the null rows get the same choice). Returns [part][b * slots + j]. The
    /// choices are split by (image, slot) over the threads, each with its own random stream.
    private func chooseTokens(
        _ h: ConstFloatPtr, n: Int, NB: Int, position pos: Int, sampleIds: [Int],
        options o: SamplingOptions
    ) -> [[Int32]] {
        let c = m.config
        let k = c.window
        let rows = c.hasPlugin ? k : 1
        let logits = ws!.logits.base
        var rngs = [CounterRNG]()
        for b in 0..<n {
            for j in 0..<rows {
                let slot = UInt64(pos * k + j)
                rngs.append(CounterRNG(seed: o.seed, UInt64(sampleIds[b]), RandomPurpose.sampling.rawValue, slot))
            }
        }
        while choosers.count < maxParts() { choosers.append(ChooserSlot(parts: m.base.headParts)) }
        var chosen: [[Int32]] = []
        for (part, V) in m.base.headParts.enumerated() {
            m.base.headLogits(logits, h, rows: NB * rows, part: part, chosen: chosen, params: m.params.base)
            var pick = [Int32](repeating: -1, count: NB * rows)
            pick.withUnsafeMutableBufferPointer { pickBuf in
                rngs.withUnsafeMutableBufferPointer { rngBuf in
                    let choice = Choice(
                        logits: logits, pick: pickBuf.baseAddress!, rngs: rngBuf.baseAddress!, n: n,
                        NB: NB, slots: rows, vocab: V, part: part, position: pos)
                    parallelParts(n * rows, cost: 16 * V) { range, worker in
                        for index in range { choose(choice, index: index, slot: choosers[worker], options: o) }
                    }
                }
            }
            chosen.append(pick)
        }
        return chosen
    }

    /// Where one head part's token choice reads and writes.
    private struct Choice {
        let logits: ConstFloatPtr  // (NB, slots, V)
        let pick: UnsafeMutablePointer<Int32>
        let rngs: UnsafeMutablePointer<CounterRNG>  // one per (image, slot); head parts draw in turn
        let n, NB, slots, vocab, part, position: Int
    }

    /// The choice for conditioned row `index` (image b, slot j) and its null row: guidance (only
    /// above 1 and inside the cfg interval; weight w_s of the step, one for all k slots, SPEC 9),
    /// then the chooser with the part's settings (SPEC 5, 8).
    private func choose(_ c: Choice, index: Int, slot: ChooserSlot, options o: SamplingOptions) {
        let (b, j) = index.quotientAndRemainder(dividingBy: c.slots)
        if c.position + j >= m.config.seqLen { return }
        let V = c.vocab
        let cond = c.logits + index * V
        let po = o.forPart(c.part)  // this part's scale and temperature (SPEC section 8)
        let tok = slot.row.withUnsafeMutableBufferPointer { rowBuf -> Int32 in
            let row = rowBuf.baseAddress!
            if o.guides(part: c.part, position: c.position) {
                let un = c.logits + ((c.n + b) * c.slots + j) * V
                let s = o.guidanceWeight(scale: po.cfgScale, step: c.position, steps: m.config.seqLen)
                for v in 0..<V { row[v] = un[v] + s * (cond[v] - un[v]) }
            } else {
                row.update(from: cond, count: V)
            }
            return Int32(slot.choosers[c.part].choose(row, options: po, uniform: c.rngs[index].uniform()))
        }
        c.pick[index] = tok
        if c.NB > c.n { c.pick[(c.n + b) * c.slots + j] = tok }
    }

    /// Base-trunk input vectors (the first `rows` rows of x) for step inputs t (rows, k): the
    /// plug-in encoder or the base's token embedding (SPEC section 3).
    func embedInputs(_ t: [Int32], rows: Int, into x: FloatPtr) {
        let D = m.config.dim
        let p = m.params.base
        guard let encoder else {
            t.withUnsafeBufferPointer { m.base.embedTokens(x, $0.baseAddress!, n: rows, params: p) }
            return
        }
        encoder.forward(t, n: rows, noise: nil, dropout: nil, params: p) { r in x + r * D }
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
        let mx = laneMax(logits, count: V)
        let invT = 1 / o.temperature
        return keys.withUnsafeMutableBufferPointer { kb -> Int in
            spare.withUnsafeMutableBufferPointer { sb -> Int in
                probs.withUnsafeMutableBufferPointer { pb -> Int in
                    let key = kb.baseAddress!
                    let pr = pb.baseAddress!
                    // unnormalised probabilities in index order (vectorised exp)
                    for v in 0..<V { pr[v] = fexp((logits[v] - mx) * invT) }
                    for v in 0..<V { key[v] = UInt64(TokenChooser.descendingKey(logits[v])) << 32 | UInt64(v) }
                    if K == V && o.topP >= 1 {
                        return TokenChooser.inverseCDFByBuckets(key, pr, spare: sb.baseAddress!, count: V, uniform: u)
                    }
                    if K < V {
                        // selection scrambles the index order: sort by the index bits too
                        TokenChooser.selectSmallest(key, count: V, k: K)
                        TokenChooser.radixSort(
                            key, spare: sb.baseAddress!, count: K, lowBits: Int.bitWidth - (V - 1).leadingZeroBitCount)
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
                        for i in 0..<K {
                            cum += p(i)
                            if cum >= target {
                                keep = i + 1
                                break
                            }
                        }
                        z = 0
                        for i in 0..<keep { z += p(i) }
                    }
                    let target = u * z
                    var cum: Float = 0
                    for i in 0..<keep {
                        cum += p(i)
                        if target < cum { return Int(key[i] & 0xFFFF_FFFF) }
                    }
                    return Int(key[keep - 1] & 0xFFFF_FFFF)
                }
            }
        }
    }

    /// The inverse CDF over all V candidates in key order (no top-k, no top-p: the published
    /// settings of every base) without sorting them all: the keys' top 11 bits (sign, exponent and
    /// one mantissa bit of the logit) put the candidates into 2048 buckets that lie in key order;
    /// each bucket's mass is summed in index order, z is the sum of the masses in bucket order, and
    /// only the bucket where the cumulative mass passes u z is sorted and walked. The token is the
    /// sorted definition's up to float rounding of the sums (`SamplerTests`: against the definition,
    /// within 1e-5 of u), and it depends on nothing but the logits and u (not the batch, the rank or
    /// the thread count). Two passes over the V keys (the masses, then gathering one bucket), one over
    /// the 2048 buckets and a sort of that bucket's keys, instead of a sort of all V.
    /// The buckets of `inverseCDFByBuckets`: a key's top 11 bits.
    static let bucketShift = 53
    static let bucketCount = 1 << (64 - bucketShift)

    static func inverseCDFByBuckets(
        _ key: UnsafeMutablePointer<UInt64>, _ pr: UnsafePointer<Float>, spare: UnsafeMutablePointer<UInt64>,
        count V: Int, uniform u: Float
    ) -> Int {
        withUnsafeTemporaryAllocation(of: Float.self, capacity: bucketCount) { mb in
            withUnsafeTemporaryAllocation(of: Int32.self, capacity: bucketCount) { cb in
                let mass = mb.baseAddress!
                let count = cb.baseAddress!
                mass.initialize(repeating: 0, count: bucketCount)
                count.initialize(repeating: 0, count: bucketCount)
                for v in 0..<V {
                    let b = Int(key[v] >> bucketShift)
                    mass[b] += pr[v]
                    count[b] += 1
                }
                var z: Float = 0
                for b in 0..<bucketCount { z += mass[b] }
                let target = u * z
                // the bucket where the cumulative mass passes the target (else the last one: rounding)
                var chosen = -1
                var last = 0
                var before: Float = 0
                for b in 0..<bucketCount where count[b] > 0 {
                    last = b
                    if target < before + mass[b] {
                        chosen = b
                        break
                    }
                    before += mass[b]
                }
                if chosen < 0 {
                    chosen = last
                    before = z - mass[last]
                }
                var n = 0
                for v in 0..<V where Int(key[v] >> bucketShift) == chosen {
                    spare[n] = key[v]
                    n += 1
                }
                TokenChooser.radixSort(spare, spare: key, count: n)
                var cum = before
                for i in 0..<n {
                    let v = Int(spare[i] & 0xFFFF_FFFF)
                    cum += pr[v]
                    if target < cum { return v }
                }
                return Int(spare[n - 1] & 0xFFFF_FFFF)
            }
        }
    }

    /// LSD radix sort of a[0..<n] by the upper 32 bits and the lowest `lowBits` bits (passes of 11
    /// bits, low digits first; a pass where every key has the same digit is skipped). Stable, so
    /// with lowBits 0 keys equal in the upper half keep their order. `spare` holds n keys.
    static func radixSort(
        _ a: UnsafeMutablePointer<UInt64>, spare: UnsafeMutablePointer<UInt64>, count n: Int, lowBits: Int = 0
    ) {
        if n < 2 { return }
        var shifts: [UInt64] = stride(from: 0, to: lowBits, by: 11).map { UInt64($0) }
        shifts += [32, 43, 54]
        var src = a
        var dst = spare
        withUnsafeTemporaryAllocation(of: Int.self, capacity: 2048) { cb in
            let cnt = cb.baseAddress!
            for shift in shifts {
                cnt.initialize(repeating: 0, count: 2048)
                for i in 0..<n { cnt[Int((src[i] >> shift) & 0x7FF)] += 1 }
                if cnt[Int((src[0] >> shift) & 0x7FF)] == n { continue }
                var total = 0
                for b in 0..<2048 {
                    let c = cnt[b]
                    cnt[b] = total
                    total += c
                }
                for i in 0..<n {
                    let kv = src[i]
                    let b = Int((kv >> shift) & 0x7FF)
                    dst[cnt[b]] = kv
                    cnt[b] += 1
                }
                swap(&src, &dst)
            }
        }
        if src != a { a.update(from: src, count: n) }
    }

    /// Moves the k smallest of a[0..<n] (distinct values) to a[0..<k], in any order (quickselect,
    /// median-of-three pivots).
    static func selectSmallest(_ a: UnsafeMutablePointer<UInt64>, count n: Int, k: Int) {
        var lo = 0
        var hi = n - 1  // the k-th smallest (index k - 1) lies in [lo, hi]
        let target = k - 1
        while hi > lo {
            let mid = lo + (hi - lo) / 2
            var x = a[lo]
            var y = a[mid]
            var z = a[hi]
            if x > y { swap(&x, &y) }
            if y > z { swap(&y, &z) }
            if x > y { swap(&x, &y) }
            let pivot = y
            var i = lo
            var j = hi
            while i <= j {
                while a[i] < pivot { i += 1 }
                while a[j] > pivot { j -= 1 }
                if i <= j {
                    let t = a[i]
                    a[i] = a[j]
                    a[j] = t
                    i += 1
                    j -= 1
                }
            }
            if target <= j { hi = j } else if target >= i { lo = i } else { return }
        }
    }
}
