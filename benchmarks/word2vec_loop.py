"""Time of word2vec's loop on the bundled corpus tiled `--repeat` times (no download): the exact muP
limit of `train cbow` (programs/word2vec/cbow_mup.tp) against the same loop written in the language
(cbow_loop_mup.tp, which also records each step's loss), and the stream read forwards against read
backwards (`S[T - 1 - t]`: Stream.at restarts from the generator state it saved every 16 batches)
and against the obvious alternative of re-drawing from the first batch, in one run. Also the
kernel-regime (NTK) limit: the Gram matrices at initialisation, after running the loop on tables of
one coordinate to check the batches it names, which a loop reading `S[t]` of its own `steps(S)`
skips.

    python benchmarks/word2vec_loop.py [--repeat 20] [--runs 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import tpc
from tpc.train import cbow
from tpc.train.limit import network_limit

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = ROOT / "programs" / "word2vec"


def best(fn: object, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=20, help="tile the 2000-token corpus this many times")
    ap.add_argument("--runs", type=int, default=3, help="best of this many runs")
    args = ap.parse_args()
    nets = {name: tpc.load(PROGRAMS / f"{name}.tp") for name in ("cbow_mup", "cbow_loop_mup")}
    for net in nets.values():
        net.data["T"] = np.tile(net.data["T"], args.repeat)
    steps = cbow.stream(nets["cbow_mup"]).steps
    print(f"{steps} steps of {nets['cbow_mup'].train.batch} positions, best of {args.runs}")
    for name, net in nets.items():
        print(f"  limit of {name + '.tp':<20} {best(lambda net=net: network_limit(net), args.runs):6.2f} s")

    kernel = {}
    for name, index in (("S[t]", "S[t]"), ("S[T - 1 - t]", f"S[{steps - 1} - t]")):
        src = (PROGRAMS / "cbow_loop_mup.tp").read_text().replace("parametrization mup", "parametrization ntk")
        src = src.replace("  record loss = L\n", "").replace("output curve = loss", "").replace("S[t]", index)
        net = tpc.loads(src, "cbow_loop_ntk", PROGRAMS)
        net.data["T"] = np.tile(net.data["T"], args.repeat)
        kernel[name] = best(lambda net=net: network_limit(net), args.runs)
    print(f"  NTK limit, loop reads S[t]         {kernel['S[t]']:6.2f} s (its own steps: no check run)")
    print(f"  NTK limit, loop reads S[T - 1 - t] {kernel['S[T - 1 - t]']:6.2f} s (the loop run on 1-coordinate tables)")

    def read(order: list[int], fresh: bool) -> None:
        s = cbow.stream(nets["cbow_mup"])
        for t in order:
            if fresh:  # no saved states: every step back draws again from batch 0
                s._cursor, s._points = (), s._points[:1]
            s.at(t)

    forwards, backwards = list(range(steps)), list(range(steps - 1, -1, -1))
    print(f"  stream read forwards        {best(lambda: read(forwards, False), args.runs):6.2f} s")
    print(f"  stream read backwards       {best(lambda: read(backwards, False), args.runs):6.2f} s")
    few = backwards[: min(200, steps)]  # the alternative is quadratic: 200 steps of it
    print(f"  backwards, 200 steps, saved states      {best(lambda: read(few, False), args.runs):6.3f} s")
    print(f"  backwards, 200 steps, from batch 0 each {best(lambda: read(few, True), args.runs):6.3f} s")


if __name__ == "__main__":
    main()
