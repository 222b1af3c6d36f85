import Foundation
import Platform

/// A patch VQ codebook (SPEC 7 `codebook.h5`): code v stands for one `patchSize x patchSize`
/// patch of `channels` channels, pixels in [0, 1], laid out [py, px, c]. Images are row-major
/// [H, W, channels]; tokens are the patches in raster order.
public struct Codebook {
    public var vectors: [Float]  // [V, Dc]
    public let V: Int
    public let Dc: Int  // patchSize * patchSize * channels
    public let patchSize: Int
    public let imageH: Int
    public let imageW: Int
    public let channels: Int

    public var gridH: Int { imageH / patchSize }
    public var gridW: Int { imageW / patchSize }

    public init(
        vectors: [Float], patchSize: Int, imageH: Int, imageW: Int, channels: Int, path: String = "codebook"
    ) throws {
        guard patchSize >= 1, channels >= 1, imageH >= patchSize, imageW >= patchSize,
            imageH % patchSize == 0, imageW % patchSize == 0
        else {
            throw InputError(
                path, "image \(imageH)x\(imageW) is not a whole number of \(patchSize)x\(patchSize) patches")
        }
        let dc = patchSize * patchSize * channels
        guard !vectors.isEmpty, vectors.count % dc == 0 else {
            throw InputError(path, "\(vectors.count) codebook values is not a whole number of \(dc)-value vectors")
        }
        self.vectors = vectors
        self.V = vectors.count / dc
        self.Dc = dc
        self.patchSize = patchSize
        self.imageH = imageH
        self.imageW = imageW
        self.channels = channels
    }

    /// Reads `codebook` float32 [V, Dc] and its attributes patch_size, image_h, image_w, channels.
    public static func load(path: String) throws -> Codebook {
        let f = try HDF5File.open(path)
        guard f.has("codebook") else { throw InputError(path, "missing dataset 'codebook'") }
        let type = try f.storedType(of: "codebook")
        guard type.isFloat else { throw InputError(path, "codebook is stored as \(type); expected float32") }
        let (values, shape) = try f.read("codebook", as: Float.self)
        let attrs = try ["patch_size", "image_h", "image_w", "channels"].map { try f.intAttribute($0) }
        guard shape.count == 2, shape[1] == attrs[0] * attrs[0] * attrs[3] else {
            throw InputError(
                path,
                "codebook has shape \(shape); expected [V, patch_size^2 * channels] = [V, "
                    + "\(attrs[0] * attrs[0] * attrs[3])]"
            )
        }
        guard values.allSatisfy({ $0.isFinite }) else {
            throw InputError(path, "codebook holds NaN or infinite values")
        }
        return try Codebook(
            vectors: values, patchSize: attrs[0], imageH: attrs[1], imageW: attrs[2], channels: attrs[3], path: path)
    }

    /// Writes codebook.h5 (temporary name, then rename).
    public func save(path: String, description: String? = nil) throws {
        let tmp = path + ".tmp"
        do {
            let f = try HDF5File.create(tmp)
            try f.write("codebook", vectors, shape: [V, Dc])
            for (k, v) in [
                ("patch_size", patchSize), ("image_h", imageH), ("image_w", imageW), ("channels", channels),
                ("vocab_size", V),
            ] {
                try f.setAttribute(k, int: v)
            }
            try f.setAttribute("pixel_range", string: "[0, 1]")
            if let description { try f.setAttribute("description", string: description) }
            try f.flush()
        }
        try moveIntoPlace(tmp, path)
    }

    /// Image [gridH * p, gridW * p, channels] in [0, 1] from tokens [gridH * gridW]. A token
    /// outside [0, V) (which a cache never holds) is drawn as a mid-grey patch rather than trapping.
    public func decode(tokens: [Int32], gridH: Int, gridW: Int) -> [Float] {
        let p = patchSize
        let c = channels
        let w = gridW * p
        var image = [Float](repeating: 0.5, count: gridH * p * w * c)
        for gy in 0..<gridH {
            for gx in 0..<gridW {
                let k = gy * gridW + gx
                guard k < tokens.count, tokens[k] >= 0, Int(tokens[k]) < V else { continue }
                let base = Int(tokens[k]) * Dc
                for py in 0..<p {
                    for px in 0..<p {
                        for ch in 0..<c {
                            let v = vectors[base + (py * p + px) * c + ch]
                            image[((gy * p + py) * w + gx * p + px) * c + ch] = min(1, max(0, v))
                        }
                    }
                }
            }
        }
        return image
    }

    /// Patches of images [n, H, W, channels] as rows [n * gridH * gridW, Dc], raster order.
    public func patches(images: UnsafeBufferPointer<Float>, count n: Int, flip: Bool = false) -> [Float] {
        imagePatches(images, count: n, height: imageH, width: imageW, channels: channels, patch: patchSize, flip: flip)
    }

    /// Tokens [n, gridH * gridW] of images [n, H, W, channels] (nearest code per patch), and the
    /// summed squared error over all pixels.
    public func encode(
        images: UnsafeBufferPointer<Float>, count n: Int, flip: Bool = false
    ) -> (tokens: [Int32], squaredError: Double) {
        let x = patches(images: images, count: n, flip: flip)
        let (idx, dist) = x.withUnsafeBufferPointer {
            nearestCentroids(points: $0.baseAddress!, n: n * gridH * gridW, dim: Dc, centroids: vectors, k: V)
        }
        return (idx, dist.reduce(0.0) { $0 + Double($1) })
    }
}

/// Patches of images [n, h, w, c] (mirrored left-right when `flip`) as rows
/// [n * (h / p) * (w / p), p * p * c], raster order, each laid out [py, px, c].
public func imagePatches(
    _ images: UnsafeBufferPointer<Float>, count n: Int, height h: Int, width w: Int, channels c: Int,
    patch p: Int, flip: Bool = false
) -> [Float] {
    let gh = h / p
    let gw = w / p
    var out = [Float](repeating: 0, count: n * gh * gw * p * p * c)
    var o = 0
    for i in 0..<n {
        let img = images.baseAddress! + i * h * w * c
        for gy in 0..<gh {
            for gx in 0..<gw {
                for py in 0..<p {
                    for px in 0..<p {
                        let x = gx * p + px
                        let src = (gy * p + py) * w + (flip ? w - 1 - x : x)
                        for ch in 0..<c {
                            out[o] = img[src * c + ch]
                            o += 1
                        }
                    }
                }
            }
        }
    }
    return out
}
