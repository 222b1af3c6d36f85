"""Independent float64 reference of the Open-MAGVIT2 base and of TensorAR over it (SPEC section 8).

JAX in float64 on the CPU, autograd for gradients. Written from SPEC.md alone (not from the Swift
code, not from upstream's), reusing only the section-2 pieces of reference.py (block, RMSNorm,
the rotary table).

Conventions as reference.py, plus:
  * a code x in [0, 2^(b0+b1)) is pre = x & (2^b0 - 1) (the LOW bits), post = x >> b0;
  * logits come in two arrays, pre [.., 2^b0] and post [.., 2^b1]; the post logits of pair
    (p, j) are those given the TRUE pre sub-token of its target x_{p+j} (teacher forcing); pairs
    past the image end (p + j >= T) read pre 0 there (their loss is masked out);
  * the loss of a pair is CE(pre) + CE(post), pooled over valid pairs as SPEC section 3.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
import jax
import jax.numpy as jnp

import reference as R

jax.config.update("jax_enable_x64", True)

PAD = R.PAD


@dataclass(frozen=True)
class OMGConfig(R.Shape):
    num_classes: int
    grid_size: int
    dim: int
    n_layer: int                  # spatial blocks
    n_head: int
    factorized_n_layer: int       # Lf
    factorized_bits: Tuple[int, int] = (6, 12)
    ffn_hidden: int = 0           # 0 -> SPEC formula
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    window: int = 1
    plugin_depth: int = 0
    residual: bool = True

    def __post_init__(self):
        if self.ffn_hidden == 0:
            object.__setattr__(self, "ffn_hidden", R.default_ffn_hidden(self.dim))
        object.__setattr__(self, "factorized_bits", tuple(self.factorized_bits))
        assert self.dim % self.n_head == 0 and self.head_dim % 4 == 0
        assert self.window == 1 or self.plugin_depth >= 1

    @property
    def vocab_size(self) -> int:
        return 1 << sum(self.factorized_bits)

    @property
    def pre_vocab(self) -> int:
        return 1 << self.factorized_bits[0]

    @property
    def post_vocab(self) -> int:
        return 1 << self.factorized_bits[1]

    def to_dict(self) -> dict:
        """The tensorar.config of SPEC sections 7 and 8."""
        d = dataclasses.asdict(self)
        d["factorized_bits"] = list(self.factorized_bits)
        d["vocab_size"] = self.vocab_size
        d["base"] = "open-magvit2"
        return d


def split(x, cfg: OMGConfig):
    """(pre, post) of codes x: the low b0 bits, then the rest."""
    return x & (cfg.pre_vocab - 1), x >> cfg.factorized_bits[0]


def parameter_table(cfg: OMGConfig) -> List[Tuple[str, Tuple[int, ...], str, str]]:
    """SPEC section 8's table (base group), then SPEC section 3's plug-in table."""
    D, F, C = cfg.dim, cfg.ffn_hidden, cfg.num_classes
    out = [("class_emb.embedding_table.weight", (C + 1, D), "base", "embedding"),
           ("pre_emb.weight", (cfg.pre_vocab, D), "base", "embedding"),
           ("post_emb.weight", (cfg.post_vocab, D), "base", "embedding")]
    for l in range(cfg.n_layer):
        out += [(n, s, "base", k) for n, s, k in R.block_table(f"spatial_blocks.{l}", D, F)]
    for m in range(cfg.factorized_n_layer):
        out += [(n, s, "base", k) for n, s, k in R.block_table(f"factorized_blocks.{m}", D, F)]
    out += [("norm.weight", (D,), "base", "norm"),
            ("head.0.weight", (cfg.pre_vocab, D), "base", "output"),
            ("head.1.weight", (cfg.post_vocab, D), "base", "output")]
    if cfg.has_plugin:
        k, d = cfg.window, cfg.plugin_depth
        out += [("tensorar.in_query", (D,), "plugin", "vector"),
                ("tensorar.in_pos", (k, D), "plugin", "embedding"),
                ("tensorar.in_pad", (D,), "plugin", "vector")]
        for i in range(d):
            out += [(n, s, "plugin", kd) for n, s, kd in R.block_table(f"tensorar.encoder.layers.{i}", D, F)]
        out += [("tensorar.encoder.norm.weight", (D,), "plugin", "norm"),
                ("tensorar.encoder.proj.weight", (D, D), "plugin", "proj"),
                ("tensorar.out_pos", (k, D), "plugin", "embedding")]
        for i in range(d):
            out += [(n, s, "plugin", kd) for n, s, kd in R.block_table(f"tensorar.decoder.layers.{i}", D, F)]
        out += [("tensorar.decoder.norm.weight", (D,), "plugin", "norm"),
                ("tensorar.decoder.proj.weight", (D, D), "plugin", "proj")]
    return out


def parameter_count(cfg: OMGConfig) -> int:
    return sum(int(np.prod(s)) for _, s, _, _ in parameter_table(cfg))


def init_params_fixture(cfg: OMGConfig, rng_base, rng_plugin) -> Dict[str, np.ndarray]:
    """As reference.init_params_fixture (O(1) activations), for this table."""
    return R.init_params_fixture(cfg, rng_base, rng_plugin, table=parameter_table(cfg))


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

def embed(params, cfg: OMGConfig, ids):
    """pre_emb[pre] + post_emb[post] for ids >= 0 (pads are the caller's)."""
    pre, post = split(jnp.maximum(ids, 0), cfg)
    return params["pre_emb.weight"][pre] + params["post_emb.weight"][post]


def step_inputs(params, cfg: OMGConfig, tensors):
    """The trunk's input at positions 1..P-1, [B, P-1, D] (SPEC 8, and 3 for the plug-in)."""
    tensors = jnp.asarray(tensors)
    B, Pm1, k = tensors.shape
    first = tensors[..., 0]
    if not cfg.has_plugin:
        return embed(params, cfg, first)
    D = cfg.dim
    pad = (tensors < 0)[..., None]
    e = jnp.where(pad, params["tensorar.in_pad"], embed(params, cfg, tensors)) + params["tensorar.in_pos"]
    q = jnp.broadcast_to(params["tensorar.in_query"], (B, Pm1, 1, D))
    s = jnp.concatenate([q, e], axis=2).reshape(B * Pm1, k + 1, D)
    for i in range(cfg.plugin_depth):
        s = R.block(params, f"tensorar.encoder.layers.{i}", s, cfg, None, causal=False)
    u = R.rms_norm(s[:, 0], params["tensorar.encoder.norm.weight"], cfg.norm_eps)
    u = (u @ params["tensorar.encoder.proj.weight"].T).reshape(B, Pm1, D)
    return embed(params, cfg, first) + u if cfg.residual else u


def trunk(params, cfg: OMGConfig, labels, tensors):
    """h [B, P, D]: the last spatial block's output, before any norm."""
    cls = params["class_emb.embedding_table.weight"][jnp.asarray(labels)][:, None, :]
    x = jnp.concatenate([cls, step_inputs(params, cfg, tensors)], axis=1)
    rope = R.rope_table(cfg, x.shape[1])
    for l in range(cfg.n_layer):
        x = R.block(params, f"spatial_blocks.{l}", x, cfg, rope, causal=True)
    return x


def decoder_states(params, cfg: OMGConfig, h):
    """g [B, P, k, D]: the plug-in decoder's slot states (h itself without a plug-in)."""
    B, P, D = h.shape
    if not cfg.has_plugin:
        return h[:, :, None, :]
    k = cfg.window
    op = jnp.broadcast_to(params["tensorar.out_pos"], (B, P, k, D))
    s = jnp.concatenate([h[:, :, None, :], op], axis=2).reshape(B * P, k + 1, D)
    for i in range(cfg.plugin_depth):
        s = R.block(params, f"tensorar.decoder.layers.{i}", s, cfg, None, causal=False)
    z = R.rms_norm(s[:, 1:], params["tensorar.decoder.norm.weight"], cfg.norm_eps)
    z = (z @ params["tensorar.decoder.proj.weight"].T).reshape(B, P, k, D)
    return h[:, :, None, :] + z if cfg.residual else z


def factorized(params, cfg: OMGConfig, g, pre):
    """(logits_pre, logits_post) for states g [..., D] and the pre sub-tokens pre [...] read by
    slot 1: the 2-slot causal stack [g, pre_emb[pre]] with rotary rows 0 and 1, the shared norm,
    head.0 on slot 0 and head.1 on slot 1."""
    lead = g.shape[:-1]
    D = cfg.dim
    s = jnp.stack([g.reshape(-1, D), params["pre_emb.weight"][jnp.asarray(pre).reshape(-1)]], axis=1)
    rope = R.rope_table(cfg, 2)
    for m in range(cfg.factorized_n_layer):
        s = R.block(params, f"factorized_blocks.{m}", s, cfg, rope, causal=True)
    n = R.rms_norm(s, params["norm.weight"], cfg.norm_eps)
    lp = n[:, 0] @ params["head.0.weight"].T
    lq = n[:, 1] @ params["head.1.weight"].T
    return lp.reshape(*lead, cfg.pre_vocab), lq.reshape(*lead, cfg.post_vocab)


def forward(params, cfg: OMGConfig, labels, tensors, tokens):
    """(logits_pre [B,T,k,2^b0], logits_post [B,T,k,2^b1], h [B,T,D])."""
    h = trunk(params, cfg, labels, tensors)
    g = decoder_states(params, cfg, h)
    pre, _ = split(jnp.asarray(R.slot_targets(tokens, cfg)), cfg)
    lp, lq = factorized(params, cfg, g, pre)
    return lp, lq, h


def ce(logits, target):
    return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]


