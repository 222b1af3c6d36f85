#!/usr/bin/env python3
"""Offline evaluation of a TensorAR model: samples, image metrics, loss, pictures.

Usage (from the repository root, after `swift build -c release`):

    python3 Launch/evaluate.py --weights Checkpoints/default --data Data/fashion-mnist \
        [--out Outputs/eval] [--per-class 100] [--cfg-scale 1.5[,B]] [--temperature 1[,B]] [--top-k 0]
        [--top-p 1] [--seed 0] [--ranks 1] [--classifier FILE.npz] [--no-baselines]
        [--cfg-schedule constant|power-cosine --cfg-power P]

`--weights` is a .safetensors file or a checkpoint folder (a run folder means its latest);
`--data` is a folder holding the `train` and `val` token caches (SPEC section 7), the train cache
with its `codebook.h5` (a patch VQ codebook: tokens decode to pixels without a neural decoder).

What it does:
1. `tensorar-sample` draws `per-class` images of every class (MPI ranks with `--ranks`).
2. Tokens are decoded to pixels with the codebook. Real images are the caches' tokens decoded the
   same way, so the metrics measure the generator, not the tokenizer.
3. A reference classifier (a numpy MLP, pixels -> 256 -> 128 -> classes, seeded) is trained once on
   the decoded training images and cached (default: `<data>/train/reference-classifier.npz`,
   retrained when the cache, the codebook or the settings change). Its 128-wide penultimate layer
   is the feature space of every metric:
   - FID against the training set's feature mean and covariance;
   - an Inception-style score, exp E_x KL(p(y|x) || p(y)), from the classifier's softmax
     (at most the number of classes);
   - precision and recall (Kynkaenniemi et al. 2019): k-nearest-neighbour manifolds, k = 3, with as
     many training images (a seeded subset) as samples;
   - class accuracy: how often the classifier finds the class the image was sampled for.
   With baselines (default) the same metrics for real validation images (the same count per class:
   near the best possible) and for uniformly random tokens (the worst).
4. Validation loss per slot via `tensorar-eval` (training noise under its fixed seed, and clean).
5. Writes to `--out`: `report.json`, `samples.h5`, `samples.png` (a row of samples per class),
   `trajectories.png` (refinement, as the paper's Figure 7: for a few images, one row per slot
   from the first guess, slot k-1, down to the final token, slot 0; every token decoded as it was
   predicted at that slot), `loss_curves.png` (training and validation loss from the run's
   `metrics.jsonl`, total and per slot).

Needs numpy, scipy, h5py, pillow and matplotlib (`Launch/setup.sh` installs them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"]
CLASSIFIER_VERSION = 1


class EvalError(Exception):
    """A problem with the input, for a person to read: `error: <file>: <problem>`."""


def log(msg: str):
    print(msg, flush=True)


# ----------------------------------------------------------------------------- data

def read_cache(folder: str, limit: int | None = None, augmentation: int = 0):
    """Tokens [N, T] (int64) and labels [N] of a token cache (SPEC 7), one augmentation."""
    import h5py

    path = os.path.join(folder, "dataset.json")
    if not os.path.exists(path):
        raise EvalError(f"{folder}: no token cache here (dataset.json missing)")
    with open(path) as f:
        info = json.load(f)
    codes, labels, n = [], [], 0
    for s in info["shards"]:
        with h5py.File(os.path.join(folder, s["file"]), "r") as h:
            take = s["num_samples"] if limit is None else min(s["num_samples"], limit - n)
            codes.append(np.asarray(h["codes"][:take, augmentation, :], dtype=np.int64))
            labels.append(np.asarray(h["labels"][:take], dtype=np.int64))
            n += take
        if limit is not None and n >= limit:
            break
    return np.concatenate(codes), np.concatenate(labels), info


class Codebook:
    """A patch VQ codebook (`codebook.h5`): code v is one patch x patch x channels patch in [0, 1]."""

    def __init__(self, path: str):
        import h5py

        if not os.path.exists(path):
            raise EvalError(f"{path}: missing; this script decodes tokens with a patch codebook "
                            "(for LlamaGen caches use tensorar-sample --npy-dir and LlamaGen's VQ decoder, see README)")
        with h5py.File(path, "r") as h:
            self.vectors = np.asarray(h["codebook"], dtype=np.float32)
            self.patch = int(h.attrs["patch_size"])
            self.height = int(h.attrs["image_h"])
            self.width = int(h.attrs["image_w"])
            self.channels = int(h.attrs["channels"])
        self.path = path

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """Tokens [N, T] -> images [N, H, W, C] float32 in [0, 1]; a token outside [0, V) is grey."""
        p, c = self.patch, self.channels
        gh, gw = self.height // p, self.width // p
        t = np.asarray(tokens, dtype=np.int64)
        bad = (t < 0) | (t >= len(self.vectors))
        patches = self.vectors[np.clip(t, 0, len(self.vectors) - 1)]
        patches[bad] = 0.5
        x = patches.reshape(len(t), gh, gw, p, p, c).transpose(0, 1, 3, 2, 4, 5)
        return np.clip(x.reshape(len(t), gh * p, gw * p, c), 0, 1)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- classifier

class Classifier:
    """An MLP on pixels: x -> 256 -> 128 (features) -> classes, ReLU, trained with Adam."""

    def __init__(self, params: dict, mean: np.ndarray, scale: float):
        self.p = params
        self.mean = mean
        self.scale = scale

    @staticmethod
    def train(images: np.ndarray, labels: np.ndarray, classes: int, seed: int = 0, epochs: int = 8,
              batch: int = 128, lr: float = 1e-3, verbose: bool = True) -> "Classifier":
        rng = np.random.default_rng(seed)
        x = images.reshape(len(images), -1).astype(np.float32)
        mean = x.mean(0)
        scale = float(x.std()) + 1e-6
        x = (x - mean) / scale
        dims = [x.shape[1], 256, 128, classes]
        p = {}
        for i in range(3):
            p[f"w{i}"] = (rng.standard_normal((dims[i], dims[i + 1])) * np.sqrt(2.0 / dims[i])).astype(np.float32)
            p[f"b{i}"] = np.zeros(dims[i + 1], np.float32)
        m = {k: np.zeros_like(v) for k, v in p.items()}
        v2 = {k: np.zeros_like(v) for k, v in p.items()}
        step = 0
        for epoch in range(epochs):
            order = rng.permutation(len(x))
            loss_sum = 0.0
            for s in range(0, len(x), batch):
                idx = order[s:s + batch]
                xb, yb = x[idx], labels[idx]
                h0 = xb @ p["w0"] + p["b0"]; a0 = np.maximum(h0, 0)
                h1 = a0 @ p["w1"] + p["b1"]; a1 = np.maximum(h1, 0)
                z = a1 @ p["w2"] + p["b2"]
                z = z - z.max(1, keepdims=True)
                pr = np.exp(z); pr /= pr.sum(1, keepdims=True)
                loss_sum += float(-np.log(pr[np.arange(len(yb)), yb] + 1e-12).sum())
                dz = pr; dz[np.arange(len(yb)), yb] -= 1; dz /= len(yb)
                g = {"w2": a1.T @ dz, "b2": dz.sum(0)}
                d1 = (dz @ p["w2"].T) * (h1 > 0)
                g["w1"] = a0.T @ d1; g["b1"] = d1.sum(0)
                d0 = (d1 @ p["w1"].T) * (h0 > 0)
                g["w0"] = xb.T @ d0; g["b0"] = d0.sum(0)
                step += 1
                for k in p:
                    m[k] = 0.9 * m[k] + 0.1 * g[k]
                    v2[k] = 0.999 * v2[k] + 0.001 * g[k] * g[k]
                    mh = m[k] / (1 - 0.9 ** step); vh = v2[k] / (1 - 0.999 ** step)
                    p[k] -= (lr * mh / (np.sqrt(vh) + 1e-8)).astype(np.float32)
            if verbose:
                log(f"  classifier epoch {epoch + 1}/{epochs}: train loss {loss_sum / len(x):.4f}")
        return Classifier(p, mean, scale)

    def forward(self, images: np.ndarray, chunk: int = 4096):
        """Features [N, 128] and class probabilities [N, C]."""
        feats, probs = [], []
        flat = images.reshape(len(images), -1).astype(np.float32)
        for s in range(0, len(flat), chunk):
            x = (flat[s:s + chunk] - self.mean) / self.scale
            a0 = np.maximum(x @ self.p["w0"] + self.p["b0"], 0)
            a1 = np.maximum(a0 @ self.p["w1"] + self.p["b1"], 0)
            z = a1 @ self.p["w2"] + self.p["b2"]
            z = z - z.max(1, keepdims=True)
            pr = np.exp(z); pr /= pr.sum(1, keepdims=True)
            feats.append(a1); probs.append(pr)
        return np.concatenate(feats).astype(np.float64), np.concatenate(probs).astype(np.float64)


class Reference:
    """The classifier plus the training set's features: everything metrics compare against."""

    def __init__(self, clf: Classifier, train_features: np.ndarray, classes: int):
        self.clf = clf
        self.features = train_features
        self.mu = train_features.mean(0)
        self.sigma = np.cov(train_features, rowvar=False)
        self.classes = classes


