import CSupport
import Foundation

/// Element types we store. Files are written little-endian; reads convert to the native type.
public enum HDF5Kind: String, Sendable { case float32, int32, uint16, int64, uint8 }

public protocol HDF5Scalar { static var hdf5Kind: HDF5Kind { get } }
extension Float: HDF5Scalar { public static var hdf5Kind: HDF5Kind { .float32 } }
extension Int32: HDF5Scalar { public static var hdf5Kind: HDF5Kind { .int32 } }
extension UInt16: HDF5Scalar { public static var hdf5Kind: HDF5Kind { .uint16 } }
extension Int64: HDF5Scalar { public static var hdf5Kind: HDF5Kind { .int64 } }
extension UInt8: HDF5Scalar { public static var hdf5Kind: HDF5Kind { .uint8 } }

private func nativeType(_ k: HDF5Kind) -> hid_t {
    switch k {
    case .float32: return tar_h5t_native_float()
    case .int32: return tar_h5t_native_int32()
    case .uint16: return tar_h5t_native_uint16()
    case .int64: return tar_h5t_native_int64()
    case .uint8: return tar_h5t_native_uint8()
    }
}
private func fileType(_ k: HDF5Kind) -> hid_t {
    switch k {
    case .float32: return tar_h5t_ieee_f32le()
    case .int32: return tar_h5t_std_i32le()
    case .uint16: return tar_h5t_std_u16le()
    case .int64: return tar_h5t_std_i64le()
    case .uint8: return tar_h5t_native_uint8()
    }
}

/// What a dataset holds on disk, for dtype checks ("codes must be uint16 or int32").
public struct HDF5StoredType: Equatable, CustomStringConvertible, Sendable {
    public let isFloat: Bool
    public let isSigned: Bool
    public let bytes: Int
    public init(isFloat: Bool, isSigned: Bool, bytes: Int) {
        self.isFloat = isFloat
        self.isSigned = isSigned
        self.bytes = bytes
    }
    /// How `kind` is stored by this wrapper (for comparing with `storedType(of:)`).
    public init(_ kind: HDF5Kind) {
        switch kind {
        case .float32: self.init(isFloat: true, isSigned: true, bytes: 4)
        case .int32: self.init(isFloat: false, isSigned: true, bytes: 4)
        case .uint16: self.init(isFloat: false, isSigned: false, bytes: 2)
        case .int64: self.init(isFloat: false, isSigned: true, bytes: 8)
        case .uint8: self.init(isFloat: false, isSigned: false, bytes: 1)
        }
    }
    public var description: String { (isFloat ? "float" : (isSigned ? "int" : "uint")) + "\(bytes * 8)" }
}

/// libhdf5 is not thread-safe in Debian's build (TOOLCHAIN.md): every call goes through this lock.
public let hdf5Lock = NSRecursiveLock()

/// An open HDF5 file. Errors name the file and the operation; handles are closed in deinit.
public final class HDF5File {
    public let path: String
    private let id: hid_t

    /// The file's size when opened: a read checks the file has not shrunk since (HDF5 reads zeros
    /// past the end of a file truncated under it instead of failing).
    private var sizeAtOpen: Int64 = 0

    private init(path: String, id: hid_t) {
        self.path = path
        self.id = id
        sizeAtOpen = HDF5File.fileSize(path) ?? 0
    }

    static func fileSize(_ path: String) -> Int64? {
        var st = stat()
        return stat(path, &st) == 0 ? Int64(st.st_size) : nil
    }

    /// Throws when the file is now shorter than when it was opened (truncated while in use).
    public func checkNotTruncated() throws {
        guard let now = HDF5File.fileSize(path) else { throw InputError(path, "is gone (removed while in use)") }
        if now < sizeAtOpen {
            throw InputError(path, "was truncated while in use: \(now) bytes now, \(sizeAtOpen) when opened")
        }
    }
    deinit {
        hdf5Lock.lock()
        H5Fclose(id)
        hdf5Lock.unlock()
    }

    private static func locked<T>(_ body: () throws -> T) rethrows -> T {
        hdf5Lock.lock()
        defer { hdf5Lock.unlock() }
        tar_h5_silence_errors()
        return try body()
    }

    /// Creates (truncating) a file. `checksummed`: the file's own structures use the HDF5 1.10
    /// format, which checksums them, and `createDataset` adds a Fletcher-32 checksum to every chunk
    /// of data, so a damaged file fails to open or to read instead of returning wrong numbers
    /// (checkpoint shards).
    public static func create(_ path: String, checksummed: Bool = false) throws -> HDF5File {
        try locked {
            let fapl = H5Pcreate(tar_h5p_file_access())
            defer { H5Pclose(fapl) }
            if checksummed { H5Pset_libver_bounds(fapl, H5F_LIBVER_V110, H5F_LIBVER_V110) }
            let id = H5Fcreate(path, tar_h5f_acc_trunc(), tar_h5p_default(), fapl)
            guard id >= 0 else {
                throw InputError(path, "cannot create HDF5 file (missing folder, no permission or disk full?)")
            }
            let f = HDF5File(path: path, id: id)
            f.checksummed = checksummed
            return f
        }
    }

