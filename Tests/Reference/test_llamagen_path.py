"""The README's LlamaGen path, end to end on tiny data: a train_c2i.py checkpoint and
extract_codes_c2i.py code folders (built by llamagen_layouts.py) -> convert -> import -> fine-tune.

    python3 -m pytest -q Tests/Reference/test_llamagen_path.py   (release build first)
"""

from __future__ import annotations

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

import convert_llamagen as C  # noqa: E402
from llamagen_layouts import extract_codes, train_c2i_checkpoint  # noqa: E402

BIN = os.path.join(ROOT, ".build", "release")
V, NC, D, L, NH = 32, 5, 32, 2, 4


def run(name, *args, cwd=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_"))}
    return subprocess.run([os.path.join(BIN, name), *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=cwd)


@pytest.fixture
def llamagen(tmp_path, monkeypatch):
    """A LlamaGen user's files: checkpoint (model + ema) and two code roots (flip, ten-crop)."""
    monkeypatch.setitem(C.LLAMAGEN_MODELS, "GPT-tiny-test", (L, NH, D))
    rng = np.random.default_rng(0)
    cfg = dict(vocab_size=V, num_classes=NC, dim=D, n_layer=L, ffn_hidden=256)
    model = {n: (rng.standard_normal(s) * 0.1).astype(np.float32) for n, s in C.base_table(cfg)}
    ema = {n: a * 0.5 for n, a in model.items()}
    ckpt = tmp_path / "0005000.pt"
    train_c2i_checkpoint(ckpt, model, ema, gpt_model="GPT-tiny-test", vocab_size=V, num_classes=NC,
                         image_size=64, downsample_size=16)
    flip, crop = tmp_path / "imagenet_code_c2i_flip_ten_crop", tmp_path / "imagenet_code_c2i_flip_ten_crop_105"
    codes, labels = extract_codes(flip, "imagenet64", 24, 2, 16, V, NC, seed=1)
    extract_codes(crop, "imagenet64", 24, 10, 16, V, NC, seed=2)
    for i in range(24):                          # the same images: the same labels in both roots
        np.save(crop / "imagenet64_labels" / f"{i}.npy", labels[i])
    return tmp_path, ckpt, flip, crop, codes


def test_three_commands_convert_import_finetune(llamagen, capsys):
    tmp, ckpt, flip, crop, codes = llamagen
    weights = tmp / "c2i_tiny.safetensors"
    assert C.main([str(ckpt), str(weights), "--weights", "ema"]) == 0, capsys.readouterr().err
    r = run("tensorar-data", "import-llamagen", "--code-path", flip, "--code-path", crop, "--like", weights,
            "--out", tmp / "cache", "--shard-size", "10")
    assert r.returncode == 0, r.stdout + r.stderr
    info = json.load(open(tmp / "cache" / "dataset.json"))
    assert (info["vocab_size"], info["num_classes"], info["augmentations"], info["num_samples"]) == (V, NC, 12, 24)
    config = tmp / "finetune.yaml"
    config.write_text(f"model:\n  window: 2\n  plugin_depth: 1\n  init_from: {weights}\n"
                      f"data:\n  train: {tmp / 'cache'}\n  val: null\n"
                      "train:\n  steps: 2\n  global_batch: 8\n  micro_batch: 4\n  ema_decay: 0.9999\n"
                      f"checkpoint:\n  dir: {tmp / 'ck'}\n")
    r = run("tensorar-train", config, cwd=tmp)
    assert r.returncode == 0, r.stdout + r.stderr
    model_line = next(l for l in r.stdout.splitlines() if l.startswith("model: "))
    shape = json.loads(model_line[len("model: "):])
    assert (shape["dim"], shape["n_layer"], shape["n_head"], shape["window"]) == (D, L, NH, 2)
    assert os.path.exists(tmp / "ck" / "finetune" / "tensorboard")
    check_weights_kinds(tmp, tmp / "ck" / "finetune")
    # the shipped LlamaGen-B config states preset B: this tiny base contradicts it, both values named
    r = run("tensorar-train", os.path.join(ROOT, "Configs", "llamagen-b-imagenet256.yaml"), "--init-from", weights,
            "--set", f"data.train={tmp / 'cache'}", "--set", "data.val=null", cwd=tmp)
    assert r.returncode != 0
    assert "its recorded dim 32 contradicts the config's dim 768 (model.preset B in the config file)" in r.stderr


def check_weights_kinds(tmp, run_dir):
    """--weights-kind ema in tensorar-export, -eval and -sample: the run's moving average."""
    import safetensors_io

    for kind in ["raw", "ema"]:
        out = tmp / f"{kind}.safetensors"
        r = run("tensorar-export", "--checkpoint", run_dir, "--out", out, "--weights-kind", kind)
        assert r.returncode == 0, r.stdout + r.stderr
    raw, _ = safetensors_io.read(str(tmp / "raw.safetensors"))
    ema, meta = safetensors_io.read(str(tmp / "ema.safetensors"))
    assert meta["tensorar.weights_kind"] == "ema"
    assert not np.array_equal(raw["tensorar.in_pos"], ema["tensorar.in_pos"]), "decay 0.9999: the average lags"
    losses = {}
    for kind in ["raw", "ema"]:
        r = run("tensorar-eval", "--weights", run_dir, "--weights-kind", kind, "--data", tmp / "cache", "--json")
        assert r.returncode == 0, r.stderr
        losses[kind] = json.loads(r.stdout)["loss"]
    r = run("tensorar-eval", "--weights", tmp / "ema.safetensors", "--data", tmp / "cache", "--json")
    assert json.loads(r.stdout)["loss"] == losses["ema"] != losses["raw"]
    r = run("tensorar-sample", "--weights", run_dir, "--weights-kind", "ema", "--per-class", "1", "--quiet",
            "--out", tmp / "s.h5")
    assert r.returncode == 0, r.stderr
    r = run("tensorar-sample", "--weights", tmp / "ema.safetensors", "--weights-kind", "ema", "--out", tmp / "t.h5")
    assert r.returncode != 0 and "--weights-kind ema needs a checkpoint folder" in r.stderr


def test_import_needs_the_vocabulary_and_classes(llamagen):
    tmp, _, flip, crop, _ = llamagen
    r = run("tensorar-data", "import-llamagen", "--code-path", flip, "--out", tmp / "c1")
    assert r.returncode != 0 and "give --vocab-size and --num-classes" in r.stderr
    r = run("tensorar-data", "import-llamagen", "--code-path", flip, "--out", tmp / "c2", "--vocab-size", "16",
            "--num-classes", str(NC))
    want = "the vocab_size of --vocab-size 16 and --num-classes 5 is smaller than the data holds"
    assert r.returncode != 0 and want in r.stderr, r.stderr
    r = run("tensorar-data", "import-llamagen", "--codes", flip, "--labels", flip, "--out", tmp / "c3",
            "--vocab-size", str(V), "--num-classes", str(NC))
    assert r.returncode != 0 and "pass it as --code-path" in r.stderr
    assert not os.path.exists(tmp / "c2" / "dataset.json")
