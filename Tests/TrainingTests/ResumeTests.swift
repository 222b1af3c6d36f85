import ARModel
import Foundation
import Kernels
import Platform
import TokenData
import XCTest

@testable import Training

/// Checkpoints end to end, with real processes: the release binaries (`swift build -c release`;
/// Launch/test.sh builds them before `swift test`) under real `mpirun`, stopped by real signals,
/// on a tiny token cache written here (128 samples, grid 4x4, V 32, C 4) and a tiny model
/// (D 32, 2 layers, 2 heads, k 2, d 1: 119,488 parameters).
///
/// One reference run, A (2 ranks, 16 steps, a checkpoint every 4), is made once and shared.
/// Losses are compared as the text metrics.jsonl holds: Swift writes a Double with the fewest
/// digits that read back as the same Double, so equal text is equal bits.
///
/// Tolerance after resuming on another rank count (2 -> 1, 2 -> 4): relative 1e-5 on every later
/// loss. Why not exact: each rank sums its micro-batches' float32 gradients and the ranks' sums
/// are added by the allreduce, so the summation order (and rounding, ~1e-7 relative per value)
/// changes with the rank count, and AdamW carries that on. Measured over the 8 steps after
/// resuming at step 8: at most 5e-9 relative. What a real resume bug does, also measured (and the
/// negative control below checks it each time): moments lost -> 8.7e-3 or more from the first
/// step after; data one batch off -> 1.2e-3 or more. 1e-5 sits a hundred times below the first
/// and two thousand times above the noise.
final class ResumeTests: XCTestCase {
    static let stepsPerCheckpoint = 4
    static let steps = 16

    /// The shared folder: caches, the reference run, and every test's runs (removed at the end).
    struct Fixture {
        let root: String
        let train: String
        let val: String
        let checkpoints: String
        /// The reference run: 2 ranks, `steps` steps straight.
        let runA: String
        let metricsA: Metrics
    }
    nonisolated(unsafe) static var shared: Result<Fixture, Error>?

    override class func tearDown() {
        if case .success(let f)? = shared { try? FileManager.default.removeItem(atPath: f.root) }
        shared = nil
        super.tearDown()
    }

    func fixture() throws -> Fixture {
        if ResumeTests.shared == nil { ResumeTests.shared = Result { try makeFixture() } }
        return try ResumeTests.shared!.get()
    }

    private func makeFixture() throws -> Fixture {
        for name in ["tensorar-train", "tensorar-eval", "tensorar-export"] { _ = try binary(name) }
        let root = (NSTemporaryDirectory() as NSString).appendingPathComponent("tensorar-resume-\(UUID().uuidString)")
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        // Learnable tokens: each depends on the class and the position, plus noise.
        func cache(_ dir: String, samples n: Int, seed: UInt64) throws {
            let w = try CacheWriter(
                directory: dir, vocabSize: 32, gridH: 4, gridW: 4, numClasses: 4, augmentations: 1, shardSize: 64)
            var rng = CounterRNG(seed: seed)
            var codes: [Int32] = []
            var labels: [Int32] = []
            for _ in 0..<n {
                let c = Int32(rng.next() % 4)
                labels.append(c)
                for p in 0..<16 { codes.append((c * 7 + Int32(p) * 3 + Int32(rng.next() % 3)) % 32) }
            }
            try w.append(codes: codes, labels: labels)
            try w.finish()
        }
        let f = Fixture(
            root: root, train: root + "/train", val: root + "/val", checkpoints: root + "/Checkpoints",
            runA: root + "/Checkpoints/A", metricsA: Metrics())
        try cache(f.train, samples: 128, seed: 1)
        try cache(f.val, samples: 32, seed: 2)
        let a = try train(f, run: "A", ranks: 2)
        guard a.status == 0 else {
            throw InputError(f.runA, "the reference run failed (exit \(a.status)):\n\(a.output)")
        }
        return Fixture(
            root: f.root, train: f.train, val: f.val, checkpoints: f.checkpoints, runA: f.runA,
            metricsA: try Metrics(run: f.runA))
    }

    // MARK: exact resume

    /// Train 16 steps straight (A); resume A's step-8 checkpoint in a new process on the same two
    /// ranks: steps 9-16 have bit-identical losses, and the final parameters and moments are
    /// bit-identical too.
    func testResumeOnTheSameRankCountIsBitIdentical() throws {
        let f = try fixture()
        let b = try train(f, run: "B", ranks: 2, extra: ["--resume-from", f.runA + "/step-00000008"])
        XCTAssertEqual(b.status, 0, b.output)
        XCTAssertTrue(
            b.output.contains("resumed from \(f.runA)/step-00000008 at step 8 (written by 2 rank(s))"), b.output)
        let mb = try Metrics(run: f.checkpoints + "/B")
        XCTAssertEqual(mb.loss.keys.sorted(), Array(9...16))
        for s in 9...16 { XCTAssertEqual(mb.loss[s], f.metricsA.loss[s], "loss text at step \(s)") }
        XCTAssertEqual(mb.valLoss, f.metricsA.valLoss.filter { $0.key > 8 })
        // Losses are written with full precision (e.g. 3.465735912322998), not rounded for display.
        XCTAssertGreaterThanOrEqual(mb.loss.values.map { $0.filter(\.isNumber).count }.max() ?? 0, 15, "\(mb.loss)")
        try assertSameState(f.runA + "/step-00000016", f.checkpoints + "/B/step-00000016")
    }

