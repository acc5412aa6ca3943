"""Expectations of coordinatewise functions of jointly Gaussian variables, vectorised over a
finite output shape (a batch, or a pair of batches for a kernel).

`Expectation` receives a tree whose leaves are `Var(i)` (the i-th Gaussian), `Tensor`
constants already broadcast to the output shape, and `Const`. It takes the expectation:
- exactly, where every term is a product of at most two linear forms (E[uv] = Cov + means);
- in closed form, where every term is a product of at most two registered functions of
  centred linear forms with a known pair kernel (arc-cosine, arcsine, ...), or one function
  with a known Gaussian mean;
- by Gauss-Hermite quadrature on the k Gaussians the tree needs (k <= 3 by default);
- by Monte Carlo with M particles otherwise or on request, with a standard error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from tpc.backends import device
from tpc.errors import NumericalError
from tpc.ops import expr as ex
from tpc.ops.functions import FUNCTIONS, CorrelationError, kernel_is_shared, pair_degree, pair_rule
from tpc.ops.shapes import broadcast_shapes

if TYPE_CHECKING:
    from tpc.backends.limit.symmetric import BlockKernel

Tensor = torch.Tensor
QUADRATURE_NODES = {1: 200, 2: 40, 3: 20, 4: 12}
QUADRATURE_RTOL, QUADRATURE_ATOL = 1e-4, 1e-8  # fine and coarse rules must agree this well (relative)
PSD_ULPS = 16  # round-off allowed per entry of a correlation matrix, in ulps, times its dimension
PSD_NOISE_SIGMAS = 4  # sampled covariances: an eigenvalue may fall this many standard errors below 0
QUADRATURE_BUDGET = 2**27  # entries x nodes; beyond it, auto switches to Monte Carlo
MAX_CHUNK = 2**23  # entries x nodes evaluated at once


@dataclass(frozen=True)
class Var:
    index: int


@dataclass(eq=False)
class TensorLeaf:
    value: Tensor


@dataclass
class Linear:
    """sum_i coef[i] * Var(i) + const, with coefficients broadcast over the output shape."""

    coef: dict[int, Tensor | float] = field(default_factory=dict)
    const: Tensor | float = 0.0

    def scale(self, s: Tensor | float) -> Linear:
        return Linear({i: c * s for i, c in self.coef.items()}, self.const * s)

    def plus(self, other: Linear, sign: float = 1.0) -> Linear:
        coef = dict(self.coef)
        for i, c in other.coef.items():
            coef[i] = coef[i] + sign * c if i in coef else sign * c
        return Linear(coef, self.const + sign * other.const)


@dataclass
class Result:
    value: Tensor | BlockKernel  # a block kernel only from the limit evaluator's symmetric kernels
    methods: set[str]
    stderr: Tensor | None = None
    magnitude: Tensor | None = None  # E|integrand| per entry, from quadrature: the scale of its error


class Expectation:
    """E[tree] over Gaussians with the given per-entry means and covariances.

    `mean[i]` and `cov[i][j]` are tensors broadcastable to `shape` (`cov` may place them only when
    read; `zero(i, j)` then says cheaply whether cov[i][j] is zero). `scales[i]` > 0 (default 1)
    multiplies the variance of Gaussian i: Cov(i, j) = sqrt(scales[i] scales[j]) cov[i][j]. A hidden
    layer's covariance is s^2 E[x y]; kept apart, the scalar s^2 reaches the kernels of positively
    homogeneous functions (the registry's `homogeneous`: relu, step, identity) as a number, not as a
    full-size copy.
    """

    def __init__(self, shape: tuple[int, ...], mean: list[Tensor], cov: Sequence[Sequence[Tensor]],
                 dtype: torch.dtype, where: str, method: str = "auto", particles: int = 2**16,
                 generator: torch.Generator | None = None, scales: list[float] | None = None,
                 zero: Callable[[int, int], bool] | None = None, whole_shape: tuple[int, ...] | None = None,
                 noise: float = 0.0) -> None:
        self.shape = shape
        self.whole_shape = shape if whole_shape is None else whole_shape  # when this is a block of a larger result
        self.mean = mean
        self.cov = cov
        self.zero = zero
        self.scales = scales or [1.0] * len(mean)
        self.k = len(mean)
        self.dtype = dtype
        self.where = where
        self.method = method
        self.particles = particles
        self.generator = generator
        # the relative standard error of covariances that were estimated by Monte Carlo (0 when every
        # one was computed): the PSD check allows for it
        self.noise = noise

    # ------------------------------------------------------------------ entry point
    def __call__(self, tree: ex.Tree) -> Result:
        if self.method in ("auto", "exact", "closed-form"):
            res = self.analytic(tree)
            if res is None:
                res = self.zero_by_structure(tree)
            if res is not None:
                if self.method == "exact" and res.methods != {"exact"}:
                    raise NumericalError(
                        f"{self.where}: this expectation is not linear in the Gaussians; "
                        "it needs a closed form (use --method auto)"
                    )
                return res
            if self.method != "auto":
                raise NumericalError(
                    f"{self.where}: no {self.method} rule for this expectation (use --method auto)"
                )
        return self.numeric(tree)

    def numeric(self, tree: ex.Tree) -> Result:
        """Quadrature where the number of Gaussians and the output size allow, else Monte Carlo."""
        entries = int(np.prod(self.whole_shape, dtype=np.int64)) if self.whole_shape else 1
        if self.method == "auto" and not _smooth(tree):
            # a kink, jump or singularity: Gauss-Hermite converges slowly or to the wrong value
            # without warning; Monte Carlo is unbiased and says how uncertain it is
            return self.sampled(tree, quadrature=False)
        too_big = self.k > max(QUADRATURE_NODES) or entries * QUADRATURE_NODES[self.k] ** self.k > QUADRATURE_BUDGET
        if self.method == "monte-carlo" or (self.method == "auto" and too_big):
            return self.sampled(tree, quadrature=False)
        if self.k > max(QUADRATURE_NODES):
            raise NumericalError(
                f"{self.where}: quadrature over {self.k} Gaussians is too costly; use --method auto "
                "or monte-carlo"
            )
        fine = self.sampled(tree, quadrature=True)
        if self.method != "auto":
            return fine
        # a second, coarser rule estimates the quadrature error: where the two disagree (a steep
        # or heavy-tailed integrand) the number would be wrong without warning; take Monte Carlo
        coarse = self.sampled(tree, quadrature=True, coarse=True)
        # relative to each entry's value, with a floor relative to E|integrand| (an integrand that
        # cancels to ~0, an odd one, is judged by its size, not by its mean): both scale with the
        # integrand, so scaling the data changes no decision
        gap = (fine.value - coarse.value).abs()
        assert fine.magnitude is not None
        if bool((gap > QUADRATURE_RTOL * fine.value.abs() + QUADRATURE_ATOL * fine.magnitude).any()):
            return self.sampled(tree, quadrature=False)
        return fine

    # ------------------------------------------------------------------ exact and closed form
    def linear(self, tree: object) -> Linear | None:
        if isinstance(tree, Var):
            return Linear({tree.index: 1.0})
        if isinstance(tree, ex.Const):
            return Linear({}, tree.value)
        if isinstance(tree, TensorLeaf):
            return Linear({}, tree.value)
        if not isinstance(tree, ex.Apply):
            return None
        if not _has_var(tree):  # a deterministic part (sqrt of a moment): one number per entry
            return Linear({}, _constant(tree, self.dtype))
        fn = tree.fn
        if fn == "identity":
            return self.linear(tree.args[0])
        if fn == "neg":
            a = self.linear(tree.args[0])
            return None if a is None else a.scale(-1.0)
        if fn in ("add", "sub"):
            a, b = (self.linear(t) for t in tree.args)
            if a is None or b is None:
                return None
            return a.plus(b, 1.0 if fn == "add" else -1.0)
        if fn in ("mul", "div"):
            a, b = (self.linear(t) for t in tree.args)
            if a is None or b is None:
                return None
            if fn == "mul" and not a.coef:
                return b.scale(a.const)
            if not b.coef:
                return a.scale(b.const if fn == "mul" else 1.0 / b.const)
        return None

    def terms(self, tree: object) -> list[tuple[Tensor | float, list[tuple[str, Linear]]]] | None:
        """tree as sum_t coef_t * prod_j f_j(L_j), or None if it has no such form."""
        lin = self.linear(tree)
        if lin is not None:
            if not lin.coef:
                return [(lin.const, [])]
            out: list = [(1.0, [("identity", Linear(lin.coef))])]
            if not is_zero(lin.const):
                out.append((lin.const, []))
            return out
        if not isinstance(tree, ex.Apply):
            return None
        fn = tree.fn
        if fn == "identity":
            return self.terms(tree.args[0])
        if fn in ("add", "sub"):
            a, b = (self.terms(t) for t in tree.args)
            if a is None or b is None:
                return None
            sign = 1.0 if fn == "add" else -1.0
            return a + [(sign * c, fs) for c, fs in b]
        if fn == "neg":
            a = self.terms(tree.args[0])
            return None if a is None else [(-c, fs) for c, fs in a]
        if fn == "mul":
            a, b = (self.terms(t) for t in tree.args)
            if a is None or b is None:
                return None
            return [(ca * cb, fa + fb) for ca, fa in a for cb, fb in b]
        if fn == "div":
            b = self.linear(tree.args[1])
            a = self.terms(tree.args[0])
            if a is None or b is None or b.coef:
                return None
            return [(c / b.const, fs) for c, fs in a]
        if FUNCTIONS[fn].arity == 1:
            arg = self.linear(tree.args[0])
            if arg is None:
                return None
            return [(1.0, [(fn, arg)])]
        return None

    def pair_scale(self, i: int, j: int) -> float:
        si, sj = self.scales[i], self.scales[j]
        return si if si == sj else math.sqrt(si * sj)

    def moments(self, a: Linear, b: Linear | None = None) -> tuple[Tensor, Tensor]:
        """(mean of a, Cov(a, b)) where b defaults to a."""
        mean, cov, scale = self.scaled_moments(a, b)
        return mean, _scaled(scale, cov)

    def scaled_moments(self, a: Linear, b: Linear | None = None) -> tuple[Tensor, Tensor, float]:
        """(mean of a, C, s) with Cov(a, b) = s C: for single Gaussians C is the stored kernel."""
        b = a if b is None else b
        if _is_unit(a) and _is_unit(b):  # the common case: no arithmetic on full kernels
            i, j = next(iter(a.coef)), next(iter(b.coef))
            return (torch.as_tensor(self.mean[i], dtype=self.dtype), torch.as_tensor(self.cov[i][j]),
                    self.pair_scale(i, j))
        mean = torch.as_tensor(a.const, dtype=self.dtype)
        for i, c in a.coef.items():
            mean = mean + c * self.mean[i]
        cov = torch.zeros((), dtype=self.dtype)
        for i, ci in a.coef.items():
            for j, cj in b.coef.items():
                cov = cov + ci * cj * self.pair_scale(i, j) * self.cov[i][j]
        return mean, cov, 1.0

    def analytic(self, tree: ex.Tree) -> Result | None:
        terms = self.terms(tree)
        if terms is None:
            return None
        parts: list[Tensor] = []
        methods: set[str] = set()
        for coef, factors in terms:
            if not factors:
                parts.append(torch.as_tensor(coef, dtype=self.dtype))
                methods.add("exact")
                continue
            # factors over independent Gaussians factorise: E[prod] = prod of group expectations
            value: Tensor | None = None
            owned = False  # value is a new tensor of this term's own, free to scale in place
            # smallest groups first: a centred Gaussian alone makes the whole term exactly 0
            for group in sorted(self.independent_groups(factors), key=len):
                got = self.group_expectation(group)
                if got is None and self.method == "auto" and len(factors) > 1:
                    got = (*self.group_numeric(group), 1.0, False)  # quadrature on this group's few Gaussians
                if got is None:
                    return None
                g_value, method, g_scale, g_owned = got
                methods.add(method)
                coef = coef * g_scale
                if value is None or _is_one(value):
                    value, owned = g_value, g_owned
                elif not _is_one(g_value):
                    # a product of kernels (an NTK's backward kernel): into a factor of our own if one is
                    # full-size, else a new tensor
                    if owned and _holds(value, g_value):
                        value.mul_(g_value)
                    elif g_owned and _holds(g_value, value):
                        value = g_value.mul_(value)
                    else:
                        value = value * g_value
                    owned = True
                if is_zero(value):
                    break
            assert value is not None
            if owned and isinstance(coef, float) and value.is_floating_point():
                parts.append(value if coef == 1.0 else value.mul_(coef))
            else:
                parts.append(_scaled(coef, value))
        total = parts[0]
        for p in parts[1:]:
            total = total + p
        if tuple(total.shape) != self.shape:
            total = total.expand(self.shape)  # a broadcast view: results are never modified in place
        return Result(total, methods)

    def zero_by_structure(self, tree: object) -> Result | None:
        """Exactly zero when one factor of the product is a centred Gaussian independent of all the
        others (backprop from an independent readout: E[G v phi'(g)] = E[v] E[G phi'(g)] = 0), what-
        ever the other factors are: `terms` has no form for phi' of a nonlinear argument (tanh's
        1 - tanh^2), and quadrature over all the Gaussians would give round-off, not 0."""
        factors = _product_factors(tree)
        if len(factors) < 2:
            return None
        used = [_vars_of(f) for f in factors]
        for i, f in enumerate(factors):
            lin = self.linear(f)
            if lin is None or not lin.coef or not is_zero(torch.as_tensor(lin.const)):
                continue
            mean = sum(c * self.mean[v] for v, c in lin.coef.items())
            if not is_zero(torch.as_tensor(mean)):
                continue
            if all(self.cov_is_zero(a, b) for j in range(len(factors)) if j != i for a in used[i] for b in used[j]):
                return Result(torch.zeros(self.shape, dtype=self.dtype), {"exact"})
        return None

    def cov_is_zero(self, i: int, j: int) -> bool:
        return self.zero(i, j) if self.zero is not None else is_zero(self.cov[i][j])

    def independent_groups(self, factors: list[tuple[str, Linear]]) -> list[list[tuple[str, Linear]]]:
        """Split factors into groups whose Gaussians are independent of the other groups'."""
        parent = list(range(len(factors)))

        def find(i: int) -> int:
            while parent[i] != i:
                i = parent[i]
            return i

        for i, (_, li) in enumerate(factors):
            for j in range(i):
                lj = factors[j][1]
                if any(not self.cov_is_zero(a, b) for a in li.coef for b in lj.coef):
                    parent[find(i)] = find(j)
        groups: dict[int, list[tuple[str, Linear]]] = {}
        for i, f in enumerate(factors):
            groups.setdefault(find(i), []).append(f)
        return list(groups.values())

    def group_numeric(self, factors: list[tuple[str, Linear]]) -> tuple[Tensor, str]:
        """E of a product of functions of linear forms, numerically, over only the Gaussians
        this group uses (the other groups are independent and were factored out)."""
        if len(factors) == 2 and any(f == "identity" for f, _ in factors):
            stein = self.stein_numeric(factors)
            if stein is not None:
                return stein
        used = sorted({i for _, lin in factors for i in lin.coef})
        tree: object | None = None
        for fname, lin in factors:
            fac = ex.Apply(fname, (self.linear_tree(lin, used),))
            tree = fac if tree is None else ex.Apply("mul", (tree, fac))
        res = self.restricted(used).numeric(tree)  # type: ignore[arg-type]
        return res.value, next(iter(res.methods))

    def linear_tree(self, lin: Linear, used: list[int]) -> object:
        """A linear form as an expression over the Gaussians `used` (renumbered from 0)."""
        tree: object = TensorLeaf(torch.as_tensor(lin.const, dtype=self.dtype))
        for i, c in lin.coef.items():
            term = ex.Apply("mul", (TensorLeaf(torch.as_tensor(c, dtype=self.dtype)), Var(used.index(i))))
            tree = ex.Apply("add", (tree, term))
        return tree

    def restricted(self, used: list[int]) -> Expectation:
        """The same expectation over only the Gaussians `used`."""
        return Expectation(self.shape, [self.mean[i] for i in used],
                           [[self.cov[i][j] for j in used] for i in used], self.dtype, self.where,
                           "auto", self.particles, self.generator, [self.scales[i] for i in used],
                           whole_shape=self.whole_shape, noise=self.noise)

    def stein_numeric(self, factors: list[tuple[str, Linear]]) -> tuple[Tensor, str] | None:
        """E[u f(v)] = Cov(u, v) E[f'(v)] for centred u, v and a smooth f: a quadrature in the
        dimension of v alone (more accurate than over (u, v) when f is steep)."""
        (fa, la), (fb, lb) = factors
        (_, lu), (g, lv) = ((fa, la), (fb, lb)) if fa == "identity" else ((fb, lb), (fa, la))
        fn = FUNCTIONS[g]
        mu, _ = self.moments(lu)
        mv, _ = self.moments(lv)
        if fn.deriv is None or fn.jumps or fn.arity != 1 or not (is_zero(mu) and is_zero(mv)):
            return None
        _, c = self.moments(lu, lv)
        used = sorted(lv.coef)
        tree = ex.substitute(fn.deriv(ex.Arg(0)), {0: self.linear_tree(lv, used)})  # type: ignore[dict-item]
        res = self.restricted(used).numeric(tree)
        return c * res.value, next(iter(res.methods))

    def group_expectation(self, factors: list[tuple[str, Linear]]) -> tuple[Tensor, str, float, bool] | None:
        """E of a product of one or two functions of linear forms as (value, method, s, owned) with
        E = s * value, or None; `owned`: value is a new tensor that nothing else holds (a product
        may be formed in it)."""
        if len(factors) == 1:
            f, lin = factors[0]
            mean_rule = FUNCTIONS[f].mean
            if mean_rule is None:
                return None
            mu, var = self.moments(lin)
            self.check_var(var, self.magnitude(lin))
            return mean_rule(mu, torch.clamp(var, min=0.0)), "exact" if f == "identity" else "closed-form", 1.0, False
        if len(factors) != 2:
            return None
        (f, la), (g, lb) = factors
        ma, va, sa = self.scaled_moments(la)
        mb, vb, sb = self.scaled_moments(lb)
        _, c, sc = self.scaled_moments(la, lb)
        pa, pb = self.magnitude(la), self.magnitude(lb)
        self.check_var(va, pa)
        self.check_var(vb, pb)
        if f == "identity" and g == "identity":
            if not (_is_unit(la) and _is_unit(lb)):  # cancellation in linear combinations
                # in Cov's units: a single Gaussian's variance comes unscaled (Var(a) = sa va)
                self.check_corr(_scaled(sa, va), _scaled(sb, vb), _scaled(sc, c), pa, pb)
            if is_zero(ma) or is_zero(mb):
                return c, "exact", sc, False  # the stored kernel itself: never written in place
            return _scaled(sc, c) + ma * mb, "exact", 1.0, False
        if not (is_zero(ma) and is_zero(mb)):
            return None
        rule = pair_rule(f, g)
        if rule is None:
            return None
        try:
            degree = pair_degree(f, g)
            if degree is not None and sa == sb == sc:  # the stored kernel as it is, then s^degree
                args, scale = (_nonneg(va), _nonneg(vb), c), sc**degree
            else:
                args, scale = (_nonneg(_scaled(sa, va)), _nonneg(_scaled(sb, vb)), _scaled(sc, c)), 1.0
            value = rule(*args)
            owned = _fresh(value, args)
            if scale != 1.0:
                value, owned = (value.mul_(scale) if owned else scale * value), True
            return value, "closed-form", 1.0, owned
        except CorrelationError as err:
            raise NumericalError(
                f"{self.where}: the covariance of the Gaussians is not positive semidefinite ({err})"
            ) from None

    def check_var(self, var: Tensor, parts: Tensor | None = None) -> None:
        """A variance below 0 beyond round-off stops the evaluation. Round-off is relative to the
        variance's own scale: `parts`, the size of the terms it was summed from where it is a
        linear combination (cancellation), else the largest variance itself; never an absolute floor."""
        var = torch.as_tensor(var)
        scale = torch.as_tensor(parts) if parts is not None else var.abs().amax()
        tol = psd_tolerance(1, var.dtype, self.noise)
        if bool((var < -tol * scale).any()):
            worst = float(var.min())
            raise NumericalError(f"{self.where}: a variance came out negative ({worst:.3g})")

    def magnitude(self, lin: Linear) -> Tensor | None:
        """For a combination a = sum_i c_i G_i, (sum_i |c_i| sd(G_i))^2: a bound on every term of
        Var(a), hence the scale of its round-off (cancellation may leave Var(a) itself far smaller).
        None for a single Gaussian, whose variance is its own scale."""
        if _is_unit(lin):
            return None
        total = torch.zeros((), dtype=self.dtype)
        for i, c in lin.coef.items():
            var = torch.clamp(torch.as_tensor(self.cov[i][i], dtype=self.dtype), min=0.0)
            total = total + torch.as_tensor(c, dtype=self.dtype).abs() * torch.sqrt(self.scales[i] * var)
        return total * total

    def check_corr(self, va: Tensor, vb: Tensor, c: Tensor, pa: Tensor | None = None,
                   pb: Tensor | None = None) -> None:
        """|Cov(a, b)| <= sd(a) sd(b), to round-off relative to the terms a and b were formed from."""
        excess = torch.as_tensor(c).abs() - torch.sqrt(torch.clamp(va * vb, min=0.0))
        scale = torch.sqrt(torch.as_tensor(pa if pa is not None else va).abs()
                           * torch.as_tensor(pb if pb is not None else vb).abs())
        tol = psd_tolerance(2, excess.dtype, self.noise)
        if bool((excess > tol * scale).any()):
            raise NumericalError(
                f"{self.where}: the covariance of the Gaussians is not positive semidefinite "
                f"(|Cov| exceeds the product of standard deviations by {float(excess.max()):.3g})"
            )

    # ------------------------------------------------------------------ quadrature and Monte Carlo
    def sampled(self, tree: ex.Tree, quadrature: bool, coarse: bool = False) -> Result:
        """E[tree] by Gauss-Hermite (`coarse`: 3/4 of the nodes) or Monte Carlo. The rule has one axis
        per direction the covariance spans: perfectly correlated Gaussians share one, so their
        expectation is a lower-dimensional quadrature with more nodes per axis."""
        k, shape = self.k, self.shape
        entries = int(np.prod(shape, dtype=np.int64)) if shape else 1
        mean = torch.stack([torch.as_tensor(m, dtype=self.dtype).expand(shape) for m in self.mean], -1)
        cov = torch.stack(
            [torch.stack([_scaled(self.pair_scale(i, j), torch.as_tensor(c, dtype=self.dtype)).expand(shape)
                          for j, c in enumerate(row)], -1)
             for i, row in enumerate(self.cov)], -2
        )
        mean = mean.reshape(entries, k)
        cov = cov.reshape(entries, k, k)
        factor = self.factor(cov)
        spanned = factor.abs().amax(dim=(0, 1)) > 0  # columns that no entry uses are dropped
        if bool(spanned.any()) and not bool(spanned.all()):
            factor = factor[..., spanned]
        rank = factor.shape[-1]
        if quadrature:
            nodes = QUADRATURE_NODES.get(rank, 2)
            z, w = gauss_hermite(rank, max(2, (3 * nodes) // 4) if coarse else nodes, self.dtype)
            method = "quadrature"
        else:
            z = device.normals((self.particles, rank), self.generator, self.dtype)
            w = torch.full((self.particles,), 1.0 / self.particles, dtype=self.dtype)
            method = "monte-carlo"
        leaves = _tensor_leaves(tree)
        flat = {id(t): torch.as_tensor(t.value, dtype=self.dtype).expand(shape).reshape(entries, 1)
                for t in leaves}
        out = torch.empty(entries, dtype=self.dtype)
        second = torch.empty(entries, dtype=self.dtype)
        size = torch.empty(entries, dtype=self.dtype)
        step = max(1, MAX_CHUNK // z.shape[0])
        for lo in range(0, entries, step):
            hi = min(entries, lo + step)
            g = mean[lo:hi, None, :] + torch.einsum("pk,ejk->epj", z, factor[lo:hi])
            vals = _evaluate(tree, g, {key: v[lo:hi] for key, v in flat.items()})
            vals = vals.expand(hi - lo, z.shape[0])
            out[lo:hi] = vals @ w
            if not quadrature:
                second[lo:hi] = (vals * vals) @ w
            else:
                size[lo:hi] = vals.abs() @ w
        stderr = None
        if not quadrature:
            var = torch.clamp(second - out * out, min=0.0)
            stderr = torch.sqrt(var / (self.particles - 1)).reshape(shape)
        if not torch.isfinite(out).all():
            raise NumericalError(f"{self.where}: the expectation is not finite ({method})")
        return Result(out.reshape(shape), {method}, stderr, size.reshape(shape) if quadrature else None)

    def factor(self, cov: Tensor) -> Tensor:
        """L with L L^T = cov for every entry, to round-off, singular entries included (see
        `psd_factor`); an indefinite entry stops the evaluation."""
        try:
            return psd_factor(cov, self.noise)
        except NotPSDError as err:
            raise NumericalError(f"{self.where}: the covariance of the Gaussians is not positive semidefinite "
                                 f"({err})") from None


class NotPSDError(ValueError):
    """A covariance is indefinite beyond the accuracy it was computed to."""


def psd_tolerance(k: int, dtype: torch.dtype, noise: float = 0.0) -> float:
    """How far below 0 an eigenvalue of a k x k correlation matrix (unit diagonal) may fall and the
    matrix still count as PSD: the round-off of forming it (a few ulps per entry, summed over a row),
    plus `noise`, the relative error of entries that were estimated (Monte Carlo), a few times over.
    In correlation units, so it is the same whatever the scale of each variable."""
    return PSD_ULPS * k * torch.finfo(dtype).eps + PSD_NOISE_SIGMAS * k * noise


def standard_deviations(var: Tensor) -> tuple[Tensor, Tensor]:
    """(sd, 1/sd) of variances, 1/sd = 0 where sd = 0: the scaling into correlation units that every
    scale-free decision here uses (cov * inv[:, None] * inv[None, :] has a unit diagonal)."""
    sd = torch.sqrt(torch.clamp(var, min=0.0))
    return sd, torch.where(sd > 0, 1.0 / torch.where(sd > 0, sd, 1.0), 0.0)


def psd_factor(cov: Tensor, noise: float = 0.0) -> Tensor:
    """L with L L^T = cov for a batch of covariances (..., k, k), exact to round-off for singular ones.

    Scale-free: each variable is measured in its own standard deviation first (cov = D R D with R a
    correlation matrix), so a variance of 1e12 next to one of 1 is as easy as two of 1. R is
    factored by Cholesky where that succeeds (it keeps the first Gaussian on an axis, which helps
    quadrature across a kink) and else by its eigenvectors, with the eigenvalues that round-off left
    below 0 set to 0: perfectly correlated Gaussians get one shared direction, no jitter is added.
    A zero variance makes a zero row. Raises NotPSDError where an eigenvalue of R is below
    -psd_tolerance, or a zero-variance variable has a nonzero covariance."""
    cov = (cov + cov.transpose(-1, -2)) / 2
    k = cov.shape[-1]
    tol = psd_tolerance(k, cov.dtype, noise)
    var = torch.diagonal(cov, dim1=-2, dim2=-1)
    top = var.abs().amax(-1, keepdim=True)  # the scale of each entry's variances
    if bool((var < -tol * top).any()):
        worst = float((var / torch.where(top > 0, top, 1.0)).min())
        raise NotPSDError(f"a variance is negative: {worst:.3g} times the largest")
    sd, inv = standard_deviations(var)
    corr = cov * inv[..., :, None] * inv[..., None, :]
    # a variable with variance 0 (to round-off) is the constant 0: its covariances must vanish too
    dead = (sd == 0)[..., :, None] | (sd == 0)[..., None, :]
    if bool((dead & (cov.abs() > tol * top[..., None])).any()):
        raise NotPSDError("a Gaussian of variance 0 has a nonzero covariance")
    corr = torch.where(dead, 0.0, corr)
    corr = corr + torch.diag_embed((sd == 0).to(cov.dtype))  # unit diagonal throughout
    chol, info = torch.linalg.cholesky_ex(corr)
    bad = info != 0
    if bool(bad.any()):
        try:  # on the CPU: an eigenbasis is not unique, and the factor must not depend on the device
            e, v = (t.to(corr.device) for t in torch.linalg.eigh(corr[bad].cpu()))
        except torch.linalg.LinAlgError:  # float32 on a nearly singular matrix: no factor to be had
            raise NotPSDError(f"its eigendecomposition did not converge in {str(cov.dtype)[6:]} (try float64)"
                              ) from None
        low = e.amin(-1)
        if bool((low < -tol).any()):
            raise NotPSDError(f"smallest eigenvalue {float(low.min()):.3g} of the correlation matrix, "
                              f"beyond its accuracy {tol:.2g}")
        # eigenvalues within round-off of 0 are 0 (moving R by at most tol): their directions are
        # dropped exactly, largest first so that the columns left are a prefix (fewer quadrature axes)
        e = torch.where(e > tol, e, 0.0)
        chol[bad] = (v * torch.sqrt(e).unsqueeze(-2)).flip(-1)
    return chol * sd[..., :, None]


def psd_pinv(cov: Tensor) -> Tensor:
    """The pseudo-inverse of one PSD matrix (k, k), scale-free: measured in each variable's standard
    deviation (D R D), only the directions of R with eigenvalues at round-off level are dropped, so an
    ill-conditioned but regular covariance keeps all of its directions, and a multiple of an earlier
    vector (a singular one) loses exactly one."""
    cov = (cov + cov.T) / 2
    _, inv = standard_deviations(torch.diagonal(cov))
    e, v = torch.linalg.eigh(cov * inv[:, None] * inv[None, :])
    keep = e > psd_tolerance(cov.shape[-1], cov.dtype) * max(1.0, float(e.max()) if e.numel() else 1.0)
    e_inv = torch.where(keep, 1.0 / torch.where(keep, e, 1.0), 0.0)
    r_inv = (v * e_inv) @ v.T
    return r_inv * inv[:, None] * inv[None, :]


def _product_factors(tree: object) -> list[object]:
    """The factors of a product tree (nested `mul`), in order."""
    if isinstance(tree, ex.Apply) and tree.fn == "mul":
        return [f for a in tree.args for f in _product_factors(a)]
    return [tree]


def _vars_of(tree: object) -> set[int]:
    """The Gaussians (Var indices) a tree uses."""
    if isinstance(tree, Var):
        return {tree.index}
    if isinstance(tree, ex.Apply):
        return set().union(*(_vars_of(a) for a in tree.args))
    return set()


def gauss_hermite(k: int, m: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Tensor-product Gauss-Hermite rule for E f(Z), Z ~ N(0, I_k): nodes (m^k, k), weights."""
    x, w = np.polynomial.hermite_e.hermegauss(m)
    w = w / math.sqrt(2 * math.pi)
    grids = np.meshgrid(*([x] * k), indexing="ij")
    wgrid = np.meshgrid(*([w] * k), indexing="ij")
    nodes = np.stack([g.ravel() for g in grids], -1)
    weights = np.prod(np.stack([g.ravel() for g in wgrid], -1), -1)
    return torch.tensor(nodes, dtype=dtype), torch.tensor(weights, dtype=dtype)


def _fresh(value: Tensor, inputs: tuple[Tensor, ...]) -> bool:
    """A rule's result is the caller's own: it shares no storage with the rule's inputs (some rules
    return one, like E[u v] = c) and the step-kernel cache does not hold it for a later request."""
    ptr = value.untyped_storage().data_ptr()
    return not kernel_is_shared(value) and all(
        torch.as_tensor(t).untyped_storage().data_ptr() != ptr for t in inputs)


def _holds(acc: Tensor, other: Tensor) -> bool:
    """acc *= other can be done in place: acc has the product's shape and dtype."""
    return (acc.is_contiguous() and acc.dtype == torch.promote_types(acc.dtype, other.dtype)
            and tuple(acc.shape) == broadcast_shapes(acc.shape, other.shape))


def _is_unit(lin: Linear) -> bool:
    """A single Gaussian with coefficient 1 and no constant."""
    if len(lin.coef) != 1 or not is_zero(lin.const):
        return False
    c = next(iter(lin.coef.values()))
    return isinstance(c, float) and c == 1.0


def _scaled(coef: Tensor | float, value: Tensor) -> Tensor:
    if isinstance(coef, float) and coef == 1.0:
        return value
    return coef * value


def _smooth(tree: object) -> bool:
    """No kink, jump or singularity in the integrand: functions flagged smooth, no division by
    a Gaussian, powers by non-negative integers only."""
    if not isinstance(tree, ex.Apply) or not _has_var(tree):  # a constant is smooth in the Gaussians
        return True
    if not FUNCTIONS[tree.fn].smooth:
        return False
    if tree.fn == "div" and _has_var(tree.args[1]):
        return False
    if tree.fn == "pow" and _has_var(tree.args[0]):
        e = tree.args[1]
        if not (isinstance(e, ex.Const) and e.value >= 0 and float(e.value).is_integer()):
            return False
    return all(_smooth(a) for a in tree.args)


def _constant(tree: object, dtype: torch.dtype) -> Tensor:
    """The value of an expression without Gaussians (tensor leaves and constants)."""
    if isinstance(tree, TensorLeaf):
        return torch.as_tensor(tree.value, dtype=dtype)
    if isinstance(tree, ex.Const):
        return torch.tensor(tree.value, dtype=dtype)
    assert isinstance(tree, ex.Apply)
    return FUNCTIONS[tree.fn].torch(*[_constant(a, dtype) for a in tree.args])


def _has_var(tree: object) -> bool:
    if isinstance(tree, Var):
        return True
    return isinstance(tree, ex.Apply) and any(_has_var(a) for a in tree.args)


def _nonneg(v: Tensor) -> Tensor:
    """Clamp round-off below zero, without a copy when there is none (the kernels key their
    shared angle on the tensors they receive)."""
    return v if bool((v >= 0).all()) else torch.clamp(v, min=0.0)


def _is_one(x: Tensor) -> bool:
    return x.dim() == 0 and float(x) == 1.0


def is_zero(x: Tensor | float) -> bool:
    t = torch.as_tensor(x)
    if t.numel() > 1 and t[(0,) * t.dim()] != 0:  # a dense kernel: decided by its first entry
        return False
    return bool((t == 0).all())


def _tensor_leaves(tree: object) -> list[TensorLeaf]:
    if isinstance(tree, TensorLeaf):
        return [tree]
    if isinstance(tree, ex.Apply):
        out: list[TensorLeaf] = []
        for a in tree.args:
            out += _tensor_leaves(a)
        return out
    return []


def _evaluate(tree: object, g: Tensor, leaves: dict[int, Tensor]) -> Tensor:
    """Evaluate the tree at Gaussian samples g (entries, points, k)."""
    if isinstance(tree, Var):
        return g[..., tree.index]
    if isinstance(tree, TensorLeaf):
        return leaves[id(tree)]
    if isinstance(tree, ex.Const):
        return torch.tensor(tree.value, dtype=g.dtype)
    assert isinstance(tree, ex.Apply)
    return FUNCTIONS[tree.fn].torch(*[_evaluate(a, g, leaves) for a in tree.args])
