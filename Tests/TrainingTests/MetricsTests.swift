import XCTest

@testable import Training

final class MetricsTests: XCTestCase {
    func testJSONLines() throws {
        let dir = try temporaryFolder(self)
        let path = dir + "/sub/metrics.jsonl"
        do {
            let log = try MetricsLog(path: path)
            try log.log(["step": 1, "loss": 2.5, "note": "a \"quoted\"\nline", "ok": true])
            try log.log(["step": 2, "loss": .double(.nan)])
        }
        try MetricsLog(path: path).log(["step": 3])  // reopening appends
        let lines = try String(contentsOfFile: path, encoding: .utf8).split(separator: "\n")
        XCTAssertEqual(lines.count, 3)
        XCTAssertEqual(String(lines[0]), #"{"step": 1, "loss": 2.5, "note": "a \"quoted\"\nline", "ok": true}"#)
        XCTAssertEqual(String(lines[1]), #"{"step": 2, "loss": null}"#)
        for l in lines {  // every line is JSON
            XCTAssertNoThrow(try JSONSerialization.jsonObject(with: Data(l.utf8)))
        }
    }

    func testProgressLine() {
        let s = ProgressLine.format(step: 120, total: 500, loss: 3.21449, tokensPerSecond: 12345, secondsPerStep: 0.5)
        XCTAssertEqual(s, "step 120/500 (24.0%) | loss 3.2145 | 12.3k tok/s | 0.500 s/step | ETA 3m10s")
        XCTAssertEqual(ProgressLine.duration(7384), "2h03m")
        XCTAssertEqual(ProgressLine.duration(42), "42s")
        XCTAssertEqual(ProgressLine.rate(950), "950")
        XCTAssertEqual(ProgressLine.rate(4.2e6), "4.20M")
    }

    func testPeakRSS() {
        let sample = "Name:\tx\nVmPeak:\t  200 kB\nVmHWM:\t    1234 kB\nVmRSS:\t     999 kB\n"
        XCTAssertEqual(ProcessMemory.field("VmHWM:", status: sample), 1234 * 1024)
        XCTAssertEqual(ProcessMemory.field("VmRSS:", status: sample), 999 * 1024)
        #if os(Linux)
        let peak = ProcessMemory.peakResidentBytes() ?? 0
        XCTAssertGreaterThan(peak, 1 << 20)
        XCTAssertGreaterThanOrEqual(peak, ProcessMemory.residentBytes() ?? .max)
        #endif
    }
}
