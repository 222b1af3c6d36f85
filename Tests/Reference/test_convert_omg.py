"""Tests of Launch/convert_open_magvit2.py on a checkpoint laid out as a PyTorch Lightning
checkpoint of the upstream model, written here without torch (test_convert.py's fake torch.save).

    python3 -m pytest -q Tests/Reference/test_convert_omg.py

The fake checkpoint holds what Lightning saves: `epoch`, `global_step`,
`pytorch-lightning_version`, a `state_dict` with the model under `transformer.` beside the
tokenizer (`first_stage_model.*`) and a loss network, optimizer states, loops, callbacks and
OmegaConf hyper-parameters (pickled as omegaconf globals, as Lightning writes them).
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

import convert_open_magvit2 as CO  # noqa: E402
import safetensors_io  # noqa: E402
from llamagen_layouts import CheckpointBuilder, FakeEvil, FakeGlobal  # noqa: E402

SCRIPT = os.path.join(ROOT, "Launch", "convert_open_magvit2.py")
BIN = os.path.join(ROOT, ".build", "release")
# the "tiny" preset's shape (L 2, NH 2, D 64, Lf 1) with the upstream sub-vocabularies 2^6, 2^12
TINY_CFG = {"vocab_size": 262144, "num_classes": 5, "grid_size": 4, "dim": 64, "n_layer": 2, "n_head": 2,
            "ffn_hidden": 256, "norm_eps": 1e-5, "rope_base": 10000.0, "window": 1, "plugin_depth": 0,
            "residual": True, "base": "open-magvit2", "factorized_n_layer": 1, "factorized_bits": [6, 12]}
FLAGS = ["--dim", "64", "--n-layer", "2", "--n-head", "2", "--factorized-layers", "1", "--num-classes", "5",
         "--grid-size", "4"]


class FakeDictConfig:
    """Pickles as omegaconf.dictconfig.DictConfig with its state, as Lightning saves hparams."""

    def __init__(self, content):
        self.content = content

    def __reduce_ex__(self, protocol):
        return (FakeGlobal("omegaconf.dictconfig", "DictConfig"), (), {"_content": self.content, "_parent": None})


def model_arrays(seed=0):
    rng = np.random.default_rng(seed)
    # values exactly representable in bfloat16 (multiples of 1/64, small)
    return collections.OrderedDict((n, (rng.integers(-64, 64, size=s) / 64.0).astype(np.float32))
                                   for n, s in CO.model_table(TINY_CFG))


def lightning_checkpoint(path, arrays, extra_state=None, drop=(), kind=lambda n: "float32"):
    b = CheckpointBuilder()
    sd = collections.OrderedDict()
    for n, a in arrays.items():
        if n not in drop:
            sd["transformer." + n] = b.tensor(a, kind(n))
    sd["transformer.freqs_cis"] = b.tensor(np.zeros((17, 16, 2), np.float32))
    for n, s in [("first_stage_model.encoder.conv_in.weight", (8, 3, 3, 3)),
                 ("first_stage_model.quantize.codebook", (4, 18)), ("loss.discriminator.main.0.weight", (8, 3, 4, 4))]:
        sd[n] = b.tensor(np.ones(s, np.float32))
    sd.update(extra_state or {})
    ck = {"epoch": 299, "global_step": 375300, "pytorch-lightning_version": "2.1.3", "state_dict": sd,
          "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 300}}}},
          "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_score": None, "dirpath": "/ckpt"}},
          "optimizer_states": [{"state": {0: {"step": b.tensor(np.array(7.0)), "exp_avg": b.tensor(np.ones((2, 2)))}},
                                "param_groups": [{"lr": 3e-4, "betas": (0.9, 0.95), "params": [0]}]}],
          "lr_schedulers": [{"base_lrs": [3e-4], "last_epoch": 299}], "hparams_name": "kwargs",
          "hyper_parameters": FakeDictConfig({"transformer_config": {"dim": 64}, "lossconfig": None})}
    b.write(path, ck)


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True)


def test_lightning_checkpoint_converts_with_the_preset_and_with_flags(tmp_path):
    arrays = model_arrays()
    src = tmp_path / "last.ckpt"
    lightning_checkpoint(src, arrays, kind=lambda n: "bfloat16" if "spatial_blocks.1" in n else "float32")
    for flags in (["--preset", "tiny", "--num-classes", "5", "--grid-size", "4"], FLAGS):
        out = tmp_path / "out.safetensors"
        r = run(src, out, *flags)
        assert r.returncode == 0, r.stderr
        assert "left out 3 other state_dict entries" in r.stdout
        t, meta = safetensors_io.read(str(out))
        assert list(t) == [n for n, _ in CO.model_table(TINY_CFG)], "SPEC section 8's names, in its order"
        for n, a in arrays.items():
            assert t[n].dtype == np.float32
            np.testing.assert_array_equal(t[n], a, err_msg=n)
        assert json.loads(meta["tensorar.config"]) == TINY_CFG
        assert "epoch 299" in meta["tensorar.source"] and "global_step 375300" in meta["tensorar.source"]
        assert "pytorch-lightning_version 2.1.3" in meta["tensorar.source"]
        assert not any(n.startswith(("first_stage_model", "loss", "transformer")) for n in t)


def test_the_converted_file_loads_and_samples_in_the_swift_programs(tmp_path):
    exe = os.path.join(BIN, "tensorar-sample")
    assert os.path.exists(exe), "build the release programs first: swift build -c release"
    src, out = tmp_path / "last.ckpt", tmp_path / "omg.safetensors"
    lightning_checkpoint(src, model_arrays(seed=2))
    assert run(src, out, *FLAGS).returncode == 0
    r = subprocess.run([exe, "--weights", str(out), "--classes", "0,4", "--per-class", "1", "--top-k", "1",
                        "--cfg-scale", "1.9,2.0", "--out", str(tmp_path / "s.h5"), "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    import h5py
    with h5py.File(tmp_path / "s.h5", "r") as h:
        tokens = np.asarray(h["tokens"])
        assert tokens.shape == (2, 16) and tokens.min() >= 0 and tokens.max() < 262144
        assert json.loads(h.attrs["config"])["base"] == "open-magvit2"


@pytest.mark.parametrize("flags,drop,says", [
    (["--dim", "64", "--n-layer", "3", "--n-head", "2", "--grid-size", "4"], (),
     "has 2 'spatial_blocks' blocks (transformer.spatial_blocks.0..1), but --n-layer (or the preset) says 3"),
    (["--preset", "tiny", "--factorized-layers", "2"], (), "has 1 'factorized_blocks' blocks"),
    (["--preset", "tiny", "--num-classes", "1000"], (), "'transformer.class_emb.embedding_table.weight' has 6 rows"),
    (["--preset", "B"], (), "'transformer.pre_emb.weight' has width 64, the shape given says dim 1024"),
    (FLAGS, ("head.1.weight",), "missing tensor 'transformer.head.1.weight' (expected shape [4096, 64])"),
    (["--dim", "64", "--n-layer", "2", "--grid-size", "4"], (), "--n-head (it appears in no tensor's shape)"),
    (["--preset", "Q"], (), "unknown preset 'Q'"),
])
def test_contradictions_are_one_line_errors_naming_the_tensor(tmp_path, flags, drop, says):
    src = tmp_path / "last.ckpt"
    lightning_checkpoint(src, model_arrays(), drop=drop)
    r = run(src, tmp_path / "out.safetensors", *flags)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("convert_open_magvit2: "), r.stderr
    assert says in r.stderr, r.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_bad_shapes_and_bad_files(tmp_path):
    arrays = model_arrays()
    arrays["factorized_blocks.0.feed_forward.w2.weight"] = np.zeros((64, 128), np.float32)
    src = tmp_path / "a.ckpt"
    lightning_checkpoint(src, arrays)
    r = run(src, tmp_path / "o.safetensors", *FLAGS)
    assert r.returncode == 2
    assert "'transformer.factorized_blocks.0.feed_forward.w2.weight' has shape [64, 128]" in r.stderr
    arrays = model_arrays()
    arrays["post_emb.weight"] = np.zeros((4000, 64), np.float32)
    lightning_checkpoint(src, arrays)
    r = run(src, tmp_path / "o.safetensors", *FLAGS)
    assert r.returncode == 2 and "'transformer.post_emb.weight' has 4000 rows, not a power of two" in r.stderr
    b = CheckpointBuilder()
    b.write(tmp_path / "tok.ckpt", {"state_dict": {"first_stage_model.x": b.tensor(np.ones(2))}, "epoch": 1})
    r = run(tmp_path / "tok.ckpt", tmp_path / "o.safetensors", *FLAGS)
    assert r.returncode == 2 and "no 'transformer.' entries" in r.stderr
    (tmp_path / "plain.ckpt").write_bytes(b"not a zip")
    r = run(tmp_path / "plain.ckpt", tmp_path / "o.safetensors", *FLAGS)
    assert r.returncode == 2 and "not a zip-format torch checkpoint" in r.stderr
    r = run(tmp_path / "missing.ckpt", tmp_path / "o.safetensors", *FLAGS)
    assert r.returncode == 2 and "missing.ckpt: no such file" in r.stderr
    lightning_checkpoint(src, model_arrays())
    r = run(src, tmp_path / "no-such-folder" / "o.safetensors", *FLAGS)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no-such-folder" in r.stderr, r.stderr


def test_a_global_outside_lightning_omegaconf_numpy_is_refused(tmp_path):
    marker = "/tmp/convert_llamagen_pwned"
    if os.path.exists(marker):
        os.remove(marker)
    src = tmp_path / "evil.ckpt"
    lightning_checkpoint(src, model_arrays(), extra_state={"transformer.evil": FakeEvil()})
    r = run(src, tmp_path / "o.safetensors", *FLAGS)
    assert r.returncode == 2 and "refusing to load os.system" in r.stderr
    assert not os.path.exists(marker)
