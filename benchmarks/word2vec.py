"""Time per epoch and memory of word2vec training: tpc's exact muP limit of
examples/word2vec/word2vec_mup.tp against finite widths (256, 1024 and the limit's basis size), and
gensim's Word2Vec at the same widths, in one run.

The limit is the same step as a finite run on tables whose width is the basis size (one initial
Gaussian vector per word), so the goal is: limit time and memory <= a finite run at that width.
Each measurement runs one epoch in its own process, so that its peak resident memory is its own.
Needs the example's data (run examples/word2vec/word2vec.py once, or pass --prepare).

    python benchmarks/word2vec.py [--widths 256,1024,5000] [--threads 1,2] [--dtype float32] [--json out.json]
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
EXAMPLE = ROOT / "examples" / "word2vec"
PROGRAM = EXAMPLE / "word2vec_mup.tp"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def one(kind: str, width: int, threads: int, dtype: str) -> dict:
    import numpy as np
    import torch

    import tpc
    from tpc.train import cbow

    torch.set_num_threads(threads)
    net = tpc.load(PROGRAM)
    net.train.cbow.epochs = 1
    base = peak_rss_mb()
    t0 = time.perf_counter()
    if kind == "gensim":
        sys.path.insert(0, str(EXAMPLE))
        from word2vec import gensim_model  # the example's anchor, same settings

        model, sentences = gensim_model(net, [str(t) for t in cbow.tokens_of(net)], width, 1, workers=threads)
        t0 = time.perf_counter()  # time the epoch, not the vocabulary
        model.train(sentences, total_examples=len(sentences), epochs=1)
        steps = 0
    else:
        dt = {"float32": torch.float32, "float64": torch.float64}[dtype]
        if kind == "limit":
            u, v = cbow.limit_tables(net, dt)
            width, factors = u.shape[1], cbow.Factors.limit(net)
        else:
            u, v = cbow.finite_tables(net, width, 0, dt)
            factors = cbow.Factors.finite(net, width)
        with torch.no_grad():
            cbow.train(net, u, v, factors)
        steps = cbow.stream(net).steps
        assert np.isfinite(float(u.sum()))
    seconds = time.perf_counter() - t0
    return {"kind": kind, "width": width, "threads": threads, "dtype": dtype, "steps": steps,
            "seconds_per_epoch": seconds, "peak_mb": peak_rss_mb(), "baseline_mb": base}


def measure(kind: str, width: int, threads: int, dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--one", f"{kind}:{width}:{threads}:{dtype}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", default="256,1024,5000")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--no-gensim", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        kind, width, threads, dtype = args.one.split(":")
        print(json.dumps(one(kind, int(width), int(threads), dtype)))
        return
    if not (EXAMPLE / "data" / "tokens.npy").exists():
        sys.exit("no data: run `python examples/word2vec/word2vec.py` once (it writes examples/word2vec/data/)")
    rows = []
    print(f"{'run':>22} {'threads':>7} {'s/epoch':>9} {'peak MB':>8}")
    for threads in (int(t) for t in args.threads.split(",")):
        runs = [("limit", 0)] + [("finite", int(w)) for w in args.widths.split(",")]
        runs += [] if args.no_gensim else [("gensim", int(w)) for w in args.widths.split(",")]
        for kind, width in runs:
            r = measure(kind, width, threads, args.dtype)
            rows.append(r)
            name = "tpc muP limit (exact)" if kind == "limit" else f"{'tpc' if kind == 'finite' else kind} n={width}"
            print(f"{name:>22} {threads:>7} {r['seconds_per_epoch']:>9.1f} {r['peak_mb']:>8.0f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
