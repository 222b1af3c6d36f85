import Foundation
import XCTest
@testable import ARModel
import Platform

/// Bad weights and configs give an InputError naming the file and the problem (issue: core).
final class BadInputTests: XCTestCase {
    var dir: String!
    override func setUpWithError() throws {
        dir = NSTemporaryDirectory() + "tensorar-badinput-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    }
    override func tearDownWithError() throws { try? FileManager.default.removeItem(atPath: dir) }

    let config = ModelConfig(vocabSize: 16, numClasses: 3, gridSize: 2, dim: 8, nLayer: 1, nHead: 2, ffnHidden: 16)

    func expectError(_ path: String, containing words: [String], fallback: ModelConfig? = nil, file: StaticString = #filePath, line: UInt = #line) {
        do {
            _ = try Transformer.load(path, fallback: fallback)
            XCTFail("loading \(path) should fail", file: file, line: line)
        } catch let e as InputError {
            XCTAssertTrue(e.file.hasPrefix(path), "the error names the file: \(e.file)", file: file, line: line)
            for w in words { XCTAssertTrue(e.problem.contains(w), "'\(e.problem)' should mention '\(w)'", file: file, line: line) }
        } catch { XCTFail("unexpected error \(error)", file: file, line: line) }
    }

    func savedModel() throws -> String {
        let m = try Transformer(config: config)
        m.initialise(seed: 1)
        let path = dir + "/ok.safetensors"
        try m.save(path)
        return path
    }

    func testRoundTripKeepsEveryByteAndTheConfig() throws {
        let path = try savedModel()
        let a = try Transformer(config: config); a.initialise(seed: 1)
        let b = try Transformer.load(path)
        XCTAssertEqual(b.config, config)
        XCTAssertEqual(a.params.array, b.params.array)
    }

    func testTruncatedFile() throws {
        let path = try savedModel()
        let data = try Data(contentsOf: URL(fileURLWithPath: path))
        try data.prefix(data.count - 100).write(to: URL(fileURLWithPath: path))
        expectError(path, containing: ["truncated"])
        try data.prefix(5).write(to: URL(fileURLWithPath: path))
        expectError(path, containing: ["not a safetensors file"])
    }

    func testNotSafetensors() throws {
        let path = dir + "/model.pt"
        try Data("PK\u{3}\u{4} this is a zip, not safetensors, and it is long enough".utf8).write(to: URL(fileURLWithPath: path))
        expectError(path, containing: ["not a safetensors file"])
        expectError(dir + "/missing.safetensors", containing: ["does not exist"])
    }

    func testMissingTensorAndContradictingShape() throws {
        let path = try savedModel()
        var st = try Safetensors.read(path)
        st.tensors["layers.0.attention.wo.weight"] = nil
        try st.write(to: path)
        expectError(path, containing: ["missing tensor 'layers.0.attention.wo.weight'"])

        var st2 = try Safetensors.read(try savedModel())
        st2.tensors["tok_embeddings.weight"] = .init(floats: [Float](repeating: 0, count: 17 * 8), shape: [17, 8])
        try st2.write(to: path)
        expectError(path, containing: ["tok_embeddings.weight", "[17, 8]", "[16, 8]"])
    }

    func testConfigProblems() throws {
        var st = try Safetensors.read(try savedModel())
        let path = dir + "/bad.safetensors"
        func withConfig(_ json: String) throws { st.metadata["tensorar.config"] = json; try st.write(to: path) }
        try withConfig(#"{"vocab_size":16,"num_classes":3,"grid_size":2,"dim":8,"n_layer":1,"n_head":3,"ffn_hidden":16}"#)
        expectError(path, containing: ["dim 8 is not divisible by n_head 3"])
        try withConfig(#"{"vocab_size":16,"num_classes":3,"grid_size":2,"dim":12,"n_layer":1,"n_head":2,"ffn_hidden":16}"#)
        expectError(path, containing: ["head width", "6", "not divisible by 4"])
        try withConfig(#"{"vocab_size":16,"grid_size":2}"#)
        expectError(path, containing: ["tensorar.config"])
        // no metadata: the shape must come from a preset or flags
        st.metadata = [:]
        try st.write(to: path)
        expectError(path, containing: ["--preset"])
        // with a fallback config that contradicts the tensors
        var other = config; other.dim = 16; other.ffnHidden = 16
        expectError(path, containing: ["shape"], fallback: other)
        XCTAssertNoThrow(try Transformer.load(path, fallback: config))
    }

    func testWindowWithoutPluginAndOtherValidation() {
        var c = config; c.window = 2
        XCTAssertThrowsError(try c.validate()) { XCTAssertTrue("\($0)".contains("plug-in")) }
        var p = config; p.window = 20; p.pluginDepth = 1
        XCTAssertThrowsError(try p.validate()) { XCTAssertTrue("\($0)".contains("longer than the image")) }
        XCTAssertThrowsError(try ModelConfig.preset("huge")) { XCTAssertTrue("\($0)".contains("unknown preset")) }
    }
}
