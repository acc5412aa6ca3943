"""The Program: Netsor instructions and their edges (as a networkx DiGraph: `Program.graph`), its
verifier and its printers.

Node ids are consecutive integers in creation order, which is a topological order, so every
printout and export is deterministic. Each node carries:
  op      the instruction (see tpc.ops.instructions): data, matrix, vector, matmul, nonlin,
          moment, gram, readout, cov
  inputs  the input node ids, in order (edges carry their positions as `pos`, a tuple)
  kind    'scalar' (finite, deterministic in the limit), 'vector' (an n-vector, or a batch of
          them), 'matrix' (an initial matrix) or 'gaussian' (a readout that is a Gaussian random
          scalar in the limit)
  shape   the finite shape: the batch shape of a vector, the shape of a scalar
  name    the program's name for it, or a generated one (`_t3`) for intermediate values
  span    where it came from in the source
  params  op-specific data (a Nonlin's expression tree, a matrix's variance, ...)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from tpc.errors import Span
from tpc.ops import expr as ex
from tpc.ops.instructions import INSTRUCTIONS

if TYPE_CHECKING:
    import networkx as nx
    import torch


@dataclass
class Node:
    id: int
    op: str
    inputs: tuple[int, ...]
    kind: str
    shape: tuple[int, ...]
    name: str
    span: Span | None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class VectorGroup:
    """Initial vectors declared together: iid over coordinates, jointly Gaussian across members."""

    members: tuple[int, ...]  # node ids
    mean: np.ndarray  # (k,)
    cov: np.ndarray  # (k, k)


@dataclass
class Program:
    """The instructions in creation order (ids 0, 1, ...: a topological order) with their edges.
    `graph` is the same program as a networkx DiGraph (node attribute `node`, edge attribute `pos`),
    built when first asked for: building and checking a program needs no networkx (its import is a
    third of a fresh `tpc check`)."""

    filename: str
    source: str
    width_name: str = "n"
    outputs: dict[str, int] = field(default_factory=dict)
    groups: list[VectorGroup] = field(default_factory=list)
    _nodes: list[Node] = field(default_factory=list, repr=False)
    # src -> {dst: positions of src among dst's inputs}; an input used twice (cov(f, f)) is one edge
    _succ: dict[int, dict[int, tuple[int, ...]]] = field(default_factory=dict, repr=False)
    _graph: Any = field(default=None, repr=False)

    # --- construction
    def add(self, op: str, inputs: tuple[int, ...], kind: str, shape: tuple[int, ...],
            name: str | None, span: Span | None, **params: Any) -> Node:
        nid = len(self._nodes)
        node = Node(nid, op, tuple(inputs), kind, tuple(shape), name or f"_t{nid}", span, params)
        self._nodes.append(node)
        self._succ[nid] = {}
        for pos, src in enumerate(inputs):
            self._succ[src][nid] = self._succ[src].get(nid, ()) + (pos,)
        self._graph = None  # a view built earlier is out of date
        return node

    def instruction(self, op: str, inputs: tuple[int, ...], name: str | None, span: Span | None,
                    **params: Any) -> Node:
        """A node whose kind and shape are the ones its instruction's rules give (tpc.ops.instructions)."""
        spec = INSTRUCTIONS[op]
        inputs = tuple(inputs)
        return self.add(op, inputs, spec.kind_of(self, inputs), spec.shape(self, inputs, params), name, span,
                        **params)

    # --- access
    @property
    def graph(self) -> nx.DiGraph:
        """The program as a networkx DiGraph (built on first use, then kept until the next add)."""
        if self._graph is None:
            import networkx as nx

            g = nx.DiGraph()
            for node in self._nodes:
                g.add_node(node.id, node=node)
            for src, succ in self._succ.items():
                for dst, pos in succ.items():
                    g.add_edge(src, dst, pos=pos)
            self._graph = g
        return self._graph

    def node(self, nid: int) -> Node:
        return self._nodes[nid]

    def nodes(self) -> list[Node]:
        return list(self._nodes)

    def successors(self, nid: int) -> list[int]:
        """The instructions that use `nid`, in order."""
        return sorted(self._succ[nid])

    def edges(self) -> list[tuple[int, int, tuple[int, ...]]]:
        """(src, dst, positions of src among dst's inputs), in order."""
        return sorted((src, dst, pos) for src, succ in self._succ.items() for dst, pos in succ.items())

    def needed(self) -> list[Node]:
        """Nodes the outputs depend on, in order (dead code removed)."""
        keep: set[int] = set()
        for nid in self.outputs.values():
            keep |= self.ancestors(nid) | {nid}
        return [n for n in self._nodes if n.id in keep]

    def ancestors(self, nid: int) -> set[int]:
        """Every node that `nid` depends on."""
        seen: set[int] = set()
        stack = list(self._nodes[nid].inputs)
        while stack:
            i = stack.pop()
            if i not in seen:
                seen.add(i)
                stack.extend(self._nodes[i].inputs)
        return seen

    def group_of(self, nid: int) -> tuple[int, VectorGroup]:
        for gi, group in enumerate(self.groups):
            if nid in group.members:
                return gi, group
        raise KeyError(nid)

    def verify(self) -> None:
        """Internal consistency: ids are positions, inputs precede their users (so creation order is
        a topological order and the graph is acyclic), edges match inputs, and each node has the kind
        and shape that its instruction's rules give."""
        for i, node in enumerate(self._nodes):
            assert node.id == i, f"node {node.id} at position {i}"
            for pos, src in enumerate(node.inputs):
                assert src < node.id, f"node {node.id} uses later node {src}"
                assert pos in self._succ[src][node.id]
            spec = INSTRUCTIONS[node.op]
            assert node.kind == spec.kind_of(self, node.inputs), f"node {node.id} ({node.op}) is a {node.kind}"
            shape = spec.shape(self, node.inputs, node.params)
            assert node.shape == shape, f"node {node.id} ({node.op}) has shape {node.shape}, its rule {shape}"
        assert all(src < dst for src, dst, _ in self.edges()), "an edge runs backward"


