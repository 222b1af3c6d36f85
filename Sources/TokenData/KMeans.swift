import Foundation
import Platform

/// Nearest centroid of each point, by squared Euclidean distance |x|^2 - 2 x.c + |c|^2. Per chunk
/// of rows one sgemm gives -2 x.c; the argmin of |c|^2 - 2 x.c is a SIMD min then a scan for its
/// first occurrence, so ties go to the lower index.
/// points [n, d], centroids [k, d] -> index [n], squared distance [n].
public func nearestCentroids(
    points: UnsafePointer<Float>, n: Int, dim d: Int, centroids: [Float], k: Int
) -> (index: [Int32], distance: [Float]) {
    precondition(centroids.count == k * d && k >= 1)
    var index = [Int32](repeating: 0, count: n)
    var distance = [Float](repeating: 0, count: n)
    var cnorm = [Float](repeating: 0, count: k)  // [k] |c|^2
    for j in 0..<k {
        var s: Float = 0
        for t in 0..<d { s += centroids[j * d + t] * centroids[j * d + t] }
        cnorm[j] = s
    }
    let chunk = 4096
    var scores = [Float](repeating: 0, count: chunk * k)  // [chunk, k] -2 x.c
    centroids.withUnsafeBufferPointer { c in
        scores.withUnsafeMutableBufferPointer { sp in
            let sc = sp.baseAddress!
            var start = 0
            while start < n {
                let m = min(chunk, n - start)
                let x = points + start * d
                BLAS.sgemm(
                    transA: false, transB: true, m: m, n: k, k: d, alpha: -2, x, lda: d, c.baseAddress!, ldb: d,
                    beta: 0, sc, ldc: k)
                cnorm.withUnsafeBufferPointer { cn in
                    for i in 0..<m {
                        let (best, score) = argminFirst(sc + i * k, plus: cn.baseAddress!, k)
                        var xn: Float = 0
                        for t in 0..<d { xn += x[i * d + t] * x[i * d + t] }
                        index[start + i] = Int32(best)
                        distance[start + i] = max(0, xn + score)
                    }
                }
                start += m
            }
        }
    }
    return (index, distance)
}

/// Index and value of the first minimum of v[j] + b[j], j < k.
@inline(__always) func argminFirst(_ v: UnsafePointer<Float>, plus b: UnsafePointer<Float>, _ k: Int) -> (Int, Float) {
    var lanes = SIMD16<Float>(repeating: .infinity)
    var j = 0
    let rv = UnsafeRawPointer(v)
    let rb = UnsafeRawPointer(b)
    while j + 16 <= k {
        let x =
            rv.loadUnaligned(fromByteOffset: j * 4, as: SIMD16<Float>.self)
            + rb.loadUnaligned(fromByteOffset: j * 4, as: SIMD16<Float>.self)
        lanes.replace(with: x, where: x .< lanes)  // compare and blend (pointwiseMin does not vectorise)
        j += 16
    }
    var m = lanes.min()
    while j < k {
        m = min(m, v[j] + b[j])
        j += 1
    }
    var i = 0
    while i < k - 1 && v[i] + b[i] != m { i += 1 }  // the same float sums, so equality is exact
    return (i, v[i] + b[i])
}

/// One Lloyd iteration's summary, for progress lines.
public struct KMeansStep: Sendable {
    public let iteration: Int
    public let meanSquaredError: Double  // per coordinate
    public let changed: Int  // points whose cluster changed
}

/// k-means with k-means++ initialisation (on at most `initSample` points) and Lloyd iterations,
/// deterministic for a given seed. Stops early when no assignment changes. An empty cluster is
/// re-seeded with the point currently farthest from its centroid.
/// points [n, d] -> centroids [k, d].
public func kMeans(
    points: [Float], dim d: Int, k: Int, iterations: Int, seed: UInt64, initSample: Int = 20_000,
    progress: (KMeansStep) -> Void = { _ in }
) -> [Float] {
    let n = points.count / d
    precondition(n >= 1 && k >= 1 && points.count == n * d)
    var rng = CounterRNG(seed: seed, RandomPurpose.initialise.rawValue, 0x6B6D_6561_6E73)  // "kmeans"
    var centroids = kMeansPlusPlus(points: points, n: n, dim: d, k: k, sample: min(n, max(k, initSample)), rng: &rng)
    var assign = [Int32](repeating: -1, count: n)
    for it in 1...max(1, iterations) {
        let (idx, dist) = points.withUnsafeBufferPointer {
            nearestCentroids(points: $0.baseAddress!, n: n, dim: d, centroids: centroids, k: k)
        }
        var changed = 0
        for i in 0..<n where idx[i] != assign[i] { changed += 1 }
        assign = idx
        progress(
            KMeansStep(
                iteration: it, meanSquaredError: dist.reduce(0.0) { $0 + Double($1) } / Double(n * d), changed: changed)
        )
        if changed == 0 || it == iterations { break }
        // Update: centroid = mean of its points, sums in Double.
        var sums = [Double](repeating: 0, count: k * d)
        var counts = [Int](repeating: 0, count: k)
        for i in 0..<n {
            let j = Int(assign[i])
            counts[j] += 1
            for t in 0..<d { sums[j * d + t] += Double(points[i * d + t]) }
        }
        var far = (counts.contains(0) ? (0..<n).sorted { dist[$0] != dist[$1] ? dist[$0] > dist[$1] : $0 < $1 } : [])
            .makeIterator()
        for j in 0..<k {
            if counts[j] > 0 {
                for t in 0..<d { centroids[j * d + t] = Float(sums[j * d + t] / Double(counts[j])) }
            } else if let i = far.next() {
                for t in 0..<d { centroids[j * d + t] = points[i * d + t] }
            }
        }
    }
    return centroids
}

/// k-means++ seeding on a random subset of `sample` points: each next centre drawn with
/// probability proportional to the squared distance to the nearest chosen one.
func kMeansPlusPlus(points: [Float], n: Int, dim d: Int, k: Int, sample m: Int, rng: inout CounterRNG) -> [Float] {
    // Subset: a partial Fisher-Yates shuffle of the point indices.
    var ids = Array(0..<n)
    for i in 0..<m { ids.swapAt(i, i + rng.below(n - i)) }
    let sub = Array(ids[0..<m])
    var centroids = [Float](repeating: 0, count: k * d)
    func copy(_ point: Int, to j: Int) { for t in 0..<d { centroids[j * d + t] = points[point * d + t] } }
    copy(sub[rng.below(m)], to: 0)
    var d2 = [Double](repeating: .infinity, count: m)
    for j in 1..<max(k, 1) {
        // Distances to the centre just added.
        var total = 0.0
        for (s, p) in sub.enumerated() {
            var acc: Float = 0
            for t in 0..<d {
                let u = points[p * d + t] - centroids[(j - 1) * d + t]
                acc += u * u
            }
            d2[s] = min(d2[s], Double(acc))
            total += d2[s]
        }
        var pick = sub[rng.below(m)]  // all points already covered: any point will do
        if total > 0 {
            var r = Double(rng.uniform()) * total
            for (s, p) in sub.enumerated() where d2[s] > 0 {
                pick = p  // the last candidate stands if rounding leaves r >= 0 at the end
                r -= d2[s]
                if r < 0 { break }
            }
        }
        copy(pick, to: j)
    }
    return centroids
}
