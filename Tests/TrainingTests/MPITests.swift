import ARModel
import Foundation
import Kernels
import Platform
import TokenData
import XCTest

@testable import Training

/// The Communicator, gradient averaging, a trainer step and collective checkpoint saving across
/// real MPI ranks.
///
/// Each of `testSingletonWithoutMPIRun`, `testTwoRanks` and `testThreeRanks` is both the driver
/// and the ranks: run normally, it starts this same test binary under `mpirun -n W` with a filter
/// naming itself and TENSORAR_MPI_WORKER=1 set; run that way, the same test method is one rank and
/// runs `rankBody()`. So there is no separate worker test that a normal run would have to skip:
/// every test in this class does real work in every run. Each rank checks its results; a failing
/// check makes that rank, and so `mpirun`, exit non-zero. The driver process itself never
/// initialises MPI (a process can do so only once).
final class MPITests: XCTestCase {
    func testSingletonWithoutMPIRun() throws { try runAsRanks(nil) }
    func testTwoRanks() throws { try runAsRanks(2) }
    func testThreeRanks() throws { try runAsRanks(3) }

    /// One rank without MPI at all (`Communicator.solo`): only the scaling happens.
    func testSoloCommunicator() throws {
        let g = FlatBuffer(count: 10)
        for i in 0..<10 { g[i] = Float(i) }
        let sync = try GradientSync(communicator: .solo, count: 10, bucketElements: 3, mode: .overlapped)
        XCTAssertEqual(sync.mode, .blocking)  // nothing to overlap with one rank
        XCTAssertEqual(sync.buckets, [0..<3, 3..<6, 6..<9, 9..<10])
        try sync.allreduce(g, scale: 0.5)
        XCTAssertEqual(g.array, (0..<10).map { Float($0) * 0.5 })
        try sync.allreduce(g)  // default scale 1/worldSize = 1
        XCTAssertEqual(g.array, (0..<10).map { Float($0) * 0.5 })
    }

    /// In the driver: starts the ranks (`ranks` nil: one process without mpirun, an MPI singleton)
    /// and checks they all passed. In a rank (TENSORAR_MPI_WORKER set): runs `rankBody()`.
    private func runAsRanks(
        _ ranks: Int?, test: String = #function, file: StaticString = #filePath, line: UInt = #line
    ) throws {
        let env = ProcessInfo.processInfo.environment
        if env["TENSORAR_MPI_WORKER"] != nil { return try rankBody() }
        let name = test.hasSuffix("()") ? String(test.dropLast(2)) : test
        let exe = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")
        guard exe.hasSuffix(".xctest") else {
            return XCTFail(
                "not running from an .xctest binary (\(exe)): cannot start this test's ranks", file: file, line: line)
        }
        let filter = "TrainingTests.MPITests/\(name)"
        var childEnv = env.filter { !$0.key.hasPrefix("OMPI_COMM_WORLD") && !$0.key.hasPrefix("PMIX_") }
        childEnv["TENSORAR_MPI_WORKER"] = "1"
        childEnv["TENSORAR_MPI_EXPECT_SIZE"] = String(ranks ?? 1)
        let folder = try temporaryFolder(self)
        let checkpoints = folder + "/ckpt"
        childEnv["TENSORAR_MPI_CHECKPOINTS"] = checkpoints
        try writeTinyCache(folder + "/cache", samples: 24)
        childEnv["TENSORAR_MPI_CACHE"] = folder + "/cache"
        let status: Int32
        let text: String
        if let ranks {
            guard
                let mpirun = ["/usr/bin/mpirun", "/usr/local/bin/mpirun"].first(where: {
                    FileManager.default.isExecutableFile(atPath: $0)
                })
            else {
                return XCTFail("mpirun not found: install openmpi-bin (Launch/setup.sh does)", file: file, line: line)
            }
            (status, text, _) = try runProcess(
                mpirun,
                ["--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-n", String(ranks), exe, filter],
                environment: childEnv, directory: folder, timeout: 120, file: file, line: line)
        } else {
            (status, text, _) = try runProcess(
                exe, [filter], environment: childEnv, directory: folder, timeout: 120, file: file, line: line)
        }
        XCTAssertEqual(
            status, 0, "MPI ranks (\(ranks.map { "\($0) ranks" } ?? "singleton")) failed:\n\(text)", file: file,
            line: line)
        // Each rank must have run the test to its end.
        let passed = text.components(separatedBy: "MPITests.\(name)' passed").count - 1
        XCTAssertEqual(passed, ranks ?? 1, "expected every rank to pass:\n\(text)", file: file, line: line)
        let w = ranks ?? 1
        let run = checkpoints + "/mpi"
        XCTAssertEqual(
            try FileManager.default.contentsOfDirectory(atPath: run).sorted(), ["latest", "step-00000002"], file: file,
            line: line)
        XCTAssertEqual(
            try FileManager.default.contentsOfDirectory(atPath: run + "/step-00000002").sorted(),
            ["manifest.json"] + (0..<w).map { CheckpointStore.shardName(rank: $0, worldSize: w) }, file: file,
            line: line)
    }
}

