import Foundation
import Platform
import XCTest

@testable import TokenData

/// The small file formats: SHA-256, PNG (CRC-32, Adler-32), IDX, .npy, and LlamaGen import.
final class FormatTests: XCTestCase {
    // FIPS 180-2 examples and the usual extras.
    func testSHA256KnownVectors() throws {
        XCTAssertEqual(SHA256.hash(Array("".utf8)), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        XCTAssertEqual(
            SHA256.hash(Array("abc".utf8)), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        XCTAssertEqual(
            SHA256.hash(Array("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq".utf8)),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1")
        XCTAssertEqual(
            SHA256.hash([UInt8](repeating: 0x61, count: 1_000_000)),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0")
        // 55, 56 and 64 bytes: the padding edge cases.
        XCTAssertEqual(
            SHA256.hash([UInt8](repeating: 0x61, count: 55)),
            "9f4390f8d30c2dd92ec9f095b65e2b9ae9b0a925a5258e241c9f1e910f734318")
        XCTAssertEqual(
            SHA256.hash([UInt8](repeating: 0x61, count: 56)),
            "b35439a4ac6f0948b6d6f9e3c6af0f5f590ce20f1bde7090ef7970686ec6738a")
        XCTAssertEqual(
            SHA256.hash([UInt8](repeating: 0x61, count: 64)),
            "ffe054fe7ae0cb6dc65c3af9b61d5209f439851db43d0ba5997337df154668eb")
    }

    func testSHA256StreamingAndFile() throws {
        let data = (0..<10_000).map { UInt8(truncatingIfNeeded: $0 &* 2_654_435_761 >> 7) }
        var s = SHA256()
        var o = 0
        for piece in [0, 1, 63, 64, 65, 127, 1000, 3] + [Int](repeating: 500, count: 20) where o < data.count {
            let e = min(data.count, o + piece)
            s.update(data[o..<e])
            o = e
        }
        s.update(data[o...])
        let streamed = SHA256.hex(s.finalize())
        XCTAssertEqual(streamed, SHA256.hash(data))
        let file = path(temporaryFolder(self), "blob")
        try Data(data).write(to: URL(fileURLWithPath: file))
        XCTAssertEqual(try SHA256.hash(file: file), streamed)
    }

    func testCRC32AndAdler32() {
        XCTAssertEqual(crc32(Array("123456789".utf8)), 0xCBF4_3926)
        XCTAssertEqual(adler32(Array("Wikipedia".utf8)), 0x11E6_0398)
        XCTAssertEqual(adler32([UInt8]()), 1)
    }

    /// Parses the PNG back: signature, chunk CRCs, IHDR, and the stored deflate blocks.
    func testPNGParsesBack() throws {
        for (w, h, c) in [(3, 2, 3), (300, 300, 1), (5, 4, 4)] {  // 300x300: more than one 64 KiB block
            let pixels = (0..<(w * h * c)).map { UInt8(truncatingIfNeeded: $0 * 37) }
            let png = [UInt8](try pngData(pixels: pixels, width: w, height: h, channels: c))
            XCTAssertEqual(Array(png[0..<8]), [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A])
            var o = 8
            var chunks: [(String, [UInt8])] = []
            func be32(_ i: Int) -> Int {
                Int(png[i]) << 24 | Int(png[i + 1]) << 16 | Int(png[i + 2]) << 8 | Int(png[i + 3])
            }
            while o < png.count {
                let n = be32(o)
                let type = String(decoding: png[(o + 4)..<(o + 8)], as: UTF8.self)
                let body = Array(png[(o + 8)..<(o + 8 + n)])
                XCTAssertEqual(UInt32(be32(o + 8 + n)), crc32(Array(png[(o + 4)..<(o + 8 + n)])), "CRC of \(type)")
                chunks.append((type, body))
                o += 12 + n
            }
            XCTAssertEqual(chunks.map(\.0), ["IHDR", "IDAT", "IEND"])
            let ihdr = chunks[0].1
            XCTAssertEqual(
                [
                    Int(ihdr[0]) << 24 | Int(ihdr[1]) << 16 | Int(ihdr[2]) << 8 | Int(ihdr[3]),
                    Int(ihdr[4]) << 24 | Int(ihdr[5]) << 16 | Int(ihdr[6]) << 8 | Int(ihdr[7]),
                ], [w, h])
            XCTAssertEqual(Array(ihdr[8...]), [8, [1: 0, 2: 4, 3: 2, 4: 6][c]!, 0, 0, 0])  // depth, colour type, ...
            // zlib: 78 01, stored blocks, Adler-32.
            let z = chunks[1].1
            XCTAssertEqual(Array(z[0..<2]), [0x78, 0x01])
            var raw: [UInt8] = []
            var p = 2
            while true {
                let final = z[p] & 1
                let len = Int(z[p + 1]) | Int(z[p + 2]) << 8
                XCTAssertEqual(len ^ 0xFFFF, Int(z[p + 3]) | Int(z[p + 4]) << 8)
                raw += z[(p + 5)..<(p + 5 + len)]
                p += 5 + len
                if final == 1 { break }
            }
            XCTAssertEqual(
                UInt32(z[p]) << 24 | UInt32(z[p + 1]) << 16 | UInt32(z[p + 2]) << 8 | UInt32(z[p + 3]), adler32(raw))
            var back: [UInt8] = []
            let line = w * c + 1  // filter byte + one row
            for y in 0..<h {
                XCTAssertEqual(raw[y * line], 0)
                back += raw[(y * line + 1)..<(y * line + line)]
            }
            XCTAssertEqual(back, pixels)
        }
        assertInputError(
            { _ = try pngData(pixels: [1, 2], width: 3, height: 1, channels: 1, path: "x.png") }, file: "x.png",
            contains: ["needs 3 bytes"])
    }

    func testImageGrid() {
        let a: [Float] = [0, 1, 1, 0]
        let b: [Float] = [1, 1, 1, 1]
        let g = imageGrid([a, b], height: 2, width: 2, channels: 1, columns: 2, pad: 1, scale: 1, background: 0.5)
        XCTAssertEqual(g.width, 7)
        XCTAssertEqual(g.height, 4)
        XCTAssertEqual(Array(g.pixels[7..<14]), [128, 0, 255, 128, 255, 255, 128])
    }

    // MARK: IDX

    private func idx(_ shape: [Int], _ values: [UInt8]) -> Data {
        var d = Data([0, 0, 0x08, UInt8(shape.count)])
        for s in shape {
            d += Data([UInt8(s >> 24), UInt8((s >> 16) & 0xFF), UInt8((s >> 8) & 0xFF), UInt8(s & 0xFF)])
        }
        return d + Data(values)
    }

    func testIDXPlainAndGzip() throws {
        let dir = temporaryFolder(self)
        let values = (0..<(3 * 2 * 5)).map { UInt8($0 * 8) }
        let plain = path(dir, "images-idx3-ubyte")
        try idx([3, 2, 5], values).write(to: URL(fileURLWithPath: plain))
        let a = try readIDX(path: plain)
        XCTAssertEqual(a.shape, [3, 2, 5])
        XCTAssertEqual(a.values, values)
        let gz = Process()
        gz.executableURL = URL(fileURLWithPath: "/bin/sh")
        gz.arguments = ["-c", "gzip -k '\(plain)'"]
        try gz.run()
        gz.waitUntilExit()
        XCTAssertEqual(try readIDX(path: plain + ".gz").values, values)
        XCTAssertEqual(try findMaybeGzip(folder: dir, names: ["nothing", "images-idx3-ubyte"]), plain)
    }

    func testIDXErrors() throws {
        let dir = temporaryFolder(self)
        assertInputError({ _ = try parseIDX(Data([1, 2, 3, 4]), path: "a") }, file: "a", contains: ["bad magic"])
        assertInputError(
            { _ = try parseIDX(Data([0, 0, 0x0D, 1, 0, 0, 0, 1, 0, 0, 0, 0]), path: "b") }, file: "b",
            contains: ["0x0D"])
        assertInputError(
            { _ = try parseIDX(self.idx([4, 4], [1, 2, 3]), path: "c") }, file: "c", contains: ["16 values", "holds 3"])
        let broken = path(dir, "x.gz")
        try Data("not gzip".utf8).write(to: URL(fileURLWithPath: broken))
        assertInputError({ _ = try readIDX(path: broken) }, file: "x.gz", contains: ["gzip -dc failed"])
        assertInputError(
            { _ = try findMaybeGzip(folder: dir, names: ["train-images-idx3-ubyte"]) }, file: "train-images-idx3-ubyte",
            contains: ["not found"])
    }

    // MARK: npy

    func testNPYRoundTripAndDtypes() throws {
        let v: [Int64] = [0, 1, -2, 16383, Int64.max, Int64.min]
        let a = try parseNPY(npyData(int64: v, shape: [1, 2, 3]), path: "a.npy")
        XCTAssertEqual(a.shape, [1, 2, 3])
        XCTAssertEqual(a.values, v)
        XCTAssertEqual(try parseNPY(npyData(int64: [7], shape: [1]), path: "b").shape, [1])
        XCTAssertEqual(try parseNPY(npyData(int64: [7], shape: []), path: "b").values, [7])
        // A hand-written version-2 header with '<i4' and odd spacing.
        var header = "{\"descr\":\"<i4\",'fortran_order':False,'shape':(2,)}".replacingOccurrences(of: "\"", with: "'")
        header += "\n"
        var d = Data([0x93] + Array("NUMPY".utf8) + [2, 0, UInt8(header.utf8.count), 0, 0, 0]) + Data(header.utf8)
        d += Data([0xFF, 0xFF, 0xFF, 0xFF, 5, 0, 0, 0])
        let b = try parseNPY(d, path: "c.npy")
        XCTAssertEqual(b.values, [-1, 5])
    }

    func testNPYErrors() throws {
        let good = npyData(int64: [1, 2, 3], shape: [3])
        assertInputError(
            { _ = try parseNPY(Data("hello world".utf8), path: "a.npy") }, file: "a.npy", contains: ["not a .npy"])
        // Same-length edits of the header bytes.
        func edit(_ from: String, _ to: String) -> Data {
            var b = [UInt8](good)
            let f = Array(from.utf8)
            let at = (0...(b.count - f.count)).first { Array(b[$0..<($0 + f.count)]) == f }!
            b.replaceSubrange(at..<(at + f.count), with: Array(to.utf8))
            return Data(b)
        }
        assertInputError(
            { _ = try parseNPY(edit("<i8", "<f4"), path: "b.npy") }, file: "b.npy", contains: ["'<f4' is not supported"]
        )
        assertInputError(
            { _ = try parseNPY(edit("False", "True "), path: "c.npy") }, file: "c.npy", contains: ["Fortran order"])
        assertInputError({ _ = try parseNPY(good.dropLast(5), path: "d.npy") }, file: "d.npy", contains: ["truncated"])
    }

    // MARK: LlamaGen import

    private func writeLlamaGen(
        _ dir: String, n: Int, a: Int, t: Int, vocab: Int, classes: Int
    ) throws -> (String, String) {
        let codes = path(dir, "codes")
        let labels = path(dir, "labels")
        for d in [codes, labels] {
            try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true)
        }
        for i in 0..<n {
            let v = (0..<a).flatMap { aa in (0..<t).map { Int64(syntheticCode(i, aa, $0, vocab: vocab)) } }
            try npyData(int64: v, shape: [1, a, t]).write(to: URL(fileURLWithPath: path(codes, "\(i).npy")))
            try npyData(int64: [Int64(syntheticLabel(i, classes: classes))], shape: [1]).write(
                to: URL(fileURLWithPath: path(labels, "\(i).npy")))
        }
        try Data().write(to: URL(fileURLWithPath: path(codes, "README.txt")))  // ignored: not {i}.npy
        return (codes, labels)
    }

    func testImportLlamaGen() throws {
        let dir = temporaryFolder(self)
        let (codes, labels) = try writeLlamaGen(dir, n: 11, a: 2, t: 16, vocab: 100, classes: 5)
        var o = LlamaGenImportOptions(
            views: [LlamaGenFolders(codes: codes, labels: labels)], out: path(dir, "cache"),
            vocabSize: 100, numClasses: 5)
        o.shardSize = 4
        o.jobs = 2
        let info = try importLlamaGen(o, log: { _ in })
        XCTAssertEqual(info.numSamples, 11)
        XCTAssertEqual(info.shards.map(\.numSamples), [4, 4, 3])
        XCTAssertEqual([info.gridH, info.gridW, info.augmentations], [4, 4, 2])
        _ = try verifyCache(directory: o.out)
        let cache = try TokenCache(directory: o.out)
        // Numeric order (10 after 9), not name order.
        let (got, gotLabels) = try cache.read(indices: Array(0..<11), augmentations: (0..<11).map { $0 % 2 })
        for i in 0..<11 {
            XCTAssertEqual(
                Array(got[(i * 16)..<((i + 1) * 16)]), (0..<16).map { syntheticCode(i, i % 2, $0, vocab: 100) })
            XCTAssertEqual(gotLabels[i], syntheticLabel(i, classes: 5))
        }
    }

    func testImportLlamaGenErrors() throws {
        let dir = temporaryFolder(self)
        let (codes, labels) = try writeLlamaGen(dir, n: 6, a: 1, t: 9, vocab: 50, classes: 3)
        var o = LlamaGenImportOptions(
            views: [LlamaGenFolders(codes: codes, labels: labels)], out: path(dir, "cache"),
            vocabSize: 50, numClasses: 3)
        o.shardSize = 2
        o.jobs = 3
        // A sample with another shape.
        try npyData(int64: [Int64](repeating: 1, count: 18), shape: [1, 2, 9]).write(
            to: URL(fileURLWithPath: path(codes, "4.npy")))
        assertInputError(
            { _ = try importLlamaGen(o, log: { _ in }) }, file: "codes/4.npy",
            contains: ["all samples need the same A and T"])
        // A token out of range.
        try npyData(int64: [Int64](repeating: 50, count: 9), shape: [1, 1, 9]).write(
            to: URL(fileURLWithPath: path(codes, "4.npy")))
        assertInputError(
            { _ = try importLlamaGen(o, log: { _ in }) }, file: "codes/4.npy", contains: ["token 50", "vocab_size 50"])
        // A missing label.
        try npyData(int64: [Int64](repeating: 1, count: 9), shape: [1, 1, 9]).write(
            to: URL(fileURLWithPath: path(codes, "4.npy")))
        try FileManager.default.removeItem(atPath: path(labels, "2.npy"))
        assertInputError({ _ = try importLlamaGen(o, log: { _ in }) }, file: "labels/2.npy", contains: ["missing"])
        XCTAssertFalse(
            FileManager.default.fileExists(atPath: path(o.out, "dataset.json")),
            "a failed import leaves no dataset.json")
        // Not a square grid.
        let (c2, l2) = try writeLlamaGen(path(dir, "b"), n: 2, a: 1, t: 8, vocab: 50, classes: 3)
        o.views = [LlamaGenFolders(codes: c2, labels: l2)]
        assertInputError({ _ = try importLlamaGen(o, log: { _ in }) }, file: "0.npy", contains: ["not a square grid"])
    }

    /// LlamaGen's --code-path layout: ROOT/<name>_codes and ROOT/<name>_labels.
    private func writeRoot(_ root: String, name: String, n: Int, a: Int, offset: Int) throws -> LlamaGenFolders {
        let codes = path(root, "\(name)_codes")
        let labels = path(root, "\(name)_labels")
        for d in [codes, labels] {
            try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true)
        }
        for i in 0..<n {
            let v = (0..<a).flatMap { aa in (0..<16).map { Int64(syntheticCode(i, offset + aa, $0, vocab: 100)) } }
            try npyData(int64: v, shape: [1, a, 16]).write(to: URL(fileURLWithPath: path(codes, "\(i).npy")))
            let label = [Int64(syntheticLabel(i, classes: 5))]
            try npyData(int64: label, shape: [1]).write(to: URL(fileURLWithPath: path(labels, "\(i).npy")))
        }
        return LlamaGenFolders(codes: codes, labels: labels)
    }

    /// A flip root (A = 2) and its ten-crop companion (A = 10) become one cache of 12 views, in order.
    func testImportLlamaGenCodePathRootsAsViews() throws {
        let dir = temporaryFolder(self)
        let flip = try writeRoot(path(dir, "code_c2i_flip_ten_crop"), name: "imagenet256", n: 5, a: 2, offset: 0)
        let wide = try writeRoot(path(dir, "code_c2i_flip_ten_crop_105"), name: "imagenet256", n: 5, a: 10, offset: 2)
        XCTAssertEqual(try findLlamaGenFolders(codePath: path(dir, "code_c2i_flip_ten_crop")), flip)
        var o = LlamaGenImportOptions(views: [flip, wide], out: path(dir, "cache"), vocabSize: 100, numClasses: 5)
        o.shardSize = 2
        let info = try importLlamaGen(o, log: { _ in })
        XCTAssertEqual([info.numSamples, info.augmentations], [5, 12])
        let cache = try TokenCache(directory: o.out)
        for view in [0, 1, 2, 11] {
            let (got, labels) = try cache.read(indices: [3], augmentations: [view])
            XCTAssertEqual(got, (0..<16).map { syntheticCode(3, view, $0, vocab: 100) }, "view \(view)")
            XCTAssertEqual(labels, [syntheticLabel(3, classes: 5)])
        }
        // --codes at a root: the hint names --code-path
        o.views = [LlamaGenFolders(codes: path(dir, "code_c2i_flip_ten_crop"), labels: flip.labels)]
        assertInputError(
            { _ = try importLlamaGen(o, log: { _ in }) }, file: "code_c2i_flip_ten_crop",
            contains: ["LlamaGen --code-path root", "pass it as --code-path"])
        assertInputError(
            { _ = try findLlamaGenFolders(codePath: flip.codes) }, file: "imagenet256_codes",
            contains: ["expected one <name>_codes folder", "found none"])
    }

    func testImportLlamaGenRootsMustAgreeAndLimitsMustHoldTheData() throws {
        let dir = temporaryFolder(self)
        let flip = try writeRoot(path(dir, "a"), name: "imagenet256", n: 4, a: 2, offset: 0)
        let wide = try writeRoot(path(dir, "b"), name: "imagenet256", n: 4, a: 10, offset: 2)
        var o = LlamaGenImportOptions(views: [flip, wide], out: path(dir, "cache"), vocabSize: 100, numClasses: 5)
        let other = syntheticLabel(2, classes: 5) == 0 ? 1 : 0
        try npyData(int64: [Int64(other)], shape: [1]).write(to: URL(fileURLWithPath: path(wide.labels, "2.npy")))
        assertInputError(
            { _ = try importLlamaGen(o, log: { _ in }) }, file: "b/imagenet256_labels/2.npy",
            contains: ["the roots are not views of the same images"])
        try FileManager.default.removeItem(atPath: path(wide.codes, "3.npy"))
        assertInputError(
            { _ = try importLlamaGen(o, log: { _ in }) }, file: "b/imagenet256_codes",
            contains: ["holds 3 samples", "sample 3 is in one only"])
        o.views = [flip]
        o.vocabSize = 10
        o.limitsFrom = "--vocab-size 10 and --num-classes 5"
        assertInputError(
            { _ = try importLlamaGen(o, log: { _ in }) }, file: "a/imagenet256_codes/0.npy",
            contains: [
                "vocab_size 10)",
                "of --vocab-size 10 and --num-classes 5 is smaller than the data holds",
            ])
        o.vocabSize = 100
        o.numClasses = 1
        assertInputError(
            { _ = try importLlamaGen(o, log: { _ in }) }, file: "a/imagenet256_labels/1.npy",
            contains: ["num_classes 1)", "is smaller than the data holds"])
    }
}
