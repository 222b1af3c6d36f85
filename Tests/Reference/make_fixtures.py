"""Generates Tests/ModelTests/Fixtures/*.safetensors from the float64 reference (reference.py).

    python3 Tests/Reference/make_fixtures.py [--out Tests/ModelTests/Fixtures] [--only NAME ...]

Deterministic: the same command writes the same bytes (fixed seeds, numpy's PCG64).
See Tests/Reference/README.md for what each tensor means.
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

import reference as R  # noqa: E402
import reference_omg as O  # noqa: E402
import safetensors_io  # noqa: E402

FIXTURE_VERSION = 1

# The shared tiny shape (SPEC ffn formula: find_multiple(int(2*4*32/3), 256) = 256).
BASE_SHAPE = dict(vocab_size=32, num_classes=5, grid_size=4, dim=32, n_layer=2, n_head=4,
                  norm_eps=1e-5, rope_base=10000.0)
BATCH_LABELS = [1, 5, 3]          # 5 == C: the null class appears in the training batch
SAMPLE_LABEL_CANDIDATES = [[1, 3], [0, 2], [4, 1], [2, 0], [3, 4]]
NOISE_PROB = 0.5
MIN_SAMPLE_MARGIN = 2e-3          # greedy decisions must not be near-ties (float32 vs float64)

# (name, window k, plugin_depth d, residual, slot_weights, cfg_scale)
CASES = [
    ("base", 1, 0, True, [1.0], 2.0),
    ("k1_d1_res", 1, 1, True, [1.0], 2.0),
    ("k2_d1_res_cfg1", 2, 1, True, [1.0, 1.0], 1.0),
    ("k2_d2_nores", 2, 2, False, [1.0, 1.0], 2.0),
    ("k4_d2_res", 4, 2, True, [1.0, 1.0, 1.0, 1.0], 2.0),
    ("k4_d1_nores_weighted", 4, 1, False, [1.0, 0.5, 0.25, 0.125], 2.0),
]

ADAMW = R.AdamWConfig(lr_plugin=1e-2, lr_base=1e-3, weight_decay=0.05, beta1=0.9, beta2=0.95,
                      eps=1e-8, clip=1.0, steps=5)

FINAL_BASE = ["tok_embeddings.weight", "cls_embedding.embedding_table.weight",
              "layers.0.attention.wqkv.weight", "norm.weight", "output.weight"]
FINAL_PLUGIN = ["tensorar.in_query", "tensorar.out_pos", "tensorar.encoder.proj.weight",
                "tensorar.decoder.layers.0.feed_forward.w2.weight",
                "tensorar.decoder.norm.weight", "tensorar.decoder.proj.weight"]


def f32(a):
    return np.asarray(a, dtype=np.float32)


def i32(a):
    return np.asarray(a, dtype=np.int32)


def fixture_tensors(names, params, inputs, outputs, grads, adamw, sample):
    """A fixture file's tensors, in the file's order: the weights, `input.*`, `output.*` (in the
    order given), `grad.*`, `adamw.*`, `sample.*`."""
    tokens, labels, tensors, sw = inputs
    losses, norms, final_names, final = adamw
    sample_labels, s_tokens, s_traj = sample
    out = {n: f32(params[n]) for n in names}
    out.update({"input.tokens": i32(tokens), "input.labels": i32(labels), "input.tensors": i32(tensors),
                "input.slot_weights": f32(sw)})
    out.update({f"output.{k}": f32(v) for k, v in outputs.items()})
    out.update({f"grad.{n}": f32(grads[n]) for n in names})
    out.update({"adamw.losses": f32(losses), "adamw.grad_norms": f32(norms)})
    out.update({f"adamw.final.{n}": f32(final[n]) for n in final_names})
    out.update({"sample.labels": i32(sample_labels), "sample.tokens": i32(s_tokens),
                "sample.trajectories": i32(s_traj)})
    return out


def build_case(index, name, k, d, residual, slot_weights, cfg_scale, log=print):
    cfg = R.Config(**BASE_SHAPE, window=k, plugin_depth=d, residual=residual)
    T, V = cfg.seq_len, cfg.vocab_size
    # Base weights, tokens and labels are the same in every fixture (seeds 1000, 1001);
    # the plug-in weights and the input noise depend on the case.
    params = R.init_params_fixture(cfg, np.random.default_rng(1000),
                                   np.random.default_rng(2000 + index))
    # Round to float32 first: every stored output is then the float64 result for exactly the
    # float32 weights in the file.
    params = {n: v.astype(np.float32).astype(np.float64) for n, v in params.items()}
    tokens = np.random.default_rng(1001).integers(0, V, size=(len(BATCH_LABELS), T))
    labels = np.array(BATCH_LABELS)
    tensors = R.clean_tensors(tokens, k)
    tensors = R.replace_noise(tensors, V, NOISE_PROB, np.random.default_rng(3000 + index))
    sw = np.array(slot_weights, dtype=np.float64)

    loss, slot_losses, logits, hidden, grads = R.loss_and_grad(params, cfg, tokens, labels,
                                                              tensors, sw)
    losses, norms, final = R.adamw_run(params, cfg, tokens, labels, tensors, sw, ADAMW)
    assert abs(losses[0] - loss) < 1e-12

    sample_labels = None
    for cand in SAMPLE_LABEL_CANDIDATES:
        s_tokens, s_traj, margin = R.sample_greedy(params, cfg, cand, cfg_scale)
        if margin >= MIN_SAMPLE_MARGIN:
            sample_labels = cand
            break
        log(f"  {name}: sample labels {cand} have a near-tie (margin {margin:.2e}); next")
    if sample_labels is None:
        raise RuntimeError(f"{name}: no sample label set without near-ties")

    final_names = FINAL_BASE + (FINAL_PLUGIN if cfg.has_plugin else [])
    # How close to zero the (nonzero) step-0 gradients of the stored final parameters get:
    # below ~1e-7 the sign of a float32 gradient, and so the AdamW step, is not reliable.
    nz = np.concatenate([np.abs(grads[n]).ravel() for n in final_names])
    nz = nz[nz > 0]
    min_abs_grad = float(nz.min())

    fixture_meta = {
        "format_version": FIXTURE_VERSION,
        "fixture_version": FIXTURE_VERSION,
        "case": name,
        "batch": int(len(labels)),
        "slot_weights": [float(x) for x in sw],
        "input_noise": {"type": "replace", "prob": NOISE_PROB,
                        "entries": "j >= 1 and not pad; entry 0 clean"},
        "adamw": {
            "lr_plugin": ADAMW.lr_plugin, "lr_base": ADAMW.lr_base,
            "weight_decay": ADAMW.weight_decay, "beta1": ADAMW.beta1, "beta2": ADAMW.beta2,
            "eps": ADAMW.eps, "clip": ADAMW.clip, "steps": ADAMW.steps,
            "schedule": "update s = 0..steps-1 (bias-correction step t = s+1): plugin lr = "
                        "lr_plugin * (1 - s/steps); base lr = lr_base constant; weight decay "
                        "p *= 1 - lr*wd on parameters with >= 2 dims, then the Adam step; "
                        "global clip scale min(1, clip/(norm+1e-6)) over all parameters; the "
                        "same batch every step",
            "final_params": final_names,
            "min_abs_nonzero_grad_of_final_params": min_abs_grad,
        },
        "sample": {"cfg_scale": cfg_scale, "top_k": 1, "temperature": 1.0,
                   "batch": len(sample_labels),
                   "min_logit_margin": margin},
        "cfg_scale": cfg_scale,
        "init_scales": R.FIXTURE_SCALES,
        "seeds": {"base": 1000, "tokens": 1001, "plugin": 2000 + index, "noise": 3000 + index},
        "dtype": "reference computed in float64, stored as float32",
    }
    config_meta = cfg.to_dict()

    names = [n for n, _, _, _ in R.parameter_table(cfg)]
    outputs = {"logits": logits, "hidden": hidden, "loss": [loss], "slot_losses": slot_losses}
    out = fixture_tensors(names, params, (tokens, labels, tensors, sw), outputs, grads,
                          (losses, norms, final_names, final), (sample_labels, s_tokens, s_traj))
    meta = {"tensorar.config": json.dumps(config_meta, sort_keys=True),
            "fixture": json.dumps(fixture_meta, sort_keys=True)}
    log(f"  {name}: loss {loss:.6f} slot_losses {np.round(slot_losses, 4).tolist()} "
        f"grad_norm {norms[0]:.4f} adamw.losses {np.round(losses, 5).tolist()} "
        f"sample margin {margin:.2e} min|g| {min_abs_grad:.1e}")
    return out, meta


# Open-MAGVIT2 (SPEC section 8), written to Fixtures/OpenMAGVIT2/: the same tiny shape with
# 2 factorized blocks and 2 + 3 bits (V = 32: 4 pre and 8 post sub-tokens).
OMG_SHAPE = dict(num_classes=5, grid_size=4, dim=32, n_layer=2, n_head=4, factorized_n_layer=2,
                 factorized_bits=(2, 3), norm_eps=1e-5, rope_base=10000.0)
OMG_DIR = "OpenMAGVIT2"
# (name, k, d, residual, slot_weights, (s_pre, s_post)): two different scales in each case; the
# last has s_pre <= 1 < s_post (pre unguided, post guided: what upstream's sampler cannot run).
OMG_CASES = [
    ("omg_base", 1, 0, True, [1.0], (1.5, 3.0)),
    ("omg_k1_d1_res", 1, 1, True, [1.0], (2.0, 1.5)),
    ("omg_k1_d1_nores", 1, 1, False, [1.0], (3.0, 2.0)),
    ("omg_k4_d2_res", 4, 2, True, [1.0, 1.0, 1.0, 1.0], (1.5, 3.0)),
    ("omg_k4_d1_nores_weighted", 4, 1, False, [1.0, 0.5, 0.25, 0.125], (1.0, 2.5)),
]
OMG_FINAL_BASE = ["class_emb.embedding_table.weight", "pre_emb.weight", "post_emb.weight",
                  "spatial_blocks.0.attention.wqkv.weight", "factorized_blocks.1.feed_forward.w2.weight",
                  "norm.weight", "head.0.weight", "head.1.weight"]


def omg_sample(params, cfg, name, scales, log):
    """The first candidate label set whose greedy decisions have no near-tie."""
    for cand in SAMPLE_LABEL_CANDIDATES:
        tokens, traj, margin = O.sample_greedy(params, cfg, cand, scales)
        if margin >= MIN_SAMPLE_MARGIN:
            return cand, tokens, traj, margin
        log(f"  {name}: sample labels {cand} have a near-tie (margin {margin:.2e}); next")
    raise RuntimeError(f"{name}: no sample label set without near-ties")


def build_omg_case(index, name, k, d, residual, slot_weights, scales, log=print):
    cfg = O.OMGConfig(**OMG_SHAPE, window=k, plugin_depth=d, residual=residual)
    T, V = cfg.seq_len, cfg.vocab_size
    params = O.init_params_fixture(cfg, np.random.default_rng(4000), np.random.default_rng(5000 + index))
    params = {n: v.astype(np.float32).astype(np.float64) for n, v in params.items()}
    tokens = np.random.default_rng(4001).integers(0, V, size=(len(BATCH_LABELS), T))
    labels = np.array(BATCH_LABELS)
    tensors = R.replace_noise(R.clean_tensors(tokens, k), V, NOISE_PROB, np.random.default_rng(6000 + index))
    sw = np.array(slot_weights, dtype=np.float64)
    loss, slot_losses, parts, lp, lq, hidden, grads = O.loss_and_grad(params, cfg, tokens, labels, tensors, sw)
    losses, norms, final = O.adamw_run(params, cfg, tokens, labels, tensors, sw, ADAMW)
    assert abs(losses[0] - loss) < 1e-12 and abs(parts.sum() - loss) < 1e-12
    sample_labels, s_tokens, s_traj, margin = omg_sample(params, cfg, name, scales, log)
    final_names = OMG_FINAL_BASE + (FINAL_PLUGIN if cfg.has_plugin else [])
    nz = np.concatenate([np.abs(grads[n]).ravel() for n in final_names])
    fixture_meta = {
        "format_version": FIXTURE_VERSION, "fixture_version": FIXTURE_VERSION, "case": name,
        "batch": int(len(labels)), "slot_weights": [float(x) for x in sw],
        "input_noise": {"type": "replace", "prob": NOISE_PROB, "entries": "j >= 1 and not pad; entry 0 clean"},
        "adamw": {"lr_plugin": ADAMW.lr_plugin, "lr_base": ADAMW.lr_base, "weight_decay": ADAMW.weight_decay,
                  "beta1": ADAMW.beta1, "beta2": ADAMW.beta2, "eps": ADAMW.eps, "clip": ADAMW.clip,
                  "steps": ADAMW.steps, "final_params": final_names,
                  "min_abs_nonzero_grad_of_final_params": float(nz[nz > 0].min())},
        "sample": {"cfg_scales": list(scales), "top_k": 1, "temperature": 1.0, "batch": len(sample_labels),
                   "min_logit_margin": margin},
        "logits": "output.logits [B, T, k, 2^b0 + 2^b1]: pre logits, then post logits given the target's pre",
        "seeds": {"base": 4000, "tokens": 4001, "plugin": 5000 + index, "noise": 6000 + index},
        "dtype": "reference computed in float64, stored as float32",
    }
    names = [n for n, _, _, _ in O.parameter_table(cfg)]
    outputs = {"logits": np.concatenate([lp, lq], axis=-1), "hidden": hidden, "loss": [loss],
               "slot_losses": slot_losses, "part_losses": parts}
    out = fixture_tensors(names, params, (tokens, labels, tensors, sw), outputs, grads,
                          (losses, norms, final_names, final), (sample_labels, s_tokens, s_traj))
    meta = {"tensorar.config": json.dumps(cfg.to_dict(), sort_keys=True),
            "fixture": json.dumps(fixture_meta, sort_keys=True)}
    log(f"  {name}: loss {loss:.6f} parts {np.round(parts, 4).tolist()} slot_losses "
        f"{np.round(slot_losses, 4).tolist()} adamw.losses {np.round(losses, 5).tolist()} margin {margin:.2e}")
    return out, meta


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(HERE, "..", "ModelTests", "Fixtures"))
    ap.add_argument("--only", nargs="*", default=None, help="case names to (re)write")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for i, case in enumerate(CASES):
        if args.only and case[0] not in args.only:
            continue
        print(f"{case[0]}: k={case[1]} d={case[2]} residual={case[3]}", flush=True)
        tensors, meta = build_case(i, *case)
        path = os.path.join(args.out, f"{case[0]}.safetensors")
        safetensors_io.write(path, tensors, meta)
        print(f"  wrote {os.path.normpath(path)} ({os.path.getsize(path)} bytes)", flush=True)
    os.makedirs(os.path.join(args.out, OMG_DIR), exist_ok=True)
    for i, case in enumerate(OMG_CASES):
        if args.only and case[0] not in args.only:
            continue
        print(f"{case[0]}: k={case[1]} d={case[2]} residual={case[3]} scales={case[5]}", flush=True)
        tensors, meta = build_omg_case(i, *case)
        path = os.path.join(args.out, OMG_DIR, f"{case[0]}.safetensors")
        safetensors_io.write(path, tensors, meta)
        print(f"  wrote {os.path.normpath(path)} ({os.path.getsize(path)} bytes)", flush=True)


if __name__ == "__main__":
    main()
