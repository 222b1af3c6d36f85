import ARModel
import Foundation
import Platform
import XCTest

@testable import Training

/// Issue 17 ("nothing lost, nothing silent"): the faults and bad inputs that used to get through,
/// each built here against the release binaries, on ResumeTests' shared tiny cache and reference
/// run. Every test asserts the exit status, that the message names the file or key, and that
/// what existed before is still there.
extension ResumeTests {
    /// A folder holding one file, to stand where a program is told to write a file.
    func precious(_ path: String) throws -> String {
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        let keep = path + "/keep.txt"
        try "do not delete\n".write(toFile: keep, atomically: false, encoding: .utf8)
        return keep
    }

    func assertStillThere(_ path: String, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(
            try? String(contentsOfFile: path, encoding: .utf8), "do not delete\n",
            "\(path) must survive", file: file, line: line)
    }

    /// tensorar-export, tensorar-sample (--out DIR, --out ., --npy-dir naming a file) and the
    /// trainer's final model.safetensors refuse a path that names a folder: exit non-zero, the
    /// message names the path, the folder and its file are still there.
    func testOutputPathsNamingAFolderAreRefusedAndNothingIsRemoved() throws {
        let f = try fixture()
        let dir = f.root + "/out-folder-\(UUID().uuidString.prefix(6))"
        let keep = try precious(dir)
        let e = try runTool(try binary("tensorar-export"), ["--checkpoint", f.runA, "--out", dir])
        XCTAssertEqual(e.status, 2, e.output)
        XCTAssertTrue(e.output.contains("\(dir): is a folder"), e.output)
        assertStillThere(keep)
        // A real export to sample from.
        let weights = f.root + "/fault-weights.safetensors"
        let ok = try runTool(try binary("tensorar-export"), ["--checkpoint", f.runA, "--out", weights])
        XCTAssertEqual(ok.status, 0, ok.output)
        let sample = try binary("tensorar-sample")
        let args = ["--weights", weights, "--per-class", "1", "--classes", "0", "--quiet"]
        let s = try runTool(sample, args + ["--out", dir])
        XCTAssertEqual(s.status, 2, s.output)
        XCTAssertTrue(s.output.contains("\(dir): is a folder"), s.output)
        assertStillThere(keep)
        let dot = try runTool(sample, args + ["--out", "."], directory: dir)
        XCTAssertEqual(dot.status, 2, dot.output)
        XCTAssertTrue(dot.output.contains(".: is a folder"), dot.output)
        assertStillThere(keep)
        let npy = try runTool(sample, args + ["--out", f.root + "/s.h5", "--npy-dir", keep])
        XCTAssertEqual(npy.status, 2, npy.output)
        XCTAssertTrue(npy.output.contains("\(keep): --npy-dir names a file"), npy.output)
        assertStillThere(keep)
        let missing = try runTool(sample, args + ["--out", f.root + "/no-such-folder/s.h5"])
        XCTAssertEqual(missing.status, 2, missing.output)
        XCTAssertTrue(missing.output.contains("the folder \(f.root)/no-such-folder does not exist"), missing.output)
        // The trainer: refused before training, not after.
        let run = f.checkpoints + "/FOLDER"
        let weightsKeep = try precious(run + "/model.safetensors")
        let t = try train(f, run: "FOLDER", ranks: nil)
        XCTAssertEqual(t.status, 1, t.output)
        XCTAssertTrue(t.output.contains("\(run)/model.safetensors: is a folder"), t.output)
        XCTAssertFalse(t.output.contains("step 1/"), "refused before the first step:\n\(t.output)")
        assertStillThere(weightsKeep)
    }

