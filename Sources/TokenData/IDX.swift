import Foundation
import Platform

/// An IDX array of unsigned bytes (the MNIST / Fashion-MNIST format): big-endian header
/// `0, 0, type, ndim`, then ndim big-endian uint32 sizes, then the values.
public struct IDXArray: Sendable {
    public let shape: [Int]
    public let values: [UInt8]
}

public func parseIDX(_ data: Data, path: String) throws -> IDXArray {
    let b = [UInt8](data)
    guard b.count >= 4, b[0] == 0, b[1] == 0 else { throw InputError(path, "not an IDX file (bad magic number)") }
    guard b[2] == 0x08 else {
        throw InputError(
            path, String(format: "IDX element type 0x%02X is not supported (only 0x08, unsigned byte)", b[2]))
    }
    let ndim = Int(b[3])
    guard ndim >= 1, b.count >= 4 + 4 * ndim else { throw InputError(path, "IDX header is truncated") }
    var shape: [Int] = []
    for i in 0..<ndim {
        let o = 4 + 4 * i
        shape.append(Int(b[o]) << 24 | Int(b[o + 1]) << 16 | Int(b[o + 2]) << 8 | Int(b[o + 3]))
    }
    let count = shape.reduce(1, *)
    let body = b.count - 4 - 4 * ndim
    guard body == count else {
        throw InputError(path, "IDX header says shape \(shape) (\(count) values) but the file holds \(body)")
    }
    return IDXArray(shape: shape, values: Array(b[(4 + 4 * ndim)...]))
}

/// Reads an IDX file; a name ending in .gz is decompressed with `gzip -dc` (Foundation on Linux
/// has no zlib API).
public func readIDX(path: String) throws -> IDXArray {
    try parseIDX(try readMaybeGzip(path: path), path: path)
}

/// The bytes of a file, gunzipped when its name ends in .gz.
public func readMaybeGzip(path: String) throws -> Data {
    guard FileManager.default.fileExists(atPath: path) else { throw InputError(path, "file does not exist") }
    guard path.hasSuffix(".gz") else {
        guard let d = FileManager.default.contents(atPath: path) else { throw InputError(path, "cannot read file") }
        return d
    }
    let gzip = ["/usr/bin/gzip", "/bin/gzip"].first { FileManager.default.isExecutableFile(atPath: $0) }
    guard let gzip else { throw InputError(path, "cannot decompress: gzip not found in /usr/bin or /bin") }
    let proc = Process()
    proc.executableURL = URL(fileURLWithPath: gzip)
    proc.arguments = ["-dc", path]
    let out = Pipe()
    let err = Pipe()
    proc.standardOutput = out
    proc.standardError = err
    do { try proc.run() } catch { throw InputError(path, "cannot run gzip: \(error.localizedDescription)") }
    let data = out.fileHandleForReading.readDataToEndOfFile()
    let msg = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    proc.waitUntilExit()
    guard proc.terminationStatus == 0 else {
        throw InputError(path, "gzip -dc failed: \(msg.trimmingCharacters(in: .whitespacesAndNewlines))")
    }
    return data
}

/// `folder/base`, or `folder/base.gz`, whichever exists.
func findMaybeGzip(folder: String, names: [String]) throws -> String {
    for name in names {
        for candidate in [name, name + ".gz"] {
            let p = (folder as NSString).appendingPathComponent(candidate)
            if FileManager.default.fileExists(atPath: p) { return p }
        }
    }
    throw InputError(
        (folder as NSString).appendingPathComponent(names[0]),
        "not found (also looked for \(names.map { $0 + "[.gz]" }.joined(separator: ", ")))")
}
