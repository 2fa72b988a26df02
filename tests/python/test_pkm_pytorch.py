#!/usr/bin/env python3
"""product-key-memory across languages. numpy builds a PKM's state_dict in product-key-memory's own names
and layouts (lucidrains/product-key-memory 0.3.x), runs a transcription of its forward written in its
vocabulary (its rearrange and einsum, step by step: nothing of this library's layout), and differentiates
that with central differences in double. The C++ side (pkm_pytorch_tool) imports the same file through the
map and the preset, runs our ProductKeyMemory forward and backward, and writes output, input gradient and
every weight gradient back in product-key-memory's layout. They must agree: output and gradients to 1e-12
relative (1e-7 for the finite differences), weights written back bit for bit. Negative controls: reading
the query weight with the head outermost, or giving every head head 0's keys, must change the output.
PyPI is not reachable from this machine, so product-key-memory itself was not run: the transcription is
the oracle. Usage: test_pkm_pytorch.py TOOL WORKDIR"""
import os
import subprocess
import sys

try:
    import numpy as np
except ImportError:
    sys.exit("numpy is missing: apt-get install python3-numpy (scripts/test installs it)")

import safetensors_np  # noqa: E402 (after the numpy check)

TOOL, WORK = sys.argv[1], sys.argv[2]
os.makedirs(WORK, exist_ok=True)
failures = []


def check(condition, what):
    print(("ok:   " if condition else "FAIL: ") + what)
    if not condition:
        failures.append(what)


def pkm_forward(w, x, cfg, layout="p h d", keys_of_head=None):
    """product-key-memory 0.3.x PKM.forward on tokens x [B, D] (b t flattened: every step is per token).
    layout / keys_of_head select the negative controls."""
    h, n, k, dh = cfg["heads"], cfg["num_keys"], cfg["topk"], cfg["dim_head"]
    b = x.shape[0]
    queries = x @ w["to_queries.weight"].T                                   # to_queries, no bias
    if layout == "p h d":                                                    # 'b t (p h d) -> (b p h) t d'
        queries = queries.reshape(b, 2, h, dh)
    else:                                                                    # wrong: head outermost
        queries = queries.reshape(b, h, 2, dh).transpose(0, 2, 1, 3)
    mu = queries.mean(-1, keepdims=True)                                     # self.norm = LayerNorm(dim_head)
    var = ((queries - mu) ** 2).mean(-1, keepdims=True)
    queries = (queries - mu) / np.sqrt(var + 1e-5) * w["norm.weight"] + w["norm.bias"]
    keys = w["keys"]                                                         # [h, n, 2, dh]
    if keys_of_head is not None:
        keys = np.repeat(keys[keys_of_head:keys_of_head + 1], h, axis=0)
    dots = np.einsum("bphd,hnpd->bhpn", queries, keys)                       # 'p b t h d, h n p d -> b t h p n'
    indices = np.argsort(-dots, axis=-1, kind="stable")[..., :k]             # dots.topk(k, dim=-1)
    scores = np.take_along_axis(dots, indices, -1)
    scores_x, scores_y = scores[:, :, 0], scores[:, :, 1]                    # chunk(2, dim=3)
    indices_x, indices_y = indices[:, :, 0], indices[:, :, 1]
    all_scores = (scores_x[..., :, None] + scores_y[..., None, :]).reshape(b, h, k * k)
    all_indices = (indices_x[..., :, None] * n + indices_y[..., None, :]).reshape(b, h, k * k)
    final = np.argsort(-all_scores, axis=-1, kind="stable")[..., :k]         # all_scores.topk(topk)
    final_topk = np.take_along_axis(all_scores, final, -1)
    value_indices = np.take_along_axis(all_indices, final, -1)
    if cfg["non_competitive_gates"]:
        attn = np.maximum(final_topk, 0.0)                                   # nn.ReLU()
    else:
        e = np.exp(final_topk - final_topk.max(-1, keepdims=True))           # nn.Softmax(dim=-1)
        attn = e / e.sum(-1, keepdims=True)
    values = w["values.weight"][value_indices]                               # [b, h, k, D]
    return np.einsum("bhk,bhkd->bd", attn, values)                           # EmbeddingBag(mode='sum'), weighted


