"""Benchmark tpc's infinite-width NNGP and NTK limits of a 3-hidden-layer ReLU MLP against plain NumPy.

    python benchmarks/kernels.py [--sizes 1000,4000] [--repeats 3] [--json PATH]
    python benchmarks/kernels.py --cold [--sizes 4000] [--repeats 3]   # first evaluations in fresh processes

For each N, N random inputs of dimension 100 are written to a temporary .npy file; tpc parses,
checks and builds the program (`tpc.loads`) and takes its limit (`tpc.limit`), once for the
program with only `output nngp = cov(f)` and once with `output ntk = tangent_kernel(f, X)` as
well, in float64 and float32. A direct NumPy recursion (arc-cosine kernels for the NNGP, plus
the Jacot et al. 2018 recursion for the NTK) computes the same kernels in float64. Each timing
is the best of `--repeats` runs after one warm-up run. Before timing, tpc and NumPy are checked
to agree to 1e-12 (relative to the largest entry) at N = 5, 50 and 600.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import tpc

D = 100
SOURCE_NNGP = f"""\
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
SOURCE_NTK = SOURCE_NNGP + "output ntk = tangent_kernel(f, X)\n"

HIDDEN_VARIANCE = 2.0  # weight variance of W2 and W3 (times 1/n)
VERIFY_SIZES = (5, 50, 600)  # 600: kernels kept by blocks of 256 rows
VERIFY_TOL = 1e-12  # max |tpc - numpy| / max |numpy|, float64
SNAP = 1 - 4e-15  # |cos| beyond this is +-1, as in tpc: arccos of a rounded 1 would be ~1e-8, not 0

Kernels = dict[str, np.ndarray]


def relu_kernels(k: np.ndarray, derivative: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(J1, J0) for the centred Gaussian with covariance k (Cho & Saul arc-cosine kernels).

    J1[a, b] = E[relu(u_a) relu(u_b)] = sqrt(k_aa k_bb) (sin t + (pi - t) cos t) / (2 pi),
    J0[a, b] = E[relu'(u_a) relu'(u_b)] = (pi - t) / (2 pi), t = arccos(k_ab / sqrt(k_aa k_bb));
    J0 is only computed (else None) when `derivative` is set.
    """
    d = np.sqrt(np.diag(k))
    norms = np.outer(d, d)
    cos = k / norms
    cos = np.clip(np.where(np.abs(cos) > SNAP, np.sign(cos), cos), -1.0, 1.0)
    t = np.arccos(cos)
    j1 = norms / (2 * np.pi) * (np.sin(t) + (np.pi - t) * cos)
    j0 = (np.pi - t) / (2 * np.pi) if derivative else None
    return j1, j0


def numpy_kernels(x: np.ndarray, ntk: bool) -> Kernels:
    """The direct recursion: Sigma = Theta = (2/d) X X^T; through each hidden layer (s2 = 2)
    Theta <- s2 J1(Sigma) + s2 Theta J0(Sigma), Sigma <- s2 J1(Sigma); then the readout (s2 = 1):
    nngp = J1(Sigma), ntk = J1(Sigma) + Theta J0(Sigma). The NTK is only computed if `ntk`."""
    sigma = (2.0 / x.shape[1]) * (x @ x.T)
    theta = sigma.copy() if ntk else None
    for s2 in (HIDDEN_VARIANCE, HIDDEN_VARIANCE, 1.0):
        j1, j0 = relu_kernels(sigma, derivative=ntk)
        sigma = s2 * j1
        if theta is not None and j0 is not None:
            theta = sigma + s2 * theta * j0
    out = {"nngp": sigma}
    if theta is not None:
        out["ntk"] = theta
    return out


def tpc_kernels(base_dir: pathlib.Path, source: str, dtype: str) -> tuple[Kernels, float, dict[str, str]]:
    """(kernels, seconds spent in tpc.limit, method label per output) for the full loads + limit path."""
    prog = tpc.loads(source, filename="bench.tp", base_dir=base_dir)
    start = time.perf_counter()
    outs = tpc.limit(prog, dtype=dtype)
    elapsed = time.perf_counter() - start
    return {k: o.value for k, o in outs.items()}, elapsed, {k: o.method for k, o in outs.items()}


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Best wall time of `repeats` runs of fn after one untimed warm-up run, and the last result."""
    result = fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max())


def max_rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    """Largest entrywise |a - ref| / |ref|."""
    return float((np.abs(a.astype(np.float64) - ref) / np.abs(ref)).max())


def inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, D))


