"""Time and memory of the architectures in programs/arch: the NNGP and NTK of a pre-LayerNorm residual
MLP, finite width and the feature-learning limit of a one-block transformer trained in muP, and the
NNGP and NTK of a small convolutional network.

1. kernels: `tpc.limit` of programs/arch/resnet_ln.tp (4 blocks, NTK parametrization) on N random
   3-dimensional inputs (seed 0, written to a temporary .npy that the program's text loads), beside
   a direct NumPy recursion of the same kernels (arc-cosine closed forms, re-implemented here);
   the max |tpc - NumPy| of each kernel.
2. finite: `tpc.run(net, width, 1)` of programs/arch/transformer_mup.tp (3 SGD steps in muP),
   beside a hand-written torch module of the same network, drawn from the same standard normals
   and trained by the same SGD; the max |difference| of their final `pred` (must be below 1e-8).
3. limit: `tpc.limit(net, particles=P, replicates=R)` of the same transformer, with the memory the
   plan states before it runs (`tpc.train.limit.describe`) beside the measured peak.
4. cnn: `tpc.limit` of programs/arch/cnn_digits.tp (two 3 x 3 'same' convolutions, the first
   reading each pixel's patch, each with relu, global average pooling, readout; NTK parametrization) on the first N of
   scikit-learn's 8 x 8 digits (`load_digits`, pixels / 16, standardised by the mean and standard
   deviation of those N images' pixels; N = 8 gives programs/arch/data/digits8x64.csv), written to
   a temporary .npy that the program's text loads, with the memory tpc states before it runs
   (`tpc.train.position_kernels.memory_bytes`), beside a direct NumPy per-position recursion of the
   same kernels (re-implemented here); the max |tpc - NumPy| of each kernel (must be below 1e-9).
   tpc runs under `memory_gb=CNN_BUDGET_GB` (--cnn-budget-gb): beyond it the recursion goes by blocks
   of inputs (tpc.train.position_kernels.blocks_plan), and the direct recursion runs only up to
   CNN_DIRECT_MAX images (its whole (N P)^2 matrices). Once per run: the plan for N = 1000 (block
   size, recursions, memory), stated before anything would run, with the time it would take at the
   rate per recursion of the largest N measured.
5. transformer: `tpc.limit` of programs/arch/transformer_kernels.tp (NNGP and NTK of the one-block
   pre-LN transformer, attention logits q.k / n) on N random sentences of 8 tokens (seed 0), by
   the per-position recursion, beside a direct NumPy recursion of the block written here; the max
   |tpc - NumPy| of each kernel (must be below 1e-9).

Each measurement runs in its own process, so that its memory is its own: "peak MB" is the process's
peak resident size during the measured call (Linux: VmHWM, restarted just before the call through
/proc/self/clear_refs; elsewhere ru_maxrss), "(+X)" that peak less the resident size just before
the call (imports, data). Kernels and predictions travel between the processes as .npy files in a
temporary directory. Times are of the first call after a warm-up on a tiny problem (width 16, 8
inputs, 64 particles, 4 digits), so they exclude one-time imports; with --repeats R > 1 the times
of kernels and cnn are the best of R. The processes run torch and BLAS on --threads threads (default
1: on a busy two-core machine a second thread made the transformer's small operations 30 to 100
times slower).

    python benchmarks/architectures.py [--sizes 200,1000] [--widths 256,1024,4096]
        [--particles 1024,4096,16384] [--replicates 2] [--cnn-sizes 8,64,128] [--repeats 1]
        [--tf-sizes 50,200] [--cnn-budget-gb 4] [--threads 1] [--skip kernels,finite,limit,cnn,transformer]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
ARCH = ROOT / "programs" / "arch"
RESNET = ARCH / "resnet_ln.tp"
TRANSFORMER = ARCH / "transformer_mup.tp"
CNN = ARCH / "cnn_digits.tp"
TF_KERNELS = ARCH / "transformer_kernels.tp"
PARTS = ("kernels", "finite", "limit", "cnn", "transformer")
D = 3  # resnet_ln.tp's input dimension
PRED_TOL = 1e-8  # tpc.run against the hand-written module
CNN_TOL = 1e-9  # cnn_digits.tp's kernels: tpc.limit against the direct recursion
CNN_PLANNED = 1000  # images whose plan (blocks, memory, time) is stated without running it
CNN_BUDGET_GB = 4.0  # tpc's memory budget for the cnn part: larger N go by blocks of inputs
CNN_DIRECT_MAX = 64  # the direct recursion's (N P)^2 matrices: 1.4 GB each at N = 64


_PEAK = {"restarted": False}


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def start_peak() -> float:
    """The resident size now (MB), with the peak restarted from it where Linux allows, so that
    peak_mb() afterwards is the peak of what follows (ru_maxrss cannot be restarted, and a child
    inherits its parent's at the fork)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _PEAK["restarted"] = True
        return _status_mb("VmRSS")
    except OSError:
        return peak_mb()


def peak_mb() -> float:
    if _PEAK["restarted"]:
        return _status_mb("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ---------------------------------------------------------------- 1. resnet_ln.tp's kernels

def inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, D))


