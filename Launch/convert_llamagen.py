#!/usr/bin/env python3
"""Convert a LlamaGen class-to-image GPT checkpoint (.pt) into TensorAR safetensors.

    python3 Launch/convert_llamagen.py c2i_B_256.pt gpt-b.safetensors --preset B
    python3 Launch/convert_llamagen.py ckpt.pt out.safetensors --dim 768 --n-layer 12 --n-head 12 \
        --vocab-size 16384 --num-classes 1000 --grid-size 16

The output holds float32 tensors under the SPEC section 2 names (LlamaGen's own) and a
`tensorar.config` metadata entry (SPEC section 7) built from the flags and checked against
every tensor's shape: a contradiction is an error that names the tensor.

Only numpy is needed. The checkpoint (torch's zip format, torch >= 1.6) is read with a
restricted unpickler that knows only tensor rebuilding, torch storage types, OrderedDict and
argparse.Namespace (kept as inert data: LlamaGen training checkpoints carry their args);
anything else is refused. Storages are read lazily, so optimizer state costs nothing.
`--torch` uses torch.load(weights_only=True) instead, when torch is installed.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pickle
import re
import struct
import sys
import zipfile
from typing import Dict, List, Optional, Tuple

import numpy as np

# (n_layer, n_head, dim); SPEC section 2 (B..XXL are LlamaGen's GPT sizes; tiny/small ours).
PRESETS = {
    "tiny": (2, 2, 64), "small": (4, 4, 128),
    "B": (12, 12, 768), "L": (24, 16, 1024), "XL": (36, 20, 1280), "XXL": (48, 24, 1536),
}


class ConvertError(Exception):
    pass


# --------------------------------------------------------------------------------------------
# Restricted reading of torch's zip checkpoint format
# --------------------------------------------------------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": "f4", "DoubleStorage": "f8", "HalfStorage": "f2", "BFloat16Storage": "bf16",
    "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?",
}


class StorageType:
    """Stands in for torch.FloatStorage etc. (only its name matters)."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]

    def __repr__(self):
        return f"torch.{self.name}"


class Storage:
    """One storage record of the zip (`<prefix>/data/<key>`), read on first use."""

    def __init__(self, zf: zipfile.ZipFile, prefix: str, key: str, stype: StorageType,
                 numel: int, big_endian: bool):
        self.zf, self.prefix, self.key, self.stype, self.numel = zf, prefix, key, stype, numel
        self.big_endian = big_endian
        self._array = None

    def array(self) -> np.ndarray:
        if self._array is None:
            raw = self.zf.read(f"{self.prefix}data/{self.key}")
            code = "u2" if self.stype.dtype == "bf16" else self.stype.dtype
            dt = np.dtype(code)
            if dt.itemsize > 1:
                dt = dt.newbyteorder(">" if self.big_endian else "<")
            a = np.frombuffer(raw, dtype=dt)
            if a.size < self.numel:
                raise ConvertError(f"storage {self.key}: {a.size} elements on disk, {self.numel} declared")
            self._array = a
        return self._array


class LazyTensor:
    """A tensor view (storage, offset, size, stride), materialised only when kept."""

    def __init__(self, storage: Storage, offset: int, size, stride):
        self.storage, self.offset = storage, int(offset)
        self.shape = tuple(int(s) for s in size)
        self.stride = tuple(int(s) for s in stride)

    @property
    def dtype_name(self) -> str:
        return self.storage.stype.dtype

    def numpy(self) -> np.ndarray:
        a = self.storage.array()
        n = int(np.prod(self.shape)) if self.shape else 1
        if n == 0:
            out = np.zeros(self.shape, dtype=a.dtype)
        else:
            last = self.offset + sum((s - 1) * st for s, st in zip(self.shape, self.stride))
            if self.offset < 0 or last >= a.size:
                raise ConvertError(f"tensor view outside storage {self.storage.key}")
            out = np.lib.stride_tricks.as_strided(
                a[self.offset:], shape=self.shape,
                strides=tuple(st * a.itemsize for st in self.stride), writeable=False).copy()
        if self.storage.stype.dtype == "bf16":
            out = (out.astype(np.uint32) << 16).view(np.float32)
        return out


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    if not isinstance(storage, Storage):
        raise ConvertError("a tensor without a storage record")
    return LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *rest):
    return data


class InertRecord:
    """argparse.Namespace in a training checkpoint: kept as plain data, never called."""

    def __init__(self, *args, **kwargs):
        self.__dict__["_state"] = {}

    def __setstate__(self, state):
        self.__dict__["_state"] = state


