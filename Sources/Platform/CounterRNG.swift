import Foundation

/// Counter-based randomness: every draw is a hash of (seed, stream key..., counter), so the random
/// numbers a sample gets depend only on who it is (seed, step, global sample index, purpose),
/// never on how many ranks there are or the order work is done in (SPEC section 4).
public struct CounterRNG: RandomNumberGenerator, Sendable {
    public private(set) var state: UInt64
    public private(set) var counter: UInt64 = 0

    @inline(__always) public static func mix(_ z0: UInt64) -> UInt64 {
        // splitmix64 finaliser
        var z = z0 &+ 0x9E37_79B9_7F4A_7C15
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// A stream keyed by a seed and any number of identifiers (step, sample, purpose, ...).
    public init(seed: UInt64, _ keys: UInt64...) {
        var s = CounterRNG.mix(seed ^ 0x5EED)
        for k in keys { s = CounterRNG.mix(s ^ CounterRNG.mix(k)) }
        state = s
    }

    @inline(__always) public mutating func next() -> UInt64 {
        counter &+= 1
        return CounterRNG.mix(state ^ (counter &* 0xD1B5_4A32_D192_ED03))
    }

    /// Moves the stream on by `draws` draws at no cost (the draw is a hash of the counter): a part
    /// of a long stream can start where it would have been had the earlier draws been made.
    public mutating func skip(_ draws: Int) { counter &+= UInt64(draws) }

    /// Uniform in [0, 1) with 24 bits (exactly representable in Float).
    @inline(__always) public mutating func uniform() -> Float { Float(next() >> 40) * (1.0 / 16_777_216.0) }
    /// Uniform integer in [0, n).
    @inline(__always) public mutating func below(_ n: Int) -> Int { Int(next() % UInt64(n)) }
    /// Standard normal (Box-Muller, one value per call).
    public mutating func normal() -> Float {
        let u1 = Double((next() >> 11) + 1) * (1.0 / 9_007_199_254_740_993.0)
        let u2 = Double(next() >> 11) * (1.0 / 9_007_199_254_740_992.0)
        return Float((-2 * log(u1)).squareRoot() * cos(2 * Double.pi * u2))
    }
}

/// Purposes: distinct stream ids so that, e.g., dropout and noise never share numbers.
public enum RandomPurpose: UInt64, Sendable {
    case initialise = 1
    case shuffle, augmentation, labelDrop, dropout, noise, sampling, validationNoise
    /// A training sample's token order (`RandomOrder`, SPEC section 9).
    case order
}
