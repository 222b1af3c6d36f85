import Kernels

/// The base autoregressive model that the TensorAR plug-in wraps (SPEC section 3): LlamaGen
/// (section 2), Open-MAGVIT2 (section 8) and RAR (section 9). A base owns its parameter entries
/// (the "base" group), the input embedding of a token, the causal trunk over T positions, and the
/// head from one hidden state to the loss and logits of one target token. The plug-in
/// (`Transformer`: windows, encoder, decoder, windowed loss) and the sampler's slot loop are
/// written against this protocol only.
///
/// Conditioning: before every forward and every sampling step the caller hands the base a
/// `Conditioning` (`condition(_:)`): each sequence's class label (after label drop), its order,
/// and for each head row its sequence and the step whose token it predicts. LlamaGen and
/// Open-MAGVIT2 ignore it (their class is the input at position 0); RAR conditions every trunk
/// slot and every head row on it (adaLN, c_q = E[y] + S[q]), and its trunk adds its own cls slot
/// in front of the T positions and the position rows of the order (SPEC section 9).
///
/// Conventions: pointers are into the flat parameter (`p`) and gradient (`gp`) buffers laid out
/// by `ParameterTable`; rows are D floats; backward methods add into `gp` (zeroed once a step).
/// Every stage keeps what its own backward needs: call each backward after its forward.
protocol BaseModel: AnyObject {
    /// The `model.base` name (`tensorar.config` "base", SPEC section 7).
    static var name: String { get }
    /// Appends the base's parameters to the table, in checkpoint order.
    static func addParameters(_ c: ModelConfig, to table: inout ParameterTable)
    init(config: ModelConfig, table: ParameterTable)
    /// Adds the trunk's and the head's activations for `sequences` of T positions and `headRows`
    /// head rows (`ActivationLayout`); `bind` then takes them from the model's table.
    static func addActivations(_ c: ModelConfig, sequences: Int, headRows: Int, to a: inout ActivationLayout)
    func bind(_ t: ActivationTable, sequences: Int, headRows: Int)

    // MARK: inputs
    /// Position 0's input: the class embedding of `label` in [0, C] (C: the null class).
    func embedClass(_ out: FloatPtr, label: Int, params p: FloatPtr)
    func embedClassBackward(_ dout: ConstFloatPtr, label: Int, grads gp: FloatPtr)
    /// The input embeddings of `n` tokens (n, D) (LlamaGen: `tok_embeddings`; Open-MAGVIT2: the
    /// sum of its two sub-token tables, SPEC section 8). Never called with a pad (-1).
    func embedTokens(_ out: FloatPtr, _ ids: UnsafePointer<Int32>, n: Int, params p: FloatPtr)
    func embedTokensBackward(_ dout: ConstFloatPtr, _ ids: UnsafePointer<Int32>, n: Int, grads gp: FloatPtr)
    /// Flat range of the input-embedding parameters, final after `embed*Backward` of a step.
    var embeddingRange: Range<Int> { get }

    // MARK: trunk
    /// The causal stack over `sequences` of T positions, x (sequences * T, D) in place.
    /// `needed(range)` is called with each of `trunkRanges` (in forward order, the reverse of
    /// backward's) before the trunk first reads it; the embedding range (RAR's trunk reads its
    /// position and condition tables) was announced by the inputs stage before (`Transformer.forward`).
    func trunkForward(
        _ x: FlatBuffer, sequences: Int, dropout: DropoutPlan?, params p: FloatPtr, needed: ((Range<Int>) -> Void)?)
    /// dx in: gradient w.r.t. the trunk's output; out: w.r.t. its input. `onReady(range)` fires
    /// as each range of the trunk's parameters is final, in backward order.
    func trunkBackward(_ dx: FlatBuffer, params p: FloatPtr, grads gp: FloatPtr, onReady: ((Range<Int>) -> Void)?)
    /// The ranges `trunkBackward` reports, in its order.
    var trunkRanges: [Range<Int>] { get }
    /// A KV cache for `rows` sequences of up to T positions, for `trunkStep`.
    func makeTrunkCache(rows: Int) -> any TrunkCache
    /// Sampling: position `position` of every cached row, x (rows, D) in place (SPEC section 5).
    func trunkStep(_ x: FloatPtr, cache: any TrunkCache, position: Int, params p: FloatPtr)

