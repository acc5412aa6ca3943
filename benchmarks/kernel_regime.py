"""Two costs of the kernel regime's limit, each against the obvious alternative in the same run.

1. Carrying the kernels' Monte Carlo error into trained outputs: programs/train/named_values_mup.tp
   in NTK with a 200-step loop (its kernels have no closed form). The kernels (8 replicates of
   particles), the training from their mean, and the training from each replicate: all replicates
   in one run (what tpc does) against one run each.
2. Random features (fixed U and A, the readout trained, muP): the limit in function space (what tpc
   limit does, exact) against the unrolled program's Monte Carlo (what it did), with the largest
   distance between the two in standard errors of the latter.

    python benchmarks/kernel_regime.py [--steps 200] [--particles 65536]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import tpc
from tpc.train.kernel import layer_kernels
from tpc.train.kernel_loops import _replicate_means, _train, affine_in_f0
from tpc.train.pooled import loops_limit

ROOT = Path(__file__).resolve().parent.parent / "programs" / "train"


def clock(fn):  # noqa: ANN001, ANN201
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--particles", type=int, default=65536)
    args = ap.parse_args()

    named = (ROOT / "named_values_mup.tp").read_text().replace("parametrization mup", "parametrization ntk")
    net = tpc.loads(named.replace("range(4)", f"range({args.steps})"), "named_values_ntk", ROOT)
    K, t_kernels = clock(lambda: layer_kernels(  # noqa: N806
        net, net.point_sets(), particles=args.particles, replicates=8, keep_replicates=True))
    exact = affine_in_f0(net)
    _, t_main = clock(lambda: _train(net, K, [K.theta], [K.nngp], exact, 2**14, 0))
    _, t_together = clock(lambda: _replicate_means(net, K, exact, 2**14, 0))
    _, t_alone = clock(lambda: [_train(net, K, [t], [n], exact, 2**14, 0) for t, n in K.replicas])
    print(f"1. named_values_mup.tp in NTK, {args.steps} steps, {len(K.replicas)} replicates of "
          f"{args.particles} particles")
    print(f"   kernels {t_kernels:.2f} s; training from their mean {t_main:.2f} s; from every replicate: "
          f"in one run {t_together:.2f} s, one run each {t_alone:.2f} s")

    fixed = (ROOT / "fixed_relu2_mup.tp").read_text()
    rf = tpc.loads(fixed.replace("layer U : input n x 3, var = 2", "matrix U : n x 3 ~ N(0, 2/3)"), "rf", ROOT)
    exact_lim, t_fs = clock(lambda: tpc.limit(rf))
    mc, t_mc = clock(lambda: loops_limit(rf, False, args.particles, 4, 0, None, False, None))
    z = max(float(np.max(np.abs(mc[k].value - exact_lim[k].value) / np.asarray(mc[k].stderr)))
            for k in ("pred", "curve"))
    print("2. random features (fixed U, A; readout trained), muP, 4 steps")
    print(f"   function space (exact) {t_fs:.2f} s; unrolled Monte Carlo ({args.particles} particles x 4) "
          f"{t_mc:.2f} s, at most {z:.1f} of its standard errors from the exact values")


if __name__ == "__main__":
    main()
