import ARModel
import Foundation
import Kernels
import Platform

// Checkpoints (SPEC section 7):
//
//     Checkpoints/<run>/
//         latest                      "step-00001000": the newest complete checkpoint
//         step-00001000/
//             manifest.json           everything but the numbers (CheckpointManifest)
//             rank-00000-of-00002.h5  rank 0's slice [0, P/2) of params, adam_m, adam_v (and ema)
//             rank-00001-of-00002.h5  rank 1's slice [P/2, P)
//
// Every rank holds the full parameters and moments (data parallel, DDP style) but writes only
// its slice [r*P/W, (r+1)*P/W), so saving is parallel and a checkpoint is written once. Loading
// is parallel too: each rank reads the slice it now owns, from however many old shards hold it,
// and the ranks exchange slices; so a run may resume on a different number of ranks. Shards are
// checksummed HDF5 (every 4 MB chunk and the file's own structures), so a damaged shard is an
// error naming the file, never silently wrong numbers. A checkpoint exists only once complete:
// shards and manifest are written into `.step-NNNNNNNN.tmp`, synced, then the folder is renamed,
// and only then `latest` is replaced (write + rename, so it is never half-written). All ranks must
// see the same file system.

/// Where training stands; saved in the manifest and handed back on resume.
public struct TrainingProgress: Equatable, Sendable {
    /// Optimizer updates applied so far (the next update has index `step`).
    public var step: Int
    /// Training samples consumed, all ranks together.
    public var samplesSeen: Int
    /// The data order's position: `dataOffset` is the loader's position in the global sample
    /// stream (samples consumed over all epochs, all ranks), `dataEpoch` the epoch it falls in.
    public var dataEpoch: Int
    public var dataOffset: Int
    /// The run's seed. With counter-based randomness (CounterRNG keyed by seed, step, sample and
    /// purpose) this and `step` are the whole random state.
    public var seed: Int

    public init(step: Int, samplesSeen: Int, dataEpoch: Int = 0, dataOffset: Int = 0, seed: Int) {
        self.step = step
        self.samplesSeen = samplesSeen
        self.dataEpoch = dataEpoch
        self.dataOffset = dataOffset
        self.seed = seed
    }
}

/// `manifest.json`: everything about a checkpoint except the numbers.
public struct CheckpointManifest: Codable, Equatable {
    public static let currentFormatVersion = 1

    public struct GroupState: Codable, Equatable, Sendable {
        /// AdamW updates applied to the group (its bias-correction t).
        public var steps: Int
        /// Whether the group's moments are in the shards (false: it was frozen).
        public var hasMoments: Bool
        enum CodingKeys: String, CodingKey {
            case steps
            case hasMoments = "has_moments"
        }
    }
    public struct OptimizerState: Codable, Equatable, Sendable {
        public var base: GroupState
        public var plugin: GroupState
        /// The flat parameter range [moment_start, moment_end) the moments cover.
        public var momentStart: Int
        public var momentEnd: Int
        enum CodingKeys: String, CodingKey {
            case base, plugin
            case momentStart = "moment_start"
            case momentEnd = "moment_end"
        }
    }
    /// One rank's file and the flat ranges it holds.
    public struct Shard: Codable, Equatable, Sendable {
        public var file: String
        public var paramStart: Int
        public var paramEnd: Int
        public var momentStart: Int
        public var momentEnd: Int
        enum CodingKeys: String, CodingKey {
            case file
            case paramStart = "param_start"
            case paramEnd = "param_end"
            case momentStart = "moment_start"
            case momentEnd = "moment_end"
        }
    }

    public var formatVersion: Int
    /// Where training stands (`progress` gathers these five).
    public var step: Int
    public var samplesSeen: Int
    public var dataEpoch: Int
    public var dataOffset: Int
    public var seed: Int
    public var worldSize: Int
    /// Floats in the flat parameter buffer (P).
    public var parameterCount: Int
    /// The parameter table: name, shape, group, offset into the flat buffer.
    public var parameters: [ParameterEntry]
    public var optimizer: OptimizerState
    public var shards: [Shard]
    /// The model's resolved shape (the `tensorar.config` of SPEC section 7).
    public var model: ModelConfig
    /// The full resolved training config.
    public var config: TrainConfig
    public var createdAt: String
    /// true when the shards also hold `ema`, the moving average of the parameters (train.ema_decay),
    /// sliced like `params`; absent otherwise (so manifests without it stay as they were).
    public var hasEMA: Bool?

    enum CodingKeys: String, CodingKey {
        case formatVersion = "format_version"
        case step
        case samplesSeen = "samples_seen"
        case dataEpoch = "data_epoch"
        case dataOffset = "data_offset"
        case seed
        case worldSize = "world_size"
        case parameterCount = "parameter_count"
        case parameters, optimizer, shards, model, config
        case createdAt = "created_at"
        case hasEMA = "has_ema"
    }

