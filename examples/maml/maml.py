"""TP4's few-shot experiment at laptop scale: first-order MAML, 5-way 1-shot, on scikit-learn's
bundled digits (8x8, 10 classes), at finite widths and in the infinite-width limits tpc computes.

Split: meta-training on classes 0-4, meta-testing on classes 5-9. A task draws one support image
per class and `--query` query images per class, with the 5 classes in a random order (its labels).
Models (examples/maml/*.tp): TP4's 1-hidden-layer linear network in muP (finite widths and its
exact limit), and the kernel baselines, a 1-hidden-layer ReLU network in NTK parametrization and
in SP with lr n^-1 (only the readout trains: the GP/NNGP kernel), by their kernel-regime limits;
beyond TP4, the same ReLU network in muP (finite widths, and its limit by particles: Monte Carlo
over the 69 Gaussians of the input layer and the readout, with standard errors across replicates).

    pip install ".[examples]"
    python examples/maml/maml.py [--widths 2,8,32,128,512,2048] [--seeds 4] [--steps 100]

Writes examples/maml/data/*.npy, examples/maml/results.json and docs/maml.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import tpc

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
WAYS = 5


def make_tasks(args: argparse.Namespace) -> None:
    """Pools and tasks as .npy files under data/ (the programs load them)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.data / 16.0
    x = x - x.mean(axis=0)
    x = x / np.sqrt((x**2).mean(axis=1, keepdims=True))  # every image at unit mean square
    rng = np.random.default_rng(args.data_seed)
    out = HERE / "data"
    out.mkdir(exist_ok=True)
    splits = (("train", range(0, 5), args.steps * args.tasks), ("test", range(5, 10), args.test_tasks))
    for split, classes, count in splits:
        idx = np.flatnonzero(np.isin(digits.target, list(classes)))
        pool, target = x[idx], digits.target[idx]
        by_class = {c: np.flatnonzero(target == c) for c in classes}
        support, support_y, query, query_y = [], [], [], []
        for _ in range(count):
            order = rng.permutation(list(classes))  # class order[j] gets label j
            s, sy, q, qy = [], [], [], []
            for label, c in enumerate(order):
                rows = rng.choice(by_class[c], 1 + args.query, replace=False)
                s.append(rows[0])
                sy.append(label)
                q += list(rows[1:])
                qy += [label] * args.query
            support.append(s)
            support_y.append(sy)
            query.append(q)
            query_y.append(qy)
        np.save(out / f"{split}_pool.npy", pool)
        for name, arr in (("support", support), ("support_y", support_y), ("query", query), ("query_y", query_y)):
            np.save(out / f"{split}_{name}.npy", np.asarray(arr, dtype=np.float64))


def load(name: str, args: argparse.Namespace) -> tpc.Network:
    net = tpc.load(HERE / f"maml_{name}.tp")
    net.train.steps, net.train.batch = args.steps, args.tasks
    net.train.lr, net.train.inner_lr = args.lr, args.inner_lr
    return net


def accuracy(pred: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean accuracy per task: pred (..., T, Q, 5), labels (T, Q) -> (..., T)."""
    return (pred.argmax(-1) == labels).mean(-1)


def interval(acc: np.ndarray) -> tuple[float, float]:
    """Mean and 95% half-width over the last axis (tasks), averaged over leading axes (seeds)."""
    per_task = acc.reshape(-1, acc.shape[-1]).mean(0)
    return float(per_task.mean()), float(1.96 * per_task.std(ddof=1) / np.sqrt(per_task.size))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="2,8,32,128,512,2048")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=100, help="meta-steps")
    ap.add_argument("--tasks", type=int, default=4, help="tasks per meta-step")
    ap.add_argument("--test-tasks", type=int, default=200)
    ap.add_argument("--query", type=int, default=5, help="query images per class")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--inner-lr", type=float, default=0.5)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "docs" / "maml.png"))
    args = ap.parse_args()
    make_tasks(args)
    labels = np.load(HERE / "data" / "test_query_y.npy")
    rows: list[dict] = []

    def report(what: str, width: object, acc: np.ndarray, seconds: float) -> None:
        mean, half = interval(acc)
        rows.append({"model": what, "width": width, "accuracy": mean, "ci95": half, "seconds": seconds})
        print(f"{what:>22}  {str(width):>6}  {100 * mean:6.2f} % ± {100 * half:4.2f}   ({seconds:.1f} s)", flush=True)

    print(f"5-way 1-shot first-order MAML on digits: {args.steps} meta-steps x {args.tasks} tasks, "
          f"{args.test_tasks} test tasks, {args.seeds} seeds per width")
    print(f"{'model':>22}  {'width':>6}  test accuracy (95% interval over tasks)")
    for name, what in (("linear_mup", "linear muP"), ("relu_mup", "ReLU muP")):
        net = load(name, args)
        for w in [int(x) for x in args.widths.split(",")]:
            t0 = time.perf_counter()
            res = tpc.run(net, w, args.seeds)
            report(what, w, accuracy(res["test"].values, labels), time.perf_counter() - t0)
    for name, what in (("linear_mup", "linear muP"), ("relu_mup", "ReLU muP"), ("relu_ntk", "ReLU NTK"),
                       ("relu_gp", "ReLU GP (SP)")):
        t0 = time.perf_counter()
        lim = tpc.limit(load(name, args))["test"]
        pred = lim.samples if lim.samples is not None else lim.value
        report(f"{what} limit [{lim.method}]", "inf", accuracy(pred, labels), time.perf_counter() - t0)
    (HERE / "results.json").write_text(json.dumps(rows, indent=1))
    plot(rows, args)
    print(f"plot written to {args.out}")


def plot(rows: list[dict], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    styles = {"linear muP": ("tab:green", "--"), "ReLU muP": ("tab:red", "--"), "ReLU NTK": ("tab:orange", ":"),
              "ReLU GP": ("tab:blue", "-.")}
    for model, marker in (("linear muP", "o-"), ("ReLU muP", "s-")):
        fin = [r for r in rows if r["width"] != "inf" and r["model"] == model]
        ax.errorbar([r["width"] for r in fin], [100 * r["accuracy"] for r in fin],
                    yerr=[100 * r["ci95"] for r in fin], fmt=marker, color=styles[model][0],
                    label=f"{model}, finite width")
    for r in rows:
        if r["width"] == "inf":
            key = next(k for k in styles if r["model"].startswith(k))
            color, ls = styles[key]
            ax.axhline(100 * r["accuracy"], color=color, ls=ls, label=f"{r['model']}: {100 * r['accuracy']:.1f} %")
    ax.axhline(100 / WAYS, color="gray", lw=0.8, label="chance (20 %)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("width n")
    ax.set_ylabel("meta-test accuracy (%)")
    ax.set_title(f"5-way 1-shot first-order MAML on digits ({args.test_tasks} test tasks)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
