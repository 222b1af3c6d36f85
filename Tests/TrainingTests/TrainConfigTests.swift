import ARModel
import Foundation
import Platform
import XCTest

@testable import Training

final class TrainConfigTests: XCTestCase {
    func testEmptyFileGivesTheDefaults() throws {
        XCTAssertEqual(try TrainConfig.resolve(yaml: "", source: "empty.yaml"), TrainConfig())
        XCTAssertEqual(try TrainConfig.resolve(yaml: "# only a comment\n", source: "c.yaml"), TrainConfig())
        let d = TrainConfig()
        XCTAssertEqual(d.optim.lrPlugin, 1e-4)
        XCTAssertEqual(d.optim.betas, [0.9, 0.95])
        XCTAssertEqual(d.dist.threadsPerRank, .auto)
        XCTAssertNoThrow(try d.validate(worldSize: 1))
    }

    func testPrecedenceDefaultsThenFileThenFlags() throws {
        let yaml = """
            model:
              dim: 192
            optim:
              lr_plugin: 3e-4
              betas: [0.8, 0.9]
            train:
              steps: 50
              micro_batch: 8
            """
        let c = try TrainConfig.resolve(
            yaml: yaml, source: "run.yaml",
            overrides: ["train.steps=70", "noise.type=discrete", "dist.threads_per_rank=3"])
        XCTAssertEqual(c.train.steps, 70)  // flag beats file
        XCTAssertEqual(c.optim.lrPlugin, 3e-4)  // file beats default
        XCTAssertEqual(c.optim.betas, [0.8, 0.9])
        XCTAssertEqual(c.train.microBatch, 8)
        XCTAssertEqual(c.noise.type, .discrete)  // flag over default
        XCTAssertEqual(c.dist.threadsPerRank, .count(3))
        XCTAssertEqual(c.optim.lrBase, 1e-5)  // untouched default
        XCTAssertEqual(c.model.preset, "small")
        XCTAssertEqual(c.model.dim, 192)
        // Later flags beat earlier ones; lists and nulls parse as YAML.
        let d = try TrainConfig.resolve(
            yaml: yaml, source: "run.yaml",
            overrides: [
                "train.steps=1", "train.steps=2", "optim.betas=[0.5, 0.6]", "model.preset=null", "model.n_layer=3",
                "model.n_head=4",
            ])
        XCTAssertEqual(d.train.steps, 2)
        XCTAssertEqual(d.optim.betas, [0.5, 0.6])
        XCTAssertNil(d.model.preset)
    }

    func testUnknownKeysAreRejectedWithTheirNameAndSource() {
        assertInputError(["run.yaml", "unknown key 'model.dimm'", "n_layer"]) {
            _ = try TrainConfig.resolve(yaml: "model:\n  dimm: 3\n", source: "run.yaml")
        }
        assertInputError(["run.yaml", "unknown key 'optimizer'", "optim"]) {
            _ = try TrainConfig.resolve(yaml: "optimizer:\n  lr: 3\n", source: "run.yaml")
        }
        assertInputError(["--set train.stepz=3", "unknown key 'train.stepz'"]) {
            _ = try TrainConfig.resolve(yaml: "", source: "run.yaml", overrides: ["train.stepz=3"])
        }
        assertInputError(["--set steps=3", "section.key"]) {
            _ = try TrainConfig.resolve(yaml: "", source: "run.yaml", overrides: ["steps=3"])
        }
        assertInputError(["--set train.steps", "section.key=value"]) {
            _ = try TrainConfig.resolve(yaml: "", source: "run.yaml", overrides: ["train.steps"])
        }
    }

