import Foundation
import Platform
import XCTest

@testable import ARModel

/// Bad weights and configs give an InputError naming the file and the problem (issue: core).
final class BadInputTests: XCTestCase {
    var dir: String!
    override func setUpWithError() throws {
        dir = NSTemporaryDirectory() + "tensorar-badinput-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    }
    override func tearDownWithError() throws { try? FileManager.default.removeItem(atPath: dir) }

    let config = ModelConfig(vocabSize: 16, numClasses: 3, gridSize: 2, dim: 8, nLayer: 1, nHead: 2, ffnHidden: 16)

    func expectError(
        _ path: String, containing words: [String], fallback: ModelConfig? = nil, file: StaticString = #filePath,
        line: UInt = #line
    ) {
        do {
            _ = try Transformer.load(path, fallback: fallback)
            XCTFail("loading \(path) should fail", file: file, line: line)
        } catch let e as InputError {
            XCTAssertTrue(e.file.hasPrefix(path), "the error names the file: \(e.file)", file: file, line: line)
            for w in words {
                XCTAssertTrue(e.problem.contains(w), "'\(e.problem)' should mention '\(w)'", file: file, line: line)
            }
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
        let a = try Transformer(config: config)
        a.initialise(seed: 1)
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
        try Data("PK\u{3}\u{4} this is a zip, not safetensors, and it is long enough".utf8).write(
            to: URL(fileURLWithPath: path))
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
        func withConfig(_ json: String) throws {
            st.metadata["tensorar.config"] = json
            try st.write(to: path)
        }
        try withConfig(
            #"{"vocab_size":16,"num_classes":3,"grid_size":2,"dim":8,"n_layer":1,"n_head":3,"ffn_hidden":16}"#)
        expectError(path, containing: ["dim 8 is not divisible by n_head 3"])
        try withConfig(
            #"{"vocab_size":16,"num_classes":3,"grid_size":2,"dim":12,"n_layer":1,"n_head":2,"ffn_hidden":16}"#)
        expectError(path, containing: ["head width", "6", "not divisible by 4"])
        let shape = #""vocab_size":16,"num_classes":3,"grid_size":2,"#
        try withConfig("{" + shape + #""dim":8,"n_layer":1,"n_head":2,"ffn_hidden":16,"norm_eps":11.5}"#)
        expectError(path, containing: ["norm_eps must be in (0, 1], got 11.5"])
        try withConfig("{" + shape + #""dim":65536,"n_layer":1024,"n_head":64,"ffn_hidden":16}"#)
        expectError(path, containing: ["asks for", "parameters but the file holds only"])
        try withConfig(#"{"vocab_size":16,"grid_size":2}"#)
        expectError(path, containing: ["tensorar.config"])
        // no metadata: the shape must come from a preset or flags
        st.metadata = [:]
        try st.write(to: path)
        expectError(path, containing: ["--preset"])
        // with a fallback config that contradicts the tensors
        var other = config
        other.dim = 16
        other.ffnHidden = 16
        expectError(path, containing: ["shape"], fallback: other)
        XCTAssertNoThrow(try Transformer.load(path, fallback: config))
    }

    func testWindowWithoutPluginAndOtherValidation() {
        var c = config
        c.window = 2
        XCTAssertThrowsError(try c.validate()) { XCTAssertTrue("\($0)".contains("plug-in")) }
        var p = config
        p.window = 20
        p.pluginDepth = 1
        XCTAssertThrowsError(try p.validate()) { XCTAssertTrue("\($0)".contains("longer than the image")) }
        XCTAssertThrowsError(try ModelConfig.preset("huge")) { XCTAssertTrue("\($0)".contains("unknown preset")) }
    }
}

/// Issue 17: hostile safetensors headers, non-finite weights, folders where files belong.
final class HostileSafetensorsTests: XCTestCase {
    var dir: String!
    override func setUpWithError() throws {
        dir = NSTemporaryDirectory() + "tensorar-hostile-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    }
    override func tearDownWithError() throws { try? FileManager.default.removeItem(atPath: dir) }

    /// A file with `header` (JSON) and `body` bytes of data.
    func file(_ header: String, body: Int = 16) throws -> String {
        var json = Data(header.utf8)
        while json.count % 8 != 0 { json.append(0x20) }
        var n = UInt64(json.count).littleEndian
        var data = Data(bytes: &n, count: 8)
        data.append(json)
        data.append(Data(repeating: 0, count: body))
        let path = dir + "/t-\(UUID().uuidString.prefix(6)).safetensors"
        try data.write(to: URL(fileURLWithPath: path))
        return path
    }

    func expectRejected(_ header: String, _ words: [String], body: Int = 16, line: UInt = #line) throws {
        let path = try file(header, body: body)
        XCTAssertThrowsError(try Safetensors.read(path), line: line) { e in
            let text = "\(e)"
            XCTAssertTrue(e is InputError && text.hasPrefix(path + ": "), text, line: line)
            for w in words { XCTAssertTrue(text.contains(w), "'\(text)' should mention '\(w)'", line: line) }
        }
    }

    func testNegativeShapesReversedAndOverlappingOffsetsAreErrorsNotTraps() throws {
        try expectRejected(#"{"a":{"dtype":"F32","shape":[-1,-4],"data_offsets":[0,16]}}"#, ["'a'", "negative"])
        try expectRejected(#"{"a":{"dtype":"F32","shape":[-4],"data_offsets":[16,0]}}"#, ["'a'", "negative"])
        let empty = #"{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,8]}}"#
        try expectRejected(empty, ["'a'", "hold 8 bytes", "needs 0"], body: 8)
        try expectRejected(#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[16,0]}}"#, ["'a'", "not an in-order"])
        try expectRejected(#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[-16,0]}}"#, ["'a'", "not an in-order"])
        let a = #""a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}"#
        let b = #""b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}"#
        try expectRejected("{" + a + "," + b + "}", ["overlap", "'a'", "'b'"])
        let huge = #"{"a":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,16]}}"#
        try expectRejected(huge, ["'a'", "larger than"])
        try expectRejected(#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0]}}"#, ["'a'", "malformed"])
        try expectRejected(#"{"__metadata__":[1,2]}"#, ["__metadata__"])
        try expectRejected(#"[1,2,3]"#, ["not a JSON object"])
        // The same layout without the fault reads.
        let ok = try file(
            #"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"#
                + #""b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#)
        XCTAssertEqual(try Safetensors.read(ok).floats("b"), [0, 0])
    }

    func testNonFiniteWeightsAreRejectedWithTheTensorName() throws {
        let config = ModelConfig(vocabSize: 16, numClasses: 3, gridSize: 2, dim: 8, nLayer: 1, nHead: 2, ffnHidden: 16)
        let m = try Transformer(config: config)
        m.initialise(seed: 1)
        for bad in [Float.nan, .infinity] {
            let path = dir + "/bad.safetensors"
            try m.save(path)
            var st = try Safetensors.read(path)
            var v = try st.floats("norm.weight")
            v[3] = bad
            st.tensors["norm.weight"] = .init(floats: v, shape: st.tensors["norm.weight"]!.shape)
            try st.write(to: path)
            XCTAssertThrowsError(try Transformer.load(path)) { e in
                XCTAssertTrue("\(e)".hasPrefix(path + ": tensor 'norm.weight' holds a non-finite value"), "\(e)")
                XCTAssertTrue("\(e)".contains("element 3"), "\(e)")
            }
        }
    }

    func testFoldersWhereFilesBelongAreNamedAndNeverRemoved() throws {
        let folder = dir + "/weights.safetensors"
        try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
        try Data("keep".utf8).write(to: URL(fileURLWithPath: folder + "/keep"))
        XCTAssertThrowsError(try Safetensors.read(folder)) {
            XCTAssertTrue("\($0)".hasPrefix(folder + ": is a folder"), "\($0)")
        }
        let shape = ModelConfig(vocabSize: 16, numClasses: 3, gridSize: 2, dim: 8, nLayer: 1, nHead: 2, ffnHidden: 16)
        let m = try Transformer(config: shape)
        XCTAssertThrowsError(try m.save(folder)) { XCTAssertTrue("\($0)".hasPrefix(folder + ": is a folder"), "\($0)") }
        let kept = try Data(contentsOf: URL(fileURLWithPath: folder + "/keep"))
        XCTAssertEqual(kept, Data("keep".utf8), "the folder survives")
        let missing = dir + "/no/such/folder/w.safetensors"
        XCTAssertThrowsError(try m.save(missing)) {
            XCTAssertTrue("\($0)".contains("the folder \(dir!)/no/such/folder does not exist"), "\($0)")
        }
    }
}
