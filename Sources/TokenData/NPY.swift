import Foundation
import Platform

/// A NumPy .npy array of integers (what LlamaGen's code extraction writes: int64, C order).
public struct NPYArray: Sendable {
    public let shape: [Int]
    public let values: [Int64]
}

/// Parses .npy version 1-3: magic "\x93NUMPY", version, header length (uint16 LE in v1, uint32
/// LE after), a Python dict literal {'descr': ..., 'fortran_order': ..., 'shape': (...)}, data.
/// Little-endian integer dtypes only ('<i8', '<i4', '<i2', '<u2', '|u1', '|i1').
public func parseNPY(_ data: Data, path: String) throws -> NPYArray {
    let b = [UInt8](data)
    guard b.count >= 10, b[0] == 0x93, Array(b[1..<6]) == Array("NUMPY".utf8) else {
        throw InputError(path, "not a .npy file (bad magic)")
    }
    let major = b[6]
    let headerStart: Int
    let headerLen: Int
    switch major {
    case 1:
        headerStart = 10
        headerLen = Int(b[8]) | Int(b[9]) << 8
    case 2, 3:
        guard b.count >= 12 else { throw InputError(path, ".npy header is truncated") }
        headerStart = 12
        headerLen = Int(b[8]) | Int(b[9]) << 8 | Int(b[10]) << 16 | Int(b[11]) << 24
    default: throw InputError(path, ".npy version \(major) is not supported")
    }
    guard b.count >= headerStart + headerLen else { throw InputError(path, ".npy header is truncated") }
    let header = String(decoding: b[headerStart..<(headerStart + headerLen)], as: UTF8.self)

    // The three keys, read with plain string scanning (the header is a fixed-form Python literal).
    func value(of key: String) throws -> Substring {
        guard let k = header.range(of: "'\(key)'") else {
            throw InputError(path, ".npy header has no '\(key)': \(header)")
        }
        var rest = header[k.upperBound...].drop { $0 == " " }
        guard rest.first == ":" else { throw InputError(path, ".npy header is malformed near '\(key)'") }
        rest = rest.dropFirst().drop { $0 == " " }
        return rest
    }
    let descrRest = try value(of: "descr")
    guard let q = descrRest.first, q == "'" || q == "\"", let end = descrRest.dropFirst().firstIndex(of: q) else {
        throw InputError(path, ".npy header: cannot read 'descr'")
    }
    let descr = String(descrRest[descrRest.index(after: descrRest.startIndex)..<end])
    let fortran = try value(of: "fortran_order")
    if fortran.hasPrefix("True") { throw InputError(path, ".npy array is in Fortran order; only C order is supported") }
    let shapeRest = try value(of: "shape")
    guard shapeRest.first == "(", let close = shapeRest.firstIndex(of: ")") else {
        throw InputError(path, ".npy header: cannot read 'shape'")
    }
    let dims = shapeRest[shapeRest.index(after: shapeRest.startIndex)..<close].split(separator: ",")
        .map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
    var shape: [Int] = []
    for d in dims {
        guard let v = Int(d), v >= 0 else { throw InputError(path, ".npy header: bad shape entry '\(d)'") }
        shape.append(v)
    }

    let width: Int
    let signed: Bool
    switch descr {
    case "<i8": (width, signed) = (8, true)
    case "<i4": (width, signed) = (4, true)
    case "<i2": (width, signed) = (2, true)
    case "<u2": (width, signed) = (2, false)
    case "|u1", "<u1": (width, signed) = (1, false)
    case "|i1", "<i1": (width, signed) = (1, true)
    default:
        throw InputError(path, ".npy dtype '\(descr)' is not supported (expected little-endian integers, e.g. '<i8')")
    }
    let count = shape.reduce(1, *)
    let body = headerStart + headerLen
    guard b.count - body == count * width else {
        throw InputError(
            path,
            ".npy shape \(shape) of \(descr) needs \(count * width) data bytes but the file has "
                + "\(b.count - body) (truncated?)"
        )
    }
    var values = [Int64](repeating: 0, count: count)
    for i in 0..<count {
        var u: UInt64 = 0
        for j in 0..<width { u |= UInt64(b[body + i * width + j]) << (8 * UInt64(j)) }
        // sign-extend
        if signed && width < 8 && u >> (UInt64(width) * 8 - 1) & 1 == 1 { u |= ~0 << (UInt64(width) * 8) }
        values[i] = Int64(bitPattern: u)
    }
    return NPYArray(shape: shape, values: values)
}

public func readNPY(path: String) throws -> NPYArray {
    guard let d = FileManager.default.contents(atPath: path) else {
        throw InputError(path, "cannot read file (missing?)")
    }
    return try parseNPY(d, path: path)
}

/// A version 1.0 .npy file of int64 values (for tests and small tools).
public func npyData(int64 values: [Int64], shape: [Int]) -> Data {
    let dims = shape.count == 1 ? "(\(shape[0]),)" : "(" + shape.map(String.init).joined(separator: ", ") + ")"
    var header = "{'descr': '<i8', 'fortran_order': False, 'shape': \(dims), }"
    while (10 + header.utf8.count + 1) % 64 != 0 { header += " " }
    header += "\n"
    var d = Data([0x93] + Array("NUMPY".utf8) + [1, 0, UInt8(header.utf8.count & 0xFF), UInt8(header.utf8.count >> 8)])
    d += Data(header.utf8)
    for v in values { withUnsafeBytes(of: v.littleEndian) { d += Data($0) } }
    return d
}
