"""Tests of Launch/convert_rar.py on fake tiny RAR state_dicts written without torch
(llamagen_layouts.py's torch.save zip writer).

    python3 -m pytest -q Tests/Reference/test_convert_rar.py
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "Launch"))
sys.path.insert(0, HERE)

import convert_rar as CR  # noqa: E402
import safetensors_io  # noqa: E402
from llamagen_layouts import CheckpointBuilder, FakeEvil  # noqa: E402

SCRIPT = os.path.join(ROOT, "Launch", "convert_rar.py")
# D 32, 2 blocks, F 64, 4 heads (hd 8), V 32, C 5, grid 4 (T 16)
CFG = {"vocab_size": 32, "num_classes": 5, "grid_size": 4, "dim": 32, "n_layer": 2, "n_head": 4, "ffn_hidden": 64,
       "norm_eps": 1e-6, "rope_base": 10000.0, "window": 1, "plugin_depth": 0, "residual": True, "base": "rar"}
FLAGS = ["--dim", "32", "--n-layer", "2", "--n-head", "4", "--intermediate", "64", "--vocab-size", "32",
         "--num-classes", "5", "--grid-size", "4"]


def arrays(seed=0, cfg=CFG):
    rng = np.random.default_rng(seed)
    # multiples of 1/64: exact in bfloat16 and float16 too
    return collections.OrderedDict((n, (rng.integers(-64, 64, size=s) / 64.0).astype(np.float32))
                                   for n, s in CR.model_table(cfg))


def write_bin(path, tensors, kind=lambda n: "float32", prefix=""):
    b = CheckpointBuilder()
    sd = collections.OrderedDict((prefix + n, b.tensor(a, kind(n))) for n, a in tensors.items())
    b.write(path, sd)


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True)


def test_table_matches_the_reference_and_spec_counts():
    import reference_rar as A
    cfg = A.RARConfig(**{k: v for k, v in CFG.items() if k != "base"})
    assert CR.model_table(CFG) == [(n, s) for n, s, *_ in A.parameter_table(cfg)]
    for name, count in [("B", 260_923_648), ("L", 461_668_352), ("XL", 955_425_024), ("XXL", 1_498_520_704)]:
        D, L, F, NH, V, C, G = CR.PRESETS[name]
        table = CR.model_table({"dim": D, "n_layer": L, "ffn_hidden": F, "n_head": NH, "vocab_size": V,
                                "num_classes": C, "grid_size": G})
        assert sum(int(np.prod(s)) for _, s in table) == count, name


@pytest.mark.parametrize("flags", [FLAGS, [], ["--grid-size", "4", "--n-head", "4"]])
def test_round_trip_of_names_and_values(tmp_path, flags):
    a = arrays()
    src, out = tmp_path / "rar.bin", tmp_path / "rar.safetensors"
    write_bin(src, a, kind=lambda n: "bfloat16" if n.startswith("blocks.1.") else "float32")
    r = run(src, out, *flags)
    assert r.returncode == 0, r.stderr
    t, meta = safetensors_io.read(str(out))
    assert list(t) == list(a), "SPEC section 9's names, in its table order"
    for n, v in a.items():
        assert t[n].dtype == np.float32 and t[n].shape == v.shape
        np.testing.assert_array_equal(t[n], v, err_msg=n)
    assert json.loads(meta["tensorar.config"]) == CFG
    assert "rar.bin" in meta["tensorar.source"]
    assert "bf16" in r.stdout and "4,4" not in r.stdout


def test_wrapper_prefix_and_preset_shape(tmp_path):
    src, out = tmp_path / "rar.bin", tmp_path / "o.safetensors"
    write_bin(src, arrays(1), prefix="module.")
    assert run(src, out, *FLAGS).returncode == 0
    assert list(safetensors_io.read(str(out))[0])[0] == "cls_token"
    r = run(src, out, "--preset", "B")
    assert r.returncode == 2 and "--preset B says dim 768, but the tensor embeddings.weight [39, 32] shows 32" \
        in r.stderr, r.stderr


@pytest.mark.parametrize("flag,value,says", [
    ("--dim", "64", "--dim 64 says dim 64, but the tensor embeddings.weight [39, 32] shows 32"),
    ("--n-layer", "3", "--n-layer 3 says n-layer 3, but the tensor blocks.0..1 shows 2"),
    ("--n-head", "2", "--n-head 2 says n-head 2, but the tensor blocks.0.attn.q_norm.weight [8] (head width 8) "
                      "shows 4"),
    ("--intermediate", "128", "--intermediate 128 says intermediate 128, but the tensor blocks.0.mlp.fc1.weight "
                              "[64, 32] shows 64"),
    ("--vocab-size", "1024", "--vocab-size 1024 says vocab-size 1024, but the tensor lm_head.weight [32, 32] "
                             "shows 32"),
    ("--num-classes", "1000", "--num-classes 1000 says num-classes 1000, but the tensor embeddings.weight [39, 32] "
                              "(V + C + 2 rows) shows 5"),
    ("--grid-size", "16", "--grid-size 16 says grid-size 16, but the tensor pos_embed [1, 1040, 32] "
                          "(T + 1024 rows, T = 16) shows 4"),
    ("--preset", "Q", "--preset: unknown preset 'Q'"),
])
def test_each_flag_mismatch_is_refused_naming_it(tmp_path, flag, value, says):
    src, out = tmp_path / "rar.bin", tmp_path / "o.safetensors"
    write_bin(src, arrays())
    flags = [x for i, x in enumerate(FLAGS) if x != flag and (i == 0 or FLAGS[i - 1] != flag)]
    r = run(src, out, *flags, flag, value)
    assert r.returncode == 2
    assert r.stderr.startswith(f"convert_rar: {src}: ") and r.stderr.count("\n") == 1, r.stderr
    assert says in r.stderr, r.stderr
    assert not out.exists()


@pytest.mark.parametrize("change,says", [
    ("drop lm_head.bias", "missing tensor 'lm_head.bias' (expected shape [32])"),
    ("drop pos_embed", "missing tensor 'pos_embed' (SPEC section 9)"),
    ("extra blocks.0.attn.rope.weight", "tensor 'blocks.0.attn.rope.weight' (shape [4]) is not part of the RAR model"),
    ("extra blocks.2.norm1.weight", "missing tensor 'blocks.2.norm1.bias' (expected shape [32]) (and 17 more)"),
    ("shape blocks.1.mlp.fc2.weight", "tensor 'blocks.1.mlp.fc2.weight' has shape [32, 65], the config expects "
                                      "[32, 64]"),
    ("shape timesteps_embeddings", "tensor 'timesteps_embeddings' has shape [1, 100, 32], the config expects "
                                   "[1, 116, 32]"),
    ("shape target_aware_pos_embed", "tensor 'target_aware_pos_embed' has shape [1, 16, 32]"),
    ("shape pos_embed", "tensor 'pos_embed' has 1039 rows: T = rows - 1024 = 15 is not a square grid"),
    ("shape blocks.0.attn.q_norm.weight", "'blocks.0.attn.q_norm.weight' has length 5, not a head width dividing"),
])
def test_missing_extra_and_misshapen_tensors_are_refused(tmp_path, change, says):
    a = arrays()
    what, name = change.split(" ", 1)
    if what == "drop":
        del a[name]
    elif what == "extra":
        a[name] = np.zeros(4, np.float32)
    else:
        shape = {"blocks.1.mlp.fc2.weight": (32, 65), "timesteps_embeddings": (1, 100, 32),
                 "target_aware_pos_embed": (1, 16, 32), "pos_embed": (1, 1039, 32),
                 "blocks.0.attn.q_norm.weight": (5,)}[name]
        a[name] = np.zeros(shape, np.float32)
    src, out = tmp_path / "rar.bin", tmp_path / "o.safetensors"
    write_bin(src, a)
    r = run(src, out)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert says in r.stderr, r.stderr
    assert not out.exists()


def test_damaged_and_foreign_files_are_refused(tmp_path):
    src, out = tmp_path / "rar.bin", tmp_path / "o.safetensors"
    write_bin(src, arrays())
    data = src.read_bytes()
    cut = tmp_path / "cut.bin"
    cut.write_bytes(data[: len(data) // 2])
    r = run(cut, out, *FLAGS)
    assert r.returncode == 2 and r.stderr.startswith(f"convert_rar: {cut}: ") and r.stderr.count("\n") == 1
    assert "not a zip-format torch checkpoint" in r.stderr, r.stderr
    # a storage record shorter than its tensor (the zip itself intact)
    b = CheckpointBuilder()
    sd = collections.OrderedDict((n, b.tensor(v)) for n, v in arrays().items())
    b.storages[5].data = b.storages[5].data[:-8]
    b.write(tmp_path / "short.bin", sd)
    r = run(tmp_path / "short.bin", out, *FLAGS)
    assert r.returncode == 2 and "elements on disk" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not out.exists() and not (tmp_path / "o.safetensors.partial").exists()
    r = run(tmp_path / "none.bin", out)
    assert r.returncode == 2 and "none.bin: no such file" in r.stderr
    evil = collections.OrderedDict(arrays())
    b = CheckpointBuilder()
    sd = collections.OrderedDict((n, b.tensor(v)) for n, v in evil.items())
    sd["x"] = FakeEvil()
    b.write(tmp_path / "evil.bin", sd)
    r = run(tmp_path / "evil.bin", out)
    assert r.returncode == 2 and "refusing to load os.system" in r.stderr
    write_bin(src, arrays())
    r = run(src, tmp_path / "no-such-folder" / "o.safetensors")
    assert r.returncode == 2 and "no-such-folder" in r.stderr and r.stderr.count("\n") == 1, r.stderr
