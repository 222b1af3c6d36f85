import Foundation
import Platform

/// One flat, 64-byte aligned, zero-initialised block of Float32 (llm.c style): parameters,
/// gradients, AdamW moments and activations are each one of these, carved into named views.
public final class FlatBuffer {
    public let count: Int
    public let base: UnsafeMutablePointer<Float>

    /// Whether the buffer is whole OS pages (`init(pages:)`): `zero()` and `release` then hand
    /// pages back instead of writing them.
    public let pageBacked: Bool

    public init(count: Int) {
        self.count = count
        pageBacked = false
        let raw = UnsafeMutableRawPointer.allocate(byteCount: max(count, 1) * 4, alignment: 64)
        base = raw.bindMemory(to: Float.self, capacity: max(count, 1))
        base.initialize(repeating: 0, count: max(count, 1))
        FlatBuffer.account(max(count, 1) * 4)
    }

    /// A buffer of `count` zeros in whole OS pages, none resident until written: a page costs
    /// memory only between its first write and the next `release` or `zero()` that covers it.
    /// Not counted in `liveBytes` (its resident part changes while it lives).
    public init(pages count: Int) {
        self.count = count
        pageBacked = true
        guard let raw = Pages.allocate(bytes: max(count, 1) * 4) else {
            fatalError("FlatBuffer: the OS refused \(max(count, 1) * 4) bytes of pages")
        }
        base = raw.bindMemory(to: Float.self, capacity: max(count, 1))
    }

    deinit {
        if pageBacked {
            Pages.free(UnsafeMutableRawPointer(base), bytes: max(count, 1) * 4)
        } else {
            base.deallocate()
            FlatBuffer.account(-max(count, 1) * 4)
        }
    }

    /// Zeros `range`: written as zeros, or for a page-backed buffer its whole pages handed back
    /// (they read as zeros) and only the partial pages at the ends written.
    public func release(_ range: Range<Int>) {
        guard !range.isEmpty else { return }
        let p = base + range.lowerBound
        guard pageBacked else {
            p.update(repeating: 0, count: range.count)
            return
        }
        let page = Pages.size / 4  // floats per page; base is page-aligned
        let lo = min(range.upperBound, (range.lowerBound + page - 1) / page * page)
        let hi = max(lo, range.upperBound / page * page)
        (base + range.lowerBound).update(repeating: 0, count: lo - range.lowerBound)
        (base + hi).update(repeating: 0, count: range.upperBound - hi)
        Pages.release(UnsafeMutableRawPointer(base + lo), bytes: (hi - lo) * 4)
    }

    /// Bytes held by all FlatBuffers alive in this process: the trainer measures its activations
    /// with it (the buffers a training step allocates), and a test checks the activation estimate
    /// against it. Buffers are allocated rarely (once per shape), so the lock costs nothing.
    public static var liveBytes: Int {
        accountLock.lock()
        defer { accountLock.unlock() }
        return live
    }
    private static let accountLock = NSLock()
    private static var live = 0
    private static func account(_ bytes: Int) {
        accountLock.lock()
        live += bytes
        accountLock.unlock()
    }

    public subscript(i: Int) -> Float {
        get { base[i] }
        set { base[i] = newValue }
    }
    public var buffer: UnsafeMutableBufferPointer<Float> { UnsafeMutableBufferPointer(start: base, count: count) }
    public func zero() { release(0..<count) }
    public func copy(from other: FlatBuffer) {
        precondition(other.count == count)
        base.update(from: other.base, count: count)
    }
    public var array: [Float] { Array(buffer) }
}