def relu_pair(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """E[relu(u) relu(u')] and E[step(u) step(u')] for (u, u') ~ N(0, k) (Cho & Saul 2009)."""
    d = np.sqrt(np.diag(k))
    dd = np.outer(d, d)
    cos = np.clip(k / dd, -1.0, 1.0)
    np.fill_diagonal(cos, 1.0)  # exactly: arccos(1 - ulp) would be 1e-8
    th = np.arccos(cos)
    return dd / (2 * np.pi) * (np.sin(th) + (np.pi - th) * cos), (np.pi - th) / (2 * np.pi)


def resnet_ln_numpy(x: np.ndarray, blocks: int = 4, alpha: float = 0.5, var_u: float = 2.0, var_w: float = 2.0,
                    var_v: float = 1.0, eps: float = 1e-5) -> dict[str, np.ndarray]:
    """h = U x; h <- h + alpha W relu(layernorm(h)) per block; f = V layernorm(h); NTK
    parametrization, TP4's NTK (gradients with respect to w). In the limit layernorm(h) is
    h / sqrt(K(x, x) + eps) (mean 0, variance K(x, x)), and divides the NTK by the same factors.
    Input layer: K = var_U x.x'/d, Theta = x.x'; a block: K += alpha^2 var_W E[relu relu],
    Theta += alpha^2 (E[relu relu] + var_W E[relu' relu'] Theta_z) on z = layernorm(h); the readout:
    nngp = var_V K_z, ntk = K_z + var_V Theta_z."""
    gram = x @ x.T
    k, t = var_u * gram / x.shape[1], gram

    def normalised(k: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = np.sqrt(np.diag(k) + eps)
        ss = np.outer(s, s)
        return k / ss, t / ss

    for _ in range(blocks):
        kz, tz = normalised(k, t)
        rr, dd = relu_pair(kz)
        k = k + alpha**2 * var_w * rr
        t = t + alpha**2 * (rr + var_w * dd * tz)
    kz, tz = normalised(k, t)
    return {"nngp": var_v * kz, "ntk": kz + var_v * tz}


def program_source(program: Path, data: str) -> str:
    """The program's text with its (first) `load("...")` reading `data` instead."""
    source, found = re.subn(r'load\("[^"]*"\)', f'load("{data}")', program.read_text(), count=1)
    assert found, f"no load(...) in {program}"
    return source


def resnet_source(data: str) -> str:
    return program_source(RESNET, data)


def kernels_tpc(n: int, out: Path, repeats: int) -> dict[str, Any]:
    import tpc

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        np.save(base / "X.npy", inputs(8, seed=1))
        tpc.limit(tpc.loads(resnet_source("X.npy"), str(RESNET), base_dir=base))  # warm-up: imports
        np.save(base / "X.npy", inputs(n))
        t0 = time.perf_counter()
        net = tpc.loads(resnet_source("X.npy"), str(RESNET), base_dir=base)
        load_s = time.perf_counter() - t0
    lim, best, before = timed_limit(net, repeats, out, f"tpc_{{key}}_{n}.npy")
    return {"seconds": best, "load_seconds": load_s, "peak_mb": peak_mb(), "before_mb": before,
            "method": "; ".join(sorted({o.method for o in lim.values()}))}


def timed_limit(net: Any, repeats: int, out: Path, name: str,
                memory_gb: float | None = None) -> tuple[dict, float, float]:
    """The best of `repeats` runs of tpc.limit (its nngp and ntk saved to out/name, with {key} the
    kernel), and the resident memory before them."""
    import tpc

    before = start_peak()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        lim = tpc.limit(net, memory_gb=memory_gb)
        best = min(best, time.perf_counter() - t0)
    for key in ("nngp", "ntk"):
        np.save(out / name.format(key=key), lim[key].value)
    return lim, best, before


def timed_direct(recursion: Any, warm: np.ndarray, x: np.ndarray, out: Path, prefix: str, n: int,
                 repeats: int) -> dict[str, Any]:
    """A direct recursion's best time of `repeats` after a warm-up, its peak memory, and its kernels
    saved as <prefix>_<key>_<n>.npy."""
    recursion(warm)
    before = start_peak()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        ref = recursion(x)
        best = min(best, time.perf_counter() - t0)
    for key, value in ref.items():
        np.save(out / f"{prefix}_{key}_{n}.npy", value)
    return {"seconds": best, "peak_mb": peak_mb(), "before_mb": before}


def kernels_numpy(n: int, out: Path, repeats: int) -> dict[str, Any]:
    return timed_direct(resnet_ln_numpy, inputs(8, seed=1), inputs(n), out, "numpy", n, repeats)


# ---------------------------------------------------------------- 2. transformer_mup.tp at finite width

def transformer_torch(width: int, seed: int = 0) -> np.ndarray:
    """transformer_mup.tp by hand, its data read from the same CSV files. muP in TP4's abc form:
    W^l = n^-a_l w^l with a = -1/2 (E), 0 (hidden), 1/2 (V); w^l = sqrt(var_l / fan_in) n^-b_l *
    standard normals with b = 1/2, fan_in 18 for E and 1 otherwise, var 2 for W1 and 1 otherwise;
    the standard normals of seed s from torch.Generator().manual_seed(s), layer by layer in
    declaration order (tpc/train/finite.py). Three SGD steps w <- w - 0.1 n^-c dL/dw (c = 0) on
    L = mean over sentences of (f - y)^2 / 2; returns f on the test sentences."""
    import torch

    x, y, xt = (torch.tensor(np.loadtxt(ARCH / "data" / name, delimiter=",", ndmin=nd), dtype=torch.float64)
                for name, nd in (("sentences4x8.csv", 2), ("labels4.csv", 1), ("sentences_test2x8.csv", 2)))
    n, positions, d = width, 8, 18
    layers = [("E", (n, d), 1.0, d, -0.5), ("Q", (n, n), 1.0, 1, 0.0), ("K", (n, n), 1.0, 1, 0.0),
              ("Vv", (n, n), 1.0, 1, 0.0), ("O", (n, n), 1.0, 1, 0.0), ("W1", (n, n), 2.0, 1, 0.0),
              ("W2", (n, n), 1.0, 1, 0.0), ("V", (1, n), 1.0, 1, 0.5)]  # name, shape, var, fan-in, a
    b, c, lr, eps = 0.5, 0.0, 0.1, 1e-5
    gen = torch.Generator().manual_seed(seed)
    w = {name: (torch.randn(shape, generator=gen, dtype=torch.float64) * math.sqrt(var / fan_in) * n**-b)
         .requires_grad_(True) for name, shape, var, fan_in, _ in layers}
    mult = {name: n**-a for name, _, _, _, a in layers}

    def ln(h: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(h, (n,), eps=eps)

    def f(inp: torch.Tensor) -> torch.Tensor:
        W = {k: mult[k] * v for k, v in w.items()}  # noqa: N806
        sentences = inp.shape[0]
        h = inp.reshape(sentences * positions, d) @ W["E"].T  # token + position embedding, per position
        z = ln(h)
        q, k, v = (z @ W[name].T for name in ("Q", "K", "Vv"))
        q, k, v = (t.reshape(sentences, positions, n) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(1, 2) / n, dim=-1) @ v  # muP: logits q.k / n
        h = h + att.reshape(sentences * positions, n) @ W["O"].T
        h = h + torch.relu(ln(h) @ W["W1"].T) @ W["W2"].T
        pooled = ln(h).reshape(sentences, positions, n).mean(1)
        return (pooled @ W["V"].T)[:, 0]

    for _ in range(3):
        loss = ((f(x) - y) ** 2 / 2).mean()
        grads = torch.autograd.grad(loss, list(w.values()))
        with torch.no_grad():
            w = {k: (v - lr * n**-c * g).requires_grad_(True) for (k, v), g in zip(w.items(), grads, strict=True)}
    with torch.no_grad():
        return f(xt).numpy()


def finite_tpc(width: int, out: Path) -> dict[str, Any]:
    import torch  # noqa: F401 - imported before the clock starts, as in finite_torch

    import tpc

    net = tpc.load(TRANSFORMER)
    tpc.run(net, 16, 1)  # warm-up: imports
    before = start_peak()
    t0 = time.perf_counter()
    res = tpc.run(net, width, 1)
    seconds = time.perf_counter() - t0
    np.save(out / f"tpc_pred_{width}.npy", res["pred"].values[0].reshape(-1))
    return {"seconds": seconds, "peak_mb": peak_mb(), "before_mb": before}


def finite_torch(width: int, out: Path) -> dict[str, Any]:
    import torch

    transformer_torch(16)  # warm-up
    before = start_peak()
    t0 = time.perf_counter()
    pred = transformer_torch(width)
    seconds = time.perf_counter() - t0
    np.save(out / f"torch_pred_{width}.npy", pred)
    return {"seconds": seconds, "peak_mb": peak_mb(), "before_mb": before, "threads": torch.get_num_threads()}


# ---------------------------------------------------------------- 3. transformer_mup.tp's limit

def limit_one(particles: int, replicates: int, out: Path) -> dict[str, Any]:
    import tpc
    from tpc.train.limit import describe

    net = tpc.load(TRANSFORMER)
    tpc.limit(net, particles=64, replicates=2)  # warm-up: imports
    plan = describe(net, particles=particles, replicates=replicates)
    found = re.search(r"about ([0-9.eE+-]+) GB", plan)
    before = start_peak()
    t0 = time.perf_counter()
    lim = tpc.limit(net, particles=particles, replicates=replicates)
    seconds = time.perf_counter() - t0
    np.save(out / f"limit_pred_{particles}.npy", lim["pred"].value)
    return {"seconds": seconds, "peak_mb": peak_mb(), "before_mb": before, "plan": plan,
            "plan_mb": float(found.group(1)) * 1024 if found else None,
            "pred": [float(v) for v in lim["pred"].value],
            "pred_stderr": float(np.max(lim["pred"].stderr)), "method": lim["pred"].method}


# ---------------------------------------------------------------- 4. cnn_digits.tp's kernels

GRID = 8  # cnn_digits.tp's images: 8 x 8 pixels, one number each, positions row by row (p = 8 row + col)


def digits(n: int, first: int = 0) -> np.ndarray:
    """Images first .. first + n - 1 of scikit-learn's digits (N x 64), pixels / 16, standardised
    by the mean and standard deviation (ddof 0) of their pixels; the first 8 are one of each class
    0..7, programs/arch/data/digits8x64.csv."""
    from sklearn.datasets import load_digits

    pixels = load_digits().data[first:first + n] / 16
    assert len(pixels) == n, f"scikit-learn's digits hold {first + len(pixels)} images, not {first + n}"
    return (pixels - pixels.mean()) / pixels.std()


def taps_sum(m: np.ndarray, n: int) -> np.ndarray:
    """sum over the 9 taps s of a 3 x 3 'same' convolution of S_s[M]: M at positions (p + s, q + s)
    for the pair (p, q), zero where p + s or q + s leaves the grid. m: (N P) x (N P), the entry of
    images (a, b) at positions (p, q) in row a P + p, column b P + q."""
    grid = m.reshape(n, GRID, GRID, n, GRID, GRID)
    out = np.zeros_like(grid)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            dst_r, src_r = slice(max(0, -dy), GRID - max(0, dy)), slice(max(0, dy), GRID - max(0, -dy))
            dst_c, src_c = slice(max(0, -dx), GRID - max(0, dx)), slice(max(0, dx), GRID - max(0, -dx))
            out[:, dst_r, dst_c, :, dst_r, dst_c] += grid[:, src_r, src_c, :, src_r, src_c]
    return out.reshape(m.shape)


def cnn_numpy(x: np.ndarray, var_u: float = 2.0, var_conv: float = 2 / 9, var_v: float = 1.0) -> dict[str, np.ndarray]:
    """cnn_digits.tp's NNGP and NTK by the per-position recursion (Novak et al. 2019, Arora et al.
    2019), NTK parametrization, TP4's NTK (a layer's own term without its variance), on (N P) x
    (N P) matrices (the tensors (N, N, P, P) with their axes ordered a, p, b, q, so that relu_pair's
    diagonal is each image's variance at each position). The input convolution reads 3 x 3 patches
    (9 numbers): K = var_U S[x x'] / 9, Theta = S[x x'], with S the sum over the 9 offsets s of
    M at positions (p + s, q + s); relu: E = E[relu relu], D = E[step step] (arc-cosine closed
    forms); the 3 x 3 'same' convolution with var v per tap: K = v S[E], Theta = S[E] + v S[D Theta];
    pooling and the readout: nngp = var_V mean_pq E, ntk = mean_pq E + var_V mean_pq(D Theta)."""
    n, positions = x.shape
    flat = x.reshape(-1)
    t = taps_sum(np.outer(flat, flat), n)
    k = var_u * t / 9
    e, dstep = relu_pair(k)
    dstep *= t
    del t, k
    s_e = taps_sum(e, n)
    del e
    t = taps_sum(dstep, n)
    del dstep
    t *= var_conv
    t += s_e
    k = s_e
    k *= var_conv
    e, dstep = relu_pair(k)
    dstep *= t

    def pooled(m: np.ndarray) -> np.ndarray:
        return m.reshape(n, positions, n, positions).mean(axis=(1, 3))

    return {"nngp": var_v * pooled(e), "ntk": pooled(e) + var_v * pooled(dstep)}


def cnn_net(images: np.ndarray, out: Path, tag: str) -> Any:
    """cnn_digits.tp reading `images` from an .npy in `out` (by its absolute path)."""
    import tpc

    data = (out / f"digits_{tag}.npy").resolve()
    np.save(data, images)
    return tpc.loads(program_source(CNN, str(data)), str(CNN), base_dir=data.parent)


def cnn_tpc(n: int, out: Path, repeats: int, budget_gb: float) -> dict[str, Any]:
    import tpc
    from tpc.train.limit import kernel_regime_memory

    tpc.limit(cnn_net(digits(4, first=1000), out, "warmup"))  # warm-up: imports
    t0 = time.perf_counter()
    net = cnn_net(digits(n), out, str(n))
    load_s = time.perf_counter() - t0
    stated, _, (block, count, _) = kernel_regime_memory(net, budget_gb)
    lim, best, before = timed_limit(net, repeats, out, f"cnn_tpc_{{key}}_{n}.npy", memory_gb=budget_gb)
    return {"seconds": best, "load_seconds": load_s, "peak_mb": peak_mb(), "before_mb": before,
            "stated_mb": stated / 2**20, "block": block, "recursions": count,
            "method": {key: lim[key].method for key in ("nngp", "ntk")}}


def cnn_direct(n: int, out: Path, repeats: int) -> dict[str, Any]:
    return timed_direct(cnn_numpy, digits(4, first=1000), digits(n), out, "cnn_numpy", n, repeats)


def cnn_plan(n: int, out: Path, budget_gb: float) -> dict[str, Any]:
    """tpc's plan for n images under budget_gb, without running it: blocks, recursions, memory."""
    from tpc.train.limit import describe, kernel_regime_memory

    net = cnn_net(digits(n), out, str(n))
    stated, _, (block, count, _) = kernel_regime_memory(net, budget_gb)
    return {"block": block, "recursions": count, "stated_mb": stated / 2**20,
            "plan": describe(net, memory_gb=budget_gb)}


# ---------------------------------------------------------------- 5. transformer_kernels.tp's kernels

TF_POSITIONS, TF_WORDS = 8, 10  # transformer_kernels.tp's sentences: 8 tokens of 10 words
TF_TOL = 1e-9


def sentences(n: int, seed: int = 0) -> np.ndarray:
    """n random sentences as transformer_kernels.tp reads them: at each of 8 positions a word's
    one-hot code (10 words, drawn uniformly, seed 0) then the position's (8): n x (8 x 18)."""
    words = np.random.default_rng(seed).integers(0, TF_WORDS, size=(n, TF_POSITIONS))
    x = np.zeros((n, TF_POSITIONS, TF_WORDS + TF_POSITIONS))
    x[np.arange(n)[:, None], np.arange(TF_POSITIONS)[None, :], words] = 1.0
    x[:, np.arange(TF_POSITIONS), TF_WORDS + np.arange(TF_POSITIONS)] = 1.0
    return x.reshape(n, -1)


def transformer_numpy(x: np.ndarray, eps: float = 1e-5) -> dict[str, np.ndarray]:
    """transformer_kernels.tp's NNGP and NTK (NTK parametrization, logits q.k / n, TP4's NTK) on
    (N P) x (N P) matrices, re-derived here. At initialisation Q and K are independent, so the
    logits vanish and attention is the mean of v = Vv z over the positions (Q and K get no NTK term);
    a layernorm of a centred value divides its kernel (and NTK) by sqrt((K_pp + eps)(K'_qq + eps)).
    h = E x: K = x.x'/18, T = x.x'; z = ln(h); v = Vv z: Kv = Kz, Tv = Kz + Tz; a = mean_r v_r;
    h += O a: K += Ka, T += Ka + Ta; u = W1 ln(h) (var 2): Ku = 2 Kz, Tu = Kz + 2 Tz; h += W2 relu(u):
    K += E, T += E + D Tu; f = V pool(ln(h)): nngp = mean K, ntk = mean K + mean T."""
    n, d = x.shape[0], x.shape[1] // TF_POSITIONS
    flat = x.reshape(n * TF_POSITIONS, d)
    t = flat @ flat.T
    k = t / d

    def ln(k: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = np.sqrt(np.diag(k) + eps)
        return k / np.outer(s, s), t / np.outer(s, s)

    def mean_positions(m: np.ndarray) -> np.ndarray:
        grid = m.reshape(n, TF_POSITIONS, n, TF_POSITIONS).mean(axis=(1, 3), keepdims=True)
        return np.broadcast_to(grid, (n, TF_POSITIONS, n, TF_POSITIONS)).reshape(m.shape)

    kz, tz = ln(k, t)
    ka, ta = mean_positions(kz), mean_positions(kz + tz)  # v = Vv z, averaged over the positions
    k, t = k + ka, t + ka + ta  # h + O a
    kz, tz = ln(k, t)
    e, dstep = relu_pair(2 * kz)
    k, t = k + e, t + e + dstep * (kz + 2 * tz)  # h + W2 relu(W1 z)
    kz, tz = ln(k, t)
    pooled = {key: m.reshape(n, TF_POSITIONS, n, TF_POSITIONS).mean(axis=(1, 3)) for key, m in (("k", kz), ("t", tz))}
    return {"nngp": pooled["k"], "ntk": pooled["k"] + pooled["t"]}


def tf_net(rows: np.ndarray, out: Path, tag: str) -> Any:
    """transformer_kernels.tp reading `rows` from an .npy in `out`."""
    import tpc

    data = (out / f"sentences_{tag}.npy").resolve()
    np.save(data, rows)
    return tpc.loads(program_source(TF_KERNELS, str(data)), str(TF_KERNELS), base_dir=data.parent)


def tf_tpc(n: int, out: Path, repeats: int) -> dict[str, Any]:
    import tpc
    from tpc.train.limit import kernel_regime_memory

    tpc.limit(tf_net(sentences(4, seed=1), out, "warmup"))  # warm-up: imports
    net = tf_net(sentences(n), out, str(n))
    stated, _, _ = kernel_regime_memory(net, None)
    lim, best, before = timed_limit(net, repeats, out, f"tf_tpc_{{key}}_{n}.npy")
    return {"seconds": best, "peak_mb": peak_mb(), "before_mb": before, "stated_mb": stated / 2**20,
            "method": {key: lim[key].method for key in ("nngp", "ntk")}}


def tf_direct(n: int, out: Path, repeats: int) -> dict[str, Any]:
    return timed_direct(transformer_numpy, sentences(4, seed=1), sentences(n), out, "tf_numpy", n, repeats)


# ---------------------------------------------------------------- the driver

ONE = {"kernels-tpc": lambda v, out, a: kernels_tpc(v, out, a.repeats),
       "kernels-numpy": lambda v, out, a: kernels_numpy(v, out, a.repeats),
       "finite-tpc": lambda v, out, a: finite_tpc(v, out),
       "finite-torch": lambda v, out, a: finite_torch(v, out),
       "limit": lambda v, out, a: limit_one(v, a.replicates, out),
       "cnn-tpc": lambda v, out, a: cnn_tpc(v, out, a.repeats, a.cnn_budget_gb),
       "cnn-direct": lambda v, out, a: cnn_direct(v, out, a.repeats),
       "cnn-plan": lambda v, out, a: cnn_plan(v, out, a.cnn_budget_gb),
       "tf-tpc": lambda v, out, a: tf_tpc(v, out, a.repeats),
       "tf-direct": lambda v, out, a: tf_direct(v, out, a.repeats)}
NUMPY_ONLY = ("kernels-numpy", "cnn-direct", "tf-direct")  # measurements that never import torch


def measure(kind: str, value: int, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--one", f"{kind}:{value}", "--out", str(out), "--repeats", str(args.repeats),
           "--replicates", str(args.replicates), "--threads", str(args.threads), "--cnn-budget-gb",
           str(args.cnn_budget_gb)]
    threads = {var: str(args.threads) for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT), **threads))
    if proc.returncode != 0:
        raise SystemExit(f"{kind}:{value} failed:\n{proc.stderr[-3000:]}")
    return {"kind": kind, "value": value, **json.loads(proc.stdout.strip().splitlines()[-1])}


def ints(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def header(cols: list[str]) -> None:
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")


def mem(r: dict[str, Any]) -> str:
    return f"{r['peak_mb']:.0f} ({r['peak_mb'] - r['before_mb']:+.0f})"


def part_kernels(args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    print(f"\n### 1. NNGP + NTK of {RESNET.relative_to(ROOT)} (float64), N random {D}-dimensional inputs\n")
    cols = ["N", "tpc.limit s", "tpc peak MB (above)", "NumPy s", "NumPy peak MB (above)", "max |diff| NNGP",
              "max |diff| NTK", "tpc method"]
    header(cols)
    rows = []
    for n in ints(args.sizes):
        t, p = measure("kernels-tpc", n, out, args), measure("kernels-numpy", n, out, args)
        diff = {k: float(np.abs(np.load(out / f"tpc_{k}_{n}.npy") - np.load(out / f"numpy_{k}_{n}.npy")).max())
                for k in ("nngp", "ntk")}
        rows.append({"N": n, "tpc": t, "numpy": p, "max_abs_diff": diff})
        print(f"| {n} | {t['seconds']:.3f} | {mem(t)} | {p['seconds']:.3f} | {mem(p)} | {diff['nngp']:.1e} | "
              f"{diff['ntk']:.1e} | {t['method']} |", flush=True)
    print(f"\ntpc.limit alone (the text's tpc.loads, with its data, took {rows[-1]['tpc']['load_seconds']:.2f} s at "
          f"N = {rows[-1]['N']}); best of {args.repeats} after a warm-up at N = 8; peak MB = the process's "
          "peak resident size during the call, (+X) = less its resident size before")
    return rows


def part_finite(args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    print(f"\n### 2. {TRANSFORMER.relative_to(ROOT)} at finite width: 3 SGD steps in muP, 1 seed, float64\n")
    cols = ["width", "tpc.run s", "tpc peak MB (above)", "torch module s", "torch peak MB (above)",
              "max |pred diff|"]
    header(cols)
    rows, bad = [], []
    for w in ints(args.widths):
        t, h = measure("finite-tpc", w, out, args), measure("finite-torch", w, out, args)
        diff = float(np.abs(np.load(out / f"tpc_pred_{w}.npy") - np.load(out / f"torch_pred_{w}.npy")).max())
        rows.append({"width": w, "tpc": t, "torch": h, "max_abs_diff_pred": diff})
        if not diff <= PRED_TOL:
            bad.append(w)
        print(f"| {w} | {t['seconds']:.2f} | {mem(t)} | {h['seconds']:.2f} | {mem(h)} | {diff:.1e} |", flush=True)
    print("\neach a fresh process after a warm-up at width 16; the torch module is the same network written by hand "
          "(same normals, same SGD)")
    if bad:
        print(f"MISMATCH: tpc's pred differs from the hand-written module's by more than {PRED_TOL:g} at widths {bad}")
    else:
        print(f"tpc's final pred equals the hand-written module's to {PRED_TOL:g} at every width")
    return rows


def part_limit(args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    print(f"\n### 3. {TRANSFORMER.relative_to(ROOT)}: the muP limit by particles, {args.replicates} replicates, "
          "float64\n")
    cols = ["particles", "tpc.limit s", "peak MB (above)", "plan MB", "pred", "largest stderr"]
    header(cols)
    rows = []
    for p in ints(args.particles):
        r = measure("limit", p, out, args)
        rows.append(r)
        plan = "-" if r["plan_mb"] is None else f"{r['plan_mb']:.0f}"
        pred = " ".join(f"{v:.4f}" for v in r["pred"])
        print(f"| {p} | {r['seconds']:.2f} | {mem(r)} | {plan} | {pred} | {r['pred_stderr']:.1e} |", flush=True)
    if rows:
        print(f"\nplan (tpc.train.limit.describe, at {rows[-1]['value']} particles): {rows[-1]['plan']}")
    return rows


def part_cnn(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    print(f"\n### 4. NNGP + NTK of {CNN.relative_to(ROOT)} (float64), the first N of scikit-learn's 8 x 8 digits\n")
    cols = ["N", "tpc blocks (recursions)", "tpc.limit s", "tpc peak MB (above)", "tpc states MB", "direct s",
            "direct peak MB (above)", "max |diff| NNGP", "max |diff| NTK", "tpc method (nngp; ntk)"]
    header(cols)
    rows, bad = [], []
    for n in ints(args.cnn_sizes):
        t = measure("cnn-tpc", n, out, args)
        p = measure("cnn-direct", n, out, args) if n <= CNN_DIRECT_MAX else None
        diff = {k: float(np.abs(np.load(out / f"cnn_tpc_{k}_{n}.npy") - np.load(out / f"cnn_numpy_{k}_{n}.npy")).max())
                for k in ("nngp", "ntk")} if p else None
        rows.append({"N": n, "tpc": t, "direct": p, "max_abs_diff": diff})
        if diff and not max(diff.values()) <= CNN_TOL:
            bad.append(n)
        blocks = "whole" if t["recursions"] == 1 else f"{t['block']} ({t['recursions']})"
        direct = (f"{p['seconds']:.2f} | {mem(p)} | {diff['nngp']:.1e} | {diff['ntk']:.1e}" if p and diff
                  else "- | - | - | -")
        print(f"| {n} | {blocks} | {t['seconds']:.2f} | {mem(t)} | {t['stated_mb']:.0f} | {direct} | "
              f"{t['method']['nngp']}; {t['method']['ntk']} |", flush=True)
    if rows:
        print(f"\ntpc.limit alone (the text's tpc.loads, with its data, took {rows[-1]['tpc']['load_seconds']:.2f} s "
              f"at N = {rows[-1]['N']}) under memory_gb={args.cnn_budget_gb:g}; best of {args.repeats} after a "
              "warm-up on 4 digits; 'tpc states' = tpc.train.limit.kernel_regime_memory(net, budget), the "
              f"memory tpc requires before it runs; the direct recursion is NumPy's, written here, up to N = "
              f"{CNN_DIRECT_MAX}")
    if bad:
        print(f"MISMATCH: tpc's kernels differ from the direct recursion's by more than {CNN_TOL:g} at N = {bad}")
    elif any(r["direct"] for r in rows):
        print(f"tpc's NNGP and NTK equal the direct recursion's to {CNN_TOL:g} at every N where both ran")
    r = measure("cnn-plan", CNN_PLANNED, out, args)
    rate = ""
    if rows:  # seconds per recursion, scaled by its inputs squared
        last = rows[-1]["tpc"]
        size = 2 * last["block"] if last["recursions"] > 1 else rows[-1]["N"]
        per = last["seconds"] / last["recursions"] / size**2
        rate = (f"; at N = {rows[-1]['N']}'s rate, about {per * r['recursions'] * (2 * r['block'])**2 / 60:.0f} "
                "minutes")
    print(f"\nN = {CNN_PLANNED} under memory_gb={args.cnn_budget_gb:g}, not run: blocks of {r['block']} inputs, "
          f"{r['recursions']} recursions, tpc states {r['stated_mb'] / 1024:.1f} GB{rate}")
    return {"sizes": rows, "planned": {"N": CNN_PLANNED, "memory_gb": args.cnn_budget_gb, **r}}


def part_transformer(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    print(f"\n### 5. NNGP + NTK of {TF_KERNELS.relative_to(ROOT)} (float64), N random sentences of 8 tokens\n")
    header(["N", "tpc.limit s", "tpc peak MB (above)", "tpc states MB", "direct s", "direct peak MB (above)",
            "max |diff| NNGP", "max |diff| NTK", "tpc method (nngp; ntk)"])
    rows, bad = [], []
    for n in ints(args.tf_sizes):
        t, p = measure("tf-tpc", n, out, args), measure("tf-direct", n, out, args)
        diff = {k: float(np.abs(np.load(out / f"tf_tpc_{k}_{n}.npy") - np.load(out / f"tf_numpy_{k}_{n}.npy")).max())
                for k in ("nngp", "ntk")}
        rows.append({"N": n, "tpc": t, "direct": p, "max_abs_diff": diff})
        if not max(diff.values()) <= TF_TOL:
            bad.append(n)
        print(f"| {n} | {t['seconds']:.2f} | {mem(t)} | {t['stated_mb']:.0f} | {p['seconds']:.2f} | {mem(p)} | "
              f"{diff['nngp']:.1e} | {diff['ntk']:.1e} | {t['method']['nngp']}; {t['method']['ntk']} |", flush=True)
    if bad:
        print(f"MISMATCH: tpc's kernels differ from the direct recursion's by more than {TF_TOL:g} at N = {bad}")
    elif rows:
        print(f"\ntpc's NNGP and NTK (the per-position recursion) equal the direct one's to {TF_TOL:g} at every N")
    return {"sizes": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="200,1000", help="kernels: numbers of inputs N")
    ap.add_argument("--widths", default="256,1024,4096", help="finite: widths of the transformer")
    ap.add_argument("--particles", default="1024,4096,16384", help="limit: particle counts")
    ap.add_argument("--replicates", type=int, default=2, help="limit: independent replicates")
    ap.add_argument("--cnn-sizes", default="8,64,128", help="cnn: numbers of digits N")
    ap.add_argument("--tf-sizes", default="50,200", help="transformer: numbers of sentences N")
    ap.add_argument("--cnn-budget-gb", type=float, default=CNN_BUDGET_GB,
                    help="cnn: tpc's memory budget (beyond it, blocks of inputs)")
    ap.add_argument("--repeats", type=int, default=1, help="kernels, cnn: timed calls per process (best kept)")
    ap.add_argument("--threads", type=int, default=1, help="torch and BLAS threads in each measuring process")
    ap.add_argument("--skip", default="", help=f"comma-separated parts to leave out: {','.join(PARTS)}")
    ap.add_argument("--json", type=Path, help="also write every figure to this file")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        kind, value = args.one.split(":")
        if kind not in NUMPY_ONLY:  # NumPy's BLAS takes its threads from the environment (measure())
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(ONE[kind](int(value), args.out, args)))
        return
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if skip - set(PARTS):
        ap.error(f"--skip: unknown part(s) {sorted(skip - set(PARTS))}; the parts are {','.join(PARTS)}")
    from importlib.metadata import version  # torch is not imported here: a child would inherit its size

    print(f"numpy {np.__version__} | torch {version('torch')} | {args.threads} thread(s) per process (torch and "
          f"BLAS) | {os.cpu_count()} cpus | load average {os.getloadavg()[0]:.1f}")
    report: dict[str, Any] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name, part in (("kernels", part_kernels), ("finite", part_finite), ("limit", part_limit),
                           ("cnn", part_cnn), ("transformer", part_transformer)):
            if name not in skip:
                report[name] = part(args, Path(tmp))
    print(f"\ntotal {time.perf_counter() - start:.0f} s (load average now {os.getloadavg()[0]:.1f})")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
