import Kernels
import Platform
import XCTest

@testable import ARModel

final class SamplerTests: XCTestCase {
    func model(window: Int, depth: Int, seed: UInt64 = 1, residual: Bool = true) throws -> Transformer {
        let c = ModelConfig(
            vocabSize: 20, numClasses: 3, gridSize: 3, dim: 16, nLayer: 2, nHead: 2, ffnHidden: 32, window: window,
            pluginDepth: depth, residual: residual)
        let m = try Transformer(config: c)
        m.initialise(seed: seed)
        // non-trivial plug-in and head so the test means something
        var rng = CounterRNG(seed: seed + 100)
        for e in m.table.entries where e.name.hasSuffix("proj.weight") || e.name == "output.weight" {
            for i in 0..<e.count { m.params[e.offset + i] = 0.3 * rng.normal() }
        }
        return m
    }

    /// The uncached path: one teacher-forced forward over the tensors the sampler produced must
    /// choose, at every position and slot, the token the cached sampler chose.
    /// `interval`: LlamaGen's cfg_interval, guidance at steps 0 ... interval + 1 (-1: every step).
    /// `power`: the power-cosine schedule's p (nil: constant), its weight worked out here by hand.
    /// Returns the sampled tokens.
    @discardableResult
    func checkCachedMatchesUncached(_ m: Transformer, cfg: Float, interval: Int = -1, power: Float? = nil) -> [Int32] {
        let c = m.config
        let T = c.seqLen
        let k = c.window
        let V = c.vocabSize
        let labels: [Int32] = [0, 2, 1]
        var options = SamplingOptions(cfgScale: cfg, topK: 1)
        options.cfgInterval = interval
        if let power {
            options.cfgSchedule = .powerCosine
            options.cfgPower = power
        }
        // SPEC section 9: w_s = (g - 1)(1 - cos(pi (s / T)^p)) / 2 + 1, one weight per step for every slot
        func weight(_ step: Int) -> Float {
            guard let power else { return cfg }
            let u = pow(Double(step) / Double(T), Double(power))
            return Float((Double(cfg) - 1) * (1 - cos(Double.pi * u)) / 2 + 1)
        }
        let s = Sampler(model: m).sample(labels: labels, sampleIds: [0, 1, 2], options: options)
        // t_p[j] = trajectory[p + j][slot j]
        var tensors = [Int32](repeating: -1, count: 3 * (T - 1) * k)
        for b in 0..<3 {
            for q in 0..<(T - 1) {
                for j in 0..<k where q + j < T {
                    tensors[(b * (T - 1) + q) * k + j] = s.trajectories[(b * T + q + j) * k + j]
                }
            }
        }
        func logits(_ lab: [Int32]) -> [Float] {
            var out = [Float](repeating: 0, count: 3 * T * k * V)
            out.withUnsafeMutableBufferPointer {
                _ = m.forward(
                    ModelBatch(batch: 3, tokens: s.tokens, labels: lab, tensors: tensors), logits: $0.baseAddress!)
            }
            return out
        }
        let lc = logits(labels)
        let lu = logits([Int32](repeating: Int32(c.numClasses), count: 3))
        for b in 0..<3 {
            for q in 0..<T {
                for j in 0..<k where q + j < T {
                    var row = (0..<V).map { v -> Float in
                        let i = ((b * T + q) * k + j) * V + v
                        let guided = cfg > 1 && (interval < 0 || q <= interval + 1)
                        return guided ? lu[i] + weight(q) * (lc[i] - lu[i]) : lc[i]
                    }
                    let want = Sampler.choose(&row, options: SamplingOptions(topK: 1), uniform: 0)
                    XCTAssertEqual(Int(s.trajectories[(b * T + q + j) * k + j]), want, "image \(b) step \(q) slot \(j)")
                }
                XCTAssertEqual(
                    s.tokens[b * T + q], s.trajectories[(b * T + q) * k], "slot 0 of step p is the final token p")
            }
        }
        return s.tokens
    }

    /// A model whose class matters (large class and token embeddings), so guidance changes its samples.
    func guidanceModel(window: Int, depth: Int) throws -> Transformer {
        let m = try model(window: window, depth: depth, seed: 5)
        var rng = CounterRNG(seed: 77)
        for e in m.table.entries where e.name.hasPrefix("cls_embedding") || e.name == "tok_embeddings.weight" {
            for i in 0..<e.count { m.params[e.offset + i] = rng.normal() }
        }
        return m
    }

