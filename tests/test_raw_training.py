"""A raw Netsor program trained by a loop (tpc/train/raw.py): its matrices are layers, its powers
of n a parametrization, and it runs on the same backends as the network program it equals."""

from __future__ import annotations

import numpy as np
import pytest

import tpc
from tests.conftest import PROGRAMS
from tpc.cli import main

RAW = PROGRAMS / "train" / "raw_relu2_mup.tp"

LINEAR_RAW = """\
width n
data X = [[1, 0.5, -1], [0, 1, 2], [2, -1, 0.5]]
data Y = [0.5, -1, 1]
data Xt = [[1, 1, 1], [0.5, 0, -0.5]]
matrix U : n x 3 ~ N(0, 2/3)
matrix W : n x n ~ N(0, 1/n)
vector v ~ N(0, 3)
f = v @ (W @ (U @ X)) / n
ft = v @ (W @ (U @ Xt)) / n
loss L = mse(f, Y)
for t in range(4) {
  record loss = L
  gU = grad(L, U)
  gW = grad(L, W)
  gv = grad(L, v)
  U -= 0.3 * n * gU
  W -= 0.3 * gW
  v -= 0.3 * n * gv
}
output pred = ft
output curve = loss
"""

LINEAR_NETWORK = """\
width n
parametrization mup
data X = [[1, 0.5, -1], [0, 1, 2], [2, -1, 0.5]]
data Y = [0.5, -1, 1]
data Xt = [[1, 1, 1], [0.5, 0, -0.5]]
layer U : input n x 3, var = 2
layer W : hidden n x n, var = 1
layer V : readout 1 x n, var = 3
model f(x) = V @ (W @ (U @ x))
loss L = mse(f(X), Y)
for t in range(4) {
  record loss = L
  f -= 0.3 * grad(L, f)
}
output pred = f(Xt)
output curve = loss
"""


# with a bias, rate 0.3 makes the loss grow (0.375 -> 2.26 in the limit): finite widths then approach
# the limit slowly, so these train at 0.1
LINEAR_BIAS_RAW = LINEAR_RAW.replace("0.3 *", "0.1 *") \
    .replace("vector v ~ N(0, 3)", "vector v ~ N(0, 3)\nvector b ~ N(0, 0.5)") \
    .replace("(U @ X)", "(U @ X + b)").replace("(U @ Xt)", "(U @ Xt + b)") \
    .replace("  gv = grad(L, v)\n", "  gv = grad(L, v)\n  gb = grad(L, b)\n") \
    .replace("  v -= 0.1 * n * gv\n", "  v -= 0.1 * n * gv\n  b -= 0.1 * n * gb\n")
LINEAR_BIAS_NETWORK = LINEAR_NETWORK.replace("0.3 *", "0.1 *") \
    .replace("layer V : readout 1 x n, var = 3", "layer V : readout 1 x n, var = 3\nlayer b : bias n, var = 0.5") \
    .replace("(U @ x)", "(U @ x + b)")


def test_the_raw_program_reads_its_parametrization_off_its_powers_of_n() -> None:
    net = tpc.load(RAW)
    assert [la.role for la in net.layers.values()] == ["input", "hidden", "readout"]
    assert tuple(net.abc.a) == (-0.5, 0.0, 0.5) and tuple(net.abc.b) == (0.5, 0.5, 0.5) and net.abc.c == 0  # muP (TP4)
    assert net.classification().regime == "feature learning"


def test_raw_training_equals_the_network_program_at_finite_width() -> None:
    raw, net = tpc.load(RAW), tpc.load(PROGRAMS / "train" / "relu2_mup.tp")
    a, b = tpc.run(raw, 96, 3), tpc.run(net, 96, 3)
    for name in ("pred", "curve"):
        np.testing.assert_allclose(a[name].values, b[name].values, rtol=0, atol=1e-12)
    assert np.abs(a["curve"].values[:, 0] - a["curve"].values[:, -1]).min() > 1e-3  # it trained


