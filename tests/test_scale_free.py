"""Every numerical decision of the limit evaluator is scale-free, and singular covariances are factored
exactly: regressions for three failures, independent reference values computed here (not by tpc's
rules), and a property test of positive homogeneity over scales 1e-6 .. 1e6."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tpc
from tpc.backends.limit.expect import Expectation, NotPSDError, Var, psd_factor, psd_pinv
from tpc.errors import NumericalError
from tpc.ops import expr as ex


def gaussian_mean(f: object, sd: float) -> float:
    """E f(sd Z), Z ~ N(0, 1), by the trapezoid rule on a grid that is fine near 0 (where f may bend
    over a width 1/sd) and wide enough for the tails: numpy only, no rule of tpc's."""
    z = np.unique(np.concatenate([np.linspace(-40, 40, 400_001), np.linspace(-1e-3, 1e-3, 200_001)]))
    dens = np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return float(np.trapezoid(f(sd * z) * dens, z))


def gelu(x: np.ndarray) -> np.ndarray:
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


# ---------------------------------------------------------------------------- the three failures


def test_gelu_gram_of_inputs_of_very_different_norms() -> None:
    """Norms 1e6 and 1: a jitter relative to the largest eigenvalue added a variance of 1 to the small
    input and gave 1.84e5 for the off-diagonal entry instead of 1.125e5."""
    prog = tpc.loads("width n\ndata X = [[1e6, 0, 0], [0, 1, 0]]\nmatrix U : n x 3 ~ N(0, 1)\n"
                     "x = gelu(U @ X)\noutput g = gram(x)\n")
    out = tpc.limit(prog)["g"]
    big, small = gaussian_mean(gelu, 1e6), gaussian_mean(gelu, 1.0)
    want = np.array([[gaussian_mean(lambda u: gelu(u) ** 2, 1e6), big * small],
                     [big * small, gaussian_mean(lambda u: gelu(u) ** 2, 1.0)]])
    stderr = np.zeros_like(want) if out.stderr is None else out.stderr
    assert np.all(stderr <= 0.02 * np.abs(want))  # precise enough for the check to mean something
    assert np.all(np.abs(out.value - want) <= 6 * stderr + 1e-9 * np.abs(want))


def chain(steps: int) -> str:
    """A shared-W chain alternating W and W.T: its Gaussian families' Gram matrices are estimated entry
    by entry (some by Monte Carlo), so they are PSD only up to their sampling error."""
    lines = ["width n", "matrix W : n x n ~ N(0, 1/n)", "vector y ~ N(0, 1)", "x0 = y"]
    for i in range(1, steps + 1):
        lines.append(f"x{i} = tanh({'W' if i % 2 else 'W.T'} @ x{i - 1})")
    return "\n".join(lines) + f"\noutput m = mean(x{steps} * x{steps})\n"


def test_shared_matrix_chain_is_not_refused() -> None:
    """The old PSD tolerance (1e-8 of max(1, largest eigenvalue)) refused this valid program."""
    prog = tpc.loads(chain(8))
    lim = tpc.limit(prog, particles=2**12, replicates=2)["m"]
    fin = tpc.run(prog, 1024, 4)["m"]  # the finite-width backend: an independent computation
    err = math.hypot(float(lim.stderr or 0.0), float(fin.stderr))
    assert abs(float(lim.value) - float(fin.mean)) < 5 * err + 0.03


