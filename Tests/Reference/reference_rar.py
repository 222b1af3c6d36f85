"""Independent float64 reference of the RAR base and of TensorAR over it (SPEC section 9).

JAX in float64 on the CPU, autograd for gradients. Written from SPEC.md alone (not from the Swift
code, not from bytedance's 1d-tokenizer), reusing only the loss pooling, the input tensors and
AdamW of reference.py.

Conventions as reference.py, plus:
  * `labels` int [B] are class indices in [0, C] (C = the none class); the embedding row read is
    y = V + 1 + label (SPEC 9 "Tokens");
  * RAR slot q: 0 = cls_token, 1 = the class, q >= 2 the input fed at SPEC position p = q - 1;
    the output of slot q = p + 1 predicts SPEC position p's targets;
  * `orders` int [B, T] (base only): orders[b, i] = pi(i), the raster index of the i-th token fed
    and predicted; None = raster (the identity). `tensors` are then in feeding order:
    tensors[b, i, 0] = x_{pi(i)};
  * the forward takes `tensors` [B, P-1, k] and runs P + 1 slots (0..P). Training uses P = T, so
    slot T + 1 of SPEC's T + 2 (whose output is discarded) is not run: with the causal mask it
    changes no output (choice; test_reference_rar.py checks it against the literal T + 2 slots).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
import jax
import jax.numpy as jnp

import reference as R

jax.config.update("jax_enable_x64", True)

PAD = R.PAD
POS_EXTRA_ROWS = 1024      # pos_embed, target_aware_pos_embed: T + 1024 rows (SPEC 9 table)
TIME_EXTRA_ROWS = 100      # timesteps_embeddings: T + 100 rows
# SPEC 9 Recipe: RAR's weight-decay exclusions, a case-sensitive substring match on the names.
RAR_NO_DECAY = ("ln", "bias", "embedding", "embed", "norm", "gamma", "mask_token", "latent_tokens")


@dataclass(frozen=True)
class RARConfig(R.Shape):
    vocab_size: int
    num_classes: int
    grid_size: int
    dim: int
    n_layer: int
    n_head: int
    ffn_hidden: int               # RAR's intermediate size (no formula: 4 D in the presets)
    norm_eps: float = 1e-6
    rope_base: float = 10000.0    # unused (RAR has no rotary); kept for SPEC 7's config keys
    window: int = 1
    plugin_depth: int = 0
    residual: bool = True

    def __post_init__(self):
        assert self.dim % self.n_head == 0
        assert self.window >= 1 and (self.window == 1 or self.plugin_depth >= 1)
        assert self.window <= TIME_EXTRA_ROWS + 1   # final-layer conditions reach S[T + k - 1]

    @property
    def embedding_rows(self) -> int:
        return self.vocab_size + self.num_classes + 2

    @property
    def none_label(self) -> int:
        return self.num_classes

    def to_dict(self) -> dict:
        """The tensorar.config of SPEC sections 7 and 9."""
        d = dataclasses.asdict(self)
        d["base"] = "rar"
        return d


PRESETS = {  # SPEC 9: (D, L, F), NH 16, 16x16 grid, V 1024, C 1000
    "B": (768, 24, 3072), "L": (1024, 24, 4096), "XL": (1280, 32, 5120), "XXL": (1408, 40, 6144),
}


def preset(name: str, **kw) -> RARConfig:
    D, L, F = PRESETS[name]
    return RARConfig(vocab_size=1024, num_classes=1000, grid_size=16, dim=D, n_layer=L, n_head=16,
                     ffn_hidden=F, **kw)


# --------------------------------------------------------------------------------------------
# Parameter table: (name, shape, group, kind, spec_init); kind picks the fixture scale
# --------------------------------------------------------------------------------------------

def block_table(prefix: str, D: int, F: int, hd: int) -> List[Tuple[str, Tuple[int, ...], str, str]]:
    """One RAR block (SPEC 9 table), in the order of its modules."""
    return [
        (f"{prefix}.norm1.weight", (D,), "norm", "ones"),
        (f"{prefix}.norm1.bias", (D,), "norm_bias", "zeros"),
        (f"{prefix}.attn.qkv.weight", (3 * D, D), "qkv", "normal"),
        (f"{prefix}.attn.qkv.bias", (3 * D,), "bias", "zeros"),
        (f"{prefix}.attn.q_norm.weight", (hd,), "norm", "ones"),
        (f"{prefix}.attn.q_norm.bias", (hd,), "norm_bias", "zeros"),
        (f"{prefix}.attn.k_norm.weight", (hd,), "norm", "ones"),
        (f"{prefix}.attn.k_norm.bias", (hd,), "norm_bias", "zeros"),
        (f"{prefix}.attn.proj.weight", (D, D), "proj", "normal"),
        (f"{prefix}.attn.proj.bias", (D,), "bias", "zeros"),
        (f"{prefix}.norm2.weight", (D,), "norm", "ones"),
        (f"{prefix}.norm2.bias", (D,), "norm_bias", "zeros"),
        (f"{prefix}.mlp.fc1.weight", (F, D), "fc1", "normal"),
        (f"{prefix}.mlp.fc1.bias", (F,), "bias", "zeros"),
        (f"{prefix}.mlp.fc2.weight", (D, F), "fc2", "normal"),
        (f"{prefix}.mlp.fc2.bias", (D,), "bias", "zeros"),
        (f"{prefix}.adaLN_modulation.1.weight", (6 * D, D), "adaln", "zeros"),
        (f"{prefix}.adaLN_modulation.1.bias", (6 * D,), "bias", "zeros"),
    ]


def parameter_table(cfg: RARConfig) -> List[Tuple[str, Tuple[int, ...], str, str, str]]:
    """SPEC 9's table (base group), then the plug-in (SPEC 3's names, RAR blocks, LayerNorms)."""
    D, F, V, T, hd = cfg.dim, cfg.ffn_hidden, cfg.vocab_size, cfg.seq_len, cfg.head_dim
    out = [("cls_token", (1, 1, D), "base", "vector", "zeros"),
           ("embeddings.weight", (cfg.embedding_rows, D), "base", "embedding", "normal"),
           ("pos_embed", (1, T + POS_EXTRA_ROWS, D), "base", "embedding", "normal"),
           ("target_aware_pos_embed", (1, T + POS_EXTRA_ROWS, D), "base", "embedding", "normal"),
           ("timesteps_embeddings", (1, T + TIME_EXTRA_ROWS, D), "base", "embedding", "normal")]
    for l in range(cfg.n_layer):
        out += [(n, s, "base", k, i) for n, s, k, i in block_table(f"blocks.{l}", D, F, hd)]
    out += [("adaln_before_head.adaLN_modulation.1.weight", (2 * D, D), "base", "adaln", "zeros"),
            ("adaln_before_head.adaLN_modulation.1.bias", (2 * D,), "base", "bias", "zeros"),
            ("lm_head.weight", (V, D), "base", "head", "normal"),
            ("lm_head.bias", (V,), "base", "bias", "zeros")]
    if cfg.has_plugin:
        k, d = cfg.window, cfg.plugin_depth
        proj_init = "zeros" if cfg.residual else "normal"
        out += [("tensorar.in_query", (D,), "plugin", "vector", "normal"),
                ("tensorar.in_pos", (k, D), "plugin", "embedding", "normal"),
                ("tensorar.in_pad", (D,), "plugin", "vector", "normal")]
        for i in range(d):
            out += [(n, s, "plugin", kd, it) for n, s, kd, it in block_table(f"tensorar.encoder.layers.{i}", D, F, hd)]
        out += [("tensorar.encoder.norm.weight", (D,), "plugin", "norm", "ones"),
                ("tensorar.encoder.norm.bias", (D,), "plugin", "norm_bias", "zeros"),
                ("tensorar.encoder.proj.weight", (D, D), "plugin", "proj", proj_init),
                ("tensorar.out_pos", (k, D), "plugin", "embedding", "normal")]
        for i in range(d):
            out += [(n, s, "plugin", kd, it) for n, s, kd, it in block_table(f"tensorar.decoder.layers.{i}", D, F, hd)]
        out += [("tensorar.decoder.norm.weight", (D,), "plugin", "norm", "ones"),
                ("tensorar.decoder.norm.bias", (D,), "plugin", "norm_bias", "zeros"),
                ("tensorar.decoder.proj.weight", (D, D), "plugin", "proj", proj_init)]
    return out


def parameter_count(cfg: RARConfig) -> int:
    return sum(int(np.prod(s)) for _, s, _, _, _ in parameter_table(cfg))


def init_params_spec(cfg: RARConfig, rng: np.random.Generator) -> Dict[str, np.ndarray]:
    """SPEC 9's initialisation (adaLN and proj-if-residual at zero)."""
    p = {}
    for name, shape, _, _, init in parameter_table(cfg):
        p[name] = {"zeros": np.zeros, "ones": np.ones}[init](shape) if init != "normal" else rng.normal(0, 0.02, shape)
    return p


