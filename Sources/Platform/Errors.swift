import Foundation

/// An error for bad input: names the file (or object) and the problem, for a person to read.
public struct InputError: Error, CustomStringConvertible {
    public let file: String
    public let problem: String
    public init(_ file: String, _ problem: String) {
        self.file = file
        self.problem = problem
    }
    public var description: String { "\(file): \(problem)" }
}

/// Runs a command's body; bad input (an InputError) is printed as `error: <file>: <problem>` on
/// stderr and the process exits with `exitCode`, without a trace. Other errors pass through.
public func exitingOnInputError(exitCode: Int32, _ body: () throws -> Void) rethrows {
    do { try body() } catch let e as InputError {
        FileHandle.standardError.write(Data("error: \(e)\n".utf8))
        exit(exitCode)
    }
}
