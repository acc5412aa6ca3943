"""Tied weights: an n x n layer applied both ways in one model, `W.T @ h` beside `W @ h`
(programs/train/tied_relu2_mup.tp). W.T is the same matrix, so in the limit `W.T @ z` after
`z = phi(W @ h)` carries TP's Zdot term, sigma^2 E[phi'] h (Yang 2020, Netsor-transpose), and
W's gradient gathers the outer products of both uses, the transposed one the other way round.

Checked against: torch written here (forward), full Jacobians (the empirical NTK: its cross
terms between the two uses are nonzero at finite width), closed forms of the linear tied network
(NNGP 2q and NTK 10q in NTK parametrization, against q and 6q untied), direct training against
the unrolled program (the stored rows of the transposed use), the raw Netsor program written with
`W.T`, the emitted PyTorch, and finite widths against the limit."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

import tpc
from tests.helpers import assert_direct_equals_unrolled, emitted_train_outputs, initial_weights, jacobian_ntk
from tests.test_loops import check_warmup_kernel_descent
from tpc.errors import TpcError
from tpc.train.finite import forward

ROOT = Path(__file__).resolve().parent.parent
TIED = ROOT / "programs" / "train" / "tied_relu2_mup.tp"
DATA = """width n
data X = [[1, 0.5, 0], [-0.3, 0.8, 1], [0.2, -1, 0.5], [0.9, 0.1, -0.7]]
data Y = [1, -1, 0.5, 1]
data Xt = [[0.4, 0.4, 0.1], [-1, 0.2, 0.3]]
parametrization {param}
"""
LINEAR = DATA + """layer U : input n x 3
layer W : hidden n x n
layer V : readout 1 x n
model f(x) = V @ (W.T @ (W @ (U @ x)))
"""
RELU = DATA + """layer U : input n x 3, var = 2
layer W : hidden n x n, var = 2
layer V : readout 1 x n
model f(x) = V @ relu(W.T @ relu(W @ relu(U @ x)))
"""
KERNELS = "output K = nngp(f, X)\noutput T = ntk(f, X)\n"
WARMUP = """for t in range(4) {
  L = mse(f(X), Y)
  record loss = L
  f -= 0.5 * min(1, (t + 1) / 2) * grad(L, f)
}
output pred = f(Xt)
output curve = loss
"""
MOMENTUM = """state M = zeros(f)
for t in range(3) {
  L = mse(f(X), Y)
  record loss = L
  M = 0.9 * M + grad(L, f)
  f -= 0.3 * M
}
output pred = f(Xt)
output move = feature_change(f, X)
output curve = loss
"""


def test_forward_is_the_tied_network_in_torch() -> None:
    net = tpc.loads(RELU.format(param="mup") + KERNELS)
    w = initial_weights(net, 16, [0, 1])
    x = torch.as_tensor(net.data["X"])
    h = torch.relu(x @ w["U"].transpose(-1, -2))
    z = torch.relu(h @ w["W"].transpose(-1, -2))  # W h, as rows
    y = torch.relu(z @ w["W"])  # W.T z, as rows: the same W
    want = y @ w["V"].transpose(-1, -2)
    torch.testing.assert_close(forward(net, w, x)[-1], want, rtol=1e-12, atol=1e-12)


def test_empirical_ntk_is_the_jacobians() -> None:
    """W's term pairs each use with the other: (g . y')(x . g') for W x and W.T y, which the
    Jacobians hold and a rule pairing g with g and x with x would miss."""
    net = tpc.loads(RELU.format(param="ntk").replace("readout 1 x n", "readout 2 x n") + KERNELS)  # per output
    np.testing.assert_allclose(tpc.run(net, 12, 1)["T"].values[0], jacobian_ntk(net, 12, 0), rtol=1e-10, atol=1e-12)


def test_empirical_ntk_of_a_fixed_matrix_used_both_ways_is_the_jacobians() -> None:
    """A fixed `matrix W` applied as W and W.T: no term of its own, the others through both uses."""
    net = tpc.loads(RELU.format(param="ntk").replace("layer W : hidden n x n, var = 2", "matrix W : n x n ~ N(0, 2/n)")
                    + KERNELS)
    assert net.layers["W"].fixed
    np.testing.assert_allclose(tpc.run(net, 12, 1)["T"].values[0], jacobian_ntk(net, 12, 0), rtol=1e-10, atol=1e-12)


def test_linear_kernels_are_the_closed_forms() -> None:
    """f = v . W.T W U x / sqrt(n) in NTK parametrization, q = x . x' / 3: W.T (W h) is
    Zhat + sigma^2 h (Zdot), so the NNGP is 2q (q untied, W2 W1); the NTK's terms are 2q for V
    and for W (two uses, the cross terms 0 in the limit), and 2 x.x' = 6q for U (TP4's input
    layer has no 1/d multiplier), 10q in all (6q untied)."""
    tied = tpc.loads(LINEAR.format(param="ntk") + KERNELS)
    untied = tpc.loads(LINEAR.format(param="ntk").replace("W.T @", "W2 @").replace(
        "layer V", "layer W2 : hidden n x n\nlayer V") + KERNELS)
    X = tied.data["X"]  # noqa: N806
    q = X @ X.T / 3
    lim = tpc.limit(tied)
    assert lim["K"].method == "exact"
    np.testing.assert_allclose(lim["K"].value, 2 * q, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lim["T"].value, 10 * q, rtol=1e-10, atol=1e-12)
    other = tpc.limit(untied)
    np.testing.assert_allclose(other["K"].value, q, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(other["T"].value, 6 * q, rtol=1e-10, atol=1e-12)
    finite = tpc.run(tied, 1024, 8)
    for name, want in (("K", 2 * q), ("T", 10 * q)):
        err = np.abs(finite[name].values.mean(0) - want)
        assert np.all(err <= 5 * finite[name].stderr + 1e-3), (name, err.max())


def test_kernel_regime_training_is_kernel_descent_with_the_tied_kernel() -> None:
    net = tpc.loads(LINEAR.format(param="ntk") + WARMUP)
    pts = np.vstack([net.data["X"], net.data["Xt"]])
    q = pts @ pts.T / 3
    check_warmup_kernel_descent(tpc.limit(net), 10 * q, 2 * q, net.data["Y"].reshape(-1))


def test_relu_kernels_approach_the_limit() -> None:
    """The ReLU network's kernels have no closed form (W.T's Zdot adds relu(U x) to a Gaussian):
    the lowered program takes them by Monte Carlo; finite widths approach it."""
    net = tpc.loads(RELU.format(param="ntk") + KERNELS)
    lim = tpc.limit(net)
    for name in ("K", "T"):
        errors = [float(np.sqrt(((tpc.run(net, w, 6)[name].values - lim[name].value) ** 2).mean())) for w in (32, 512)]
        assert errors[1] < errors[0] / 2, (name, errors)


@pytest.mark.parametrize("body", [WARMUP, MOMENTUM], ids=["sgd", "momentum"])
def test_direct_equals_unrolled(body: str) -> None:
    """The unrolled program stores W.T's gradient rows the other way round (W += y g^T)."""
    net = tpc.loads(RELU.format(param="mup") + body)
    direct = assert_direct_equals_unrolled(net, 16, 2)
    assert np.ptp(direct["curve"].values, axis=-1).min() > 1e-3  # it trained


