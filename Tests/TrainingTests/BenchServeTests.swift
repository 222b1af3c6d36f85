import Foundation
import XCTest

/// `tensorar-bench --serve`, which `Launch/bench_torch.py --ours` drives to time this project's step in
/// pairs with the PyTorch peer's: it says "ready" once the model is built, answers each thread count
/// with one step's seconds, and ends at a line that is not a count.
final class BenchServeTests: XCTestCase {
    func testServeAnswersEachThreadCountWithOneStepsSecondsAndStopsAtAnythingElse() throws {
        let exe = try releaseExecutable("tensorar-bench")
        let p = Process()
        p.executableURL = URL(fileURLWithPath: exe)
        p.arguments = ["--serve", "--presets", "small", "--batches", "1"]
        let input = Pipe()
        let output = Pipe()
        p.standardInput = input
        p.standardOutput = output
        try p.run()
        input.fileHandleForWriting.write(Data("1\n2\n1\nend\n3\n".utf8))
        try input.fileHandleForWriting.close()
        let text = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        XCTAssertEqual(p.terminationStatus, 0, text)
        let lines = text.split(separator: "\n").map(String.init)
        guard let ready = lines.firstIndex(of: "ready") else { return XCTFail("no 'ready' in:\n\(text)") }
        let seconds = lines[(ready + 1)...].map { Double($0) }
        XCTAssertEqual(seconds.count, 3, "one reply per count before 'end', none after:\n\(text)")
        for s in seconds {
            guard let s else { return XCTFail("a reply is not seconds:\n\(text)") }
            XCTAssertTrue(s.isFinite && s > 0 && s < 60, "\(s) s")
        }
    }
}
