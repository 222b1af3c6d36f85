import Foundation
import Kernels
import Platform

/// A safetensors file: 8-byte little-endian header length, JSON header, raw little-endian data.
/// Errors name the file and the problem (truncated, not safetensors, bad header).
public struct Safetensors {
    public struct Tensor {
        public let dtype: String
        public let shape: [Int]
        public let data: Data  // raw bytes, little-endian
        public var count: Int { shape.reduce(1, *) }
        public init(dtype: String, shape: [Int], data: Data) {
            self.dtype = dtype
            self.shape = shape
            self.data = data
        }
        public init(floats: [Float], shape: [Int]) {
            self.init(dtype: "F32", shape: shape, data: floats.withUnsafeBufferPointer { Data(buffer: $0) })
        }
        public init(ints: [Int32], shape: [Int]) {
            self.init(dtype: "I32", shape: shape, data: ints.withUnsafeBufferPointer { Data(buffer: $0) })
        }
    }
    public var tensors: [String: Tensor] = [:]
    public var metadata: [String: String] = [:]
    public let path: String

    public init(path: String = "") { self.path = path }

    static let elementSize: [String: Int] = [
        "F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I64": 8, "U16": 2, "U8": 1, "I8": 1, "F64": 8,
    ]

    public static func read(_ path: String) throws -> Safetensors {
        try checkInputFile(path, what: "safetensors file")
        let data: Data
        do { data = try Data(contentsOf: URL(fileURLWithPath: path), options: .alwaysMapped) } catch {
            throw InputError(path, "cannot read: \(error.localizedDescription)")
        }
        guard data.count >= 8 else {
            throw InputError(path, "not a safetensors file: only \(data.count) bytes (truncated?)")
        }
        let n = data.prefix(8).enumerated().reduce(UInt64(0)) { $0 | (UInt64($1.element) << (8 * UInt64($1.offset))) }
        guard n > 1, n < 100_000_000, 8 + Int(n) <= data.count else {
            throw InputError(
                path,
                "not a safetensors file: header length \(n) does not fit in \(data.count) bytes "
                    + "(truncated or another format?)")
        }
        let headerBytes = data.subdata(in: 8..<(8 + Int(n)))
        let parsed = try? JSONSerialization.jsonObject(with: headerBytes, options: [.fragmentsAllowed])
        guard let header = parsed as? [String: Any] else {
            throw InputError(path, "not a safetensors file: the header is not a JSON object")
        }
        var st = Safetensors(path: path)
        let body = 8 + Int(n)
        var extents: [(name: String, range: Range<Int>)] = []
        for (name, value) in header {
            if name == "__metadata__" {
                guard let meta = value as? [String: Any] else {
                    throw InputError(path, "__metadata__ is not a JSON object of strings")
                }
                for (k, v) in meta { st.metadata[k] = "\(v)" }
                continue
            }
            let entry = try headerEntry(name, value, path: path, dataBytes: data.count - body)
            extents.append((name, entry.range))
            let bytes = data.subdata(in: (body + entry.range.lowerBound)..<(body + entry.range.upperBound))
            st.tensors[name] = Tensor(dtype: entry.dtype, shape: entry.shape, data: bytes)
        }
        try checkNoOverlap(extents, path: path)
        return st
    }

    /// One tensor's header entry, checked: a known dtype, a shape of non-negative sizes whose byte
    /// count does not overflow, and offsets [begin, end) in order, inside the data, of that size.
    static func headerEntry(
        _ name: String, _ value: Any, path: String,
        dataBytes: Int
    ) throws -> (dtype: String, shape: [Int], range: Range<Int>) {
        guard let d = value as? [String: Any], let dtype = d["dtype"] as? String,
            let shape = d["shape"] as? [Int], let offs = d["data_offsets"] as? [Int], offs.count == 2
        else {
            throw InputError(path, "tensor '\(name)': malformed header entry (needs dtype, shape and two data_offsets)")
        }
        guard let es = elementSize[dtype] else {
            throw InputError(path, "tensor '\(name)': unsupported dtype \(dtype)")
        }
        guard shape.allSatisfy({ $0 >= 0 }) else {
            throw InputError(path, "tensor '\(name)': shape \(shape) has a negative size")
        }
        var bytes = es
        for s in shape {
            let (p, overflow) = bytes.multipliedReportingOverflow(by: s)
            guard !overflow, p <= dataBytes else {
                throw InputError(
                    path,
                    "tensor '\(name)': shape \(shape) x \(dtype) is larger than the file's data "
                        + "(\(dataBytes) bytes)")
            }
            bytes = p
        }
        guard offs[0] >= 0, offs[0] <= offs[1], offs[1] <= dataBytes else {
            throw InputError(
                path,
                "tensor '\(name)': data_offsets \(offs) are not an in-order range inside the "
                    + "\(dataBytes) bytes of data (truncated or damaged?)")
        }
        guard offs[1] - offs[0] == bytes else {
            throw InputError(
                path,
                "tensor '\(name)': data_offsets \(offs) hold \(offs[1] - offs[0]) bytes but shape "
                    + "\(shape) x \(dtype) needs \(bytes)")
        }
        return (dtype, shape, offs[0]..<offs[1])
    }