def numeric_grad(f, a, eps=1e-5):
    g = np.zeros_like(a)
    it = np.nditer(a, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        keep = a[i]
        a[i] = keep + eps
        up = f()
        a[i] = keep - eps
        down = f()
        a[i] = keep
        g[i] = (up - down) / (2 * eps)
    return g


def rel(a, b):
    return float(np.abs(a - b).max() / max(1e-30, np.abs(b).max()))


def run_case(name, cfg, seed):
    rng = np.random.default_rng(seed)
    h, n, dh, d = cfg["heads"], cfg["num_keys"], cfg["dim_head"], cfg["dim"]
    w = {
        "to_queries.weight": rng.uniform(-1, 1, (2 * h * dh, d)) / np.sqrt(d),  # nn.Linear's default range
        "norm.weight": 1.0 + 0.3 * rng.standard_normal(dh),                     # trained-looking, not ones/zeros
        "norm.bias": 0.2 * rng.standard_normal(dh),
        "keys": rng.standard_normal((h, n, 2, dh)) / np.sqrt(dh),               # init_: std 1/sqrt(dim_head)
        "values.weight": rng.standard_normal((n * n, d)) / np.sqrt(d),          # init_: std 1/sqrt(dim)
    }
    x = rng.standard_normal((7, d))
    dy = rng.standard_normal((7, d))
    meta = {key: str(int(v)) for key, v in cfg.items()}
    wpath, ipath, opath = (os.path.join(WORK, f"{name}_{s}.safetensors") for s in ("weights", "inputs", "out"))
    safetensors_np.write(wpath, w, meta)
    safetensors_np.write(ipath, {"x": x, "dy": dy})
    r = subprocess.run([TOOL, wpath, ipath, opath], capture_output=True, text=True, timeout=120)
    check(r.returncode == 0, f"{name}: the C++ side runs ({r.stdout.strip()}{r.stderr.strip()})")
    if r.returncode != 0:
        return
    out = safetensors_np.read(opath)

    y = pkm_forward(w, x, cfg)
    check(rel(out["y"], y) < 1e-12, f"{name}: output matches the transcription (rel {rel(out['y'], y):.1e})")
    for wrong, kwargs in (("head-outermost query rows", {"layout": "h p d"}), ("head 0's keys for every head", {"keys_of_head": 0})):
        e = rel(out["y"], pkm_forward(w, x, cfg, **kwargs))
        check(e > 1e-3, f"{name}: negative control, {wrong}, differs (rel {e:.1e})")
    for key in w:
        same = out["weights." + key].shape == w[key].shape and np.array_equal(out["weights." + key], w[key])
        check(same, f"{name}: {key} written back bit for bit, shape {list(w[key].shape)}")

    loss = lambda: float((pkm_forward(w, x, cfg) * dy).sum())  # noqa: E731
    e = rel(out["dx"], numeric_grad(loss, x))
    check(e < 1e-7, f"{name}: dx matches central differences (rel {e:.1e})")
    for key in w:
        e = rel(out["grad." + key], numeric_grad(loss, w[key]))
        check(e < 1e-7, f"{name}: grad of {key} matches central differences (rel {e:.1e})")


base = {"dim": 6, "heads": 2, "num_keys": 5, "topk": 3, "dim_head": 4, "non_competitive_gates": 0}
run_case("softmax", base, 1)
run_case("relu", dict(base, non_competitive_gates=1, heads=3), 2)

# A configuration the map refuses is a named error, not another function.
wpath = os.path.join(WORK, "softmax_weights.safetensors")
ipath = os.path.join(WORK, "softmax_inputs.safetensors")
bad = os.path.join(WORK, "bad_weights.safetensors")
w = safetensors_np.read(wpath)
w["keys"] = w["keys"][:, :4]  # [h, 4, 2, dh] where num_keys = 5 says [h, 5, 2, dh]
safetensors_np.write(bad, w, {key: str(int(v)) for key, v in base.items()})
r = subprocess.run([TOOL, bad, ipath, os.path.join(WORK, "bad_out.safetensors")], capture_output=True, text=True, timeout=60)
check(r.returncode == 1 and "keys" in r.stdout, f"a short keys tensor is refused, naming it ({r.stdout.strip()})")

if failures:
    sys.exit(f"{len(failures)} check(s) failed")
print("all product-key-memory checks passed")