# Fixture initialisation: every tensor random (no zero adaLN or proj), activations O(1).
FIXTURE_SCALES = {"vector": 0.5, "embedding": 0.5, "norm_bias": 0.1, "bias": 0.1, "qkv": 0.25, "proj": 0.2,
                  "fc1": 0.2, "fc2": 0.12, "adaln": 0.2, "head": 0.3}


def init_params_fixture(cfg: RARConfig, rng_base, rng_plugin) -> Dict[str, np.ndarray]:
    p = {}
    for name, shape, group, kind, _ in parameter_table(cfg):
        rng = rng_base if group == "base" else rng_plugin
        p[name] = 1.0 + rng.normal(0, 0.1, shape) if kind == "norm" else rng.normal(0, FIXTURE_SCALES[kind], shape)
    return p


def decay_flags(cfg: RARConfig) -> Dict[str, bool]:
    """Base group: RAR's rule (SPEC 9 Recipe); plug-in group: SPEC 6's (2 or more dims)."""
    out = {}
    for name, shape, group, _, _ in parameter_table(cfg):
        if group == "base":
            out[name] = len(shape) >= 2 and not any(s in name for s in RAR_NO_DECAY)
        else:
            out[name] = len(shape) >= 2
    return out


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

def layer_norm(x, w, b, eps):
    """LayerNorm over the last axis (biased variance); w, b None = no parameters."""
    mu = jnp.mean(x, axis=-1, keepdims=True)
    xc = x - mu
    y = xc / jnp.sqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + eps)
    return y if w is None else y * w + b


