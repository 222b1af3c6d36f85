import CSupport
import Foundation

/// Row-major sgemm and OpenBLAS runtime control. The only door to cblas.
///
/// Threads: OpenBLAS itself always runs on one thread, and `sgemm` splits its work into tiles
/// over the rank's `ComputePool`. OpenBLAS 0.3.21 on several threads gives results that depend on
/// the thread count for mid-sized shapes (measured: e.g. 162 x 96 x 32 differs in most elements
/// between 1 and 2 threads); a tile is a row or column range of C chosen from the shape alone, so
/// every element is computed by one single-threaded call, with the same operations, at any
/// thread count. Tiles are multiples of 64 rows or columns (the micro-kernels' unroll divides
/// 64). Under SkylakeX kernels, whose bits do not depend on the tile (`ThreadTests` checks that
/// tiled results equal one call's, bit for bit), the tiles are sized by the thread count instead
/// (`tilesMatchOneCall`): fewer repacks, the same bits.
public enum BLAS {
    /// C[m,n] = alpha * op(A) op(B) + beta * C, row-major. op(A) is [m,k], op(B) is [k,n].
    public static func sgemm(
        transA: Bool, transB: Bool, m: Int, n: Int, k: Int, alpha: Float = 1,
        _ a: UnsafePointer<Float>, lda: Int, _ b: UnsafePointer<Float>, ldb: Int,
        beta: Float, _ c: UnsafeMutablePointer<Float>, ldc: Int
    ) {
        if m == 0 || n == 0 { return }
        let byThreads = tilesMatchOneCall && !shapeTilesOnly
        let tiling = Tiling(m: m, n: n, k: k, threads: byThreads ? ComputePool.shared.threadsHere : nil)
        if tiling.count == 1 {
            sgemmOneCall(
                transA: transA, transB: transB, m: m, n: n, k: k, alpha: alpha, a, lda: lda, b, ldb: ldb,
                beta: beta, c, ldc: ldc)
            return
        }
        ComputePool.shared.run(parts: tiling.count) { t in
            let lo = t * tiling.size
            let hi = min(tiling.extent, lo + tiling.size)
            if tiling.rows {
                let at = transA ? a + lo : a + lo * lda
                sgemmOneCall(
                    transA: transA, transB: transB, m: hi - lo, n: n, k: k, alpha: alpha, at, lda: lda, b,
                    ldb: ldb, beta: beta, c + lo * ldc, ldc: ldc)
            } else {
                let bt = transB ? b + lo * ldb : b + lo
                sgemmOneCall(
                    transA: transA, transB: transB, m: m, n: hi - lo, k: k, alpha: alpha, a, lda: lda, bt,
                    ldb: ldb, beta: beta, c + lo, ldc: ldc)
            }
        }
    }

    /// Whether this OpenBLAS kernel gives an element of C the same bits whichever rows and columns
    /// of C a call covers (tiles of a multiple of 64): SkylakeX's, not Haswell's or Zen's, whose
    /// rounding depends on the rows of the call (`ThreadTests` checks both). Then `sgemm` may size
    /// its tiles by the thread count, one call on one thread, and the bits still do not change.
    public static let tilesMatchOneCall = coreName.lowercased().hasPrefix("skylakex")
    /// Tiles from the shape alone even where `tilesMatchOneCall` (the benchmark's comparison; the
    /// bits are the same either way there).
    nonisolated(unsafe) public static var shapeTilesOnly = false

    /// How `sgemm` splits C: along rows (each tile packs all of op(B)) or columns (each packs all
    /// of op(A)), whichever repacks less; tiles of a multiple of 64; one tile below 2^20
    /// multiply-adds. With `threads` nil, a function of the shape alone: about 8 to 16 tiles (any
    /// kernel). With `threads` (only where `tilesMatchOneCall`), one tile per thread: each tile
    /// repacks the operand it does not split, so fewer tiles repack less (one call on one thread).
    public struct Tiling {
        public let rows: Bool
        public let extent, size, count: Int
        public init(m: Int, n: Int, k: Int, threads: Int? = nil) {
            if m * n * k < 1 << 20 || threads == 1 {
                rows = true
                extent = m
                size = m
                count = 1
                return
            }
            let rowSize = Tiling.tileSize(m, threads: threads)
            let colSize = Tiling.tileSize(n, threads: threads)
            let rowTiles = (m + rowSize - 1) / rowSize
            let colTiles = (n + colSize - 1) / colSize
            rows = rowTiles * n <= colTiles * m  // repacked floats / k: op(B) per row tile, op(A) per column tile
            extent = rows ? m : n
            size = rows ? rowSize : colSize
            count = rows ? rowTiles : colTiles
        }
        static func tileSize(_ extent: Int, threads: Int?) -> Int {
            guard let threads else { return 64 * max(1, extent / (64 * 8)) }
            let blocks = (extent + 63) / 64
            return 64 * ((blocks + threads - 1) / threads)
        }
    }

