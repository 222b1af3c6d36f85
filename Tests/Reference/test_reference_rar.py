"""Self-checks of the RAR reference (SPEC section 9) and of the fixtures it wrote.

    python3 -m pytest -q Tests/Reference/test_reference_rar.py
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
import make_fixtures_rar as MFR  # noqa: E402
import reference as R  # noqa: E402
import reference_rar as A  # noqa: E402
import safetensors_io  # noqa: E402

FIXTURES = os.path.normpath(MFR.OUT_DIR)
SHAPE = MFR.SHAPE
T = 16


def config(k=1, d=0, residual=True):
    return A.RARConfig(**SHAPE, window=k, plugin_depth=d, residual=residual)


def weights(cfg, seed=0):
    return A.init_params_fixture(cfg, np.random.default_rng(seed), np.random.default_rng(seed + 1))


def batch(k, seed=0, noise=0.5):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 32, size=(3, T))
    tensors = R.replace_noise(R.clean_tensors(tokens, k), 32, noise, rng)
    return tokens, np.array([1, 5, 3]), tensors


def logits_of(params, cfg, labels, tensors, orders=None):
    f = jax.jit(lambda p: A.forward(p, cfg, labels, tensors, orders))
    return [np.asarray(a) for a in f(R.to_jax(params))]


# ---------------------------------------------------------------------------- shapes and rules

def test_preset_parameter_counts():
    want = {"B": 260_923_648, "L": 461_668_352, "XL": 955_425_024, "XXL": 1_498_520_704}
    for name, count in want.items():
        assert A.parameter_count(A.preset(name)) == count, name


def test_table_shapes_as_spec():
    cfg = config(4, 1)
    t = {n: s for n, s, *_ in A.parameter_table(cfg)}
    assert t["cls_token"] == (1, 1, 32) and t["embeddings.weight"] == (32 + 5 + 2, 32)
    assert t["pos_embed"] == t["target_aware_pos_embed"] == (1, T + 1024, 32)
    assert t["timesteps_embeddings"] == (1, T + 100, 32)
    assert t["blocks.1.attn.q_norm.weight"] == (8,) and t["blocks.0.adaLN_modulation.1.weight"] == (192, 32)
    assert t["adaln_before_head.adaLN_modulation.1.bias"] == (64,) and t["lm_head.weight"] == (32, 32)
    assert t["tensorar.encoder.norm.bias"] == (32,) and t["tensorar.out_pos"] == (4, 32)
    assert "tensorar.encoder.proj.bias" not in t
    names = [n for n, *_ in A.parameter_table(cfg)]
    assert len(names) == len(set(names))


def test_rar_decay_rule():
    flags = A.decay_flags(config(4, 1))
    for name in ["cls_token", "blocks.0.attn.qkv.weight", "blocks.1.adaLN_modulation.1.weight",
                 "blocks.0.mlp.fc1.weight", "lm_head.weight", "tensorar.in_pos", "tensorar.encoder.proj.weight",
                 "tensorar.encoder.layers.0.adaLN_modulation.1.weight"]:
        assert flags[name], name
    for name in ["embeddings.weight", "pos_embed", "target_aware_pos_embed", "timesteps_embeddings",
                 "adaln_before_head.adaLN_modulation.1.weight", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias",
                 "lm_head.bias", "tensorar.in_query", "tensorar.encoder.norm.weight"]:
        assert not flags[name], name


def test_guidance_schedule():
    assert A.guidance_weight(0, 256, 16.0, 2.75) == 1.0
    assert all(A.guidance_weight(s, 256, 16.0, 0.0) == 16.0 for s in (0, 1, 100, 255))
    w = [A.guidance_weight(s, 256, 16.0, 2.75) for s in range(256)]
    assert np.all(np.diff(w) > 0) and w[-1] < 16.0
    # s / T, not s / (T - 1): at s = T/2 the cosine term is cos(pi 0.5^p)
    assert abs(A.guidance_weight(128, 256, 3.0, 1.0) - 2.0) < 1e-15


def test_slot_rows_as_spec():
    orders = np.array([np.arange(T), np.random.default_rng(3).permutation(T)])
    p_rows, a_rows = A.slot_rows(orders, T + 2, T)
    assert (p_rows[0, 1:T + 2] == np.arange(1, T + 2)).all() and p_rows[0, 0] == 0
    assert (a_rows[0, 1:T + 1] == np.arange(2, T + 2)).all() and a_rows[0, 0] == -1 and a_rows[0, T + 1] == -1
    pi = orders[1]
    assert p_rows[1, 1] == 1 and a_rows[1, 1] == 2 + pi[0]
    for i in range(T):
        assert p_rows[1, 2 + i] == 2 + pi[i]
        assert a_rows[1, 2 + i] == (2 + pi[i + 1] if i + 1 < T else -1)


# ---------------------------------------------------------------------------- model identities

def test_identity_order_is_raster_and_a_random_order_is_not():
    cfg = config()
    p = weights(cfg, 10)
    tokens, labels, _ = batch(1, seed=11)
    ident = A.identity_orders(3, T)
    a = logits_of(p, cfg, labels, A.base_inputs(tokens), None)
    b = logits_of(p, cfg, labels, A.base_inputs(tokens, ident), ident)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    perm = np.stack([np.random.default_rng(12 + b).permutation(T) for b in range(3)])
    c = logits_of(p, cfg, labels, A.base_inputs(tokens, perm), perm)
    assert np.abs(c[0] - a[0]).max() > 1e-2
    # Slot 1 sees only cls and the class, plus A[2 + pi(0)]: with pi(0) = 0 it is raster's slot 1.
    perm[0] = np.concatenate([[0], 1 + np.random.default_rng(16).permutation(T - 1)])
    c = logits_of(p, cfg, labels, A.base_inputs(tokens, perm), perm)
    np.testing.assert_allclose(c[0][0, 0], a[0][0, 0], rtol=0, atol=1e-12)
    assert np.abs(c[0][1:, 0] - a[0][1:, 0]).max() > 1e-3


def numpy_base_logits(p, cfg, label, tokens, order):
    """SPEC 9's forward for one sample written again as plain numpy loops over the T + 2 slots
    (a second reading of the same text, to catch slips in the vectorised JAX code)."""
    V, D, NH, hd, eps = cfg.vocab_size, cfg.dim, cfg.n_head, cfg.head_dim, cfg.norm_eps
    E, P, S = p["embeddings.weight"], p["pos_embed"][0], p["timesteps_embeddings"][0]
    Aw = p["target_aware_pos_embed"][0]
    y = V + 1 + label

    def ln(v, w=None, b=None):
        z = (v - v.mean()) / math.sqrt(((v - v.mean()) ** 2).mean() + eps)
        return z if w is None else z * w + b

    def lin(name, v):
        return p[name + ".weight"] @ v + p[name + ".bias"]

    def silu(v):
        return v / (1 + np.exp(-v))

    slots = [p["cls_token"][0, 0] + P[0], E[y] + P[1] + Aw[2 + order[0]]]
    for i in range(T):
        slots.append(E[tokens[order[i]]] + P[2 + order[i]] + (Aw[2 + order[i + 1]] if i + 1 < T else 0))
    x = np.array(slots)
    cond = [E[y] + S[q] for q in range(T + 2)]
    gelu = np.vectorize(lambda a: 0.5 * a * (1 + math.erf(a / math.sqrt(2))))
    for l in range(cfg.n_layer):
        b = f"blocks.{l}"
        mods = [np.split(lin(b + ".adaLN_modulation.1", silu(c)), 6) for c in cond]
        n = np.array([ln(x[q], p[b + ".norm1.weight"], p[b + ".norm1.bias"]) * (1 + m[1]) + m[0]
                      for q, m in enumerate(mods)])
        qkv = np.array([lin(b + ".attn.qkv", v) for v in n])
        out = np.zeros_like(x)
        for h in range(NH):
            cols = slice(h * hd, (h + 1) * hd)
            qs = [ln(r[0:D][cols], p[b + ".attn.q_norm.weight"], p[b + ".attn.q_norm.bias"]) for r in qkv]
            ks = [ln(r[D:2 * D][cols], p[b + ".attn.k_norm.weight"], p[b + ".attn.k_norm.bias"]) for r in qkv]
            vs = [r[2 * D:][cols] for r in qkv]
            for q in range(T + 2):
                sc = np.array([qs[q] @ ks[j] / math.sqrt(hd) for j in range(q + 1)])
                w = np.exp(sc - sc.max())
                out[q, cols] = sum(w[j] / w.sum() * vs[j] for j in range(q + 1))
        x = x + np.array([m[2] * lin(b + ".attn.proj", o) for m, o in zip(mods, out)])
        n = [ln(x[q], p[b + ".norm2.weight"], p[b + ".norm2.bias"]) * (1 + m[4]) + m[3] for q, m in enumerate(mods)]
        x = x + np.array([m[5] * lin(b + ".mlp.fc2", gelu(lin(b + ".mlp.fc1", v))) for m, v in zip(mods, n)])
    logits = []
    for q in range(1, T + 1):
        sc, sh = np.split(lin("adaln_before_head.adaLN_modulation.1", silu(cond[q])), 2)
        logits.append(lin("lm_head", ln(x[q]) * (1 + sc) + sh))
    return np.array(logits)


def test_base_equals_a_plain_numpy_loop():
    cfg = config()
    p = weights(cfg, 17)
    tokens, labels, _ = batch(1, seed=18)
    perm = np.stack([np.random.default_rng(19 + b).permutation(T) for b in range(3)])
    got = logits_of(p, cfg, labels, A.base_inputs(tokens, perm), perm)[0][:, :, 0]
    for b in range(3):
        want = numpy_base_logits(p, cfg, labels[b], tokens[b], perm[b])
        np.testing.assert_allclose(got[b], want, rtol=1e-10, atol=1e-10)


def test_literal_t_plus_2_slots_change_nothing():
    """SPEC's T + 2 slots (slot T+1 fed x_{pi(T-1)}) give the same outputs at slots 1..T."""
    cfg = config()
    p = weights(cfg, 13)
    tokens, labels, _ = batch(1, seed=14)
    perm = np.stack([np.random.default_rng(15 + b).permutation(T) for b in range(3)])
    for orders in (None, perm):
        short = logits_of(p, cfg, labels, A.base_inputs(tokens, orders), orders)
        full_in = A.targets_in_order(tokens, orders)[:, :, None]          # all T tokens: T + 2 slots
        long = logits_of(p, cfg, labels, full_in, orders)
        assert long[0].shape[1] == T + 1
        np.testing.assert_allclose(long[0][:, :T], short[0], rtol=0, atol=1e-12)
        np.testing.assert_allclose(long[1][:, :T], short[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("k,d", [(1, 1), (4, 2)])
def test_fresh_plugin_is_the_base(k, d):
    """SPEC 3 and 9: a fresh plug-in (SPEC's init: zero proj, zero adaLN) on a trained base gives
    the base's logits at slot 0; with k = 1 the whole model is the base."""
    cfg, base = config(k, d), config()
    p = weights(cfg, 20)
    fresh = A.init_params_spec(cfg, np.random.default_rng(21))
    for n in p:
        if n.startswith("tensorar."):
            p[n] = fresh[n]
    assert p["tensorar.in_query"].any()       # SPEC's init: only proj and the adaLN layers are zero
    pb = {n: v for n, v in p.items() if not n.startswith("tensorar.")}
    tokens, labels, tensors = batch(k, seed=22)
    a = logits_of(p, cfg, labels, tensors)
    b = logits_of(pb, base, labels, tensors[..., :1])
    np.testing.assert_allclose(a[0][:, :, 0], b[0][:, :, 0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(a[1], b[1], rtol=0, atol=1e-12)
    if k == 1:
        la = A.loss_and_grad(p, cfg, tokens, labels, tensors, [1.0])
        lb = A.loss_and_grad(pb, base, tokens, labels, tensors[..., :1], [1.0])
        assert abs(la[0] - lb[0]) < 1e-12
        for n in pb:
            np.testing.assert_allclose(la[4][n], lb[4][n], rtol=0, atol=1e-12)


def test_nonzero_plugin_changes_the_output_and_slots_read_their_target_condition():
    cfg = config(4, 1)
    p = weights(cfg, 30)
    tokens, labels, tensors = batch(4, seed=31)
    base = logits_of({n: v for n, v in p.items() if not n.startswith("tensorar.")}, config(), labels,
                     tensors[..., :1])
    a = logits_of(p, cfg, labels, tensors)
    assert np.abs(a[0][:, :, 0] - base[0][:, :, 0]).max() > 1e-2
    # Changing timestep row S[q + j] changes slot j of position p = q - 1 and nothing at positions < q - j - 1.
    q = 6
    p2 = {n: v.copy() for n, v in p.items()}
    p2["timesteps_embeddings"][0, q + 3] += 0.5
    b = logits_of(p2, cfg, labels, tensors)
    assert np.abs(b[0][:, q - 1, 3] - a[0][:, q - 1, 3]).max() > 1e-3
    np.testing.assert_array_equal(b[0][:, :q - 1, :3], a[0][:, :q - 1, :3])


def test_none_label_reads_row_v_plus_1_plus_c():
    cfg = config()
    p = weights(cfg, 40)
    tokens, _, _ = batch(1, seed=41)
    a = logits_of(p, cfg, np.array([5, 5, 5]), A.base_inputs(tokens))
    p2 = {n: v.copy() for n, v in p.items()}
    p2["embeddings.weight"][32] += 1.0        # the mask token V: unused
    p2["embeddings.weight"][32 + 1 + 4] += 1.0  # class 4: unused by the none rows
    b = logits_of(p2, cfg, np.array([5, 5, 5]), A.base_inputs(tokens))
    np.testing.assert_array_equal(a[0], b[0])
    p2["embeddings.weight"][32 + 1 + 5] += 1.0
    c = logits_of(p2, cfg, np.array([5, 5, 5]), A.base_inputs(tokens))
    assert np.abs(c[0] - a[0]).max() > 1e-3


@pytest.mark.parametrize("k,d,res,random_order", [(1, 0, True, True), (4, 2, False, False)])
def test_gradient_finite_difference(k, d, res, random_order):
    cfg = config(k, d, res)
    p = weights(cfg, 50)
    tokens, labels, tensors = batch(k, seed=51)
    orders = np.stack([np.random.default_rng(52 + b).permutation(T) for b in range(3)]) if random_order else None
    if not cfg.has_plugin:
        tensors = A.base_inputs(tokens, orders)
    w = np.array([1.0, 0.5, 0.25, 0.125][:k])
    _, _, _, _, g = A.loss_and_grad(p, cfg, tokens, labels, tensors, w, orders)
    f = jax.jit(lambda q: A.loss_fn(q, cfg, tokens, labels, tensors, w, orders)[0])
    probes = [("cls_token", (0, 0, 3)), ("embeddings.weight", (int(tokens[0, 2]), 4)),
              ("embeddings.weight", (32 + 1 + 5, 1)), ("pos_embed", (0, 5, 2)), ("target_aware_pos_embed", (0, 9, 7)),
              ("timesteps_embeddings", (0, 4, 0)), ("blocks.0.attn.qkv.weight", (70, 3)),
              ("blocks.1.attn.qkv.bias", (40,)), ("blocks.0.attn.q_norm.weight", (2,)),
              ("blocks.1.attn.k_norm.weight", (5,)), ("blocks.1.mlp.fc2.weight", (3, 50)),
              ("blocks.0.adaLN_modulation.1.weight", (100, 9)), ("blocks.1.norm2.bias", (7,)),
              ("adaln_before_head.adaLN_modulation.1.weight", (5, 5)),
              ("adaln_before_head.adaLN_modulation.1.bias", (40,)),
              ("lm_head.weight", (int(tokens[1, 3]), 2)), ("lm_head.bias", (int(tokens[2, 5]),))]
    if cfg.has_plugin:
        probes += [("tensorar.in_pad", (4,)), ("tensorar.in_pos", (2, 9)), ("tensorar.in_query", (1,)),
                   ("tensorar.encoder.layers.1.adaLN_modulation.1.weight", (30, 2)),
                   ("tensorar.encoder.norm.bias", (6,)), ("tensorar.encoder.proj.weight", (6, 6)),
                   ("tensorar.out_pos", (3, 1)), ("tensorar.decoder.layers.0.attn.qkv.weight", (17, 8)),
                   ("tensorar.decoder.layers.1.mlp.fc1.bias", (11,)), ("tensorar.decoder.norm.weight", (3,)),
                   ("tensorar.decoder.proj.weight", (0, 31))]
    h = 1e-6
    for name, idx in probes:
        up = {n: v.copy() for n, v in p.items()}
        dn = {n: v.copy() for n, v in p.items()}
        up[name][idx] += h
        dn[name][idx] -= h
        num = (float(f(R.to_jax(up))) - float(f(R.to_jax(dn)))) / (2 * h)
        assert abs(num - g[name][idx]) < 1e-7 + 1e-5 * abs(num), (name, idx, num, g[name][idx])
        assert abs(g[name][idx]) > 1e-7, (name, idx)      # the probe is not trivially zero
    # k_norm's bias adds q.b to every score of a row: softmax ignores it, its gradient is 0 (rounding)
    assert np.abs(g["blocks.1.attn.k_norm.bias"]).max() < 1e-12
    # rows never read have exactly zero gradient (pos rows >= T + 2, timestep rows >= T + k)
    assert not g["pos_embed"][0, T + 2:].any() and not g["timesteps_embeddings"][0, T + k:].any()
    assert not g["embeddings.weight"][32].any()


def test_adamw_rar_rule_first_step_by_hand():
    cfg = config(2, 1)
    p = weights(cfg, 60)
    tokens, labels, tensors = batch(2, seed=61)
    hp = R.AdamWConfig(lr_plugin=1e-2, lr_base=1e-3, weight_decay=1.0, steps=1)
    _, _, _, _, g = A.loss_and_grad(p, cfg, tokens, labels, tensors, np.ones(2))
    norm = math.sqrt(sum(float((x ** 2).sum()) for x in g.values()))
    scale = min(1.0, 1.0 / (norm + 1e-6))
    _, _, final = A.adamw_run(p, cfg, tokens, labels, tensors, np.ones(2), hp)
    for name, decays in [("cls_token", True), ("embeddings.weight", False), ("timesteps_embeddings", False),
                         ("adaln_before_head.adaLN_modulation.1.weight", False), ("lm_head.weight", True),
                         ("tensorar.in_pos", True), ("tensorar.encoder.norm.weight", False)]:
        lr = 1e-2 if name.startswith("tensorar.") else 1e-3
        gs = g[name] * scale
        want = p[name] * (1 - lr * (1.0 if decays else 0.0)) - lr * gs / (np.abs(gs) + 1e-8)
        np.testing.assert_allclose(final[name], want, rtol=0, atol=1e-13, err_msg=name)


# ---------------------------------------------------------------------------- sampling

def produced_from(traj):
    """The tensors t_p [Bs, T, k] from trajectories: t_p[j] = traj[p + j, j]."""
    Bs, TT, k = traj.shape
    out = np.full((Bs, TT, k), -1, dtype=np.int64)
    for p in range(TT):
        for j in range(k):
            if p + j < TT:
                out[:, p, j] = traj[:, p + j, j]
    return out


def check_greedy_chain(params, cfg, labels, tokens, traj, g, power):
    """The sampled chain is the greedy one: feeding the produced tensors back (teacher forcing),
    every t_p[j] is the argmax of step p's guided logits (w_p for all slots; no none rows at
    g <= 1). Step by step this is the sampler's own computation, so it pins the chain down."""
    k = cfg.window
    produced = produced_from(traj)
    np.testing.assert_array_equal(produced[:, :, 0], tokens)
    tensors = produced[:, :T - 1]
    Bs = len(labels)
    both = A._logits_fn(cfg)(R.to_jax(params), np.concatenate([labels, np.full(Bs, cfg.none_label)]),
                             np.concatenate([tensors, tensors]))
    lc, lu = np.asarray(both)[:Bs], np.asarray(both)[Bs:]
    for pos in range(T):
        w = A.guidance_weight(pos, T, g, power)
        l = lu[:, pos] + (lc[:, pos] - lu[:, pos]) * w if g > 1 else lc[:, pos]
        for j in range(k):
            if pos + j < T:
                np.testing.assert_array_equal(np.argmax(l[:, j], axis=-1), produced[:, pos, j], err_msg=f"{pos} {j}")


@pytest.mark.parametrize("k,d,g,power", [(1, 0, 3.0, 2.75), (4, 2, 2.0, 0.0), (4, 1, 1.0, 0.0)])
def test_sampler_equals_argmax_of_teacher_forced_forward(k, d, g, power):
    cfg = config(k, d, residual=(d != 1))
    p = weights(cfg, 70)
    labels = np.array([1, 3])
    tokens, traj, margin = A.sample_greedy(p, cfg, labels, g, power)
    assert margin > 0
    for q in range(T):
        for s in range(k):
            assert (traj[:, q, s] == -1).all() == (q - s < 0)
    check_greedy_chain(p, cfg, labels, tokens, traj, g, power)


def test_power_cosine_changes_the_sample():
    cfg = config()
    p = weights(cfg, 80)
    a = A.sample_greedy(p, cfg, [1, 3], 6.0, 0.0)[0]
    b = A.sample_greedy(p, cfg, [1, 3], 6.0, 2.75)[0]
    c = A.sample_greedy(p, cfg, [1, 3], 1.0, 0.0)[0]
    assert (a != b).any()
    np.testing.assert_array_equal(b[:, 0], c[:, 0])       # w_0 = 1: step 0 is unguided


# ---------------------------------------------------------------------------- the fixture files

def fixture_files():
    return sorted(glob.glob(os.path.join(FIXTURES, "*.safetensors")))


def test_fixture_set_present():
    names = {os.path.basename(f)[:-len(".safetensors")] for f in fixture_files()}
    assert names == {c[0] for c in MFR.CASES}


@pytest.mark.parametrize("path", fixture_files(), ids=lambda p: os.path.basename(p))
def test_fixture_consistent(path):
    """Recompute from the stored float32 weights and inputs; compare with the stored outputs."""
    t, meta = safetensors_io.read(path)
    c = json.loads(meta["tensorar.config"])
    fx = json.loads(meta["fixture"])
    assert c.pop("base") == "rar" and fx["fixture_version"] == MFR.RAR_FIXTURE_VERSION
    cfg = A.RARConfig(**c)
    table = A.parameter_table(cfg)
    params = {}
    for name, shape, *_ in table:
        assert t[name].dtype == np.float32 and t[name].shape == shape and t[f"grad.{name}"].shape == shape, name
        params[name] = t[name].astype(np.float64)
    tokens, labels = t["input.tokens"].astype(np.int64), t["input.labels"].astype(np.int64)
    tensors = t["input.tensors"].astype(np.int64)
    assert cfg.none_label in labels
    orders = None
    if not cfg.has_plugin:
        orders = t["input.orders"].astype(np.int64)
        assert all(sorted(o) == list(range(T)) for o in orders)
        np.testing.assert_array_equal(tensors, A.base_inputs(tokens, orders))
        assert (orders != A.identity_orders(3, T)).any() == ("order" in fx["case"])
    else:
        np.testing.assert_array_equal(tensors[..., 0], tokens[:, :-1])
    sw = t["input.slot_weights"].astype(np.float64)
    loss, sl, logits, h, grads = A.loss_and_grad(params, cfg, tokens, labels, tensors, sw, orders)
    np.testing.assert_allclose(logits, t["output.logits"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(h, t["output.hidden"], rtol=1e-6, atol=1e-6)
    assert abs(loss - float(t["output.loss"][0])) < 1e-6
    np.testing.assert_allclose(sl, t["output.slot_losses"], rtol=1e-6)
    for name, *_ in table:
        np.testing.assert_allclose(grads[name], t[f"grad.{name}"], rtol=1e-6, atol=1e-9, err_msg=name)
    assert fx["adamw"]["decayed_params"] == [n for n, *_ in table if A.decay_flags(cfg)[n]]
    assert abs(t["adamw.losses"][0] - loss) < 1e-6 and np.all(np.diff(t["adamw.losses"]) < 0)
    for prefix, g, power in MFR.SAMPLES:
        s = fx["samples"][prefix]
        assert (s["cfg_scale"], s["cfg_power"]) == (g, power)
        assert s["min_logit_margin"] >= MFR.MF.MIN_SAMPLE_MARGIN
        s_tokens, s_traj = t[f"{prefix}.tokens"].astype(np.int64), t[f"{prefix}.trajectories"].astype(np.int64)
        assert s_tokens.shape == (s["batch"], T) and s_traj.shape == (s["batch"], T, cfg.window)
        assert s_tokens.min() >= 0 and s_tokens.max() < cfg.vocab_size
        check_greedy_chain(params, cfg, t[f"{prefix}.labels"].astype(np.int64), s_tokens, s_traj, g, power)


def test_a_fixture_file_equals_a_fresh_regeneration(tmp_path):
    """Byte for byte, including the AdamW steps and the three sample sets with their label choice
    (one case, for time: the others are recomputed above, all but their AdamW finals)."""
    MFR.main(["--out", str(tmp_path), "--only", "rar_base_order"])
    with open(tmp_path / "rar_base_order.safetensors", "rb") as a, \
            open(os.path.join(FIXTURES, "rar_base_order.safetensors"), "rb") as b:
        assert a.read() == b.read()
