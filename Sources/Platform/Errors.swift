/// An error for bad input: names the file (or object) and the problem, for a person to read.
public struct InputError: Error, CustomStringConvertible {
    public let file: String
    public let problem: String
    public init(_ file: String, _ problem: String) { self.file = file; self.problem = problem }
    public var description: String { "\(file): \(problem)" }
}
