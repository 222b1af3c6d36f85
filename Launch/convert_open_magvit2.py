#!/usr/bin/env python3
"""Convert an Open-MAGVIT2 autoregressive checkpoint (a PyTorch Lightning .ckpt of TencentARC's
SEED-Voken code) into TensorAR safetensors (SPEC section 8).

    python3 Launch/convert_open_magvit2.py AR_256_B.ckpt omg-b.safetensors --preset B
    python3 Launch/convert_open_magvit2.py IN.ckpt OUT.safetensors --dim 1024 --n-layer 24 --n-head 16 \
        --factorized-layers 2 --num-classes 1000 --grid-size 16

The checkpoint's `state_dict` holds the model under `transformer.` (kept, without the prefix:
SPEC section 8's names) beside the tokenizer and loss networks (`first_stage_model.*` and others,
left out). The sub-vocabulary sizes 2^b0 and 2^b1 come from the `pre_emb` and `post_emb` shapes,
the class count from `class_emb`, the factorized depth from the block indices; `n_head` appears in
no shape and comes from the flags or the preset. Whatever a flag says that a tensor contradicts is
an error naming the tensor. The output holds float32 tensors and a `tensorar.config` (SPEC 7, 8).

Only numpy is needed: the zip and its pickle are read as `convert_llamagen.py` reads LlamaGen's,
tensors lazily (optimizer states cost nothing). A Lightning checkpoint also pickles its loops,
callbacks and hyper-parameters (OmegaConf, Lightning and numpy objects): those are kept as inert
records, never called; a global from any other module is refused. `--torch` reads with
torch.load(weights_only=False) instead, when torch is installed (trusted files only).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pickle
import re
import sys
import zipfile
from typing import Dict, List, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import convert_llamagen as L  # noqa: E402  (the zip reader, lazy tensors, the safetensors writer)

# (n_layer, n_head, dim, factorized layers): SPEC section 8's table, and two small ones of ours.
PRESETS = {
    "tiny": (2, 2, 64, 1), "small": (4, 4, 128, 2),
    "B": (24, 16, 1024, 2), "L": (36, 20, 1280, 3), "XL": (48, 24, 1536, 4),
}
# Modules whose objects a Lightning checkpoint pickles outside the weights (loops, callbacks,
# hyper-parameters): read as inert records. Their classes are never called.
_INERT_MODULES = ("omegaconf", "pytorch_lightning", "lightning", "lightning_fabric", "typing", "pathlib",
                  "numpy", "_codecs", "collections", "builtins", "argparse", "torch")
# Buffers a model may carry that are not parameters.
_IGNORABLE = [re.compile(r"(^|\.)freqs_cis$"), re.compile(r"(^|\.)kv_cache\."), re.compile(r"(^|\.)causal_mask$")]


class ConvertError(Exception):
    pass


class InertObject:
    """Any allowed non-tensor global: its arguments and state are kept, nothing runs."""

    def __init__(self, *args, **kwargs):
        self.__dict__["_args"] = args

    def __setstate__(self, state):
        self.__dict__["_state"] = state

    def __setitem__(self, key, value):  # dict subclasses (DictConfig) are filled item by item
        self.__dict__.setdefault("_items", {})[key] = value

    def append(self, value):             # list subclasses (ListConfig) too
        self.__dict__.setdefault("_items", []).append(value)

    def extend(self, values):
        for v in values:
            self.append(v)


def _inert(module: str, name: str):
    return type(name, (InertObject,), {"__module__": "inert." + module})


def _rebuild_from_type_v2(func, new_type, args, state):
    return func(*args)


class LightningUnpickler(L.RestrictedUnpickler):
    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)]
        if module == "torch" and name in L._STORAGE_DTYPES:
            return L.StorageType(name)
        if (module, name) == ("torch._tensor", "_rebuild_from_type_v2"):
            return _rebuild_from_type_v2
        if module.split(".")[0] in _INERT_MODULES:
            return _inert(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: not a tensor, a torch storage or a Lightning, OmegaConf or numpy "
            f"object (use --torch with torch installed, for a file you trust)")


def load_lightning_checkpoint(path: str):
    """The unpickled checkpoint, tensors as lazy `convert_llamagen.LazyTensor`s."""
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise ConvertError(f"{path}: not a zip-format torch checkpoint (saved by torch < 1.6?); re-save it with a "
                           f"recent torch, or pass --torch with torch installed")
    zf = zipfile.ZipFile(path)
    pkl = [n for n in zf.namelist() if (n == "data.pkl" or n.endswith("/data.pkl")) and n.count("/") <= 1]
    if len(pkl) != 1:
        raise ConvertError(f"{path}: expected one <archive>/data.pkl record, found {pkl}")
    prefix = pkl[0][: -len("data.pkl")]
    big = f"{prefix}byteorder" in zf.namelist() and zf.read(f"{prefix}byteorder").decode().strip() == "big"
    with zf.open(pkl[0]) as fh:
        try:
            return LightningUnpickler(fh, zf, prefix, big).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as e:
            raise ConvertError(f"{path}: cannot read the pickle: {e}") from None


def load_torch(path: str):
    import torch  # noqa: only with --torch

    obj = torch.load(path, map_location="cpu", weights_only=False)
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    tensors = collections.OrderedDict(
        (k, L.NumpyTensor(v.detach().to(torch.float32).numpy(), str(v.dtype))) for k, v in sd.items()
        if isinstance(v, torch.Tensor))
    rest = {k: v for k, v in obj.items() if k != "state_dict"} if isinstance(obj, dict) else {}
    return {**rest, "state_dict": tensors}


# --------------------------------------------------------------------------------------------
# SPEC section 8's table and the conversion
# --------------------------------------------------------------------------------------------

def block_names(prefix: str, D: int, F: int) -> List[Tuple[str, Tuple[int, ...]]]:
    return [(f"{prefix}.attention_norm.weight", (D,)), (f"{prefix}.attention.wqkv.weight", (3 * D, D)),
            (f"{prefix}.attention.wo.weight", (D, D)), (f"{prefix}.ffn_norm.weight", (D,)),
            (f"{prefix}.feed_forward.w1.weight", (F, D)), (f"{prefix}.feed_forward.w3.weight", (F, D)),
            (f"{prefix}.feed_forward.w2.weight", (D, F))]


def model_table(cfg: dict) -> List[Tuple[str, Tuple[int, ...]]]:
    D, F = cfg["dim"], cfg["ffn_hidden"]
    b0, b1 = cfg["factorized_bits"]
    t = [("class_emb.embedding_table.weight", (cfg["num_classes"] + 1, D)), ("pre_emb.weight", (1 << b0, D)),
         ("post_emb.weight", (1 << b1, D))]
    for l in range(cfg["n_layer"]):
        t += block_names(f"spatial_blocks.{l}", D, F)
    for m in range(cfg["factorized_n_layer"]):
        t += block_names(f"factorized_blocks.{m}", D, F)
    return t + [("norm.weight", (D,)), ("head.0.weight", (1 << b0, D)), ("head.1.weight", (1 << b1, D))]


def transformer_tensors(obj) -> Tuple[Dict[str, object], int, dict]:
    """The `transformer.` entries of the state_dict without the prefix; how many others were left
    out; the checkpoint's facts (epoch, global_step, Lightning version)."""
    if not isinstance(obj, dict):
        raise ConvertError(f"the checkpoint holds a {type(obj).__name__}, not a Lightning checkpoint dict")
    sd = obj.get("state_dict", obj)
    if not isinstance(sd, dict):
        raise ConvertError(f"'state_dict' is a {type(sd).__name__}, not a dict of tensors")
    facts = {k: obj[k] for k in ("epoch", "global_step", "pytorch-lightning_version") if k in obj}
    out: Dict[str, object] = {}
    others = 0
    for raw, v in sd.items():
        name = str(raw)
        if not name.startswith("transformer."):
            others += 1
            continue
        name = L.strip_prefix(name[len("transformer."):])
        if name in out:
            raise ConvertError(f"two state_dict entries map to 'transformer.{name}'")
        out[name] = v
    if not out:
        raise ConvertError(f"no 'transformer.' entries among the state_dict's {len(sd)} (is this an Open-MAGVIT2 "
                           f"autoregressive checkpoint? the tokenizer's own has none)")
    return out, others, facts


