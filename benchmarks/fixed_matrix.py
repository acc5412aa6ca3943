"""Cost of a fixed random matrix: programs/train/fixed_relu2_mup.tp (`matrix A : n x n ~ N(0, 2/n)`,
`f -= lr * grad(L, f)`) against the way to write it before fixed matrices existed, a layer that the
loop leaves alone (`layer A : hidden n x n, var = 2`, and one update per trained layer by name).
Both give the same numbers; the table shows the muP limit's time, its Gaussian vectors and memory
estimate, and the finite-width time at two widths, for each, in one run.

    python benchmarks/fixed_matrix.py [--widths 1024,4096] [--seeds 4] [--particles 65536]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import tpc
from tpc.train.pooled import count

PROGRAM = Path(__file__).resolve().parent.parent / "programs" / "train" / "fixed_relu2_mup.tp"


def as_layer(source: str) -> str:
    return (source.replace("matrix A : n x n ~ N(0, 2/n)", "layer A : hidden n x n, var = 2")
            .replace("f -= 0.5 * grad(L, f)", "U -= 0.5 * grad(L, U)\n  V -= 0.5 * grad(L, V)"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", default="1024,4096")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--particles", type=int, default=65536)
    args = ap.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    source = PROGRAM.read_text()
    nets = {"fixed matrix": tpc.loads(source, str(PROGRAM), PROGRAM.parent),
            "layer left alone": tpc.loads(as_layer(source), str(PROGRAM), PROGRAM.parent)}
    print(f"{'program':<18} {'limit s':>8} {'gaussians':>9} {'est MB':>7} "
          + " ".join(f"{'n=' + str(w) + ' s':>10}" for w in widths))
    preds = {}
    for name, net in nets.items():
        t0 = time.perf_counter()
        lim = tpc.limit(net, particles=args.particles)
        limit_s = time.perf_counter() - t0
        plan = count(net)
        finite = []
        for w in widths:
            t0 = time.perf_counter()
            out = tpc.run(net, w, args.seeds)
            finite.append(time.perf_counter() - t0)
        preds[name] = (out["pred"].values, np.asarray(lim["pred"].value))
        print(f"{name:<18} {limit_s:>8.2f} {plan.gaussians:>9} {plan.memory_bytes(args.particles) / 2**20:>7.0f} "
              + " ".join(f"{s:>10.2f}" for s in finite))
    (fa, la), (fb, lb) = preds.values()
    print(f"finite pred at n={widths[-1]}: largest difference {np.abs(fa - fb).max():.1e} (same draws); "
          f"limits differ by {np.abs(la - lb).max():.4f} (Monte Carlo)")


if __name__ == "__main__":
    main()
