"""Kernels of a batch against itself, kept as the row blocks of their upper part.

A kernel K[i, j] = E[f(Z_i) f(Z_j)] of one batch against itself is symmetric. The limit evaluator
computes it only on the row blocks K[r0:r1, r0:] of its upper part, a little over half of it, in
pieces of a few MB, and the next layer's kernel reads only the same blocks of it: half the
arithmetic and half the memory (fresh memory costs page faults) of the whole matrix. A reader that
needs the whole matrix asks for it (`BlockKernel.whole`): it is formed then, once. Being a type of
its own, a block kernel cannot be read as a whole matrix by mistake.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor
BLOCK_ROWS = 256  # rows per block (up to 8 MB of float64 at N = 4000); smaller batches stay whole


def row_blocks(n: int) -> list[tuple[int, int]]:
    """The row ranges [r0, r1) of the blocks of an n x n kernel."""
    return [(r0, min(n, r0 + BLOCK_ROWS)) for r0 in range(0, n, BLOCK_ROWS)]


def splits(n: int) -> bool:
    """An n x n kernel is worth keeping by blocks: it has two or more."""
    return n > BLOCK_ROWS


class BlockKernel:
    """A symmetric n x n kernel as its upper row blocks, `blocks[k] = K[r0:r1, r0:]` for the k-th
    range (r0, r1) of `rows`. Blocks are never written once made (they may be views of others')."""

    def __init__(self, blocks: list[Tensor], rows: list[tuple[int, int]]) -> None:
        self.n = rows[-1][1]
        self.rows = rows
        self.blocks = blocks
        self._diagonal: Tensor | None = None
        self._whole: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.n)

    @property
    def dtype(self) -> torch.dtype:
        return self.blocks[0].dtype

    def block(self, r0: int, r1: int) -> Tensor:
        """K[r0:r1, r0:] for one of its own row ranges."""
        k = self.rows.index((r0, r1))
        return self.blocks[k]

    def diagonal(self) -> Tensor:
        """K[i, i], formed once (the step-kernel cache knows a covariance by its tensors)."""
        if self._diagonal is None:
            self._diagonal = torch.cat([b[:, : r1 - r0].diagonal() for (r0, r1), b in zip(self.rows, self.blocks,
                                                                                          strict=True)])
        return self._diagonal

    def whole(self) -> Tensor:
        """The n x n matrix, formed once, symmetric to the last bit (a block's own lower triangle is
        a second rounding of its upper one, like X X^T's from BLAS); the blocks then become views of it."""
        if self._whole is None:
            out = torch.empty(self.n, self.n, dtype=self.dtype)
            for (r0, r1), b in zip(self.rows, self.blocks, strict=True):
                square = b[:, : r1 - r0]
                out[r0:r1, r0:r1] = torch.triu(square) + torch.triu(square, 1).T
                out[r0:r1, r1:] = b[:, r1 - r0 :]
                out[r1:, r0:r1] = b[:, r1 - r0 :].T
            self._whole = out
            self.blocks = [out[r0:r1, r0:] for r0, r1 in self.rows]
        return self._whole

    def scaled(self, s: float) -> BlockKernel:
        return BlockKernel([s * b for b in self.blocks], self.rows)



def all_finite(t: Tensor | BlockKernel) -> bool:
    """No NaN or infinity in t (one makes a sum non-finite: look closer only then), block by block."""
    blocks = t.blocks if isinstance(t, BlockKernel) else [t]
    return all(bool(torch.isfinite(b.sum())) or bool(torch.isfinite(b).all()) for b in blocks)


def whole(t: Tensor | BlockKernel) -> Tensor:
    """A tensor as it is; a block kernel as its whole matrix."""
    return t.whole() if isinstance(t, BlockKernel) else t


def cut(t: Tensor | BlockKernel, r0: int, r1: int) -> Tensor:
    """The block [r0:r1, r0:] of a tensor placed for an n x n result (axes of size 1 broadcast),
    or of a block kernel."""
    if isinstance(t, BlockKernel):
        return t.block(r0, r1)
    if t.dim() == 0:
        return t
    rows = slice(r0, r1) if t.shape[0] > 1 else slice(None)
    cols = slice(r0, None) if t.shape[1] > 1 else slice(None)
    return t[rows, cols]
