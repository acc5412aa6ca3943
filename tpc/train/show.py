"""A training program (loops.py) printed back as text that reads like the program (its JSON and DOT
are those of the program graph, tpc/train/graph.py).

Numbers, counters, data sets and parameter reads are written inline where they are used; every
other instruction is one line `#id  name = text   Op`, a loop's body indented under it. A value
the program named (`L = ...`) keeps its name, others are `%id`. Each op's text is its rule
`_text_<op>` below, and its `Op` tag and whether it is inline are in the registry of
instructions (tpc/train/instructions.py), which `text_of` dispatches through.
"""

from __future__ import annotations

from collections.abc import Callable

from tpc.train.instructions import INSTRUCTIONS
from tpc.train.loops import Instr, TrainProgram
from tpc.train.network import Network, Step

INFIX = {"add": "+", "sub": "-", "mul": "*", "div": "/", "pow": "^"}


def ref(prog: TrainProgram, i: int) -> str:
    """How instruction i is written where it is used: an inline op by its own text, a value the
    program named by its name, another by `%id`."""
    ins = prog.instrs[i]
    spec = INSTRUCTIONS[ins.op]
    if spec.inline:
        return spec.text(prog, ins)
    return ins.attrs.get("label") or f"%{i}"


def text_of(prog: TrainProgram, ins: Instr) -> str:
    """An instruction's text: `name = text` for a value, the statement itself for a statement, and
    for an inline op what stands for it where it is used."""
    spec = INSTRUCTIONS[ins.op]
    body = spec.text(prog, ins)
    if spec.kind == "none" or spec.inline:
        return body
    return f"{ref(prog, ins.id)} = {body}"


def terms_text(terms: list, name: Callable[[int], str]) -> str:
    """`k * c * P + ...` of a linear combination, each operand written by `name`."""
    parts = []
    for k, coefs, p in terms:
        factors = ([] if k == 1.0 else [f"{k:g}"]) + [name(c) for c in coefs] + [name(p)]
        parts.append(" * ".join(factors))
    return " + ".join(parts).replace("+ -", "- ") if parts else "0"


def _terms(prog: TrainProgram, terms: list) -> str:
    return terms_text(terms, lambda i: ref(prog, i))


def _args(prog: TrainProgram, ins: Instr) -> list[str]:
    return [ref(prog, i) for i in ins.args]


# --- the text of each instruction (`text` in tpc/train/instructions.py)


def _text_const(prog: TrainProgram, ins: Instr) -> str:
    return f"{ins.attrs['value']:g}"


def _text_name(prog: TrainProgram, ins: Instr) -> str:  # counters, data sets, parameter reads
    return ins.attrs["name"]


def _text_rows(prog: TrainProgram, ins: Instr) -> str:
    return f"batch({', '.join(_args(prog, ins))}, {ins.attrs['size']})"


def _text_index(prog: TrainProgram, ins: Instr) -> str:
    return "{}[{}]".format(*_args(prog, ins))


def _text_fn(prog: TrainProgram, ins: Instr) -> str:
    args, fn = _args(prog, ins), ins.attrs["fn"]
    return f"({args[0]} {INFIX[fn]} {args[1]})" if fn in INFIX else f"{fn}({', '.join(args)})"


def _text_reduce(prog: TrainProgram, ins: Instr) -> str:
    return f"{ins.attrs['fn']}({_args(prog, ins)[0]})"


def _text_apply(prog: TrainProgram, ins: Instr) -> str:
    return f"{ins.attrs['root']}({_args(prog, ins)[0]})"


def _text_loss(prog: TrainProgram, ins: Instr) -> str:
    return f"{ins.attrs['loss']}({', '.join(_args(prog, ins))})"


def _text_named_loss(prog: TrainProgram, ins: Instr) -> str:
    return ins.attrs["loss"] + (f" on {_args(prog, ins)[1]}" if len(ins.args) > 1 else "")


