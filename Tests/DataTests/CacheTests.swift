import Foundation
import Platform
import XCTest

@testable import TokenData

/// The token cache (SPEC 7): round trips, and every kind of bad input giving an error that names
/// the file and the problem.
final class CacheTests: XCTestCase {
    /// Reads every (sample, augmentation) back through both read paths and compares.
    private func checkRoundTrip(vocab: Int, expectKind: HDF5Kind) throws {
        let dir = try makeCache(
            temporaryFolder(self), n: 30, vocab: vocab, grid: 3, classes: 7, augmentations: 2, shardSize: 7)
        let cache = try TokenCache(directory: dir)
        XCTAssertEqual(cache.info.shards.map(\.numSamples), [7, 7, 7, 7, 2])
        XCTAssertEqual(cache.info.codesKind, expectKind)
        XCTAssertEqual(
            try HDF5File.open(path(dir, "shard-00000.h5")).storedType(of: "codes"), HDF5StoredType(expectKind))
        // Random order, repeats, mixed augmentations, across shards.
        let indices = [29, 0, 13, 13, 6, 7, 21, 28, 1]
        let augs = indices.map { $0 % 2 }
        let (codes, labels) = try cache.read(indices: indices, augmentations: augs)
        for (k, i) in indices.enumerated() {
            XCTAssertEqual(labels[k], syntheticLabel(i, classes: 7))
            XCTAssertEqual(
                Array(codes[(k * 9)..<((k + 1) * 9)]), (0..<9).map { syntheticCode(i, augs[k], $0, vocab: vocab) },
                "sample \(i)")
        }
        // Whole-shard reads, all augmentations.
        let (rows, rowLabels) = try cache.readShardRows(shard: 3, start: 1, count: 5)
        for r in 0..<5 {
            let i = 22 + r
            XCTAssertEqual(rowLabels[r], syntheticLabel(i, classes: 7))
            XCTAssertEqual(
                Array(rows[(r * 18)..<((r + 1) * 18)]),
                (0..<2).flatMap { a in (0..<9).map { syntheticCode(i, a, $0, vocab: vocab) } })
        }
        _ = try verifyCache(directory: dir)
    }

    func testRoundTripUInt16() throws { try checkRoundTrip(vocab: 1000, expectKind: .uint16) }
    func testRoundTripInt32AboveUInt16() throws { try checkRoundTrip(vocab: 70_000, expectKind: .int32) }

    func testUInt16Boundary() throws {
        XCTAssertEqual(CacheInfo.codesKind(vocabSize: 65535), .uint16)
        XCTAssertEqual(CacheInfo.codesKind(vocabSize: 65536), .int32)
    }

