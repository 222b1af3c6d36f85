/// Buckets (ranges that together cover a flat buffer once) in address order, to find the buckets
/// a range meets: `GradientSync` (which buckets a ready range completes, a bucket's neighbours for
/// ZeRO-2's page release) and `ParameterGather` (which buckets a forward range waits for).
struct BucketIndex {
    let buckets: [Range<Int>]
    /// Bucket indices by where they start.
    let byStart: [Int]

    init(_ buckets: [Range<Int>]) {
        self.buckets = buckets
        byStart = buckets.indices.sorted { buckets[$0].lowerBound < buckets[$1].lowerBound }
    }

    /// The position in `byStart` of the first bucket that ends after `offset` (the one holding it).
    func position(of offset: Int) -> Int {
        var lo = 0
        var hi = byStart.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if buckets[byStart[mid]].upperBound <= offset { lo = mid + 1 } else { hi = mid }
        }
        return lo
    }

    /// The bucket at `position` in address order.
    func bucket(at position: Int) -> Range<Int> { buckets[byStart[position]] }

    /// The buckets the non-empty `range` overlaps, in address order.
    func meeting(_ range: Range<Int>) -> ArraySlice<Int> {
        var end = position(of: range.lowerBound)
        let start = end
        while end < byStart.count && buckets[byStart[end]].lowerBound < range.upperBound { end += 1 }
        return byStart[start..<end]
    }
}
