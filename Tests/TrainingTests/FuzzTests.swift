import ARModel
import Foundation
import Kernels
import Platform
import TokenData
import XCTest

@testable import Training

/// Issue 17's fuzzer: random mutations of valid files, for a fixed time, against the readers of
/// safetensors weights, HDF5 token caches, checkpoints (shards and manifest) and configs. Each
/// input runs in a forked child, so a crash is counted (and its input kept), not fatal. Verdicts:
/// rejected cleanly (an InputError), accepted unchanged, accepted changed where the format cannot
/// tell (data bytes of an unchecksummed file, a manifest's free fields), accepted wrongly, or not
/// clean (another error type, or a crash). The test fails on any crash, unclean or wrong verdict.
///
/// CI runs it briefly (TENSORAR_FUZZ_SECONDS, default 6 s in all); by hand, e.g.
/// `TENSORAR_FUZZ_SECONDS=600 swift test --skip-build --filter FuzzTests`.
final class FuzzTests: XCTestCase {
    enum Verdict: Int32 {
        case rejected = 0
        case same, undetectable, wrong, unclean
    }

    struct Tally: CustomStringConvertible {
        var counts = [Int](repeating: 0, count: 5)
        var crashed = 0
        var tried: Int { counts.reduce(0, +) + crashed }
        var description: String {
            "\(tried) inputs: \(counts[0]) rejected cleanly, \(counts[1]) accepted unchanged, \(counts[2]) accepted "
                + "changed (not detectable by the format), \(counts[3]) accepted wrongly, \(counts[4]) not clean, "
                + "\(crashed) crashed"
        }
    }

    static var secondsPerTarget: Double {
        (Double(ProcessInfo.processInfo.environment["TENSORAR_FUZZ_SECONDS"] ?? "") ?? 6) / 6
    }

    /// Classifies what `read` did: an InputError is a clean rejection; `classify` judges a result.
    static func judge<T>(_ read: () throws -> T, _ classify: (T) -> Verdict) -> Verdict {
        do { return classify(try read()) } catch is InputError { return .rejected } catch { return .unclean }
    }

    /// Runs `attempt` in a forked child; nil when the child died of a signal.
    func inChild(_ attempt: () -> Verdict) -> Verdict? {
        fflush(stdout)
        let pid = fork()
        if pid == 0 { _exit(attempt().rawValue) }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        guard status & 0x7f == 0 else { return nil }
        return Verdict(rawValue: (status >> 8) & 0xff) ?? .unclean
    }

    /// Mutates `d` with 1-4 random edits (bit flips, interesting bytes, extreme numbers in text,
    /// deleted or repeated spans, truncation) inside `region` when given.
    static func mutate(_ d: inout Data, _ rng: inout CounterRNG, region: Range<Int>? = nil) {
        let interesting: [UInt8] = [
            0, 0xFF, 0x7F, 0x80, UInt8(ascii: "-"), UInt8(ascii: "9"), UInt8(ascii: "\""),
            UInt8(ascii: "]"), UInt8(ascii: "{"), UInt8(ascii: ","), UInt8(ascii: "e"),
        ]
        let numbers = ["-1", "0", "1e308", "-1e308", "99999999999999999999", ".nan", ".inf", "4294967296", "1.5"]
        for _ in 0..<(1 + Int(rng.next() % 4)) where !d.isEmpty {
            let r = region.map { $0.clamped(to: 0..<d.count) } ?? 0..<d.count
            if r.isEmpty { return }
            let i = r.lowerBound + Int(rng.next() % UInt64(r.count))
            switch rng.next() % 6 {
            case 0: d[i] ^= UInt8(1 << (rng.next() % 8))
            case 1: d[i] = interesting[Int(rng.next() % UInt64(interesting.count))]
            case 2:
                let n = Data(numbers[Int(rng.next() % UInt64(numbers.count))].utf8)
                let end = min(d.count, i + 1 + Int(rng.next() % 3))
                d.replaceSubrange(i..<end, with: n)
            case 3: d.removeSubrange(i..<min(d.count, i + 1 + Int(rng.next() % 16)))
            case 4: d.insert(contentsOf: d[i..<min(d.count, i + 1 + Int(rng.next() % 16))], at: i)
            default: d = d.prefix(i)
            }
        }
    }

