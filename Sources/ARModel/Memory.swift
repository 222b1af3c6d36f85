extension ModelConfig {
    /// Bytes of the FlatBuffers a training step on `batch` samples allocates inside the model:
    /// the activations kept for backward (per block: input, norms, qkv, attention probabilities,
    /// SwiGLU inputs and outputs, dropout masks), the output head's chunk buffers, and the backward
    /// scratch. It mirrors `Transformer.prepare`, `BlockCache`, `BlockScratch` and the backward
    /// temporaries; a test checks it against `FlatBuffer.liveBytes` after a real step, so a change
    /// there that is not made here fails. Parameters, gradients and moments are not included.
    public func trainingActivationBytes(batch B: Int, dropout: Bool) -> Int {
        let T = seqLen, D = dim, F = ffnHidden, NH = nHead, V = vocabSize, k = window
        let kk = hasPlugin ? k : 1, chunk = 256
        let R = B * T, rows = R * kk, ne = B * (T - 1)
        let masks = dropout ? 1 : 0
        /// One BlockStack over N sequences of S vectors with L blocks.
        func stack(_ L: Int, _ N: Int, _ S: Int) -> Int {
            let r = N * S
            let cache = 5 * r * D + 2 * r + 3 * r * D + N * NH * S * S + 3 * r * F + masks * 2 * r * D
            let scratch = 7 * r * D + 3 * r * F + S * S
            return L * cache + scratch
        }
        // Transformer.prepare: x, hidden, fn, frstd, dfn, head chunk buffers; the token-dropout mask.
        var floats = 2 * R * D + 2 * rows * D + rows + 2 * chunk * D + chunk * V + chunk + masks * R * D
        // backward temporaries: dg, dx
        floats += rows * D + R * D
        floats += stack(nLayer, B, T)
        if hasPlugin {
            let S = k + 1
            // encX, encSlot0, encN, u, encRstd; decX, decSlots, decN, g, decRstd
            floats += ne * S * D + 3 * ne * D + ne + R * S * D + 3 * R * k * D + R * k
            // backward: dDecN, dSlots, dDecX; du, dEncN, dSlot0, dEncX
            floats += 2 * R * k * D + R * S * D + 3 * ne * D + ne * S * D
            floats += stack(pluginDepth, ne, S) + stack(pluginDepth, R, S)
        }
        return floats * 4
    }
}