def linear(params, prefix, x):
    return x @ params[f"{prefix}.weight"].T + params[f"{prefix}.bias"]


def lnorm(params, prefix, x, eps):
    return layer_norm(x, params[f"{prefix}.weight"], params[f"{prefix}.bias"], eps)


def attention(params, prefix, x, cfg: RARConfig, causal: bool):
    """x [N, S, D] (already modulated). proj(Attn(x)) with QK LayerNorm over hd."""
    N, S, D = x.shape
    NH, hd, eps = cfg.n_head, cfg.head_dim, cfg.norm_eps
    qkv = linear(params, f"{prefix}.attn.qkv", x)
    q = lnorm(params, f"{prefix}.attn.q_norm", qkv[..., 0:D].reshape(N, S, NH, hd), eps)
    k = lnorm(params, f"{prefix}.attn.k_norm", qkv[..., D:2 * D].reshape(N, S, NH, hd), eps)
    v = qkv[..., 2 * D:3 * D].reshape(N, S, NH, hd)
    scores = jnp.einsum("nqhd,nkhd->nhqk", q, k) / math.sqrt(hd)
    if causal:
        scores = jnp.where(np.tril(np.ones((S, S), dtype=bool))[None, None], scores, -jnp.inf)
    o = jnp.einsum("nhqk,nkhd->nqhd", jax.nn.softmax(scores, axis=-1), v).reshape(N, S, D)
    return linear(params, f"{prefix}.attn.proj", o)


