import ARModel
import Foundation
import Kernels
import Platform
import Training

/// `--page-release PRESET`: what ZeRO-2 (`states+grads`) adds to a step by handing the gradient
/// buffer's pages back bucket by bucket, against a resident buffer as `states` keeps it. One rank
/// (no communication: the reduce is a copy into the owned slice), the model's own gradient buckets,
/// each written whole (as backward's first write to it faults its pages in) and then marked ready.
extension Bench {
    func timePageRelease(preset: String) throws {
        var c = try config(preset, base: list(bases).first ?? "llamagen")
        if window > 0 {
            c.window = window
            c.pluginDepth = depth
        }
        let order = try Transformer(config: c).gradientReadyOrder
        let count = order.map(\.count).reduce(0, +)
        let variants: [(String, () -> FlatBuffer, Bool)] = [
            ("resident buffer (states: write, reduce, memset)", { FlatBuffer(count: count) }, false),
            ("4 KB pages (states+grads: write, reduce, release)", { FlatBuffer(pages: count, hugePages: false) }, true),
            ("huge pages (states+grads: write, reduce, release)", { FlatBuffer(pages: count) }, true),
        ]
        var best = [Double](repeating: .infinity, count: variants.count)
        var granules = [Int](repeating: 0, count: variants.count)
        for _ in 0...steps {  // rounds alternate the variants; the first round is a warm-up too
            for (v, variant) in variants.enumerated() {
                let grads = variant.1()
                granules[v] = grads.releaseGranule
                let seconds = try pageReleaseStep(grads, order: order, release: variant.2)
                best[v] = min(best[v], seconds)
            }
        }
        print("ZeRO-2 gradient pages, \(preset) (\(count) floats, 25 MB buckets), best of \(steps + 1) rounds:")
        for (v, variant) in variants.enumerated() {
            let extra = v == 0 ? "" : String(format: "  (%+.3f s)", best[v] - best[0])
            let granule = variant.2 ? " [granule \(granules[v] * 4 / 1024) KB]" : ""
            print("  " + variant.0 + granule + String(format: ": %.3f s", best[v]) + extra)
        }
        if granules[2] == granules[1] {
            print("  (no transparent huge pages here: both page-backed rows use OS pages)")
        }
    }

    /// One step's gradient page work: every bucket written, then reduced (and released) as it completes.
    func pageReleaseStep(_ grads: FlatBuffer, order: [Range<Int>], release: Bool) throws -> Double {
        let count = grads.count
        let size = GradientSync.bucketElements(mb: 25)
        let shard = GradientSync.Shard(slices: [0..<count], rank: 0, releaseSource: release, bucketElements: size)
        let sync = try GradientSync(
            communicator: .solo, count: count, bucketMB: 25, readyOrder: order, mode: .blocking, shard: shard)
        let t0 = monotonicSeconds()
        sync.begin(grads, scale: 1)
        for r in order {
            (grads.base + r.lowerBound).update(repeating: 1, count: r.count)
            sync.markReady(r)
        }
        try sync.finish()
        grads.zero()
        return monotonicSeconds() - t0
    }
}