    /// As LlamaGen: no guidance at a scale of 1 or below (at 0.5 the samples are the unguided ones,
    /// not an extrapolation away from the condition).
    func testNoGuidanceAtScaleOneOrBelow() throws {
        let m = try guidanceModel(window: 3, depth: 1)
        let unguided = checkCachedMatchesUncached(m, cfg: 1)
        XCTAssertEqual(checkCachedMatchesUncached(m, cfg: 0.5), unguided)
        XCTAssertEqual(checkCachedMatchesUncached(m, cfg: -2), unguided)
        XCTAssertFalse(SamplingOptions(cfgScale: 0.5).guided(parts: 1))
        // the old rule (guide at any scale but 1) extrapolated at 0.5: a different image here
        let o = SamplingOptions(cfgScale: 0.5, topK: 1)
        let guided = SamplingOptions(cfgScale: 1.5, topK: 1)
        let old = Sampler(model: m).sample(labels: [0, 2, 1], sampleIds: [0, 1, 2], options: guided)
        XCTAssertEqual(Sampler(model: m).sample(labels: [0, 2, 1], sampleIds: [0, 1, 2], options: o).tokens, unguided)
        XCTAssertNotEqual(old.tokens, unguided, "guidance changes this model's samples, so the test can fail")
    }

    /// LlamaGen's cfg_interval: guided steps 0 ... N + 1, the rest conditioned only.
    func testCfgIntervalGuidesTheFirstSteps() throws {
        for (window, depth) in [(1, 0), (3, 1)] {
            let m = try guidanceModel(window: window, depth: depth)
            let full = checkCachedMatchesUncached(m, cfg: 4)
            let none = checkCachedMatchesUncached(m, cfg: 1)
            let interval = checkCachedMatchesUncached(m, cfg: 4, interval: 0)
            let past = checkCachedMatchesUncached(m, cfg: 4, interval: 100)
            XCTAssertEqual(past, full, "an interval past the end: every step")
            XCTAssertNotEqual(full, none, "guidance matters for this model (k = \(window))")
            XCTAssertNotEqual(interval, full, "steps after 1 unguided (k = \(window))")
            XCTAssertTrue(SamplingOptions(cfgScale: 4).guides(part: 0, position: 8))
            var o = SamplingOptions(cfgScale: 4)
            o.cfgInterval = 0
            XCTAssertEqual((0..<4).map { o.guides(part: 0, position: $0) }, [true, true, false, false])
        }
    }

    /// SPEC section 9's guidance weight: w_0 = 1 for p > 0, the middle value, p = 0 and the
    /// constant schedule are g; rising with the step; only the scale decides guidance.
    func testGuidanceWeightSchedule() {
        var o = SamplingOptions(cfgScale: 16)
        XCTAssertEqual(o.guidanceWeight(scale: 16, step: 0, steps: 256), 16, "constant: g at every step")
        XCTAssertEqual(o.guidanceWeight(scale: 16, step: 200, steps: 256), 16)
        o.cfgSchedule = .powerCosine
        o.cfgPower = 1
        XCTAssertEqual(o.guidanceWeight(scale: 16, step: 0, steps: 256), 1)
        XCTAssertEqual(o.guidanceWeight(scale: 16, step: 128, steps: 256), 8.5, accuracy: 1e-5, "(g - 1) / 2 + 1")
        o.cfgPower = 2.75  // RAR-B's published p: at s = T/2, 1 - cos(pi 0.5^2.75) = 0.10708
        let half = (16.0 - 1) * (1 - cos(Double.pi * pow(0.5, 2.75))) / 2 + 1
        XCTAssertEqual(Double(o.guidanceWeight(scale: 16, step: 128, steps: 256)), half, accuracy: 1e-5)
        XCTAssertEqual(half, 1.8031, accuracy: 1e-4)
        let ws = (0..<256).map { o.guidanceWeight(scale: 16, step: $0, steps: 256) }
        XCTAssertEqual(ws[0], 1)
        XCTAssertTrue(zip(ws, ws.dropFirst()).allSatisfy { $0 <= $1 }, "rising")
        XCTAssertLessThan(ws[255], 16)
        XCTAssertGreaterThan(ws[255], 15.99)
        o.cfgPower = 0
        XCTAssertTrue((0..<256).allSatisfy { o.guidanceWeight(scale: 16, step: $0, steps: 256) == 16 }, "p = 0")
        // w_0 = 1, yet the rows exist and the step is guided: that follows g alone (SPEC section 5)
        o.cfgPower = 1
        XCTAssertTrue(o.guided(parts: 1))
        XCTAssertTrue(o.guides(part: 0, position: 0))
        o.cfgScale = 1
        XCTAssertFalse(o.guided(parts: 1))
    }