def test_perfectly_correlated_gaussians() -> None:
    """W @ (g / |g|) and W @ g are one Gaussian family with a singular covariance: a = b / sqrt(2)
    exactly (g ~ N(0, 2)). Refused before; now E[a b] = sqrt 2, E[a^2 b^2] = 2 E[a^4] = 6 and
    E[tanh(a) tanh(b)] = E[tanh(Z) tanh(sqrt2 Z)] (a one-dimensional quadrature, exact to 1e-10)."""
    prog = tpc.loads("width n\nmatrix W : n x n ~ N(0, 1/n)\nvector g ~ N(0, 2)\nh = g / sqrt(mean(g * g))\n"
                     "a = W @ h\nb = W @ g\noutput m = mean(a * b)\noutput q = mean(a * a * b * b)\n"
                     "output t = mean(tanh(a) * tanh(b))\n")
    out = tpc.limit(prog)
    assert float(out["m"].value) == pytest.approx(math.sqrt(2), rel=1e-12)
    assert float(out["q"].value) == pytest.approx(6.0, rel=1e-10)
    want = gaussian_mean(lambda z: np.tanh(z) * np.tanh(math.sqrt(2) * z), 1.0)
    assert float(out["t"].value) == pytest.approx(want, rel=1e-8)
    assert "monte-carlo" not in out["t"].method


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])
def test_particles_with_a_repeated_direction(scale: float) -> None:
    """On the particles path (W.T over a batch), W @ (2 g) next to W @ g makes the family's Gram
    singular. z = W.T (a + b) = Zhat + 3 g, so gram(z, g) = 3 X X^T exactly."""
    x = np.array([[1.0, 0.0], [0.5, 1.0]]) * scale
    prog = tpc.loads(f"width n\ndata X = {x.tolist()}\nmatrix U : n x 2 ~ N(0, 1)\nmatrix W : n x n ~ N(0, 1/n)\n"
                     "g = U @ X\na = W @ g\nb = W @ (2 * g)\nz = W.T @ (a + b)\noutput m = gram(z, g)\n")
    out = tpc.limit(prog)["m"]
    assert out.method == "exact"
    np.testing.assert_allclose(out.value, 3 * x @ x.T, rtol=1e-12, atol=1e-12 * scale**2)


# ---------------------------------------------------------------------------- PSD decisions


@pytest.mark.parametrize("scale", [1e-150, 1e-12, 1.0, 1e12, 1e150])
def test_factor_is_exact_for_singular_covariances_at_any_scale(scale: float) -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 2))
    cov = torch.tensor(a @ a.T * scale)[None]  # rank 2 of 4
    sd = torch.tensor([1.0, 1e-4, 1e4, 3.0], dtype=torch.float64)
    cov = torch.cat([cov, (cov * sd[:, None] * sd[None, :])])  # one entry with very unequal variances
    factor = psd_factor(cov)
    recon = factor @ factor.transpose(-1, -2)
    scales = torch.sqrt(torch.diagonal(cov, dim1=-2, dim2=-1))
    rel = (recon - cov).abs() / (scales[..., :, None] * scales[..., None, :])
    assert float(rel.max()) < 1e-13


@pytest.mark.parametrize("scale", [1e-12, 1.0, 1e12])
def test_indefinite_covariance_is_refused_at_any_scale(scale: float) -> None:
    cov = torch.tensor([[[1.0, 0.99, 0.0], [0.99, 1.0, 0.99], [0.0, 0.99, 1.0]]], dtype=torch.float64) * scale
    with pytest.raises(NotPSDError):
        psd_factor(cov)
    where = "instruction h (line 3)"
    tree = ex.Apply("mul", (ex.Apply("tanh", (Var(0),)), ex.Apply("mul", (ex.Apply("tanh", (Var(1),)),
                                                                          ex.Apply("tanh", (Var(2),))))))
    e = Expectation((), [torch.zeros((), dtype=torch.float64)] * 3,
                    [[cov[0, i, j] for j in range(3)] for i in range(3)], torch.float64, where)
    with pytest.raises(NumericalError, match="instruction h"):
        e(tree)


