/// Matmul FLOPs of KV-cached sampling (SPEC section 5) as `Sampler` does them, 2 per
/// multiply-add, for the sampling speed figures. Per position p: the base blocks on every row
/// (n images, 2n with guidance), attention over the p + 1 cached positions, the plug-in encoder on
/// the n conditioned rows only (the null rows get the same tensors, so the sampler copies its
/// output), the decoder and the base's head (`BaseModel.samplingHeadFLOPs`) on all k slots of every row.
extension ModelConfig {
    /// FLOPs of one sampling position `p` for a batch of `n` images.
    public func samplingStepFLOPs(batch n: Int, guided: Bool, position p: Int) -> Double {
        let NB = Double(guided ? 2 * n : n)
        let D = Double(dim)
        let F = Double(ffnHidden)
        let head = BaseRegistry.type(named: base)!
        var f: Double
        if base == RAR.name {
            // slot p + 1 over the p + 2 cached slots; at p = 0 slot 0 (cls) first (SPEC section 9)
            let attention = { (slot: Int) in 2 * 2 * Double(self.nHead) * Double(slot + 1) * Double(self.headDim) }
            f = NB * (blockLinearFLOPsPerRow + attention(p + 1)) * Double(nLayer)
            if p == 0 { f += NB * (blockLinearFLOPsPerRow + attention(0)) * Double(nLayer) }
        } else {
            let perRowBlock = 2 * (D * 3 * D + D * D + D * 2 * F + F * D)
            let attention = 2 * 2 * Double(nHead) * Double(p + 1) * Double(headDim)
            f = NB * (perRowBlock + attention) * Double(nLayer)
        }
        if hasPlugin {
            let k = window
            if p > 0 {
                // a class-conditioned encoder (RAR) runs on the null rows too (`Sampler.slotStates`)
                let rows = base == RAR.name ? Int(NB) : n
                f +=
                    stackFLOPs(sequences: rows, seqLen: k + 1, layers: pluginDepth, causal: false)
                    + 2 * Double(rows) * D * D
            }
            f += stackFLOPs(sequences: Int(NB), seqLen: k + 1, layers: pluginDepth, causal: false)
            f += 2 * NB * Double(k) * D * D
            f += head.samplingHeadFLOPs(self, rows: Int(NB) * k)
        } else {
            f += head.samplingHeadFLOPs(self, rows: Int(NB))
        }
        return f
    }

    /// FLOPs of sampling the first `steps` positions (default: the whole image) of `n` images.
    public func samplingFLOPs(batch n: Int, guided: Bool, steps: Int? = nil) -> Double {
        (0..<min(seqLen, steps ?? seqLen)).reduce(0.0) {
            $0 + samplingStepFLOPs(batch: n, guided: guided, position: $1)
        }
    }
}
