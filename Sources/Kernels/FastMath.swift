// A fast exp for the elementwise kernels (SwiGLU, softmax, cross entropy): libm expf calls were a
// fifth of a small model's step. Cephes' single-precision method: x = n ln2 + r, |r| <= ln2/2,
// exp(r) by a degree-6 polynomial, times 2^n built in the exponent bits. Written as plain scalar
// arithmetic with no calls (rounding by the 1.5 * 2^23 trick, clamping by min/max) so that LLVM
// vectorises the loops that use it; Swift's generic SIMD operations were far slower.
// Relative error below 3e-7 on [-87, 88] (FastMathTests).

@inline(__always)
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
