import Kernels
import Platform
import XCTest

/// Every kernel gives the same bits on 1, 2 and 3 threads. The work threshold is lowered so that
/// these small shapes are split into many parts, and the pool's job count proves they were.
final class ThreadTests: XCTestCase {
    /// Runs `body` at 1, 2 and 3 threads and compares the floats it returns bit for bit.
    func sameAtAnyThreadCount(
        _ what: String, file: StaticString = #filePath, line: UInt = #line,
        _ body: () -> [Float]
    ) {
        let savedThreads = BLAS.threads
        let savedWork = kernelSerialWork
        defer {
            BLAS.threads = savedThreads
            kernelSerialWork = savedWork
        }
        kernelSerialWork = 16
        BLAS.threads = 1
        let want = body()
        for threads in [2, 3] {
            BLAS.threads = threads
            let jobs = ComputePool.shared.parallelJobs
            let got = body()
            XCTAssertGreaterThan(
                ComputePool.shared.parallelJobs, jobs, "\(what): no job was split",
                file: file, line: line)
            XCTAssertEqual(got.count, want.count, what, file: file, line: line)
            let differ = zip(got, want).enumerated().first { $0.element.0.bitPattern != $0.element.1.bitPattern }
            XCTAssertNil(
                differ, "\(what): \(threads) threads differ from 1 at element \(differ?.offset ?? -1)",
                file: file, line: line)
        }
    }

    func randoms(_ n: Int, seed: UInt64) -> [Float] {
        var r = CounterRNG(seed: seed)
        return (0..<n).map { _ in r.normal() }
    }

    /// The split copies and zeroing, the out-of-place dropout and the overwriting matmul backward:
    /// the same bits at 1, 2 and 3 threads, and the same as what they replace (copy, zero, then
    /// x *= mask; adding dout W to zeros). The overwritten buffer starts as NaN, which a beta of 1
    /// (reading it) would carry into the result.
    func testCopiesZeroingAndOverwritingBackwardSplitAndMatchWhatTheyReplace() {
        let n = 37
        let ic = 24
        let oc = 40
        let x = randoms(n * oc, seed: 5)
        let mask = randoms(n * oc, seed: 6).map { $0 > 0 ? Float(1.25) : 0 }
        let w = randoms(oc * ic, seed: 7)
        sameAtAnyThreadCount("copies, zeroing, dropout, overwriting matmul backward") {
            var copy = [Float](repeating: .nan, count: n * oc)
            var zeros = [Float](repeating: .nan, count: n * oc)
            var dropped = [Float](repeating: .nan, count: n * oc)
            var written = [Float](repeating: .nan, count: n * ic)
            var added = [Float](repeating: 0, count: n * ic)
            copyFloats(&copy, from: x, count: n * oc)
            zeroFloats(&zeros, count: n * oc)
            dropoutApply(&dropped, x, mask, count: n * oc)
            matmulBackward(&written, nil, x, x, w, n: n, ic: ic, oc: oc, addToInput: false)
            matmulBackward(&added, nil, x, x, w, n: n, ic: ic, oc: oc)
            XCTAssertEqual(copy, x)
            XCTAssertEqual(zeros, [Float](repeating: 0, count: n * oc))
            var inPlace = x
            dropoutApply(&inPlace, mask, count: n * oc)
            XCTAssertEqual(dropped, inPlace)
            XCTAssertEqual(written, added, "writing dout W equals adding it to zeros")
            return copy + zeros + dropped + written
        }
    }

