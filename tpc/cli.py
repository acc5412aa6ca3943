"""The command line: one subcommand per pipeline stage.

    tpc check FILE        parse and check; a one-screen summary
    tpc graph FILE        the instructions, as the papers write them (or DOT / JSON)
    tpc emit-torch FILE   the generated PyTorch module
    tpc run FILE          finite width: means and standard errors over seeds
    tpc limit FILE        infinite width: the Master Theorem limit
    tpc compare FILE      finite widths against the limit, slopes and a plot
    tpc coordcheck FILE   muP's coordinate check: each vector's size against the width, and its limit
    tpc classify [FILE]   an abc-parametrization: r, stability, regime (TP4)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tpc import __version__
from tpc.errors import TpcError
from tpc.seeds import MAX_REPLICATES, MAX_SEED

EXIT_USER_ERROR = 2


def _load(args: argparse.Namespace):  # noqa: ANN202
    from tpc.build import load_program

    return load_program(args.file, allow_data_outside=getattr(args, "allow_data_outside", False),
                        memory_gb=getattr(args, "memory_gb", None), force=getattr(args, "force", False))


def _fmt_array(a: np.ndarray, err: np.ndarray | None = None) -> str:
    a = np.asarray(a)
    if a.ndim == 0:
        text = f"{float(a):.6g}"
        if err is not None and np.ndim(err) == 0 and np.isfinite(err):
            text += f" ± {float(err):.2g}"
        return text
    with np.printoptions(precision=5, suppress=True, linewidth=100):
        text = "\n" + "\n".join("    " + line for line in str(a).splitlines())
    if err is not None and np.size(err) and np.all(np.isfinite(err)):
        text += f"\n    (largest standard error {float(np.max(err)):.2g})"
    return text


def _progress(total: int, desc: str, enabled: bool,
              unit: str = "seed") -> tuple[Callable[[int], None] | None, Callable[[], None]]:
    """A bar fed increments, `update(k)`: seeds finished, runs finished."""
    if not enabled:
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False)
    return bar.update, bar.close


def _step_bar(enabled: bool, desc: str = "training steps", unit: str = "step",
              position: int = 1) -> tuple[Callable[[int, int], None] | None, Callable[[], None]]:
    """A bar fed absolute counts, `update(done, total)`: training steps, tiles, a sweep's runs."""
    if not enabled:
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit=unit, file=sys.stderr, leave=False, position=position)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    return update, bar.close


