#!/usr/bin/env python3
"""Convert a released RAR generator (bytedance's 1d-tokenizer, `rar_{b,l,xl,xxl}.bin`) into TensorAR
safetensors (SPEC sections 7 and 9).

    python3 Launch/convert_rar.py rar_b.bin rar-b.safetensors --preset B
    python3 Launch/convert_rar.py IN.bin OUT.safetensors --dim 768 --n-layer 24 --n-head 16 \
        --intermediate 3072 --vocab-size 1024 --num-classes 1000 --grid-size 16

The file is a plain `state_dict` saved by torch.save (zip format); its names are SPEC section 9's
and are kept as they are (a `module.` or `_orig_mod.` wrapper prefix is dropped). The tensors
show the whole shape: the width and the codebook size from `embeddings.weight` and
`lm_head.weight`, the class count from the embedding rows (V + C + 2), the head count from
`q_norm` (head width = its length), the grid from the position rows (T + 1024, T a square), the
intermediate size from `fc1`, the depth from the block indices. A preset or a flag is only
checked: one that a tensor contradicts is an error naming the flag and the tensor. Every table is
kept at full shape. The output holds float32 tensors in SPEC 9's table order and a
`tensorar.config` (base "rar", ffn_hidden = the intermediate size, norm_eps 1e-6). Every failure
is one line, `convert_rar: <file>: <problem>`, and exit status 2.

Only numpy is needed: the zip and its pickle are read by convert_llamagen.py's restricted reader
(tensors, torch storages and OrderedDict only; anything else is refused).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import pickle
import re
import sys
import zipfile
from typing import Dict, List, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import convert_llamagen as L  # noqa: E402  (the torch zip reader, lazy tensors, the safetensors writer)

POS_EXTRA_ROWS = 1024      # pos_embed, target_aware_pos_embed: [1, T + 1024, D] (SPEC 9)
TIME_EXTRA_ROWS = 100      # timesteps_embeddings: [1, T + 100, D]
# SPEC 9's presets: dim, n_layer, intermediate, n_head, vocab_size, num_classes, grid_size.
SHAPE_KEYS = ("dim", "n_layer", "intermediate", "n_head", "vocab_size", "num_classes", "grid_size")
PRESETS = {
    "B": (768, 24, 3072, 16, 1024, 1000, 16),
    "L": (1024, 24, 4096, 16, 1024, 1000, 16),
    "XL": (1280, 32, 5120, 16, 1024, 1000, 16),
    "XXL": (1408, 40, 6144, 16, 1024, 1000, 16),
}


class ConvertError(Exception):
    pass


def block_table(prefix: str, D: int, F: int, hd: int) -> List[Tuple[str, Tuple[int, ...]]]:
    t = []
    for name, shape in [("norm1", (D,)), ("attn.qkv", (3 * D, D)), ("attn.q_norm", (hd,)), ("attn.k_norm", (hd,)),
                        ("attn.proj", (D, D)), ("norm2", (D,)), ("mlp.fc1", (F, D)), ("mlp.fc2", (D, F)),
                        ("adaLN_modulation.1", (6 * D, D))]:
        if len(shape) == 1:
            t += [(f"{prefix}.{name}.weight", shape), (f"{prefix}.{name}.bias", shape)]
        else:
            t += [(f"{prefix}.{name}.weight", shape), (f"{prefix}.{name}.bias", shape[:1])]
    return t


def model_table(cfg: dict) -> List[Tuple[str, Tuple[int, ...]]]:
    """SPEC 9's parameter table, in its order."""
    D, F, V, C = cfg["dim"], cfg["ffn_hidden"], cfg["vocab_size"], cfg["num_classes"]
    T = cfg["grid_size"] ** 2
    hd = D // cfg["n_head"]
    t = [("cls_token", (1, 1, D)), ("embeddings.weight", (V + C + 2, D)),
         ("pos_embed", (1, T + POS_EXTRA_ROWS, D)), ("target_aware_pos_embed", (1, T + POS_EXTRA_ROWS, D)),
         ("timesteps_embeddings", (1, T + TIME_EXTRA_ROWS, D))]
    for l in range(cfg["n_layer"]):
        t += block_table(f"blocks.{l}", D, F, hd)
    return t + [("adaln_before_head.adaLN_modulation.1.weight", (2 * D, D)),
                ("adaln_before_head.adaLN_modulation.1.bias", (2 * D,)),
                ("lm_head.weight", (V, D)), ("lm_head.bias", (V,))]