def reference_key(train_dir: str, info: dict, codebook_path: str, seed: int, epochs: int) -> dict:
    return {"version": CLASSIFIER_VERSION, "shards": [s["sha256"] for s in info["shards"]],
            "codebook_sha256": file_sha256(codebook_path), "seed": seed, "epochs": epochs,
            "num_samples": info["num_samples"], "num_classes": info["num_classes"]}


def load_or_train_reference(train_dir: str, codebook: Codebook, path: str, seed: int = 0, epochs: int = 8,
                            limit: int | None = None) -> Reference:
    """The cached reference classifier at `path`, or a new one trained on the decoded training images."""
    tokens, labels, info = read_cache(train_dir, limit=limit)
    key = reference_key(train_dir, info, codebook.path, seed, epochs)
    key["limit"] = limit
    if os.path.exists(path):
        z = np.load(path, allow_pickle=False)
        if json.loads(str(z["key"])) == key:
            clf = Classifier({k: z[k] for k in ["w0", "b0", "w1", "b1", "w2", "b2"]}, z["mean"], float(z["scale"]))
            log(f"reference classifier: {path} (cached)")
            return Reference(clf, z["train_features"], info["num_classes"])
        log(f"reference classifier: {path} was made for another cache or settings; retraining")
    log(f"reference classifier: training on {len(tokens)} decoded training images (seed {seed}, {epochs} epochs)")
    t0 = time.time()
    images = codebook.decode(tokens)
    clf = Classifier.train(images, labels, info["num_classes"], seed=seed, epochs=epochs)
    feats, _ = clf.forward(images)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, key=json.dumps(key), mean=clf.mean, scale=clf.scale, train_features=feats.astype(np.float32), **clf.p)
    os.replace(tmp, path)
    log(f"reference classifier: saved {path} ({time.time() - t0:.1f} s)")
    return Reference(clf, feats.astype(np.float32).astype(np.float64), info["num_classes"])