    /// Resume A's step-8 checkpoint on 1 rank and on 4 ranks (each reads its new slice from the
    /// two old shards): every later loss within the class's tolerance. Negative control: the same
    /// resume with the moments zeroed in the shards misses it by far.
    func testResumeOnOneAndFourRanksIsClose() throws {
        let f = try fixture()
        for ranks in [1, 4] {
            let r = try train(f, run: "W\(ranks)", ranks: ranks, extra: ["--resume-from", f.runA + "/step-00000008"])
            XCTAssertEqual(r.status, 0, r.output)
            XCTAssertTrue(r.output.contains("at step 8 (written by 2 rank(s))"), r.output)
            let m = try Metrics(run: f.checkpoints + "/W\(ranks)")
            XCTAssertEqual(m.loss.keys.sorted(), Array(9...16))
            let worst = try maxRelativeDifference(m, f.metricsA)
            XCTAssertLessThanOrEqual(
                worst, 1e-5, "\(ranks) rank(s): losses differ from the straight run by up to \(worst) (relative)")
            print("resume 2 -> \(ranks) rank(s): worst relative loss difference \(worst)")
        }
        // A copy of the step-8 checkpoint whose AdamW moments are zero (rewritten through HDF5,
        // so the checksums still hold): a resume that lost the moments.
        let broken = f.root + "/zeroed-moments"
        try FileManager.default.copyItem(atPath: f.runA + "/step-00000008", toPath: broken)
        for file in try FileManager.default.contentsOfDirectory(atPath: broken) where file.hasSuffix(".h5") {
            let h = try HDF5File.open(broken + "/" + file, writable: true)
            for name in ["adam_m", "adam_v"] {
                let zeros = [Float](repeating: 0, count: try h.shape(of: name)[0])
                try zeros.withUnsafeBytes {
                    try h.writeRows(name, kind: .float32, start: 0, rows: zeros.count, from: $0.baseAddress!)
                }
            }
        }
        let z = try train(f, run: "Z", ranks: 1, extra: ["--resume-from", broken])
        XCTAssertEqual(z.status, 0, z.output)
        let worst = try maxRelativeDifference(try Metrics(run: f.checkpoints + "/Z"), f.metricsA)
        XCTAssertGreaterThan(worst, 1e-3, "losing the moments must show far beyond the tolerance")
    }

    // MARK: sharded optimizer (ZeRO)

    /// With `dist.shard_optimizer` each rank writes the slice it owns, in the usual format:
    /// a states+grads run on 2 ranks resumes on 4 with states, and a states run on 4 resumes on 2
    /// with states+grads, every later loss within the class's tolerance of the straight run.
    /// On 2 ranks, states reduces the same two terms as the allreduce, so its run is A bit for bit.
    func testShardedRunsResumeOnAnotherRankCount() throws {
        let f = try fixture()
        let states2 = try train(f, run: "S2", ranks: 2, extra: ["--set", "dist.shard_optimizer=states"])
        XCTAssertEqual(states2.status, 0, states2.output)
        XCTAssertEqual(try Metrics(run: f.checkpoints + "/S2").loss, f.metricsA.loss, "states on 2 ranks is A exactly")
        for (from, to, zeroFrom, zeroTo) in [(2, 4, "states+grads", "states"), (4, 2, "states", "states+grads")] {
            let straight = "Z\(from)"
            let s = try train(f, run: straight, ranks: from, extra: ["--set", "dist.shard_optimizer=\(zeroFrom)"])
            XCTAssertEqual(s.status, 0, s.output)
            XCTAssertEqual(try CheckpointStore.verify(f.checkpoints + "/\(straight)/step-00000008").worldSize, from)
            let resumed = "Z\(from)to\(to)"
            let from8 = f.checkpoints + "/\(straight)/step-00000008"
            let r = try train(
                f, run: resumed, ranks: to,
                extra: [
                    "--set", "dist.shard_optimizer=\(zeroTo)", "--resume-from", from8,
                ])
            XCTAssertEqual(r.status, 0, r.output)
            XCTAssertTrue(r.output.contains("at step 8 (written by \(from) rank(s))"), r.output)
            let m = try Metrics(run: f.checkpoints + "/" + resumed)
            XCTAssertEqual(m.loss.keys.sorted(), Array(9...16))
            let straightMetrics = try Metrics(run: f.checkpoints + "/" + straight)
            let worst = try maxRelativeDifference(m, straightMetrics)
            XCTAssertLessThanOrEqual(worst, 1e-5, "\(zeroFrom) on \(from) -> \(zeroTo) on \(to): \(worst) relative")
            let vsA = try maxRelativeDifference(straightMetrics, f.metricsA)
            XCTAssertLessThanOrEqual(vsA, 1e-5, "\(zeroFrom) on \(from) rank(s) vs A (replicated, 2 ranks)")
            print(
                "sharded resume \(zeroFrom) x \(from) -> \(zeroTo) x \(to): worst relative loss difference \(worst); "
                    + "straight \(zeroFrom) x \(from) vs A: \(vsA)")
        }
    }

