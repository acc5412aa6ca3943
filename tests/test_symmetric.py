"""Kernels of a batch against itself are computed and kept by the row blocks of their upper part
when the batch is large (tpc.backends.limit.symmetric). Blocks of 3 rows make the bundled programs'
small batches large: every limit must come out the same as computed whole."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import tpc
from tpc.backends.limit import symmetric
from tpc.backends.limit.symmetric import BlockKernel, all_finite, cut, row_blocks

ROOT = Path(__file__).resolve().parent.parent
# Monte Carlo's particles per Gaussian in the comparisons below (the default is 2**16). Each comparison
# evaluates a limit twice from the same random state, whole and by blocks, and asks for the same values to
# round-off; the particle count only sizes the sample. Which kernels are kept by blocks, which are formed
# whole, and the method of every output (quadrature or Monte Carlo: decided by QUADRATURE_BUDGET, not by
# the particles) are the same at 2**12 as at 2**16 for every program below; its Monte Carlo takes 5-10x less time.
PARTICLES = 2**12


def _slow_limit(path: Path) -> bool:
    """A model over positions (its unrolled limit at the default 65536 particles takes minutes), or a
    training with entrywise updates (Adam: P x P grids of particles, and no kernels by blocks)."""
    prog = tpc.load(path)
    return isinstance(prog, tpc.Network) and (prog.model.positions > 1 or prog.entrywise)


PROGRAMS = [pytest.param(p, marks=pytest.mark.slow) if _slow_limit(p) else p
            for p in sorted((ROOT / "programs").glob("*/*.tp"))]


def made_by_blocks(monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], list[int]]:
    """Blocks of 3 rows; (kernels made by blocks, kernels made whole), by size, as they happen."""
    monkeypatch.setattr(symmetric, "BLOCK_ROWS", 3)
    made: list[int] = []
    wholes: list[int] = []
    init, whole = BlockKernel.__init__, BlockKernel.whole

    def counting_init(self: BlockKernel, blocks: list[torch.Tensor], rows: list[tuple[int, int]]) -> None:
        made.append(rows[-1][1])
        init(self, blocks, rows)

    def counting_whole(self: BlockKernel) -> torch.Tensor:
        if self._whole is None:
            wholes.append(self.n)
        return whole(self)

    monkeypatch.setattr(BlockKernel, "__init__", counting_init)
    monkeypatch.setattr(BlockKernel, "whole", counting_whole)
    return made, wholes


def assert_same_limits(got: dict, want: dict) -> None:
    """The same methods and values to round-off: 1e-12 relative, but 1e-9 by quadrature, which sums
    hundreds of nodes' terms by a BLAS product whose order of summation depends on how many entries
    are evaluated together (one block or the whole kernel)."""
    assert got.keys() == want.keys()
    for name, w in want.items():
        g = got[name]
        assert g.method == w.method, name
        rtol = 1e-9 if "quadrature" in w.method else 1e-12
        for key in ("value", "stderr", "cov"):
            if getattr(w, key) is not None:
                np.testing.assert_allclose(getattr(g, key), getattr(w, key), rtol=rtol, atol=1e-14,
                                           err_msg=f"{name}.{key}")


@pytest.mark.parametrize("path", PROGRAMS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_program_has_the_same_limit_with_kernels_kept_by_blocks(path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    prog = tpc.load(path)
    want = tpc.limit(prog, particles=PARTICLES)
    made, _ = made_by_blocks(monkeypatch)
    got = tpc.limit(prog, particles=PARTICLES)
    assert_same_limits(got, want)
    if path.parent.name == "kernels" and "rnn_tanh" not in path.name:  # (rnn_tanh has no kernel output)
        assert made, "no kernel was kept by blocks: the test would compare the whole path with itself"


def test_only_the_outputs_of_an_ntk_are_made_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through an NTK (forward kernels, the backward program, its Zdot checks, the sum of kernel
    products) every kernel stays in blocks; only the two outputs are formed whole, as they leave.
    A reader that needed the whole matrix of an inner kernel would make it whole (and cost its
    memory and time): this fails then."""
    made, wholes = made_by_blocks(monkeypatch)
    out = tpc.limit(tpc.load(ROOT / "programs" / "kernels" / "relu_mlp.tp"))
    assert len(made) == 8  # X X^T, E[x x'] of 3 hidden layers, 3 backward kernels, the NTK's sum
    assert wholes == [8, 8]
    for name in ("nngp", "ntk"):
        assert np.array_equal(out[name].value, out[name].value.T)  # symmetric to the last bit


