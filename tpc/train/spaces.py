"""The two spaces that the unrolled Netsor-transpose program of a training program runs on
(`pooled.py`): it multiplies only by the initial matrices, so all a space supplies is the initial
values, `W_0 y` (and `W_0.T y`), inner products `x . y / n`, coordinatewise functions and data.

Every quantity is at its natural scale (TP4, "maximal update" normalisation): vectors have O(1)
coordinates, `v = n W^{L+1}` for the readout, and the powers of n that a parametrization puts on
initial values and updates are explicit factors `n^e`.
- `FiniteSpace`: width n, real initial matrices (the seeds' own): equal to direct training in
  `dense.py` up to round-off, for any parametrization;
- `LimitSpace`: the infinite-width limit (TP4's Master Theorem for Netsor-transpose programs):
  each `n^e` becomes 1 (e = 0) or 0 (e < 0), vectors are coefficient vectors over independent
  Gaussians (exact, linear models) or particles (Monte Carlo), and `W_0 y` is `Zhat + Zdot`.
"""

from __future__ import annotations

import numpy as np
import torch

from tpc.backends.limit.evaluate import evaluate_tree
from tpc.backends.limit.particles import GaussianSpace, _evaluate_linear
from tpc.errors import TpcError
from tpc.ops import expr as ex
from tpc.parametrization import limit_of_power
from tpc.train.finite import init_std, standard_normals
from tpc.train.losses import _tree
from tpc.train.network import Layer, Network

Tensor = torch.Tensor


class FiniteSpace:
    """The unrolled program at width n, for a batch of seeds: vectors (S, B, n)."""

    exact = False

    def __init__(self, net: Network, width: int, seeds: list[int], dtype: torch.dtype, device: str) -> None:
        self.net, self.n, self.dtype, self.device = net, width, dtype, device
        self.seeds = seeds
        self.normals = standard_normals(net, width, seeds, dtype, device)

    def factor(self, exponent: float) -> float:
        return float(self.n**exponent)

    def initial(self, layer: Layer) -> Tensor:
        """W^l_0 entries: input (S, n, d) as columns (S, d, n); bias (S, n); readout v = n W (S, k, n)."""
        w = self.normals[layer.name] * init_std(self.net, layer, self.n)
        if layer.role == "input":
            return w.transpose(-1, -2)
        if layer.role == "readout":
            return w * self.n
        return w

    def matmul(self, layer: Layer, rows: Tensor, transposed: bool) -> Tensor:
        w = self.normals[layer.name] * init_std(self.net, layer, self.n)
        return rows @ w if transposed else rows @ w.transpose(-1, -2)

    def gram(self, a: Tensor, b: Tensor) -> Tensor:
        return a @ b.transpose(-1, -2) / self.n

    def data(self, value: np.ndarray) -> Tensor:
        return torch.as_tensor(value, dtype=self.dtype, device=self.device)

    def fn(self, tree: ex.Tree, args: list[Tensor]) -> Tensor:
        return _tree(tree, args)

    def mean(self, v: Tensor) -> Tensor:
        """A vector's average over its n coordinates, kept as a trailing axis of 1."""
        return v.mean(-1, keepdim=True)


class LimitSpace:
    """The limit: vectors (B, space) over coefficients (exact) or particles (Monte Carlo)."""

    def __init__(self, net: Network, exact: bool, size: int, seed: int) -> None:
        self.net = net
        self.exact = exact
        self.dtype = torch.float64
        self.device = "cpu"
        self.space = GaussianSpace(exact, size, self.dtype, seed)
        self.kernels: dict[tuple[str, str], tuple[np.ndarray, str]] = {}  # nngp/ntk outputs, when known

    def factor(self, exponent: float) -> float:
        value = limit_of_power(exponent)
        if value is None:  # pragma: no cover - unstable parametrizations are refused before
            raise TpcError(f"internal: a factor n^{exponent:g} has no limit")
        return value

    def initial(self, layer: Layer) -> Tensor:
        e = -self.net.init_exponent(layer)
        std = np.sqrt(layer.var / layer.fan_in)
        if layer.role == "input":
            return self.factor(e) * std * self.space.normals(int(layer.cols))
        if layer.role == "readout":
            return self.factor(1 + e) * std * self.space.normals(int(layer.weight_rows))
        return self.factor(e) * std * self.space.normals(1)[0]

    def matmul(self, layer: Layer, rows: Tensor, transposed: bool) -> Tensor:
        s2 = layer.var * self.factor(1 - 2 * self.net.init_exponent(layer))
        flat = rows.reshape(-1, rows.shape[-1])
        where = f"layer {layer.name} (line {layer.span.line})"
        return self.space.matmul((layer.name, transposed), flat, s2, where).reshape(rows.shape)

    def gram(self, a: Tensor, b: Tensor) -> Tensor:
        return self.space.gram(a, b)

    def data(self, value: np.ndarray) -> Tensor:
        return torch.as_tensor(value, dtype=self.dtype)

    def fn(self, tree: ex.Tree, args: list[Tensor]) -> Tensor:
        if self.exact:
            return _evaluate_linear(tree, args, set(range(len(args))), self.space)
        return evaluate_tree(tree, args)

    def mean(self, v: Tensor) -> Tensor:
        """E[Z^v] over the particles, kept as a trailing axis of 1 (a model with a moment is never
        exact: `Network.is_linear`)."""
        if self.exact:  # pragma: no cover - guarded by Network.is_linear
            raise TpcError("internal: a moment in the exact limit")
        return v.mean(-1, keepdim=True)


Space = FiniteSpace | LimitSpace
