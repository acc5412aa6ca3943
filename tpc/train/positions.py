"""A model over positions (`model f(x[P])`): every positional value keeps its P positions as
consecutive rows, (..., B*P, m), so layers, coordinatewise functions and moments apply row by
row unchanged; only `attend` and `pool` see the positions of one input. The same functions
serve torch at finite width (m = n coordinates) and the limit's particles (m = particles),
given the space's inner product `gram(a, b) = a . b / n` (or E[a b])."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Tensor = torch.Tensor


def by_input(v: Tensor, positions: int) -> Tensor:
    """(..., B*P, m) -> (..., B, P, m)."""
    return v.reshape(*v.shape[:-2], v.shape[-2] // positions, positions, v.shape[-1])


def flat(v: Tensor) -> Tensor:
    """(..., B, P, m) -> (..., B*P, m)."""
    return v.reshape(*v.shape[:-3], v.shape[-3] * v.shape[-2], v.shape[-1])


def weights(q: Tensor, k: Tensor, positions: int, gram: Callable[[Tensor, Tensor], Tensor],
            scale: float) -> Tensor:
    """The attention weights a[..., b, p, r] = softmax_r(scale * gram(q_p, k_r)), (..., B, P, P)."""
    return torch.softmax(scale * gram(by_input(q, positions), by_input(k, positions)), dim=-1)


def attend(a: Tensor, v: Tensor, positions: int) -> Tensor:
    """sum_r a[p, r] v_r at every position p: (..., B*P, m)."""
    return flat(a @ by_input(v, positions))


def attend_backward(a: Tensor, q: Tensor, k: Tensor, v: Tensor, g: Tensor, positions: int,
                    gram: Callable[[Tensor, Tensor], Tensor], scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Given g = n dL/d(out) (natural scale), n dL/dq, n dL/dk and n dL/dv: the values move by
    a.T g, the weights by dL/da = gram(g_p, v_r), the logits by the softmax's Jacobian, and
    s = scale q.k/n sends n dL/dq = scale ds k and n dL/dk = scale ds.T q."""
    gq, vq = by_input(g, positions), by_input(v, positions)
    dv = a.transpose(-1, -2) @ gq
    da = gram(gq, vq)
    ds = a * (da - (a * da).sum(-1, keepdim=True))
    dq = scale * (ds @ by_input(k, positions))
    dk = scale * (ds.transpose(-1, -2) @ by_input(q, positions))
    return flat(dq), flat(dk), flat(dv)


def pool(h: Tensor, positions: int) -> Tensor:
    """The mean over an input's positions: (..., B*P, m) -> (..., B, m)."""
    return by_input(h, positions).mean(-2)


def pool_backward(g: Tensor, positions: int) -> Tensor:
    """n dL/dh at every position from n dL/d(pool(h)): g / P, repeated over the positions."""
    return flat((g / positions).unsqueeze(-2).expand(*g.shape[:-1], positions, g.shape[-1]))


def source_position(p: int, offset: tuple[int, ...], grid: tuple[int, ...]) -> int | None:
    """The position that `shift` reads for position p (p + offset on the grid, row by row), or None
    beyond an edge: the rule that the kernels' lowering and recursion share with `shift` itself."""
    at = [c + s for c, s in zip(divmod(p, grid[1]) if len(grid) == 2 else (p,), offset, strict=True)]
    if not all(0 <= c < size for c, size in zip(at, grid, strict=True)):
        return None
    return at[0] * grid[1] + at[1] if len(grid) == 2 else at[0]


def shift(v: Tensor, offset: tuple[int, ...], grid: tuple[int, ...]) -> Tensor:
    """The value at position p is v's at p + offset on the grid of positions (row by row), zero where
    p + offset falls beyond an edge (zero padding): (..., B*P, m) -> (..., B*P, m)."""
    if not any(offset):
        return v
    at = v.reshape(*v.shape[:-2], v.shape[-2] // math.prod(grid), *grid, v.shape[-1])
    pad: list[int] = [0, 0]  # torch's pad lists the last axis first: m, then the grid's axes backwards
    for axis, (s, size) in enumerate(zip(offset, grid, strict=True)):
        dim = at.dim() - 1 - len(grid) + axis
        at = at.narrow(dim, max(s, 0), size - abs(s))
    for s in reversed(offset):
        pad += [max(-s, 0), max(s, 0)]
    return torch.nn.functional.pad(at, pad).reshape(v.shape)


def shift_backward(g: Tensor, offset: tuple[int, ...], grid: tuple[int, ...]) -> Tensor:
    """The adjoint of `shift`: n dL/dv from g = n dL/d(shift(v)) is g shifted back."""
    return shift(g, tuple(-s for s in offset), grid)