    /// Mutates `original` (written to `path`) and runs `check` in a child, for the time budget.
    func fuzz(
        _ name: String, original: Data, path: String, seed: UInt64,
        mutate: (inout Data, inout CounterRNG) -> Void, check: () -> Verdict
    ) throws -> Tally {
        var tally = Tally()
        var rng = CounterRNG(seed: seed)
        let end = Date().addingTimeInterval(FuzzTests.secondsPerTarget)
        repeat {
            var d = original
            mutate(&d, &rng)
            try d.write(to: URL(fileURLWithPath: path))
            if let v = inChild(check) {
                tally.counts[Int(v.rawValue)] += 1
                if v == .wrong || v == .unclean {
                    let kept = NSTemporaryDirectory() + "tensorar-fuzz-\(v)-\(name)-\(tally.counts[Int(v.rawValue)])"
                    try? d.write(to: URL(fileURLWithPath: kept))
                    print("fuzz \(name): \(v) verdict; input kept at \(kept)")
                }
            } else {
                tally.crashed += 1
                let kept = NSTemporaryDirectory() + "tensorar-fuzz-crash-\(name)-\(tally.crashed)"
                try? d.write(to: URL(fileURLWithPath: kept))
                print("fuzz \(name): crash; input kept at \(kept)")
            }
        } while Date() < end
        try original.write(to: URL(fileURLWithPath: path))
        print("fuzz \(name): \(tally)")
        return tally
    }

    func assertClean(_ t: Tally, _ name: String, line: UInt = #line) {
        XCTAssertGreaterThan(t.tried, 0, line: line)
        XCTAssertEqual(t.crashed, 0, "\(name): \(t)", line: line)
        XCTAssertEqual(t.counts[Int(Verdict.unclean.rawValue)], 0, "\(name): \(t)", line: line)
        XCTAssertEqual(t.counts[Int(Verdict.wrong.rawValue)], 0, "\(name): \(t)", line: line)
    }
}

