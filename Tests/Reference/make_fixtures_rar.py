"""Generates Tests/ModelTests/Fixtures/RAR/rar_*.safetensors from the float64 RAR reference
(reference_rar.py, SPEC section 9).

    python3 Tests/Reference/make_fixtures_rar.py [--out Tests/ModelTests/Fixtures/RAR] [--only NAME ...]

Deterministic: the same command writes the same bytes (fixed seeds, numpy's PCG64).
See Tests/Reference/README.md "RAR fixtures" for what each tensor means.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import make_fixtures as MF  # noqa: E402  (f32, i32, the shared label candidates and margin)
import reference as R  # noqa: E402
import reference_rar as A  # noqa: E402
import safetensors_io  # noqa: E402

RAR_FIXTURE_VERSION = 1
OUT_DIR = os.path.join(HERE, "..", "ModelTests", "Fixtures", "RAR")

SHAPE = dict(vocab_size=32, num_classes=5, grid_size=4, dim=32, n_layer=2, n_head=4, ffn_hidden=64,
             norm_eps=1e-6, rope_base=10000.0)
BATCH_LABELS = [1, 5, 3]          # 5 == C: the none class appears in the training batch
NOISE_PROB = 0.5

# (name, k, d, residual, slot_weights, random order)
CASES = [
    ("rar_base_raster", 1, 0, True, [1.0], False),
    ("rar_base_order", 1, 0, True, [1.0], True),
    ("rar_k1_d1_res", 1, 1, True, [1.0], False),
    ("rar_k1_d1_nores", 1, 1, False, [1.0], False),
    ("rar_k4_d2_res", 4, 2, True, [1.0, 1.0, 1.0, 1.0], False),
    ("rar_k4_d1_nores_weighted", 4, 1, False, [1.0, 0.5, 0.25, 0.125], False),
]
# The three greedy sample sets in every file: (tensor prefix, g, power p).
SAMPLES = [("sample", 2.0, 0.0), ("sample_pc", 3.0, 2.75), ("sample_g1", 1.0, 0.0)]

# A weight decay far above RAR's 0.03, so that which parameters decay shows above the
# comparison tolerance (about 5e-3 relative over 5 base steps); betas as RAR's recipe.
ADAMW = R.AdamWConfig(lr_plugin=1e-2, lr_base=1e-3, weight_decay=1.0, beta1=0.9, beta2=0.96,
                      eps=1e-8, clip=1.0, steps=5)
FINAL_BASE = ["cls_token", "embeddings.weight", "timesteps_embeddings", "blocks.0.attn.qkv.weight",
              "blocks.1.attn.k_norm.weight", "blocks.0.adaLN_modulation.1.weight", "blocks.1.mlp.fc2.bias",
              "adaln_before_head.adaLN_modulation.1.weight", "lm_head.weight", "lm_head.bias"]
FINAL_PLUGIN = ["tensorar.in_query", "tensorar.in_pos", "tensorar.encoder.norm.bias", "tensorar.encoder.proj.weight",
                "tensorar.out_pos", "tensorar.decoder.layers.0.attn.q_norm.weight",
                "tensorar.decoder.layers.0.adaLN_modulation.1.weight", "tensorar.decoder.proj.weight"]


def pick_sample(params, cfg, name, g, power, log):
    """The first candidate label set whose greedy decisions have no near-tie."""
    for cand in MF.SAMPLE_LABEL_CANDIDATES:
        tokens, traj, margin = A.sample_greedy(params, cfg, cand, g, power)
        if margin >= MF.MIN_SAMPLE_MARGIN:
            return cand, tokens, traj, margin
        log(f"  {name}: g {g} p {power}: labels {cand} have a near-tie (margin {margin:.2e}); next")
    raise RuntimeError(f"{name}: no sample label set without near-ties at g {g}, p {power}")


def case_inputs(index, cfg, random_order):
    """(params, tokens, labels, orders or None, tensors): float32-rounded weights, shared base
    weights/tokens/labels/order (seeds 7000..7002), per-case plug-in weights and noise."""
    params = A.init_params_fixture(cfg, np.random.default_rng(7000), np.random.default_rng(8000 + index))
    # Round to float32 first: every stored output is the float64 result for the stored weights.
    params = {n: v.astype(np.float32).astype(np.float64) for n, v in params.items()}
    T, V = cfg.seq_len, cfg.vocab_size
    tokens = np.random.default_rng(7001).integers(0, V, size=(len(BATCH_LABELS), T))
    labels = np.array(BATCH_LABELS)
    orders = None
    if random_order:
        rng = np.random.default_rng(7002)
        orders = np.stack([rng.permutation(T) for _ in BATCH_LABELS])
    if cfg.has_plugin:
        tensors = R.replace_noise(R.clean_tensors(tokens, cfg.window), V, NOISE_PROB,
                                  np.random.default_rng(9000 + index))
    else:
        tensors = A.base_inputs(tokens, orders)
    return params, tokens, labels, orders, tensors


def build_case(index, name, k, d, residual, slot_weights, random_order, log=print):
    cfg = A.RARConfig(**SHAPE, window=k, plugin_depth=d, residual=residual)
    T = cfg.seq_len
    params, tokens, labels, orders, tensors = case_inputs(index, cfg, random_order)
    sw = np.array(slot_weights, dtype=np.float64)
    loss, slot_losses, logits, hidden, grads = A.loss_and_grad(params, cfg, tokens, labels, tensors, sw, orders)
    losses, norms, final = A.adamw_run(params, cfg, tokens, labels, tensors, sw, ADAMW, orders)
    assert abs(losses[0] - loss) < 1e-12
    samples = {prefix: pick_sample(params, cfg, name, g, power, log) for prefix, g, power in SAMPLES}

    final_names = FINAL_BASE + (FINAL_PLUGIN if cfg.has_plugin else [])
    nz = np.concatenate([np.abs(grads[n]).ravel() for n in final_names])
    decays = A.decay_flags(cfg)
    fixture_meta = {
        "format_version": RAR_FIXTURE_VERSION, "fixture_version": RAR_FIXTURE_VERSION, "case": name,
        "batch": int(len(labels)), "slot_weights": [float(x) for x in sw],
        "order": "random: input.orders[b] = pi, one permutation per sample" if random_order else "raster",
        "input_noise": ({"type": "replace", "prob": NOISE_PROB, "entries": "j >= 1 and not pad; entry 0 clean"}
                        if cfg.has_plugin else {"type": "none"}),
        "adamw": {
            "lr_plugin": ADAMW.lr_plugin, "lr_base": ADAMW.lr_base, "weight_decay": ADAMW.weight_decay,
            "beta1": ADAMW.beta1, "beta2": ADAMW.beta2, "eps": ADAMW.eps, "clip": ADAMW.clip,
            "steps": ADAMW.steps,
            "schedule": "update s = 0..steps-1 (bias-correction step t = s+1): plugin lr = lr_plugin * "
                        "(1 - s/steps); base lr = lr_base constant; p *= 1 - lr*wd on the parameters in "
                        "decayed_params (base group: decay_rule rar; plugin group: >= 2 dims), then the Adam "
                        "step; global clip scale min(1, clip/(norm+1e-6)); the same batch every step",
            "decay_rule": {"base": "rar", "plugin": "project"},
            "decayed_params": [n for n, _, _, _, _ in A.parameter_table(cfg) if decays[n]],
            "final_params": final_names,
            "min_abs_nonzero_grad_of_final_params": float(nz[nz > 0].min()),
        },
        "samples": {prefix: {"cfg_scale": g, "cfg_schedule": "constant" if power == 0 else "power-cosine",
                             "cfg_power": power, "top_k": 1, "temperature": 1.0,
                             "batch": len(samples[prefix][0]), "min_logit_margin": samples[prefix][3]}
                    for prefix, g, power in SAMPLES},
        "labels": "class indices in [0, C]; C = the none class; embedding row V + 1 + label",
        "init_scales": A.FIXTURE_SCALES,
        "seeds": {"base": 7000, "tokens": 7001, "orders": 7002, "plugin": 8000 + index, "noise": 9000 + index},
        "dtype": "reference computed in float64, stored as float32",
    }
    names = [n for n, _, _, _, _ in A.parameter_table(cfg)]
    out = {n: MF.f32(params[n]) for n in names}
    out.update({"input.tokens": MF.i32(tokens), "input.labels": MF.i32(labels), "input.tensors": MF.i32(tensors),
                "input.slot_weights": MF.f32(sw)})
    if not cfg.has_plugin:
        out["input.orders"] = MF.i32(A.identity_orders(len(labels), T) if orders is None else orders)
    out.update({"output.logits": MF.f32(logits), "output.hidden": MF.f32(hidden), "output.loss": MF.f32([loss]),
                "output.slot_losses": MF.f32(slot_losses)})
    out.update({f"grad.{n}": MF.f32(grads[n]) for n in names})
    out.update({"adamw.losses": MF.f32(losses), "adamw.grad_norms": MF.f32(norms)})
    out.update({f"adamw.final.{n}": MF.f32(final[n]) for n in final_names})
    for prefix, _, _ in SAMPLES:
        lab, s_tokens, s_traj, _ = samples[prefix]
        out.update({f"{prefix}.labels": MF.i32(lab), f"{prefix}.tokens": MF.i32(s_tokens),
                    f"{prefix}.trajectories": MF.i32(s_traj)})
    meta = {"tensorar.config": json.dumps(cfg.to_dict(), sort_keys=True),
            "fixture": json.dumps(fixture_meta, sort_keys=True)}
    log(f"  {name}: loss {loss:.6f} slot_losses {np.round(slot_losses, 4).tolist()} grad_norm {norms[0]:.4f} "
        f"adamw.losses {np.round(losses, 5).tolist()} margins "
        f"{[float('%.2e' % samples[p][3]) for p, _, _ in SAMPLES]}")
    return out, meta


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=OUT_DIR)
    ap.add_argument("--only", nargs="*", default=None, help="case names to (re)write")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for i, case in enumerate(CASES):
        if args.only and case[0] not in args.only:
            continue
        print(f"{case[0]}: k={case[1]} d={case[2]} residual={case[3]} random_order={case[5]}", flush=True)
        tensors, meta = build_case(i, *case)
        path = os.path.join(args.out, f"{case[0]}.safetensors")
        safetensors_io.write(path, tensors, meta)
        print(f"  wrote {os.path.normpath(path)} ({os.path.getsize(path)} bytes)", flush=True)


if __name__ == "__main__":
    main()