    // MARK: conditioning
    /// What the next forward or sampling step conditions on (see above); the default ignores it.
    func condition(_ c: Conditioning)
    /// Whether the inputs get the token dropout of SPEC section 2 (RAR: none on embeddings, SPEC
    /// section 9).
    static var tokenDropout: Bool { get }
    /// Whether the plug-in's encoder output depends on the class (RAR conditions its blocks on
    /// c_q = E[y] + S[q]): then the sampler runs the encoder on the null rows too.
    var classConditionsPlugin: Bool { get }

    // MARK: head
    /// The head over `rows` hidden states h (rows, D) in `targets` order: fills `losses[r]` with
    /// the cross entropy against `targets[r]` (rows with target -1 get 0 and are skipped unless
    /// `logits` is given). The head sees the target itself (Open-MAGVIT2's post sub-token is
    /// predicted from the true pre sub-token, SPEC section 8). `logits` (rows, sum of `headParts`), when
    /// given, receives every row's logits, part after part (Open-MAGVIT2: pre, then post given the
    /// target's pre). `dropout`: training dropout for a head with blocks of its own (Open-MAGVIT2's
    /// factorized stack, SPEC section 8; rows are per-sample contiguous, `rows / samples` each).
    /// With `gradient`, `headBackward` follows and is the gradient of sum_r dloss[r] * loss_r: the
    /// head keeps what that needs, and may form its parameters' gradient already (LlamaGen does).
    func headForward(
        _ h: FlatBuffer, rows: Int, targets: [Int32], losses: inout [Float],
        logits: UnsafeMutablePointer<Float>?, dropout: DropoutPlan?, gradient: HeadGradient?,
        params p: FloatPtr)
    /// dh (rows, D) out: the gradient w.r.t. h of the last forward's `gradient.dloss`-weighted loss.
    func headBackward(_ dh: FlatBuffer, params p: FloatPtr, grads gp: FloatPtr)
    /// Flat range of the head's parameters, final after `headBackward`.
    var headRange: Range<Int> { get }
    /// Sampling: the widths of the parts a token is chosen in, in order (LlamaGen: [V];
    /// Open-MAGVIT2: [64, 4096], pre then post).
    var headParts: [Int] { get }
    /// Sampling: part `part`'s logits (rows, headParts[part]) for hidden states h (rows, D);
    /// `chosen[q]` holds the parts q < part already chosen for each row.
    func headLogits(_ out: FloatPtr, _ h: ConstFloatPtr, rows: Int, part: Int, chosen: [[Int32]], params p: FloatPtr)
    /// The token made of one choice per part.
    func token(parts: [Int32]) -> Int32

    /// Names of the parts a row's loss is the sum of (Open-MAGVIT2: ["pre", "post"], SPEC
    /// section 8); empty when the loss is one cross entropy (LlamaGen).
    var lossPartNames: [String] { get }
    /// After `headForward`: per part in `lossPartNames`, each row's term (they add up to `losses`).
    var partLosses: [[Float]] { get }

    // MARK: facts for noise and FLOP counts (static: they need no weights)
    /// The input-embedding tables a token is looked up in, for `discrete` noise (SPEC sections 4, 8).
    static func tokenFactors(_ c: ModelConfig) -> [TokenFactor]
    /// Forward matmul FLOPs of the head over `rows` rows, `validRows` of them with a target.
    static func headFLOPs(_ c: ModelConfig, rows: Int, validRows: Int) -> Double
    /// Matmul FLOPs of `headLogits` over every part for `rows` rows (one sampling step).
    static func samplingHeadFLOPs(_ c: ModelConfig, rows: Int) -> Double