    /// `kill -9` of rank 1 while it writes its step-8 shard of a sharded (states) run: `latest`
    /// still names step 4, and `--resume` continues from it with A's losses exactly.
    func testKillNineDuringAShardedCheckpointWriteLosesNothing() throws {
        let f = try fixture()
        let run = f.checkpoints + "/KZ"
        let zero = ["--set", "dist.shard_optimizer=states"]
        let job = try start(f, run: "KZ", ranks: 2, extra: zero, env: ["TENSORAR_TEST_PAUSE_SHARD_WRITE": "1:8"])
        try waitFor(run + "/.step-00000008.tmp/rank-00001-of-00002.h5", job)
        XCTAssertEqual(kill(try XCTUnwrap(try rankPIDs(job)[1]), SIGKILL), 0)
        let r = try job.wait()
        XCTAssertNotEqual(r.status, 0, r.output)
        XCTAssertEqual(CheckpointStore(runDirectory: run).latestName(), "step-00000004")
        XCTAssertNoThrow(try CheckpointStore.verify(run + "/step-00000004"))
        let again = try train(f, run: "KZ", ranks: 2, extra: zero + ["--resume"])
        XCTAssertEqual(again.status, 0, again.output)
        XCTAssertTrue(again.output.contains("resumed from \(run)/step-00000004 at step 4"), again.output)
        XCTAssertEqual(try Metrics(run: run).loss, f.metricsA.loss)
    }

    // MARK: signals and crashes

    /// SIGTERM to both ranks (as a batch system's cancel does) while the step-4 checkpoint is being
    /// written: the run saves that one, finishes step 5, saves step 5, and every process exits 0.
    /// `--resume` then continues to step 16 with exactly the reference run's losses.
    func testSigtermSavesAndExitsCleanlyAndResumeContinuesExactly() throws {
        let f = try fixture()
        let run = f.checkpoints + "/S"
        // Rank 0 pauses 2 s after creating its step-4 shard: the signal lands during that save.
        let job = try start(f, run: "S", ranks: 2, env: ["TENSORAR_TEST_PAUSE_SHARD_WRITE": "0:4:2"])
        try waitFor(run + "/.step-00000004.tmp/rank-00000-of-00002.h5", job)
        let ranks = try rankPIDs(job)
        XCTAssertEqual(ranks.count, 2)
        for pid in ranks.values { kill(pid, SIGTERM) }
        let r = try job.wait()
        XCTAssertEqual(r.status, 0, r.output)
        XCTAssertTrue(r.output.contains("checkpoint (stop requested): \(run)/step-00000005"), r.output)
        XCTAssertTrue(r.output.contains("stopped cleanly at step 5"), r.output)
        XCTAssertEqual(CheckpointStore(runDirectory: run).latestName(), "step-00000005")
        XCTAssertEqual(try CheckpointStore.verify(run + "/step-00000005").step, 5)
        XCTAssertEqual(try Metrics(run: run).loss.keys.max(), 5)

        let again = try train(f, run: "S", ranks: 2, extra: ["--resume"])
        XCTAssertEqual(again.status, 0, again.output)
        XCTAssertTrue(again.output.contains("resumed from \(run)/step-00000005 at step 5"), again.output)
        let m = try Metrics(run: run)
        XCTAssertEqual(
            m.loss, f.metricsA.loss, "the stopped-and-resumed run's losses (steps 1-16) against the straight run's")
        XCTAssertEqual(m.valLoss, f.metricsA.valLoss)
    }

    /// SIGINT (Ctrl-C) to a single process without mpirun: the same clean stop, exit 0.
    func testSigintStopsASingleProcessCleanly() throws {
        let f = try fixture()
        let run = f.checkpoints + "/I"
        let job = try start(f, run: "I", ranks: nil, env: ["TENSORAR_TEST_PAUSE_SHARD_WRITE": "0:4:2"])
        try waitFor(run + "/.step-00000004.tmp/rank-00000-of-00001.h5", job)
        kill(job.process.processIdentifier, SIGINT)
        let r = try job.wait()
        XCTAssertEqual(r.status, 0, r.output)
        XCTAssertTrue(r.output.contains("stopped cleanly at step 5"), r.output)
        XCTAssertEqual(try CheckpointStore.verify(run + "/step-00000005").worldSize, 1)
    }