    func testBadValuesNameTheKey() {
        assertInputError(["run.yaml", "train.steps: expected a whole number, got 'many'"]) {
            _ = try TrainConfig.resolve(yaml: "train:\n  steps: many\n", source: "run.yaml")
        }
        assertInputError(["run.yaml", "optim.betas[1]: expected a number, got 'x'"]) {
            _ = try TrainConfig.resolve(yaml: "optim:\n  betas: [0.9, x]\n", source: "run.yaml")
        }
        assertInputError(["--set model.residual=maybe", "model.residual: expected true or false, got 'maybe'"]) {
            _ = try TrainConfig.resolve(yaml: "", source: "run.yaml", overrides: ["model.residual=maybe"])
        }
        assertInputError([
            "--set noise.type=gaussian", "noise.type",
            "expected one of: replace, discrete, continuous, none, got 'gaussian'",
        ]) {
            _ = try TrainConfig.resolve(yaml: "", source: "run.yaml", overrides: ["noise.type=gaussian"])
        }
        assertInputError([
            "--set optim.schedule_base=exp",
            "optim.schedule_base: expected one of: constant, linear, cosine, got 'exp'",
        ]) {
            _ = try TrainConfig.resolve(yaml: "", source: "run.yaml", overrides: ["optim.schedule_base=exp"])
        }
        assertInputError(["run.yaml", "dist.threads_per_rank", "auto"]) {
            _ = try TrainConfig.resolve(yaml: "dist:\n  threads_per_rank: lots\n", source: "run.yaml")
        }
        assertInputError(["run.yaml", "'model' must be a mapping"]) {
            _ = try TrainConfig.resolve(yaml: "model: B\n", source: "run.yaml")
        }
        assertInputError(["run.yaml", "mapping of sections"]) {
            _ = try TrainConfig.resolve(yaml: "- a\n- b\n", source: "run.yaml")
        }
    }

    func testValidationMessages() throws {
        var c = TrainConfig()
        c.train.globalBatch = 256
        c.train.microBatch = 24
        assertInputError([
            "global_batch 256 is not a multiple of train.micro_batch 24 x 2 rank(s) = 48",
            "1, 2, 4, 8, 16, 32, 64, 128",
        ]) {
            try c.validate(worldSize: 2)
        }
        c.train.microBatch = 32
        XCTAssertNoThrow(try c.validate(worldSize: 2))
        XCTAssertEqual(c.accumulationSteps(worldSize: 2), 4)
        XCTAssertEqual(c.accumulationSteps(worldSize: 8), 1)

        c.optim.betas = [0.9]
        c.loss.slotWeights = [1, 1]
        c.model.preset = "Q"
        c.checkpoint.keepLast = 0
        assertInputError([
            "config", "4 problems", "optim.betas", "loss.slot_weights has 2 values but model.window (k) is 4",
            "model.preset 'Q' is unknown", "checkpoint.keep_last",
        ]) {
            try c.validate(worldSize: 1)
        }
        var d = TrainConfig()
        d.model.window = 3
        d.model.pluginDepth = 0
        assertInputError(["plugin_depth >= 1"]) { try d.validate(worldSize: 1) }
    }

    func testModelShapeResolution() throws {
        var m = TrainConfig.ModelSection()
        let small = try m.resolve(vocabSize: 512, numClasses: 10, gridSize: 7)
        XCTAssertEqual([small.dim, small.nLayer, small.nHead, small.window, small.pluginDepth], [128, 4, 4, 4, 2])
        XCTAssertEqual([small.vocabSize, small.numClasses, small.gridSize], [512, 10, 7])
        m.dim = 192
        m.nHead = 6
        let wider = try m.resolve(vocabSize: 512, numClasses: 10, gridSize: 7)
        XCTAssertEqual(
            [wider.dim, wider.nLayer, wider.nHead, wider.ffnHidden],
            [192, 4, 6, ModelConfig.defaultFFNHidden(dim: 192)])
        m.preset = nil
        m.nLayer = nil
        assertInputError(["dim, n_layer and n_head"]) { _ = try m.resolve(vocabSize: 512, numClasses: 10, gridSize: 7) }
        m.nLayer = 2
        m.nHead = 5
        assertInputError(["not divisible by n_head"]) { _ = try m.resolve(vocabSize: 512, numClasses: 10, gridSize: 7) }
    }

