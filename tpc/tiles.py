"""Kernels larger than memory: a raw program's N x N outputs (NNGP, NTK) computed by tiles on a
Dask cluster and streamed into .npy files on disk.

Each entry of such a kernel depends only on its two inputs (no instruction mixes the elements of
a batch), so the block of rows I and columns J is the program's limit on the rows I + J of its
data set, cut out. A task takes a pair of row blocks I < J and returns the blocks it owns: (I, J),
(J, I) unless the output is symmetric, and (I, I) or (J, J) if it is the first task to hold that
block; its memory is the limit's at 2B inputs (B = `tile`), whatever N is, and
it needs only the rows of its two blocks. The client writes the blocks into .npy files as tasks
finish (in any order, by pwrite), so no process ever holds a kernel whole; read them back with
`numpy.load(path, mmap_mode="r")`.

The engine is Dask distributed (a local cluster by default, `cluster=ADDRESS` for an existing
one): it places the tasks, reruns those of a worker that dies, and reports progress. It is
imported only here, only when a tiled limit runs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from tpc import memory
from tpc.data import DataPolicy
from tpc.errors import TpcError, clip
from tpc.ir import Program

DEFAULT_TILE = 2000


@dataclass
class TilePlan:
    """What a tiled limit will do, stated before it runs."""

    data: str  # the load("...") text of the data set the kernels are over
    rows: int  # N
    tile: int  # B
    outputs: list[str]
    symmetric: set[str]  # outputs equal to their transpose (cov(f), tangent_kernel): (J, I) is (I, J).T
    tasks: list[tuple[int, int]]  # pairs of block indices (i < j), or (0, 0) for a single block
    task_bytes: int  # the memory one task may take (the limit at 2B inputs)
    out_bytes: int  # the .npy files together
    blocks: list[tuple[int, int]] = field(default_factory=list)  # row ranges

    def describe(self, workers: int) -> str:
        return (f"{len(self.outputs)} kernel(s) of {self.rows} x {self.rows} by tiles of {self.tile} rows: "
                f"{len(self.tasks)} tasks, each about {memory.gb(self.task_bytes)} (the limit on "
                f"{min(self.rows, 2 * self.tile)} inputs), {workers} at a time; "
                f"{memory.gb(self.out_bytes)} written to disk")


def plan(prog: Program, tile: int = DEFAULT_TILE) -> TilePlan:
    """Checks that the program's outputs can be computed by tiles and plans them."""
    # tpc's own arrays (the identity behind `U.T @ x / n`, autodiff's ones) are not the user's data
    data = [n for n in prog.needed() if n.op == "data" and not n.params.get("gram")
            and not n.params.get("constant") and not n.params.get("like")]
    batches = [n for n in data if len(n.shape) == 2]
    if len(batches) != 1 or not batches[0].params.get("source"):
        raise TpcError("a tiled limit needs one data set loaded from a file (`data X = load(\"X.npy\")`): the "
                       "batch the kernels are over").locate(prog.filename, prog.source)
    x = batches[0]
    rows = x.shape[0]
    trial = _check_pairwise(prog, str(x.params["source"]), _data_rows(prog, str(x.params["source"]))[:4])
    symmetric = {name for name, k in trial.items() if np.allclose(k, k.T, rtol=1e-12, atol=0)}
    for name, nid in prog.outputs.items():
        if prog.node(nid).shape != (rows, rows):
            raise TpcError(f"output '{name}' is not an N x N kernel of the batch ({rows} x {rows}): a tiled limit "
                           "computes kernels (cov, tangent_kernel)", prog.node(nid).span).locate(prog.filename,
                                                                                                 prog.source)
    tile = max(1, min(tile, rows))
    blocks = [(r, min(rows, r + tile)) for r in range(0, rows, tile)]
    tasks = [(i, j) for i in range(len(blocks)) for j in range(i + 1, len(blocks))] or [(0, 0)]
    # the limit at 2B inputs: scale the estimate of the whole program by the squared batch sizes
    whole = memory.gaussian_bytes(prog, 8)
    task_rows = min(rows, 2 * tile)
    task_bytes = int(whole * (task_rows / rows) ** 2) + 8 * len(prog.outputs) * task_rows**2 * 2
    return TilePlan(str(x.params["source"]), rows, tile, list(prog.outputs), symmetric, tasks, task_bytes,
                    8 * len(prog.outputs) * rows * rows, blocks)


def _base_dir(prog: Program) -> Path:
    return Path(prog.filename).resolve().parent if prog.filename else Path.cwd()


def _build_on(source: str, filename: str, base_dir: Path, data: str, rows: np.ndarray) -> Program:
    """The program again, with `rows` standing for its data set (the trial here, a task on a worker)."""
    from tpc.build import _build_any
    from tpc.syntax import parse

    policy = DataPolicy(allow_outside=True, arrays={data: np.ascontiguousarray(rows)})
    return _build_any(parse(source, filename), filename, source, base_dir, policy)  # type: ignore[return-value]