    /// --fresh on a run folder holding checkpoints would mix two runs: refused, the old run's
    /// checkpoints and `latest` untouched.
    func testFreshOnAFolderHoldingAnotherRunIsRefused() throws {
        let f = try fixture()
        let run = f.checkpoints + "/FRESH"
        try copyRun(f, to: run, upTo: 8)
        let before = try FileManager.default.contentsOfDirectory(atPath: run).sorted()
        let r = try train(f, run: "FRESH", ranks: nil, extra: ["--fresh"])
        XCTAssertEqual(r.status, 1, r.output)
        XCTAssertTrue(r.output.contains("\(run): --fresh"), r.output)
        XCTAssertTrue(r.output.contains("step-00000008"), r.output)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: run).sorted(), before)
        XCTAssertEqual(CheckpointStore(runDirectory: run).latestName(), "step-00000008")
        XCTAssertNoThrow(try assertSameState(f.runA + "/step-00000008", run + "/step-00000008"))
    }

    /// A second trainer on a run folder in use is refused naming the holder's host and pid; the
    /// first one is not disturbed. Once the holder is gone (kill -9 leaves its lock), the lock is
    /// taken over and the run proceeds; a clean end removes the lock.
    func testASecondTrainerOnALockedRunIsRefusedAndAStaleLockIsTakenOver() throws {
        let f = try fixture()
        let run = f.checkpoints + "/LOCK"
        let first = try start(f, run: "LOCK", ranks: nil, env: ["TENSORAR_TEST_PAUSE_SHARD_WRITE": "0:4:600"])
        try waitFor(run + "/.step-00000004.tmp/rank-00000-of-00001.h5", first)
        let second = try train(f, run: "LOCK", ranks: nil)
        XCTAssertEqual(second.status, 1, second.output)
        let pid = first.process.processIdentifier
        let holder =
            "\(run)/lock: the run folder is in use by another trainer: pid \(pid) on host "
            + RunLock.hostName()
        XCTAssertTrue(second.output.contains(holder), second.output)
        XCTAssertTrue(first.process.isRunning, "the first trainer must not be disturbed")
        XCTAssertEqual(kill(pid, SIGKILL), 0)
        _ = try? first.wait(timeout: 20)
        XCTAssertTrue(FileManager.default.fileExists(atPath: run + "/lock"), "kill -9 leaves the lock behind")
        let third = try train(f, run: "LOCK", ranks: nil, extra: ["--set", "train.steps=2"])
        XCTAssertEqual(third.status, 0, third.output)
        XCTAssertTrue(third.output.contains("took over the lock \(run)/lock of pid \(pid)"), third.output)
        XCTAssertFalse(FileManager.default.fileExists(atPath: run + "/lock"), "a clean end removes the lock")
    }

    /// An exported model of the reference run (for the tools that take weights).
    func exportedWeights(_ f: Fixture) throws -> String {
        let weights = f.root + "/weights-\(UUID().uuidString.prefix(6)).safetensors"
        let r = try runTool(try binary("tensorar-export"), ["--checkpoint", f.runA, "--out", weights])
        XCTAssertEqual(r.status, 0, r.output)
        return weights
    }

    /// Malformed --classes, --limit 0 or past the cache, data.val_samples past the cache: errors
    /// naming the flag or key and the file, not a quiet other meaning.
    func testMalformedCountsAndRangesAreErrors() throws {
        let f = try fixture()
        let weights = try exportedWeights(f)
        let sample = try binary("tensorar-sample")
        for bad in ["-1", "3-", "2-1", "1,,2", "a", "1-2-3"] {
            let args = ["--weights", weights, "--classes=\(bad)", "--out", f.root + "/c.h5", "--quiet"]
            let r = try runTool(sample, args)
            XCTAssertEqual(r.status, 2, "--classes \(bad): \(r.output)")
            XCTAssertTrue(r.output.contains("error: --classes: cannot read"), "--classes \(bad): \(r.output)")
        }
        let four = try runTool(sample, ["--weights", weights, "--classes", "4", "--out", f.root + "/c.h5", "--quiet"])
        XCTAssertEqual(four.status, 2, four.output)
        XCTAssertTrue(four.output.contains("\(weights): class 4 is outside the model's 4 classes"), four.output)
        XCTAssertFalse(FileManager.default.fileExists(atPath: f.root + "/c.h5"))
        let eval = try binary("tensorar-eval")
        let zero = try runTool(eval, ["--weights", weights, "--data", f.val, "--limit", "0"])
        XCTAssertNotEqual(zero.status, 0, zero.output)
        XCTAssertTrue(zero.output.contains("--limit must be at least 1"), zero.output)
        let past = try runTool(eval, ["--weights", weights, "--data", f.val, "--limit", "33"])
        XCTAssertEqual(past.status, 2, past.output)
        XCTAssertTrue(past.output.contains("\(f.val): --limit 33 is more than the 32 samples"), past.output)
        // Weights so large the logits overflow: the loss is reported as not finite, not as a JSON failure.
        var st = try Safetensors.read(weights)
        let w = try st.floats("output.weight").map { $0 < 0 ? -3e38 : Float(3e38) }
        st.tensors["output.weight"] = .init(floats: w, shape: st.tensors["output.weight"]!.shape)
        let overflowing = f.root + "/overflow.safetensors"
        try st.write(to: overflowing)
        let inf = try runTool(eval, ["--weights", overflowing, "--data", f.val, "--json"])
        XCTAssertEqual(inf.status, 2, inf.output)
        let notFinite = "\(overflowing): the loss over 32 samples of \(f.val) is not finite"
        XCTAssertTrue(inf.output.contains(notFinite), inf.output)
        let t = try train(f, run: "VALN", ranks: nil, extra: ["--set", "data.val_samples=33"])
        XCTAssertEqual(t.status, 1, t.output)
        let message = "\(f.val): data.val_samples is 33 but this validation cache holds only 32"
        XCTAssertTrue(t.output.contains(message), t.output)
    }

    /// --init-from: a folder, a broken tensorar.config, a NaN in a tensor; a config that is a
    /// folder; a model far too big for memory (refused before allocating, saying what fits).
    func testBadStartingPointsAreRefusedBeforeTraining() throws {
        let f = try fixture()
        let weights = try exportedWeights(f)
        let folder = f.root + "/init-folder"
        let keep = try precious(folder)
        let a = try train(f, run: "INIT1", ranks: nil, extra: ["--init-from", folder])
        XCTAssertEqual(a.status, 1, a.output)
        XCTAssertTrue(a.output.contains("\(folder): is a folder; expected a safetensors file"), a.output)
        assertStillThere(keep)
        var st = try Safetensors.read(weights)
        st.metadata["tensorar.config"] = #"{"vocab_size": 32, "dim": "wide"}"#
        let broken = f.root + "/broken-config.safetensors"
        try st.write(to: broken)
        let b = try train(f, run: "INIT2", ranks: nil, extra: ["--init-from", broken])
        XCTAssertEqual(b.status, 1, b.output)
        XCTAssertTrue(b.output.contains("\(broken): metadata tensorar.config is not a valid model config"), b.output)
        st = try Safetensors.read(weights)
        var v = try st.floats("output.weight")
        v[5] = .nan
        st.tensors["output.weight"] = .init(floats: v, shape: st.tensors["output.weight"]!.shape)
        let nan = f.root + "/nan.safetensors"
        try st.write(to: nan)
        let c = try train(f, run: "INIT3", ranks: nil, extra: ["--init-from", nan])
        XCTAssertEqual(c.status, 1, c.output)
        let nanMessage = "\(nan): tensor 'output.weight' holds a non-finite value (nan) at element 5"
        XCTAssertTrue(c.output.contains(nanMessage), c.output)
        let s = try runTool(try binary("tensorar-sample"), ["--weights", nan, "--out", f.root + "/n.h5", "--quiet"])
        XCTAssertEqual(s.status, 2, s.output)
        XCTAssertTrue(s.output.contains("tensor 'output.weight' holds a non-finite value"), s.output)
        for run in ["INIT1", "INIT2", "INIT3"] {
            XCTAssertTrue(CheckpointStore(runDirectory: f.checkpoints + "/" + run).completeCheckpoints().isEmpty)
        }
        let cfg = try runTool(try binary("tensorar-train"), [folder])
        XCTAssertEqual(cfg.status, 1, cfg.output)
        XCTAssertTrue(cfg.output.contains("\(folder): is a folder, not a config file"), cfg.output)
        let t0 = Date()
        let big = try train(
            f, run: "HUGE", ranks: nil,
            extra: [
                "--set", "model.dim=65536", "--set", "model.n_layer=48",
                "--set", "model.n_head=64",
            ])
        XCTAssertEqual(big.status, 1, big.output)
        XCTAssertTrue(big.output.contains("config (model, train.micro_batch): the model needs about"), big.output)
        XCTAssertTrue(big.output.contains("Even the weights do not fit"), big.output)
        XCTAssertFalse(big.output.contains("allocate"), big.output)
        XCTAssertLessThan(Date().timeIntervalSince(t0), 30, "refused before allocating anything")
    }

    /// kill -STOP of rank 1 of 2 under real mpirun: rank 0's watchdog ends the job after
    /// dist.collective_timeout_s (2 s here) naming the step and rank 1; the checkpoints written
    /// before are intact.
    func testAStoppedRankEndsTheJobNamingTheStepAndTheRank() throws {
        let f = try fixture()
        let run = f.checkpoints + "/STOP"
        let settings = ["train.steps=100000", "checkpoint.every=2", "train.val_every=0", "dist.collective_timeout_s=2"]
        let job = try start(f, run: "STOP", ranks: 2, extra: settings.flatMap { ["--set", $0] })
        try waitFor(run + "/step-00000004/manifest.json", job)
        let rank1 = try XCTUnwrap(try rankPIDs(job)[1])
        XCTAssertEqual(kill(rank1, SIGSTOP), 0)
        defer { kill(rank1, SIGKILL) }
        let t0 = Date()
        let r = try job.wait(timeout: 60)
        XCTAssertNotEqual(r.status, 0, r.output)
        XCTAssertLessThan(Date().timeIntervalSince(t0), 30, "the watchdog, not the test's timeout, ended the job")
        let lines = r.output.split(separator: "\n").map(String.init)
        let line = lines.first { $0.contains("(dist.collective_timeout_s)") } ?? ""
        XCTAssertTrue(line.hasPrefix("error: rank 0 of 2: step "), r.output)
        XCTAssertTrue(line.contains("has not finished after 2 s"), line)
        XCTAssertTrue(line.contains("rank(s) 1 (last seen at step "), line)
        let store = CheckpointStore(runDirectory: run)
        let latest = try XCTUnwrap(store.latestName())
        XCTAssertNoThrow(try CheckpointStore.verify(run + "/" + latest))
        XCTAssertGreaterThanOrEqual(Int(latest.dropFirst(5)) ?? 0, 4, "the checkpoints written before are kept")
        print("watchdog: \(line)")
    }

    /// A manifest whose data position does not fit the cache (data_epoch against data_offset over
    /// its 128 samples), and a shard from another step: resume is refused naming the file; the
    /// checkpoint folder is left as it was.
    func testAResumeFromAnInconsistentCheckpointIsRefused() throws {
        let f = try fixture()
        let run = f.checkpoints + "/POS"
        try copyRun(f, to: run, upTo: 8)
        let manifest = run + "/step-00000008/manifest.json"
        let text = try Data(contentsOf: URL(fileURLWithPath: manifest))
        var json = try JSONSerialization.jsonObject(with: text) as! [String: Any]
        json["data_epoch"] = 5
        try JSONSerialization.data(withJSONObject: json).write(to: URL(fileURLWithPath: manifest))
        let r = try train(f, run: "POS", ranks: nil, extra: ["--resume"])
        XCTAssertEqual(r.status, 1, r.output)
        XCTAssertTrue(r.output.contains("\(manifest): data_epoch 5 does not match data_offset 128"), r.output)
        XCTAssertEqual(CheckpointStore(runDirectory: run).latestName(), "step-00000008")
        let shard = run + "/step-00000004/rank-00000-of-00002.h5"
        try FileManager.default.removeItem(atPath: shard)
        try FileManager.default.copyItem(atPath: f.runA + "/step-00000008/rank-00000-of-00002.h5", toPath: shard)
        let s = try train(f, run: "POS", ranks: nil, extra: ["--resume-from", run + "/step-00000004"])
        XCTAssertEqual(s.status, 1, s.output)
        XCTAssertTrue(s.output.contains("\(shard): attribute step is 8, the manifest says 4"), s.output)
    }
}
