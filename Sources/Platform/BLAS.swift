import CSupport
import Foundation

/// Row-major sgemm and OpenBLAS runtime control. The only door to cblas.
public enum BLAS {
    /// C[m,n] = alpha * op(A) op(B) + beta * C, row-major. op(A) is [m,k], op(B) is [k,n].
    @inline(__always)
    public static func sgemm(
        transA: Bool, transB: Bool, m: Int, n: Int, k: Int, alpha: Float = 1,
        _ a: UnsafePointer<Float>, lda: Int, _ b: UnsafePointer<Float>, ldb: Int,
        beta: Float, _ c: UnsafeMutablePointer<Float>, ldc: Int
    ) {
        if m == 0 || n == 0 { return }
        cblas_sgemm(
            CblasRowMajor, transA ? CblasTrans : CblasNoTrans, transB ? CblasTrans : CblasNoTrans,
            Int32(m), Int32(n), Int32(k), alpha, a, Int32(lda), b, Int32(ldb), beta, c, Int32(ldc))
    }

    public static var threads: Int {
        get { Int(openblas_get_num_threads()) }
        set { openblas_set_num_threads(Int32(max(1, newValue))) }
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
        if tar_cpu_has_avx512f() != 0 { want = "SkylakeX" } else if tar_cpu_has_avx2() != 0 { want = "Haswell" } else { return }
        setenv("OPENBLAS_CORETYPE", want, 1)
        setenv("TENSORAR_NO_REEXEC", "1", 1)  // never loop
        var args = CommandLine.arguments.map { strdup($0) }
        args.append(nil)
        execv("/proc/self/exe", &args)
        // execv only returns on failure: carry on with the slow kernel, but say so.
        FileHandle.standardError.write("warning: could not re-exec with OPENBLAS_CORETYPE=\(want); BLAS runs the slow \(coreName) kernel\n".data(using: .utf8)!)
    }
}
