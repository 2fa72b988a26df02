"""safetensors from numpy alone (no safetensors package): write a file's bytes, read one back. Shared by the
cross-language tests."""
import json
import struct

import numpy as np


def file_bytes(tensors, metadata=None, pad=True):
    """tensors: list of (name, dtype string, shape, raw bytes)."""
    header, offset, data = {}, 0, b""
    if metadata:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        data += raw
    text = json.dumps(header).encode()
    if pad:
        text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + data


DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4"}


def write(path, arrays, metadata=None):
    """arrays: {name: numpy array} stored as F64 (floats) or I64 (integers), in name order."""
    tensors = []
    for name in sorted(arrays):
        a = np.asarray(arrays[name])
        dtype = "I64" if np.issubdtype(a.dtype, np.integer) else "F64"
        tensors.append((name, dtype, a.shape, np.ascontiguousarray(a, dtype=DTYPES[dtype]).tobytes()))
    with open(path, "wb") as f:
        f.write(file_bytes(tensors, metadata))


def read(path):
    """{name: numpy array} of a file in F64, F32, F16, I64 or I32 (the header is trusted: our own files)."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    out = {}
    for name, t in header.items():
        begin, end = t["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + begin:8 + n + end], dtype=DTYPES[t["dtype"]]).reshape(t["shape"])
    return out