def verify(sizes: tuple[int, ...] = VERIFY_SIZES) -> dict[str, dict[str, float]]:
    """Max |tpc - numpy| per kernel and size (float64); SystemExit if beyond VERIFY_TOL relative."""
    report: dict[str, dict[str, float]] = {}
    for n in sizes:
        x = inputs(n, seed=n)
        with tempfile.TemporaryDirectory() as tmp:
            base = pathlib.Path(tmp)
            np.save(base / "X.npy", x)
            got, _, _ = tpc_kernels(base, SOURCE_NTK, "float64")
        ref = numpy_kernels(x, ntk=True)
        report[str(n)] = {name: max_abs_diff(got[name], ref[name]) for name in ("nngp", "ntk")}
        for name, diff in report[str(n)].items():
            if diff > VERIFY_TOL * np.abs(ref[name]).max():
                raise SystemExit(f"verification failed: {name} at N={n}: max |tpc - numpy| = {diff:.3e}")
    return report


def measure(n: int, repeats: int, seed: int = 0) -> dict[str, Any]:
    x = inputs(n, seed)
    with tempfile.TemporaryDirectory() as tmp:
        base = pathlib.Path(tmp)
        np.save(base / "X.npy", x)
        t_nngp64, (k_nngp64, lim_nngp64, methods) = timed(lambda: tpc_kernels(base, SOURCE_NNGP, "float64"), repeats)
        t_nngp32, (k_nngp32, _, _) = timed(lambda: tpc_kernels(base, SOURCE_NNGP, "float32"), repeats)
        t_ntk64, (k_ntk64, lim_ntk64, methods_ntk) = timed(lambda: tpc_kernels(base, SOURCE_NTK, "float64"), repeats)
        t_ntk32, (k_ntk32, _, _) = timed(lambda: tpc_kernels(base, SOURCE_NTK, "float32"), repeats)
    t_np_nngp, ref_nngp = timed(lambda: numpy_kernels(x, ntk=False), repeats)
    t_np_ntk, ref = timed(lambda: numpy_kernels(x, ntk=True), repeats)
    return {
        "N": n, "methods": {**methods, **methods_ntk},
        # seconds, loads + limit (tpc) and the whole recursion (numpy); best of repeats
        "tpc_nngp_s": t_nngp64, "tpc_nngp_float32_s": t_nngp32, "numpy_nngp_s": t_np_nngp,
        "tpc_ntk_s": t_ntk64, "tpc_ntk_float32_s": t_ntk32, "numpy_ntk_s": t_np_ntk,
        # seconds in tpc.limit alone (float64), last run
        "tpc_nngp_limit_s": lim_nngp64, "tpc_ntk_limit_s": lim_ntk64,
        # accuracy against the numpy float64 recursion
        "max_abs_diff_nngp": max_abs_diff(k_nngp64["nngp"], ref_nngp["nngp"]),
        "max_abs_diff_nngp_with_ntk": max_abs_diff(k_ntk64["nngp"], ref["nngp"]),
        "max_abs_diff_ntk": max_abs_diff(k_ntk64["ntk"], ref["ntk"]),
        "max_abs_diff_nngp_float32": max_abs_diff(k_nngp32["nngp"], ref_nngp["nngp"]),
        "max_rel_err_ntk_float32": max_rel_err(k_ntk32["ntk"], ref["ntk"]),
    }


COLUMNS: tuple[tuple[str, str, str], ...] = (  # header, key, format
    ("N", "N", "d"),
    ("tpc NNGP f64", "tpc_nngp_s", ".3f"),
    ("tpc NNGP f32", "tpc_nngp_float32_s", ".3f"),
    ("numpy NNGP", "numpy_nngp_s", ".3f"),
    ("tpc +NTK f64", "tpc_ntk_s", ".3f"),
    ("tpc +NTK f32", "tpc_ntk_float32_s", ".3f"),
    ("numpy +NTK", "numpy_ntk_s", ".3f"),
    ("|diff| NNGP", "max_abs_diff_nngp_with_ntk", ".1e"),
    ("|diff| NTK", "max_abs_diff_ntk", ".1e"),
    ("f32 NTK rel err", "max_rel_err_ntk_float32", ".1e"),
)


def cold(n: int, what: str) -> dict[str, float]:
    """One NNGP+NTK float64 in this (fresh) process, by tpc (loads + limit) or by the NumPy recursion:
    wall and CPU seconds, and how far the process's peak memory rose above its size before."""
    x = inputs(n)
    with tempfile.TemporaryDirectory() as tmp:
        base = pathlib.Path(tmp)
        np.save(base / "X.npy", x)
        before_mb = _resident_mb()
        _reset_peak()
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        if what == "tpc":
            tpc_kernels(base, SOURCE_NTK, "float64")
        else:
            numpy_kernels(x, ntk=True)
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_mb": _peak_mb() - before_mb}