def _strict(obj: object) -> object:
    """JSON without NaN or Infinity tokens: a value that does not exist (the standard error of one
    seed, the slope of one width) is null."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _strict(obj.tolist())
    if isinstance(obj, np.generic):
        return _strict(obj.item())
    return obj


def dumps(obj: object) -> str:
    """The one JSON writer of the CLI: strict JSON (see `_strict`)."""
    return json.dumps(_strict(obj), indent=1, allow_nan=False)


def _count(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number of at least `minimum` (and at most `maximum`)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not (value > 0 and np.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got '{text}'")
    return value


def _device(text: str) -> str:
    """An argparse type: tpc.is_device."""
    from tpc import is_device

    if is_device(text):
        return text
    raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:K, got '{text}'")


def _data_opt(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--allow-data-outside", action="store_true",
                    help="let load(...) read files outside the program's folder and the current folder")


def _memory_opts(sp: argparse.ArgumentParser, what: str) -> None:
    from tpc.memory import default_gb

    sp.add_argument("--memory-gb", type=_positive_float, default=None,
                    help=f"refuse {what} that needs more memory than this (default: half of this machine's, "
                    f"{default_gb():g} GB here); the figure is stated before anything is allocated")
    sp.add_argument("--force", action="store_true", help="run even above --memory-gb")


# ---------------------------------------------------------------------------- commands


def _is_network(obj: object) -> bool:
    from tpc.train.network import Network

    return isinstance(obj, Network)


def _check_network(path: str, net) -> int:  # noqa: ANN001
    from tpc.train.limit import describe

    cls = net.classification()
    print(f"{path}: ok (a network program)")
    print(f"  width      {net.width_name}")
    print(f"  parametrization {net.param_name}: a = {list(net.abc.a)}, b = {list(net.abc.b)}, c = {net.abc.c:g}; "
          f"r = {cls.r:g}, {cls.regime}")
    for why in cls.failed:
        print(f"    fails    {why}")
    ours = net.program_classification()
    if ours.trained is not None:  # the training leaves some layers alone: its own r
        print(f"  this training moves {_entries(net, ours.trained)}: r = {ours.r:g}, {ours.regime}")
    order = sorted((net.layers[name] for name in net.parameters), key=lambda la: (la.index, la.role != "bias"))
    print("  layers     " + ", ".join(
        f"{la.name} ({la.role} {_layer_dims(la, net.width_name)}, layer {la.index + 1}, var {la.var:g})"
        for la in order))
    fixed = [la for la in net.layers.values() if la.fixed]
    if fixed:  # as declared: entries N(0, c/n) for n x n, N(0, c) for n x d and vectors (a layer's var is c d)
        print("  fixed      " + ", ".join(
            f"{la.name} (random {_layer_dims(la, net.width_name)} {la.declared}, entries N(0, "
            + (f"{la.var:g}/{net.width_name}" if la.role == "hidden" else f"{la.var / la.fan_in:g}")
            + "), never trained)" for la in fixed))
    at = f"[{', '.join(map(str, net.model.grid))}]" if net.model.positions > 1 else ""
    print(f"  model      {net.model.name}({net.model.arg}{at}): {len(net.model.steps)} steps")
    if net.losses:
        print("  losses     " + ", ".join(f"{lo.name} = {lo.kind} on {lo.data}" for lo in net.losses.values()))
    if net.train:
        t = net.train
        if t.cbow:
            c = t.cbow
            what = f"training   stream {t.stream} = cbow" if t.stream else "training   cbow"
            print(f"  {what} on {c.tokens}, lr {t.lr:g} -> {c.min_lr:g} (times n^-c), window {c.window}, "
                  f"{c.negatives} negatives, sample {c.sample:g}, {c.epochs} epoch(s), batch {t.batch}, seed {c.seed}")
        else:
            scale = "n^-c'_l, each layer's" if t.optimizer in ("adam", "adamw", "signsgd") else "n^-c"
            extra = (f", betas ({t.betas[0]:g}, {t.betas[1]:g}), eps {t.eps:g}, weight_decay {t.weight_decay:g}"
                     if t.optimizer in ("adam", "adamw") else "")
            print(f"  training   {t.optimizer}, lr {t.lr:g} (times {scale}), {t.steps} steps, batch {t.batch}"
                  f"{extra}, minimize {t.loss}")
    if net.program is not None and not net.train:
        loops = [i for i in net.program.walk() if i.op == "loop"]
        steps = sum(net.program.instrs[i].attrs["trip"] for i in net.program.top
                    if net.program.instrs[i].op == "loop")
        trained = sorted(net.program.trained_layers(), key=lambda n: net.layers[n].index)
        print(f"  training   written as loops: {len(loops)} loop(s), {steps} top-level step(s); updates layers "
              f"{', '.join(trained) if trained else '(none)'}")
    print("  outputs    " + ", ".join(f"{o.name} ({o.kind}, {'after training' if o.phase == 'trained' else 'at init'})"
                                      for o in net.outputs))
    if cls.stable:
        print(f"  limit      {describe(net)}")
    return 0


def _layer_dims(la, width: str) -> str:  # noqa: ANN001
    dims = [width if d is None else str(d) for d in (la.rows, la.cols)]
    flat = f" at each of {la.taps} positions (flatten)" if la.flattens else ""
    return width if la.role == "bias" else " x ".join(dims) + flat


def cmd_check(args: argparse.Namespace) -> int:
    prog = _load(args)
    if _is_network(prog):
        return _check_network(args.file, prog)
    counts: dict[str, int] = {}
    derived: dict[str, int] = {}
    for node in prog.nodes():
        into = derived if node.params.get("derived") else counts
        into[node.op] = into.get(node.op, 0) + 1
    print(f"{args.file}: ok")
    print(f"  width      {prog.width_name}")
    mats = [n for n in prog.nodes() if n.op == "matrix"]
    vecs = [n for n in prog.nodes() if n.op == "vector"]
    # the user's data, not tpc's own arrays (the identity behind U.T @ x / n)
    data = [n for n in prog.nodes() if n.op == "data" and n.shape and not n.params.get("derived")
            and not n.params.get("constant")]
    if mats:
        print("  matrices   " + ", ".join(
            f"{m.name} ({m.params['role']}, {_dim(m.params['rows'], prog)} x {_dim(m.params['cols'], prog)})"
            for m in mats))
    if vecs:
        print("  vectors    " + ", ".join(v.name for v in vecs))
    if data:
        print("  data       " + ", ".join(f"{d.name} {'x'.join(map(str, d.shape))}" for d in data))
    inst = [("MatMul", "matmul"), ("Nonlin", "nonlin"), ("Moment", "moment"), ("Gram", "gram"),
            ("Readout", "readout"), ("Kernel", "cov")]
    print("  instructions " + ", ".join(f"{label} {counts[op]}" for label, op in inst if op in counts))
    if derived:
        print("  backward   " + ", ".join(f"{label} {derived[op]}" for label, op in inst if op in derived)
              + " (derived by autodiff; tpc graph --backward)")
    print("  outputs    " + ", ".join(
        f"{k} [{'x'.join(map(str, prog.node(v).shape)) or 'scalar'}]" for k, v in prog.outputs.items()))
    return 0


def _dim(d: object, prog) -> str:  # noqa: ANN001
    return prog.width_name if d == "n" else str(d)


def cmd_graph(args: argparse.Namespace) -> int:
    from tpc.ir import dot_lines, dumps_json, print_program, to_dot
    from tpc.train.graph import program_graph
    from tpc.train.graph import to_dot as graph_dot
    from tpc.train.graph import to_json as graph_json
    from tpc.train.show import model_lines, training_text

    prog = _load(args)
    if args.unrolled:
        if not _is_network(prog):
            raise TpcError("--unrolled shows a network program's training; this program has none")
        if prog.program is None or not prog.program.top:
            raise TpcError("--unrolled lists a program's training; this program does not train",
                           getattr(prog.train, "span", None)).locate(prog.filename, prog.source)
        from tpc.train.unrolled import unrolled_loops

        try:
            listing = unrolled_loops(prog)
        except TpcError as err:  # the listing's refusals carry spans, not the file
            raise (err if err.source is not None else err.locate(prog.filename, prog.source)) from None
        if args.format == "dot":
            raise TpcError("--unrolled lists the unrolled program as text (or --format json); it has no DOT form")
        print(dumps({"file": args.file, "unrolled": listing.splitlines()}) if args.format == "json" else listing,
              end="\n" if args.format == "json" else "")
        return 0
    if not _is_network(prog):
        print(print_program(prog, backward=args.backward) if args.format == "text" else
              to_dot(prog, backward=args.backward) if args.format == "dot" else dumps_json(prog))
        return 0
    # a network program: text lists its Netsor program at initialisation (where it has one: not over
    # positions, not word2vec's tables) and its training; JSON and DOT export the program graph
    # (tpc/train/graph.py), with the Netsor program at initialisation beside it
    net = prog
    lowered = _lowered(net) if net.point_sets() and net.model.positions == 1 else None
    if args.format == "text":
        if lowered is not None:
            print(print_program(lowered, backward=args.backward))
        elif net.model.positions > 1:  # no Netsor program over positions yet: the model's steps
            print("\n".join(model_lines(net)))
        if net.program is not None:
            print(("\n" if lowered is not None or net.model.positions > 1 else "") + training_text(net))
    elif args.format == "dot":
        extra = []
        if lowered is not None:
            extra = ["  subgraph cluster_initialisation {",
                     '    label="the Netsor program at initialisation (what the kernel-regime limit evaluates)";',
                     *dot_lines(lowered, args.backward, "    "), "  }"]
        print(graph_dot(program_graph(net), "tpc", extra))
    else:
        import json

        doc = json.loads(dumps_json(lowered)) if lowered is not None else \
            {"file": net.filename, "width": net.width_name}
        if net.model.positions > 1:
            doc["model"] = model_lines(net)
        doc["program"] = graph_json(program_graph(net))
        print(dumps(doc))
    return 0


def _lowered(net):  # noqa: ANN001, ANN202
    """A network at initialisation as a forward Tensor Program on all its data (what the
    kernel-regime limit evaluates; training itself is not part of it)."""
    import numpy as np

    from tpc.train.kernel import lowered_program

    if net.has_tables:  # (not reached from cmd_graph: the model is applied to no data set, the loop is all)
        raise TpcError("a cbow program applies its model to no data set, so it has no forward Tensor Program to "
                       "show: `tpc graph` prints its training loop", net.train.span).locate(net.filename, net.source)
    X = np.concatenate([net.data[d] for d in net.point_sets()])  # noqa: N806
    prog, _, _ = lowered_program(net, X)
    return prog


def cmd_emit(args: argparse.Namespace) -> int:
    from tpc import torch_source  # the one dispatch: Netsor, network and word2vec programs

    print(torch_source(_load(args)), end="")
    return 0


def _finite_need(prog, width: int, args: argparse.Namespace) -> str:  # noqa: ANN001
    """The memory one seed needs at `width`, as text; refused here, before any progress bar, when it
    exceeds the budget."""
    from tpc import memory

    need = memory.finite_bytes_per_seed(prog, width, 4 if args.dtype == "float32" else 8)
    memory.seeds_at_once(need, getattr(args, "seeds", 1), f"one seed at width {width}", args.memory_gb, args.force,
                         prog.filename, prog.source, kept_per_seed=memory.kept_per_seed(prog))
    return memory.gb(need)


def _check_device(device: str) -> None:
    if device != "cpu":  # torch is imported only where CUDA is asked for
        from tpc.backends.device import check

        check(device)


def cmd_run(args: argparse.Namespace) -> int:
    from tpc import _seed_range
    from tpc.backends.torch import run_finite
    from tpc.train.finite import train_finite

    _seed_range(args.first_seed, args.seeds)
    prog = _load(args)
    _check_device(args.device)
    show = not args.json and not args.quiet
    from tpc import memory

    kept = memory.kept_bytes(memory.kept_per_seed(prog), args.seeds)
    also = f", and {memory.gb(kept)} for the outputs of all seeds" if kept >= 2**20 else ""
    print(f"{args.file}: width {args.width}, {args.seeds} seeds, {args.dtype} on {args.device}; "
          f"{_finite_need(prog, args.width, args)} per seed{also}", file=sys.stderr if args.json else sys.stdout,
          flush=True)
    update, close = _progress(args.seeds, f"width {args.width}", show)
    try:
        if args.workers or args.cluster:  # each seed a task on a Dask cluster (tpc.sweep): the same numbers
            from tpc.sweep import finite_runs

            res = finite_runs(prog, [args.width], args.seeds, args.first_seed, args.workers, args.cluster, args.dtype,
                              args.device, args.memory_gb, args.force, update,
                              allow_data_outside=args.allow_data_outside)[args.width]
        elif _is_network(prog):
            steps, close_steps = _step_bar(show and prog.train is not None)
            try:
                res = train_finite(prog, args.width, args.seeds, dtype=args.dtype, device=args.device,
                                   first_seed=args.first_seed, memory_gb=args.memory_gb, force=args.force,
                                   progress=update, on_step=steps)
            finally:
                close_steps()
        else:
            res = run_finite(prog, args.width, args.seeds, dtype=args.dtype, device=args.device,
                             first_seed=args.first_seed, memory_gb=args.memory_gb, force=args.force,
                             progress=update)
    finally:
        close()
    if args.json:
        return _print_outputs_json(res)
    for name, r in res.items():
        print(f"  {name} = {_fmt_array(r.mean, r.stderr)}")
    return 0


def cmd_limit(args: argparse.Namespace) -> int:
    from tpc.backends.limit import evaluate_limit

    prog = _load(args)
    _check_device(args.device)
    if args.out:
        return _tiled_limit(args, prog)
    if args.tile or args.cluster or args.workers != 2:
        raise TpcError("--tile, --workers and --cluster go with --out (kernels by tiles into files)")
    if _is_network(prog):
        res = _network_limit(args, prog)
    else:
        from tpc import memory

        itemsize = 4 if args.dtype == "float32" else 8
        print(f"{args.file}: infinite-width limit; about {memory.gb(memory.gaussian_bytes(prog, itemsize))} for "
              f"its kernels (by particles, if it needs them: "
              f"{memory.gb(memory.particle_bytes(prog, itemsize, args.particles or 2**16))} more)",
              file=sys.stderr if args.json else sys.stdout, flush=True)
        res = evaluate_limit(prog, method=args.method, dtype=args.dtype, particles=args.particles or 2**16,
                             replicates=args.replicates or 8, seed=args.seed, memory_gb=args.memory_gb,
                             force=args.force, device=args.device)
    if args.json:
        return _print_outputs_json(res)
    for name, r in res.items():
        print(f"  {name} [{r.method}] = {_fmt_array(r.value, r.stderr)}")
        if r.cov is not None:
            print(f"    random in the limit (the value is its mean); covariance: {_fmt_array(r.cov)}")
    return 0


def _tiled_limit(args: argparse.Namespace, prog) -> int:  # noqa: ANN001
    """`tpc limit FILE --out DIR`: the kernels by tiles on a Dask cluster, into DIR/<output>.npy."""
    from tpc.tiles import DEFAULT_TILE, plan, tiled_limit

    if _is_network(prog):
        raise TpcError("--out computes the kernels of a raw program by tiles; a network program's limit is "
                       "printed (drop --out)")
    ignored = [flag for flag, on in (("--device", args.device != "cpu"), ("--json", args.json),
                                     ("--particles", args.particles is not None), ("--replicates", args.replicates),
                                     ("--seed", args.seed)) if on]
    if ignored:  # tiles are deterministic kernels on the workers' CPUs, written to files
        raise TpcError(f"--out does not take {', '.join(ignored)}: its kernels are exact or by quadrature, "
                       "computed on the workers' CPUs and written to files")
    p = plan(prog, args.tile or DEFAULT_TILE)
    where = f"the Dask cluster at {args.cluster}" if args.cluster else f"a local Dask cluster of {args.workers} workers"
    print(f"{args.file}: {p.describe(args.workers)}; on {where}", flush=True)
    update, close = _step_bar(not args.quiet, "tiles", "tile", 0)
    try:
        paths = tiled_limit(prog, args.out, p.tile, args.workers, args.cluster, args.memory_gb, args.force,
                            args.method, args.dtype, update, tile_plan=p)
    finally:
        close()
    for name, path in paths.items():
        print(f"  {name}: {path} ({p.rows} x {p.rows} float64; numpy.load(path, mmap_mode='r'))")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """`tpc sweep FILE --grid ...`: every (width, seed, setting) a task on a Dask cluster; one table."""
    from tpc.sweep import sweep

    prog = _load(args)
    _check_device(args.device)
    where = f"the Dask cluster at {args.cluster}" if args.cluster else f"a local Dask cluster of {args.workers} workers"
    update_bar: Callable[[int, int], None] | None = None
    close_bar: Callable[[], None] = lambda: None

    def starting(total: int) -> None:  # the grid and every setting checked: the header, then the bar
        nonlocal update_bar, close_bar
        print(f"{args.file}: {total} runs (settings x widths x seeds) on {where}",
              file=sys.stderr if args.json else sys.stdout, flush=True)
        update_bar, close_bar = _step_bar(not args.json and not args.quiet, "runs", "run", 0)

    def update(done: int, total: int) -> None:
        if update_bar is not None:
            update_bar(done, total)

    try:
        res = sweep(prog, args.grid, args.workers, args.cluster, args.dtype, args.device, args.memory_gb, args.force,
                    update, allow_data_outside=args.allow_data_outside, starting=starting)
    finally:
        close_bar()
    if args.json:
        print(dumps(res.to_json()))
        return 0
    from tpc.backends.torch.run import FiniteResult

    print(f"mean ± standard error over seeds {', '.join(map(str, res.seeds))}")
    for (si, width), outs in sorted(res.values.items()):
        setting = " ".join(f"{k}={v}" for k, v in res.settings[si].items())
        print(f"{setting + ' ' if setting else ''}width {width}:")
        for name, v in outs.items():
            r = FiniteResult(name, v, width)
            print(f"  {name} = {_fmt_array(r.mean, r.stderr if v.shape[0] > 1 else None)}")
    return 0


def _network_limit(args: argparse.Namespace, net) -> dict:  # noqa: ANN001
    """The plan first (how many Gaussians, which method), then the limit with a bar per step."""
    from tpc.train.limit import describe, network_limit
    from tpc.train.pooled import kernels_only

    if args.dtype != "float64":  # not silently ignored
        raise TpcError(f"--dtype {args.dtype}: a network program's limit is computed in float64 (--dtype sets a "
                       "raw program's limit and the finite runs)")
    replicates = args.replicates if args.replicates is not None else 4
    print(f"{args.file}: {describe(net, args.method, args.particles, replicates, args.memory_gb)}",
          file=sys.stderr if args.json else sys.stdout, flush=True)
    bar = None
    if not args.json and not args.quiet and (net.train or net.program and net.program.iterations()) \
            and net.classification().regime == "feature learning" and not kernels_only(net):
        from tqdm import tqdm

        bar = tqdm(desc="training steps (limit, all replicates)", unit="step", file=sys.stderr, leave=False)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.refresh()

    try:
        return network_limit(net, method=args.method, particles=args.particles, replicates=args.replicates,
                             seed=args.seed, memory_gb=args.memory_gb, force=args.force, progress=progress,
                            device=args.device)
    finally:
        if bar is not None:
            bar.close()


def _load_for_widths(args: argparse.Namespace) -> tuple[Any, list[int]]:
    """compare's and coordcheck's start: the program, the device and the widths checked, and the
    plot's folder writable, before any run."""
    prog = _load(args)
    _check_device(args.device)
    widths = _widths(args.widths)
    if args.plot:
        _check_writable(args.plot)
    return prog, widths