extension MPITests {
    /// One rank's checks (started by `runAsRanks`).
    func rankBody() throws {
        let env = ProcessInfo.processInfo.environment
        let comm = try MPI.initialize()
        defer { try? MPI.finalize() }
        let W = comm.size
        let r = comm.rank
        XCTAssertEqual(W, Int(env["TENSORAR_MPI_EXPECT_SIZE"] ?? "") ?? -1)
        XCTAssertEqual(MPI.isUnderMPIRun, W > 1 || env["OMPI_COMM_WORLD_SIZE"] != nil)
        XCTAssertEqual(MPI.threadLevel, .multiple)
        XCTAssertEqual(MPI.ranksOnThisNode, W)
        XCTAssertTrue(comm === (try MPI.initialize()), "initialize() returns the same world communicator")

        // The Communicator's collectives.
        try comm.barrier()
        XCTAssertEqual(try comm.broadcast(r == 0 ? Array("hello".utf8) : [1, 2], root: 0), Array("hello".utf8))
        XCTAssertEqual(try comm.allgather([Int64(r), Int64(10 * r)]), (0..<W).map { [Int64($0), Int64(10 * $0)] })
        XCTAssertEqual(try comm.allreduce(Double(r) + 0.5), Double(W * (W - 1)) / 2 + 0.5 * Double(W))
        XCTAssertEqual(try comm.allreduce(Int64(r), op: .max), Int64(W - 1))
        XCTAssertEqual(try comm.allreduce(Int64(r), op: .min), 0)
        var f: [Float] = [Float(r), 1]
        try comm.allreduce(&f)
        XCTAssertEqual(f, [Float(W * (W - 1) / 2), Float(W)])

        // Gradient averaging: both modes, bucket sizes that do not divide the buffer, two steps
        // each with the same GradientSync. Values are small integers, so sums are exact and the
        // result must equal Float(sum) * (1/W) bit for bit.
        for count in [1, 1000, 12_345] {
            for bucket in [7, 100, 4096, 20_000] {
                for mode in [GradientSync.Mode.blocking, .overlapped] {
                    let sync = try GradientSync(communicator: comm, count: count, bucketElements: bucket, mode: mode)
                    XCTAssertEqual(sync.mode, W > 1 ? mode : .blocking)
                    for step in 0..<2 {
                        let g = FlatBuffer(count: count)
                        func value(_ rank: Int, _ i: Int) -> Float {
                            Float((rank + 1) * ((i * 7 + step) % 11) - 5 * rank)
                        }
                        for i in 0..<count { g[i] = value(r, i) }
                        let scale: Float? = step == 0 ? nil : 1  // step 1: plain sum
                        sync.begin(g, scale: scale)
                        // "Backward": chunks of 37 from the end, each marked in two pieces; the
                        // first 100 elements are never marked (finish() must reduce them).
                        var hi = count
                        while hi > min(100, count) {
                            let lo = max(min(100, count), hi - 37)
                            let mid = (lo + hi) / 2
                            sync.markReady(mid..<hi)
                            sync.markReady(lo..<mid)
                            hi = lo
                        }
                        let t = try sync.finish()
                        XCTAssertEqual(t.buckets, sync.buckets.count)
                        XCTAssertGreaterThanOrEqual(t.commSeconds, 0)
                        let s = scale ?? 1 / Float(W)
                        for i in 0..<count {
                            let sum = (0..<W).reduce(Float(0)) { $0 + value($1, i) }
                            if g[i] != sum * s {
                                XCTFail(
                                    "rank \(r) \(mode) count \(count) bucket \(bucket) step \(step): "
                                        + "[\(i)] = \(g[i]), expected \(sum * s)"
                                )
                                break
                            }
                        }
                    }
                    XCTAssertEqual(sync.total.buckets, 2 * sync.buckets.count)
                }
            }
        }

        try checkParameterGather(comm)

        // One trainer step through real MPI, overlapped (many small buckets, handed over while
        // backward runs) and blocking: the reduced gradient is the single-process gradient of the
        // whole global batch (tolerance as in DistributedTrainingTests: float32 summation order),
        // the loss is the whole batch's, and every rank holds bit-identical gradients and weights.
        for overlap in [true, false] {
            var tc = tinyTrainConfig(
                cache: env["TENSORAR_MPI_CACHE"]!, checkpoints: env["TENSORAR_MPI_CHECKPOINTS"]! + "/unused")
            tc.dist.overlap = overlap
            try assertShardedStepMatchesReplicated(tc, comm)
            let trainer = try Trainer(config: tc, comm: comm)
            XCTAssertEqual(trainer.sync.mode, W > 1 && overlap ? .overlapped : .blocking)
            XCTAssertGreaterThan(trainer.sync.buckets.count, 10)
            let step = try trainer.trainStep()
            let reference = try Trainer(config: tc, comm: .solo)
            let whole = try reference.trainStep()
            XCTAssertTrue(step.applied && whole.applied)
            // float32 rounding (smaller sgemm calls per rank; see DistributedTrainingTests)
            let f32Rounding = 16 * Double(Float.ulpOfOne) * whole.report.loss
            XCTAssertEqual(step.report.loss, whole.report.loss, accuracy: f32Rounding, "rank \(r): loss")
            let rel = relativeMaxDifference(trainer.model.grads.array, reference.model.grads.array)
            XCTAssertLessThan(rel, 1e-5, "rank \(r) of \(W), overlap \(overlap): reduced gradient vs the whole batch's")
            XCTAssertEqual(step.gradNorm, whole.gradNorm, accuracy: 1e-5 * whole.gradNorm)
            let sums = try comm.allgather([checksum(trainer.model.grads), checksum(trainer.model.params)])
            XCTAssertTrue(sums.allSatisfy { $0 == sums[0] }, "rank \(r): replicas differ after a step: \(sums)")
        }

        // Recompute under real MPI for the other bases too (LlamaGen's is in the loop above).
        let other = tinyTrainConfig(
            cache: env["TENSORAR_MPI_CACHE"]!, checkpoints: env["TENSORAR_MPI_CHECKPOINTS"]! + "/unused")
        for base in BaseRegistry.names where base != "llamagen" {
            try assertRecomputeChangesNoBit(base: base, other, comm)
        }

        // Collective checkpoint: every rank writes its shard in parallel; all read it back whole
        // (each rank reads its slice, the ranks exchange them).
        let model = testModel()
        let table = ParameterTable(model)
        let params = randomBuffer(table.total, seed: 11)
        let opt = AdamW(table: table, trainable: PerGroup(base: true, plugin: true))
        opt.step(
            params: params, grads: randomBuffer(table.total, seed: 12), lr: PerGroup(base: 1e-3, plugin: 1e-3), clip: 1)
        var cfg = TrainConfig()
        cfg.checkpoint.dir = env["TENSORAR_MPI_CHECKPOINTS"]!
        cfg.checkpoint.run = "mpi"
        var store = CheckpointStore(config: cfg)
        let dir = try store.save(
            progress: TrainingProgress(step: 2, samplesSeen: 512, seed: 0), config: cfg, model: model,
            table: table, params: params, optimizer: opt, communicator: comm)
        let p2 = FlatBuffer(count: table.total)
        let o2 = AdamW(table: table, trainable: PerGroup(base: true, plugin: true))
        _ = try CheckpointStore.load(
            from: dir, model: model, table: table, params: p2, optimizer: o2, communicator: comm)
        XCTAssertEqual(p2.array, params.array)
        XCTAssertEqual(o2.m.array, opt.m.array)
        XCTAssertEqual(o2.v.array, opt.v.array)
        // A write failure on the last rank only: every rank throws that rank's error, the earlier
        // checkpoint stays latest.
        if r == W - 1 { store.injectShardWriteFailure = { _ in throw InputError("test", "No space left on device") } }
        XCTAssertThrowsError(
            try store.save(
                progress: TrainingProgress(step: 3, samplesSeen: 768, seed: 0), config: cfg, model: model,
                table: table, params: params, optimizer: opt, communicator: comm)
        ) { error in
            let text = "\(error)"
            XCTAssertTrue(
                text.contains("rank-\(String(format: "%05d", W - 1))-of-") && text.contains("No space left on device"),
                text)
            XCTAssertEqual(text.contains("(reported by rank \(W - 1))"), r != W - 1, text)
        }
        XCTAssertEqual(store.latestName(), "step-00000002")
    }
}

