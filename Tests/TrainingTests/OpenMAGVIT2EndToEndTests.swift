import ARModel
import Foundation
import Kernels
import Platform
import TokenData
import XCTest

@testable import Training

/// Open-MAGVIT2 (SPEC section 8) end to end with the release programs, as ResumeTests does for
/// LlamaGen: LlamaGen-layout code files of full 18-bit indices imported with `tensorar-data
/// import-llamagen --vocab-size 262144` (int32 codes), a tiny Open-MAGVIT2 model (D 32, 2 spatial
/// blocks, 1 factorized block, k 2, d 1) trained 8 steps on 2 ranks with a checkpoint every 4,
/// resumed on 1 rank, evaluated (loss = CE(pre) + CE(post), both parts), sampled with a scale
/// and a temperature per sub-token, and exported.
extension ResumeTests {
    /// Class- and position-dependent codes over the whole 2^18 range, plus a little noise.
    func writeLlamaGenCodes(_ root: String, samples n: Int, seed: UInt64) throws -> (codes: String, labels: String) {
        let codes = root + "/codes"
        let labels = root + "/labels"
        for d in [codes, labels] {
            try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true)
        }
        var rng = CounterRNG(seed: seed)
        for i in 0..<n {
            let c = Int64(rng.next() % 4)
            let row = (0..<16).map { p -> Int64 in (c * 65_521 + Int64(p) * 16_411 + Int64(rng.next() % 3)) % 262_144 }
            try npyData(int64: row, shape: [1, 1, 16]).write(to: URL(fileURLWithPath: codes + "/\(i).npy"))
            try npyData(int64: [c], shape: [1]).write(to: URL(fileURLWithPath: labels + "/\(i).npy"))
        }
        return (codes, labels)
    }

    func importCache(_ root: String, _ name: String, samples: Int, seed: UInt64) throws -> String {
        let src = try writeLlamaGenCodes(root + "/\(name)-npy", samples: samples, seed: seed)
        let out = root + "/\(name)"
        let args = [
            "import-llamagen", "--codes", src.codes, "--labels", src.labels, "--out", out,
            "--vocab-size", "262144", "--num-classes", "4",
        ]
        let r = try runTool(try binary("tensorar-data"), args)
        XCTAssertEqual(r.status, 0, r.output)
        return out
    }

    /// The model settings of every Open-MAGVIT2 run here, over the shared ones (later --set wins).
    var openMAGVIT2Settings: [String] {
        ["model.base=open-magvit2", "model.factorized_n_layer=1", "train.steps=8"].flatMap { ["--set", $0] }
    }

    func testOpenMAGVIT2TrainsResumesEvaluatesSamplesAndExports() throws {
        for name in ["tensorar-train", "tensorar-eval", "tensorar-export", "tensorar-sample", "tensorar-data"] {
            _ = try binary(name)
        }
        let root = try temporaryFolder(self)
        let train = try importCache(root, "train", samples: 64, seed: 1)
        let val = try importCache(root, "val", samples: 24, seed: 2)
        let cache = try TokenCache(directory: train)
        XCTAssertEqual(cache.info.vocabSize, 262_144)
        XCTAssertEqual(cache.info.codesKind, .int32, "V > 65535: int32 codes (SPEC section 7)")
        let codes = try cache.read(indices: Array(0..<8), augmentations: [Int](repeating: 0, count: 8)).codes
        XCTAssertGreaterThan(codes.max()!, 65_535, "full 18-bit indices survive the import")
        let f = Fixture(
            root: root, train: train, val: val, checkpoints: root + "/Checkpoints",
            runA: root + "/Checkpoints/O", metricsA: Metrics())
        let a = try self.train(f, run: "O", ranks: 2, extra: openMAGVIT2Settings)
        XCTAssertEqual(a.status, 0, a.output)
        let manifest = try CheckpointStore.readManifest(f.runA + "/step-00000008")
        XCTAssertEqual(manifest.model.base, "open-magvit2")
        XCTAssertEqual(manifest.model.factorizedBits, [6, 12])
        XCTAssertEqual(manifest.model.factorizedNLayer, 1)
        let straight = try Metrics(run: f.runA)
        XCTAssertEqual(straight.loss.keys.sorted(), Array(1...8))
        let first = try XCTUnwrap(straight.loss[1].flatMap(Double.init))
        let last = try XCTUnwrap(straight.loss[8].flatMap(Double.init))
        XCTAssertLessThan(last, first, "training lowers the loss (\(first) -> \(last))")
        let metricsText = try String(contentsOfFile: f.runA + "/metrics.jsonl", encoding: .utf8)
        XCTAssertTrue(metricsText.contains("\"loss_parts\": ["), metricsText)
        XCTAssertTrue(metricsText.contains("\"val_loss_parts\": ["), metricsText)

        // resume the step-4 checkpoint on 1 rank: ResumeTests' tolerance on every later loss
        let from = ["--resume-from", f.runA + "/step-00000004"]
        let r = try self.train(f, run: "R", ranks: 1, extra: openMAGVIT2Settings + from)
        XCTAssertEqual(r.status, 0, r.output)
        let resumed = try Metrics(run: f.checkpoints + "/R")
        XCTAssertEqual(resumed.loss.keys.sorted(), Array(5...8))
        let worst = try maxRelativeDifference(resumed, straight)
        XCTAssertLessThanOrEqual(worst, 1e-5)
        print("open-magvit2: losses \(first) -> \(last); resume 2 -> 1 rank(s): worst relative difference \(worst)")

        try checkOpenMAGVIT2Eval(f, loggedValLoss: try XCTUnwrap(straight.valLoss[8].flatMap(Double.init)))
        try checkOpenMAGVIT2Sampling(f)
        try checkOpenMAGVIT2Export(f)
    }

    /// `tensorar-eval --json`: `loss` is the per-token mean of CE(pre) + CE(post) and equals the
    /// validation loss the trainer logged; both parts are reported and add up to it.
    func checkOpenMAGVIT2Eval(_ f: Fixture, loggedValLoss: Double) throws {
        let e = try runTool(
            try binary("tensorar-eval"),
            [
                "--weights", f.runA, "--data", f.val, "--noise", "train",
                "--limit", "24", "--json",
            ])
        XCTAssertEqual(e.status, 0, e.output)
        let line = try XCTUnwrap(e.stdout.split(separator: "\n").last, e.output)
        let json = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
        let loss = try XCTUnwrap(json["loss"] as? Double)
        let parts = try XCTUnwrap(json["loss_parts"] as? [String: Double], e.output)
        XCTAssertEqual(Set(parts.keys), ["pre", "post"])
        XCTAssertEqual(parts["pre"]! + parts["post"]!, loss, accuracy: 1e-6 * loss)
        XCTAssertLessThan(parts["pre"]!, log(64.0) + 0.5, "CE(pre) is over 64 classes")
        XCTAssertEqual(loss, loggedValLoss, accuracy: 16 * Double(Float.ulpOfOne) * loggedValLoss)
        print("open-magvit2 eval: loss \(loss) = pre \(parts["pre"]!) + post \(parts["post"]!)")
    }

    /// `tensorar-sample --cfg-scale A,B --temperature A,B`: full indices in `tokens`, the same on
    /// 1 and 2 ranks; three values is an error.
    func checkOpenMAGVIT2Sampling(_ f: Fixture) throws {
        let args = [
            "--weights", f.runA, "--classes", "0,1,2", "--per-class", "2", "--cfg-scale", "1.5,3",
            "--temperature", "1,0.5", "--seed", "3", "--batch-size", "4",
        ]
        let one = f.root + "/s1.h5"
        let two = f.root + "/s2.h5"
        let s = try runTool(try binary("tensorar-sample"), args + ["--out", one])
        XCTAssertEqual(s.status, 0, s.output)
        let mp = try runTool(
            try mpirun(),
            [
                "--allow-run-as-root", "--oversubscribe", "-n", "2",
                try binary("tensorar-sample"),
            ] + args + ["--out", two])
        XCTAssertEqual(mp.status, 0, mp.output)
        let h = try HDF5File.open(one)
        let tokens = try h.read("tokens", as: Int32.self).values
        XCTAssertEqual(tokens.count, 6 * 16)
        XCTAssertTrue(tokens.allSatisfy { $0 >= 0 && $0 < 262_144 })
        XCTAssertGreaterThan(tokens.max()!, 4095, "full indices (pre + 64 post), not sub-tokens")
        XCTAssertEqual(try HDF5File.open(two).read("tokens", as: Int32.self).values, tokens, "1 and 2 ranks")
        XCTAssertEqual(try h.stringAttribute("cfg_scale"), "1.5,3.0")
        XCTAssertTrue(try h.stringAttribute("sampling").contains("\"cfg_scales\":[1.5,3]"))
        let bad = try runTool(
            try binary("tensorar-sample"),
            [
                "--weights", f.runA, "--cfg-scale", "1,2,3",
                "--out", one,
            ])
        XCTAssertNotEqual(bad.status, 0)
        XCTAssertTrue(bad.output.contains("--cfg-scale"), bad.output)
    }

    /// `tensorar-export`: the checkpoint's parameters under SPEC section 8's names, with `base`.
    func checkOpenMAGVIT2Export(_ f: Fixture) throws {
        let out = f.root + "/omg.safetensors"
        let e = try runTool(try binary("tensorar-export"), ["--checkpoint", f.runA, "--out", out])
        XCTAssertEqual(e.status, 0, e.output)
        let st = try Safetensors.read(out)
        XCTAssertEqual(st.tensors["post_emb.weight"]?.shape, [4096, 32])
        XCTAssertEqual(st.tensors["head.0.weight"]?.shape, [64, 32])
        let m = try Transformer.load(out)
        XCTAssertEqual(m.config.base, "open-magvit2")
        let manifest = try CheckpointStore.readManifest(f.runA + "/step-00000008")
        let params = FlatBuffer(count: m.table.total)
        _ = try CheckpointStore.load(
            from: f.runA + "/step-00000008", model: manifest.model, table: m.table,
            params: params, optimizer: nil)
        XCTAssertEqual(m.params.array, params.array)
    }
}