    /// One cblas_sgemm call (OpenBLAS on one thread): `sgemm`'s tiles, and the peak measurement.
    @inline(__always)
    public static func sgemmOneCall(
        transA: Bool, transB: Bool, m: Int, n: Int, k: Int, alpha: Float = 1,
        _ a: UnsafePointer<Float>, lda: Int, _ b: UnsafePointer<Float>, ldb: Int,
        beta: Float, _ c: UnsafeMutablePointer<Float>, ldc: Int
    ) {
        if m == 0 || n == 0 { return }
        _ = BLAS.pinned
        cblas_sgemm(
            CblasRowMajor, transA ? CblasTrans : CblasNoTrans, transB ? CblasTrans : CblasNoTrans,
            Int32(m), Int32(n), Int32(k), alpha, a, Int32(lda), b, Int32(ldb), beta, c, Int32(ldc))
    }

    /// OpenBLAS on one thread, once, before its first use (`ComputePool.shared` does it, taking
    /// OpenBLAS's own default as the pool's first size).
    static var pinned: Void { _ = ComputePool.shared }

    /// The rank's compute threads (`dist.threads_per_rank`): the size of the `ComputePool` that
    /// `sgemm` and the kernels split their work over. OpenBLAS itself stays on one thread.
    public static var threads: Int {
        get { ComputePool.shared.threads }
        set {
            _ = BLAS.pinned
            ComputePool.shared.setThreads(newValue)
        }
    }

    /// Runs `body` with OpenBLAS's own threads (`threads` of them), then back to one: for measuring
    /// OpenBLAS's native multi-threaded sgemm beside `sgemm`'s tiles. Not for model code (its
    /// results depend on the thread count).
    public static func withNativeThreads<R>(_ threads: Int, _ body: () -> R) -> R {
        _ = BLAS.pinned
        openblas_set_num_threads(Int32(max(1, threads)))
        defer { openblas_set_num_threads(1) }
        return body()
    }

    public static var coreName: String { String(cString: openblas_get_corename()) }
    public static var config: String { String(cString: openblas_get_config()) }

    /// One line for the start-up log: which BLAS, which kernel, how many threads.
    public static func describe() -> String {
        "BLAS: \(config.trimmingCharacters(in: .whitespaces)); kernel \(coreName); \(threads) thread(s)"
            + (ProcessInfo.processInfo.environment["OPENBLAS_CORETYPE"].map { "; OPENBLAS_CORETYPE=\($0)" } ?? "")
    }

    /// Debian's OpenBLAS 0.3.21 does not recognise recent Xeons and falls back to Prescott kernels
    /// (4x slower, TOOLCHAIN.md). The core type is read when the library loads, so the fix is to set
    /// OPENBLAS_CORETYPE and re-execute this same process image. Call first thing in `main`, before
    /// MPI_Init. Does nothing when the user set OPENBLAS_CORETYPE or the kernel is already a good one.
    public static func ensureBestKernel() {
        let env = ProcessInfo.processInfo.environment
        if env["OPENBLAS_CORETYPE"] != nil || env["TENSORAR_NO_REEXEC"] != nil { return }
        let core = coreName.lowercased()
        let weak = ["prescott", "core2", "penryn", "dunnington", "nehalem", "atom", "generic", "barcelona", "katmai"]
        guard weak.contains(where: { core.hasPrefix($0) }) else { return }
        let want: String
        if tar_cpu_has_avx512f() != 0 {
            want = "SkylakeX"
        } else if tar_cpu_has_avx2() != 0 {
            want = "Haswell"
        } else {
            return
        }
        setenv("OPENBLAS_CORETYPE", want, 1)
        setenv("TENSORAR_NO_REEXEC", "1", 1)  // never loop
        var args = CommandLine.arguments.map { strdup($0) }
        args.append(nil)
        execv("/proc/self/exe", &args)
        // execv only returns on failure: carry on with the slow kernel, but say so.
        FileHandle.standardError.write(
            "warning: could not re-exec with OPENBLAS_CORETYPE=\(want); BLAS runs the slow \(coreName) kernel\n".data(
                using: .utf8)!)
    }
}
