import Kernels

/// When an activation buffer is needed: by every forward, only by a forward with dropout (the
/// masks), or only by backward (gradient scratch). A table allocates each part on first use, so
/// evaluation and sampling never hold the backward's buffers.
enum ActivationPart: CaseIterable { case forward, dropout, backward }

/// One named activation buffer; `shape` is its (rows, ...) shape, as written beside its `add`.
struct ActivationEntry {
    let name: String
    let shape: [Int]
    let part: ActivationPart
    var count: Int { shape.reduce(1, *) }
}

/// Activation checkpointing (`train.recompute`, issue 15). `none`: every block keeps all the
/// activations its backward reads. `blocks`: a block stack keeps only each block's input (and
/// what its type names in `BlockActivationNames.kept`), plus one block's worth of activations that
/// every block uses in turn; backward runs each block's forward again from its input before its
/// backward (`RecomputableStack`). Gradients are the same bits:
/// the same kernels run on the same inputs, and dropout masks are keyed, so they come out again.
public enum ActivationRecompute: String, CaseIterable, Sendable {
    case none
    case blocks
}

/// The sizes of every activation buffer of a model (or a sampler) for one batch shape: each
/// stage adds its entries (`BlockStack.addActivations`, `BaseModel.addActivations`, the plug-in's
/// stages, `Transformer`), and the same list both allocates the buffers and gives the memory.
/// `recompute` tells the block stacks which layout to add (`addBlocks`); they read it back from
/// their table's layout when they bind.
struct ActivationLayout {
    private(set) var entries: [ActivationEntry] = []
    var recompute = ActivationRecompute.none
    init(recompute: ActivationRecompute = .none) { self.recompute = recompute }
    mutating func add(_ name: String, _ shape: [Int], _ part: ActivationPart = .forward) {
        entries.append(ActivationEntry(name: name, shape: shape, part: part))
    }
    /// A buffer several stages use in turn (never two at once): one entry, the largest shape asked.
    mutating func addShared(_ name: String, _ shape: [Int], _ part: ActivationPart = .forward) {
        guard let i = entries.firstIndex(where: { $0.name == name }) else { return add(name, shape, part) }
        precondition(entries[i].part == part, "shared activation \(name) asked for in two parts")
        let e = ActivationEntry(name: name, shape: shape, part: part)
        if e.count > entries[i].count { entries[i] = e }
    }
    /// Bytes of the entries of `parts`.
    func bytes(_ parts: Set<ActivationPart>) -> Int {
        entries.filter { parts.contains($0.part) }.reduce(0) { $0 + max($1.count, 1) * 4 }
    }
}

/// Where block l of a stack under `prefix` keeps its activations: its input always in a buffer of
/// its own (`prefix.l.xIn`), and so are the activations named in `kept` (what spares a block's
/// recompute most for its size: a RAR block's fc2 output); the rest in buffers of its own
/// (`prefix.l.NAME`, recompute none) or in the block workspace (`blocks.NAME`, recompute blocks)
/// that every block of every stack of the model uses in turn, sized for the largest
/// (`ActivationLayout.addShared`). The stack's scratch (`scratch`) is per stack under none, as
/// before recompute existed, and shared under blocks.
struct BlockActivationNames {
    static let workspace = "blocks"
    let prefix: String
    let recompute: ActivationRecompute
    var kept: Set<String> = []
    func input(_ l: Int) -> String { "\(prefix).\(l).xIn" }
    func own(_ l: Int, _ name: String) -> String {
        recompute == .blocks && !kept.contains(name) ? "\(Self.workspace).\(name)" : "\(prefix).\(l).\(name)"
    }
    func scratch(_ name: String) -> String {
        recompute == .blocks ? "\(Self.workspace).\(name)" : "\(prefix).\(name)"
    }
}

extension ActivationLayout {
    /// The activations of a stack of L blocks under `names.prefix`, laid out for `recompute`:
    /// each block's input (shape `input`) and, per block or in the shared workspace, the buffers
    /// `block` that one block's forward fills and its backward reads (dropout masks included).
    /// Under blocks, those in `names.kept` stay per block, after the block's input.
    mutating func addBlocks(
        _ names: BlockActivationNames, layers L: Int, input: [Int],
        _ block: [(name: String, shape: [Int], part: ActivationPart)]
    ) {
        precondition(names.recompute == recompute, "stack \(names.prefix) laid out for another recompute setting")
        precondition(
            names.kept.isSubset(of: block.map(\.name)), "stack \(names.prefix) keeps activations it does not list")
        for l in 0..<L {
            add(names.input(l), input)
            for e in block where recompute == .none || names.kept.contains(e.name) {
                add(names.own(l, e.name), e.shape, e.part)
            }
        }
        if recompute == .blocks && L > 0 {
            for e in block where !names.kept.contains(e.name) { addShared(names.own(0, e.name), e.shape, e.part) }
        }
    }

    /// A stack's scratch buffer (`BlockActivationNames.scratch`): its own, or the shared one.
    mutating func addScratch(_ names: BlockActivationNames, _ name: String, _ shape: [Int], _ part: ActivationPart) {
        if recompute == .blocks {
            addShared(names.scratch(name), shape, part)
        } else {
            add(names.scratch(name), shape, part)
        }
    }
}