/// ZeRO (states, states+grads): one step's parameters are bit-identical on every rank (the
/// allgather), close to replicated AdamW's (summation order, see ShardedOptimizerTests), and each
/// rank holds moments for its own slice only. Recompute blocks (dropout on) changes no bit of a
/// step's loss, norm or parameters, replicated or sharded.
private func assertShardedStepMatchesReplicated(_ tc: TrainConfig, _ comm: Communicator) throws {
    let replicated = try Trainer(config: tc, comm: comm)
    let reference = try replicated.trainStep()
    XCTAssertGreaterThan(tc.train.dropout, 0)
    for zero in [ShardOptimizer.none, .statesAndGrads] {
        var c = tc
        c.dist.shardOptimizer = zero
        let plain = zero == .none ? replicated : try Trainer(config: c, comm: comm)
        let want = zero == .none ? reference : try plain.trainStep()
        try plain.finishParameterGather()
        c.train.recompute = .blocks
        let recomputed = try Trainer(config: c, comm: comm)
        let got = try recomputed.trainStep()
        try recomputed.finishParameterGather()
        XCTAssertEqual(got.report, want.report, "rank \(comm.rank), \(zero): recompute changes the loss")
        XCTAssertEqual(got.gradNorm.bitPattern, want.gradNorm.bitPattern, "rank \(comm.rank), \(zero): norm")
        XCTAssertEqual(
            checksum(recomputed.model.params), checksum(plain.model.params),
            "rank \(comm.rank), \(zero): recompute changes the parameters")
    }
    for zero in [ShardOptimizer.states, .statesAndGrads] {
        var c = tc
        c.dist.shardOptimizer = zero
        let trainer = try Trainer(config: c, comm: comm)
        XCTAssertEqual(trainer.gather?.mode, comm.size > 1 ? .overlapped : .blocking)
        let step = try trainer.trainStep()
        XCTAssertEqual(trainer.gather?.isInFlight, comm.size > 1, "\(zero): the gather overlaps what follows")
        try trainer.finishParameterGather()
        XCTAssertTrue(step.applied)
        XCTAssertEqual(step.gradNorm, reference.gradNorm, accuracy: 1e-5 * reference.gradNorm, "\(zero): global norm")
        let slice = CheckpointStore.slice(rank: comm.rank, worldSize: comm.size, count: trainer.model.table.total)
        XCTAssertEqual(trainer.optimizer.m.count, slice.count, "\(zero): moments of this rank's slice only")
        let rel = relativeMaxDifference(trainer.model.params.array, replicated.model.params.array)
        XCTAssertLessThan(rel, 1e-4, "rank \(comm.rank), \(zero): parameters vs replicated AdamW")
        let sums = try comm.allgather([checksum(trainer.model.params)])
        XCTAssertTrue(sums.allSatisfy { $0 == sums[0] }, "rank \(comm.rank), \(zero): parameters differ across ranks")
    }
}