    /// The pool runs every part exactly once, from nested calls too, and starts no thread per
    /// call: the pool's threads ("compute-N" in /proc/self/task) are the same after 2000 jobs. Only
    /// those are counted: other tests in this process leave threads of their own coming and going.
    func testPoolRunsEachPartOnceAndStartsNoThreadPerCall() throws {
        let saved = BLAS.threads
        defer { BLAS.threads = saved }
        BLAS.threads = 3
        func threadNames() throws -> [String] {
            try FileManager.default.contentsOfDirectory(atPath: "/proc/self/task").map { task in
                (try? String(contentsOfFile: "/proc/self/task/\(task)/comm", encoding: .utf8)) ?? ""
            }
        }
        func threadCount() throws -> Int { try threadNames().filter { $0.hasPrefix("compute-") }.count }
        let counts = UnsafeMutablePointer<Int>.allocate(capacity: 64)
        defer { counts.deallocate() }
        // the workers are up and have named themselves (each does as its thread starts: on a loaded machine that
        // can take a while, so wait for it, up to 10 s, rather than assume a number of jobs is enough)
        let waitUntil = DispatchTime.now().uptimeNanoseconds + 10_000_000_000
        repeat {
            for _ in 0..<200 { ComputePool.shared.run(parts: 3) { _ in } }
        } while try threadCount() < 2 && DispatchTime.now().uptimeNanoseconds < waitUntil
        let before = try threadCount()
        let names = try threadNames()
        XCTAssertGreaterThanOrEqual(
            before, 2, "the pool's 2 workers (beside the caller) are named compute-N; the process's threads: \(names)")
        let t0 = DispatchTime.now().uptimeNanoseconds
        for job in 0..<2000 {
            let parts = 1 + job % 64
            counts.initialize(repeating: 0, count: parts)
            ComputePool.shared.run(parts: parts) { part in
                counts[part] += 1
                if part == 0 { ComputePool.shared.run(parts: 2) { _ in counts[0] += 0 } }  // nested: serial
            }
            XCTAssertTrue((0..<parts).allSatisfy { counts[$0] == 1 }, "job \(job): every part once")
        }
        let perJob = Double(DispatchTime.now().uptimeNanoseconds - t0) / 2000 / 1000
        XCTAssertEqual(try threadCount(), before, "no thread started per call")
        print(String(format: "compute pool: %.1f us per job of 1-64 empty parts on 3 threads", perJob))
    }

    /// The benchmark's accounting: a job's wall time and the sum of its parts' times are counted
    /// while `accounting` is on, work outside a job or on one thread is not, and nothing is counted
    /// while it is off.
    func testAccountingCountsJobsAndParts() {
        let saved = BLAS.threads
        defer { BLAS.threads = saved }
        let pool = ComputePool.shared
        BLAS.threads = 2
        pool.accounting = true
        defer { pool.accounting = false }
        usleep(100_000)  // the caller alone: serial, not counted
        pool.run(parts: 4) { _ in usleep(10_000) }
        let counted = pool.busy
        XCTAssertGreaterThanOrEqual(counted.partNanoseconds, 40_000_000, "four parts of at least 10 ms")
        XCTAssertGreaterThanOrEqual(counted.jobNanoseconds, 20_000_000, "two threads: at least two parts long")
        XCTAssertLessThan(
            counted.jobNanoseconds, counted.partNanoseconds + 5_000_000, "the 100 ms sleep is not a job's")
        BLAS.threads = 1
        pool.run(parts: 4) { _ in usleep(1000) }
        XCTAssertEqual(pool.busy.jobNanoseconds, counted.jobNanoseconds, "one thread runs no job")
        pool.accounting = false
        BLAS.threads = 2
        pool.run(parts: 4) { _ in usleep(1000) }
        XCTAssertEqual(pool.busy.partNanoseconds, 0, "off: nothing counted")
    }

    /// Inside a part a kernel gets one thread (`threadsHere`), on the pool's workers and on the
    /// caller's thread alike, and after the job the caller has all of them again: a part that runs a
    /// whole model (the trainer's side-by-side micro-batches) keeps its kernels on its own thread.
    func testAPartSeesOneThread() {
        let saved = BLAS.threads
        defer { BLAS.threads = saved }
        BLAS.threads = 3
        XCTAssertEqual(ComputePool.shared.threadsHere, 3)
        let seen = UnsafeMutablePointer<Int>.allocate(capacity: 64)
        defer { seen.deallocate() }
        for _ in 0..<200 {
            seen.initialize(repeating: 0, count: 64)
            ComputePool.shared.run(parts: 64) { part in seen[part] = ComputePool.shared.threadsHere }
            XCTAssertTrue((0..<64).allSatisfy { seen[$0] == 1 }, "every part saw 1 thread")
            XCTAssertEqual(ComputePool.shared.threadsHere, 3, "the caller has its threads back")
        }
    }