    /// `kill -9` of rank 1 while it writes its step-8 shard: `latest` still names step 4, no
    /// step-8 folder exists (only the hidden temporary one), step 4 checks out, and `--resume`
    /// continues from it with the reference run's losses.
    func testKillNineDuringACheckpointWriteKeepsThePreviousOne() throws {
        let f = try fixture()
        let run = f.checkpoints + "/K"
        let job = try start(f, run: "K", ranks: 2, env: ["TENSORAR_TEST_PAUSE_SHARD_WRITE": "1:8"])
        try waitFor(run + "/.step-00000008.tmp/rank-00001-of-00002.h5", job)
        let rank1 = try XCTUnwrap(try rankPIDs(job)[1])
        XCTAssertEqual(kill(rank1, SIGKILL), 0)
        let r = try job.wait()
        XCTAssertNotEqual(r.status, 0, r.output)
        let store = CheckpointStore(runDirectory: run)
        XCTAssertEqual(store.latestName(), "step-00000004")
        let names = try FileManager.default.contentsOfDirectory(atPath: run)
        XCTAssertEqual(names.filter { $0.hasPrefix("step-") }, ["step-00000004"], "\(names)")
        XCTAssertTrue(names.allSatisfy { !$0.hasPrefix(".") || $0 == ".step-00000008.tmp" }, "\(names)")
        XCTAssertNoThrow(try CheckpointStore.verify(run + "/step-00000004"))

        let again = try train(f, run: "K", ranks: 2, extra: ["--resume"])
        XCTAssertEqual(again.status, 0, again.output)
        XCTAssertTrue(again.output.contains("resumed from \(run)/step-00000004 at step 4"), again.output)
        XCTAssertEqual(try Metrics(run: run).loss, f.metricsA.loss)
        XCTAssertFalse(
            try FileManager.default.contentsOfDirectory(atPath: run).contains(".step-00000008.tmp"),
            "the next save clears leftovers")
    }

    // MARK: damaged checkpoints

    /// The run's newest checkpoint (step 8) truncated, corrupted or missing a shard: `--resume`
    /// refuses with an error naming the shard and saying what to do; `--fallback` resumes from
    /// step 4 (and then reproduces the reference losses).
    func testDamagedNewestCheckpointIsRefusedUnlessFallingBack() throws {
        let f = try fixture()
        let fm = FileManager.default
        let damages: [(String, (String) throws -> Void, [String])] = [
            (
                "truncated",
                { file in
                    let size = try fm.attributesOfItem(atPath: file)[.size] as! Int
                    try FileHandle(forWritingTo: URL(fileURLWithPath: file)).truncate(atOffset: UInt64(size / 2))
                }, ["cannot open HDF5 file"]
            ),
            // 16 bytes in the middle of the data: the shard still opens, a chunk checksum fails.
            ("corrupted", { file in try corruptMiddle(of: file) }, ["reading dataset", "failed"]),
            ("missing", { file in try fm.removeItem(atPath: file) }, ["shard missing"]),
        ]
        for (i, (what, damage, says)) in damages.enumerated() {
            let name = "D-\(what)"
            let run = f.checkpoints + "/" + name
            try copyRun(f, to: run, upTo: 8)
            let shard = run + "/step-00000008/rank-00001-of-00002.h5"
            try damage(shard)
            // Alternate one process and two ranks: on two ranks, rank 1 alone reads the damage.
            let r = try train(f, run: name, ranks: i == 1 ? 2 : nil, extra: ["--resume"])
            XCTAssertNotEqual(r.status, 0, "\(what): \(r.output)")
            for s in [shard] + says + ["checkpoint is damaged", "--fallback"] {
                XCTAssertTrue(r.output.contains(s), "\(what): the error should mention \"\(s)\":\n\(r.output)")
            }
            XCTAssertEqual(
                CheckpointStore(runDirectory: run).latestName(), "step-00000008", "a refused resume changes nothing")
        }
        let run = f.checkpoints + "/D-corrupted"
        let r = try train(f, run: "D-corrupted", ranks: 2, extra: ["--resume", "--fallback"])
        XCTAssertEqual(r.status, 0, r.output)
        XCTAssertTrue(r.output.contains("note: skipped \(run)/step-00000008"), r.output)
        XCTAssertTrue(r.output.contains("resumed from \(run)/step-00000004 at step 4"), r.output)
        let m = try Metrics(run: run)
        XCTAssertEqual(m.loss, f.metricsA.loss.filter { $0.key > 4 })
    }