    // MARK: training facts
    /// The weight-decay rule of the base group when `optim.decay_rule_base` is not given
    /// (default `project`; RAR's base uses `rar`, SPEC section 9 Recipe).
    static var defaultDecayRule: DecayRule { get }
    /// Whether the trunk reads `ModelBatch.orders` (a per-sample token order, SPEC section 9
    /// Random order); `train.random_order` is refused for a base that does not (default false).
    static var readsSampleOrders: Bool { get }
}

extension BaseModel {
    var lossPartNames: [String] { [] }
    var partLosses: [[Float]] { [] }
    func condition(_ c: Conditioning) {}
    static var tokenDropout: Bool { true }
    var classConditionsPlugin: Bool { false }
    static var defaultDecayRule: DecayRule { .project }
    static var readsSampleOrders: Bool { false }
}

/// Per-forward facts a base may condition on (`BaseModel.condition`; RAR, SPEC section 9).
struct Conditioning {
    /// (sequences) each sequence's class in [0, C] (C: the null class), after label drop.
    var labels: [Int32]
    /// (sequences, T) each sequence's order pi: step i feeds and predicts x_{pi(i)}; nil: raster.
    var orders: [Int32]?
    /// Per head row: its sequence, and the step (0 ..< T; past T for a slot past the image end)
    /// whose token it predicts.
    var headSequence: [Int32]
    var headStep: [Int32]
    /// Per plug-in encoder tensor and per decoder state: its sequence and its SPEC position p
    /// (RAR conditions the plug-in's blocks on c_{p+1}, SPEC section 9's last paragraph).
    var encoderSequence: [Int32] = [], encoderPosition: [Int32] = []
    var decoderSequence: [Int32] = [], decoderPosition: [Int32] = []

    /// Training rows ordered (b, p, j) over `sequences` x T x `slots`: row (b, p, j) predicts step
    /// p + j; encoder tensors (b, p - 1) for p = 1 ..< T, decoder states (b, p).
    static func training(labels: [Int32], orders: [Int32]?, seqLen T: Int, slots: Int) -> Conditioning {
        let B = labels.count
        var seq = [Int32](repeating: 0, count: B * T * slots)
        var step = seq
        for b in 0..<B {
            for p in 0..<T {
                for j in 0..<slots {
                    seq[(b * T + p) * slots + j] = Int32(b)
                    step[(b * T + p) * slots + j] = Int32(p + j)
                }
            }
        }
        var c = Conditioning(labels: labels, orders: orders, headSequence: seq, headStep: step)
        let E = B * (T - 1)
        c.encoderSequence = (0..<E).map { Int32($0 / (T - 1)) }
        c.encoderPosition = (0..<E).map { Int32($0 % (T - 1) + 1) }
        c.decoderSequence = (0..<(B * T)).map { Int32($0 / T) }
        c.decoderPosition = (0..<(B * T)).map { Int32($0 % T) }
        return c
    }

    /// Sampling rows ordered (row, j) at step `position`: row (r, j) predicts step position + j;
    /// encoder and decoder rows are the rows themselves, all at `position`.
    static func sampling(labels: [Int32], slots: Int, position: Int) -> Conditioning {
        let NB = labels.count
        let seq = (0..<(NB * slots)).map { Int32($0 / slots) }
        let step = (0..<(NB * slots)).map { Int32(position + $0 % slots) }
        var c = Conditioning(labels: labels, orders: nil, headSequence: seq, headStep: step)
        c.encoderSequence = (0..<NB).map { Int32($0) }
        c.encoderPosition = [Int32](repeating: Int32(position), count: NB)
        c.decoderSequence = c.encoderSequence
        c.decoderPosition = c.encoderPosition
        return c
    }
}

/// A base's KV cache for `trunkStep` (`KVCache` for the rotary trunks, `RARCache` for RAR).
protocol TrunkCache: AnyObject {
    var rows: Int { get }
}

/// A base whose class slot is one row of a table and whose trunk is a causal `BlockStack` of
/// section 2 blocks with the 2D rotary table: LlamaGen's layers (SPEC section 2) and
/// Open-MAGVIT2's spatial blocks (section 8). Those stages are written once, here.
protocol RotaryTrunkBase: BaseModel {
    var config: ModelConfig { get }
    var D: Int { get }
    /// Flat offset of the class table (C + 1 rows of D).
    var oCls: Int { get }
    var trunk: BlockStack { get }
    /// Flat range of each trunk block's weights (one gradient bucket hand-over per block).
    var layerRanges: [Range<Int>] { get }
}