    /// Tensors' data may not share bytes (a damaged or hostile header).
    static func checkNoOverlap(_ extents: [(name: String, range: Range<Int>)], path: String) throws {
        let sorted = extents.filter { !$0.range.isEmpty }.sorted { $0.range.lowerBound < $1.range.lowerBound }
        for (a, b) in zip(sorted, sorted.dropFirst()) where b.range.lowerBound < a.range.upperBound {
            throw InputError(path, "tensors '\(a.name)' \(a.range) and '\(b.name)' \(b.range) overlap in the data")
        }
    }

    public func write(to path: String) throws {
        let names = tensors.keys.sorted()
        try Safetensors.write(
            to: path,
            names.map {
                (name: $0, dtype: tensors[$0]!.dtype, shape: tensors[$0]!.shape, byteCount: tensors[$0]!.data.count)
            },
            metadata: metadata
        ) { i, out in try out.write(contentsOf: tensors[names[i]]!.data) }
    }

    /// Writes a safetensors file tensor by tensor (in the order given, which should be sorted by
    /// name), through a temporary file renamed at the end. `body(i, handle)` writes tensor i's
    /// `byteCount` bytes, so large models are written straight from memory without a copy.
    public static func write(
        to path: String, _ entries: [(name: String, dtype: String, shape: [Int], byteCount: Int)],
        metadata: [String: String],
        body: (Int, FileHandle) throws -> Void
    ) throws {
        var header: [String: Any] = [:]
        var offset = 0
        for e in entries {
            header[e.name] = ["dtype": e.dtype, "shape": e.shape, "data_offsets": [offset, offset + e.byteCount]]
            offset += e.byteCount
        }
        if !metadata.isEmpty { header["__metadata__"] = metadata }
        var json = try JSONSerialization.data(withJSONObject: header, options: [.sortedKeys])
        while json.count % 8 != 0 { json.append(0x20) }
        var n = UInt64(json.count).littleEndian
        try checkOutputFile(path, what: "safetensors file")
        let tmp = path + ".tmp"
        do {
            guard FileManager.default.createFile(atPath: tmp, contents: nil),
                let out = FileHandle(forWritingAtPath: tmp)
            else {
                throw CocoaError(.fileWriteNoPermission, userInfo: [NSFilePathErrorKey: tmp])
            }
            defer { try? out.close() }
            try out.write(contentsOf: Data(bytes: &n, count: 8))
            try out.write(contentsOf: json)
            for i in entries.indices { try body(i, out) }
            try out.close()
        } catch {
            try? FileManager.default.removeItem(atPath: tmp)
            throw InputError(path, "cannot write: \(error.localizedDescription)")
        }
        try replaceFile(path, with: tmp)
    }

    /// The tensor as Float32 (F32, F16 and BF16 are converted).
    public func floats(_ name: String) throws -> [Float] {
        guard let t = tensors[name] else { throw InputError(path, "missing tensor '\(name)'") }
        return try t.data.withUnsafeBytes { raw -> [Float] in
            switch t.dtype {
            case "F32": return Array(raw.bindMemory(to: Float.self))
            case "F64": return raw.bindMemory(to: Double.self).map { Float($0) }
            case "F16": return raw.bindMemory(to: UInt16.self).map { Float(Float16(bitPattern: $0)) }
            case "BF16": return raw.bindMemory(to: UInt16.self).map { Float(bitPattern: UInt32($0) << 16) }
            default: throw InputError(path, "tensor '\(name)' has dtype \(t.dtype), expected a float type")
            }
        }
    }