    /// Two threads may run kernels at once, each inside a part of one job (the trainer's
    /// side-by-side micro-batches): attention's per-part scratch is the calling thread's own, so
    /// two attention backwards side by side give the bits each gives alone (a scratch shared by
    /// the two threads mixes their score gradients).
    func testKernelsSideBySideKeepTheirScratchApart() {
        let saved = BLAS.threads
        defer { BLAS.threads = saved }
        BLAS.threads = 2
        let (batch, S, D, NH) = (4, 200, 16, 2)
        let qkv = (0..<2).map { randoms(batch * S * 3 * D, seed: 20 + UInt64($0)) }
        let dy = (0..<2).map { randoms(batch * S * D, seed: 30 + UInt64($0)) }
        func backward(_ lane: Int) -> [Float] {
            var out = [Float](repeating: 0, count: batch * S * D)
            var probs = [Float](repeating: 0, count: batch * NH * S * S)
            var dqkv = [Float](repeating: 0, count: qkv[lane].count)
            attentionForward(&out, &probs, qkv[lane], batch: batch, seqLen: S, dim: D, heads: NH, causal: true)
            attentionBackward(
                &dqkv, dy[lane], qkv[lane], probs, batch: batch, seqLen: S, dim: D, heads: NH, causal: true)
            return dqkv
        }
        let alone = [backward(0), backward(1)]
        var together = [[Float]](repeating: [], count: 2)
        for round in 0..<30 {
            together.withUnsafeMutableBufferPointer { out in
                ComputePool.shared.run(parts: 2) { lane in out[lane] = backward(lane) }
            }
            if together != alone {
                XCTFail("round \(round): attention backward side by side differs from alone")
                break
            }
        }
    }

    /// `BLAS.sgemm`'s tiles give the same bits at any thread count, for row and column tilings,
    /// each transpose, and shapes with ragged edges. Against one cblas call (what main computed on
    /// one thread): OpenBLAS's SkylakeX kernels give equal bits for any row count of a call, so
    /// there the tiles must equal one call exactly; its Haswell/Zen kernels round the last bits of
    /// a row differently with the rows in the call (ResumeTests' eval test), so there the tiles
    /// agree with one call to float32 rounding (the thread-count identity above holds on both).
    func testSgemmTilesAreThreadIndependentAndMatchOneCall() {
        var r = CounterRNG(seed: 1)
        var tiledBothWays = Set<Bool>()
        let exact = BLAS.coreName.lowercased().hasPrefix("skylakex")
        for (m, n, k) in [(300, 96, 40), (70, 1030, 16), (200, 330, 20), (64, 2100, 8), (392, 384, 128)] {
            let tiling = BLAS.Tiling(m: m, n: n, k: k)
            XCTAssertGreaterThan(tiling.count, 1, "\(m) x \(n) x \(k) is tiled")
            tiledBothWays.insert(tiling.rows)
            // where tilesMatchOneCall, sgemm tiles by the thread count: 2 tiles at 2 threads, one call at 1
            XCTAssertEqual(BLAS.Tiling(m: m, n: n, k: k, threads: 2).count, 2, "\(m) x \(n) x \(k) at 2 threads")
            XCTAssertEqual(BLAS.Tiling(m: m, n: n, k: k, threads: 1).count, 1, "\(m) x \(n) x \(k) at 1 thread")
            let a = (0..<(m * k)).map { _ in r.normal() }
            let b = (0..<(k * n)).map { _ in r.normal() }
            for (ta, tb) in [(false, true), (false, false), (true, false)] {
                let lda = ta ? m : k
                let ldb = tb ? k : n
                let what = "sgemm \(m) x \(n) x \(k) transA \(ta) transB \(tb)"
                var one = [Float](repeating: 0.5, count: m * n)
                BLAS.sgemmOneCall(
                    transA: ta, transB: tb, m: m, n: n, k: k, alpha: 0.7, a, lda: lda, b, ldb: ldb,
                    beta: 1, &one, ldc: n)
                sameAtAnyThreadCount(what) {
                    var c = [Float](repeating: 0.5, count: m * n)
                    BLAS.sgemm(
                        transA: ta, transB: tb, m: m, n: n, k: k, alpha: 0.7, a, lda: lda, b, ldb: ldb, beta: 1,
                        &c, ldc: n)
                    var differ = 0
                    var worst: Float = 0
                    for (x, y) in zip(c, one) where x.bitPattern != y.bitPattern {
                        differ += 1
                        worst = max(worst, abs(x - y) / max(abs(y), 1))
                    }
                    if exact {
                        XCTAssertEqual(differ, 0, "\(what): tiles differ from one call under \(BLAS.coreName)")
                    } else {
                        XCTAssertLessThan(worst, 1e-5, "\(what): tiles vs one call under \(BLAS.coreName)")
                    }
                    return c
                }
            }
        }
        XCTAssertEqual(tiledBothWays, [true, false], "row and column tilings both checked")
    }

