"""Self-checks of the Open-MAGVIT2 reference (SPEC section 8) and of the fixtures it wrote.

    python3 -m pytest -q Tests/Reference/test_reference_omg.py
"""

from __future__ import annotations

import glob
import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import jax  # noqa: E402
import reference as R  # noqa: E402
import reference_omg as O  # noqa: E402
import safetensors_io  # noqa: E402

FIXTURES = os.path.normpath(os.path.join(HERE, "..", "ModelTests", "Fixtures", "OpenMAGVIT2"))
SHAPE = dict(num_classes=5, grid_size=4, dim=32, n_layer=2, n_head=4, factorized_n_layer=2, factorized_bits=(2, 3))


def batch(k, seed=0, noise=0.5):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 32, size=(3, 16))
    tensors = R.replace_noise(R.clean_tensors(tokens, k), 32, noise, rng)
    return tokens, np.array([1, 5, 3]), tensors


def fwd(params, cfg, labels, tensors, tokens):
    f = jax.jit(lambda p: O.forward(p, cfg, labels, tensors, tokens))
    return [np.asarray(a) for a in f(R.to_jax(params))]


def test_preset_parameter_counts():
    """SPEC section 8's table: B, L, XL with V = 2^18, C = 1000."""
    for (D, L, Lf, NH), want in [((1024, 24, 2, 16), 343_570_432), ((1280, 36, 3, 20), 804_362_240),
                                 ((1536, 48, 4, 24), 1_486_679_040)]:
        cfg = O.OMGConfig(num_classes=1000, grid_size=16, dim=D, n_layer=L, n_head=NH, factorized_n_layer=Lf)
        assert cfg.head_dim == 64
        assert O.parameter_count(cfg) == want


def test_split_uses_the_low_bits_for_pre():
    cfg = O.OMGConfig(num_classes=1, grid_size=1, dim=8, n_layer=0, n_head=2, factorized_n_layer=1)
    x = np.array([0, 63, 64, 65, 262143, 5 + 64 * 4000])
    pre, post = O.split(x, cfg)
    np.testing.assert_array_equal(pre, [0, 63, 0, 1, 63, 5])
    np.testing.assert_array_equal(post, [0, 0, 1, 1, 4095, 4000])
    np.testing.assert_array_equal(pre + 64 * post, x)


def test_k1_fresh_plugin_is_the_base():
    base = O.OMGConfig(**SHAPE)
    cfg = O.OMGConfig(**SHAPE, window=1, plugin_depth=1)
    p = O.init_params_fixture(cfg, np.random.default_rng(1), np.random.default_rng(2))
    p["tensorar.encoder.proj.weight"] *= 0
    p["tensorar.decoder.proj.weight"] *= 0
    pb = {n: v for n, v in p.items() if not n.startswith("tensorar.")}
    tokens, labels, tensors = batch(1)
    a = fwd(p, cfg, labels, tensors, tokens)
    b = fwd(pb, base, labels, tensors, tokens)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-12)


def test_post_logits_depend_on_the_pre_fed_and_pre_logits_do_not():
    """Slot 1 reads pre_emb[pre]; slot 0 is causal and cannot see it."""
    cfg = O.OMGConfig(**SHAPE)
    p = R.to_jax(O.init_params_fixture(cfg, np.random.default_rng(3), np.random.default_rng(4)))
    g = np.random.default_rng(5).normal(size=(6, 32))
    lp0, lq0 = O.factorized(p, cfg, g, np.zeros(6, dtype=np.int64))
    lp1, lq1 = O.factorized(p, cfg, g, np.full(6, 3))
    np.testing.assert_allclose(np.asarray(lp0), np.asarray(lp1), rtol=0, atol=1e-12)
    assert np.abs(np.asarray(lq0) - np.asarray(lq1)).max() > 1e-3


def test_loss_is_the_sum_of_two_means_and_uniform_is_log_v():
    cfg = O.OMGConfig(**SHAPE, window=4, plugin_depth=1)
    tokens, _, _ = batch(4)
    z = (3, 16, 4)
    loss, _, parts = O.loss_terms(np.zeros(z + (4,)), np.zeros(z + (8,)), tokens, cfg, [1.0] * 4)
    np.testing.assert_allclose(np.asarray(parts), [np.log(4), np.log(8)], rtol=1e-12)
    assert abs(float(loss) - np.log(32)) < 1e-12