    /// A manifest that contradicts the config: the model shape (resumed with another width), the
    /// weight-decay rule (resumed under `rar`), and a manifest whose shard list does not fit its
    /// world size. Errors name manifest.json.
    func testManifestContradictingTheConfigIsAnError() throws {
        let f = try fixture()
        let step8 = f.runA + "/step-00000008"
        let r = try train(f, run: "M", ranks: nil, extra: ["--resume-from", step8, "--set", "model.dim=48"])
        XCTAssertNotEqual(r.status, 0, r.output)
        for s in [step8 + "/manifest.json", "model shape", "\"dim\":32", "\"dim\":48"] {
            XCTAssertTrue(r.output.contains(s), "\(s):\n\(r.output)")
        }
        let d = try train(
            f, run: "M", ranks: nil, extra: ["--resume-from", step8, "--set", "optim.decay_rule_base=rar"])
        XCTAssertNotEqual(d.status, 0, d.output)
        let refusal = "optim.decay_rule_base is rar but the checkpoint was trained with project"
        for s in [step8 + "/manifest.json", refusal] { XCTAssertTrue(d.output.contains(s), "\(s):\n\(d.output)") }
        let recorded = try String(contentsOfFile: step8 + "/manifest.json", encoding: .utf8)
        for s in ["\"decay_rule_base\" : \"project\"", "\"decay_rule_plugin\" : \"project\""] {
            XCTAssertTrue(recorded.contains(s), "the manifest's config records the rules: \(s)")
        }

        let copy = f.root + "/manifest-world"
        try FileManager.default.copyItem(atPath: step8, toPath: copy)
        let text = try String(contentsOfFile: copy + "/manifest.json", encoding: .utf8)
        XCTAssertTrue(text.contains("\"world_size\" : 2"))
        try text.replacingOccurrences(of: "\"world_size\" : 2", with: "\"world_size\" : 3").write(
            toFile: copy + "/manifest.json", atomically: true, encoding: .utf8)
        let w = try train(f, run: "M", ranks: nil, extra: ["--resume-from", copy])
        XCTAssertNotEqual(w.status, 0, w.output)
        for s in [copy + "/manifest.json", "shard list does not match 3 rank(s)"] {
            XCTAssertTrue(w.output.contains(s), "\(s):\n\(w.output)")
        }
    }

    // MARK: full disk

    /// Checkpoints on a tmpfs with room for one checkpoint and a half: the step-8 save fails, the
    /// run stops with an error naming the shard and the disk, exits non-zero; step 4 stays latest
    /// and whole, and nothing of the failed save is left behind.
    func testFullDiskStopsTheRunAndKeepsThePreviousCheckpoint() throws {
        let f = try fixture()
        let oneCheckpoint = try FileManager.default.contentsOfDirectory(atPath: f.runA + "/step-00000004").reduce(0) {
            $0 + (try FileManager.default.attributesOfItem(atPath: f.runA + "/step-00000004/" + $1)[.size] as! Int)
        }
        let disk = f.root + "/small-disk"
        try FileManager.default.createDirectory(atPath: disk, withIntermediateDirectories: true)
        let kb = (oneCheckpoint * 3 / 2) / 1024 + 64
        let mount = try runTool("/bin/mount", ["-t", "tmpfs", "-o", "size=\(kb)k", "tmpfs", disk])
        guard mount.status == 0 else {
            XCTFail("cannot mount a \(kb) KB tmpfs at \(disk) (this test needs root and tmpfs): \(mount.output)")
            return
        }
        defer { _ = try? runTool("/bin/umount", [disk]) }
        let r = try train(f, run: "F", ranks: 2, extra: ["--set", "checkpoint.dir=\(disk)"])
        XCTAssertNotEqual(r.status, 0, r.output)
        let run = disk + "/F"
        for s in [
            "\(run)/.step-00000008.tmp/rank-", "writing the checkpoint shard failed", "MB free on that disk",
            "earlier ones are intact",
        ] {
            XCTAssertTrue(r.output.contains(s), "\(s):\n\(r.output)")
        }
        let store = CheckpointStore(runDirectory: run)
        XCTAssertEqual(store.latestName(), "step-00000004")
        // (the watchdog's folder may remain when MPI_Abort ends a rank before it removed its file)
        let left = try FileManager.default.contentsOfDirectory(atPath: run).filter { $0 != "watchdog" }.sorted()
        XCTAssertEqual(left, ["config.yaml", "latest", "metrics.jsonl", "step-00000004", "tensorboard"])
        try assertSameState(f.runA + "/step-00000004", run + "/step-00000004")
    }

    // MARK: export and evaluation