    func testEmbeddingAndNorm() {
        let v = 9
        let d = 40
        let n = 30
        let ids = (0..<n).map { Int32($0 % 7 == 3 ? -1 : $0 % v) }  // repeated ids, and pads
        let table = randoms(v * d, seed: 1)
        let dout = randoms(n * d, seed: 2)
        let w = randoms(d, seed: 3)
        sameAtAnyThreadCount("embedding") {
            var out = [Float](repeating: 0, count: n * d)
            var grad = [Float](repeating: 0.5, count: v * d)
            embeddingForward(&out, ids, table, n: n, d: d)
            embeddingBackward(&grad, dout, ids, n: n, d: d)
            return out + grad
        }
        sameAtAnyThreadCount("rmsnorm") {
            var out = [Float](repeating: 0, count: n * d)
            var rstd = [Float](repeating: 0, count: n)
            var dx = [Float](repeating: 0.25, count: n * d)
            var dw = [Float](repeating: 0.5, count: d)
            rmsnormForward(&out, &rstd, dout, w, n: n, d: d, eps: 1e-5)
            rmsnormBackward(&dx, &dw, table + table + table + table, dout, w, rstd, n: n, d: d)
            return out + rstd + dx + dw
        }
    }

    func testAttentionRotaryAndStep() {
        let batch = 2
        let D = 16
        let NH = 2
        for (S, causal) in [(5, false), (5, true), (70, true), (20, false)] {
            let qkv0 = randoms(batch * S * 3 * D, seed: UInt64(S))
            let dy = randoms(batch * S * D, seed: 9)
            let table = RotaryTable(seqLen: S, gridW: 4, headDim: D / NH, base: 10000)
            sameAtAnyThreadCount("attention S=\(S) causal=\(causal)") {
                var qkv = qkv0
                rotaryApply(&qkv, table, batch: batch, seqLen: S, dim: D, heads: NH)
                var out = [Float](repeating: 0, count: batch * S * D)
                var probs = [Float](repeating: 0, count: batch * NH * S * S)
                var dqkv = [Float](repeating: 0, count: qkv.count)
                attentionForward(&out, &probs, qkv, batch: batch, seqLen: S, dim: D, heads: NH, causal: causal)
                attentionBackward(&dqkv, dy, qkv, probs, batch: batch, seqLen: S, dim: D, heads: NH, causal: causal)
                rotaryApply(&dqkv, table, batch: batch, seqLen: S, dim: D, heads: NH, inverse: true)
                return out + probs + dqkv
            }
        }
        let rows = 5
        let T = 12
        let hd = D / NH
        let steps = randoms(T * rows * 3 * D, seed: 11)
        sameAtAnyThreadCount("attention step") {
            var keys = [Float](repeating: 0, count: rows * NH * T * hd)
            var values = keys
            var out = [Float](repeating: 0, count: T * rows * D)
            for p in 0..<T {
                steps.withUnsafeBufferPointer { s in
                    out.withUnsafeMutableBufferPointer { o in
                        let out = o.baseAddress! + p * rows * D
                        let qkv = s.baseAddress! + p * rows * 3 * D
                        attentionStepForward(
                            out, &keys, &values, qkv, rows: rows, dim: D, heads: NH, cacheLength: T,
                            position: p)
                    }
                }
            }
            return out
        }
    }

