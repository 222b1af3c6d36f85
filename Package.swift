// swift-tools-version:6.0
// TensorAR trainer. Dependency direction (SPEC: "C isolated at the bottom"):
//   CSupport (C) -> Platform -> Kernels -> ARModel -> TokenData/Training -> executables.
// Only Platform imports CSupport; nothing above it sees a C type.
import PackageDescription

// Every target is built with checks on (release: -O): bounds and overflow checks stay, so a wrong
// index while parsing a hostile file stops the program instead of corrupting memory (issue 17).
// -Ounchecked was measured and does not pay: preset B, batch 4, fwd+bwd on 1 thread
// (tensorar-bench, interleaved runs on this 2-core machine), all -Ounchecked 6.98 s (k4 d2: 20.6 s)
// against all -O 5.77 s (18.1 s), and Kernels-only -Ounchecked within the same noise; the time is
// in OpenBLAS. Measure again before making any target unchecked.
// Release builds are also testable (-enable-testing): `Launch/test.sh` runs the tests (their `@testable` imports
// included) from the same release build as the programs the MPI tests start, one build instead of a debug and a
// release one, and `swift build -c release` (Launch/quickstart.sh, by hand) reuses that build as it is.
let lang: [SwiftSetting] = [.swiftLanguageMode(.v5), .unsafeFlags(["-enable-testing"], .when(configuration: .release))]
let argParser: Target.Dependency = .product(name: "ArgumentParser", package: "swift-argument-parser")

let package = Package(
    name: "TensorAR",
    platforms: [.macOS(.v13)],
    products: [
        .executable(name: "tensorar-train", targets: ["tensorar-train"]),
        .executable(name: "tensorar-eval", targets: ["tensorar-eval"]),
        .executable(name: "tensorar-data", targets: ["tensorar-data"]),
        .executable(name: "tensorar-bench", targets: ["tensorar-bench"]),
        .executable(name: "tensorar-sample", targets: ["tensorar-sample"]),
        .executable(name: "tensorar-export", targets: ["tensorar-export"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/jpsim/Yams", from: "6.2.2"),
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
    ],
    targets: [
        .target(
            name: "CSupport",
            linkerSettings: [.linkedLibrary("openblas"), .linkedLibrary("mpi"), .linkedLibrary("hdf5_serial")]),
        .target(name: "Platform", dependencies: ["CSupport"], swiftSettings: lang),
        .target(name: "Kernels", dependencies: ["Platform"], swiftSettings: lang),
        .target(name: "ARModel", dependencies: ["Kernels", "Platform"], swiftSettings: lang),
        .target(
            name: "TokenData",
            dependencies: ["Platform", .product(name: "Crypto", package: "swift-crypto")],
            swiftSettings: lang),
        .target(
            name: "Training", dependencies: ["ARModel", "Kernels", "TokenData", "Platform", "Yams"],
            swiftSettings: lang),
        .executableTarget(name: "tensorar-train", dependencies: ["Training", argParser], swiftSettings: lang),
        .executableTarget(name: "tensorar-eval", dependencies: ["Training", argParser], swiftSettings: lang),
        .executableTarget(
            name: "tensorar-data", dependencies: ["TokenData", "ARModel", argParser], swiftSettings: lang),
        .executableTarget(name: "tensorar-sample", dependencies: ["Training", argParser], swiftSettings: lang),
        .executableTarget(name: "tensorar-export", dependencies: ["Training", argParser], swiftSettings: lang),
        .executableTarget(name: "tensorar-bench", dependencies: ["Training", argParser], swiftSettings: lang),
        .testTarget(name: "KernelTests", dependencies: ["Kernels"], swiftSettings: lang),
        .testTarget(name: "ModelTests", dependencies: ["ARModel"], exclude: ["Fixtures"], swiftSettings: lang),
        .testTarget(name: "DataTests", dependencies: ["TokenData"], swiftSettings: lang),
        .testTarget(
            name: "TrainingTests", dependencies: ["Training", "ARModel", "Kernels", "Platform", "TokenData"],
            swiftSettings: lang),
    ]
)
