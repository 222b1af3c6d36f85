import Foundation

/// One flat, 64-byte aligned, zero-initialised block of Float32 (llm.c style): parameters,
/// gradients, AdamW moments and activations are each one of these, carved into named views.
public final class FlatBuffer {
    public let count: Int
    public let base: UnsafeMutablePointer<Float>

    public init(count: Int) {
        self.count = count
        let raw = UnsafeMutableRawPointer.allocate(byteCount: max(count, 1) * 4, alignment: 64)
        base = raw.bindMemory(to: Float.self, capacity: max(count, 1))
        base.initialize(repeating: 0, count: max(count, 1))
        FlatBuffer.account(max(count, 1) * 4)
    }
    deinit {
        base.deallocate()
        FlatBuffer.account(-max(count, 1) * 4)
    }

    /// Bytes held by all FlatBuffers alive in this process: the trainer measures its activations
    /// with it (the buffers a training step allocates), and a test checks the activation estimate
    /// against it. Buffers are allocated rarely (once per shape), so the lock costs nothing.
    public static var liveBytes: Int { accountLock.lock(); defer { accountLock.unlock() }; return live }
    private static let accountLock = NSLock()
    private static var live = 0
    private static func account(_ bytes: Int) { accountLock.lock(); live += bytes; accountLock.unlock() }

    public subscript(i: Int) -> Float {
        get { base[i] }
        set { base[i] = newValue }
    }
    public var buffer: UnsafeMutableBufferPointer<Float> { UnsafeMutableBufferPointer(start: base, count: count) }
    public func zero() { base.update(repeating: 0, count: count) }
    public func copy(from other: FlatBuffer) {
        precondition(other.count == count)
        base.update(from: other.base, count: count)
    }
    public var array: [Float] { Array(buffer) }
}