def test_raw_training_limit_agrees_with_the_network_programs() -> None:
    """Monte Carlo on both sides (the raw loop evaluates L four times a step, so its particles are
    drawn in another order): agreement within the standard errors."""
    raw, net = tpc.load(RAW), tpc.load(PROGRAMS / "train" / "relu2_mup.tp")
    a, b = tpc.limit(raw, particles=2**12), tpc.limit(net, particles=2**12)
    for name in ("pred", "curve"):
        se = np.sqrt(a[name].stderr ** 2 + b[name].stderr ** 2)
        assert np.all(np.abs(a[name].value - b[name].value) <= 5 * se + 1e-9), name


def test_linear_raw_program_equals_its_network_exactly() -> None:
    raw, net = tpc.loads(LINEAR_RAW), tpc.loads(LINEAR_NETWORK)
    la, lb = tpc.limit(raw), tpc.limit(net)
    for name in ("pred", "curve"):
        assert la[name].method == "exact"
        np.testing.assert_allclose(la[name].value, lb[name].value, rtol=1e-10, atol=1e-12)
    fa, fb = tpc.run(raw, 64, 2), tpc.run(net, 64, 2)
    np.testing.assert_allclose(fa["pred"].values, fb["pred"].values, rtol=0, atol=1e-12)


@pytest.mark.parametrize("bias", [False, True])
def test_linear_raw_program_finite_widths_approach_its_exact_limit(bias: bool) -> None:
    """Width 1024, 8 seeds: within 5 standard errors of the exact limit (plus an O(1/n) allowance);
    with a trained bias too."""
    raw = tpc.loads(LINEAR_BIAS_RAW if bias else LINEAR_RAW)
    lim = tpc.limit(raw)
    fin = tpc.run(raw, 1024, 8)
    for name in ("pred", "curve"):
        gap = np.abs(fin[name].mean - lim[name].value)
        assert np.all(gap <= 5 * fin[name].stderr + 5e-3), (name, gap)


def test_an_unstable_raw_parametrization_is_refused(capsys: pytest.CaptureFixture[str], tmp_path) -> None:  # noqa: ANN001
    """Plain SGD (no powers of n) on a raw network with a 1/sqrt(n) readout: the input layer and
    the readout move the output by a growing amount; classify says so and the limit refuses."""
    text = LINEAR_RAW.replace("(U @ X)) / n", "(U @ X)) / sqrt(n)").replace("(U @ Xt)) / n", "(U @ Xt)) / sqrt(n)")
    text = text.replace("0.3 * n * gU", "0.3 * gU").replace("0.3 * n * gv", "0.3 * gv")
    path = tmp_path / "raw_sp.tp"
    path.write_text(text)
    net = tpc.load(path)
    assert not net.classification().stable
    assert main(["limit", str(path)]) == 2
    assert "unstable" in capsys.readouterr().err


def test_scalars_of_a_trained_raw_program_are_its_parameters() -> None:
    """`scalar lr = ...` is substituted into the translation (and is what `tpc sweep --grid lr=...`
    sets): the same numbers as the literal."""
    named = LINEAR_RAW.replace("loss L", "scalar lr = 0.3\nloss L").replace("0.3 * n * gU", "lr * n * gU")
    named = named.replace("0.3 * gW", "lr * gW").replace("0.3 * n * gv", "lr * n * gv")
    assert "scalar lr" in named and "0.3 *" not in named
    a, b = tpc.run(tpc.loads(named), 48, 2), tpc.run(tpc.loads(LINEAR_RAW), 48, 2)
    np.testing.assert_allclose(a["pred"].values, b["pred"].values, rtol=0, atol=0)


MOMENTUM = """state M = zeros(W)
for t in range(4) {
  record loss = L
  M = 0.9 * M + grad(L, W)
  W -= 0.2 * M
}"""


def _loop(text: str) -> str:
    """The program's one loop, as written."""
    start = text.index("for t in range(4) {")
    return text[start:text.index("}", start) + 1]


def test_a_momentum_buffer_in_a_raw_loop_equals_the_network_programs() -> None:
    raw_text = LINEAR_RAW.replace(_loop(LINEAR_RAW), MOMENTUM)
    net_text = LINEAR_NETWORK.replace(_loop(LINEAR_NETWORK), MOMENTUM)
    assert "grad(L, U)" not in raw_text and "grad(L, f)" not in net_text  # both loops are the momentum one
    raw, net = tpc.loads(raw_text), tpc.loads(net_text)
    a, b = tpc.run(raw, 48, 2), tpc.run(net, 48, 2)
    for name in ("pred", "curve"):
        np.testing.assert_allclose(a[name].values, b[name].values, rtol=0, atol=1e-12)
    la, lb = tpc.limit(raw), tpc.limit(net)
    np.testing.assert_allclose(la["pred"].value, lb["pred"].value, rtol=1e-10, atol=1e-12)