/// Recompute blocks changes no bit of a step's loss, norm or parameters for `base` (tiny, the
/// plug-in k 2 d 1, dropout and label drop on, states+grads: gradients reduce-scattered in buckets
/// while backward, with its recompute, runs).
private func assertRecomputeChangesNoBit(base: String, _ tc: TrainConfig, _ comm: Communicator) throws {
    var c = tc
    c.model.base = base
    c.dist.shardOptimizer = .statesAndGrads
    let plain = try Trainer(config: c, comm: comm)
    let want = try plain.trainStep()
    try plain.finishParameterGather()  // the overlapped gather is still in flight after a step
    c.train.recompute = .blocks
    let recomputed = try Trainer(config: c, comm: comm)
    let got = try recomputed.trainStep()
    try recomputed.finishParameterGather()
    let what = "rank \(comm.rank), \(base)"
    XCTAssertTrue(want.applied && got.applied, what)
    XCTAssertEqual(got.report, want.report, "\(what): recompute changes the loss")
    XCTAssertEqual(got.gradNorm.bitPattern, want.gradNorm.bitPattern, "\(what): norm")
    XCTAssertEqual(
        checksum(recomputed.model.params), checksum(plain.model.params), "\(what): recompute changes the parameters")
}

/// FNV-1a over the bit patterns: equal buffers, equal sums (to compare replicas across ranks).
func checksum(_ b: FlatBuffer) -> Int64 {
    var h: UInt64 = 0xcbf2_9ce4_8422_2325
    for i in 0..<b.count { h = (h ^ UInt64(b[i].bitPattern)) &* 0x100_0000_01b3 }
    return Int64(bitPattern: h)
}

