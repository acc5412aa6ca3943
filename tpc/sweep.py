"""Sweeps: one program over a grid of widths, seeds and program parameters, each (width, seed,
setting) run a task on a Dask cluster (a local one by default, or an existing one).

A grid is written `width=64,256,1024 lr=0.1,0.3 seed=0..7`. `width` and `seed` are the run's; any
other axis names a parameter of the program, changed in its syntax tree before it is built (never
by editing its text): a keyword of the `train` statement or of the parametrization (`lr`, `steps`,
`batch`, ...), `param` for the parametrization itself (`param=mup,sp,ntk`), a `dim` or a raw
program's `scalar`. Each task runs one seed at one width, as `tpc run --first-seed S --seeds 1`
does, so the results are the serial run's, whatever the cluster or the order of the tasks. Each
task declares the memory it needs (the finite run's own estimate) as the Dask resource `MEMORY`;
the local cluster gives each worker its share of the budget, so the engine never runs more at once
than fits. A worker that dies has its tasks rerun by the engine.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from tpc import memory
from tpc import syntax as ast
from tpc.errors import TpcError
from tpc.seeds import MAX_SEED

RUN_AXES = ("width", "seed")
MAX_TASKS = 100_000


def parse_grid(text: str) -> dict[str, list[str]]:
    """`width=64,256 lr=0.1,0.3 seed=0..7` -> {"width": ["64", "256"], ...} (ranges expanded)."""
    axes: dict[str, list[str]] = {}
    for part in text.split():
        name, eq, values = part.partition("=")
        if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or not values:
            raise TpcError(f"--grid: '{part}' is not name=v1,v2,... (or name=a..b for whole numbers)")
        if name in axes:
            raise TpcError(f"--grid: '{name}' is given twice")
        items: list[str] = []
        for v in values.split(","):
            lo, dots, hi = v.partition("..")
            if dots:
                if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                    raise TpcError(f"--grid: '{v}' is not a range a..b of whole numbers with a <= b")
                if int(hi) - int(lo) >= MAX_TASKS:
                    raise TpcError(f"--grid: '{v}' has more than {MAX_TASKS} values")
                items += [str(i) for i in range(int(lo), int(hi) + 1)]
            elif v:
                items.append(v)
        if not items:
            raise TpcError(f"--grid: '{name}' has no values")
        if len(set(items)) != len(items):  # a seed twice would count as two independent runs
            raise TpcError(f"--grid: '{name}' repeats a value")
        axes[name] = items
    for name in RUN_AXES:
        for v in axes.get(name, []):
            if not v.isdigit() or name == "width" and int(v) < 1:
                raise TpcError(f"--grid: {name} takes whole numbers{' of at least 1' if name == 'width' else ''}, "
                               f"got '{v}'")
            if name == "seed" and int(v) > MAX_SEED:
                raise TpcError(f"--grid: a seed is at most {MAX_SEED}, got '{v}'")
    for name, values in axes.items():  # lr=0.1,0.10 or seed=0,00: one setting or seed twice
        numbers = [_float_or_none(v) for v in values]
        if None not in numbers and len(set(numbers)) != len(numbers):
            raise TpcError(f"--grid: '{name}' repeats a value")
    if "width" not in axes:
        raise TpcError("--grid needs widths: width=64,256,...")
    return axes


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def settings(axes: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every combination of the program's own axes (one empty setting if there are none)."""
    names = [k for k in axes if k not in RUN_AXES]
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*(axes[k] for k in names))]