def test_emitted_torch_is_tpc_run() -> None:
    net = tpc.loads(RELU.format(param="mup") + MOMENTUM)
    got = emitted_train_outputs(net, 16)
    ran = tpc.run(net, 16, 1)
    for name in ("pred", "curve"):
        np.testing.assert_allclose(np.asarray(got[name]).reshape(-1), ran[name].values[0].reshape(-1),
                                   rtol=1e-10, atol=1e-12, err_msg=name)


def test_linear_training_approaches_the_exact_limit() -> None:
    net = tpc.loads(LINEAR.format(param="mup") + MOMENTUM)
    lim = tpc.limit(net)
    assert lim["pred"].method == "exact"
    errors = [float(np.sqrt(((tpc.run(net, w, 8)["pred"].values - lim["pred"].value) ** 2).mean()))
              for w in (64, 1024)]
    assert errors[1] < errors[0] / 2, errors


def test_raw_program_with_a_transpose_is_the_network() -> None:
    """programs/train/tied_relu2_mup.tp's network written as a raw Netsor program with `W.T`: the
    same numbers, seed for seed."""
    raw = tpc.loads(DATA.replace("parametrization {param}\n", "") + """matrix U : n x 3 ~ N(0, 2/3)
matrix W : n x n ~ N(0, 2/n)
vector v ~ N(0, 1)
f  = v @ relu(W.T @ relu(W @ relu(U @ X))) / n
ft = v @ relu(W.T @ relu(W @ relu(U @ Xt))) / n
loss L = mse(f, Y)
for t in range(3) {
  record loss = L
  gU = grad(L, U)
  gW = grad(L, W)
  gv = grad(L, v)
  U -= 0.5 * n * gU
  W -= 0.5 * gW
  v -= 0.5 * n * gv
}
output pred = ft
output curve = loss
""")
    net = tpc.loads(RELU.format(param="mup") + """for t in range(3) {
  L = mse(f(X), Y)
  record loss = L
  f -= 0.5 * grad(L, f)
}
output pred = f(Xt)
output curve = loss
""")
    a, b = tpc.run(raw, 32, 2), tpc.run(net, 32, 2)
    for name in ("pred", "curve"):
        np.testing.assert_allclose(a[name].values, b[name].values, rtol=1e-12, atol=1e-14, err_msg=name)


