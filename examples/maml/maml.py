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
    python examples/maml/maml.py                 # the README's table: widths 2-2048, 4 seeds, 100 meta-steps
    python examples/maml/maml.py --quick         # the same pipeline, small: under a minute
    python examples/maml/maml.py --data-only     # only examples/maml/data/*.npy, for `tpc check` & co.
    python examples/maml/maml.py --update-docs   # the README's table, and docs/maml.png rewritten

The full run writes examples/maml/data/*.npy (what the .tp programs load), then maml.png and
results.json to --out (default out/maml/, which git ignores); --update-docs writes docs/maml.png
and examples/maml/results.json instead. --quick keeps its smaller data under --out.
The slowest part is the ReLU muP limit: 65536 particles x 4 replicates, each replicate 100
meta-steps of 4 tasks and then the 200 test tasks over 69 x 65536 particle tensors (float64);
--particles and --replicates trade its standard error for time.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import tpc

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # examples/options.py
from options import add_output_options, fill_scale, output_paths  # noqa: E402 - found through the line above

WAYS = 5
# the README's scale, and --quick's (every value can still be set by its option)
FULL = {"widths": "2,8,32,128,512,2048", "seeds": 4, "steps": 100, "test_tasks": 200, "pool": None,
        "particles": 2**16, "replicates": 4}
QUICK = {"widths": "2,32,512", "seeds": 2, "steps": 10, "test_tasks": 40, "pool": 30, "particles": 2**12,
         "replicates": 2}
QUICK_NOTE = "quick run (--quick): a small-scale check of the pipeline; its numbers are not the README's"


def make_tasks(args: argparse.Namespace, base: Path = HERE) -> None:
    """Pools and tasks as .npy files under base/data/ (the programs load them)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.data / 16.0
    x = x - x.mean(axis=0)
    x = x / np.sqrt((x**2).mean(axis=1, keepdims=True))  # every image at unit mean square
    rng = np.random.default_rng(args.data_seed)
    out = base / "data"
    out.mkdir(parents=True, exist_ok=True)
    splits = (("train", range(0, 5), args.steps * args.tasks), ("test", range(5, 10), args.test_tasks))
    for split, classes, count in splits:
        idx = np.flatnonzero(np.isin(digits.target, list(classes)))
        if getattr(args, "pool", None):  # the first `pool` images of each class (--quick: a smaller pool)
            idx = np.concatenate([idx[digits.target[idx] == c][:args.pool] for c in classes])
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


def load(name: str, args: argparse.Namespace, base: Path = HERE) -> tpc.Network:
    """examples/maml/maml_<name>.tp with its data read from base/data/, trained as `args` say."""
    path = HERE / f"maml_{name}.tp"
    # the settings go into the train statement's text: it becomes loops when the program is built
    source = path.read_text()
    for key, value in (("steps", args.steps), ("tasks", args.tasks), ("lr", args.lr), ("inner_lr", args.inner_lr)):
        source, found = re.subn(rf"\b{key} = [0-9.eE+-]+", f"{key} = {value!r}", source, count=1)
        if not found:
            raise SystemExit(f"{path}: no `{key} = ...` in its train statement")
    return tpc.loads(source, str(path), base_dir=base)


def accuracy(pred: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean accuracy per task: pred (..., T, Q, 5), labels (T, Q) -> (..., T)."""
    return (pred.argmax(-1) == labels).mean(-1)


def interval(acc: np.ndarray) -> tuple[float, float]:
    """Mean and 95% half-width over the last axis (tasks), averaged over leading axes (seeds)."""
    per_task = acc.reshape(-1, acc.shape[-1]).mean(0)
    return float(per_task.mean()), float(1.96 * per_task.std(ddof=1) / np.sqrt(per_task.size))


@contextmanager
def ticking(desc: str, unit: str, total: int | None = None, clock_only: bool = False) -> Iterator[tqdm]:
    """A progress bar on stderr whose clock moves every second, also while tpc reports nothing
    (the test tasks after training, the kernel-regime limits); `clock_only`: just the time."""
    bar = tqdm(desc=desc, unit=unit, total=total, leave=False, file=sys.stderr,
               bar_format="{desc}: {elapsed}" if clock_only else None)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(1.0):
            bar.refresh()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield bar
    finally:
        stop.set()
        thread.join()
        bar.close()


def run_width(net: tpc.Network, width: int, seeds: int, desc: str) -> dict:
    """tpc.run with a bar over seeds (its postfix: the meta-step of the current chunk of seeds)."""
    with ticking(desc, "seed", seeds) as bar:
        def step(done: int, total: int) -> None:
            bar.set_postfix_str(f"meta-step {done}/{total}" + (", then the test tasks" if done == total else ""),
                                refresh=False)

        return tpc.run(net, width, seeds, progress=bar.update, on_step=step)


def run_limit(net: tpc.Network, args: argparse.Namespace, desc: str) -> dict:
    """tpc.limit with a bar over its meta-steps (all replicates; feature learning), else a clock."""
    kernel = net.classification().regime != "feature learning"
    with ticking(desc + (" (kernel gradient descent)" if kernel else ""), "step", clock_only=kernel) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        return tpc.limit(net, particles=args.particles, replicates=args.replicates, progress=progress)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Without --update-docs nothing tracked by git is written.")
    q = QUICK

    def scale(key: str) -> str:
        return f"default {FULL[key]}; --quick: {q[key]}"

    ap.add_argument("--widths", help=f"comma-separated widths of the finite runs ({scale('widths')})")
    ap.add_argument("--seeds", type=int, help=f"seeds per width ({scale('seeds')})")
    ap.add_argument("--steps", type=int, help=f"meta-steps ({scale('steps')})")
    ap.add_argument("--tasks", type=int, default=4, help="tasks per meta-step (default 4)")
    ap.add_argument("--test-tasks", type=int, help=f"meta-test tasks ({scale('test_tasks')})")
    ap.add_argument("--query", type=int, default=5, help="query images per class (default 5)")
    ap.add_argument("--pool", type=int, help="images per class in each split's pool (default all, about 180; "
                    f"--quick: {q['pool']})")
    ap.add_argument("--lr", type=float, default=0.05, help="meta learning rate (default 0.05)")
    ap.add_argument("--inner-lr", type=float, default=0.5, help="inner (adaptation) learning rate (default 0.5)")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the task draws (default 0)")
    ap.add_argument("--particles", type=int, help=f"particles of the ReLU muP limit ({scale('particles')})")
    ap.add_argument("--replicates", type=int, help=f"independent replicates of the ReLU muP limit "
                    f"({scale('replicates')})")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: a meta-step is many small ops, which a second thread slows down "
                         "on a busy 2-core machine, up to 30x at small widths; 0: torch's default)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="the same pipeline at a small scale (under a minute); its numbers are not the README's")
    mode.add_argument("--data-only", action="store_true",
                      help="write examples/maml/data/*.npy (what the .tp programs load) and exit")
    add_output_options(ap, "maml", "maml.png and results.json",
                       "the plot to docs/maml.png and the numbers to examples/maml/results.json")
    return ap


def resolve(ap: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Fill the scale from --quick or the README's defaults; the data folder and the output paths."""
    fill_scale(ap, args, QUICK, FULL)
    counts = (args.seeds, args.steps, args.tasks, args.test_tasks, args.query, *args.width_list)
    if args.threads < 0:
        ap.error("--threads must be 0 (torch's default) or positive")
    if min(counts) < 1 or args.test_tasks < 2 or args.particles < 2 or args.replicates < 2:
        ap.error("widths, --seeds, --steps, --tasks and --query must be positive, --test-tasks, --particles and "
                 "--replicates at least 2")
    if args.pool is not None and args.pool < 1 + args.query:
        ap.error(f"--pool {args.pool}: a task needs {1 + args.query} images of each class (1 support, --query)")
    args.plot, stem = output_paths(args, "maml", HERE / "results")
    args.results = stem.with_suffix(".json")
    # the full run's data is the programs' (examples/maml/data); --quick's smaller data stays beside its results
    args.base = args.plot.parent.resolve() if args.quick else HERE
    return args


def main() -> None:
    ap = parser()
    args = resolve(ap, ap.parse_args())
    t_start = time.perf_counter()
    if args.data_only:
        make_tasks(args)
        print(f"wrote {HERE / 'data'}/*.npy ({args.steps * args.tasks} meta-training and {args.test_tasks} meta-test "
              f"tasks) in {time.perf_counter() - t_start:.1f} s; now e.g. `tpc check examples/maml/maml_relu_mup.tp`")
        return
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        print(QUICK_NOTE, flush=True)
    make_tasks(args, args.base)
    labels = np.load(args.base / "data" / "test_query_y.npy")
    rows: list[dict] = []

    def report(what: str, width: object, acc: np.ndarray, seconds: float) -> None:
        mean, half = interval(acc)
        rows.append({"model": what, "width": width, "accuracy": mean, "ci95": half, "seconds": seconds})
        print(f"{what:>22}  {str(width):>6}  {100 * mean:6.2f} % ± {100 * half:4.2f}   ({seconds:.1f} s)", flush=True)

    print(f"5-way 1-shot first-order MAML on digits: {args.steps} meta-steps x {args.tasks} tasks, "
          f"{args.test_tasks} test tasks, {args.seeds} seeds per width; ReLU muP limit by {args.particles} "
          f"particles x {args.replicates} replicates")
    print(f"{'model':>22}  {'width':>6}  test accuracy (95% interval over tasks)")
    for name, what in (("linear_mup", "linear muP"), ("relu_mup", "ReLU muP")):
        net = load(name, args, args.base)
        for w in args.width_list:
            t0 = time.perf_counter()
            res = run_width(net, w, args.seeds, f"{what}, n = {w}")
            report(what, w, accuracy(res["test"].values, labels), time.perf_counter() - t0)
    for name, what in (("linear_mup", "linear muP"), ("relu_mup", "ReLU muP"), ("relu_ntk", "ReLU NTK"),
                       ("relu_gp", "ReLU GP (SP)")):
        t0 = time.perf_counter()
        lim = run_limit(load(name, args, args.base), args, f"{what} limit")["test"]
        pred = lim.samples if lim.samples is not None else lim.value
        report(f"{what} limit [{lim.method}]", "inf", accuracy(pred, labels), time.perf_counter() - t0)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(rows, indent=1))
    plot(rows, args)
    print(f"plot written to {args.plot}, numbers to {args.results} ({time.perf_counter() - t_start:.0f} s)")
    if args.quick:
        print(QUICK_NOTE)


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
    quick = " (--quick: not the README's numbers)" if args.quick else ""
    ax.set_title(f"5-way 1-shot first-order MAML on digits ({args.test_tasks} test tasks){quick}", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
