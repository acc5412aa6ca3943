"""Benchmark `--device cuda` against the CPU in the same run: finite-width training at large width,
the NNGP and NTK of a 3-hidden-layer ReLU MLP on N inputs, and a feature-learning limit by particles.

    python benchmarks/gpu.py [--widths 4096,16384] [--seeds 8] [--sizes 5000,20000] [--json PATH]

Each case is timed once after an untimed warm-up at a small size (CUDA's start-up and kernel
compilation are not counted; the CPU gets the same warm-up). The CPU columns use every core torch
sees. The kernels are also computed by the direct NumPy recursion of benchmarks/kernels.py (the
obvious alternative), and the CUDA kernels are checked against the CPU ones. Peak memory: CUDA's
allocator peak for the GPU runs, the process's peak resident size for the CPU runs (it only grows,
so read the CPU figures in the order they run). Without CUDA it times the CPU alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import tpc

ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("kernels_bench", ROOT / "benchmarks" / "kernels.py")
kernels_bench = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(kernels_bench)  # type: ignore[union-attr]

TRAINING = ("programs/train/relu2_mup.tp", "programs/train/momentum_relu2_mup.tp")


def timed(fn: Callable[[], Any], device: str) -> tuple[float, float, Any]:
    """(seconds, peak GB, result) of one run; the GPU's queue is drained before the clock stops."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return time.perf_counter() - start, peak, result


def training(devices: list[str], widths: list[int], seeds: int) -> list[dict[str, Any]]:
    rows = []
    for path in TRAINING:
        net = tpc.load(ROOT / path)
        for device in devices:  # warm-up
            tpc.run(net, 64, 2, device=device)
        for width in widths:
            for device in devices:
                for dtype in (("float64", "float32") if device != "cpu" else ("float64",)):
                    secs, peak, _ = timed(lambda: tpc.run(net, width, seeds, device=device, dtype=dtype,  # noqa: B023
                                                          force=True), device)
                    rows.append({"case": f"train {pathlib.Path(path).stem}", "size": f"width {width} x {seeds} seeds",
                                 "device": device, "dtype": dtype, "seconds": secs, "peak_gb": peak})
                    print(rows[-1], flush=True)
    return rows


def kernels(devices: list[str], sizes: list[int]) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = pathlib.Path(tmp)
        for n in [200, *sizes]:
            np.save(base / "X.npy", kernels_bench.inputs(n))
            prog = tpc.loads(kernels_bench.SOURCE_NTK, filename="bench.tp", base_dir=base)
            got = {}
            for device in devices:
                for dtype in (("float64", "float32") if device != "cpu" else ("float64",)):
                    secs, peak, out = timed(lambda: tpc.limit(prog, dtype=dtype, device=device, force=True),  # noqa: B023
                                            device)
                    got[device, dtype] = out
                    if n > 200:
                        rows.append({"case": "NNGP+NTK, 3 ReLU layers", "size": f"N = {n}", "device": device,
                                     "dtype": dtype, "seconds": secs, "peak_gb": peak})
                        print(rows[-1], flush=True)
            secs, peak, ref = timed(lambda: kernels_bench.numpy_kernels(kernels_bench.inputs(n), ntk=True),  # noqa: B023
                                    "cpu")
            if n > 200:
                rows.append({"case": "NNGP+NTK, 3 ReLU layers", "size": f"N = {n}", "device": "cpu (NumPy recursion)",
                             "dtype": "float64", "seconds": secs, "peak_gb": peak})
                print(rows[-1], flush=True)
            for (device, dtype), out in got.items():
                scale = float(np.abs(ref["ntk"]).max())
                diff = max(float(np.abs(out[k].value - ref[k]).max()) for k in ("nngp", "ntk")) / scale
                limit = 1e-12 if dtype == "float64" else 1e-4
                if diff > limit:
                    raise SystemExit(f"{device} {dtype} at N = {n}: max |tpc - numpy| / max = {diff:.2e}")
            del got, ref
    return rows


def limit_by_particles(devices: list[str], particles: list[int]) -> list[dict[str, Any]]:
    rows = []
    net = tpc.load(ROOT / "programs/train/relu2_mup.tp")
    for device in devices:
        tpc.limit(net, particles=2**10, device=device)
    for m in particles:
        values = {}
        for device in devices:
            secs, peak, out = timed(lambda: tpc.limit(net, particles=m, device=device, force=True), device)  # noqa: B023
            values[device] = out
            rows.append({"case": "muP limit of relu2_mup.tp (4 replicates)", "size": f"{m} particles",
                         "device": device, "dtype": "float64", "seconds": secs, "peak_gb": peak})
            print(rows[-1], flush=True)
        first = next(iter(values.values()))
        for out in values.values():  # the same particles on every device
            for k in out:
                assert np.allclose(out[k].value, first[k].value, rtol=0, atol=1e-8), k
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", default="4096,16384")
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--sizes", default="5000,20000")
    ap.add_argument("--particles", default="65536,1048576")
    ap.add_argument("--skip", default="", help="comma-separated: training, kernels, particles")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    devices = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    print(info, flush=True)
    skip = set(args.skip.split(","))
    rows = []
    if "kernels" not in skip:
        rows += kernels(devices, [int(s) for s in args.sizes.split(",")])
    if "particles" not in skip:
        rows += limit_by_particles(devices, [int(s) for s in args.particles.split(",")])
    if "training" not in skip:
        rows += training(devices, [int(w) for w in args.widths.split(",")], args.seeds)
    print("\n| case | size | device | dtype | seconds | peak GB |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['size']} | {r['device']} | {r['dtype']} | {r['seconds']:.2f} | {r['peak_gb']:.2f} |")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"info": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