extension FuzzTests {
    func testSafetensorsReader() throws {
        let dir = try temporaryFolder(self)
        let path = dir + "/model.safetensors"
        let m = try Transformer(config: testModel(dim: 8, ffn: 16, layers: 1, vocab: 16))
        m.initialise(seed: 3)
        try m.save(path)
        let original = try Data(contentsOf: URL(fileURLWithPath: path))
        let headerEnd = 8 + Int(original.prefix(8).withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) })
        let want = (m.config, m.params.array)
        var inHeader = true
        let t = try fuzz(
            "safetensors", original: original, path: path, seed: 1,
            mutate: { d, rng in
                inHeader = rng.next() % 4 != 0
                FuzzTests.mutate(&d, &rng, region: inHeader ? 0..<headerEnd : headerEnd..<original.count)
            },
            check: {
                FuzzTests.judge({ try Transformer.load(path) }) { got in
                    if got.config == want.0 && got.params.array == want.1 { return .same }
                    // No checksum in the format: changed data bytes, or a header value changed to
                    // another valid one (e.g. rope_base), cannot be told from a real file. Different
                    // numbers from a changed header (offsets pointing elsewhere) would be wrong.
                    return inHeader && got.params.array != want.1 ? .wrong : .undetectable
                }
            })
        assertClean(t, "safetensors")
    }

    func testTokenCacheReader() throws {
        let dir = try temporaryFolder(self) + "/cache"
        try writeTinyCache(dir, samples: 24)
        let shard = dir + "/shard-00000.h5"
        let json = dir + "/dataset.json"
        func readAll() throws -> [Int32] {
            let c = try TokenCache(directory: dir)
            let idx = Array(0..<c.count)
            var out: [Int32] = []
            for a in 0..<c.info.augmentations {
                let r = try c.read(indices: idx, augmentations: idx.map { _ in a })
                out += r.codes + r.labels
            }
            return out + [Int32(c.count)]
        }
        let want = try readAll()
        var tallies: [Tally] = []
        for (i, file) in [shard, json].enumerated() {
            let original = try Data(contentsOf: URL(fileURLWithPath: file))
            tallies.append(
                try fuzz(
                    "cache-" + (file as NSString).lastPathComponent, original: original, path: file,
                    seed: 10 + UInt64(i), mutate: { FuzzTests.mutate(&$0, &$1) },
                    check: {
                        FuzzTests.judge(readAll) { got in
                            if got == want { return .same }
                            // Open and read check structure and ranges, not every byte: the sha256 of
                            // dataset.json (tensorar-data verify) must catch the rest.
                            return (try? verifyCache(directory: dir)) == nil ? .undetectable : .wrong
                        }
                    }))
        }
        for (t, name) in zip(tallies, ["cache shard", "dataset.json"]) { assertClean(t, name) }
    }

    func testCheckpointReader() throws {
        var cfg = TrainConfig()
        cfg.checkpoint.dir = try temporaryFolder(self)
        cfg.checkpoint.run = "run"
        let model = testModel(dim: 8, ffn: 16, layers: 1, vocab: 16)
        let table = ParameterTable(model)
        let params = randomBuffer(table.total, seed: 4)
        let opt = AdamW(table: table, trainable: PerGroup(base: true, plugin: true))
        let grads = randomBuffer(table.total, seed: 5)
        opt.step(params: params, grads: grads, lr: PerGroup(base: 1e-3, plugin: 1e-3), clip: 1)
        let store = CheckpointStore(config: cfg)
        let progress = TrainingProgress(step: 3, samplesSeen: 24, dataOffset: 24, seed: 0)
        let dir = try store.save(
            progress: progress, config: cfg, model: model, table: table, params: params,
            optimizer: opt, communicator: .solo)
        func load() throws -> ([Float], [Float], [Float], PerGroup<Int>, TrainingProgress) {
            let p = FlatBuffer(count: table.total)
            let o = AdamW(table: table, trainable: PerGroup(base: true, plugin: true))
            let c = try CheckpointStore.load(from: dir, model: model, table: table, params: p, optimizer: o)
            return (p.array, o.m.array, o.v.array, o.steps, c.progress)
        }
        let want = try load()
        var tallies: [Tally] = []
        for (i, file) in [dir + "/rank-00000-of-00001.h5", dir + "/manifest.json"].enumerated() {
            let original = try Data(contentsOf: URL(fileURLWithPath: file))
            let name = "checkpoint-" + (file as NSString).lastPathComponent
            tallies.append(
                try fuzz(
                    name, original: original, path: file,
                    seed: 20 + UInt64(i), mutate: { FuzzTests.mutate(&$0, &$1) },
                    check: {
                        FuzzTests.judge(load) { got in
                            if got.0 != want.0 || got.1 != want.1 || got.2 != want.2 || got.3 != want.3 {
                                return .wrong
                            }
                            return got.4 == want.4 ? .same : .undetectable  // e.g. a manifest's seed: no checksum
                        }
                    }))
        }
        for (t, name) in zip(tallies, ["checkpoint shard", "manifest.json"]) { assertClean(t, name) }
    }

    func testConfigReader() throws {
        let dir = try temporaryFolder(self)
        let path = dir + "/run.yaml"
        let original = Data(TrainConfig().yamlString().utf8)
        let t = try fuzz(
            "config", original: original, path: path, seed: 30, mutate: { FuzzTests.mutate(&$0, &$1) },
            check: {
                FuzzTests.judge({ () -> TrainConfig in
                    let c = try TrainConfig.load(file: path)
                    try c.validate(worldSize: 1, source: path)
                    return c
                }) { _ in .same }  // any config that validates is a config a person may mean
            })
        assertClean(t, "config")
    }
}
