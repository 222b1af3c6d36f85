import CSupport
import Foundation

extension BLAS {
    /// y[m or n] = alpha op(A) x + beta y, A row-major [m, n] with leading dimension lda; op(A) is A
    /// ([m, n], y has m entries) or its transpose (`trans`: y has n entries). For the sampler's
    /// attention over a KV cache, where one query meets one row's cache: memory-bound, and
    /// OpenBLAS's kernels stream it faster than plain loops.
    @inline(__always)
    public static func sgemv(
        trans: Bool, m: Int, n: Int, alpha: Float = 1, _ a: UnsafePointer<Float>, lda: Int,
        _ x: UnsafePointer<Float>, beta: Float, _ y: UnsafeMutablePointer<Float>
    ) {
        if m == 0 || n == 0 { return }
        _ = BLAS.pinned
        cblas_sgemv(
            CblasRowMajor, trans ? CblasTrans : CblasNoTrans, Int32(m), Int32(n), alpha, a, Int32(lda), x, 1, beta, y, 1
        )
    }

    /// The machine's sgemm speed in GFLOP/s on `threads` BLAS threads: the best of a few square-ish
    /// shapes of transformer size (one warm-up call, then `reps` timed calls each). Speed figures
    /// divide by this, measured in the same run, so a busy shared machine skews both alike. With
    /// `cpuTime` the time is this process's CPU time (`processCPUSeconds`), which other processes
    /// on a shared machine do not inflate (meaningful for one thread).
    public static func sgemmPeakGFLOPs(threads: Int, reps: Int = 5, cpuTime: Bool = false) -> Double {
        let clock = cpuTime ? processCPUSeconds : { Double(DispatchTime.now().uptimeNanoseconds) / 1e9 }
        let saved = BLAS.threads
        BLAS.threads = threads
        defer { BLAS.threads = saved }
        var best = 0.0
        for (m, n, k) in [(1024, 1024, 1024), (2048, 768, 768), (1024, 2048, 768)] {
            let a = UnsafeMutablePointer<Float>.allocate(capacity: m * k)
            let b = UnsafeMutablePointer<Float>.allocate(capacity: k * n)
            let c = UnsafeMutablePointer<Float>.allocate(capacity: m * n)
            defer {
                a.deallocate()
                b.deallocate()
                c.deallocate()
            }
            for i in 0..<(m * k) { a[i] = Float(i % 7) * 0.1 }
            for i in 0..<(k * n) { b[i] = Float(i % 5) * 0.1 }
            c.initialize(repeating: 0, count: m * n)
            sgemm(transA: false, transB: false, m: m, n: n, k: k, a, lda: k, b, ldb: n, beta: 0, c, ldc: n)
            let t0 = clock()
            for _ in 0..<reps {
                sgemm(transA: false, transB: false, m: m, n: n, k: k, a, lda: k, b, ldb: n, beta: 0, c, ldc: n)
            }
            let s = clock() - t0
            best = max(best, 2 * Double(m * n * k) * Double(reps) / s / 1e9)
        }
        return best
    }
}

/// CPU seconds this process has used (all its threads): unlike wall time, not inflated when other
/// processes share the cores.
public func processCPUSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}
