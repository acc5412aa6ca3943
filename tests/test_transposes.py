"""Netsor-transpose programs: W and W.T are not independent, and the Zdot term says how."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import tpc

ROOT = Path(__file__).resolve().parent.parent
NETSOR = ROOT / "programs" / "netsor"


def gauss_mean(f) -> float:  # noqa: ANN001
    x, w = np.polynomial.hermite_e.hermegauss(200)
    return float(np.sum(w * f(x)) / math.sqrt(2 * math.pi))


def test_wishart_moments_are_catalan_numbers_exactly() -> None:
    out = tpc.limit(tpc.load(NETSOR / "wishart.tp"))
    for name, want in [("m1", 1), ("m2", 2), ("m3", 5), ("m4", 14), ("p2", 2)]:
        assert out[name].method == "exact"
        assert float(out[name].value) == pytest.approx(want, rel=1e-12), name


def test_transpose_tanh_limit_is_e_tanh_prime() -> None:
    want = gauss_mean(lambda x: 1 / np.cosh(x) ** 2)  # E tanh'(g) = 0.60571
    assert want == pytest.approx(0.60571, abs=1e-5)
    prog = tpc.load(NETSOR / "transpose_tanh.tp")
    out = tpc.limit(prog)
    m = out["m"]
    assert m.method == "exact+quadrature"  # Stein: E[g tanh(g)] by quadrature, no sampling
    assert float(m.value) == pytest.approx(want, abs=1e-9)
    # E z^2 = E tanh(g)^2 (Zhat) + (E tanh'(g))^2 (Zdot)
    q = gauss_mean(lambda x: np.tanh(x) ** 2) + want**2
    assert float(out["q"].value) == pytest.approx(q, abs=1e-9)
    # the particle evaluator (Monte Carlo, Stein from samples) agrees within its error
    from tpc.backends.limit.particles import ParticleEvaluator

    runs = [float(ParticleEvaluator(prog, False, particles=2**15, seed=s).run()["m"].value) for s in range(6)]
    assert abs(np.mean(runs) - want) < 5 * np.std(runs, ddof=1) / math.sqrt(len(runs))
    # finite width agrees with the limit, not with the naive answer
    fin = tpc.run(prog, 2048, 8)["m"]
    assert abs(float(fin.mean) - want) < 5 * float(fin.stderr) + 0.01
    assert float(fin.mean) > 0.5


def test_naive_independent_transpose_gives_zero() -> None:
    prog = tpc.load(NETSOR / "transpose_naive.tp")
    assert float(tpc.limit(prog)["m"].value) == 0.0
    fin = tpc.run(prog, 2048, 8)["m"]
    assert abs(float(fin.mean)) < 5 * float(fin.stderr) + 0.01


def test_zdot_zero_by_structure_is_found_not_assumed() -> None:
    """z = W (W.T y)^2: the derivative of an even function of a centred Gaussian has mean
    zero, so Zdot vanishes and mean(z y) -> 0; with relu instead it is E relu'(g) = 1/2."""
    src = "width n\nmatrix W : n x n ~ N(0, 1/n)\nvector y ~ N(0, 1)\ng = W.T @ y\n"
    even = tpc.loads(src + "z = W @ (g * g)\noutput m = mean(z * y)\n")
    relu = tpc.loads(src + "z = W @ relu(g)\noutput m = mean(z * y)\n")
    m_even = tpc.limit(even)["m"]
    m_relu = tpc.limit(relu)["m"]
    assert abs(float(m_even.value)) < 1e-12
    assert float(m_relu.value) == pytest.approx(0.5, abs=1e-12) and m_relu.method == "exact+closed-form"
    assert abs(float(tpc.run(relu, 2048, 8)["m"].mean) - 0.5) < 0.03


