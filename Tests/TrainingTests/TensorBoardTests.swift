import Foundation
import XCTest

@testable import Training

/// The pieces of the event-file writer (the files themselves are read back by the tensorboard
/// package in Tests/Reference/test_tensorboard.py).
final class TensorBoardTests: XCTestCase {
    func testCRC32CKnownValues() {
        XCTAssertEqual(CRC32C.checksum(Data("123456789".utf8)), 0xE306_9283)  // the standard check value
        XCTAssertEqual(CRC32C.checksum(Data()), 0)
        XCTAssertEqual(CRC32C.checksum(Data(repeating: 0, count: 32)), 0x8A91_36AA)  // RFC 3720 B.4
        let c = CRC32C.checksum(Data("123456789".utf8))
        XCTAssertEqual(CRC32C.masked(Data("123456789".utf8)), ((c >> 15) | (c << 17)) &+ 0xA282_EAD8)
    }

    func testProtobufFields() {
        var m = ProtoMessage()
        m.int(2, 300)  // key 0x10, varint 300 = ac 02
        m.string(1, "ab")
        m.float(2, 1)
        XCTAssertEqual([UInt8](m.data), [0x10, 0xAC, 0x02, 0x0A, 0x02, 0x61, 0x62, 0x15, 0x00, 0x00, 0x80, 0x3F])
    }

    func testMetricsRecordsBecomeScalars() {
        let (step, values) = MetricsLog.scalars([
            "step": 7, "loss": 2.5, "slot_losses": .doubles([1, 2]),
            "skipped": 0, "note": "x", "stopped": .bool(true),
        ])
        XCTAssertEqual(step, 7)
        XCTAssertEqual(values.map(\.0), ["loss", "slot_losses/0", "slot_losses/1", "skipped"])
        XCTAssertEqual(values.map(\.1), [2.5, 1, 2, 0])
    }
}
