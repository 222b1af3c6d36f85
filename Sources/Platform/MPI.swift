import CSupport
import Foundation

/// An MPI call that returned an error. Names the call and carries MPI's own message.
public struct MPIError: Error, CustomStringConvertible {
    public let call: String
    public let code: Int32
    public let message: String
    public var description: String { "\(call) failed (MPI error \(code)): \(message)" }
}

/// Turns an MPI return code into a thrown `MPIError` naming the call. The world communicator is
/// switched to MPI_ERRORS_RETURN at start-up, so codes really come back instead of aborting.
@inline(__always) private func check(_ rc: Int32, _ call: @autoclosure () -> String) throws {
    if rc != 0 { throw MPIError(call: call(), code: rc, message: MPI.errorString(rc)) }
}

/// Process-wide MPI state: initialisation (once), thread level, finalisation and abort.
/// Data parallel training runs one process per rank under `mpirun`; without `mpirun` the process
/// is an MPI singleton (world size 1), or, with `Communicator.solo`, does not touch MPI at all.
public enum MPI {
    /// The thread support MPI granted (MPI_Init_thread's `provided`), in the standard's order.
    public enum ThreadLevel: Int, Comparable, Sendable, CustomStringConvertible {
        case single = 0, funneled, serialized, multiple
        public static func < (a: ThreadLevel, b: ThreadLevel) -> Bool { a.rawValue < b.rawValue }
        public var description: String {
            ["MPI_THREAD_SINGLE", "MPI_THREAD_FUNNELED", "MPI_THREAD_SERIALIZED", "MPI_THREAD_MULTIPLE"][rawValue]
        }
    }

    private static let lock = NSLock()
    private static var worldCommunicator: Communicator?
    private static var grantedLevel: ThreadLevel = .single

    /// True when this process was started by OpenMPI's `mpirun` (OMPI_COMM_WORLD_SIZE is set).
    public static var isUnderMPIRun: Bool { ProcessInfo.processInfo.environment["OMPI_COMM_WORLD_SIZE"] != nil }

    /// Ranks started on this machine (OMPI_COMM_WORLD_LOCAL_SIZE under `mpirun`, else 1): for
    /// sharing its cores between them (`dist.threads_per_rank: auto`).
    public static var ranksOnThisNode: Int {
        ProcessInfo.processInfo.environment["OMPI_COMM_WORLD_LOCAL_SIZE"].flatMap { Int($0) } ?? 1
    }

    /// Whether MPI_Init has run (by us or anyone) and MPI_Finalize has not.
    public static var isActive: Bool {
        var initialised: Int32 = 0
        var finalised: Int32 = 0
        MPI_Initialized(&initialised)
        MPI_Finalized(&finalised)
        return initialised != 0 && finalised == 0
    }

    /// The thread level granted at initialisation (`.single` before it).
    public static var threadLevel: ThreadLevel {
        lock.lock()
        defer { lock.unlock() }
        return grantedLevel
    }

    /// The world communicator once `initialize()` has run, else nil.
    public static var world: Communicator? {
        lock.lock()
        defer { lock.unlock() }
        return worldCommunicator
    }

