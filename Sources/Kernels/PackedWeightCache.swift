import Foundation
import Platform

/// The model's weights packed once for one sampling call (`PackedWeights`), so that each KV-cached
/// step multiplies by them without OpenBLAS repacking them. While `using` runs, `matmulForward`
/// takes every product whose weight lies inside `params` (the model's parameter buffer, which must
/// not change meanwhile) through the packed copy, packing each weight at its first use; other
/// products go to sgemm as before. It costs one packed copy of the weights used (for B 0.45 GB),
/// freed when `using` returns. Without AVX-512 `using` only runs its body.
public final class PackedWeightCache {
    private struct Key: Hashable {
        let address: Int
        let n, k: Int
    }
    private let params: Range<Int>
    private var packed: [Key: PackedWeights] = [:]
    private let lock = NSLock()
    /// Weights packed so far (tests).
    var count: Int {
        lock.lock()
        defer { lock.unlock() }
        return packed.count
    }
    /// Off: `using` packs nothing (the benchmark's comparison with sgemm).
    nonisolated(unsafe) public static var enabled = true
    /// The cache `matmulForward` consults (process-wide: sampling runs one call at a time).
    nonisolated(unsafe) static var active: PackedWeightCache?
    static let activeLock = NSLock()

    /// An empty cache for the weights inside `params`; `using(_:)` makes it the active one.
    public init(params: FlatBuffer) {
        let start = Int(bitPattern: params.base)
        self.params = start..<(start + params.count * 4)
    }

    /// Runs `body` with `params`' weights packed as they are first multiplied by (a fresh cache,
    /// freed afterwards).
    public static func using<T>(params: FlatBuffer, _ body: () throws -> T) rethrows -> T {
        try using(PackedWeightCache(params: params), body)
    }

    /// Runs `body` with `cache` active: what it packed before is reused, so its parameters must
    /// hold the same weights as then (a sampler over weights that never change: tensorar-sample).
    public static func using<T>(_ cache: PackedWeightCache, _ body: () throws -> T) rethrows -> T {
        activeLock.lock()
        let mine = enabled && PackedWeights.available && active == nil
        if mine { active = cache }
        activeLock.unlock()
        defer {
            if mine {
                activeLock.lock()
                active = nil
                activeLock.unlock()
            }
        }
        return try body()
    }

    /// The active cache's packed copy of W (n, k) at `w`, or nil when no cache is active or `w` is
    /// not inside its parameters.
    static func weights(_ w: ConstFloatPtr, n: Int, k: Int) -> PackedWeights? {
        activeLock.lock()
        let cache = active
        activeLock.unlock()
        guard let cache else { return nil }
        let address = Int(bitPattern: w)
        guard cache.params.contains(address), address + n * k * 4 <= cache.params.upperBound else { return nil }
        cache.lock.lock()
        defer { cache.lock.unlock() }
        let key = Key(address: address, n: n, k: k)
        if let p = cache.packed[key] { return p }
        let p = PackedWeights(w, n: n, k: k)
        cache.packed[key] = p
        return p
    }
}