    /// `tensorar-export` of a run folder (its latest, step 16): the file holds exactly the
    /// checkpoint's parameters, with the SPEC names and tensorar.config; it loads as a model and
    /// as `--init-from`. Bad input is `error: <file>: <problem>` and a non-zero exit.
    func testExportRoundTrip() throws {
        let f = try fixture()
        let out = f.root + "/exported.safetensors"
        let e = try runTool(try binary("tensorar-export"), ["--checkpoint", f.runA, "--out", out])
        XCTAssertEqual(e.status, 0, e.output)
        let st = try Safetensors.read(out)
        XCTAssertEqual(st.metadata["tensorar.step"], "16")
        let manifest = try CheckpointStore.readManifest(f.runA + "/step-00000016")
        XCTAssertEqual(
            try JSONDecoder().decode(ModelConfig.self, from: Data(st.metadata["tensorar.config"]!.utf8)), manifest.model
        )
        let exported = try Transformer.load(out)
        let table = ParameterTable(manifest.model)
        XCTAssertEqual(Set(st.tensors.keys), Set(table.entries.map(\.name)))
        let params = FlatBuffer(count: table.total)
        _ = try CheckpointStore.load(
            from: f.runA + "/step-00000016", model: manifest.model, table: table, params: params, optimizer: nil)
        XCTAssertEqual(exported.params.array, params.array, "exported weights against the checkpoint's parameters")
        // The end-of-run weights the trainer wrote itself are the same numbers.
        XCTAssertEqual(try Transformer.load(f.runA + "/model.safetensors").params.array, params.array)

        for (bad, says) in [
            (f.root + "/no-such-folder", "no such folder"), (out, "a file, not a folder"),
            (f.root, "no checkpoints of a run in it"),
        ] {
            let r = try runTool(
                try binary("tensorar-export"), ["--checkpoint", bad, "--out", f.root + "/x.safetensors"])
            XCTAssertNotEqual(r.status, 0, r.output)
            XCTAssertTrue(r.output.contains("error: \(bad): ") && r.output.contains(says), r.output)
        }
        // Import as initialisation: a 1-step run from the exported weights, with a learning rate
        // too small to move them (1e-30), ends where it started.
        let i = try train(
            f, run: "E", ranks: nil,
            extra: [
                "--init-from", out, "--set", "train.steps=1", "--set", "optim.lr_plugin=0", "--set",
                "optim.lr_base=1e-30",
            ])
        XCTAssertEqual(i.status, 0, i.output)
        let after = try Transformer.load(f.checkpoints + "/E/model.safetensors").params.array
        XCTAssertEqual(zip(after, params.array).map { abs($0 - $1) }.max() ?? 1, 0, accuracy: 1e-20)
    }

    /// `tensorar-eval --noise train` on the checkpoint folder reproduces the validation loss the
    /// trainer logged for it: the run used seed 7 and the linear schedule, and eval takes both
    /// from the manifest.
    ///
    /// What is promised is agreement to float32 rounding, not equal bits. Both compute the same
    /// float32 forward of the same samples under the same noise, but the trainer ran 2 ranks with
    /// micro-batches of 4 and 1 BLAS thread each, eval one process with batches of 32 and the
    /// machine's threads. OpenBLAS's sgemm rounding is not the same for every split of a product:
    /// with its Zen (and Haswell-class) kernels the last bits of a row change with the number of
    /// rows in the call and with the thread count (measured with OPENBLAS_CORETYPE=Zen: batch 4 on
    /// 1 thread equal bits; batches 12 or 24, or 2 threads, up to 3.7e-9 relative), while its
    /// SkylakeX kernels happen to give equal bits. Matching the trainer's layout is no cure: on
    /// another rank count there is no single layout to match. So: each per-token CE moves by a few
    /// float32 ulps, their mean by less; the tolerance is 16 float32 ulps of the loss (1.9e-6
    /// relative), 500x the measured spread. The negative controls (a wrong seed alone, a wrong
    /// schedule alone) must move the loss by more than 10x the tolerance (measured: the seed
    /// alone 1.2e-4, 24x; the schedule more).
    func testEvalOfACheckpointReproducesTheLoggedValidationLoss() throws {
        let f = try fixture()
        let logged = try XCTUnwrap(f.metricsA.valLoss[16].flatMap(Double.init))
        func eval(_ extra: [String]) throws -> Double {
            let r = try runTool(
                try binary("tensorar-eval"),
                ["--weights", f.runA, "--data", f.val, "--noise", "train", "--limit", "24", "--json"] + extra)
            XCTAssertEqual(r.status, 0, r.output)
            let line = try XCTUnwrap(r.stdout.split(separator: "\n").last, r.output)
            let json = try XCTUnwrap(
                try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any], r.output)
            return try XCTUnwrap(json["loss"] as? Double, r.output)
        }
        let tolerance = 16 * Double(Float.ulpOfOne) * logged
        XCTAssertEqual(
            try eval([]), logged, accuracy: tolerance,
            "tensorar-eval on the step-16 checkpoint against the trainer's val_loss")
        // Another batch split: the same promise.
        XCTAssertEqual(try eval(["--batch-size", "5"]), logged, accuracy: tolerance, "eval with batches of 5")
        // Negative controls: each of the checkpoint's noise settings matters on its own.
        for wrong in [["--noise-seed", "0"], ["--noise-schedule", "sine"]] {
            let other = try eval(wrong)
            XCTAssertGreaterThan(abs(other - logged), 10 * tolerance, "\(wrong) must change the validation loss")
        }
    }
}

// MARK: - running the programs

extension ResumeTests {
    /// The release binary `name`; fails clearly when it is missing or older than the sources.
    func binary(_ name: String) throws -> String {
        let path = packageRoot + "/.build/release/" + name
        let fm = FileManager.default
        guard fm.isExecutableFile(atPath: path) else {
            throw InputError(
                path,
                "missing: these tests run the release binaries; build them first with "
                    + "`swift build -c release` (Launch/test.sh does)"
            )
        }
        if let newer = try sourceNewer(than: path, program: name) {
            throw InputError(
                path, "older than Sources/\(newer): rebuild with `swift build -c release` (Launch/test.sh does)")
        }
        return path
    }

