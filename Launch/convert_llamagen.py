#!/usr/bin/env python3
"""Convert a LlamaGen class-to-image GPT checkpoint (.pt) into TensorAR safetensors.

    python3 Launch/convert_llamagen.py results/000-GPT-B/checkpoints/0050000.pt gpt-b.safetensors
    python3 Launch/convert_llamagen.py 0050000.pt gpt-b-ema.safetensors --weights ema
    python3 Launch/convert_llamagen.py c2i_B_256.pt gpt-b.safetensors --preset B --grid-size 16

The output holds float32 tensors under the SPEC section 2 names (LlamaGen's own) and a
`tensorar.config` metadata entry (SPEC section 7) with the model's shape, so no later program
needs a preset flag. The shape comes from, in this order: the flags; the `args` namespace that
LlamaGen's train_c2i.py saves in its checkpoints (gpt_model, vocab_size, num_classes,
image_size / downsample_size); what the tensors show (vocabulary, classes, width, layers, FFN).
A flag that contradicts `args` is an error naming both values; one that contradicts a tensor is
an error naming the tensor. The head count and the grid show in no tensor: a bare state_dict
(a released c2i_*.pt) needs --preset or --n-head, and --grid-size. `--weights ema` converts the
`ema` entry that train_c2i.py --ema saves instead of `model`. Every failure is one line,
`convert_llamagen: <file>: <problem>`, and exit status 2.

Only numpy is needed. The checkpoint (torch's zip format, torch >= 1.6) is read with a
restricted unpickler that knows only tensor rebuilding, torch storage types, OrderedDict and
argparse.Namespace (kept as inert data: LlamaGen training checkpoints carry their args);
anything else is refused. Storages are read lazily, so optimizer state costs nothing. This
reader covers every checkpoint torch >= 1.6 writes (LlamaGen needs torch 2), so there is no
torch-based path: torch's own weights_only loader refuses the `args` namespace anyway.
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
    "XXXL": (48, 40, 2560),
}
# LlamaGen's --gpt-model names (its GPT_models table), as train_c2i.py records them in `args`.
LLAMAGEN_MODELS = {
    "GPT-B": (12, 12, 768), "GPT-L": (24, 16, 1024), "GPT-XL": (36, 20, 1280),
    "GPT-XXL": (48, 24, 1536), "GPT-XXXL": (48, 40, 2560),
    "GPT-1B": (22, 32, 2048), "GPT-3B": (24, 32, 3200), "GPT-7B": (32, 32, 4096),
}
SHAPE_KEYS = ("vocab_size", "num_classes", "grid_size", "dim", "n_layer", "n_head", "ffn_hidden")
CONFIG_KEYS = SHAPE_KEYS + ("norm_eps", "rope_base", "window", "plugin_depth", "residual")


class ConvertError(Exception):
    """One problem, printed as `convert_llamagen: <file>: <problem>` (file: the checkpoint by default)."""

    def __init__(self, problem: str, file: Optional[str] = None):
        super().__init__(problem)
        self.file = file


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
            f"torch storages, OrderedDict and argparse.Namespace")

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
    if not os.path.isfile(path):
        raise ConvertError("no such file")
    if not zipfile.is_zipfile(path):
        raise ConvertError(f"not a zip-format torch checkpoint (saved by torch < 1.6 or "
                           f"with _use_new_zipfile_serialization=False); load and re-save it "
                           f"with torch >= 1.6")
    zf = zipfile.ZipFile(path)
    pkl = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
    pkl = [n for n in pkl if n.count("/") <= 1]
    if len(pkl) != 1:
        raise ConvertError(f"expected one <archive>/data.pkl record, found {pkl}")
    prefix = pkl[0][: -len("data.pkl")]
    big = False
    if f"{prefix}byteorder" in zf.namelist():
        big = zf.read(f"{prefix}byteorder").decode().strip() == "big"
    with zf.open(pkl[0]) as fh:
        try:
            return RestrictedUnpickler(fh, zf, prefix, big).load()
        except pickle.UnpicklingError as e:
            raise ConvertError(str(e)) from None


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


def select_state_dict(obj, weights: str = "model") -> Tuple[dict, str]:
    """The state_dict to convert: `model` (or `ema` with weights='ema') of a training checkpoint."""
    if not isinstance(obj, dict):
        raise ConvertError(f"the checkpoint holds a {type(obj).__name__}, not a state_dict")
    if weights == "ema":
        if not isinstance(obj.get("ema"), dict):
            keys = ", ".join(str(k) for k in obj)
            raise ConvertError(f"--weights ema: the checkpoint has no 'ema' state_dict (trained without "
                               f"--ema?); its keys: {keys}")
        return obj["ema"], "['ema']"
    for key in ("model", "module", "state_dict"):
        if key in obj and isinstance(obj[key], dict):
            return obj[key], f"['{key}']"
    return obj, "top level"


def strip_prefix(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
    return name


def _namespace_fields(ns) -> Optional[dict]:
    """The fields of an argparse.Namespace read by the restricted unpickler (or by torch)."""
    if isinstance(ns, InertRecord):
        state = ns.__dict__["_state"]
        return dict(state) if isinstance(state, dict) else None
    if isinstance(ns, argparse.Namespace):
        return vars(ns)
    return ns if isinstance(ns, dict) else None


def recorded_shape(obj) -> Dict[str, Tuple[int, str]]:
    """The shape LlamaGen's train_c2i.py records in a checkpoint's `args`: key -> (value, source)."""
    if not isinstance(obj, dict) or "args" not in obj:
        return {}
    fields = _namespace_fields(obj["args"])
    if fields is None:
        raise ConvertError(f"the checkpoint's 'args' is a {type(obj['args']).__name__}, not an argparse namespace")
    out: Dict[str, Tuple[int, str]] = {}
    gpt = fields.get("gpt_model")
    if gpt is not None:
        if gpt not in LLAMAGEN_MODELS:
            raise ConvertError(f"args.gpt_model '{gpt}' is not a LlamaGen GPT size ({', '.join(LLAMAGEN_MODELS)})")
        for key, value in zip(("n_layer", "n_head", "dim"), LLAMAGEN_MODELS[gpt]):
            out[key] = (value, f"args.gpt_model {gpt}")
    for key in ("vocab_size", "num_classes"):
        if fields.get(key) is not None:
            out[key] = (int(fields[key]), f"args.{key}")
    image, down = fields.get("image_size"), fields.get("downsample_size")
    if image is not None and down is not None:
        if int(down) <= 0 or int(image) % int(down) != 0:
            raise ConvertError(f"args.image_size {image} is not a multiple of args.downsample_size {down}")
        out["grid_size"] = (int(image) // int(down), f"args.image_size {image} / args.downsample_size {down}")
    if fields.get("cls_token_num", 1) != 1:
        raise ConvertError(f"args.cls_token_num is {fields['cls_token_num']}: only 1 class token is supported")
    if fields.get("gpt_type", "c2i") != "c2i":
        raise ConvertError(f"args.gpt_type is '{fields['gpt_type']}': only class-to-image (c2i) models convert")
    return out


def flag_shape(args) -> Dict[str, Tuple[int, str]]:
    """The shape the flags give: key -> (value, flag). Explicit flags override --preset."""
    out: Dict[str, Tuple[int, str]] = {}
    if args.preset:
        shape = PRESETS.get(args.preset) or LLAMAGEN_MODELS.get(args.preset)
        if shape is None:
            known = ", ".join(list(PRESETS) + list(LLAMAGEN_MODELS))
            raise ConvertError(f"--preset: unknown preset '{args.preset}'; known: {known}")
        for key, value in zip(("n_layer", "n_head", "dim"), shape):
            out[key] = (value, f"--preset {args.preset}")
    for key in SHAPE_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            out[key] = (value, f"--{key.replace('_', '-')} {value}")
    return out


def tensor_shape(sd: dict) -> Dict[str, Tuple[int, str]]:
    """What the tensors themselves show (never the head count, nor the grid)."""
    names = {strip_prefix(str(k)): v for k, v in sd.items() if hasattr(v, "shape")}
    out: Dict[str, Tuple[int, str]] = {}
    tok = names.get("tok_embeddings.weight")
    if tok is not None and len(tok.shape) == 2:
        out["vocab_size"] = (int(tok.shape[0]), f"tok_embeddings.weight {list(tok.shape)}")
        out["dim"] = (int(tok.shape[1]), f"tok_embeddings.weight {list(tok.shape)}")
    cls = names.get("cls_embedding.embedding_table.weight")
    if cls is not None and len(cls.shape) == 2:
        out["num_classes"] = (int(cls.shape[0]) - 1, f"cls_embedding.embedding_table.weight {list(cls.shape)}")
    layers = [int(m.group(1)) for m in (re.match(r"layers\.(\d+)\.", n) for n in names) if m]
    if layers:
        out["n_layer"] = (max(layers) + 1, f"layers.{max(layers)}.*")
    w1 = names.get("layers.0.feed_forward.w1.weight")
    if w1 is not None and len(w1.shape) == 2:
        out["ffn_hidden"] = (int(w1.shape[0]), f"layers.0.feed_forward.w1.weight {list(w1.shape)}")
    return out


def resolve_config(args, sd: Optional[dict] = None, recorded: Optional[dict] = None, log=print) -> dict:
    """The model shape: flags, then the checkpoint's args, then what the tensors show.
    A flag that contradicts the args is an error naming both values; a flag that contradicts a
    tensor is caught by `convert` (which names the tensor)."""
    flags, recorded = flag_shape(args), recorded or {}
    shape: Dict[str, Tuple[int, str]] = {}
    for key in SHAPE_KEYS:
        if key in flags and key in recorded and flags[key][0] != recorded[key][0]:
            raise ConvertError(f"{flags[key][1]} contradicts the checkpoint's {recorded[key][1]} "
                               f"({key} {flags[key][0]} vs {recorded[key][0]})")
        if key in flags:
            shape[key] = flags[key]
        elif key in recorded:
            shape[key] = recorded[key]
    for key, found in tensor_shape(sd or {}).items():
        shape.setdefault(key, found)
    if "n_head" not in shape:
        raise ConvertError("the head count is not recorded (no args.gpt_model) and no tensor shape shows it: "
                           "give --n-head or --preset (B, L, XL, XXL, XXXL or GPT-B, ...)")
    if "grid_size" not in shape:
        raise ConvertError("the grid size is not recorded (no args.image_size / args.downsample_size): "
                           "give --grid-size (image size / tokenizer downsampling, e.g. 256 / 16 = 16)")
    missing = [k for k in ("vocab_size", "num_classes", "dim", "n_layer") if k not in shape]
    if missing:
        raise ConvertError(f"no tensor shows {', '.join(missing)}: is this a LlamaGen GPT checkpoint?")
    cfg = {key: value for key, (value, _) in shape.items()}
    dim, n_head = cfg["dim"], cfg["n_head"]
    if n_head <= 0 or dim % n_head != 0 or (dim // n_head) % 4 != 0:
        raise ConvertError(f"dim {dim} / n_head {n_head} must be a whole head width divisible by 4")
    cfg.setdefault("ffn_hidden", find_multiple(int(2 * 4 * dim / 3), 256))
    log("shape: " + ", ".join(f"{k} {shape[k][0]} ({shape[k][1]})" for k in SHAPE_KEYS if k in shape))
    cfg.update(norm_eps=args.norm_eps, rope_base=args.rope_base, window=1, plugin_depth=0, residual=True)
    return {key: cfg[key] for key in CONFIG_KEYS}


def convert(sd: dict, cfg: dict, log=print) -> "collections.OrderedDict[str, object]":
    """Picks, renames and checks the tensors. Returns name -> LazyTensor."""
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
        raise ConvertError("; ".join(errors))
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


class OneLineParser(argparse.ArgumentParser):
    """Flag errors as one `convert_llamagen: <problem>` line, like every other failure."""

    def error(self, message):
        self.exit(2, f"convert_llamagen: {message} (see --help)\n")


def parse_args(argv):
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="LlamaGen GPT checkpoint (.pt, torch zip format)")
    ap.add_argument("output", help="output .safetensors")
    ap.add_argument("--weights", choices=["model", "ema"], default="model",
                    help="which weights of a train_c2i.py checkpoint: 'model' (default) or 'ema'")
    ap.add_argument("--preset", help="model size: B, L, XL, XXL, XXXL, LlamaGen's GPT-B, ..., or tiny, small")
    ap.add_argument("--dim", type=int)
    ap.add_argument("--n-layer", type=int)
    ap.add_argument("--n-head", type=int)
    ap.add_argument("--ffn-hidden", type=int, help="default: find_multiple(int(2*4*dim/3), 256)")
    ap.add_argument("--vocab-size", type=int, help="default: args.vocab_size, else tok_embeddings rows")
    ap.add_argument("--num-classes", type=int, help="default: args.num_classes, else cls_embedding rows - 1")
    ap.add_argument("--grid-size", type=int, help="tokens per side; default: args.image_size / downsample_size")
    ap.add_argument("--norm-eps", type=float, default=1e-5)
    ap.add_argument("--rope-base", type=float, default=10000.0)
    return ap.parse_args(argv)


def run(args) -> None:
    obj = load_checkpoint_numpy(args.checkpoint)
    sd, where = select_state_dict(obj, args.weights)
    print(f"state_dict at {where}: {len(sd)} entries")
    cfg = resolve_config(args, sd, recorded_shape(obj))
    tensors = convert(sd, cfg)
    kinds = collections.Counter(v.dtype_name for v in tensors.values())
    steps = obj.get("steps") if isinstance(obj, dict) else None
    source = f"LlamaGen checkpoint {os.path.basename(args.checkpoint)}, {args.weights} weights"
    if isinstance(steps, int):
        source += f", step {steps}"
    meta = {"tensorar.config": json.dumps(cfg, sort_keys=True), "tensorar.source": source}
    try:
        write_safetensors(args.output, tensors, meta)
    except OSError as e:
        raise ConvertError(f"cannot write: {e.strerror or e}", args.output) from None
    n = sum(int(np.prod(v.shape)) for v in tensors.values())
    print(f"wrote {args.output}: {len(tensors)} tensors, {n:,} parameters, float32 "
          f"(from {dict(kinds)}); tensorar.config {meta['tensorar.config']}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
        return 0
    except ConvertError as e:
        problem = str(e).replace("\n", " ")
        print(f"convert_llamagen: {e.file or args.checkpoint}: {problem}", file=sys.stderr)
    except (OSError, zipfile.BadZipFile, KeyError, EOFError, pickle.UnpicklingError, ValueError) as e:
        problem = f"unreadable checkpoint ({type(e).__name__}: {e})".replace("\n", " ")
        print(f"convert_llamagen: {args.checkpoint}: {problem}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