# ----------------------------------------------------------------------------- metrics

def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)). tr (S1 S2)^(1/2) is computed as the sum of
    the square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2) (symmetric, positive
    semi-definite), which stays exact when a covariance is singular (dead ReLU features)."""
    diff = mu1 - mu2
    r = _psd_sqrt(sigma1)
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh(r @ sigma2 @ r), 0, None)).sum())
    return float(max(0.0, diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean))


def inception_score(probs: np.ndarray) -> float:
    """exp(E_x KL(p(y|x) || p(y))), p(y) the mean prediction."""
    py = probs.mean(0, keepdims=True)
    kl = (probs * (np.log(probs + 1e-12) - np.log(py + 1e-12))).sum(1)
    return float(np.exp(kl.mean()))


def _sq_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.maximum(d, 0)


def knn_radii(x: np.ndarray, k: int = 3, chunk: int = 2048) -> np.ndarray:
    """Squared distance from each point to its k-th nearest other point."""
    out = np.empty(len(x))
    for s in range(0, len(x), chunk):
        d = _sq_distances(x[s:s + chunk], x)
        out[s:s + chunk] = np.partition(d, k, axis=1)[:, k]  # index 0 is the point itself
    return out


def manifold_coverage(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, chunk: int = 2048) -> float:
    """Fraction of points inside at least one ball (centre, radius)."""
    inside = 0
    for s in range(0, len(points), chunk):
        d = _sq_distances(points[s:s + chunk], centres)
        inside += int((d <= radii[None, :]).any(1).sum())
    return inside / max(1, len(points))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3):
    """Kynkaenniemi et al. 2019: precision = fake inside the real manifold, recall = the reverse."""
    return (manifold_coverage(fake, real, knn_radii(real, k)), manifold_coverage(real, fake, knn_radii(fake, k)))


def image_metrics(images: np.ndarray, labels: np.ndarray, ref: Reference, seed: int = 0, k: int = 3) -> dict:
    """FID, Inception-style score, precision, recall and class accuracy of images [N, H, W, C]."""
    feats, probs = ref.clf.forward(images)
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    rng = np.random.default_rng(seed + 12345)
    n = min(len(feats), len(ref.features))
    real = ref.features[np.sort(rng.choice(len(ref.features), size=n, replace=False))]
    fake = feats if len(feats) == n else feats[np.sort(rng.choice(len(feats), size=n, replace=False))]
    precision, recall = precision_recall(real, fake, k)
    return {
        "n": int(len(images)),
        "fid": frechet_distance(mu, sigma, ref.mu, ref.sigma),
        "inception_score": inception_score(probs),
        "precision": float(precision),
        "recall": float(recall),
        "accuracy": float((probs.argmax(1) == labels).mean()),
    }


def balanced_subset(labels: np.ndarray, classes, per_class: int) -> np.ndarray:
    """Indices of the first `per_class` items of each class, class-major (as tensorar-sample orders them)."""
    out = []
    for c in classes:
        idx = np.flatnonzero(labels == c)[:per_class]
        if len(idx) < per_class:
            raise EvalError(f"class {c} has only {len(idx)} validation images; lower --per-class to {len(idx)}")
        out.append(idx)
    return np.concatenate(out)


# ----------------------------------------------------------------------------- running the programs

def binary(bin_dir: str, name: str) -> str:
    path = os.path.join(bin_dir, name)
    if not os.path.exists(path):
        raise EvalError(f"{path}: not built (run `swift build -c release` in {ROOT}, or pass --bin)")
    return path


def run_program(cmd: list, ranks: int = 1, capture: bool = False) -> str:
    env = dict(os.environ)
    if ranks > 1:
        env.update({"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                    "OMPI_MCA_rmaps_base_oversubscribe": "1"})
        cmd = ["mpirun", "-n", str(ranks)] + cmd
    r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise EvalError(f"{os.path.basename(cmd[0]) if ranks == 1 else 'mpirun'}: exited with {r.returncode}:\n"
                        f"{r.stderr.strip()}")
    return r.stdout if capture else ""


def read_samples(path: str):
    import h5py

    if not os.path.isfile(path):
        what = "is a folder" if os.path.isdir(path) else "does not exist"
        raise EvalError(f"{path}: {what}; expected a tensorar-sample file")
    if not h5py.is_hdf5(path):
        raise EvalError(f"{path}: not an HDF5 file; expected a tensorar-sample output (tokens, labels, trajectories)")
    with h5py.File(path, "r") as h:
        missing = [k for k in ["tokens", "labels", "trajectories"] if k not in h]
        if missing:
            raise EvalError(f"{path}: not a tensorar-sample output: no dataset {', '.join(missing)}")
        out = {k: np.asarray(h[k], dtype=np.int64) for k in ["tokens", "labels", "trajectories"]}
        out["attrs"] = {k: (v.decode() if isinstance(v, bytes) else (v.item() if hasattr(v, "item") else v))
                        for k, v in h.attrs.items()}
    return out


def training_noise(weights: str) -> dict:
    """noise.type, noise.schedule and train.seed of the run's config.yaml next to the weights (the
    resolved config tensorar-train saves): the validation loss training logged uses that noise,
    keyed by that seed."""
    w = os.path.abspath(weights)
    folder = w if os.path.isdir(w) else os.path.dirname(w)
    for f in [folder, os.path.dirname(folder)]:
        p = os.path.join(f, "config.yaml")
        if not os.path.exists(p):
            continue
        out, section = {}, None
        for line in open(p):
            if line and not line[0].isspace():
                section = line.split(":")[0].strip()
            elif section in ("noise", "train") and ":" in line:
                k, v = (x.strip() for x in line.split(":", 1))
                if section == "noise" and k in ("type", "schedule"):
                    out[k] = v
                if section == "train" and k == "seed":
                    out["seed"] = v
        return out
    return {}


def find_metrics(weights: str) -> str | None:
    w = os.path.abspath(weights)
    folder = w if os.path.isdir(w) else os.path.dirname(w)
    for f in [folder, os.path.dirname(folder)]:
        p = os.path.join(f, "metrics.jsonl")
        if os.path.exists(p):
            return p
    return None


# ----------------------------------------------------------------------------- pictures

def class_names(n: int, data: str):
    if n == 10 and "fashion" in os.path.abspath(data).lower():
        return FASHION_NAMES
    return [f"class {c}" for c in range(n)]


def to_grid(images: list, rows: int, cols: int, pad: int = 1, value: float = 1.0) -> np.ndarray:
    h, w, c = images[0].shape
    g = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), value, np.float32)
    for i, im in enumerate(images):
        if im is None:
            continue
        r, q = divmod(i, cols)
        g[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = im
    return g


def show(ax, img):
    ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None, vmin=0, vmax=1,
              interpolation="nearest")


def plot_samples(path: str, images: np.ndarray, labels: np.ndarray, classes, names, columns: int = 10):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for c in classes:
        idx = np.flatnonzero(labels == c)[:columns]
        rows.append([images[i] for i in idx] + [None] * (columns - len(idx)))
    h, w, _ = images[0].shape
    fig, axes = plt.subplots(len(classes), 1, figsize=(columns * 0.75 + 1.6, len(classes) * 0.78 + 0.5), squeeze=False)
    for ax, c, row in zip(axes[:, 0], classes, rows):
        show(ax, to_grid([r if r is not None else np.ones((h, w, images.shape[-1]), np.float32) for r in row],
                         1, columns))
        ax.set_xticks([]); ax.set_yticks([])
        ax.set_ylabel(names[c], rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle("samples, one row per class", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def trajectory_images(traj: np.ndarray, tokens: np.ndarray, codebook: Codebook):
    """For one image: [k] images, entry s decoded from every token's slot-s prediction (tokens
    never predicted at slot s, the first s, keep their final value), and the fraction of tokens
    whose slot-s prediction is the final token."""
    T, k = traj.shape
    out, agree = [], []
    for s in range(k):
        t = np.where(traj[:, s] >= 0, traj[:, s], tokens)
        out.append(codebook.decode(t[None])[0])
        valid = traj[:, s] >= 0
        agree.append(float((traj[valid, s] == tokens[valid]).mean()) if valid.any() else 1.0)
    return out, agree


def plot_trajectories(path: str, samples: dict, codebook: Codebook, classes, names, count: int = 8):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens, traj, labels = samples["tokens"], samples["trajectories"], samples["labels"]
    k = traj.shape[2]
    picks = []
    for c in classes:  # one image per class, then more from the start, up to `count`
        idx = np.flatnonzero(labels == c)
        if len(idx):
            picks.append(int(idx[0]))
    picks = (picks + [i for i in range(len(tokens)) if i not in picks])[:count]
    fig, axes = plt.subplots(k, len(picks), figsize=(len(picks) * 1.25 + 1.4, k * 1.3 + 0.8), squeeze=False)
    for col, i in enumerate(picks):
        ims, agree = trajectory_images(traj[i], tokens[i], codebook)
        for row, s in enumerate(range(k - 1, -1, -1)):
            ax = axes[row, col]
            show(ax, ims[s])
            ax.set_xticks([]); ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(f"slot {s}" + (" (final)" if s == 0 else f"\n{s} step{'s' if s > 1 else ''} ahead"),
                              fontsize=8)
            if row == 0:
                ax.set_title(names[int(labels[i])], fontsize=8)
            if s > 0:
                ax.set_xlabel(f"{100 * agree[s]:.0f}% final", fontsize=7)
    fig.suptitle("refinement: each token as predicted 0..k-1 steps ahead (top: first guess)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_losses(path: str, metrics_path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = [], []
    restarts = 0
    with open(metrics_path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            r = json.loads(line)
            if "loss" in r and "step" in r:
                if train and r["step"] <= train[-1]["step"]:  # a run started again from scratch: keep the last
                    train, val, restarts = [], [], restarts + 1
                train.append(r)
            if "val_loss" in r:
                val.append(r)
    if not train and not val:
        raise EvalError(f"{metrics_path}: no loss records")
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        a.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", color="C0")
    if val:
        a.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss (training noise)",
               color="C1")
        if "val_loss_clean" in val[0]:
            a.plot([r["step"] for r in val], [r["val_loss_clean"] for r in val], "s--", label="val loss (clean inputs)",
                   color="C2")
    a.set_xlabel("step"); a.set_ylabel("cross entropy (nats)"); a.set_title("loss"); a.legend(); a.grid(alpha=0.3)
    if train and "slot_losses" in train[0]:
        k = len(train[0]["slot_losses"])
    else:
        k = len(val[0]["val_slot_losses"]) if val and "val_slot_losses" in val[0] else 0
    for j in range(k):
        if train and "slot_losses" in train[0]:
            b.plot([r["step"] for r in train], [r["slot_losses"][j] for r in train], color=f"C{j}",
                   label=f"slot {j} train")
        if val and "val_slot_losses" in val[0]:
            b.plot([r["step"] for r in val], [r["val_slot_losses"][j] for r in val], "o--", color=f"C{j}",
                   label=f"slot {j} val")
    b.set_xlabel("step")
    b.set_title("per slot (slot j predicts x_{p+j})")
    b.legend(fontsize=7, ncol=2)
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"train_records": len(train), "val_records": len(val), "earlier_runs_skipped": restarts,
            "final_train_loss": train[-1]["loss"] if train else None,
            "final_val_loss": val[-1]["val_loss"] if val else None}


# ----------------------------------------------------------------------------- main

def part_values(text: str) -> str:
    """A flag of one number or two, comma-separated (tensorar-sample's --cfg-scale A[,B])."""
    parts = text.split(",")
    try:
        if not 1 <= len(parts) <= 2:
            raise ValueError
        return ",".join(repr(float(p)) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or two, comma-separated (A or A,B), got '{text}'")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Offline evaluation of a TensorAR model (see the top of this file).")
    ap.add_argument("--weights", required=True, help="weights (.safetensors) or a checkpoint folder")
    ap.add_argument("--weights-kind", choices=["raw", "ema"], default="raw",
                    help="a checkpoint's trained weights (raw) or their moving average (ema: train.ema_decay)")
    ap.add_argument("--data", required=True, help="folder with the train and val token caches")
    ap.add_argument("--train", help="train cache (default DATA/train)")
    ap.add_argument("--val", help="val cache (default DATA/val)")
    ap.add_argument("--out", default="Outputs/eval", help="output folder")
    ap.add_argument("--per-class", type=int, default=100, help="samples per class")
    ap.add_argument("--classes", help="classes, e.g. 0,3,5-7 (default: all)")
    ap.add_argument("--cfg-scale", type=part_values, default="1.5",
                    help="guidance scale, A or A,B (Open-MAGVIT2: pre, post; one value means both; none at <= 1)")
    ap.add_argument("--cfg-interval", type=int, default=-1, help="LlamaGen's --cfg-interval (-1: every step)")
    ap.add_argument("--cfg-schedule", choices=["constant", "power-cosine"], default="constant",
                    help="guidance weight over the steps (power-cosine: RAR's, needs --cfg-power)")
    ap.add_argument("--cfg-power", type=float, help="--cfg-schedule power-cosine: the power P >= 0")
    ap.add_argument("--temperature", type=part_values, default="1.0", help="A or A,B as --cfg-scale")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--ranks", type=int, default=1, help="MPI ranks for sampling")
    ap.add_argument("--bin", default=os.path.join(ROOT, ".build", "release"), help="folder of the tensorar programs")
    ap.add_argument("--classifier", help="reference classifier cache (default TRAIN/reference-classifier.npz)")
    ap.add_argument("--classifier-epochs", type=int, default=8)
    ap.add_argument("--classifier-seed", type=int, default=0)
    ap.add_argument("--train-limit", type=int, help="use only the first N training images for the reference (tests)")
    ap.add_argument("--val-limit", type=int, default=1000, help="validation samples for the loss (0: skip the loss)")
    ap.add_argument("--metrics", help="metrics.jsonl for the loss curves (default: found next to the weights)")
    ap.add_argument("--no-baselines", action="store_true", help="skip the real-validation and random-token baselines")
    ap.add_argument("--samples", help="use this tensorar-sample output instead of sampling")
    return ap.parse_args(argv)


def check_args(a):
    """Bad arguments as one EvalError naming the flag (issue 17), before any work."""
    counts = [("--ranks", a.ranks, 1), ("--per-class", a.per_class, 1), ("--batch-size", a.batch_size, 1),
              ("--val-limit", a.val_limit, 0), ("--classifier-epochs", a.classifier_epochs, 1)]
    for flag, value, low in counts:
        if value < low:
            raise EvalError(f"{flag}: must be at least {low}, got {value}")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        raise EvalError(f"{a.out}: --out names a file, not a folder (nothing was written)")
    if a.cfg_power is not None and not (a.cfg_power >= 0 and math.isfinite(a.cfg_power)):
        raise EvalError(f"--cfg-power: must be a finite number >= 0, got {a.cfg_power}")
    if (a.cfg_schedule == "power-cosine") != (a.cfg_power is not None):
        raise EvalError("--cfg-power: given exactly when --cfg-schedule is power-cosine")
    if a.samples:
        read_samples(a.samples)


def main(argv=None) -> dict:
    a = parse_args(argv)
    check_args(a)
    t_start = time.time()
    train_dir = a.train or os.path.join(a.data, "train")
    val_dir = a.val or os.path.join(a.data, "val")
    os.makedirs(a.out, exist_ok=True)
    codebook = Codebook(os.path.join(train_dir, "codebook.h5"))
    clf_path = a.classifier or os.path.join(train_dir, "reference-classifier.npz")
    ref = load_or_train_reference(train_dir, codebook, clf_path, seed=a.classifier_seed, epochs=a.classifier_epochs,
                                  limit=a.train_limit)

    # 1. samples
    samples_path = a.samples or os.path.join(a.out, "samples.h5")
    if not a.samples:
        cmd = [binary(a.bin, "tensorar-sample"), "--weights", a.weights, "--weights-kind", a.weights_kind,
               "--per-class", str(a.per_class),
               "--cfg-scale", str(a.cfg_scale), f"--cfg-interval={a.cfg_interval}",
               "--temperature", str(a.temperature), "--top-k", str(a.top_k),
               "--top-p", str(a.top_p), "--seed", str(a.seed), "--batch-size", str(a.batch_size), "--out", samples_path]
        if a.classes:
            cmd += ["--classes", a.classes]
        if a.cfg_schedule != "constant":
            cmd += ["--cfg-schedule", a.cfg_schedule, "--cfg-power", repr(a.cfg_power)]
        log(f"sampling: {' '.join(cmd)}" + (f" on {a.ranks} ranks" if a.ranks > 1 else ""))
        t0 = time.time()
        run_program(cmd, ranks=a.ranks)
        log(f"sampling: {time.time() - t0:.1f} s")
    s = read_samples(samples_path)
    N, T = s["tokens"].shape
    classes = sorted(set(int(c) for c in s["labels"]))
    per_class = int(s["attrs"].get("per_class", N // max(1, len(classes))))
    gen_images = codebook.decode(s["tokens"])
    names = class_names(ref.classes, a.data)

    # 2. metrics
    log(f"metrics: {N} samples of {len(classes)} classes")
    results = {"model": image_metrics(gen_images, s["labels"], ref, seed=a.seed)}
    if not a.no_baselines:
        vt, vl, _ = read_cache(val_dir)
        idx = balanced_subset(vl, classes, per_class)
        results["real_val"] = image_metrics(codebook.decode(vt[idx]), vl[idx], ref, seed=a.seed)
        rng = np.random.default_rng(a.seed + 777)
        rand = rng.integers(0, len(codebook.vectors), size=(N, T))
        results["random_tokens"] = image_metrics(codebook.decode(rand), s["labels"], ref, seed=a.seed)
    for name, r in results.items():
        log(f"  {name:14s} FID {r['fid']:9.3f}  IS {r['inception_score']:6.3f}  precision {r['precision']:.3f}  "
            f"recall {r['recall']:.3f}  accuracy {r['accuracy']:.3f}  (n {r['n']})")

    # 3. validation loss
    val_loss = {}
    if a.val_limit > 0:
        noise_cfg = training_noise(a.weights)
        for noise in ["train", "none"]:
            cmd = [binary(a.bin, "tensorar-eval"), "--weights", a.weights, "--weights-kind", a.weights_kind,
                   "--data", val_dir, "--noise", noise,
                   "--limit", str(a.val_limit), "--json"]
            if noise == "train":
                for key, flag in [("type", "--noise-type"), ("schedule", "--noise-schedule"), ("seed", "--noise-seed")]:
                    if key in noise_cfg:
                        cmd += [flag, noise_cfg[key]]
            out = run_program(cmd, capture=True)
            r = json.loads(out.strip().splitlines()[-1])
            val_loss[noise] = {"loss": r["loss"], "slot_losses": r["slot_losses"], "samples": r["samples"]}
            if "loss_parts" in r:  # Open-MAGVIT2: loss = CE(pre) + CE(post), SPEC section 8
                val_loss[noise]["loss_parts"] = r["loss_parts"]
            if noise == "train":
                val_loss[noise]["noise"] = {"type": noise_cfg.get("type", "replace"),
                                            "schedule": noise_cfg.get("schedule", "sine"),
                                            "seed": int(noise_cfg.get("seed", 0))}
            log(f"  val loss ({'training noise' if noise == 'train' else 'clean inputs'}): {r['loss']:.4f}, per slot "
                + ", ".join(f"{x:.4f}" for x in r["slot_losses"]))

    # 4. pictures
    files = {"samples": samples_path}
    files["samples_png"] = os.path.join(a.out, "samples.png")
    plot_samples(files["samples_png"], gen_images, s["labels"], classes, names)
    files["trajectories_png"] = os.path.join(a.out, "trajectories.png")
    plot_trajectories(files["trajectories_png"], s, codebook, classes, names)
    agreement = []
    for sl in range(s["trajectories"].shape[2]):
        pred = s["trajectories"][:, :, sl]
        valid = pred >= 0
        agreement.append(float((pred[valid] == s["tokens"][valid]).mean()) if valid.any() else None)
    metrics_path = a.metrics or find_metrics(a.weights)
    curves = None
    if metrics_path:
        files["loss_curves_png"] = os.path.join(a.out, "loss_curves.png")
        curves = plot_losses(files["loss_curves_png"], metrics_path)
    else:
        log("loss curves: no metrics.jsonl next to the weights (pass --metrics)")

    report = {
        "weights": a.weights, "weights_kind": a.weights_kind, "data": {"train": train_dir, "val": val_dir},
        "sampling": {k: s["attrs"].get(k)
                     for k in ["cfg_scale", "cfg_interval", "cfg_schedule", "cfg_power", "temperature", "top_k",
                               "top_p", "seed", "per_class"]},
        "model_config": json.loads(s["attrs"]["config"]) if "config" in s["attrs"] else None,
        "images": {"n": int(N), "classes": classes, "height": codebook.height, "width": codebook.width},
        "metrics": results,
        "metric_notes": "features: penultimate layer (128) of the reference MLP trained on decoded training images; "
                        "FID against all training images; precision/recall k=3 against an equal-size seeded subset "
                        "of them",
        "reference_classifier": {"path": clf_path, "epochs": a.classifier_epochs, "seed": a.classifier_seed},
        "val_loss": val_loss,
        "refinement": {"slot_agrees_with_final": agreement,
                       "note": "fraction of tokens whose prediction at slot s (s steps ahead) equals the final token"},
        "loss_curves": curves, "metrics_jsonl": metrics_path, "files": files,
        "seconds": time.time() - t_start,
    }
    with open(os.path.join(a.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    log(f"wrote {a.out}/report.json, samples.png, trajectories.png" + (", loss_curves.png" if curves else "")
        + f" ({time.time() - t_start:.1f} s)")
    return report


if __name__ == "__main__":
    try:
        main()
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
