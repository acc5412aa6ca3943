"""Convolutions that change the grid of positions: `stride = s` and `padding = valid` on a conv
layer, and `avgpool(h, k)` / `avgpool(h, k, s)` (the mean over k x k windows, every s-th). Each is
a `window` step after which the model's values sit on a smaller grid. Checked against torch's
conv2d/conv1d and avg_pool on the same weights, against an NNGP and NTK recursion written here with
explicit position matrices, the per-position recursion against the lowered Netsor program, direct
against unrolled training, the emitted torch file, and finite widths against the limit."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import tpc
from tests.helpers import (
    arccos_pair,
    assert_direct_equals_unrolled,
    emitted_train_outputs,
    initial_weights,
    jacobian_ntk,
)
from tests.test_conv import KERNELS, LOOP
from tests.test_conv_layers import _taps
from tpc.train.finite import forward

# 3 images of 4 x 4 one-number pixels
IMAGES = """width n
parametrization {param}
data X = [[1, 0.5, -0.3, 0.2, 0.9, -1, 0.4, 0.1, 0.3, -0.2, 0.6, 0.8, -0.5, 0.2, 0.7, -0.1],
          [0.2, -0.8, 0.5, 1, -0.4, 0.3, 0.7, -0.6, 0.1, 0.5, -0.2, 0.9, 0.3, 0.3, -0.7, 0.6],
          [0.9, 0.1, -0.5, 0.6, 0.2, -0.3, -1, 0.4, 0.8, 0, 0.3, -0.4, 0.5, 0.1, -0.2, 0.7]]
data Y = [1, -1, 0.5]
"""
# a 3 x 3 input convolution ('same'), a 3 x 3 hidden one with stride 2 (4 x 4 -> 2 x 2, torch's
# padding 1), then a 2 x 2 'valid' one (2 x 2 -> 1 x 1)
STRIDED = IMAGES + """layer U : conv n x 1, kernel = [3, 3], var = 2
layer A : conv n x n, kernel = [3, 3], var = 2, stride = 2
layer B : conv n x n, kernel = [2, 2], var = 1.5, padding = valid
layer V : readout 1 x n
model f(x[4, 4]) = V @ pool(relu(conv(B, relu(conv(A, relu(conv(U, x)))))))
"""
# 2 x 2 average pooling of a 'same' 3 x 3 input convolution (4 x 4 -> 2 x 2 positions), then a
# hidden layer
POOLED = IMAGES + """layer U : conv n x 1, kernel = [3, 3], var = 2
layer W : hidden n x n, var = 2
layer V : readout 1 x n
model f(x[4, 4]) = V @ pool(relu(W @ avgpool(relu(conv(U, x)), 2)))
"""
# 3 sequences of 7 positions of 2 numbers: a 3-tap input convolution with stride 2 (7 -> 4), then
# windows of 3 every 1 (4 -> 2)
SEQUENCE = """width n
parametrization {param}
data X = [[1, 0.5, -0.3, 0.2, 0.9, -1, 0.4, 0.1, 0.3, -0.2, 0.6, 0.8, -0.5, 0.2],
          [0.2, -0.8, 0.5, 1, -0.4, 0.3, 0.7, -0.6, 0.1, 0.5, -0.2, 0.9, 0.3, 0.3],
          [0.9, 0.1, -0.5, 0.6, 0.2, -0.3, -1, 0.4, 0.8, 0, 0.3, -0.4, 0.5, 0.1]]
