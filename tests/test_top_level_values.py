"""Raw vector statements beside layers: `r = relu(A @ y)` at the top level of a network program names a
value built from the fixed matrices and vectors, the layers and earlier names, which the model reads
by name. It must be exactly the model with the expression written in place (the same steps, so the
same numbers bitwise at finite width and in both limits) and be refused clearly where it cannot be a
value of the model. programs/train/named_values_mup.tp converges to its limit in test_convergence.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import tpc
from tpc.cli import main

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "programs" / "train"

HEAD = """width n
data X  = load("data/train4x3.csv")
data Y  = load("data/targets4.csv")
data Xt = load("data/test3x3.csv")
layer U : input n x 3, var = 2
matrix A : n x n ~ N(0, 1/n)
vector y ~ N(0, 1)
layer b : bias n
"""
NAMED = HEAD + """r = relu(A @ y)            # a fixed random feature: drawn once, never trained
s = 0.5 * r + b              # reads a layer: always its current value
layer V : readout 1 x n
model f(x) = V @ relu(U @ x + s)
"""
INLINE = HEAD + """layer V : readout 1 x n
model f(x) = V @ relu(U @ x + (0.5 * relu(A @ y) + b))
"""
LOOP = """for t in range(3) {
  L = mse(f(X), Y)
  record loss = L
  f -= 0.5 * grad(L, f)
}
output curve = loss
output pred  = f(Xt)
"""


def _pair(param: str) -> tuple[tpc.Network, tpc.Network]:
    text = f"parametrization {param}\n"
    return (tpc.loads(NAMED + text + LOOP, base_dir=DATA), tpc.loads(INLINE + text + LOOP, base_dir=DATA))


def test_a_named_value_is_the_expression_written_in_place() -> None:
    named, inline = _pair("mup")
    assert [(s.op, s.layer, s.args) for s in named.model.steps] == [(s.op, s.layer, s.args) for s in inline.model.steps]
    assert set(named.model.names.values()) >= {"r", "s"}  # the listing shows the names
    a, b = tpc.run(named, 96, 3), tpc.run(inline, 96, 3)
    for name in ("curve", "pred"):  # the same draws and the same arithmetic
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)


def test_a_value_read_twice_is_computed_once() -> None:
    twice = NAMED.replace("relu(U @ x + s)", "(relu(U @ x + s) * (1 + 0.1 * r))")
    net = tpc.loads(twice + "parametrization mup\n" + LOOP, base_dir=DATA)
    assert sum(s.layer == "A" for s in net.model.steps) == 1  # written out twice, A @ y would be two steps


@pytest.mark.parametrize("param", ["mup", "ntk"])
def test_named_values_have_the_limit_of_the_model_written_in_place(param: str) -> None:
    """muP by Monte Carlo particles; NTK by the kernel regime (its kernels by particles here: relu(A y))."""
    named, inline = _pair(param)
    la, lb = tpc.limit(named), tpc.limit(inline)
    for name in ("curve", "pred"):
        # the same program: the same particles and quadrature, the same numbers
        np.testing.assert_array_equal(la[name].value, lb[name].value, err_msg=name)


def test_graph_and_emitted_torch_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "named.tp"
    path.write_text(NAMED.replace('load("', f'load("{DATA}/') + "parametrization mup\n" + LOOP)
    assert main(["graph", str(path)]) == 0
    out = capsys.readouterr().out
    assert " r        = relu(" in out and " s        = " in out
    import torch

    outs = []
    for text in (NAMED, INLINE):  # the emitted PyTorch of both: the same network, draw for draw
        net = tpc.loads(text + "parametrization mup\n" + LOOP, base_dir=DATA)
        namespace: dict = {}
        exec(compile(tpc.torch_source(net), "model.py", "exec"), namespace)  # noqa: S102 - our own output
        model = namespace["Network"](64, seed=0)
        outs.append(model(torch.as_tensor(net.data["X"])).detach())
    assert torch.equal(outs[0], outs[1]) and bool(torch.any(outs[0] != 0))


REFUSED = [
    ("r = relu(A @ X)\nlayer V : readout 1 x n\nmodel f(x) = V @ relu(U @ x + r)\n",
     "'r' is named outside the model, so it reads no data ('X')"),
    ("r = relu(A @ x)\nlayer V : readout 1 x n\nmodel f(x) = V @ relu(U @ x + r)\n",
     "cannot read the model's argument 'x'"),
    ("r = relu(A @ y)\nlayer V : readout 1 x n\nmodel f(x) = V @ relu(U @ x + b + 0 * A @ y)\n",
     "'r' is not used by the model"),
    ("layer V : readout 1 x n\nmodel f(x) = V @ relu(U @ x + r)\nr = relu(A @ y)\n",
     "'r' is used before the statement that defines it (line"),
    ("r = relu(A @ q)\nq = tanh(y)\nlayer V : readout 1 x n\nmodel f(x) = V @ relu(U @ x + r + b)\n",
     "'q' is used before the statement that defines it (line"),
    ("r = relu(A @ y)\nlayer V : readout 1 x n\nmodel f(x) = V @ relu(U @ x + r + b)\noutput o = r\n",
     "'r' is a value of the model (line"),
]


@pytest.mark.parametrize(("text", "message"), REFUSED)
def test_refused_with_the_reason(text: str, message: str, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.tp"
    path.write_text(HEAD.replace('load("', f'load("{DATA}/') + text + "parametrization mup\n" + LOOP)
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