def test_gradient_finite_difference():
    cfg = O.OMGConfig(**SHAPE, window=2, plugin_depth=1, residual=False)
    p = O.init_params_fixture(cfg, np.random.default_rng(6), np.random.default_rng(7))
    tokens, labels, tensors = batch(2, seed=8)
    sw = np.array([1.0, 0.5])
    _, _, _, _, _, _, g = O.loss_and_grad(p, cfg, tokens, labels, tensors, sw)
    f = jax.jit(lambda q: O.loss_fn(q, cfg, tokens, labels, tensors, sw)[0])
    rng = np.random.default_rng(9)
    for name in ["pre_emb.weight", "post_emb.weight", "factorized_blocks.1.attention.wqkv.weight", "head.1.weight",
                 "spatial_blocks.0.feed_forward.w2.weight", "tensorar.decoder.proj.weight"]:
        idx = tuple(rng.integers(0, s) for s in p[name].shape)
        h = 1e-6
        up = {n: v.copy() for n, v in p.items()}
        dn = {n: v.copy() for n, v in p.items()}
        up[name][idx] += h
        dn[name][idx] -= h
        num = (float(f(R.to_jax(up))) - float(f(R.to_jax(dn)))) / (2 * h)
        assert abs(num - g[name][idx]) < 1e-6 + 1e-5 * abs(num), name


def fixture_files():
    return sorted(glob.glob(os.path.join(FIXTURES, "*.safetensors")))


def test_fixture_set_present():
    names = {os.path.basename(f)[:-len(".safetensors")] for f in fixture_files()}
    assert names == {"omg_base", "omg_k1_d1_res", "omg_k1_d1_nores", "omg_k4_d2_res", "omg_k4_d1_nores_weighted"}


@pytest.mark.parametrize("path", fixture_files(), ids=lambda p: os.path.basename(p))
def test_fixture_consistent(path):
    """Recompute from the stored float32 weights and inputs; compare with the stored outputs."""
    t, meta = safetensors_io.read(path)
    c = json.loads(meta["tensorar.config"])
    fx = json.loads(meta["fixture"])
    assert c.pop("base") == "open-magvit2" and c.pop("vocab_size") == 32
    cfg = O.OMGConfig(**c)
    table = O.parameter_table(cfg)
    params = {name: t[name].astype(np.float64) for name, *_ in table}
    k, T = cfg.window, cfg.seq_len
    B = fx["batch"]
    assert t["output.logits"].shape == (B, T, k, 4 + 8)
    tokens = t["input.tokens"].astype(np.int64)
    labels = t["input.labels"].astype(np.int64)
    tensors = t["input.tensors"].astype(np.int64)
    np.testing.assert_array_equal(tensors[..., 0], tokens[:, :-1])
    loss, sl, parts, lp, lq, h, grads = O.loss_and_grad(params, cfg, tokens, labels, tensors,
                                                        t["input.slot_weights"].astype(np.float64))
    np.testing.assert_allclose(np.concatenate([lp, lq], axis=-1), t["output.logits"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(h, t["output.hidden"], rtol=1e-6, atol=1e-6)
    assert abs(loss - float(t["output.loss"][0])) < 1e-5
    np.testing.assert_allclose(parts, t["output.part_losses"], rtol=1e-6)
    np.testing.assert_allclose(sl, t["output.slot_losses"], rtol=1e-6)
    for name, *_ in table:
        np.testing.assert_allclose(grads[name], t[f"grad.{name}"], rtol=1e-6, atol=1e-9)
    assert np.all(np.diff(t["adamw.losses"]) < 0.2) and t["adamw.losses"][-1] < t["adamw.losses"][0]
    scales = fx["sample"]["cfg_scales"]
    assert scales[0] != scales[1]
    s_tokens, s_traj, _ = O.sample_greedy(params, cfg, t["sample.labels"].astype(np.int64), tuple(scales))
    np.testing.assert_array_equal(s_tokens, t["sample.tokens"])
    np.testing.assert_array_equal(s_traj, t["sample.trajectories"])
    assert s_tokens.min() >= 0 and s_tokens.max() < 32