def test_a_raw_vector_added_in_the_network_is_a_trained_bias() -> None:
    """`U @ X + b` with `b -= lr * n * gb`: the bias layer of muP (a bias takes the input layer's a
    and b), the same numbers as the network program at finite width and exactly in the limit."""
    assert LINEAR_BIAS_RAW.count("+ b") == 2 and "b -= 0.1 * n * gb" in LINEAR_BIAS_RAW
    assert "(U @ x + b)" in LINEAR_BIAS_NETWORK and "layer b : bias n" in LINEAR_BIAS_NETWORK
    raw, net = tpc.loads(LINEAR_BIAS_RAW), tpc.loads(LINEAR_BIAS_NETWORK)
    assert raw.layers["b"].role == "bias" and raw.layers["b"].var == 0.5
    assert tuple(raw.abc.a) == (-0.5, 0.0, 0.5) and tuple(raw.abc.b) == (0.5, 0.5, 0.5)
    assert set(raw.program.trained_layers()) == {"U", "W", "v", "b"}
    a, b = tpc.run(raw, 64, 2), tpc.run(net, 64, 2)
    for name in ("pred", "curve"):
        np.testing.assert_allclose(a[name].values, b[name].values, rtol=0, atol=1e-12)
    la, lb = tpc.limit(raw), tpc.limit(net)
    for name in ("pred", "curve"):
        assert la[name].method == "exact"
        np.testing.assert_allclose(la[name].value, lb[name].value, rtol=1e-10, atol=1e-12)
    without = tpc.limit(tpc.loads(LINEAR_RAW))  # the bias changes the answer
    assert np.abs(la["pred"].value - without["pred"].value).max() > 1e-2


def test_a_trained_bias_sets_the_rate_of_a_fixed_input_matrix() -> None:
    """An input matrix that no update moves has no power of n of its own: the input entry of the
    abc lists takes its bias's (n^1: a = -1/2, b = 1/2, muP's; without the bias it would read n^0).
    The same numbers as the muP network program with U a fixed `matrix`."""
    text = LINEAR_BIAS_RAW.replace("  U -= 0.1 * n * gU\n", "")
    assert "U -=" not in text and "b -= 0.1 * n * gb" in text
    net = tpc.loads(text)
    assert (net.abc.a[0], net.abc.b[0]) == (-0.5, 0.5)
    assert "U" not in net.program.trained_layers() and "b" in net.program.trained_layers()
    fixed = LINEAR_BIAS_NETWORK.replace("layer U : input n x 3, var = 2", "matrix U : n x 3 ~ N(0, 2/3)")
    assert "matrix U" in fixed
    other = tpc.loads(fixed)
    a, b = tpc.run(net, 64, 2), tpc.run(other, 64, 2)
    np.testing.assert_allclose(a["pred"].values, b["pred"].values, rtol=0, atol=1e-12)
    # 2/3 as written and the layer's var / d = 2 / 3 differ in the last bit, and the exact limit's
    # Cholesky extensions cut eigenvalues at round-off: here that moves the values by ~2e-10
    la, lb = tpc.limit(net), tpc.limit(other)
    np.testing.assert_allclose(la["pred"].value, lb["pred"].value, rtol=1e-8, atol=1e-12)
    slow_bias = tpc.loads(text.replace("b -= 0.1 * n * gb", "b -= 0.1 * gb"))  # n^0: NTK's input entry
    assert (slow_bias.abc.a[0], slow_bias.abc.b[0]) == (0.0, 0.0)