    /// Data chunks carry a Fletcher-32 checksum (files made by `create(_:checksummed: true)`).
    public private(set) var checksummed = false
    /// Rows per chunk of a checksummed dataset made without `chunkRows` (4 MB of float32).
    public static let checksumChunkRows = 1 << 20

    /// Opens an existing file; a missing file, a non-HDF5 file or a truncated one is an InputError.
    public static func open(_ path: String, writable: Bool = false) throws -> HDF5File {
        try locked {
            try checkInputFile(path, what: "HDF5 file")
            if H5Fis_hdf5(path) <= 0 { throw InputError(path, "not an HDF5 file (or its header is damaged)") }
            let id = H5Fopen(path, writable ? tar_h5f_acc_rdwr() : tar_h5f_acc_rdonly(), tar_h5p_default())
            guard id >= 0 else { throw InputError(path, "cannot open HDF5 file (truncated or damaged?)") }
            let f = HDF5File(path: path, id: id)
            var eoa: haddr_t = 0
            if H5Fget_eoa(id, &eoa) >= 0, Int64(eoa) > f.sizeAtOpen {
                throw InputError(path, "truncated: \(f.sizeAtOpen) bytes, but its HDF5 structure needs \(eoa)")
            }
            return f
        }
    }

    public func has(_ name: String) -> Bool {
        HDF5File.locked { H5Lexists(id, name, tar_h5p_default()) > 0 }
    }

    public func flush() throws {
        try HDF5File.locked {
            if H5Fflush(id, H5F_SCOPE_GLOBAL) < 0 { throw InputError(path, "flush failed (disk full?)") }
        }
    }

    // MARK: datasets

    /// Creates a dataset of `shape`, chunked by `chunkRows` rows of the first axis when given. In a
    /// checksummed file every non-empty dataset is chunked and each chunk carries a checksum.
    public func createDataset(_ name: String, kind: HDF5Kind, shape: [Int], chunkRows: Int? = nil) throws {
        try HDF5File.locked {
            var dims = shape.map { hsize_t($0) }
            let space = H5Screate_simple(Int32(dims.count), &dims, nil)
            defer { H5Sclose(space) }
            let plist = H5Pcreate(tar_h5p_dataset_create())
            defer { H5Pclose(plist) }
            if let rows = chunkRows ?? (checksummed ? HDF5File.checksumChunkRows : nil), !shape.isEmpty, shape[0] > 0 {
                var chunk = dims
                chunk[0] = hsize_t(max(1, min(rows, shape[0])))
                H5Pset_chunk(plist, Int32(chunk.count), &chunk)
                if checksummed { H5Pset_fletcher32(plist) }
            }
            let ds = H5Dcreate2(id, name, fileType(kind), space, tar_h5p_default(), plist, tar_h5p_default())
            guard ds >= 0 else { throw InputError(path, "cannot create dataset '\(name)'") }
            H5Dclose(ds)
        }
    }

    /// Writes rows [start, start + rows) of the first axis from raw memory of `kind`.
    /// Opens dataset `name` and selects rows [start, start + rows) of its first axis; `body` gets
    /// the dataset, the memory space and the file space (the shared part of row reads and writes).
    private func withRows(_ name: String, start: Int, rows: Int, _ body: (hid_t, hid_t, hid_t) throws -> Void) throws {
        try HDF5File.locked {
            let ds = H5Dopen2(id, name, tar_h5p_default())
            guard ds >= 0 else { throw InputError(path, "no dataset '\(name)'") }
            defer { H5Dclose(ds) }
            let (fspace, dims) = try dataspace(ds, name)
            defer { H5Sclose(fspace) }
            guard !dims.isEmpty, start >= 0, start + rows <= Int(dims[0]) else {
                throw InputError(path, "rows \(start)..<\(start + rows) outside dataset '\(name)' of shape \(dims)")
            }
            var off = [hsize_t](repeating: 0, count: dims.count)
            off[0] = hsize_t(start)
            var cnt = dims
            cnt[0] = hsize_t(rows)
            H5Sselect_hyperslab(fspace, H5S_SELECT_SET, &off, nil, &cnt, nil)
            let mspace = H5Screate_simple(Int32(cnt.count), &cnt, nil)
            defer { H5Sclose(mspace) }
            try body(ds, mspace, fspace)
        }
    }

