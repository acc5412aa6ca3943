"""Helpers the generated modules call. Every tensor carries a leading seeds axis `S`
(1 for data); vectors end with the width axis `n`.

This module imports only torch: `tpc emit-torch` copies everything below the marker line into
the file it writes, so an emitted module stands alone (and the modules tpc runs itself are the
same source)."""

from __future__ import annotations

import torch

# ---- runtime (copied into emitted files from here on)

Tensor = torch.Tensor


def generators(seeds: list[int], device: str | torch.device) -> list[torch.Generator]:
    """One generator per seed, so seed k samples the same network whatever the chunking."""
    gens = []
    for s in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(1_000_003 * (s + 1))
        gens.append(g)
    return gens


def normal(gens: list[torch.Generator], shape: tuple[int, ...], dtype: torch.dtype,
           device: str | torch.device) -> Tensor:
    """Standard normal entries, shape (S, *shape), each seed from its own generator."""
    return torch.stack([torch.randn(shape, generator=g, dtype=dtype, device=device) for g in gens])


def vector_group(z: Tensor, mean: Tensor, factor: Tensor) -> Tensor:
    """Coordinates iid over n, correlated across the k members: (S, k, n) -> mean + L z."""
    return mean[None, :, None] + torch.einsum("ij,sjn->sin", factor, z)


def matmul(w: Tensor, x: Tensor) -> Tensor:
    """W x for W (S, rows, cols) and x (S|1, [B,] cols): returns (S, [B,] rows)."""
    if x.dim() == 2:
        return (x.unsqueeze(-2) @ w.mT).squeeze(-2)
    return x @ w.mT


def gram(x: Tensor, y: Tensor) -> Tensor:
    """(1/n) x_a . y_b over the batches: (S, *batch of x, *batch of y)."""
    xs = x if x.dim() == 3 else x.unsqueeze(-2)
    ys = y if y.dim() == 3 else y.unsqueeze(-2)
    shape = (*x.shape[1:-1], *y.shape[1:-1])
    return (xs @ ys.mT).reshape(max(x.shape[0], y.shape[0]), *shape) / x.shape[-1]


def data_gram(a: Tensor, b: Tensor) -> Tensor:
    """A B^T of two data arrays, rows against rows (autodiff's input-layer term of an NTK), shaped as
    gram() shapes its result: (1, *batch of a, *batch of b), so one input (no batch) gives a number."""
    xs = a if a.dim() == 3 else a.unsqueeze(-2)
    ys = b if b.dim() == 3 else b.unsqueeze(-2)
    return (xs @ ys.mT).reshape(max(a.shape[0], b.shape[0]), *a.shape[1:-1], *b.shape[1:-1])


def as_data(value: Tensor | None, default: Tensor | None, name: str, rank: int, dtype: torch.dtype,
            device: str | torch.device) -> Tensor:
    """A data argument of forward(), with the leading seeds axis of 1 that data carry."""
    if value is None:
        if default is None:
            raise TypeError(f"forward() needs the data '{name}' (a tensor with {rank} axes)")
        return default
    value = torch.as_tensor(value, dtype=dtype, device=device)
    if value.dim() != rank:
        raise ValueError(f"data '{name}' has {value.dim()} axes; the program uses {rank}")
    return value[None]


def readout(v: Tensor, x: Tensor) -> Tensor:
    """sum_alpha v_alpha x_alpha: v (S, n) or a readout matrix (S, k, n); x (S, [B,] n)."""
    if v.dim() == 2:
        return (x * (v if x.dim() == 2 else v.unsqueeze(-2))).sum(-1)
    return matmul(v, x)


def readout_cov(x: Tensor, y: Tensor, scale: float, rows: int | None) -> Tensor:
    """Covariance of two readouts given the features (the readout weights integrated out
    exactly): scale * (x_a . y_b) / n, times the identity over readout rows."""
    g = gram(x, y) * scale
    if rows is None:
        return g
    bx, by = x.dim() - 2, y.dim() - 2
    eye = torch.eye(rows, dtype=g.dtype, device=g.device)
    out = g.unsqueeze(1 + bx).unsqueeze(-1)  # (S, *bx, 1, *by, 1)
    eye_shape = [1] * (1 + bx) + [rows] + [1] * by + [rows]
    return out * eye.reshape(eye_shape)


class NonFiniteError(ArithmeticError):
    """NaN or infinity from the instruction with id `node` (the caller may add its source location)."""

    def __init__(self, message: str, node: int | None) -> None:
        super().__init__(message)
        self.message = message
        self.node = node


def check(x: Tensor, what: str, node: int | None = None) -> Tensor:
    """Stop at the first instruction that produces NaN or infinity, and name it."""
    if not torch.isfinite(x).all():
        bad = "NaN" if torch.isnan(x).any() else "infinite values"
        raise NonFiniteError(f"finite width: instruction {what} produced {bad}", node)
    return x