/// `model.base: open-magvit2` in the training config (SPEC section 8): its presets, the
/// factorized override, and the errors.
final class OpenMAGVIT2ConfigTests: XCTestCase {
    func testBaseSelectsItsPresetsAndFactorizedSettings() throws {
        let yaml = "model:\n  base: open-magvit2\n  preset: B\n  window: 1\n  plugin_depth: 0\n"
        let c = try TrainConfig.resolve(yaml: yaml, source: "omg.yaml")
        let m = try c.model.resolve(vocabSize: 262_144, numClasses: 1000, gridSize: 16)
        XCTAssertEqual(ParameterTable(m).total, 343_570_432)
        XCTAssertEqual(m.factorizedBits, [6, 12])
        let o = try TrainConfig.resolve(
            yaml: "", source: "x.yaml",
            overrides: [
                "model.base=open-magvit2", "model.preset=null", "model.dim=32", "model.n_layer=2", "model.n_head=2",
                "model.factorized_n_layer=3",
            ])
        let small = try o.model.resolve(vocabSize: 64, numClasses: 4, gridSize: 4)
        XCTAssertEqual(small.factorizedNLayer, 3)
        XCTAssertEqual(small.factorizedBits, [2, 4])
        assertInputError(["factorized_n_layer", "open-magvit2"]) {
            try TrainConfig.resolve(yaml: "model:\n  factorized_n_layer: 2\n", source: "l.yaml").validate(worldSize: 1)
        }
        assertInputError(["XXL", "open-magvit2"]) {
            let yaml = "model:\n  base: open-magvit2\n  preset: XXL\n"
            try TrainConfig.resolve(yaml: yaml, source: "b.yaml").validate(worldSize: 1)
        }
        // a dataset whose V is not a power of two cannot feed Open-MAGVIT2
        XCTAssertThrowsError(try c.model.resolve(vocabSize: 1000, numClasses: 1000, gridSize: 16))
    }

    func testShippedOpenMAGVIT2Config() throws {
        let c = try TrainConfig.load(file: packageRoot + "/Configs/open-magvit2-b-imagenet256.yaml")
        XCTAssertNoThrow(try c.validate(worldSize: 8))
        let m = try c.model.resolve(vocabSize: 262_144, numClasses: 1000, gridSize: 16)
        XCTAssertEqual(m.base, "open-magvit2")
        XCTAssertEqual(ParameterTable(m).count(of: .base), 343_570_432)
        XCTAssertEqual([m.window, m.pluginDepth], [4, 2])
    }
}