def _number(text: str, axis: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise TpcError(f"--grid: {axis} takes numbers, got '{text}'") from None
    if not np.isfinite(value):
        raise TpcError(f"--grid: {axis} takes finite numbers, got '{text}'")
    return value


def with_setting(module: ast.Module, setting: dict[str, str]) -> ast.Module:
    """The program with each named parameter set to its value in the setting."""
    used: set[str] = set()
    known: set[str] = set()
    out: list[ast.Stmt] = []
    for s in module.statements:
        if isinstance(s, (ast.TrainDecl, ast.ParamDecl)):
            kwargs = []
            for kw in s.kwargs:
                known.add(kw.name)
                if kw.name in setting:
                    used.add(kw.name)
                    kw = replace(kw, value=ast.Num(kw.value.span, _number(setting[kw.name], kw.name)))
                kwargs.append(kw)
            s = replace(s, kwargs=tuple(kwargs))
            if isinstance(s, ast.ParamDecl):
                known.add("param")
            if isinstance(s, ast.ParamDecl) and "param" in setting:
                used.add("param")
                s = replace(s, name=setting["param"])
        elif isinstance(s, ast.DimDecl):
            known.add(s.name)
            if s.name in setting:
                used.add(s.name)
                value = _number(setting[s.name], s.name)
                if value != int(value) or value < 1:
                    raise TpcError(f"--grid: dim {s.name} takes whole numbers of at least 1")
                s = replace(s, value=int(value))
        elif isinstance(s, ast.ScalarDecl):
            known.add(s.name)
            if s.name in setting:
                used.add(s.name)
                s = replace(s, value=ast.Num(s.value.span, _number(setting[s.name], s.name)))
        out.append(s)
    missing = set(setting) - used
    if missing:
        name = sorted(missing)[0]
        raise TpcError(f"--grid: '{name}' names no parameter of this program (its parameters: "
                       f"{', '.join(sorted(known | set(RUN_AXES)))})")
    return ast.Module(out)


def build_with(source: str, filename: str, base_dir: Path, setting: dict[str, str],
               allow_data_outside: bool = False) -> object:
    """Parse, set the parameters, build (errors located in the program's file)."""
    from tpc.build import _build_any
    from tpc.data import DataPolicy
    from tpc.syntax import parse

    module = parse(source, filename)
    try:
        module = with_setting(module, setting)
    except TpcError as err:
        raise err.locate(filename, source) from None
    return _build_any(module, filename, source, base_dir, DataPolicy(allow_outside=allow_data_outside))


def run_task(source: str, filename: str, base_dir: str, setting: dict[str, str], width: int, seed: int,
             dtype: str, device: str, threads: int, allow_data_outside: bool = False) -> dict[str, np.ndarray]:
    """On a worker: one seed at one width (the serial run's numbers for that seed). The program's
    data files are read again here, from the same paths: a remote cluster needs them on a shared
    filesystem."""
    import torch

    import tpc

    torch.set_num_threads(threads)
    prog = build_with(source, filename, Path(base_dir), setting, allow_data_outside)
    res = tpc.run(prog, width, 1, first_seed=seed, dtype=dtype, device=device, force=True)
    return {name: r.values[0] for name, r in res.items()}


@dataclass
class SweepResult:
    axes: dict[str, list[str]]
    # (setting index, width) -> output -> (seeds, *shape)
    values: dict[tuple[int, int], dict[str, np.ndarray]] = field(default_factory=dict)
    settings: list[dict[str, str]] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        from tpc.backends.torch.run import FiniteResult

        rows = []
        for (si, width), outs in sorted(self.values.items()):
            for name, v in outs.items():
                r = FiniteResult(name, v, width)  # its mean and error, safe near the largest float
                rows.append({"setting": self.settings[si], "width": width, "output": name, "seeds": self.seeds,
                             "mean": r.mean.tolist(), "stderr": r.stderr.tolist() if v.shape[0] > 1 else None,
                             "values": v.tolist()})
        # widths and seeds as the rows give them (numbers); a setting as written (`param=mup`, `lr=0.1`)
        grid = {k: [int(v) for v in vs] if k in RUN_AXES else vs for k, vs in self.axes.items()}
        return {"grid": grid, "rows": rows}


def sweep(path_or_prog: object, grid: str, workers: int = 2, cluster: str | None = None, dtype: str = "float64",
          device: str = "cpu", memory_gb: float | None = None, force: bool = False,
          progress: Callable[[int, int], None] | None = None, allow_data_outside: bool = False,
          starting: Callable[[int], None] | None = None) -> SweepResult:
    """Runs every (width, seed, setting) of the grid as a task; `progress(done, total)`, and
    `starting(runs)` once every setting has been built and checked, before the cluster starts."""
    from tpc import load
    from tpc.backends import device as on_device

    on_device.check(device)
    memory_gb = on_device.memory_gb(device, memory_gb)  # on CUDA the workers share the device's memory
    prog = path_or_prog if hasattr(path_or_prog, "source") else load(path_or_prog)
    source, filename = prog.source, prog.filename  # type: ignore[attr-defined]
    base = str(Path(filename).resolve().parent) if filename and Path(filename).exists() else os.getcwd()
    axes = parse_grid(grid)
    combos = settings(axes)
    widths = [int(w) for w in axes["width"]]
    seeds = [int(s) for s in axes.get("seed", ["0"])]
    tasks = [(si, w, s) for si in range(len(combos)) for w in widths for s in seeds]
    if len(tasks) > MAX_TASKS:
        raise TpcError(f"--grid makes {len(tasks)} runs, more than {MAX_TASKS}")
    # each setting is built here first: a bad value is an error before any task runs
    itemsize = 4 if dtype == "float32" else 8
    need = {}
    for si, setting in enumerate(combos):
        built = build_with(source, filename, Path(base), setting, allow_data_outside)
        for w in widths:
            need[si, w] = memory.finite_bytes_per_seed(built, w, itemsize)
    workers = max(1, workers)
    budget = memory.budget_gb(memory_gb) * 2**30
    share = budget / workers
    biggest = max(need.values())
    if biggest > share and not force:
        raise TpcError(f"the largest run would take about {memory.gb(biggest)}, more than a worker's share of the "
                       f"budget ({memory.gb(share)} = {memory.gb(budget)} / {workers} workers); --memory-gb, fewer "
                       "--workers or smaller widths (--force runs it anyway)")
    if starting is not None:
        starting(len(tasks))
    from tpc.tiles import connect, engine

    dist = engine()
    own = None
    if cluster is None:
        own = dist.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                           resources={"MEMORY": max(share, biggest)}, memory_limit=0)
    client = connect(dist, cluster, own)
    result = SweepResult(axes, settings=combos, seeds=seeds)
    try:
        advertised = [(w.get("resources") or {}).get("MEMORY") for w in client.scheduler_info()["workers"].values()]
        declared = bool(advertised) and None not in advertised  # else Dask's own memory limits apply
        if declared and max(advertised) < biggest and not force:  # no worker could ever take the largest run
            raise TpcError(f"the largest run would take about {memory.gb(biggest)}; the cluster's workers offer at "
                           f"most {memory.gb(max(advertised))} (their MEMORY resource)")
        threads = max(1, (os.cpu_count() or 1) // workers) if cluster is None else 1
        futures = {}
        for si, w, s in tasks:
            res = {"MEMORY": need[si, w]} if declared else None  # an existing cluster may not declare it
            fut = client.submit(run_task, source, filename, base, combos[si], w, s, dtype, device, threads,
                                allow_data_outside, pure=False, resources=res)
            futures[fut] = (si, w, s)
        parts: dict[tuple[int, int], dict[int, dict[str, np.ndarray]]] = {}
        done = 0
        for fut in dist.as_completed(list(futures)):
            si, w, s = futures.pop(fut)
            parts.setdefault((si, w), {})[s] = fut.result()
            fut.release()
            done += 1
            if progress:
                progress(done, len(tasks))
    finally:
        client.close()
        if own is not None:
            own.close()
    for key, by_seed in parts.items():
        names = by_seed[seeds[0]].keys()
        result.values[key] = {n: np.stack([by_seed[s][n] for s in seeds]) for n in names}
    return result


def finite_runs(prog: object, widths: list[int], seeds: int, first_seed: int = 0, workers: int | None = None,
                cluster: str | None = None, dtype: str = "float64", device: str = "cpu",
                memory_gb: float | None = None, force: bool = False,
                progress: Callable[[int], None] | None = None,
                allow_data_outside: bool = False) -> dict[int, dict]:
    """What `tpc run` (one width) and `tpc compare` compute in process, from the engine: for each
    width, each output's FiniteResult over the seeds; `progress(k)` counts k more finished runs."""
    from tpc.backends.torch.run import FiniteResult

    done = [0]

    def tick(finished: int, _total: int) -> None:
        if progress:
            progress(finished - done[0])
        done[0] = finished

    grid = f"width={','.join(map(str, widths))} seed={first_seed}..{first_seed + seeds - 1}"
    res = sweep(prog, grid, workers or 2, cluster, dtype, device, memory_gb, force, tick,
                allow_data_outside=allow_data_outside)
    return {w: {k: FiniteResult(k, v, w) for k, v in res.values[0, w].items()} for w in widths}
