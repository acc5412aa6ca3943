"""A raw `matrix` (or `vector`) in a network program: a Gaussian matrix drawn once at the variance
written and never trained (programs/train/fixed_relu2_mup.tp). It must be the layer of that initial scale that no update
moves: the same numbers as the network whose loop updates every other layer by name, at finite width
(bitwise, same draws) and in both limits; the kernel regime's training kernel without its term
(closed form); copies and every construct of a loop keep it as it was."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import tpc
from tests.test_loops import BODY, HEADER, check_warmup_kernel_descent
from tests.test_training import _relu_kernels
from tpc.train.dense import loops_finite
from tpc.train.pooled import run_unrolled_finite

ROOT = Path(__file__).resolve().parent.parent
FIXED = ROOT / "programs" / "train" / "fixed_relu2_mup.tp"


def _as_layer(source: str) -> str:
    """The same program with A a trained-looking layer that the loop leaves alone: U and V by name."""
    return (source.replace("matrix A : n x n ~ N(0, 2/n)", "layer A : hidden n x n, var = 2")
            .replace("f -= 0.5 * grad(L, f)", "U -= 0.5 * grad(L, U)\n  V -= 0.5 * grad(L, V)"))


def test_a_fixed_matrix_is_a_layer_no_update_moves() -> None:
    source = FIXED.read_text()
    fixed = tpc.loads(source, base_dir=FIXED.parent)
    layer = tpc.loads(_as_layer(source), base_dir=FIXED.parent)
    assert fixed.layers["A"].fixed and not layer.layers["A"].fixed and fixed.parameters == ["U", "V"]
    assert list(fixed.abc.a) == [-0.5, 0.5] and len(layer.abc.a) == 3  # A has no place in muP's lists
    assert fixed.program.trained_layers() == {"U", "V"}
    a, b = tpc.run(fixed, 128, 3), tpc.run(layer, 128, 3)
    for name in ("pred", "curve", "move"):  # the same draws, the same steps: the same numbers
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    la, lb = tpc.limit(fixed), tpc.limit(layer)  # two Monte Carlo programs of the same limit
    for name in ("pred", "curve", "move"):
        se = np.sqrt(np.asarray(la[name].stderr) ** 2 + np.asarray(lb[name].stderr) ** 2)
        assert np.all(np.abs(np.asarray(la[name].value) - np.asarray(lb[name].value)) <= 5 * se + 1e-12), name


def test_fixed_matrix_direct_equals_unrolled() -> None:
    """The fixed program's loop at finite width equals its unrolled Netsor-transpose program (that A
    stays put is checked with every construct below)."""
    net = tpc.load(FIXED)
    direct = loops_finite(net, 48, 2)
    unrolled = run_unrolled_finite(net, 48, 2)
    for name, res in direct.items():
        np.testing.assert_allclose(res.values, unrolled[name], rtol=1e-9, atol=1e-10, err_msg=name)


MODEL = """layer U : input n x 2, var = 2
layer b : bias n
matrix W : n x n ~ N(0, 2/n)
layer V : readout 1 x n
model f(x) = V @ tanh(W @ relu(U @ x + b) + 0.5 * b)
"""


# test_loops.PARAMS less the hidden layer's entries: the fixed W has none
PARAMS = ["mup", "sp", "ntk", "abc(a = [0, 0.5], b = [0, 0.5], c = 0.5)", "abc(a = [0, 1], b = [0, 0], c = 1)"]


@pytest.mark.parametrize("param", PARAMS)
def test_every_construct_keeps_a_fixed_matrix(param: str) -> None:
    """Momentum, a schedule, decay (`f -= eta * (M + 0.05 * f)`), mini-batches, a copy adapted and a
    meta-update: direct equals unrolled in every parametrization, and W is its initial value after all."""
    from tpc.train.dense import DenseBackend
    from tpc.train.interp import Interpreter

    body = BODY.replace("[0.5, -0.5]", "Y2").replace("output p0", "data Y2 = [0.5, -0.5]\noutput p0")
    net = tpc.loads(HEADER + f"parametrization {param}\n" + MODEL + body)
    direct = loops_finite(net, 40, 2)
    unrolled = run_unrolled_finite(net, 40, 2)
    for name, res in direct.items():
        np.testing.assert_allclose(res.values, unrolled[name], rtol=1e-9, atol=1e-10, err_msg=name)
    assert np.abs(direct["p"].values - direct["p0"].values).max() > 1e-5  # training moved the outputs
    backend = DenseBackend(net, 40, [0, 1], torch.float64, "cpu")
    start = {k: v.detach().clone() for k, v in backend.initial().items()}  # seeded: run() draws these again
    it = Interpreter(net, backend)
    it.run()
    final = it.params[net.model.name]
    assert torch.equal(final["W"], start["W"])
    assert not torch.equal(final["U"], start["U"]) and not torch.equal(final["V"], start["V"])


def test_kernel_regime_trains_without_the_fixed_term() -> None:
    """relu2_ntk_loop.tp with W fixed: kernel gradient descent with the NTK less W's term (the
    arc-cosine recursion, Cho & Saul); `ntk(f, X)` at finite width is that kernel too."""
    path = ROOT / "programs" / "train" / "relu2_ntk_loop.tp"
    source = path.read_text().replace("layer W : hidden n x n, var = 2", "matrix W : n x n ~ N(0, 2/n)")
    source = source.replace("for t in range(4)", "output K = ntk(f, X)\nfor t in range(4)")
    net = tpc.loads(source, base_dir=path.parent)
    lim = tpc.limit(net)
    X, Xt, y = net.data["X"], net.data["Xt"], net.data["Y"].reshape(-1)  # noqa: N806
    P = np.vstack([X, Xt])  # noqa: N806
    x1, d1 = _relu_kernels(2.0 * P @ P.T / 3, 1.0)
    x2, d2 = _relu_kernels(2.0 * x1, 1.0)
    g1 = 2.0 * d2 * d1  # back through the fixed W (var 2)
    ntk = x2 + g1 * (P @ P.T)  # the readout's and the input layer's terms: none for W
    m = len(X)
    np.testing.assert_allclose(lim["K"].value, ntk[:m, :m], atol=1e-10)
    check_warmup_kernel_descent(lim, ntk, x2, y)
    finite = tpc.run(net, 2048, 8)["K"]
    assert np.all(np.abs(finite.values.mean(0) - ntk[:m, :m]) <= 5 * finite.stderr + 0.02)


def test_a_fixed_input_matrix_is_random_features() -> None:
    """`matrix U : n x 3 ~ N(0, 1/3)` under a trained readout: the readout's kernel is the ReLU
    arc-cosine kernel of the fixed features, and it is the whole training kernel."""
    source = (FIXED.read_text().replace("layer U : input n x 3, var = 2", "matrix U : n x 3 ~ N(0, 1/3)")
              .replace("matrix A : n x n ~ N(0, 2/n)", "").replace("relu(A @ relu(U @ x))", "relu(U @ x)")
              .replace("parametrization mup", "parametrization ntk")
              .replace("for t in range(4)", "output K = ntk(f, X)\nfor t in range(4)"))
    net = tpc.loads(source, base_dir=FIXED.parent)
    assert net.program.trained_layers() == {"V"}
    X = net.data["X"]  # noqa: N806
    relu, _ = _relu_kernels(X @ X.T / 3, 1.0)
    np.testing.assert_allclose(tpc.limit(net)["K"].value, relu, atol=1e-10)


def test_check_graph_and_emitted_torch_show_it_fixed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tpc.cli import main

    assert main(["check", str(FIXED)]) == 0
    out = capsys.readouterr().out
    assert "layers     U (input n x 3, layer 1, var 2), V (readout 1 x n, layer 2, var 1)" in out
    assert "fixed      A (random n x n matrix, entries N(0, 2/n), never trained)" in out
    graph = tpc.load(FIXED).graph
    node = next(d for _, d in graph.nodes(data=True) if d["op"] == "layer" and d["name"] == "A")
    assert node.get("fixed") is True
    source = tpc.torch_source(tpc.load(FIXED))
    assert "requires_grad=False" in source and "# A: fixed random matrix" in source


def test_a_fixed_vector_is_a_bias_no_update_moves() -> None:
    """`vector y ~ N(0, 1)` added in the model: a bias of var 1 (muP's bias, a + b = 0) that the loop
    leaves alone; the same draws and numbers at finite width (to round-off: muP's bias is n^(1/2) times
    entries of n^(-1/2), the fixed vector its entries), and the same limit within its errors."""
    source = (FIXED.read_text().replace("matrix A : n x n ~ N(0, 2/n)", "vector y ~ N(0, 1)\nlayer A : hidden n x n")
              .replace("relu(U @ x)", "relu(U @ x + y)"))
    fixed = tpc.loads(source, base_dir=FIXED.parent)
    bias = tpc.loads(source.replace("vector y ~ N(0, 1)", "layer y : bias n").replace(
        "f -= 0.5 * grad(L, f)", "U -= 0.5 * grad(L, U)\n  A -= 0.5 * grad(L, A)\n  V -= 0.5 * grad(L, V)"),
        base_dir=FIXED.parent)
    assert fixed.layers["y"].fixed and fixed.program.trained_layers() == {"U", "A", "V"}
    a, b = tpc.run(fixed, 128, 3), tpc.run(bias, 128, 3)
    for name in ("pred", "curve"):
        np.testing.assert_allclose(a[name].values, b[name].values, rtol=1e-10, atol=1e-12, err_msg=name)
    la, lb = tpc.limit(fixed), tpc.limit(bias)
    for name in ("pred", "curve"):
        se = np.sqrt(np.asarray(la[name].stderr) ** 2 + np.asarray(lb[name].stderr) ** 2)
        assert np.all(np.abs(np.asarray(la[name].value) - np.asarray(lb[name].value)) <= 5 * se + 1e-12), name


def test_frozen_features_do_not_move_in_the_monte_carlo_limit() -> None:
    """Random features (fixed U and W, the readout trained): the features never move, so
    feature_change is exactly 0 at finite width and must be in the limit too. W x of the same x at
    every step is the random variable it was at the first (before any W.T Gaussian); re-estimated it
    carried the Stein estimate of a zero Zdot, noise whose root-mean-square read 0.0095 at 65536
    particles. The other outputs agree with the exact limit. (tpc limit takes this training in
    function space, test_random_features_are_kernel_regression_exactly; here the unrolled program.)"""
    from tpc.train.pooled import loops_limit

    source = (FIXED.read_text().replace("layer U : input n x 3, var = 2", "matrix U : n x 3 ~ N(0, 2/3)"))
    net = tpc.loads(source, base_dir=FIXED.parent)
    assert net.program.trained_layers() == {"V"}
    lim = loops_limit(net, False, 2**16, 4, 0, None, False, None)
    assert np.all(np.asarray(lim["move"].value) == 0.0)
    exact = tpc.limit(net)
    for name in ("pred", "curve"):
        assert np.all(np.abs(lim[name].value - exact[name].value) <= 6 * np.asarray(lim[name].stderr) + 1e-4), name


def test_random_features_are_kernel_regression_exactly() -> None:
    """Only the readout trains (r infinite in muP): tpc limit runs the loop in function space, where it
    is gradient descent on the readout with the features' kernel (the arc-cosine recursion, f_0 = 0 at
    muP's readout scale), equal to that written out here to 1e-10; finite widths converge to it."""
    source = (FIXED.read_text().replace("layer U : input n x 3, var = 2", "matrix U : n x 3 ~ N(0, 2/3)"))
    net = tpc.loads(source, base_dir=FIXED.parent)
    lim = tpc.limit(net)
    assert lim["pred"].method == "exact+closed-form" and not lim["pred"].random and lim["pred"].stderr is None
    X, Xt, Y = net.data["X"], net.data["Xt"], net.data["Y"].ravel()  # noqa: N806
    P = np.concatenate([X, Xt])  # noqa: N806
    x1, _ = _relu_kernels(2.0 * P @ P.T / 3, 1.0)  # fixed U: var 2/3 per input coordinate
    K, _ = _relu_kernels(2.0 * x1, 1.0)  # noqa: N806 - fixed A: var 2
    f, curve, B = np.zeros(len(P)), [], len(X)  # noqa: N806
    for _ in range(4):  # mse's gradient (f - y) / B; lr 0.5; the readout's kernel at unit rate
        curve.append(0.5 * np.mean((f[:B] - Y) ** 2))
        f = f - 0.5 * K[:, :B] @ (f[:B] - Y) / B
    np.testing.assert_allclose(lim["curve"].value, curve, atol=1e-10)
    np.testing.assert_allclose(lim["pred"].value, f[B:], atol=1e-10)
    finite = tpc.run(net, 1024, 8)
    assert np.all(finite["move"].values == 0.0)
    for name in ("pred", "curve"):
        assert np.all(np.abs(finite[name].values.mean(0) - lim[name].value)
                      <= 5 * finite[name].stderr + 3.0 / 1024), name


def test_what_function_space_does_not_cover_stays_unrolled() -> None:
    """A decay term (order one in muP) or entrywise updates of the readout: no kernel descent, so the
    unrolled program takes them, as for any feature-learning parametrization."""
    from tpc.train.limit import in_function_space

    source = (FIXED.read_text().replace("layer U : input n x 3, var = 2", "matrix U : n x 3 ~ N(0, 2/3)"))
    assert in_function_space(tpc.loads(source, base_dir=FIXED.parent))
    decay = source.replace("f -= 0.5 * grad(L, f)", "f -= 0.5 * (grad(L, f) + 0.1 * f)")
    adam = source.replace("for t in range(4) {", "state S = zeros(f)\nfor t in range(4) {").replace(
        "f -= 0.5 * grad(L, f)",
        "S = 0.9 * S + 0.1 * grad(L, f) * grad(L, f)\n  f -= 0.01 * grad(L, f) / (sqrt(S) + 1e-8)")
    for text in (decay, adam):
        net = tpc.loads(text, base_dir=FIXED.parent)
        assert net.program_classification().regime == "kernel" and not in_function_space(net)
