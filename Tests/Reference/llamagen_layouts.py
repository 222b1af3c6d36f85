"""LlamaGen's on-disk layouts, built without torch, for the tests.

- `CheckpointBuilder` writes a checkpoint the way torch.save does: a zip with
  `archive/data.pkl` (pickle protocol 2) and one `archive/data/<key>` record per storage; each
  tensor pickles as REDUCE(torch._utils._rebuild_tensor_v2, (storage, offset, size, stride,
  requires_grad, OrderedDict())) and each storage as the persistent id
  ('storage', torch.<Type>Storage, key, location, numel).
- `train_c2i_checkpoint` builds the dict LlamaGen's autoregressive/train/train_c2i.py saves:
  `model`, `optimizer`, `steps`, `args` (its argparse namespace) and, with --ema, `ema`.
- `extract_codes` lays out codes as LlamaGen's extract_codes_c2i.py writes them:
  `<code_path>/<name>_codes/{i}.npy` (int64 (1, A, T)) and `<code_path>/<name>_labels/{i}.npy`
  (int64 (1,)), A = 2 with flip (the image and its mirror), 10 or 20 for ten-crop folders.

    python3 Tests/Reference/llamagen_layouts.py codes ROOT NAME N A T V C SEED
    (writes one code folder pair; the Swift import tests call it)
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import pickle
import sys
import zipfile

import numpy as np


class FakeGlobal:
    """Pickles as GLOBAL '<module>\\n<name>' (what a torch function or class pickles as)."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):          # pickle only checks that a reduce function is callable
        raise RuntimeError("a stand-in, never called")


class FakeStorage:
    def __init__(self, type_name, key, data: bytes, numel: int):
        self.type_name, self.key, self.data, self.numel = type_name, key, data, numel


class FakeTensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def __reduce_ex__(self, protocol):
        return (FakeGlobal("torch._utils", "_rebuild_tensor_v2"),
                (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict()))


class FakeEvil:
    def __reduce_ex__(self, protocol):
        return (FakeGlobal("os", "system"), ("echo pwned > /tmp/convert_llamagen_pwned",))


class TorchLikePickler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_fake_global(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("utf-8"))
        self.memoize(obj)

    dispatch[FakeGlobal] = _save_fake_global

    def persistent_id(self, obj):
        if isinstance(obj, FakeStorage):
            return ("storage", FakeGlobal("torch", obj.type_name), obj.key, "cpu", obj.numel)
        return None


class CheckpointBuilder:
    """Collects storages; `tensor()` adds a contiguous tensor with its own storage."""

    def __init__(self):
        self.storages = []

    def storage(self, a: np.ndarray, kind="float32"):
        key = str(len(self.storages))
        a = np.ascontiguousarray(a).ravel()
        if kind == "float32":
            s = FakeStorage("FloatStorage", key, a.astype("<f4").tobytes(), a.size)
        elif kind == "float16":
            s = FakeStorage("HalfStorage", key, a.astype("<f2").tobytes(), a.size)
        elif kind == "bfloat16":
            bits = (a.astype("<f4").view("<u4") >> 16).astype("<u2")
            s = FakeStorage("BFloat16Storage", key, bits.tobytes(), a.size)
        elif kind == "int64":
            s = FakeStorage("LongStorage", key, a.astype("<i8").tobytes(), a.size)
        else:
            raise ValueError(kind)
        self.storages.append(s)
        return s

    def tensor(self, a: np.ndarray, kind="float32"):
        a = np.asarray(a)
        st = self.storage(a, kind)
        stride = [int(np.prod(a.shape[i + 1:])) for i in range(a.ndim)]
        return FakeTensor(st, 0, a.shape, stride)

    def write(self, path, obj, prefix="archive"):
        buf = io.BytesIO()
        TorchLikePickler(buf, protocol=2).dump(obj)
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
            z.writestr(f"{prefix}/data.pkl", buf.getvalue())
            z.writestr(f"{prefix}/byteorder", "little")
            for s in self.storages:
                z.writestr(f"{prefix}/data/{s.key}", s.data)
            z.writestr(f"{prefix}/version", "3\n")
            z.writestr(f"{prefix}/.data/serialization_id", "0123456789")


def train_c2i_args(**fields) -> argparse.Namespace:
    """train_c2i.py's argparse namespace with its defaults, overridden by `fields`."""
    args = dict(code_path="/data/imagenet_code_c2i_flip_ten_crop", cloud_save_path="/tmp/cloud",
                no_local_save=False, gpt_model="GPT-B", gpt_ckpt=None, gpt_type="c2i",
                vocab_size=16384, ema=True, cls_token_num=1, dropout_p=0.1, token_dropout_p=0.1,
                drop_path_rate=0.0, no_compile=False, results_dir="results", dataset="imagenet_code",
                image_size=256, downsample_size=16, num_classes=1000, epochs=300, lr=1e-4,
                weight_decay=5e-2, beta1=0.9, beta2=0.95, max_grad_norm=1.0, global_batch_size=256,
                global_seed=0, num_workers=24, log_every=100, ckpt_every=5000,
                gradient_accumulation_steps=1, mixed_precision="bf16", rank=0, world_size=8, gpu=0,
                dist_url="env://", distributed=True, dist_backend="nccl")
    args.update(fields)
    return argparse.Namespace(**args)


def train_c2i_checkpoint(path, model: dict, ema: dict = None, steps=5000, **arg_fields):
    """Writes `path` as train_c2i.py saves a checkpoint (float32 tensors)."""
    b = CheckpointBuilder()
    sd = collections.OrderedDict((n, b.tensor(a)) for n, a in model.items())
    opt = {"state": {i: {"step": b.tensor(np.array(float(steps))),
                         "exp_avg": b.tensor(np.zeros_like(a)), "exp_avg_sq": b.tensor(np.zeros_like(a))}
                     for i, a in enumerate(model.values())},
           "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95), "weight_decay": 0.05,
                             "params": list(range(len(model)))}]}
    ck = {"model": sd, "optimizer": opt, "steps": steps, "args": train_c2i_args(**arg_fields)}
    if ema is not None:
        ck["ema"] = collections.OrderedDict((n, b.tensor(a)) for n, a in ema.items())
    b.write(path, ck)


def write_npy(path, a: np.ndarray):
    with open(path, "wb") as f:
        np.save(f, a)


def extract_codes(root, name, n, a, t, vocab, classes, seed=0):
    """One `<name>_codes` / `<name>_labels` folder pair under root; returns (codes, labels)."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, vocab, size=(n, 1, a, t), dtype=np.int64)
    labels = rng.integers(0, classes, size=(n, 1), dtype=np.int64)
    for kind in ("codes", "labels"):
        os.makedirs(os.path.join(root, f"{name}_{kind}"), exist_ok=True)
    for i in range(n):
        write_npy(os.path.join(root, f"{name}_codes", f"{i}.npy"), codes[i])
        write_npy(os.path.join(root, f"{name}_labels", f"{i}.npy"), labels[i])
    return codes, labels


if __name__ == "__main__":
    if len(sys.argv) != 11 or sys.argv[1] != "codes":
        sys.exit(__doc__)
    root, name = sys.argv[2], sys.argv[3]
    extract_codes(root, name, *map(int, sys.argv[4:11]))