extension RotaryTrunkBase {
    /// The trunk of blocks `prefix.0 .. prefix.{n_layer-1}` and each block's flat range.
    static func rotaryTrunk(_ c: ModelConfig, _ table: ParameterTable, prefix: String) -> (BlockStack, [Range<Int>]) {
        let rot = RotaryTable(seqLen: c.seqLen, gridW: c.gridSize, headDim: c.headDim, base: c.ropeBase)
        let weights = (0..<c.nLayer).map { BlockWeights(table, prefix: "\(prefix).\($0)") }
        let stack = BlockStack(
            weights: weights, causal: true, rotary: rot, dim: c.dim, heads: c.nHead,
            ffn: c.ffnHidden, eps: c.normEps, siteBase: 0)
        let ranges = (0..<c.nLayer).map {
            table.span("\(prefix).\($0).attention_norm.weight", "\(prefix).\($0).feed_forward.w2.weight")
        }
        return (stack, ranges)
    }

    func embedClass(_ out: FloatPtr, label: Int, params p: FloatPtr) {
        out.update(from: p + oCls + label * D, count: D)
    }
    func embedClassBackward(_ dout: ConstFloatPtr, label: Int, grads gp: FloatPtr) {
        let c = gp + oCls + label * D
        for i in 0..<D { c[i] += dout[i] }
    }

    func trunkForward(
        _ x: FlatBuffer, sequences: Int, dropout: DropoutPlan?, params p: FloatPtr, needed: ((Range<Int>) -> Void)?
    ) {
        let before = needed.map { needed in { [layerRanges] (l: Int) in needed(layerRanges[l]) } }
        trunk.forward(x, params: p, sequences: sequences, seqLen: config.seqLen, dropout: dropout, beforeBlock: before)
    }
    func trunkBackward(_ dx: FlatBuffer, params p: FloatPtr, grads gp: FloatPtr, onReady: ((Range<Int>) -> Void)?) {
        trunk.backward(dx, params: p, grads: gp) { [layerRanges] l in onReady?(layerRanges[l]) }
    }
    var trunkRanges: [Range<Int>] { layerRanges.reversed() }
    func makeTrunkCache(rows: Int) -> any TrunkCache { trunk.makeCache(rows: rows, seqLen: config.seqLen) }
    func trunkStep(_ x: FloatPtr, cache: any TrunkCache, position: Int, params p: FloatPtr) {
        trunk.step(x, cache: cache as! KVCache, position: position, params: p)
    }
}

/// One embedding table a token reads (SPEC section 8): its row is (token / stride) % rows. A
/// token is the sum over factors of row * stride. LlamaGen: one factor (tok_embeddings, V, 1).
public struct TokenFactor: Equatable, Sendable {
    public let name: String
    public let rows: Int
    public let stride: Int
}

/// What a head's forward is told when a backward will follow: the per-row weight of each loss
/// (w_j times the gradient scale, 0 for invalid rows) and the gradient buffer.
struct HeadGradient {
    let dloss: [Float]
    let grads: FloatPtr
}

/// `model.base` names to base types: a new base is one line here (and its own file).
public enum BaseRegistry {
    public static let names = ["llamagen", "open-magvit2", "rar"]
    static func type(named name: String) -> (any BaseModel.Type)? {
        switch name {
        case "llamagen": return LlamaGen.self
        case "open-magvit2": return OpenMAGVIT2.self
        case "rar": return RAR.self
        default: return nil
        }
    }
    /// The base group's weight-decay rule when the config names none (`project` for an unknown base).
    public static func defaultDecayRule(base name: String) -> DecayRule {
        type(named: name)?.defaultDecayRule ?? .project
    }
    /// Whether base `name` trains on per-sample token orders (`train.random_order`).
    public static func readsSampleOrders(base name: String) -> Bool { type(named: name)?.readsSampleOrders ?? false }
}