def cmd_compare(args: argparse.Namespace) -> int:
    from tpc.compare import compare, plot

    prog, widths = _load_for_widths(args)
    print(f"{args.file}: widths {', '.join(map(str, widths))}, {args.seeds} seeds each; "
          f"{_finite_need(prog, max(widths), args)} per seed at width {max(widths)}",
          file=sys.stderr if args.json else sys.stdout, flush=True)
    update, close = _progress(args.seeds * len(widths), "finite widths", not args.json and not args.quiet)
    try:
        results = compare(prog, widths, args.seeds, method=args.method, dtype=args.dtype,
                          device=args.device, memory_gb=args.memory_gb, force=args.force, progress=update,
                          workers=args.workers, cluster=args.cluster, particles=args.particles,
                          replicates=args.replicates)
    finally:
        close()
    if args.plot:
        plot(results, args.plot, f"{args.file}: finite width vs limit ({args.seeds} seeds)")
    if args.json:
        print(dumps({"outputs": {k: v.to_json() for k, v in results.items()}, "widths": widths,
                     "seeds": args.seeds}))
        return 0
    print("errors against the limit, root-mean-square over entries (rms error: of single seeds; "
          "|mean - limit|: of the mean over seeds)")
    for name, comp in results.items():
        lim = comp.limit
        shape = "x".join(map(str, np.shape(lim.value))) or "scalar"
        value = _fmt_array(lim.value) if np.ndim(lim.value) == 0 else ""
        if lim.stderr is not None and np.size(lim.stderr):
            value += f" (the limit's own standard error: {float(np.max(lim.stderr)):.2g}" + \
                (" at most)" if np.ndim(lim.stderr) else ")")
        print(f"\n  {name} [{shape}], limit by {lim.method}: {value}")
        if comp.random:
            print("    random in the limit (a Gaussian readout, or f_0 in the kernel regime): single seeds do not "
                  "converge; the mean over seeds does, within its standard error")
        header = f"    {'width':>7}  {'|mean - limit|':>15}  {'stderr(mean)':>13}  {'rms error':>11}"
        print(header)
        for r in comp.rows:
            se = float(np.sqrt(np.mean(np.asarray(r.stderr) ** 2)))
            print(f"    {r.width:>7}  {r.mean_error:>15.4g}  {se:>13.3g}  {r.rms_error:>11.4g}")
        if not comp.random and len(widths) < 2:
            print("    (a slope needs two widths or more)")
        elif not comp.random:
            print(f"    fitted slope of log(rms error) vs log(n): {comp.slope:+.3f}  (n^-1/2 is -0.5); "
                  f"of log|mean - limit|: {comp.mean_slope:+.3f}")
    if args.plot:
        print(f"\nplot written to {args.plot}")
    return 0


