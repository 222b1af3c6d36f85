import Foundation
import Platform

/// The model's shape: SPEC sections 2 and 3. Coding keys are the `tensorar.config` names of
/// SPEC section 7, so this struct is exactly the safetensors metadata.
public struct ModelConfig: Codable, Equatable, Sendable {
    public var vocabSize: Int
    public var numClasses: Int
    public var gridSize: Int
    public var dim: Int
    public var nLayer: Int
    public var nHead: Int
    public var ffnHidden: Int
    public var normEps: Float = 1e-5
    public var ropeBase: Float = 10000
    /// k: tokens per tensor (SPEC section 3). 1 with pluginDepth 0 is the plain base model.
    public var window: Int = 1
    /// d: blocks in the plug-in encoder and in the decoder; 0 means no plug-in.
    public var pluginDepth: Int = 0
    public var residual: Bool = true
    /// The base model's type, a `BaseRegistry` name (SPEC section 7 "base"; "llamagen" when absent,
    /// and then left out of the JSON, so files written before the field existed stay identical).
    public var base: String = LlamaGen.name
    /// Open-MAGVIT2 only (SPEC section 8): Lf, the blocks of the per-position factorized stack.
    public var factorizedNLayer: Int = 0
    /// Open-MAGVIT2 only (SPEC section 8): the sub-token widths in bits, pre first ([6, 12]
    /// upstream); vocab_size is 2^(sum). Both are written only for that base (choice, SPEC 8).
    public var factorizedBits: [Int] = []

    enum CodingKeys: String, CodingKey {
        case vocabSize = "vocab_size"
        case numClasses = "num_classes"
        case gridSize = "grid_size"
        case dim
        case nLayer = "n_layer"
        case nHead = "n_head"
        case ffnHidden = "ffn_hidden"
        case normEps = "norm_eps"
        case ropeBase = "rope_base"
        case window
        case pluginDepth = "plugin_depth"
        case residual, base
        case factorizedNLayer = "factorized_n_layer"
        case factorizedBits = "factorized_bits"
    }

    public init(
        vocabSize: Int, numClasses: Int, gridSize: Int, dim: Int, nLayer: Int, nHead: Int,
        ffnHidden: Int? = nil, window: Int = 1, pluginDepth: Int = 0, residual: Bool = true
    ) {
        self.vocabSize = vocabSize
        self.numClasses = numClasses
        self.gridSize = gridSize
        self.dim = dim
        self.nLayer = nLayer
        self.nHead = nHead
        self.ffnHidden = ffnHidden ?? ModelConfig.defaultFFNHidden(dim: dim)
        self.window = window
        self.pluginDepth = pluginDepth
        self.residual = residual
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        vocabSize = try c.decode(Int.self, forKey: .vocabSize)
        numClasses = try c.decode(Int.self, forKey: .numClasses)
        gridSize = try c.decode(Int.self, forKey: .gridSize)
        dim = try c.decode(Int.self, forKey: .dim)
        nLayer = try c.decode(Int.self, forKey: .nLayer)
        nHead = try c.decode(Int.self, forKey: .nHead)
        ffnHidden = try c.decodeIfPresent(Int.self, forKey: .ffnHidden) ?? ModelConfig.defaultFFNHidden(dim: dim)
        normEps = try c.decodeIfPresent(Float.self, forKey: .normEps) ?? 1e-5
        ropeBase = try c.decodeIfPresent(Float.self, forKey: .ropeBase) ?? 10000
        window = try c.decodeIfPresent(Int.self, forKey: .window) ?? 1
        pluginDepth = try c.decodeIfPresent(Int.self, forKey: .pluginDepth) ?? 0
        residual = try c.decodeIfPresent(Bool.self, forKey: .residual) ?? true
        base = try c.decodeIfPresent(String.self, forKey: .base) ?? LlamaGen.name
        factorizedNLayer = try c.decodeIfPresent(Int.self, forKey: .factorizedNLayer) ?? 0
        factorizedBits = try c.decodeIfPresent([Int].self, forKey: .factorizedBits) ?? []
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(vocabSize, forKey: .vocabSize)
        try c.encode(numClasses, forKey: .numClasses)
        try c.encode(gridSize, forKey: .gridSize)
        try c.encode(dim, forKey: .dim)
        try c.encode(nLayer, forKey: .nLayer)
        try c.encode(nHead, forKey: .nHead)
        try c.encode(ffnHidden, forKey: .ffnHidden)
        try c.encode(normEps, forKey: .normEps)
        try c.encode(ropeBase, forKey: .ropeBase)
        try c.encode(window, forKey: .window)
        try c.encode(pluginDepth, forKey: .pluginDepth)
        try c.encode(residual, forKey: .residual)
        if base != LlamaGen.name { try c.encode(base, forKey: .base) }
        if base == OpenMAGVIT2.name {
            try c.encode(factorizedNLayer, forKey: .factorizedNLayer)
            try c.encode(factorizedBits, forKey: .factorizedBits)
        }
    }

