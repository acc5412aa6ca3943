"""A readout with its own weights at every position: `V @ flatten(h)` (torch's `nn.Flatten()`
then `nn.Linear(n * P, k)`), V's entries of variance var / P (the fan-in n P). Its limit reads the
kernel's diagonal over positions: NNGP = var * mean_p K(p, p) (Novak et al. 2019: flattening
forgets the pairs of different positions, unlike global average pooling). Checked against a
torch module written here on the same weights, against an NNGP and NTK recursion written here,
the per-position recursion against the lowered Netsor program, the empirical NTK against full
Jacobians, direct against unrolled training, emit-torch, and finite widths against the limit."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import tpc
from tests.helpers import assert_direct_equals_unrolled, emitted_train_outputs, initial_weights, jacobian_ntk
from tests.test_conv import KERNELS, LOOP
from tests.test_conv_layers import _taps
from tests.test_strided import (
    IMAGES,
    _conv,
    _pick,
    _relu,
    _sandwich,
    _shift_matrix,
    assert_both_kernel_paths_equal,
    assert_finite_kernels_approach_the_limit,
    assert_training_approaches_the_limit,
)
from tpc.train.finite import forward

# 3 images of 4 x 4 pixels: a 3 x 3 input convolution, a 3 x 3 one with stride 2 (2 x 2 positions),
# and a readout of 2 outputs with weights at each of the 4 positions
FLAT = IMAGES.replace("data Y = [1, -1, 0.5]", "data Y = [[1, 0], [-1, 0.5], [0.5, -1]]") + """\
layer U : conv n x 1, kernel = [3, 3], var = 2
layer A : conv n x n, kernel = [3, 3], var = 2, stride = 2
layer V : readout 2 x n, var = 1.5
model f(x[4, 4]) = V @ flatten(relu(conv(A, relu(conv(U, x)))))
"""


def test_flatten_is_torchs_flatten_then_linear() -> None:
    net = tpc.loads(FLAT.format(param="mup") + KERNELS)
    w = initial_weights(net, 16, [0])
    assert w["V"].shape == (1, 2 * 4, 16)  # row j*P + p: output j at position p
    x = torch.as_tensor(net.data["X"]).reshape(3, 1, 4, 4)
    h = torch.relu(torch.nn.functional.conv2d(x, w["U"][0].reshape(-1, 1, 3, 3), padding=1))
    a = _taps(w, "A", list(itertools.product((-1, 0, 1), repeat=2)))
    h = torch.relu(torch.nn.functional.conv2d(h, a, stride=2, padding=1))  # (3, n, 2, 2)
    v = w["V"][0].reshape(2, 4, 16).transpose(1, 2)  # (k, n, P): torch's flatten is channel-major
    want = torch.nn.Flatten()(h) @ v.reshape(2, -1).T
    got = forward(net, w, torch.as_tensor(net.data["X"]))[-1][0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert float(w["V"].std()) == pytest.approx(np.sqrt(1.5 / 4) * 16**-0.5 / 16**0.5, rel=0.3)  # muP: var/P n^-2


def _flat_recursion(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NNGP and NTK of FLAT (NTK parametrization, TP4's convention): the readout reads each
    position's diagonal; its own term sums the positions, the others carry var / P each."""
    dots = np.einsum("ap,bq->abpq", x, x)
    taps3 = list(itertools.product((-1, 0, 1), repeat=2))
    k1 = sum(2.0 / 9 * _sandwich(_shift_matrix(o, 4), dots) for o in taps3)
    t1 = sum(_sandwich(_shift_matrix(o, 4), dots) for o in taps3)
    e1, d1 = _relu(k1)
    k2, t2 = _conv(e1, d1, t1, 2.0, taps3, 4, _pick(4, [0, 2]))
    e2, d2 = _relu(k2)
    diag_e, diag_dt = np.einsum("abpp->abp", e2), np.einsum("abpp->abp", d2 * t2)
    return 1.5 * diag_e.mean(-1), diag_e.sum(-1) + 1.5 * diag_dt.mean(-1)


def test_kernels_equal_a_recursion_written_here(monkeypatch: pytest.MonkeyPatch) -> None:
    net = tpc.loads(FLAT.format(param="ntk") + KERNELS)
    assert_both_kernel_paths_equal(net, *_flat_recursion(net.data["X"]), monkeypatch)


def test_empirical_kernels() -> None:
    """The NTK against full Jacobians; the NNGP at width n against f's covariance over the readout
    integrated out, var / P * sum_p h_p . h'_p (n^-2(a+b) in NTK parametrization: 1/n)."""
    net = tpc.loads(FLAT.format(param="ntk") + KERNELS)
    got = tpc.run(net, 12, 1)
    np.testing.assert_allclose(got["T"].values[0], jacobian_ntk(net, 12, 0), rtol=1e-10, atol=1e-12)
    w = initial_weights(net, 12, [0])
    h = forward(net, w, torch.as_tensor(net.data["X"]))[net.model.features][0].reshape(3, 4, 12)
    want = 1.5 / 4 * torch.einsum("bpi,cpi->bc", h, h) / 12
    np.testing.assert_allclose(got["K"].values[0], want.numpy(), rtol=1e-10, atol=1e-12)


def test_direct_equals_unrolled_and_emitted_torch() -> None:
    net = tpc.loads(FLAT.format(param="mup") + LOOP)
    direct = assert_direct_equals_unrolled(net, 16, 2)
    assert np.abs(direct["pred"].values - direct["before"].values).max() > 1e-3  # it trained
    emitted = emitted_train_outputs(net, 16)
    for name, res in tpc.run(net, 16, 1).items():
        np.testing.assert_allclose(emitted[name].detach().numpy(), res.values[0], rtol=1e-10, atol=1e-12, err_msg=name)


def test_finite_kernels_approach_the_limit() -> None:
    assert_finite_kernels_approach_the_limit(tpc.loads(FLAT.format(param="ntk") + KERNELS))


@pytest.mark.slow  # 15 s: the particle limit of training
def test_feature_learning_limit_and_convergence() -> None:
    assert_training_approaches_the_limit(tpc.loads(FLAT.format(param="mup") + LOOP))


def test_graph_shows_flatten() -> None:
    from tpc.train.show import model_lines

    assert "V @ flatten(" in "\n".join(model_lines(tpc.loads(FLAT.format(param="mup") + KERNELS)))
