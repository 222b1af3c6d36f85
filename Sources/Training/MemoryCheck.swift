import ARModel
import Foundation
import Platform

/// The memory check made before anything large is allocated (issue 17): a model or batch too big
/// for the machine is an error that says how much it needs, how much there is, and what would
/// fit, instead of Swift's "failed to allocate" trap part-way through building the model.
public enum MemoryCheck {
    /// Memory left to use: the node's (MemAvailable, or the cgroup's limit less its use, whichever is
    /// less) and this process's (RLIMIT_AS less the address space in use), when known.
    public struct Available {
        public var node: Int?
        public var nodeSource = ""
        public var process: Int?
    }

    public static func available() -> Available {
        var a = Available()
        if let m = meminfo("MemAvailable:") {
            a.node = m
            a.nodeSource = "MemAvailable"
        }
        let limit = cgroupNumber("/sys/fs/cgroup/memory.max")
        if let limit, let used = cgroupNumber("/sys/fs/cgroup/memory.current") {
            let left = max(0, limit - used)
            if a.node.map({ left < $0 }) ?? true {
                a.node = left
                a.nodeSource = "the cgroup's memory.max"
            }
        }
        var lim = rlimit()
        if getrlimit(__rlimit_resource_t(RLIMIT_AS.rawValue), &lim) == 0, lim.rlim_cur != rlim_t.max {
            let used = ProcessMemory.field("VmSize:") ?? 0
            a.process = max(0, Int(clamping: lim.rlim_cur) - used)
        }
        return a
    }

    /// Throws (naming `source`) when one rank's estimate (`Trainer.MemoryBreakdown.estimate` for
    /// `config` on `ranks` ranks: the same figures as the start-up memory line) times
    /// `ranksOnNode` exceeds what the node has, or one rank's exceeds the process limit.
    public static func check(
        _ mc: ModelConfig, config: TrainConfig, ranks: Int, ranksOnNode: Int, source: String,
        available a: Available = available()
    ) throws {
        let estimate = Trainer.MemoryBreakdown.estimate(mc, config: config, ranks: ranks)
        let need = estimate.total
        let act = estimate.activations
        let fixed = need - act
        let nodeRanks = max(1, ranksOnNode)
        let limits: [(bytes: Int, ranks: Int, what: String)] =
            [
                a.node.map { ($0, nodeRanks, "available on this node (\(a.nodeSource)) for \(nodeRanks) rank(s)") },
                a.process.map { ($0, 1, "left under this process's address-space limit (ulimit -v)") },
            ].compactMap { $0 }
        for l in limits {
            let budget = l.bytes / l.ranks
            guard need > budget else { continue }
            let b = config.train.microBatch
            throw InputError(
                source,
                "the model needs about \(gb(need)) per rank (parameters, gradients, AdamW moments and "
                    + "buffers \(gb(fixed)), activations \(gb(act)) at train.micro_batch \(b)) but "
                    + "\(gb(l.bytes)) is \(l.what). "
                    + advice(mc, config: config, ranks: ranks, budget: budget))
        }
    }

    /// What would fit in `budget` bytes: the largest smaller micro-batch (and recompute, when it
    /// is off and would let the configured micro-batch fit), or else a smaller model.
    static func advice(_ mc: ModelConfig, config: TrainConfig, ranks: Int, budget: Int) -> String {
        func fits(_ b: Int, _ recompute: ActivationRecompute) -> Bool {
            var c = config
            c.train.microBatch = b
            c.train.recompute = recompute
            return Trainer.MemoryBreakdown.estimate(mc, config: c, ranks: ranks).total <= budget
        }
        let microBatch = config.train.microBatch
        let recompute = config.train.recompute
        var also = ""
        if recompute == .none && fits(microBatch, .blocks) {
            also = " train.recompute: blocks would fit at train.micro_batch \(microBatch)."
        }
        if fits(1, recompute) {
            var lo = 1
            var hi = max(1, microBatch - 1)  // fits(lo) holds; find the largest b <= hi that fits
            while lo < hi {
                let mid = (lo + hi + 1) / 2
                if fits(mid, recompute) { lo = mid } else { hi = mid - 1 }
            }
            return "train.micro_batch \(lo) or less would fit." + also
        }
        if !also.isEmpty { return String(also.dropFirst()) }
        let params = budget / 16 / 2
        return "Even the weights do not fit: a model of about \(params / 1_000_000)M parameters or less would "
            + "(model.dim, model.n_layer), with fewer ranks per node, dist.shard_optimizer or more memory."
    }

    static func gb(_ b: Int) -> String {
        b == Int.max ? "more than 9e18 bytes" : String(format: "%.2f GB", Double(b) / 1e9)
    }

    static func meminfo(_ key: String) -> Int? {
        guard let text = try? String(contentsOfFile: "/proc/meminfo", encoding: .utf8) else { return nil }
        return ProcessMemory.field(key, status: text)
    }

    static func cgroupNumber(_ path: String) -> Int? {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return nil }
        return Int(text.trimmingCharacters(in: .whitespacesAndNewlines))
    }
}