    func testDumpsRoundTrip() throws {
        var c = try TrainConfig.resolve(
            yaml: "", source: "x",
            overrides: ["loss.slot_weights=[1, 0.5, 0.5, 0.25]", "dist.threads_per_rank=2", "optim.eps=1e-7"])
        c.checkpoint.run = "r1"
        XCTAssertEqual(try TrainConfig.resolve(yaml: c.yamlString(), source: "dump.yaml"), c)
        XCTAssertEqual(try JSONDecoder().decode(TrainConfig.self, from: Data(c.jsonString().utf8)), c)
        XCTAssertTrue(c.yamlString().contains("\n  lr_plugin: 0.0001\n"), c.yamlString())
        XCTAssertTrue(c.yamlString().contains("\n  bucket_mb: 25.0\n"), c.yamlString())
        XCTAssertTrue(c.jsonString().contains("\"global_batch\" : 256"))
    }

    func testShippedConfigs() throws {
        let d = try TrainConfig.load(file: packageRoot + "/Configs/default.yaml")
        XCTAssertEqual(d.checkpoint.run, "default")
        for w in [1, 2, 4] { XCTAssertNoThrow(try d.validate(worldSize: w)) }
        XCTAssertGreaterThanOrEqual(d.optim.lrBase, 1e-4, "training from scratch needs a real base learning rate")
        XCTAssertEqual(d.trainableGroups, PerGroup(base: true, plugin: true))
        XCTAssertEqual([1, 2, 4, 8].map { d.lanes(worldSize: $0) }, [2, 2, 2, 1], "micro-batches side by side")

        let b = try TrainConfig.load(
            file: packageRoot + "/Configs/llamagen-b-imagenet256.yaml", overrides: ["checkpoint.run=b1"])
        XCTAssertNoThrow(try b.validate(worldSize: 8))
        XCTAssertEqual(b.checkpoint.run, "b1")
        let shape = try b.model.resolve(vocabSize: 16384, numClasses: 1000, gridSize: 16)
        XCTAssertEqual(ParameterTable(shape).count(of: .base), 110_888_448)  // LlamaGen-B (SPEC 2 presets)
        XCTAssertEqual([shape.window, shape.pluginDepth], [4, 2])
        XCTAssertEqual(b.schedule(.plugin), LRSchedule(kind: .linear, peak: 1e-4, final: 0, warmup: 0, total: 100_000))
        XCTAssertEqual(b.schedule(.base), LRSchedule(kind: .constant, peak: 1e-5, total: 100_000))
        XCTAssertEqual(b.learningRates(at: 50_000), PerGroup(base: 1e-5, plugin: 5e-5))
        XCTAssertEqual(b.accumulationSteps(worldSize: 8), 4)

        assertInputError(["/nonexistent.yaml", "cannot read"]) { _ = try TrainConfig.load(file: "/nonexistent.yaml") }
    }

    func testModelBase() throws {
        let d = try TrainConfig.resolve(yaml: "", source: "x")
        XCTAssertEqual(d.model.base, "llamagen")
        XCTAssertTrue(d.yamlString().contains("model:\n  base: llamagen\n"), d.yamlString())
        let e = try TrainConfig.resolve(yaml: "model:\n  base: llamagen\n", source: "x")
        XCTAssertEqual(e, d)
        let mc = try e.model.resolve(vocabSize: 512, numClasses: 10, gridSize: 7)
        XCTAssertEqual(mc.base, "llamagen")
        XCTAssertFalse(mc.jsonString().contains("\"base\""), "llamagen's model JSON stays as it was")
        // A manifest written before the key existed reads as llamagen.
        var old = try JSONSerialization.jsonObject(with: Data(d.jsonString().utf8)) as! [String: Any]
        var model = old["model"] as! [String: Any]
        model["base"] = nil
        old["model"] = model
        let oldJSON = try JSONSerialization.data(withJSONObject: old)
        XCTAssertEqual(try JSONDecoder().decode(TrainConfig.self, from: oldJSON), d)

        let bad = try TrainConfig.resolve(yaml: "model:\n  base: gpt2\n", source: "run.yaml")
        assertInputError(["model.base 'gpt2' is unknown", "llamagen"]) { try bad.validate(worldSize: 1) }
        assertInputError(["model.base 'gpt2' is unknown", "llamagen"]) {
            _ = try bad.model.resolve(vocabSize: 512, numClasses: 10, gridSize: 7)
        }
    }

