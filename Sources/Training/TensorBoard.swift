import ARModel
import Foundation
import Platform
import TokenData

// TensorBoard event files, written directly: `events.out.tfevents.<time>.<host>.<pid>.tensorar`
// is a sequence of TFRecords, each
//     uint64 length (little-endian), uint32 masked CRC-32C of those 8 bytes,
//     `length` bytes of a serialized tensorflow.Event, uint32 masked CRC-32C of them,
// where masked(crc) = ((crc >> 15) | (crc << 17)) + 0xa282ead8. The first Event holds
// file_version "brain.Event:2"; the others a Summary of scalars or of one PNG image.
// The messages are small and fixed, so they are encoded here (protobuf wire format: varint
// keys, fixed64 doubles, fixed32 floats, length-delimited strings and messages) rather than
// through generated swift-protobuf code; the test reads the files back with the tensorboard
// Python package's own event reader.

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as TFRecord uses it.
public enum CRC32C {
    static let table: [UInt32] = (0..<256).map { n -> UInt32 in
        var c = UInt32(n)
        for _ in 0..<8 { c = c & 1 != 0 ? 0x82F6_3B78 ^ (c >> 1) : c >> 1 }
        return c
    }

    public static func checksum(_ bytes: Data) -> UInt32 {
        var c: UInt32 = 0xFFFF_FFFF
        for b in bytes { c = table[Int((c ^ UInt32(b)) & 0xFF)] ^ (c >> 8) }
        return c ^ 0xFFFF_FFFF
    }

    /// TFRecord's masked form.
    public static func masked(_ bytes: Data) -> UInt32 {
        let c = checksum(bytes)
        return ((c >> 15) | (c << 17)) &+ 0xA282_EAD8
    }
}

/// Protobuf wire-format fields, appended to `data`.
struct ProtoMessage {
    var data = Data()

    mutating func varint(_ v: UInt64) {
        var v = v
        while v >= 0x80 {
            data.append(UInt8(v & 0x7F) | 0x80)
            v >>= 7
        }
        data.append(UInt8(v))
    }

    mutating func key(_ field: Int, _ wireType: UInt64) { varint(UInt64(field) << 3 | wireType) }

    mutating func int(_ field: Int, _ v: Int) {
        key(field, 0)
        varint(UInt64(bitPattern: Int64(v)))
    }

    mutating func double(_ field: Int, _ v: Double) {
        key(field, 1)
        withUnsafeBytes(of: v.bitPattern.littleEndian) { data.append(contentsOf: $0) }
    }

    mutating func float(_ field: Int, _ v: Float) {
        key(field, 5)
        withUnsafeBytes(of: v.bitPattern.littleEndian) { data.append(contentsOf: $0) }
    }

    mutating func bytes(_ field: Int, _ v: Data) {
        key(field, 2)
        varint(UInt64(v.count))
        data.append(v)
    }

    mutating func string(_ field: Int, _ v: String) { bytes(field, Data(v.utf8)) }
}

/// One run's event file (rank 0 only). Each record is written through at once.
public final class TensorBoardWriter {
    public let path: String
    private let handle: FileHandle

    /// Creates `<directory>/events.out.tfevents...` (a new file per start; TensorBoard reads every
    /// file of the folder in order).
    public init(directory: String) throws {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let now = Date().timeIntervalSince1970
        let host = ProcessInfo.processInfo.hostName
        let name = "events.out.tfevents.\(Int(now)).\(host).\(getpid()).tensorar"
        path = (directory as NSString).appendingPathComponent(name)
        guard FileManager.default.createFile(atPath: path, contents: nil),
            let h = FileHandle(forWritingAtPath: path)
        else {
            throw InputError(path, "cannot create the TensorBoard event file")
        }
        handle = h
        var e = ProtoMessage()
        e.double(1, now)
        e.string(3, "brain.Event:2")
        try write(e.data)
    }

    deinit { try? handle.close() }

