#!/usr/bin/env python3
"""Cross-language safetensors test: numpy (and nothing else: no safetensors package) writes files the C++
reader must read exactly, reads what the C++ writer wrote, and crafts malformed files the C++ reader must
reject with a message (exit code 1), never a crash. Usage: test_safetensors.py TOOL WORKDIR"""
import json
import os
import struct
import subprocess
import sys

try:
    import numpy as np
except ImportError:
    sys.exit("numpy is missing: apt-get install python3-numpy (scripts/test installs it)")

from safetensors_np import file_bytes  # noqa: E402 (after the numpy check)

TOOL, WORK = sys.argv[1], sys.argv[2]
os.makedirs(WORK, exist_ok=True)
failures = []


def check(condition, what):
    if not condition:
        failures.append(what)
        print("FAIL:", what)


def tool(verb, path):
    return subprocess.run([TOOL, verb, path], capture_output=True, text=True, timeout=60)


def bf16_bytes(values):
    """float32 values exactly representable in bf16 -> their upper 16 bits."""
    bits = np.asarray(values, dtype="<f4").view("<u4")
    assert np.all(bits & 0xFFFF == 0), "test values must be exact in bf16"
    return (bits >> 16).astype("<u2").tobytes()


def parse_dump(text):
    out = {}
    for line in text.splitlines():
        if line.startswith("tensor "):
            head, values = line.split(" :")
            _, name, dtype, *shape = head.split()
            out[name] = (dtype, [int(s) for s in shape], [float(v) for v in values.split()])
    return out


# 1. numpy writes, C++ reads: every dtype, exact values.
vals = np.array([1.5, -2.25, 0.0, 3.0, -0.125, 1024.0])
tensors = [
    ("a_f32", "F32", [2, 3], vals.astype("<f4").tobytes()),
    ("b_f64", "F64", [3, 2], (vals / 3).astype("<f8").tobytes()),
    ("c_bf16", "BF16", [6], bf16_bytes(vals)),
    ("d_f16", "F16", [2, 3], vals.astype("<f2").tobytes()),
    ("e_i32", "I32", [3], np.array([-5, 7, 2**31 - 1], dtype="<i4").tobytes()),
    ("f_i64", "I64", [2], np.array([-(2**40), 3], dtype="<i8").tobytes()),
]
path = os.path.join(WORK, "from_numpy.safetensors")
with open(path, "wb") as f:
    f.write(file_bytes(tensors, {"format": "np"}))
r = tool("dump", path)
check(r.returncode == 0, "C++ reads numpy's file: " + r.stdout + r.stderr)
dumped = parse_dump(r.stdout)
check("meta format np" in r.stdout, "metadata read")
expected = {
    "a_f32": list(vals), "b_f64": list((vals / 3).astype("<f8")), "c_bf16": list(vals), "d_f16": list(vals),
    "e_i32": [-5, 7, 2**31 - 1], "f_i64": [-(2**40), 3],
}
for name, dtype, shape, _ in tensors:
    got = dumped.get(name)
    check(got is not None and got[0] == dtype and got[1] == shape, f"{name}: dtype and shape {got and got[:2]}")
    if got:
        check(np.array_equal(np.array(got[2]), np.array(expected[name], dtype=float)), f"{name}: values {got[2]}")

# An unpadded header (other writers do not pad) reads as well.
with open(path, "wb") as f:
    f.write(file_bytes(tensors[:1], pad=False))
check(tool("check", path).returncode == 0, "unpadded header accepted")

# 2. C++ writes, numpy reads.
path = os.path.join(WORK, "from_cpp.safetensors")
r = tool("write", path)
check(r.returncode == 0, "C++ writes: " + r.stderr)
raw = open(path, "rb").read()
(n,) = struct.unpack("<Q", raw[:8])
check(n % 8 == 0, "C++ pads its header to a multiple of 8")
header = json.loads(raw[8:8 + n])
data = raw[8 + n:]
check(header.get("__metadata__") == {"written_by": "peer"}, "metadata written")
ref = (np.arange(6) - 3.0) * 0.75 + 0.125
decode = {
    "F32": lambda b: np.frombuffer(b, "<f4").astype(float),
    "F64": lambda b: np.frombuffer(b, "<f8"),
    "F16": lambda b: np.frombuffer(b, "<f2").astype(float),
    "BF16": lambda b: (np.frombuffer(b, "<u2").astype("<u4") << 16).view("<f4").astype(float),
    "I32": lambda b: np.frombuffer(b, "<i4"),
    "I64": lambda b: np.frombuffer(b, "<i8"),
}
want = {"f32": ref, "f64": ref, "bf16": ref, "f16": ref, "i32": [-7, 0, 2**31 - 1], "i64": [-(2**40), 5]}
shapes = {"f32": [2, 3], "f64": [3, 2], "bf16": [6], "f16": [1, 6], "i32": [3], "i64": [2]}
covered = 0
for name, expect in want.items():
    e = header.get(name)
    check(e is not None, f"{name} written")
    if not e:
        continue
    b0, b1 = e["data_offsets"]
    covered += b1 - b0
    check(e["shape"] == shapes[name], f"{name} shape {e['shape']}")
    got = decode[e["dtype"]](data[b0:b1])
    check(np.array_equal(got, np.array(expect)), f"{name} values {got}")
check(covered == len(data), "the tensors cover the data buffer")

# 3. Malformed files: rejected with a message (exit 1), never a crash.
good = file_bytes(tensors)
cases = {
    "bad json": struct.pack("<Q", 5) + b"{\"a\":",
    "huge header length": struct.pack("<Q", 2**63),
    "length past end": struct.pack("<Q", 100) + b"{}",
}
hdr = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                  "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}).encode()
cases["overlap"] = struct.pack("<Q", len(hdr)) + hdr + b"\0" * 8
hdr = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
cases["out of range"] = struct.pack("<Q", len(hdr)) + hdr + b"\0" * 8
hdr = json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}).encode()
cases["hole"] = struct.pack("<Q", len(hdr)) + hdr + b"\0" * 8
for cut in range(0, len(good), max(1, len(good) // 97)):
    cases[f"truncated at {cut}"] = good[:cut]
bad = os.path.join(WORK, "bad.safetensors")
for what, content in cases.items():
    with open(bad, "wb") as f:
        f.write(content)
    r = tool("check", bad)
    check(r.returncode == 1 and r.stdout.startswith("rejected: safetensors"), f"{what}: exit {r.returncode} {r.stdout.strip()}")

print(f"{len(failures)} failed" if failures else "all safetensors cross-language checks passed")
print(f"{0 if failures else 1} passed, {1 if failures else 0} failed")
sys.exit(1 if failures else 0)
