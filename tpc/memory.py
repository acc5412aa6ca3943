"""Memory budgets: every command that allocates states what it needs before it allocates, and
refuses beyond a budget (`--memory-gb`, by default half of this machine's memory) unless forced.

The estimates are deliberately generous (every kernel and vector the evaluation may hold at
once, plus temporaries): refusing a run that would have fitted costs a flag, running one that
does not fit costs the machine."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import numpy as np

from tpc.errors import Span, TpcError

if TYPE_CHECKING:
    from tpc.ir import Program

FALLBACK_GB = 8.0


def machine_gb() -> float | None:
    """Physical memory in GiB, where the platform says."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (AttributeError, ValueError, OSError):
        return None


def env_gb() -> float | None:
    """$TPC_MEMORY_GB, where it is set to a positive number."""
    try:
        env = float(os.environ.get("TPC_MEMORY_GB", "nan"))
    except ValueError:
        return None
    return env if env > 0 and math.isfinite(env) else None


def default_gb() -> float:
    """The default budget: $TPC_MEMORY_GB if set, else half of the machine's memory (the rest is
    the system's and torch's own)."""
    env = env_gb()
    if env is not None:
        return env
    total = machine_gb()
    return round(total / 2, 1) if total else FALLBACK_GB


def gb(nbytes: float) -> str:
    """A size in readable units."""
    for unit, size in (("TB", 2**40), ("GB", 2**30), ("MB", 2**20)):
        if nbytes >= 0.1 * size:
            return f"{nbytes / size:.3g} {unit}"
    return f"{max(nbytes / 2**10, 0.01):.3g} KB"


def budget_gb(memory_gb: float | None) -> float:
    """The budget in GB: the default where none is given; a given one must be a positive number."""
    if memory_gb is None:
        return default_gb()
    if isinstance(memory_gb, bool) or not isinstance(memory_gb, (int, float)) or not 0 < memory_gb < math.inf:
        raise TpcError(f"the memory budget must be a positive number of GB, got {memory_gb!r}")
    return float(memory_gb)


def require(nbytes: float, what: str, memory_gb: float | None, force: bool = False,
            span: Span | None = None, hint: str = "") -> None:
    """Refuse `what` if it needs more than the budget (unless forced), naming both figures."""
    budget = budget_gb(memory_gb)
    if nbytes > budget * 2**30 and not force:
        raise TpcError(f"{what} would take about {gb(nbytes)}, more than the {budget:g} GB allowed "
                       f"(--memory-gb{', or ' + hint if hint else ''}; --force runs it anyway)", span)


def kept_per_seed(prog: object) -> int:
    """The bytes of one seed's outputs that a raw program's finite run keeps to its end (float64);
    a network program's outputs are small beside its weights: 0."""
    from tpc.train.network import Network

    if isinstance(prog, Network):
        return 0
    return 8 * sum(_size(prog.node(nid).shape) for nid in prog.outputs.values())  # type: ignore[attr-defined]


def kept_bytes(kept_per_seed: int, seeds: int) -> int:
    """The outputs of `seeds` seeds as a run holds them at its end: the parts, their concatenation and
    the scaled copy a mean or standard error divides."""
    return 3 * kept_per_seed * seeds


def seeds_at_once(per_seed: int, seeds: int, what: str, memory_gb: float | None, force: bool,
                  filename: str, source: str, kept_per_seed: int = 0) -> int:
    """How many seeds a finite run takes at once within the budget (at least one, if it fits).
    `kept_per_seed`: each seed's outputs, kept to the end of the run (three times: the parts, their
    concatenation, and the copy a mean or standard error divides), so many seeds of large outputs
    are refused too."""
    kept = kept_bytes(kept_per_seed, seeds)
    try:
        budget = budget_gb(memory_gb)
        if kept:
            require(per_seed + kept, f"{what}, with the outputs of {seeds} seeds ({gb(kept)})", budget, force,
                    hint="fewer --seeds or a smaller --width")
        else:
            require(per_seed, what, budget, force, hint="a smaller --width")
    except TpcError as err:
        raise err.locate(filename, source) from None
    room = max(budget * 2**30 - kept, per_seed)
    return max(1, min(seeds, int(room / max(per_seed, 1))))


def _size(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64)) if shape else 1


def gaussian_bytes(prog: Program, itemsize: int) -> int:
    """What Gaussian propagation of a Netsor program may hold at once: for the vectors multiplied
    by one matrix (a family), their joint covariance (the square of their batch sizes summed),
    every scalar's value (a B x B' kernel for a Gram), and two more of the largest kernel for an
    expectation's temporaries."""
    families: dict[tuple[int, bool], int] = {}
    scalars = 0
    for node in prog.needed():
        if node.op == "matmul":
            key = (node.inputs[0], bool(node.params.get("transposed")))
            families[key] = families.get(key, 0) + _size(node.shape)
        elif node.kind != "vector" and node.op != "data":
            scalars += _size(node.shape)
    largest = max([b * b for b in families.values()] + [0])
    return itemsize * (sum(b * b for b in families.values()) + scalars + 2 * largest)


def particle_bytes(prog: Program, itemsize: int, particles: int) -> int:
    """What the particle evaluator holds on top: every vector as M samples per batch element."""
    samples = sum(_size(n.shape) for n in prog.needed() if n.kind == "vector")
    return itemsize * particles * samples


def finite_bytes_per_seed(prog: object, width: int, itemsize: int) -> int:
    """What one seed of a finite run needs at `width`: a network program's (training) or a raw
    program's estimate (the backends hold the rules; imported here only when asked)."""
    from tpc.train.network import Network

    if isinstance(prog, Network):
        from tpc.train.finite import bytes_per_seed

        return bytes_per_seed(prog, width, itemsize)
    from tpc.backends.torch.run import bytes_per_seed as raw_bytes

    return raw_bytes(prog, width, itemsize)  # type: ignore[arg-type]