def rows_of(found: Dict[str, object], name: str) -> int:
    if name not in found:
        raise ConvertError(f"missing tensor 'transformer.{name}' (SPEC section 8)")
    v = found[name]
    if not hasattr(v, "shape") or len(v.shape) != 2:
        raise ConvertError(f"'transformer.{name}' is not a matrix (shape {getattr(v, 'shape', None)})")
    return int(v.shape[0])


def bits_of(found: Dict[str, object], name: str) -> int:
    n = rows_of(found, name)
    if n < 2 or n & (n - 1):
        raise ConvertError(f"tensor 'transformer.{name}' has {n} rows, not a power of two (a sub-vocabulary 2^b)")
    return n.bit_length() - 1


def block_count(found: Dict[str, object], prefix: str) -> int:
    idx = {int(m.group(1)) for n in found for m in [re.match(rf"{prefix}\.(\d+)\.", n)] if m}
    if idx != set(range(len(idx))):
        raise ConvertError(f"'{prefix}' block indices {sorted(idx)} are not 0..{len(idx) - 1}")
    return len(idx)


def resolve_config(args, found: Dict[str, object]) -> dict:
    """The model shape: the preset or flags, checked against the tensors (SPEC section 8)."""
    shape = PRESETS.get(args.preset) if args.preset else None
    if args.preset and shape is None:
        raise ConvertError(f"--preset: unknown preset '{args.preset}'; known: {', '.join(PRESETS)}")

    def pick(flag, i):
        v = getattr(args, flag)
        return v if v is not None else (shape[i] if shape else None)

    n_layer, n_head, dim, lf = pick("n_layer", 0), pick("n_head", 1), pick("dim", 2), pick("factorized_layers", 3)
    if n_head is None:
        raise ConvertError("give --preset (B, L, XL, tiny, small) or --n-head (it appears in no tensor's shape)")
    emb_dim = int(found["pre_emb.weight"].shape[1]) if "pre_emb.weight" in found else None
    dim = dim if dim is not None else emb_dim
    if dim is None:
        raise ConvertError("missing tensor 'transformer.pre_emb.weight' (SPEC section 8)")
    if emb_dim is not None and emb_dim != dim:
        raise ConvertError(f"tensor 'transformer.pre_emb.weight' has width {emb_dim}, the shape given says dim {dim}")
    spatial, factorized = block_count(found, "spatial_blocks"), block_count(found, "factorized_blocks")
    for what, want, got in [("n-layer", n_layer, spatial), ("factorized-layers", lf, factorized)]:
        if want is not None and want != got:
            prefix = "spatial_blocks" if what == "n-layer" else "factorized_blocks"
            raise ConvertError(f"the checkpoint has {got} '{prefix}' blocks (transformer.{prefix}.0..{got - 1}), "
                               f"but --{what} (or the preset) says {want}")
    if dim % n_head != 0 or (dim // n_head) % 4 != 0:
        raise ConvertError(f"dim {dim} / n_head {n_head} must be a whole head width divisible by 4")
    classes = rows_of(found, "class_emb.embedding_table.weight") - 1
    if args.num_classes is not None and args.num_classes != classes:
        raise ConvertError(f"tensor 'transformer.class_emb.embedding_table.weight' has {classes + 1} rows "
                           f"(C + 1 with the null class), but --num-classes says {args.num_classes}")
    b0, b1 = bits_of(found, "pre_emb.weight"), bits_of(found, "post_emb.weight")
    ffn = args.ffn_hidden if args.ffn_hidden is not None else L.find_multiple(int(2 * 4 * dim / 3), 256)
    return {"vocab_size": 1 << (b0 + b1), "num_classes": classes, "grid_size": args.grid_size, "dim": dim,
            "n_layer": spatial, "n_head": n_head, "ffn_hidden": ffn, "norm_eps": args.norm_eps,
            "rope_base": args.rope_base, "window": 1, "plugin_depth": 0, "residual": True, "base": "open-magvit2",
            "factorized_n_layer": factorized, "factorized_bits": [b0, b1]}


def convert(found: Dict[str, object], cfg: dict) -> "collections.OrderedDict[str, object]":
    """SPEC section 8's tensors in table order, each checked; anything else is an error."""
    table = model_table(cfg)
    expected = dict(table)
    errors = []
    for name, v in found.items():
        if name in expected or any(p.search(name) for p in _IGNORABLE) or not hasattr(v, "shape"):
            continue
        errors.append(f"tensor 'transformer.{name}' (shape {list(v.shape)}) is not part of the Open-MAGVIT2 model")
    out = collections.OrderedDict()
    for name, shape in table:
        v = found.get(name)
        if v is None or not hasattr(v, "numpy"):
            errors.append(f"missing tensor 'transformer.{name}' (expected shape {list(shape)})")
        elif tuple(v.shape) != tuple(shape):
            errors.append(f"tensor 'transformer.{name}' has shape {list(v.shape)}, the config expects {list(shape)}")
        else:
            out[name] = v
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConvertError(errors[0] + more)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="Open-MAGVIT2 AR checkpoint (Lightning .ckpt, torch zip format)")
    ap.add_argument("output", help="output .safetensors")
    ap.add_argument("--preset", help="model size: B, L, XL (SPEC section 8) or tiny, small")
    ap.add_argument("--dim", type=int)
    ap.add_argument("--n-layer", type=int, help="spatial blocks")
    ap.add_argument("--n-head", type=int)
    ap.add_argument("--factorized-layers", type=int, help="factorized blocks (default: from the checkpoint)")
    ap.add_argument("--ffn-hidden", type=int, help="default: find_multiple(int(2*4*dim/3), 256)")
    ap.add_argument("--num-classes", type=int, help="default: from class_emb (its rows minus the null class)")
    ap.add_argument("--grid-size", type=int, default=16, help="tokens per side (256px / 16 = 16)")
    ap.add_argument("--norm-eps", type=float, default=1e-5)
    ap.add_argument("--rope-base", type=float, default=10000.0)
    ap.add_argument("--torch", action="store_true", help="read with torch.load (trusted files only)")
    args = ap.parse_args(argv)
    try:
        obj = load_torch(args.checkpoint) if args.torch else load_lightning_checkpoint(args.checkpoint)
        found, others, facts = transformer_tensors(obj)
        cfg = resolve_config(args, found)
        tensors = convert(found, cfg)
        source = f"Open-MAGVIT2 checkpoint {os.path.basename(args.checkpoint)}"
        if facts:
            source += " (" + ", ".join(f"{k} {facts[k]}" for k in sorted(facts)) + ")"
        meta = {"tensorar.config": json.dumps(cfg, sort_keys=True), "tensorar.source": source}
        L.write_safetensors(args.output, tensors, meta)
        n = sum(int(np.prod(v.shape)) for v in tensors.values())
        print(f"wrote {args.output}: {len(tensors)} tensors, {n:,} parameters, float32; left out {others} other "
              f"state_dict entries (tokenizer, loss networks); tensorar.config {meta['tensorar.config']}")
        return 0
    except (ConvertError, L.ConvertError) as e:
        print(f"convert_open_magvit2: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"convert_open_magvit2: {e.filename or args.output}: {e.strerror}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
