"""TP4's Dynamical Dichotomy at laptop scale: the same 2-hidden-layer ReLU network and SGD run
(programs/train/relu2_{sp,ntk,mup}.tp) in the standard, NTK and maximal-update parametrizations,
at finite widths and in tpc's infinite-width limits.

- Feature movement (rms change of a last-hidden-layer coordinate over training) against width:
  it shrinks like n^-1/2 in SP and NTK (limit 0: the kernel regime) and stays order one in muP.
- Kernel change |K_T - K_0| / |K_0| of the last hidden layer's Gram matrix: zero in the SP/NTK
  limits, nonzero in the muP limit (the features are learned).
- muP test predictions approach tpc's muP limit as the width grows.

    python examples/dichotomy.py                  # widths 64-4096, 8 seeds: about a minute; out/dichotomy/
    python examples/dichotomy.py --quick          # widths 64-1024, 4 seeds: a few seconds
    python examples/dichotomy.py --update-docs    # rewrites docs/dichotomy.png (the README's plot)

Writes dichotomy.png and results.json to --out (default out/dichotomy/, which git ignores).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

import tpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))  # examples/options.py, also when imported from elsewhere
from options import add_output_options, fill_scale, output_paths  # noqa: E402 - found through the line above

PARAMS = ("sp", "ntk", "mup")
COLORS = {"sp": "tab:blue", "ntk": "tab:orange", "mup": "tab:green"}
# the README's scale, and --quick's (every value can still be set by its option)
FULL = {"widths": "64,256,1024,4096", "seeds": 8, "particles": 2**16, "replicates": 4}
QUICK = {"widths": "64,256,1024", "seeds": 4, "particles": 2**14, "replicates": 2}
QUICK_NOTE = "quick run (--quick): a small-scale check of the pipeline; its numbers are not the README's"


def kernel_change(k0: np.ndarray, kt: np.ndarray) -> np.ndarray:
    """|K_T - K_0|_F / |K_0|_F over the last two axes (one value per seed, or one for a limit)."""
    return np.linalg.norm(kt - k0, axis=(-2, -1)) / np.linalg.norm(k0, axis=(-2, -1))


def stderr(x: np.ndarray) -> float:
    return float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Without --update-docs nothing tracked by git is written.")
    ap.add_argument("--widths", help=f"comma-separated widths (default {FULL['widths']}; --quick: {QUICK['widths']})")
    ap.add_argument("--seeds", type=int, help=f"seeds per width (default {FULL['seeds']}; --quick: {QUICK['seeds']})")
    ap.add_argument("--particles", type=int, help="particles of the muP limit's Monte Carlo (default "
                    f"{FULL['particles']}; --quick: {QUICK['particles']})")
    ap.add_argument("--replicates", type=int, help="independent Monte Carlo replicates of the muP limit (default "
                    f"{FULL['replicates']}; --quick: {QUICK['replicates']})")
    ap.add_argument("--quick", action="store_true",
                    help="the same pipeline at a small scale (a few seconds); its numbers are not the README's")
    add_output_options(ap, "dichotomy", "dichotomy.png and results.json",
                       "the plot to docs/dichotomy.png")
    ap.add_argument("--json", metavar="FILE", help="also write the numbers to this file")
    return ap


def resolve(ap: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Fill the scale from --quick or the README's defaults; the plot's and results' paths."""
    fill_scale(ap, args, QUICK, FULL)
    if args.seeds < 1 or args.particles < 2 or args.replicates < 2 or min(args.width_list) < 1:
        ap.error("--seeds, --particles, --replicates and every width must be positive (the last two at least 2)")
    args.plot, stem = output_paths(args, "dichotomy", None)
    args.results = stem.with_suffix(".json") if stem else None
    return args


def run_width(net: tpc.Network, width: int, seeds: int, desc: str) -> dict:
    """tpc.run with a bar over seeds on stderr (its postfix: the SGD step of the current chunk)."""
    with tqdm(total=seeds, desc=desc, unit="seed", leave=False, file=sys.stderr) as bar:
        def step(done: int, total: int) -> None:
            bar.set_postfix_str(f"step {done}/{total}")

        return tpc.run(net, width, seeds, progress=bar.update, on_step=step)


def limit(net: tpc.Network, args: argparse.Namespace, desc: str) -> dict:
    """tpc.limit with a bar over its SGD steps (all replicates) on stderr."""
    learning = net.classification().regime == "feature learning"  # kernel-regime limits take no time
    with tqdm(desc=desc, unit="step", leave=False, file=sys.stderr, disable=not learning) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        return tpc.limit(net, particles=args.particles, replicates=args.replicates, progress=progress)


