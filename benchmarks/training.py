"""Time and memory of training: the muP limit of programs/train/relu2_mup.tp against the number
of SGD steps, and direct finite-width training of the same program at large widths, in one run.

Each measurement runs in its own process, so that its peak resident memory is its own. The
number of steps is written into the program's text before it is built (a `train` statement
becomes a loop when the program is built). `--tpc DIR` (repeatable) measures the tpc of another
checkout, e.g. an older commit cloned elsewhere, beside this one's, in the same run.

    python benchmarks/training.py [--steps 1,2,5,10,20] [--widths 1024,4096,16384]
                                  [--particles 65536] [--replicates 4] [--tpc DIR ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
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

    try:
        from tpc.train.pooled import count as plan
    except ImportError:  # a checkout from before training ran as loops
        from tpc.train.unroll import plan

    source, found = re.subn(r"\bsteps = \d+", f"steps = {steps}", PROGRAM.read_text(), count=1)
    assert found, f"no `steps = N` in {PROGRAM}"
    net = tpc.loads(source, str(PROGRAM), PROGRAM.parent)
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


def measure(kind: str, value: int, steps: int, args: argparse.Namespace, checkout: str) -> dict:
    cmd = [sys.executable, __file__, "--one", f"{kind}:{value}:{steps}", "--particles", str(args.particles),
           "--replicates", str(args.replicates)]
    env = dict(os.environ, PYTHONPATH=checkout)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "tpc": checkout}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default="1,2,5,10,20")
    ap.add_argument("--widths", default="1024,4096,16384")
    ap.add_argument("--finite-steps", default="1,20", help="steps for the finite-width runs")
    ap.add_argument("--particles", type=int, default=2**16)
    ap.add_argument("--replicates", type=int, default=4)
    ap.add_argument("--tpc", action="append", metavar="DIR",
                    help="a checkout whose tpc to measure (repeatable; default: this one)")
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
    for checkout in args.tpc or [str(ROOT)]:
        if args.tpc:
            print(f"tpc from {checkout}")
        print(f"{'what':>18} {'steps':>6} {'seconds':>9} {'peak MB':>9} {'Gaussians':>10} {'plan MB':>8}")
        part = []
        for s in [int(x) for x in args.steps.split(",")]:
            r = measure("limit", 0, s, args, checkout)
            part.append(r)
            print(f"{'limit':>18} {s:>6} {r['seconds']:>9.2f} {r['peak_mb']:>9.0f} {r['gaussians']:>10} "
                  f"{r['estimate_mb']:>8.0f}", flush=True)
        for w in [int(x) for x in args.widths.split(",")]:
            for s in [int(x) for x in args.finite_steps.split(",")]:
                r = measure("finite", w, s, args, checkout)
                part.append(r)
                print(f"{'finite n=' + str(w):>18} {s:>6} {r['seconds']:>9.2f} {r['peak_mb']:>9.0f}", flush=True)
        lim = [r for r in part if r["kind"] == "limit"]
        if len(lim) >= 2:
            import numpy as np

            x = np.log([r["steps"] for r in lim])
            y = np.log([r["seconds"] for r in lim])
            print(f"limit time grows like steps^{np.polyfit(x[-3:], y[-3:], 1)[0]:.2f} over the last three step "
                  "counts")
        rows += part
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
