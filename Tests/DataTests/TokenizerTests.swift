import Foundation
import Platform
import XCTest

@testable import TokenData

/// The patch VQ: k-means, encode/decode, codebook.h5, and the Fashion-MNIST build on tiny
/// synthetic IDX files.
final class TokenizerTests: XCTestCase {
    func testNearestCentroidsMatchesBruteForce() {
        var rng = CounterRNG(seed: 3)
        let (n, d, k) = (5000, 6, 37)  // more than one 4096-row chunk
        let points = (0..<(n * d)).map { _ in rng.uniform() }
        let centroids = (0..<(k * d)).map { _ in rng.uniform() }
        let (idx, dist) = points.withUnsafeBufferPointer {
            nearestCentroids(points: $0.baseAddress!, n: n, dim: d, centroids: centroids, k: k)
        }
        var worst: Float = 0
        for i in stride(from: 0, to: n, by: 7) {
            var best = Float.infinity
            var bestJ = -1
            for j in 0..<k {
                var s: Float = 0
                for t in 0..<d {
                    let u = points[i * d + t] - centroids[j * d + t]
                    s += u * u
                }
                if s < best {
                    best = s
                    bestJ = j
                }
            }
            worst = max(worst, abs(dist[i] - best))
            // Float rounding may swap near ties: then the two distances must agree closely.
            if Int(idx[i]) != bestJ {
                var s: Float = 0
                for t in 0..<d {
                    let u = points[i * d + t] - centroids[Int(idx[i]) * d + t]
                    s += u * u
                }
                XCTAssertEqual(s, best, accuracy: 1e-5, "point \(i)")
            }
        }
        XCTAssertLessThan(worst, 1e-5)
    }

    func testArgminFirstTakesTheLowestIndexOnTies() {
        func argmin(_ v: [Float], _ b: [Float]? = nil) -> (Int, Float) {
            let bias = b ?? [Float](repeating: 0, count: v.count)
            return v.withUnsafeBufferPointer { vp in
                bias.withUnsafeBufferPointer { argminFirst(vp.baseAddress!, plus: $0.baseAddress!, v.count) }
            }
        }
        XCTAssertEqual(argmin([Float](repeating: 1, count: 37)).0, 0)
        XCTAssertEqual(argmin((0..<37).map { Float(($0 * 7) % 37) }).0, 0)
        var v = [Float](repeating: 2, count: 37)
        v[33] = -1
        v[20] = -1  // tie between the SIMD part and the tail
        XCTAssertEqual(argmin(v).0, 20)
        v[35] = -3  // minimum only in the tail
        XCTAssertEqual(argmin(v).0, 35)
        XCTAssertEqual(argmin(v, (0..<37).map { $0 == 35 ? 10 : 0 }).0, 20)  // the bias counts
        XCTAssertEqual(argmin([5], [1]).1, 6)
    }

    func testKMeansRecoversSeparatedClusters() {
        let (d, k, per) = (8, 5, 80)
        var centres = [Float](repeating: 0, count: k * d)
        for j in 0..<k {
            centres[j * d + j] = 10
            centres[j * d + (j + 3) % d] = -5
        }
        var rng = CounterRNG(seed: 11)
        var points: [Float] = []
        for i in 0..<(k * per) {
            let j = (i * 7) % k  // interleaved
            for t in 0..<d { points.append(centres[j * d + t] + 0.2 * (rng.uniform() - 0.5)) }
        }
        let found = kMeans(points: points, dim: d, k: k, iterations: 10, seed: 5)
        var matched = Set<Int>()
        for j in 0..<k {
            let near = (0..<k).min { a, b in
                (0..<d).reduce(Float(0)) { $0 + pow(found[a * d + $1] - centres[j * d + $1], 2) }
                    < (0..<d).reduce(Float(0)) { $0 + pow(found[b * d + $1] - centres[j * d + $1], 2) }
            }!
            matched.insert(near)
            for t in 0..<d { XCTAssertEqual(found[near * d + t], centres[j * d + t], accuracy: 0.05, "centre \(j)") }
        }
        XCTAssertEqual(matched.count, k, "one centroid per cluster")
        XCTAssertEqual(kMeans(points: points, dim: d, k: k, iterations: 10, seed: 5), found, "deterministic")
    }