def block(params, prefix, x, cond, cfg: RARConfig, causal: bool):
    """One adaLN-Zero block; x, cond [N, S, D] (cond: each slot's c_q)."""
    eps = cfg.norm_eps
    mod = linear(params, f"{prefix}.adaLN_modulation.1", jax.nn.silu(cond))
    sh_a, sc_a, g_a, sh_m, sc_m, g_m = jnp.split(mod, 6, axis=-1)
    x = x + g_a * attention(params, prefix, lnorm(params, f"{prefix}.norm1", x, eps) * (1 + sc_a) + sh_a, cfg, causal)
    n = lnorm(params, f"{prefix}.norm2", x, eps) * (1 + sc_m) + sh_m
    f = linear(params, f"{prefix}.mlp.fc2", jax.nn.gelu(linear(params, f"{prefix}.mlp.fc1", n), approximate=False))
    return x + g_m * f


def final_layer(params, cfg: RARConfig, h, cond):
    """logits = lm_head(LN(h) (1 + sc) + sh), (sc, sh) = split2(...): scale first."""
    mod = linear(params, "adaln_before_head.adaLN_modulation.1", jax.nn.silu(cond))
    sc, sh = jnp.split(mod, 2, axis=-1)
    return linear(params, "lm_head", layer_norm(h, None, None, cfg.norm_eps) * (1 + sc) + sh)


def slot_rows(orders, Q: int, T: int):
    """pos_embed and target_aware_pos_embed rows of slots 0..Q-1 (Q <= T + 2), [B, Q] each; -1 =
    no A term. Slot 0: P[0]; slot 1: P[1], A[2 + pi(0)]; slot 2+i: P[2 + pi(i)], A[2 + pi(i+1)]."""
    orders = np.asarray(orders)
    B = orders.shape[0]
    assert Q <= T + 2
    p_rows = np.zeros((B, Q), dtype=np.int64)
    a_rows = np.full((B, Q), -1, dtype=np.int64)
    p_rows[:, 1] = 1
    for q in range(1, Q):
        i = q - 2                                  # the token index fed at slot q (q >= 2)
        if q >= 2:
            p_rows[:, q] = 2 + orders[:, i]
        if i + 1 < T:
            a_rows[:, q] = 2 + orders[:, i + 1]
    return p_rows, a_rows


def conditions(params, cfg: RARConfig, labels, n: int):
    """c_q = E[y] + S[q] for q = 0..n-1, [B, n, D]."""
    e = params["embeddings.weight"][cfg.vocab_size + 1 + jnp.asarray(labels)]
    return e[:, None, :] + params["timesteps_embeddings"][0, :n][None]


def token_embed(params, ids):
    """E[ids] for ids >= 0 (pads are the caller's)."""
    return params["embeddings.weight"][jnp.maximum(ids, 0)]


def run_plugin_blocks(params, cfg: RARConfig, which: str, s, cond):
    """The d encoder/decoder blocks, full mask, over s [N, k+1, D], every vector conditioned on
    its position's c_q (cond [N, D])."""
    c = jnp.broadcast_to(cond[:, None, :], s.shape)
    for i in range(cfg.plugin_depth):
        s = block(params, f"tensorar.{which}.layers.{i}", s, c, cfg, causal=False)
    return s


def step_inputs(params, cfg: RARConfig, tensors, cond):
    """The token part of slots 2..P: [B, P-1, D] (positions added by the trunk). cond [B, P-1, D]:
    c_q of those slots (the encoder's condition)."""
    tensors = jnp.asarray(tensors)
    B, Pm1, k = tensors.shape
    assert k == cfg.window, (k, cfg.window)
    first = token_embed(params, tensors[..., 0])
    if not cfg.has_plugin:
        return first
    D = cfg.dim
    e = jnp.where((tensors < 0)[..., None], params["tensorar.in_pad"], token_embed(params, tensors))
    e = e + params["tensorar.in_pos"]
    q = jnp.broadcast_to(params["tensorar.in_query"], (B, Pm1, 1, D))
    s = jnp.concatenate([q, e], axis=2).reshape(B * Pm1, k + 1, D)
    s = run_plugin_blocks(params, cfg, "encoder", s, cond.reshape(B * Pm1, D))
    u = lnorm(params, "tensorar.encoder.norm", s[:, 0], cfg.norm_eps) @ params["tensorar.encoder.proj.weight"].T
    u = u.reshape(B, Pm1, D)
    return first + u if cfg.residual else u


