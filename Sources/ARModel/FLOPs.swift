/// Matmul FLOPs the implementation actually does (2 per multiply-add), for efficiency figures
/// (SPEC section 3: "measure efficiency against the FLOPs actually done"). Causal attention is
/// counted at its full S x S, since the sgemm path computes the masked half too.
extension ModelConfig {
    func stackFLOPs(sequences n: Int, seqLen s: Int, layers: Int) -> Double {
        let D = Double(dim), F = Double(ffnHidden), R = Double(n * s), hd = Double(headDim), NH = Double(nHead)
        let perBlock = 2 * R * D * 3 * D + 2 * R * D * D + 2 * R * D * 2 * F + 2 * R * F * D + 2 * 2 * Double(n) * NH * Double(s * s) * hd
        return perBlock * Double(layers)
    }

    /// Forward FLOPs for a batch of B images (training/teacher-forced pass).
    public func forwardFLOPs(batch B: Int) -> Double {
        let T = seqLen, D = Double(dim), V = Double(vocabSize)
        var f = stackFLOPs(sequences: B, seqLen: T, layers: nLayer)
        if hasPlugin {
            let k = window
            let ne = B * (T - 1)
            f += stackFLOPs(sequences: ne, seqLen: k + 1, layers: pluginDepth) + 2 * Double(ne) * D * D
            f += stackFLOPs(sequences: B * T, seqLen: k + 1, layers: pluginDepth) + 2 * Double(B * T * k) * D * D
            let validPairs = (0..<T).reduce(0) { $0 + min(k, T - $1) }
            f += 2 * Double(B * validPairs) * D * V
        } else {
            f += 2 * Double(B * T) * D * V
        }
        return f
    }

    /// A training step is forward + backward, backward doing two matmuls per forward one.
    public func trainingFLOPs(batch B: Int) -> Double { 3 * forwardFLOPs(batch: B) }
}
