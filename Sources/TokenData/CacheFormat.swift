import Foundation
import Platform

// The token cache on disk (SPEC 7): a folder with `dataset.json` and `shard-NNNNN.h5` files, each
// shard holding `codes` [N, A, T] (uint16, or int32 when V > 65535, chunked by rows) and
// `labels` int32 [N], with the dataset facts repeated as file attributes. Optional `codebook.h5`.

/// One shard as listed in dataset.json.
public struct ShardInfo: Codable, Equatable, Sendable {
    public var file: String
    public var numSamples: Int
    public var sha256: String

    public init(file: String, numSamples: Int, sha256: String) {
        self.file = file
        self.numSamples = numSamples
        self.sha256 = sha256
    }
    enum CodingKeys: String, CodingKey {
        case file
        case numSamples = "num_samples"
        case sha256
    }
}

/// The cache's `dataset.json` (snake_case keys on disk).
public struct CacheInfo: Codable, Equatable, Sendable {
    public static let currentFormatVersion = 1
    public static let fileName = "dataset.json"
    public static let codebookFileName = "codebook.h5"

    public var formatVersion: Int
    public var vocabSize: Int  // V
    public var gridH: Int
    public var gridW: Int
    public var numClasses: Int  // C (the null class C is the trainer's business, never stored)
    public var augmentations: Int  // A: views per sample (e.g. original and horizontal flip)
    public var numSamples: Int  // N, summed over shards
    public var shards: [ShardInfo]

    public init(
        vocabSize: Int, gridH: Int, gridW: Int, numClasses: Int, augmentations: Int, numSamples: Int,
        shards: [ShardInfo]
    ) {
        formatVersion = CacheInfo.currentFormatVersion
        self.vocabSize = vocabSize
        self.gridH = gridH
        self.gridW = gridW
        self.numClasses = numClasses
        self.augmentations = augmentations
        self.numSamples = numSamples
        self.shards = shards
    }

    enum CodingKeys: String, CodingKey {
        case formatVersion = "format_version"
        case vocabSize = "vocab_size"
        case gridH = "grid_h"
        case gridW = "grid_w"
        case numClasses = "num_classes"
        case augmentations
        case numSamples = "num_samples"
        case shards
    }

    /// Tokens per image, T = grid_h * grid_w.
    public var seqLen: Int { gridH * gridW }

    /// Codes are uint16 up to V = 65535 and int32 above (SPEC 7).
    public var codesKind: HDF5Kind { CacheInfo.codesKind(vocabSize: vocabSize) }
    public static func codesKind(vocabSize: Int) -> HDF5Kind { vocabSize > 65535 ? .int32 : .uint16 }

    /// The facts every shard repeats as attributes, in SPEC order (num_samples is per shard).
    func shardAttributes(numSamples n: Int) -> [(String, Int)] {
        [
            ("format_version", formatVersion), ("vocab_size", vocabSize), ("grid_h", gridH), ("grid_w", gridW),
            ("num_classes", numClasses), ("augmentations", augmentations), ("num_samples", n),
        ]
    }

    /// Checks the fields make sense on their own and together; `path` names dataset.json in errors.
    public func validate(path: String) throws {
        try validateFields(path: path)
        func bad(_ problem: String) -> InputError { InputError(path, problem) }
        guard !shards.isEmpty else { throw bad("the shard list is empty") }
        var seen = Set<String>()
        for s in shards {
            guard !s.file.isEmpty, !s.file.contains("/"), s.file != ".", s.file != ".." else {
                throw bad("shard file name '\(s.file)' must be a plain file name inside the cache folder")
            }
            guard seen.insert(s.file).inserted else { throw bad("shard '\(s.file)' is listed twice") }
            guard s.numSamples >= 1 else {
                throw bad("shard '\(s.file)' has num_samples \(s.numSamples); it must be at least 1")
            }
            guard s.sha256.count == 64, s.sha256.allSatisfy({ $0.isHexDigit }) else {
                throw bad("shard '\(s.file)' has sha256 '\(s.sha256)', not 64 hex digits")
            }
        }
        let total = shards.reduce(0) { $0 + $1.numSamples }
        guard total == numSamples else { throw bad("num_samples is \(numSamples) but the shards hold \(total)") }
    }