    /// The constant schedule (the default) and power-cosine with p = 0 sample what today's sampler
    /// samples, bit for bit (random choices: a logit that moved could move a token); power-cosine
    /// with p > 0 samples something else, and at every step and slot the token of the teacher-forced
    /// logits guided by hand with that step's w_s.
    func testGuidanceScheduleSamples() throws {
        for (window, depth) in [(1, 0), (3, 1)] {
            let m = try guidanceModel(window: window, depth: depth)
            let sampler = Sampler(model: m)
            let today = SamplingOptions(cfgScale: 3, temperature: 1, topK: 0, topP: 1, seed: 4)
            let base = sampler.sample(labels: [0, 2, 1, 1], sampleIds: [0, 1, 2, 3], options: today)
            for (schedule, power) in [(GuidanceSchedule.constant, Float(0)), (.constant, 2), (.powerCosine, 0)] {
                var o = today
                o.cfgSchedule = schedule
                o.cfgPower = power
                let r = sampler.sample(labels: [0, 2, 1, 1], sampleIds: [0, 1, 2, 3], options: o)
                XCTAssertEqual(r.tokens, base.tokens, "\(schedule) p \(power), k = \(window)")
                XCTAssertEqual(r.trajectories, base.trajectories)
            }
            // (this model's images are mostly decided by their first tokens, where w_s is small)
            let constant = checkCachedMatchesUncached(m, cfg: 8)
            let cosine = checkCachedMatchesUncached(m, cfg: 8, power: 0.5)
            XCTAssertNotEqual(cosine, constant, "the schedule changes this model's samples (k = \(window))")
            XCTAssertNotEqual(cosine, checkCachedMatchesUncached(m, cfg: 1), "and is not the unguided sample")
            XCTAssertNotEqual(checkCachedMatchesUncached(m, cfg: 8, power: 2), cosine)
            // composes with the cfg interval: guided steps 0 and 1 only, weighted (w_0 = 1)
            checkCachedMatchesUncached(m, cfg: 8, interval: 0, power: 0.5)
        }
    }

    func testCachedSamplingMatchesTheTeacherForcedModel() throws {
        checkCachedMatchesUncached(try model(window: 1, depth: 0), cfg: 1)
        checkCachedMatchesUncached(try model(window: 3, depth: 1), cfg: 1)
        checkCachedMatchesUncached(try model(window: 3, depth: 2, residual: false), cfg: 2.5)
    }

    func testGreedyIsDeterministicAndSeedReproducesSampling() throws {
        let m = try model(window: 2, depth: 1)
        let s = Sampler(model: m)
        let a = s.sample(labels: [1, 2], sampleIds: [0, 1], options: SamplingOptions(cfgScale: 1.5, topK: 1))
        let b = s.sample(
            labels: [1, 2], sampleIds: [0, 1], options: SamplingOptions(cfgScale: 1.5, topK: 1, seed: 99))
        XCTAssertEqual(a.tokens, b.tokens, "greedy ignores the seed")
        let o = SamplingOptions(cfgScale: 1.5, temperature: 1.0, topK: 10, topP: 0.9, seed: 5)
        let c1 = s.sample(labels: [1, 2], sampleIds: [0, 1], options: o)
        let c2 = s.sample(labels: [1, 2], sampleIds: [0, 1], options: o)
        XCTAssertEqual(c1.tokens, c2.tokens)
        XCTAssertEqual(c1.trajectories, c2.trajectories)
        // a sample does not depend on its batch-mates. Equal tokens, though the logits may differ
        // in the last bits with the batch (OpenBLAS Zen/Haswell kernels round by the call's rows):
        // a draw changes only if its uniform number falls within that rounding of a boundary of
        // the cumulative distribution, about 1e-7 per draw, so about 1e-5 over this test's draws.
        let single = s.sample(labels: [2], sampleIds: [1], options: o)
        XCTAssertEqual(single.tokens, Array(c1.tokens[9...]))
        var o2 = o
        o2.seed = 6
        XCTAssertNotEqual(s.sample(labels: [1, 2], sampleIds: [0, 1], options: o2).tokens, c1.tokens)
    }