    /// Initialises MPI once, requesting MPI_THREAD_MULTIPLE (the gradient thread of `GradientSync`
    /// makes MPI calls while the main thread may make others). A lower granted level is accepted and
    /// recorded in `threadLevel`; users that need more check it. Later calls return the same world
    /// communicator. Works without `mpirun` (a singleton of size 1; takes 0.2-0.5 s).
    public static func initialize() throws -> Communicator {
        lock.lock()
        defer { lock.unlock() }
        if let w = worldCommunicator { return w }
        var finalised: Int32 = 0
        MPI_Finalized(&finalised)
        if finalised != 0 {
            throw MPIError(call: "MPI_Init_thread", code: -1, message: "MPI was already finalised in this process")
        }
        var initialised: Int32 = 0
        MPI_Initialized(&initialised)
        var provided: Int32 = 0
        if initialised == 0 {
            try check(MPI_Init_thread(nil, nil, tar_mpi_thread_multiple(), &provided), "MPI_Init_thread")
        } else {
            try check(MPI_Query_thread(&provided), "MPI_Query_thread")
        }
        if provided >= tar_mpi_thread_multiple() {
            grantedLevel = .multiple
        } else if provided >= tar_mpi_thread_serialized() {
            grantedLevel = .serialized
        } else {
            grantedLevel = provided > 0 ? .funneled : .single
        }
        let comm = tar_mpi_comm_world()
        // Errors come back as codes (and become Swift errors) instead of MPI killing the process.
        try check(MPI_Comm_set_errhandler(comm, tar_mpi_errors_return()), "MPI_Comm_set_errhandler")
        var rank: Int32 = 0
        var size: Int32 = 0
        try check(MPI_Comm_rank(comm, &rank), "MPI_Comm_rank")
        try check(MPI_Comm_size(comm, &size), "MPI_Comm_size")
        let w = Communicator(comm: comm, rank: Int(rank), size: Int(size), owned: false)
        worldCommunicator = w
        return w
    }

    /// Finalises MPI (once; later calls do nothing). Every rank must call it before exiting, or
    /// `mpirun` reports the job as failed. No MPI call may follow.
    public static func finalize() throws {
        lock.lock()
        defer { lock.unlock() }
        guard isActive else { return }
        try check(MPI_Finalize(), "MPI_Finalize")
        worldCommunicator = nil
    }

    /// Ends the whole job, every rank, with `code`: the way out when one rank hits an error the
    /// others cannot know about (they would otherwise wait forever in their next collective).
    /// Without MPI it just exits.
    public static func abort(_ code: Int32 = 1) -> Never {
        if isActive { MPI_Abort(tar_mpi_comm_world(), code) }
        exit(code)
    }

    static func errorString(_ code: Int32) -> String {
        var buffer = [CChar](repeating: 0, count: 1024)
        var length: Int32 = 0
        if MPI_Error_string(code, &buffer, &length) != 0 { return "unknown MPI error" }
        return String(cString: buffer)
    }
}

/// A group of ranks that talk to each other (MPI_COMM_WORLD, or a duplicate of it). Every
/// collective must be called by every rank of the communicator, in the same order.
///
/// `Communicator.solo` is this process alone without MPI: rank 0 of 1, every collective the
/// identity. Tests and single-process runs use it and never initialise MPI.
public final class Communicator: @unchecked Sendable {
    public let rank: Int
    public let size: Int
    /// nil for `solo`.
    private let comm: MPI_Comm?
    /// Whether we created `comm` (MPI_Comm_dup) and must free it.
    private let owned: Bool

    /// Reduction operations for `allreduce`.
    public enum ReduceOp: Sendable { case sum, max, min }

    /// This process alone, without MPI.
    public static let solo = Communicator(comm: nil, rank: 0, size: 1, owned: false)

    init(comm: MPI_Comm?, rank: Int, size: Int, owned: Bool) {
        self.comm = comm
        self.rank = rank
        self.size = size
        self.owned = owned
    }

    deinit {
        if owned, MPI.isActive {
            var c: MPI_Comm? = comm
            MPI_Comm_free(&c)
        }
    }

    /// Whether collectives go through MPI (false for `solo`).
    public var usesMPI: Bool { comm != nil }
    public var isRoot: Bool { rank == 0 }

    /// A new communicator over the same ranks whose collectives never mix with this one's, so a
    /// second thread (the gradient thread) can run its own collectives safely (MPI_Comm_dup).
    /// Collective: every rank must call it.
    public func duplicate() throws -> Communicator {
        guard let comm else { return Communicator(comm: nil, rank: 0, size: 1, owned: false) }
        var dup: MPI_Comm? = nil
        try check(MPI_Comm_dup(comm, &dup), "MPI_Comm_dup")
        try check(MPI_Comm_set_errhandler(dup, tar_mpi_errors_return()), "MPI_Comm_set_errhandler")
        return Communicator(comm: dup, rank: rank, size: size, owned: true)
    }