def loss_terms(lp, lq, tokens, cfg: OMGConfig, slot_weights):
    """(loss, slot_losses [k], part_losses [2]): sum w_j (CE_pre + CE_post) / sum w_j over valid
    pairs; slot j's mean; each part pooled like the loss (they add up to it)."""
    tokens = np.asarray(tokens)
    B, T = tokens.shape
    pre, post = split(R.slot_targets(tokens, cfg), cfg)
    mask = jnp.asarray(np.broadcast_to(R.valid_mask(cfg, T), (B, T, cfg.window)).astype(np.float64))
    c0 = ce(lp, jnp.asarray(pre)) * mask
    c1 = ce(lq, jnp.asarray(post)) * mask
    w = jnp.asarray(np.asarray(slot_weights, dtype=np.float64))
    den = jnp.sum(mask * w)
    loss = jnp.sum((c0 + c1) * w) / den
    slot_losses = jnp.sum(c0 + c1, axis=(0, 1)) / jnp.sum(mask, axis=(0, 1))
    parts = jnp.stack([jnp.sum(c0 * w) / den, jnp.sum(c1 * w) / den])
    return loss, slot_losses, parts


def loss_fn(params, cfg, tokens, labels, tensors, slot_weights):
    lp, lq, h = forward(params, cfg, labels, tensors, tokens)
    loss, sl, parts = loss_terms(lp, lq, tokens, cfg, slot_weights)
    return loss, (sl, parts, lp, lq, h)