/// ZeRO's `ParameterGather` over real ranks, blocking and overlapped: rank r fills only its own
/// slice; after `waitFor(bucket b)` bucket b holds every rank's values in the trained range and
/// is untouched outside it; `then` runs exactly once on every element; two gathers in a row with
/// the same object. A failing bucket (injected on every rank, before its allgather) surfaces on
/// the calling thread: the waits return (no hang), `finish` throws, and the next gather works.
private func checkParameterGather(_ comm: Communicator) throws {
    let W = comm.size
    let r = comm.rank
    let count = 12_345
    let slices = (0..<W).map { CheckpointStore.slice(rank: $0, worldSize: W, count: count) }
    let trained = 100..<(count - 50)
    // buckets of 1000 from the top down: not in offset order, as the model's are not
    let buckets = stride(from: count, to: 0, by: -1000).map { max(0, $0 - 1000)..<$0 }
    func value(_ i: Int, _ step: Int) -> Float { Float(i % 977) + 0.25 * Float(step) }
    for mode in [ParameterGather.Mode.blocking, .overlapped] {
        let gather = try ParameterGather(
            communicator: comm, buckets: buckets, slices: slices, trained: trained, mode: mode)
        XCTAssertEqual(gather.mode, W > 1 ? mode : .blocking)
        for step in 0..<2 {
            let p = FlatBuffer(count: count)
            for i in 0..<count { p[i] = slices[r].contains(i) ? value(i, step) : -1 }
            let hits = FlatBuffer(count: count)
            try gather.start(p) { b in for i in b { hits[i] += 1 } }
            for b in gather.buckets.indices {
                try gather.waitFor(gather.buckets[b])
                for i in gather.buckets[b] {
                    let want = trained.contains(i) || slices[r].contains(i) ? value(i, step) : -1
                    if p[i] != want {
                        XCTFail("rank \(r) \(mode) step \(step): [\(i)] = \(p[i]) after its bucket, expected \(want)")
                        break
                    }
                }
            }
            try gather.finish()
            XCTAssertFalse(gather.isInFlight)
            XCTAssertEqual(Set(hits.array), [1], "rank \(r) \(mode): then() once on every element")
        }
        XCTAssertEqual(gather.total.gathers, 2)
        gather.injectFailure = { b in
            if b == 2 { throw InputError("test", "bucket \(b) fails on purpose") }
        }
        let p = FlatBuffer(count: count)
        if gather.mode == .blocking {
            XCTAssertThrowsError(try gather.start(p))
        } else {
            try gather.start(p)
            XCTAssertThrowsError(try gather.waitFor(gather.buckets.last!), "the wait returns with the error")
            XCTAssertThrowsError(try gather.finish())
            XCTAssertFalse(gather.isInFlight)
        }
        gather.injectFailure = nil
        try gather.start(p)
        XCTAssertNoThrow(try gather.finish(), "rank \(r) \(mode): a gather after a failed one")
    }
}