def identity_orders(B: int, T: int) -> np.ndarray:
    return np.broadcast_to(np.arange(T), (B, T)).copy()


def trunk(params, cfg: RARConfig, labels, tensors, orders=None):
    """(h [B, P, D]: the last block's output at slots 1..P, cond [B, P + k, D]: c_0 .. c_{P+k-1})."""
    labels = jnp.asarray(labels)
    B, Pm1 = np.shape(tensors)[:2]
    P, Q, T, V = Pm1 + 1, Pm1 + 2, cfg.seq_len, cfg.vocab_size
    assert orders is None or not cfg.has_plugin, "TensorAR over RAR runs in raster order (SPEC 9)"
    orders = identity_orders(B, T) if orders is None else np.asarray(orders)
    cond = conditions(params, cfg, labels, P + cfg.window)
    cls = jnp.broadcast_to(params["cls_token"][0], (B, 1, cfg.dim))
    x = jnp.concatenate([cls, params["embeddings.weight"][V + 1 + labels][:, None, :],
                         step_inputs(params, cfg, tensors, cond[:, 2:Q])], axis=1)
    p_rows, a_rows = slot_rows(orders, Q, T)
    A = params["target_aware_pos_embed"][0]
    x = x + params["pos_embed"][0][p_rows] + jnp.where((a_rows >= 0)[..., None], A[np.maximum(a_rows, 0)], 0.0)
    for l in range(cfg.n_layer):
        x = block(params, f"blocks.{l}", x, cond[:, :Q], cfg, causal=True)
    return x[:, 1:], cond


def head(params, cfg: RARConfig, h, cond):
    """Slot logits [B, P, k, V] from h [B, P, D] (slots 1..P): decoder, then the final layer with
    the condition of each target's slot, c_{q+j} (q = p + 1)."""
    B, P, D = h.shape
    k = cfg.window
    # cond_t[b, p, j] = c_{p + 1 + j}
    idx = 1 + np.arange(P)[:, None] + np.arange(k)[None, :]
    cond_t = cond[:, idx]
    if not cfg.has_plugin:
        return final_layer(params, cfg, h[:, :, None, :], cond_t)
    op = jnp.broadcast_to(params["tensorar.out_pos"], (B, P, k, D))
    s = jnp.concatenate([h[:, :, None, :], op], axis=2).reshape(B * P, k + 1, D)
    s = run_plugin_blocks(params, cfg, "decoder", s, cond[:, 1:P + 1].reshape(B * P, D))
    z = lnorm(params, "tensorar.decoder.norm", s[:, 1:], cfg.norm_eps) @ params["tensorar.decoder.proj.weight"].T
    z = z.reshape(B, P, k, D)
    g = h[:, :, None, :] + z if cfg.residual else z
    return final_layer(params, cfg, g, cond_t)


def forward(params, cfg: RARConfig, labels, tensors, orders=None):
    """(logits [B, P, k, V], h [B, P, D]) with P = tensors.shape[1] + 1."""
    h, cond = trunk(params, cfg, labels, tensors, orders)
    return head(params, cfg, h, cond), h


def base_inputs(tokens, orders=None) -> np.ndarray:
    """The base's inputs [B, T-1, 1] in feeding order: x_{pi(i)}, i = 0..T-2."""
    tokens = np.asarray(tokens)
    B, T = tokens.shape
    orders = identity_orders(B, T) if orders is None else np.asarray(orders)
    return np.take_along_axis(tokens, orders, axis=1)[:, :-1, None]


def targets_in_order(tokens, orders=None):
    """x_{pi(i)} [B, T]: what slot i + 1 predicts."""
    return np.asarray(tokens) if orders is None else np.take_along_axis(np.asarray(tokens), np.asarray(orders), 1)