class RestrictedUnpickler(pickle.Unpickler):
    ALLOWED = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("argparse", "Namespace"): InertRecord,
    }

    def __init__(self, fh, zf, prefix, big_endian):
        super().__init__(fh)
        self.zf, self.prefix, self.big_endian = zf, prefix, big_endian
        self.storages: Dict[str, Storage] = {}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return StorageType(name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: the checkpoint reader only accepts tensors, "
            f"torch storages, OrderedDict and argparse.Namespace (use --torch with torch "
            f"installed for anything else)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, StorageType):
            raise pickle.UnpicklingError(f"unexpected storage type {stype!r}")
        key = str(key)
        if key not in self.storages:
            self.storages[key] = Storage(self.zf, self.prefix, key, stype, int(numel), self.big_endian)
        return self.storages[key]


def load_checkpoint_numpy(path: str):
    """The unpickled checkpoint object, tensors as LazyTensor."""
    if not zipfile.is_zipfile(path):
        raise ConvertError(f"{path}: not a zip-format torch checkpoint (saved by torch < 1.6 or "
                           f"with _use_new_zipfile_serialization=False); re-save it with a "
                           f"recent torch, or pass --torch with torch installed")
    zf = zipfile.ZipFile(path)
    pkl = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
    pkl = [n for n in pkl if n.count("/") <= 1]
    if len(pkl) != 1:
        raise ConvertError(f"{path}: expected one <archive>/data.pkl record, found {pkl}")
    prefix = pkl[0][: -len("data.pkl")]
    big = False
    if f"{prefix}byteorder" in zf.namelist():
        big = zf.read(f"{prefix}byteorder").decode().strip() == "big"
    with zf.open(pkl[0]) as fh:
        try:
            return RestrictedUnpickler(fh, zf, prefix, big).load()
        except pickle.UnpicklingError as e:
            raise ConvertError(f"{path}: {e}") from None


class NumpyTensor:
    """Adapter for tensors that torch.load produced."""

    def __init__(self, a: np.ndarray, dtype_name: str):
        self.a, self.shape, self.dtype_name = a, tuple(a.shape), dtype_name

    def numpy(self):
        return self.a


def load_checkpoint_torch(path: str):
    import torch  # noqa: only with --torch

    obj = torch.load(path, map_location="cpu", weights_only=True)

    def conv(o):
        if isinstance(o, torch.Tensor):
            name = str(o.dtype).replace("torch.", "")
            return NumpyTensor(o.detach().to(torch.float32).numpy() if o.is_floating_point()
                               else o.detach().numpy(), name)
        if isinstance(o, dict):
            return collections.OrderedDict((k, conv(v)) for k, v in o.items())
        return o

    return conv(obj)


# --------------------------------------------------------------------------------------------
# The model table (SPEC section 2) and the conversion
# --------------------------------------------------------------------------------------------

def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


def base_table(cfg: dict) -> List[Tuple[str, Tuple[int, ...]]]:
    D, F, V, C = cfg["dim"], cfg["ffn_hidden"], cfg["vocab_size"], cfg["num_classes"]
    t = [("cls_embedding.embedding_table.weight", (C + 1, D)), ("tok_embeddings.weight", (V, D))]
    for l in range(cfg["n_layer"]):
        p = f"layers.{l}"
        t += [(f"{p}.attention_norm.weight", (D,)), (f"{p}.attention.wqkv.weight", (3 * D, D)),
              (f"{p}.attention.wo.weight", (D, D)), (f"{p}.ffn_norm.weight", (D,)),
              (f"{p}.feed_forward.w1.weight", (F, D)), (f"{p}.feed_forward.w3.weight", (F, D)),
              (f"{p}.feed_forward.w2.weight", (D, F))]
    t += [("norm.weight", (D,)), ("output.weight", (V, D))]
    return t


# Keys LlamaGen may carry that the model does not use (buffers, caches).
_IGNORABLE = [re.compile(r"(^|\.)freqs_cis$"), re.compile(r"(^|\.)kv_cache\."),
              re.compile(r"(^|\.)causal_mask$")]
_PREFIXES = ("module.", "_orig_mod.")


def select_state_dict(obj) -> Tuple[dict, str]:
    if isinstance(obj, dict):
        for key in ("model", "module", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key], f"['{key}']"
        return obj, "top level"
    raise ConvertError(f"the checkpoint holds a {type(obj).__name__}, not a state_dict")


def strip_prefix(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
    return name


def resolve_config(args) -> dict:
    shape = PRESETS.get(args.preset) if args.preset else None
    if args.preset and shape is None:
        raise ConvertError(f"--preset: unknown preset '{args.preset}'; known: {', '.join(PRESETS)}")
    n_layer = args.n_layer if args.n_layer is not None else (shape[0] if shape else None)
    n_head = args.n_head if args.n_head is not None else (shape[1] if shape else None)
    dim = args.dim if args.dim is not None else (shape[2] if shape else None)
    if None in (n_layer, n_head, dim):
        raise ConvertError("give --preset (B, L, XL, XXL, tiny, small) or all of --dim, --n-layer, --n-head")
    if dim % n_head != 0 or (dim // n_head) % 4 != 0:
        raise ConvertError(f"dim {dim} / n_head {n_head} must be a whole head width divisible by 4")
    ffn = args.ffn_hidden if args.ffn_hidden is not None else find_multiple(int(2 * 4 * dim / 3), 256)
    return {
        "vocab_size": args.vocab_size, "num_classes": args.num_classes, "grid_size": args.grid_size,
        "dim": dim, "n_layer": n_layer, "n_head": n_head, "ffn_hidden": ffn,
        "norm_eps": args.norm_eps, "rope_base": args.rope_base,
        "window": 1, "plugin_depth": 0, "residual": True,
    }


def convert(obj, cfg: dict, log=print) -> "collections.OrderedDict[str, object]":
    """Picks, renames and checks the tensors. Returns name -> tensor (LazyTensor/NumpyTensor)."""
    sd, where = select_state_dict(obj)
    log(f"state_dict at {where}: {len(sd)} entries")
    found: Dict[str, object] = {}
    origin: Dict[str, str] = {}
    for raw, v in sd.items():
        name = strip_prefix(str(raw))
        if name in found:
            raise ConvertError(f"tensor '{raw}' and '{origin[name]}' both map to '{name}'")
        found[name], origin[name] = v, str(raw)
    table = base_table(cfg)
    expected = dict(table)
    desc = (f"vocab_size {cfg['vocab_size']}, num_classes {cfg['num_classes']}, dim {cfg['dim']}, "
            f"n_layer {cfg['n_layer']}, ffn_hidden {cfg['ffn_hidden']}")
    dropped, errors = [], []
    for name, v in found.items():
        if name in expected:
            continue
        if any(p.search(name) for p in _IGNORABLE) or not hasattr(v, "shape"):
            dropped.append(origin[name])
        elif name.endswith(".weight") or name.endswith(".bias"):
            errors.append(f"tensor '{origin[name]}' (shape {list(v.shape)}) has no place in the "
                          f"config ({desc}): wrong --preset or --n-layer?")
        else:
            dropped.append(origin[name])
    missing = [n for n, _ in table if n not in found]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        errors.append(f"missing tensors for the config ({desc}): {', '.join(missing[:5])}{more}")
    out = collections.OrderedDict()
    for name, shape in table:
        if name not in found:
            continue
        v = found[name]
        if not hasattr(v, "shape") or not hasattr(v, "numpy"):
            errors.append(f"'{origin[name]}' is a {type(v).__name__}, not a tensor")
            continue
        if tuple(v.shape) != tuple(shape):
            errors.append(f"tensor '{origin[name]}' has shape {list(v.shape)}, the config "
                          f"({desc}) expects {list(shape)}")
            continue
        out[name] = v
    if errors:
        raise ConvertError("\n".join(errors))
    if dropped:
        log(f"dropped {len(dropped)} unused entries: {', '.join(dropped)}")
    return out


def write_safetensors(path: str, tensors: "collections.OrderedDict[str, object]", meta: Dict[str, str]):
    """Streams float32 tensors: one materialised at a time."""
    header = {"__metadata__": meta}
    off = 0
    for name, v in tensors.items():
        n = int(np.prod(v.shape)) * 4
        header[name] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * ((8 - len(hb) % 8) % 8)
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name, v in tensors.items():
            a = np.asarray(v.numpy())
            if a.dtype.kind not in "fiu":
                raise ConvertError(f"tensor '{name}' has dtype {a.dtype}, not a number")
            a = np.ascontiguousarray(a.astype("<f4"))
            if a.shape != tuple(v.shape):
                raise ConvertError(f"tensor '{name}': read {a.shape}, expected {v.shape}")
            f.write(a.tobytes())
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="LlamaGen GPT checkpoint (.pt, torch zip format)")
    ap.add_argument("output", help="output .safetensors")
    ap.add_argument("--preset", help="model size: B, L, XL, XXL (LlamaGen) or tiny, small")
    ap.add_argument("--dim", type=int)
    ap.add_argument("--n-layer", type=int)
    ap.add_argument("--n-head", type=int)
    ap.add_argument("--ffn-hidden", type=int, help="default: find_multiple(int(2*4*dim/3), 256)")
    ap.add_argument("--vocab-size", type=int, default=16384)
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--grid-size", type=int, default=16, help="tokens per side (256px / 16 = 16)")
    ap.add_argument("--norm-eps", type=float, default=1e-5)
    ap.add_argument("--rope-base", type=float, default=10000.0)
    ap.add_argument("--torch", action="store_true", help="read with torch.load(weights_only=True)")
    args = ap.parse_args(argv)
    try:
        cfg = resolve_config(args)
        obj = load_checkpoint_torch(args.checkpoint) if args.torch else load_checkpoint_numpy(args.checkpoint)
        tensors = convert(obj, cfg)
        kinds = collections.Counter(v.dtype_name for v in tensors.values())
        meta = {"tensorar.config": json.dumps(cfg, sort_keys=True),
                "tensorar.source": f"LlamaGen checkpoint {os.path.basename(args.checkpoint)}"}
        write_safetensors(args.output, tensors, meta)
        n = sum(int(np.prod(v.shape)) for v in tensors.values())
        print(f"wrote {args.output}: {len(tensors)} tensors, {n:,} parameters, float32 "
              f"(from {dict(kinds)}); tensorar.config {meta['tensorar.config']}")
        return 0
    except ConvertError as e:
        print(f"convert_llamagen: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