def _text_grad(prog: TrainProgram, ins: Instr) -> str:
    return f"grad({_args(prog, ins)[0]}, {'/'.join(ins.attrs['layers'])} of {ins.attrs['root']})"


def _text_zeros(prog: TrainProgram, ins: Instr) -> str:
    return f"zeros({', '.join(ins.attrs['layers'])})"


def _text_lincomb(prog: TrainProgram, ins: Instr) -> str:
    return _terms(prog, ins.attrs["terms"])


def _text_ewise(prog: TrainProgram, ins: Instr) -> str:
    from tpc.ops import expr as ex

    return ex.render(ins.attrs["tree"], _args(prog, ins))


def _text_state(prog: TrainProgram, ins: Instr) -> str:
    return f"state {ins.attrs['name']} = {_terms(prog, ins.attrs['terms'])}"


def _text_copy(prog: TrainProgram, ins: Instr) -> str:
    return f"copy {ins.attrs['name']} = {ins.attrs['source']}"


def _text_update(prog: TrainProgram, ins: Instr) -> str:
    text = _terms(prog, ins.attrs["terms"])
    if len(ins.attrs["terms"]) > 1 and ins.attrs["mode"] != "=":
        text = f"({text})"
    note = "   (scaled per layer by the parametrization)" if ins.attrs["scaled"] else ""
    return f"{ins.attrs['target']} {ins.attrs['mode']} {text}{note}"


def _text_record(prog: TrainProgram, ins: Instr) -> str:
    return f"record {ins.attrs['name']} = {_args(prog, ins)[0]}"


def _text_loop(prog: TrainProgram, ins: Instr) -> str:
    if "stream" in ins.attrs:  # counted again when it runs, from the data it has then
        return f"for {ins.attrs['counter']} in steps({ins.attrs['stream']}) ({ins.attrs['trip']} batches):"
    return f"for {ins.attrs['counter']} in range({ins.attrs['trip']}):"


def _text_stream(prog: TrainProgram, ins: Instr) -> str:
    return f"{ins.attrs['stream']}[{ref(prog, ins.args[0])}]"


def _text_gather(prog: TrainProgram, ins: Instr) -> str:
    table, b = _args(prog, ins)
    return f"bag({table}, {b})" if ins.attrs["form"] == "bag" else f"{table}[{b}.words]"


def _text_logits(prog: TrainProgram, ins: Instr) -> str:
    return "logits({}, {})".format(*_args(prog, ins))


def _text_ns_loss(prog: TrainProgram, ins: Instr) -> str:
    return "negative_sampling({}, {})".format(*_args(prog, ins))


def _text_ns_grad(prog: TrainProgram, ins: Instr) -> str:
    return "grad({}, {})".format(*_args(prog, ins)[:2])


def row_update_text(target: str, attrs: dict, b: str, g: str, rows: str) -> str:
    """`V[b.words] -= b.lr * outer(g, h)` or `U[b.context] -= 0.5 * (g @ v)`, as the program writes it."""
    step = f"outer({g}, {rows})" if attrs["index"] == "words" else f"({g} @ {rows})"
    coef = attrs["coef"]
    factors = ([] if abs(coef) == 1 else [f"{abs(coef):g}"]) + ([f"{b}.lr"] if attrs["rate"] else []) + [step]
    return f"{target}[{b}.{attrs['index']}] {'-=' if coef > 0 else '+='} {' * '.join(factors)}"


def _text_scatter_add(prog: TrainProgram, ins: Instr) -> str:
    b, g, rows = _args(prog, ins)
    return row_update_text(ins.attrs["target"], ins.attrs, b, g, rows) + "   (scaled per layer by the " \
        "parametrization)"


# --- whole programs


def loop_summary(prog: TrainProgram, loop: Instr) -> str:
    updated = sorted({prog.instrs[i].attrs["target"] for i in prog.inside(loop)
                      if prog.instrs[i].op in ("update", "scatter_add")})
    records = [prog.instrs[i].attrs["name"] for i in prog.inside(loop) if prog.instrs[i].op == "record"]
    parts = [f"carries {', '.join(updated)}" if updated else "carries nothing"]
    if records:
        parts.append(f"records {', '.join(records)}")
    return "; ".join(parts)


