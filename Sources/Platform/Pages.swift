import CSupport

/// Memory straight from the OS in whole pages, for buffers that give pages back while they live
/// (the ZeRO-2 gradient buffer, `FlatBuffer(pages:)`).
public enum Pages {
    /// The OS page size in bytes.
    public static let size = Int(tar_page_size())
    /// Zeroed pages for `bytes` bytes, or nil when the OS refuses, with the unit `release` hands back
    /// in bytes: a transparent huge page (2 MB on x86) when the buffer holds one and the kernel allows
    /// them (and `hugePages`), else `size`. First writes then fault a huge page at a time (shim.c says why).
    public static func allocate(bytes: Int, hugePages: Bool = true) -> (pointer: UnsafeMutableRawPointer, granule: Int)?
    {
        var granule = 0
        guard let p = tar_pages_alloc(bytes, hugePages ? 1 : 0, &granule) else { return nil }
        return (p, granule)
    }
    /// The unit `allocate` hands back for a buffer of `bytes` when the kernel takes MADV_HUGEPAGE (the
    /// memory estimate's; `allocate` returns the one it got).
    public static func granule(bytes: Int, hugePages: Bool = true) -> Int {
        Int(tar_pages_granule(bytes, hugePages ? 1 : 0))
    }
    public static func free(_ p: UnsafeMutableRawPointer, bytes: Int) { tar_pages_free(p, bytes) }
    /// Gives back the whole granules inside [p, p + bytes) (not the partial ones at either end):
    /// they no longer count as resident and read as zeros when touched again.
    public static func release(_ p: UnsafeMutableRawPointer, bytes: Int, granule: Int) {
        if bytes > 0 { tar_pages_release(p, bytes, granule) }
    }
    /// Resident bytes of the whole pages touching [p, p + bytes) (mincore), or nil if the OS says no.
    public static func residentBytes(_ p: UnsafeRawPointer, bytes: Int) -> Int? {
        let n = tar_pages_resident(UnsafeMutableRawPointer(mutating: p), bytes)
        return n == UInt.max ? nil : Int(n)
    }
}