    public func writeRows(_ name: String, kind: HDF5Kind, start: Int, rows: Int, from data: UnsafeRawPointer) throws {
        try withRows(name, start: start, rows: rows) { ds, mspace, fspace in
            if H5Dwrite(ds, nativeType(kind), mspace, fspace, tar_h5p_default(), data) < 0 {
                throw InputError(path, "writing dataset '\(name)' failed (disk full?)")
            }
        }
    }

    /// Creates and writes a whole dataset in one call.
    public func write<T: HDF5Scalar>(_ name: String, _ values: [T], shape: [Int], chunkRows: Int? = nil) throws {
        precondition(shape.reduce(1, *) == values.count, "shape \(shape) does not match \(values.count) values")
        try createDataset(name, kind: T.hdf5Kind, shape: shape, chunkRows: chunkRows)
        if values.isEmpty { return }
        try values.withUnsafeBytes {
            try writeRows(name, kind: T.hdf5Kind, start: 0, rows: shape.first ?? 1, from: $0.baseAddress!)
        }
    }

    /// Writes raw memory as a 1-D float32 dataset (checkpoint slices).
    public func write(_ name: String, floats: UnsafePointer<Float>, count: Int) throws {
        try createDataset(name, kind: .float32, shape: [count])
        if count > 0 { try writeRows(name, kind: .float32, start: 0, rows: count, from: floats) }
    }

    public func shape(of name: String) throws -> [Int] {
        try HDF5File.locked {
            let ds = H5Dopen2(id, name, tar_h5p_default())
            guard ds >= 0 else { throw InputError(path, "no dataset '\(name)'") }
            defer { H5Dclose(ds) }
            let (space, dims) = try dataspace(ds, name)
            H5Sclose(space)
            return dims.map { Int($0) }
        }
    }

    public func storedType(of name: String) throws -> HDF5StoredType {
        try HDF5File.locked {
            let ds = H5Dopen2(id, name, tar_h5p_default())
            guard ds >= 0 else { throw InputError(path, "no dataset '\(name)'") }
            defer { H5Dclose(ds) }
            let t = H5Dget_type(ds)
            defer { H5Tclose(t) }
            let cls = H5Tget_class(t)
            let signed = cls == H5T_INTEGER ? H5Tget_sign(t) == H5T_SGN_2 : true
            return HDF5StoredType(isFloat: cls == H5T_FLOAT, isSigned: signed, bytes: Int(H5Tget_size(t)))
        }
    }

    /// Reads rows [start, start + rows) of the first axis into raw memory, converting to `kind`.
    public func readRows(
        _ name: String, kind: HDF5Kind, start: Int, rows: Int, into out: UnsafeMutableRawPointer
    ) throws {
        try checkNotTruncated()
        try withRows(name, start: start, rows: rows) { ds, mspace, fspace in
            if H5Dread(ds, nativeType(kind), mspace, fspace, tar_h5p_default(), out) < 0 {
                throw InputError(path, "reading dataset '\(name)' failed (file truncated or damaged?)")
            }
        }
    }

    /// Reads the block `offset ..< offset + count` (one entry per axis) into raw memory, converting
    /// to `kind`; e.g. one token row `codes[i, a, :]` is offset [i, a, 0], count [1, 1, T].
    public func readSlab(
        _ name: String, kind: HDF5Kind, offset: [Int], count: [Int], into out: UnsafeMutableRawPointer
    ) throws {
        try checkNotTruncated()
        try HDF5File.locked {
            let ds = H5Dopen2(id, name, tar_h5p_default())
            guard ds >= 0 else { throw InputError(path, "no dataset '\(name)'") }
            defer { H5Dclose(ds) }
            let (fspace, dims) = try dataspace(ds, name)
            defer { H5Sclose(fspace) }
            let inside =
                offset.count == dims.count && count.count == dims.count
                && zip(zip(offset, count), dims).allSatisfy { oc, d in oc.0 >= 0 && oc.1 >= 0 && oc.0 + oc.1 <= Int(d) }
            guard inside else {
                throw InputError(path, "block at \(offset) of size \(count) outside dataset '\(name)' of shape \(dims)")
            }
            if count.contains(0) { return }
            var off = offset.map { hsize_t($0) }
            var cnt = count.map { hsize_t($0) }
            H5Sselect_hyperslab(fspace, H5S_SELECT_SET, &off, nil, &cnt, nil)
            let mspace = H5Screate_simple(Int32(cnt.count), &cnt, nil)
            defer { H5Sclose(mspace) }
            if H5Dread(ds, nativeType(kind), mspace, fspace, tar_h5p_default(), out) < 0 {
                throw InputError(path, "reading dataset '\(name)' failed (file truncated or damaged?)")
            }
        }
    }