def test_bundled_program_and_its_listings(capsys: pytest.CaptureFixture[str]) -> None:
    from tpc.cli import main

    net = tpc.load(TIED)
    assert [s.transposed for s in net.model.steps if s.op == "matmul"] == [False, False, True, False]
    assert main(["graph", str(TIED), "--unrolled"]) == 0
    out = capsys.readouterr().out
    assert "W_0.T @ " in out and "Wx_1, Wdh_1 = dh" in out  # the transposed use's rows: (g, y)
    body = next(d["body"] for _, d in net.graph.nodes(data=True) if d["op"] == "model")
    assert [(d["text"], d.get("transposed", False)) for _, d in body.nodes(data=True) if d["op"] == "matmul"] == [
        ("U @ x", False), ("W @ h2", False), ("W.T @ z", True), ("V @ h6", False)]
    from tpc.train.graph import to_json

    exported = next(d["body"] for d in to_json(net.graph) if d["op"] == "model")
    assert [d.get("transposed", False) for d in exported if d["op"] == "matmul"] == [False, False, True, False]
    products = [line.split("@")[1].strip() for line in tpc.torch_source(net).splitlines() if "* self.W)" in line]
    assert products == ["(m['W'] * self.W).T", "(m['W'] * self.W)"]  # rows times W.T, then times W


@pytest.mark.parametrize(("model", "message"), [
    ("V @ relu(U.T @ relu(U @ x))", r"only an n x n layer is applied transposed .* 'U' is an input layer \(n x d\)"),
    ("V.T @ relu(U @ x)", "'V' is a readout layer"),
    ("V @ relu(W^T @ relu(U @ x))", r"the transpose of a layer is written W\.T"),
    ("V @ relu(W.T)", r"a transpose is used only as a product: W\.T @ h"),
])
def test_refusals(model: str, message: str) -> None:
    source = RELU.format(param="mup").replace("model f(x) = V @ relu(W.T @ relu(W @ relu(U @ x)))",
                                              f"model f(x) = {model}")
    with pytest.raises(TpcError, match=message):
        tpc.loads(source + KERNELS)


