"""The limit of every bundled program against an independent computation written here
(closed-form recursions in numpy, numpy quadrature, or a large Monte Carlo of the limiting
Gaussians)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import tpc
from tests.helpers import arccos_matrix

ROOT = Path(__file__).resolve().parent.parent
X8 = np.loadtxt(ROOT / "programs" / "kernels" / "data" / "inputs8x3.csv", delimiter=",")


def limit(rel: str, **kw):  # noqa: ANN003, ANN201
    return tpc.limit(tpc.load(ROOT / "programs" / rel), **kw)


def arccos1(k: np.ndarray) -> np.ndarray:
    return arccos_matrix(k)[0]  # E[relu(u) relu(v)]


def arcsine(k: np.ndarray) -> np.ndarray:
    d = 1 + 2 * np.diag(k)
    return 2 / np.pi * np.arcsin(2 * k / np.sqrt(np.outer(d, d)))


def gh2(f, k: np.ndarray, nodes: int = 80) -> np.ndarray:  # noqa: ANN001
    """E f(u) f(v) for every pair, by a numpy Gauss-Hermite rule on a Cholesky factor."""
    x, w = np.polynomial.hermite_e.hermegauss(nodes)
    z1, z2 = np.meshgrid(x, x, indexing="ij")
    ww = np.outer(w, w) / (2 * np.pi)
    out = np.empty_like(k)
    for i in range(len(k)):
        for j in range(len(k)):
            a, b, c = k[i, i], k[j, j], k[i, j]
            l11 = math.sqrt(a)
            l21 = c / l11
            l22 = math.sqrt(max(b - l21 * l21, 0.0))
            out[i, j] = np.sum(ww * f(l11 * z1) * f(l21 * z1 + l22 * z2))
    return out


def gelu(x: np.ndarray) -> np.ndarray:
    from math import erf

    return x * 0.5 * (1 + np.vectorize(erf)(x / math.sqrt(2)))


def test_relu_mlp_is_the_arccos_recursion() -> None:
    out = limit("kernels/relu_mlp.tp")["nngp"]
    k1 = 2 / 3 * X8 @ X8.T
    k2 = 2 * arccos1(k1)
    k3 = 2 * arccos1(k2)
    want = arccos1(k3)
    assert out.method == "exact+closed-form"
    np.testing.assert_allclose(out.value, want, rtol=1e-12, atol=1e-14)


def test_erf_mlp_is_the_arcsine_recursion() -> None:
    out = limit("kernels/erf_mlp.tp")["nngp"]
    k1 = 1.5 / 3 * X8 @ X8.T
    want = arcsine(1.5 * arcsine(k1))
    assert out.method == "exact+closed-form"
    np.testing.assert_allclose(out.value, want, rtol=1e-12, atol=1e-14)


def test_gelu_mlp_by_independent_quadrature() -> None:
    out = limit("kernels/gelu_mlp.tp")["nngp"]
    k1 = X8 @ X8.T / 3
    want = gh2(gelu, gh2(gelu, k1))
    assert out.method == "exact+quadrature"
    np.testing.assert_allclose(out.value, want, rtol=2e-5, atol=1e-7)


def test_linear_mlp_is_exact() -> None:
    out = limit("kernels/linear_mlp.tp")
    np.testing.assert_allclose(out["nngp"].value, X8 @ X8.T / 3, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(out["feats"].value, X8 @ X8.T / 3, rtol=1e-13, atol=1e-15)
    assert out["nngp"].method == "exact" and out["feats"].method == "exact"


def test_moments_closed_values() -> None:
    out = limit("netsor/moments.tp")
    assert out["ab"].value == pytest.approx(0.6, abs=1e-15)
    assert out["c2"].value == pytest.approx(0.75, abs=1e-15)
    mu, s = 0.5, math.sqrt(0.5)
    phi = math.exp(-0.5 * (mu / s) ** 2) / math.sqrt(2 * math.pi)
    big_phi = 0.5 * (1 + math.erf(mu / s / math.sqrt(2)))
    assert out["relu_c"].value == pytest.approx(mu * big_phi + s * phi, rel=1e-12)
    t = math.acos(0.6 / math.sqrt(2))
    arccos = math.sqrt(2) / (2 * math.pi) * (math.sin(t) + (math.pi - t) * math.cos(t))
    assert out["arccos"].value == pytest.approx(arccos, rel=1e-12)
    assert out["ratio"].value == pytest.approx(0.6 / math.sqrt(2), rel=1e-12)
    # tanh(a) tanh(b) c over the declared 3-dimensional Gaussian, by Monte Carlo here
    rng = np.random.default_rng(7)
    cov = np.array([[1, 0.6, 0], [0.6, 2, 0.3], [0, 0.3, 0.5]])
    z = rng.multivariate_normal([0, 0, 0.5], cov, size=4_000_000)
    vals = np.tanh(z[:, 0]) * np.tanh(z[:, 1]) * z[:, 2]
    se = vals.std() / math.sqrt(len(vals))
    assert out["tanh3"].method == "quadrature"
    assert abs(out["tanh3"].value - vals.mean()) < 5 * se


def test_normalized_layer() -> None:
    out = limit("netsor/normalized.tp")
    np.testing.assert_allclose(out["scale"].value, np.linalg.norm(X8, axis=1) / math.sqrt(3), rtol=1e-12)
    swish = lambda x: x / (1 + np.exp(-x))  # noqa: E731
    x, w = np.polynomial.hermite_e.hermegauss(150)
    energy = np.sum(w * swish(x) ** 2) / math.sqrt(2 * math.pi)
    np.testing.assert_allclose(out["energy"].value, energy, rtol=1e-8)
    corr = (X8 @ X8.T) / np.outer(np.linalg.norm(X8, axis=1), np.linalg.norm(X8, axis=1))
    np.testing.assert_allclose(out["k"].value, gh2(swish, corr), rtol=1e-6, atol=1e-9)


def test_rnn_by_monte_carlo_of_the_limiting_gaussians() -> None:
    """Simulate the limit directly: U x_t are Gaussians with covariance x_s . x_t, and the W
    family is built step by step with Cov(W h_s, W h_t) = 1.5 E[h_s h_t]."""
    out = limit("kernels/rnn_tanh.tp")
    rng = np.random.default_rng(3)
    m = 2_000_000
    xs = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, -0.5], [0.5, 0.5, 0.5]])
    u = rng.multivariate_normal(np.zeros(3), xs @ xs.T, size=m)
    h1 = np.tanh(u[:, 0])
    g1 = math.sqrt(1.5 * np.mean(h1 * h1)) * rng.standard_normal(m)
    h2 = np.tanh(g1 + u[:, 1])
    # g2 with Var 1.5 E[h2^2] and Cov(g1, g2) = 1.5 E[h1 h2]
    var1, var2, c12 = 1.5 * np.mean(h1 * h1), 1.5 * np.mean(h2 * h2), 1.5 * np.mean(h1 * h2)
    g2 = c12 / var1 * g1 + math.sqrt(var2 - c12**2 / var1) * rng.standard_normal(m)
    h3 = np.tanh(g2 + u[:, 2])
    for name, vals in [("m12", h1 * h2), ("m23", h2 * h3), ("m33", h3 * h3)]:
        se = vals.std() / math.sqrt(m)
        assert abs(out[name].value - vals.mean()) < 5 * se + 2e-4, name


def test_methods_can_be_forced() -> None:
    prog = tpc.load(ROOT / "programs" / "kernels" / "relu_mlp.tp")
    exact = tpc.limit(prog)["nngp"].value
    quad = tpc.limit(prog, method="quadrature")["nngp"]
    assert quad.method == "exact+quadrature"
    # Gauss-Hermite converges slowly across relu's kink (hence closed forms under auto):
    # measured 0.4% of the largest entry after three layers
    assert np.abs(quad.value - exact).max() < 0.01 * np.abs(exact).max()
    erf = tpc.load(ROOT / "programs" / "kernels" / "erf_mlp.tp")
    np.testing.assert_allclose(tpc.limit(erf, method="quadrature")["nngp"].value,
                               tpc.limit(erf)["nngp"].value, atol=2e-4)
    mc = tpc.limit(prog, method="monte-carlo", particles=2**15, replicates=8)["nngp"]
    assert mc.method == "exact+monte-carlo" and mc.stderr is not None
    assert np.all(np.abs(mc.value - exact) < 5 * mc.stderr + 1e-12)
    with pytest.raises(tpc.NumericalError, match="not linear"):
        tpc.limit(prog, method="exact")


def test_float32_limit_is_close() -> None:
    prog = tpc.load(ROOT / "programs" / "kernels" / "relu_mlp.tp")
    np.testing.assert_allclose(tpc.limit(prog, dtype="float32")["nngp"].value,
                               tpc.limit(prog)["nngp"].value, rtol=1e-5)


def test_float32_takes_an_input_of_zeros() -> None:
    """A zero input row makes a Gaussian of variance 0: its kernel entries are 0, not 0/0. In float32
    the closed forms' floor under a variance (1e-300) underflowed to 0 and gave NaN (found by a
    reviewer). E[gelu(z)^2] for z ~ N(0, 7) is 3.4404 (quadrature written here)."""
    prog = tpc.loads("width n\ndata X = [[1, 2, 3], [0, 0, 0]]\nmatrix U : n x 3 ~ N(0, 1)\n"
                     "matrix W : n x n ~ N(0, 1/n)\nx1 = relu(U @ X)\noutput G = gram(gelu(W @ x1))\n"
                     "output K = gram(relu(W @ x1))\n")
    z, w = np.polynomial.hermite_e.hermegauss(200)
    z = z * math.sqrt(7.0)
    gelu2 = float(np.sum(w * (z * 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))) ** 2) / math.sqrt(2 * math.pi))
    for dtype in ("float64", "float32"):
        lim = tpc.limit(prog, dtype=dtype)
        assert lim["K"].value == pytest.approx(np.array([[3.5, 0.0], [0.0, 0.0]]), rel=1e-5, abs=1e-6), dtype
        g = lim["G"]
        assert abs(g.value[1, 1]) < 1e-12 and abs(g.value[0, 1]) < 1e-12
        assert abs(g.value[0, 0] - gelu2) < 5 * float(np.max(g.stderr)) + 1e-6, (dtype, g.value, gelu2)


def test_naming_an_intermediate_keeps_the_closed_form() -> None:
    prog = tpc.loads("width n\nvector v ~ N(0, 1)\nx = relu(v)\noutput m = mean(x)\noutput m2 = mean(relu(v))\n")
    out = tpc.limit(prog)
    for name in ("m", "m2"):
        assert out[name].method == "closed-form"
        assert float(out[name].value) == pytest.approx(1 / math.sqrt(2 * math.pi), rel=1e-14)


def test_non_smooth_integrands_use_monte_carlo_not_quadrature() -> None:
    """log|v| is singular at 0 and tanh(a) sign(b) jumps: Gauss-Hermite would be silently off
    (by 10% and 1.5%), so auto takes them by Monte Carlo, which reports its error."""
    src = ("width n\nvector v ~ N(0, 1)\nvector a, b ~ N([0, 0], [[1, 1], [1, 1]])\n"
           "output l = mean(log(abs(v)))\noutput t = mean(tanh(a) * sign(b))\n")
    out = tpc.limit(tpc.loads(src))
    exact_l = -(0.5772156649015329 + math.log(2)) / 2
    z = np.linspace(0, 12, 400_001)  # E|tanh Z| = 2 int_0^oo tanh(z) phi(z) dz, trapezoid rule
    exact_t = float(np.trapezoid(2 * np.tanh(z) * np.exp(-z * z / 2) / math.sqrt(2 * math.pi), z))
    for name, exact in (("l", exact_l), ("t", exact_t)):
        assert out[name].method == "monte-carlo"
        assert abs(float(out[name].value) - exact) < 5 * float(out[name].stderr)


def test_quadrature_checks_itself_against_a_coarser_rule() -> None:
    """E[exp(u v)] is infinite: fine and coarse Gauss-Hermite rules disagree wildly, so auto
    falls back to Monte Carlo, whose standard error shows the trouble. A steep but smooth
    integrand (sech^2 of a variance-4 Gaussian) passes the check and stays quadrature."""
    src = ("width n\nvector v, u ~ N([1, 0], [[1, 0.3], [0.3, 1]])\nvector g ~ N(0, 4)\n"
           "output m = mean(exp(u) ^ v)\noutput s = mean(1 - tanh(g) ^ 2)\n")
    out = tpc.limit(tpc.loads(src))
    assert out["m"].method == "monte-carlo" and float(out["m"].stderr) > 0.1 * abs(float(out["m"].value))
    assert out["s"].method == "quadrature"
    z = np.linspace(0, 30, 600_001)
    exact = float(np.trapezoid(2 / np.cosh(2 * z) ** 2 * np.exp(-z * z / 2) / math.sqrt(2 * math.pi), z))
    assert float(out["s"].value) == pytest.approx(exact, rel=1e-7)


def test_scalar_arithmetic_never_writes_into_its_inputs() -> None:
    """Scalar Nonlins over kernels are evaluated in place where they own a temporary; the
    kernels they read (outputs themselves here) must come out unchanged."""
    src = ("width n\ndata X = [[1, 0], [0.6, 0.8]]\nmatrix U : n x 2 ~ N(0, 1)\nx = relu(U @ X)\n"
           "k = gram(x)\noutput k1 = k\noutput k2 = identity(k) * 2 + k * k\noutput k3 = k\n")
    out = tpc.limit(tpc.loads(src))
    np.testing.assert_array_equal(out["k1"].value, out["k3"].value)
    np.testing.assert_allclose(out["k2"].value, 2 * out["k1"].value + out["k1"].value ** 2, rtol=1e-15)


def test_an_evaluation_frees_its_kernels_without_the_garbage_collector() -> None:
    """A program and the limit evaluator hold every kernel of an evaluation (N x N each). Reference
    cycles among them (a recursive closure, networkx's cached edge views) kept them all alive until
    Python's cyclic collector happened to run: a loop over evaluations grew by a whole evaluation's
    kernels per step. Plain reference counting must free them."""
    import gc

    from tpc.backends.limit.evaluate import LimitEvaluator
    from tpc.ir import Program

    gc.collect()
    gc.disable()
    try:
        out = limit("kernels/relu_mlp.tp")  # NNGP + NTK: autodiff, kernels, the step-kernel cache
        assert out["ntk"].value.shape == (8, 8)
        del out
        left = [o for o in gc.get_objects() if type(o) in (LimitEvaluator, Program)]
    finally:
        gc.enable()
    assert left == []


def test_a_step_kernel_handed_out_is_never_written_by_a_later_product(tmp_path: Path) -> None:
    """The step kernel J0 of a covariance is cached for its next request, which may form a product in
    place over it (an NTK's backward kernels). A J0 that a program output already holds must stay
    intact: here gram(step(h)) is an output and then a factor of gram(y * step(h))."""
    rng = np.random.default_rng(3)
    x, x2 = rng.standard_normal((300, 3)), rng.standard_normal((300, 3))  # 300^2 entries: cached
    np.save(tmp_path / "X.npy", x)
    np.save(tmp_path / "X2.npy", x2)
    src = ("width n\ndata X = load(\"X.npy\")\ndata X2 = load(\"X2.npy\")\nmatrix U : n x 3 ~ N(0, 1)\n"
           "matrix V : n x 3 ~ N(0, 1)\nmatrix W : n x n ~ N(0, 1/n)\n"
           "h = U @ X\nk0 = gram(step(h))\ny = W @ relu(V @ X2)\nk1 = gram(y * step(h))\n"
           "output a = k0\noutput b = k1\n")
    out = tpc.limit(tpc.loads(src, base_dir=tmp_path))
    k = x @ x.T
    d = np.sqrt(np.diag(k))
    j0 = (np.pi - np.arccos(np.clip(k / np.outer(d, d), -1, 1))) / (2 * np.pi)
    np.testing.assert_allclose(out["a"].value, j0, atol=1e-7)  # arccos near +-1: sqrt(rounding)
    np.testing.assert_allclose(out["b"].value, arccos1(x2 @ x2.T) * j0, atol=1e-7)
