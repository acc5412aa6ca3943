"""The program graph (tpc/train/graph.py): a network program, its model and its training loops as one
networkx DiGraph, a loop a node whose body is a graph of its own; and its JSON and DOT exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import networkx as nx
import pytest

import tpc
from tpc.cli import main
from tpc.train.graph import program_graph, to_dot

ROOT = Path(__file__).resolve().parent.parent
HEADER = """width n
parametrization mup
data X = [[1, 0.5], [-0.3, 0.8], [0.2, -1], [0.9, 0.1], [-0.5, -0.5]]
data Y = [1, -1, 1, 1, -1]
data Xt = [[0.4, 0.4], [-1, 0.2]]
layer U : input n x 2
layer W : hidden n x n
layer V : readout 1 x n
model f(x) = V @ tanh(W @ tanh(U @ x))
"""


def named(g: nx.DiGraph, op: str, name: str | None = None) -> list[int]:
    return [n for n, d in g.nodes(data=True) if d["op"] == op and (name is None or d["name"] == name)]


def one(g: nx.DiGraph, op: str, name: str | None = None) -> int:
    found = named(g, op, name)
    assert len(found) == 1, (op, name, found)
    return found[0]


def graphs(g: nx.DiGraph) -> list[nx.DiGraph]:
    """g and every body in it."""
    out = [g]
    for _, d in g.nodes(data=True):
        if "body" in d:
            out += graphs(d["body"])
    return out


def check_well_formed(g: nx.DiGraph) -> None:
    """Every graph a DAG whose edges run to larger ids; ids unique across bodies; a body's nodes
    numbered after the node holding it; every `in` node standing for a node of an enclosing graph."""
    seen: set[int] = set()

    def visit(graph: nx.DiGraph, enclosing: set[int], owner: int) -> None:
        assert nx.is_directed_acyclic_graph(graph)
        assert all(a < b for a, b in graph.edges)
        assert not seen & set(graph.nodes)
        seen.update(graph.nodes)
        assert all(n > owner for n in graph.nodes)
        for n, d in graph.nodes(data=True):
            if "outer" in d:
                assert d["op"] == "in" and d["outer"] in enclosing and d["outer"] < n
            if "body" in d:
                inputs = {b["outer"] for _, b in d["body"].nodes(data=True) if "outer" in b}
                if d["op"] == "loop":  # a loop's inputs are exactly what its body reads from outside
                    assert inputs == set(graph.predecessors(n))
                visit(d["body"], enclosing | set(graph.nodes), n)

    visit(g, set(), -1)


def test_a_loop_is_a_node_whose_body_reads_the_layers_and_carries_them_to_the_outputs() -> None:
    net = tpc.load(ROOT / "programs" / "train" / "momentum_relu2_mup.tp")
    g = net.graph
    check_well_formed(g)
    layers = {g.nodes[n]["name"]: n for n in named(g, "layer")}
    assert set(layers) == {"U", "W", "V"}
    loop = one(g, "loop")
    state = one(g, "state", "M")
    reads = set(g.predecessors(loop))
    assert set(layers.values()) | {state, one(g, "data", "X"), one(g, "data", "Y"), one(g, "model", "f")} == reads
    body = g.nodes[loop]["body"]
    assert g.nodes[loop]["trip"] == 6 and g.nodes[loop]["counter"] == "t"
    assert sorted(g.nodes[loop]["carries"]) == ["M", "U", "V", "W", "loss"]
    # inside: the velocity's update reads the gradient and the state's value coming in; f's update reads M's
    grad, update_m, update_f = one(body, "grad"), one(body, "update", "M"), one(body, "update", "f")
    assert grad in body.predecessors(update_m) and update_m in body.predecessors(update_f)
    assert body.nodes[grad]["kind"] == "params" and body.nodes[one(body, "loss", "L")]["kind"] == "finite"
    m_in = one(body, "in", "M")
    assert body.nodes[m_in]["outer"] == state and m_in in body.predecessors(update_m)
    assert {body.nodes[n]["outer"] for n in body.predecessors(update_f) if body.nodes[n]["op"] == "in"} == \
        set(layers.values())
    # after the loop: the predictions read the loop (the trained layers), the curve its record
    pred, curve, move = one(g, "output", "pred"), one(g, "output", "curve"), one(g, "output", "move")
    assert loop in g.predecessors(pred) and not set(layers.values()) & set(g.predecessors(pred))
    assert list(g.predecessors(curve)) == [loop]
    assert set(layers.values()) < set(g.predecessors(move))  # the features at initialisation too
    assert set(layers.values()) | {loop, state} <= nx.ancestors(g, pred)


def test_nested_loops_carry_what_their_bodies_change() -> None:
    """First-order MAML written as loops: the task loop carries the meta-gradient G out of its body, the
    inner loop the copy's layers; the meta-update reads the task loop."""
    net = tpc.loads(HEADER + """for t in range(3) {
  state G = zeros(f)
  for k in range(2) {
    copy g = f
    for s in range(2) { g -= 0.3 * grad(mse(g(batch(X, t + k, 2)), batch(Y, t + k, 2)), g) }
    G += grad(mse(g(batch(X, t + k + 2, 3)), batch(Y, t + k + 2, 3)), g)
    record q = mse(g(X), Y)
  }
  f -= 0.2 * G
}
output p = f(Xt)
output q = q
""")
    g = program_graph(net)
    check_well_formed(g)
    outer = one(g, "loop")
    body = g.nodes[outer]["body"]
    tasks = one(body, "loop")
    state = one(body, "state", "G")
    assert state in body.predecessors(tasks)  # the task loop reads G ...
    assert tasks in body.predecessors(one(body, "update", "f"))  # ... and the meta-update reads what it carried
    inner = body.nodes[tasks]["body"]
    copy, adapt = one(inner, "copy", "g"), one(inner, "loop")
    assert copy in inner.predecessors(adapt)
    assert adapt in nx.ancestors(inner, one(inner, "update", "G"))  # the query gradient at the adapted copy
    # the copy reads f's layers coming in through both loops; G is declared in the outer body: not carried out
    assert {inner.nodes[n]["outer"] for n in inner.predecessors(copy)} <= set(body.nodes)
    assert sorted(g.nodes[outer]["carries"]) == ["U", "V", "W", "q"]  # not G (it is declared in the body) nor g
    assert sorted(body.nodes[tasks]["carries"]) == ["G", "q"]  # not g: a copy made in its body
    assert list(g.predecessors(one(g, "output", "q"))) == [outer]  # a nested record comes out of both loops


