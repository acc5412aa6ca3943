"""Finite width against the limit: errors per width, fitted log-log slopes, plots."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from tpc.errors import TpcError

if TYPE_CHECKING:  # imported where used: `import tpc` stays light (no torch until a backend runs)
    from tpc.backends.limit import LimitOutput
    from tpc.ir import Program
    from tpc.train.network import Network


@dataclass
class WidthRow:
    width: int
    mean: np.ndarray
    stderr: np.ndarray
    mean_error: float  # sqrt(mean over entries of (mean over seeds - limit)^2)
    rms_error: float  # sqrt(mean over seeds and entries of (value - limit)^2)


@dataclass
class OutputComparison:
    name: str
    limit: LimitOutput
    rows: list[WidthRow] = field(default_factory=list)

    @property
    def random(self) -> bool:
        """Random in the limit (a readout / sqrt(n), or a kernel-regime prediction): a single seed
        does not converge; its mean over seeds and its covariance do."""
        return self.limit.cov is not None or self.limit.random

    @property
    def slope(self) -> float:
        """Fitted slope of log(rms error) against log(width): -1/2 when finite width converges
        to the limit at the Master Theorem's rate."""
        if self.random:
            return float("nan")
        return fit_slope([r.width for r in self.rows], [r.rms_error for r in self.rows])

    @property
    def mean_slope(self) -> float:
        if self.random:
            return float("nan")
        return fit_slope([r.width for r in self.rows], [r.mean_error for r in self.rows])

    def to_json(self) -> dict:
        return {
            "limit": self.limit.to_json(),
            "slope": None if self.random else self.slope,
            "mean_slope": None if self.random else self.mean_slope,
            "widths": [
                {"width": r.width, "mean": r.mean.tolist(), "stderr": r.stderr.tolist(),
                 "mean_error": r.mean_error, "rms_error": r.rms_error}
                for r in self.rows
            ],
        }


def fit_slope(widths: list[int], errors: list[float]) -> float:
    x = np.log(np.asarray(widths, dtype=float))
    y = np.log(np.maximum(np.asarray(errors, dtype=float), 1e-300))
    if len(x) < 2:
        return float("nan")
    return float(np.polyfit(x, y, 1)[0])


def once(widths: list[int]) -> None:
    """Each width once: a slope fitted to a width given twice means nothing."""
    repeated = sorted({w for w in widths if list(widths).count(w) > 1})
    if repeated:
        raise TpcError(f"widths {', '.join(map(str, repeated))} given more than once: each width once")


def compare(prog: Program | Network, widths: list[int], seeds: int, method: str = "auto",
            dtype: str = "float64", device: str = "cpu", memory_gb: float | None = None, force: bool = False,
            progress: Callable[[int], None] | None = None, workers: int | None = None,
            cluster: str | None = None, particles: int | None = None,
            replicates: int | None = None) -> dict[str, OutputComparison]:
    """The limit (`particles`, `replicates`: its Monte Carlo, where it needs one; the limit's own
    defaults otherwise), then every width's finite runs: in this process, or (`workers` or `cluster`
    given) each (width, seed) a task on a Dask cluster (tpc.sweep), with the same numbers."""
    from tpc import _count, _options
    from tpc.backends.limit import evaluate_limit
    from tpc.backends.torch import run_finite
    from tpc.train.finite import train_finite
    from tpc.train.limit import network_limit
    from tpc.train.network import Network

    for w in widths:
        _count(w, "a width")
    once(widths)
    _count(seeds, "seeds")
    _options({"dtype": dtype, "device": device, "particles": particles, "replicates": replicates})
    network = isinstance(prog, Network)
    budget = {"memory_gb": memory_gb, "force": force}
    mc = {k: v for k, v in (("particles", particles), ("replicates", replicates)) if v is not None}
    limit = (network_limit if network else evaluate_limit)(prog, method=method, device=device, **budget, **mc)
    out = {k: OutputComparison(k, v) for k, v in limit.items()}
    spread = None
    if workers or cluster:
        from tpc.sweep import finite_runs

        spread = finite_runs(prog, widths, seeds, 0, workers, cluster, dtype, device, memory_gb, force, progress)
    for width in widths:
        run = train_finite if network else run_finite
        finite = spread[width] if spread else run(prog, width, seeds, dtype=dtype, device=device, progress=progress,
                                                  **budget)
        for name, res in finite.items():
            lim = limit[name].value
            diff = res.values - lim[None]
            out[name].rows.append(WidthRow(
                width, res.mean, res.stderr,
                float(np.sqrt(np.mean((res.mean - lim) ** 2))),
                float(np.sqrt(np.mean(diff**2))),
            ))
    return out


def plot(results: dict[str, OutputComparison], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    all_w: list[int] = []
    for name, comp in results.items():
        if comp.random:
            continue
        w = [r.width for r in comp.rows]
        all_w += w
        rms = [r.rms_error for r in comp.rows]
        ax.loglog(w, rms, "o-", label=f"{name}: rms error, slope {comp.slope:.2f}")
        me = [r.mean_error for r in comp.rows]
        ax.loglog(w, me, "s--", alpha=0.6, label=f"{name}: |mean - limit|")
    if all_w and any(not c.random for c in results.values()):
        w0, w1 = min(all_w), max(all_w)
        first = max(c.rows[0].rms_error for c in results.values() if not c.random)
        ax.loglog([w0, w1], [first, first * (w1 / w0) ** -0.5], "k:", label="n^-1/2")
    ax.set_xlabel("width n")
    ax.set_ylabel("error against the infinite-width limit")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