data Y = [1, -1, 0.5]
layer U : conv n x 2, kernel = 3, var = 2, stride = 2
layer W : hidden n x n, var = 2
layer V : readout 1 x n
model f(x[7]) = V @ pool(relu(W @ avgpool(relu(conv(U, x)), 3, 1)))
"""


def test_strided_and_valid_convolutions_are_torchs() -> None:
    net = tpc.loads(STRIDED.format(param="mup") + KERNELS)
    w = initial_weights(net, 16, [0])
    x = torch.as_tensor(net.data["X"]).reshape(3, 1, 4, 4)
    got = forward(net, w, torch.as_tensor(net.data["X"]))[-1][0]
    u = w["U"][0].reshape(-1, 1, 3, 3)
    h = torch.relu(torch.nn.functional.conv2d(x, u, padding=1))
    a = _taps(w, "A", list(itertools.product((-1, 0, 1), repeat=2)))
    h = torch.relu(torch.nn.functional.conv2d(h, a, stride=2, padding=1))
    assert h.shape[-2:] == (2, 2)
    b = _taps(w, "B", list(itertools.product((0, 1), repeat=2)))
    h = torch.relu(torch.nn.functional.conv2d(h, b))  # padding 0: 'valid'
    assert h.shape[-2:] == (1, 1)
    torch.testing.assert_close(got, h.mean((-1, -2)) @ w["V"][0].T, rtol=1e-12, atol=1e-12)


def test_average_pooling_and_a_valid_input_convolution_are_torchs() -> None:
    net = tpc.loads(POOLED.format(param="mup") + KERNELS)
    w = initial_weights(net, 16, [0])
    x = torch.as_tensor(net.data["X"]).reshape(3, 1, 4, 4)
    got = forward(net, w, torch.as_tensor(net.data["X"]))[-1][0]
    h = torch.relu(torch.nn.functional.conv2d(x, w["U"][0].reshape(-1, 1, 3, 3), padding=1))
    h = torch.nn.functional.avg_pool2d(h, 2)
    h = torch.relu(torch.einsum("bchw,oc->bohw", h, w["W"][0]))
    torch.testing.assert_close(got, h.mean((-1, -2)) @ w["V"][0].T, rtol=1e-12, atol=1e-12)

    net = tpc.loads(SEQUENCE.format(param="mup") + KERNELS)
    w = initial_weights(net, 16, [0])
    x = torch.as_tensor(net.data["X"]).reshape(3, 7, 2).transpose(1, 2)
    got = forward(net, w, torch.as_tensor(net.data["X"]))[-1][0]
    u = w["U"][0].reshape(-1, 3, 2).transpose(1, 2)  # (n, d, 3)
    h = torch.relu(torch.nn.functional.conv1d(x, u, stride=2, padding=1))
    assert h.shape[-1] == 4
    h = torch.nn.functional.avg_pool1d(h, 3, stride=1)
    h = torch.relu(torch.einsum("bcp,oc->bop", h, w["W"][0]))
    torch.testing.assert_close(got, h.mean(-1) @ w["V"][0].T, rtol=1e-12, atol=1e-12)


# --- an independent recursion: explicit (P', P) position matrices, written out here
def _shift_matrix(offset: tuple[int, int], side: int) -> np.ndarray:
    """S[p, r] = 1 where r is p moved by offset on a side x side grid (row by row)."""
    m = np.zeros((side * side, side * side))
    for y, x in itertools.product(range(side), repeat=2):
        ry, rx = y + offset[0], x + offset[1]
        if 0 <= ry < side and 0 <= rx < side:
            m[y * side + x, ry * side + rx] = 1.0
    return m


def _pick(side: int, rows: list[int]) -> np.ndarray:
    """The positions (y, x) with y and x in rows, row by row."""
    keep = [y * side + x for y in rows for x in rows]
    return np.eye(side * side)[keep]


def _sandwich(m: np.ndarray, k: np.ndarray) -> np.ndarray:
    return np.einsum("pr,abrs,qs->abpq", m, k, m)


def _relu(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    diag = np.einsum("aapp->ap", k)
    return arccos_pair(k, diag[:, None, :, None], diag[None, :, None, :])


def _conv(e: np.ndarray, d: np.ndarray, t: np.ndarray, var: float, offsets: list, side: int,
          keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A hidden convolution of relu values (E[relu relu] = e, E[relu' relu'] = d, NTK t before the
    relu), each tap var / K, then the kept positions."""
    var_tap = var / len(offsets)
    k = sum(var_tap * _sandwich(_shift_matrix(o, side), e) for o in offsets)
    t = sum(_sandwich(_shift_matrix(o, side), e + var_tap * d * t) for o in offsets)
    return _sandwich(keep, k), _sandwich(keep, t)