    public func barrier() throws {
        guard let comm else { return }
        try check(MPI_Barrier(comm), "MPI_Barrier")
    }

    private func op(_ o: ReduceOp) -> MPI_Op? {
        switch o {
        case .sum: return tar_mpi_sum()
        case .max: return tar_mpi_max()
        case .min: return tar_mpi_min()
        }
    }

    /// In-place allreduce of raw memory, in pieces of at most Int32.max elements (MPI counts are int).
    private func allreduceRaw(
        _ buffer: UnsafeMutableRawPointer, count: Int, stride: Int, type: MPI_Datatype?, op o: ReduceOp
    ) throws {
        guard let comm, count > 0 else { return }
        var done = 0
        while done < count {
            let n = min(count - done, Int(Int32.max))
            try check(
                MPI_Allreduce(tar_mpi_in_place(), buffer + done * stride, Int32(n), type, op(o), comm),
                "MPI_Allreduce(\(n) elements)")
            done += n
        }
    }

    /// Reduces `count` values across ranks, in place: afterwards every rank holds the result.
    public func allreduce(_ buffer: UnsafeMutablePointer<Float>, count: Int, op: ReduceOp = .sum) throws {
        try allreduceRaw(buffer, count: count, stride: 4, type: tar_mpi_float(), op: op)
    }
    public func allreduce(_ buffer: UnsafeMutablePointer<Double>, count: Int, op: ReduceOp = .sum) throws {
        try allreduceRaw(buffer, count: count, stride: 8, type: tar_mpi_double(), op: op)
    }
    public func allreduce(_ buffer: UnsafeMutablePointer<Int64>, count: Int, op: ReduceOp = .sum) throws {
        try allreduceRaw(buffer, count: count, stride: 8, type: tar_mpi_int64(), op: op)
    }
    public func allreduce(_ values: inout [Float], op: ReduceOp = .sum) throws {
        let n = values.count
        try values.withUnsafeMutableBufferPointer { try allreduce($0.baseAddress!, count: n, op: op) }
    }
    public func allreduce(_ values: inout [Double], op: ReduceOp = .sum) throws {
        let n = values.count
        try values.withUnsafeMutableBufferPointer { try allreduce($0.baseAddress!, count: n, op: op) }
    }
    public func allreduce(_ values: inout [Int64], op: ReduceOp = .sum) throws {
        let n = values.count
        try values.withUnsafeMutableBufferPointer { try allreduce($0.baseAddress!, count: n, op: op) }
    }
    /// One value reduced across ranks (e.g. a loss sum, or an "any rank failed" flag with `.min`).
    public func allreduce(_ value: Double, op: ReduceOp = .sum) throws -> Double {
        var v = [value]
        try allreduce(&v, op: op)
        return v[0]
    }
    public func allreduce(_ value: Int64, op: ReduceOp = .sum) throws -> Int64 {
        var v = [value]
        try allreduce(&v, op: op)
        return v[0]
    }

    /// Root's bytes, delivered to every rank (other ranks' `bytes` are ignored; lengths may differ).
    public func broadcast(_ bytes: [UInt8], root: Int = 0) throws -> [UInt8] {
        guard let comm else { return bytes }
        var length = Int64(bytes.count)
        try check(MPI_Bcast(&length, 1, tar_mpi_int64(), Int32(root), comm), "MPI_Bcast(length)")
        guard length <= Int64(Int32.max) else {
            throw MPIError(call: "MPI_Bcast", code: -1, message: "payload of \(length) bytes is too large")
        }
        var out = rank == root ? bytes : [UInt8](repeating: 0, count: Int(length))
        if length > 0 {
            try check(MPI_Bcast(&out, Int32(length), tar_mpi_byte(), Int32(root), comm), "MPI_Bcast(\(length) bytes)")
        }
        return out
    }

