import Crypto
import Foundation
import Platform

/// SHA-256 of the cache's shard files (SPEC 7), through swift-crypto (BoringSSL's implementation,
/// with the CPU's SHA instructions where it has them). The same small interface the hand-written
/// version had: streaming `update`/`finalize`, hex digests of bytes and of whole files.
public struct SHA256 {
    private var state = Crypto.SHA256()

    public init() {}

    public mutating func update<D: Collection>(_ bytes: D) where D.Element == UInt8 {
        if let data = bytes as? Data {
            state.update(data: data)
            return
        }
        state.update(data: Array(bytes))
    }

    /// The 32-byte digest (the state is consumed: call once).
    public mutating func finalize() -> [UInt8] { Array(state.finalize()) }

    public static func hex(_ digest: [UInt8]) -> String { digest.map { String(format: "%02x", $0) }.joined() }

    public static func hash<D: Collection>(_ bytes: D) -> String where D.Element == UInt8 {
        var s = SHA256()
        s.update(bytes)
        return hex(s.finalize())
    }

    /// Hex digest of a whole file, read in 4 MiB pieces.
    public static func hash(file path: String) throws -> String {
        guard let fh = FileHandle(forReadingAtPath: path) else {
            throw InputError(path, "cannot open file to compute its sha256")
        }
        defer { try? fh.close() }
        var s = SHA256()
        while true {
            let chunk: Data
            do { chunk = try fh.read(upToCount: 4 << 20) ?? Data() } catch {
                throw InputError(path, "read failed while computing sha256: \(error.localizedDescription)")
            }
            if chunk.isEmpty { break }
            s.state.update(data: chunk)
        }
        return hex(s.finalize())
    }
}
