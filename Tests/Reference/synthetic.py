"""Tiny token caches and models for the evaluation and sampling tests (numpy + h5py only).

A synthetic dataset: C classes, each a fixed template of T tokens; an image is its class template
with a fraction of the tokens replaced by uniform random codes. A random patch codebook turns
tokens into pixels. Written in the SPEC section 7 format (dataset.json, shard, codebook.h5) so
the Swift programs read it.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

import safetensors_io

V, C, GRID, PATCH = 32, 5, 4, 2  # T = 16 tokens, 8x8 grey images


def templates(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, size=(C, GRID * GRID))


def make_tokens(n: int, seed: int, corrupt: float = 0.25, template_seed: int = 0):
    """Tokens [n, T] and labels [n], classes in turn."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % C
    tokens = templates(template_seed)[labels].copy()
    mask = rng.random(tokens.shape) < corrupt
    tokens[mask] = rng.integers(0, V, size=int(mask.sum()))
    return tokens, labels


def write_cache(folder: str, tokens: np.ndarray, labels: np.ndarray, codebook_seed: int = 0):
    import h5py

    os.makedirs(folder, exist_ok=True)
    n, t = tokens.shape
    facts = {"format_version": 1, "vocab_size": V, "grid_h": GRID, "grid_w": GRID, "num_classes": C, "augmentations": 1}
    shard = os.path.join(folder, "shard-00000.h5")
    with h5py.File(shard, "w") as h:
        h.create_dataset("codes", data=tokens.reshape(n, 1, t).astype(np.uint16), chunks=(min(n, 64), 1, t))
        h.create_dataset("labels", data=labels.astype(np.int32))
        for k, v in {**facts, "num_samples": n}.items():
            h.attrs[k] = np.int64(v)
    sha = hashlib.sha256(open(shard, "rb").read()).hexdigest()
    info = {**facts, "num_samples": n, "shards": [{"file": "shard-00000.h5", "num_samples": n, "sha256": sha}]}
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(info, f, indent=2)
    rng = np.random.default_rng(codebook_seed + 99)
    with h5py.File(os.path.join(folder, "codebook.h5"), "w") as h:
        h.create_dataset("codebook", data=rng.random((V, PATCH * PATCH)).astype(np.float32))
        for k, v in {"patch_size": PATCH, "image_h": GRID * PATCH, "image_w": GRID * PATCH, "channels": 1,
                     "vocab_size": V}.items():
            h.attrs[k] = np.int64(v)


def make_data(root: str, n_train: int = 2000, n_val: int = 1000):
    """DATA/train and DATA/val caches (same codebook)."""
    tt, tl = make_tokens(n_train, seed=1)
    vt, vl = make_tokens(n_val, seed=2)
    write_cache(os.path.join(root, "train"), tt, tl)
    write_cache(os.path.join(root, "val"), vt, vl)
    return root


def ffn_hidden(dim: int) -> int:
    return (2 * 4 * dim // 3 + 255) // 256 * 256


def write_model(path: str, window: int = 2, depth: int = 1, dim: int = 16, layers: int = 2, heads: int = 2,
                seed: int = 0):
    """Random weights with the SPEC section 2-3 names and tensorar.config metadata."""
    rng = np.random.default_rng(seed)
    F = ffn_hidden(dim)

    def normal(*shape, std=0.2):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def block(prefix):
        return {
            f"{prefix}.attention_norm.weight": np.ones(dim, np.float32),
            f"{prefix}.attention.wqkv.weight": normal(3 * dim, dim),
            f"{prefix}.attention.wo.weight": normal(dim, dim),
            f"{prefix}.ffn_norm.weight": np.ones(dim, np.float32),
            f"{prefix}.feed_forward.w1.weight": normal(F, dim),
            f"{prefix}.feed_forward.w3.weight": normal(F, dim),
            f"{prefix}.feed_forward.w2.weight": normal(dim, F),
        }

    t = {"cls_embedding.embedding_table.weight": normal(C + 1, dim, std=1.0),
         "tok_embeddings.weight": normal(V, dim, std=1.0)}
    for l in range(layers):
        t.update(block(f"layers.{l}"))
    t["norm.weight"] = np.ones(dim, np.float32)
    t["output.weight"] = normal(V, dim, std=1.0)
    if depth > 0:
        t["tensorar.in_query"] = normal(dim)
        t["tensorar.in_pos"] = normal(window, dim)
        t["tensorar.in_pad"] = normal(dim)
        for i in range(depth):
            t.update(block(f"tensorar.encoder.layers.{i}"))
        t["tensorar.encoder.norm.weight"] = np.ones(dim, np.float32)
        t["tensorar.encoder.proj.weight"] = normal(dim, dim)
        t["tensorar.out_pos"] = normal(window, dim)
        for i in range(depth):
            t.update(block(f"tensorar.decoder.layers.{i}"))
        t["tensorar.decoder.norm.weight"] = np.ones(dim, np.float32)
        t["tensorar.decoder.proj.weight"] = normal(dim, dim)
    cfg = {"vocab_size": V, "num_classes": C, "grid_size": GRID, "dim": dim, "n_layer": layers, "n_head": heads,
           "ffn_hidden": F, "norm_eps": 1e-5, "rope_base": 10000.0, "window": window, "plugin_depth": depth,
           "residual": True}
    safetensors_io.write(path, t, {"tensorar.config": json.dumps(cfg)})
    return path



def write_omg_model(path: str, window: int = 2, depth: int = 1, dim: int = 16, layers: int = 2, heads: int = 2,
                    factorized: int = 1, seed: int = 0):
    """Random Open-MAGVIT2 weights (SPEC section 8 names) over this dataset's V = 32 = 2^2 x 2^3,
    with a plug-in of `depth` blocks (SPEC section 3 names) when depth > 0."""
    import convert_open_magvit2 as CO  # Launch/ on the path: its table of SPEC section 8 names

    rng = np.random.default_rng(seed)
    cfg = {"vocab_size": V, "num_classes": C, "grid_size": GRID, "dim": dim, "n_layer": layers, "n_head": heads,
           "ffn_hidden": ffn_hidden(dim), "norm_eps": 1e-5, "rope_base": 10000.0, "window": window,
           "plugin_depth": depth, "residual": True, "base": "open-magvit2", "factorized_n_layer": factorized,
           "factorized_bits": [2, 3]}

    def weight(name, shape):
        if name.endswith("norm.weight"):
            return np.ones(shape, np.float32)
        std = 1.0 if "emb" in name else 0.2  # embeddings and the class table as write_model's
        return (rng.standard_normal(shape) * std).astype(np.float32)

    shapes = list(CO.model_table(cfg))
    if depth > 0:
        blocks = [(n, s) for n, s in shapes if n.startswith("spatial_blocks.0.")]
        for side in ["encoder", "decoder"]:
            shapes += [(n.replace("spatial_blocks.0", f"tensorar.{side}.layers.{i}"), s)
                       for i in range(depth) for n, s in blocks]
            shapes += [(f"tensorar.{side}.norm.weight", (dim,)), (f"tensorar.{side}.proj.weight", (dim, dim))]
        shapes += [("tensorar.in_query", (dim,)), ("tensorar.in_pos", (window, dim)), ("tensorar.in_pad", (dim,)),
                   ("tensorar.out_pos", (window, dim))]
    t = {n: weight(n, s) for n, s in shapes}
    safetensors_io.write(path, t, {"tensorar.config": json.dumps(cfg)})
    return path