def test_a_fixed_matrix_applied_both_ways_is_a_layer_no_update_moves() -> None:
    """`matrix W` (fixed) in place of the hidden layer: the numbers of the layer W that the loop
    leaves alone (U and V updated by name), at finite width, draw for draw."""
    body = """for t in range(3) {
  L = mse(f(X), Y)
  record loss = L
  {updates}
}
output pred = f(Xt)
output curve = loss
"""
    header = RELU.format(param="mup")
    fixed = tpc.loads(header.replace("layer W : hidden n x n, var = 2", "matrix W : n x n ~ N(0, 2/n)")
                      + body.replace("{updates}", "f -= 0.5 * grad(L, f)"))
    layer = tpc.loads(header + body.replace("{updates}", "U -= 0.5 * grad(L, U)\n  V -= 0.5 * grad(L, V)"))
    assert fixed.layers["W"].fixed
    a, b = tpc.run(fixed, 64, 2), tpc.run(layer, 64, 2)
    for name in ("pred", "curve"):
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)


@pytest.mark.parametrize("both", ["W @ h + W.T @ h", "W.T @ h + W @ h"])
def test_both_uses_of_one_value_over_positions(both: str) -> None:
    """`W @ h + W.T @ h` of one h over 2 positions (the per-position recursion's case): W.T h is a
    Gaussian independent of W h (h does not depend on W, so no Zdot), and f's NNGP is
    2 * var_U / d * s . s' / P^2 with s the sum of an input's positions, in either order (the first
    order once reused W h's value for W.T h, twice the limit)."""
    net = tpc.loads("""width n
parametrization ntk
data X = [[1, 0, 0.5, 1], [0, 1, -0.5, 0.2]]
layer U : input n x 2
layer W : hidden n x n
layer V : readout 1 x n
model f(x[2]) {
  h = U @ x
  return V @ pool(""" + both + """)
}
output K = nngp(f, X)
""")
    X = net.data["X"]  # noqa: N806
    s = X[:, :2] + X[:, 2:]
    np.testing.assert_allclose(tpc.limit(net)["K"].value, 2 * (s @ s.T / 2) / 4, rtol=1e-10, atol=1e-12)


def test_the_plan_counts_a_forward_transpose() -> None:
    from tpc.train.pooled import count

    p = count(tpc.loads(LINEAR.format(param="mup") + WARMUP))
    # 4 steps x (4 rows forward + 4 backward) and 2 rows of Xt after training, each row through W_0 and
    # W_0.T once (forward W then W.T, backward the reverse): the model's W.T counts as a transpose
    assert (p.plain_rows, p.transposed_rows) == (2 * 16 + 2, 2 * 16 + 2)


