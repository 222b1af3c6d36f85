"""The README's own `mpirun` command line, and errors that every rank meets printed once.

    python3 -m pytest -q Tests/Reference/test_mpirun.py   (release build first)

Runs with the Open MPI settings of Launch/env.sh removed from the environment, so the flags the
README tells a user to add are what makes 8 ranks start on this 2-core machine.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
TRAIN = os.path.join(ROOT, ".build", "release", "tensorar-train")


def readme_command(as_root: bool):
    """The README's `mpirun -n 8 ...tensorar-train` line for this user (root or not)."""
    text = open(os.path.join(ROOT, "README.md")).read()
    lines = [l.strip() for l in text.splitlines() if l.strip().startswith("mpirun -n 8 --oversubscribe")]
    chosen = [l for l in lines if ("--allow-run-as-root" in l) == as_root]
    assert chosen, f"no README mpirun line for {'root' if as_root else 'a user'}: {lines}"
    return re.sub(r"\s+#.*$", "", chosen[0]).split()


def run_readme_command(args, tmp_path):
    assert os.path.exists(TRAIN), "build the release programs first: swift build -c release"
    cmd = readme_command(os.geteuid() == 0)
    cmd[cmd.index(".build/release/tensorar-train")] = TRAIN
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_"))}
    cmd[0] = shutil.which("mpirun") or "mpirun"
    return subprocess.run(cmd + args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_bad_config_on_8_ranks_is_one_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("train:\n  stpes: 3\n")
    r = run_readme_command(["bad.yaml"], tmp_path)
    assert r.returncode != 0
    errors = [l for l in r.stderr.splitlines() if "error" in l.lower()]
    assert len(errors) == 1, r.stderr
    assert errors[0].startswith("error: bad.yaml: unknown key 'train.stpes'; keys of 'train' are:"), r.stderr
    assert "not enough slots" not in r.stderr


def test_missing_cache_on_8_ranks_is_one_line(tmp_path):
    r = run_readme_command(["--set", "data.train=nowhere", "--set", "data.val=null"], tmp_path)
    assert r.returncode != 0
    errors = [l for l in r.stderr.splitlines() if "error" in l.lower()]
    assert len(errors) == 1, r.stderr
    assert errors[0].startswith("error: nowhere: no token cache here"), r.stderr
