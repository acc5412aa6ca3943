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
