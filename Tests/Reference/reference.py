"""Independent float64 reference of the TensorAR trainer's model (SPEC sections 2, 3, 5, 6).

JAX in float64 on the CPU, autograd for gradients. Written from SPEC.md alone, without looking
at the Swift code, so that the fixtures it produces are an independent check.

Conventions (SPEC):
  * parameters are a dict name -> array, names exactly as SPEC sections 2 and 3;
  * linear weights are [out, in], y = x W^T, no biases;
  * `tokens` int [B, T]: the clean image tokens (targets);
  * `labels` int [B] in [0, C] (C = the null class);
  * `tensors` int [B, P-1, k]: tensors[b, p-1, :] is the (possibly noised) input tensor t_{p-1}
    fed at position p (P = T for training; shorter prefixes for sampling). -1 marks a pad entry.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import jax
import jax.numpy as jnp

jax.config.update("jax_enable_x64", True)

PAD = -1


# --------------------------------------------------------------------------------------------
# Config and parameter table
# --------------------------------------------------------------------------------------------

def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


def default_ffn_hidden(dim: int) -> int:
    """SPEC 2: F = find_multiple(int(2 * 4D / 3), 256)."""
    return find_multiple(int(2 * 4 * dim / 3), 256)


class Shape:
    """What every config derives from its fields (grid_size, dim, n_head, plugin_depth)."""

    @property
    def seq_len(self) -> int:
        return self.grid_size * self.grid_size

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def has_plugin(self) -> bool:
        return self.plugin_depth > 0


@dataclass(frozen=True)
class Config(Shape):
    vocab_size: int
    num_classes: int
    grid_size: int
    dim: int
    n_layer: int
    n_head: int
    ffn_hidden: int = 0  # 0 -> SPEC formula
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    window: int = 1          # k
    plugin_depth: int = 0    # d (0: no plug-in)
    residual: bool = True

    def __post_init__(self):
        if self.ffn_hidden == 0:
            object.__setattr__(self, "ffn_hidden", default_ffn_hidden(self.dim))
        assert self.dim % self.n_head == 0
        assert self.head_dim % 4 == 0
        assert self.window >= 1
        assert self.window == 1 or self.plugin_depth >= 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def block_table(prefix: str, D: int, F: int) -> List[Tuple[str, Tuple[int, ...], str]]:
    """(name, shape, kind) of one block; kind in {'norm', 'matrix'}."""
    return [
        (f"{prefix}.attention_norm.weight", (D,), "norm"),
        (f"{prefix}.attention.wqkv.weight", (3 * D, D), "wqkv"),
        (f"{prefix}.attention.wo.weight", (D, D), "wo"),
        (f"{prefix}.ffn_norm.weight", (D,), "norm"),
        (f"{prefix}.feed_forward.w1.weight", (F, D), "w1"),
        (f"{prefix}.feed_forward.w3.weight", (F, D), "w3"),
        (f"{prefix}.feed_forward.w2.weight", (D, F), "w2"),
    ]


def parameter_table(cfg: Config) -> List[Tuple[str, Tuple[int, ...], str, str]]:
    """Every parameter as (name, shape, group, kind), base group first, then the plug-in."""
    D, F, V, C = cfg.dim, cfg.ffn_hidden, cfg.vocab_size, cfg.num_classes
    out: List[Tuple[str, Tuple[int, ...], str, str]] = []

    def add(name, shape, group, kind):
        out.append((name, tuple(shape), group, kind))

    add("cls_embedding.embedding_table.weight", (C + 1, D), "base", "embedding")
    add("tok_embeddings.weight", (V, D), "base", "embedding")
    for l in range(cfg.n_layer):
        for n, s, kd in block_table(f"layers.{l}", D, F):
            add(n, s, "base", kd)
    add("norm.weight", (D,), "base", "norm")
    add("output.weight", (V, D), "base", "output")
    if cfg.has_plugin:
        k, d = cfg.window, cfg.plugin_depth
        add("tensorar.in_query", (D,), "plugin", "vector")
        add("tensorar.in_pos", (k, D), "plugin", "embedding")
        add("tensorar.in_pad", (D,), "plugin", "vector")
        for i in range(d):
            for n, s, kd in block_table(f"tensorar.encoder.layers.{i}", D, F):
                add(n, s, "plugin", kd)
        add("tensorar.encoder.norm.weight", (D,), "plugin", "norm")
        add("tensorar.encoder.proj.weight", (D, D), "plugin", "proj")
        add("tensorar.out_pos", (k, D), "plugin", "embedding")
        for i in range(d):
            for n, s, kd in block_table(f"tensorar.decoder.layers.{i}", D, F):
                add(n, s, "plugin", kd)
        add("tensorar.decoder.norm.weight", (D,), "plugin", "norm")
        add("tensorar.decoder.proj.weight", (D, D), "plugin", "proj")
    return out


def init_params_spec(cfg: Config, rng: np.random.Generator) -> Dict[str, np.ndarray]:
    """The SPEC initialisation (N(0, 0.02), ones, zeros; proj zero iff residual)."""
    p = {}
    for name, shape, group, kind in parameter_table(cfg):
        if kind == "norm":
            p[name] = np.ones(shape)
        elif kind == "output":
            p[name] = np.zeros(shape)
        elif kind == "proj":
            p[name] = np.zeros(shape) if cfg.residual else rng.normal(0, 0.02, shape)
        else:
            p[name] = rng.normal(0, 0.02, shape)
    return p


# Fixture initialisation: larger scales so that nothing is trivially near zero, while the
# activations stay O(1) (std ~ 1/sqrt(fan_in) for the matrices).
FIXTURE_SCALES = {
    "embedding": 0.5,
    "vector": 0.5,
    "wqkv": 0.25,
    "wo": 0.2,
    "w1": 0.2,
    "w3": 0.2,
    "w2": 0.08,
    "output": 0.3,
    "proj": 0.2,
}


def init_params_fixture(cfg: Config, rng_base: np.random.Generator,
                        rng_plugin: np.random.Generator, table=None) -> Dict[str, np.ndarray]:
    """`table` (name, shape, group, kind): another base's parameter table (default: this one's)."""
    p = {}
    for name, shape, group, kind in table or parameter_table(cfg):
        rng = rng_base if group == "base" else rng_plugin
        if kind == "norm":
            p[name] = 1.0 + rng.normal(0, 0.1, shape)
        else:
            p[name] = rng.normal(0, FIXTURE_SCALES[kind], shape)
    return p


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

def rms_norm(x, w, eps):
    return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope_table(cfg: Config, P: int):
    """cos, sin of shape [P, hd/2] for sequence positions 0..P-1 (SPEC 2).

    Position 0 (class) has cos = sin = 0. Position p >= 1 sits at grid cell
    ((p-1) // W, (p-1) % W) and gets angles [r f_0 .. r f_{n-1}, col f_0 .. col f_{n-1}],
    f_i = base^(-4 i / hd), n = hd / 4.
    """
    hd = cfg.head_dim
    n = hd // 4
    f = np.array([cfg.rope_base ** (-4.0 * i / hd) for i in range(n)], dtype=np.float64)
    cos = np.zeros((P, hd // 2))
    sin = np.zeros((P, hd // 2))
    W = cfg.grid_size
    for p in range(1, P):
        r, c = divmod(p - 1, W)
        ang = np.concatenate([r * f, c * f])
        cos[p] = np.cos(ang)
        sin[p] = np.sin(ang)
    return jnp.asarray(cos), jnp.asarray(sin)


def apply_rope(x, cos, sin):
    """x [N, S, NH, hd]; pair (x_{2i}, x_{2i+1}) rotated by angle i."""
    N, S, NH, hd = x.shape
    xp = x.reshape(N, S, NH, hd // 2, 2)
    x0, x1 = xp[..., 0], xp[..., 1]
    c = cos[None, :, None, :]
    s = sin[None, :, None, :]
    y0 = x0 * c - x1 * s
    y1 = x1 * c + x0 * s
    return jnp.stack([y0, y1], axis=-1).reshape(N, S, NH, hd)


def attention(params, prefix, x, cfg: Config, rope, causal: bool):
    """x [N, S, D] (already normed). Returns wo(Attn(x))."""
    N, S, D = x.shape
    NH, hd = cfg.n_head, cfg.head_dim
    qkv = x @ params[f"{prefix}.attention.wqkv.weight"].T
    q = qkv[..., 0:D].reshape(N, S, NH, hd)
    k = qkv[..., D:2 * D].reshape(N, S, NH, hd)
    v = qkv[..., 2 * D:3 * D].reshape(N, S, NH, hd)
    if rope is not None:
        cos, sin = rope
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
    scores = jnp.einsum("nqhd,nkhd->nhqk", q, k) / math.sqrt(hd)
    if causal:
        mask = np.tril(np.ones((S, S), dtype=bool))
        scores = jnp.where(mask[None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    o = jnp.einsum("nhqk,nkhd->nqhd", probs, v).reshape(N, S, D)
    return o @ params[f"{prefix}.attention.wo.weight"].T


def block(params, prefix, x, cfg: Config, rope, causal: bool):
    eps = cfg.norm_eps
    h = x + attention(params, prefix, rms_norm(x, params[f"{prefix}.attention_norm.weight"], eps),
                      cfg, rope, causal)
    n = rms_norm(h, params[f"{prefix}.ffn_norm.weight"], eps)
    a = n @ params[f"{prefix}.feed_forward.w1.weight"].T
    b = n @ params[f"{prefix}.feed_forward.w3.weight"].T
    return h + (jax.nn.silu(a) * b) @ params[f"{prefix}.feed_forward.w2.weight"].T


def embed_tokens(params, ids):
    """tok_embeddings[ids] for ids >= 0 (pad ids must be handled by the caller)."""
    return params["tok_embeddings.weight"][jnp.maximum(ids, 0)]


def step_inputs(params, cfg: Config, tensors):
    """The transformer input for positions 1..P-1: [B, P-1, D] from tensors [B, P-1, k]."""
    tensors = jnp.asarray(tensors)
    B, Pm1, k = tensors.shape
    assert k == cfg.window, (k, cfg.window)
    first = tensors[..., 0]
    if not cfg.has_plugin:
        return embed_tokens(params, first)
    D = cfg.dim
    pad = (tensors < 0)[..., None]
    e = jnp.where(pad, params["tensorar.in_pad"], embed_tokens(params, tensors))
    e = e + params["tensorar.in_pos"]                               # [B, P-1, k, D]
    q = jnp.broadcast_to(params["tensorar.in_query"], (B, Pm1, 1, D))
    s = jnp.concatenate([q, e], axis=2).reshape(B * Pm1, k + 1, D)
    for i in range(cfg.plugin_depth):
        s = block(params, f"tensorar.encoder.layers.{i}", s, cfg, None, causal=False)
    u = rms_norm(s[:, 0], params["tensorar.encoder.norm.weight"], cfg.norm_eps)
    u = (u @ params["tensorar.encoder.proj.weight"].T).reshape(B, Pm1, D)
    if cfg.residual:
        # Entry 0 of an input tensor is never pad (t_{p-1}[0] = x_{p-1}, p-1 < T).
        return embed_tokens(params, first) + u
    return u


def trunk(params, cfg: Config, labels, tensors):
    """Final hidden states h [B, P, D] before the final norm."""
    labels = jnp.asarray(labels)
    cls = params["cls_embedding.embedding_table.weight"][labels][:, None, :]
    x = jnp.concatenate([cls, step_inputs(params, cfg, tensors)], axis=1)
    P = x.shape[1]
    rope = rope_table(cfg, P)
    for l in range(cfg.n_layer):
        x = block(params, f"layers.{l}", x, cfg, rope, causal=True)
    return x


def head(params, cfg: Config, h):
    """Slot logits [B, P, k, V] from hidden states h [B, P, D]."""
    B, P, D = h.shape
    if not cfg.has_plugin:
        g = h[:, :, None, :]
    else:
        k = cfg.window
        op = jnp.broadcast_to(params["tensorar.out_pos"], (B, P, k, D))
        s = jnp.concatenate([h[:, :, None, :], op], axis=2).reshape(B * P, k + 1, D)
        for i in range(cfg.plugin_depth):
            s = block(params, f"tensorar.decoder.layers.{i}", s, cfg, None, causal=False)
        z = rms_norm(s[:, 1:], params["tensorar.decoder.norm.weight"], cfg.norm_eps)
        z = (z @ params["tensorar.decoder.proj.weight"].T).reshape(B, P, k, D)
        g = h[:, :, None, :] + z if cfg.residual else z
    return rms_norm(g, params["norm.weight"], cfg.norm_eps) @ params["output.weight"].T


def forward(params, cfg: Config, labels, tensors):
    """(logits [B, P, k, V], h [B, P, D]) with P = tensors.shape[1] + 1."""
    h = trunk(params, cfg, labels, tensors)
    return head(params, cfg, h), h


def valid_mask(cfg: Config, T: int) -> np.ndarray:
    """[T, k]: pair (p, j) is valid when p + j < T."""
    p = np.arange(T)[:, None]
    j = np.arange(cfg.window)[None, :]
    return (p + j) < T


def slot_targets(tokens, cfg: Config) -> np.ndarray:
    """[B, T, k]: x_{p+j}, 0 where p + j >= T (masked out anyway)."""
    tokens = np.asarray(tokens)
    B, T = tokens.shape
    out = np.zeros((B, T, cfg.window), dtype=np.int64)
    for j in range(cfg.window):
        out[:, : T - j, j] = tokens[:, j:]
    return out


def loss_terms(logits, tokens, cfg: Config, slot_weights):
    """(weighted loss, per-slot losses [k], per-pair CE [B, T, k])."""
    tokens = np.asarray(tokens)
    B, T = tokens.shape
    tgt = jnp.asarray(slot_targets(tokens, cfg))
    mask = jnp.asarray(np.broadcast_to(valid_mask(cfg, T), (B, T, cfg.window)).astype(np.float64))
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
    ce = (lse - picked) * mask
    w = jnp.asarray(np.asarray(slot_weights, dtype=np.float64))
    loss = jnp.sum(ce * w) / jnp.sum(mask * w)
    slot_losses = jnp.sum(ce, axis=(0, 1)) / jnp.sum(mask, axis=(0, 1))
    return loss, slot_losses, ce


def loss_fn(params, cfg: Config, tokens, labels, tensors, slot_weights):
    logits, h = forward(params, cfg, labels, tensors)
    loss, slot_losses, _ = loss_terms(logits, tokens, cfg, slot_weights)
    return loss, (slot_losses, logits, h)


def to_jax(params):
    return {n: jnp.asarray(v, dtype=jnp.float64) for n, v in params.items()}


def loss_and_grad(params, cfg: Config, tokens, labels, tensors, slot_weights):
    """Returns (loss, slot_losses, logits, h, grads) as numpy float64."""
    f = jax.jit(jax.value_and_grad(
        lambda p: loss_fn(p, cfg, tokens, labels, tensors, slot_weights), has_aux=True))
    (loss, (sl, logits, h)), g = f(to_jax(params))
    return (float(loss), np.asarray(sl), np.asarray(logits), np.asarray(h),
            {n: np.asarray(v) for n, v in g.items()})


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

def clean_tensors(tokens, k: int) -> np.ndarray:
    """[B, T-1, k]: t_{p-1} = (x_{p-1} .. x_{p+k-2}) for p = 1..T-1, pad (-1) past the end."""
    tokens = np.asarray(tokens)
    B, T = tokens.shape
    out = np.full((B, T - 1, k), PAD, dtype=np.int64)
    for q in range(T - 1):          # q = p - 1
        for j in range(k):
            if q + j < T:
                out[:, q, j] = tokens[:, q + j]
    return out


def replace_noise(tensors, vocab_size: int, prob: float, rng: np.random.Generator) -> np.ndarray:
    """Each entry j >= 1 that is not pad becomes a uniform random token with probability prob."""
    t = np.array(tensors, copy=True)
    hit = rng.random(t.shape) < prob
    hit[..., 0] = False
    hit &= t >= 0
    t[hit] = rng.integers(0, vocab_size, size=int(hit.sum()))
    return t


# --------------------------------------------------------------------------------------------
# AdamW (SPEC 6, PyTorch semantics)
# --------------------------------------------------------------------------------------------

@dataclass
class AdamWConfig:
    lr_plugin: float = 1e-2
    lr_base: float = 1e-3
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip: float = 1.0
    steps: int = 5

    def lr(self, group: str, s: int) -> float:
        """Learning rate of update s (0-based): plugin decays linearly to 0 over `steps`."""
        if group == "plugin":
            return self.lr_plugin * (1.0 - s / self.steps)
        return self.lr_base


def adamw_run(params, cfg: Config, tokens, labels, tensors, slot_weights, hp: AdamWConfig):
    """S AdamW updates on one fixed batch. Returns (losses [S], grad_norms [S], final params)."""
    groups = {n: g for n, _, g, _ in parameter_table(cfg)}
    f = jax.jit(jax.value_and_grad(
        lambda q: loss_fn(q, cfg, tokens, labels, tensors, slot_weights)[0]))
    return adamw_steps(params, groups, f, hp)


def adamw_steps(params, groups, f, hp: AdamWConfig, decays=None):
    """S AdamW updates with f(params) -> (loss, grads) (one fixed batch); groups: name -> group;
    decays: name -> whether weight decay applies (default: SPEC 6's rule, 2 or more dims).
    Returns (losses [S], grad_norms [S], final params)."""
    p = {n: np.array(v, dtype=np.float64) for n, v in params.items()}
    m = {n: np.zeros_like(v) for n, v in p.items()}
    v2 = {n: np.zeros_like(v) for n, v in p.items()}
    losses, norms = [], []
    b1, b2 = hp.beta1, hp.beta2
    for s in range(hp.steps):
        loss, g = f(to_jax(p))
        g = {n: np.asarray(x) for n, x in g.items()}
        norm = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
        losses.append(float(loss))
        norms.append(norm)
        scale = min(1.0, hp.clip / (norm + 1e-6))
        t = s + 1
        bc1 = 1.0 - b1 ** t
        bc2 = 1.0 - b2 ** t
        for n in p:
            gn = g[n] * scale
            lr = hp.lr(groups[n], s)
            if (decays[n] if decays is not None else p[n].ndim >= 2):
                p[n] = p[n] * (1.0 - lr * hp.weight_decay)
            m[n] = b1 * m[n] + (1.0 - b1) * gn
            v2[n] = b2 * v2[n] + (1.0 - b2) * gn * gn
            mhat = m[n] / bc1
            vhat = v2[n] / bc2
            p[n] = p[n] - lr * mhat / (np.sqrt(vhat) + hp.eps)
    return np.array(losses), np.array(norms), p


# --------------------------------------------------------------------------------------------
# Greedy sampling with classifier-free guidance (SPEC 5)
# --------------------------------------------------------------------------------------------

def _step_logits_fn(cfg: Config):
    """jit-compiled (params, labels, tensors [N, T-1, k]) -> slot logits [N, T, k, V]."""
    return jax.jit(lambda p, lab, ten: forward(p, cfg, lab, ten)[0])


def tokens_and_trajectories(produced):
    """From the tensors t_p produced at each step, [Bs, T, k]: the image tokens x_p = t_p[0] [Bs, T]
    and the trajectories [Bs, T, k], [b, q, s] = the prediction of token q made at slot s (at step
    q - s), -1 where q - s < 0."""
    Bs, T, k = produced.shape
    traj = np.full((Bs, T, k), PAD, dtype=np.int64)
    for q in range(T):
        for s in range(k):
            if q - s >= 0:
                traj[:, q, s] = produced[:, q - s, s]
    return produced[:, :, 0].copy(), traj


def sample_greedy(params, cfg: Config, labels, cfg_scale: float, literal_prefix: bool = False):
    """Greedy (top_k = 1) sampling without a KV cache: the model is re-run from scratch at
    every step.

    At step p the inputs t_0..t_{p-1} fill positions 1..p. By default the forward pass runs
    over all T positions with placeholder inputs (token 0) after position p and reads position
    p: with the causal mask the placeholders get exactly zero attention weight, so this is the
    prefix computation (and one compiled shape). literal_prefix=True runs the prefix of
    length p+1 itself (one compile per length; the tests check the two agree).

    Returns (tokens [Bs, T], trajectories [Bs, T, k], min_margin) where trajectories[b, q, s]
    is the prediction of token q made at slot s (at step q - s), -1 when q - s < 0, and
    min_margin is the smallest gap between the best and second-best guided logit over every
    decision (how robust the greedy path is to rounding).
    """
    jp = to_jax(params)
    labels = np.asarray(labels, dtype=np.int64)
    Bs = labels.shape[0]
    T, k, C = cfg.seq_len, cfg.window, cfg.num_classes
    guided = cfg_scale > 1.0                       # as LlamaGen: guidance only above 1 (SPEC 5)
    produced = np.full((Bs, T, k), PAD, dtype=np.int64)   # t_p for p = 0..T-1
    min_margin = math.inf
    lab = np.concatenate([labels, np.full(Bs, C, dtype=np.int64)]) if guided else labels
    fn = _step_logits_fn(cfg)
    prefix_fn = jax.jit(lambda q, lb, tn: head(q, cfg, trunk(q, cfg, lb, tn)[:, -1:])[:, 0])
    for p in range(T):
        tensors = produced[:, :p, :]                        # inputs t_0..t_{p-1} at 1..p
        if literal_prefix:
            ten = np.concatenate([tensors, tensors], axis=0) if guided else tensors
            logits = np.asarray(prefix_fn(jp, lab, ten))   # [N, k, V], prefix of p+1
        else:
            full = np.zeros((Bs, T - 1, k), dtype=np.int64)
            full[:, :p] = tensors
            ten = np.concatenate([full, full], axis=0) if guided else full
            logits = np.asarray(fn(jp, lab, ten))[:, p]     # [N, k, V]
        if guided:
            lc, lu = logits[:Bs], logits[Bs:]
            l = lu + cfg_scale * (lc - lu)
        else:
            l = logits
        for j in range(k):
            if p + j < T:
                row = l[:, j]
                produced[:, p, j] = np.argmax(row, axis=-1)   # lowest index on ties
                srt = np.sort(row, axis=-1)
                min_margin = min(min_margin, float(np.min(srt[:, -1] - srt[:, -2])))
    tokens, traj = tokens_and_trajectories(produced)
    return tokens, traj, min_margin
