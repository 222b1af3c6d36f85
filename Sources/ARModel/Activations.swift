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

/// The sizes of every activation buffer of a model (or a sampler) for one batch shape: each
/// stage adds its entries (`BlockStack.addActivations`, `BaseModel.addActivations`, the plug-in's
/// stages, `Transformer`), and the same list both allocates the buffers and gives the memory.
struct ActivationLayout {
    private(set) var entries: [ActivationEntry] = []
    mutating func add(_ name: String, _ shape: [Int], _ part: ActivationPart = .forward) {
        entries.append(ActivationEntry(name: name, shape: shape, part: part))
    }
    /// Bytes of the entries of `parts`.
    func bytes(_ parts: Set<ActivationPart>) -> Int {
        entries.filter { parts.contains($0.part) }.reduce(0) { $0 + max($1.count, 1) * 4 }
    }
}

/// The buffers of one layout, allocated part by part on first use.
final class ActivationTable {
    let layout: ActivationLayout
    private var index: [String: Int] = [:]
    private var buffers: [FlatBuffer?]
    private var allocated: Set<ActivationPart> = []

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
    public func trainingActivationBytes(batch B: Int, dropout: Bool) -> Int {
        let parts: Set<ActivationPart> = dropout ? [.forward, .dropout, .backward] : [.forward, .backward]
        return Transformer.activationLayout(self, batch: B).bytes(parts)
    }
}
