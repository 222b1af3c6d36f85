import ArgumentParser

@main
struct Sample: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "tensorar-sample", abstract: "Sample images from a TensorAR model (being written).")
    func run() throws { throw ValidationError("tensorar-sample is not written yet") }
}
