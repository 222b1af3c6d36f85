import Kernels

/// Which AdamW group a parameter belongs to (SPEC section 3: "plugin" vs "base").
public enum ParameterGroup: String, Codable, Sendable { case base, plugin }

/// How a parameter starts (SPEC tables, "init" column).
public enum ParameterInit: Equatable, Sendable {
    case normal(Float)
    case ones, zeros
}

/// Which parameters of a group AdamW's decoupled weight decay applies to (`optim.decay_rule_base`,
/// `optim.decay_rule_plugin`).
public enum DecayRule: String, CaseIterable, Sendable {
    /// SPEC section 6: parameters of 2 or more dimensions.
    case project
    /// SPEC section 9 Recipe (RAR's): 2 or more dimensions and a name without any of
    /// `rarExemptSubstrings` (case-sensitive: `adaln_before_head.*` is exempt, `adaLN_modulation` is not).
    case rar

    /// The name parts that exempt a parameter from decay under the `rar` rule.
    public static let rarExemptSubstrings = [
        "ln", "bias", "embedding", "embed", "norm", "gamma", "mask_token", "latent_tokens",
    ]

    /// Whether the parameter `name` of `shape` is decayed under this rule.
    public func decays(name: String, shape: [Int]) -> Bool {
        guard shape.count >= 2 else { return false }
        switch self {
        case .project: return true
        case .rar: return !DecayRule.rarExemptSubstrings.contains { name.contains($0) }
        }
    }
}

/// One named view into the flat parameter buffer.
public struct ParameterEntry: Codable, Equatable, Sendable {
    public let name: String
    public let shape: [Int]
    public let group: ParameterGroup
    public let offset: Int
    /// Whether AdamW's weight decay applies: the `project` rule (SPEC section 6) unless the table
    /// was re-ruled (`ParameterTable.decaying`). Not stored in a checkpoint's table (the manifest's
    /// config records the rules), so a decoded entry has the `project` rule's flag.
    public private(set) var decay: Bool
    public var count: Int { shape.reduce(1, *) }
    public var isMatrix: Bool { shape.count >= 2 }

    public init(name: String, shape: [Int], group: ParameterGroup, offset: Int, decay: Bool? = nil) {
        self.name = name
        self.shape = shape
        self.group = group
        self.offset = offset
        self.decay = decay ?? DecayRule.project.decays(name: name, shape: shape)
    }

    enum CodingKeys: String, CodingKey { case name, shape, group, offset }
    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        self.init(
            name: try c.decode(String.self, forKey: .name), shape: try c.decode([Int].self, forKey: .shape),
            group: try c.decode(ParameterGroup.self, forKey: .group), offset: try c.decode(Int.self, forKey: .offset))
    }
    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(name, forKey: .name)
        try c.encode(shape, forKey: .shape)
        try c.encode(group, forKey: .group)
        try c.encode(offset, forKey: .offset)
    }
}

/// The size table: every parameter of a config, in one fixed order, the base's group first
/// (its entries from the base type, `BaseRegistry`) and the plug-in after it (SPEC section 3),
/// so each group is one contiguous range of the flat buffer.
public struct ParameterTable: Sendable {
    public private(set) var entries: [ParameterEntry] = []
    public private(set) var inits: [ParameterInit] = []
    public private(set) var total = 0
    private var index: [String: Int] = [:]

    public init(_ c: ModelConfig) {
        guard let base = BaseRegistry.type(named: c.base) else { fatalError("unknown model base '\(c.base)'") }
        base.addParameters(c, to: &self)
        if c.hasPlugin { Transformer.addPluginParameters(c, to: &self) }
    }

    /// Appends one entry at the end of the flat buffer.
    mutating func add(_ name: String, _ shape: [Int], _ g: ParameterGroup, _ i: ParameterInit) {
        precondition(index[name] == nil, "parameter \(name) added twice")
        index[name] = entries.count
        entries.append(ParameterEntry(name: name, shape: shape, group: g, offset: total))
        inits.append(i)
        total += shape.reduce(1, *)
    }

    /// A SPEC section 2 block's entries under `prefix` (w1 right before w3: see `BlockWeights`).
    mutating func addBlock(_ prefix: String, _ c: ModelConfig, _ g: ParameterGroup) {
        let D = c.dim
        let F = c.ffnHidden
        add("\(prefix).attention_norm.weight", [D], g, .ones)
        add("\(prefix).attention.wqkv.weight", [3 * D, D], g, .normal(0.02))
        add("\(prefix).attention.wo.weight", [D, D], g, .normal(0.02))
        add("\(prefix).ffn_norm.weight", [D], g, .ones)
        add("\(prefix).feed_forward.w1.weight", [F, D], g, .normal(0.02))
        add("\(prefix).feed_forward.w3.weight", [F, D], g, .normal(0.02))
        add("\(prefix).feed_forward.w2.weight", [D, F], g, .normal(0.02))
    }

    public func entry(_ name: String) -> ParameterEntry? { index[name].map { entries[$0] } }
    public func offset(_ name: String) -> Int {
        guard let i = index[name] else { fatalError("no parameter named \(name)") }
        return entries[i].offset
    }
    /// The flat range from the start of entry `first` to the end of entry `last`.
    public func span(_ first: String, _ last: String) -> Range<Int> {
        let e = entry(last)!
        return offset(first)..<(e.offset + e.count)
    }
    /// The flat range [start, end) holding one group (groups are contiguous by construction).
    public func range(of group: ParameterGroup) -> Range<Int> {
        let e = entries.filter { $0.group == group }
        guard let first = e.first, let last = e.last else { return total..<total }
        return first.offset..<(last.offset + last.count)
    }
    public func count(of group: ParameterGroup) -> Int { range(of: group).count }

    /// The same table with each entry's decay flag decided by the rule of its group (what AdamW
    /// is built with; the model keeps the `project` flags, which only AdamW reads).
    public func decaying(by rule: (ParameterGroup) -> DecayRule) -> ParameterTable {
        var t = self
        t.entries = entries.map {
            ParameterEntry(
                name: $0.name, shape: $0.shape, group: $0.group, offset: $0.offset,
                decay: rule($0.group).decays(name: $0.name, shape: $0.shape))
        }
        return t
    }
}