    /// Assembles a buffer every rank holds a part of, in place: rank r has filled `blocks[r]` (the
    /// same list on every rank, ascending, not overlapping); afterwards every rank holds all the
    /// blocks (MPI_Allgatherv). Each block and the end of the last one must fit an Int32.
    public func allgather(inPlace buffer: UnsafeMutablePointer<Float>, blocks: [Range<Int>]) throws {
        guard let comm else { return }
        precondition(blocks.count == size, "allgather: \(blocks.count) blocks for \(size) ranks")
        guard let end = blocks.last?.upperBound, end <= Int(Int32.max) else {
            throw MPIError(
                call: "MPI_Allgatherv", code: -1,
                message: "buffer of \(blocks.last?.upperBound ?? 0) floats is beyond MPI's int counts")
        }
        var counts = blocks.map { Int32($0.count) }
        var displs = blocks.map { Int32($0.lowerBound) }
        try check(
            MPI_Allgatherv(tar_mpi_in_place(), 0, tar_mpi_float(), buffer, &counts, &displs, tar_mpi_float(), comm),
            "MPI_Allgatherv(\(end) floats)")
    }

    /// Sums `counts.reduce(0, +)` floats at `send` over the ranks and scatters the sum: rank r
    /// receives block r (`counts[r]` floats; the blocks follow each other in rank order) into
    /// `recv` (MPI_Reduce_scatter, ZeRO's gradient reduction). `recv` must not overlap `send`.
    public func reduceScatter(
        _ send: UnsafeMutablePointer<Float>, into recv: UnsafeMutablePointer<Float>,
        counts: [Int]
    ) throws {
        precondition(counts.count == size, "reduceScatter: \(counts.count) counts for \(size) ranks")
        guard let comm else {
            recv.update(from: send, count: counts[0])
            return
        }
        let total = counts.reduce(0, +)
        guard total <= Int(Int32.max) else {
            throw MPIError(call: "MPI_Reduce_scatter", code: -1, message: "\(total) floats is beyond MPI's int counts")
        }
        var c = counts.map { Int32($0) }
        try check(
            MPI_Reduce_scatter(send, recv, &c, tar_mpi_float(), tar_mpi_sum(), comm),
            "MPI_Reduce_scatter(\(total) floats)")
    }

    /// Sums `count` floats at `send` over the ranks into `recv` on rank `root` only (MPI_Reduce;
    /// `recv` is not written on the other ranks and must not overlap `send`).
    public func reduce(
        _ send: UnsafeMutablePointer<Float>, into recv: UnsafeMutablePointer<Float>, count: Int,
        root: Int
    ) throws {
        guard let comm else {
            recv.update(from: send, count: count)
            return
        }
        guard count <= Int(Int32.max) else {
            throw MPIError(call: "MPI_Reduce", code: -1, message: "\(count) floats is beyond MPI's int counts")
        }
        try check(
            MPI_Reduce(send, recv, Int32(count), tar_mpi_float(), tar_mpi_sum(), Int32(root), comm),
            "MPI_Reduce(\(count) floats to rank \(root))")
    }

    /// Every rank's `values` (the same count on every rank), indexed by rank.
    public func allgather(_ values: [Int64]) throws -> [[Int64]] {
        guard let comm else { return [values] }
        let n = values.count
        var out = [Int64](repeating: 0, count: n * size)
        var send = values
        if n > 0 {
            try check(
                MPI_Allgather(&send, Int32(n), tar_mpi_int64(), &out, Int32(n), tar_mpi_int64(), comm), "MPI_Allgather")
        }
        return (0..<size).map { Array(out[($0 * n)..<(($0 + 1) * n)]) }
    }
}