def data_value(prog: Program, node: Node) -> np.ndarray:
    """A data node's array. The Gram `A B^T` of its two data inputs (`gram`: autodiff's term for an
    input layer in the NTK, N x N) is not stored in the program but formed here, when a backend
    asks; the limit instead shares the covariance of `U x`, the same product."""
    if node.params.get("gram"):
        import torch

        a, b = (torch.from_numpy(np.ascontiguousarray(data_value(prog, prog.node(i)), dtype=np.float64))
                for i in node.inputs)
        return rows_gram(a, b).numpy()
    return node.params["value"]


def rows_gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A B^T over the last axis, rows against rows. By torch: numpy's BLAS threads contend with
    torch's on a small machine (0.2-1 s at N = 4000)."""
    import torch

    return torch.tensordot(a, b, dims=([-1], [-1]))


def readout_weights(prog: Program, f: Node, g: Node) -> tuple[float, int | None] | None:
    """For readouts f = c_f v.x / sqrt(n) and g = c_g w.y / sqrt(n): (s, k) with
    Cov(f, g) = s (x.y)/n, times the identity over the k rows of a readout matrix (k None for
    vectors); None when v and w are independent. Both backends use it."""
    v, w = prog.node(f.inputs[0]), prog.node(g.inputs[0])
    coef = f.params["coef"] * g.params["coef"]
    if v.op == "matrix" or w.op == "matrix":
        return (coef * v.params["var"], v.params["rows"]) if v.id == w.id else None
    gi, group = prog.group_of(v.id)
    gj, _ = prog.group_of(w.id)
    if gi != gj:
        return None
    return coef * float(group.cov[group.members.index(v.id), group.members.index(w.id)]), None


# ---------------------------------------------------------------------------- printing

def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape) if shape else "1"


def _fmt(x: float) -> str:
    return f"{x:g}"


def describe(prog: Program, node: Node) -> str:
    """The right-hand side of an instruction, written the way the papers write it (its `text` rule,
    unless the node carries its own text)."""
    return node.params.get("text") or INSTRUCTIONS[node.op].text(prog, node)


# the text of each instruction (`text` in tpc/ops/instructions.py)
def _names(prog: Program, node: Node) -> list[str]:
    return [prog.node(i).name for i in node.inputs]


def _text_data(prog: Program, node: Node) -> str:
    source = node.params.get("source")
    return f"data {_shape_text(node.shape)}" + (f" from {source}" if source else "")


def _text_matrix(prog: Program, node: Node) -> str:
    p, n = node.params, prog.width_name
    rows = n if p["rows"] == "n" else p["rows"]
    cols = n if p["cols"] == "n" else p["cols"]
    return f"{p['role']} matrix {rows} x {cols}, entries N(0, {p['var_text']})"


def _text_vector(prog: Program, node: Node) -> str:
    gi, group = prog.group_of(node.id)
    k = group.members.index(node.id)
    return f"initial vector, coordinates N({_fmt(group.mean[k])}, {_fmt(group.cov[k, k])})" + (
        f", group {gi}" if len(group.members) > 1 else ""
    )


def _text_matmul(prog: Program, node: Node) -> str:
    names = _names(prog, node)
    return f"{names[0]}{'.T' if node.params.get('transposed') else ''} {names[1]}"


def _text_nonlin(prog: Program, node: Node) -> str:
    return ex.render(node.params["tree"], _names(prog, node))


