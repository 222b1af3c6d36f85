import Foundation
import Platform
import XCTest

@testable import TokenData

/// A fresh empty folder under the system temp dir, removed when the test ends.
func temporaryFolder(_ test: XCTestCase) -> String {
    let dir = (NSTemporaryDirectory() as NSString).appendingPathComponent("tensorar-data-\(UUID().uuidString)")
    try! FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    test.addTeardownBlock { try? FileManager.default.removeItem(atPath: dir) }
    return dir
}

/// Synthetic codes: a fixed function of (sample, augmentation, position), so any read can be checked.
func syntheticCode(_ i: Int, _ a: Int, _ t: Int, vocab: Int) -> Int32 {
    Int32((i * 7919 + a * 104_729 + t * 31) % vocab)
}
func syntheticLabel(_ i: Int, classes: Int) -> Int32 { Int32((i * 3) % classes) }

/// Writes a cache of `n` synthetic samples in shards of `shardSize` through `append` calls of
/// uneven sizes; returns its folder.
@discardableResult
func makeCache(
    _ dir: String, n: Int, vocab: Int = 16, grid: Int = 2, classes: Int = 5, augmentations: Int = 3,
    shardSize: Int = 7
) throws -> String {
    let t = grid * grid
    let w = try CacheWriter(
        directory: dir, vocabSize: vocab, gridH: grid, gridW: grid, numClasses: classes,
        augmentations: augmentations, shardSize: shardSize)
    var i = 0
    var piece = 1
    while i < n {
        let m = min(piece, n - i)
        var codes: [Int32] = []
        var labels: [Int32] = []
        for s in i..<(i + m) {
            for a in 0..<augmentations { for p in 0..<t { codes.append(syntheticCode(s, a, p, vocab: vocab)) } }
            labels.append(syntheticLabel(s, classes: classes))
        }
        try w.append(codes: codes, labels: labels)
        i += m
        piece += 2
    }
    try w.finish()
    return dir
}

/// Asserts `body` throws an InputError whose file ends with `file` and whose text has every piece.
func assertInputError(
    _ body: () throws -> Void, file: String, contains pieces: [String],
    sourceFile: StaticString = #filePath, line: UInt = #line
) {
    do {
        try body()
        XCTFail("expected an error about \(file)", file: sourceFile, line: line)
    } catch let e as InputError {
        XCTAssertTrue(
            e.file.hasSuffix(file), "error names \(e.file), expected …\(file): \(e)", file: sourceFile, line: line)
        for p in pieces {
            XCTAssertTrue(e.problem.contains(p), "'\(e.problem)' does not mention '\(p)'", file: sourceFile, line: line)
        }
    } catch {
        XCTFail("expected an InputError, got \(error)", file: sourceFile, line: line)
    }
}

func path(_ dir: String, _ name: String) -> String { (dir as NSString).appendingPathComponent(name) }
