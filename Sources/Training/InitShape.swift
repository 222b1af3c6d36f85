import ARModel
import Foundation
import Platform
import Yams

// `model.init_from` W carries its shape (`tensorar.config`, SPEC section 7; written by the
// converter and by tensorar-export). The base's shape (dim, n_layer, n_head, ffn_hidden) comes
// from W unless the config sets it: then the two must agree, and a contradiction is an error
// naming both values. "Set" means given by the user: in their config file or with --set; the
// shipped Configs/default.yaml's preset is a from-scratch default, not a statement about W.

extension TrainConfig {
    /// The model-shape keys a user gave: those under `model:` in `yaml` and in `--set model.KEY=...`.
    public static func givenShapeKeys(yaml: String, overrides: [String]) -> [String: String] {
        var given: [String: String] = [:]
        let shapeKeys = ["preset", "dim", "n_layer", "n_head", "ffn_hidden"]
        if let top = (try? Yams.compose(yaml: yaml))??.mapping, let model = top["model"]?.mapping {
            for (k, _) in model where shapeKeys.contains(k.string ?? "") { given[k.string!] = "the config file" }
        }
        for flag in overrides {
            let key = flag.split(separator: "=", maxSplits: 1).first.map(String.init) ?? ""
            if key.hasPrefix("model."), shapeKeys.contains(String(key.dropFirst(6))) {
                given[String(key.dropFirst(6))] = "--set \(flag)"
            }
        }
        return given
    }
}

extension TrainConfig.ModelSection {
    /// This section with the base shape of `recorded` (W's, at `path`) where the user gave none;
    /// `given` maps each shape key the user gave to where (`givenShapeKeys`).
    public func adoptingShape(of recorded: ModelConfig, path: String, given: [String: String]) throws -> Self {
        var out = self
        if given.isEmpty {
            out.preset = nil
            out.dim = recorded.dim
            out.nLayer = recorded.nLayer
            out.nHead = recorded.nHead
            out.ffnHidden = recorded.ffnHidden
            return out
        }
        // Some keys given: what they resolve to (the preset under the explicit fields) must be W's.
        var section = self
        if given["preset"] == nil { section.preset = nil }
        if section.preset == nil {
            section.dim = section.dim ?? recorded.dim
            section.nLayer = section.nLayer ?? recorded.nLayer
            section.nHead = section.nHead ?? recorded.nHead
            if given["dim"] == nil && given["ffn_hidden"] == nil { section.ffnHidden = recorded.ffnHidden }
        }
        let mine = try section.resolve(
            vocabSize: recorded.vocabSize, numClasses: recorded.numClasses,
            gridSize: recorded.gridSize)
        let pairs: [(String, Int, Int)] = [
            ("dim", mine.dim, recorded.dim), ("n_layer", mine.nLayer, recorded.nLayer),
            ("n_head", mine.nHead, recorded.nHead), ("ffn_hidden", mine.ffnHidden, recorded.ffnHidden),
        ]
        for (key, configured, theirs) in pairs where configured != theirs {
            let source =
                given[key].map { "model.\(key) in \($0)" }
                ?? "model.preset \(preset ?? "") in \(given["preset"] ?? "the config")"
            throw InputError(
                path,
                "its recorded \(key) \(theirs) contradicts the config's \(key) \(configured) "
                    + "(\(source)); leave the shape out of the config to take the weights' own")
        }
        return section
    }
}