    /// Open-MAGVIT2's default split of V = 2^n codes (SPEC section 8: 2^18 = 2^6 x 2^12): the pre
    /// sub-token gets n / 3 bits, the post sub-token the rest (choice for other V; nil when V is
    /// not a power of two).
    public static func defaultFactorizedBits(vocabSize V: Int) -> [Int]? {
        guard V >= 4, V & (V - 1) == 0 else { return nil }
        let n = V.trailingZeroBitCount
        return [max(1, n / 3), n - max(1, n / 3)]
    }

    /// SPEC section 2: F = find_multiple(int(2 * 4D / 3), 256).
    public static func defaultFFNHidden(dim: Int) -> Int {
        let f = (2 * 4 * dim) / 3
        return (f + 255) / 256 * 256
    }

    public var seqLen: Int { gridSize * gridSize }  // T
    public var headDim: Int { dim / nHead }
    public var hasPlugin: Bool { pluginDepth > 0 }

    /// Problems a person can act on; `source` names the file or flag the config came from.
    public func validate(source: String = "model config") throws {
        func bad(_ s: String) -> InputError { InputError(source, s) }
        if BaseRegistry.type(named: base) == nil {
            throw bad("unknown base '\(base)'; known: \(BaseRegistry.names.joined(separator: ", "))")
        }
        if vocabSize < 2 { throw bad("vocab_size must be at least 2, got \(vocabSize)") }
        if numClasses < 1 { throw bad("num_classes must be at least 1, got \(numClasses)") }
        if gridSize < 1 { throw bad("grid_size must be at least 1, got \(gridSize)") }
        if dim < 1 || nHead < 1 || nLayer < 0 {
            throw bad(
                "dim, n_head must be positive and n_layer non-negative (dim \(dim), n_head \(nHead), n_layer \(nLayer))"
            )
        }
        if dim % nHead != 0 { throw bad("dim \(dim) is not divisible by n_head \(nHead)") }
        if headDim % 4 != 0 {
            throw bad(
                "head width dim/n_head = \(headDim) is not divisible by 4 (the 2D rotary table needs hd/4 frequencies)")
        }
        if ffnHidden < 1 { throw bad("ffn_hidden must be positive, got \(ffnHidden)") }
        if window < 1 { throw bad("window (k) must be at least 1, got \(window)") }
        if pluginDepth < 0 { throw bad("plugin_depth must be non-negative, got \(pluginDepth)") }
        if window > 1 && pluginDepth == 0 { throw bad("window \(window) > 1 needs a plug-in (plugin_depth >= 1)") }
        if window > seqLen { throw bad("window \(window) is longer than the image (\(seqLen) tokens)") }
        if base == OpenMAGVIT2.name { try validateFactorized(bad) }
        try checkBounds(source: source)
    }

    /// SPEC section 8: two sub-tokens whose bits add up to log2(vocab_size), Lf >= 1 blocks.
    private func validateFactorized(_ bad: (String) -> InputError) throws {
        if factorizedBits.count != 2 || factorizedBits.contains(where: { $0 < 1 }) {
            throw bad("factorized_bits must be two positive widths (pre, post), got \(factorizedBits)")
        }
        if factorizedBits.reduce(0, +) > 30 || 1 << factorizedBits.reduce(0, +) != vocabSize {
            throw bad("vocab_size \(vocabSize) is not 2^(\(factorizedBits.map(String.init).joined(separator: " + ")))")
        }
        if factorizedNLayer < 1 { throw bad("factorized_n_layer must be at least 1, got \(factorizedNLayer)") }
    }

    /// Upper bounds, so a damaged or hostile config cannot ask for absurd sizes (issue 17).
    func checkBounds(source: String) throws {
        let ints: [(String, Int, Int)] = [
            ("vocab_size", vocabSize, 1 << 24), ("num_classes", numClasses, 1 << 24),
            ("grid_size", gridSize, 1024), ("dim", dim, 65536), ("n_layer", nLayer, 1024),
            ("n_head", nHead, 1024), ("ffn_hidden", ffnHidden, 1 << 20),
            ("window", window, 1024), ("plugin_depth", pluginDepth, 256),
        ]
        for (key, v, hi) in ints where v > hi {
            throw InputError(source, "\(key) \(v) is larger than the most this program accepts (\(hi))")
        }
        guard normEps > 0 && normEps <= 1 else {
            throw InputError(source, "norm_eps must be in (0, 1], got \(normEps)")
        }
        guard ropeBase > 1 && ropeBase <= 1e12 else {
            throw InputError(source, "rope_base must be in (1, 1e12], got \(ropeBase)")
        }
    }

    /// Size presets (SPEC section 2). Parameter counts for V=16384, C=1000 beside them
    /// (base only; `tensorar-bench --params` prints them with and without the plug-in).
    public static let presetNames = ["tiny", "small", "B", "L", "XL", "XXL"]
    /// Open-MAGVIT2's presets (SPEC section 8), V = 2^18, C = 1000, 16x16 grid.
    public static let openMAGVIT2PresetNames = ["tiny", "small", "B", "L", "XL"]

