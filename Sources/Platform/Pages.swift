import CSupport

/// Memory straight from the OS in whole pages, for buffers that give pages back while they live
/// (the ZeRO-2 gradient buffer, `FlatBuffer(pages:)`).
public enum Pages {
    /// The OS page size in bytes.
    public static let size = Int(tar_page_size())
    /// Zeroed pages for `bytes` bytes, or nil when the OS refuses.
    public static func allocate(bytes: Int) -> UnsafeMutableRawPointer? { tar_pages_alloc(bytes) }
    public static func free(_ p: UnsafeMutableRawPointer, bytes: Int) { tar_pages_free(p, bytes) }
    /// Gives back the whole pages inside [p, p + bytes) (not the partial pages at either end):
    /// they no longer count as resident and read as zeros when touched again.
    public static func release(_ p: UnsafeMutableRawPointer, bytes: Int) {
        if bytes > 0 { tar_pages_release(p, bytes) }
    }
}