def cmd_coordcheck(args: argparse.Namespace) -> int:
    from tpc import coordcheck as cc
    from tpc import memory

    prog, widths = _load_for_widths(args)
    steps, data = cc.check(prog, args.steps, args.data)
    cls = prog.classification()
    from tpc.train.pooled import particles_for

    note, need = cc.limit_plan(prog, steps, particles_for(prog, args.particles), args.replicates,
                               len(prog.data[data]))
    print(f"{args.file}: {prog.param_name} (r = {cls.r:g}, {cls.regime}); {f'steps 0..{steps}' if steps else 'step 0'} "
          f"on the {len(prog.data[data])} rows of {data}; widths {', '.join(map(str, widths))}, {args.seeds} "
          f"seed{'s' if args.seeds != 1 else ''} each; "
          f"{_finite_need(prog, max(widths), args)} per seed at width {max(widths)}"
          f"{f', about {memory.gb(need)} for the limit' if need else ''}; {note}",
          file=sys.stderr if args.json else sys.stdout, flush=True)
    runs = args.seeds * len(widths) + (args.replicates if need else 0)
    progress, close = _progress(runs, "coordcheck runs", not args.json and not args.quiet, "run")
    try:
        res = cc.coordcheck(prog, widths, args.seeds, steps, data, every=args.all, particles=args.particles,
                            replicates=args.replicates, seed=args.seed, dtype=args.dtype, device=args.device,
                            memory_gb=args.memory_gb, force=args.force, progress=progress)
    finally:
        close()
    if args.plot:
        cc.plot(res, args.plot, f"{args.file}: mean |coordinate| against width ({args.seeds} seeds)")
    if args.json:
        print(dumps(res.to_json()))
        return 0
    print(cc.text(res))
    if args.plot:
        print(f"\nplot written to {args.plot}")
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from tpc.parametrization import ABC, classify, classify_adaptive, preset

    entrywise = args.adaptive is not None
    trained = None
    given = [name for name, value in (("FILE", args.file), ("--preset", args.preset)) if value] + \
        (["--a/--b/--c"] if any(v is not None for v in (args.a, args.b, args.c)) else [])
    if len(given) > 1:  # one would silently win over the other
        raise TpcError(f"give one parametrization to classify: {' or '.join(given)}, not both")
    if args.layers is not None and not args.preset:
        raise TpcError("--layers goes with --preset (a program or --a/--b/--c give their own layers)")
    if args.file:
        net = _load(args)
        if not _is_network(net):
            raise TpcError("this program has no parametrization (no layers): classify a network program, or "
                           "give --preset / --a --b --c").locate(args.file, "")
        abc = net.abc
        entrywise = entrywise or net.entrywise  # a program trained with Adam is classified as such
        trained = net.trained_entries()  # the layers it trains: a program's r leaves the others out
    elif args.preset:
        # mean field is defined for one hidden layer; the others default to two
        abc = preset(args.preset, args.layers if args.layers is not None else (1 if args.preset == "mf" else 2))
    else:
        if args.a is None or args.b is None or args.c is None:
            raise TpcError("give --preset NAME (with --layers L), or all of --a, --b and --c")
        abc = ABC(_floats(args.a, "--a"), _floats(args.b, "--b"), _floats(args.c, "--c")[0])
    if args.adaptive:
        cp = _floats(args.adaptive, "--adaptive")
        if len(cp) != len(abc.a):
            raise TpcError(f"--adaptive has {len(cp)} exponents; the parametrization has {len(abc.a)} layers")
        abc = replace(abc, adaptive=cp)
    res = classify_adaptive(abc, trained) if entrywise else classify(abc, trained)
    if args.json:
        print(dumps(res.to_json()))
        return 0
    layers = f"{abc.hidden_layers} hidden layer" + ("s" if abc.hidden_layers != 1 else "")
    print(f"a = {list(abc.a)}, b = {list(abc.b)}, c = {abc.c:g}  ({layers})")
    if trained is not None:
        whole = classify_adaptive(abc) if entrywise else classify(abc)
        print(f"  this program trains {_entries(net, trained)} (every layer trained: r = {whole.r:g}, "
              f"{whole.regime})")
    if entrywise:
        print(f"  entrywise updates (Adam, sign-SGD): c' = {list(abc.adaptive_exponents())}")
    print(f"  r          {res.r:g}")
    print(f"  stable     {'yes' if res.stable else 'no'}")
    for why in res.failed:
        print(f"    fails    {why}")
    print(f"  nontrivial {'yes' if res.nontrivial else 'no'}")
    print(f"  regime     {res.regime}")
    return 0