    /// The settings every run here shares (the reference run's), then `extra`.
    func trainArguments(_ f: Fixture, run: String, extra: [String]) -> [String] {
        let settings = [
            "data.train=\(f.train)", "data.val=\(f.val)", "data.val_samples=24",
            "model.preset=null", "model.dim=32", "model.n_layer=2", "model.n_head=2", "model.window=2",
            "model.plugin_depth=1",
            "noise.schedule=linear", "train.seed=7",
            "train.global_batch=16", "train.micro_batch=4", "train.steps=\(ResumeTests.steps)", "train.log_every=1",
            "train.val_every=\(ResumeTests.stepsPerCheckpoint)", "optim.lr_plugin=3e-3", "optim.lr_base=3e-3",
            "checkpoint.dir=\(f.checkpoints)", "checkpoint.run=\(run)",
            "checkpoint.every=\(ResumeTests.stepsPerCheckpoint)",
            "checkpoint.keep_last=10", "dist.threads_per_rank=1",
        ]
        return settings.flatMap { ["--set", $0] } + extra
    }

    /// A started job: `mpirun -n W tensorar-train ...` (or one process when `ranks` is nil).
    final class Job {
        let process: Process
        let log: String
        let ranks: Int?
        init(process: Process, log: String, ranks: Int?) {
            self.process = process
            self.log = log
            self.ranks = ranks
        }

        struct Outcome {
            var status: Int32
            var output: String
            var stdout: String
        }

        /// Waits for the job (at most `timeout` seconds: then kills it and throws).
        func wait(timeout: Double = 120) throws -> Outcome {
            let deadline = Date().addingTimeInterval(timeout)
            while process.isRunning && Date() < deadline { usleep(20_000) }
            if process.isRunning {
                for pid in (try? childPIDs(process.processIdentifier)) ?? [] { kill(pid, SIGKILL) }
                process.terminate()
                process.waitUntilExit()
                throw InputError(
                    log,
                    "did not finish within \(Int(timeout)) s:\n"
                        + ((try? String(contentsOfFile: log, encoding: .utf8)) ?? ""))
            }
            let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
            return Outcome(status: process.terminationStatus, output: text, stdout: text)
        }
    }

    func start(_ f: Fixture, run: String, ranks: Int?, extra: [String] = [], env: [String: String] = [:]) throws -> Job
    {
        let exe = try binary("tensorar-train")
        let log = f.root + "/\(run)-\(UUID().uuidString.prefix(8)).log"
        _ = FileManager.default.createFile(atPath: log, contents: nil)
        let p = Process()
        var environment = ProcessInfo.processInfo.environment.filter {
            !$0.key.hasPrefix("OMPI_") && !$0.key.hasPrefix("PMIX_")
        }
        environment.merge(env) { $1 }
        p.environment = environment
        let args = trainArguments(f, run: run, extra: extra)
        if let ranks {
            p.executableURL = URL(fileURLWithPath: try mpirun())
            p.arguments = ["--allow-run-as-root", "--oversubscribe", "-n", String(ranks), exe] + args
        } else {
            p.executableURL = URL(fileURLWithPath: exe)
            p.arguments = args
        }
        // No Configs/default.yaml in the working folder: only the settings above apply.
        p.currentDirectoryURL = URL(fileURLWithPath: f.root)
        let h = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
        p.standardOutput = h
        p.standardError = h
        try p.run()
        return Job(process: p, log: log, ranks: ranks)
    }

    func train(_ f: Fixture, run: String, ranks: Int?, extra: [String] = []) throws -> Job.Outcome {
        try start(f, run: run, ranks: ranks, extra: extra).wait()
    }

    func mpirun() throws -> String {
        guard
            let p = ["/usr/bin/mpirun", "/usr/local/bin/mpirun"].first(where: {
                FileManager.default.isExecutableFile(atPath: $0)
            })
        else {
            throw InputError("mpirun", "not found: install openmpi-bin (Launch/setup.sh does)")
        }
        return p
    }

