"""Conv layers with a kernel size: `layer A : conv n x n, kernel = 3` (or `[3, 3]` on a grid) is
one hidden layer per offset of the kernel, and `conv(A, h)` the sum of its taps applied to h
shifted ('same' zero padding, torch's convention for even kernels); `layer U : conv n x d, ...`
reads the data, each position's patch of K rows, through one input layer of K d columns.
Checked against torch's conv1d and conv2d with `padding="same"` on the same weights, against the
same network written tap by tap, against an NNGP and NTK recursion written in tests/test_conv.py
(fed patches computed here), direct against unrolled training and the emitted torch file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tpc
from tests.helpers import assert_direct_equals_unrolled, emitted_train_outputs, initial_weights, jacobian_ntk
from tests.test_conv import KERNELS, LOOP, SEQ, _recursion
from tpc.train.dense import loops_finite
from tpc.train.finite import forward

SEQ_DATA = SEQ.split("layer U")[0]  # width, parametrization, X (3 inputs, 5 positions of 2), Y
# a 3-tap input convolution (each position's patch of 3 x 2 numbers), then a 2-tap hidden one
SEQ_CONV = SEQ_DATA + """layer U : conv n x 2, kernel = 3, var = 2
layer A : conv n x n, kernel = 2, var = 1.4
layer V : readout 1 x n
model f(x[5]) = V @ pool(relu(conv(A, relu(conv(U, x)))))
"""
# 2 images of 4 x 3 pixels, 2 channels; a 3 x 2 input convolution, then a 2 x 2 hidden one
GRID_CONV = """width n
parametrization {param}
data X = [[1, 0.5, -0.3, 0.2, 0.9, -1, 0.4, 0.1, 0.3, -0.2, 0.6, 0.8, -0.5, 0.2, 0.7, -0.1, 0.4, 0.3,
           -0.9, 0.1, 0.5, 0.5, -0.6, 0.2],
          [0.2, -0.8, 0.5, 1, -0.4, 0.3, 0.7, -0.6, 0.1, 0.5, -0.2, 0.9, 0.3, 0.3, -0.7, 0.6, 0.1, -0.4,
           0.8, 0.2, -0.3, 0.4, 0.6, -1]]