def _strided_recursion(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NNGP and NTK of STRIDED (NTK parametrization, TP4's convention) for images x (B, 16)."""
    dots = np.einsum("ap,bq->abpq", x, x)
    taps3 = list(itertools.product((-1, 0, 1), repeat=2))
    k1 = sum(2.0 / 9 * _sandwich(_shift_matrix(o, 4), dots) for o in taps3)  # U: 9 numbers per patch
    t1 = sum(_sandwich(_shift_matrix(o, 4), dots) for o in taps3)
    e1, d1 = _relu(k1)
    k2, t2 = _conv(e1, d1, t1, 2.0, taps3, 4, _pick(4, [0, 2]))  # stride 2: rows and columns 0, 2
    e2, d2 = _relu(k2)
    k3, t3 = _conv(e2, d2, t2, 1.5, list(itertools.product((0, 1), repeat=2)), 2, _pick(2, [0]))  # valid
    e3, d3 = _relu(k3)
    return e3.mean((2, 3)), e3.mean((2, 3)) + (d3 * t3).mean((2, 3))


def _pooled_recursion(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NNGP and NTK of POOLED: the 2 x 2 mean is a (4, 16) matrix of quarters."""
    dots = np.einsum("ap,bq->abpq", x, x)
    taps3 = list(itertools.product((-1, 0, 1), repeat=2))
    k1 = sum(2.0 / 9 * _sandwich(_shift_matrix(o, 4), dots) for o in taps3)
    t1 = sum(_sandwich(_shift_matrix(o, 4), dots) for o in taps3)
    e1, d1 = _relu(k1)
    avg = np.zeros((4, 16))
    for q, p in itertools.product(range(4), range(16)):
        if (p // 4) // 2 == q // 2 and (p % 4) // 2 == q % 2:
            avg[q, p] = 0.25
    e1, dt1 = _sandwich(avg, e1), _sandwich(avg, d1 * t1)
    k2, t2 = 2.0 * e1, e1 + 2.0 * dt1  # W's own term, and its variance times what flows into it
    e2, d2 = _relu(k2)
    return e2.mean((2, 3)), e2.mean((2, 3)) + (d2 * t2).mean((2, 3))


@pytest.mark.parametrize(("program", "recursion"), [(STRIDED, _strided_recursion), (POOLED, _pooled_recursion)],
                         ids=["strided-valid", "avgpool"])
def test_kernels_equal_a_recursion_written_here(program: str, recursion, monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-position recursion, and the lowered Netsor program (one vector per position), both
    equal the recursion above to 1e-9."""
    net = tpc.loads(program.format(param="ntk") + KERNELS)
    assert_both_kernel_paths_equal(net, *recursion(net.data["X"]), monkeypatch)


def assert_both_kernel_paths_equal(net: tpc.Network, nngp: np.ndarray, ntk: np.ndarray,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """K and T by the per-position recursion, then by the lowered Netsor program, against nngp, ntk."""
    from tpc.train import position_kernels

    lim = tpc.limit(net)
    assert lim["T"].method == "exact+closed-form"
    np.testing.assert_allclose(lim["K"].value, nngp, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(lim["T"].value, ntk, rtol=1e-9, atol=1e-12)
    monkeypatch.setattr(position_kernels, "covered", lambda net, x: None)
    lowered = tpc.limit(net)
    np.testing.assert_allclose(lowered["K"].value, nngp, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(lowered["T"].value, ntk, rtol=1e-9, atol=1e-12)


def test_empirical_ntk_is_the_jacobians() -> None:
    net = tpc.loads(STRIDED.format(param="ntk") + KERNELS)
    np.testing.assert_allclose(tpc.run(net, 12, 1)["T"].values[0], jacobian_ntk(net, 12, 0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("program", [STRIDED, POOLED, SEQUENCE], ids=["strided-valid", "avgpool", "sequence"])
def test_direct_equals_unrolled(program: str) -> None:
    net = tpc.loads(program.format(param="mup") + LOOP)
    direct = assert_direct_equals_unrolled(net, 16, 2)
    assert np.abs(direct["pred"].values - direct["before"].values).max() > 1e-3  # it trained


@pytest.mark.parametrize("program", [STRIDED, SEQUENCE], ids=["strided-valid", "sequence"])
def test_emitted_torch_reproduces_tpc_run(program: str) -> None:
    net = tpc.loads(program.format(param="mup") + LOOP)
    assert ".unfold(" in tpc.torch_source(net)
    emitted = emitted_train_outputs(net, 16)
    for name, res in tpc.run(net, 16, 1).items():
        np.testing.assert_allclose(emitted[name].detach().numpy(), res.values[0], rtol=1e-10, atol=1e-12, err_msg=name)


def test_graph_shows_the_windows_and_the_smaller_grids() -> None:
    from tpc.train.show import model_lines

    text = "\n".join(model_lines(tpc.loads(STRIDED.format(param="mup") + KERNELS)))
    assert "window(h27, [0:4:2, 0:4:2])" in text and "at 2 x 2 positions" in text
    assert "window(" in "\n".join(model_lines(tpc.loads(POOLED.format(param="mup") + KERNELS)))
    assert "[0:4:2 x2, 0:4:2 x2]" in "\n".join(model_lines(tpc.loads(POOLED.format(param="mup") + KERNELS)))


@pytest.mark.parametrize("program", [STRIDED, POOLED], ids=["strided-valid", "avgpool"])
def test_finite_kernels_approach_the_limit(program: str) -> None:
    """The seeds' NNGP and NTK at width 32 and 512 against the limit: 16 times the width, about 4
    times smaller root-mean-square errors (at least 2 allowing for the seeds' noise)."""
    assert_finite_kernels_approach_the_limit(tpc.loads(program.format(param="ntk") + KERNELS))


def assert_finite_kernels_approach_the_limit(net: tpc.Network) -> None:
    lim = tpc.limit(net)
    for name in ("K", "T"):
        errors = [float(np.sqrt(((tpc.run(net, w, 6)[name].values - lim[name].value) ** 2).mean()))
                  for w in (32, 512)]
        assert errors[1] < errors[0] / 2, (name, errors)


@pytest.mark.slow  # 15 s: the particle limit of training
def test_feature_learning_limit_and_convergence() -> None:
    """muP training through a strided and a valid convolution: each seed's predictions approach
    the particle limit (16 times the width: about 4 times smaller errors, allowing for noise)."""
    assert_training_approaches_the_limit(tpc.loads(STRIDED.format(param="mup") + LOOP))


def assert_training_approaches_the_limit(net: tpc.Network) -> None:
    lim = tpc.limit(net, particles=2**13, replicates=2)["pred"]
    errors = [float(np.sqrt(((tpc.run(net, w, 4)["pred"].values - lim.value) ** 2).mean())) for w in (32, 512)]
    assert errors[1] < errors[0] / 2, errors


def test_a_norm_of_a_value_shifted_past_the_edge_lowers(monkeypatch: pytest.MonkeyPatch) -> None:
    """At the last position shift(h, 1) is zero, and so is its layernorm: a function of numbers per
    input alone, which the lowered program keeps as a vector (it used to become a number there, and
    W @ it an error). The lowered program equals the per-position recursion."""
    from tpc.train import position_kernels

    source = STRIDED.replace("layer B : conv n x n, kernel = [2, 2], var = 1.5, padding = valid\n", "").replace(
        "model f(x[4, 4]) = V @ pool(relu(conv(B, relu(conv(A, relu(conv(U, x)))))))",
        "layer W : hidden n x n, var = 2\n"
        "model f(x[4, 4]) = V @ pool(relu(W @ layernorm(shift(conv(A, relu(conv(U, x))), 1, 0))))")
    net = tpc.loads(source.format(param="ntk") + KERNELS)
    fast = tpc.limit(net)
    monkeypatch.setattr(position_kernels, "covered", lambda net, x: None)
    lowered = tpc.limit(net)
    for name in ("K", "T"):
        np.testing.assert_allclose(lowered[name].value, fast[name].value, rtol=1e-9, atol=1e-12)
