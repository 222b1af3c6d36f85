import ARModel
import Foundation
import Platform
import XCTest

@testable import Training

/// `--init-from W`: the base's shape from W's tensorar.config unless the user gives one.
final class InitShapeTests: XCTestCase {
    /// A converted LlamaGen-like base: D 32, 2 layers, 4 heads (no preset has this shape).
    let recorded = ModelConfig(vocabSize: 32, numClasses: 5, gridSize: 4, dim: 32, nLayer: 2, nHead: 4, ffnHidden: 256)

    func file() throws -> String {
        let path = NSTemporaryDirectory() + "/init-shape-\(getpid()).safetensors"
        let m = try Transformer(config: recorded)
        m.initialise(seed: 1)
        try m.save(path)
        return path
    }

    func testRecordedShapeIsReadFromTheHeader() throws {
        let path = try file()
        XCTAssertEqual(try recordedModelConfig(path), recorded)
        XCTAssertThrowsError(try recordedModelConfig(path + ".missing")) {
            XCTAssertTrue("\($0)".contains("no such file"))
        }
    }

    func testGivenKeysComeFromTheUsersFileAndSetFlagsOnly() {
        let yaml = "model:\n  preset: B\n  window: 4\ntrain:\n  steps: 3\n"
        XCTAssertEqual(
            TrainConfig.givenShapeKeys(yaml: yaml, overrides: ["model.n_head=8", "model.window=2"]),
            ["preset": "the config file", "n_head": "--set model.n_head=8"])
        XCTAssertEqual(TrainConfig.givenShapeKeys(yaml: "", overrides: ["train.steps=2"]), [:])
    }

    func testNothingGivenTakesTheWeightsShape() throws {
        var section = TrainConfig().model  // preset small: D 128, 4 layers, 4 heads
        section.window = 3
        let adopted = try section.adoptingShape(of: recorded, path: "W", given: [:])
        let c = try adopted.resolve(vocabSize: 32, numClasses: 5, gridSize: 4)
        XCTAssertEqual([c.dim, c.nLayer, c.nHead, c.ffnHidden], [32, 2, 4, 256])
        XCTAssertEqual(c.window, 3, "the plug-in stays the config's")
        XCTAssertNil(adopted.preset)
    }

    func testAgreeingKeysPassContradictingOnesNameBothValues() throws {
        var section = TrainConfig().model
        section.nHead = 4
        let agreed = try section.adoptingShape(of: recorded, path: "W", given: ["n_head": "--set model.n_head=4"])
        XCTAssertEqual(try agreed.resolve(vocabSize: 32, numClasses: 5, gridSize: 4).nLayer, 2)
        section.nHead = 8
        let given = ["n_head": "--set model.n_head=8"]
        XCTAssertThrowsError(try section.adoptingShape(of: recorded, path: "W", given: given)) {
            XCTAssertEqual(
                "\($0)",
                "W: its recorded n_head 4 contradicts the config's n_head 8 "
                    + "(model.n_head in --set model.n_head=8); leave the shape out of the "
                    + "config to take the weights' own"
            )
        }
        let preset = TrainConfig().model  // preset small, given in the user's file
        XCTAssertThrowsError(try preset.adoptingShape(of: recorded, path: "W", given: ["preset": "the config file"])) {
            XCTAssertTrue(
                "\($0)".contains(
                    "its recorded dim 32 contradicts the config's dim 128 "
                        + "(model.preset small in the config file)"), "\($0)")
        }
    }
}
