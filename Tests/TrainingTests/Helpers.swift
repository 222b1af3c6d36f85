import ARModel
import Foundation
import Kernels
import Platform
import XCTest

/// A small model shape for tests: both groups present, matrices and vectors in each.
func testModel(
    window: Int = 2, depth: Int = 1, dim: Int = 16, ffn: Int = 32, layers: Int = 2, vocab: Int = 24
) -> ModelConfig {
    ModelConfig(
        vocabSize: vocab, numClasses: 3, gridSize: 4, dim: dim, nLayer: layers, nHead: 2, ffnHidden: ffn,
        window: window, pluginDepth: depth)
}

/// A buffer of N(0, scale) values from a fixed stream.
func randomBuffer(_ count: Int, seed: UInt64, scale: Float = 1) -> FlatBuffer {
    let b = FlatBuffer(count: count)
    var rng = CounterRNG(seed: seed)
    for i in 0..<count { b[i] = rng.normal() * scale }
    return b
}

/// A fresh temporary folder, removed when the test ends.
func temporaryFolder(_ test: XCTestCase) throws -> String {
    let p = (NSTemporaryDirectory() as NSString).appendingPathComponent("tensorar-test-\(UUID().uuidString)")
    try FileManager.default.createDirectory(atPath: p, withIntermediateDirectories: true)
    test.addTeardownBlock { try? FileManager.default.removeItem(atPath: p) }
    return p
}

/// Asserts |a - b| <= atol + rtol |b| everywhere, reporting the worst element.
func assertClose(
    _ a: [Float], _ b: [Double], rtol: Double, atol: Double, _ what: String, file: StaticString = #filePath,
    line: UInt = #line
) {
    XCTAssertEqual(a.count, b.count, what, file: file, line: line)
    var worst = -1
    var worstExcess = 0.0
    for i in 0..<min(a.count, b.count) {
        let excess = abs(Double(a[i]) - b[i]) - (atol + rtol * abs(b[i]))
        if excess > worstExcess {
            worst = i
            worstExcess = excess
        }
    }
    if worst >= 0 {
        XCTFail("\(what): worst element \(worst): got \(a[worst]), expected \(b[worst])", file: file, line: line)
    }
}

/// Fails unless `body` throws an InputError whose text contains every string of `expect`.
func assertInputError(_ expect: [String], file: StaticString = #filePath, line: UInt = #line, _ body: () throws -> Void)
{
    do {
        try body()
        XCTFail("expected an error mentioning \(expect)", file: file, line: line)
    } catch let e as InputError {
        for s in expect where !e.description.contains(s) {
            XCTFail("error \"\(e.description)\" does not mention \"\(s)\"", file: file, line: line)
        }
    } catch {
        XCTFail("expected an InputError, got \(error)", file: file, line: line)
    }
}

/// Flips `count` bytes in the middle of `file` (a damaged disk block: the file keeps its size).
func corruptMiddle(of file: String, count: Int = 16) throws {
    let size = try FileManager.default.attributesOfItem(atPath: file)[.size] as! Int
    let h = try FileHandle(forUpdating: URL(fileURLWithPath: file))
    defer { try? h.close() }
    try h.seek(toOffset: UInt64(size / 2))
    let bytes = try h.read(upToCount: count) ?? Data()
    try h.seek(toOffset: UInt64(size / 2))
    try h.write(contentsOf: Data(bytes.map { ~$0 }))
}

/// The package root (for Configs/).
let packageRoot: String = {
    var url = URL(fileURLWithPath: #filePath)
    for _ in 0..<3 { url.deleteLastPathComponent() }
    return url.path
}()