@pytest.mark.parametrize("var", [0.5, 2.0, 8.0])
def test_a_scaled_gaussian_beside_a_combination_is_not_refused(var: float) -> None:
    """E[h (h + 0.1 u)] = var for h = W x with W of variance var / n (a Gaussian whose covariance is
    kept unscaled, var apart) and u independent: the Cauchy-Schwarz check compared the unscaled
    Var(h) with Cov(h, h + 0.1 u) in full units, and refused var = 2 as not PSD (an excess of 0.58)."""
    prog = tpc.loads(f"width n\nmatrix W : n x n ~ N(0, {var}/n)\nvector x ~ N(0, 1)\nvector u ~ N(0, 1)\n"
                     "h = W @ x\noutput m = mean(h * (h + 0.1 * u))\noutput s = mean((h - 0.1 * u) * h)\n")
    lim = tpc.limit(prog)
    assert lim["m"].method == "exact"
    assert lim["m"].value == pytest.approx(var, rel=1e-12) and lim["s"].value == pytest.approx(var, rel=1e-12)


def test_pseudo_inverse_keeps_ill_conditioned_directions() -> None:
    """Variances 1e-10 and 1: no direction is dropped as if it were round-off."""
    cov = torch.tensor([[1e-10, 0.5e-5], [0.5e-5, 1.0]], dtype=torch.float64)
    assert torch.allclose(psd_pinv(cov) @ cov, torch.eye(2, dtype=torch.float64), atol=1e-9)
    singular = torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=torch.float64) * 1e-20
    p = psd_pinv(singular)
    assert torch.allclose(singular @ p @ singular, singular, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------- homogeneity


@st.composite
def homogeneous_program(draw: st.DrawFn) -> tuple[str, np.ndarray, int]:
    """A random positively homogeneous network: input layer, 0-2 hidden layers, relu / identity / step.
    Returns its source template (data as {X}), its data and the Gram's degree in the data's scale."""
    d = draw(st.integers(1, 3))
    b = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    data = np.random.default_rng(seed).normal(size=(b, d))
    acts = draw(st.lists(st.sampled_from(["relu", "identity", "step"]), min_size=1, max_size=3))
    lines = ["width n", "data X = {X}", f"matrix U : n x {d} ~ N(0, 1)"]
    prev, degree = "U @ X", 1
    for i, act in enumerate(acts):
        if i:
            lines.append(f"matrix W{i} : n x n ~ N(0, 2/n)")
            prev = f"W{i} @ h{i - 1}"
        lines.append(f"h{i} = {act}({prev})")
        degree = 0 if act == "step" else degree
    lines.append(f"output k = gram(h{len(acts) - 1})")
    return "\n".join(lines) + "\n", data, 2 * degree


@settings(max_examples=25, deadline=None)
@given(homogeneous_program(), st.floats(-6.0, 6.0))
def test_limit_is_positively_homogeneous(case: tuple[str, np.ndarray, int], log_scale: float) -> None:
    src, data, degree = case
    s = 10.0**log_scale
    base = tpc.limit(tpc.loads(src.replace("{X}", str(data.tolist()))))["k"]
    scaled = tpc.limit(tpc.loads(src.replace("{X}", str((s * data).tolist()))))["k"]
    want = s**degree * base.value
    top = float(np.abs(want).max())
    assert float(np.abs(scaled.value - want).max()) <= 1e-9 * top


def test_a_long_wishart_chain_is_exact() -> None:
    # (1/n) y^T (W^T W)^10 y -> Catalan(10) = 16796: linear, so "exact"; Stein's lemma through the
    # ill-conditioned covariance of the chain's vectors gave 16795.85 (and 16796.40 before that)
    lines = ["width n", "matrix W : n x n ~ N(0, 1/n)", "vector y ~ N(0, 1)", "x0 = y"]
    lines += [f"x{i} = W.T @ (W @ x{i - 1})" for i in range(1, 11)]
    out = tpc.limit(tpc.loads("\n".join([*lines, "output m = mean(x10 * y)", "output h = mean(x5 * x5)"]) + "\n"))
    assert out["m"].method == "exact" and out["m"].value == pytest.approx(16796, rel=1e-12)
    assert out["h"].value == pytest.approx(16796, rel=1e-12)  # mean(x5 * x5) is the same moment