    /// The checks that need no shard list (the writer applies them before it has one).
    func validateFields(path: String, requireSamples: Bool = true) throws {
        func bad(_ problem: String) -> InputError { InputError(path, problem) }
        guard formatVersion == CacheInfo.currentFormatVersion else {
            throw bad(
                "format_version is \(formatVersion); this program reads format_version "
                    + "\(CacheInfo.currentFormatVersion) (SPEC 7)"
            )
        }
        var counts = [
            ("vocab_size", vocabSize), ("grid_h", gridH), ("grid_w", gridW), ("num_classes", numClasses),
            ("augmentations", augmentations),
        ]
        if requireSamples { counts.append(("num_samples", numSamples)) }
        for (name, v) in counts where v < 1 { throw bad("\(name) is \(v); it must be at least 1") }
        guard vocabSize <= Int(Int32.max) else { throw bad("vocab_size \(vocabSize) does not fit int32 codes") }
        guard numClasses <= Int(Int32.max) - 1 else { throw bad("num_classes \(numClasses) is too large") }
    }

    /// Reads and validates `directory/dataset.json`.
    public static func load(directory: String) throws -> CacheInfo {
        let path = (directory as NSString).appendingPathComponent(fileName)
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: directory, isDirectory: &isDir), isDir.boolValue else {
            throw InputError(directory, "cache folder does not exist")
        }
        guard let data = FileManager.default.contents(atPath: path) else {
            throw InputError(path, "missing: a token cache folder needs dataset.json (SPEC 7)")
        }
        let info: CacheInfo
        do { info = try JSONDecoder().decode(CacheInfo.self, from: data) } catch let e as DecodingError {
            throw InputError(path, describe(e))
        }
        try info.validate(path: path)
        return info
    }

    /// Writes `directory/dataset.json` atomically (temporary file, then rename), so a folder with
    /// a dataset.json is always a complete cache.
    public func save(directory: String) throws {
        let path = (directory as NSString).appendingPathComponent(CacheInfo.fileName)
        try validate(path: path)
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys]
        try writeAtomically(path: path, data: try enc.encode(self) + Data("\n".utf8))
    }
}

/// Writes `data` to `path` through `path.tmp` and rename(2).
func writeAtomically(path: String, data: Data) throws {
    let tmp = path + ".tmp"
    guard FileManager.default.createFile(atPath: tmp, contents: data) else {
        throw InputError(tmp, "cannot write file (missing folder, no permission or disk full?)")
    }
    try moveIntoPlace(tmp, path)
}

/// rename(2): atomically replaces `path` by the finished temporary file `tmp`.
func moveIntoPlace(_ tmp: String, _ path: String) throws {
    guard rename(tmp, path) == 0 else {
        throw InputError(path, "cannot rename \(tmp) into place: \(String(cString: strerror(errno)))")
    }
}

/// A DecodingError as one sentence a person can act on.
func describe(_ e: DecodingError) -> String {
    func at(_ path: [CodingKey]) -> String {
        path.isEmpty
            ? "the top level" : path.map { $0.intValue.map { "[\($0)]" } ?? $0.stringValue }.joined(separator: ".")
    }
    switch e {
    case .keyNotFound(let key, let ctx):
        let parent = ctx.codingPath.isEmpty ? "" : " in \(at(ctx.codingPath))"
        return "missing field '\(key.stringValue)'\(parent)"
    case .typeMismatch(_, let ctx), .valueNotFound(_, let ctx):
        return "field '\(at(ctx.codingPath))' has the wrong type (\(ctx.debugDescription))"
    case .dataCorrupted(let ctx):
        return ctx.codingPath.isEmpty
            ? "not valid JSON" : "field '\(at(ctx.codingPath))' is invalid (\(ctx.debugDescription))"
    @unknown default:
        return "cannot decode: \(e)"
    }
}