def state_dict_tensors(obj) -> Dict[str, object]:
    """name -> lazy tensor, wrapper prefixes dropped."""
    sd, _ = L.select_state_dict(obj)
    out: Dict[str, object] = {}
    for raw, v in sd.items():
        name = L.strip_prefix(str(raw))
        if name in out:
            raise ConvertError(f"two state_dict entries map to '{name}'")
        if not hasattr(v, "shape") or not hasattr(v, "numpy"):
            raise ConvertError(f"state_dict entry '{raw}' is a {type(v).__name__}, not a tensor")
        out[name] = v
    return out


def shape_of(found: Dict[str, object], name: str, ndim: int) -> Tuple[int, ...]:
    if name not in found:
        raise ConvertError(f"missing tensor '{name}' (SPEC section 9): is this a RAR generator state_dict?")
    s = tuple(int(x) for x in found[name].shape)
    if len(s) != ndim:
        raise ConvertError(f"tensor '{name}' has shape {list(s)}, expected {ndim} dimensions")
    return s


def tensor_shape(found: Dict[str, object]) -> Dict[str, Tuple[int, str]]:
    """What the tensors show: key -> (value, the tensor that shows it)."""
    emb = shape_of(found, "embeddings.weight", 2)
    head = shape_of(found, "lm_head.weight", 2)
    pos = shape_of(found, "pos_embed", 3)
    qn = shape_of(found, "blocks.0.attn.q_norm.weight", 1)
    fc1 = shape_of(found, "blocks.0.mlp.fc1.weight", 2)
    D, V = emb[1], head[0]
    if qn[0] <= 0 or D % qn[0] != 0:
        raise ConvertError(f"tensor 'blocks.0.attn.q_norm.weight' has length {qn[0]}, not a head width dividing "
                           f"the model width {D} (embeddings.weight {list(emb)})")
    C = emb[0] - V - 2
    if C < 1:
        raise ConvertError(f"tensor 'embeddings.weight' has {emb[0]} rows, fewer than V + 3 = {V + 3} "
                           f"(V = {V} from lm_head.weight)")
    T = pos[1] - POS_EXTRA_ROWS
    grid = math.isqrt(max(T, 0))
    if T < 1 or grid * grid != T:
        raise ConvertError(f"tensor 'pos_embed' has {pos[1]} rows: T = rows - {POS_EXTRA_ROWS} = {T} is not a "
                           f"square grid")
    layers = {int(m.group(1)) for n in found for m in [re.match(r"blocks\.(\d+)\.", n)] if m}
    if layers != set(range(len(layers))):
        raise ConvertError(f"block indices {sorted(layers)} are not 0..{len(layers) - 1}")
    return {"dim": (D, f"embeddings.weight {list(emb)}"),
            "vocab_size": (V, f"lm_head.weight {list(head)}"),
            "num_classes": (C, f"embeddings.weight {list(emb)} (V + C + 2 rows)"),
            "n_head": (D // qn[0], f"blocks.0.attn.q_norm.weight {list(qn)} (head width {qn[0]})"),
            "grid_size": (grid, f"pos_embed {list(pos)} (T + {POS_EXTRA_ROWS} rows, T = {T})"),
            "intermediate": (fc1[0], f"blocks.0.mlp.fc1.weight {list(fc1)}"),
            "n_layer": (len(layers), f"blocks.0..{len(layers) - 1}")}


def resolve_config(args, found: Dict[str, object]) -> dict:
    """The shape the tensors show, every preset value and flag checked against it."""
    shown = tensor_shape(found)
    given: Dict[str, Tuple[int, str]] = {}
    if args.preset:
        if args.preset not in PRESETS:
            raise ConvertError(f"--preset: unknown preset '{args.preset}'; known: {', '.join(PRESETS)}")
        given = {k: (v, f"--preset {args.preset}") for k, v in zip(SHAPE_KEYS, PRESETS[args.preset])}
    for key in SHAPE_KEYS:
        value = getattr(args, key)
        if value is not None:
            given[key] = (value, f"--{key.replace('_', '-')} {value}")
    for key in SHAPE_KEYS:
        if key in given and given[key][0] != shown[key][0]:
            value, source = given[key]
            raise ConvertError(f"{source} says {key.replace('_', '-')} {value}, but the tensor "
                               f"{shown[key][1]} shows {shown[key][0]}")
    v = {k: shown[k][0] for k in SHAPE_KEYS}
    return {"vocab_size": v["vocab_size"], "num_classes": v["num_classes"], "grid_size": v["grid_size"],
            "dim": v["dim"], "n_layer": v["n_layer"], "n_head": v["n_head"], "ffn_hidden": v["intermediate"],
            "norm_eps": 1e-6, "rope_base": 10000.0, "window": 1, "plugin_depth": 0, "residual": True,
            "base": "rar"}


def convert(found: Dict[str, object], cfg: dict) -> "collections.OrderedDict[str, object]":
    """SPEC 9's tensors in table order, each shape checked; a missing or extra tensor is an error."""
    table = model_table(cfg)
    expected = dict(table)
    errors = [f"tensor '{n}' (shape {list(v.shape)}) is not part of the RAR model" for n, v in found.items()
              if n not in expected]
    errors += [f"missing tensor '{n}' (expected shape {list(s)})" for n, s in table if n not in found]
    out = collections.OrderedDict()
    for name, shape in table:
        v = found.get(name)
        if v is not None and tuple(v.shape) != tuple(shape):
            errors.append(f"tensor '{name}' has shape {list(v.shape)}, the config expects {list(shape)}")
        elif v is not None:
            out[name] = v
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConvertError(errors[0] + more)
    return out


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"convert_rar: {message} (see --help)\n")