    public var progress: TrainingProgress {
        TrainingProgress(step: step, samplesSeen: samplesSeen, dataEpoch: dataEpoch, dataOffset: dataOffset, seed: seed)
    }

    /// The manifest of a checkpoint written by `worldSize` ranks now.
    public init(
        progress: TrainingProgress, worldSize: Int, model: ModelConfig, config: TrainConfig,
        table: ParameterTable, optimizer: AdamW?, ema: Bool = false
    ) {
        hasEMA = ema ? true : nil
        formatVersion = CheckpointManifest.currentFormatVersion
        step = progress.step
        samplesSeen = progress.samplesSeen
        dataEpoch = progress.dataEpoch
        dataOffset = progress.dataOffset
        seed = progress.seed
        self.worldSize = worldSize
        parameterCount = table.total
        parameters = table.entries
        let mr = optimizer?.trainedRange ?? 0..<0
        self.optimizer = OptimizerState(
            base: GroupState(steps: optimizer?.steps.base ?? 0, hasMoments: optimizer?.hasMoments(.base) ?? false),
            plugin: GroupState(
                steps: optimizer?.steps.plugin ?? 0, hasMoments: optimizer?.hasMoments(.plugin) ?? false),
            momentStart: mr.lowerBound, momentEnd: mr.upperBound)
        shards = Shard.layout(worldSize: worldSize, count: table.total, moments: mr)
        self.model = model
        self.config = config
        createdAt = ISO8601DateFormatter().string(from: Date())
    }

    func group(_ g: ParameterGroup) -> GroupState { g == .base ? optimizer.base : optimizer.plugin }
}

/// What `CheckpointStore.load` found.
public struct LoadedCheckpoint {
    public let directory: String
    public let manifest: CheckpointManifest
    /// Things worth a log line (e.g. a group whose moments start from zero).
    public let notes: [String]
    public var progress: TrainingProgress { manifest.progress }
}

/// The flat arrays stored in a shard.
public enum CheckpointArray: String, CaseIterable, Sendable {
    case params
    case adamM = "adam_m"
    case adamV = "adam_v"
    case ema
}

/// One run's checkpoint folder, `<dir>/<run>`: saving, retention, `latest`, loading.
public struct CheckpointStore {
    public let runDirectory: String

    /// Tests only: called with the shard path after it is created, before its data is written;
    /// throwing simulates a failed write (a full disk).
    var injectShardWriteFailure: ((String) throws -> Void)?

    public init(runDirectory: String) { self.runDirectory = runDirectory }
    /// `<config.checkpoint.dir>/<config.checkpoint.run>`.
    public init(config: TrainConfig) { self.init(runDirectory: config.runDirectory) }

    // MARK: names

    public static func folderName(step: Int) -> String { String(format: "step-%08d", step) }
    public static func shardName(rank: Int, worldSize: Int) -> String {
        String(format: "rank-%05d-of-%05d.h5", rank, worldSize)
    }
    /// Rank `rank`'s slice of `count` floats: [rank*count/W, (rank+1)*count/W).
    public static func slice(rank: Int, worldSize: Int, count: Int) -> Range<Int> {
        (rank * count / worldSize)..<((rank + 1) * count / worldSize)
    }
    static func clamp(_ r: Range<Int>, to bounds: Range<Int>) -> Range<Int> {
        let lo = min(max(r.lowerBound, bounds.lowerBound), bounds.upperBound)
        return lo..<max(lo, min(r.upperBound, bounds.upperBound))
    }

    public func path(step: Int) -> String { join(runDirectory, CheckpointStore.folderName(step: step)) }
    public func stagingPath(step: Int) -> String {
        join(runDirectory, "." + CheckpointStore.folderName(step: step) + ".tmp")
    }
    public var latestFile: String { join(runDirectory, "latest") }

    // MARK: saving

    /// Saves a checkpoint from every rank of `communicator` (collective: all ranks call it with the
    /// same step). Rank 0 prepares the temporary folder; each rank writes its shard; rank 0 writes
    /// the manifest, renames the folder, replaces `latest` and applies the config's retention.
    /// If any rank fails, the temporary folder is removed, the previous checkpoints and `latest`
    /// are untouched, and every rank throws the failing rank's error. Returns the checkpoint's folder.
    @discardableResult
    public func save(
        progress: TrainingProgress, config: TrainConfig, model: ModelConfig, table: ParameterTable,
        params: FlatBuffer, optimizer: AdamW?, ema: FlatBuffer? = nil,
        communicator: Communicator
    ) throws -> String {
        let step = progress.step
        let rank = communicator.rank
        let world = communicator.size
        // Each phase ends with every rank learning whether every rank succeeded (also the barrier
        // between phases); after a failure anywhere, rank 0 removes the temporary folder while the
        // others wait (a rank that then aborts the job must not cut that short).
        func phase(_ body: () throws -> Void) throws {
            do { try CheckpointStore.collectively(communicator, body) } catch {
                if rank == 0 { abandon(step: step) }
                try? communicator.barrier()
                throw error
            }
        }
        try phase {
            let mine = CheckpointStore.slice(rank: rank, worldSize: world, count: params.count)
            try CheckpointStore.checkFinite(
                params, range: mine, table: table, file: path(step: step),
                verdict: "not saved: a checkpoint that cannot train on is not a good one; "
                    + "the earlier checkpoints are kept")
            if rank == 0 { try prepareStaging(step: step) }
        }
        try phase {
            try writeShard(step: step, rank: rank, worldSize: world, params: params, optimizer: optimizer, ema: ema)
        }
        try phase {
            if rank == 0 {
                let manifest = CheckpointManifest(
                    progress: progress, worldSize: world, model: model, config: config,
                    table: table, optimizer: optimizer, ema: ema != nil)
                try commit(manifest, keepLast: config.checkpoint.keepLast, keepEvery: config.checkpoint.keepEvery)
            }
        }
        return path(step: step)
    }