    /// One Event with a Summary of scalar values (tag -> value) at `step`.
    public func scalars(step: Int, _ values: [(String, Double)]) throws {
        var summary = ProtoMessage()
        for (tag, v) in values {
            var value = ProtoMessage()
            value.string(1, tag)
            value.float(2, Float(v))
            summary.bytes(1, value.data)
        }
        try event(step: step, summary: summary.data)
    }

    /// One Event with a PNG image.
    public func image(step: Int, tag: String, png: Data, width: Int, height: Int, channels: Int) throws {
        var image = ProtoMessage()
        image.int(1, height)
        image.int(2, width)
        image.int(3, channels)
        image.bytes(4, png)
        var value = ProtoMessage()
        value.string(1, tag)
        value.bytes(4, image.data)
        var summary = ProtoMessage()
        summary.bytes(1, value.data)
        try event(step: step, summary: summary.data)
    }

    private func event(step: Int, summary: Data) throws {
        var e = ProtoMessage()
        e.double(1, Date().timeIntervalSince1970)
        e.int(2, step)
        e.bytes(5, summary)
        try write(e.data)
    }

    /// One TFRecord.
    private func write(_ payload: Data) throws {
        var record = Data()
        let length = Data(withUnsafeBytes(of: UInt64(payload.count).littleEndian) { Array($0) })
        record.append(length)
        withUnsafeBytes(of: CRC32C.masked(length).littleEndian) { record.append(contentsOf: $0) }
        record.append(payload)
        withUnsafeBytes(of: CRC32C.masked(payload).littleEndian) { record.append(contentsOf: $0) }
        do { try handle.write(contentsOf: record) } catch {
            throw InputError(path, "cannot write the TensorBoard event file (\(error.localizedDescription))")
        }
    }
}

extension MetricsLog {
    /// The numbers of a metrics record as TensorBoard scalars: each number under its key, each
    /// list as key/0, key/1, ... (`step` is the event's step; strings and flags are left out).
    static func scalars(_ fields: KeyValuePairs<String, MetricValue>) -> (step: Int?, values: [(String, Double)]) {
        scalars(fields.map { (key: $0.key, value: $0.value) })
    }

    /// The same for fields built up in order.
    static func scalars(_ fields: [(key: String, value: MetricValue)]) -> (step: Int?, values: [(String, Double)]) {
        var step: Int?
        var values: [(String, Double)] = []
        for (key, value) in fields {
            switch value {
            case .int(let v) where key == "step": step = v
            case .int(let v): values.append((key, Double(v)))
            case .double(let v): values.append((key, v))
            case .doubles(let vs): values += vs.enumerated().map { ("\(key)/\($0.offset)", $0.element) }
            default: continue
            }
        }
        return (step, values)
    }
}

/// Greedy samples (top-k 1), one per label, decoded through the cache's codebook and put side by
/// side: the picture TensorBoard shows at each validation. Returns a PNG and its size.
public func greedySampleStrip(
    model: Transformer, codebook: Codebook, labels: [Int32]
) throws
    -> (png: Data, width: Int, height: Int, channels: Int)
{
    let c = model.config
    let result = Sampler(model: model).sample(
        labels: labels, sampleIds: Array(labels.indices),
        options: SamplingOptions(topK: 1))
    let (h, w, ch) = (codebook.imageH, codebook.imageW, codebook.channels)
    let n = labels.count
    var pixels = [UInt8](repeating: 0, count: h * w * n * ch)
    for i in 0..<n {
        let tokens = Array(result.tokens[(i * c.seqLen)..<((i + 1) * c.seqLen)])
        let image = codebook.decode(tokens: tokens, gridH: c.gridSize, gridW: c.gridSize)
        for y in 0..<h {
            for x in 0..<(w * ch) {
                pixels[(y * n * w + i * w) * ch + x] = UInt8((image[y * w * ch + x] * 255).rounded())
            }
        }
    }
    return (try pngData(pixels: pixels, width: n * w, height: h, channels: ch), n * w, h, ch)
}
