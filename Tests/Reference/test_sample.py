"""Tests of the `tensorar-sample` program (release build: `swift build -c release` first).

    python3 -m pytest -q Tests/Reference/test_sample.py

Rank-count invariance (1 rank and 2 ranks write the same file), greedy determinism, seeded
reproducibility, the LlamaGen code export, and clear errors for bad input.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)

import synthetic  # noqa: E402

SAMPLE = os.path.join(ROOT, ".build", "release", "tensorar-sample")
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1"}


def run(args, ranks=None, check=True):
    assert os.path.exists(SAMPLE), "build the release programs first: swift build -c release"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_"))}
    env.update(MPI_ENV)
    cmd = [SAMPLE] + args
    if ranks:
        cmd = [shutil.which("mpirun") or "mpirun", "-n", str(ranks)] + cmd
    r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)
    if check:
        assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r


def read(path):
    import h5py

    with h5py.File(path, "r") as h:
        data = {k: np.asarray(h[k]) for k in ["tokens", "labels", "trajectories"]}
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in h.attrs.items()}
    return data, attrs


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    return synthetic.write_model(str(d / "model.safetensors"), window=3, depth=1)


def test_rank_count_invariance_and_outputs(weights, tmp_path):
    common = ["--weights", weights, "--classes", "0,2-4", "--per-class", "5", "--cfg-scale", "1.5", "--top-k", "8",
              "--temperature", "0.9", "--seed", "11", "--quiet"]
    one, two = str(tmp_path / "one.h5"), str(tmp_path / "two.h5")
    # Equal files, though other batch sizes may change logits in their last bits (OpenBLAS's
    # Zen/Haswell kernels round by the rows of a call): a token changes only when its uniform draw
    # lies within that rounding of a boundary of the cumulative distribution (~1e-7 per draw;
    # ~1e-4 for the ~1000 draws here).
    run(common + ["--out", one, "--batch-size", "7", "--npy-dir", str(tmp_path / "npy")], ranks=1)
    run(common + ["--out", two, "--batch-size", "3"], ranks=2)
    a, aa = read(one)
    b, ba = read(two)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"{k}: 1 rank vs 2 ranks (and batch 7 vs 3)")
    assert aa == ba
    assert not [f for f in os.listdir(tmp_path) if ".rank-" in f], "part files are removed after the merge"
    # shapes, dtypes, class-major labels, trajectories consistent with the tokens
    assert a["tokens"].dtype == np.int32 and a["tokens"].shape == (20, 16)
    assert a["trajectories"].shape == (20, 16, 3) and a["labels"].dtype == np.int32
    np.testing.assert_array_equal(a["labels"], np.repeat([0, 2, 3, 4], 5))
    np.testing.assert_array_equal(a["trajectories"][:, :, 0], a["tokens"])
    assert ((a["tokens"] >= 0) & (a["tokens"] < synthetic.V)).all()
    assert (a["trajectories"][:, 0, 1:] == -1).all() and (a["trajectories"][:, 1:, 1] >= 0).all()
    assert aa["top_k"] == 8 and aa["cfg_scale"] == "1.5" and aa["seed"] == "11" and aa["per_class"] == 5
    assert json.loads(aa["config"])["window"] == 3
    assert json.loads(aa["sampling"])["classes"] == [0, 2, 3, 4]
    # LlamaGen-compatible codes: int64 [N, T], labels int64 [N]
    codes = np.load(tmp_path / "npy" / "codes.npy")
    labels = np.load(tmp_path / "npy" / "labels.npy")
    assert codes.dtype == np.int64 and codes.shape == (20, 16) and labels.dtype == np.int64
    np.testing.assert_array_equal(codes, a["tokens"])
    np.testing.assert_array_equal(labels, a["labels"])


def test_greedy_is_deterministic_and_a_seed_reproduces_a_run(weights, tmp_path):
    base = ["--weights", weights, "--per-class", "3", "--quiet", "--cfg-scale", "2"]
    g1, g2 = str(tmp_path / "g1.h5"), str(tmp_path / "g2.h5")
    run(base + ["--top-k", "1", "--seed", "1", "--out", g1])
    run(base + ["--top-k", "1", "--seed", "2", "--out", g2])
    np.testing.assert_array_equal(read(g1)[0]["tokens"], read(g2)[0]["tokens"])
    s1, s2, s3 = (str(tmp_path / f"s{i}.h5") for i in range(3))
    run(base + ["--seed", "5", "--out", s1])
    run(base + ["--seed", "5", "--out", s2])
    run(base + ["--seed", "6", "--out", s3])
    a, b, c = read(s1)[0], read(s2)[0], read(s3)[0]
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    np.testing.assert_array_equal(a["trajectories"], b["trajectories"])
    assert not np.array_equal(a["tokens"], c["tokens"])
    assert not np.array_equal(a["tokens"], read(g1)[0]["tokens"])


@pytest.mark.parametrize("case", ["missing", "class", "window", "out", "topk", "bad-classes"])
def test_bad_input_is_a_clear_error(weights, tmp_path, case):
    out = str(tmp_path / "s.h5")
    args = {
        "missing": ["--weights", str(tmp_path / "nope"), "--out", out],
        "class": ["--weights", weights, "--classes", "1,7", "--out", out],
        "window": ["--weights", weights, "--window", "4", "--out", out],
        "out": ["--weights", weights, "--out", str(tmp_path / "no" / "such" / "s.h5")],
        "topk": ["--weights", weights, "--top-k", "99", "--out", out],
        "bad-classes": ["--weights", weights, "--classes", "a-b", "--out", out],
    }[case]
    want = {
        "missing": f"error: {tmp_path / 'nope'}: no such file or folder",
        "class": f"error: {weights}: class 7 is outside the model's 5 classes [0, 5)",
        "window": f"error: {weights}: the weights have window k = 3 (plugin_depth 1) but --window 4 was asked",
        "out": "error: " + str(tmp_path / "no" / "such" / "s.h5") + ": the folder",
        "topk": f"error: {weights}: --top-k 99 exceeds the model's vocab_size 32",
        "bad-classes": "error: --classes: cannot read 'a-b'",
    }[case]
    r = run(args, check=False)
    assert r.returncode != 0
    assert want in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not os.path.exists(out)


def test_bad_input_under_mpirun_ends_every_rank(weights, tmp_path):
    r = run(["--weights", weights, "--classes", "9", "--out", str(tmp_path / "s.h5")], ranks=2, check=False)
    assert r.returncode != 0
    assert r.stderr.count("class 9 is outside") == 1, "rank 0 reports once"


def test_k_mismatch_in_the_weights_names_the_tensor(tmp_path):
    # a file whose tensors say k = 2 but whose metadata says k = 3
    import safetensors_io

    path = synthetic.write_model(str(tmp_path / "m.safetensors"), window=2, depth=1)
    tensors, meta = safetensors_io.read(path)
    cfg = json.loads(meta["tensorar.config"])
    cfg["window"] = 3
    safetensors_io.write(path, tensors, {"tensorar.config": json.dumps(cfg)})
    r = run(["--weights", path, "--out", str(tmp_path / "s.h5")], check=False)
    assert r.returncode != 0 and "tensorar.in_pos" in r.stderr, r.stderr


def test_guidance_as_llamagen_none_at_or_below_one_and_cfg_interval(weights, tmp_path):
    base = ["--weights", weights, "--per-class", "2", "--quiet", "--top-k", "1"]
    paths = {name: str(tmp_path / f"{name}.h5") for name in ["s1", "s05", "s3", "s3i0", "s3i99"]}
    run(base + ["--cfg-scale", "1", "--out", paths["s1"]])
    run(base + ["--cfg-scale", "0.5", "--out", paths["s05"]])
    run(base + ["--cfg-scale", "3", "--out", paths["s3"]])
    run(base + ["--cfg-scale", "3", "--cfg-interval", "0", "--out", paths["s3i0"]])
    run(base + ["--cfg-scale", "3", "--cfg-interval", "99", "--out", paths["s3i99"]])
    t = {name: read(p)[0]["tokens"] for name, p in paths.items()}
    np.testing.assert_array_equal(t["s05"], t["s1"], err_msg="scale 0.5: no guidance, as LlamaGen")
    assert not np.array_equal(t["s3"], t["s1"]), "guidance changes this model's samples"
    np.testing.assert_array_equal(t["s3i99"], t["s3"], err_msg="an interval past the image: every step guided")
    np.testing.assert_array_equal(t["s3i0"][:, :2], t["s3"][:, :2], err_msg="steps 0 and 1 guided")
    assert not np.array_equal(t["s3i0"], t["s3"]), "later steps unguided"
    attrs = read(paths["s3i0"])[1]
    assert attrs["cfg_interval"] == 0 and json.loads(attrs["sampling"])["cfg_interval"] == 0
    r = run(base + ["--cfg-interval=-2", "--out", paths["s1"]], check=False)
    assert r.returncode != 0 and "--cfg-interval must be -1 (every step) or >= 0" in r.stderr


@pytest.mark.parametrize("case", ["grid-flag", "vocab-flag", "classes-flag", "cache-grid", "cache-vocab", "preset"])
def test_weights_contradicting_the_cache_or_flags(weights, tmp_path, case, monkeypatch):
    out = str(tmp_path / "s.h5")
    data = str(tmp_path / "cache")
    # a consistent cache of another grid (5x5) or vocabulary (64) than the weights' (4x4, 32)
    monkeypatch.setattr(synthetic, "GRID", 5 if case == "cache-grid" else synthetic.GRID)
    monkeypatch.setattr(synthetic, "V", 64 if case == "cache-vocab" else synthetic.V)
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 32, size=(8, synthetic.GRID ** 2))
    synthetic.write_cache(data, tokens, rng.integers(0, synthetic.C, size=8))
    monkeypatch.undo()
    args, want = {
        "grid-flag": (["--grid-size", "16"],
                      f"error: {weights}: --grid-size 16 contradicts the weights' grid_size 4"),
        "vocab-flag": (["--vocab-size", "16384"],
                       f"error: {weights}: --vocab-size 16384 contradicts the weights' vocab_size 32"),
        "classes-flag": (["--num-classes", "1000"],
                         f"error: {weights}: --num-classes 1000 contradicts the weights' num_classes 5"),
        "cache-grid": (["--data", data], f"error: {data}: grid 5x5 does not match the model's grid_size 4"),
        "cache-vocab": (["--data", data], f"error: {data}: vocab_size 64 is larger than the model's 32"),
        "preset": (["--preset", "tiny"], "error: --preset: tiny needs the data's shape"),
    }[case]
    r = run(["--weights", weights, "--out", out] + args, check=False)
    assert r.returncode != 0
    assert want in r.stderr, r.stderr
    assert not os.path.exists(out)
    # the same flags that agree with the weights pass
    if case in ("grid-flag", "vocab-flag", "classes-flag"):
        run(["--weights", weights, "--out", out, "--per-class", "1", "--quiet", "--grid-size", "4",
             "--vocab-size", "32", "--num-classes", "5", "--data", data])
        assert os.path.exists(out)


def test_guidance_schedule_flags_samples_and_metadata(weights, tmp_path):
    """--cfg-schedule power-cosine --cfg-power P (SPEC section 9): P = 0 samples what the constant
    schedule samples, P > 0 something else; both recorded; bad values are clear errors."""
    base = ["--weights", weights, "--per-class", "3", "--quiet", "--cfg-scale", "6", "--seed", "3"]
    paths = {name: str(tmp_path / f"{name}.h5") for name in ["const", "p0", "p05"]}
    run(base + ["--out", paths["const"]])
    run(base + ["--cfg-schedule", "power-cosine", "--cfg-power", "0", "--out", paths["p0"]])
    run(base + ["--cfg-schedule", "power-cosine", "--cfg-power", "0.5", "--out", paths["p05"]])
    (c, ca), (z, _), (p, pa) = read(paths["const"]), read(paths["p0"]), read(paths["p05"])
    np.testing.assert_array_equal(z["tokens"], c["tokens"], err_msg="p = 0 is the constant schedule")
    np.testing.assert_array_equal(z["trajectories"], c["trajectories"])
    assert not np.array_equal(p["tokens"], c["tokens"]), "the schedule changes this model's samples"
    assert ca["cfg_schedule"] == "constant" and ca["cfg_power"] == "0.0"
    assert pa["cfg_schedule"] == "power-cosine" and pa["cfg_power"] == "0.5"
    js = json.loads(pa["sampling"])
    assert js["cfg_schedule"] == "power-cosine" and js["cfg_power"] == 0.5 and js["cfg_scale"] == 6.0
    out = str(tmp_path / "bad.h5")
    bad = {
        ("--cfg-schedule", "cosine"): "Please provide one of 'constant' and 'power-cosine'",
        ("--cfg-schedule", "power-cosine"): "--cfg-schedule power-cosine needs --cfg-power",
        ("--cfg-power", "2"): "--cfg-power applies to --cfg-schedule power-cosine only",
        ("--cfg-schedule", "power-cosine", "--cfg-power=-1"): "--cfg-power must be a finite number >= 0, got -1.0",
        ("--cfg-schedule", "power-cosine", "--cfg-power", "nan"): "--cfg-power must be a finite number >= 0",
    }
    for flags, says in bad.items():
        r = run(base + list(flags) + ["--out", out], check=False)
        assert r.returncode != 0 and says in r.stderr, (flags, r.stderr)
        assert not os.path.exists(out)
