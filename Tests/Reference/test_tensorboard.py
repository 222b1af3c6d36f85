"""TensorBoard event files of a training run, read back with the tensorboard package's reader.

    python3 -m pytest -q Tests/Reference/test_tensorboard.py   (release build first)

The trainer writes the records itself (TFRecord framing with masked CRC-32C, Event and Summary
messages); tensorboard's EventFileLoader checks the framing and parses the messages, so a wrong
CRC, length or field fails here. Every number of metrics.jsonl must be a scalar of its step, and
each validation must carry a decodable PNG strip of greedy samples.
"""

from __future__ import annotations

import glob
import io
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)

import synthetic  # noqa: E402

TRAIN = os.path.join(ROOT, ".build", "release", "tensorar-train")


def read_events(folder):
    # The legacy loader yields the Event protos as written (EventFileLoader would also migrate
    # simple_value scalars into tensors).
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    files = sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*")))
    assert len(files) == 1, files
    return list(LegacyEventFileLoader(files[0]).Load())


def check_record_crcs(folder):
    """Both masked CRC-32Cs of every record, by tensorboard's own function; returns the count."""
    import struct

    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    data = open(glob.glob(os.path.join(folder, "events.out.tfevents.*"))[0], "rb").read()
    at, count = 0, 0
    while at < len(data):
        header = data[at:at + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[at + 8:at + 12])[0] == masked_crc32c(header)
        payload = data[at + 12:at + 12 + length]
        assert struct.unpack("<I", data[at + 12 + length:at + 16 + length])[0] == masked_crc32c(payload)
        at += 16 + length
        count += 1
    assert at == len(data)
    return count


def test_event_file_holds_the_metrics_and_sample_images(tmp_path):
    from PIL import Image

    data = synthetic.make_data(str(tmp_path / "data"), n_train=64, n_val=16)
    weights = synthetic.write_model(str(tmp_path / "base.safetensors"), window=1, depth=0, dim=32, heads=4)
    args = ["--init-from", weights, "--set", f"data.train={data}/train", "--set", f"data.val={data}/val",
            "--set", "train.steps=4", "--set", "train.global_batch=8", "--set", "train.micro_batch=8",
            "--set", "train.val_every=2", "--set", "train.log_every=1", "--set", "train.ema_decay=0.5",
            "--set", f"checkpoint.dir={tmp_path}/ck"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_"))}
    r = subprocess.run([TRAIN] + args, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    run = tmp_path / "ck" / "default"
    events = read_events(str(run / "tensorboard"))
    assert len(events) == check_record_crcs(str(run / "tensorboard"))
    assert events[0].file_version == "brain.Event:2"
    scalars, images = {}, {}
    for e in events[1:]:
        for v in e.summary.value:
            if v.HasField("image"):
                images[(e.step, v.tag)] = v.image
            else:
                scalars[(e.step, v.tag)] = v.simple_value
    records = [json.loads(l) for l in open(run / "metrics.jsonl")]
    expected = 0
    for rec in records:
        for key, value in rec.items():
            if key == "step" or isinstance(value, (str, bool)) or value is None:
                continue
            values = value if isinstance(value, list) else [value]
            tags = [f"{key}/{j}" for j in range(len(values))] if isinstance(value, list) else [key]
            for tag, x in zip(tags, values):
                got = scalars[(rec["step"], tag)]
                assert got == np.float32(x), (rec["step"], tag, got, x)
                expected += 1
    assert expected == len(scalars), "no scalar that metrics.jsonl lacks"
    for tag in ["loss", "lr_plugin", "lr_base", "grad_norm", "val_loss", "val_loss_ema"]:
        assert any(t == tag for _, t in scalars), tag
    assert sorted(step for step, _ in images) == [2, 4], "a sample strip at each validation"
    for image in images.values():
        picture = Image.open(io.BytesIO(image.encoded_image_string))
        side = synthetic.GRID * synthetic.PATCH
        assert picture.size == (synthetic.C * side, side) == (image.width, image.height)
        assert np.asarray(picture).std() > 0, "a picture, not a blank"
