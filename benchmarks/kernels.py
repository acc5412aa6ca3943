"""Benchmark tpc's infinite-width NNGP limit of a 3-hidden-layer ReLU MLP against plain NumPy.

    python benchmarks/kernels.py [--sizes 1000,4000] [--repeats 3] [--json PATH]

For each N, N random inputs of dimension 100 are written to a temporary .npy file; tpc parses,
checks and builds the program (`tpc.loads`) and takes its limit (`tpc.limit`) in float64 and
float32, and a direct NumPy arc-cosine recursion computes the same kernel in float64. Each
timing is the best of `--repeats` runs after one warm-up run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import tpc

D = 100
SOURCE = f"""\
width n
data X = load("X.npy")
matrix U  : n x {D} ~ N(0, 2/{D})
matrix W2 : n x n ~ N(0, 2/n)
matrix W3 : n x n ~ N(0, 2/n)
vector v ~ N(0, 1)
x1 = relu(U @ X)
x2 = relu(W2 @ x1)
x3 = relu(W3 @ x2)
f  = v @ x3 / sqrt(n)
output nngp = cov(f)
"""


def arccos_kernel(k: np.ndarray) -> np.ndarray:
    """E[relu(u) relu(v)] for (u, v) centred Gaussian with covariance entries of k (Cho & Saul)."""
    d = np.sqrt(np.diag(k))
    norms = np.outer(d, d)
    cos = np.clip(k / norms, -1.0, 1.0)
    t = np.arccos(cos)
    return norms / (2 * np.pi) * (np.sin(t) + (np.pi - t) * cos)


def numpy_nngp(x: np.ndarray) -> np.ndarray:
    """The direct recursion: K1 = (2/d) X X^T, K2 = 2 J(K1), K3 = 2 J(K2), nngp = J(K3)."""
    k = (2.0 / x.shape[1]) * (x @ x.T)
    for _ in range(2):
        k = 2.0 * arccos_kernel(k)
    return arccos_kernel(k)


def tpc_nngp(base_dir: pathlib.Path, dtype: str) -> tuple[np.ndarray, float, str]:
    """(kernel, seconds spent in tpc.limit, method label) for the full loads + limit path."""
    prog = tpc.loads(SOURCE, filename="bench.tp", base_dir=base_dir)
    start = time.perf_counter()
    out = tpc.limit(prog, dtype=dtype)["nngp"]
    return out.value, time.perf_counter() - start, out.method


def timed(fn: Callable[[], Any], repeats: int) -> tuple[list[float], list[Any]]:
    """Wall times and results of `repeats` runs of fn after one untimed warm-up run."""
    fn()
    times, results = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        results.append(fn())
        times.append(time.perf_counter() - start)
    return times, results


def measure(n: int, repeats: int, seed: int = 0) -> dict[str, Any]:
    x = np.random.default_rng(seed).standard_normal((n, D))
    with tempfile.TemporaryDirectory() as tmp:
        base = pathlib.Path(tmp)
        np.save(base / "X.npy", x)
        t64, r64 = timed(lambda: tpc_nngp(base, "float64"), repeats)
        t32, r32 = timed(lambda: tpc_nngp(base, "float32"), repeats)
    t_np, r_np = timed(lambda: numpy_nngp(x), repeats)
    (k64, _, method), (k32, _, _), k_np = r64[-1], r32[-1], r_np[-1]
    total64, t_np = min(t64), min(t_np)
    return {
        "N": n, "method": method, "tpc_total_s": total64, "tpc_limit_s": min(r[1] for r in r64),
        "tpc_float32_s": min(t32), "numpy_s": t_np, "ratio_numpy_over_tpc": t_np / total64,
        "max_abs_diff": float(np.abs(k64 - k_np).max()),
        "max_abs_diff_float32": float(np.abs(k32 - k_np).max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,4000", help="comma-separated numbers of inputs N")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (best kept)")
    parser.add_argument("--json", type=pathlib.Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]

    np_threads = _numpy_threads()
    print(f"tpc {tpc.__version__} | numpy {np.__version__} (BLAS threads: {np_threads}) | "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads) | "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus | "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '-')}")
    print(f"3-hidden-layer ReLU MLP NNGP, d={D}, best of {args.repeats} after a warm-up\n")

    header = ("N", "tpc total (s)", "tpc limit only (s)", "tpc float32 (s)", "numpy (s)",
              "numpy/tpc", "max |diff|")
    widths = [max(len(h), 8) for h in header]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    rows = []
    for n in sizes:
        r = measure(n, args.repeats)
        rows.append(r)
        cells = (str(n), f"{r['tpc_total_s']:.3f}", f"{r['tpc_limit_s']:.3f}", f"{r['tpc_float32_s']:.3f}",
                 f"{r['numpy_s']:.3f}", f"{r['ratio_numpy_over_tpc']:.2f}", f"{r['max_abs_diff']:.2e}")
        print("  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)), flush=True)

    methods = sorted({r["method"] for r in rows})
    print(f"\ntpc method: {', '.join(methods)}; float32 max |diff| vs numpy: "
          + ", ".join(f"N={r['N']}: {r['max_abs_diff_float32']:.1e}" for r in rows))
    no_slower = all(r["tpc_total_s"] <= r["numpy_s"] for r in rows)
    big = [r for r in rows if r["N"] == 4000]
    under_1s = big[0]["tpc_total_s"] < 1.0 if big else None
    print(f"targets: tpc no slower than numpy: {'yes' if no_slower else 'NO'}; "
          f"N=4000 under 1 s: {'n/a' if under_1s is None else 'yes' if under_1s else 'NO'}")

    if args.json:
        meta = {"numpy": np.__version__, "numpy_threads": np_threads, "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(), "repeats": args.repeats, "d": D}
        targets = {"tpc_no_slower_than_numpy": no_slower, "n4000_under_1s": under_1s}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows, "targets": targets}, indent=2) + "\n")


def _numpy_threads() -> int | str:
    """NumPy's BLAS thread count: from threadpoolctl if installed, else the environment."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            if os.environ.get(var):
                return f"{os.environ[var]} via {var}"
        return f"default, likely {os.cpu_count()}"
    blas = [p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"]
    return blas[0] if blas else "unknown"


if __name__ == "__main__":
    main()
