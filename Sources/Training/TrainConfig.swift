import ARModel
import Foundation
import Platform
import Yams

// The trainer's configuration, nanoGPT style: every default is here, grouped by section, with a
// one-line comment; a YAML file overrides a few of them; `--set section.key=value` flags override
// the file. Unknown keys are errors that name the key and where it came from. The resolved
// config is printed at start-up and saved in every checkpoint manifest (SPEC section 7).

/// A string-valued choice in the config; a bad value's error lists the allowed ones.
public protocol ConfigChoice: RawRepresentable, CaseIterable, Codable where RawValue == String {}
extension ConfigChoice {
    public init(from decoder: Decoder) throws {
        let c = try decoder.singleValueContainer()
        let s = try c.decode(String.self)
        guard let v = Self(rawValue: s) else {
            throw DecodingError.dataCorruptedError(
                in: c, debugDescription: "expected one of: \(Self.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        self = v
    }
    public func encode(to encoder: Encoder) throws {
        var c = encoder.singleValueContainer()
        try c.encode(rawValue)
    }
}

// SPEC section 4 noise types and strength schedules (defined with the noiser in ARModel).
extension NoiseType: ConfigChoice {}
extension NoiseSchedule: ConfigChoice {}
/// Which embedding `discrete` noise measures similarity in (SPEC section 4).
public enum NoiseEmbedding: String, ConfigChoice, Sendable { case model, codebook }
extension ScheduleKind: ConfigChoice {}
extension DecayRule: ConfigChoice {}
/// `train.recompute` (activation checkpointing; defined with the activation table in ARModel).
extension ActivationRecompute: ConfigChoice {}

/// ZeRO stages over MPI (`dist.shard_optimizer`): `states` shards the AdamW moments and the
/// update (stage 1), `states+grads` the gradients too (stage 2). Each rank owns its checkpoint
/// slice of the flat buffer (SPEC section 7).
public enum ShardOptimizer: String, ConfigChoice, Sendable {
    case none
    case states
    case statesAndGrads = "states+grads"
}

/// A thread count that may be left to the program: `auto` or a positive number.
public enum ThreadCount: Codable, Equatable, Sendable, CustomStringConvertible {
    case auto
    case count(Int)

    public init(from decoder: Decoder) throws {
        let c = try decoder.singleValueContainer()
        if let n = try? c.decode(Int.self) {
            self = .count(n)
            return
        }
        if let s = try? c.decode(String.self), s == "auto" {
            self = .auto
            return
        }
        throw DecodingError.dataCorruptedError(in: c, debugDescription: "expected 'auto' or a number of threads")
    }
    public func encode(to encoder: Encoder) throws {
        var c = encoder.singleValueContainer()
        switch self {
        case .auto: try c.encode("auto")
        case .count(let n): try c.encode(n)
        }
    }
    public var description: String {
        switch self {
        case .auto: return "auto"
        case .count(let n): return String(n)
        }
    }
    /// The number to use: `auto` shares the machine's cores evenly between the ranks on it.
    public func resolve(ranksOnNode: Int, cores: Int = ProcessInfo.processInfo.activeProcessorCount) -> Int {
        switch self {
        case .auto: return max(1, cores / max(1, ranksOnNode))
        case .count(let n): return max(1, n)
        }
    }
}

public struct TrainConfig: Codable, Equatable {
    public var model = ModelSection()
    public var noise = NoiseSection()
    public var loss = LossSection()
    public var data = DataSection()
    public var optim = OptimSection()
    public var train = TrainSection()
    public var dist = DistSection()
    public var checkpoint = CheckpointSection()

    public init() {}

    enum CodingKeys: String, CodingKey, CaseIterable {
        case model, noise, loss, data, optim, train, dist, checkpoint
    }

    /// The model's shape (SPEC sections 2-3). Vocabulary, classes and grid come from the dataset.
    public struct ModelSection: Codable, Equatable {
        public var base: String = "llamagen"  // base model type, a BaseRegistry name (SPEC section 7 "base")
        public var preset: String? = "small"  // size preset: tiny, small, B, L, XL, XXL; the fields below override it
        public var dim: Int? = nil  // D, model width (overrides the preset's)
        public var nLayer: Int? = nil  // L, transformer blocks
        public var nHead: Int? = nil  // NH, attention heads
        public var ffnHidden: Int? = nil  // F, feed-forward width; default from dim (SPEC 2)
        public var window: Int = 4  // k, tokens per tensor (SPEC 3)
        public var pluginDepth: Int = 2  // d, plug-in encoder and decoder blocks; 0 = plain base model
        public var residual: Bool = true  // residual plug-in (proj starts at zero: a fresh plug-in is the base model)
        public var initFrom: String? = nil  // safetensors weights to start from (e.g. a converted LlamaGen checkpoint)
        public var factorizedNLayer: Int? = nil  // open-magvit2: Lf, factorized blocks (overrides the preset's; SPEC 8)
        public init() {}
        enum CodingKeys: String, CodingKey, CaseIterable {
            case base, preset, dim
            case nLayer = "n_layer"
            case nHead = "n_head"
            case ffnHidden = "ffn_hidden"
            case window
            case pluginDepth = "plugin_depth"
            case residual
            case initFrom = "init_from"
            case factorizedNLayer = "factorized_n_layer"
        }
        /// As synthesized, except that `base` may be absent (manifests written before it existed
        /// resume as llamagen).
        public init(from decoder: Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            base = try c.decodeIfPresent(String.self, forKey: .base) ?? "llamagen"
            preset = try c.decodeIfPresent(String.self, forKey: .preset)
            dim = try c.decodeIfPresent(Int.self, forKey: .dim)
            nLayer = try c.decodeIfPresent(Int.self, forKey: .nLayer)
            nHead = try c.decodeIfPresent(Int.self, forKey: .nHead)
            ffnHidden = try c.decodeIfPresent(Int.self, forKey: .ffnHidden)
            window = try c.decode(Int.self, forKey: .window)
            pluginDepth = try c.decode(Int.self, forKey: .pluginDepth)
            residual = try c.decode(Bool.self, forKey: .residual)
            initFrom = try c.decodeIfPresent(String.self, forKey: .initFrom)
            factorizedNLayer = try c.decodeIfPresent(Int.self, forKey: .factorizedNLayer)
        }
    }

    /// Discrete tensor noising of the plug-in's inputs (SPEC section 4).
    public struct NoiseSection: Codable, Equatable {
        public var type: NoiseType = .replace  // replace | discrete | continuous | none
        public var schedule: NoiseSchedule = .sine  // beta_j = gamma(j / k): sine | linear | sqrt | exponential
        public var embedding: NoiseEmbedding = .model  // discrete noise's embedding: model | codebook
        public init() {}
        enum CodingKeys: String, CodingKey, CaseIterable { case type, schedule, embedding }
    }

    /// The loss over the k slots (SPEC section 3).
    public struct LossSection: Codable, Equatable {
        public var slotWeights: [Double]? = nil  // w_j for the k slots; default all 1
        public init() {}
        enum CodingKeys: String, CodingKey, CaseIterable { case slotWeights = "slot_weights" }
    }

    /// Token caches (SPEC section 7) written by `tensorar-data`.
    public struct DataSection: Codable, Equatable {
        public var train: String = "Data/fashion-mnist/train"  // training token cache folder
        public var val: String? = nil  // validation token cache folder; none: no validation
        public var augment: Bool = true  // use the cache's augmented views (else view 0 only)
        public var valSamples: Int? = nil  // validate on the first N samples; default all
        public init() {}
        enum CodingKeys: String, CodingKey, CaseIterable {
            case train, val, augment
            case valSamples = "val_samples"
        }
    }

    /// AdamW and the two learning-rate schedules (SPEC section 6).
    public struct OptimSection: Codable, Equatable {
        public var lrPlugin: Double = 1e-4  // plug-in group peak learning rate
        public var lrBase: Double = 1e-5  // base group peak learning rate (0 freezes the base)
        public var schedulePlugin: ScheduleKind = .linear  // constant | linear | cosine
        public var scheduleBase: ScheduleKind = .constant  // constant | linear | cosine
        public var warmupPlugin: Int = 0  // linear warm-up steps, plug-in group
        public var warmupBase: Int = 0  // linear warm-up steps, base group
        public var finalLrPlugin: Double = 0  // where linear/cosine decay ends, plug-in group
        public var finalLrBase: Double = 0  // where linear/cosine decay ends, base group
        public var betas: [Double] = [0.9, 0.95]  // AdamW (beta1, beta2)
        public var eps: Double = 1e-8  // AdamW epsilon (outside the square root)
        public var weightDecay: Double = 0.05  // decoupled weight decay, on what decay_rule_* say
        // Which parameters decay (project: 2+ dimensions, SPEC 6; rar: SPEC 9 Recipe's name rule).
        // Absent: the base's own (rar for model.base rar, else project), filled in when the config is
        // loaded so the recorded config names it; a manifest without the keys resumes as project.
        public var decayRuleBase: DecayRule? = nil  // base group: project | rar
        public var decayRulePlugin: DecayRule? = nil  // plug-in group: project | rar (absent: project)
        // SPEC section 9's `optim.decay_rule`: the base group's rule, another name for decay_rule_base
        // (`load` moves it there; giving both with different rules is an error).
        public var decayRule: DecayRule? = nil
        public var clip: Double = 1.0  // global gradient-norm clip; 0 = off
        public init() {}
        enum CodingKeys: String, CodingKey, CaseIterable {
            case lrPlugin = "lr_plugin"
            case lrBase = "lr_base"
            case schedulePlugin = "schedule_plugin"
            case scheduleBase = "schedule_base"
            case warmupPlugin = "warmup_plugin"
            case warmupBase = "warmup_base"
            case finalLrPlugin = "final_lr_plugin"
            case finalLrBase = "final_lr_base"
            case betas, eps
            case weightDecay = "weight_decay"
            case decayRuleBase = "decay_rule_base"
            case decayRulePlugin = "decay_rule_plugin"
            case decayRule = "decay_rule"
            case clip
        }
    }

    /// The run: batch, length, regularisation, logging.
    public struct TrainSection: Codable, Equatable {
        public var globalBatch: Int = 256  // samples per optimizer step, all ranks together
        public var microBatch: Int = 32  // samples per forward/backward on one rank
        public var steps: Int = 1000  // optimizer steps in the run
        public var seed: Int = 0  // all randomness derives from it (CounterRNG)
        public var dropout: Double = 0.1  // token, attention-output and FFN-output dropout (SPEC 2)
        public var labelDrop: Double = 0.1  // probability of replacing the class by the null class
        public var logEvery: Int = 10  // steps between progress lines / metrics records
        public var valEvery: Int = 500  // steps between validation losses; 0 = only at the end
        public var maxSkippedSteps: Int = 10  // consecutive non-finite-gradient steps tolerated before stopping
        public var emaDecay: Double? = nil  // EMA of the weights per step (LlamaGen --ema: 0.9999); none: off
        public var tensorboard: Bool = true  // event files in <run>/tensorboard/: metrics.jsonl's numbers, samples
        // {start: S0, end: S1}: the share of samples in a random token order, 1 until S0, linear to
        // 0 at S1 (SPEC section 9 Random order; base training of a base that reads orders); none: off
        public var randomOrder: RandomOrder? = nil
        public var recompute: ActivationRecompute = .none  // none | blocks: keep block inputs, recompute in backward
        // Micro-batches a rank runs side by side, one per thread, each with its own activations and
        // gradient buffer, summed in a fixed order: results depend on it, never on the thread count
        // (Trainer.accumulateInLanes). For small models on several threads per rank; 1: one at a time.
        public var parallelMicroBatches: Int = 1
        public init() {}
        enum CodingKeys: String, CodingKey, CaseIterable {
            case globalBatch = "global_batch"
            case microBatch = "micro_batch"
            case steps, seed, dropout
            case labelDrop = "label_drop"
            case logEvery = "log_every"
            case valEvery = "val_every"
            case maxSkippedSteps = "max_skipped_steps"
            case emaDecay = "ema_decay"
            case tensorboard, recompute
            case randomOrder = "random_order"
            case parallelMicroBatches = "parallel_micro_batches"
        }
        /// As synthesized, except that `tensorboard`, `recompute` and `parallel_micro_batches` may be
        /// absent (manifests written before they existed resume with the defaults: on, none, 1).
        public init(from decoder: Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            globalBatch = try c.decode(Int.self, forKey: .globalBatch)
            microBatch = try c.decode(Int.self, forKey: .microBatch)
            steps = try c.decode(Int.self, forKey: .steps)
            seed = try c.decode(Int.self, forKey: .seed)
            dropout = try c.decode(Double.self, forKey: .dropout)
            labelDrop = try c.decode(Double.self, forKey: .labelDrop)
            logEvery = try c.decode(Int.self, forKey: .logEvery)
            valEvery = try c.decode(Int.self, forKey: .valEvery)
            maxSkippedSteps = try c.decode(Int.self, forKey: .maxSkippedSteps)
            emaDecay = try c.decodeIfPresent(Double.self, forKey: .emaDecay)
            tensorboard = try c.decodeIfPresent(Bool.self, forKey: .tensorboard) ?? true
            randomOrder = try c.decodeIfPresent(RandomOrder.self, forKey: .randomOrder)
            recompute = try c.decodeIfPresent(ActivationRecompute.self, forKey: .recompute) ?? .none
            parallelMicroBatches = try c.decodeIfPresent(Int.self, forKey: .parallelMicroBatches) ?? 1
        }
    }

    /// Data parallelism over MPI.
    public struct DistSection: Codable, Equatable {
        public var bucketMB: Double = 25  // gradient allreduce bucket size, MB
        public var overlap: Bool = true  // reduce buckets on a communication thread during backward
        public var threadsPerRank: ThreadCount = .auto  // BLAS/compute threads per rank; auto = cores / ranks
        public var collectiveTimeoutSeconds: Double = 600  // a collective not done after this ends the job (watchdog)
        public var shardOptimizer: ShardOptimizer = .none  // ZeRO: none | states (stage 1) | states+grads (stage 2)
        // ZeRO: allgather the updated parameters on a communication thread while the next forward
        // starts (false: blocking, right after AdamW); ignored without sharding
        public var overlapGather: Bool = true
        public init() {}
        enum CodingKeys: String, CodingKey, CaseIterable {
            case bucketMB = "bucket_mb"
            case overlap
            case threadsPerRank = "threads_per_rank"
            case collectiveTimeoutSeconds = "collective_timeout_s"
            case shardOptimizer = "shard_optimizer"
            case overlapGather = "overlap_gather"
        }
        /// Absent keys keep their defaults (a checkpoint's manifest from before a key existed).
        public init(from decoder: Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            let d = DistSection()
            bucketMB = try c.decodeIfPresent(Double.self, forKey: .bucketMB) ?? d.bucketMB
            overlap = try c.decodeIfPresent(Bool.self, forKey: .overlap) ?? d.overlap
            threadsPerRank = try c.decodeIfPresent(ThreadCount.self, forKey: .threadsPerRank) ?? d.threadsPerRank
            collectiveTimeoutSeconds =
                try c.decodeIfPresent(Double.self, forKey: .collectiveTimeoutSeconds)
                ?? d.collectiveTimeoutSeconds
            shardOptimizer = try c.decodeIfPresent(ShardOptimizer.self, forKey: .shardOptimizer) ?? d.shardOptimizer
            overlapGather = try c.decodeIfPresent(Bool.self, forKey: .overlapGather) ?? d.overlapGather
        }
    }

    /// Checkpoints (SPEC section 7): `<dir>/<run>/step-NNNNNNNN/`.
    public struct CheckpointSection: Codable, Equatable {
        public var every: Int = 1000  // steps between checkpoints; 0 = only at the end
        public var keepLast: Int = 3  // keep the newest N checkpoints
        public var keepEvery: Int = 0  // also keep those whose step is a multiple of N; 0 = none
        public var dir: String = "Checkpoints"  // root folder of all runs
        public var run: String? = nil  // run name; default: the config file's name
        // auto: newest complete checkpoint of the run, if any; never; or a checkpoint folder
        public var resume: String = "auto"
        public var fallback: Bool = false  // if the newest checkpoint is damaged, resume from the one before
        public init() {}
        enum CodingKeys: String, CodingKey, CaseIterable {
            case every
            case keepLast = "keep_last"
            case keepEvery = "keep_every"
            case dir, run, resume, fallback
        }
    }

    /// The keys each section accepts, for rejecting unknown ones.
    static let knownKeys: [String: [String]] = [
        "model": ModelSection.CodingKeys.allCases.map(\.rawValue),
        "noise": NoiseSection.CodingKeys.allCases.map(\.rawValue),
        "loss": LossSection.CodingKeys.allCases.map(\.rawValue),
        "data": DataSection.CodingKeys.allCases.map(\.rawValue),
        "optim": OptimSection.CodingKeys.allCases.map(\.rawValue),
        "train": TrainSection.CodingKeys.allCases.map(\.rawValue),
        "dist": DistSection.CodingKeys.allCases.map(\.rawValue),
        "checkpoint": CheckpointSection.CodingKeys.allCases.map(\.rawValue),
    ]
    static let sectionNames = CodingKeys.allCases.map(\.rawValue)
}

// MARK: - Loading: defaults < file < --set flags

extension TrainConfig {
    /// Resolves a config: the defaults above, then the YAML `file` (if any), then each `--set`
    /// override (`section.key=value`, the value read as YAML: `0.5`, `cosine`, `[0.9, 0.99]`,
    /// `null`). Errors name the file or flag and the key. `checkpoint.run` defaults to the file's
    /// name without extension ("default" without a file), and `optim.decay_rule_*` to the rules
    /// that apply (`decayRules`). Call `validate(worldSize:)` afterwards.
    public static func load(file: String?, overrides: [String] = []) throws -> TrainConfig {
        var text = ""
        if let file {
            if pathKind(file) == .folder { throw InputError(file, "is a folder, not a config file") }
            do { text = try String(contentsOfFile: file, encoding: .utf8) } catch {
                throw InputError(file, "cannot read the config file (\(error.localizedDescription))")
            }
        }
        var config = try resolve(yaml: text, source: file ?? "defaults", overrides: overrides)
        if config.checkpoint.run == nil {
            config.checkpoint.run =
                file.map { (($0 as NSString).lastPathComponent as NSString).deletingPathExtension } ?? "default"
        }
        if let rule = config.optim.decayRule {
            if let base = config.optim.decayRuleBase, base != rule {
                throw InputError(
                    file ?? "--set",
                    "optim.decay_rule (\(rule.rawValue)) and optim.decay_rule_base (\(base.rawValue)) disagree: "
                        + "decay_rule is another name for decay_rule_base; give one")
            }
            config.optim.decayRuleBase = rule
            config.optim.decayRule = nil
        }
        // the weight-decay rules as they apply, so the recorded config names them
        config.optim.decayRuleBase = config.decayRules.base
        config.optim.decayRulePlugin = config.decayRules.plugin
        return config
    }

    /// `load` without the file system: `yaml` is the file's text, `source` its name in errors.
    public static func resolve(yaml: String, source: String, overrides: [String] = []) throws -> TrainConfig {
        var tree = try defaultsTree()
        let fileNode: Node?
        do { fileNode = try Yams.compose(yaml: yaml) } catch {
            throw InputError(source, "not valid YAML: \(error)")
        }
        if let fileNode, fileNode.null == nil {
            guard let pairs = fileNode.mapping else {
                throw InputError(source, "expected a mapping of sections (model:, optim:, train:, ...) at the top")
            }
            for (key, value) in pairs {
                let section = key.string ?? "\(key)"
                guard knownKeys[section] != nil else {
                    throw InputError(
                        source, "unknown key '\(section)'; sections are: \(sectionNames.joined(separator: ", "))")
                }
                if value.null != nil { continue }  // "section:" with nothing under it
                guard let fields = value.mapping else {
                    throw InputError(
                        source, "'\(section)' must be a mapping of keys, got '\(value.string ?? "\(value)")'")
                }
                for (k, v) in fields {
                    let name = k.string ?? "\(k)"
                    try checkKnown(section, name, source: source)
                    tree = setting(tree, section, name, to: v)
                }
            }
        }
        var config = try decode(tree, source: source)
        for flag in overrides {
            guard let eq = flag.firstIndex(of: "=") else {
                throw InputError("--set \(flag)", "expected section.key=value, e.g. optim.lr_plugin=3e-4")
            }
            let path = flag[..<eq].split(separator: ".", omittingEmptySubsequences: false).map(String.init)
            let raw = String(flag[flag.index(after: eq)...])
            guard path.count == 2 else {
                throw InputError("--set \(flag)", "the key must be section.key (two parts), e.g. train.steps")
            }
            try checkKnown(path[0], path[1], source: "--set \(flag)")
            let value: Node
            do { value = try Yams.compose(yaml: raw) ?? Node("null", Tag(.null)) } catch {
                throw InputError("--set \(flag)", "the value is not valid YAML: \(error)")
            }
            tree = setting(tree, path[0], path[1], to: value)
            config = try decode(tree, source: "--set \(flag)")
        }
        return config
    }

    private static func checkKnown(_ section: String, _ key: String, source: String) throws {
        guard let keys = knownKeys[section] else {
            throw InputError(
                source,
                "unknown key '\(section).\(key)': there is no section '\(section)'; "
                    + "sections are: \(sectionNames.joined(separator: ", "))"
            )
        }
        guard keys.contains(key) else {
            throw InputError(
                source, "unknown key '\(section).\(key)'; keys of '\(section)' are: \(keys.joined(separator: ", "))")
        }
    }

    /// The defaults as a YAML tree (optional keys without a default are absent).
    private static func defaultsTree() throws -> Node {
        let text = try YAMLEncoder().encode(TrainConfig())
        return try Yams.compose(yaml: text)!
    }

    /// `tree` with `section.key` set to `value`.
    private static func setting(_ tree: Node, _ section: String, _ key: String, to value: Node) -> Node {
        var top = tree.mapping ?? Node.Mapping([])
        var fields = top[section]?.mapping ?? Node.Mapping([])
        fields[key] = value
        top[section] = Node.mapping(fields)
        return Node.mapping(top)
    }

    private static func decode(_ tree: Node, source: String) throws -> TrainConfig {
        do { return try YAMLDecoder().decode(TrainConfig.self, from: tree) } catch let e as DecodingError {
            throw InputError(source, describe(e, tree: tree))
        }
    }

    /// A person's reading of a decoding error: "train.steps: expected a whole number, got 'many'".
    /// With the tree the value was decoded from, the offending value is quoted.
    static func describe(_ e: DecodingError, tree: Node? = nil) -> String {
        func path(_ p: [CodingKey]) -> String {
            p.map { $0.intValue.map { "[\($0)]" } ?? ".\($0.stringValue)" }.joined().trimmingCharacters(in: ["."])
        }
        func value(at p: [CodingKey]) -> String {
            var node = tree
            for k in p {
                if let i = k.intValue {
                    node = node?.sequence.flatMap { i < $0.count ? $0[i] : nil }
                } else {
                    node = node?.mapping?[k.stringValue]
                }
            }
            guard let node else { return "" }
            let text =
                node.scalar?.string
                ?? ((try? Yams.serialize(node: node))?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "")
            return ", got '\(text)'"
        }
        func expected(_ t: Any.Type) -> String {
            switch t {
            case is Int.Type: return "a whole number"
            case is Double.Type, is Float.Type: return "a number"
            case is Bool.Type: return "true or false"
            case is String.Type: return "a string"
            default:
                let name = "\(t)"
                if name.contains("Array") || name.contains("Sequence") { return "a list" }
                if name.contains("Dictionary") || name.contains("Mapping") { return "a mapping" }
                return name
            }
        }
        switch e {
        case .typeMismatch(let t, let c):
            return "\(path(c.codingPath)): expected \(expected(t))\(value(at: c.codingPath))"
        case .valueNotFound(let t, let c): return "\(path(c.codingPath)): expected \(expected(t)), got nothing (null)"
        case .keyNotFound(let k, let c): return "\(path(c.codingPath + [k])): required key is missing"
        case .dataCorrupted(let c): return "\(path(c.codingPath)): \(c.debugDescription)\(value(at: c.codingPath))"
        @unknown default: return "\(e)"
        }
    }
}

// MARK: - Output

extension TrainConfig {
    /// The resolved config as YAML (sections and keys in declaration order), numbers written the
    /// way Swift prints them ("0.0001", "25.0"; Yams alone would write "1e-4", "2.5e+1").
    public func yamlString() -> String {
        func tidy(_ n: Node) -> Node {
            switch n {
            case .scalar where Resolver.default.resolveTag(of: n) == .float:
                guard let d = n.float else { return n }
                return Node("\(d)", Tag(.float))
            case .mapping(let m): return .mapping(Node.Mapping(m.map { ($0.key, tidy($0.value)) }))
            case .sequence(let q): return .sequence(Node.Sequence(q.map(tidy)))
            default: return n
            }
        }
        guard let text = try? YAMLEncoder().encode(self), let node = try? Yams.compose(yaml: text),
            let out = try? Yams.serialize(node: tidy(node))
        else { return "# could not encode the config\n" }
        return out
    }

    /// The resolved config as JSON (sorted keys), as saved in checkpoint manifests.
    public func jsonString(pretty: Bool = true) -> String {
        let enc = JSONEncoder()
        enc.outputFormatting = pretty ? [.prettyPrinted, .sortedKeys] : [.sortedKeys]
        return String(decoding: try! enc.encode(self), as: UTF8.self)
    }
}

// MARK: - Validation and derived values

extension TrainConfig {
    /// Checks every value a person could get wrong, for a run on `worldSize` ranks, and reports
    /// all problems at once; `source` names the config in the error.
    public func validate(worldSize: Int, source: String = "config") throws {
        var problems: [String] = []
        func need(_ ok: Bool, _ s: @autoclosure () -> String) { if !ok { problems.append(s()) } }

        let m = model
        need(
            BaseRegistry.names.contains(m.base),
            "model.base '\(m.base)' is unknown; known: \(BaseRegistry.names.joined(separator: ", "))")
        if let p = m.preset {
            let names =
                m.base == "open-magvit2"
                ? ModelConfig.openMAGVIT2PresetNames
                : m.base == "rar" ? ModelConfig.rarPresetNames : ModelConfig.presetNames
            let known = names.joined(separator: ", ")
            need(names.contains(p), "model.preset '\(p)' is unknown for model.base \(m.base); known: \(known)")
        } else {
            need(
                m.dim != nil && m.nLayer != nil && m.nHead != nil,
                "model: without a preset, dim, n_layer and n_head are all required")
        }
        // Every number within its meaningful range (issue 17): the message names the key and the range.
        func within<T: Comparable>(_ key: String, _ v: T?, _ lo: T, _ hi: T, _ note: String = "") {
            guard let v else { return }
            need(v >= lo && v <= hi, "\(key) must be in [\(lo), \(hi)]\(note), got \(v)")
        }
        func atLeast(_ key: String, _ v: Int, _ lo: Int, _ note: String = "") {
            need(v >= lo, "\(key) must be at least \(lo)\(note), got \(v)")
        }
        within("model.dim", m.dim, 1, 65536)
        within("model.n_layer", m.nLayer, 0, 1024)
        within("model.n_head", m.nHead, 1, 1024)
        within("model.ffn_hidden", m.ffnHidden, 1, 1 << 20)
        within("model.window", m.window, 1, 1024, " (k)")
        within("model.plugin_depth", m.pluginDepth, 0, 256, " (d)")
        if let f = m.factorizedNLayer {
            need(m.base == "open-magvit2", "model.factorized_n_layer applies to model.base open-magvit2 only")
            within("model.factorized_n_layer", f, 1, 1024)
        }
        need(
            m.window == 1 || m.pluginDepth >= 1,
            "model.window \(m.window) > 1 needs a plug-in: set model.plugin_depth >= 1")

        if let w = loss.slotWeights {
            need(
                w.count == m.window,
                "loss.slot_weights has \(w.count) values but model.window (k) is \(m.window): give one weight per slot")
            need(w.allSatisfy { $0 >= 0 && $0 <= 1000 }, "loss.slot_weights must be numbers in [0, 1000], got \(w)")
            need(w.reduce(0, +) > 0, "loss.slot_weights must not all be zero")
        }
        need(!data.train.isEmpty, "data.train must name the training token cache folder")
        within("data.val_samples", data.valSamples, 1, 1 << 40, " (leave it out to use all)")

        let o = optim
        within("optim.lr_plugin", o.lrPlugin, 0, 1, " (0 freezes the group)")
        within("optim.lr_base", o.lrBase, 0, 1, " (0 freezes the group)")
        within("optim.final_lr_plugin", o.finalLrPlugin, 0, 1)
        within("optim.final_lr_base", o.finalLrBase, 0, 1)
        need(
            o.lrPlugin > 0 || o.lrBase > 0 || o.finalLrPlugin > 0 || o.finalLrBase > 0,
            "optim: both learning rates are 0, nothing would train")
        atLeast("optim.warmup_plugin", o.warmupPlugin, 0)
        atLeast("optim.warmup_base", o.warmupBase, 0)
        need(
            o.warmupPlugin < train.steps && o.warmupBase < train.steps || train.steps <= 0,
            "optim: warm-up (\(o.warmupPlugin), \(o.warmupBase) steps) must be shorter than "
                + "train.steps (\(train.steps))"
        )
        need(
            o.betas.count == 2 && o.betas.allSatisfy { $0 >= 0 && $0 < 1 },
            "optim.betas must be two numbers in [0, 1), got \(o.betas)")
        within("optim.eps", o.eps, 1e-30, 1)
        within("optim.weight_decay", o.weightDecay, 0, 1, " (decoupled: the fraction of lr x weight removed per step)")
        within("optim.clip", o.clip, 0, 1e6, " (0 turns clipping off)")

        let t = train
        within("train.steps", t.steps, 1, 1 << 40)
        within("train.global_batch", t.globalBatch, 1, 1 << 24)
        within("train.micro_batch", t.microBatch, 1, 1 << 20)
        within("train.seed", t.seed, 0, Int(Int32.max))
        need(t.dropout >= 0 && t.dropout < 1, "train.dropout must be in [0, 1), got \(t.dropout)")
        within("train.label_drop", t.labelDrop, 0, 1)
        atLeast("train.log_every", t.logEvery, 1)
        atLeast("train.val_every", t.valEvery, 0, " (0: only at the end)")
        within("train.max_skipped_steps", t.maxSkippedSteps, 0, 1 << 20)
        within("train.parallel_micro_batches", t.parallelMicroBatches, 1, 256)
        need(
            t.parallelMicroBatches == 1 || dist.shardOptimizer != .statesAndGrads,
            "train.parallel_micro_batches \(t.parallelMicroBatches) needs dist.shard_optimizer none or states: "
                + "states+grads reduce-scatters each micro-batch's gradient as its backward runs")
        need(
            t.emaDecay.map { $0 >= 0 && $0 <= 1 } ?? true,
            "train.ema_decay must be in [0, 1] (or null: off), got \(t.emaDecay ?? 0)")
        if let r = t.randomOrder { problems += r.problems(base: m.base, pluginDepth: m.pluginDepth) }
        need(worldSize >= 1, "world size must be at least 1, got \(worldSize)")
        if t.globalBatch > 0 && t.microBatch > 0 && worldSize >= 1 {
            let perStep = t.microBatch * worldSize
            if t.globalBatch % perStep != 0 {
                let fits = (1...t.globalBatch).filter { t.globalBatch % ($0 * worldSize) == 0 }
                problems.append(
                    "train.global_batch \(t.globalBatch) is not a multiple of train.micro_batch \(t.microBatch) "
                        + "x \(worldSize) rank(s) = \(perStep): "
                        + "gradient accumulation needs a whole number of micro-batches. "
                        + (fits.isEmpty
                            ? "No micro_batch works with \(worldSize) ranks: change global_batch or the rank count."
                            : "micro_batch values that work with \(worldSize) rank(s): "
                                + fits.map(String.init).joined(separator: ", "))
                )
            }
        }

        need(dist.bucketMB > 0 && dist.bucketMB <= 65536, "dist.bucket_mb must be in (0, 65536], got \(dist.bucketMB)")
        within("dist.collective_timeout_s", dist.collectiveTimeoutSeconds, 1, 1e7)
        if case .count(let n) = dist.threadsPerRank { within("dist.threads_per_rank", n, 1, 4096, " or auto") }

        let c = checkpoint
        atLeast("checkpoint.every", c.every, 0, " (0: only at the end)")
        within("checkpoint.keep_last", c.keepLast, 1, 1 << 20)
        atLeast("checkpoint.keep_every", c.keepEvery, 0, " (0: none)")
        need(!c.dir.isEmpty, "checkpoint.dir must not be empty")
        if let r = c.run {
            need(
                !r.isEmpty && !r.contains("/") && r != "." && r != "..",
                "checkpoint.run must be a plain folder name, got '\(r)'")
        }

        if !problems.isEmpty {
            throw InputError(
                source,
                problems.count == 1
                    ? problems[0] : "\(problems.count) problems:\n  - " + problems.joined(separator: "\n  - "))
        }
    }

    /// Micro-batches per rank per optimizer step: global_batch / (micro_batch * worldSize).
    /// Call after `validate(worldSize:)`.
    public func accumulationSteps(worldSize: Int) -> Int { train.globalBatch / (train.microBatch * worldSize) }

    /// Micro-batches a rank runs side by side: `train.parallel_micro_batches`, at most one per
    /// micro-batch it has. Call after `validate(worldSize:)`.
    public func lanes(worldSize: Int) -> Int {
        min(train.parallelMicroBatches, accumulationSteps(worldSize: worldSize))
    }

    /// The learning-rate schedule of one group over the run.
    public func schedule(_ g: ParameterGroup) -> LRSchedule {
        let o = optim
        switch g {
        case .base:
            return LRSchedule(
                kind: o.scheduleBase, peak: o.lrBase, final: o.finalLrBase, warmup: o.warmupBase, total: train.steps)
        case .plugin:
            return LRSchedule(
                kind: o.schedulePlugin, peak: o.lrPlugin, final: o.finalLrPlugin, warmup: o.warmupPlugin,
                total: train.steps)
        }
    }

    /// Both groups' rates for update `step` (0-based).
    public func learningRates(at step: Int) -> PerGroup<Float> {
        PerGroup(base: Float(schedule(.base).lr(at: step)), plugin: Float(schedule(.plugin).lr(at: step)))
    }

    /// Which groups train: a group whose rate is 0 for the whole run is frozen (no moments).
    public var trainableGroups: PerGroup<Bool> {
        PerGroup(base: !schedule(.base).isZeroThroughout, plugin: !schedule(.plugin).isZeroThroughout)
    }

    /// Each group's weight-decay rule: `optim.decay_rule_*`, else the base's own for the base
    /// group (`BaseRegistry.defaultDecayRule`) and `project` for the plug-in.
    public var decayRules: PerGroup<DecayRule> {
        PerGroup(
            base: optim.decayRuleBase ?? BaseRegistry.defaultDecayRule(base: model.base),
            plugin: optim.decayRulePlugin ?? .project)
    }

    /// Resuming `manifest` (at `path`) under this config: a group trained now must keep the
    /// weight-decay rule it was trained with (the moments and weights it built up assume it).
    public func checkResumable(_ manifest: CheckpointManifest, path: String) throws {
        let then = manifest.config.decayRules
        for g in PerGroup<DecayRule>.groups where trainableGroups[g] && then[g] != decayRules[g] {
            let key = "optim.decay_rule_\(g.rawValue)"
            throw InputError(
                path,
                "\(key) is \(decayRules[g].rawValue) but the checkpoint was trained with \(then[g].rawValue): "
                    + "resume with --set \(key)=\(then[g].rawValue), or start a new run (another checkpoint.run)")
        }
    }

    public var adamWSettings: AdamWSettings {
        AdamWSettings(
            beta1: Float(optim.betas[0]), beta2: Float(optim.betas[1]), eps: Float(optim.eps),
            weightDecay: Float(optim.weightDecay))
    }

    /// Gradient clip for `AdamW.step`: nil when off.
    public var clipNorm: Float? { optim.clip > 0 ? Float(optim.clip) : nil }

    /// The folder of this run's checkpoints: `<checkpoint.dir>/<checkpoint.run>`.
    public var runDirectory: String { (checkpoint.dir as NSString).appendingPathComponent(checkpoint.run ?? "default") }
}

extension TrainConfig.ModelSection {
    /// The model's full shape: the preset (if any), the explicit fields over it, and the dataset's
    /// vocabulary, classes and grid. Validated (SPEC section 2 rules); errors name `source`.
    public func resolve(
        vocabSize: Int, numClasses: Int, gridSize: Int, source: String = "config (model section)"
    ) throws -> ModelConfig {
        guard BaseRegistry.names.contains(base) else {
            let known = BaseRegistry.names.joined(separator: ", ")
            throw InputError(source, "model.base '\(base)' is unknown; known: \(known)")
        }
        var c: ModelConfig
        if let preset {
            do {
                c = try ModelConfig.preset(
                    preset, base: base, vocabSize: vocabSize, numClasses: numClasses,
                    gridSize: gridSize)
            } catch let e as InputError {
                throw InputError(source, "model.preset: \(e.problem)")
            }
        } else {
            guard let dim, let nLayer, let nHead else {
                throw InputError(source, "model: without a preset, dim, n_layer and n_head are all required")
            }
            c = ModelConfig(
                vocabSize: vocabSize, numClasses: numClasses, gridSize: gridSize, dim: dim, nLayer: nLayer, nHead: nHead
            )
            if base == "open-magvit2" {
                // SPEC section 8's split of the dataset's V (2^6 x 2^12 for 2^18); Lf 2 unless given
                c.factorizedBits = ModelConfig.defaultFactorizedBits(vocabSize: vocabSize) ?? []
                c.factorizedNLayer = 2
            }
            if base == "rar" { c.normEps = 1e-6 }  // SPEC section 9 (choice)
        }
        if let factorizedNLayer { c.factorizedNLayer = factorizedNLayer }
        if let dim {
            c.dim = dim
            // RAR's MLP is 4D wide (SPEC section 9's presets but XXL); the others' section 2 formula
            c.ffnHidden = base == "rar" ? 4 * dim : ModelConfig.defaultFFNHidden(dim: dim)
        }
        if let nLayer { c.nLayer = nLayer }
        if let nHead { c.nHead = nHead }
        if let ffnHidden { c.ffnHidden = ffnHidden }
        c.base = base
        c.window = window
        c.pluginDepth = pluginDepth
        c.residual = residual
        try c.validate(source: source)
        return c
    }
}