    func testDatasetJSONAndShardAttributes() throws {
        let dir = try makeCache(temporaryFolder(self), n: 10, shardSize: 4)
        let json =
            try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: path(dir, "dataset.json"))))
            as! [String: Any]
        XCTAssertEqual(
            Set(json.keys),
            [
                "format_version", "vocab_size", "grid_h", "grid_w", "num_classes", "augmentations", "num_samples",
                "shards",
            ])
        let shards = json["shards"] as! [[String: Any]]
        XCTAssertEqual(shards.map { $0["file"] as! String }, ["shard-00000.h5", "shard-00001.h5", "shard-00002.h5"])
        XCTAssertEqual(shards[2]["num_samples"] as! Int, 2)
        XCTAssertEqual(shards[0]["sha256"] as! String, try SHA256.hash(file: path(dir, "shard-00000.h5")))
        let f = try HDF5File.open(path(dir, "shard-00002.h5"))
        XCTAssertEqual(try f.intAttribute("num_samples"), 2)
        XCTAssertEqual(try f.intAttribute("vocab_size"), 16)
        XCTAssertEqual(try f.intAttribute("augmentations"), 3)
        XCTAssertFalse(FileManager.default.fileExists(atPath: path(dir, "dataset.json.tmp")))
    }

    func testRewriteRemovesOldShards() throws {
        let dir = try makeCache(temporaryFolder(self), n: 20, shardSize: 4)
        try makeCache(dir, n: 6, shardSize: 4)
        let names = try FileManager.default.contentsOfDirectory(atPath: dir).filter { $0.hasPrefix("shard-") }.sorted()
        XCTAssertEqual(names, ["shard-00000.h5", "shard-00001.h5"])
        XCTAssertEqual(try TokenCache(directory: dir).count, 6)
    }

    func testWriterRefusesBadValues() throws {
        let dir = temporaryFolder(self)
        let w = try CacheWriter(
            directory: dir, vocabSize: 4, gridH: 1, gridW: 2, numClasses: 3, augmentations: 1, shardSize: 10)
        assertInputError(
            {
                try w.append(codes: [0, 4], labels: [0])
                try w.finish()
            }, file: "shard-00000.h5", contains: ["token 4", "[0, 4)"])
        let w2 = try CacheWriter(
            directory: dir, vocabSize: 4, gridH: 1, gridW: 2, numClasses: 3, augmentations: 1, shardSize: 10)
        assertInputError(
            {
                try w2.append(codes: [0, 1], labels: [3])
                try w2.finish()
            }, file: "shard-00000.h5", contains: ["label 3"])
        assertInputError(
            { try w2.append(codes: [0, 1, 2], labels: [1]) }, file: dir, contains: ["3 codes for 1 samples"])
        let w3 = try CacheWriter(directory: dir, vocabSize: 4, gridH: 1, gridW: 2, numClasses: 3, augmentations: 1)
        assertInputError({ try w3.finish() }, file: dir, contains: ["no samples"])
    }

    // MARK: bad input

    func testMissingDatasetJSON() throws {
        let dir = try makeCache(temporaryFolder(self), n: 10)
        try FileManager.default.removeItem(atPath: path(dir, "dataset.json"))
        assertInputError({ _ = try TokenCache(directory: dir) }, file: "dataset.json", contains: ["missing"])
        assertInputError(
            { _ = try TokenCache(directory: path(dir, "nope")) }, file: "nope", contains: ["does not exist"])
    }

    func testMalformedDatasetJSON() throws {
        let dir = try makeCache(temporaryFolder(self), n: 10)
        let jp = path(dir, "dataset.json")
        let good = try String(contentsOfFile: jp, encoding: .utf8)
        func withJSON(_ text: String, _ pieces: [String]) throws {
            try text.write(toFile: jp, atomically: true, encoding: .utf8)
            assertInputError({ _ = try TokenCache(directory: dir) }, file: "dataset.json", contains: pieces)
        }
        try withJSON("{ not json", ["not valid JSON"])
        try withJSON(good.replacingOccurrences(of: "\"vocab_size\"", with: "\"vocab\""), ["missing field 'vocab_size'"])
        try withJSON(
            good.replacingOccurrences(of: "\"format_version\" : 1", with: "\"format_version\" : 2"),
            ["format_version is 2"])
        try withJSON(
            good.replacingOccurrences(
                of: "\"num_samples\" : 10,\n  \"shards\"", with: "\"num_samples\" : 11,\n  \"shards\""),
            ["num_samples is 11 but the shards hold 10"])
        try withJSON(good.replacingOccurrences(of: "shard-00000.h5", with: "../shard-00000.h5"), ["plain file name"])
    }

    func testMissingShard() throws {
        let dir = try makeCache(temporaryFolder(self), n: 10, shardSize: 4)
        try FileManager.default.removeItem(atPath: path(dir, "shard-00001.h5"))
        assertInputError({ _ = try TokenCache(directory: dir) }, file: "shard-00001.h5", contains: ["missing"])
    }

    func testTruncatedShard() throws {
        let dir = try makeCache(temporaryFolder(self), n: 40, shardSize: 20)
        let sp = path(dir, "shard-00001.h5")
        let size = try FileManager.default.attributesOfItem(atPath: sp)[.size] as! Int
        let fh = FileHandle(forWritingAtPath: sp)!
        try fh.truncate(atOffset: UInt64(size / 2))
        try fh.close()
        assertInputError({ _ = try verifyCache(directory: dir) }, file: "shard-00001.h5", contains: ["truncated"])
    }

    func testNotHDF5() throws {
        let dir = try makeCache(temporaryFolder(self), n: 10, shardSize: 4)
        try "these are not the tokens you are looking for".write(
            toFile: path(dir, "shard-00002.h5"), atomically: true, encoding: .utf8)
        assertInputError({ _ = try TokenCache(directory: dir) }, file: "shard-00002.h5", contains: ["not an HDF5 file"])
    }

    /// A shard written by hand with float codes (everything else right).
    func testWrongDtype() throws {
        let dir = try makeCache(
            temporaryFolder(self), n: 4, vocab: 16, grid: 2, classes: 5, augmentations: 1, shardSize: 4)
        let sp = path(dir, "shard-00000.h5")
        do {
            let f = try HDF5File.create(sp)
            try f.write("codes", [Float](repeating: 1, count: 4 * 1 * 4), shape: [4, 1, 4])
            try f.write("labels", [Int32](repeating: 0, count: 4), shape: [4])
            for (k, v) in [
                ("format_version", 1), ("vocab_size", 16), ("grid_h", 2), ("grid_w", 2), ("num_classes", 5),
                ("augmentations", 1), ("num_samples", 4),
            ] { try f.setAttribute(k, int: v) }
        }
        assertInputError(
            { _ = try TokenCache(directory: dir) }, file: "shard-00000.h5",
            contains: ["codes are stored as float32", "uint16"])
    }

    func testWrongShape() throws {
        let dir = try makeCache(temporaryFolder(self), n: 4, augmentations: 2, shardSize: 4)
        let sp = path(dir, "shard-00000.h5")
        do {
            let f = try HDF5File.create(sp)
            try f.write("codes", [UInt16](repeating: 1, count: 4 * 3 * 4), shape: [4, 3, 4])
            try f.write("labels", [Int32](repeating: 0, count: 4), shape: [4])
            for (k, v) in [
                ("format_version", 1), ("vocab_size", 16), ("grid_h", 2), ("grid_w", 2), ("num_classes", 5),
                ("augmentations", 2), ("num_samples", 4),
            ] { try f.setAttribute(k, int: v) }
        }
        assertInputError(
            { _ = try TokenCache(directory: dir) }, file: "shard-00000.h5",
            contains: ["codes has shape [4, 3, 4]", "[4, 2, 4]"])
    }

    func testWrongAttribute() throws {
        let dir = try makeCache(temporaryFolder(self), n: 10, shardSize: 4)
        try HDF5File.open(path(dir, "shard-00001.h5"), writable: true).setAttribute("vocab_size", int: 999)
        assertInputError(
            { _ = try TokenCache(directory: dir) }, file: "shard-00001.h5",
            contains: ["vocab_size = 999", "dataset.json says 16"])
    }

    /// Overwrites one row of codes (augmentation 0) in place, bypassing the writer's checks.
    private func poke(_ shard: String, row: Int, value: UInt16) throws {
        let f = try HDF5File.open(shard, writable: true)
        var rowValues = [UInt16](repeating: 0, count: 3 * 4)
        try rowValues.withUnsafeMutableBytes {
            try f.readRows("codes", kind: .uint16, start: row, rows: 1, into: $0.baseAddress!)
        }
        rowValues[2] = value
        try rowValues.withUnsafeBytes {
            try f.writeRows("codes", kind: .uint16, start: row, rows: 1, from: $0.baseAddress!)
        }
    }

    func testTokenOutOfRange() throws {
        let dir = try makeCache(temporaryFolder(self), n: 10, shardSize: 4)
        try poke(path(dir, "shard-00001.h5"), row: 2, value: 16)
        let cache = try TokenCache(directory: dir)  // opening does not read codes
        XCTAssertNoThrow(try cache.read(indices: [5, 7], augmentations: [0, 1]))
        assertInputError(
            { _ = try cache.read(indices: [0, 6], augmentations: [1, 0]) }, file: "shard-00001.h5",
            contains: ["sample 2 (global 6)", "position 2", "token 16", "vocab_size 16"])
    }

    func testLabelOutOfRange() throws {
        let dir = try makeCache(temporaryFolder(self), n: 10, shardSize: 4)
        var bad: [Int32] = [0, 1, 5, 2]
        try bad.withUnsafeMutableBytes {
            try HDF5File.open(path(dir, "shard-00001.h5"), writable: true).writeRows(
                "labels", kind: .int32, start: 0, rows: 4, from: $0.baseAddress!)
        }
        let cache = try TokenCache(directory: dir)
        assertInputError(
            { _ = try cache.read(indices: [6], augmentations: [0]) }, file: "shard-00001.h5",
            contains: ["sample 2 (global 6)", "label 5", "num_classes 5"])
    }

    func testChecksumMismatch() throws {
        let dir = try makeCache(temporaryFolder(self), n: 10, shardSize: 4)
        _ = try verifyCache(directory: dir)
        try poke(path(dir, "shard-00002.h5"), row: 0, value: 3)  // still a valid token
        XCTAssertNoThrow(
            try TokenCache(directory: dir).read(indices: Array(0..<10), augmentations: [Int](repeating: 0, count: 10)))
        assertInputError({ _ = try verifyCache(directory: dir) }, file: "shard-00002.h5", contains: ["sha256 mismatch"])
    }

    func testVerifyFindsBadTokenEvenWithMatchingChecksum() throws {
        let dir = try makeCache(temporaryFolder(self), n: 10, shardSize: 4)
        try poke(path(dir, "shard-00000.h5"), row: 3, value: 40)
        // Refresh the checksum, as a careless tool might: only the value scan can catch it now.
        var info = try CacheInfo.load(directory: dir)
        info.shards[0].sha256 = try SHA256.hash(file: path(dir, "shard-00000.h5"))
        try info.save(directory: dir)
        assertInputError(
            { _ = try verifyCache(directory: dir) }, file: "shard-00000.h5", contains: ["sample 3", "token 40"])
    }

    func testReadArgumentErrors() throws {
        let dir = try makeCache(temporaryFolder(self), n: 10)
        let cache = try TokenCache(directory: dir)
        assertInputError(
            { _ = try cache.read(indices: [10], augmentations: [0]) }, file: dir,
            contains: ["sample index 10 outside 0..<10"])
        assertInputError(
            { _ = try cache.read(indices: [1], augmentations: [3]) }, file: dir,
            contains: ["augmentation 3 outside 0..<3"])
    }

    func testInspectAndUnigramEntropy() throws {
        // Tokens 0..3 used equally (entropy ln 4); classes known.
        let dir = temporaryFolder(self)
        let w = try CacheWriter(
            directory: dir, vocabSize: 6, gridH: 2, gridW: 2, numClasses: 3, augmentations: 2, shardSize: 3)
        try w.append(codes: (0..<(8 * 2 * 4)).map { Int32($0 % 4) }, labels: [0, 0, 1, 2, 2, 2, 1, 0])
        try w.finish()
        let r = try inspectCache(directory: dir)
        XCTAssertEqual(r.classCounts, [3, 2, 3])
        XCTAssertEqual(r.tokenCounts, [16, 16, 16, 16, 0, 0])
        XCTAssertEqual(r.unusedCodes, [4, 5])
        XCTAssertEqual(r.entropyNats, log(4.0), accuracy: 1e-12)
        XCTAssertEqual(r.entropyBits, 2.0, accuracy: 1e-12)
        XCTAssertEqual(try unigramEntropy(directory: dir), log(4.0), accuracy: 1e-12)
        XCTAssertEqual(r.mostUsed(2).map(\.code), [0, 1])
        XCTAssertTrue(r.summary().contains("unused codes: 2 of 6"))
    }
}

