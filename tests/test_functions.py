"""Each nonlinearity's closed forms against an independent numerical integral.

The reference is a tensor-product Gauss-Hermite rule written here with numpy (many nodes);
for functions with a kink (relu, step, abs, sign) it is Monte Carlo with 4e6 samples, since
polynomial quadrature converges slowly across a kink.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tpc.ops.functions import FUNCTIONS, pair_rule

KINKED = {"relu", "step", "abs", "sign"}
RNG = np.random.default_rng(1234)
Z = RNG.standard_normal((2, 4_000_000))


def np_fn(name: str):  # noqa: ANN201
    return lambda x: FUNCTIONS[name].torch(torch.from_numpy(np.asarray(x, dtype=np.float64))).numpy()


def reference_mean(name: str, mu: float, var: float) -> tuple[float, float]:
    """E f(u), u ~ N(mu, var), and a tolerance."""
    f = np_fn(name)
    s = math.sqrt(var)
    if name in KINKED:
        vals = f(mu + s * Z[0])
        return float(vals.mean()), 6 * float(vals.std()) / math.sqrt(vals.size) + 1e-12
    x, w = np.polynomial.hermite_e.hermegauss(200)
    return float(np.sum(w * f(mu + s * x)) / math.sqrt(2 * math.pi)), 1e-8


def reference_pair(f: str, g: str, a: float, b: float, c: float) -> tuple[float, float]:
    u_coef = math.sqrt(a)
    rho = c / math.sqrt(a * b)
    ff, gg = np_fn(f), np_fn(g)
    if f in KINKED or g in KINKED:
        u = u_coef * Z[0]
        v = math.sqrt(b) * (rho * Z[0] + math.sqrt(max(0.0, 1 - rho * rho)) * Z[1])
        vals = ff(u) * gg(v)
        return float(vals.mean()), 6 * float(vals.std()) / math.sqrt(vals.size) + 1e-12
    x, w = np.polynomial.hermite_e.hermegauss(120)
    z1, z2 = np.meshgrid(x, x, indexing="ij")
    ww = np.outer(w, w) / (2 * math.pi)
    u = u_coef * z1
    v = math.sqrt(b) * (rho * z1 + math.sqrt(max(0.0, 1 - rho * rho)) * z2)
    return float(np.sum(ww * ff(u) * gg(v))), 1e-7


MEANS = [name for name, f in FUNCTIONS.items() if f.mean is not None and f.arity == 1]


@pytest.mark.parametrize("name", MEANS)
@pytest.mark.parametrize("mu,var", [(0.0, 1.0), (0.7, 0.5), (-1.2, 2.0)])
def test_gaussian_mean_closed_form(name: str, mu: float, var: float) -> None:
    got = float(FUNCTIONS[name].mean(torch.tensor(mu, dtype=torch.float64), torch.tensor(var, dtype=torch.float64)))
    want, tol = reference_mean(name, mu, var)
    assert got == pytest.approx(want, abs=tol, rel=1e-7)


PAIRS = sorted(
    {(f, g) for f, fn in FUNCTIONS.items() for g in fn.pairs}
    | {("identity", g) for g in FUNCTIONS if FUNCTIONS[g].arity == 1 and pair_rule("identity", g)}
)
COVS = [(1.0, 1.0, 0.3), (0.5, 2.0, -0.6), (1.5, 0.7, 0.0), (2.0, 2.0, 1.99)]


@pytest.mark.parametrize("f,g", PAIRS, ids=[f"{f}-{g}" for f, g in PAIRS])
@pytest.mark.parametrize("a,b,c", COVS)
def test_pair_closed_form(f: str, g: str, a: float, b: float, c: float) -> None:
    rule = pair_rule(f, g)
    assert rule is not None
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    got = float(rule(t(a), t(b), t(c)))
    want, tol = reference_pair(f, g, a, b, c)
    assert got == pytest.approx(want, abs=tol, rel=1e-6)
    # the rule is symmetric under swapping the two functions
    swapped = pair_rule(g, f)
    assert float(swapped(t(b), t(a), t(c))) == pytest.approx(got, rel=1e-12, abs=1e-15)


def test_relu_kernel_known_values() -> None:
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    relu = pair_rule("relu", "relu")
    assert float(relu(t(1.0), t(1.0), t(1.0))) == pytest.approx(0.5)  # E relu(u)^2
    assert float(relu(t(1.0), t(1.0), t(0.0))) == pytest.approx(1 / (2 * math.pi))
    assert float(pair_rule("step", "step")(t(1.0), t(1.0), t(0.0))) == pytest.approx(0.25)
    assert float(pair_rule("erf", "erf")(t(1.0), t(1.0), t(1.0))) == pytest.approx(
        2 / math.pi * math.asin(2 / 3)
    )


def test_derivatives_match_autograd() -> None:
    """deriv rules (used by Stein's lemma here and by autodiff later) against torch.autograd."""
    from tpc.ops import expr as ex

    grid = torch.linspace(-2.5, 2.5, 41, dtype=torch.float64) + 0.013
    for name, fn in FUNCTIONS.items():
        if fn.arity != 1 or fn.deriv is None:
            continue
        if fn.jumps:  # piecewise constant: zero almost everywhere
            assert fn.deriv(ex.Arg(0)) == ex.Const(0.0)
            continue
        x = grid.abs() + 0.1 if name in ("sqrt", "log") else grid  # their domain
        xr = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(fn.torch(xr).sum(), xr)
        d = fn.deriv(ex.Arg(0))
        got = _eval(d, x)
        assert torch.allclose(got.expand_as(grad), grad, atol=1e-10), name


def _eval(tree, x):  # noqa: ANN001, ANN202
    from tpc.ops import expr as ex

    if isinstance(tree, ex.Arg):
        return x
    if isinstance(tree, ex.Const):
        return torch.tensor(tree.value, dtype=torch.float64)
    return FUNCTIONS[tree.fn].torch(*[_eval(a, x) for a in tree.args])


@pytest.mark.parametrize("name", [n for n, f in FUNCTIONS.items() if f.arity == 1])
def test_emitted_source_of_each_function(name: str) -> None:
    """The torch source template of each function, inside larger expressions, computes the
    same numbers as its torch rule (operator precedence included)."""
    import math as m

    from tpc.backends.torch.codegen import _tree_code
    from tpc.ops import expr as ex

    x = torch.linspace(0.1, 2.0, 7, dtype=torch.float64)
    f = FUNCTIONS[name].torch
    a = ex.Apply(name, (ex.Arg(0),))
    cases = [
        (ex.Apply("mul", (ex.Arg(1), ex.Apply("mul", (a, ex.Const(3.0))))), lambda: -x * (f(x) * 3)),
        (ex.Apply("neg", (a,)), lambda: -f(x)),
        (ex.Apply("pow", (a, ex.Const(3.0))), lambda: f(x) ** 3),
        (ex.Apply(name, (ex.Apply("sub", (ex.Arg(0), ex.Const(0.05))),)), lambda: f(x - 0.05)),
    ]
    for tree, want in cases:
        code = _tree_code(tree, ["x", "(-x)"])
        got = eval(code, {"torch": torch, "math": m, "x": x})  # noqa: S307 - our own generated code
        assert torch.allclose(got, want(), rtol=1e-12, atol=1e-14), code