    func testKMeansMoreCentresThanDistinctPoints() {
        let points: [Float] = [0, 0, 1, 1, 0, 0, 1, 1]  // 4 points, 2 distinct, k = 3
        let c = kMeans(points: points, dim: 2, k: 3, iterations: 5, seed: 1)
        XCTAssertEqual(c.count, 6)
        XCTAssertTrue(c.allSatisfy { $0.isFinite })
    }

    /// An image made of codebook patches encodes to those codes and decodes to itself exactly.
    func testEncodeDecodeExact() throws {
        let (p, ch, h, w, v) = (2, 3, 4, 6, 9)
        var rng = CounterRNG(seed: 2)
        let vectors = (0..<(v * p * p * ch)).map { _ in Float(rng.below(5)) / 4 }  // exact in Float
        let cb = try Codebook(vectors: vectors, patchSize: p, imageH: h, imageW: w, channels: ch)
        XCTAssertEqual([cb.gridH, cb.gridW, cb.Dc], [2, 3, 12])
        let tokens: [Int32] = [4, 0, 8, 8, 1, 2]
        let image = cb.decode(tokens: tokens, gridH: 2, gridW: 3)
        XCTAssertEqual(image.count, h * w * ch)
        let (enc, err) = image.withUnsafeBufferPointer { cb.encode(images: $0, count: 1) }
        XCTAssertEqual(enc, tokens)
        XCTAssertEqual(err, 0, accuracy: 1e-9)
        XCTAssertEqual(cb.decode(tokens: enc, gridH: 2, gridW: 3), image)
        // Flipping while encoding equals encoding the flipped image.
        var flipped = image
        for y in 0..<h {
            for x in 0..<w { for c in 0..<ch { flipped[(y * w + x) * ch + c] = image[(y * w + w - 1 - x) * ch + c] } }
        }
        let a = image.withUnsafeBufferPointer { cb.encode(images: $0, count: 1, flip: true).tokens }
        let b = flipped.withUnsafeBufferPointer { cb.encode(images: $0, count: 1).tokens }
        XCTAssertEqual(a, b)
        // Out-of-range tokens draw grey rather than trap.
        XCTAssertEqual(Set(cb.decode(tokens: [99, -1, 0, 0, 0, 0], gridH: 2, gridW: 3)[0..<(p * ch)]), [0.5])
    }

    func testCodebookFile() throws {
        let dir = temporaryFolder(self)
        let cb = try Codebook(
            vectors: (0..<(5 * 16)).map { Float($0) / 80 }, patchSize: 4, imageH: 8, imageW: 12, channels: 1)
        let file = path(dir, "codebook.h5")
        try cb.save(path: file, description: "test")
        let back = try Codebook.load(path: file)
        XCTAssertEqual(back.vectors, cb.vectors)
        XCTAssertEqual(
            [back.V, back.Dc, back.patchSize, back.imageH, back.imageW, back.channels], [5, 16, 4, 8, 12, 1])
        try HDF5File.open(file, writable: true).setAttribute("patch_size", int: 3)
        assertInputError(
            { _ = try Codebook.load(path: file) }, file: "codebook.h5", contains: ["shape [5, 16]", "[V, 9]"])
        assertInputError(
            { _ = try Codebook(vectors: [0, 1], patchSize: 3, imageH: 8, imageW: 8, channels: 1, path: "cb") },
            file: "cb", contains: ["3x3 patches"])
    }

    // MARK: the Fashion-MNIST build, on tiny fake IDX files

