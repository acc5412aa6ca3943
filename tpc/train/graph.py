"""A network program as one dataflow graph (networkx): its data, layers, losses, model, training and
outputs, where the model and every loop are nodes whose `body` is a graph of their own.

This is the shape of JAX's `scan` and `call`, which carry a body jaxpr: a body is closed. What it
reads from outside comes in through its `in` nodes (a layer's current value, a data set, a value of
an enclosing body), each naming the outer node it stands for (`outer`), and the node that holds
the body (the model or the loop) has those outer nodes as its inputs. Layers and states change,
so a name stands for its latest value: after `f -= e` the layers of f are that update's value, and
after a loop every layer and state its body changes is the loop's value (what it carries), as are
its records. So `nx.ancestors(g, node)` of an output after training reaches the loops that made it,
and those loops' inputs reach the layers at initialisation and the data.

Node attributes: `op` (the instruction: `data`, `layer`, `loss`, `model` and `output` for the
declarations, a model step's op (tpc/train/steps.py) in the model's body, a loop instruction's
(tpc/train/instructions.py) in the training, `in` for a body's inputs), `name`, `text` (as `tpc
graph` writes it), `tag`, `span` (a Span or None), `kind` for the model's steps (tpc/train/network.py's
Step.kind) and the training's instructions (tpc/train/loops.py's kinds), and `body` (a DiGraph) for the
model and loops;
loops also have `trip`, `counter` and `carries` (the names whose values
they give: layers as W, a copy's as g.W, states, records), and a loop body's `in` nodes `outer` (the model's `in` nodes
have none: its argument and layers are the inputs of each `apply`). Edges carry `pos`, the positions of
the source among the destination's inputs. Ids are whole numbers, unique across all bodies, in
creation order (a topological order of each graph).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tpc.errors import Span
from tpc.train.instructions import INSTRUCTIONS
from tpc.train.show import loop_summary, text_of

if TYPE_CHECKING:
    import networkx as nx

    from tpc.train.loops import Instr, TrainProgram
    from tpc.train.network import Network

# the instructions written inside their users' text (numbers, counters): no node of their own
_INLINE = ("const", "counter")


@dataclass
class _Scope:
    """One graph under construction (the program's, the model's body or a loop's body) and what its
    names stand for now."""

    graph: nx.DiGraph
    parent: _Scope | None
    current: dict[str, int] = field(default_factory=dict)  # a name -> the node holding its value now
    inputs: dict[str, int] = field(default_factory=dict)  # a name -> this body's `in` node for it
    local: set[str] = field(default_factory=set)  # names first defined here (states, copies of a body)


class _Builder:
    def __init__(self, net: Network) -> None:
        import networkx as nx

        self.nx = nx
        self.net = net
        self.next_id = 0
        self.names: dict[int, str] = {}  # every node's name, whichever graph holds it

    def reserve(self) -> int:
        """A node's id, taken before its body's nodes are made (so ids read in program order)."""
        self.next_id += 1
        return self.next_id - 1

    def node(self, scope: _Scope, op: str, name: str, text: str, tag: str, span: Span | None,
             inputs: list[int], nid: int | None = None, **attrs: Any) -> int:
        nid = self.reserve() if nid is None else nid
        scope.graph.add_node(nid, op=op, name=name, text=text, tag=tag, span=span, **attrs)
        self.names[nid] = name
        for pos, src in enumerate(inputs):
            if scope.graph.has_edge(src, nid):
                scope.graph.edges[src, nid]["pos"] += (pos,)
            else:
                scope.graph.add_edge(src, nid, pos=(pos,))
        return nid

    def lookup(self, scope: _Scope, name: str) -> int:
        """The node holding `name`'s value in this scope: its own, or a new `in` node for the enclosing
        scope's (a body reads what is outside it through its inputs)."""
        if name in scope.current:
            return scope.current[name]
        assert scope.parent is not None, f"'{name}' is not defined"
        outer = self.lookup(scope.parent, name)
        shown = self.names[outer] if name.startswith("%") else self.shown(name)  # a value: by its own name
        nid = self.node(scope, "in", shown, f"in {shown}", "In", None, [], outer=outer)
        scope.current[name] = scope.inputs[name] = nid
        return nid

    def shown(self, name: str) -> str:
        """A name as a body's input shows it: a data set, a loss or a record by its name, a layer of the
        model by its own, a copy's layer as g.W, a state by its name, the model's function as `model f`,
        an earlier value as %id."""
        for prefix in ("data ", "loss ", "record ", f"{self.net.model.name}."):
            if name.startswith(prefix):
                return name[len(prefix):]
        return name

    # --- declarations
    def build(self) -> nx.DiGraph:
        net = self.net
        top = _Scope(self.nx.DiGraph(), None)
        for name, value in net.data.items():
            shape = "x".join(map(str, value.shape))
            top.current[f"data {name}"] = self.node(top, "data", name, f"data {shape}", "Data", None, [])
        width = net.width_name
        for name, layer in net.layers.items():
            dims = width if layer.role == "bias" else \
                " x ".join(width if d is None else str(d) for d in (layer.rows, layer.cols))
            text = f"fixed random {layer.declared} {dims}, var {layer.var:g}" if layer.fixed else \
                f"{layer.role} layer {dims}, var {layer.var:g}"
            extra = {"fixed": True} if layer.fixed else {}  # drawn once, never trained
            top.current[f"{net.model.name}.{name}"] = self.node(top, "layer", name, text, "Layer", layer.span, [],
                                                                **extra)
        self.initial = [top.current[f"{net.model.name}.{name}"] for name in net.layers]
        self.model_node(top)
        for name, loss in net.losses.items():
            reads = [self.lookup(top, f"model {net.model.name}")] + self.layers(top, net.model.name) \
                + self.datasets(top, loss.data, loss.target, *loss.args)
            text = f"{loss.kind}({net.model.name}({loss.data}){', ' + loss.target if loss.target else ''})"
            if loss.tree is not None:  # a loss the user wrote: as written
                text = _source(net.source, loss.span).partition("=")[2].strip() or text
            top.current[f"loss {name}"] = self.node(top, "loss", name, text, "Loss", loss.span, reads)
        prog = net.program
        steps = prog.top if prog is not None else []

        def position(o: Any) -> int:  # how many training instructions run before the output
            return o.position if o.position >= 0 else 0 if o.phase == "init" else len(steps)

        outputs = sorted(net.outputs, key=position)  # stable: the program's order among equals
        done = 0
        for k, i in enumerate(steps):
            while done < len(outputs) and position(outputs[done]) <= k:
                self.output(top, outputs[done])
                done += 1
            self.instruction(top, prog, prog.instrs[i])
        for o in outputs[done:]:
            self.output(top, o)
        return top.graph

    def model_node(self, top: _Scope) -> int:
        """The model: a node whose body is its steps, reading its argument and layers through `in` nodes."""
        from tpc.train.steps import STEPS

        m = self.net.model
        nid = self.reserve()
        body = _Scope(self.nx.DiGraph(), None)
        arg = self.node(body, "in", m.arg, f"in {m.arg}", "In", m.span, [])
        layer_in = {name: self.node(body, "in", name, f"in {name}", "In", None, [])
                    for name in dict.fromkeys(s.layer for s in m.steps if s.layer)}
        ids: list[int] = []
        names: list[str] = []
        for k, s in enumerate(m.steps):
            if s.op == "input":  # the argument, through the input layer's product below
                ids.append(arg)
                names.append(m.arg)
                continue
            if s.op == "bias":
                ids.append(layer_in[s.layer])
                names.append(s.layer)
                continue
            name = f"{m.name}({m.arg})" if k == m.out else m.step_name(k)
            inputs = [ids[j] for j in s.args] + ([layer_in[s.layer]] if s.layer and s.op == "matmul" else [])
            text = STEPS[s.op].text(s, [names[j] for j in s.args], self.net)
            extra = {"transposed": True} if s.transposed else {}  # W.T @ h: tied weights
            ids.append(self.node(body, s.op, name, text, s.op.capitalize(), s.span, inputs, kind=s.kind, **extra))
            names.append(name)
        # the model is a function (a closed body): its argument and layers are the inputs of each
        # application, `apply` (the current layers, then the data), not of its definition
        top.current[f"model {m.name}"] = nid
        return self.node(top, "model", m.name, f"model {m.name}({m.arg}): {len(m.steps)} steps", "Model", m.span,
                         [], nid, body=body.graph)

    def layers(self, scope: _Scope, root: str, layers: tuple[str, ...] | None = None) -> list[int]:
        """The current values of a model's (or a copy's) layers."""
        names = self.net.layers if layers is None else layers
        return list(dict.fromkeys(self.lookup(scope, f"{root}.{name}") for name in names))

    def datasets(self, scope: _Scope, *names: str | None) -> list[int]:
        """The nodes of data sets (a user loss's arguments start with its model's place, `<f>`: skipped)."""
        return list(dict.fromkeys(self.lookup(scope, f"data {n}") for n in names if n in self.net.data))

    def output(self, top: _Scope, o: Any) -> None:
        reads: list[int] = []
        if o.kind == "record":
            reads = [self.lookup(top, f"record {o.loss}")]
        elif o.kind == "loss" or o.kind == "history":
            reads = [self.lookup(top, f"loss {o.loss}")] + self.layers(top, self.net.model.name)
        elif o.kind == "embeddings":
            reads = self.layers(top, self.net.model.name, (o.layer,))
        else:
            reads = [self.lookup(top, f"model {self.net.model.name}")] + self.layers(top, self.net.model.name) \
                + self.datasets(top, o.data)
            if o.kind == "feature_change":  # against the features at initialisation
                reads += self.initial
            if o.tasks is not None:
                t = o.tasks
                reads += self.datasets(top, t.pool, t.support, t.support_y, t.query, t.query_y)
        f = self.net.model.name
        what = {"record": o.loss, "loss": o.loss, "history": f"history({o.loss})", "predict": f"{f}({o.data})",
                "embeddings": f"embeddings({o.layer})", "adapted": f"adapted({f}, ...)"}.get(
            o.kind, f"{o.kind}({f}, {o.data})")
        self.node(top, "output", o.name, f"output {what}", "Output", o.span, reads)

    # --- training
    def keys(self, ins: Instr, name_attr: str = "target") -> list[str]:
        """The names an instruction's parameters go by: a state's own, or a model's or copy's layers."""
        a = ins.attrs
        if a.get("what") == "state":
            return [a[name_attr]]
        return [f"{a['root']}.{layer}" for layer in a["layers"]]

    def instruction(self, scope: _Scope, prog: TrainProgram, ins: Instr) -> None:
        op, a = ins.op, ins.attrs
        if op in _INLINE or op in ("data", "read"):  # written where they are used (their names, below)
            return
        nid = self.reserve()
        reads = self.args(scope, prog, ins)
        spec = INSTRUCTIONS[op]
        name = a.get("label") or f"%{ins.id}" if spec.kind != "none" else \
            f"for {a['counter']}" if op == "loop" else a.get("target") or a.get("name") or op
        extra: dict[str, Any] = {}
        carried: list[str] = []
        if op == "apply":
            reads = [self.lookup(scope, f"model {self.net.model.name}")] + self.layers(scope, a["root"]) + reads
        elif op == "named_loss":
            reads = [self.lookup(scope, f"loss {a['loss']}")] + reads
        elif op == "update" and a["mode"] != "=":  # `M = ...` does not read M's old value (unless it names it)
            reads = self.current(scope, self.keys(ins)) + reads
        elif op in ("gather", "scatter_add"):
            reads = self.layers(scope, self.net.model.name, (a["layer"],)) + reads
        elif op == "stream":
            reads = self.datasets(scope, a["tokens"]) + reads
        elif op == "copy":
            reads = self.layers(scope, a["source"], a["layers"])
        elif op == "loop":
            body, extra, carried = self.loop(scope, prog, ins)
            reads = list(dict.fromkeys(body.graph.nodes[i]["outer"] for i in body.inputs.values()))
        self.node(scope, op, name, text_of(prog, ins),
                  spec.tag + (f" ({loop_summary(prog, ins)})" if op == "loop" else ""), ins.span, reads, nid,
                  kind=ins.kind, **extra)
        scope.current[f"%{ins.id}"] = nid
        if op == "update":
            for key in self.keys(ins):
                scope.current[key] = nid
        elif op == "scatter_add":
            scope.current[f"{self.net.model.name}.{a['layer']}"] = nid
        elif op in ("state", "copy"):
            keys = [a["name"]] if op == "state" else [f"{a['name']}.{layer}" for layer in a["layers"]]
            for key in keys:
                scope.current[key] = nid
                scope.local.add(key)
        elif op == "record":
            scope.current[f"record {a['name']}"] = nid
        elif op == "loop":
            for key in carried:
                scope.current[key] = nid

    def current(self, scope: _Scope, keys: list[str]) -> list[int]:
        return list(dict.fromkeys(self.lookup(scope, k) for k in keys))

    def args(self, scope: _Scope, prog: TrainProgram, ins: Instr) -> list[int]:
        """The nodes of an instruction's arguments: data sets and parameters by their names' current
        values, numbers and counters not at all (they are in its text), other values by their nodes."""
        out: list[int] = []
        for i in ins.args:
            arg = prog.instrs[i]
            if arg.op in _INLINE:
                continue
            if arg.op == "data":
                out += self.datasets(scope, arg.attrs["name"])
            elif arg.op == "read":
                out += self.current(scope, self.keys(arg, "name"))
            else:
                out.append(self.lookup(scope, f"%{i}"))
        return list(dict.fromkeys(out))

    def loop(self, scope: _Scope, prog: TrainProgram, ins: Instr) -> tuple[_Scope, dict[str, Any], list[str]]:
        body = _Scope(self.nx.DiGraph(), scope)
        for i in ins.attrs["body"]:
            self.instruction(body, prog, prog.instrs[i])
        # what the loop carries out: the outer names its body changed, and its records (nested ones too)
        carried = [k for k, v in body.current.items()
                   if k not in body.local and body.inputs.get(k) != v
                   and (k in body.inputs or k.startswith("record "))]
        attrs = {"body": body.graph, "trip": ins.attrs["trip"], "counter": ins.attrs["counter"],
                 "carries": [self.shown(k) for k in carried]}
        return body, attrs, carried


def _source(source: str, span: Span) -> str:
    """The text a span covers, on one line, without comments (an expression holds no string, so a `#`
    always starts one)."""
    lines = source.splitlines()[span.line - 1:span.end_line]
    if not lines:
        return ""
    lines[-1] = lines[-1][:span.end_column - 1]
    lines[0] = lines[0][span.column - 1:]
    return " ".join(" ".join(line.split("#", 1)[0].split()) for line in lines if line.split("#", 1)[0].strip())


def program_graph(net: Network) -> nx.DiGraph:
    """The network program as one networkx DiGraph (see the module's docstring)."""
    g = _renumbered(_Builder(net).build())
    g.graph["file"] = net.filename
    g.graph["width"] = net.width_name
    return g


def _renumbered(g: nx.DiGraph) -> nx.DiGraph:
    """The graph with ids in program order: each graph's nodes in a topological order (ties by the
    order they were made), a model's or loop's body numbered right after it. (A body's `in` nodes are
    made when first read, after the node that reads them.)"""
    import networkx as nx

    mapping: dict[int, int] = {}

    def number(graph: nx.DiGraph) -> None:
        for nid in nx.lexicographical_topological_sort(graph):
            mapping[nid] = len(mapping)
            if "body" in graph.nodes[nid]:
                number(graph.nodes[nid]["body"])

    def relabel(graph: nx.DiGraph) -> nx.DiGraph:
        new = nx.relabel_nodes(graph, mapping, copy=True)
        for _, d in new.nodes(data=True):
            if "outer" in d:
                d["outer"] = mapping[d["outer"]]
            if "body" in d:
                d["body"] = relabel(d["body"])
        return new

    number(g)
    return relabel(g)


# ---------------------------------------------------------------------------- exports

def to_json(g: nx.DiGraph) -> list[dict[str, Any]]:
    """The graph's nodes in order, each with its inputs; a model's or loop's body nested under it."""
    nodes = []
    for nid in sorted(g.nodes):
        d = g.nodes[nid]
        item: dict[str, Any] = {"id": nid, "op": d["op"], "name": d["name"], "text": d["text"], "tag": d["tag"],
                                "inputs": sorted(g.predecessors(nid), key=lambda s: g.edges[s, nid]["pos"])}
        span = d.get("span")
        if span is not None:
            item["line"], item["column"] = span.line, span.column
        for key in ("kind", "outer", "trip", "counter", "carries", "fixed", "transposed"):
            if key in d:
                item[key] = d[key]
        if "body" in d:
            item["body"] = to_json(d["body"])
        nodes.append(item)
    return nodes


def _label(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def to_dot(g: nx.DiGraph, name: str = "program", extra: list[str] | None = None) -> str:
    """One Graphviz digraph. A model's or loop's body is a cluster; an edge into or out of it is drawn to
    its body's first or from its last node, clipped at the cluster (`lhead`, `ltail`). The inputs of a
    loop are drawn where they enter: a dashed edge from each outer node to the body's `in` node for it.
    `extra` lines (another cluster, such as the program at initialisation) go in too."""
    where: dict[int, nx.DiGraph] = {}

    def collect(graph: nx.DiGraph) -> None:
        for nid in graph.nodes:
            where[nid] = graph
            if "body" in graph.nodes[nid]:
                collect(graph.nodes[nid]["body"])

    def end(nid: int, last: bool) -> tuple[str, str]:
        """The node an edge at `nid` is drawn at, and its clipping attribute."""
        d = where[nid].nodes[nid]
        if "body" not in d:
            return f"p{nid}", ""
        inner = sorted(d["body"].nodes)
        at = end(inner[-1] if last else inner[0], last)[0] if inner else f"e{nid}"
        return at, f"{'ltail' if last else 'lhead'}=cluster_{nid}"

    lines = [f"digraph {name} {{", "  rankdir=TB;", "  compound=true;", '  node [shape=box, fontname="monospace"];']
    edges: list[str] = []

    def emit(graph: nx.DiGraph, depth: int) -> None:
        pad = "  " * depth
        for nid in sorted(graph.nodes):
            d = graph.nodes[nid]
            if "body" in d:
                lines.append(f"{pad}subgraph cluster_{nid} {{")
                lines.append(f'{pad}  label="#{nid} {_label(d["text"])}";')
                if not d["body"].number_of_nodes():
                    lines.append(f'{pad}  e{nid} [label="", shape=point];')
                emit(d["body"], depth + 1)
                lines.append(f"{pad}}}")
                continue
            shape = ", shape=ellipse" if d["op"] == "in" else ", peripheries=2" if d["op"] == "output" else ""
            lines.append(f'{pad}p{nid} [label="#{nid} {_label(d["name"] + ": " + d["text"])}"{shape}];')
            if "outer" in d:
                src, clip = end(d["outer"], True)
                edges.append(f"  {src} -> p{nid} [style=dashed{', ' + clip if clip else ''}];")
        for a, b in graph.edges:
            if graph.nodes[b]["op"] == "loop":
                continue  # drawn where it enters, to the body's `in` node
            src, tail = end(a, True)
            dst, head = end(b, False)
            attrs = ", ".join(x for x in (tail, head) if x)
            edges.append(f"  {src} -> {dst}{f' [{attrs}]' if attrs else ''};")

    collect(g)
    emit(g, 1)
    lines += edges + (extra or []) + ["}"]
    return "\n".join(lines)
