"""Tests of Launch/evaluate.py: the metrics on small sets, and the whole script end to end.

    python3 -m pytest -q Tests/Reference/test_evaluate.py

Metric sanity on a synthetic dataset (synthetic.py): real validation images against the training
set score an FID near 0 and a high class accuracy, uniformly random tokens score far worse, and
images in between (half their tokens random) land in between. The end-to-end test runs the
release programs (`swift build -c release` first) on a tiny random model.
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

import evaluate as ev  # noqa: E402
import synthetic  # noqa: E402

BIN = os.path.join(ROOT, ".build", "release")


def test_frechet_distance_basics():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4000, 6))
    mu, s = a.mean(0), np.cov(a, rowvar=False)
    assert ev.frechet_distance(mu, s, mu, s) == pytest.approx(0, abs=1e-9)
    # same covariance, shifted mean: exactly the squared shift
    shift = np.array([1.0, -2.0, 0, 0, 0.5, 0])
    assert ev.frechet_distance(mu + shift, s, mu, s) == pytest.approx(float(shift @ shift), rel=1e-6)
    # diagonal covariances: sum (sqrt(s1) - sqrt(s2))^2, also when one is singular
    s1, s2 = np.diag([4.0, 1.0, 0.0]), np.diag([1.0, 9.0, 1.0])
    assert ev.frechet_distance(np.zeros(3), s1, np.zeros(3), s2) == pytest.approx(1 + 4 + 1, rel=1e-6)


def test_inception_score_and_precision_recall_basics():
    confident = np.eye(4)[np.arange(400) % 4]
    assert ev.inception_score(confident) == pytest.approx(4, rel=1e-6)
    assert ev.inception_score(np.full((50, 4), 0.25)) == pytest.approx(1, rel=1e-6)
    rng = np.random.default_rng(1)
    real = rng.standard_normal((300, 5))
    p, r = ev.precision_recall(real, real.copy())
    assert p == 1 and r == 1
    p, r = ev.precision_recall(real, real + 100)
    assert p == 0 and r == 0
    # fakes that cover only part of the real cloud: high precision, low recall
    part = real[real[:, 0] > 0.5]
    p, r = ev.precision_recall(real[:len(part) * 2], np.concatenate([part, part]))
    assert p > 0.9 and r < 0.7


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    synthetic.make_data(root)
    return root


@pytest.fixture(scope="module")
def reference(data):
    cb = ev.Codebook(os.path.join(data, "train", "codebook.h5"))
    ref = ev.load_or_train_reference(os.path.join(data, "train"), cb, os.path.join(data, "clf.npz"), seed=0, epochs=6)
    return cb, ref


def test_metric_sanity_ordering(data, reference):
    cb, ref = reference
    vt, vl, _ = ev.read_cache(os.path.join(data, "val"))
    real = ev.image_metrics(cb.decode(vt), vl, ref)
    half, hl = synthetic.make_tokens(len(vt), seed=5, corrupt=0.6)
    middle = ev.image_metrics(cb.decode(half), hl, ref)
    rand = np.random.default_rng(3).integers(0, synthetic.V, size=vt.shape)
    worst = ev.image_metrics(cb.decode(rand), vl, ref)
    print("real", real, "\nmiddle", middle, "\nrandom", worst)
    assert real["accuracy"] > 0.95
    assert worst["accuracy"] < 0.4
    assert real["fid"] < 0.05 * worst["fid"], "real validation images must score an FID near 0 next to random tokens"
    assert real["fid"] < middle["fid"] < worst["fid"]
    assert real["accuracy"] > middle["accuracy"] > worst["accuracy"]
    assert real["precision"] > worst["precision"] and real["recall"] > worst["recall"]
    assert real["inception_score"] > worst["inception_score"]


def test_reference_classifier_is_cached_and_keyed(data, reference, capsys):
    cb, ref = reference
    path = os.path.join(data, "clf.npz")
    again = ev.load_or_train_reference(os.path.join(data, "train"), cb, path, seed=0, epochs=6)
    assert "(cached)" in capsys.readouterr().out
    np.testing.assert_array_equal(again.features, ref.features.astype(np.float32).astype(np.float64))
    # other settings: retrained, not silently reused
    other = ev.load_or_train_reference(os.path.join(data, "train"), cb, path, seed=1, epochs=1)
    assert "retraining" in capsys.readouterr().out
    assert not np.array_equal(other.features, again.features)


def test_codebook_decode_layout(data):
    cb = ev.Codebook(os.path.join(data, "train", "codebook.h5"))
    t = np.arange(synthetic.GRID * synthetic.GRID)[None] % synthetic.V
    img = cb.decode(t)[0]
    p = synthetic.PATCH
    # token (gy, gx) fills pixels [gy p, gy p + p) x [gx p, gx p + p), patch laid out [py, px, c]
    gy, gx = 2, 3
    want = cb.vectors[gy * synthetic.GRID + gx].reshape(p, p)
    np.testing.assert_allclose(img[gy * p:(gy + 1) * p, gx * p:(gx + 1) * p, 0], np.clip(want, 0, 1))
    assert (cb.decode(np.array([[-1] * 16]))[0] == 0.5).all(), "no token: grey"


def test_evaluate_end_to_end(data, tmp_path):
    for name in ["tensorar-sample", "tensorar-eval"]:
        assert os.path.exists(os.path.join(BIN, name)), (
            f"build the release programs first: swift build -c release ({name})")
    weights = synthetic.write_model(str(tmp_path / "model.safetensors"), window=3, depth=1)
    metrics = tmp_path / "metrics.jsonl"
    with open(metrics, "w") as f:
        for step, loss in [(1, 3.4), (10, 3.0), (20, 2.7)]:
            f.write(json.dumps({"step": step, "loss": loss, "slot_losses": [loss, loss + 0.1, loss + 0.2]}) + "\n")
        f.write(json.dumps({"step": 20, "val_loss": 2.9, "val_slot_losses": [2.8, 2.9, 3.0], "val_loss_clean": 2.5,
                            "val_slot_losses_clean": [2.8, 2.5, 2.2]}) + "\n")
    out = tmp_path / "eval"
    report = ev.main(["--weights", weights, "--data", data, "--out", str(out), "--per-class", "12", "--cfg-scale", "2",
                      "--classifier", os.path.join(data, "clf.npz"), "--classifier-epochs", "6", "--val-limit", "50",
                      "--batch-size", "16"])
    assert set(report["metrics"]) == {"model", "real_val", "random_tokens"}
    for r in report["metrics"].values():
        assert r["n"] == 60 and set(r) >= {"fid", "inception_score", "precision", "recall", "accuracy"}
    m = report["metrics"]
    assert m["real_val"]["fid"] < m["random_tokens"]["fid"]
    assert len(report["val_loss"]["train"]["slot_losses"]) == 3 and len(report["val_loss"]["none"]["slot_losses"]) == 3
    assert report["sampling"]["cfg_scale"] == "2.0" and report["model_config"]["window"] == 3
    assert report["loss_curves"]["train_records"] == 3
    for f in ["report.json", "samples.h5", "samples.png", "trajectories.png", "loss_curves.png"]:
        assert (out / f).stat().st_size > 0, f
    s = ev.read_samples(str(out / "samples.h5"))
    assert s["tokens"].shape == (60, 16) and s["trajectories"].shape == (60, 16, 3)
    np.testing.assert_array_equal(s["labels"], np.repeat(np.arange(5), 12))
    np.testing.assert_array_equal(s["trajectories"][:, :, 0], s["tokens"])  # slot 0 of step p is token p
    assert (s["trajectories"][:, 0, 1:] == -1).all() and (s["trajectories"][:, 1, 2] == -1).all()
    assert report["refinement"]["slot_agrees_with_final"][0] == 1.0
    from PIL import Image
    assert Image.open(out / "trajectories.png").size[0] > 300


def test_missing_codebook_is_a_clear_error(tmp_path):
    with pytest.raises(ev.EvalError, match="codebook.h5: missing"):
        ev.Codebook(str(tmp_path / "codebook.h5"))


def test_evaluate_end_to_end_open_magvit2(data, tmp_path):
    """The same script on an Open-MAGVIT2 model (SPEC section 8; V = 32 = 4 pre x 8 post sub-tokens):
    a guidance scale and a temperature per sub-token, and the loss reported with its two parts."""
    weights = synthetic.write_omg_model(str(tmp_path / "omg.safetensors"), window=2, depth=1)
    out = tmp_path / "eval-omg"
    report = ev.main(["--weights", weights, "--data", data, "--out", str(out), "--per-class", "4",
                      "--cfg-scale", "1.5,3", "--temperature", "1,0.7", "--classifier", os.path.join(data, "clf.npz"),
                      "--classifier-epochs", "6", "--val-limit", "30", "--batch-size", "8", "--no-baselines",
                      "--cfg-schedule", "power-cosine", "--cfg-power", "1.5"])
    assert report["model_config"]["base"] == "open-magvit2"
    assert report["sampling"]["cfg_scale"] == "1.5,3.0" and report["sampling"]["temperature"] == "1.0,0.7"
    assert report["sampling"]["cfg_schedule"] == "power-cosine" and report["sampling"]["cfg_power"] == "1.5"
    for noise in ["train", "none"]:
        v = report["val_loss"][noise]
        assert set(v["loss_parts"]) == {"pre", "post"}
        assert v["loss_parts"]["pre"] + v["loss_parts"]["post"] == pytest.approx(v["loss"], rel=1e-6)
    s = ev.read_samples(str(out / "samples.h5"))
    assert s["tokens"].shape == (20, 16) and s["tokens"].min() >= 0 and s["tokens"].max() < 32
    assert report["metrics"]["model"]["n"] == 20
    with pytest.raises(SystemExit):
        ev.parse_args(["--weights", weights, "--data", data, "--cfg-scale", "1,2,3"])


def run_evaluate(*args):
    """Launch/evaluate.py as a person runs it: exit status and stderr."""
    script = os.path.join(os.path.dirname(__file__), "..", "..", "Launch", "evaluate.py")
    r = subprocess.run([sys.executable, script, "--weights", "w.safetensors", "--data", "nowhere", *args],
                       capture_output=True, text=True)
    return r.returncode, r.stderr


def test_bad_arguments_are_one_line_errors_not_tracebacks(tmp_path):
    # Issue 17: --out naming a file, --samples that is not HDF5, --ranks 0.
    keep = tmp_path / "report.txt"
    keep.write_text("do not delete\n")
    code, err = run_evaluate("--out", str(keep))
    assert code == 2 and f"error: {keep}: --out names a file" in err and "Traceback" not in err, err
    assert keep.read_text() == "do not delete\n"
    code, err = run_evaluate("--out", str(tmp_path / "o"), "--samples", str(keep))
    assert code == 2 and f"error: {keep}: not an HDF5 file" in err and "Traceback" not in err, err
    code, err = run_evaluate("--out", str(tmp_path / "o"), "--samples", str(tmp_path))
    assert code == 2 and f"error: {tmp_path}: is a folder" in err, err
    code, err = run_evaluate("--out", str(tmp_path / "o"), "--ranks", "0")
    assert code == 2 and "error: --ranks: must be at least 1, got 0" in err, err
    code, err = run_evaluate("--out", str(tmp_path / "o"), "--cfg-power", "2")
    assert code == 2 and "error: --cfg-power: given exactly when --cfg-schedule is power-cosine" in err, err
    code, err = run_evaluate("--out", str(tmp_path / "o"), "--cfg-schedule", "power-cosine", "--cfg-power=-1")
    assert code == 2 and "error: --cfg-power: must be a finite number >= 0, got -1.0" in err, err
    assert not (tmp_path / "o").exists(), "nothing is created before the arguments check out"
