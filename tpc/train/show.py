"""A training program (loops.py) printed back: text that reads like the program, JSON and DOT.

Numbers, counters, data sets and parameter reads are written inline where they are used; every
other instruction is one line `#id  name = text   Op`, a loop's body indented under it. A value
the program named (`L = ...`) keeps its name, others are `%id`.
"""

from __future__ import annotations

from collections.abc import Callable

from tpc.train.loops import Instr, TrainProgram
from tpc.train.network import Network

INLINE = ("const", "counter", "data", "read")
INFIX = {"add": "+", "sub": "-", "mul": "*", "div": "/", "pow": "^"}
TAG = {"rows": "Rows", "index": "Index", "fn": "Scalar", "reduce": "Reduce", "apply": "Apply", "loss": "Loss",
       "named_loss": "Loss", "grad": "Grad", "zeros": "Zeros", "lincomb": "LinComb", "state": "State",
       "copy": "Copy", "update": "Update", "record": "Record", "loop": "Loop"}


def ref(prog: TrainProgram, i: int) -> str:
    ins = prog.instrs[i]
    if ins.op == "const":
        return f"{ins.attrs['value']:g}"
    if ins.op in ("counter", "data", "read"):
        return ins.attrs["name"]
    return ins.attrs.get("label") or f"%{i}"


def _terms(prog: TrainProgram, terms: list) -> str:
    parts = []
    for k, coefs, p in terms:
        factors = ([] if k == 1.0 else [f"{k:g}"]) + [ref(prog, c) for c in coefs] + [ref(prog, p)]
        parts.append(" * ".join(factors))
    return " + ".join(parts).replace("+ -", "- ") if parts else "0"


def _update(prog: TrainProgram, ins: Instr) -> str:
    text = _terms(prog, ins.attrs["terms"])
    if len(ins.attrs["terms"]) > 1 and ins.attrs["mode"] != "=":
        text = f"({text})"
    note = "   (scaled per layer by the parametrization)" if ins.attrs["scaled"] else ""
    return f"{ins.attrs['target']} {ins.attrs['mode']} {text}{note}"


def _args(prog: TrainProgram, ins: Instr) -> list[str]:
    return [ref(prog, i) for i in ins.args]


TEXT: dict[str, Callable[[TrainProgram, Instr], str]] = {
    "rows": lambda p, i: f"batch({', '.join(_args(p, i))}, {i.attrs['size']})",
    "index": lambda p, i: "{}[{}]".format(*_args(p, i)),
    "fn": lambda p, i: (f"({_args(p, i)[0]} {INFIX[i.attrs['fn']]} {_args(p, i)[1]})" if i.attrs["fn"] in INFIX
                        else f"{i.attrs['fn']}({', '.join(_args(p, i))})"),
    "reduce": lambda p, i: f"{i.attrs['fn']}({_args(p, i)[0]})",
    "apply": lambda p, i: f"{i.attrs['root']}({_args(p, i)[0]})",
    "loss": lambda p, i: f"{i.attrs['loss']}({', '.join(_args(p, i))})",
    "named_loss": lambda p, i: i.attrs["loss"] + (f" on {_args(p, i)[1]}" if len(i.args) > 1 else ""),
    "grad": lambda p, i: f"grad({_args(p, i)[0]}, {'/'.join(i.attrs['layers'])} of {i.attrs['root']})",
    "zeros": lambda p, i: f"zeros({', '.join(i.attrs['layers'])})",
    "lincomb": lambda p, i: _terms(p, i.attrs["terms"]),
    "state": lambda p, i: f"state {i.attrs['name']} = {_terms(p, i.attrs['terms'])}",
    "copy": lambda p, i: f"copy {i.attrs['name']} = {i.attrs['source']}",
    "update": lambda p, i: _update(p, i),
    "record": lambda p, i: f"record {i.attrs['name']} = {_args(p, i)[0]}",
    "loop": lambda p, i: f"for {i.attrs['counter']} in range({i.attrs['trip']}):",
}


def text_of(prog: TrainProgram, ins: Instr) -> str:
    body = TEXT[ins.op](prog, ins)
    if ins.op in ("state", "copy", "update", "record", "loop"):
        return body
    return f"{ref(prog, ins.id)} = {body}"


def loop_summary(prog: TrainProgram, loop: Instr) -> str:
    updated = sorted({prog.instrs[i].attrs["target"] for i in _all(prog, loop) if prog.instrs[i].op == "update"})
    records = [prog.instrs[i].attrs["name"] for i in _all(prog, loop) if prog.instrs[i].op == "record"]
    parts = [f"carries {', '.join(updated)}" if updated else "carries nothing"]
    if records:
        parts.append(f"records {', '.join(records)}")
    return "; ".join(parts)


def _all(prog: TrainProgram, loop: Instr) -> list[int]:
    out = []
    for i in loop.attrs["body"]:
        out.append(i)
        if prog.instrs[i].op == "loop":
            out += _all(prog, prog.instrs[i])
    return out


def training_text(net: Network) -> str:
    prog = net.program
    lines = [f"training: {sum(1 for i in prog.walk() if i.op == 'loop')} loop(s), each a body run `trip` times "
             "(tpc graph --unrolled lists the steps)"]

    def emit(ids: list[int], depth: int) -> None:
        for i in ids:
            ins = prog.instrs[i]
            if ins.op in INLINE:
                continue
            text = "  " * depth + text_of(prog, ins)
            tag = TAG[ins.op] + (f" ({loop_summary(prog, ins)})" if ins.op == "loop" else "")
            lines.append(f"{i:>4}  {text:<58} {tag}")
            if ins.op == "loop":
                emit(ins.attrs["body"], depth + 1)

    emit(prog.top, 1)
    outs = ", ".join(f"{o.name} (after #{prog.top[o.position - 1]})" if o.position else f"{o.name} (at init)"
                     for o in net.outputs)
    lines.append(f"outputs: {outs}")
    return "\n".join(lines)


def training_json(net: Network) -> dict:
    prog = net.program

    def node(i: int) -> dict:
        ins = prog.instrs[i]
        out: dict = {"id": i, "op": ins.op, "line": ins.span.line, "column": ins.span.column, "args": list(ins.args)}
        if ins.op not in INLINE:
            out["text"] = text_of(prog, ins)
        else:
            out["text"] = ref(prog, i)
        if ins.op == "loop":
            out["trip"] = ins.attrs["trip"]
            out["counter"] = ins.attrs["counter"]
            out["body"] = [node(j) for j in ins.attrs["body"]]
        return out

    return {"top": [node(i) for i in prog.top],
            "outputs": [{"name": o.name, "after": o.position} for o in net.outputs]}


def training_dot(net: Network) -> str:
    prog = net.program
    lines = ["digraph training {", "  rankdir=TB;", '  node [shape=box, fontname="monospace"];']

    def emit(ids: list[int], depth: int) -> None:
        for i in ids:
            ins = prog.instrs[i]
            label = (text_of(prog, ins) if ins.op not in INLINE else ref(prog, i)).replace("\\", "\\\\")
            label = label.replace('"', '\\"')
            if ins.op == "loop":
                lines.append(f"{'  ' * depth}subgraph cluster_loop_{i} {{")
                lines.append(f'{"  " * depth}  label="{label}";')
                emit(ins.attrs["body"], depth + 1)
                lines.append(f"{'  ' * depth}}}")
                continue
            lines.append(f'{"  " * depth}i{i} [label="#{i} {label}"];')
            for a in ins.args:
                lines.append(f"{'  ' * depth}i{a} -> i{i};")

    emit(prog.top, 1)
    lines.append("}")
    return "\n".join(lines)