    func testFreshPluginWindowOneSamplesWhatTheBaseSamples() throws {
        let base = try model(window: 1, depth: 0, seed: 3)
        var c = base.config
        c.window = 1
        c.pluginDepth = 2
        let plug = try Transformer(config: c)
        plug.initialise(seed: 4)
        for e in base.table.entries {
            plug.view(e.name).baseAddress!.update(from: base.view(e.name).baseAddress!, count: e.count)
        }
        let o = SamplingOptions(cfgScale: 2, temperature: 1, topK: 0, topP: 1, seed: 8)
        let a = Sampler(model: base).sample(labels: [0, 1, 2], sampleIds: [0, 1, 2], options: o)
        let b = Sampler(model: plug).sample(labels: [0, 1, 2], sampleIds: [0, 1, 2], options: o)
        XCTAssertEqual(a.tokens, b.tokens)
    }

    func testChooseRespectsTopKAndTopP() {
        var logits: [Float] = [0, 5, 5, 1, -2]
        XCTAssertEqual(
            Sampler.choose(&logits, options: SamplingOptions(topK: 1), uniform: 0.7), 1,
            "greedy tie goes to the lower index")
        for u in stride(from: Float(0), to: 1, by: 0.05) {
            var l = logits
            let t = Sampler.choose(&l, options: SamplingOptions(topK: 2), uniform: u)
            XCTAssertTrue(t == 1 || t == 2)
            var l2: [Float] = [0, 10, 0, 0, 0]
            XCTAssertEqual(
                Sampler.choose(&l2, options: SamplingOptions(topP: 0.5), uniform: u), 1,
                "top-p 0.5 keeps only the dominant token")
        }
    }

    /// The fast chooser (integer keys, radix sort, top-k selection) against the plain definition:
    /// candidates sorted by logit (high first, lower index on a tie), top-k, softmax at the
    /// temperature, top-p prefix, inverse CDF.
    func naiveChoose(_ logits: [Float], _ o: SamplingOptions, _ u: Float) -> Int {
        let V = logits.count
        var order = Array(0..<V)
        order.sort { logits[$0] > logits[$1] || (logits[$0] == logits[$1] && $0 < $1) }
        if o.topK > 0 && o.topK < V { order = Array(order.prefix(o.topK)) }
        let mx = logits[order[0]]
        var probs = order.map { Double(exp((logits[$0] - mx) / o.temperature)) }
        var z = probs.reduce(0, +)
        probs = probs.map { $0 / z }
        if o.topP < 1 {
            var cum = 0.0
            var keep = probs.count
            for (i, q) in probs.enumerated() {
                cum += q
                if cum >= Double(o.topP) {
                    keep = i + 1
                    break
                }
            }
            probs = Array(probs.prefix(keep))
            order = Array(order.prefix(keep))
            z = probs.reduce(0, +)
            probs = probs.map { $0 / z }
        }
        var cum = 0.0
        for (i, q) in probs.enumerated() {
            cum += q
            if Double(u) < cum { return order[i] }
        }
        return order[order.count - 1]
    }