    /// Runs `body` on this rank, then learns whether every rank of `comm` succeeded (collective).
    /// If any failed, every rank throws the error of the lowest failing rank, so each rank's
    /// output names the file and the problem even when the job is aborted right after.
    static func collectively<T>(_ comm: Communicator, _ body: () throws -> T) throws -> T {
        var result: T?
        var failure: Error?
        do { result = try body() } catch { failure = error }
        if comm.size == 1 {
            if let failure { throw failure }
            return result!
        }
        let flags = try comm.allgather([failure == nil ? 0 : 1])
        guard let first = flags.firstIndex(where: { $0[0] != 0 }) else { return result! }
        let e = failure.map { $0 as? InputError ?? InputError("rank \(comm.rank)", "\($0)") }
        let text = comm.rank == first ? e!.file + "\u{0}" + e!.problem : ""
        let parts = String(decoding: try comm.broadcast(Array(text.utf8), root: first), as: UTF8.self)
            .split(separator: "\u{0}", maxSplits: 1, omittingEmptySubsequences: false).map(String.init)
        if comm.rank == first { throw failure! }
        throw InputError(parts[0], (parts.count > 1 ? parts[1] : "") + " (reported by rank \(first))")
    }

    /// Rank 0, first: creates an empty temporary folder for `step` (removing leftovers of
    /// interrupted saves).
    public func prepareStaging(step: Int) throws {
        let fm = FileManager.default
        do {
            try fm.createDirectory(atPath: runDirectory, withIntermediateDirectories: true)
            for name in (try? fm.contentsOfDirectory(atPath: runDirectory)) ?? [] where name.hasPrefix(".step-") {
                try? fm.removeItem(atPath: join(runDirectory, name))
            }
            try fm.createDirectory(atPath: stagingPath(step: step), withIntermediateDirectories: false)
        } catch {
            throw InputError(
                stagingPath(step: step), "cannot create the checkpoint folder (\(error.localizedDescription))")
        }
    }

    /// Every rank: writes its slice of the parameters and of both moments (the part of its slice
    /// the moments cover) into the temporary folder, then fsyncs the file.
    public func writeShard(
        step: Int, rank: Int, worldSize: Int, params: FlatBuffer, optimizer: AdamW?,
        ema: FlatBuffer? = nil
    ) throws {
        let file = join(stagingPath(step: step), CheckpointStore.shardName(rank: rank, worldSize: worldSize))
        let s = CheckpointStore.slice(rank: rank, worldSize: worldSize, count: params.count)
        // The moments of the trained range inside this slice; a sharded optimizer (ZeRO) owns
        // exactly this slice, so it holds them all (its moments start at its slice's start).
        let mr = optimizer?.trainedRange ?? 0..<0
        let ms = CheckpointStore.clamp(s, to: mr)
        let held = optimizer?.momentRange ?? 0..<0
        precondition(
            ms.isEmpty || (ms.lowerBound >= held.lowerBound && ms.upperBound <= held.upperBound),
            "rank \(rank) holds moments \(held), its checkpoint slice needs \(ms)")
        do {
            let f = try HDF5File.create(file, checksummed: true)
            try injectShardWriteFailure?(file)
            CheckpointStore.testPause(rank: rank, step: step)
            try f.write(CheckpointArray.params.rawValue, floats: params.base + s.lowerBound, count: s.count)
            let mOffset = ms.isEmpty ? 0 : ms.lowerBound - held.lowerBound
            try f.write(
                CheckpointArray.adamM.rawValue, floats: (optimizer?.m.base ?? params.base) + mOffset, count: ms.count)
            try f.write(
                CheckpointArray.adamV.rawValue, floats: (optimizer?.v.base ?? params.base) + mOffset, count: ms.count)
            if let ema { try f.write(CheckpointArray.ema.rawValue, floats: ema.base + s.lowerBound, count: s.count) }
            for (k, v) in [
                ("format_version", CheckpointManifest.currentFormatVersion), ("step", step), ("rank", rank),
                ("world_size", worldSize), ("param_count", params.count), ("param_start", s.lowerBound),
                ("param_end", s.upperBound), ("moment_start", ms.lowerBound), ("moment_end", ms.upperBound),
            ] {
                try f.setAttribute(k, int: v)
            }
            try f.flush()
        } catch {
            let why = (error as? InputError)?.problem ?? "\(error)"
            throw InputError(
                file,
                "writing the checkpoint shard failed: \(why). \(freeSpace(at: runDirectory)) "
                    + "The checkpoint is abandoned; earlier ones are intact.")
        }
        try fsyncPath(file)
    }