def test_kernels_read_whole_or_across_batches_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Readers that need a block kernel whole (a kernel of two different functions of one batch,
    a Gaussian readout's covariance times a readout matrix), kernels across two batches, and a
    kernel by Monte Carlo (evaluated whole from the same random state, so the same particles)."""
    rng = np.random.default_rng(5)
    np.save(tmp_path / "X.npy", rng.standard_normal((7, 3)))
    np.save(tmp_path / "Y.npy", rng.standard_normal((5, 3)))
    src = """width n
data X = load("X.npy")
data Y = load("Y.npy")
matrix U : n x 3 ~ N(0, 1)
matrix W : n x n ~ N(0, 2/n)
matrix V : 2 x n ~ N(0, 1)
vector v ~ N(0, 3)
h = W @ relu(U @ X)
g = W @ relu(U @ Y)
f = v @ relu(h) / sqrt(n)
r = V @ tanh(h) / sqrt(n)
output mixed = gram(relu(h), step(h))
output across = gram(relu(h), relu(g))
output same = gram(relu(h))
output nngp = cov(f)
output rows = cov(r)
output ntk = tangent_kernel(f, X)
output sampled = gram(step(h) * tanh(h))
"""
    prog = tpc.loads(src, base_dir=tmp_path)
    want = tpc.limit(prog, particles=PARTICLES)
    made, wholes = made_by_blocks(monkeypatch)
    got = tpc.limit(prog, particles=PARTICLES)
    assert_same_limits(got, want)
    assert made and wholes  # both paths were taken
    assert "monte-carlo" in got["sampled"].method and got["sampled"].stderr is not None
    assert np.array_equal(got["same"].value, got["same"].value.T)


def test_a_block_kernel_is_its_upper_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    a = torch.randn(8, 8, dtype=torch.float64)
    k = a @ a.T
    monkeypatch.setattr(symmetric, "BLOCK_ROWS", 3)
    rows = row_blocks(8)
    assert rows == [(0, 3), (3, 6), (6, 8)]
    bk = BlockKernel([k[r0:r1, r0:].clone() for r0, r1 in rows], rows)
    assert torch.equal(bk.diagonal(), k.diagonal())
    assert torch.equal(cut(bk, 3, 6), k[3:6, 3:])
    assert all_finite(bk)
    assert torch.equal(bk.whole(), torch.triu(k) + torch.triu(k, 1).T)  # the lower part from the upper
    assert torch.equal(cut(bk, 6, 8), k[6:8, 6:])  # blocks are views of the whole once it is formed
    bad = BlockKernel([k[r0:r1, r0:].clone() for r0, r1 in rows], rows)
    bad.blocks[2][1, 0] = float("nan")
    assert not all_finite(bad)


def test_transposes_sampled_kernels_and_the_quadrature_budget_agree(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The review's cases. A Zdot check over a batch whose expression is the block itself is a
    kernel by blocks (W.T @ (W @ h)); a Monte Carlo kernel is symmetrised, so the kernel after it
    reads the same values by blocks as whole; and whether a kernel is affordable by quadrature is
    decided by the whole kernel's size, not a block's."""
    from tpc.backends.limit import expect

    np.save(tmp_path / "X.npy", np.loadtxt(ROOT / "programs" / "kernels" / "data" / "inputs8x3.csv", delimiter=","))
    src = """width n
data X = load("X.npy")
matrix U : n x 3 ~ N(0, 1/3)
matrix W : n x n ~ N(0, 1/n)
h = U @ X
output back = gram(h, W.T @ (W @ h))
output forth = gram(W @ (W.T @ h))
output sampled = gram(tanh(h))
output after = gram(tanh(W @ tanh(h)))
output smooth = gram(gelu(h))
"""
    prog = tpc.loads(src, base_dir=tmp_path)
    monkeypatch.setattr(expect, "QUADRATURE_BUDGET", 40000)  # 64 entries x 40^2 nodes: Monte Carlo
    want = tpc.limit(prog, particles=PARTICLES)
    made, _ = made_by_blocks(monkeypatch)
    got = tpc.limit(prog, particles=PARTICLES)
    assert_same_limits(got, want)
    assert made
    assert "monte-carlo" in got["smooth"].method and "quadrature" not in got["smooth"].method
    assert np.array_equal(got["sampled"].value, got["sampled"].value.T)
