"""Finite width converges to the limit: for every bundled program, the error against the
limit shrinks like n^-1/2 (fitted log-log slope within [-0.75, -0.25]), and at the largest
width the mean over seeds agrees with the limit within its standard error (plus an O(1/n)
allowance for the finite-width bias). CI-sized: widths up to 2048, 16 seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import tpc

ROOT = Path(__file__).resolve().parent.parent


def _slow(path: Path) -> bool:
    """programs/arch converge in test_arch.py at smaller widths, and entrywise updates (Adam) in
    test_adam.py on a closed form; here, at the full widths, in the slow step (Adam's limit holds
    P x P grids of particles, and its finite widths n x n ones per seed). word2vec's programs (a
    minute each here: 250 steps at six widths) converge by default in test_word2vec.py (three widths,
    its own corpus), and their written loop equals the sugar exactly (test_cbow_loops.py)."""
    if path.parent.name in ("arch", "word2vec"):
        return True
    prog = tpc.load(path)
    return isinstance(prog, tpc.Network) and prog.entrywise


PROGRAMS = [pytest.param(p, marks=pytest.mark.slow) if _slow(p) else p
            for p in sorted((ROOT / "programs").rglob("*.tp"))]
WIDTHS = [64, 128, 256, 512, 1024, 2048]
SEEDS = 16


@pytest.mark.parametrize("path", PROGRAMS, ids=lambda p: p.stem)
def test_finite_width_converges_to_the_limit(path: Path) -> None:
    prog = tpc.load(path)
    results = tpc.compare(prog, WIDTHS, SEEDS)
    for name, comp in results.items():
        if comp.random:
            continue
        assert -0.75 <= comp.slope <= -0.25, f"{name}: slope {comp.slope:.3f}"
        last = comp.rows[-1]
        lim = np.asarray(comp.limit.value)
        if not np.any(lim) and np.all(last.mean >= 0):
            # a root-mean-square whose limit is 0 (feature_change in the kernel regime): its mean
            # is biased by its own O(n^-1/2) size, so the slope above is the check
            continue
        bias = 3.0 / last.width * max(1.0, float(np.abs(lim).max()))
        z = np.abs(last.mean - lim) - bias
        lim_se = comp.limit.stderr if comp.limit.stderr is not None else 0.0  # Monte Carlo limits
        se = np.sqrt(last.stderr**2 + lim_se**2)
        assert np.all(z <= 5 * se), f"{name}: mean off the limit at width {last.width}"


def test_seed_results_do_not_depend_on_chunking() -> None:
    prog = tpc.load(ROOT / "programs" / "kernels" / "relu_mlp.tp")
    whole = tpc.run(prog, 128, 6)["nngp"].values
    chunked = tpc.run(prog, 128, 6, memory_gb=1e-6, force=True)["nngp"].values  # one seed per chunk
    np.testing.assert_array_equal(whole, chunked)
    later = tpc.run(prog, 128, 3, first_seed=3)["nngp"].values
    np.testing.assert_array_equal(whole[3:], later)


def test_float32_finite_width() -> None:
    prog = tpc.load(ROOT / "programs" / "kernels" / "erf_mlp.tp")
    res = tpc.run(prog, 512, 8, dtype="float32")["nngp"]
    lim = tpc.limit(prog)["nngp"].value
    assert np.all(np.abs(res.mean - lim) <= 5 * res.stderr + 0.01)
