"""Minimal safetensors reader/writer (numpy only, no `safetensors` package).

Format: 8-byte little-endian header length N, N bytes of JSON header
{"name": {"dtype", "shape", "data_offsets": [begin, end]}, ..., "__metadata__": {str: str}}
(padded with spaces to a multiple of 8), then the raw little-endian tensor bytes.
"""

from __future__ import annotations

import json
import struct
from typing import Dict, Optional, Tuple

import numpy as np

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_KINDS = {(v.kind, v.itemsize): k for k, v in _DTYPES.items()}


def write(path: str, tensors: Dict[str, np.ndarray], metadata: Optional[Dict[str, str]] = None):
    """Writes tensors in the given (insertion) order. Arrays keep their dtype (F32/I32/...)."""
    header = {}
    blobs = []
    offset = 0
    for name, arr in tensors.items():
        a = np.ascontiguousarray(arr)
        key = _KINDS.get((a.dtype.kind, a.dtype.itemsize))
        if key is None:
            raise ValueError(f"{name}: unsupported dtype {a.dtype}")
        b = a.astype(_DTYPES[key], copy=False).tobytes()
        header[name] = {"dtype": key, "shape": list(a.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    if metadata:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise ValueError("safetensors metadata must map str to str")
        header = {"__metadata__": dict(metadata), **header}
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * ((8 - len(hb) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for b in blobs:
            f.write(b)


def read(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n].decode("utf-8"))
    meta = header.pop("__metadata__", {}) or {}
    base = 8 + n
    out = {}
    for name, info in header.items():
        b, e = info["data_offsets"]
        dt = _DTYPES[info["dtype"]]
        out[name] = np.frombuffer(data[base + b: base + e], dtype=dt).reshape(info["shape"]).copy()
    return out, meta
