"""Self-checks of the float64 reference and of the fixtures it wrote.

    python3 -m pytest -q Tests/Reference/test_reference.py
"""

from __future__ import annotations

import glob
import json
import math
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import jax  # noqa: E402
import reference as R  # noqa: E402
import safetensors_io  # noqa: E402

FIXTURES = os.path.normpath(os.path.join(HERE, "..", "ModelTests", "Fixtures"))
SHAPE = dict(vocab_size=32, num_classes=5, grid_size=4, dim=32, n_layer=2, n_head=4)


def batch(k, seed=0, V=32, T=16, noise=0.5):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, size=(3, T))
    labels = np.array([1, 5, 3])
    tensors = R.replace_noise(R.clean_tensors(tokens, k), V, noise, rng)
    return tokens, labels, tensors


def zero_proj(params):
    p = dict(params)
    p["tensorar.encoder.proj.weight"] = np.zeros_like(p["tensorar.encoder.proj.weight"])
    p["tensorar.decoder.proj.weight"] = np.zeros_like(p["tensorar.decoder.proj.weight"])
    return p


def fwd(params, cfg, labels, tensors):
    f = jax.jit(lambda p, l, t: R.forward(p, cfg, l, t))
    logits, h = f(R.to_jax(params), labels, tensors)
    return np.asarray(logits), np.asarray(h)


# ---------------------------------------------------------------------------- small pieces

def test_ffn_formula():
    assert R.default_ffn_hidden(32) == 256
    assert R.default_ffn_hidden(768) == 2048
    assert R.default_ffn_hidden(1024) == 2816


