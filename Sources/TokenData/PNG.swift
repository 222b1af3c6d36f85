import Foundation
import Platform

/// A PNG with no compression: the zlib stream holds "stored" deflate blocks, so the whole writer
/// is chunk framing plus CRC-32 and Adler-32. Files are larger than a real encoder's, but any
/// viewer opens them. channels: 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA; pixels row-major, 8 bits.
public func writePNG(path: String, pixels: [UInt8], width: Int, height: Int, channels: Int) throws {
    let data = try pngData(pixels: pixels, width: width, height: height, channels: channels, path: path)
    guard FileManager.default.createFile(atPath: path, contents: data) else {
        throw InputError(path, "cannot write file (missing folder or no permission?)")
    }
}

public func pngData(pixels: [UInt8], width: Int, height: Int, channels: Int, path: String = "png") throws -> Data {
    let colorType: [Int: UInt8] = [1: 0, 2: 4, 3: 2, 4: 6]
    guard let ct = colorType[channels] else { throw InputError(path, "PNG needs 1 to 4 channels, got \(channels)") }
    guard width >= 1, height >= 1, pixels.count == width * height * channels else {
        throw InputError(
            path, "PNG of \(width)x\(height)x\(channels) needs \(width * height * channels) bytes, got \(pixels.count)")
    }
    // Scanlines, each led by filter type 0 (none).
    let stride = width * channels
    var raw = [UInt8]()
    raw.reserveCapacity(height * (stride + 1))
    for y in 0..<height {
        raw.append(0)
        raw += pixels[(y * stride)..<((y + 1) * stride)]
    }
    // zlib: header 78 01, stored blocks of at most 65535 bytes, Adler-32 (big-endian).
    var z: [UInt8] = [0x78, 0x01]
    var o = 0
    repeat {
        let n = min(65535, raw.count - o)
        let final: UInt8 = o + n == raw.count ? 1 : 0
        z += [final, UInt8(n & 0xFF), UInt8(n >> 8), UInt8(~n & 0xFF), UInt8((~n >> 8) & 0xFF)]
        z += raw[o..<(o + n)]
        o += n
    } while o < raw.count
    z += bigEndian32(adler32(raw))

    var png: [UInt8] = [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A]
    func chunk(_ type: String, _ body: [UInt8]) {
        let t = Array(type.utf8)
        png += bigEndian32(UInt32(body.count)) + t + body + bigEndian32(crc32(t + body))
    }
    chunk("IHDR", bigEndian32(UInt32(width)) + bigEndian32(UInt32(height)) + [8, ct, 0, 0, 0])
    chunk("IDAT", z)
    chunk("IEND", [])
    return Data(png)
}

private func bigEndian32(_ v: UInt32) -> [UInt8] {
    [UInt8(v >> 24), UInt8((v >> 16) & 0xFF), UInt8((v >> 8) & 0xFF), UInt8(v & 0xFF)]
}

private let crcTable: [UInt32] = (0..<256).map { n in
    var c = UInt32(n)
    for _ in 0..<8 { c = c & 1 == 1 ? 0xEDB8_8320 ^ (c >> 1) : c >> 1 }
    return c
}

/// CRC-32 (ISO 3309, as PNG and gzip use it).
public func crc32<C: Collection>(_ bytes: C) -> UInt32 where C.Element == UInt8 {
    var c: UInt32 = 0xFFFF_FFFF
    for b in bytes { c = crcTable[Int((c ^ UInt32(b)) & 0xFF)] ^ (c >> 8) }
    return c ^ 0xFFFF_FFFF
}

/// Adler-32 (RFC 1950).
public func adler32<C: Collection>(_ bytes: C) -> UInt32 where C.Element == UInt8 {
    var a: UInt32 = 1
    var b: UInt32 = 0
    for x in bytes {
        a = (a + UInt32(x)) % 65521
        b = (b + a) % 65521
    }
    return b << 16 | a
}

/// Binary PGM (P5) for grey images, or PPM (P6) for RGB.
public func writePNM(path: String, pixels: [UInt8], width: Int, height: Int, channels: Int) throws {
    guard channels == 1 || channels == 3, pixels.count == width * height * channels else {
        throw InputError(path, "PGM/PPM needs 1 or 3 channels and width x height x channels bytes")
    }
    let data = Data("\(channels == 1 ? "P5" : "P6")\n\(width) \(height)\n255\n".utf8) + Data(pixels)
    guard FileManager.default.createFile(atPath: path, contents: data) else {
        throw InputError(path, "cannot write file")
    }
}

/// Floats in [0, 1] to bytes (rounded, clamped).
public func toBytes(_ pixels: [Float]) -> [UInt8] {
    pixels.map { UInt8(max(0, min(255, ($0 * 255).rounded()))) }
}

/// Tiles images (each [h, w, channels], floats in [0, 1]) into a grid of `columns`, `pad`
/// pixels of `background` between them, each pixel enlarged `scale` times. Returns bytes and size.
public func imageGrid(
    _ images: [[Float]], height h: Int, width w: Int, channels c: Int, columns: Int,
    pad: Int = 2, scale: Int = 1, background: Float = 1
) -> (pixels: [UInt8], width: Int, height: Int) {
    let cols = max(1, min(columns, images.count))
    let rows = (images.count + cols - 1) / cols
    let cw = w * scale + pad
    let ch = h * scale + pad
    let width = cols * cw + pad
    let height = rows * ch + pad
    var out = [UInt8](repeating: toBytes([background])[0], count: width * height * c)
    for (k, img) in images.enumerated() where img.count == h * w * c {
        let ox = pad + (k % cols) * cw
        let oy = pad + (k / cols) * ch
        for y in 0..<(h * scale) {
            for x in 0..<(w * scale) {
                for z in 0..<c {
                    let v = img[((y / scale) * w + x / scale) * c + z]
                    out[((oy + y) * width + ox + x) * c + z] = UInt8(max(0, min(255, (v * 255).rounded())))
                }
            }
        }
    }
    return (out, width, height)
}
