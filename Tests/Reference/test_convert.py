"""Tests of Launch/convert_llamagen.py on fake torch-format zip checkpoints
(llamagen_layouts.py builds them as torch.save and LlamaGen's train_c2i.py do).

    python3 -m pytest -q Tests/Reference/test_convert.py
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
from llamagen_layouts import (CheckpointBuilder, FakeEvil, FakeTensor, train_c2i_args,  # noqa: E402
                              train_c2i_checkpoint)

SCRIPT = os.path.join(ROOT, "Launch", "convert_llamagen.py")
TINY = ["--dim", "32", "--n-layer", "2", "--n-head", "4", "--vocab-size", "32",
        "--num-classes", "5", "--grid-size", "4"]


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
    ns = argparse.Namespace(lr=1e-4, global_batch_size=256)      # args without a recorded shape
    ck = {"model": sd, "optimizer": opt, "steps": 1000, "args": ns}
    src, out = tmp_path / "ck.pt", tmp_path / "out.safetensors"
    b.write(src, ck)
    r = run_script(src, out, *TINY)
    assert r.returncode == 0, r.stderr
    assert "module.freqs_cis" in r.stdout          # dropped and reported
    t, meta = safetensors_io.read(str(out))
    assert list(t) == [n for n, _ in C.base_table(dict(vocab_size=32, num_classes=5, dim=32, n_layer=2,
                                                        ffn_hidden=256))]
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
    cfg = C.resolve_config(ns, log=lambda _: None)
    assert (cfg["dim"], cfg["n_layer"], cfg["n_head"], cfg["ffn_hidden"]) == (768, 12, 12, 2048)
    ns.preset = "L"
    assert C.resolve_config(ns, log=print)["ffn_hidden"] == 2816
    ns.preset = "XL"
    assert C.resolve_config(ns, log=print)["ffn_hidden"] == 3584
    ns.preset = "XXL"
    assert C.resolve_config(ns, log=print)["ffn_hidden"] == 4096
    ns.preset = "GPT-B"                                # LlamaGen's own name for the preset
    n = sum(int(np.prod(s)) for _, s in C.base_table(C.resolve_config(ns, log=print)))
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


# ---------------------------------------------------------------------------- LlamaGen's train_c2i.py layout

TINY_CFG = {"vocab_size": 32, "num_classes": 5, "grid_size": 4, "dim": 32, "n_layer": 2, "n_head": 4,
            "ffn_hidden": 256, "norm_eps": 1e-5, "rope_base": 10000.0, "window": 1, "plugin_depth": 0,
            "residual": True}
TINY_ARGS = dict(gpt_model="GPT-tiny-test", vocab_size=32, num_classes=5, image_size=64, downsample_size=16)


@pytest.fixture
def tiny_gpt(monkeypatch):
    """A LlamaGen-style size name for the tiny test shape (GPT-B itself is 110M parameters)."""
    monkeypatch.setitem(C.LLAMAGEN_MODELS, "GPT-tiny-test", (2, 4, 32))


def convert_in_process(capsys, *argv):
    status = C.main([str(a) for a in argv])
    out = capsys.readouterr()
    return status, out.out, out.err


def one_line_error(err, path):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"convert_llamagen: {path}: "), err
    return lines[0]


def test_train_c2i_checkpoint_converts_with_no_flags(tmp_path, capsys, tiny_gpt):
    model, ema = model_arrays(seed=2), model_arrays(seed=3)
    src, out = tmp_path / "0005000.pt", tmp_path / "out.safetensors"
    train_c2i_checkpoint(src, model, ema, steps=5000, **TINY_ARGS)
    status, stdout, err = convert_in_process(capsys, src, out)
    assert status == 0, err
    assert "n_head 4 (args.gpt_model GPT-tiny-test)" in stdout
    assert "grid_size 4 (args.image_size 64 / args.downsample_size 16)" in stdout
    t, meta = safetensors_io.read(str(out))
    assert json.loads(meta["tensorar.config"]) == TINY_CFG
    assert meta["tensorar.source"] == "LlamaGen checkpoint 0005000.pt, model weights, step 5000"
    for n, a in model.items():
        np.testing.assert_array_equal(t[n], a, err_msg=n)
    # the same checkpoint, its EMA weights
    status, _, err = convert_in_process(capsys, src, out, "--weights", "ema")
    assert status == 0, err
    t, meta = safetensors_io.read(str(out))
    assert "ema weights" in meta["tensorar.source"]
    for n, a in ema.items():
        np.testing.assert_array_equal(t[n], a, err_msg=n)
    assert not np.array_equal(t["tok_embeddings.weight"], model["tok_embeddings.weight"])


def test_weights_ema_without_ema_entry(tmp_path, capsys, tiny_gpt):
    src = tmp_path / "noema.pt"
    train_c2i_checkpoint(src, model_arrays(), None, **TINY_ARGS)
    status, _, err = convert_in_process(capsys, src, tmp_path / "o.safetensors", "--weights", "ema")
    assert status == 2
    line = one_line_error(err, src)
    assert "no 'ema' state_dict" in line and "model, optimizer, steps, args" in line
    assert not (tmp_path / "o.safetensors").exists()


def test_flags_agreeing_pass_contradicting_name_both_values(tmp_path, capsys, tiny_gpt):
    src = tmp_path / "ck.pt"
    train_c2i_checkpoint(src, model_arrays(), None, **TINY_ARGS)
    status, _, err = convert_in_process(capsys, src, tmp_path / "a.safetensors", *TINY)
    assert status == 0, err
    cases = [(["--n-head", "8"],
              "--n-head 8 contradicts the checkpoint's args.gpt_model GPT-tiny-test (n_head 8 vs 4)"),
             (["--vocab-size", "64"],
              "--vocab-size 64 contradicts the checkpoint's args.vocab_size (vocab_size 64 vs 32)"),
             (["--grid-size", "16"], "--grid-size 16 contradicts the checkpoint's args.image_size 64 / "
                                     "args.downsample_size 16 (grid_size 16 vs 4)"),
             (["--preset", "B"],
              "--preset B contradicts the checkpoint's args.gpt_model GPT-tiny-test (dim 768 vs 32)")]
    for flags, message in cases:
        status, _, err = convert_in_process(capsys, src, tmp_path / "b.safetensors", *flags)
        assert status == 2, flags
        assert one_line_error(err, src).endswith(message), err
    assert not (tmp_path / "b.safetensors").exists()


def test_bare_state_dict_needs_head_count_and_grid(tmp_path, capsys):
    arrays = model_arrays()
    b = CheckpointBuilder()
    src = tmp_path / "c2i_tiny.pt"
    b.write(src, collections.OrderedDict((n, b.tensor(a)) for n, a in arrays.items()))
    status, _, err = convert_in_process(capsys, src, tmp_path / "o.safetensors", "--grid-size", "4")
    assert status == 2 and "the head count is not recorded" in one_line_error(err, src)
    status, _, err = convert_in_process(capsys, src, tmp_path / "o.safetensors", "--n-head", "4")
    assert status == 2 and "the grid size is not recorded" in one_line_error(err, src)
    # vocabulary, classes, width, layers and FFN width come from the tensors themselves
    status, stdout, err = convert_in_process(capsys, src, tmp_path / "o.safetensors", "--n-head", "4",
                                             "--grid-size", "4")
    assert status == 0, err
    assert "vocab_size 32 (tok_embeddings.weight [32, 32])" in stdout
    _, meta = safetensors_io.read(str(tmp_path / "o.safetensors"))
    assert json.loads(meta["tensorar.config"]) == TINY_CFG


def test_recorded_shape_of_real_llamagen_args():
    shape = C.recorded_shape({"args": train_c2i_args(gpt_model="GPT-L", image_size=384)})
    assert {k: v for k, (v, _) in shape.items()} == {"n_layer": 24, "n_head": 16, "dim": 1024,
                                                      "vocab_size": 16384, "num_classes": 1000, "grid_size": 24}
    with pytest.raises(C.ConvertError, match="cls_token_num is 120"):
        C.recorded_shape({"args": train_c2i_args(cls_token_num=120)})
    with pytest.raises(C.ConvertError, match="only class-to-image"):
        C.recorded_shape({"args": train_c2i_args(gpt_type="t2i")})
    with pytest.raises(C.ConvertError, match="'GPT-Q' is not a LlamaGen GPT size"):
        C.recorded_shape({"args": train_c2i_args(gpt_model="GPT-Q")})


def test_every_failure_is_one_line(tmp_path, capsys, tiny_gpt):
    missing = tmp_path / "missing.pt"
    status, _, err = convert_in_process(capsys, missing, tmp_path / "o.safetensors")
    assert status == 2 and one_line_error(err, missing).endswith(": no such file")
    broken = tmp_path / "broken.pt"
    good = tmp_path / "good.pt"
    train_c2i_checkpoint(good, model_arrays(), None, **TINY_ARGS)
    with zipfile.ZipFile(good) as z, zipfile.ZipFile(broken, "w") as w:
        for n in z.namelist():
            if "/data/" not in n:
                w.writestr(n, z.read(n))                 # storages lost: the records are gone
    status, _, err = convert_in_process(capsys, broken, tmp_path / "o.safetensors")
    assert status == 2 and "unreadable checkpoint (KeyError" in one_line_error(err, broken)
    nowhere = tmp_path / "no-such-folder" / "o.safetensors"
    status, _, err = convert_in_process(capsys, good, nowhere)
    assert status == 2 and "cannot write" in one_line_error(err, nowhere)
    arrays = model_arrays()
    arrays["tok_embeddings.weight"] = np.zeros((30, 32), np.float32)   # two tensors wrong at once
    arrays["layers.1.ffn_norm.weight"] = np.zeros((31,), np.float32)
    two = tmp_path / "two.pt"
    train_c2i_checkpoint(two, arrays, None, **{**TINY_ARGS, "vocab_size": 30})
    status, _, err = convert_in_process(capsys, two, tmp_path / "o.safetensors")
    line = one_line_error(err, two)
    assert status == 2 and "output.weight" in line and "layers.1.ffn_norm.weight" in line
    r = run_script(good, tmp_path / "o.safetensors", "--torch")        # the torch path is gone
    assert r.returncode == 2 and r.stderr.strip() == "convert_llamagen: unrecognized arguments: --torch (see --help)"
