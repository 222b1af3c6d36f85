import Foundation
import Platform

/// The `tensorar.config` of a safetensors file, read from its header only (nil when it has none).
public func recordedModelConfig(_ path: String) throws -> ModelConfig? {
    switch pathKind(path) {
    case .missing: throw InputError(path, "no such file")
    case .folder: throw InputError(path, "is a folder; expected a safetensors file")
    case .file: break
    }
    guard let fh = FileHandle(forReadingAtPath: path) else { throw InputError(path, "cannot be opened for reading") }
    defer { try? fh.close() }
    let head = fh.readData(ofLength: 8)
    guard head.count == 8 else { throw InputError(path, "too short for a safetensors file") }
    let length = head.withUnsafeBytes { $0.loadUnaligned(as: UInt64.self).littleEndian }
    guard length <= 100_000_000 else {
        throw InputError(path, "safetensors header of \(length) bytes: not a safetensors file")
    }
    let json = fh.readData(ofLength: Int(length))
    guard json.count == Int(length),
        let header = try? JSONSerialization.jsonObject(with: json) as? [String: Any]
    else {
        throw InputError(path, "unreadable safetensors header")
    }
    guard let meta = header["__metadata__"] as? [String: Any], let text = meta["tensorar.config"] as? String else {
        return nil
    }
    do { return try JSONDecoder().decode(ModelConfig.self, from: Data(text.utf8)) } catch {
        throw InputError(path, "metadata tensorar.config is not a valid model config: \(error)")
    }
}