    /// Runs a program to the end; stdout and stderr together in `output`, stdout alone in `stdout`.
    func runTool(_ exe: String, _ args: [String], directory: String? = nil) throws -> Job.Outcome {
        let errFile = NSTemporaryDirectory() + "tensorar-tool-\(UUID().uuidString).err"
        _ = FileManager.default.createFile(atPath: errFile, contents: nil)
        defer { try? FileManager.default.removeItem(atPath: errFile) }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: exe)
        p.arguments = args
        if let directory { p.currentDirectoryURL = URL(fileURLWithPath: directory) }
        let out = Pipe()
        p.standardOutput = out
        p.standardError = try FileHandle(forWritingTo: URL(fileURLWithPath: errFile))
        try p.run()
        let o = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        let e = (try? String(contentsOfFile: errFile, encoding: .utf8)) ?? ""
        return Job.Outcome(status: p.terminationStatus, output: o + e, stdout: o)
    }

    /// Waits until `path` exists (the job is then inside a checkpoint write).
    func waitFor(_ path: String, _ job: Job, timeout: Double = 60) throws {
        let deadline = Date().addingTimeInterval(timeout)
        while !FileManager.default.fileExists(atPath: path) {
            guard job.process.isRunning, Date() < deadline else {
                let r = try? job.wait(timeout: 5)
                throw InputError(path, "never appeared; the job's output:\n\(r?.output ?? "")")
            }
            usleep(5_000)
        }
    }

    /// The rank processes of an mpirun job, by rank (from each child's OMPI_COMM_WORLD_RANK).
    func rankPIDs(_ job: Job) throws -> [Int: pid_t] {
        var out: [Int: pid_t] = [:]
        for pid in try childPIDs(job.process.processIdentifier) {
            guard let env = FileManager.default.contents(atPath: "/proc/\(pid)/environ") else { continue }
            for entry in env.split(separator: 0) {
                let s = String(decoding: entry, as: UTF8.self)
                if s.hasPrefix("OMPI_COMM_WORLD_RANK="), let r = Int(s.dropFirst(21)) { out[r] = pid }
            }
        }
        return out
    }

    /// Copies the reference run's checkpoints up to `step` into a new run folder whose `latest`
    /// names `step`.
    func copyRun(_ f: Fixture, to run: String, upTo step: Int) throws {
        let fm = FileManager.default
        try fm.createDirectory(atPath: run, withIntermediateDirectories: true)
        for s in stride(from: ResumeTests.stepsPerCheckpoint, through: step, by: ResumeTests.stepsPerCheckpoint) {
            let name = CheckpointStore.folderName(step: s)
            try fm.copyItem(atPath: f.runA + "/" + name, toPath: run + "/" + name)
        }
        try (CheckpointStore.folderName(step: step) + "\n").write(
            toFile: run + "/latest", atomically: true, encoding: .utf8)
    }

    /// Both checkpoints hold the same parameters, moments and optimizer steps, bit for bit.
    func assertSameState(_ a: String, _ b: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let m = try CheckpointStore.readManifest(a)
        let table = ParameterTable(m.model)
        func state(_ dir: String) throws -> ([Float], [Float], [Float], PerGroup<Int>) {
            let p = FlatBuffer(count: table.total)
            let o = AdamW(table: table, trainable: PerGroup(base: true, plugin: true))
            _ = try CheckpointStore.load(from: dir, model: m.model, table: table, params: p, optimizer: o)
            return (p.array, o.m.array, o.v.array, o.steps)
        }
        let (pa, ma, va, sa) = try state(a)
        let (pb, mb, vb, sb) = try state(b)
        XCTAssertEqual(pa.map(\.bitPattern), pb.map(\.bitPattern), "parameters", file: file, line: line)
        XCTAssertEqual(ma.map(\.bitPattern), mb.map(\.bitPattern), "first moments", file: file, line: line)
        XCTAssertEqual(va.map(\.bitPattern), vb.map(\.bitPattern), "second moments", file: file, line: line)
        XCTAssertEqual(sa, sb, "optimizer steps", file: file, line: line)
    }

    func maxRelativeDifference(_ m: Metrics, _ reference: Metrics) throws -> Double {
        try m.loss.map { step, text in
            let a = try XCTUnwrap(Double(text))
            let b = try XCTUnwrap(reference.loss[step].flatMap(Double.init), "step \(step)")
            return abs(a - b) / abs(b)
        }.max() ?? .infinity
    }
}

/// The loss records of a run's metrics.jsonl, as the text written (the last record of a step wins).
struct Metrics: Equatable {
    var loss: [Int: String] = [:]
    var valLoss: [Int: String] = [:]
    init() {}
    init(run: String) throws {
        let text = try String(contentsOfFile: run + "/metrics.jsonl", encoding: .utf8)
        func field(_ name: String, _ line: Substring) -> String? {
            guard let r = line.range(of: "\"\(name)\": ") else { return nil }
            return String(line[r.upperBound...].prefix { $0 != "," && $0 != "}" })
        }
        for line in text.split(separator: "\n") {
            guard let step = field("step", line).flatMap({ Int($0) }) else { continue }
            if let l = field("loss", line) { loss[step] = l }
            if let v = field("val_loss", line) { valLoss[step] = v }
        }
    }
}

/// The processes whose parent is `pid`.
func childPIDs(_ pid: pid_t) throws -> [pid_t] {
    try FileManager.default.contentsOfDirectory(atPath: "/proc").compactMap { Int32($0) }.filter { p in
        guard let stat = try? String(contentsOfFile: "/proc/\(p)/stat", encoding: .utf8),
            let close = stat.lastIndex(of: ")")
        else { return false }
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        return fields.count > 2 && Int32(fields[1]) == pid
    }
}
