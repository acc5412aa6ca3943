"""A model's body written as Netsor statements: `model f(x) { h = relu(U @ x)  return V @ h }`.

Each statement names a value of the model; the model is the same steps as the one expression that
substitutes them (and as the same model written with `nonlin` blocks), so every backend gives the same
numbers. Checked here: the steps, finite width, both limits and the emitted PyTorch; the names in
the program graph; and the refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import tpc
from tpc.errors import TpcError
from tpc.train.graph import program_graph

ROOT = Path(__file__).resolve().parent.parent
HEADER = """width n
parametrization {param}
data X = [[1, 0.5, -0.2], [-0.3, 0.8, 0.1], [0.2, -1, 0.4], [0.9, 0.1, -0.6]]
data Y = [1, -1, 1, 1]
data Xt = [[0.4, 0.4, 0.4], [-1, 0.2, 0.3]]
layer U  : input n x 3, var = 2
layer W1 : hidden n x n, var = 2
layer W2 : hidden n x n, var = 2
layer V  : readout 1 x n
"""
NONLINS = """nonlin b1(h) = h + 0.7 * W1 @ relu(layernorm(h))
nonlin b2(h) = h + 0.7 * W2 @ relu(layernorm(h))
model f(x) = V @ layernorm(b2(b1(U @ x)))
"""
STATEMENTS = """model f(x) {
  h0 = U @ x                                  # the input layer
  h1 = h0 + 0.7 * W1 @ relu(layernorm(h0))    # two residual blocks
  h2 = h1 + 0.7 * W2 @ relu(layernorm(h1))
  return V @ layernorm(h2)
}
"""
TRAINING = """for t in range(2) {
  L = mse(f(X), Y)
  record loss = L
  f -= 0.5 * grad(L, f)
}
output pred = f(Xt)
output curve = loss
"""
KERNELS = "output nngp = nngp(f, X)\noutput ntk = ntk(f, X)\n"


def both(param: str, tail: str) -> tuple[object, object]:
    head = HEADER.format(param=param)
    return tpc.loads(head + NONLINS + tail), tpc.loads(head + STATEMENTS + tail)


def steps(net: object) -> list[tuple]:
    return [(s.op, s.kind, s.layer, s.args, s.tree) for s in net.model.steps]  # type: ignore[attr-defined]


def test_statements_make_the_same_model_as_nonlins() -> None:
    a, b = both("mup", TRAINING)
    assert steps(a) == steps(b) and len(steps(a)) > 10
    assert b.model.names == {1: "h0"} | {k: v for k, v in b.model.names.items() if v in ("h1", "h2")}
    assert set(b.model.names.values()) == {"h0", "h1", "h2"}


@pytest.mark.parametrize("param", ["mup", "ntk"])
def test_statements_train_like_nonlins_at_finite_width_and_in_the_limit(param: str) -> None:
    a, b = both(param, TRAINING)
    for k, v in tpc.run(a, 32, 2).items():
        np.testing.assert_array_equal(tpc.run(b, 32, 2)[k].values, v.values)
    la, lb = tpc.limit(a, particles=2**12, replicates=2), tpc.limit(b, particles=2**12, replicates=2)
    for k in la:
        np.testing.assert_array_equal(lb[k].value, la[k].value)


def test_statements_give_the_kernels_and_the_emitted_torch_of_nonlins() -> None:
    a, b = both("ntk", KERNELS)
    la, lb = tpc.limit(a), tpc.limit(b)
    for k in ("nngp", "ntk"):
        np.testing.assert_array_equal(lb[k].value, la[k].value)
    a, b = both("mup", TRAINING)
    assert tpc.torch_source(a) == tpc.torch_source(b)


def test_the_program_graph_names_the_models_values() -> None:
    _, b = both("mup", TRAINING)
    g = program_graph(b)
    model = next(n for n, d in g.nodes(data=True) if d["op"] == "model")
    body = g.nodes[model]["body"]
    names = {d["name"]: n for n, d in body.nodes(data=True)}
    assert {"h0", "h1", "h2", "f(x)"} <= set(names)
    assert names["h0"] in body.predecessors(names["h1"]) and body.nodes[names["h0"]]["text"] == "U @ x"


def test_tpc_graph_lists_the_statements_names(capsys: pytest.CaptureFixture[str]) -> None:
    from tpc.cli import main

    assert main(["graph", str(ROOT / "programs" / "arch" / "resnet_ln.tp")]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    named = {words[1]: words[3:6] for words in lines if len(words) > 5 and words[2] == "="}
    assert named["h0"][:2] == ["U", "X"] and named["h1"][:2] == ["h0", "+"] and named["h4"][:2] == ["h3", "+"]


def test_the_bundled_residual_network_reads_as_statements(monkeypatch: pytest.MonkeyPatch) -> None:
    """programs/arch/resnet_ln.tp is written with statements; its kernels are those of the same
    network written with `nonlin` blocks (closed forms, checked against Monte Carlo in test_arch.py)."""
    src = (ROOT / "programs" / "arch" / "resnet_ln.tp").read_text()
    assert "model f(x) {" in src and "return V @ layernorm(h4)" in src
    head, _, rest = src.partition("model f(x) {")
    tail = rest.partition("}\n")[2]
    blocks = "".join(f"nonlin b{i}(h) = h + 0.5 * W{i} @ relu(layernorm(h))\n" for i in range(1, 5))
    monkeypatch.chdir(ROOT / "programs" / "arch")  # its data, relative to the program's folder
    old = tpc.loads(head + blocks + "model f(x) = V @ layernorm(b4(b3(b2(b1(U @ x)))))\n" + tail)
    new = tpc.load(ROOT / "programs" / "arch" / "resnet_ln.tp")
    assert steps(old) == steps(new)
    lo, ln = tpc.limit(old), tpc.limit(new)
    for k in lo:
        np.testing.assert_array_equal(ln[k].value, lo[k].value)


@pytest.mark.parametrize(("body", "says"), [
    ("h = relu(U @ x)\n  h = relu(W1 @ h)\n  return V @ h", "'h' is already defined (first defined at line 11)"),
    ("h = relu(U @ x)\n  z = W1 @ h\n  return V @ relu(W2 @ h)", "'z' is not used by the model's output"),
    ("k = 2\n  return V @ relu(W1 @ relu(U @ x))", "'k' is not used by the model's output"),
    ("X = relu(U @ x)\n  return V @ X", "'X' is already defined (first defined at line 3)"),
    ("x = relu(U @ x)\n  return V @ x", "'x' already names the model, its input"),
    ("h = relu(U @ x)\n  V @ relu(W1 @ h)", "then `return expression`"),
    # (from a review) a built-in's name; a statement that only renames; a misspelt or later name
    ("relu = tanh(U @ x)\n  return V @ relu(relu)", "'relu' is a built-in function"),
    ("y = x\n  return V @ relu(U @ x)", "'y' is not used by the model's output"),
    ("h = relu(U @ x)\n  g = h\n  return V @ relu(W1 @ h)", "'g' is not used by the model's output"),
    ("hidden = relu(U @ x)\n  return V @ hiden", "did you mean 'hidden'?"),
    ("h = relu(W1 @ g)\n  g = relu(U @ x)\n  return V @ h", "'g' is used before the statement that defines it"),
])
def test_a_bad_model_body_is_refused_at_its_line(body: str, says: str) -> None:
    src = HEADER.format(param="mup") + "model f(x) {\n  " + body + "\n}\noutput p = f(Xt)\n"
    with pytest.raises(TpcError) as err:
        tpc.loads(src)
    assert says in err.value.render()


def test_an_unclosed_model_body_says_so() -> None:
    src = HEADER.format(param="mup") + "model f(x) {\n  h = relu(U @ x)\n  return V @ h\n"
    with pytest.raises(TpcError, match="syntax error") as err:
        tpc.loads(src)
    assert "a model's body ends with '}'" in err.value.render()


def test_generated_step_names_never_take_a_statements_name() -> None:
    """(From a review.) A step the body did not name is h<k>, unless the body calls another step h<k>."""
    body = "model f(x) {\n  h3 = U @ x\n  return V @ relu(W2 @ relu(W1 @ tanh(h3)))\n}\n"
    net = tpc.loads(HEADER.format(param="mup") + body + "output p = f(Xt)\n")
    shown = [net.model.step_name(k) for k in range(len(net.model.steps) - 1)]
    assert shown.count("h3") == 1 and "_h3" in shown and len(set(shown)) == len(shown)
    body = next(d for _, d in program_graph(net).nodes(data=True) if d["op"] == "model")["body"]
    texts = {d["name"]: d["text"] for _, d in body.nodes(data=True)}
    assert texts["h3"] == "U @ x" and texts["_h3"] == "W1 @ h2"