    func testFastChooserMatchesTheDefinition() {
        var rng = CounterRNG(seed: 42)
        var mismatches = 0
        var total = 0
        for trial in 0..<40 {
            let V = [7, 50, 600, 2000][trial % 4]
            // coarse logits (many exact ties), negative and positive
            var logits = (0..<V).map { _ in Float(Int(rng.below(40)) - 20) * 0.25 }
            if trial % 5 == 0 { logits = logits.map { -$0 } }
            let options = [
                SamplingOptions(temperature: 1), SamplingOptions(temperature: 0.7, topK: 5),
                SamplingOptions(temperature: 1.3, topP: 0.8),
                SamplingOptions(temperature: 1, topK: V / 2 + 1, topP: 0.9),
            ]
            for o in options {
                for _ in 0..<10 {
                    let u = rng.uniform()
                    var l = logits
                    let fast = Sampler.choose(&l, options: o, uniform: u)
                    let slow = naiveChoose(logits, o, u)
                    total += 1
                    // Float against Double sums: only at a CDF boundary may the two differ, and
                    // then the fast choice is the definition's for a slightly different u
                    if fast != slow && fast != naiveChoose(logits, o, u - 1e-5)
                        && fast != naiveChoose(logits, o, u + 1e-5)
                    {
                        mismatches += 1
                    }
                    if o.topK > 0 {
                        let kth = logits.sorted(by: >)[min(o.topK, V) - 1]
                        XCTAssertGreaterThanOrEqual(logits[fast], kth, "top-k keeps only the k best (V \(V))")
                    }
                }
            }
        }
        XCTAssertEqual(mismatches, 0, "\(mismatches) of \(total) choices differ from the definition")
    }

    func testRadixSortAndSelection() {
        var rng = CounterRNG(seed: 9)
        for n in [1, 2, 17, 1000, 5000] {
            var keys = (0..<n).map { i in
                UInt64(TokenChooser.descendingKey(Float(Int(rng.below(64)) - 32) * 0.5)) << 32 | UInt64(i)
            }
            let want = keys.sorted()
            var spare = keys
            keys.withUnsafeMutableBufferPointer { kb in
                spare.withUnsafeMutableBufferPointer {
                    TokenChooser.radixSort(kb.baseAddress!, spare: $0.baseAddress!, count: n)
                }
            }
            XCTAssertEqual(keys, want, "radix sort of \(n) keys")
            var scrambled = want
            scrambled.shuffle(using: &rng)
            var spare2 = scrambled
            scrambled.withUnsafeMutableBufferPointer { kb in
                spare2.withUnsafeMutableBufferPointer {
                    TokenChooser.radixSort(kb.baseAddress!, spare: $0.baseAddress!, count: n, lowBits: 13)
                }
            }
            XCTAssertEqual(scrambled, want, "radix sort of \(n) scrambled keys with the index bits")
            for k in Set([1, n / 3 + 1, n]) {
                var shuffled = want
                shuffled.shuffle(using: &rng)
                shuffled.withUnsafeMutableBufferPointer { TokenChooser.selectSmallest($0.baseAddress!, count: n, k: k) }
                XCTAssertEqual(Set(shuffled.prefix(k)), Set(want.prefix(k)), "the \(k) smallest of \(n)")
            }
        }
        // the key order is the logit order, high first, NaN-free floats of both signs
        let values: [Float] = [3, -0.0, 0, -2, 1e-30, -1e30, .infinity, -.infinity]
        let sorted = values.indices.sorted {
            TokenChooser.descendingKey(values[$0]) < TokenChooser.descendingKey(values[$1])
        }
        XCTAssertEqual(sorted.map { values[$0] }, [.infinity, 3, 1e-30, 0, -0.0, -2, -1e30, -.infinity])
    }

    func testStepsLimitAndBatchReuse() throws {
        let m = try model(window: 3, depth: 1)
        let s = Sampler(model: m)
        let o = SamplingOptions(cfgScale: 2, temperature: 1, topK: 5, seed: 3)
        let full = s.sample(labels: [0, 1], sampleIds: [4, 5], options: o)
        let part = s.sample(labels: [0, 1], sampleIds: [4, 5], options: o, steps: 4)
        let T = m.config.seqLen
        for b in 0..<2 {
            XCTAssertEqual(Array(part.tokens[(b * T)..<(b * T + 4)]), Array(full.tokens[(b * T)..<(b * T + 4)]))
            XCTAssertTrue(part.tokens[(b * T + 4)..<((b + 1) * T)].allSatisfy { $0 == -1 })
        }
        // the workspace is reused across calls and batch sizes without leaking state
        _ = s.sample(labels: [2, 2, 2], sampleIds: [0, 1, 2], options: o)
        XCTAssertEqual(s.sample(labels: [0, 1], sampleIds: [4, 5], options: o).tokens, full.tokens)
    }
}