/// A stack of residual blocks that runs under either `ActivationRecompute` layout. A block type
/// adopts it with these pieces, and gets the forward and backward schedules below:
/// - its layout: `ActivationLayout.addBlocks` (and `addScratch`) with `BlockActivationNames`:
///   the input, and the buffers one block's forward fills and its backward reads;
/// - `activationTable`: the table it was bound to (it tells which block fills the workspace);
/// - `blockForward(l, output:)`: block l from its input buffer to its activations; with `output`
///   it first copies the input in from there and writes the block's output back (the forward);
///   without (nil), it recomputes what backward reads and may skip the work after the last
///   activation backward reads (`BlockStack` skips w2 and the residual add) or whose output it
///   keeps per block (`BlockActivationNames.kept`: `RARBlockStack` keeps fc2's and skips it);
/// - `blockBackward(l, dx)`: from block l's activations, the gradient w.r.t. its input.
/// Everything a forward needs again (the parameters pointer, the dropout plan: masks are keyed by
/// site, so they come out the same) the stack keeps from its forward. Bit-identical gradients
/// follow when the block's forward is deterministic (every kernel is, at any thread count).
protocol RecomputableStack: AnyObject {
    var blockCount: Int { get }
    /// The layout the stack was bound with.
    var recompute: ActivationRecompute { get }
    var activationTable: ActivationTable? { get }
    func blockForward(_ l: Int, output x: FlatBuffer?)
    func blockBackward(_ l: Int, _ dx: FlatBuffer, grads gp: FloatPtr)
}

extension RecomputableStack {
    /// x (rows, D) in: the stack's input; out: its output. `beforeBlock(l)` is called before
    /// block l reads its weights (ZeRO's overlapped parameter gather waits there for them).
    func forwardBlocks(_ x: FlatBuffer, beforeBlock: ((Int) -> Void)? = nil) {
        for l in 0..<blockCount {
            beforeBlock?(l)
            runBlockForward(l, output: x)
        }
    }

    /// dx in: gradient w.r.t. the stack's output; out: w.r.t. its input. Under recompute blocks
    /// each block is run forward again first, unless the shared workspace still holds its
    /// activations (the last block of the last stack run forward). `onLayerDone(l)` fires when
    /// block l's gradients are final.
    func backwardBlocks(_ dx: FlatBuffer, grads gp: FloatPtr, onLayerDone: ((Int) -> Void)?) {
        for l in stride(from: blockCount - 1, through: 0, by: -1) {
            let holder = activationTable?.workspaceHolder
            let held = holder?.stack == ObjectIdentifier(self) && holder?.block == l
            if recompute == .blocks && !held { runBlockForward(l, output: nil) }
            blockBackward(l, dx, grads: gp)
            activationTable?.workspaceHolder = nil  // a block's backward may consume what it read
            onLayerDone?(l)
        }
    }

    private func runBlockForward(_ l: Int, output x: FlatBuffer?) {
        blockForward(l, output: x)
        activationTable?.workspaceHolder = (ObjectIdentifier(self), l)
    }
}

/// The buffers of one layout, allocated part by part on first use.
final class ActivationTable {
    let layout: ActivationLayout
    private var index: [String: Int] = [:]
    private var buffers: [FlatBuffer?]
    private var allocated: Set<ActivationPart> = []
    /// Under recompute blocks: the stack and block whose activations the shared block workspace
    /// holds now (`RecomputableStack`); nil when none or unknown.
    var workspaceHolder: (stack: ObjectIdentifier, block: Int)?

    init(_ layout: ActivationLayout) {
        self.layout = layout
        buffers = Array(repeating: nil, count: layout.entries.count)
        for (i, e) in layout.entries.enumerated() {
            precondition(index[e.name] == nil, "activation \(e.name) listed twice")
            index[e.name] = i
        }
    }

    /// Allocates (zeroed) every buffer of `part` not allocated yet.
    func allocate(_ part: ActivationPart) {
        if allocated.contains(part) { return }
        allocated.insert(part)
        for (i, e) in layout.entries.enumerated() where e.part == part { buffers[i] = FlatBuffer(count: e.count) }
    }

    /// The buffer `name`; its part must have been allocated.
    subscript(_ name: String) -> FlatBuffer {
        guard let i = index[name] else { fatalError("no activation named \(name)") }
        guard let b = buffers[i] else { fatalError("activation \(name) used before its part was allocated") }
        return b
    }

    /// The buffer `name` zeroed (backward scratch is zeroed at each use).
    func zeroed(_ name: String) -> FlatBuffer {
        let b = self[name]
        b.zero()
        return b
    }

    /// Bytes held now.
    var bytes: Int { layout.bytes(allocated) }
}

extension ModelConfig {
    /// Bytes of the activation buffers a training step on `batch` samples allocates inside the
    /// model: `Transformer.activationLayout`, the list the model allocates from. A test checks it
    /// against `FlatBuffer.liveBytes` after a real step. Parameters, gradients and moments are
    /// not included.
    public func trainingActivationBytes(batch B: Int, dropout: Bool, recompute: ActivationRecompute = .none) -> Int {
        let parts: Set<ActivationPart> = dropout ? [.forward, .dropout, .backward] : [.forward, .backward]
        return Transformer.activationLayout(self, batch: B, recompute: recompute).bytes(parts)
    }
}