def test_linear_transpose_program_with_a_batch_is_exact() -> None:
    """A batch through W then W.T: gram(x, W^T W x) -> gram(x, x) = X X^T / 3 (the first
    Marchenko-Pastur moment is 1), all of it from Zdot: a naive computation gives 0."""
    src = (
        "width n\ndata X = [[1, 0, 0], [0.6, 0.8, 0], [0, 0, 2]]\nmatrix U : n x 3 ~ N(0, 1/3)\n"
        "matrix W : n x n ~ N(0, 1/n)\nx = U @ X\nb = W.T @ (W @ x)\noutput k = gram(x, b)\n"
    )
    prog = tpc.loads(src)
    out = tpc.limit(prog)["k"]
    x = np.array([[1, 0, 0], [0.6, 0.8, 0], [0, 0, 2]])
    assert out.method == "exact"
    np.testing.assert_allclose(out.value, x @ x.T / 3, rtol=1e-12, atol=1e-14)
    fin = tpc.run(prog, 2048, 8)["k"]
    assert np.all(np.abs(fin.mean - out.value) < 5 * fin.stderr + 0.01)


def test_batched_nonlinear_transpose_by_particles() -> None:
    """A batch through W.T, a nonlinearity, then W: Zdot mixes batch elements, which the
    particle evaluator handles (Monte Carlo); finite width agrees."""
    src = (
        "width n\ndata X = [[1, 0], [0.6, 0.8], [0, 2]]\nmatrix U : n x 2 ~ N(0, 1)\n"
        "matrix W : n x n ~ N(0, 1/n)\nx = U @ X\nz = W @ tanh(W.T @ x)\noutput k = gram(z, x)\n"
    )
    prog = tpc.loads(src)
    lim = tpc.limit(prog, particles=2**15)["k"]
    assert lim.method == "monte-carlo" and lim.stderr is not None
    fin = tpc.run(prog, 2048, 8)["k"]
    assert np.all(np.abs(fin.mean - lim.value) < 5 * np.sqrt(fin.stderr**2 + lim.stderr**2) + 0.02)
    assert np.abs(lim.value).max() > 0.1  # not the naive zero


def test_transposes_of_input_and_readout_layers() -> None:
    """U.T @ h / n for an input layer (a moment per column: backprop to the inputs) and V.T @ c
    for a readout matrix (a combination of its rows), in the limit and at finite width."""
    src = (
        "width n\ndata X = [[1, 0], [0.6, 0.8], [0, 2]]\ndata C = [[1, 0, 1], [0, 2, 0]]\n"
        "matrix U : n x 2 ~ N(0, 1)\nmatrix V : 3 x n ~ N(0, 1)\nh = tanh(U @ X)\nb = V.T @ C\n"
        "output back = U.T @ h / n\noutput k = gram(b)\n"
    )
    prog = tpc.loads(src)
    lim = tpc.limit(prog)
    x = np.array([[1, 0], [0.6, 0.8], [0, 2]])
    # E[tanh(u.x) u_j] = x_j E[tanh'(u.x)] (Stein), u.x ~ N(0, |x|^2)
    norms = np.linalg.norm(x, axis=1)
    et = [gauss_mean(lambda g, s=s: 1 / np.cosh(s * g) ** 2) for s in norms]
    np.testing.assert_allclose(lim["back"].value, x * np.array(et)[:, None], atol=1e-7)  # 1-D quadrature
    c = np.array([[1, 0, 1], [0, 2, 0]])
    np.testing.assert_allclose(lim["k"].value, c @ c.T, rtol=1e-12)
    assert lim["k"].method == "exact"
    fin = tpc.run(prog, 4096, 8)
    for name in ("back", "k"):
        assert np.all(np.abs(fin[name].mean - lim[name].value) < 5 * fin[name].stderr + 0.01), name
    with pytest.raises(tpc.TpcError, match="as a moment"):
        tpc.loads("width n\nmatrix U : n x 2 ~ N(0, 1)\nvector y ~ N(0, 1)\noutput m = U.T @ y / sqrt(n)\n")