def _resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak() -> None:
    """Start the peak resident size afresh (Linux), so an earlier peak (imports) does not count."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def cold_runs(n: int, rounds: int) -> None:
    """`rounds` fresh processes each for tpc and for NumPy, alternating; median and range."""
    runs: dict[str, list[dict[str, float]]] = {"tpc": [], "numpy": []}
    for _ in range(rounds):
        for what in runs:
            out = subprocess.run([sys.executable, __file__, "--cold-one", f"{what}:{n}"], capture_output=True,
                                 text=True, check=True).stdout
            runs[what].append(json.loads(out.strip().splitlines()[-1]))
    print(f"N = {n}, first NNGP+NTK float64 in a fresh process, {rounds} processes each "
          f"(THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '-')}): median (range)")
    for what, rs in runs.items():
        cols = []
        for key, unit, fmt in (("seconds", "s wall", ".2f"), ("cpu_seconds", "s CPU", ".2f"), ("peak_mb", "MB", ".0f")):
            v = sorted(r[key] for r in rs)
            cols.append(f"{format(float(np.median(v)), fmt)} {unit} ({format(v[0], fmt)}-{format(v[-1], fmt)})")
        print(f"  {'tpc' if what == 'tpc' else 'NumPy recursion'}: " + ", ".join(cols))


def yes_no(flag: bool | None) -> str:
    return "n/a" if flag is None else "yes" if flag else "no"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,4000", help="comma-separated numbers of inputs N")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (best kept)")
    parser.add_argument("--json", type=pathlib.Path, help="also write the figures to this JSON file")
    parser.add_argument("--cold", action="store_true",
                        help="time one NNGP+NTK float64 in fresh processes (tpc and NumPy), no warm-up")
    parser.add_argument("--cold-one", help=argparse.SUPPRESS)
    parser.add_argument("--tiled", type=int, default=None, metavar="N",
                        help="time the NNGP+NTK of N inputs by tiles on a local Dask cluster (tpc limit --out), "
                        "with the peak resident memory of all its processes, at each of --workers")
    parser.add_argument("--workers", default="1,2", help="with --tiled: comma-separated worker counts")
    parser.add_argument("--tile", type=int, default=2000, help="with --tiled: rows per tile")
    parser.add_argument("--check", type=int, default=4000,
                        help="with --tiled: first check tiled = in memory at this N (0: skip)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if args.tiled:
        tiled_runs(args.tiled, [int(w) for w in args.workers.split(",")], args.tile, args.check, args.json)
        return
    if args.cold_one:
        what, n = args.cold_one.split(":")
        print(json.dumps(cold(int(n), what)))
        return
    if args.cold:
        for n in sizes:
            cold_runs(n, args.repeats)
        return

    np_threads = _numpy_threads()
    print(f"tpc {tpc.__version__} | numpy {np.__version__} (BLAS threads: {np_threads}) | "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads) | "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus | "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '-')}")
    print(f"3-hidden-layer ReLU MLP NNGP and NTK, d={D}, best of {args.repeats} after a warm-up")

    verification = verify()
    print("verified tpc = numpy (float64 max |diff|): " + "; ".join(
        f"N={n}: nngp {r['nngp']:.1e}, ntk {r['ntk']:.1e}" for n, r in verification.items()) + "\n")

    widths = [max(len(h), 8) for h, _, _ in COLUMNS]
    print("  ".join(h.rjust(w) for (h, _, _), w in zip(COLUMNS, widths, strict=True)))
    rows = []
    for n in sizes:
        r = measure(n, args.repeats)
        rows.append(r)
        print("  ".join(format(r[key], fmt).rjust(w) for (_, key, fmt), w in zip(COLUMNS, widths, strict=True)),
              flush=True)

    print("\ntimes in s: tpc = tpc.loads + tpc.limit, numpy = the direct float64 recursion; "
          "+NTK = NNGP and NTK together; |diff| = float64 max |tpc - numpy| (nngp from the +NTK program)")
    methods = sorted({f"{k}: {m}" for r in rows for k, m in r["methods"].items()})
    print(f"tpc methods: {', '.join(methods)}")
    print("NNGP-only program float64 max |diff|: " + ", ".join(f"N={r['N']}: {r['max_abs_diff_nngp']:.1e}"
                                                             for r in rows)
          + "; float32 max |diff|: " + ", ".join(f"N={r['N']}: {r['max_abs_diff_nngp_float32']:.1e}" for r in rows))

    big = next((r for r in rows if r["N"] == 4000), None)
    under_1s_32 = None if big is None else big["tpc_ntk_float32_s"] < 1.0
    under_1s_64 = None if big is None else big["tpc_ntk_s"] < 1.0
    no_slower_nngp = all(r["tpc_nngp_s"] <= r["numpy_nngp_s"] for r in rows)
    no_slower_ntk = all(r["tpc_ntk_s"] <= r["numpy_ntk_s"] for r in rows)
    print(f"targets: NNGP+NTK at N=4000 under 1 s (float32 / float64): {yes_no(under_1s_32)} / {yes_no(under_1s_64)}")
    print(f"         tpc no slower than numpy (float64): NNGP {yes_no(no_slower_nngp)}; "
          f"NNGP+NTK {yes_no(no_slower_ntk)}")

    if args.json:
        meta = {"numpy": np.__version__, "numpy_threads": np_threads, "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(), "repeats": args.repeats, "d": D}
        targets = {"ntk_n4000_under_1s_float32": under_1s_32, "ntk_n4000_under_1s_float64": under_1s_64,
                   "tpc_no_slower_than_numpy_nngp": no_slower_nngp,
                   "tpc_no_slower_than_numpy_ntk": no_slower_ntk}
        payload = {"meta": meta, "verification": verification, "rows": rows, "targets": targets}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


def tiled_runs(n: int, workers: list[int], tile: int, check: int, out_json: pathlib.Path | None) -> None:
    """`tpc limit --out` on N inputs, timed per worker count, with the peak resident memory of the
    client and its workers together (sampled every 0.1 s); first, tiled = in memory where both fit."""
    import threading

    import psutil

    from tpc.tiles import plan, tiled_limit

    report: dict[str, Any] = {"N": n, "tile": tile, "runs": []}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TPC_TILE_DIR")) as tmp:
        base = pathlib.Path(tmp)
        if check:
            np.save(base / "X.npy", inputs(check))
            prog = tpc.loads(SOURCE_NTK, filename="bench.tp", base_dir=base)
            paths = tiled_limit(prog, base / "check", tile=min(tile, check // 3), workers=2)
            ref = numpy_kernels(inputs(check), ntk=True)
            diff = max(max_abs_diff(np.load(paths[k]), ref[k]) / np.abs(ref[k]).max() for k in ("nngp", "ntk"))
            report["check"] = {"N": check, "max_rel_diff_vs_numpy": diff}
            print(f"N = {check}: tiled (2 workers) against the NumPy recursion, max |diff| / max = {diff:.1e}")
            for p in paths.values():
                p.unlink()
        np.save(base / "X.npy", inputs(n))
        prog = tpc.loads(SOURCE_NTK, filename="bench.tp", base_dir=base)
        me = psutil.Process()
        for w in workers:
            p = plan(prog, tile)
            print(f"N = {n}, {w} worker(s): {p.describe(w)}", flush=True)
            peak = [0]
            stop = threading.Event()

            def sample(stop: threading.Event = stop, peak: list[int] = peak) -> None:
                while not stop.is_set():
                    total = 0
                    for proc in [me, *me.children(recursive=True)]:
                        try:
                            total += proc.memory_info().rss
                        except psutil.Error:
                            pass
                    peak[0] = max(peak[0], total)
                    time.sleep(0.1)

            thread = threading.Thread(target=sample, daemon=True)
            thread.start()
            start = time.perf_counter()
            paths = tiled_limit(prog, base / f"out{w}", tile=tile, workers=w)
            seconds = time.perf_counter() - start
            stop.set()
            thread.join()
            k = np.load(paths["ntk"], mmap_mode="r")
            finite = bool(np.isfinite(k[:: max(1, n // 97)]).all())
            run = {"workers": w, "seconds": seconds, "peak_rss_gb": peak[0] / 2**30, "tasks": len(p.tasks),
                   "disk_gb": p.out_bytes / 2**30, "sampled_rows_finite": finite}
            report["runs"].append(run)
            print(f"  {seconds:.1f} s, peak resident memory of all processes {peak[0] / 2**30:.2f} GB, "
                  f"{p.out_bytes / 2**30:.1f} GB on disk", flush=True)
            for path in paths.values():
                path.unlink()
    if out_json:
        out_json.write_text(json.dumps(report, indent=2) + "\n")


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
