"""muP's hyperparameter transfer at laptop scale, with tpc's infinite-width limit beside the finite
widths: the training loss of a 2-hidden-layer ReLU network after a few full-batch SGD (or Adam)
steps on scikit-learn's digits, against the learning rate, at several widths, in muP and in the
standard parametrization with a fixed learning rate.

Task: 64 training images of scikit-learn's bundled digits (8x8, 10 classes; a fixed stratified
subset, every pixel centred and all scaled to unit variance by the training set's statistics),
softmax cross-entropy (`xent`), `--steps` full-batch steps (default 5) of `--optimizer` (sgd, the
default, or adam: `train adam(lr, steps)` with torch's betas and eps); test accuracy on 512
held-out images. Each (parametrization, width, learning rate) is one program, built here from a
template with the learning rate in its train statement (`program_text`), and run for `--seeds`
seeds (vectorised; mean and standard error over the seeds). Parametrizations:

- muP (`parametrization mup`): its infinite-width limit is computed at every learning rate
  (`tpc.limit`, the unrolled program on `--particles` x `--replicates` Monte Carlo particles; its
  standard errors are across the replicates);
- SP with the learning rate independent of the width, as in common practice
  (`abc(a = [0, 0, 0], b = [0, 1/2, 1/2], c = 0)`; tpc's `sp` preset has c = 1, lr n^-1, which is
  stable but in the kernel regime). tpc classifies it as unstable: it has no limit, which the
  script asks tpc for and reports.

    pip install ".[examples]"
    python examples/transfer/transfer.py                 # widths 64-4096, 8 lrs, 4 seeds: out/transfer/
    python examples/transfer/transfer.py --quick         # widths 64 and 256, 5 lrs, 2 seeds, small limit
    python examples/transfer/transfer.py --data-only     # only examples/transfer/data/*.npy
    python examples/transfer/transfer.py --update-docs   # docs/transfer.png, examples/transfer/results.{json,md}
    python examples/transfer/transfer.py --optimizer adam --update-docs   # ..._adam.png, results_adam.{json,md}

With Adam, muP's entrywise updates have per-layer rates of their own (README, "Adaptive
optimizers"), and SP with a fixed lr applies one rate to every layer (c' = c = 0). The muP limit
holds each n x n layer's Adam updates as P x P grids of particles, so it runs on 4096 particles.

The full run writes examples/transfer/data/*.npy (what the programs load), then transfer.png,
results.json and results.md (the tables) to --out (default out/transfer/, which git ignores);
--update-docs writes docs/transfer.png and examples/transfer/results.{json,md} instead. --quick
keeps its data under --out. Before it runs, the script prints its plan: the number of runs, the
largest finite run's memory per seed and the limit's plan (tpc.run and tpc.limit refuse runs beyond
the memory budget themselves). `--workers W` sends the finite runs, one (width, seed, lr) a task,
to tpc's Dask sweep (tpc.sweep; `pip install ".[distributed]"`); the default is serial.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import tpc

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # examples/options.py
from options import add_output_options, fill_scale, output_paths  # noqa: E402 - found through the line above

# the two parametrizations: their name in the tables, and what the program's parametrization line says
PARAMS = {
    "sp": ("SP, fixed lr", "abc(a = [0, 0, 0], b = [0, 1/2, 1/2], c = 0)"),
    "mup": ("muP", "mup"),
}
LRS = [2.0**k for k in range(-5, 3)]  # 1/32 .. 4: two decades, eight points, muP's optimum inside
# the README's scale, and --quick's (every value can still be set by its option)
FULL = {"widths": "64,256,1024,4096", "lrs": ",".join(f"{v:g}" for v in LRS), "seeds": 4, "particles": 2**14,
        "replicates": 4}
QUICK = {"widths": "64,256", "lrs": "0.0625,0.25,0.5,1,2", "seeds": 2, "particles": 2**11, "replicates": 2}
# Adam's: rates two decades lower (its step is O(lr) per entry whatever the gradient), fewer particles
ADAM_LRS = [2.0**k for k in range(-9, 1)]  # 1/512 .. 1: SP's optimum falls like 1/n, muP's sits near 1/4
FULL_ADAM = {**FULL, "lrs": ",".join(repr(v) for v in ADAM_LRS), "particles": 2**12}
QUICK_ADAM = {**QUICK, "lrs": "0.00390625,0.015625,0.03125,0.0625,0.125", "particles": 2**10}
STEP_NAMES = {"sgd": "SGD", "adam": "Adam"}
QUICK_NOTE = "quick run (--quick): a small-scale check of the pipeline; its numbers are not the README's"
CAP = 3 * math.log(10)  # the plot shows a loss above this (3x the loss of a uniform guess) at the top edge


def program_text(param: str, lr: float, steps: int, data: str = "data", optimizer: str = "sgd") -> str:
    """The network program of one run: `param` a key of PARAMS, `data` the folder of the .npy files
    (relative to the program's base folder, or absolute), `optimizer` sgd or adam."""
    return f"""\
width n
parametrization {PARAMS[param][1]}
data X  = load("{data}/train_x.npy")        # the training images, one per row
data Y  = load("{data}/train_y.npy")        # their classes 0..9
data Xt = load("{data}/test_x.npy")         # held-out images

layer U : input n x 64, var = 2
layer W : hidden n x n, var = 2
layer V : readout 10 x n
model f(x) = V @ relu(W @ relu(U @ x))

loss L = xent(f(X), Y)
train {optimizer}(lr = {lr!r}, steps = {steps}) minimize L    # full batch

output curve = history(L)                   # the loss before each step
output final = L                            # the loss after the last step
output pred  = f(Xt)                        # test logits
"""


def make_data(args: argparse.Namespace, base: Path = HERE) -> None:
    """base/data/{train,test}_{x,y}.npy from scikit-learn's digits (the programs load them)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x, y = digits.data.astype(np.float64), digits.target
    rest, train = train_test_split(np.arange(len(y)), test_size=args.train, stratify=y, random_state=args.data_seed)
    _, test = train_test_split(rest, test_size=args.test, stratify=y[rest], random_state=args.data_seed)
    mean = x[train].mean(axis=0)  # every pixel centred, all scaled to unit variance (training statistics)
    scale = (x[train] - mean).std()
    out = base / "data"
    out.mkdir(parents=True, exist_ok=True)
    for split, idx in (("train", train), ("test", test)):
        np.save(out / f"{split}_x.npy", (x[idx] - mean) / scale)
        np.save(out / f"{split}_y.npy", y[idx].astype(np.float64))


def load(param: str, lr: float, args: argparse.Namespace) -> tpc.Network:
    return tpc.loads(program_text(param, lr, args.steps, optimizer=args.optimizer), f"transfer_{param}.tp",
                     base_dir=args.base)


def summarize(finals: np.ndarray, curves: np.ndarray, acc: np.ndarray) -> dict:
    """One (width, lr): the final loss's mean and standard error over seeds (non-finite: diverged),
    the mean loss before each step, and the test accuracy."""
    s = len(finals)
    ok = bool(np.isfinite(finals).all())
    curve = curves.mean(axis=0)
    return {"loss": float(finals.mean()) if ok else None,
            "loss_se": float(finals.std(ddof=1) / np.sqrt(s)) if ok and s > 1 else None,
            "curve": [float(v) if np.isfinite(v) else None for v in curve],
            "acc": float(acc.mean()) if ok else None,
            "acc_se": float(acc.std(ddof=1) / np.sqrt(s)) if ok and s > 1 else None,
            "losses": [float(v) if np.isfinite(v) else None for v in finals]}


def accuracy(pred: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(..., N, 10) logits -> (...) accuracies."""
    return (np.asarray(pred).argmax(-1) == labels).mean(-1)


def finite_serial(param: str, args: argparse.Namespace, labels: np.ndarray, bar: tqdm) -> dict:
    """(width, lr) -> summary, each run tpc.run over the seeds (vectorised)."""
    out = {}
    for lr in args.lr_list:
        net = load(param, lr, args)
        for w in args.width_list:
            bar.set_postfix_str(f"{param} n = {w}, lr = {lr:g}", refresh=False)
            try:
                res = tpc.run(net, w, args.seeds, memory_gb=args.memory_gb)
                finals, curves = res["final"].values, res["curve"].values
                acc = accuracy(res["pred"].values, labels)
            except tpc.NumericalError:  # a seed's loss became infinite: the run diverged
                finals, acc = np.full(args.seeds, np.inf), np.full(args.seeds, np.nan)
                curves = np.full((args.seeds, args.steps), np.nan)
            out[w, lr] = summarize(finals, curves, acc)
            bar.update(args.seeds)
    return out


def finite_sweep(param: str, args: argparse.Namespace, labels: np.ndarray, bar: tqdm) -> dict:
    """The same through tpc's Dask sweep: one task per (width, seed, lr), the serial run's numbers.
    A diverged run fails its task, and with it the sweep: then this parametrization runs serially."""
    from tpc.sweep import sweep

    data = (args.base / "data").resolve()
    net = tpc.loads(program_text(param, args.lr_list[0], args.steps, str(data), args.optimizer), f"transfer_{param}.tp",
                    allow_data_outside=True)  # absolute data paths: the tasks rebuild the program from its text
    grid = (f"width={','.join(map(str, args.width_list))} seed=0..{args.seeds - 1} "
            f"lr={','.join(repr(v) for v in args.lr_list)}")
    done = [0]

    def progress(finished: int, _total: int) -> None:
        bar.update(finished - done[0])
        done[0] = finished

    bar.set_postfix_str(f"{param}: Dask sweep, {args.workers} workers", refresh=False)
    try:
        res = sweep(net, grid, workers=args.workers, memory_gb=args.memory_gb, progress=progress,
                    allow_data_outside=True)
    except tpc.NumericalError as err:
        print(f"{param}: a run diverged in the sweep ({str(err).splitlines()[0]}); running {param} serially",
              flush=True)
        bar.update(-done[0])
        return finite_serial(param, args, labels, bar)
    out = {}
    for (si, w), values in res.values.items():
        lr = float(res.settings[si]["lr"])
        out[w, lr] = summarize(values["final"], values["curve"], accuracy(values["pred"], labels))
    return out


def limit_runs(param: str, args: argparse.Namespace, labels: np.ndarray, bar: tqdm) -> dict:
    """lr -> the limit's final loss (and its standard error across replicates) and test accuracy;
    {"refused": message} where tpc has no limit for the parametrization (SP with a fixed lr)."""
    out: dict = {}
    for lr in args.lr_list:
        net = load(param, lr, args)
        cls = net.classification()
        if not cls.stable:
            try:
                tpc.limit(net, particles=args.particles, replicates=args.replicates)
                raise AssertionError("tpc computed a limit for an unstable parametrization")
            except tpc.TpcError as err:
                return {"refused": str(err).splitlines()[0].split("error: ", 1)[-1]}
        bar.set_postfix_str(f"{param} limit, lr = {lr:g}", refresh=False)
        start = bar.n

        def progress(done: int, total: int, start: int = start) -> None:
            bar.update(start + done - bar.n)

        try:
            lim = tpc.limit(net, particles=args.particles, replicates=args.replicates, memory_gb=args.memory_gb,
                            progress=progress)
            final = float(lim["final"].value)
            out[lr] = {"loss": final if np.isfinite(final) else None,
                       "loss_se": float(lim["final"].stderr) if np.isfinite(final) else None,
                       "curve": [float(v) if np.isfinite(v) else None for v in np.asarray(lim["curve"].value)],
                       "acc": float(accuracy(lim["pred"].value, labels)), "method": lim["final"].method}
        except tpc.NumericalError as err:  # training diverged in the limit
            out[lr] = {"loss": None, "loss_se": None, "curve": None, "acc": None,
                       "method": str(err).splitlines()[0]}
        bar.update(start + args.steps * args.replicates - bar.n)
    return out


def optimum(losses: dict[float, float | None]) -> float | None:
    """The learning rate of the grid with the lowest loss (None where every run diverged)."""
    finite = {lr: v for lr, v in losses.items() if v is not None and np.isfinite(v)}
    return min(finite, key=finite.get) if finite else None


def plan(args: argparse.Namespace) -> str:
    """What the measurement will run, and its memory, before anything is allocated."""
    from tpc.memory import finite_bytes_per_seed, gb
    from tpc.train.limit import describe

    nets = {p: load(p, args.lr_list[0], args) for p in PARAMS}
    runs = len(PARAMS) * len(args.width_list) * len(args.lr_list)
    widest = max(args.width_list)
    per_seed = max(finite_bytes_per_seed(net, widest, 8) for net in nets.values())
    lines = [f"plan: {runs} finite runs ({len(PARAMS)} parametrizations x {len(args.width_list)} widths x "
             f"{len(args.lr_list)} learning rates), {args.seeds} seeds each ({runs * args.seeds} trainings of "
             f"{args.steps} {STEP_NAMES[args.optimizer]} steps on {args.train} images; float64); the largest, "
             f"n = {widest}, about "
             f"{gb(per_seed)} per seed" + (f", through a Dask sweep on {args.workers} workers" if args.workers else
                                           " (seeds vectorised, as many at once as the memory budget allows)")]
    for p, net in nets.items():
        cls = net.classification()
        if cls.stable:
            lines.append(f"  {PARAMS[p][0]} limit at each of the {len(args.lr_list)} learning rates: "
                         + describe(net, particles=args.particles, replicates=args.replicates))
        else:
            lines.append(f"  {PARAMS[p][0]}: r = {cls.r:g}, unstable ({'; '.join(cls.failed)}): no limit")
    return "\n".join(lines)


def measure(args: argparse.Namespace, log=print) -> dict:  # noqa: ANN001 - a print-like callable
    """Every finite run and limit of the sweep; the numbers the tables and the plot show (torch on
    --threads threads meanwhile)."""
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _measure(args, log)
    finally:
        torch.set_num_threads(threads)


def _measure(args: argparse.Namespace, log) -> dict:  # noqa: ANN001
    labels = np.load(args.base / "data" / "test_y.npy")
    results: dict = {"optimizer": args.optimizer,
                     "steps": args.steps, "seeds": args.seeds, "widths": args.width_list, "lrs": args.lr_list,
                     "particles": args.particles, "replicates": args.replicates, "train": args.train,
                     "test": len(labels), "params": {}}
    total = len(PARAMS) * len(args.width_list) * len(args.lr_list) * args.seeds
    for p, (name, line) in PARAMS.items():
        t0 = time.perf_counter()
        with tqdm(total=total // len(PARAMS), desc=f"{name}: finite widths", unit="seed", leave=False,
                  file=sys.stderr) as bar:
            fin = (finite_sweep if args.workers else finite_serial)(p, args, labels, bar)
        t1 = time.perf_counter()
        with tqdm(total=args.steps * args.replicates * len(args.lr_list), desc=f"{name}: limit", unit="step",
                  leave=False, file=sys.stderr) as bar:
            lim = limit_runs(p, args, labels, bar)
        t2 = time.perf_counter()
        widths = {}
        for w in args.width_list:
            row = {lr: fin[w, lr] for lr in args.lr_list}
            widths[w] = {"runs": {repr(lr): r for lr, r in row.items()},
                         "optimum": optimum({lr: r["loss"] for lr, r in row.items()})}
        cls = load(p, args.lr_list[0], args).classification()
        entry = {"name": name, "parametrization": line, "r": cls.r, "regime": cls.regime if cls.stable else "unstable",
                 "widths": widths, "finite_seconds": t1 - t0, "limit_seconds": t2 - t1}
        if "refused" in lim:
            entry["limit"] = None
            entry["limit_refused"] = lim["refused"]
            log(f"{name}: no limit: {lim['refused']}", flush=True)
        else:
            entry["limit"] = {"runs": {repr(lr): r for lr, r in lim.items()},
                              "optimum": optimum({lr: r["loss"] for lr, r in lim.items()})}
        results["params"][p] = entry
        log(f"{name}: finite runs {t1 - t0:.0f} s, limit {t2 - t1:.0f} s", flush=True)
    return results


def fmt_loss(r: dict | None) -> str:
    if r is None or r["loss"] is None:
        return "diverged"
    se = f" ± {r['loss_se']:.2g}" if r.get("loss_se") is not None else ""
    return f"{r['loss']:.3g}{se}"


def tables(results: dict) -> str:
    """Markdown: the optimum per width (and the limit's), then every loss of the grid."""
    widths, lrs = results["widths"], results["lrs"]
    small = widths[0]
    steps = STEP_NAMES[results.get("optimizer", "sgd")]
    out = [f"Training loss after {results['steps']} {steps} steps (mean ± standard error over {results['seeds']} "
           f"seeds; the limit's over {results['replicates']} replicates of {results['particles']} particles), "
           f"{results['train']} training images; test accuracy on {results['test']} held-out images.", "",
           "| parametrization | width | optimum lr | loss there | test accuracy there | "
           f"loss at the lr tuned at width {small} |", "|---|---|---|---|---|---|"]
    for entry in results["params"].values():
        tuned = entry["widths"][small]["optimum"]
        for w in widths:
            best = entry["widths"][w]["optimum"]
            runs = entry["widths"][w]["runs"]
            at_best = runs[repr(best)] if best is not None else None
            acc = f"{100 * at_best['acc']:.1f} %" if at_best else ""
            moved = fmt_loss(runs[repr(tuned)]) if tuned is not None else ""
            out.append(f"| {entry['name']} | {w} | {best:g} | {fmt_loss(at_best)} | {acc} | {moved} |" if best else
                       f"| {entry['name']} | {w} | (all diverged) | | | |")
        if entry["limit"] is not None:
            best = entry["limit"]["optimum"]
            at_best = entry["limit"]["runs"][repr(best)] if best is not None else None
            tuned_run = entry["limit"]["runs"][repr(tuned)] if tuned is not None else None
            out.append(f"| {entry['name']} | limit | {best:g} | {fmt_loss(at_best)} | "
                       f"{100 * at_best['acc']:.1f} % | {fmt_loss(tuned_run)} |" if best else
                       f"| {entry['name']} | limit | (all diverged) | | | |")
        else:
            out.append(f"| {entry['name']} | limit | none (tpc: unstable, r = {entry['r']:g}) | | | |")
    for entry in results["params"].values():
        out += ["", f"{entry['name']} (`parametrization {entry['parametrization']}`): loss after "
                f"{results['steps']} steps", "",
                "| lr | " + " | ".join(f"n = {w}" for w in widths) + (" | limit |" if entry["limit"] else " |"),
                "|---" * (len(widths) + 1 + bool(entry["limit"])) + "|"]
        for lr in lrs:
            cells = [fmt_loss(entry["widths"][w]["runs"][repr(lr)]) for w in widths]
            if entry["limit"]:
                cells.append(fmt_loss(entry["limit"]["runs"][repr(lr)]))
            out.append(f"| {lr:g} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Without --update-docs nothing tracked by git is written.")
    q = QUICK

    def scale(key: str) -> str:
        return f"default {FULL[key]}; --quick: {q[key]}"

    ap.add_argument("--widths", help=f"comma-separated widths of the finite runs ({scale('widths')})")
    ap.add_argument("--lrs", help=f"comma-separated learning rates, the same for every width and the limit "
                    f"({scale('lrs')})")
    ap.add_argument("--seeds", type=int, help=f"seeds per width and learning rate ({scale('seeds')})")
    ap.add_argument("--steps", type=int, default=5, help="full-batch training steps (default 5)")
    ap.add_argument("--optimizer", choices=sorted(STEP_NAMES), default="sgd",
                    help="sgd (default) or adam (muP's Adam rates; other learning rates and 4096 particles)")
    ap.add_argument("--train", type=int, default=64, help="training images, a stratified subset (default 64)")
    ap.add_argument("--test", type=int, default=512, help="held-out test images (default 512)")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the training and test subsets (default 0)")
    ap.add_argument("--particles", type=int, help=f"particles of the muP limit ({scale('particles')})")
    ap.add_argument("--replicates", type=int, help=f"independent replicates of the muP limit ({scale('replicates')})")
    ap.add_argument("--workers", type=int, default=0,
                    help="run the finite runs through tpc's Dask sweep on this many local workers (default 0: serial)")
    ap.add_argument("--memory-gb", type=float, help="memory budget of each run (default: tpc's, half of the machine)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1, for a shared machine; 0: torch's default)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="the same pipeline at a small scale (under a minute); its numbers are not the README's")
    mode.add_argument("--data-only", action="store_true",
                      help="write examples/transfer/data/*.npy (what the programs load) and exit")
    add_output_options(ap, "transfer", "transfer.png, results.json and results.md",
                       "the plot to docs/transfer.png and the numbers to examples/transfer/results.{json,md}")
    return ap


def resolve(ap: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Fill the scale from --quick or the README's defaults; the data folder and the output paths."""
    adam = args.optimizer == "adam"
    fill_scale(ap, args, QUICK_ADAM if adam else QUICK, FULL_ADAM if adam else FULL)
    try:
        args.lr_list = [float(v) for v in args.lrs.split(",")]
    except ValueError:
        ap.error(f"--lrs {args.lrs}: expected comma-separated numbers")
    if not all(math.isfinite(v) and v > 0 for v in args.lr_list) or len(set(args.lr_list)) != len(args.lr_list):
        ap.error("--lrs: positive, finite and distinct learning rates")
    args.lr_list.sort()
    args.width_list.sort()
    counts = (args.seeds, args.steps, args.train, args.test, *args.width_list)
    if min(counts) < 1 or args.particles < 2 or args.replicates < 2 or args.workers < 0 or args.threads < 0:
        ap.error("widths, --seeds, --steps, --train and --test must be positive, --particles and --replicates at "
                 "least 2, --workers and --threads at least 0")
    if args.train < 10 or args.train + args.test > 1797:
        ap.error("--train takes at least 10 images (one per class), and --train + --test at most the 1797 digits")
    suffix = "_adam" if adam else ""
    args.plot, stem = output_paths(args, "transfer" + suffix, HERE / ("results" + suffix))
    args.results = stem.with_suffix(".json")
    args.table = stem.with_suffix(".md")
    # the full run's data is the programs' (examples/transfer/data); --quick's stays beside its results
    args.base = args.plot.parent.resolve() if args.quick else HERE
    return args


def main() -> None:
    ap = parser()
    args = resolve(ap, ap.parse_args())
    t_start = time.perf_counter()
    if args.data_only:
        make_data(args)
        print(f"wrote {HERE / 'data'}/*.npy ({args.train} training and {args.test} test images) in "
              f"{time.perf_counter() - t_start:.1f} s")
        return
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    if args.quick:
        print(QUICK_NOTE, flush=True)
    make_data(args, args.base)
    print(plan(args), flush=True)
    results = measure(args)
    results["quick"] = args.quick
    results["seconds"] = time.perf_counter() - t_start
    table = tables(results)
    print(table, end="")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=1))
    args.table.write_text((f"{QUICK_NOTE}\n\n" if args.quick else "") + table)
    plot(results, args.plot, args.quick)
    print(f"plot written to {args.plot}, numbers to {args.results} and {args.table} "
          f"({time.perf_counter() - t_start:.0f} s)")
    if args.quick:
        print(QUICK_NOTE)


def _lr_label(lr: float) -> str:
    """1/512 rather than 0.00195312, where the rate is one over a whole number (to the 6 digits of
    `--lrs` written with %g)."""
    inv = 1 / lr
    return f"1/{round(inv)}" if lr < 1 and abs(inv - round(inv)) < 1e-5 * inv else f"{lr:g}"


def plot(results: dict, out: Path, quick: bool = False) -> None:
    """Two panels (SP, muP): loss after training against the learning rate, a line per width, the
    limit dashed, each curve's optimum starred; diverged or off-scale runs drawn at the top edge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    widths, lrs = results["widths"], results["lrs"]
    colors = plt.cm.viridis(np.linspace(0.0, 0.85, len(widths)))
    fig, axes = plt.subplots(1, len(results["params"]), figsize=(12, 4.6))

    def draw(ax, runs: dict, color, label: str, dashed: bool = False) -> None:  # noqa: ANN001
        y = np.array([np.inf if runs[repr(lr)]["loss"] is None else runs[repr(lr)]["loss"] for lr in lrs])
        se = np.array([runs[repr(lr)]["loss_se"] or 0.0 for lr in lrs])
        x = np.asarray(lrs)
        shown = np.minimum(y, CAP)
        ax.errorbar(x, shown, yerr=np.where(y < CAP, se, 0.0), fmt="s--" if dashed else "o-", ms=4, color=color,
                    lw=1.8 if dashed else 1.2, label=label, capsize=2)
        over = y >= CAP
        ax.plot(x[over], np.full(over.sum(), CAP), "^", color=color, ms=7)
        if np.isfinite(y).any() and y.min() < CAP:
            k = int(np.argmin(y))
            ax.plot(x[k], y[k], "*", color=color, ms=15, mec="k", mew=0.6)

    for ax, entry in zip(np.atleast_1d(axes), results["params"].values(), strict=True):
        for w, c in zip(widths, colors, strict=True):
            draw(ax, entry["widths"][w]["runs"], c, f"n = {w} (optimum {entry['widths'][w]['optimum']:g})"
                 if entry["widths"][w]["optimum"] else f"n = {w}")
        if entry["limit"] is not None:
            opt = entry["limit"]["optimum"]
            draw(ax, entry["limit"]["runs"], "k", f"limit (optimum {opt:g})" if opt else "limit", dashed=True)
            title = f"{entry['name']}: finite widths and tpc's limit"
        else:
            title = f"{entry['name']}: no limit (tpc: unstable)"
        ax.set_xscale("log")
        ax.set_xticks(lrs, [_lr_label(lr) for lr in lrs])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_yscale("log")
        low = min([r["loss"] for w in entry["widths"].values() for r in w["runs"].values() if r["loss"] is not None]
                  + [CAP / 10])
        ax.set_ylim(low / 1.5, CAP * 1.3)
        ax.set_ylabel(f"training loss after {results['steps']} {STEP_NAMES[results.get('optimizer', 'sgd')]} steps")
        ax.set_xlabel("learning rate")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"digits ({results['train']} training images), 2-hidden-layer ReLU MLP, softmax cross-entropy, "
                 f"{results['steps']} full-batch {STEP_NAMES[results.get('optimizer', 'sgd')]} steps, "
                 f"{results['seeds']} seeds per point\n"
                 f"stars: each curve's optimum; triangles: loss above {CAP:.1f} or diverged"
                 + (" (--quick: not the README's numbers)" if quick else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
