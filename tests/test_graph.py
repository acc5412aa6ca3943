"""Parsing and the instruction graph."""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import numpy as np
import torch

import tpc
from tpc.ir import print_program, to_dot, to_json
from tpc.ops import expr as ex
from tpc.syntax import BinOp, Call, parse

ROOT = Path(__file__).resolve().parent.parent


def test_precedence_of_matmul() -> None:
    mod = parse("width n\nx = 2 * W @ y / sqrt(n)\n")
    stmt = mod.statements[1]
    # 2 * (W @ y) / sqrt(n) == ((2 * (W @ y)) / sqrt(n))
    assert isinstance(stmt.value, BinOp) and stmt.value.op == "/"
    left = stmt.value.left
    assert left.op == "*" and left.right.op == "@"
    assert isinstance(stmt.value.right, Call)


def test_free_form_statements_and_comments() -> None:
    prog = tpc.loads("width n  vector a ~ N(0, 2) # a comment\noutput m = mean(a*a)  output k = 3 * mean(a * a)")
    assert list(prog.outputs) == ["m", "k"]
    assert float(tpc.limit(prog)["k"].value) == 6.0


def test_inline_data_and_user_nonlin() -> None:
    prog = tpc.loads(
        "width n\ndata X = [[1, 0], [0, -2.5]]\ndim d = 2\nnonlin leaky(x; a) = relu(x) - a * relu(-x)\n"
        "matrix U : n x d ~ N(0, 1)\nh = leaky(U @ X, 0.1)\noutput g = gram(h)\n"
    )
    x = prog.node(prog.outputs["g"])
    assert x.op == "gram" and x.shape == (2, 2)
    nonlin = [n for n in prog.nodes() if n.op == "nonlin"][0]
    assert nonlin.name == "h"
    assert ex.render(nonlin.params["tree"], ["h0"]) == "relu(h0) - 0.1 * relu(-h0)"


def test_graph_structure_of_relu_mlp() -> None:
    prog = tpc.load(ROOT / "programs" / "kernels" / "relu_mlp.tp")
    g = prog.graph
    assert isinstance(g, nx.DiGraph) and nx.is_directed_acyclic_graph(g)
    assert list(g.nodes) == list(range(g.number_of_nodes()))
    forward = [prog.node(i) for i in g.nodes if not prog.node(i).params.get("derived")]
    ops = [n.op for n in forward]
    # 3 MatMul, 3 Nonlin, the readout; the ntk output is a Nonlin of the backward program's kernels
    assert ops.count("matmul") == 3 and ops.count("nonlin") == 4 and ops.count("readout") == 1
    backward = [prog.node(i) for i in g.nodes if prog.node(i).params.get("derived")]
    assert sum(n.op == "matmul" and n.params["transposed"] for n in backward) == 2  # W3.T, W2.T
    for node in prog.nodes():
        # inputs in order, mirrored by edges with their position
        for pos, src in enumerate(node.inputs):
            assert pos in g.edges[src, node.id]["pos"]
        assert node.span is not None
    x3 = next(n for n in prog.nodes() if n.name == "x3")
    assert x3.kind == "vector" and x3.shape == (8,) and x3.span.line == 15
    out = prog.node(prog.outputs["nngp"])
    assert out.op == "cov" and out.shape == (8, 8) and out.kind == "scalar"


def test_printers_are_deterministic() -> None:
    path = ROOT / "programs" / "kernels" / "relu_mlp.tp"
    a, b = tpc.load(path), tpc.load(path)
    assert print_program(a) == print_program(b)
    assert to_dot(a) == to_dot(b)
    text = print_program(a)
    assert "MatMul" in text and "Nonlin" in text and "x2   = relu(" in text
    js = to_json(a)
    assert [n["id"] for n in js["nodes"]] == list(range(len(js["nodes"])))
    assert js["outputs"] == {"nngp": a.outputs["nngp"], "ntk": a.outputs["ntk"]}


def test_torch_module_is_an_nn_module_and_matches_run() -> None:
    prog = tpc.load(ROOT / "programs" / "kernels" / "erf_mlp.tp")
    module = tpc.torch_module(prog, width=64, seeds=[0, 1])
    assert isinstance(module, torch.nn.Module)
    names = {name for name, _ in module.named_parameters()}
    assert {"U", "W2", "v"} <= names
    assert module.W2.shape == (2, 64, 64)
    out = module()["nngp"].detach().numpy()
    np.testing.assert_array_equal(out, tpc.run(prog, 64, 2)["nngp"].values)


def test_emitted_source_is_readable_python() -> None:
    prog = tpc.load(ROOT / "programs" / "kernels" / "relu_mlp.tp")
    src = tpc.torch_source(prog)
    compile(src, "<test>", "exec")
    assert "class TensorProgram(torch.nn.Module):" in src
    assert "x2 = check(torch.relu(" in src
    # the data are forward()'s arguments, and the file needs nothing of tpc
    assert "def forward(self, X: torch.Tensor | None = None)" in src
    assert "import tpc" not in src and "from tpc" not in src


def test_width_agnostic_program_name() -> None:
    prog = tpc.loads("width m\nmatrix W : m x m ~ N(0, 1/m)\nvector v ~ N(0, 1)\noutput q = mean((W @ v)^2)\n")
    assert prog.width_name == "m"
    assert float(tpc.limit(prog)["q"].value) == 1.0


def test_readout_matrix_and_moment_readout() -> None:
    """A k x n readout matrix scaled through its variance (N(0, 1/n), no 1/sqrt(n) in the
    expression) and a 1/n readout, at finite width and in the limit."""
    src = (
        "width n\ndata X = [[1, 0], [0.6, 0.8]]\nmatrix U : n x 2 ~ N(0, 1)\nmatrix V : 3 x n ~ N(0, 2/n)\n"
        "vector w ~ N(0.5, 1)\nh = tanh(U @ X)\nf = V @ h\noutput k = cov(f)\noutput m = w @ h / n\n"
    )
    prog = tpc.loads(src)
    lim = tpc.limit(prog)
    assert lim["k"].value.shape == (2, 3, 2, 3)
    fin = tpc.run(prog, 4096, 8)
    assert fin["k"].values.shape == (8, 2, 3, 2, 3)
    assert np.all(np.abs(fin["k"].mean - lim["k"].value) < 5 * fin["k"].stderr + 1e-3)
    # the readout rows are independent: zero covariance across rows, in both backends
    assert lim["k"].value[0, 0, 0, 1] == 0 and np.all(fin["k"].values[:, 0, 0, 0, 1] == 0)
    # mean(w * tanh(u)) = 0.5 E tanh(u) = 0 for centred u
    assert np.allclose(lim["m"].value, 0.0, atol=1e-12)
    assert np.all(np.abs(fin["m"].mean) < 5 * fin["m"].stderr + 1e-3)


def test_numerical_trouble_names_the_instruction(capsys) -> None:  # noqa: ANN001
    prog = tpc.loads("width n\nvector v ~ N(0, 1)\ny = log(v)\noutput m = mean(y)\n", "bad.tp")
    import pytest

    with pytest.raises(tpc.NumericalError, match="y \\(line 3\\)"):
        tpc.run(prog, 64, 2)
    with pytest.raises(tpc.NumericalError) as err:
        tpc.limit(prog)
    assert "bad.tp:4" in err.value.render() and "not finite" in err.value.render()
