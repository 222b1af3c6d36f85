"""Tests of Launch/convert_llamagen.py on fake torch-format zip checkpoints written here.

    python3 -m pytest -q Tests/Reference/test_convert.py

The fake checkpoints are built the way torch.save builds them: a zip with
`archive/data.pkl` (pickle protocol 2) and one `archive/data/<key>` record per storage; each
tensor pickles as REDUCE(torch._utils._rebuild_tensor_v2, (storage, offset, size, stride,
requires_grad, OrderedDict())) and each storage as the persistent id
('storage', torch.<Type>Storage, key, location, numel).
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "Launch"))
sys.path.insert(0, HERE)

import convert_llamagen as C  # noqa: E402
import safetensors_io  # noqa: E402

SCRIPT = os.path.join(ROOT, "Launch", "convert_llamagen.py")
TINY = ["--dim", "32", "--n-layer", "2", "--n-head", "4", "--vocab-size", "32",
        "--num-classes", "5", "--grid-size", "4"]


# ---------------------------------------------------------------------------- fake torch.save

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


def model_arrays(seed=0, V=32, Cn=5, D=32, L=2, F=256):
    rng = np.random.default_rng(seed)
    cfg = dict(vocab_size=V, num_classes=Cn, dim=D, n_layer=L, ffn_hidden=F)
    # values exactly representable in bfloat16 and float16 (multiples of 1/64, small)
    return collections.OrderedDict(
        (n, (rng.integers(-64, 64, size=s) / 64.0).astype(np.float32)) for n, s in C.base_table(cfg))


def run_script(*args):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True)


# ---------------------------------------------------------------------------- tests

def test_ddp_checkpoint_with_prefix_optimizer_args(tmp_path):
    arrays = model_arrays()
    b = CheckpointBuilder()
    sd = collections.OrderedDict()
    for n, a in arrays.items():
        sd["module." + n] = b.tensor(a)
    sd["module.freqs_cis"] = b.tensor(np.zeros((17, 4, 2), np.float32))
    sd._metadata = collections.OrderedDict([("", {"version": 1})])    # as torch state_dicts have
    opt = {"state": {0: {"step": b.tensor(np.array(3.0)), "exp_avg": b.tensor(np.ones((4, 4)))}},
           "param_groups": [{"lr": 1e-4, "params": [0]}]}
    ns = argparse.Namespace(gpt_model="GPT-B", lr=1e-4, image_size=256)
    ck = {"model": sd, "optimizer": opt, "steps": 1000, "args": ns}
    src, out = tmp_path / "ck.pt", tmp_path / "out.safetensors"
    b.write(src, ck)
    r = run_script(src, out, *TINY)
    assert r.returncode == 0, r.stderr
    assert "module.freqs_cis" in r.stdout          # dropped and reported
    t, meta = safetensors_io.read(str(out))
    assert list(t) == [n for n, _ in C.base_table(dict(vocab_size=32, num_classes=5, dim=32, n_layer=2, ffn_hidden=256))]
    for n, a in arrays.items():
        assert t[n].dtype == np.float32
        np.testing.assert_array_equal(t[n], a)
    cfg = json.loads(meta["tensorar.config"])
    assert cfg == {"vocab_size": 32, "num_classes": 5, "grid_size": 4, "dim": 32, "n_layer": 2,
                   "n_head": 4, "ffn_hidden": 256, "norm_eps": 1e-5, "rope_base": 10000.0,
                   "window": 1, "plugin_depth": 0, "residual": True}
    with open(out, "rb") as f:
        assert struct.unpack("<Q", f.read(8))[0] % 8 == 0


def test_half_bfloat16_shared_and_strided_storages(tmp_path):
    arrays = model_arrays(seed=1)
    b = CheckpointBuilder()
    sd = collections.OrderedDict()
    names = list(arrays)
    for i, n in enumerate(names):
        kind = ["float32", "float16", "bfloat16"][i % 3]
        sd["_orig_mod." + n] = b.tensor(arrays[n], kind)
    # output.weight as a transposed (non-contiguous) view of a [D, V] storage
    ow = arrays["output.weight"]                    # [V, D]
    st = b.storage(np.ascontiguousarray(ow.T))      # storage holds [D, V] row-major
    V, D = ow.shape
    sd["_orig_mod.output.weight"] = FakeTensor(st, 0, (V, D), (1, V))
    # two norm weights sharing one storage at different offsets
    a0, a1 = arrays["layers.0.attention_norm.weight"], arrays["layers.1.ffn_norm.weight"]
    shared = b.storage(np.concatenate([np.full(3, 9.0, np.float32), a0, a1]))
    sd["_orig_mod.layers.0.attention_norm.weight"] = FakeTensor(shared, 3, (32,), (1,))
    sd["_orig_mod.layers.1.ffn_norm.weight"] = FakeTensor(shared, 35, (32,), (1,))
    src, out = tmp_path / "ck.pt", tmp_path / "out.safetensors"
    b.write(src, sd, prefix="c2i_B_256")             # older torch names the folder after the file
    r = run_script(src, out, *TINY)
    assert r.returncode == 0, r.stderr
    t, _ = safetensors_io.read(str(out))
    for n, a in arrays.items():
        np.testing.assert_array_equal(t[n], a, err_msg=n)


def test_preset_and_default_flags():
    ns = argparse.Namespace(preset="B", dim=None, n_layer=None, n_head=None, ffn_hidden=None,
                            vocab_size=16384, num_classes=1000, grid_size=16, norm_eps=1e-5,
                            rope_base=10000.0)
    cfg = C.resolve_config(ns)
    assert (cfg["dim"], cfg["n_layer"], cfg["n_head"], cfg["ffn_hidden"]) == (768, 12, 12, 2048)
    ns.preset = "L"
    assert C.resolve_config(ns)["ffn_hidden"] == 2816
    ns.preset = "XL"
    assert C.resolve_config(ns)["ffn_hidden"] == 3584
    ns.preset = "XXL"
    assert C.resolve_config(ns)["ffn_hidden"] == 4096
    n = sum(int(np.prod(s)) for _, s in C.base_table(C.resolve_config(argparse.Namespace(**{**vars(ns), "preset": "B"}))))
    assert n == 110_888_448       # LlamaGen GPT-B (as SPEC's preset table says)


def test_shape_mismatch_names_the_tensor(tmp_path):
    arrays = model_arrays()
    arrays["layers.1.feed_forward.w3.weight"] = np.zeros((128, 32), np.float32)
    b = CheckpointBuilder()
    src = tmp_path / "ck.pt"
    b.write(src, {"model": collections.OrderedDict((n, b.tensor(a)) for n, a in arrays.items())})
    r = run_script(src, tmp_path / "o.safetensors", *TINY)
    assert r.returncode == 2
    assert "layers.1.feed_forward.w3.weight" in r.stderr and "[128, 32]" in r.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_vocab_mismatch_and_missing_and_extra_layer(tmp_path):
    arrays = model_arrays()
    b = CheckpointBuilder()
    src = tmp_path / "ck.pt"
    b.write(src, {"module": collections.OrderedDict((n, b.tensor(a)) for n, a in arrays.items())})
    r = run_script(src, tmp_path / "o.safetensors", *TINY[:-6], "--vocab-size", "64",
                   "--num-classes", "5", "--grid-size", "4")
    assert r.returncode == 2 and "tok_embeddings.weight" in r.stderr and "output.weight" in r.stderr
    # config with 3 layers: layers.2.* missing
    r = run_script(src, tmp_path / "o.safetensors", "--dim", "32", "--n-layer", "3", "--n-head", "4",
                   "--vocab-size", "32", "--num-classes", "5", "--grid-size", "4")
    assert r.returncode == 2 and "missing" in r.stderr and "layers.2.attention_norm.weight" in r.stderr
    # config with 1 layer: layers.1.* has no place
    r = run_script(src, tmp_path / "o.safetensors", "--dim", "32", "--n-layer", "1", "--n-head", "4",
                   "--vocab-size", "32", "--num-classes", "5", "--grid-size", "4")
    assert r.returncode == 2 and "layers.1." in r.stderr


def test_rejects_foreign_classes(tmp_path):
    b = CheckpointBuilder()
    src = tmp_path / "evil.pt"
    b.write(src, {"model": collections.OrderedDict([("x", FakeEvil())])})
    if os.path.exists("/tmp/convert_llamagen_pwned"):
        os.remove("/tmp/convert_llamagen_pwned")
    r = run_script(src, tmp_path / "o.safetensors", *TINY)
    assert r.returncode == 2
    assert "refusing to load os.system" in r.stderr
    assert not os.path.exists("/tmp/convert_llamagen_pwned")


def test_not_a_zip(tmp_path):
    src = tmp_path / "old.pt"
    src.write_bytes(pickle.dumps({"a": 1}))
    r = run_script(src, tmp_path / "o.safetensors", *TINY)
    assert r.returncode == 2 and "not a zip-format torch checkpoint" in r.stderr