def _check_pairwise(prog: Program, data: str, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Refuses a program whose limit mixes the elements of its batch (a Zdot across them, which the
    particle evaluator takes): there a tile's entries would depend on the other rows of the tile.
    Tried on a few rows: whether it mixes depends on the program, not on the batch's size."""
    import torch

    from tpc.backends.limit.evaluate import LimitEvaluator, NeedsParticles

    try:
        with torch.no_grad():
            out = LimitEvaluator(_build_on(prog.source, prog.filename, _base_dir(prog), data, rows)).run()
        # with distinct rows, a kernel that is its own transpose by construction is so here
        return {name: _whole(v.value).double().numpy() for name, v in out.items()}
    except NeedsParticles:
        raise TpcError("a tiled limit needs kernels whose entries depend on two inputs only; this program's "
                       "limit mixes the elements of its batch (a transpose applied after the batch)"
                       ).locate(prog.filename, prog.source) from None


def _whole(value: object) -> object:
    from tpc.backends.limit.symmetric import whole

    return whole(value)  # type: ignore[arg-type]


def tile_task(source: str, filename: str, base_dir: str, data: str, x: np.ndarray, rows_i: tuple[int, int],
              rows_j: tuple[int, int] | None, options: dict, owns: tuple[bool, bool],
              symmetric: frozenset[str] = frozenset()) -> dict[str, dict]:
    """On a worker: the program's limit on rows I (+ J) of its data set, cut into the blocks this task
    owns: (I, J) always, (I, I) and (J, J) where `owns` says (one task owns each diagonal block, so
    each entry is sent and written once; (J, I) is (I, J) transposed)."""
    import torch

    from tpc.backends.limit.evaluate import evaluate_limit

    torch.set_num_threads(options.pop("threads", 1))
    idx = np.arange(*rows_i) if rows_j is None else np.concatenate([np.arange(*rows_i), np.arange(*rows_j)])
    prog = _build_on(source, filename, Path(base_dir), data, x[idx])
    out = evaluate_limit(prog, force=True, **options)  # the plan checked the memory of every task
    sampled = [name for name, o in out.items() if "monte-carlo" in o.method]
    if sampled:
        raise TpcError(f"output '{sampled[0]}' is taken by Monte Carlo here: a tiled limit needs kernels without "
                       "it (closed forms, quadrature), as tiles of random estimates would not fit together",
                       prog.node(prog.outputs[sampled[0]]).span).locate(filename, source)
    b = rows_i[1] - rows_i[0]
    blocks: dict[str, dict] = {}
    for name, o in out.items():
        k = o.value
        parts = {}
        if owns[0]:
            parts["ii"] = np.ascontiguousarray(k[:b, :b])
        if rows_j is not None:
            parts["ij"] = np.ascontiguousarray(k[:b, b:])
            if name not in symmetric:
                parts["ji"] = np.ascontiguousarray(k[b:, :b])
            if owns[1]:
                parts["jj"] = np.ascontiguousarray(k[b:, b:])
        blocks[name] = parts
    return blocks


class NpyWriter:
    """An N x N float64 .npy file written block by block with pwrite: a memory map would count
    every page written as the client's resident memory (a 12.8 GB kernel would all be resident)."""

    def __init__(self, path: Path, n: int) -> None:
        np.lib.format.open_memmap(path, mode="w+", dtype=np.float64, shape=(n, n)).flush()  # header, sparse body
        self.path = path
        self.n = n
        self.offset = path.stat().st_size - 8 * n * n
        self.fd = os.open(path, os.O_WRONLY)

    def write(self, r0: int, c0: int, block: np.ndarray) -> None:
        rows = np.ascontiguousarray(block, dtype=np.float64)
        for r in range(rows.shape[0]):
            data = rows[r].tobytes()
            if os.pwrite(self.fd, data, self.offset + 8 * ((r0 + r) * self.n + c0)) != len(data):
                raise TpcError(f"writing {self.path} stopped short (is the disk full?)")

    def close(self) -> None:
        os.close(self.fd)


def tiled_limit(prog: Program, out_dir: str | Path, tile: int = DEFAULT_TILE, workers: int = 2,
                cluster: str | None = None, memory_gb: float | None = None, force: bool = False,
                method: str = "auto", dtype: str = "float64",
                progress: Callable[[int, int], None] | None = None,
                tile_plan: TilePlan | None = None) -> dict[str, Path]:
    """Every output of `prog` (N x N kernels) into out_dir/<output>.npy, by tiles on Dask workers;
    `tile_plan`: the plan already made for this program and tile (the CLI prints it first)."""
    p = tile_plan or plan(prog, tile)
    workers = max(1, workers)
    need = p.task_bytes * workers
    try:
        memory.require(need, f"{workers} tile task(s) at once ({memory.gb(p.task_bytes)} each)", memory_gb, force,
                       hint="a smaller --tile or fewer --workers")
    except TpcError as err:
        raise err.locate(prog.filename, prog.source) from None
    dist = engine()
    out = Path(out_dir)
    x = _data_rows(prog, p.data)
    paths = {name: out / f"{name}.npy" for name in p.outputs}
    made = not out.exists()  # a folder this run makes is removed again if the run fails
    # written as NAME.npy.partial and renamed when every tile is in: a failed run leaves no file that
    # looks like a kernel
    files: dict[str, NpyWriter] = {}
    own = client = None
    finished = False
    try:
        try:
            out.mkdir(parents=True, exist_ok=True)
            for name, path in paths.items():
                files[name] = NpyWriter(path.with_suffix(".npy.partial"), p.rows)
        except OSError as err:
            raise TpcError(f"--out {clip(str(out), 160)}: cannot write the kernels there ({err.strerror or err})",
                           hint="--out names a folder (made if it does not exist) that this user may write "
                           "to") from None
        if cluster is None:
            own = dist.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                               memory_limit=max(p.task_bytes * 2, 2**30))
        client = connect(dist, cluster, own)
        threads = max(1, (os.cpu_count() or 1) // workers) if cluster is None else 1
        options = {"method": method, "dtype": dtype, "threads": threads}
        xf = client.scatter(x, broadcast=True)
        base = str(_base_dir(prog))
        owner: dict[int, tuple[int, int]] = {}  # the first task with block i writes (I, I)
        for task in p.tasks:
            for b in set(task):
                owner.setdefault(b, task)
        pending = iter(p.tasks)
        futures = {}

        def submit() -> None:
            task = next(pending, None)
            if task is not None:
                i, j = task
                owns = (owner[i] == task, owner[j] == task)
                fut = client.submit(tile_task, prog.source, prog.filename, base, p.data, xf, p.blocks[i],
                                    None if i == j else p.blocks[j], dict(options), owns,
                                    frozenset(p.symmetric), pure=False,
                                    key=f"tpc-tile-{i}-{j}-{time.time_ns()}")
                futures[fut] = task
                queue.add(fut)

        queue = dist.as_completed()
        for _ in range(2 * workers):  # at most two tasks a worker in flight: finished blocks wait for the client
            submit()
        done = 0
        for fut in queue:
            i, j = futures.pop(fut)
            _write(files, fut.result(), p.blocks[i], None if i == j else p.blocks[j])
            fut.release()
            submit()
            done += 1
            if progress:
                progress(done, len(p.tasks))
        finished = True
    finally:
        if client is not None:
            client.close()
        if own is not None:
            own.close()
        for name, f in files.items():
            f.close()
            if finished:
                f.path.replace(paths[name])
            else:
                f.path.unlink(missing_ok=True)
        if made and not finished and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
    return paths


def engine() -> ModuleType:
    """The module dask.distributed (Client, LocalCluster, as_completed), or a clear error where it is not
    installed. Its workers' own logs are kept to critical ones: a task's error reaches the user as
    tpc's message, once."""
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "critical")
    try:
        import dask.distributed as dist
    except ImportError:
        raise TpcError("this needs Dask distributed, which is not installed: pip install \"tpc[distributed]\" "
                       "(or pip install \"dask[distributed]\")") from None
    return dist