/// Issue 17: a shard truncated while a run reads it (HDF5 would return zeros past the end), or
/// before it is opened, or a folder where a shard belongs.
final class TruncatedShardTests: XCTestCase {
    func testAShardTruncatedWhileOpenFailsTheNextReadNamingIt() throws {
        let dir = try makeCache(temporaryFolder(self), n: 40, vocab: 300, grid: 4, augmentations: 2, shardSize: 20)
        let cache = try TokenCache(directory: dir)
        let shard = cache.shardPath(1)
        XCTAssertNoThrow(try cache.read(indices: [25, 39], augmentations: [0, 1]))
        let size = try FileManager.default.attributesOfItem(atPath: shard)[.size] as! Int
        let h = try FileHandle(forUpdating: URL(fileURLWithPath: shard))
        try h.truncate(atOffset: UInt64(size / 2))
        try h.close()
        assertInputError(
            { _ = try cache.read(indices: [39], augmentations: [1]) }, file: shard,
            contains: ["truncated while in use", "\(size / 2) bytes now", "\(size) when opened"])
        assertInputError(
            { _ = try cache.readShardRows(shard: 1, start: 0, count: 2) }, file: shard,
            contains: ["truncated while in use"])
        // The other shard still reads.
        XCTAssertEqual(try cache.read(indices: [3], augmentations: [0]).codes.count, 16)
        // Opening it now is an error too.
        assertInputError({ _ = try TokenCache(directory: dir) }, file: shard, contains: ["truncated"])
    }

    func testAFolderWhereAShardBelongsIsNamed() throws {
        let dir = try makeCache(temporaryFolder(self), n: 10, shardSize: 5)
        let shard = path(dir, "shard-00001.h5")
        try FileManager.default.removeItem(atPath: shard)
        try FileManager.default.createDirectory(atPath: shard, withIntermediateDirectories: false)
        assertInputError({ _ = try TokenCache(directory: dir) }, file: shard, contains: ["is a folder"])
    }
}
