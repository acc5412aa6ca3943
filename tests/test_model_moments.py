"""Moments in models (`mean`, `layernorm`, `rmsnorm`) and the kernel outputs `nngp(f, X)`,
`ntk(f, X)`, checked against torch's own layer norm and an explicit Jacobian."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tpc
from tests.helpers import initial_weights, jacobian_ntk
from tpc.train.dense import loops_finite
from tpc.train.finite import forward
from tpc.train.pooled import run_unrolled_finite

HEAD = """width n
parametrization {param}
data X = [[1, 0.5, 0.2], [-0.3, 0.8, 0.1], [0.2, -1, 0.4], [0.9, 0.1, -0.6]]
data Y = [[1, 0], [0, 1], [1, 1], [0, 0]]
layer U : input n x 3, var = 2
layer W : hidden n x n, var = 2
layer b : bias n, var = 0.5
layer g : bias n, var = 0
layer V : readout 2 x n
"""
MODEL = "model f(x) = V @ ((1 + g) * layernorm(W @ relu(rmsnorm(U @ x + b)) + 0.5 * U @ x))\n"
KERNELS = "output K = nngp(f, X)\noutput T = ntk(f, X)\n"
LOOP = """for t in range(2) {
  L = mse(f(X), Y)
  record curve = L
  f -= 0.3 * grad(L, f)
}
output losses = curve
output pred = f(X)
output move = feature_change(f, X)
"""


def test_layernorm_and_rmsnorm_equal_torchs_own() -> None:
    model = "model f(x) = V @ (layernorm(U @ x + b) + (1 + g) * rmsnorm(W @ relu(U @ x)))\n"
    net = tpc.loads(HEAD.format(param="ntk") + model + KERNELS)
    w = initial_weights(net, 64, [3])
    x = torch.as_tensor(net.data["X"])
    vals = forward(net, w, x)
    h = torch.einsum("bd,snd->sbn", x, w["U"])
    z = (torch.relu(h) @ w["W"].transpose(-1, -2))
    ln = torch.nn.functional.layer_norm(h + w["b"][:, None, :], (64,), eps=1e-5)
    rms = z / torch.sqrt((z * z).mean(-1, keepdim=True) + 1e-5)
    want = (ln + (1 + w["g"][:, None, :]) * rms) @ w["V"].transpose(-1, -2)
    torch.testing.assert_close(vals[-1], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("param", ["ntk", "mup", "sp"])
def test_empirical_ntk_equals_the_jacobians_inner_products(param: str) -> None:
    """ntk(f, X) = sum_l n^-c <df/dw^l, df/dw^l> / k, here from full Jacobians by torch.func."""
    width, seeds = 24, [0, 1]
    net = tpc.loads(HEAD.format(param=param) + MODEL + KERNELS)
    got = tpc.run(net, width, len(seeds))
    x = torch.as_tensor(net.data["X"])
    for s in seeds:
        np.testing.assert_allclose(got["T"].values[s], jacobian_ntk(net, width, s), rtol=1e-10, atol=1e-12)
        readout = net.layers["V"]
        feats = forward(net, initial_weights(net, width, [s]), x)[net.model.features][0]
        nngp = readout.var * width ** (-2 * net.init_exponent(readout)) * (feats @ feats.T).numpy()
        np.testing.assert_allclose(got["K"].values[s], nngp, rtol=1e-12)


@pytest.mark.parametrize("param", ["mup", "ntk"])
def test_moments_in_a_loop_direct_equal_unrolled(param: str) -> None:
    net = tpc.loads(HEAD.format(param=param) + MODEL + KERNELS + LOOP)
    direct = loops_finite(net, 40, 2)
    unrolled = run_unrolled_finite(net, 40, 2)
    for name, res in direct.items():
        np.testing.assert_allclose(res.values, unrolled[name], rtol=1e-9, atol=1e-10, err_msg=name)
    assert np.abs(direct["losses"].values[:, 1] - direct["losses"].values[:, 0]).max() > 1e-4  # it trained


def test_kernel_outputs_converge_to_the_limit() -> None:
    """Each seed's nngp and ntk approach the limit's closed forms like n^-1/2 (ntk parametrization,
    the kernel regime; muP's limit runs the same lowered program)."""
    net = tpc.loads(HEAD.format(param="ntk") + MODEL + KERNELS)
    lim = tpc.limit(net)
    assert "closed-form" in lim["T"].method and lim["T"].stderr is None
    errors = {}
    for width in (64, 1024):
        run = tpc.run(net, width, 6)
        errors[width] = [float(np.sqrt(((run[k].values - lim[k].value) ** 2).mean())) for k in ("K", "T")]
    for i in range(2):  # 16 times the width: about 4 times smaller, allowing for 6 seeds' noise
        assert errors[1024][i] < errors[64][i] / 2.2, errors


def test_kernels_in_the_feature_learning_limit_are_closed_forms() -> None:
    """In muP f_0 vanishes (nngp -> 0 like 1/n) and the NTK stays O(1); a program with a loop takes
    its kernel outputs from the lowered program, not from the particles."""
    net = tpc.loads(HEAD.format(param="mup") + MODEL + KERNELS + LOOP)
    lim = tpc.limit(net, particles=2**11, replicates=2)
    assert np.abs(lim["K"].value).max() == 0.0
    assert lim["T"].method == "exact+closed-form" and lim["T"].stderr is None and lim["pred"].method == "monte-carlo"
    ntk = tpc.limit(tpc.loads(HEAD.format(param="mup") + MODEL + KERNELS))["T"].value
    np.testing.assert_allclose(lim["T"].value, ntk, rtol=1e-12)
    assert np.linalg.eigvalsh(ntk).min() > 0


def test_graph_and_unrolled_listing_show_the_moments(capsys: pytest.CaptureFixture[str]) -> None:
    from tpc.train.unrolled import unrolled_loops

    net = tpc.loads(HEAD.format(param="mup") + MODEL + LOOP)
    text = unrolled_loops(net)
    assert "mean(" in text and "# finite: one number per input" in text


def test_a_bias_reached_only_through_its_mean() -> None:
    """`U @ x + mean(b)`: f reaches b only through a moment, so n df/db is the same number at every
    coordinate (autodiff once returned that scalar as b's gradient, and the kernel limit failed). In
    the limit mean(b) -> 0 and b's NTK term ((df/dmean)^2 / n) vanishes: the kernels are those of the
    model without it; at finite width the NTK is still the Jacobians' inner product."""
    model = "model f(x) = V @ relu(W @ relu(U @ x) + mean(b) + g)\n"
    net = tpc.loads(HEAD.format(param="ntk") + model + KERNELS)
    head = HEAD.format(param="ntk").replace("layer b : bias n, var = 0.5\n", "")
    plain = tpc.limit(tpc.loads(head + "model f(x) = V @ relu(W @ relu(U @ x) + g)\n" + KERNELS))
    lim = tpc.limit(net)
    for k in ("K", "T"):
        np.testing.assert_allclose(lim[k].value, plain[k].value, rtol=1e-12, atol=1e-14)
    got = tpc.run(net, 24, 1)
    np.testing.assert_allclose(got["T"].values[0], jacobian_ntk(net, 24, 0), rtol=1e-10, atol=1e-12)


def test_kernels_that_need_monte_carlo_carry_a_standard_error() -> None:
    """relu(h) * tanh(W relu(h)): the nngp is quadrature, one NTK term a four-dimensional expectation
    (Monte Carlo). The NTK's standard error is carried out (it was dropped) and is honest: two
    evaluations on independent particles differ by a few of it; the nngp stays without one."""
    model = "model f(x) = V @ (relu(U @ x) * tanh(W @ relu(U @ x)))\n"
    head = HEAD.format(param="ntk").replace("layer b : bias n, var = 0.5\nlayer g : bias n, var = 0\n", "")
    net = tpc.loads(head + model + KERNELS)
    a, b = (tpc.limit(net, particles=2**12, seed=s) for s in (0, 1))
    assert a["K"].stderr is None and "monte-carlo" not in a["K"].method
    assert "monte-carlo" in a["T"].method and a["T"].stderr is not None and (a["T"].stderr > 0).all()
    spread = np.sqrt(a["T"].stderr ** 2 + b["T"].stderr ** 2)
    assert np.abs(a["T"].value - b["T"].value).max() < 5 * spread.max()
    assert np.abs(a["T"].value - b["T"].value).max() > 0  # independent particles