CONNECT_SECONDS = 10  # a scheduler given by --cluster answers within this, or it is an error


def connect(dist: ModuleType, cluster: str | None, own: object) -> Any:
    """A Dask client of the scheduler at `cluster` (or of our own local cluster): an address that does
    not answer, or is not one, is an error naming it, not a traceback."""
    if cluster is None:
        return dist.Client(own)
    try:
        return dist.Client(cluster, timeout=CONNECT_SECONDS)
    except (OSError, TimeoutError, ValueError, TypeError) as err:
        raise TpcError(f"cannot reach the Dask scheduler at {clip(cluster)}: {clip(str(err), 160)}",
                       hint="start one (dask scheduler) and give its address as tcp://host:8786") from None


def _write(files: dict[str, NpyWriter], blocks: dict[str, dict], rows_i: tuple[int, int],
           rows_j: tuple[int, int] | None) -> None:
    i0 = rows_i[0]
    for name, parts in blocks.items():
        f = files[name]
        if "ii" in parts:
            f.write(i0, i0, parts["ii"])
        if rows_j is not None:
            j0 = rows_j[0]
            f.write(i0, j0, parts["ij"])
            f.write(j0, i0, parts["ji"] if "ji" in parts else parts["ij"].T)
            if "jj" in parts:
                f.write(j0, j0, parts["jj"])


def _data_rows(prog: Program, data: str) -> np.ndarray:
    from tpc.ir import data_value

    node = next(n for n in prog.needed() if n.op == "data" and n.params.get("source") == data)
    return np.asarray(data_value(prog, node), dtype=np.float64)