    public func ints(_ name: String) throws -> [Int32] {
        guard let t = tensors[name] else { throw InputError(path, "missing tensor '\(name)'") }
        return try t.data.withUnsafeBytes { raw -> [Int32] in
            switch t.dtype {
            case "I32": return Array(raw.bindMemory(to: Int32.self))
            case "I64": return raw.bindMemory(to: Int64.self).map { Int32($0) }
            default: throw InputError(path, "tensor '\(name)' has dtype \(t.dtype), expected an integer type")
            }
        }
    }
}

// MARK: - the model's weights exchange (SPEC section 7)

extension Transformer {
    /// Loads weights. The model shape comes from the `tensorar.config` metadata, or from
    /// `fallback` (a preset or flags) when the file has none (a converted LlamaGen checkpoint).
    /// Every tensor is checked against the config; extra tensors are an error too.
    public static func load(_ path: String, fallback: ModelConfig? = nil, ignoring: [String] = []) throws -> Transformer
    {
        let st = try Safetensors.read(path)
        let config: ModelConfig
        if let json = st.metadata["tensorar.config"] {
            do { config = try JSONDecoder().decode(ModelConfig.self, from: Data(json.utf8)) } catch {
                throw InputError(path, "metadata tensorar.config is not a valid model config: \(error)")
            }
        } else if let fallback {
            config = fallback
        } else {
            throw InputError(
                path, "no tensorar.config metadata: give the model shape with --preset NAME (or the shape flags)")
        }
        try config.validate(source: "\(path) (tensorar.config)")
        // Before allocating: a config asking for far more parameters than the file holds (more
        // than 256 MB of them) is an error, not an allocation of that size; smaller shortfalls get
        // loadWeights' message naming the missing tensor.
        let need = ParameterTable(config).total
        let held = st.tensors.values.reduce(0) { $0 + $1.data.count / max(1, Safetensors.elementSize[$1.dtype] ?? 1) }
        if need > max(held, 1 << 26) {
            throw InputError(
                path,
                "the model config asks for \(need) parameters but the file holds only "
                    + "\(held) values "
                    + "(tensorar.config or the shape flags do not fit this file)")
        }
        let model = try Transformer(config: config)
        try model.loadWeights(st, ignoring: ignoring)
        return model
    }

    /// Copies the file's tensors into the parameters; names and shapes must match the table.
    /// Tensors whose names start with one of `ignoring` are skipped (test fixtures carry inputs).
    public func loadWeights(_ st: Safetensors, allowMissingPlugin: Bool = false, ignoring: [String] = []) throws {
        for e in table.entries {
            guard let t = st.tensors[e.name] else {
                if allowMissingPlugin && e.group == .plugin { continue }
                throw InputError(
                    st.path, "missing tensor '\(e.name)' (expected shape \(e.shape) for config \(config.jsonString()))")
            }
            guard t.shape == e.shape else {
                throw InputError(st.path, "tensor '\(e.name)' has shape \(t.shape) but the config needs \(e.shape)")
            }
            let v = try st.floats(e.name)
            if let bad = v.firstIndex(where: { !$0.isFinite }) {
                throw InputError(
                    st.path,
                    "tensor '\(e.name)' holds a non-finite value (\(v[bad])) at element \(bad): "
                        + "such weights cannot train or sample")
            }
            (params.base + e.offset).update(from: v, count: e.count)
        }
        let known = Set(table.entries.map(\.name))
        let unexpected = st.tensors.keys.filter { name in
            !known.contains(name) && !ignoring.contains { name.hasPrefix($0) }
        }
        if let name = unexpected.sorted().first {
            let hint =
                name.hasPrefix("tensorar.")
                ? " (the file has a plug-in: its tensorar.config must say window and plugin_depth)" : ""
            throw InputError(
                st.path, "unexpected tensor '\(name)' not in the model of config \(config.jsonString())\(hint)")
        }
    }

    /// Writes the weights as float32 safetensors with the SPEC names and `tensorar.config`.
    public func save(_ path: String, extraMetadata: [String: String] = [:]) throws {
        var metadata = extraMetadata
        metadata["tensorar.config"] = config.jsonString()
        metadata["format"] = "pt"
        // Straight from the parameter buffer: no copy of the weights (for a 140M model that was
        // 1.1 GB more at the end of a run).
        let entries = table.entries.sorted { $0.name < $1.name }
        try Safetensors.write(
            to: path, entries.map { (name: $0.name, dtype: "F32", shape: $0.shape, byteCount: $0.count * 4) },
            metadata: metadata
        ) { i, out in
            let e = entries[i]
            try out.write(contentsOf: Data(bytesNoCopy: params.base + e.offset, count: e.count * 4, deallocator: .none))
        }
    }
}