    /// `optim.decay_rule_base`, `optim.decay_rule_plugin`: the base's own rule by default (project
    /// for LlamaGen and Open-MAGVIT2), recorded once loaded, a bad name lists the allowed ones, a
    /// manifest without the keys reads as project, and resume refuses another rule.
    func testDecayRules() throws {
        let d = TrainConfig()
        XCTAssertNil(d.optim.decayRuleBase)
        XCTAssertEqual(d.decayRules, PerGroup(base: .project, plugin: .project))
        XCTAssertEqual(BaseRegistry.defaultDecayRule(base: "llamagen"), .project)
        XCTAssertEqual(BaseRegistry.defaultDecayRule(base: "open-magvit2"), .project)
        let loaded = try TrainConfig.load(file: nil)
        XCTAssertEqual(loaded.optim.decayRuleBase, .project, "filled in, so the recorded config names it")
        XCTAssertEqual(loaded.optim.decayRulePlugin, .project)
        XCTAssertTrue(loaded.yamlString().contains("decay_rule_base: project"), loaded.yamlString())
        let rar = try TrainConfig.load(file: nil, overrides: ["optim.decay_rule_base=rar"])
        XCTAssertEqual(rar.decayRules, PerGroup(base: .rar, plugin: .project))
        XCTAssertNoThrow(try rar.validate(worldSize: 1))
        assertInputError(["--set optim.decay_rule_plugin=adam", "expected one of: project, rar"]) {
            _ = try TrainConfig.load(file: nil, overrides: ["optim.decay_rule_plugin=adam"])
        }
        // SPEC section 9's name, optim.decay_rule, is the base group's rule and is recorded as decay_rule_base
        let spec = try TrainConfig.load(file: nil, overrides: ["optim.decay_rule=rar"])
        XCTAssertEqual(spec.decayRules, PerGroup(base: .rar, plugin: .project))
        XCTAssertNil(spec.optim.decayRule)
        XCTAssertFalse(spec.yamlString().contains("decay_rule:"), spec.yamlString())
        XCTAssertNoThrow(
            try TrainConfig.load(file: nil, overrides: ["optim.decay_rule=rar", "optim.decay_rule_base=rar"]))
        assertInputError(["optim.decay_rule (rar) and optim.decay_rule_base (project) disagree"]) {
            _ = try TrainConfig.load(file: nil, overrides: ["optim.decay_rule=rar", "optim.decay_rule_base=project"])
        }
        // a manifest's config from before the keys existed
        var old = try JSONSerialization.jsonObject(with: Data(loaded.jsonString().utf8)) as! [String: Any]
        var optim = old["optim"] as! [String: Any]
        XCTAssertEqual(optim["decay_rule_base"] as? String, "project")
        optim["decay_rule_base"] = nil
        optim["decay_rule_plugin"] = nil
        old["optim"] = optim
        let before = try JSONDecoder().decode(TrainConfig.self, from: try JSONSerialization.data(withJSONObject: old))
        XCTAssertEqual(before.decayRules, PerGroup(base: .project, plugin: .project))

        // resume: the same rules pass; another rule of a trained group is refused, naming the key
        let model = testModel()
        let manifest = CheckpointManifest(
            progress: TrainingProgress(step: 1, samplesSeen: 8, dataEpoch: 0, dataOffset: 8, seed: 0), worldSize: 1,
            model: model, config: before, table: ParameterTable(model), optimizer: nil)
        XCTAssertNoThrow(try loaded.checkResumable(manifest, path: "m.json"))
        assertInputError([
            "m.json", "optim.decay_rule_base is rar but the checkpoint was trained with project",
            "--set optim.decay_rule_base=project",
        ]) { try rar.checkResumable(manifest, path: "m.json") }
        var frozen = rar
        frozen.optim.lrBase = 0
        XCTAssertNoThrow(try frozen.checkResumable(manifest, path: "m.json"), "a frozen group's rule does not matter")
    }

    func testFrozenGroupFromZeroRate() throws {
        let c = try TrainConfig.resolve(yaml: "optim:\n  lr_base: 0\n", source: "x")
        XCTAssertEqual(c.trainableGroups, PerGroup(base: false, plugin: true))
        XCTAssertNil(try TrainConfig.resolve(yaml: "optim:\n  clip: 0\n", source: "x").clipNorm)
    }
}
