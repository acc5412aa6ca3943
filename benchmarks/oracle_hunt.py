"""Statistical oracles on random programs (the generator of tests/fuzzing.py): a hunt for wrong
limits, not a test, because a flag can be a false alarm (slow convergence, a rough standard error).

- `--mode finite` (Netsor programs; `--loops` for programs trained by loops): the mean of
  `tpc run` at `--width` over 8 seeds against `tpc limit`; a flag where they differ by more than
  6 standard errors plus 3% (5% for loops) of the value.
- `--mode exact-mc`: programs made linear (their nonlinearities dropped), whose limit is exact,
  against the same limit by `--method monte-carlo` (2^14 particles, 4 replicates); a flag beyond 8
  standard errors plus 1e-3 of the value.

Each flag prints the program; rerun it at larger widths (or more particles and replicates) to
tell a bug from noise.

    python benchmarks/oracle_hunt.py --mode finite --seconds 300 [--seed 0] [--width 2048] [--loops]
    python benchmarks/oracle_hunt.py --mode exact-mc --seconds 240 [--seed 0]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import tpc  # noqa: E402
from tests.fuzzing import (  # noqa: E402
    Harness,
    RandomChooser,
    StageTimeout,
    loop_program,
    netsor_program,
    raw_loop_program,
    time_limit,
)
from tpc.errors import TpcError  # noqa: E402

# a call of a coordinatewise function or of a program's nonlin: dropped to make a program linear
NONLINEAR = re.compile(r"\b(relu|tanh|gelu|sigmoid|softplus|sin|cos|erf|square|abs|exp|step|swish|silu|elu|"
                       r"leaky_relu|nl\d+)\(")


def draw(c: RandomChooser, mode: str, loops: bool) -> tuple[str, str]:
    if mode == "exact-mc":
        kind = c.choice(["raw", "loops", "netsor"])
    else:  # a raw Netsor program trained by a loop 2 times in 5
        kind = ("raw" if c.chance(0.4) else "loops") if loops else "netsor"
    source = {"raw": raw_loop_program, "loops": loop_program, "netsor": netsor_program}[kind](c)
    return kind, NONLINEAR.sub("(", source) if mode == "exact-mc" else source


def flags(mode: str, loops: bool, prog: object, width: int) -> list[tuple]:
    """(output, what, value, reference, standard error) where the oracle fails."""
    if mode == "finite":
        test = tpc.run(prog, width, 8, force=True)
        ref = tpc.limit(prog, particles=8192, replicates=4, force=True) if loops else tpc.limit(prog, force=True)
        rel = 0.05 if loops else 0.03
        pairs = [(k, test[k].mean, test[k].stderr, ref[k]) for k in test if k in ref]
        spread, allowance = 6, lambda v: rel * (1 + np.abs(v))
    else:
        ref = tpc.limit(prog, method="exact", force=True)
        test = tpc.limit(prog, method="monte-carlo", particles=2**14, replicates=4, force=True)
        pairs = [(k, test[k].value, test[k].stderr, ref[k]) for k in ref if k in test]
        spread, allowance = 8, lambda v: 1e-3 * (1 + np.abs(v))
    out = []
    for name, value, stderr, limit in pairs:
        a = np.asarray(value, dtype=float)
        b = np.asarray(limit.value, dtype=float)
        se = np.asarray(0.0 if stderr is None else stderr, dtype=float) ** 2
        if limit.stderr is not None:
            se = se + np.asarray(limit.stderr, dtype=float) ** 2
        if a.shape != b.shape or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
            continue
        excess = np.abs(a - b) - (spread * np.sqrt(se) + allowance(b))
        if np.any(excess > 0):
            j = np.unravel_index(np.argmax(excess), a.shape) if a.ndim else ()
            out.append((name, limit.method, float(a[j]), float(b[j]), float(np.sqrt(np.broadcast_to(se, a.shape)[j]))))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["finite", "exact-mc"], default="finite")
    p.add_argument("--seconds", type=float, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=2048, help="of the finite runs (--mode finite)")
    p.add_argument("--loops", action="store_true", help="programs trained by loops (--mode finite)")
    p.add_argument("--only", default="", help="compare only programs whose text contains this (e.g. '.T @')")
    args = p.parse_args(argv)
    counts: Counter = Counter()
    start, i = time.monotonic(), 0
    with Harness(timeout=40.0) as h:
        while time.monotonic() - start < args.seconds:
            c = RandomChooser(args.seed + i)
            i += 1
            kind, source = draw(c, args.mode, args.loops)
            if args.only not in source:
                counts["skipped (--only)"] += 1
                continue
            try:
                with time_limit(h.timeout):
                    found = flags(args.mode, args.loops, h.load(source), args.width)
            except (TpcError, StageTimeout):
                counts["refused or slow"] += 1
                continue
            counts[f"compared {kind}"] += 1
            if found:
                counts["flagged"] += 1
                print(f"=== flag (seed {args.seed + i - 1}, {kind}): (output, method, value, reference, "
                      f"standard error) {found}\n{source}", flush=True)
    print(f"{i} programs: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