def parse_args(argv):
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="RAR generator state_dict (rar_b.bin etc., torch zip format)")
    ap.add_argument("output", help="output .safetensors")
    ap.add_argument("--preset", help="B, L, XL or XXL (SPEC section 9): checked against the tensors")
    ap.add_argument("--dim", type=int)
    ap.add_argument("--n-layer", type=int)
    ap.add_argument("--n-head", type=int)
    ap.add_argument("--intermediate", type=int, help="the MLP's hidden size (ffn_hidden)")
    ap.add_argument("--vocab-size", type=int)
    ap.add_argument("--num-classes", type=int)
    ap.add_argument("--grid-size", type=int, help="tokens per side")
    return ap.parse_args(argv)


def run(args) -> str:
    try:
        obj = L.load_checkpoint_numpy(args.checkpoint)
    except L.ConvertError as e:
        raise ConvertError(str(e)) from None
    found = state_dict_tensors(obj)
    cfg = resolve_config(args, found)
    tensors = convert(found, cfg)
    kinds = collections.Counter(v.dtype_name for v in tensors.values())
    meta = {"tensorar.config": json.dumps(cfg, sort_keys=True),
            "tensorar.source": f"RAR state_dict {os.path.basename(args.checkpoint)}"}
    try:
        L.write_safetensors(args.output, tensors, meta)
    except OSError as e:
        raise OSError(e.errno, e.strerror, args.output) from None
    except L.ConvertError as e:          # a storage shorter than its tensors (a damaged file)
        raise ConvertError(str(e)) from None
    finally:
        if os.path.exists(args.output + ".partial"):
            os.remove(args.output + ".partial")
    n = sum(int(np.prod(v.shape)) for v in tensors.values())
    return (f"wrote {args.output}: {len(tensors)} tensors, {n:,} parameters, float32 (from {dict(kinds)}); "
            f"tensorar.config {meta['tensorar.config']}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        print(run(args))
        return 0
    except ConvertError as e:
        problem, where = str(e), args.checkpoint
    except OSError as e:
        problem, where = f"{e.strerror or e}", e.filename or args.checkpoint
    except (zipfile.BadZipFile, KeyError, EOFError, pickle.UnpicklingError, ValueError, L.ConvertError) as e:
        problem, where = f"unreadable checkpoint ({type(e).__name__}: {e})", args.checkpoint
    print(f"convert_rar: {where}: {problem}".replace("\n", " "), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