def model_lines(net: Network) -> list[str]:
    """The model's steps, one per line: a model over positions (`model f(x[P])`) is shown this way,
    since it has no Netsor program at initialisation to print yet."""
    from tpc.train.positions import patches_text
    from tpc.train.steps import STEPS

    m = net.model
    names = [patches_text(m.arg, s.patches) if s.op == "input" else s.layer if s.op == "bias" else
             m.step_name(k) for k, s in enumerate(m.steps)]
    names[-1] = f"{m.name}({m.arg})"
    at = f"[{', '.join(map(str, m.grid))}]" if m.positions > 1 else ""
    lines = [f"model {m.name}({m.arg}{at}): {len(m.steps)} steps"]
    for k, s in enumerate(m.steps):
        args = [names[j] for j in s.args]
        if s.op in ("input", "bias"):  # named where they are used
            continue
        text = STEPS[s.op].text(s, args, net)  # `_step_text_<op>` below (tpc/train/steps.py)
        where = {"scalar": "a number per input", "out": "finite"}.get(s.kind, "an n-vector")
        if s.pos:
            count = " x ".join(map(str, s.grid)) + (" positions" if s.positions > 1 else " position")
            where += " at every position" if s.grid == m.grid else f" at {count}"
        note = f"softmax over positions of q.k / n^{net.attention:g}" if s.op == "attend" else where
        lines.append(f"  {names[k]:<8} = {text:<48} # {note}")
    return lines


def _step_text_input(step: Step, args: list[str], net: Network) -> str:  # pragma: no cover - not shown
    return net.model.arg


def _step_text_bias(step: Step, args: list[str], net: Network) -> str:  # pragma: no cover - not shown
    return step.layer


def _step_text_matmul(step: Step, args: list[str], net: Network) -> str:
    flat = net.layers[step.layer].flattens
    if flat:
        return f"{step.layer} @ flatten({args[0]})"
    return f"{step.layer}{'.T' if step.transposed else ''} @ {args[0]}"


def _step_text_fn(step: Step, args: list[str], net: Network) -> str:
    from tpc.ops import expr as ex

    return ex.render(step.tree, args)


def _step_text_moment(step: Step, args: list[str], net: Network) -> str:
    return f"mean({args[0]})"


def _step_text_pool(step: Step, args: list[str], net: Network) -> str:
    return f"pool({args[0]})"


def _step_text_shift(step: Step, args: list[str], net: Network) -> str:
    return f"shift({args[0]}, {', '.join(map(str, step.offset))})"


def _step_text_window(step: Step, args: list[str], net: Network) -> str:
    from tpc.train.positions import window_text

    return f"window({args[0]}, {window_text(step.window)})"


def _step_text_attend(step: Step, args: list[str], net: Network) -> str:
    return f"attend({', '.join(args + ([str(step.heads)] if step.heads > 1 else []))})"


def training_text(net: Network) -> str:
    prog = net.program
    lines = [f"training: {sum(1 for i in prog.walk() if i.op == 'loop')} loop(s), each a body run `trip` times "
             "(tpc graph --unrolled lists the steps)"]

    def emit(ids: list[int], depth: int) -> None:
        for i in ids:
            ins = prog.instrs[i]
            spec = INSTRUCTIONS[ins.op]
            if spec.inline:
                continue
            text = "  " * depth + text_of(prog, ins)
            tag = spec.tag + (f" ({loop_summary(prog, ins)})" if ins.op == "loop" else "")
            lines.append(f"{i:>4}  {text:<58} {tag}")
            if ins.op == "loop":
                emit(ins.attrs["body"], depth + 1)

    emit(prog.top, 1)
    outs = ", ".join(f"{o.name} (after #{prog.top[o.position - 1]})" if o.position else f"{o.name} (at init)"
                     for o in net.outputs)
    lines.append(f"outputs: {outs}")
    return "\n".join(lines)