    /// Writes `n` 28x28 images of blocky shapes (and labels) as IDX, gzipped when asked.
    private func writeFakeSplit(_ dir: String, prefix: String, n: Int, gzip: Bool) throws {
        var pixels = [UInt8](repeating: 0, count: n * 28 * 28)
        for i in 0..<n {
            let (y0, x0, size) = (i % 9, (i * 5) % 11, 8 + i % 10)
            for y in y0..<min(28, y0 + size) {
                for x in x0..<min(28, x0 + size) { pixels[i * 784 + y * 28 + x] = UInt8(80 + (i * 37 + x) % 170) }
            }
        }
        func write(_ name: String, _ header: [UInt8], _ body: [UInt8]) throws {
            let p = path(dir, name)
            try Data(header + body).write(to: URL(fileURLWithPath: p))
            if gzip {
                let z = Process()
                z.executableURL = URL(fileURLWithPath: "/bin/sh")
                z.arguments = ["-c", "gzip -f '\(p)'"]
                try z.run()
                z.waitUntilExit()
            }
        }
        let n4: [UInt8] = [0, 0, UInt8(n >> 8), UInt8(n & 0xFF)]
        try write("\(prefix)-images-idx3-ubyte", [0, 0, 8, 3] + n4 + [0, 0, 0, 28, 0, 0, 0, 28], pixels)
        try write("\(prefix)-labels-idx1-ubyte", [0, 0, 8, 1] + n4, (0..<n).map { UInt8($0 % 10) })
    }

    func testFashionMNISTBuildOnFakeData() throws {
        let src = temporaryFolder(self)
        let out = path(temporaryFolder(self), "fm")
        try writeFakeSplit(src, prefix: "train", n: 50, gzip: true)
        try writeFakeSplit(src, prefix: "t10k", n: 12, gzip: false)
        var o = PatchVQOptions()
        o.codebookSize = 32
        o.kmeansSamples = 2000
        o.kmeansIterations = 4
        o.shardSize = 20
        var lines: [String] = []
        let (r, reused) = try buildFashionMNIST(source: src, out: out, options: o, log: { lines.append($0) })
        XCTAssertFalse(reused)
        XCTAssertTrue(lines.contains { $0.contains("iteration  1") })
        XCTAssertEqual([r.vocabSize, r.gridH, r.gridW, r.trainSamples, r.valSamples], [32, 7, 7, 50, 12])
        for split in ["train", "val"] {
            let v = try verifyCache(directory: path(out, split))
            XCTAssertEqual(v.info.augmentations, 2)
            XCTAssertEqual(try Codebook.load(path: path(path(out, split), "codebook.h5")).V, 32)
        }
        XCTAssertEqual(try TokenCache(directory: path(out, "train")).info.shards.map(\.numSamples), [20, 20, 10])
        // The report's val MSE is what decoding the cache gives; PSNR follows from it.
        XCTAssertGreaterThan(r.valMSE, 0)
        XCTAssertLessThan(r.valMSE, 0.05)
        XCTAssertEqual(r.valPSNR, 10 * log10(1 / r.valMSE), accuracy: 1e-9)
        XCTAssertEqual(r.trainUnigramEntropyNats, try unigramEntropy(directory: path(out, "train")), accuracy: 1e-12)
        // Augmentation 1 is the flip of augmentation 0's image: decode both and compare mirrored.
        let cache = try TokenCache(directory: path(out, "val"))
        let (codes, _) = try cache.read(indices: [3, 3], augmentations: [0, 1])
        XCTAssertNotEqual(Array(codes[0..<49]), Array(codes[49...]))
        // Idempotent: same options -> kept; other options -> rebuilt.
        let again = try buildFashionMNIST(source: src, out: out, options: o, log: { _ in })
        XCTAssertTrue(again.reused)
        XCTAssertEqual(again.report.valMSE, r.valMSE)
        o.codebookSize = 16
        let other = try buildFashionMNIST(source: src, out: out, options: o, log: { _ in })
        XCTAssertFalse(other.reused)
        XCTAssertEqual(try TokenCache(directory: path(out, "val")).info.vocabSize, 16)
        // Missing source files name what was looked for.
        assertInputError(
            { _ = try buildFashionMNIST(source: out, out: path(out, "x"), options: o, log: { _ in }) },
            file: "train-images-idx3-ubyte", contains: ["not found"])
    }
}