    func testElementwiseAndLoss() {
        let n = 24
        let f = 20
        let v = 30
        let ab = randoms(n * 2 * f, seed: 5)
        let g = randoms(n * f, seed: 6)
        let logits0 = randoms(n * v, seed: 7)
        let targets = (0..<n).map { Int32($0 % 5 == 0 ? -1 : $0 % v) }
        let weights = randoms(n, seed: 8)
        sameAtAnyThreadCount("swiglu") {
            var out = [Float](repeating: 0, count: n * f)
            var dab = [Float](repeating: 0, count: n * 2 * f)
            swigluForward(&out, ab, n: n, f: f)
            swigluBackward(&dab, g, ab, n: n, f: f)
            return out + dab
        }
        sameAtAnyThreadCount("cross entropy") {
            var logits = logits0
            var losses = [Float](repeating: 0, count: n)
            var dlogits = [Float](repeating: 0, count: n * v)
            crossEntropyForwardBackward(&losses, &dlogits, &logits, targets, weights, scale: 0.5, n: n, v: v)
            return losses + dlogits
        }
        sameAtAnyThreadCount("add, dropout") {
            var mask = [Float](repeating: 0, count: n * f)
            dropoutMask(
                &mask, p: 0.3, rows: n, d: f, rowsPerSample: 8, samplePositions: [5, 1, 7], seed: 3, step: 2,
                site: 1)
            var x = g
            addForward(&x, x, g, count: n * f)
            dropoutApply(&x, mask, count: n * f)
            return mask + x
        }
    }

    /// adaLN modulation and gate with g rows sharing a modulation row (the plug-in over RAR):
    /// the shared rows' gradients are summed in row order whatever the split.
    func testModulationSharedByRows() {
        let n = 24
        let d = 20
        let ld = 3 * d
        let x = randoms(n * d, seed: 9)
        let dout = randoms(n * d, seed: 10)
        for g in [1, 3, 6] {
            let mod = randoms(n / g * ld, seed: 11)
            sameAtAnyThreadCount("modulate and gate, \(g) rows per modulation") {
                var out = [Float](repeating: 0, count: n * d)
                var dx = [Float](repeating: 0, count: n * d)
                var dy = [Float](repeating: 0, count: n * d)
                var dmod = [Float](repeating: 0, count: n / g * ld)
                mod.withUnsafeBufferPointer { m in
                    dmod.withUnsafeMutableBufferPointer { dm in
                        let mp = m.baseAddress!
                        let dp = dm.baseAddress!
                        modulateForward(&out, x, shift: mp, scale: mp + d, ld: ld, n: n, d: d, rowsPerModulation: g)
                        modulateBackward(
                            &dx, dshift: dp, dscale: dp + d, dout, x, scale: mp + d, ld: ld, n: n, d: d,
                            rowsPerModulation: g)
                        gatedAddForward(&out, x, gate: mp + 2 * d, ld: ld, n: n, d: d, rowsPerModulation: g)
                        gatedAddBackward(
                            &dy, dgate: dp + 2 * d, dout, x, gate: mp + 2 * d, ld: ld, n: n, d: d,
                            rowsPerModulation: g)
                    }
                }
                return out + dx + dy + dmod
            }
        }
    }

    /// A mask drawn in parts (each part skipping ahead in its sample's stream) is the mask drawn
    /// in one pass: compared with the draws made one by one here.
    func testDropoutMaskSkipsAheadExactly() {
        let d = 7
        let rowsPerSample = 5
        let p: Float = 0.4
        var want: [Float] = []
        for s in [4, 2] {
            var rng = CounterRNG(seed: 3, 2, UInt64(s), RandomPurpose.dropout.rawValue, 6)
            for _ in 0..<(rowsPerSample * d) { want.append(rng.uniform() < p ? 0 : 1 / (1 - p)) }
        }
        sameAtAnyThreadCount("dropout mask") {
            var mask = [Float](repeating: 0, count: 2 * rowsPerSample * d)
            dropoutMask(
                &mask, p: p, rows: 2 * rowsPerSample, d: d, rowsPerSample: rowsPerSample,
                samplePositions: [4, 2], seed: 3, step: 2, site: 6)
            XCTAssertEqual(mask, want)
            return mask
        }
    }
}
