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
    /// For a page-backed buffer, the floats `release` hands back at a time (a huge page or a page).
    public let releaseGranule: Int

    public init(count: Int) {
        self.count = count
        pageBacked = false
        releaseGranule = 1
        let raw = UnsafeMutableRawPointer.allocate(byteCount: max(count, 1) * 4, alignment: 64)
        base = raw.bindMemory(to: Float.self, capacity: max(count, 1))
        base.initialize(repeating: 0, count: max(count, 1))
        FlatBuffer.account(max(count, 1) * 4)
    }

    /// A buffer of `count` zeros in whole OS pages, none resident until written: a page costs
    /// memory only between its first write and the next `release` or `zero()` that covers it.
    /// Not counted in `liveBytes` (its resident part changes while it lives).
    /// `hugePages: false` keeps it to OS pages (the benchmark's comparison).
    public init(pages count: Int, hugePages: Bool = true) {
        self.count = count
        pageBacked = true
        guard let (raw, granule) = Pages.allocate(bytes: max(count, 1) * 4, hugePages: hugePages) else {
            fatalError("FlatBuffer: the OS refused \(max(count, 1) * 4) bytes of pages")
        }
        releaseGranule = granule / 4
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

    /// Zeros `range`: written as zeros, or for a page-backed buffer its whole granules (huge pages
    /// or pages) handed back (they read as zeros) and only the partial granules at the ends written.
    /// A granule that straddles two ranges stays resident (at most one per range boundary).
    public func release(_ range: Range<Int>) {
        guard !range.isEmpty else { return }
        let p = base + range.lowerBound
        guard pageBacked else {
            p.update(repeating: 0, count: range.count)
            return
        }
        let granule = releaseGranule  // floats per granule; base is aligned to it
        // The buffer's end counts as a granule boundary: the mapping ends there, so a range that
        // reaches it gives back its last, partial granule too (in whole OS pages).
        let end = range.upperBound == count ? (count * 4 + Pages.size - 1) / Pages.size * Pages.size / 4 : nil
        let lo = min(range.upperBound, (range.lowerBound + granule - 1) / granule * granule)
        let hi = end ?? max(lo, range.upperBound / granule * granule)
        (base + range.lowerBound).update(repeating: 0, count: lo - range.lowerBound)
        if hi < range.upperBound { (base + hi).update(repeating: 0, count: range.upperBound - hi) }
        if hi > lo { Pages.release(UnsafeMutableRawPointer(base + lo), bytes: (hi - lo) * 4, granule: Pages.size) }
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
    /// Zeros the whole buffer: split over the pool's threads (`zeroFloats`), or released for a
    /// page-backed one. `release` itself stays on the calling thread: ZeRO-2 releases gradient
    /// buckets from the communication thread, which should not take the pool from the model.
    public func zero() {
        if pageBacked {
            release(0..<count)
        } else {
            zeroFloats(base, count: count)
        }
    }
    public var array: [Float] { Array(buffer) }
}
