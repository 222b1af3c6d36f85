"""The Table 4 study script end to end, on tiny budgets (`--quick`: two rows, a few minutes):

    python3 -m pytest -q Tests/Reference/test_table4.py

It must write the report and the per-row JSON, and a second run must redo nothing (every stage is
found by the hash of its settings). Needs the release programs (`swift build -c release`) and the
Fashion-MNIST cache (built by the script when missing).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
SCRIPT = os.path.join(ROOT, "Launch", "experiments", "table4.py")


def run(args):
    r = subprocess.run(
        [sys.executable, SCRIPT] + args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert r.returncode == 0, r.stdout[-4000:]
    return r.stdout


def test_quick_study_writes_the_report_and_resumes(tmp_path):
    out, work = str(tmp_path / "results"), str(tmp_path / "work")
    first = run(["--quick", "--out", out, "--work", work])
    assert "base pretrained" in first and "guidance sweep on the control: chose" in first
    rows = sorted(f for f in os.listdir(os.path.join(out, "rows")) if f.endswith(".json"))
    assert rows == ["control-seed100.json", "default-seed100.json"]
    for f in rows:  # what the pictures need is kept beside each row
        for name in ["samples.png", "trajectories.png", "metrics.jsonl"]:
            assert os.path.getsize(os.path.join(out, "rows", f[:-5], name)) > 0, (f, name)
    for f in rows:
        r = json.load(open(os.path.join(out, "rows", f)))
        m = r["metrics"]
        assert m["n"] == 30 and 0 < m["fid"] < float("inf") and 0 <= m["accuracy"] <= 1, r
        assert r["val_loss"]["train"]["loss"] > 0 and len(r["hash"]) == 12
    default = json.load(open(os.path.join(out, "rows", "default-seed100.json")))
    assert len(default["val_loss"]["train"]["slot_losses"]) == 4 and default["settings"]["model.window"] == 4
    report = open(os.path.join(out, "report.md")).read()
    for s in [
        "## Conclusion",
        "| Baseline | control (base fine-tuned alone) | 1 |",
        "| Noise schedule | Linear | 0 |",
        "## Refinement of the default row",
        "fid_vs_k.png",
        "samples_control_vs_default.png",
    ]:
        assert s in report, s
    for png in [
        "fid_vs_k.png",
        "fid_vs_d.png",
        "loss_curves.png",
        "samples_control_vs_default.png",
        "refinement_default.png",
    ]:
        assert os.path.getsize(os.path.join(out, png)) > 1000, png
    stamp = {f: os.path.getmtime(os.path.join(out, "rows", f)) for f in rows}

    second = run(["--quick", "--out", out, "--work", work])
    assert second.count("(done before: skipped)") == 3, second  # the sweep and two rows: the base is not even needed
    assert not any(l.startswith("  [") for l in second.splitlines()), "no program ran again"
    assert {f: os.path.getmtime(os.path.join(out, "rows", f)) for f in rows} == stamp


def test_unknown_row_is_an_error(tmp_path):
    r = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--rows", "control,k3", "--work", str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert r.returncode == 2 and "--rows: unknown row(s) k3" in r.stdout, r.stdout