    /// Tests only: `TENSORAR_TEST_PAUSE_SHARD_WRITE=RANK:STEP[:SECONDS]` makes rank RANK sleep
    /// (SECONDS, default 600) right after creating its shard file for step STEP, so a test can
    /// signal or kill ranks in the middle of a checkpoint write. Not a setting; never set it in a
    /// real run.
    static func testPause(rank: Int, step: Int) {
        guard let v = ProcessInfo.processInfo.environment["TENSORAR_TEST_PAUSE_SHARD_WRITE"] else { return }
        let parts = v.split(separator: ":").compactMap { Int($0) }
        if parts.count >= 2, parts[0] == rank, parts[1] == step { sleep(UInt32(parts.count > 2 ? parts[2] : 600)) }
    }

    /// Rank 0, last: checks every shard is there, writes and syncs the manifest, renames the
    /// folder into place, replaces `latest`, then removes checkpoints retention does not keep.
    /// On failure the temporary folder is removed and `latest` is unchanged.
    public func commit(_ manifest: CheckpointManifest, keepLast: Int, keepEvery: Int) throws {
        let step = manifest.step
        let staging = stagingPath(step: step)
        let final = path(step: step)
        do {
            for s in manifest.shards where !FileManager.default.fileExists(atPath: join(staging, s.file)) {
                throw InputError(join(staging, s.file), "shard missing at commit: a rank did not write it")
            }
            let enc = JSONEncoder()
            enc.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
            let manifestPath = join(staging, "manifest.json")
            do { try enc.encode(manifest).write(to: URL(fileURLWithPath: manifestPath)) } catch {
                throw InputError(manifestPath, "cannot write the manifest (\(error.localizedDescription); disk full?)")
            }
            try fsyncPath(manifestPath)
            try fsyncPath(staging)
            // Re-saving a step that exists (e.g. after resuming at it): move the old one aside first.
            let replaced = join(runDirectory, "." + CheckpointStore.folderName(step: step) + ".replaced")
            let exists = FileManager.default.fileExists(atPath: final)
            if exists { try renamePath(final, replaced) }
            try renamePath(staging, final)
            try fsyncPath(runDirectory)
            if exists { try? FileManager.default.removeItem(atPath: replaced) }
        } catch {
            abandon(step: step)
            throw error
        }
        try setLatest(CheckpointStore.folderName(step: step))
        try applyRetention(keepLast: keepLast, keepEvery: keepEvery)
    }

    /// Removes the temporary folder of a failed save.
    public func abandon(step: Int) {
        try? FileManager.default.removeItem(atPath: stagingPath(step: step))
    }

    /// Points `latest` at `name` atomically (write a temporary file, sync, rename over).
    func setLatest(_ name: String) throws {
        let tmp = latestFile + ".tmp"
        do { try Data((name + "\n").utf8).write(to: URL(fileURLWithPath: tmp)) } catch {
            throw InputError(tmp, "cannot write (\(error.localizedDescription); disk full?)")
        }
        try fsyncPath(tmp)
        try renamePath(tmp, latestFile)
        try fsyncPath(runDirectory)
    }

    // MARK: listing, retention, latest