data Y = [1, -1]
layer U : conv n x 2, kernel = [3, 2], var = 2
layer A : conv n x n, kernel = [2, 2], var = 2
layer V : readout 1 x n
model f(x[4, 3]) = V @ pool(relu(conv(A, relu(conv(U, x)))))
"""


def _taps(w: dict[str, torch.Tensor], name: str, offsets: list[tuple[int, ...]]) -> torch.Tensor:
    """A conv's taps as torch's weight (out, in, *kernel), seed 0."""
    kernel = [len({o[a] for o in offsets}) for a in range(len(offsets[0]))]
    taps = torch.stack([w[f"{name}[{','.join(map(str, o))}]"][0] for o in offsets], dim=-1)
    return taps.reshape(*taps.shape[:2], *kernel)


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
def test_a_sequence_conv_layer_is_torchs_conv1d_with_same_padding() -> None:
    net = tpc.loads(SEQ_CONV.format(param="ntk") + KERNELS)
    w = initial_weights(net, 24, [0])
    x = torch.as_tensor(net.data["X"]).reshape(3, 5, 2).transpose(1, 2)  # (B, d, positions)
    got = forward(net, w, torch.as_tensor(net.data["X"]))[-1][0]
    # U's columns: the rows at p - 1, p, p + 1 side by side, 2 numbers each
    u = w["U"][0].reshape(-1, 3, 2).transpose(1, 2)  # (n, d, 3)
    h = torch.relu(torch.nn.functional.conv1d(x, u, padding="same"))
    a = _taps(w, "A", [(0,), (1,)])  # an even kernel reaches one position further forward than back
    z = torch.relu(torch.nn.functional.conv1d(h, a, padding="same"))
    want = z.mean(-1) @ w["V"][0].T
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_a_grid_conv_layer_is_torchs_conv2d_with_same_padding() -> None:
    net = tpc.loads(GRID_CONV.format(param="mup") + KERNELS)
    w = initial_weights(net, 16, [0])
    x = torch.as_tensor(net.data["X"]).reshape(2, 4, 3, 2).permute(0, 3, 1, 2)  # (B, d, 4, 3)
    got = forward(net, w, torch.as_tensor(net.data["X"]))[-1][0]
    u = w["U"][0].reshape(-1, 3, 2, 2).permute(0, 3, 1, 2)  # (n, d, 3, 2): offsets row by row
    h = torch.relu(torch.nn.functional.conv2d(x, u, padding="same"))
    a = _taps(w, "A", [(0, 0), (0, 1), (1, 0), (1, 1)])
    z = torch.relu(torch.nn.functional.conv2d(h, a, padding="same"))
    want = z.mean((-1, -2)) @ w["V"][0].T
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_the_taps_are_one_layer_of_the_parametrization() -> None:
    """U, A's 2 taps and V are TP4's layers 1, 2, 3: abc(...) lists 3 entries, not 4."""
    net = tpc.loads(SEQ_CONV.format(param="abc(a = [0, 0.5, 0.5], b = [0, 0, 0], c = 0)") + KERNELS)
    assert {name: la.index for name, la in net.layers.items()} == {"U": 0, "A[0]": 1, "A[1]": 1, "V": 2}
    assert net.layers["A[0]"].var == pytest.approx(0.7)
    assert net.layers["U"].cols == 6 and net.layers["U"].row_size == 2
    with pytest.raises(tpc.TpcError, match="a has 4 entries; this network has 3 layers"):
        tpc.loads(SEQ_CONV.format(param="abc(a = [0, 0.5, 0.5, 0.5], b = [0, 0, 0], c = 0)") + KERNELS)


def _patches(x: np.ndarray, offsets: list[int]) -> np.ndarray:
    """(B, P, d) -> (B, P, K d): the rows at p + o, zero beyond the edges, written out here."""
    b, p, d = x.shape
    out = np.zeros((b, p, len(offsets) * d))
    for k, o in enumerate(offsets):
        for q in range(p):
            if 0 <= q + o < p:
                out[:, q, k * d:(k + 1) * d] = x[:, q + o]
    return out


def test_kernels_equal_a_recursion_fed_patches() -> None:
    """The input convolution is an input layer on each position's patch (its NTK term the patches'
    dot product), the hidden one the per-position recursion of tests/test_conv.py."""
    net = tpc.loads(SEQ_CONV.format(param="ntk") + KERNELS)
    lim = tpc.limit(net)
    patch = _patches(net.data["X"].reshape(3, 5, 2), [-1, 0, 1])
    nngp, ntk = _recursion(patch, 2.0, [((0,), "A[0]", 0.7), ((1,), "A[1]", 0.7)], (5,))
    assert lim["T"].method == "exact+closed-form"
    np.testing.assert_allclose(lim["K"].value, nngp, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(lim["T"].value, ntk, rtol=1e-9, atol=1e-12)


def test_a_hidden_conv_layer_equals_its_taps_written_out() -> None:
    """The bundled SEQ of tests/test_conv.py with A, B, C given one variance is `conv(A, h)`."""
    written = SEQ.replace("var = 0.6", "var = 0.7")
    sugar = written.replace("layer A : hidden n x n, var = 0.7\nlayer B : hidden n x n, var = 0.7\n"
                            "layer C : hidden n x n, var = 0.7\n", "layer A : conv n x n, kernel = 3, var = 2.1\n")
    sugar = sugar.replace("nonlin conv(h) = A @ shift(h, -1) + B @ h + C @ shift(h, 1)\n", "").replace(
        "conv(relu(U @ x))", "conv(A, relu(U @ x))")
    assert "kernel = 3" in sugar and "conv(A, " in sugar
    for kind in ("K", "T"):
        a = tpc.limit(tpc.loads(written.format(param="ntk") + KERNELS))[kind].value
        b = tpc.limit(tpc.loads(sugar.format(param="ntk") + KERNELS))[kind].value
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14)


def test_empirical_ntk_is_the_jacobians() -> None:
    net = tpc.loads(GRID_CONV.format(param="ntk") + KERNELS)
    got = tpc.run(net, 12, 1)
    np.testing.assert_allclose(got["T"].values[0], jacobian_ntk(net, 12, 0), rtol=1e-10, atol=1e-12)


LOOP_BY_LAYER = LOOP.replace("f -= 0.5 * grad(L, f)", "A -= 0.5 * grad(L, A)\n  U -= 0.5 * grad(L, U)\n"
                             "  V -= 0.5 * grad(L, V)")


@pytest.mark.parametrize("loop", [LOOP, LOOP_BY_LAYER], ids=["model", "by-layer"])
def test_direct_equals_unrolled_and_a_convs_name_updates_its_taps(loop: str) -> None:
    net = tpc.loads(SEQ_CONV.format(param="mup") + loop)
    direct = assert_direct_equals_unrolled(net, 24, 2)
    assert np.abs(direct["pred"].values - direct["before"].values).max() > 1e-3  # it trained
    whole = loops_finite(tpc.loads(SEQ_CONV.format(param="mup") + LOOP), 24, 2)
    np.testing.assert_allclose(direct["pred"].values, whole["pred"].values, rtol=1e-12, atol=1e-14)


def test_emitted_torch_reproduces_tpc_run() -> None:
    net = tpc.loads(GRID_CONV.format(param="mup") + LOOP)
    source = tpc.torch_source(net)
    assert "self.A_m1" not in source and "self.A_0_1 = " in source  # the taps' names as identifiers
    emitted = emitted_train_outputs(net, 16)
    ours = tpc.run(net, 16, 1)
    for name, res in ours.items():
        np.testing.assert_allclose(emitted[name].detach().numpy(), res.values[0], rtol=1e-10, atol=1e-12, err_msg=name)


def test_graph_shows_patches_and_taps() -> None:
    from tpc.train.show import model_lines

    text = "\n".join(model_lines(tpc.loads(GRID_CONV.format(param="mup") + KERNELS)))
    assert "U @ patches(x, 3 x 2)" in text and "A[1,1] @ " in text and "shift(" in text


def test_feature_learning_limit_and_convergence() -> None:
    """muP training through both conv layers: each seed's predictions approach the particle limit
    (16 times the width: about 4 times smaller errors, allowing for the seeds' noise)."""
    net = tpc.loads(SEQ_CONV.format(param="mup") + LOOP)
    lim = tpc.limit(net, particles=2**13, replicates=2)["pred"]
    errors = [float(np.sqrt(((tpc.run(net, w, 4)["pred"].values - lim.value) ** 2).mean())) for w in (32, 512)]
    assert errors[1] < errors[0] / 2, errors


def test_kernels_by_blocks_of_inputs_equal_the_whole() -> None:
    """Beyond the memory budget the recursion runs over pairs of blocks of inputs (the kernel of two
    inputs depends on them alone): the same numbers, and the plan says so before it runs."""
    from tpc.train import kernel, position_kernels
    from tpc.train.limit import describe, kernel_regime_memory

    net = tpc.loads(SEQ_CONV.format(param="ntk") + LOOP)  # training: every layer's term
    X = net.data["X"]  # noqa: N806
    factors = {layer: kernel.limit_factor(kernel.term_exponent(net, layer)) for layer in net.layers}
    whole = position_kernels.Recursion(net, X).kernels(factors, per_layer=True)
    for block in (1, 2):
        parts = position_kernels.blocked_kernels(net, X, factors, True, block)
        for a, b in zip(parts[:2], whole[:2], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)
        for name in net.layers:
            np.testing.assert_allclose(parts[2][name], whole[2][name], rtol=1e-13, atol=1e-15, err_msg=name)
    kernels = tpc.loads(SEQ_CONV.format(param="ntk") + KERNELS)
    need, _, whole_plan = kernel_regime_memory(kernels, None)
    assert whole_plan is not None and whole_plan[:2] == (3, 1)
    other = need - whole_plan[2]  # the kernel-regime limit's own arrays
    budget = (other + position_kernels.memory_bytes(net, 2) + position_kernels.output_bytes(net, 3) + 1000) / 2**30
    assert kernel_regime_memory(kernels, budget)[2][:2] == (1, 6)  # type: ignore[index]
    assert "by blocks of 1 inputs (6 recursions of 2" in describe(kernels, memory_gb=budget)
    lim = tpc.limit(kernels, memory_gb=budget)
    np.testing.assert_allclose(lim["T"].value, tpc.limit(kernels)["T"].value, rtol=1e-13)
    with pytest.raises(tpc.TpcError, match="kernel-regime limit over 3 inputs would take"):
        tpc.limit(kernels, memory_gb=other / 2**30)  # not even two inputs fit
