"""Time and memory of Adam (programs/train/adam_relu2_mup.tp): finite-width training by tpc against
the same training written with torch.optim.Adam (one parameter group per layer, muP's rates and eps
n^-s, on the same initial weights), and the infinite-width limit against its number of particles
(each n x n layer's Adam updates are P x P grids of particles, so the cost grows like P^2).

Each measurement runs in its own process, so that its peak resident memory is its own.

    python benchmarks/adam.py [--widths 1024,2048,4096] [--seeds 4] [--particles 1024,2048,4096]
                              [--replicates 2] [--json out.json]
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
PROGRAM = ROOT / "programs" / "train" / "adam_relu2_mup.tp"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def torch_adam(width: int, seeds: int) -> tuple[float, object]:
    """The program's training by torch.optim.Adam on tpc's initial weights, seed by seed: the
    obvious alternative. Returns (seconds, predictions (seeds, points))."""
    import numpy as np
    import torch

    import tpc
    from tpc.train.finite import standard_normals

    net = tpc.load(PROGRAM)
    names = ["U", "W", "V"]
    normals = standard_normals(net, width, list(range(seeds)), torch.float64, "cpu")
    X, Y, Xt = (torch.tensor(net.data[d], dtype=torch.float64) for d in ("X", "Y", "Xt"))  # noqa: N806
    cp = net.abc.adaptive_exponents()
    preds = []
    start = time.perf_counter()
    for s in range(seeds):
        w, groups = {}, []
        for k in names:
            la = net.layers[k]
            a, b = net.ab(la)
            w[k] = (normals[k][s] * np.sqrt(la.var / la.fan_in) * width ** (-b)).clone().requires_grad_(True)
            natural = a + (la.role != "readout")  # the program's eps is at the gradient's natural scale
            groups.append({"params": [w[k]], "lr": 0.05 * width ** (-cp[la.index]), "eps": 1e-3 * width ** (-natural)})
        opt = torch.optim.Adam(groups, betas=(0.9, 0.99))

        def model(x: torch.Tensor, w: dict = w) -> torch.Tensor:
            mult = {k: width ** (-net.ab(net.layers[k])[0]) for k in names}
            h = torch.relu(x @ (mult["U"] * w["U"]).T)
            return torch.relu(h @ (mult["W"] * w["W"]).T) @ (mult["V"] * w["V"]).T

        for _ in range(4):
            opt.zero_grad()
            loss = 0.5 * ((model(X)[:, 0] - Y.reshape(-1)) ** 2).mean()
            loss.backward()
            opt.step()
        with torch.no_grad():
            preds.append(model(Xt)[:, 0].numpy())
    return time.perf_counter() - start, np.array(preds)


def one(kind: str, value: int, seeds: int, replicates: int) -> dict:
    import numpy as np

    import tpc

    net = tpc.load(PROGRAM)
    if kind == "tpc run":
        start = time.perf_counter()
        res = tpc.run(net, value, seeds)
        seconds = time.perf_counter() - start
        _, ref = torch_adam(value, seeds)
        diff = float(np.abs(res["pred"].values - ref).max())
        return {"seconds": seconds, "max |tpc - torch.optim|": diff}
    if kind == "torch.optim.Adam":
        seconds, _ = torch_adam(value, seeds)
        return {"seconds": seconds}
    start = time.perf_counter()
    lim = tpc.limit(net, particles=value, replicates=replicates)
    return {"seconds": time.perf_counter() - start, "pred": [round(float(v), 4) for v in lim["pred"].value],
            "stderr": [round(float(v), 4) for v in lim["pred"].stderr]}


def measure(kind: str, value: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--one", json.dumps([kind, value, args.seeds, args.replicates])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", default="1024,2048,4096", help="widths of the finite runs")
    ap.add_argument("--seeds", type=int, default=4, help="seeds of each finite run")
    ap.add_argument("--particles", default="1024,2048,4096", help="particles of the limit")
    ap.add_argument("--replicates", type=int, default=2, help="replicates of the limit")
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        kind, value, seeds, replicates = json.loads(args.one)
        row = one(kind, value, seeds, replicates)
        row["peak MB"] = round(peak_rss_mb())
        print(json.dumps(row))
        return
    rows = []
    print(f"{PROGRAM.relative_to(ROOT)}: 4 Adam steps on 4 points, {args.seeds} seeds per width", flush=True)
    for w in map(int, args.widths.split(",")):
        for kind in ("tpc run", "torch.optim.Adam"):
            row = {"kind": kind, "width": w, **measure(kind, w, args)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    for p in map(int, args.particles.split(",")):
        row = {"kind": "tpc limit", "particles": p, "replicates": args.replicates, **measure("tpc limit", p, args)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