    /// Complete checkpoints (renamed folders `step-NNNNNNNN` holding a manifest), oldest first.
    public func completeCheckpoints() -> [(step: Int, path: String)] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: runDirectory)) ?? []
        return names.compactMap { name -> (Int, String)? in
            guard name.hasPrefix("step-"), let step = Int(name.dropFirst(5)),
                name == CheckpointStore.folderName(step: step)
            else { return nil }
            let p = join(runDirectory, name)
            return FileManager.default.fileExists(atPath: join(p, "manifest.json")) ? (step, p) : nil
        }.sorted { $0.0 < $1.0 }
    }

    /// The folder name `latest` holds, if the file exists.
    public func latestName() -> String? {
        guard let text = try? String(contentsOfFile: latestFile, encoding: .utf8) else { return nil }
        let name = text.trimmingCharacters(in: .whitespacesAndNewlines)
        return name.isEmpty ? nil : name
    }

    /// Keeps the newest `keepLast` checkpoints, those whose step is a multiple of `keepEvery`
    /// (when > 0), and the one `latest` names; removes the rest. Returns the removed folders.
    @discardableResult
    public func applyRetention(keepLast: Int, keepEvery: Int) throws -> [String] {
        let all = completeCheckpoints()
        let latest = latestName()
        var removed: [String] = []
        for (i, c) in all.enumerated() {
            let keep =
                i >= all.count - keepLast || (keepEvery > 0 && c.step % keepEvery == 0)
                || (c.path as NSString).lastPathComponent == latest
            if keep { continue }
            do { try FileManager.default.removeItem(atPath: c.path) } catch {
                throw InputError(c.path, "cannot remove an old checkpoint (\(error.localizedDescription))")
            }
            removed.append(c.path)
        }
        return removed
    }

    /// The checkpoints to resume from, best first: the one `latest` names (or, when `latest` is
    /// missing, the newest complete folder), then the older complete ones, newest first.
    public func resumeCandidates() -> [String] {
        let older = completeCheckpoints().map(\.path).reversed()
        guard let first = latestName().map({ join(runDirectory, $0) }) ?? older.first else { return [] }
        return [first] + older.filter { $0 != first }
    }

    /// The verdict on a shard that is missing, unreadable or fails its checksum.
    static let damaged = "The checkpoint is damaged (missing, truncated or corrupted data); use an earlier one."
    /// What to tell a person whose newest checkpoint cannot be used.
    static let fallbackAdvice =
        "The run's newest checkpoint cannot be used. Resume from the one before it with --fallback "
        + "(checkpoint.fallback: true), or start a new run (--set checkpoint.run=NAME)."

    /// Tries `candidates` in order with `attempt` (which throws for a damaged checkpoint). The first
    /// is the one wanted: its failure is an error saying what to do, unless `allowFallback`; then
    /// the next is tried, and so on. `notes` receives what was skipped and why.
    static func firstUsable<T>(
        _ candidates: [String], allowFallback: Bool, notes: inout [String], _ attempt: (String) throws -> T
    ) throws -> T {
        for (i, dir) in candidates.enumerated() {
            do {
                let r = try attempt(dir)
                if i > 0 { notes.append("falling back to \(dir)") }
                return r
            } catch {
                let e = error as? InputError ?? InputError(dir, "\(error)")
                guard allowFallback else { throw InputError(e.file, "\(e.problem)\n\(fallbackAdvice)") }
                notes.append("skipped \(dir): \(e)")
            }
        }
        throw InputError(
            candidates.first.map { ($0 as NSString).deletingLastPathComponent } ?? "checkpoint",
            "no usable checkpoint: \(notes.joined(separator: "; "))")
    }

    /// The checkpoint to resume from, or nil when the run has none yet: the first of
    /// `resumeCandidates` whose manifest and shard files check out (`verify`, which does not read
    /// the numbers). A damaged one is an error, unless `allowFallback`.
    public func resolveLatest(allowFallback: Bool, notes: inout [String]) throws -> String? {
        let candidates = resumeCandidates()
        if candidates.isEmpty { return nil }
        return try CheckpointStore.firstUsable(candidates, allowFallback: allowFallback, notes: &notes) { dir in
            try CheckpointStore.verify(dir)
            return dir
        }
    }

    /// Collective: loads the run's newest checkpoint into `params` and `optimizer` (see `load`),
    /// or returns nil when the run has none. A damaged checkpoint (including data that fails its
    /// checksum) is an error, unless `allowFallback`: then the newest older one that loads is used.
    public func loadLatest(
        allowFallback: Bool, model: ModelConfig, table: ParameterTable, params: FlatBuffer, optimizer: AdamW?,
        ema: FlatBuffer? = nil, communicator: Communicator = .solo,
        notes: inout [String]
    ) throws -> LoadedCheckpoint? {
        let candidates = resumeCandidates()
        if candidates.isEmpty { return nil }
        return try CheckpointStore.firstUsable(candidates, allowFallback: allowFallback, notes: &notes) { dir in
            try CheckpointStore.load(
                from: dir, model: model, table: table, params: params, optimizer: optimizer,
                ema: ema, communicator: communicator)
        }
    }

    /// A path given by a person: a checkpoint folder (holds manifest.json) or a run folder
    /// (resolved through its `latest`).
    public static func resolve(path: String, allowFallback: Bool, notes: inout [String]) throws -> String {
        if FileManager.default.fileExists(atPath: join(path, "manifest.json")) { return path }
        let store = CheckpointStore(runDirectory: path)
        if let p = try store.resolveLatest(allowFallback: allowFallback, notes: &notes) { return p }
        throw InputError(path, "not a checkpoint folder (no manifest.json) and no checkpoints of a run in it")
    }

    /// Collective: loads the checkpoint at `path`, a checkpoint folder or a run folder (its newest
    /// checkpoint, with `loadLatest`'s fallback rule).
    public static func load(
        path: String, allowFallback: Bool, model: ModelConfig, table: ParameterTable, params: FlatBuffer,
        optimizer: AdamW?, ema: FlatBuffer? = nil, communicator: Communicator = .solo,
        notes: inout [String]
    ) throws -> LoadedCheckpoint {
        if FileManager.default.fileExists(atPath: join(path, "manifest.json")) {
            return try load(
                from: path, model: model, table: table, params: params, optimizer: optimizer, ema: ema,
                communicator: communicator)
        }
        let store = CheckpointStore(runDirectory: path)
        if let c = try store.loadLatest(
            allowFallback: allowFallback, model: model, table: table, params: params,
            optimizer: optimizer, ema: ema, communicator: communicator,
            notes: &notes)
        {
            return c
        }
        throw InputError(path, "not a checkpoint folder (no manifest.json) and no checkpoints of a run in it")
    }

    // MARK: reading

    /// Reads and decodes a checkpoint's manifest.
    public static func readManifest(_ dir: String) throws -> CheckpointManifest {
        let p = join(dir, "manifest.json")
        guard FileManager.default.fileExists(atPath: p) else {
            throw InputError(p, "missing: \(dir) is not a complete checkpoint")
        }
        let m: CheckpointManifest
        do {
            m = try JSONDecoder().decode(CheckpointManifest.self, from: Data(contentsOf: URL(fileURLWithPath: p)))
        } catch let e as DecodingError {
            throw InputError(p, "cannot be read as a checkpoint manifest: \(TrainConfig.describe(e))")
        } catch {
            throw InputError(p, "cannot be read (\(error.localizedDescription))")
        }
        guard m.formatVersion == CheckpointManifest.currentFormatVersion else {
            throw InputError(
                p,
                "format_version \(m.formatVersion); this program reads version "
                    + "\(CheckpointManifest.currentFormatVersion)"
            )
        }
        return m
    }

    /// The manifest's numbers inside their ranges (a damaged or hand-edited manifest is an error
    /// naming it, not a resume at a wrong position).
    static func checkRanges(_ m: CheckpointManifest, path mp: String) throws {
        func need(_ ok: Bool, _ what: @autoclosure () -> String) throws {
            if !ok { throw InputError(mp, what() + ". " + damaged) }
        }
        try need(m.step >= 0, "step \(m.step) is negative")
        try need(m.worldSize >= 1 && m.worldSize <= 1 << 20, "world_size \(m.worldSize) is outside [1, \(1 << 20)]")
        try need(m.parameterCount >= 0, "parameter_count \(m.parameterCount) is negative")
        try need(m.seed >= 0, "seed \(m.seed) is negative")
        try need(m.dataOffset >= 0, "data_offset \(m.dataOffset) is negative")
        try need(m.samplesSeen >= 0, "samples_seen \(m.samplesSeen) is negative")
        try need(m.dataEpoch >= 0, "data_epoch \(m.dataEpoch) is negative")
        let o = m.optimizer
        try need(
            o.momentStart >= 0 && o.momentStart <= o.momentEnd && o.momentEnd <= m.parameterCount,
            "optimizer moment range [\(o.momentStart), \(o.momentEnd)) is outside [0, \(m.parameterCount))")
        for (name, g) in [("base", o.base), ("plugin", o.plugin)] {
            try need(g.steps >= 0, "optimizer.\(name).steps \(g.steps) is negative")
        }
    }

    /// Checks that a checkpoint is whole: the manifest reads, each shard the manifest lists is
    /// present, names the slices the layout rules give, and holds arrays of the right lengths.
    /// Returns the manifest.
    @discardableResult
    public static func verify(_ dir: String) throws -> CheckpointManifest {
        let m = try readManifest(dir)
        let mp = join(dir, "manifest.json")
        try checkRanges(m, path: mp)
        let expected = CheckpointManifest.Shard.layout(
            worldSize: m.worldSize, count: m.parameterCount,
            moments: m.optimizer.momentStart..<m.optimizer.momentEnd)
        guard m.worldSize >= 1, m.shards == expected else {
            throw InputError(
                mp, "the shard list does not match \(m.worldSize) rank(s) over \(m.parameterCount) parameters")
        }
        for (rank, s) in m.shards.enumerated() {
            let file = join(dir, s.file)
            let advice = CheckpointStore.damaged
            guard FileManager.default.fileExists(atPath: file) else {
                throw InputError(file, "shard missing. \(advice)")
            }
            // HDF5's own errors (unreadable, truncated) get the verdict too.
            func h5<T>(_ body: () throws -> T) throws -> T {
                do { return try body() } catch let e as InputError { throw InputError(file, "\(e.problem). \(advice)") }
            }
            let f = try h5 { try HDF5File.open(file) }
            for (k, v) in [
                ("step", m.step), ("rank", rank), ("world_size", m.worldSize),
                ("param_start", s.paramStart), ("param_end", s.paramEnd), ("moment_start", s.momentStart),
                ("moment_end", s.momentEnd), ("param_count", m.parameterCount),
            ] {
                let got = try h5 { try f.intAttribute(k) }
                if got != v { throw InputError(file, "attribute \(k) is \(got), the manifest says \(v). \(advice)") }
            }
            var arrays = [
                (CheckpointArray.params, s.paramEnd - s.paramStart), (.adamM, s.momentEnd - s.momentStart),
                (.adamV, s.momentEnd - s.momentStart),
            ]
            if m.hasEMA == true { arrays.append((.ema, s.paramEnd - s.paramStart)) }
            for (a, n) in arrays {
                let shape = try h5 { try f.shape(of: a.rawValue) }
                if shape != [n] {
                    throw InputError(file, "'\(a.rawValue)' has shape \(shape), expected [\(n)]. \(advice)")
                }
            }
        }
        return m
    }

    /// Reads flat range `range` of one array from a checkpoint's shards into `out` (range.count
    /// floats), from however many shards it spans. For params any range in [0, P); for the
    /// moments a range inside the manifest's [moment_start, moment_end).
    public static func read(
        _ array: CheckpointArray, range: Range<Int>, from dir: String, manifest: CheckpointManifest,
        into out: UnsafeMutablePointer<Float>
    ) throws {
        var covered = 0
        for s in manifest.shards {
            let held = array == .params || array == .ema ? s.paramStart..<s.paramEnd : s.momentStart..<s.momentEnd
            let part = clamp(range, to: held)
            if part.isEmpty { continue }
            let file = join(dir, s.file)
            do {
                let f = try HDF5File.open(file)
                try f.readRows(
                    array.rawValue, kind: .float32, start: part.lowerBound - held.lowerBound, rows: part.count,
                    into: out + (part.lowerBound - range.lowerBound))
            } catch let e as InputError {
                throw InputError(file, "\(e.problem). \(damaged)")
            }
            covered += part.count
        }
        guard covered == range.count else {
            throw InputError(
                join(dir, "manifest.json"),
                "the shards hold only \(covered) of the \(range.count) values of '\(array.rawValue)' in \(range)")
        }
    }

    /// Loads a checkpoint into full parameter (and, given an optimizer, moment) buffers, whatever
    /// the number of ranks that wrote it. `model` and `table` describe the run being resumed: a
    /// different shape is an error that says what differs. A group trained now but frozen in the
    /// checkpoint starts with zero moments and step 0 (noted); moments of a group frozen now are
    /// ignored (noted).
    ///
    /// Collective over `communicator`: each rank reads only its own slice of the flat buffers
    /// (the one it would write), from whichever old shards hold it, and the ranks then exchange
    /// slices, so the checkpoint is read once in parallel. A damaged shard on any rank is an error
    /// on every rank, naming the file.
    ///
    /// `ema`: also the parameters' moving average (a checkpoint without one starts it from the
    /// parameters, noted). `weights: .ema` reads the average into `params` instead of the weights
    /// (an error naming the checkpoint when it has none).
    public static func load(
        from dir: String, model: ModelConfig, table: ParameterTable, params: FlatBuffer,
        optimizer: AdamW?, ema: FlatBuffer? = nil, weights: CheckpointArray = .params,
        communicator comm: Communicator = .solo
    ) throws -> LoadedCheckpoint {
        precondition(
            params.count == table.total, "parameter buffer has \(params.count) floats, the table \(table.total)")
        let m = try collectively(comm) { try checkLoadable(dir, model: model, table: table) }
        if weights == .ema && m.hasEMA != true {
            throw InputError(
                join(dir, "manifest.json"),
                "this checkpoint holds no EMA weights (trained without train.ema_decay)")
        }
        let slices = (0..<comm.size).map { slice(rank: $0, worldSize: comm.size, count: table.total) }
        let mine = slices[comm.rank]
        var notes: [String] = []
        var steps = PerGroup(base: 0, plugin: 0)
        try collectively(comm) {
            try read(weights, range: mine, from: dir, manifest: m, into: params.base + mine.lowerBound)
            if let ema, m.hasEMA == true {
                try read(.ema, range: mine, from: dir, manifest: m, into: ema.base + mine.lowerBound)
            }
            try checkFinite(
                params, range: mine, table: table, file: dir,
                verdict: "the checkpoint cannot be used. "
                    + fallbackAdvice)
            guard let optimizer else { return }
            optimizer.m.zero()
            optimizer.v.zero()
            for g in PerGroup<Int>.groups {
                let saved = m.group(g)
                if optimizer.trainable[g] {
                    let r = table.range(of: g)
                    if saved.hasMoments {
                        let part = clamp(r, to: mine)
                        let dst = part.lowerBound - optimizer.momentRange.lowerBound
                        try read(.adamM, range: part, from: dir, manifest: m, into: optimizer.m.base + dst)
                        try read(.adamV, range: part, from: dir, manifest: m, into: optimizer.v.base + dst)
                        steps[g] = saved.steps
                    } else if !r.isEmpty {
                        notes.append(
                            "group \(g.rawValue) was frozen in the checkpoint: its AdamW moments start from zero")
                    }
                } else if saved.hasMoments {
                    notes.append("group \(g.rawValue) is frozen now: its saved AdamW moments are not used")
                }
            }
        }
        try comm.allgather(inPlace: params.base, blocks: slices)
        if let ema {
            if m.hasEMA == true {
                try comm.allgather(inPlace: ema.base, blocks: slices)
            } else {
                ema.base.update(from: params.base, count: params.count)
                notes.append("the checkpoint has no EMA weights: the average starts from its weights")
            }
        }
        // A sharded optimizer keeps only its own slice's moments (read above); a replicated one
        // gathers everyone's.
        if let optimizer, optimizer.momentRange == optimizer.trainedRange {
            let mr = optimizer.momentRange
            let blocks = slices.map { s -> Range<Int> in
                let c = clamp(s, to: mr)
                return (c.lowerBound - mr.lowerBound)..<(c.upperBound - mr.lowerBound)
            }
            try comm.allgather(inPlace: optimizer.m.base, blocks: blocks)
            try comm.allgather(inPlace: optimizer.v.base, blocks: blocks)
        }
        optimizer?.restore(steps: steps)
        return LoadedCheckpoint(directory: dir, manifest: m, notes: notes)
    }

    /// Throws (naming `file` and the tensor) when flat range `range` of `params` holds a NaN or an
    /// infinity; `verdict` says what follows.
    static func checkFinite(
        _ params: FlatBuffer, range: Range<Int>, table: ParameterTable, file: String,
        verdict: String
    ) throws {
        let p = params.base
        guard let bad = range.first(where: { !p[$0].isFinite }) else { return }
        let entry = table.entries.first { bad >= $0.offset && bad < $0.offset + $0.count }
        let name = entry.map { "tensor '\($0.name)' element \(bad - $0.offset)" } ?? "flat index \(bad)"
        throw InputError(file, "parameters are not finite (\(p[bad]) in \(name)): \(verdict)")
    }

    /// The manifest of `dir`, after checking the checkpoint is whole (`verify`) and holds the
    /// model `model` with parameter table `table`.
    static func checkLoadable(_ dir: String, model: ModelConfig, table: ParameterTable) throws -> CheckpointManifest {
        let m = try verify(dir)
        let mp = join(dir, "manifest.json")
        if m.model != model {
            throw InputError(
                mp,
                "the checkpoint's model shape \(m.model.jsonString()) differs from the config's \(model.jsonString()). "
                    + "Resume with the checkpoint's model settings, or start a new run (another checkpoint.run).")
        }
        if m.parameterCount != table.total || m.parameters != table.entries {
            let diff = zip(m.parameters, table.entries).first { $0 != $1 }
            throw InputError(
                mp,
                "the parameter table differs from this program's "
                    + (diff.map {
                        "(first difference: checkpoint \($0.0.name) \($0.0.shape) at \($0.0.offset), "
                            + "program \($0.1.name) \($0.1.shape) at \($0.1.offset))"
                    }
                        ?? "(\(m.parameterCount) vs \(table.total) parameters)"))
        }
        return m
    }
}