def loss_fn(params, cfg: RARConfig, tokens, labels, tensors, slot_weights, orders=None):
    logits, h = forward(params, cfg, labels, tensors, orders)
    loss, slot_losses, _ = R.loss_terms(logits, targets_in_order(tokens, orders), cfg, slot_weights)
    return loss, (slot_losses, logits, h)


def loss_and_grad(params, cfg: RARConfig, tokens, labels, tensors, slot_weights, orders=None):
    """(loss, slot_losses, logits, h, grads) as numpy float64."""
    f = jax.jit(jax.value_and_grad(
        lambda p: loss_fn(p, cfg, tokens, labels, tensors, slot_weights, orders), has_aux=True))
    (loss, (sl, logits, h)), g = f(R.to_jax(params))
    return (float(loss), np.asarray(sl), np.asarray(logits), np.asarray(h),
            {n: np.asarray(v) for n, v in g.items()})


def adamw_run(params, cfg: RARConfig, tokens, labels, tensors, slot_weights, hp: R.AdamWConfig, orders=None):
    """S AdamW updates on one fixed batch, RAR's decay rule for the base group."""
    groups = {n: g for n, _, g, _, _ in parameter_table(cfg)}
    f = jax.jit(jax.value_and_grad(lambda q: loss_fn(q, cfg, tokens, labels, tensors, slot_weights, orders)[0]))
    return R.adamw_steps(params, groups, f, hp, decays=decay_flags(cfg))


# --------------------------------------------------------------------------------------------
# Greedy guided sampling, raster order (SPEC sections 5 and 9)
# --------------------------------------------------------------------------------------------

def guidance_weight(s: int, T: int, g: float, power: float) -> float:
    """w_s = (g - 1) (1 - cos(pi (s / T)^p)) / 2 + 1; p = 0 is the constant g (0^0 = 1)."""
    return (g - 1.0) * (1.0 - math.cos(math.pi * (s / T) ** power)) / 2.0 + 1.0


@functools.lru_cache(maxsize=None)
def _logits_fn(cfg: RARConfig):
    """jit-compiled (params, labels, tensors) -> logits, one per config (compiled once)."""
    return jax.jit(lambda q, lb, tn: forward(q, cfg, lb, tn)[0])


def sample_greedy(params, cfg: RARConfig, labels, g: float, power: float = 0.0):
    """Greedy (top_k 1) sampling without a KV cache: each step re-runs the model over all T
    positions (placeholder token 0 after p, which the causal mask ignores) and reads position p.
    One weight w_p for all k slots of step p; at g <= 1 no none rows. Returns (tokens [Bs, T],
    trajectories [Bs, T, k], min_margin) as reference.sample_greedy."""
    jp = R.to_jax(params)
    labels = np.asarray(labels, dtype=np.int64)
    Bs = labels.shape[0]
    T, k = cfg.seq_len, cfg.window
    guided = g > 1.0
    lab = np.concatenate([labels, np.full(Bs, cfg.none_label, dtype=np.int64)]) if guided else labels
    fn = _logits_fn(cfg)
    produced = np.full((Bs, T, k), PAD, dtype=np.int64)
    min_margin = math.inf
    for p in range(T):
        full = np.zeros((Bs, T - 1, k), dtype=np.int64)
        full[:, :p] = produced[:, :p]
        logits = np.asarray(fn(jp, lab, np.concatenate([full, full]) if guided else full))[:, p]
        if guided:
            lc, lu = logits[:Bs], logits[Bs:]
            logits = lu + (lc - lu) * guidance_weight(p, T, g, power)
        for j in range(k):
            if p + j < T:
                row = logits[:, j]
                produced[:, p, j] = np.argmax(row, axis=-1)
                srt = np.sort(row, axis=-1)
                min_margin = min(min_margin, float(np.min(srt[:, -1] - srt[:, -2])))
    tokens, traj = R.tokens_and_trajectories(produced)
    return tokens, traj, min_margin