def test_rope_table():
    cfg = R.Config(**SHAPE)
    cos, sin = map(np.asarray, R.rope_table(cfg, 17))
    assert np.all(cos[0] == 0) and np.all(sin[0] == 0)          # class position
    assert np.allclose(cos[1], 1) and np.allclose(sin[1], 0)     # cell (0, 0)
    hd = cfg.head_dim
    f = 10000.0 ** (-4.0 * np.arange(hd // 4) / hd)
    r, c = divmod(7 - 1, 4)                                     # position 7: cell (1, 2)
    assert np.allclose(cos[7], np.cos(np.concatenate([r * f, c * f])))
    assert np.allclose(sin[7], np.sin(np.concatenate([r * f, c * f])))


def test_apply_rope_pairs():
    x = np.arange(8.0).reshape(1, 1, 1, 8)
    cos = np.array([[0.0, 1.0, 1.0, 1.0]])
    sin = np.array([[1.0, 0.0, 0.0, 0.0]])
    y = np.asarray(R.apply_rope(x, cos, sin))[0, 0, 0]
    # pair (x0, x1) = (0, 1) rotated by 90 degrees -> (-1, 0); the others unchanged
    assert np.allclose(y, [-1, 0, 2, 3, 4, 5, 6, 7])


def test_clean_tensors_and_noise():
    tokens = np.arange(16).reshape(1, 16)
    t = R.clean_tensors(tokens, 4)
    assert t.shape == (1, 15, 4)
    assert list(t[0, 0]) == [0, 1, 2, 3]
    assert list(t[0, 13]) == [13, 14, 15, -1]
    assert list(t[0, 14]) == [14, 15, -1, -1]
    n = R.replace_noise(t, 32, 1.0, np.random.default_rng(0))
    assert np.all(n[..., 0] == t[..., 0]) and np.all((n == -1) == (t == -1))


def test_class_position_has_zero_q_k():
    """Changing the class embedding only moves position 0's output via v, never the scores:
    with q = k = 0 at position 0, position 0 attends only to itself and other positions give
    it score 0. Check: the class position's hidden state depends on its embedding, and the
    scores at position 0 are uniform, by comparing with a hand computation of layer 0."""
    cfg = R.Config(**SHAPE)
    p = R.init_params_fixture(cfg, np.random.default_rng(0), np.random.default_rng(1))
    jp = R.to_jax(p)
    x = np.random.default_rng(2).normal(size=(1, 3, cfg.dim))
    n = np.asarray(R.rms_norm(x, p["layers.0.attention_norm.weight"], cfg.norm_eps))
    qkv = n @ p["layers.0.attention.wqkv.weight"].T
    D = cfg.dim
    q = qkv[..., :D].reshape(1, 3, cfg.n_head, cfg.head_dim)
    cos, sin = R.rope_table(cfg, 3)
    qr = np.asarray(R.apply_rope(q, cos, sin))
    assert np.all(qr[0, 0] == 0)
    # position 1 attends to position 0 with score exactly 0 (k_0 = 0)
    kr = np.asarray(R.apply_rope(qkv[..., D:2 * D].reshape(1, 3, cfg.n_head, cfg.head_dim), cos, sin))
    assert np.all(kr[0, 0] == 0)
    out = np.asarray(R.attention(jp, "layers.0", n, cfg, (cos, sin), causal=True))
    v = qkv[..., 2 * D:]
    # position 1: scores [0, q1.k1/sqrt(hd)] per head
    s11 = np.einsum("hd,hd->h", qr[0, 1], kr[0, 1]) / math.sqrt(cfg.head_dim)
    a = np.stack([np.ones_like(s11), np.exp(s11)], -1)
    a = a / a.sum(-1, keepdims=True)
    vh = v[0, :2].reshape(2, cfg.n_head, cfg.head_dim)
    o = np.einsum("hk,khd->hd", a, vh).reshape(D) @ p["layers.0.attention.wo.weight"].T
    assert np.allclose(out[0, 1], o, atol=1e-12)


# ---------------------------------------------------------------------------- plug-in identities

def test_k1_fresh_plugin_is_base_model():
    """(a) k = 1, residual, proj weights zero: same logits, hidden, loss as the base model."""
    base_cfg = R.Config(**SHAPE)
    cfg = R.Config(**SHAPE, window=1, plugin_depth=1, residual=True)
    p = zero_proj(R.init_params_fixture(cfg, np.random.default_rng(10), np.random.default_rng(11)))
    pb = {n: v for n, v in p.items() if not n.startswith("tensorar.")}
    assert set(pb) == {n for n, *_ in R.parameter_table(base_cfg)}
    tokens, labels, tensors = batch(1)
    lp, hp = fwd(p, cfg, labels, tensors)
    lb, hb = fwd(pb, base_cfg, labels, tensors)
    assert lp.shape == lb.shape == (3, 16, 1, 32)
    np.testing.assert_allclose(hp, hb, rtol=0, atol=1e-12)
    np.testing.assert_allclose(lp, lb, rtol=0, atol=1e-12)
    a = float(R.loss_terms(lp, tokens, cfg, [1.0])[0])
    b = float(R.loss_terms(lb, tokens, base_cfg, [1.0])[0])
    assert abs(a - b) < 1e-12


@pytest.mark.parametrize("k,d", [(2, 1), (4, 2)])
def test_zero_proj_slot0_is_base_model(k, d):
    """(b) any k, residual, proj weights zero: slot 0 logits equal the base model's logits
    (fed the clean tokens x_{p-1}, which is entry 0 of the input tensor)."""
    base_cfg = R.Config(**SHAPE)
    cfg = R.Config(**SHAPE, window=k, plugin_depth=d, residual=True)
    p = zero_proj(R.init_params_fixture(cfg, np.random.default_rng(20), np.random.default_rng(21)))
    pb = {n: v for n, v in p.items() if not n.startswith("tensorar.")}
    tokens, labels, tensors = batch(k, seed=3)
    lp, hp = fwd(p, cfg, labels, tensors)
    lb, hb = fwd(pb, base_cfg, labels, tensors[..., :1])
    np.testing.assert_allclose(hp, hb, rtol=0, atol=1e-12)
    np.testing.assert_allclose(lp[:, :, 0], lb[:, :, 0], rtol=0, atol=1e-12)
    # every slot of a zero-proj residual decoder reads norm(h_p): all slots equal
    for j in range(1, k):
        np.testing.assert_allclose(lp[:, :, j], lp[:, :, 0], rtol=0, atol=1e-12)


def test_nonzero_proj_changes_things():
    cfg = R.Config(**SHAPE, window=2, plugin_depth=1, residual=True)
    p = R.init_params_fixture(cfg, np.random.default_rng(20), np.random.default_rng(21))
    tokens, labels, tensors = batch(2, seed=3)
    l1, _ = fwd(p, cfg, labels, tensors)
    l0, _ = fwd(zero_proj(p), cfg, labels, tensors)
    assert np.abs(l1 - l0).max() > 1e-2


# ---------------------------------------------------------------------------- loss and gradients

def test_loss_matches_numpy():
    cfg = R.Config(**SHAPE, window=4, plugin_depth=1, residual=False)
    p = R.init_params_fixture(cfg, np.random.default_rng(30), np.random.default_rng(31))
    tokens, labels, tensors = batch(4, seed=4)
    logits, _ = fwd(p, cfg, labels, tensors)
    w = np.array([1.0, 0.5, 0.25, 0.125])
    num = den = 0.0
    per = [[] for _ in range(4)]
    for b in range(3):
        for pos in range(16):
            for j in range(4):
                if pos + j < 16:
                    l = logits[b, pos, j]
                    ce = np.log(np.sum(np.exp(l - l.max()))) + l.max() - l[tokens[b, pos + j]]
                    num += w[j] * ce
                    den += w[j]
                    per[j].append(ce)
    loss, sl, _ = R.loss_terms(logits, tokens, cfg, w)
    assert abs(float(loss) - num / den) < 1e-12
    np.testing.assert_allclose(np.asarray(sl), [np.mean(x) for x in per], atol=1e-12)
    assert [len(x) for x in per] == [48, 45, 42, 39]


@pytest.mark.parametrize("k,d,res", [(2, 1, False), (4, 2, True)])
def test_gradient_finite_difference(k, d, res):
    """(c) jax gradient vs a central finite difference on a few parameter entries."""
    cfg = R.Config(**SHAPE, window=k, plugin_depth=d, residual=res)
    p = R.init_params_fixture(cfg, np.random.default_rng(40), np.random.default_rng(41))
    tokens, labels, tensors = batch(k, seed=5)
    w = np.array([1.0, 0.5, 0.25, 0.125][:k])
    f = jax.jit(lambda q: R.loss_fn(q, cfg, tokens, labels, tensors, w)[0])
    g = jax.jit(jax.grad(lambda q: R.loss_fn(q, cfg, tokens, labels, tensors, w)[0]))
    grads = {n: np.asarray(v) for n, v in g(R.to_jax(p)).items()}
    probes = [
        ("tok_embeddings.weight", (int(tensors[0, 3, 1]) if tensors[0, 3, 1] >= 0 else 0, 5)),
        ("cls_embedding.embedding_table.weight", (5, 7)),
        ("layers.1.attention.wqkv.weight", (40, 3)),
        ("layers.0.feed_forward.w2.weight", (3, 100)),
        ("norm.weight", (11,)),
        ("output.weight", (int(tokens[1, 4]), 2)),
        ("tensorar.in_pad", (4,)),
        ("tensorar.in_pos", (k - 1, 9)),
        ("tensorar.encoder.layers.0.attention.wo.weight", (2, 30)),
        ("tensorar.encoder.proj.weight", (6, 6)),
        ("tensorar.out_pos", (1, 1)),
        ("tensorar.decoder.layers.0.feed_forward.w1.weight", (17, 8)),
        ("tensorar.decoder.norm.weight", (3,)),
        ("tensorar.decoder.proj.weight", (0, 31)),
    ]
    eps = 1e-5
    for name, idx in probes:
        plus = dict(p); minus = dict(p)
        plus[name] = p[name].copy(); plus[name][idx] += eps
        minus[name] = p[name].copy(); minus[name][idx] -= eps
        fd = (float(f(R.to_jax(plus))) - float(f(R.to_jax(minus)))) / (2 * eps)
        an = grads[name][idx]
        assert abs(fd - an) <= 1e-7 + 1e-6 * abs(an), (name, idx, fd, an)
        if name == "tensorar.in_pad" and k <= 2:
            # pad enters training inputs only for k >= 3 (t_{p-1} with p-1 <= T-2)
            assert an == 0.0
        else:
            assert abs(an) > 1e-6, (name, idx, an)   # the probe is not trivially zero


def test_adamw_first_step_by_hand():
    """Step 1 of AdamW: mhat = g, vhat = g^2 (after clipping), update lr * g / (|g| + eps)."""
    cfg = R.Config(**SHAPE, window=2, plugin_depth=1, residual=True)
    p = R.init_params_fixture(cfg, np.random.default_rng(50), np.random.default_rng(51))
    tokens, labels, tensors = batch(2, seed=6)
    w = np.ones(2)
    hp = R.AdamWConfig(steps=1)
    _, _, _, _, g = R.loss_and_grad(p, cfg, tokens, labels, tensors, w)
    norm = math.sqrt(sum(float((x ** 2).sum()) for x in g.values()))
    scale = min(1.0, 1.0 / (norm + 1e-6))
    losses, norms, final = R.adamw_run(p, cfg, tokens, labels, tensors, w, hp)
    assert abs(norms[0] - norm) < 1e-10
    for name in ["tok_embeddings.weight", "norm.weight", "tensorar.in_query", "tensorar.encoder.proj.weight"]:
        lr = 1e-2 if name.startswith("tensorar.") else 1e-3
        wd = 0.05 if p[name].ndim >= 2 else 0.0
        gs = g[name] * scale
        want = p[name] * (1 - lr * wd) - lr * gs / (np.abs(gs) + 1e-8)
        np.testing.assert_allclose(final[name], want, rtol=0, atol=1e-13)


def test_plugin_schedule():
    hp = R.AdamWConfig()
    assert [hp.lr("plugin", s) for s in range(5)] == pytest.approx([1e-2, 8e-3, 6e-3, 4e-3, 2e-3])
    assert hp.lr("base", 4) == 1e-3


# ---------------------------------------------------------------------------- sampling

@pytest.mark.parametrize("k,d,scale", [(1, 0, 2.0), (2, 1, 1.0), (4, 1, 2.0)])
def test_sampling_full_vs_literal_prefix(k, d, scale):
    cfg = R.Config(**SHAPE, window=k, plugin_depth=d, residual=(k != 4))
    p = R.init_params_fixture(cfg, np.random.default_rng(60), np.random.default_rng(61))
    a = R.sample_greedy(p, cfg, [1, 3], scale)
    b = R.sample_greedy(p, cfg, [1, 3], scale, literal_prefix=True)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert abs(a[2] - b[2]) < 1e-9
    tokens, traj, _ = a
    np.testing.assert_array_equal(traj[:, :, 0], tokens)
    for q in range(16):
        for s in range(k):
            assert (traj[:, q, s] == -1).all() == (q - s < 0)


def test_sampling_cfg_uses_null_rows():
    """With scale s the guided logits are l_u + s (l_c - l_u): check step 0 by hand."""
    cfg = R.Config(**SHAPE, window=2, plugin_depth=1, residual=True)
    p = R.init_params_fixture(cfg, np.random.default_rng(70), np.random.default_rng(71))
    tokens, traj, _ = R.sample_greedy(p, cfg, [2], 3.0)
    jp = R.to_jax(p)
    empty = np.zeros((2, 0, 2), dtype=np.int64)
    l = np.asarray(R.head(jp, cfg, R.trunk(jp, cfg, np.array([2, 5]), empty)))[:, 0]
    g = l[1] + 3.0 * (l[0] - l[1])
    assert traj[0, 0, 0] == np.argmax(g[0]) and traj[0, 1, 1] == np.argmax(g[1])


# ---------------------------------------------------------------------------- the fixture files

def fixture_files():
    return sorted(glob.glob(os.path.join(FIXTURES, "*.safetensors")))


def test_fixture_set_present():
    names = {os.path.basename(f)[:-len(".safetensors")] for f in fixture_files()}
    assert {"base", "k1_d1_res", "k2_d1_res_cfg1", "k2_d2_nores", "k4_d2_res",
            "k4_d1_nores_weighted"} <= names


@pytest.mark.parametrize("path", fixture_files(), ids=lambda p: os.path.basename(p))
def test_fixture_consistent(path):
    """Recompute from the stored float32 weights and inputs; compare with the stored outputs."""
    t, meta = safetensors_io.read(path)
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
    assert n % 8 == 0
    c = json.loads(meta["tensorar.config"])
    fx = json.loads(meta["fixture"])
    assert fx["format_version"] == 1
    cfg = R.Config(**c)
    table = R.parameter_table(cfg)
    for name, shape, _, _ in table:
        assert t[name].dtype == np.float32 and t[name].shape == shape, name
        assert t[f"grad.{name}"].shape == shape, name
    params = {name: t[name].astype(np.float64) for name, *_ in table}
    k, T = cfg.window, cfg.seq_len
    B = fx["batch"]
    assert t["input.tokens"].shape == (B, T) and t["input.tokens"].dtype == np.int32
    assert t["input.labels"].shape == (B,) and cfg.num_classes in t["input.labels"]
    assert t["input.tensors"].shape == (B, T - 1, k)
    assert t["output.logits"].shape == (B, T, k, cfg.vocab_size)
    assert t["output.hidden"].shape == (B, T, cfg.dim)
    tokens = t["input.tokens"].astype(np.int64)
    tensors = t["input.tensors"].astype(np.int64)
    np.testing.assert_array_equal(tensors[..., 0], tokens[:, :-1])
    clean = R.clean_tensors(tokens, k)
    np.testing.assert_array_equal(tensors == -1, clean == -1)
    if k > 1:
        assert (tensors != clean).any()
    loss, sl, logits, h, grads = R.loss_and_grad(params, cfg, tokens, t["input.labels"].astype(np.int64),
                                                 tensors, t["input.slot_weights"].astype(np.float64))
    np.testing.assert_allclose(logits, t["output.logits"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(h, t["output.hidden"], rtol=1e-6, atol=1e-6)
    assert abs(loss - float(t["output.loss"][0])) < 1e-6
    np.testing.assert_allclose(sl, t["output.slot_losses"], rtol=1e-6)
    for name, *_ in table:
        np.testing.assert_allclose(grads[name], t[f"grad.{name}"], rtol=1e-6, atol=1e-9)
    S = fx["adamw"]["steps"]
    assert t["adamw.losses"].shape == (S,) and t["adamw.grad_norms"].shape == (S,)
    assert abs(t["adamw.losses"][0] - loss) < 1e-6
    assert np.all(np.diff(t["adamw.losses"]) < 0)
    for name in fx["adamw"]["final_params"]:
        assert t[f"adamw.final.{name}"].shape == t[name].shape
    Bs = fx["sample"]["batch"]
    assert t["sample.tokens"].shape == (Bs, T)
    assert t["sample.trajectories"].shape == (Bs, T, k)
    np.testing.assert_array_equal(t["sample.trajectories"][:, :, 0], t["sample.tokens"])
    # sampling is cheap: recompute it too
    s_tokens, s_traj, margin = R.sample_greedy(params, cfg, t["sample.labels"].astype(np.int64),
                                               fx["sample"]["cfg_scale"])
    np.testing.assert_array_equal(s_tokens, t["sample.tokens"])
    np.testing.assert_array_equal(s_traj, t["sample.trajectories"])
