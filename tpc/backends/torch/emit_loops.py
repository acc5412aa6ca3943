"""A network program's training loops (tpc/train/loops.py) as the emitted file's `train()`.

The program's instructions become straight PyTorch, a few lines each, with the semantics of the
reference interpreter (tpc/train/interp.py on the dense backend): the model's parameters are the
`w^l` of the emitted `Network` (W^l = n^-a_l w^l), `P -= e` on parameters is w <- w - n^-c e (the
per-layer scaling that `optimizer()` gives SGD), updates of states and plain `=` are not scaled,
`grad(L, P)` is dL/dw by autograd, and a copy clones the model's w. Loops are Python `for` loops;
states and copies are dicts of tensors keyed by the module's parameter names (a layer a dict lacks
counts as zero, as a `zeros(f)` state holds no layer until it is first set); records are lists with
one value per step. The model is trained in place; copies and states are never changed in place.

Each op's code is its rule `_emit_<op>` below, which the registry of instructions
(tpc/train/instructions.py, the field `emit`) lists beside the op's other rules: a value's rule
gives its expression, which `_Emitter` writes where it is used (inlined) or on a line
`v<id> = ...`; a statement's rule writes its lines. The emitter dispatches through the registry.

Every name in the emitted code is either the file's own (reserved by `reserved`) or a program
name made safe by `codegen.safe_names` (emit_network.program_names); user text reaches the file
only through `_comment` (comments) or `repr` (dict keys).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tpc.backends.torch.codegen import PYTHON_NAMES, _comment, _num
from tpc.errors import TpcError
from tpc.ops.functions import FUNCTIONS
from tpc.train.instructions import INSTRUCTIONS
from tpc.train.loops import Instr, TrainProgram
from tpc.train.network import Loss, Network

# the emitted file's helper functions (module level) and train()'s own locals
HELPERS = ("num", "whole", "pick", "batch_rows", "batch_at", "checked", "finite_output", "combine", "at", "weights",
           "copied", "shifted", "replaced", "assign", "grad", "stacked", "features", "mse_loss", "xent_loss",
           "logistic_loss")
LOCALS = ("records", "outputs", "initial", "scale", "adaptive", "natural", "n", "model", "stream", "factor", "dtype",
          "device")
# the emitted file's other globals (a word2vec file's: emit_tables.py, with the stream's code)
FILE_NAMES = {"Network", "optimizer", "train", "LR", "math", "torch", "Tables", "Stream", "Batch", "StepBatch",
              "step_batch", "np", "NamedTuple", "Iterator", "annotations"}
# ops written where they are used (never a line of their own); data rows (kind `data`) are too, unless named
ALWAYS_INLINE = ("const", "counter", "zeros")
# ops inlined into their only use, when nothing that changes parameters runs in between
SMALL = ("fn", "reduce", "apply")
BARRIERS = ("update", "copy", "state")
PAREN_FNS = ("neg", "square")


def reserved(net: Network) -> set[str]:
    """Names train() uses itself (its locals, the file's functions, builtins): no program name that
    becomes one of its locals or arguments may take them."""
    prog = net.program
    ids = range(len(prog.instrs))
    return PYTHON_NAMES | FILE_NAMES | {f"loss_{lo}" for lo in net.losses} | {
        *HELPERS, *LOCALS, *(f"v{i}" for i in ids), *(f"p{i}" for i in ids),
        *(f"inner{d}" for d in range(2, _depth(prog, prog.top) + 1))}


def user_names(net: Network) -> list[str]:
    """The program's names that become locals of train(): counters, named values, states, copies."""
    out: list[str] = []
    for ins in net.program.walk():
        if ins.op == "loop":
            out.append(ins.attrs["counter"])
        elif ins.op in ("state", "copy"):
            out.append(ins.attrs["name"])
        elif ins.attrs.get("label"):
            out.append(ins.attrs["label"])
    return out


def train_data(net: Network) -> list[str]:
    """The data sets train() takes (the program's names), in order of declaration: those the loops
    read and those of the outputs."""
    used: set[str] = set()

    def loss_data(name: str) -> None:
        loss = net.losses[name]
        used.update([loss.data, *([loss.target] if loss.target else loss.args[1:])])

    for ins in net.program.walk():
        if ins.op == "data":
            used.add(ins.attrs["name"])
        elif ins.op == "named_loss":
            loss_data(ins.attrs["loss"])
    for o in net.outputs:
        if o.data:
            used.add(o.data)
        if o.kind == "loss":
            loss_data(o.loss)
    return [d for d in net.data if d in used]


def _depth(prog: TrainProgram, ids: list[int]) -> int:
    loops = [prog.instrs[i] for i in ids if prog.instrs[i].op == "loop"]
    return max((1 + _depth(prog, lo.attrs["body"]) for lo in loops), default=0)


@dataclass
class _Code:
    text: str
    tensor: bool  # a tensor (else a Python number: a constant or a loop counter)
    compound: bool = False  # needs parentheses as an operand


@dataclass
class _Emitter:
    net: Network
    names: dict[str, str]
    lines: list[str] = field(default_factory=list)
    helpers: set[str] = field(default_factory=set)
    parent: dict[int, int | None] = field(default_factory=dict)  # the loop whose body holds an instruction
    uses: dict[int, list[int]] = field(default_factory=dict)  # the instructions that read each one
    inlined: set[int] = field(default_factory=set)
    snapshot: dict[int, str] = field(default_factory=dict)  # apply id -> the name of the copy's values it used
    grad_params: dict[int, str] = field(default_factory=dict)
    indent: str = ""  # where instruction() writes: the indentation of its lines
    depth: int = 0  # and how many loops enclose them

    def __post_init__(self) -> None:
        self.prog = self.net.program
        self.instrs = self.prog.instrs
        self.uses = {i: [] for i in range(len(self.instrs))}
        for ins in self.prog.walk():
            if ins.op == "loop":
                for j in ins.attrs["body"]:
                    self.parent[j] = ins.id
            self.parent.setdefault(ins.id, None)
            for j in self.operands(ins):
                self.uses[j].append(ins.id)
        for ins in self.prog.walk():
            if ins.op == "grad":
                self.plan_grad(ins)
        for ins in self.prog.walk():
            if self.is_inline(ins):
                self.inlined.add(ins.id)

    # --- analysis
    def operands(self, ins: Instr) -> list[int]:
        """The instructions whose values this one's code reads (a grad's applies only say which
        parameters it differentiates)."""
        if ins.op == "grad":
            return [ins.args[0]]
        if ins.op in ("lincomb", "state", "update"):
            return [j for _, coefs, p in ins.attrs["terms"] for j in (*coefs, p)]
        return list(ins.args)

    def calm(self, i: int, j: int) -> bool:
        """Nothing that changes parameters, copies or states runs between i and its use j, which is
        in the same body."""
        return self.parent[i] == self.parent[j] and \
            not any(self.instrs[k].op in BARRIERS for k in range(i + 1, j))

    def plan_grad(self, ins: Instr) -> None:
        root = ins.attrs["root"]
        if root == self.net.model.name:  # the module's own parameters, trained in place
            self.grad_params[ins.id] = "weights(model)"
            self.helpers.add("weights")
            return
        first = ins.args[1]
        if all(self.parent[a] == self.parent[ins.id] and not any(
                self.instrs[k].op in BARRIERS and self.instrs[k].attrs.get("root", self.instrs[k].attrs.get("name"))
                == root for k in range(a + 1, ins.id)) for a in ins.args[1:]):
            self.grad_params[ins.id] = self.local(root)
            return
        # the copy changed after its forward pass: differentiate the values that pass used
        self.snapshot[first] = f"p{first}"
        self.grad_params[ins.id] = f"p{first}"

    def is_inline(self, ins: Instr) -> bool:
        if ins.op in ALWAYS_INLINE:
            return True
        if ins.attrs.get("label") or ins.id in self.snapshot:
            return False
        if INSTRUCTIONS[ins.op].kind == "data":
            return True
        users = self.uses[ins.id]
        if ins.op == "read":
            return bool(users) and all(self.calm(ins.id, u) for u in users)
        if ins.op in SMALL:
            return len(users) == 1 and self.calm(ins.id, users[0]) and self.instrs[users[0]].op != "loop"
        return False

    # --- names and values
    def local(self, name: str) -> str:
        return self.names[name]

    def var(self, i: int) -> str:
        label = self.instrs[i].attrs.get("label")
        return self.local(label) if label else f"v{i}"

    def value(self, i: int) -> _Code:
        """The code that stands for instruction i where it is used: its variable, or (inlined) its
        expression; a tensor unless it is a number, a counter or a value for layers (a dict)."""
        ins = self.instrs[i]
        if i not in self.inlined:
            return _Code(self.var(i), INSTRUCTIONS[ins.op].kind != "params")
        return INSTRUCTIONS[ins.op].emit(self, ins)

    def tensor(self, i: int) -> str:
        return self.as_tensor(self.value(i))

    def as_tensor(self, c: _Code) -> str:
        if c.tensor:
            return c.text
        self.helpers.add("num")
        return f"num({c.text})"

    def finite(self, i: int) -> _Code:
        """Instruction i as a finite value: f(X) of a model with one output is a number per row (B,),
        as tpc's interpreter reads it, so that `f(X) - Y` is taken row by row."""
        c = self.value(i)
        if self.instrs[i].op == "apply" and self.net.output_dim() == 1:
            return _Code(f"{self.operand(c)}[..., 0]", True)
        return c

    def operand(self, c: _Code) -> str:
        return f"({c.text})" if c.compound else c.text

    def terms(self, terms: list[tuple[float, tuple[int, ...], int]], sign: float = 1.0) -> str:
        """combine((c, P), ...): sum_i c_i P_i; zeros terms add nothing."""
        parts = []
        for k, coefs, p in terms:
            if self.instrs[p].op == "zeros":
                continue
            k = sign * k
            if k == 1.0 and len(coefs) == 1:  # one number: as it is
                coef = self.value(coefs[0]).text
            else:
                factors = [self.operand(self.value(c)) for c in coefs]
                coef = " * ".join(([] if k == 1.0 and factors else [_num(k)]) + factors)
            parts.append(f"({coef}, {self.value(p).text})")
        if not parts:
            return "{}"
        self.helpers.add("combine")
        return f"combine({', '.join(parts)})"

    # --- lines
    def comment(self, ins: Instr) -> str:
        s = ins.span
        lines = self.net.source.splitlines()
        if s is None or not 0 < s.line <= len(lines):
            return ""
        text = lines[s.line - 1][s.column - 1:s.end_column - 1 if s.end_line == s.line else None].strip()
        if ins.op == "loop":  # its header
            text = text.split("{")[0].strip()
        elif s.end_line != s.line:
            text += " ..."
        if len(text) > 70:
            text = text[:67] + "..."
        return f"  # {_comment(text)}" if text else ""

    def emit(self, ids: list[int], indent: str, depth: int) -> None:
        start = len(self.lines)
        for i in ids:
            ins = self.instrs[i]
            if i not in self.inlined and ins.op != "counter":
                self.instruction(ins, indent, depth)
        if len(self.lines) == start:
            self.lines.append(indent + "pass")

    def instruction(self, ins: Instr, indent: str, depth: int) -> None:
        """Instruction ins on lines of its own at this indentation, in loops nested `depth` deep: a
        statement by its rule, a value as `v<id> = <its expression>`."""
        self.indent, self.depth = indent, depth
        spec = INSTRUCTIONS[ins.op]
        if spec.kind == "none":
            spec.emit(self, ins)
            return
        note = self.comment(ins)
        if ins.id in self.snapshot:
            self.lines.append(f"{indent}{self.snapshot[ins.id]} = {self.local(ins.attrs['root'])}  # the values of "
                              f"{_comment(ins.attrs['root'])} that grad() differentiates")
        self.lines.append(f"{indent}{self.var(ins.id)} = {spec.emit(self, ins).text}{note}")


    def rows_index(self, i: int) -> str:
        """Which rows of their data set the rows instruction i are (for a named loss's targets)."""
        ins = self.instrs[i]
        if ins.op == "rows" and self.instrs[ins.args[0]].op == "data":
            x = self.value(ins.args[0]).text
            return f"batch_rows({self.value(ins.args[1]).text}, {ins.attrs['size']}, {x}.shape[0])"
        raise TpcError("emit-torch: a named loss on these rows is not supported", ins.span)

    # --- outputs
    def outputs(self, position: int, indent: str) -> None:
        outs = [o for o in self.net.outputs if o.position == position]
        if not outs:
            return
        out = self.lines
        out += [f"{indent}if outputs is not None:  # the outputs written here", f"{indent}    with torch.no_grad():"]
        k = self.net.output_dim()
        for o in outs:
            key = f"{indent}        outputs[{o.name!r}]"
            if o.kind == "record":
                self.helpers.add("stacked")
                out.append(f"{key} = stacked(records[{o.loss!r}])")
            elif o.kind == "predict":
                out.append(f"{key} = model({self.names[o.data]}){'[:, 0]' if k == 1 else ''}")
            elif o.kind == "loss":
                loss = self.net.losses[o.loss]
                data = [self.names[loss.target]] if loss.target else [self.names[d] for d in loss.args[1:]]
                out.append(f"{key} = loss_{loss.name}({', '.join([f'model({self.names[loss.data]})', *data])})")
            elif o.kind == "features":
                self.helpers.add("features")
                x = self.names[o.data]
                flat = self.net.readout().taps  # V @ flatten(h): the mean over positions of h_p . h'_p / n
                per = f" / {flat}" if flat > 1 else ""
                out.append(f"{key} = features(model, {x}) @ features(model, {x}).T / n{per}")
            elif o.kind == "feature_change":
                self.helpers.add("features")
                x = self.names[o.data]
                out.append(f"{key} = torch.sqrt(((features(model, {x}) - initial[{x!r}]) ** 2).mean(-1))")
            else:  # pragma: no cover - network.py refuses other outputs in programs with loops
                raise TpcError(f"emit-torch: the output {o.name} ({o.kind}) is not supported", o.span)
            self.helpers.add("finite_output")
            out.append(f"{indent}        finite_output({o.name!r}, outputs[{o.name!r}])")


# --- the code of each instruction (`emit` in tpc/train/instructions.py): a value's expression, or a
# statement's lines at the emitter's indentation


def _emit_const(em: _Emitter, ins: Instr) -> _Code:
    value = ins.attrs["value"]
    return _Code(_num(value), False, value < 0)


def _emit_counter(em: _Emitter, ins: Instr) -> _Code:
    return _Code(em.local(ins.attrs["name"]), False)


def _emit_data(em: _Emitter, ins: Instr) -> _Code:
    return _Code(em.names[ins.attrs["name"]], True)


def _emit_rows(em: _Emitter, ins: Instr) -> _Code:
    x = em.value(ins.args[0]).text
    em.helpers.add("batch_rows")
    return _Code(f"{x}[batch_rows({em.value(ins.args[1]).text}, {ins.attrs['size']}, {x}.shape[0])]", True)


def _emit_index(em: _Emitter, ins: Instr) -> _Code:
    x, i = em.value(ins.args[0]).text, em.instrs[ins.args[1]]
    if i.op == "counter":  # 0, 1, ...: Python's indexing refuses one past the rows
        return _Code(f"{x}[{em.value(i.id).text}]", True)
    em.helpers.add("pick")
    return _Code(f"pick({x}, {em.value(i.id).text})", True)


def _emit_fn(em: _Emitter, ins: Instr) -> _Code:
    name = ins.attrs["fn"]
    codes = [em.finite(i) for i in ins.args]
    if name in ("min", "max", "mod"):
        call = {"min": "torch.minimum", "max": "torch.maximum", "mod": "torch.remainder"}[name]
        return _Code(f"{call}({', '.join(em.as_tensor(c) for c in codes)})", True)
    f = FUNCTIONS[name]
    if f.infix or name in PAREN_FNS:
        # numbers only: the first becomes a tensor, as tpc computes with float64 tensors
        first = not any(c.tensor for c in codes)
        parts = [em.as_tensor(c) if first and k == 0 else em.operand(c) for k, c in enumerate(codes)]
        return _Code(f.code.format(*parts), True, True)
    # a call torch.f(x) takes its argument as it is; another template gets it parenthesised
    call = re.fullmatch(r"[\w.]+\(\{0\}\)", f.code) is not None
    parts = [em.as_tensor(c) if not c.tensor else c.text if call else em.operand(c) for c in codes]
    return _Code(f.code.format(*parts), True, not call)


def _emit_reduce(em: _Emitter, ins: Instr) -> _Code:
    arg = em.finite(ins.args[0])
    text = em.operand(arg) if arg.tensor else em.as_tensor(arg)
    return _Code(f"{text}.{ins.attrs['fn']}()", True)


def _emit_apply(em: _Emitter, ins: Instr) -> _Code:
    x = em.value(ins.args[0]).text
    root = ins.attrs["root"]
    if root == em.net.model.name:
        return _Code(f"model({x})", True)
    params = em.snapshot.get(ins.id, em.local(root))
    return _Code(f"torch.func.functional_call(model, {params}, ({x},))", True)


def _emit_loss(em: _Emitter, ins: Instr) -> _Code:
    f, y = (em.value(i).text for i in ins.args)
    helper = f"{ins.attrs['loss']}_loss"
    em.helpers.update((helper, "checked"))
    return _Code(f"checked({helper}({f}, {y}))", True)


def _emit_named_loss(em: _Emitter, ins: Instr) -> _Code:
    loss = em.net.losses[ins.attrs["loss"]]
    f = em.value(ins.args[0]).text
    data = [em.names[loss.target]] if loss.target else [em.names[d] for d in loss.args[1:]]
    if len(ins.args) > 1:
        rows = em.rows_index(ins.args[1])
        data = [f"{d}[{rows}] if {d}.dim() else {d}" for d in data]
    em.helpers.add("checked")
    return _Code(f"checked(loss_{loss.name}({', '.join([f, *data])}))", True)


def _emit_grad(em: _Emitter, ins: Instr) -> _Code:
    em.helpers.add("grad")
    layers = repr(tuple(em.names[la] for la in ins.attrs["layers"]))
    return _Code(f"grad({em.value(ins.args[0]).text}, {em.grad_params[ins.id]}, {layers})", False)


def _emit_read(em: _Emitter, ins: Instr) -> _Code:
    a = ins.attrs
    if a["what"] == "state":
        return _Code(em.local(a["name"]), False)
    if a["root"] != em.net.model.name:  # states and copies are never changed in place
        return _Code(em.local(a["root"]), False)
    layers = [em.names[la] for la in a["layers"]]
    if len(layers) == len(em.net.parameters):
        em.helpers.add("weights")
        what = "weights(model)"
    else:
        what = "{" + ", ".join(f"{la!r}: model.{la}" for la in layers) + "}"
    if ins.id in em.inlined:
        return _Code(what, False)
    # on a line of its own: used after its parameters may change, so keep today's values
    return _Code(f"{{k: w.detach().clone() for k, w in {what}.items()}}", False)


def _emit_zeros(em: _Emitter, ins: Instr) -> _Code:
    return _Code("{}", False)


def _emit_lincomb(em: _Emitter, ins: Instr) -> _Code:
    return _Code(em.terms(ins.attrs["terms"]), False)


def _emit_ewise(em: _Emitter, ins: Instr) -> _Code:
    """{k: f(M[k], S[k], ...) for k in layers}: the function layer by layer, entry by entry."""
    from tpc.backends.torch.codegen import _tree_code

    args = []
    for i, grad in zip(ins.args, ins.attrs["grads"], strict=True):
        if INSTRUCTIONS[em.instrs[i].op].kind == "params":
            em.helpers.add("at")  # a gradient is read at its natural scale, n^s_l dL/dw^l
            args.append(f"at({em.value(i).text}, k)" + (" * natural[k]" if grad else ""))
        else:
            args.append(em.tensor(i))
    layers = repr(tuple(em.names[la] for la in ins.attrs["layers"]))
    return _Code(f"{{k: {_tree_code(ins.attrs['tree'], args)} for k in {layers}}}", False)


def _emit_state(em: _Emitter, ins: Instr) -> None:
    em.lines.append(f"{em.indent}{em.local(ins.attrs['name'])} = {em.terms(ins.attrs['terms'])}{em.comment(ins)}")


def _emit_copy(em: _Emitter, ins: Instr) -> None:
    a = ins.attrs
    if a["source"] == em.net.model.name:
        em.helpers.update(("copied", "weights"))
        em.lines.append(f"{em.indent}{em.local(a['name'])} = copied(weights(model)){em.comment(ins)}")
    else:
        em.lines.append(f"{em.indent}{em.local(a['name'])} = dict({em.local(a['source'])}){em.comment(ins)}")


def _emit_update(em: _Emitter, ins: Instr) -> None:
    em.lines.append(em.indent + _update_code(em, ins) + em.comment(ins))


def _update_code(em: _Emitter, ins: Instr) -> str:
    a = ins.attrs
    mode, target = a["mode"], a["target"]
    if a["what"] == "state":
        name = em.local(target)
        if mode == "=":
            return f"{name} = {em.terms(a['terms'])}"
        sign = -1.0 if mode == "-=" else 1.0
        em.helpers.add("combine")
        if len(a["terms"]) == 1:
            delta = em.terms(a["terms"], sign)
            return f"{name} = {delta}" if delta == "{}" else \
                f"{name} = combine((1.0, {name}), {delta[len('combine('):-1]})"
        return f"{name} = combine((1.0, {name}), ({_num(sign)}, {em.terms(a['terms'])}))"
    model = a["root"] == em.net.model.name
    params = "weights(model)" if model else em.local(a["root"])
    em.helpers.add("weights")
    if mode == "=":
        em.helpers.add("replaced")
        layers = repr(tuple(em.names[la] for la in a["layers"]))
        new = f"replaced({params}, {em.terms(a['terms'])}, {layers})"
    else:
        em.helpers.add("shifted")
        sign = "-" if mode == "-=" else ""
        alpha = sign + ("scale" if a["scaled"] else "1.0")
        flags = a.get("adaptive") or [False] * len(a["terms"])
        plain = [t for t, f in zip(a["terms"], flags, strict=True) if not f]
        entrywise = [t for t, f in zip(a["terms"], flags, strict=True) if f]
        new = f"shifted({params}, {em.terms(plain)}, {alpha})" if plain or not entrywise else params
        if entrywise:  # entrywise (adaptive) terms: each layer's own factor n^-c'_l
            factor = "adaptive" if a["scaled"] else "None"
            new = f"shifted({new}, {em.terms(entrywise)}, {sign or ''}1.0, {factor})"
    if model:
        em.helpers.add("assign")
        return f"assign(model, {new})"
    return f"{em.local(a['root'])} = {new}"


def _emit_record(em: _Emitter, ins: Instr) -> None:
    target = "records" if em.depth == 1 else f"inner{em.depth}"
    v = em.value(ins.args[0])
    if em.instrs[ins.args[0]].op == "apply" and em.net.output_dim() == 1:  # f(X): one number per row
        value = f"{em.operand(v)}[..., 0].detach()"
    elif not em.instrs[ins.args[0]].attrs.get("scalar"):
        value = f"{em.operand(v)}.detach()"
    else:
        value = f"{em.operand(v)}.item()" if v.tensor else f"float({v.text})"
    em.lines.append(f"{em.indent}{target}[{ins.attrs['name']!r}].append({value}){em.comment(ins)}")


def _emit_loop(em: _Emitter, ins: Instr) -> None:
    indent, depth, out = em.indent, em.depth, em.lines
    names = em.prog.recorded(ins)
    if depth >= 1 and names:
        out.append(f"{indent}inner{depth + 1} = {{{', '.join(f'{n!r}: []' for n in names)}}}")
    elif names:
        out += [f"{indent}records[{n!r}] = []" for n in names]
    trip = "stream.steps" if "stream" in ins.attrs else ins.attrs["trip"]  # a stream's: its batches
    out.append(f"{indent}for {em.local(ins.attrs['counter'])} in range({trip}):{em.comment(ins)}")
    em.emit(ins.attrs["body"], indent + "    ", depth + 1)
    if depth >= 1:
        outer = "records" if depth == 1 else f"inner{depth}"
        out += [f"{indent}{outer}[{n!r}].append(inner{depth + 1}[{n!r}])" for n in names]


def _adaptive_line(net: Network, em: _Emitter) -> list[str]:
    if not net.entrywise:
        return []
    layers = net.layers.items()
    factors = ", ".join(f"{em.names[name]!r}: n ** {_num(-net.adaptive_exponent(la))}" for name, la in layers)
    scales = ", ".join(f"{em.names[name]!r}: n ** {_num(net.natural_exponent(la))}" for name, la in layers)
    return [f"    adaptive = {{{factors}}}  # n^-c'_l: each layer's factor on entrywise (Adam-like) updates",
            f"    natural = {{{scales}}}  # n^s_l: an entrywise function reads dL/dw^l at its natural scale"]


def loop_lines(net: Network, names: dict[str, str]) -> list[str]:
    """The emitted file's train() for a program whose training is written as loops, and its helpers."""
    em = _Emitter(net, names)
    data = [names[d] for d in train_data(net)]
    top = net.program.top
    changes = sorted({o.data for o in net.outputs if o.kind == "feature_change"})
    body: list[str] = []
    em.lines = body
    if changes:
        em.helpers.add("features")
        body.append("    initial = {" + ", ".join(f"{names[x]!r}: features(model, {names[x]})" for x in changes)
                    + "} if outputs is not None else {}")
    for position, i in enumerate(top):
        em.outputs(position, "    ")
        if i not in em.inlined:
            em.instruction(net.program.instrs[i], "    ", 0)
    em.outputs(len(top), "    ")
    body.append("    return records")
    params = "".join(f", {d}: torch.Tensor" for d in data)
    c = net.abc.c
    recorded = list(net.program.records)
    doc = [
        '    """The program\'s training loops on `model`, which is left trained. Returns the records, one value per',
        "    step (a float for a number, else a tensor; a list per run of a nested loop)"
        + (f": {_comment(', '.join(recorded))}." if recorded else "; this program records nothing."),
        "",
        f"    Updates of parameters are scaled as optimizer() scales SGD: `P -= e` is w <- w - n^-c e (c = {c:g}),",
        "    grad(L, P) is dL/dw; states and plain assignments are not scaled. If `outputs` is a dict, the",
        "    program's outputs are put in it, each evaluated where the program writes it among the loops",
        "    (as `tpc run` does for one seed).",
        *(["    An entrywise (adaptive) term of an update, Adam's or sign-SGD's, moves w^l by n^-c'_l instead",
           "    (`adaptive`, per layer); an entrywise function reads a gradient as n^s_l dL/dw^l (`natural`),",
           "    whose entries stay of order one at any width."] if net.entrywise else []),
        '    """',
    ]
    head = [
        "", "",
        f"def train(model: Network{params},",
        "          outputs: dict[str, torch.Tensor] | None = None) -> dict[str, list]:",
        *doc,
        "    n = model.width",
        f"    scale = n ** {_num(-c)}  # n^-c: the parametrization's factor on every update of parameters",
        *_adaptive_line(net, em),
        "    records: dict[str, list] = {}",
    ]
    return _helper_lines(net, names, em.helpers) + head + body


# --- the helpers train() calls, emitted when used

_HELPER_CODE: dict[str, list[str]] = {
    "num": [
        "def num(x: float) -> torch.Tensor:",
        '    """A number as the loops compute with it: a float64 tensor."""',
        "    return torch.as_tensor(x, dtype=torch.float64)",
    ],
    "whole": [
        "def whole(i: torch.Tensor | float) -> torch.Tensor:",
        '    """An index or a step: whole numbers, as a long tensor."""',
        "    i = torch.as_tensor(i)",
        "    if i.is_floating_point() and not torch.equal(i, torch.round(i)):",
        "        raise ValueError(f'an index must be a whole number, got {i.flatten()[0]:g}')",
        "    return i.long()",
    ],
    "pick": [
        "def pick(x: torch.Tensor, i: torch.Tensor | float) -> torch.Tensor:",
        '    """x[i]: the rows i of x (whole numbers in 0 .. rows - 1)."""',
        "    i = whole(i)",
        "    if ((i < 0) | (i >= x.shape[0])).any():",
        "        raise IndexError(f'an index is outside the {x.shape[0]} rows')",
        "    return x[i]",
    ],
    "batch_at": [
        "def batch_at(stream: Stream, t: torch.Tensor | int, dtype: torch.dtype, device: torch.device) -> StepBatch:",
        '    """Batch t of the stream (a whole number), as tensors."""',
        "    return step_batch(stream.at(int(whole(t))), dtype, device)",
    ],
    "batch_rows": [
        "def batch_rows(t: torch.Tensor | int, size: int, m: int) -> torch.Tensor:",
        '    """Step t\'s batch: rows tB .. tB + B - 1 (mod m) of a data set of m rows, B = size."""',
        "    return (torch.arange(size) + int(whole(t)) * size) % m",
    ],
    "finite_output": [
        "def finite_output(name: str, value: torch.Tensor) -> None:",
        '    """An output is never returned when it is not finite (as tpc run refuses it)."""',
        "    if not torch.isfinite(value).all():",
        "        raise FloatingPointError(f'output {name} is not finite')",
    ],
    "checked": [
        "def checked(loss: torch.Tensor) -> torch.Tensor:",
        '    """The loss, refused when it is not finite (training diverged: lower the learning rate)."""',
        "    if not torch.isfinite(loss).all():",
        "        raise FloatingPointError('training diverged: the loss is not finite')",
        "    return loss",
    ],
    "combine": [
        "def combine(*terms: tuple[torch.Tensor | float, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:",
        '    """sum_i c_i P_i, layer by layer, for numbers c_i and values P_i of layers (a layer that P_i',
        '    lacks counts as zero)."""',
        "    out: dict[str, torch.Tensor] = {}",
        "    with torch.no_grad():",
        "        for c, part in terms:",
        "            for k, v in part.items():",
        "                out[k] = v.detach() * c if k not in out else out[k] + v.detach() * c",
        "    return out",
    ],
    "at": [
        "def at(values: dict[str, torch.Tensor], k: str) -> torch.Tensor:",
        '    """Layer k\'s entry of a value for layers (zero where it has none yet)."""',
        "    return values[k] if k in values else torch.zeros((), dtype=torch.float64)",
    ],
    "weights": [
        "def weights(model: Network) -> dict[str, torch.Tensor]:",
        '    """The model\'s trained parameters w^l, by name (not its fixed random matrices: a copy\'s forward',
        '    pass, torch.func.functional_call, takes those from the model)."""',
        "    return {k: w for k, w in model.named_parameters() if w.requires_grad}",
    ],
    "copied": [
        "def copied(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:",
        '    """A copy of parameters (for a copy of the model: its layers, which grad() can differentiate)."""',
        "    return {k: w.detach().clone().requires_grad_(True) for k, w in params.items()}",
    ],
    "shifted": [
        "def shifted(params: dict[str, torch.Tensor], step: dict[str, torch.Tensor], alpha: float,",
        "            factor: dict[str, float] | None = None) -> dict[str, torch.Tensor]:",
        '    """New values of parameters: w + alpha * step (times factor[k] for layer k, if given) for the',
        '    layers of step, the others as they were."""',
        "    out = dict(params)",
        "    for k, d in step.items():",
        "        a = alpha if factor is None else alpha * factor[k]",
        "        out[k] = (params[k].detach() + a * d).requires_grad_(True)",
        "    return out",
    ],
    "replaced": [
        "def replaced(params: dict[str, torch.Tensor], step: dict[str, torch.Tensor],",
        "             layers: tuple[str, ...]) -> dict[str, torch.Tensor]:",
        '    """New values of parameters: `P = step` for the given layers (zero where step has none)."""',
        "    out = dict(params)",
        "    for k in layers:",
        "        value = step[k] if k in step else torch.zeros_like(params[k])",
        "        out[k] = value.detach().clone().requires_grad_(True)",
        "    return out",
    ],
    "assign": [
        "def assign(model: Network, params: dict[str, torch.Tensor]) -> None:",
        '    """The model\'s parameters take these values (in place)."""',
        "    with torch.no_grad():",
        "        for k, w in model.named_parameters():",
        "            if k in params and params[k] is not w:",
        "                w.copy_(params[k])",
    ],
    "grad": [
        "def grad(loss: torch.Tensor, params: dict[str, torch.Tensor],",
        "         layers: tuple[str, ...]) -> dict[str, torch.Tensor]:",
        '    """dL/dw for the given layers of params (zero for a layer the loss does not depend on)."""',
        "    leaves = [params[k] for k in layers]",
        "    grads = torch.autograd.grad(loss, leaves, allow_unused=True, retain_graph=True)",
        "    return {k: torch.zeros_like(w) if g is None else g for k, w, g in zip(layers, leaves, grads)}",
    ],
    "stacked": [
        "def stacked(values: list) -> torch.Tensor:",
        '    """A record as one tensor: the steps first (a nested loop\'s steps next)."""',
        "    if not values:",
        "        return torch.zeros((0,), dtype=torch.float64)",
        "    return torch.stack([stacked(v) if isinstance(v, list) else torch.as_tensor(v, dtype=torch.float64)",
        "                        if not isinstance(v, torch.Tensor) else v for v in values])",
    ],
}
_NEEDS = {"pick": ("whole",), "batch_rows": ("whole",), "batch_at": ("whole",)}


def _helper_lines(net: Network, names: dict[str, str], used: set[str]) -> list[str]:
    from tpc.backends.torch.emit_network import _loss_code

    for name in list(used):
        used.update(_NEEDS.get(name, ()))
    lines: list[str] = []
    for name in HELPERS:
        if name not in used:
            continue
        if name in _HELPER_CODE:
            code = _HELPER_CODE[name]
        elif name == "features":
            code = _features_code(net, names)
        else:  # mse_loss, xent_loss, logistic_loss: the loops' built-in losses
            kind = name[: -len("_loss")]
            code = [f"def {name}(F: torch.Tensor, y: torch.Tensor) -> torch.Tensor:",
                    f'    """{kind}(F, y) on outputs F (B, k) against the targets y, averaged over the rows."""',
                    *["    " + line for line in _loss_code(Loss(name, kind, "<x>", "y", None), {"y": "y"})]]
        lines += ["", "", *code]
    return lines


def _features_code(net: Network, names: dict[str, str]) -> list[str]:
    """The model's forward pass up to its features (the last hidden vector): what `features(f, X)` and
    `feature_change(f, X)` compare."""
    from tpc.backends.torch.emit_network import forward_code

    lines = ["def features(model: Network, x: torch.Tensor) -> torch.Tensor:",
             '    """The model\'s features on the rows of x: (B, n), the vector its readout multiplies."""',
             "    m = model.multiplier"]
    lines += ["    " + line for line in forward_code(net, names, "model", net.model.features + 1)]
    flat = net.readout().taps
    if flat > 1:  # V @ flatten(h): each input's P rows side by side, (B, P n)
        v = f"s{net.model.features}"
        lines[-1] = f"    return {v}.reshape(*{v}.shape[:-2], -1, {flat} * {v}.shape[-1])"
    return lines
