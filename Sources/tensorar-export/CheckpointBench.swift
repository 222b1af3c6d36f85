import ARModel
import ArgumentParser
import Foundation
import Kernels
import Platform
import Training

/// `mpirun -n W tensorar-export bench`: how fast checkpoints are written and read for a
/// preset-sized model (default B with the k = 4, d = 2 plug-in: 139M parameters, so 1.7 GB of
/// parameters and AdamW moments). Saves one checkpoint collectively, evicts its files from the page
/// cache, loads it back collectively (disk), loads it again (page cache), checks the numbers came
/// back, and removes it. Bytes/s count the three float32 arrays (HDF5 overhead is under 0.1%).
struct CheckpointBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench", abstract: "Checkpoint write and read speed (run under mpirun -n W).")

    @Option(help: "Model size preset: \(ModelConfig.presetNames.joined(separator: ", ")).") var preset = "B"
    @Option(help: "Plug-in window k.") var window = 4
    @Option(help: "Plug-in depth d.") var depth = 2
    @Option(help: "Folder to write the checkpoint in (removed afterwards); must have room for it.") var dir =
        NSTemporaryDirectory()
    @Flag(help: "Print one JSON object (rank 0) instead of lines.") var json = false

    func run() throws {
        try exitingOnInputError(exitCode: 2) {
            let comm = try MPI.initialize()
            defer { try? MPI.finalize() }
            try measure(comm)
        }
    }

    func measure(_ comm: Communicator) throws {
        var mc = try ModelConfig.preset(preset)
        mc.window = window
        mc.pluginDepth = depth
        let table = ParameterTable(mc)
        let P = table.total
        let params = FlatBuffer(count: P)
        let opt = AdamW(table: table, trainable: PerGroup(base: true, plugin: true))
        // Distinct values everywhere (what they are does not matter: nothing is compressed).
        for i in 0..<P { params[i] = Float(i % 9973) * 1e-4 - 0.5 }
        for i in 0..<opt.m.count {
            opt.m[i] = Float(i % 7919) * 1e-6
            opt.v[i] = Float(i % 7907) * 1e-9
        }
        let fingerprint = [params, opt.m, opt.v].map { b in
            stride(from: 0, to: b.count, by: 4099).reduce(0.0) { $0 + Double(b[$1]) }
        }

        var config = TrainConfig()
        config.checkpoint.dir = dir
        config.checkpoint.run = "tensorar-checkpoint-bench-\(comm.size)"
        config.checkpoint.keepLast = 1
        let store = CheckpointStore(config: config)
        defer { if comm.isRoot { try? FileManager.default.removeItem(atPath: store.runDirectory) } }
        let bytes = Double(3 * P * MemoryLayout<Float>.size)

        func timed(_ body: () throws -> Void) throws -> Double {
            try comm.barrier()
            let t0 = monotonicSeconds()
            try body()
            try comm.barrier()
            return monotonicSeconds() - t0
        }
        var written = ""
        let write = try timed {
            written = try store.save(
                progress: TrainingProgress(step: 1, samplesSeen: 0, seed: 0), config: config, model: mc, table: table,
                params: params, optimizer: opt, communicator: comm)
        }
        // Reading from disk: drop the shards from the page cache first (each rank its own file).
        try evictFromPageCache(written + "/" + CheckpointStore.shardName(rank: comm.rank, worldSize: comm.size))
        var reads: [Double] = []
        for _ in 0..<2 {
            params.zero()
            opt.m.zero()
            opt.v.zero()
            reads.append(
                try timed {
                    _ = try CheckpointStore.load(
                        from: written, model: mc, table: table, params: params, optimizer: opt, communicator: comm)
                })
            let back = [params, opt.m, opt.v].map { b in
                stride(from: 0, to: b.count, by: 4099).reduce(0.0) { $0 + Double(b[$1]) }
            }
            guard back == fingerprint else {
                throw InputError(written, "the numbers read back differ from those written")
            }
        }
        guard comm.isRoot else { return }
        let gb = bytes / 1e9
        if json {
            let out: [String: Any] = [
                "ranks": comm.size, "parameters": P, "bytes": Int(bytes), "write_seconds": write,
                "read_disk_seconds": reads[0], "read_cached_seconds": reads[1],
                "write_bytes_per_s": bytes / write, "read_disk_bytes_per_s": bytes / reads[0],
                "read_cached_bytes_per_s": bytes / reads[1],
            ]
            print(
                String(data: try JSONSerialization.data(withJSONObject: out, options: [.sortedKeys]), encoding: .utf8)!)
        } else {
            print(
                String(
                    format:
                        "checkpoint of %@ + plug-in (k %d, d %d): %d parameters, %.2f GB (params + 2 AdamW "
                        + "moments), %d rank(s), folder %@",
                    preset, window, depth, P, gb, comm.size, dir))
            print(String(format: "  write (incl. fsync):        %6.2f s  %6.2f GB/s", write, gb / write))
            print(String(format: "  read from disk (+exchange): %6.2f s  %6.2f GB/s", reads[0], gb / reads[0]))
            print(String(format: "  read from page cache:       %6.2f s  %6.2f GB/s", reads[1], gb / reads[1]))
        }
    }
}

/// Asks the kernel to drop a file's (clean, synced) pages from the page cache.
func evictFromPageCache(_ path: String) throws {
    let fd = open(path, O_RDONLY)
    guard fd >= 0 else { throw InputError(path, "cannot open: \(String(cString: strerror(errno)))") }
    defer { close(fd) }
    let rc = posix_fadvise(fd, 0, 0, Int32(POSIX_FADV_DONTNEED))
    if rc != 0 { throw InputError(path, "posix_fadvise failed: \(String(cString: strerror(rc)))") }
}
