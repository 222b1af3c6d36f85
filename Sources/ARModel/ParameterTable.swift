import Kernels

/// Which AdamW group a parameter belongs to (SPEC section 3: "plugin" vs "base").
public enum ParameterGroup: String, Codable, Sendable { case base, plugin }

/// How a parameter starts (SPEC tables, "init" column).
public enum ParameterInit: Equatable, Sendable { case normal(Float), ones, zeros }

/// One named view into the flat parameter buffer.
public struct ParameterEntry: Codable, Equatable, Sendable {
    public let name: String
    public let shape: [Int]
    public let group: ParameterGroup
    public let offset: Int
    public var count: Int { shape.reduce(1, *) }
    public var isMatrix: Bool { shape.count >= 2 }  // weight decay applies (SPEC section 6)
}

/// The size table: every parameter of a config, in one fixed order, base group first and the
/// plug-in after it, so each group is one contiguous range of the flat buffer.
public struct ParameterTable: Sendable {
    public private(set) var entries: [ParameterEntry] = []
    public private(set) var inits: [ParameterInit] = []
    public private(set) var total = 0
    private var index: [String: Int] = [:]

    public init(_ c: ModelConfig) {
        let D = c.dim, F = c.ffnHidden, V = c.vocabSize
        func add(_ name: String, _ shape: [Int], _ g: ParameterGroup, _ i: ParameterInit) {
            index[name] = entries.count
            entries.append(ParameterEntry(name: name, shape: shape, group: g, offset: total))
            inits.append(i)
            total += shape.reduce(1, *)
        }
        func block(_ prefix: String, _ g: ParameterGroup) {
            add("\(prefix).attention_norm.weight", [D], g, .ones)
            add("\(prefix).attention.wqkv.weight", [3 * D, D], g, .normal(0.02))
            add("\(prefix).attention.wo.weight", [D, D], g, .normal(0.02))
            add("\(prefix).ffn_norm.weight", [D], g, .ones)
            add("\(prefix).feed_forward.w1.weight", [F, D], g, .normal(0.02))
            add("\(prefix).feed_forward.w3.weight", [F, D], g, .normal(0.02))
            add("\(prefix).feed_forward.w2.weight", [D, F], g, .normal(0.02))
        }
        add("cls_embedding.embedding_table.weight", [c.numClasses + 1, D], .base, .normal(0.02))
        add("tok_embeddings.weight", [V, D], .base, .normal(0.02))
        for l in 0..<c.nLayer { block("layers.\(l)", .base) }
        add("norm.weight", [D], .base, .ones)
        add("output.weight", [V, D], .base, .zeros)
        if c.hasPlugin {
            let k = c.window, d = c.pluginDepth
            let projInit: ParameterInit = c.residual ? .zeros : .normal(0.02)
            add("tensorar.in_query", [D], .plugin, .normal(0.02))
            add("tensorar.in_pos", [k, D], .plugin, .normal(0.02))
            add("tensorar.in_pad", [D], .plugin, .normal(0.02))
            for i in 0..<d { block("tensorar.encoder.layers.\(i)", .plugin) }
            add("tensorar.encoder.norm.weight", [D], .plugin, .ones)
            add("tensorar.encoder.proj.weight", [D, D], .plugin, projInit)
            add("tensorar.out_pos", [k, D], .plugin, .normal(0.02))
            for i in 0..<d { block("tensorar.decoder.layers.\(i)", .plugin) }
            add("tensorar.decoder.norm.weight", [D], .plugin, .ones)
            add("tensorar.decoder.proj.weight", [D, D], .plugin, projInit)
        }
    }

    public func entry(_ name: String) -> ParameterEntry? { index[name].map { entries[$0] } }
    public func offset(_ name: String) -> Int {
        guard let i = index[name] else { fatalError("no parameter named \(name)") }
        return entries[i].offset
    }
    /// The flat range [start, end) holding one group (groups are contiguous by construction).
    public func range(of group: ParameterGroup) -> Range<Int> {
        let e = entries.filter { $0.group == group }
        guard let first = e.first, let last = e.last else { return total..<total }
        return first.offset..<(last.offset + last.count)
    }
    public func count(of group: ParameterGroup) -> Int { range(of: group).count }
}
