import CSupport

/// A weight matrix W (n, k), row-major as the model stores it (out, in), packed once for products
/// y = x W^T with few rows that reuse the same weights many times: sampling's KV-cached steps.
/// OpenBLAS packs W again on every call; at sampling's 64-320 rows that was about an eighth of the
/// sampling time (README "Sampling speed"). `packed_gemm.c` holds the layout and the kernel
/// (AVX-512; `available` says whether this CPU has it). Each output element is one sum over k in
/// order, so a row's result depends neither on the other rows nor on the thread count.
public final class PackedWeights {
    public let n, k: Int
    private let data: UnsafeMutablePointer<Float>
    private let floats: Int
    /// Panels of `panel` output columns.
    private let panels: Int
    private static let panel = Int(TAR_PACKED_PANEL)

    /// Whether this CPU runs the packed kernel (AVX-512F).
    public static let available = tar_cpu_has_avx512f() != 0

    public init(_ w: UnsafePointer<Float>, n: Int, k: Int) {
        precondition(PackedWeights.available, "PackedWeights needs AVX-512")
        precondition(n > 0 && k > 0, "PackedWeights of \(n) x \(k)")
        self.n = n
        self.k = k
        floats = Int(tar_packed_floats(n, k))
        data = UnsafeMutableRawPointer.allocate(byteCount: floats * 4, alignment: 64)
            .bindMemory(to: Float.self, capacity: floats)
        panels = Int(tar_packed_panels(n))
        // pack the panels over the pool too (each panel is written by one part)
        let parts = min(panels, 64)
        let width = PackedWeights.panel
        ComputePool.shared.run(parts: parts) { part in
            let lo = part * self.panels / parts
            let hi = (part + 1) * self.panels / parts
            let columns = min(n - lo * width, (hi - lo) * width)
            tar_pack_weights(w + lo * width * k, columns, k, k, self.data + lo * width * k)
        }
    }

    deinit { data.deallocate() }

    /// Bytes the packed copy holds.
    public var bytes: Int { floats * 4 }

    /// y (m, n) = x (m, k) W^T, or y += x W^T with `accumulate`; x's rows `ldx` apart, y's `ldy`.
    /// Panels of 64 columns are split over the compute pool (any split gives the same bits).
    public func multiply(
        _ x: UnsafePointer<Float>, rows m: Int, ldx: Int, into y: UnsafeMutablePointer<Float>, ldy: Int,
        accumulate: Bool
    ) {
        if m == 0 { return }
        let parts = m * n * k < 1 << 20 ? 1 : min(panels, 8 * ComputePool.shared.threadsHere)
        ComputePool.shared.run(parts: parts) { part in
            tar_sgemm_packed(
                m, n, k, x, ldx, data, y, ldy, accumulate ? 1 : 0, part * panels / parts, (part + 1) * panels / parts)
        }
    }
}