def test_two_phases_run_one_after_the_other() -> None:
    g = tpc.load(ROOT / "programs" / "train" / "two_phase_linear_mup.tp").graph
    check_well_formed(g)
    first, second = named(g, "loop")
    assert first in g.predecessors(second)
    readout = one(g, "layer", "V")
    # the first phase trains only the readout: the second reads V from it, the other layers from their start
    assert readout not in g.predecessors(second)
    assert {n for n in g.predecessors(second) if g.nodes[n]["op"] == "layer"} == \
        set(named(g, "layer")) - {readout}


def test_word2vec_loop_reads_its_stream_and_updates_its_tables() -> None:
    g = tpc.load(ROOT / "programs" / "word2vec" / "cbow_loop_mup.tp").graph
    check_well_formed(g)
    loop = one(g, "loop")
    body = g.nodes[loop]["body"]
    stream = one(body, "stream")
    tokens = [n for n in body.predecessors(stream) if body.nodes[n]["op"] == "in"]
    assert [g.nodes[body.nodes[n]["outer"]]["op"] for n in tokens] == ["data"]
    assert len(named(body, "scatter_add")) == 2
    assert all(loop in g.predecessors(o) for o in named(g, "output") if g.nodes[o]["text"].startswith("output emb"))


def dot_ok(text: str) -> str:
    """One digraph whose edges join declared nodes, clipped at clusters that exist; its text."""
    assert text.count("digraph ") == 1 and text.count("{") == text.count("}")
    declared = set(re.findall(r"^\s*(\w+) \[label=", text, re.M))
    clusters = set(re.findall(r"subgraph (cluster_\w+) \{", text))
    for src, dst, attrs in re.findall(r"^\s*(\w+) -> (\w+)(.*);$", text, re.M):
        assert src in declared and dst in declared, (src, dst)
        for clip in re.findall(r"l(?:head|tail)=(cluster_\w+)", attrs):
            assert clip in clusters
    return text


