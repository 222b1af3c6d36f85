import ARModel
import Foundation
import Kernels
import Platform
import TokenData
import XCTest

@testable import Training

/// RAR (SPEC section 9) end to end with the release programs, as the Open-MAGVIT2 test: RAR
/// codes (V = 1024) in LlamaGen's layout imported with `tensorar-data import-llamagen
/// --vocab-size 1024`; a tiny RAR base trained in annealed random order on 2 ranks, resumed on 1
/// rank from its step-4 checkpoint (the orders are keyed by step and sample: the same losses),
/// evaluated in raster order, sampled with the power-cosine schedule and exported; then TensorAR
/// over it (k 2, d 1) trains on 2 ranks.
extension ResumeTests {
    func importRARCache(_ root: String, _ name: String, samples n: Int, seed: UInt64) throws -> String {
        let codes = root + "/\(name)-npy/codes"
        let labels = root + "/\(name)-npy/labels"
        for d in [codes, labels] {
            try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true)
        }
        var rng = CounterRNG(seed: seed)
        for i in 0..<n {
            let c = Int64(rng.next() % 4)
            let row = (0..<16).map { p -> Int64 in (c * 251 + Int64(p) * 61 + Int64(rng.next() % 3)) % 1024 }
            try npyData(int64: row, shape: [1, 1, 16]).write(to: URL(fileURLWithPath: codes + "/\(i).npy"))
            try npyData(int64: [c], shape: [1]).write(to: URL(fileURLWithPath: labels + "/\(i).npy"))
        }
        let out = root + "/\(name)"
        let args = [
            "import-llamagen", "--codes", codes, "--labels", labels, "--out", out, "--vocab-size", "1024",
            "--num-classes", "4",
        ]
        let r = try runTool(try binary("tensorar-data"), args)
        XCTAssertEqual(r.status, 0, r.output)
        return out
    }

    func testRARTrainsInRandomOrderResumesEvaluatesSamplesAndExports() throws {
        for name in ["tensorar-train", "tensorar-eval", "tensorar-export", "tensorar-sample", "tensorar-data"] {
            _ = try binary(name)
        }
        let root = try temporaryFolder(self)
        let train = try importRARCache(root, "train", samples: 64, seed: 1)
        let val = try importRARCache(root, "val", samples: 24, seed: 2)
        let cache = try TokenCache(directory: train)
        XCTAssertEqual(cache.info.vocabSize, 1024)
        XCTAssertEqual(cache.info.codesKind, .uint16)
        let f = Fixture(
            root: root, train: train, val: val, checkpoints: root + "/Checkpoints",
            runA: root + "/Checkpoints/A", metricsA: Metrics())
        let base = [
            "model.base=rar", "model.window=1", "model.plugin_depth=0", "train.steps=8",
            "train.random_order={start: 2, end: 6}",
        ].flatMap { ["--set", $0] }
        let a = try self.train(f, run: "A", ranks: 2, extra: base)
        XCTAssertEqual(a.status, 0, a.output)
        let manifest = try CheckpointStore.readManifest(f.runA + "/step-00000008")
        XCTAssertEqual(manifest.model.base, "rar")
        XCTAssertEqual(manifest.model.normEps, 1e-6)
        let straight = try Metrics(run: f.runA)
        let first = try XCTUnwrap(straight.loss[1].flatMap(Double.init))
        let last = try XCTUnwrap(straight.loss[8].flatMap(Double.init))
        XCTAssertLessThan(last, first, "training lowers the loss (\(first) -> \(last))")

        let from = ["--resume-from", f.runA + "/step-00000004"]
        let r = try self.train(f, run: "R", ranks: 1, extra: base + from)
        XCTAssertEqual(r.status, 0, r.output)
        let resumed = try Metrics(run: f.checkpoints + "/R")
        XCTAssertEqual(resumed.loss.keys.sorted(), Array(5...8))
        let worst = try maxRelativeDifference(resumed, straight)
        XCTAssertLessThanOrEqual(worst, 1e-5)
        print("rar: losses \(first) -> \(last); resume 2 -> 1 rank(s): worst relative difference \(worst)")

        // the raster-order loss of the final weights: the trainer's logged validation loss
        let e = try runTool(
            try binary("tensorar-eval"), ["--weights", f.runA, "--data", f.val, "--limit", "24", "--json"])
        XCTAssertEqual(e.status, 0, e.output)
        let line = try XCTUnwrap(e.stdout.split(separator: "\n").last, e.output)
        let json = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
        let loss = try XCTUnwrap(json["loss"] as? Double)
        XCTAssertTrue(loss.isFinite && loss > 0 && loss < log(1024.0) + 1, "eval loss \(loss)")
        let logged = try XCTUnwrap(straight.valLoss[8].flatMap(Double.init))
        XCTAssertEqual(loss, logged, accuracy: 1e-4 * logged, "eval = the logged validation loss")

        let out = f.root + "/s.h5"
        let s = try runTool(
            try binary("tensorar-sample"),
            [
                "--weights", f.runA, "--classes", "0,1", "--per-class", "2", "--cfg-scale", "3",
                "--cfg-schedule", "power-cosine", "--cfg-power", "2.75", "--seed", "3", "--out", out,
            ])
        XCTAssertEqual(s.status, 0, s.output)
        let tokens = try HDF5File.open(out).read("tokens", as: Int32.self).values
        XCTAssertEqual(tokens.count, 4 * 16)
        XCTAssertTrue(tokens.allSatisfy { $0 >= 0 && $0 < 1024 })

        let exported = f.root + "/rar.safetensors"
        let x = try runTool(try binary("tensorar-export"), ["--checkpoint", f.runA, "--out", exported])
        XCTAssertEqual(x.status, 0, x.output)
        let st = try Safetensors.read(exported)
        XCTAssertEqual(st.tensors["timesteps_embeddings"]?.shape, [1, 16 + 100, 32])
        XCTAssertEqual(try Transformer.load(exported).config.base, "rar")

        // TensorAR over RAR (the shared settings' k 2, d 1), raster order
        let p = try self.train(f, run: "P", ranks: 2, extra: ["--set", "model.base=rar", "--set", "train.steps=4"])
        XCTAssertEqual(p.status, 0, p.output)
        let plug = try Metrics(run: f.checkpoints + "/P")
        XCTAssertTrue(try XCTUnwrap(plug.loss[4].flatMap(Double.init)).isFinite)
    }
}

/// `model.base: rar` in the training config and the shipped RAR config (SPEC section 9).
final class RARConfigTests: XCTestCase {
    func testShippedRARConfig() throws {
        let c = try TrainConfig.load(file: packageRoot + "/Configs/rar-b-imagenet256.yaml")
        XCTAssertNoThrow(try c.validate(worldSize: 8))
        let m = try c.model.resolve(vocabSize: 1024, numClasses: 1000, gridSize: 16)
        XCTAssertEqual(m.base, "rar")
        XCTAssertEqual(ParameterTable(m).count(of: .base), 260_923_648)
        XCTAssertEqual([m.window, m.pluginDepth], [4, 2])
        XCTAssertEqual(m.normEps, 1e-6)
    }

    func testWithoutPresetRARGetsItsEpsAndMLPWidth() throws {
        let o = try TrainConfig.resolve(
            yaml: "", source: "x.yaml",
            overrides: ["model.base=rar", "model.preset=null", "model.dim=32", "model.n_layer=2", "model.n_head=2"])
        let m = try o.model.resolve(vocabSize: 1024, numClasses: 4, gridSize: 4)
        XCTAssertEqual(m.normEps, 1e-6)
        XCTAssertEqual(m.ffnHidden, 128)
    }
}
