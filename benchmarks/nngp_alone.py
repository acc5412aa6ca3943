"""The NNGP alone against the NNGP with the NTK, in the same run: what `output K = nngp(f, X)` costs
now (no backward pass, no layer's term) against what it cost before (every kernel term was built
and evaluated whatever the program asked for).

1. cnn: programs/arch/cnn_digits.tp (two 3 x 3 convolutions, NTK parametrization) on its 8 digits,
   by the per-position recursion (closed forms);
2. tied: a two-layer ReLU/tanh model that applies W and W.T (tied weights), which the recursion does
   not cover, so its kernels come from the lowered Netsor program by Monte Carlo (`--particles`).

Each figure is the best of `--repeats` calls of `tpc.limit`, after one warm-up call; the two nngp
values must agree to 1e-12 (the same particles).

    python benchmarks/nngp_alone.py [--particles 16384] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

import tpc

ROOT = Path(__file__).resolve().parent.parent / "programs"
TIED = """width n
parametrization ntk
data X = load("data/inputs8x3.csv")
layer U : input n x 3, var = 2
layer W : hidden n x n, var = 2
layer V : readout 1 x n
model f(x) = V @ (tanh(W @ relu(U @ x)) * relu(W.T @ relu(U @ x)))
output K = nngp(f, X)
"""


def best(fn, repeats: int) -> tuple[object, float]:  # noqa: ANN001
    fn()  # warm-up: imports, caches
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--particles", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"{os.cpu_count()} cpus | load average {os.getloadavg()[0]:.1f}")
    cnn = (ROOT / "arch" / "cnn_digits.tp").read_text()
    cases = {"cnn (recursion)": (cnn.replace("output ntk  = ntk(f, X)", ""), cnn, ROOT / "arch", {}),
             "tied (lowered program)": (TIED, TIED + "output T = ntk(f, X)\n", ROOT / "kernels",
                                        {"particles": args.particles, "replicates": 2})}
    for name, (alone_src, both_src, folder, options) in cases.items():
        alone = tpc.loads(alone_src, "alone.tp", folder)
        both = tpc.loads(both_src, "both.tp", folder)
        a, t_alone = best(lambda net=alone, o=options: tpc.limit(net, **o), args.repeats)
        b, t_both = best(lambda net=both, o=options: tpc.limit(net, **o), args.repeats)
        key = next(iter(a))  # the nngp output
        gap = float(np.max(np.abs(a[key].value - b[key].value)))
        assert gap <= 1e-12 * max(1.0, float(np.max(np.abs(b[key].value)))), gap
        print(f"{name}: nngp alone {t_alone:.2f} s, nngp and ntk {t_both:.2f} s "
              f"({t_both / t_alone:.1f}x); nngp equal to {gap:.1e}")


if __name__ == "__main__":
    main()