    /// The preset `name` of the base `base` (a `BaseRegistry` name). `vocabSize` nil: the base's
    /// usual V (LlamaGen 16384, Open-MAGVIT2 262144).
    public static func preset(
        _ name: String, base: String = "llamagen", vocabSize: Int? = nil, numClasses: Int = 1000,
        gridSize: Int = 16
    ) throws -> ModelConfig {
        if base == OpenMAGVIT2.name {
            return try openMAGVIT2Preset(
                name, vocabSize: vocabSize ?? 262_144, numClasses: numClasses,
                gridSize: gridSize)
        }
        if base == RAR.name {
            return try rarPreset(name, vocabSize: vocabSize ?? 1024, numClasses: numClasses, gridSize: gridSize)
        }
        let vocabSize = vocabSize ?? 16384
        let shape: (Int, Int, Int)  // (L, NH, D)
        switch name {
        case "tiny": shape = (2, 2, 64)  // quick tests
        case "small": shape = (4, 4, 128)  // the default Fashion-MNIST run
        case "B": shape = (12, 12, 768)  // 110,888,448 (LlamaGen GPT-B)
        case "L": shape = (24, 16, 1024)  // 343M
        case "XL": shape = (36, 20, 1280)  // 775M
        case "XXL": shape = (48, 24, 1536)  // 1.4B
        default: throw InputError("--preset", "unknown preset '\(name)'; known: \(presetNames.joined(separator: ", "))")
        }
        return ModelConfig(
            vocabSize: vocabSize, numClasses: numClasses, gridSize: gridSize, dim: shape.2, nLayer: shape.0,
            nHead: shape.1)
    }

    /// SPEC section 8's table (head width 64, F from the section 2 formula), plus two small
    /// presets of the LlamaGen ones' shape for this machine (choice: Lf 1 and 2).
    static func openMAGVIT2Preset(
        _ name: String, vocabSize: Int, numClasses: Int,
        gridSize: Int
    ) throws -> ModelConfig {
        let shape: (Int, Int, Int, Int)  // (L, NH, D, Lf)
        switch name {
        case "tiny": shape = (2, 2, 64, 1)
        case "small": shape = (4, 4, 128, 2)
        case "B": shape = (24, 16, 1024, 2)  // 343,570,432
        case "L": shape = (36, 20, 1280, 3)  // 804,362,240
        case "XL": shape = (48, 24, 1536, 4)  // 1,486,679,040
        default:
            let known = openMAGVIT2PresetNames.joined(separator: ", ")
            throw InputError("--preset", "unknown Open-MAGVIT2 preset '\(name)'; known: \(known)")
        }
        guard let bits = defaultFactorizedBits(vocabSize: vocabSize) else {
            let problem = "Open-MAGVIT2 needs a power-of-two vocab_size (2^18 upstream), got \(vocabSize)"
            throw InputError("--preset", problem)
        }
        var c = ModelConfig(
            vocabSize: vocabSize, numClasses: numClasses, gridSize: gridSize, dim: shape.2,
            nLayer: shape.0, nHead: shape.1)
        c.base = OpenMAGVIT2.name
        c.factorizedNLayer = shape.3
        c.factorizedBits = bits
        return c
    }

    /// RAR's presets (SPEC section 9): NH 16, F as SPEC's table (4D, but 6144 for XXL), LayerNorm
    /// eps 1e-6 (choice, SPEC 9), V 1024; plus two small ones of the LlamaGen ones' shape for this
    /// machine (F = 4D).
    public static let rarPresetNames = ["tiny", "small", "B", "L", "XL", "XXL"]
    static func rarPreset(_ name: String, vocabSize: Int, numClasses: Int, gridSize: Int) throws -> ModelConfig {
        let shape: (Int, Int, Int, Int)  // (L, NH, D, F)
        switch name {
        case "tiny": shape = (2, 2, 64, 256)
        case "small": shape = (4, 4, 128, 512)
        case "B": shape = (24, 16, 768, 3072)  // 260,923,648
        case "L": shape = (24, 16, 1024, 4096)  // 461,668,352
        case "XL": shape = (32, 16, 1280, 5120)  // 955,425,024
        case "XXL": shape = (40, 16, 1408, 6144)  // 1,498,520,704
        default:
            let known = rarPresetNames.joined(separator: ", ")
            throw InputError("--preset", "unknown RAR preset '\(name)'; known: \(known)")
        }
        var c = ModelConfig(
            vocabSize: vocabSize, numClasses: numClasses, gridSize: gridSize, dim: shape.2, nLayer: shape.0,
            nHead: shape.1, ffnHidden: shape.3)
        c.base = RAR.name
        c.normEps = 1e-6
        return c
    }

    public func jsonString() -> String {
        let enc = JSONEncoder()
        enc.outputFormatting = [.sortedKeys]
        return String(data: try! enc.encode(self), encoding: .utf8)!
    }
}
