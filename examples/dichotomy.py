"""TP4's Dynamical Dichotomy at laptop scale: the same 2-hidden-layer ReLU network and SGD run
(programs/train/relu2_{sp,ntk,mup}.tp) in the standard, NTK and maximal-update parametrizations.

- Feature movement (rms change of a last-hidden-layer coordinate over training) against width:
  it shrinks like n^-1/2 in SP and NTK (limit 0: the kernel regime) and stays order one in muP.
- Kernel change |K_T - K_0| / |K_0| of the last hidden layer's Gram matrix: zero in the SP/NTK
  limits, nonzero in the muP limit (the features are learned).
- muP test predictions approach tpc's muP limit as the width grows.

    python examples/dichotomy.py [--widths 64,256,1024,4096] [--seeds 8] [--out docs/dichotomy.png]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import tpc

ROOT = Path(__file__).resolve().parent.parent
PARAMS = ("sp", "ntk", "mup")
COLORS = {"sp": "tab:blue", "ntk": "tab:orange", "mup": "tab:green"}


def kernel_change(k0: np.ndarray, kt: np.ndarray) -> np.ndarray:
    """|K_T - K_0|_F / |K_0|_F over the last two axes (one value per seed, or one for a limit)."""
    return np.linalg.norm(kt - k0, axis=(-2, -1)) / np.linalg.norm(k0, axis=(-2, -1))


def stderr(x: np.ndarray) -> float:
    return float(x.std(ddof=1) / np.sqrt(len(x)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="64,256,1024,4096")
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "docs" / "dichotomy.png"))
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    table: dict[str, dict] = {}
    for p in PARAMS:
        net = tpc.load(ROOT / "programs" / "train" / f"relu2_{p}.tp")
        cls = net.classification()
        t0 = time.perf_counter()
        lim = tpc.limit(net)
        row = {"r": cls.r, "regime": cls.regime, "limit_seconds": time.perf_counter() - t0,
               "limit_move": float(lim["move"].value.mean()),
               "limit_kernel_change": float(kernel_change(lim["kernel0"].value, lim["kernel"].value)),
               "limit_pred": np.asarray(lim["pred"].value).tolist(), "widths": []}
        for w in widths:
            res = tpc.run(net, w, args.seeds)
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
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))
    plot(table, widths, args.out, args.seeds)
    print(f"plot written to {args.out}")


def plot(table: dict, widths: list[int], out: str, seeds: int) -> None:
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
    fig.suptitle(f"relu2 network, 3 SGD steps, {seeds} seeds per width: SP and NTK freeze features, muP learns them")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