    /// Reads a whole dataset, converted to T.
    public func read<T: HDF5Scalar & Numeric>(_ name: String, as: T.Type = T.self) throws -> (values: [T], shape: [Int])
    {
        let shape = try shape(of: name)
        let n = shape.reduce(1, *)
        var out = [T](repeating: 0, count: n)
        if n > 0 {
            try out.withUnsafeMutableBytes {
                try readRows(name, kind: T.hdf5Kind, start: 0, rows: shape.first ?? 1, into: $0.baseAddress!)
            }
        }
        return (out, shape)
    }

    private func dataspace(_ ds: hid_t, _ name: String) throws -> (hid_t, [hsize_t]) {
        let space = H5Dget_space(ds)
        guard space >= 0 else { throw InputError(path, "dataset '\(name)' has no readable dataspace") }
        let rank = Int(H5Sget_simple_extent_ndims(space))
        var dims = [hsize_t](repeating: 0, count: max(rank, 0))
        if rank > 0 { H5Sget_simple_extent_dims(space, &dims, nil) }
        return (space, dims)
    }

    // MARK: attributes (on the file root, or on a dataset when `on` is given)

    private func withObject<T>(_ on: String?, _ body: (hid_t) throws -> T) throws -> T {
        guard let on else { return try body(id) }
        let obj = H5Oopen(id, on, tar_h5p_default())
        guard obj >= 0 else { throw InputError(path, "no object '\(on)'") }
        defer { H5Oclose(obj) }
        return try body(obj)
    }

    public func setAttribute(_ name: String, int value: Int, on: String? = nil) throws {
        try HDF5File.locked {
            try withObject(on) { obj in
                if H5Aexists(obj, name) > 0 { H5Adelete(obj, name) }
                let space = H5Screate(H5S_SCALAR)
                defer { H5Sclose(space) }
                let a = H5Acreate2(obj, name, tar_h5t_std_i64le(), space, tar_h5p_default(), tar_h5p_default())
                guard a >= 0 else { throw InputError(path, "cannot write attribute '\(name)'") }
                defer { H5Aclose(a) }
                var v = Int64(value)
                H5Awrite(a, tar_h5t_native_int64(), &v)
            }
        }
    }

    public func setAttribute(_ name: String, string value: String, on: String? = nil) throws {
        try HDF5File.locked {
            try withObject(on) { obj in
                if H5Aexists(obj, name) > 0 { H5Adelete(obj, name) }
                let t = H5Tcopy(tar_h5t_c_s1())
                defer { H5Tclose(t) }
                let bytes = Array(value.utf8)
                H5Tset_size(t, max(1, bytes.count))
                let space = H5Screate(H5S_SCALAR)
                defer { H5Sclose(space) }
                let a = H5Acreate2(obj, name, t, space, tar_h5p_default(), tar_h5p_default())
                guard a >= 0 else { throw InputError(path, "cannot write attribute '\(name)'") }
                defer { H5Aclose(a) }
                var buf = bytes.isEmpty ? [UInt8(0)] : bytes
                H5Awrite(a, t, &buf)
            }
        }
    }

    public func hasAttribute(_ name: String, on: String? = nil) -> Bool {
        (try? HDF5File.locked { try withObject(on) { H5Aexists($0, name) > 0 } }) ?? false
    }

    public func intAttribute(_ name: String, on: String? = nil) throws -> Int {
        try HDF5File.locked {
            try withObject(on) { obj in
                guard H5Aexists(obj, name) > 0 else { throw InputError(path, "missing attribute '\(name)'") }
                let a = H5Aopen(obj, name, tar_h5p_default())
                guard a >= 0 else { throw InputError(path, "cannot open attribute '\(name)'") }
                defer { H5Aclose(a) }
                var v: Int64 = 0
                if H5Aread(a, tar_h5t_native_int64(), &v) < 0 {
                    throw InputError(path, "attribute '\(name)' is not an integer")
                }
                return Int(v)
            }
        }
    }

    public func stringAttribute(_ name: String, on: String? = nil) throws -> String {
        try HDF5File.locked {
            try withObject(on) { obj in
                guard H5Aexists(obj, name) > 0 else { throw InputError(path, "missing attribute '\(name)'") }
                let a = H5Aopen(obj, name, tar_h5p_default())
                guard a >= 0 else { throw InputError(path, "cannot open attribute '\(name)'") }
                defer { H5Aclose(a) }
                let t = H5Aget_type(a)
                defer { H5Tclose(t) }
                guard H5Tget_class(t) == H5T_STRING else {
                    throw InputError(path, "attribute '\(name)' is not a string")
                }
                let n = Int(H5Tget_size(t))
                var buf = [UInt8](repeating: 0, count: n + 1)
                H5Aread(a, t, &buf)
                return String(decoding: buf.prefix { $0 != 0 }, as: UTF8.self)
            }
        }
    }
}