def test_json_and_dot_export_the_one_graph(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(ROOT / "programs" / "train" / "momentum_relu2_mup.tp")
    assert main(["graph", path, "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {n["instruction"] for n in doc["nodes"]} >= {"MatMul", "A-var"}  # the Netsor program at init, as before
    nodes = {n["id"]: n for n in doc["program"]}
    loop = next(n for n in doc["program"] if n["op"] == "loop")
    assert {nodes[i]["name"] for i in loop["inputs"]} == {"X", "Y", "U", "W", "V", "f", "M"}
    ins = [b for b in loop["body"] if b["op"] == "in"]
    assert {b["outer"] for b in ins} == set(loop["inputs"])
    assert all("line" in b for b in loop["body"] if b["op"] != "in")
    assert main(["graph", path, "--format", "dot"]) == 0
    out = dot_ok(capsys.readouterr().out)
    assert f"subgraph cluster_{loop['id']} {{" in out and "subgraph cluster_initialisation {" in out
    assert "style=dashed" in out  # the loop's inputs, drawn where they enter its body


@pytest.mark.parametrize("path", sorted((ROOT / "programs").glob("*/*.tp")), ids=lambda p: p.name)
def test_every_bundled_network_program_has_a_well_formed_graph(path: Path) -> None:
    prog = tpc.load(path)
    if not hasattr(prog, "layers"):  # a raw Netsor program: its graph is the Program's (tpc/ir.py)
        return
    g = prog.graph
    check_well_formed(g)
    assert len(named(g, "output")) == len(prog.outputs)
    dot_ok(to_dot(g))


def test_user_text_in_dot_is_escaped() -> None:
    """A name is an identifier, but data paths and texts can hold quotes and backslashes."""
    net = tpc.loads(HEADER + 'output p = f(Xt)\n')
    g = program_graph(net)
    g.nodes[one(g, "output", "p")]["text"] = 'say "hi" \\ bye'
    assert '#' in dot_ok(to_dot(g)) and 'say \\"hi\\" \\\\ bye' in to_dot(g)


def test_a_loss_the_user_wrote_reads_its_data_and_reads_as_written() -> None:
    """(Found by the fuzz: a user loss's arguments start with the model's place, which is no data set.)"""
    net = tpc.loads(HEADER + "loss L = mean((f(X) - Y)^2) / 2   # halved\n"
                    "train sgd(lr = 0.5, steps = 2) minimize L\noutput curve = history(L)\n")
    g = program_graph(net)
    check_well_formed(g)
    loss = one(g, "loss", "L")
    assert g.nodes[loss]["text"] == "mean((f(X) - Y)^2) / 2"
    assert {g.nodes[n]["name"] for n in g.predecessors(loss) if g.nodes[n]["op"] == "data"} == {"X", "Y"}
    assert loss in nx.ancestors(g, one(g, "output", "curve"))


def test_review_findings_names_assignments_and_comments() -> None:
    """(From a review.) A body's input for a value of the enclosing body takes that value's name;
    `M = ...` does not read M's old value; a loss's text leaves out comments."""
    net = tpc.loads(HEADER + """loss Q = mean((f(X) - Y)^2 +   # a "quoted" \\ comment
    0 * f(X))
state M = zeros(V)
for t in range(2) {
  L = mse(f(X), Y)
  c = 0.5 * L
  for s in range(2) { record r = c }
  M = grad(L, V)
  V -= 0.1 * M
}
output r = r
""")
    g = program_graph(net)
    check_well_formed(g)
    assert g.nodes[one(g, "loss", "Q")]["text"] == "mean((f(X) - Y)^2 + 0 * f(X))"
    loop = one(g, "loop")
    body = g.nodes[loop]["body"]
    inner = body.nodes[one(body, "loop")]["body"]
    assert body.nodes[one(body, "fn", "c")] and one(inner, "in", "c") is not None
    assert one(g, "state", "M") not in g.predecessors(loop)  # M's old value is never read