def main() -> None:
    ap = parser()
    args = resolve(ap, ap.parse_args())
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    widths = args.width_list
    if args.quick:
        print(QUICK_NOTE, flush=True)
    print(f"widths {', '.join(map(str, widths))}, {args.seeds} seeds each; muP limit by {args.particles} particles "
          f"x {args.replicates} replicates", flush=True)
    t_start = time.perf_counter()
    table: dict[str, dict] = {}
    for p in PARAMS:
        net = tpc.load(ROOT / "programs" / "train" / f"relu2_{p}.tp")
        cls = net.classification()
        t0 = time.perf_counter()
        lim = limit(net, args, f"{p} limit")
        row = {"r": cls.r, "regime": cls.regime, "limit_seconds": time.perf_counter() - t0,
               "limit_move": float(lim["move"].value.mean()),
               "limit_kernel_change": float(kernel_change(lim["kernel0"].value, lim["kernel"].value)),
               "limit_pred": np.asarray(lim["pred"].value).tolist(), "widths": []}
        for w in widths:
            res = run_width(net, w, args.seeds, f"{p} n = {w}")
            move = res["move"].values.mean(axis=1)  # per seed: mean over the training inputs
            kc = kernel_change(res["kernel0"].values, res["kernel"].values)
            pred_err = np.sqrt(np.mean((res["pred"].values - np.asarray(lim["pred"].value)) ** 2, axis=1))
            row["widths"].append({"width": w, "move": float(move.mean()), "move_se": stderr(move),
                                  "kernel_change": float(kc.mean()), "kernel_change_se": stderr(kc),
                                  "pred_rms_error": float(pred_err.mean())})
            print(f"{p:>4}  n = {w:>5}: feature movement {move.mean():.4f} ± {stderr(move):.4f}, kernel change "
                  f"{kc.mean():.4f}, test-prediction rms error vs limit {pred_err.mean():.4f}", flush=True)
        print(f"{p:>4}  limit ({cls.regime}, r = {cls.r:g}): feature movement {row['limit_move']:.4f}, "
              f"kernel change {row['limit_kernel_change']:.4f}  [{lim['move'].method}]", flush=True)
        table[p] = row
    numbers = json.dumps({"quick": args.quick, "seeds": args.seeds, "particles": args.particles,
                          "replicates": args.replicates, "seconds": time.perf_counter() - t_start, **table}, indent=1)
    for path in (args.results, args.json):
        if path:
            Path(path).write_text(numbers)
    plot(table, widths, args.plot, args.seeds, args.quick)
    print(f"plot written to {args.plot}" + (f", numbers to {args.results}" if args.results else "")
          + f" ({time.perf_counter() - t_start:.0f} s)")
    if args.quick:
        print(QUICK_NOTE)


def plot(table: dict, widths: list[int], out: Path, seeds: int, quick: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    w = np.asarray(widths, dtype=float)
    for p, row in table.items():
        c = COLORS[p]
        label = f"{p.upper() if p != 'mup' else 'muP'} ({row['regime']})"
        mv = [r["move"] for r in row["widths"]]
        axes[0].errorbar(w, mv, yerr=[r["move_se"] for r in row["widths"]], fmt="o-", color=c, label=label)
        if row["limit_move"] > 0:
            axes[0].axhline(row["limit_move"], color=c, ls="--", lw=1, label=f"{p} limit")
        kc = [r["kernel_change"] for r in row["widths"]]
        axes[1].errorbar(w, kc, yerr=[r["kernel_change_se"] for r in row["widths"]], fmt="o-", color=c, label=label)
        if row["limit_kernel_change"] > 0:
            axes[1].axhline(row["limit_kernel_change"], color=c, ls="--", lw=1, label=f"{p} limit")
        if p == "mup":
            err = [r["pred_rms_error"] for r in row["widths"]]
            axes[2].loglog(w, err, "o-", color=c, label="muP: rms error vs limit")
            first = row["widths"][0]["pred_rms_error"]
            axes[2].loglog(w, first * (w / w[0]) ** -0.5, "k:", label="n^-1/2")
    for ax, title in zip(axes[:2], ("feature movement (rms, last hidden layer)", "kernel change |K_T - K_0| / |K_0|"),
                         strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("width n")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    axes[2].set_xlabel("width n")
    axes[2].set_title("muP test predictions: distance to the muP limit", fontsize=10)
    axes[2].legend(fontsize=7)
    axes[2].grid(True, which="both", alpha=0.3)
    fig.suptitle(f"relu2 network, 3 SGD steps, {seeds} seeds per width: SP and NTK freeze features, muP learns them"
                 + (" (--quick: not the README's numbers)" if quick else ""))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