def test_a_momentum_buffer_of_an_object_updated_with_a_power_of_n() -> None:
    """`state M = zeros(v)` holds none of v's value: `v -= 0.2 * n * M` is a learning rate n^1 times
    gradients, not a decay term with a power of n (refused so before; the fuzz found it). The
    network program with the same buffer gives the same numbers."""
    raw_loop = MOMENTUM.replace("zeros(W)", "zeros(v)").replace("grad(L, W)", "grad(L, v)") \
        .replace("W -= 0.2 * M", "v -= 0.2 * n * M\n  U -= 0.2 * n * grad(L, U)")
    net_loop = MOMENTUM.replace("zeros(W)", "zeros(V)").replace("grad(L, W)", "grad(L, V)") \
        .replace("W -= 0.2 * M", "V -= 0.2 * M\n  U -= 0.2 * grad(L, U)")
    assert "v -= 0.2 * n * M" in raw_loop and "V -= 0.2 * M" in net_loop
    raw = tpc.loads(LINEAR_RAW.replace(_loop(LINEAR_RAW), raw_loop))
    net = tpc.loads(LINEAR_NETWORK.replace(_loop(LINEAR_NETWORK), net_loop))
    a, b = tpc.run(raw, 48, 2), tpc.run(net, 48, 2)
    np.testing.assert_allclose(a["pred"].values, b["pred"].values, rtol=0, atol=1e-12)
    np.testing.assert_allclose(tpc.limit(raw)["pred"].value, tpc.limit(net)["pred"].value, rtol=1e-10, atol=1e-12)


def test_kernels_and_features_of_a_raw_readout_are_the_models() -> None:
    """nngp(f, X), ntk(f, X) and features(f, X) of a raw program's readout f are the translated
    model's (ntk and nngp were refused as "takes the model and a data set"): in NTK's powers (a
    readout / sqrt(n), rate n^-1 on the n x n matrix's entries) the same numbers as the network
    program in NTK parametrization, at finite width and exactly in the limit."""
    raw_text = LINEAR_RAW.replace("/ n\n", "/ sqrt(n)\n").replace(" * n * g", " * g") \
        .replace("W -= 0.3 * gW", "W -= 0.3 / n * gW") \
        .replace("loss L", "output K = ntk(f, X)\noutput S = nngp(f, X)\noutput F = features(f, X)\nloss L")
    net_text = LINEAR_NETWORK.replace("parametrization mup", "parametrization ntk") \
        .replace("loss L", "output K = ntk(f, X)\noutput S = nngp(f, X)\noutput F = features(f, X)\nloss L")
    assert "sqrt(n)" in raw_text and " * n * g" not in raw_text and "ntk(f, X)" in raw_text
    raw, net = tpc.loads(raw_text), tpc.loads(net_text)
    assert tuple(raw.abc.a) == tuple(net.abc.a) and tuple(raw.abc.b) == tuple(net.abc.b)
    a, b = tpc.run(raw, 64, 2), tpc.run(net, 64, 2)
    la, lb = tpc.limit(raw), tpc.limit(net)
    for name in ("K", "S", "F", "pred"):
        np.testing.assert_allclose(a[name].values, b[name].values, rtol=0, atol=1e-12)
        np.testing.assert_allclose(la[name].value, lb[name].value, rtol=1e-10, atol=1e-12)
    assert np.abs(la["K"].value).max() > 0.1


def test_a_declared_vector_named_x_is_no_model_argument() -> None:
    """The translated model takes its data under a name the program does not use: a bias named `x`
    was taken for the model's input ("the model's input enters through its input layer")."""
    import re

    renamed = re.sub(r"\bb\b", "x", LINEAR_BIAS_RAW)
    assert "vector x ~ N(0, 0.5)" in renamed and "(U @ X + x)" in renamed
    a, b = tpc.run(tpc.loads(renamed), 48, 2), tpc.run(tpc.loads(LINEAR_BIAS_RAW), 48, 2)
    np.testing.assert_allclose(a["pred"].values, b["pred"].values, rtol=0, atol=0)


def test_check_names_the_layers_a_training_moves(capsys: pytest.CaptureFixture[str], tmp_path) -> None:  # noqa: ANN001
    """Training the bias and not its input matrix moves the input layer's abc entry; `tpc check`
    names the bias (it named U too, which no update moves)."""
    text = LINEAR_BIAS_RAW.replace("  U -= 0.1 * n * gU\n", "").replace("  W -= 0.1 * gW\n", "")
    assert "U -=" not in text and "W -=" not in text and "b -= 0.1 * n * gb" in text
    path = tmp_path / "bias_only.tp"
    path.write_text(text)
    assert main(["check", str(path)]) == 0
    assert "this training moves b and v only" in capsys.readouterr().out