extension CheckpointManifest.Shard {
    /// The shards W ranks write for P parameters with moments over `moments`.
    static func layout(worldSize: Int, count: Int, moments: Range<Int>) -> [CheckpointManifest.Shard] {
        (0..<max(worldSize, 0)).map { r in
            let s = CheckpointStore.slice(rank: r, worldSize: worldSize, count: count)
            let m = CheckpointStore.clamp(s, to: moments)
            return .init(
                file: CheckpointStore.shardName(rank: r, worldSize: worldSize),
                paramStart: s.lowerBound, paramEnd: s.upperBound, momentStart: m.lowerBound, momentEnd: m.upperBound)
        }
    }
}

// MARK: - file system helpers

private func join(_ a: String, _ b: String) -> String { (a as NSString).appendingPathComponent(b) }

/// "N MB free on that disk." for the file system holding `path` (a failed write's likely cause).
func freeSpace(at path: String) -> String {
    var st = statvfs()
    guard statvfs(path, &st) == 0 else { return "Is the disk full?" }
    return String(format: "%.1f MB free on that disk.", Double(st.f_bavail) * Double(st.f_frsize) / 1e6)
}

/// fsync a file or folder, so a rename that follows cannot be seen before the data.
func fsyncPath(_ path: String) throws {
    let fd = open(path, O_RDONLY)
    guard fd >= 0 else { throw InputError(path, "cannot open to sync: \(String(cString: strerror(errno)))") }
    defer { close(fd) }
    if fsync(fd) != 0 { throw InputError(path, "fsync failed: \(String(cString: strerror(errno))) (disk full?)") }
}

/// rename(2): atomic replacement within one file system.
func renamePath(_ from: String, _ to: String) throws {
    if rename(from, to) != 0 {
        throw InputError(from, "cannot rename to \(to): \(String(cString: strerror(errno)))")
    }
}