def _text_moment(prog: Program, node: Node) -> str:
    return f"mean({ex.render(node.params['tree'], _names(prog, node))})"


def _text_gram(prog: Program, node: Node) -> str:
    return "gram({}, {})".format(*_names(prog, node))


def _text_readout(prog: Program, node: Node) -> str:
    p, n, names = node.params, prog.width_name, _names(prog, node)
    scale = {-0.5: f"/ sqrt({n})", -1.0: f"/ {n}"}.get(p["exponent"], f"* {n}^{p['exponent']}")
    coef = "" if p["coef"] == 1.0 else f"{_fmt(p['coef'])} * "
    return f"{coef}{names[0]} . {names[1]} {scale}"


def _text_cov(prog: Program, node: Node) -> str:
    return "cov({}, {})".format(*_names(prog, node))


def print_program(prog: Program, backward: bool = False) -> str:
    """Numbered instructions; those derived by autodiff only with `backward`."""
    rows = []
    hidden = 0
    for node in prog.nodes():
        if node.params.get("derived") and not backward:
            hidden += 1
            continue
        spec = INSTRUCTIONS[node.op]
        kind = {"scalar": "scalar", "vector": "vector", "matrix": "", "gaussian": "Gaussian scalar"}[
            node.kind
        ]
        shape = f"[{_shape_text(node.shape)}]" if node.shape else ""
        sep = ":" if spec.initial else "="  # given, not computed
        rows.append((str(node.id), node.name, sep, describe(prog, node), spec.tag, f"{kind} {shape}".strip()))
    widths = [max(len(r[i]) for r in rows) for i in range(6)] if rows else [0] * 6
    lines = [f"# {prog.filename}: width {prog.width_name}, {len(rows)} instructions"
             + (" (forward and backward)" if backward and hidden == 0 and any(
                 n.params.get("derived") for n in prog.nodes()) else "")]
    for r in rows:
        lines.append(
            f"{r[0]:>{widths[0]}}  {r[1]:<{widths[1]}} {r[2]} {r[3]:<{widths[3]}}  {r[4]:<{widths[4]}}  {r[5]}".rstrip()
        )
    if hidden:
        lines.append(f"   ({hidden} backward instructions derived by autodiff: tpc graph --backward)")
    lines.append("outputs: " + ", ".join(f"{k} (= {prog.node(v).name}, #{v})" for k, v in prog.outputs.items()))
    return "\n".join(lines)


def to_json(prog: Program) -> dict[str, Any]:
    nodes = []
    for node in prog.nodes():
        item: dict[str, Any] = {
            "id": node.id,
            "op": node.op,
            "instruction": INSTRUCTIONS[node.op].tag,
            "name": node.name,
            "inputs": list(node.inputs),
            "kind": node.kind,
            "shape": list(node.shape),
            "text": describe(prog, node),
            "derived": bool(node.params.get("derived")),
        }
        if node.params.get("transposed"):  # W.T x: the same matrix, transposed
            item["transposed"] = True
        if node.span is not None:
            item["span"] = {"line": node.span.line, "column": node.span.column,
                            "end_line": node.span.end_line, "end_column": node.span.end_column}
        nodes.append(item)
    return {"file": prog.filename, "width": prog.width_name, "nodes": nodes, "outputs": prog.outputs}


def to_dot(prog: Program, backward: bool = False) -> str:
    """Graphviz DOT; like the text listing, the backward instructions only with `backward`."""
    return "\n".join(["digraph tpc {", "  rankdir=TB;", '  node [shape=box, fontname="monospace"];',
                      *dot_lines(prog, backward), "}"])


def dot_lines(prog: Program, backward: bool = False, indent: str = "  ") -> list[str]:
    """The DOT lines of the nodes (`n<id>`) and edges, to put in a digraph or in a cluster of one."""
    lines = []
    outs = set(prog.outputs.values())
    shown = {n.id for n in prog.nodes() if backward or not n.params.get("derived")}
    for node in prog.nodes():
        if node.id not in shown:
            continue
        spec = INSTRUCTIONS[node.op]
        text = f"{node.name} = {describe(prog, node)}".replace("\\", "\\\\").replace('"', '\\"')
        label = f"{text}\\n{spec.tag}"  # user text escaped for DOT (a path may hold either)
        style = ', peripheries=2' if node.id in outs else ""
        lines.append(f'{indent}n{node.id} [label="{label}", style=filled, fillcolor={spec.color}{style}];')
    for src, dst, pos in prog.edges():
        if src not in shown or dst not in shown:
            continue
        label = ",".join(str(p) for p in pos)
        lines.append(f'{indent}n{src} -> n{dst} [label="{label}"];')
    return lines


def dumps_json(prog: Program) -> str:
    return json.dumps(to_json(prog), indent=2)
