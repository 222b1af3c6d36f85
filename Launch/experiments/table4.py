#!/usr/bin/env python3
"""TensorAR's Table 4 in miniature, with a control: one command, resumable.

    python3 Launch/experiments/table4.py [--quick] [--out Results/table4] [--work Checkpoints/table4]
                                         [--data Data/fashion-mnist] [--ranks 2] [--rows control,default,...]

What it does, on the built-in Fashion-MNIST token cache (7x7 tokens, V = 512, 10 classes):
1. Pretrains a base: the plain LlamaGen model (preset small: D 128, 4 layers, no plug-in) from
   scratch. Budget (full): 2500 steps of 64 images, AdamW 2e-3 with cosine decay to 1e-4. Why this
   size: the default model (the same trunk with a plug-in trained from scratch for 400 steps)
   scores FID ~163 in evaluate.py's feature space; 2500 base-only steps (~2.7 epochs of the
   60k-image cache, ~10 min on 2 cores) make a clearly better model that is still far from
   converged, and at a cost that leaves room for 17 fine-tunes in the study's 150 minutes.
2. Fine-tunes every row from that base for the same steps, data, batch and schedule: 200 steps
   of 64 images; base group 1e-4 constant; plug-in group 1e-3 with 10 steps of warm-up and linear
   decay to 0 (the paper's recipe -- plug-in 1e-4 linear, base 1e-5 constant, SPEC 6 -- scaled
   up 10x: 200 steps are far fewer than the paper's, and a residual plug-in starts as the base
   itself). The control is the base alone under exactly the same base-group rate.
3. Chooses the guidance scale on the control by a small sweep (500 images per scale), fixes it,
   and evaluates every row with Launch/evaluate.py's metrics (FID, IS, precision, recall, class
   accuracy; 2000 images per row, temperature 1, no top-k/top-p) and validation loss per slot.
4. The control and the default row run with 3 seeds (fine-tune seed and sampling seed together);
   every other row with one.
5. Writes OUT/report.md (the table in the paper's layout, beside the paper's numbers), OUT/rows/*.json
   (one per row and seed), and the pictures (FID against k and d, loss curves of control and
   default, the default row's refinement, samples of control beside default).

Resumable: each finished row is stored with the hash of its settings and skipped when run again
with the same settings; an interrupted fine-tune resumes from its last checkpoint (tensorar-train
resumes by itself). Progress with an ETA for the whole study is printed after every stage.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "Launch"))
import evaluate  # noqa: E402

VERSION = 1  # bump when a change to this script changes what a finished row means
BIN = os.path.join(ROOT, ".build", "release")

# Budgets. `quick` is a smoke run of a few minutes (the test suite runs it).
BUDGETS = {
    "full": dict(
        pretrain_steps=2500,
        pretrain_warmup=50,
        finetune_steps=200,
        finetune_warmup=10,
        batch=64,
        micro=32,
        per_class=200,
        sweep_per_class=50,
        sweep=[1.0, 1.5, 2.0, 3.0],
        val_samples=1000,
        train_limit=None,
        seeds=3,
        checkpoint_every=50,
    ),
    "quick": dict(
        pretrain_steps=16,
        pretrain_warmup=2,
        finetune_steps=6,
        finetune_warmup=1,
        batch=16,
        micro=8,
        per_class=3,
        sweep_per_class=2,
        sweep=[1.0, 2.0],
        val_samples=32,
        train_limit=3000,
        seeds=1,
        checkpoint_every=3,
    ),
}

# The rows: name, the paper's label, the settings that differ from the default TensorAR row.
# A row whose settings equal the default's (Sine, k=4, d=2, replace noise) is the default row itself.
DEFAULT = {
    "model.window": 4,
    "model.plugin_depth": 2,
    "model.residual": "true",
    "noise.type": "replace",
    "noise.schedule": "sine",
}
ROWS = [
    ("control", "control (base fine-tuned alone)", {"model.window": 1, "model.plugin_depth": 0}),
    ("default", "TensorAR (k=4, d=2, residual, sine, replace)", {}),
    ("linear", "Linear", {"noise.schedule": "linear"}),
    ("sqrt", "Square root", {"noise.schedule": "sqrt"}),
    ("exponential", "Exponential", {"noise.schedule": "exponential"}),
    ("k2", "k=2", {"model.window": 2}),
    ("k8", "k=8", {"model.window": 8}),
    ("d1", "d=1", {"model.plugin_depth": 1}),
    ("d4", "d=4", {"model.plugin_depth": 4}),
    ("nores", "w/o residual", {"model.residual": "false"}),
    ("discrete", "Discrete noise", {"noise.type": "discrete"}),
    ("continuous", "Continuous noise", {"noise.type": "continuous"}),
    ("nonoise", "No noise", {"noise.type": "none"}),
]
# Why-questions asked of the default row after the first study (not part of a plain run: `--rows`).
# Each changes one thing of the fine-tuning recipe; see "Diagnostics" in the report.
DIAGNOSTICS = [
    ("base0", "base, not fine-tuned (base lr 0)", {"model.window": 1, "model.plugin_depth": 0, "optim.lr_base": 0}),
    ("frozen", "default, base frozen (base lr 0)", {"optim.lr_base": 0}),
    ("plr1e-4", "default, plug-in lr 1e-4 (the paper's)", {"optim.lr_plugin": 1e-4}),
    ("long", "default, 3x the steps (600)", {"train.steps": 600}),
    ("control-long", "control, 3x the steps (600)", {"model.window": 1, "model.plugin_depth": 0, "train.steps": 600}),
    ("slotw", "default, slot weights 1, 1/2, 1/4, 1/8", {"loss.slot_weights": "[1,0.5,0.25,0.125]"}),
]
MULTI_SEED = {"control", "default"}
QUICK_ROWS = ["control", "default"]


class StudyError(Exception):
    """A problem for a person to read: `error: <what>: <problem>`."""


def log(msg: str):
    print(msg, flush=True)


def settings_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def row_settings(name: str) -> dict:
    over = dict(ROWS_BY_NAME[name][2])
    s = dict(DEFAULT)
    s.update(over)
    if s["model.plugin_depth"] == 0:  # the base alone: no plug-in, hence no noise either
        for k in ["model.residual", "noise.type", "noise.schedule"]:
            s.pop(k)
    return s


ROWS_BY_NAME = {r[0]: r for r in ROWS + DIAGNOSTICS}


def cost_factor(s: dict) -> float:
    """Relative step and sampling cost of a row against the base (4 layers): the plug-in runs d
    encoder and d decoder blocks over k+1 slots per position (measured: k4 d2 5.5x, k8 d4 18.5x,
    k2 d1 2.4x)."""
    d = s.get("model.plugin_depth", 0)
    k = s.get("model.window", 1)
    return (4 + 2 * d * (k + 1)) / 4 if d else 1.0


# ----------------------------------------------------------------------------- running programs


def mpi_env() -> dict:
    env = dict(os.environ)
    env.update(
        {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMPI_MCA_rmaps_base_oversubscribe": "1"}
    )
    return env


def run_logged(cmd: list, log_path: str, prefix: str, show=lambda line: False):
    """Runs `cmd`, its output appended to `log_path`; lines for which `show` is true are printed."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a") as lf:
        lf.write(f"$ {' '.join(cmd)}\n")
        p = subprocess.Popen(cmd, env=mpi_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail = []
        for line in p.stdout:
            lf.write(line)
            tail = (tail + [line.rstrip()])[-15:]
            if show(line):
                log(f"  [{prefix}] {line.rstrip()}")
        p.wait()
    if p.returncode != 0:
        raise StudyError(
            f"{cmd[3] if cmd[0].endswith('mpirun') else cmd[0]}: exited with {p.returncode} "
            f"(full log: {log_path}):\n" + "\n".join(tail)
        )


def mpirun(ranks: int, program: str) -> list:
    path = os.path.join(BIN, program)
    if not os.path.exists(path):
        raise StudyError(f"{path}: not built (run `swift build -c release` in {ROOT})")
    return [shutil.which("mpirun") or "mpirun", "-n", str(ranks), "--bind-to", "none", path]


def ensure_data(data: str, work: str):
    if os.path.exists(os.path.join(data, "train", "dataset.json")) and os.path.exists(
        os.path.join(data, "val", "dataset.json")
    ):
        return
    log(f"data: building the Fashion-MNIST token cache in {data}")
    run_logged(
        [os.path.join(BIN, "tensorar-data"), "fashion-mnist", "--out", data],
        os.path.join(work, "logs", "data.log"),
        "data",
    )


# ----------------------------------------------------------------------------- training


def common_sets(b: dict, data: str, work: str, run: str, steps: int) -> dict:
    return {
        "model.preset": "small",
        "data.train": os.path.join(data, "train"),
        "data.val": os.path.join(data, "val"),
        "data.val_samples": b["val_samples"],
        "train.global_batch": b["batch"],
        "train.micro_batch": b["micro"],
        "train.steps": steps,
        "train.log_every": max(1, min(10, steps // 4)),
        "checkpoint.dir": os.path.join(work, "runs"),
        "checkpoint.run": run,
        "checkpoint.every": b["checkpoint_every"],
        "checkpoint.keep_last": 1,
    }


def pretrain_sets(b: dict) -> dict:
    return {
        "model.window": 1,
        "model.plugin_depth": 0,
        "train.seed": 0,
        "optim.lr_base": 2e-3,
        "optim.schedule_base": "cosine",
        "optim.warmup_base": b["pretrain_warmup"],
        "optim.final_lr_base": 1e-4,
        "optim.lr_plugin": 0,
        "optim.warmup_plugin": 0,
        "train.val_every": max(1, b["pretrain_steps"] // 5),
    }


def finetune_sets(b: dict, base_weights: str, seed: int) -> dict:
    return {
        "model.init_from": base_weights,
        "train.seed": seed,
        "optim.lr_base": 1e-4,
        "optim.schedule_base": "constant",
        "optim.warmup_base": 0,
        "optim.lr_plugin": 1e-3,
        "optim.schedule_plugin": "linear",
        "optim.warmup_plugin": b["finetune_warmup"],
        "optim.final_lr_plugin": 0,
        "train.val_every": max(1, b["finetune_steps"] // 4),
    }


def train(sets: dict, ranks: int, work: str, run: str) -> str:
    """Runs (or resumes, or finds complete) one tensorar-train run; returns its folder."""
    folder = os.path.join(work, "runs", run)
    done = os.path.join(folder, "study-done.json")
    if os.path.exists(done) and os.path.exists(os.path.join(folder, "model.safetensors")):
        return folder
    cmd = mpirun(ranks, "tensorar-train") + [os.path.join(ROOT, "Configs", "default.yaml")]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    t0 = time.time()
    run_logged(
        cmd,
        os.path.join(work, "logs", run + ".log"),
        run,
        show=lambda l: l.startswith(("step ", "validation", "resum", "error")),
    )
    with open(done, "w") as f:
        json.dump({"settings": sets, "seconds": time.time() - t0}, f, indent=1)
    return folder


def train_seconds(folder: str) -> float | None:
    try:
        return json.load(open(os.path.join(folder, "study-done.json")))["seconds"]
    except (OSError, KeyError, ValueError):
        return None


# ----------------------------------------------------------------------------- evaluation


class Study:
    """The paths, budget and shared state of one study run."""

    def __init__(self, a, budget: dict):
        self.a, self.b = a, budget
        self.out, self.work, self.data, self.ranks = a.out, a.work, a.data, a.ranks
        self.classifier = os.path.join(self.work, "reference-classifier.npz") if budget["train_limit"] else None
        os.makedirs(os.path.join(self.out, "rows"), exist_ok=True)

    def sample(self, weights: str, folder: str, cfg: float, seed: int, per_class: int) -> tuple[str, float, int]:
        """tensorar-sample on `ranks` ranks, timed; returns (samples.h5, seconds, images)."""
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "samples.h5")
        cmd = mpirun(self.ranks, "tensorar-sample") + [
            "--weights",
            weights,
            "--classes",
            "0-9",
            "--per-class",
            str(per_class),
            "--cfg-scale",
            str(cfg),
            "--temperature",
            "1",
            "--top-k",
            "0",
            "--top-p",
            "1",
            "--seed",
            str(seed),
            "--batch-size",
            "64",
            "--out",
            path,
        ]
        t0 = time.time()
        run_logged(cmd, os.path.join(folder, "sample.log"), "sample")
        return path, time.time() - t0, 10 * per_class

    def evaluate(
        self,
        weights: str,
        folder: str,
        cfg: float,
        seed: int,
        per_class: int,
        baselines: bool = False,
        val: bool = True,
    ) -> dict:
        samples, seconds, n = self.sample(weights, folder, cfg, seed, per_class)
        argv = [
            "--weights",
            weights,
            "--data",
            self.data,
            "--out",
            folder,
            "--samples",
            samples,
            "--seed",
            str(seed),
            "--val-limit",
            str(self.b["val_samples"] if val else 0),
        ]
        if not baselines:
            argv.append("--no-baselines")
        if self.classifier:
            argv += ["--classifier", self.classifier, "--train-limit", str(self.b["train_limit"])]
        report = evaluate.main(argv)
        report["sampling_seconds"] = seconds
        report["sampling_seconds_per_image"] = seconds / n
        return report


# ----------------------------------------------------------------------------- the study


def hashed(sets: dict) -> dict:
    """The settings that decide a run's numbers: not where its files go."""
    return {
        k: v
        for k, v in sets.items()
        if k not in ("checkpoint.dir", "checkpoint.run", "model.init_from", "data.train", "data.val")
    }


class Progress:
    """ETA for the whole study: each stage has an estimate in seconds; what was measured on the
    stages run in this invocation rescales the estimate of those still to run."""

    def __init__(self, total: float):
        self.total, self.done, self.measured_est, self.t0 = total, 0.0, 0.0, time.time()

    def finished(self, estimate: float, what: str, skipped: bool = False):
        self.done += estimate
        if not skipped:
            self.measured_est += estimate
        spent = time.time() - self.t0
        rate = spent / self.measured_est if self.measured_est > 0 else 1.0
        left = (self.total - self.done) * rate
        log(
            f"table4: {100 * self.done / max(1e-9, self.total):5.1f}% | {what} | elapsed {spent / 60:.1f} min"
            f" | ETA {left / 60:.1f} min"
        )

    def skip(self, estimate: float, what: str):
        self.finished(estimate, what + " (done before: skipped)", skipped=True)


def train_estimate(b: dict, steps: int, cost: float) -> float:
    return steps * 0.23 * cost * b["batch"] / 64  # measured: base 0.23 s per 64-image step on 2 ranks


def eval_estimate(per_class: int, cost: float) -> float:
    return 10 * per_class * 0.006 * cost + 20


def plan(study: Study, rows: list) -> list:
    """(row, seed index) pairs in the order they run: the control and default rows first, seed by
    seed, so the main comparison exists early; then the other rows."""
    order = []
    for i in range(study.b["seeds"]):
        order += [(name, i) for name in rows if name in MULTI_SEED]
    return order + [(name, 0) for name in rows if name not in MULTI_SEED]


class Base:
    """The pretrained base: its settings hash is known at once, the weights are trained on first
    use (a study whose rows are all in OUT/rows, e.g. after a fresh clone, trains nothing)."""

    def __init__(self, study: Study, progress: Progress):
        b = study.b
        self.study, self.progress = study, progress
        self.sets = common_sets(b, study.data, study.work, "", b["pretrain_steps"])
        self.sets.update(pretrain_sets(b))
        self.hash = settings_hash({"version": VERSION, "base": hashed(self.sets)})
        self.sets["checkpoint.run"] = f"base-{self.hash}"
        self.folder = os.path.join(study.work, "runs", self.sets["checkpoint.run"])
        self.weights = os.path.join(self.folder, "model.safetensors")
        self.estimate = train_estimate(b, b["pretrain_steps"], 1.0)
        self.ready = False

    KEPT = ["model.safetensors", "metrics.jsonl", "study-done.json"]

    def restore_kept(self):
        """Puts the copy kept in OUT/base (4.7 MB for the full budget) in the run folder when that is
        missing and the hash matches: a study continued on another machine fine-tunes from the same
        weights instead of a retrained base that differs in float rounding."""
        kept, info = os.path.join(self.study.out, "base"), os.path.join(self.study.out, "base.json")
        if os.path.exists(os.path.join(self.folder, "study-done.json")):
            return
        if not all(os.path.exists(os.path.join(kept, n)) for n in self.KEPT) or not os.path.exists(info):
            return
        if json.load(open(info)).get("hash") != self.hash:
            return
        os.makedirs(self.folder, exist_ok=True)
        for n in self.KEPT:
            shutil.copy(os.path.join(kept, n), os.path.join(self.folder, n))
        log(f"table4: base {self.hash} restored from {kept}")

    def keep(self):
        kept = os.path.join(self.study.out, "base")
        os.makedirs(kept, exist_ok=True)
        for n in self.KEPT:
            shutil.copy(os.path.join(self.folder, n), os.path.join(kept, n))

    def ensure(self) -> str:
        if not self.ready:
            self.restore_kept()
            was_done = os.path.exists(os.path.join(self.folder, "study-done.json"))
            train(self.sets, self.study.ranks, self.study.work, self.sets["checkpoint.run"])
            self.keep()
            steps = self.study.b["pretrain_steps"]
            (self.progress.skip if was_done else self.progress.finished)(
                self.estimate, f"base pretrained ({steps} steps)"
            )
            self.ready = True
            _, val = read_metrics(os.path.join(self.folder, "metrics.jsonl"))
            with open(os.path.join(self.study.out, "base.json"), "w") as f:
                json.dump(
                    {
                        "hash": self.hash,
                        "settings": hashed(self.sets),
                        "seconds": train_seconds(self.folder),
                        "val_loss": [{"step": v["step"], "val_loss": v["val_loss"]} for v in val],
                    },
                    f,
                    indent=1,
                )
        return self.weights


def finetune_plan(study: Study, name: str, seed_index: int, base: Base) -> tuple[dict, dict]:
    """The tensorar-train settings of one row and seed, and what identifies its numbers."""
    b = study.b
    seed = 100 + seed_index
    sets = common_sets(b, study.data, study.work, "", b["finetune_steps"])
    sets.update(finetune_sets(b, base.weights, seed))
    sets.update(row_settings(name))
    h = settings_hash({"version": VERSION, "base": base.hash, "run": hashed(sets)})
    sets["checkpoint.run"] = f"{name}-seed{seed}-{h}"
    return sets, {"hash": h, "seed": seed, "settings": hashed(sets)}


def finetune(study: Study, sets: dict, base: Base) -> str:
    base.ensure()
    return train(sets, study.ranks, study.work, sets["checkpoint.run"])


def choose_cfg(study: Study, base: Base, progress: Progress) -> float:
    """The guidance scale with the lowest FID on the control (seed 0), fixed for every row."""
    b = study.b
    sets, info = finetune_plan(study, "control", 0, base)
    path = os.path.join(study.out, "cfg_sweep.json")
    key = settings_hash(
        {"version": VERSION, "control": info["hash"], "scales": b["sweep"], "per_class": b["sweep_per_class"]}
    )
    est = len(b["sweep"]) * eval_estimate(b["sweep_per_class"], 1.0)
    if os.path.exists(path) and json.load(open(path)).get("hash") == key:
        chosen = json.load(open(path))["chosen"]
        progress.skip(est, f"guidance sweep on the control: {chosen}")
        return chosen
    control = finetune(study, sets, base)
    sweep = []
    for g in b["sweep"]:
        r = study.evaluate(
            control, os.path.join(study.work, "eval", f"cfg-sweep-{g}"), g, 100, b["sweep_per_class"], val=False
        )
        m = r["metrics"]["model"]
        sweep.append(
            {
                "cfg_scale": g,
                "fid": m["fid"],
                "inception_score": m["inception_score"],
                "precision": m["precision"],
                "recall": m["recall"],
                "accuracy": m["accuracy"],
                "n": m["n"],
            }
        )
        log(f"table4: guidance {g}: FID {m['fid']:.2f}")
    chosen = min(sweep, key=lambda s: s["fid"])["cfg_scale"]
    with open(path, "w") as f:
        json.dump(
            {"hash": key, "chosen": chosen, "sweep": sweep, "images_per_scale": 10 * b["sweep_per_class"]}, f, indent=1
        )
    progress.finished(est, f"guidance sweep on the control: chose {chosen}")
    return chosen


def keep_artifacts(record: dict, folder: str):
    """Copies what the report's pictures need (samples, refinement picture, metrics.jsonl) next
    to the row's JSON, so a report can be redrawn from OUT alone."""
    os.makedirs(folder, exist_ok=True)
    for src, name in [
        (os.path.join(record["eval_folder"], "samples.png"), "samples.png"),
        (os.path.join(record["eval_folder"], "trajectories.png"), "trajectories.png"),
        (record["metrics_jsonl"], "metrics.jsonl"),
    ]:
        if src and os.path.exists(src):
            shutil.copy(src, os.path.join(folder, name))
    record["artifacts"] = os.path.basename(folder)


def run_row(study: Study, name: str, seed_index: int, base: Base, cfg: float, progress: Progress):
    b = study.b
    sets, info = finetune_plan(study, name, seed_index, base)
    cost = cost_factor(row_settings(name))
    steps = sets["train.steps"]
    est = train_estimate(b, steps, cost) + eval_estimate(b["per_class"], cost)
    seed = info["seed"]
    path = os.path.join(study.out, "rows", f"{name}-seed{seed}.json")
    what = f"{name} seed {seed}"
    key = settings_hash({"train": info["hash"], "cfg": cfg, "per_class": b["per_class"], "version": VERSION})
    if os.path.exists(path) and json.load(open(path)).get("hash") == key:
        progress.skip(est, what)
        return
    weights = finetune(study, sets, base)
    baselines = name == "control" and seed_index == 0
    t0 = time.time()
    folder = os.path.join(study.work, "eval", f"{name}-seed{seed}")
    r = study.evaluate(weights, folder, cfg, seed, b["per_class"], baselines=baselines)
    record = {
        "row": name,
        "label": ROWS_BY_NAME[name][1],
        "seed": seed,
        "hash": key,
        "train_hash": info["hash"],
        "settings": info["settings"],
        "cfg_scale": cfg,
        "metrics": r["metrics"]["model"],
        "val_loss": r["val_loss"],
        "refinement": r["refinement"],
        "loss_curves": r["loss_curves"],
        "sampling_seconds_per_image": r["sampling_seconds_per_image"],
        "train_seconds": train_seconds(weights),
        "eval_seconds": time.time() - t0,
        "weights": weights,
        "eval_folder": folder,
        "metrics_jsonl": r["metrics_jsonl"],
    }
    if baselines:
        record["baselines"] = {k: v for k, v in r["metrics"].items() if k != "model"}
    keep_artifacts(record, path[: -len(".json")])
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    m = record["metrics"]
    progress.finished(
        est, f"{what}: FID {m['fid']:.2f}, IS {m['inception_score']:.2f}, val loss {r['val_loss']['train']['loss']:.4f}"
    )


# ----------------------------------------------------------------------------- the report

# The paper's ablation (LlamaGen-B on ImageNet 256, FID), for direction only. Source: not the paper's
# PDF (not reachable here) but published notes of its ICLR 2026 version (arXiv v2), whose ablation
# default is k=4, d=1, exponential schedule (FID 4.71); the first version's default, the one this
# study's default row follows (k=4, d=2, sine, residual), is FID 4.75 (5.46 for the base). Rows the
# notes give no number for (residual, noise types) stay empty.
PAPER_FID = {
    "control": "5.46 (base, not fine-tuned)",
    "default": 4.75,
    "linear": 4.79,
    "Sine": 4.75,
    "sqrt": 4.84,
    "exponential": 4.71,
    "k2": 4.78,
    "k=4": 4.71,
    "k8": 4.68,
    "d1": 4.71,
    "d=2": 4.79,
    "d4": 4.90,
}

TABLE_ORDER = [
    ("Baseline", ["control"]),
    ("Default", ["default"]),
    ("Noise schedule", ["linear", "default:Sine", "sqrt", "exponential"]),
    ("Window k", ["k2", "default:k=4", "k8"]),
    ("Depth d", ["d1", "default:d=2", "d4"]),
    ("Residual", ["default:w/ residual", "nores"]),
    ("Noise type", ["default:Replace (ours, default)", "discrete", "continuous", "nonoise"]),
]


def load_rows(out: str) -> dict:
    rows = {}
    folder = os.path.join(out, "rows")
    for f in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if f.endswith(".json"):
            r = json.load(open(os.path.join(folder, f)))
            rows.setdefault(r["row"], []).append(r)
    return rows


def stat(records: list, get) -> tuple[float, float | None]:
    v = np.array([get(r) for r in records], dtype=float)
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else None)


def fmt(records: list, get, digits: int = 2) -> str:
    if not records:
        return "pending"
    m, s = stat(records, get)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if s is not None else f"{m:.{digits}f}"


METRICS = [
    ("FID", lambda r: r["metrics"]["fid"], 2),
    ("IS", lambda r: r["metrics"]["inception_score"], 2),
    ("Precision", lambda r: r["metrics"]["precision"], 3),
    ("Recall", lambda r: r["metrics"]["recall"], 3),
    ("Accuracy", lambda r: r["metrics"]["accuracy"], 3),
    ("Val loss", lambda r: r["val_loss"]["train"]["loss"], 4),
]


def table_lines(rows: dict) -> list:
    head = "| group | row | seeds | paper FID | " + " | ".join(m[0] for m in METRICS) + " | val loss per slot |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for group, names in TABLE_ORDER:
        for entry in names:
            name, _, label = entry.partition(":")
            recs = rows.get(name, [])
            label = label or ROWS_BY_NAME[name][1]
            paper = PAPER_FID.get(label if ":" in entry else name)
            slots = (
                " / ".join(f"{x:.3f}" for x in np.mean([r["val_loss"]["train"]["slot_losses"] for r in recs], axis=0))
                if recs
                else ""
            )
            cells = [fmt(recs, get, d) for _, get, d in METRICS]
            lines.append(
                f"| {group} | {label} | {len(recs)} | {'' if paper is None else paper} | "
                + " | ".join(cells)
                + f" | {slots} |"
            )
    return lines


def artifact(out: str, r: dict, name: str) -> str:
    """A row's picture or metrics file: the copy kept in OUT/rows, else the work folder's."""
    if r.get("artifacts"):
        return os.path.join(out, "rows", r["artifacts"], name)
    return r["metrics_jsonl"] if name == "metrics.jsonl" else os.path.join(r["eval_folder"], name)


def plot_fid_against(path: str, rows: dict, xs: list, names: list, xlabel: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    pts = [(x, stat(rows[n], METRICS[0][1])) for x, n in zip(xs, names) if rows.get(n)]
    if pts:
        ax.errorbar(
            [p[0] for p in pts],
            [p[1][0] for p in pts],
            yerr=[p[1][1] or 0 for p in pts],
            fmt="o-",
            capsize=4,
            label="TensorAR (others as default)",
        )
    if rows.get("control"):
        m, s = stat(rows["control"], METRICS[0][1])
        ax.axhline(m, color="C3", ls="--", label="control (base fine-tuned alone)")
        if s:
            ax.axhspan(m - s, m + s, color="C3", alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("FID (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_metrics(path: str) -> tuple[list, list]:
    train, val = [], []
    for line in open(path):
        if line.strip():
            r = json.loads(line)
            if "loss" in r and "step" in r:
                train.append(r)
            if "val_loss" in r:
                val.append(r)
    return train, val


def plot_loss_curves(path: str, rows: dict, out: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, color in [("control", "C3"), ("default", "C0"), ("control-long", "C1"), ("long", "C2")]:
        for r in rows.get(name, [])[:1]:
            train, val = read_metrics(artifact(out, r, "metrics.jsonl"))
            steps = [t["step"] for t in train]
            ax.plot(
                steps,
                [t["slot_losses"][0] for t in train],
                color=color,
                alpha=0.8,
                label=f"{name}: train, next token (slot 0)",
            )
            if name == "default":
                ax.plot(steps, [t["loss"] for t in train], color=color, ls=":", label="default: train, mean of k slots")
            if name in ("long", "control-long"):  # the 3x-steps diagnostics: validation only, to keep it readable
                ax.lines[-1].remove()
            ax.plot(
                [v["step"] for v in val],
                [v["val_slot_losses"][0] for v in val],
                "o--",
                color=color,
                label=f"{name}: validation, slot 0",
            )
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("cross entropy (nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("fine-tuning from the same base (seed 100; 'long': the 600-step diagnostics)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_samples_side_by_side(path: str, rows: dict, out: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    pair = [(n, rows[n][0]) for n in ["control", "default"] if rows.get(n)]
    fig, axes = plt.subplots(1, len(pair), figsize=(7 * len(pair), 7.5))
    for ax, (name, r) in zip(np.atleast_1d(axes), pair):
        ax.imshow(Image.open(artifact(out, r, "samples.png")))
        ax.set_title(f"{name}: FID {r['metrics']['fid']:.1f} (seed {r['seed']}, guidance {r['cfg_scale']})")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def pictures(out: str, rows: dict) -> list:
    made = []
    if any(rows.get(n) for n in ["k2", "default", "k8"]):
        plot_fid_against(
            os.path.join(out, "fid_vs_k.png"), rows, [2, 4, 8], ["k2", "default", "k8"], "window k (d = 2)"
        )
        made.append("fid_vs_k.png")
    if any(rows.get(n) for n in ["d1", "default", "d4"]):
        plot_fid_against(
            os.path.join(out, "fid_vs_d.png"), rows, [1, 2, 4], ["d1", "default", "d4"], "plug-in depth d (k = 4)"
        )
        made.append("fid_vs_d.png")
    if rows.get("control") or rows.get("default"):
        plot_loss_curves(os.path.join(out, "loss_curves.png"), rows, out)
        plot_samples_side_by_side(os.path.join(out, "samples_control_vs_default.png"), rows, out)
        made += ["loss_curves.png", "samples_control_vs_default.png"]
    if rows.get("default"):
        shutil.copy(artifact(out, rows["default"][0], "trajectories.png"), os.path.join(out, "refinement_default.png"))
        made.append("refinement_default.png")
    return made


def conclusion(rows: dict) -> str:
    c, d = rows.get("control", []), rows.get("default", [])
    if not c or not d:
        return "Not yet: the control and the default row are both needed."
    (cm, cs), (dm, ds) = stat(c, METRICS[0][1]), stat(d, METRICS[0][1])
    spread = max(x for x in [cs or 0, ds or 0])
    gain = cm - dm
    if not spread:
        verdict = "cannot be judged yet: one seed each, no spread"
    elif gain > 2 * spread:
        verdict = "holds: the default plug-in lowers FID by more than twice the seed spread"
    elif gain < -2 * spread:
        verdict = "is reversed here: the default plug-in raises FID by more than twice the seed spread"
    else:
        verdict = "does not hold here: the difference is within twice the seed spread"
    return (
        f"FID of the default TensorAR row {dm:.2f}{f' ± {ds:.2f}' if ds else ''} against the control's "
        f"{cm:.2f}{f' ± {cs:.2f}' if cs else ''} ({len(d)} and {len(c)} seeds): a gain of {gain:.2f}; "
        f"the paper's claim {verdict}."
    )


def diagnostic_lines(rows: dict) -> list:
    """The recipe variations of DIAGNOSTICS beside the control and the default row (one seed each
    unless the row has more), with clean-input slot losses: how much a slot reads the overlap."""
    head = (
        "| row | seeds | FID | IS | Precision | Recall | Accuracy | val loss per slot (training noise) "
        "| val loss per slot (clean inputs) |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, label, _ in [ROWS_BY_NAME["control"], ROWS_BY_NAME["default"]] + DIAGNOSTICS:
        recs = rows.get(name, [])
        if not recs:
            continue
        cells = [fmt(recs, get, d) for _, get, d in METRICS[:5]]
        slots = [
            " / ".join(f"{x:.3f}" for x in np.mean([r["val_loss"][n]["slot_losses"] for r in recs], axis=0))
            for n in ["train", "none"]
        ]
        lines.append(f"| {label} | {len(recs)} | " + " | ".join(cells) + f" | {slots[0]} | {slots[1]} |")
    return lines


def refinement_lines(rows: dict) -> list:
    d = rows.get("default", [])
    if not d:
        return []
    agree = np.mean([r["refinement"]["slot_agrees_with_final"] for r in d], axis=0)
    lines = [
        "| slot (steps ahead) | " + " | ".join(str(j) for j in range(len(agree))) + " |",
        "|---|" + "---|" * len(agree),
        "| token equals its final value | " + " | ".join(f"{a:.3f}" for a in agree) + " |",
        "| token changes before it is final | " + " | ".join(f"{1 - a:.3f}" for a in agree) + " |",
    ]
    return lines


def timing_lines(rows: dict) -> list:
    lines = ["| row | k | d | sampling s/image | fine-tune min | evaluation min |", "|---|---|---|---|---|---|"]
    for name, _, _ in ROWS:
        for r in rows.get(name, [])[:1]:
            s = r["settings"]
            lines.append(
                f"| {name} | {s.get('model.window', 1)} | {s.get('model.plugin_depth', 0)} | "
                f"{r['sampling_seconds_per_image'] * 1000:.2f} ms | {(r['train_seconds'] or 0) / 60:.1f} | "
                f"{r['eval_seconds'] / 60:.1f} |"
            )
    return lines


def write_report(study: Study, base_seconds: float | None, cfg_path: str):
    out, b = study.out, study.b
    rows = load_rows(out)
    made = pictures(out, rows)
    sweep = json.load(open(cfg_path)) if os.path.exists(cfg_path) else None
    md = [
        "# TensorAR Table 4 in miniature (Fashion-MNIST tokens)",
        "",
        f"Made by `Launch/experiments/table4.py{' --quick' if study.a.quick else ''}`; "
        f"budget: base {b['pretrain_steps']} steps, every row {b['finetune_steps']} fine-tuning steps of {b['batch']} "
        f"images, {10 * b['per_class']} samples per row, "
        f"guidance {sweep['chosen'] if sweep else '?'} (chosen on the control)."
        + (f" Base pretraining took {base_seconds / 60:.1f} min." if base_seconds else ""),
        "",
        "## Conclusion",
        "",
        conclusion(rows),
        "",
        "## The table",
        "",
    ]
    md += table_lines(rows)
    md += [
        "",
        "Mean ± sample standard deviation over seeds where a row has several; a one-seed row is one number: "
        "read it against the spread of the 3-seed rows above it. Paper FID: LlamaGen-B on ImageNet 256, a different "
        "data set and scale, so compare directions, not values; the ablation rows are from notes of the paper's second "
        "version, whose ablation default is k=4, d=1, exponential (4.71), see PAPER_FID in the script.",
        "",
    ]
    if rows.get("control") and rows["control"][0].get("baselines"):
        md += [
            "Baselines (same metrics, same count): "
            + ", ".join(
                f"{k} FID {v['fid']:.2f}, IS {v['inception_score']:.2f}, accuracy {v['accuracy']:.3f}"
                for k, v in rows["control"][0]["baselines"].items()
            ),
            "",
        ]
    if sweep:
        md += ["## Guidance sweep on the control", "", "| cfg scale | FID | IS | accuracy |", "|---|---|---|---|"]
        md += [
            f"| {s['cfg_scale']} | {s['fid']:.2f} | {s['inception_score']:.2f} | {s['accuracy']:.3f} |"
            for s in sweep["sweep"]
        ]
        md += [""]
    if any(rows.get(d[0]) for d in DIAGNOSTICS):
        md += ["## Diagnostics: one change to the fine-tuning recipe at a time", ""] + diagnostic_lines(rows) + [""]
    md += ["## Refinement of the default row", ""] + refinement_lines(rows)
    md += ["", "## Time", ""] + timing_lines(rows)
    md += ["", "## Pictures", ""] + [f"![{m}]({m})" for m in made]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    log(f"table4: wrote {os.path.join(out, 'report.md')}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run of a few minutes (tiny budgets, two rows)")
    ap.add_argument(
        "--out", help="results folder (default Results/table4; with --quick Checkpoints/table4-quick/results)"
    )
    ap.add_argument("--work", help="runs, samples and logs (default Checkpoints/table4, or Checkpoints/table4-quick)")
    ap.add_argument(
        "--data", default=os.path.join(ROOT, "Data", "fashion-mnist"), help="folder of the train and val caches"
    )
    ap.add_argument("--ranks", type=int, default=2, help="MPI ranks for training and sampling")
    ap.add_argument(
        "--rows", help="only these rows, comma separated (the control always runs): " + ",".join(r[0] for r in ROWS)
    )
    ap.add_argument("--report-only", action="store_true", help="write report.md from the rows finished so far")
    a = ap.parse_args(argv)
    a.work = a.work or os.path.join(ROOT, "Checkpoints", "table4-quick" if a.quick else "table4")
    a.out = a.out or (os.path.join(a.work, "results") if a.quick else os.path.join(ROOT, "Results", "table4"))
    return a


def main(argv=None):
    a = parse_args(argv)
    b = BUDGETS["quick" if a.quick else "full"]
    rows = a.rows.split(",") if a.rows else (QUICK_ROWS if a.quick else [r[0] for r in ROWS])
    unknown = [r for r in rows if r not in ROWS_BY_NAME]
    if unknown:
        raise StudyError(f"--rows: unknown row(s) {', '.join(unknown)}; known: {', '.join(ROWS_BY_NAME)}")
    rows = ["control"] + [r for r in rows if r != "control"]
    study = Study(a, b)
    cfg_path = os.path.join(study.out, "cfg_sweep.json")
    if not a.report_only:
        ensure_data(study.data, study.work)
        order = plan(study, rows)
        total = train_estimate(b, b["pretrain_steps"], 1) + len(b["sweep"]) * eval_estimate(b["sweep_per_class"], 1)
        total += sum(
            train_estimate(b, b["finetune_steps"], cost_factor(row_settings(n)))
            + eval_estimate(b["per_class"], cost_factor(row_settings(n)))
            for n, _ in order
        )
        progress = Progress(total)
        log(f"table4: {len(order)} fine-tunes of {len(rows)} rows; estimated {total / 60:.0f} min on this machine")
        base = Base(study, progress)
        cfg = choose_cfg(study, base, progress)
        for name, i in order:
            run_row(study, name, i, base, cfg, progress)
    base_path = os.path.join(study.out, "base.json")
    write_report(study, json.load(open(base_path)).get("seconds") if os.path.exists(base_path) else None, cfg_path)


if __name__ == "__main__":
    try:
        main()
    except (StudyError, evaluate.EvalError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("table4: interrupted; run the same command again to continue", file=sys.stderr)
        sys.exit(130)
