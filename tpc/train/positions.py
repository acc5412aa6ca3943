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


def split_heads(v: Tensor, heads: int) -> Tensor:
    """(..., R, m) -> (..., H, R, m/H): head h holds the h-th block of m/H coordinates."""
    if heads == 1:
        return v
    return v.reshape(*v.shape[:-1], heads, v.shape[-1] // heads).movedim(-2, -3)


def join_heads(v: Tensor, heads: int) -> Tensor:
    """The inverse of `split_heads`: the heads' blocks side by side."""
    if heads == 1:
        return v
    v = v.movedim(-3, -2)
    return v.reshape(*v.shape[:-2], v.shape[-2] * v.shape[-1])


def _per_head(gram: Callable[[Tensor, Tensor], Tensor], heads: int) -> Callable[[Tensor, Tensor], Tensor]:
    """A head's inner product: the mean over its m/H coordinates, H times `gram`'s mean over m."""
    return gram if heads == 1 else lambda a, b: heads * gram(a, b)


def weights(q: Tensor, k: Tensor, positions: int, gram: Callable[[Tensor, Tensor], Tensor],
            scale: float, heads: int = 1) -> Tensor:
    """The attention weights a[..., b, p, r] = softmax_r(scale * gram(q_p, k_r)), (..., B, P, P);
    with H heads, one set per head, (..., H, B, P, P), over each head's block of coordinates."""
    q, k = split_heads(q, heads), split_heads(k, heads)
    return torch.softmax(scale * _per_head(gram, heads)(by_input(q, positions), by_input(k, positions)), dim=-1)


def attend(a: Tensor, v: Tensor, positions: int, heads: int = 1) -> Tensor:
    """sum_r a[p, r] v_r at every position p (each head on its block of v): (..., B*P, m)."""
    return join_heads(flat(a @ by_input(split_heads(v, heads), positions)), heads)


def attend_backward(a: Tensor, q: Tensor, k: Tensor, v: Tensor, g: Tensor, positions: int,
                    gram: Callable[[Tensor, Tensor], Tensor], scale: float,
                    heads: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """Given g = n dL/d(out) (natural scale), n dL/dq, n dL/dk and n dL/dv: the values move by
    a.T g, the weights by dL/da = gram(g_p, v_r), the logits by the softmax's Jacobian, and
    s = scale q.k/n sends n dL/dq = scale ds k and n dL/dk = scale ds.T q; a head's logits are
    scale H q_h.k_h/n over its block h of coordinates, so its gradients carry H."""
    q, k, v, g = (split_heads(t, heads) for t in (q, k, v, g))
    gq, vq = by_input(g, positions), by_input(v, positions)
    dv = a.transpose(-1, -2) @ gq
    da = gram(gq, vq)
    ds = a * (da - (a * da).sum(-1, keepdim=True))
    dq = scale * heads * (ds @ by_input(k, positions))
    dk = scale * heads * (ds.transpose(-1, -2) @ by_input(q, positions))
    return tuple(join_heads(flat(t), heads) for t in (dq, dk, dv))  # type: ignore[return-value]


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


def patches(x: Tensor, offsets: tuple[tuple[int, ...], ...], grid: tuple[int, ...]) -> Tensor:
    """Each position's patch: the rows at p + o for every offset o of a kernel (zero beyond the
    edges), side by side: (..., B*P, d) -> (..., B*P, K*d), what an input convolution multiplies."""
    if not offsets:
        return x
    return torch.cat([shift(x, o, grid) for o in offsets], dim=-1)


def patches_text(x: str, offsets: tuple[tuple[int, ...], ...]) -> str:
    """How `tpc graph` shows an input convolution's data: `patches(x, 3 x 3)`."""
    if not offsets:
        return x
    kernel = [max(o[a] for o in offsets) - min(o[a] for o in offsets) + 1 for a in range(len(offsets[0]))]
    return f"patches({x}, {' x '.join(map(str, kernel))})"


def shift_backward(g: Tensor, offset: tuple[int, ...], grid: tuple[int, ...]) -> Tensor:
    """The adjoint of `shift`: n dL/dv from g = n dL/d(shift(v)) is g shifted back."""
    return shift(g, tuple(-s for s in offset), grid)


Window = tuple[tuple[int, int, int, int], ...]


def window_grid(spec: Window) -> tuple[int, ...]:
    """The grid a window step makes: per axis, the windows of `size` from start, every stride-th,
    that end by stop."""
    return tuple((stop - start - size) // stride + 1 for start, stop, size, stride in spec)


def window_text(spec: Window) -> str:
    """How `tpc graph` shows a window step: per axis start:stop:stride, and xsize for windows of more than one."""
    return "[" + ", ".join(f"{start}:{stop}:{stride}" + (f" x{size}" if size > 1 else "")
                           for start, stop, size, stride in spec) + "]"


def axis_matrices(grid: tuple[int, ...], spec: Window) -> list[Tensor]:
    """Per axis, the (out, in) matrix of the mean over each window: 1/size on the window's positions."""
    mats = []
    for size_in, (start, _, size, stride), out in zip(grid, spec, window_grid(spec), strict=True):
        m = torch.zeros(out, size_in, dtype=torch.float64)
        for i in range(out):
            m[i, start + i * stride:start + i * stride + size] = 1.0 / size
        mats.append(m)
    return mats


def window_matrix(grid: tuple[int, ...], spec: Window) -> Tensor:
    """The whole (P', P) map over positions numbered row by row: the axes' matrices' Kronecker product."""
    mats = axis_matrices(grid, spec)
    return mats[0] if len(mats) == 1 else torch.kron(mats[0], mats[1])


def _along_axes(v: Tensor, grid: tuple[int, ...], mats: list[Tensor]) -> Tensor:
    """Each axis's matrix applied along that axis of the grid: (..., B*P, m) -> (..., B*P', m)."""
    at = v.reshape(*v.shape[:-2], v.shape[-2] // math.prod(grid), *grid, v.shape[-1])
    for axis, m in enumerate(mats):
        dim = at.dim() - 1 - len(grid) + axis
        at = (at.movedim(dim, -1) @ m.to(v).T).movedim(-1, dim)
    return at.reshape(*v.shape[:-2], -1, v.shape[-1])


def window(v: Tensor, grid: tuple[int, ...], spec: Window) -> Tensor:
    """The mean over each window of positions (a strided or 'valid' convolution's kept positions are
    windows of one; `avgpool(h, k)` windows of k x k): (..., B*P, m) -> (..., B*P', m)."""
    return _along_axes(v, grid, axis_matrices(grid, spec))


def window_backward(g: Tensor, grid: tuple[int, ...], spec: Window) -> Tensor:
    """The adjoint of `window`: n dL/dv on the argument's grid from g = n dL/d(window(v))."""
    return _along_axes(g, window_grid(spec), [m.T for m in axis_matrices(grid, spec)])


def flat_readout(gram: Tensor, positions: int) -> Tensor:
    """f = V @ flatten(h) from gram = (h . V) over every row of h (B*P) and of V (k*P, row j*P + p
    the weights of output j at position p): f[b, j] = sum_p gram[b*P + p, j*P + p], (..., B, k)."""
    at = gram.reshape(*gram.shape[:-2], gram.shape[-2] // positions, positions, gram.shape[-1] // positions,
                      positions)
    return torch.diagonal(at, dim1=-3, dim2=-1).sum(-1)


def spread(chi: Tensor, positions: int) -> Tensor:
    """chi (..., B, k) as the (..., B*P, k*P) matrix whose (b*P + p, j*P + q) entry is chi[b, j] where
    p = q, else 0: what a flattening readout's backward and weight gradient multiply (the adjoint
    of `flat_readout`)."""
    eye = torch.eye(positions, dtype=chi.dtype, device=chi.device)
    out = torch.einsum("...bj,pq->...bpjq", chi, eye)
    return out.reshape(*chi.shape[:-2], chi.shape[-2] * positions, chi.shape[-1] * positions)


def mean_over_positions(pairs: Tensor, positions: int) -> Tensor:
    """(..., B*P, C*P) products of rows -> (..., B, C): the mean over p of the (b, p), (c, p) entry;
    `features(f, X)` of a flattening readout (P = 1: unchanged)."""
    if positions == 1:
        return pairs
    return flat_readout(pairs, positions) / positions


def mean_per_input(values: Tensor, positions: int) -> Tensor:
    """(..., B*P) numbers per row -> (..., B): each input's mean over its positions."""
    return values.reshape(*values.shape[:-1], -1, positions).mean(-1)