def loss_and_grad(params, cfg, tokens, labels, tensors, slot_weights):
    """(loss, slot_losses, part_losses, logits_pre, logits_post, h, grads), numpy float64."""
    f = jax.jit(jax.value_and_grad(
        lambda p: loss_fn(p, cfg, tokens, labels, tensors, slot_weights), has_aux=True))
    (loss, (sl, parts, lp, lq, h)), g = f(R.to_jax(params))
    return (float(loss), np.asarray(sl), np.asarray(parts), np.asarray(lp), np.asarray(lq), np.asarray(h),
            {n: np.asarray(v) for n, v in g.items()})


def adamw_run(params, cfg, tokens, labels, tensors, slot_weights, hp: R.AdamWConfig):
    """S AdamW updates on one fixed batch (reference.adamw_steps on this model's loss)."""
    groups = {n: g for n, _, g, _ in parameter_table(cfg)}
    f = jax.jit(jax.value_and_grad(lambda q: loss_fn(q, cfg, tokens, labels, tensors, slot_weights)[0]))
    return R.adamw_steps(params, groups, f, hp)


# --------------------------------------------------------------------------------------------
# Greedy sampling, a guidance scale per sub-token (SPEC sections 5 and 8)
# --------------------------------------------------------------------------------------------

def sample_greedy(params, cfg: OMGConfig, labels, scales: Tuple[float, float]):
    """Greedy (top_k 1) sampling without a KV cache: each step re-runs the trunk and decoder
    over all T positions (placeholder inputs after p, which the causal mask ignores) and reads
    position p. Null rows exist when either scale is above 1; a sub-token is guided only at its
    own scale above 1. Per slot j: pre from slot 0, then post from slot 1 fed the chosen pre
    (the same in the conditioned and null rows); x = pre + 2^b0 post.

    Returns (tokens [Bs, T], trajectories [Bs, T, k], min_margin) as reference.sample_greedy.
    """
    jp = R.to_jax(params)
    labels = np.asarray(labels, dtype=np.int64)
    Bs = labels.shape[0]
    T, k, C = cfg.seq_len, cfg.window, cfg.num_classes
    guided = max(scales) > 1.0
    lab = np.concatenate([labels, np.full(Bs, C, dtype=np.int64)]) if guided else labels
    produced = np.full((Bs, T, k), PAD, dtype=np.int64)
    states = jax.jit(lambda q, lb, tn: decoder_states(q, cfg, trunk(q, cfg, lb, tn)))
    heads = jax.jit(lambda q, g, pre: factorized(q, cfg, g, pre))
    min_margin = math.inf

    def choose(l, s):
        nonlocal min_margin
        row = l[Bs:] + s * (l[:Bs] - l[Bs:]) if s > 1.0 else l[:Bs]
        srt = np.sort(row, axis=-1)
        min_margin = min(min_margin, float(np.min(srt[:, -1] - srt[:, -2])))
        return np.argmax(row, axis=-1)

    for p in range(T):
        full = np.zeros((Bs, T - 1, k), dtype=np.int64)
        full[:, :p] = produced[:, :p]
        ten = np.concatenate([full, full], axis=0) if guided else full
        g = np.asarray(states(jp, lab, ten))[:, p]               # [N, k, D]
        for j in range(k):
            if p + j >= T:
                continue
            lp, _ = heads(jp, g[:, j], np.zeros(len(lab), dtype=np.int64))
            pre = choose(np.asarray(lp), scales[0])
            both = np.concatenate([pre, pre]) if guided else pre
            _, lq = heads(jp, g[:, j], both)
            post = choose(np.asarray(lq), scales[1])
            produced[:, p, j] = pre + cfg.pre_vocab * post
    tokens, traj = R.tokens_and_trajectories(produced)
    return tokens, traj, min_margin
