import Kernels

/// Matmul FLOPs the implementation actually does (2 per multiply-add), for efficiency figures
/// (SPEC section 3: "measure efficiency against the FLOPs actually done"). Attention counts the
/// (row, key) pairs the kernel computes (`attentionFLOPs`): causal attention blocked by query
/// rows skips most of the masked half; the plug-in's full-mask attention does all S x S.
extension ModelConfig {
    /// Matmul FLOPs of one block's linear layers for one row: section 2's wqkv, wo, w1|w3, w2;
    /// RAR's (SPEC section 9) qkv, proj, fc1, fc2 and the adaLN modulation (D x 6D).
    var blockLinearFLOPsPerRow: Double {
        let D = Double(dim)
        let F = Double(ffnHidden)
        if base == RAR.name { return 2 * (D * 3 * D + D * D + D * F + F * D + D * 6 * D) }
        return 2 * D * 3 * D + 2 * D * D + 2 * D * 2 * F + 2 * F * D
    }

    /// Slots the base's trunk runs per image: T, or T + 1 for RAR (its cls slot in front).
    var trunkSlots: Int { base == RAR.name ? seqLen + 1 : seqLen }

    /// A stack of `layers` blocks over n sequences of s rows. Over RAR a causal stack is the trunk
    /// (a condition, so an adaLN matmul, per row); a full-mask one is the plug-in's, whose
    /// sequences have one condition each (`RARBlockStack.conditionPerSequence`).
    func stackFLOPs(sequences n: Int, seqLen s: Int, layers: Int, causal: Bool) -> Double {
        let D = Double(dim)
        let F = Double(ffnHidden)
        let R = Double(n * s)
        let NH = Double(nHead)
        let adaLN = 2 * D * 6 * D
        let linear: Double
        if base == RAR.name {
            linear = causal ? R * blockLinearFLOPsPerRow : R * (blockLinearFLOPsPerRow - adaLN) + Double(n) * adaLN
        } else {
            // section 2's sum as it always was (the same bits in LlamaGen's logs)
            linear = 2 * R * D * 3 * D + 2 * R * D * D + 2 * R * D * 2 * F + 2 * R * F * D
        }
        let attention = Double(n) * NH * attentionFLOPs(seqLen: s, headDim: headDim, causal: causal)
        return (linear + attention) * Double(layers)
    }

    /// The base's head for a batch of B images (`BaseModel.headFLOPs`): LlamaGen's output
    /// matmul on every valid (position, slot) row; Open-MAGVIT2's factorized stack and two heads
    /// on every row (SPEC section 8).
    func headFLOPs(batch B: Int) -> Double {
        let T = seqLen
        let k = hasPlugin ? window : 1
        let valid = (0..<T).reduce(0) { $0 + min(k, T - $1) }
        return BaseRegistry.type(named: base)!.headFLOPs(self, rows: B * T * k, validRows: B * valid)
    }

    /// Forward FLOPs for a batch of B images (training/teacher-forced pass).
    public func forwardFLOPs(batch B: Int) -> Double {
        let T = seqLen
        let D = Double(dim)
        var f = stackFLOPs(sequences: B, seqLen: trunkSlots, layers: nLayer, causal: true) + headFLOPs(batch: B)
        if hasPlugin {
            let k = window
            let ne = B * (T - 1)
            f += stackFLOPs(sequences: ne, seqLen: k + 1, layers: pluginDepth, causal: false) + 2 * Double(ne) * D * D
            f += stackFLOPs(sequences: B * T, seqLen: k + 1, layers: pluginDepth, causal: false)
            f += 2 * Double(B * T * k) * D * D
        }
        return f
    }

    /// A training step is forward + backward, backward doing two matmuls per forward one (the
    /// head's logits are not recomputed: `LlamaGen.headForward` forms their gradient in place).
    public func trainingFLOPs(batch B: Int) -> Double { 3 * forwardFLOPs(batch: B) }
}
