// A fast exp for the elementwise kernels (SwiGLU, softmax, cross entropy): libm expf calls were a
// fifth of a small model's step. Cephes' single-precision method: x = n ln2 + r, |r| <= ln2/2,
// exp(r) by a degree-6 polynomial, times 2^n built in the exponent bits. Written as plain scalar
// arithmetic with no calls (rounding by the 1.5 * 2^23 trick, clamping by min/max) so that LLVM
// vectorises the loops that use it; Swift's generic SIMD operations were far slower.
// Relative error below 3e-7 on [-87, 88] (FastMathTests). @inlinable, so that loops in other
// modules (the sampler's token choice) inline and vectorise it too: a call per element cost 4.3%
// of one-thread sampling.

@inlinable @inline(__always)
public func fexp(_ x0: Float) -> Float {
    let x = min(max(x0, -87.3), 88.7)
    let t = x * 1.442_695_04 + 12_582_912  // round(x / ln2) lands in t's low mantissa bits
    let n = t - 12_582_912
    var r = x - n * 0.693_359_375
    r = r - n * -2.121_944_4e-4
    var p: Float = 1.987_569_15e-4
    p = p * r + 1.398_199_950_7e-3
    p = p * r + 8.333_451_907_3e-3
    p = p * r + 4.166_579_589_4e-2
    p = p * r + 1.666_666_545_9e-1
    p = p * r + 5.000_000_120_1e-1
    let y = p * r * r + r + 1
    // 2^n: t's bits are 0x4B40_0000 + n
    let scale = Float(bitPattern: (t.bitPattern &- 0x4B40_0000 &+ 127) &<< 23)
    return y * scale
}

// MARK: - row reductions in 16 lanes
// A float sum in one chain cannot be vectorised (its order is the result), so a serial
// `s += x[j]` runs one add a cycle at best, and a serial max chain was slower still: with them
// the cross entropy's row took 4.8-5.4x as long (1024 x 16384, timed beside this). These keep 16 running partial results, lane l
// taking j = l, l + 16, ... in order, then reduce the lanes (`SIMD16.sum`/`max`, a fixed order)
// and add the n % 16 tail in order. The order depends only on n, never on threads or on which
// caller asks, so results stay bit-identical at every thread count.

@inlinable @inline(__always)
public func load16(_ p: UnsafePointer<Float>) -> SIMD16<Float> {
    UnsafeRawPointer(p).loadUnaligned(as: SIMD16<Float>.self)
}

/// The sum over j < n of a term given twice: `lanes(j)` for j..<j + 16 as one vector, `one(j)`
/// for a tail element; both must compute the same term (in the lane order above).
@inlinable @inline(__always)
public func laneSum(count n: Int, lanes: (Int) -> SIMD16<Float>, one: (Int) -> Float) -> Float {
    var acc = SIMD16<Float>()
    var j = 0
    while j + 16 <= n {
        acc += lanes(j)
        j += 16
    }
    var s = acc.sum()
    while j < n {
        s += one(j)
        j += 1
    }
    return s
}

/// p[0] + ... + p[n - 1].
@inlinable @inline(__always)
public func laneSum(_ p: UnsafePointer<Float>, count n: Int) -> Float {
    laneSum(count: n, lanes: { load16(p + $0) }, one: { p[$0] })
}

/// a[0] b[0] + ... + a[n - 1] b[n - 1].
@inlinable @inline(__always)
public func laneDot(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, count n: Int) -> Float {
    laneSum(count: n, lanes: { load16(a + $0) * load16(b + $0) }, one: { a[$0] * b[$0] })
}

/// a[0] b[0] c[0] + ... (each term (a b) c).
@inlinable @inline(__always)
public func laneDot(
    _ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ c: UnsafePointer<Float>, count n: Int
) -> Float {
    laneSum(count: n, lanes: { load16(a + $0) * load16(b + $0) * load16(c + $0) }, one: { a[$0] * b[$0] * c[$0] })
}

/// The largest of p[0..<n] (-infinity when n = 0). A NaN may be passed over here: callers
/// subtract it from every element and sum the exps, so a NaN still reaches their result.
@inlinable @inline(__always)
public func laneMax(_ p: UnsafePointer<Float>, count n: Int) -> Float {
    var acc = SIMD16<Float>(repeating: -.infinity)
    var j = 0
    while j + 16 <= n {
        let x = load16(p + j)
        // replace-where compiles to compare and blend; pointwiseMax was far slower here
        acc.replace(with: x, where: x .> acc)
        j += 16
    }
    var m = acc.max()
    while j < n {
        m = max(m, p[j])
        j += 1
    }
    return m
}

/// dst[j] = exp(src[j] - shift) for j < n (dst may be src); returns their `laneSum`.
@inlinable @inline(__always)
public func shiftedExps(
    _ dst: UnsafeMutablePointer<Float>, _ src: UnsafePointer<Float>, shift: Float, count n: Int
)
    -> Float
{
    for j in 0..<n { dst[j] = fexp(src[j] - shift) }
    return laneSum(dst, count: n)
}
