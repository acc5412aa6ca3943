"""Time and memory of training: the muP limit of programs/train/relu2_mup.tp against the number
of SGD steps, and direct finite-width training of the same program at large widths, in one run.

Each measurement runs in its own process, so that its peak resident memory is its own.

    python benchmarks/training.py [--steps 1,2,5,10,20] [--widths 1024,4096,16384]
                                  [--particles 65536] [--replicates 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = ROOT / "programs" / "train" / "relu2_mup.tp"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def one(kind: str, value: int, steps: int, particles: int, replicates: int) -> dict:
    import tpc
    from tpc.train.unroll import plan

    net = tpc.load(PROGRAM)
    net.train.steps = steps
    base = peak_rss_mb()
    t0 = time.perf_counter()
    if kind == "limit":
        out = tpc.limit(net, particles=particles, replicates=replicates)
        p = plan(net)
        extra = {"gaussians": p.gaussians, "estimate_mb": p.memory_bytes(particles) / 2**20,
                 "pred_stderr": float(max(out["pred"].stderr))}
    else:
        tpc.run(net, value, 1)
        extra = {}
    seconds = time.perf_counter() - t0
    return {"kind": kind, "value": value, "steps": steps, "seconds": seconds,
            "peak_mb": peak_rss_mb(), "baseline_mb": base, **extra}


def measure(kind: str, value: int, steps: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--one", f"{kind}:{value}:{steps}", "--particles", str(args.particles),
           "--replicates", str(args.replicates)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default="1,2,5,10,20")
    ap.add_argument("--widths", default="1024,4096,16384")
    ap.add_argument("--finite-steps", default="1,20", help="steps for the finite-width runs")
    ap.add_argument("--particles", type=int, default=2**16)
    ap.add_argument("--replicates", type=int, default=4)
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        kind, value, steps = args.one.split(":")
        print(json.dumps(one(kind, int(value), int(steps), args.particles, args.replicates)))
        return
    rows = []
    print(f"{PROGRAM.relative_to(ROOT)}: muP limit ({args.particles} particles x {args.replicates} replicates, "
          "float64) and direct finite-width SGD (1 seed, float64)")
    print(f"{'what':>18} {'steps':>6} {'seconds':>9} {'peak MB':>9} {'Gaussians':>10} {'plan MB':>8}")
    for s in [int(x) for x in args.steps.split(",")]:
        r = measure("limit", 0, s, args)
        rows.append(r)
        print(f"{'limit':>18} {s:>6} {r['seconds']:>9.2f} {r['peak_mb']:>9.0f} {r['gaussians']:>10} "
              f"{r['estimate_mb']:>8.0f}", flush=True)
    for w in [int(x) for x in args.widths.split(",")]:
        for s in [int(x) for x in args.finite_steps.split(",")]:
            r = measure("finite", w, s, args)
            rows.append(r)
            print(f"{'finite n=' + str(w):>18} {s:>6} {r['seconds']:>9.2f} {r['peak_mb']:>9.0f}", flush=True)
    lim = [r for r in rows if r["kind"] == "limit"]
    if len(lim) >= 2:
        import numpy as np

        x = np.log([r["steps"] for r in lim])
        y = np.log([r["seconds"] for r in lim])
        print(f"limit time grows like steps^{np.polyfit(x[-3:], y[-3:], 1)[0]:.2f} over the last three step counts")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