def _entries(net, trained: tuple[bool, ...]) -> str:  # noqa: ANN001
    """The abc entries a program trains, by the names of the layers its updates move: 'V only', 'U, b
    and V only', 'no layer' (a bias shares the input layer's entry: training b alone names b)."""
    moved = set(net.program.trained_layers()) if net.program is not None else set()
    names = [la.name for la in sorted(net.layers.values(), key=lambda la: la.index)
             if not la.fixed and 0 <= la.index < len(trained) and trained[la.index] and la.name in moved]
    if not names:
        return "no layer"
    return (", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]) + " only"


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        values = tuple(float(eval_fraction(t)) for t in text.split(",") if t.strip())
    except ValueError:
        raise TpcError(f"{flag} expects comma-separated numbers (fractions like 1/2 allowed), got '{text}'") from None
    if not values:
        raise TpcError(f"{flag} expects comma-separated numbers, got '{text}'")
    return values


def eval_fraction(text: str) -> float:
    """A number or a fraction `p/q`, finite; ValueError otherwise."""
    num, _, den = text.strip().partition("/")
    value = float(num)
    if den:
        value = value / float(den) if float(den) != 0 else float("nan")
    if not np.isfinite(value):
        raise ValueError(text)
    return value


def _print_outputs_json(results: dict) -> int:
    """The `--json` object of run and limit: {"outputs": {name: ...}}."""
    print(dumps({"outputs": {k: v.to_json() for k, v in results.items()}}))
    return 0


def _check_writable(path: str) -> None:
    import os

    _check_matplotlib()
    if os.path.isdir(path):
        raise TpcError(f"--plot {path}: that is a folder; give a file name, such as {os.path.join(path, 'plot.png')}")
    from matplotlib.backend_bases import FigureCanvasBase

    kinds = FigureCanvasBase.get_supported_filetypes()
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    if ext not in kinds:  # matplotlib would fail (or append .png) only after every run
        raise TpcError(f"--plot {path}: the file name must end in one of matplotlib's formats: "
                       + ", ".join(f".{k}" for k in sorted(kinds)))
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise TpcError(f"--plot {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise TpcError(f"--plot {path}: the folder {folder} is not writable")


def _check_matplotlib() -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise TpcError("--plot draws with matplotlib, which is not installed here (pip install matplotlib)")


def _widths(text: str) -> list[int]:
    try:
        widths = [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise TpcError(f"--widths expects comma-separated whole numbers, got '{text}'") from None
    if not widths or min(widths) < 1:
        raise TpcError("--widths needs at least one positive width")
    from tpc.compare import once

    once(widths)
    return widths


# ---------------------------------------------------------------------------- parser


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tpc",
        description="tpc compiles Tensor Programs (.tp files) to finite-width PyTorch and to "
        "their infinite-width limit, and compares the two.",
    )
    p.add_argument("--version", action="version", version=f"tpc {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str, help_text: str, fn: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.add_argument("file", metavar="FILE", help="a .tp program")
        _data_opt(sp)
        sp.set_defaults(fn=fn)
        return sp

    ch = add("check", "Parse and check a program; print a summary (width, initial objects, "
             "instruction counts, outputs) or the errors.", cmd_check)
    _memory_opts(ch, "data")
    g = add("graph", "Print the program as numbered Netsor instructions (MatMul / Nonlin / Moment / "
            "initial), or export it as Graphviz DOT or JSON.", cmd_graph)
    g.add_argument("--format", choices=["text", "dot", "json"], default="text")
    _memory_opts(g, "data")
    g.add_argument("--unrolled", action="store_true",
                   help="a network program's SGD training as the unrolled Netsor-transpose program (short runs)")
    g.add_argument("--backward", action="store_true",
                   help="also show the backward instructions that autodiff derived (grad, tangent_kernel)")
    em = add("emit-torch", "Print a standalone PyTorch file (it imports only torch): a Netsor program as an nn.Module "
        "whose forward() takes the program's data; a network program as its model (an nn.Module initialised by "
        "the parametrization), an SGD builder with the per-layer learning rates, its losses and its training "
        "loop.", cmd_emit)
    _memory_opts(em, "data")

    def finite_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--seeds", type=_count(1), default=8, help="independent initialisations (default 8)")
        sp.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:K (default cpu)")
        sp.add_argument("--dtype", choices=["float32", "float64"], default="float64")
        sp.add_argument("--json", action="store_true", help="print one JSON object")
        sp.add_argument("--quiet", action="store_true", help="no progress bar")
        _memory_opts(sp, "a run")

    r = add("run", "Run the program at finite width for several seeds (vectorised across seeds); "
            "print each output's mean and standard error.", cmd_run)
    r.add_argument("--width", type=_count(1), required=True, help="the width n")
    r.add_argument("--first-seed", type=_count(0, MAX_SEED), default=0)
    r.add_argument("--workers", type=_count(1), default=None,
                   help="run each seed as a task on a local Dask cluster of this many workers")
    r.add_argument("--cluster", default=None, metavar="ADDRESS",
                   help="run each seed as a task on the Dask cluster at ADDRESS (tcp://host:8786)")
    finite_opts(r)

    lim = add("limit", "Compute the infinite-width limit (Master Theorem) of every output, and say "
              "how each was obtained.", cmd_limit)
    lim.add_argument("--method", default="auto",
                     choices=["auto", "exact", "closed-form", "quadrature", "monte-carlo"],
                     help="auto: exact where linear, closed forms where known, Gauss-Hermite "
                     "quadrature otherwise, Monte Carlo in high dimension")
    lim.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    lim.add_argument("--particles", type=_count(2), default=None,
                     help="Monte Carlo particles (default 65536; 4096 where entrywise updates of n x n layers, "
                     "Adam's, need P x P grids)")
    lim.add_argument("--replicates", type=_count(2, MAX_REPLICATES), default=None,
                     help="independent Monte Carlo runs, for the standard error (default 8; 4 for training)")
    lim.add_argument("--seed", type=_count(0, MAX_SEED), default=0,
                     help="the particles' seed: replicate r draws from the stream seed * 2^20 + r (default 0)")
    lim.add_argument("--device", type=_device, default="cpu",
                     help="cpu, cuda or cuda:K: where the kernels and particles are computed (default cpu)")
    lim.add_argument("--out", default=None, metavar="DIR",
                     help="compute N x N kernels by tiles on a Dask cluster into DIR/<output>.npy (memory-mapped)")
    lim.add_argument("--tile", type=_count(1), default=None, help="rows per tile with --out (default 2000)")
    lim.add_argument("--workers", type=_count(1), default=2, help="local Dask workers with --out (default 2)")
    lim.add_argument("--cluster", default=None, metavar="ADDRESS",
                     help="with --out: an existing Dask scheduler (tcp://host:8786) instead of a local cluster")
    _memory_opts(lim, "a limit")
    lim.add_argument("--json", action="store_true", help="print one JSON object")
    lim.add_argument("--quiet", action="store_true", help="no progress bar")

    sw = add("sweep", "Run the program over a grid of widths, seeds and its own parameters, each run a task on a "
             "Dask cluster (a local one, or --cluster); print one table (or --json).", cmd_sweep)
    sw.add_argument("--grid", required=True,
                    help="axes: 'width=64,256 seed=0..7 lr=0.1,0.3' (width and seed, any keyword of the train "
                    "statement or parametrization, param=mup,sp, a dim or a scalar)")
    sw.add_argument("--workers", type=_count(1), default=2, help="local Dask workers (default 2)")
    sw.add_argument("--cluster", default=None, metavar="ADDRESS",
                    help="an existing Dask scheduler (tcp://host:8786) instead of a local cluster")
    sw.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:K (default cpu)")
    sw.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    sw.add_argument("--json", action="store_true", help="print one JSON object")
    sw.add_argument("--quiet", action="store_true", help="no progress bar")
    _memory_opts(sw, "the sweep")

    c = add("compare", "Run finite widths and the limit; print each output's error per width and "
            "the fitted log-log slope (about -0.5 when the Master Theorem holds).", cmd_compare)
    c.add_argument("--widths", default="64,256,1024,4096", help="comma-separated widths")
    c.add_argument("--method", default="auto",
                   choices=["auto", "exact", "closed-form", "quadrature", "monte-carlo"])
    c.add_argument("--plot", metavar="PNG", help="write a log-log plot of error against width")
    c.add_argument("--particles", type=_count(2), default=None,
                   help="Monte Carlo particles of the limit, where it needs them (default: as tpc limit)")
    c.add_argument("--replicates", type=_count(2, MAX_REPLICATES), default=None,
                   help="independent particle sets of the limit")
    c.add_argument("--workers", type=_count(1), default=None,
                   help="run each (width, seed) as a task on a local Dask cluster of this many workers")
    c.add_argument("--cluster", default=None, metavar="ADDRESS",
                   help="run each (width, seed) as a task on the Dask cluster at ADDRESS (tcp://host:8786)")
    finite_opts(c)

    cc = add("coordcheck", "muP's coordinate check: the mean |coordinate| of each vector of the model (pre- and "
             "post-activations) and of its output, before the first update and after each of the first steps, at "
             "several widths and in the infinite-width limit; names the vectors that grow or vanish with the width.",
             cmd_coordcheck)
    cc.add_argument("--widths", default="64,128,256,512,1024,2048,4096", help="comma-separated widths")
    cc.add_argument("--seeds", type=_count(1), default=4, help="independent initialisations per width (default 4)")
    cc.add_argument("--steps", type=_count(0), default=None,
                    help="steps 0..K: before the first update and after each of the first K top-level loop "
                    "iterations (default 3, or fewer where the loops are shorter)")
    cc.add_argument("--data", default=None, metavar="NAME",
                    help="the data set whose rows are averaged over (default: the first the loop applies the model to)")
    cc.add_argument("--all", action="store_true",
                    help="every vector of the model (a norm's parts, residual sums), not only the pre-activations "
                    "and what each layer reads")
    cc.add_argument("--particles", type=_count(2), default=None,
                    help="Monte Carlo particles of the limit (default 65536; 4096 with entrywise updates)")
    cc.add_argument("--replicates", type=_count(2, MAX_REPLICATES), default=4,
                    help="independent particle sets of the limit, for its standard error (default 4)")
    cc.add_argument("--seed", type=_count(0, MAX_SEED), default=0, help="the limit's particle seed")
    cc.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:K (default cpu)")
    cc.add_argument("--dtype", choices=["float32", "float64"], default="float64", help="of the finite runs")
    cc.add_argument("--plot", "--png", metavar="PNG", dest="plot",
                    help="write a figure: a log-log panel per step, the limit dashed")
    cc.add_argument("--json", action="store_true", help="print one JSON object (every number)")
    cc.add_argument("--quiet", action="store_true", help="no progress bar")
    _memory_opts(cc, "a run")

    cl = sub.add_parser("classify", help="Classify an abc-parametrization (TP4): r, stability, "
                        "nontriviality, and the regime, feature learning or kernel.",
                        description="Classify an abc-parametrization by TP4's Dynamical Dichotomy: "
                        "W^l = n^-a_l w^l, w^l ~ N(0, n^-2b_l), learning rate eta n^-c, for layers "
                        "1 (input) .. L (hidden), L+1 (readout).")
    cl.add_argument("file", metavar="FILE", nargs="?", help="a network program (its parametrization and layers)")
    cl.add_argument("--preset", choices=["sp", "ntk", "mup", "mf"], help="a named parametrization")
    cl.add_argument("--layers", type=_count(1), default=None,
                    help="hidden layers L for a preset (default 2; 1 for mf, which is defined for one)")
    cl.add_argument("--a", help="a_1,...,a_{L+1} (comma-separated; fractions like -1/2 allowed)")
    cl.add_argument("--b", help="b_1,...,b_{L+1}")
    cl.add_argument("--c", help="c")
    cl.add_argument("--adaptive", nargs="?", const="", metavar="C'",
                    help="classify entrywise updates (Adam, sign-SGD): their exponents c'_1,...,c'_{L+1}, or none "
                    "for the parametrization's own (muP's from TP5; c for the others)")
    cl.add_argument("--json", action="store_true", help="print one JSON object")
    _data_opt(cl)
    cl.set_defaults(fn=cmd_classify)
    return p


def _join_signed_values(argv: list[str]) -> list[str]:
    """`--a -1/2,0,1/2`: argparse takes a value that starts with '-' for an option, so the three
    list options are joined with their value (`--a=-1/2,0,1/2`), as the user meant."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in ("--a", "--b", "--c") and i + 1 < len(argv) and argv[i + 1][:1] == "-" \
                and argv[i + 1][1:2] in tuple("0123456789."):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(_join_signed_values(sys.argv[1:] if argv is None else list(argv)))
    try:
        return args.fn(args)
    except TpcError as err:
        if err.filename == "<program>":
            path = getattr(args, "file", None)
            err.filename = path or "tpc"
            if path and err.span is not None:  # raised after loading (a backend's refusal): show its line too
                try:
                    err.source = Path(path).read_text(encoding="utf-8", errors="replace")
                except OSError:
                    pass
        print(err.render(), file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