# a transposed convolution with the same weights: conv(A.T, h) = sum_o A[o].T @ shift(h, -o), the
# adjoint of conv(A, h) ('same' padding, stride 1), as torch's conv_transpose of A's weight
CONV_T = """width n
parametrization {param}
data X = [[1, 0.5, -0.3, 0.2, 0.9, -1, 0.4, 0.1, 0.3, -0.2, 0.6, 0.8],
          [0.2, -0.8, 0.5, 1, -0.4, 0.3, 0.7, -0.6, 0.1, 0.5, -0.2, 0.9]]
data Y = [1, -1]
layer U : conv n x 2, kernel = {k}, var = 2
layer A : conv n x n, kernel = {k}, var = 2
layer V : readout 1 x n
model f(x[{grid}]) = V @ pool(relu(conv(A.T, relu(conv(A, relu(conv(U, x)))))))
"""


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
@pytest.mark.parametrize(("k", "grid"), [("3", "6"), ("2", "6"), ("[3, 2]", "3, 2")])
def test_a_transposed_conv_is_torchs_conv_transpose(k: str, grid: str) -> None:
    from tests.test_conv_layers import _taps

    net = tpc.loads(CONV_T.format(param="mup", k=k, grid=grid) + KERNELS)
    kernel = [int(v) for v in k.strip("[]").split(",")]
    shape = [int(v) for v in grid.split(",")]
    w = initial_weights(net, 12, [0])
    x = torch.as_tensor(net.data["X"]).reshape(2, *shape, 2).movedim(-1, 1)  # (B, d, *grid)
    conv, conv_t = ((torch.nn.functional.conv1d, torch.nn.functional.conv_transpose1d) if len(kernel) == 1 else
                    (torch.nn.functional.conv2d, torch.nn.functional.conv_transpose2d))
    u = w["U"][0].reshape(-1, *kernel, 2).movedim(-1, 1)  # (n, d, *kernel): U's columns, patch row by row
    offsets = list(itertools.product(*[range(-((q - 1) // 2), q - (q - 1) // 2) for q in kernel]))
    a = _taps(w, "A", offsets)
    h = torch.relu(conv(x, u, padding="same"))
    z = torch.relu(conv(h, a, padding="same"))
    # 'same' pads (q - 1) // 2 before: the adjoint's output starts there, cropped to the grid
    y = conv_t(z, a, padding=tuple((q - 1) // 2 for q in kernel))
    y = torch.relu(y[(..., *[slice(0, s) for s in shape])])
    want = y.mean(tuple(range(2, y.dim()))) @ w["V"][0].T
    got = forward(net, w, torch.as_tensor(net.data["X"]))[-1][0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_transposed_conv_kernels_training_and_torch() -> None:
    """The empirical NTK is the Jacobians'; direct training equals the unrolled program and the
    emitted torch; finite widths approach the kernels' limit (the lowered program's)."""
    net = tpc.loads(CONV_T.format(param="ntk", k="3", grid="6") + KERNELS)
    np.testing.assert_allclose(tpc.run(net, 12, 1)["T"].values[0], jacobian_ntk(net, 12, 0), rtol=1e-10, atol=1e-12)
    lim = tpc.limit(net, particles=2**13)  # Monte Carlo (the lowered program): its error well under width 512's
    errors = [float(np.sqrt(((tpc.run(net, w, 4)["K"].values - lim["K"].value) ** 2).mean())) for w in (32, 512)]
    assert errors[1] < errors[0] / 2, errors
    trained = tpc.loads(CONV_T.format(param="mup", k="2", grid="6") + WARMUP.replace("f(Xt)", "f(X)"))
    direct = assert_direct_equals_unrolled(trained, 12, 2)
    got = emitted_train_outputs(trained, 12)
    np.testing.assert_allclose(np.asarray(got["pred"]).reshape(-1), direct["pred"].values[0].reshape(-1),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("layer", "message"), [
    ("layer A : conv n x n, kernel = 3, var = 2, stride = 2", "'A' has a stride or 'valid' padding"),
    ("layer A : conv n x n, kernel = 3, var = 2, padding = valid", "'A' has a stride or 'valid' padding"),
])
def test_transposed_conv_refusals(layer: str, message: str) -> None:
    source = CONV_T.format(param="mup", k="3", grid="6").replace("layer A : conv n x n, kernel = 3, var = 2", layer)
    with pytest.raises(TpcError, match=message):
        tpc.loads(source + KERNELS)
    with pytest.raises(TpcError, match=r"'A' is a convolution: apply it with conv\(A\.T, h\)"):
        tpc.loads(CONV_T.format(param="mup", k="3", grid="6").replace("conv(A.T, relu(", "A.T @ relu((") + KERNELS)
    with pytest.raises(TpcError, match="'U' reads the data"):
        tpc.loads(CONV_T.format(param="mup", k="3", grid="6").replace("conv(U, x)", "conv(U.T, x)") + KERNELS)


def test_the_plan_says_zdot_only_where_one_matrix_goes_both_ways() -> None:
    """A frozen W2 used transposed and a frozen W1 used plainly: each matrix one way, no Zdot (the
    loop trains only U and V, so nothing backpropagates through W1 or W2)."""
    from tpc.train.pooled import count, describe_limit

    source = LINEAR.format(param="mup").replace("W.T @", "W2.T @").replace(
        "layer V", "layer W2 : hidden n x n\nlayer V") + WARMUP.replace(
        "f -= 0.5 * min(1, (t + 1) / 2) * grad(L, f)", "V -= 0.5 * grad(L, V)")
    net = tpc.loads(source)
    p = count(net)
    assert p.plain_rows > 0 and p.transposed_rows > 0 and not p.zdot
    assert "no n x n matrix is multiplied by its transpose" in describe_limit(net, True, 1024, 2)
    assert count(tpc.loads(LINEAR.format(param="mup") + WARMUP)).zdot
