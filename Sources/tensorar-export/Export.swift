import ArgumentParser

@main
struct Export: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "tensorar-export", abstract: "Export a checkpoint's weights as safetensors (being written).")
    func run() throws { throw ValidationError("tensorar-export is not written yet") }
}
