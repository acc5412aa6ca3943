"""`tpc graph --unrolled` for programs with loops: the loop instructions expanded step by step into
the straight-line Netsor-transpose program that `pooled.py` executes (for short runs).

Every value is named by the step it belongs to (`L.t2` in step t = 2; `.t1.k0` inside a nested
loop). A parameter is named by its version: `W@f3` is f's layer W after its 3rd update. Each
model application is expanded into its forward pass, each `grad` into its backward pass, and the
rows that `grad` stores for an n x n layer are listed; no version of an n x n layer is ever formed
as a matrix: `W@f3 y = a W_0 y + sum_p k_p dh_p (x_p . y / n)` over W's stored rows (x_p, dh_p),
with numbers a and k_p that the updates' linear combinations give.

Each op's listing is its rule `_list_<op>` below, which the registry of instructions
(tpc/train/instructions.py, the field `listing`) lists beside the op's other rules; the walk
(`_Lister.block`) dispatches through it. Numbers, counters, data sets and parameter reads are
written where they are used (`_Lister.ref`), with the versions of the parameters at that point.
"""

from __future__ import annotations

import numpy as np

from tpc.errors import TpcError
from tpc.ops import expr as ex
from tpc.passes.autodiff import derivative
from tpc.train.instructions import INSTRUCTIONS
from tpc.train.loops import FAN_IN_EXPONENT, MAXIMAL_LR_EXPONENT, Instr, row_index, whole_index
from tpc.train.losses import batch_rows
from tpc.train.network import Network, Step
from tpc.train.positions import patches_text, window_text
from tpc.train.show import INFIX, row_update_text, terms_text
from tpc.train.steps import STEPS

MAX_STEPS = 200  # loop iterations listed in all


class _Lister:
    def __init__(self, net: Network) -> None:
        self.net, self.prog = net, net.program
        self.stream_steps: int | None = None  # a word2vec stream's batches, counted when first listed
        self.lines: list[str] = []
        self.tag: list[str] = []  # the counters' values of the enclosing loops
        self.counters: dict[int, int] = {}
        self.version: dict[tuple[str, str], int] = {}  # (root, layer) -> updates so far
        self.stored: dict[str, int] = {}  # n x n layer -> rows stored so far
        self.names: dict[int, str] = {}  # instruction id -> its value's name in this step
        self.values: dict[int, object] = {}  # static values (counters, numbers, rows)
        self.applied: dict[int, tuple[str, list[str]]] = {}  # apply id -> (root, its forward pass's names)
        self.iterations = 0

    def say(self, text: str) -> None:
        self.lines.append("  " * len(self.tag) + text)

    def suffix(self) -> str:
        return "".join(f".{t}" for t in self.tag)

    def ref(self, i: int) -> str:
        """How instruction i is written where it is used: an inline op (the registry's `inline`) by itself,
        another by the name its listing gave it in this step."""
        ins = self.prog.instrs[i]
        if ins.op == "const":
            return f"{ins.attrs['value']:g}"
        if ins.op == "counter":
            return str(self.counters[i])
        if ins.op == "data":
            return ins.attrs["name"]
        if ins.op == "read":
            return self.params(ins.attrs["root"], ins.attrs["layers"], ins.attrs["what"], ins.attrs["name"])
        return self.names.get(i, f"%{i}")

    def params(self, root: str, layers: tuple[str, ...], what: str, name: str) -> str:
        if what == "state":
            return f"{name}@{self.version.get((name, ''), 0)}"
        vs = [self.version.get((root, la), 0) for la in layers]
        if what == "layer" or len(set(vs)) > 1:
            return "(" + ", ".join(f"{la}@{root}{v}" for la, v in zip(layers, vs, strict=True)) + ")"
        return f"{root}@{vs[0]}"

    def layer(self, root: str, name: str) -> str:
        return f"{name}@{root}{self.version.get((root, name), 0)}"

    # --- the walk
    def run(self) -> str:
        net = self.net
        self.lines += [f"# {net.filename}: the loops unrolled into a Netsor-transpose program",
                       f"# parametrization {net.param_name}: a = {list(net.abc.a)}, b = {list(net.abc.b)}, "
                       f"c = {net.abc.c:g}",
                       *self.regime(),
                       "# an update `P -= e` moves layer l by e times n^(e_l - 2 a_l - c) for gradient terms and n^-c "
                       "for parameter terms:"]
        entrywise = net.entrywise
        for la in net.layers.values():
            if la.fixed:
                self.lines.append(f"#   {la.name} (fixed {la.declared}): never updated")
                continue
            e = MAXIMAL_LR_EXPONENT[la.role] - net.lr_exponent(la)
            decay = 0.0 - net.abc.c
            adaptive = FAN_IN_EXPONENT[la.role] - net.ab(la)[0] - net.adaptive_exponent(la)
            self.lines.append(f"#   {la.name} ({la.role}): gradient terms n^{e:g}, parameter terms n^{decay:g}"
                              + (f", entrywise terms n^{adaptive:g}" if entrywise else ""))
        if any(la.role == "hidden" and not la.fixed for la in net.layers.values()):
            self.lines.append("# W@fk y = a W_0 y + sum_p k_p dh_p (x_p . y / n) over W's stored rows: only W_0 and "
                              "W_0.T multiply" + (" (and + Q y / n for W's entrywise updates Q)" if entrywise else ""))
        if entrywise:
            self.lines.append("# an entrywise function of an n x n layer's gradients is the n x n grid Q_ab = "
                              "psi(dh_a.., x_b..) of its stored pairs (Tensor Programs IVb's NE-OR-T); Q y / n "
                              "is, in the limit, E_b[Q(a, b) y_b] over the particles b")
        self.block(self.prog.top)
        return "\n".join(self.lines) + "\n"

    def regime(self) -> list[str]:
        regime = self.net.classification().regime
        if regime == "unstable":
            return ["# unstable: tpc refuses this program's limit"]
        if regime != "feature learning" and self.net.entrywise:
            return [f"# {regime} regime with entrywise updates: tpc refuses this program's limit (README)"]
        if regime != "feature learning":
            return [f"# {regime} regime: tpc's limit of this program is kernel gradient descent in function space "
                    "(README), not this program with n -> oo"]
        return []

    def block(self, ids: list[int]) -> None:
        for i in ids:
            ins = self.prog.instrs[i]
            INSTRUCTIONS[ins.op].listing(self, ins)

    def name(self, ins: Instr) -> str:
        base = ins.attrs.get("label") or f"v{ins.id}"
        self.names[ins.id] = base + self.suffix()
        return self.names[ins.id]

    def static(self, i: int) -> np.ndarray:
        return np.asarray(self.values[i])

    def hidden(self, root: str, layer: str, arg: str, transposed: bool) -> str:
        w = f"{layer}_0.T" if transposed else f"{layer}_0"
        v = self.version.get((root, layer), 0)
        p = self.stored.get(layer, 0)
        if v == 0 or p == 0:
            return f"{w} @ {arg}" + ("" if v == 0 else f"   # {layer}@{root}{v} = a {layer}_0")
        left, right = ("x", "dh") if transposed else ("dh", "x")
        return (f"a {w} @ {arg} + sum_(p<{p}) k_p {layer}{left}_p ({layer}{right}_p . {arg} / n)   "
                f"# a, k of {layer}@{root}{v}")

    def backward(self, root: str, h: list[str], loss: str, layers: tuple[str, ...], out: str) -> None:
        steps = self.net.model.steps
        self.say(f"# {out} = grad({loss}, {'/'.join(layers)} of {root}), backward through {h[-1]}:")
        chi = f"chi{self.suffix()}"
        self.say(f"  {chi} = d{loss}/d{h[-1]}   # finite")
        readout = steps[-1]
        taps = self.net.layers[readout.layer].taps  # V @ flatten(h): position p's own rows of V
        back = f"{self.layer(root, readout.layer)}.T @ {chi}" if taps == 1 else \
            f"{self.layer(root, readout.layer)}[p].T @ {chi}"
        grads: dict[int, list[str]] = {readout.args[0]: [back]}
        low = self.net.model.first_step_of(layers)  # as pooled.py's backward: nothing under it is needed
        for k in range(len(steps) - 2, low - 1, -1):
            step = steps[k]
            if k not in grads or step.kind == "data":
                continue
            g = f"d{h[k]}"
            self.say(f"  {g} = {' + '.join(grads[k])}")
            rule = STEPS[step.op].listing_backward  # `_listing_backward_<op>` below (tpc/train/steps.py)
            if rule is not None:
                rule(self, root, k, step, h, g, grads)
        finite: dict[str, list[str]] = {}
        for k, step in enumerate(steps):
            if step.op not in ("matmul", "bias") or step.layer not in layers:
                continue
            la = self.net.layers[step.layer]
            if la.role == "hidden":
                first = self.stored.get(la.name, 0)
                self.stored[la.name] = first + 1
                x, dh = (f"d{h[k]}", h[step.args[0]]) if step.transposed else (h[step.args[0]], f"d{h[k]}")
                self.say(f"  {la.name}x_{first}, {la.name}dh_{first} = {x}, {dh}   # stored: "
                         f"a block of rows of {la.name}")
            elif la.role == "bias":
                finite.setdefault(la.name, []).append(f"sum_rows d{h[k]}")
            elif la.role == "input":
                finite.setdefault(la.name, []).append(f"{h[step.args[0]]}.T d{h[k]}")
            else:
                finite.setdefault(la.name, []).append(f"{chi}.T {h[step.args[0]]}")
        for name, parts in finite.items():
            la = self.net.layers[name]
            rows = "k rows" if la.taps == 1 else f"k x {la.taps} rows: each position's"
            note = {"input": "   # d columns", "readout": f"   # {rows}"}.get(la.role, "")
            self.say(f"  {out}.{name} = {' + '.join(parts)}{note}")

    def terms(self, terms: list) -> str:
        return terms_text(terms, self.ref)


# --- the listing of each instruction (`listing` in tpc/train/instructions.py)


def _list_const(ls: _Lister, ins: Instr) -> None:
    """A number is written where it is used (`_Lister.ref`); its value is kept, to fold static arithmetic."""
    ls.values[ins.id] = ins.attrs["value"]


def _list_inline(ls: _Lister, ins: Instr) -> None:
    """Counters, data sets and parameter reads: nothing here, they are written where they are used
    (`_Lister.ref`; a counter's value is set by its loop, a read's text names the versions of that point)."""
    if ins.op == "data":  # its value, for the static arithmetic that picks rows (`S[min(k, D)]`)
        ls.values[ins.id] = ls.net.data[ins.attrs["name"]]


def _list_loop(ls: _Lister, ins: Instr) -> None:
    counter = next(i for i in ins.attrs["body"] if ls.prog.instrs[i].op == "counter")
    for t in range(ins.attrs["trip"]):
        ls.iterations += 1
        if ls.iterations > MAX_STEPS:
            raise TpcError(f"--unrolled is for short runs: more than {MAX_STEPS} loop iterations in all; lower "
                           "the trip counts to read the program", ins.span)
        ls.counters[counter] = t
        ls.values[counter] = t
        ls.say(f"# {ins.attrs['counter'].strip('<>')} = {t}")
        ls.tag.append(f"{ins.attrs['counter'].strip('<>')}{t}")
        ls.block(ins.attrs["body"])
        ls.tag.pop()


def _list_rows(ls: _Lister, ins: Instr) -> None:
    x = ls.prog.instrs[ins.args[0]].attrs["name"]
    t = int(whole_index(ls.static(ins.args[1]), ins.span))
    m = ls.net.data[x].shape[0]
    rows = batch_rows(t, ins.attrs["size"], m).tolist()
    ls.values[ins.id] = np.asarray(rows)
    ls.names[ins.id] = f"{x}[{_ranges(rows)}]"


def _list_index(ls: _Lister, ins: Instr) -> None:
    base = ls.prog.instrs[ins.args[0]]
    source = base.attrs["name"] if base.op == "data" else ls.names[ins.args[0]]
    i = row_index(ls.static(ins.args[1]), ins.span, len(ls.values[ins.args[0]]) if base.op != "data" else
                  ls.net.data[base.attrs["name"]].shape[0], source)
    if base.op == "data":
        ls.values[ins.id] = ls.net.data[base.attrs["name"]][i]
        ls.names[ins.id] = f"{base.attrs['name']}[{_ranges(np.atleast_1d(i).tolist())}]"
    else:
        inner = ls.values[ins.args[0]]
        ls.values[ins.id] = np.asarray(inner)[i]
        ls.names[ins.id] = f"{ls.names[ins.args[0]]}[{int(i) if i.ndim == 0 else _ranges(i.tolist())}]"


def _list_fn(ls: _Lister, ins: Instr) -> None:
    args = [ls.ref(a) for a in ins.args]
    if ins.static and all(a in ls.values for a in ins.args):
        import torch

        from tpc.ops.functions import FUNCTIONS

        vals = [torch.as_tensor(np.asarray(ls.values[a], dtype=np.float64)) for a in ins.args]
        fn = ins.attrs["fn"]
        v = {"min": torch.minimum, "max": torch.maximum, "mod": torch.remainder}.get(fn, None)
        value = (v(*vals) if v else FUNCTIONS[fn].torch(*vals)).numpy()
        ls.values[ins.id] = value
        ls.names[ins.id] = f"{float(value):g}" if value.ndim == 0 else ls.name(ins)
        return
    text = f"{args[0]} {INFIX[ins.attrs['fn']]} {args[1]}" if ins.attrs["fn"] in INFIX else \
        f"{ins.attrs['fn']}({', '.join(args)})"
    ls.say(f"{ls.name(ins)} = {text}")


def _list_reduce(ls: _Lister, ins: Instr) -> None:
    ls.say(f"{ls.name(ins)} = {ins.attrs['fn']}({ls.ref(ins.args[0])})   # finite")


def _list_apply(ls: _Lister, ins: Instr) -> None:
    root, x = ins.attrs["root"], ls.ref(ins.args[0])
    out = ls.name(ins)
    steps = ls.net.model.steps
    h = [patches_text(x, s.patches) if s.op == "input" else f"h{k}{ls.suffix()}" for k, s in enumerate(steps)]
    h[-1] = out
    ls.say(f"# {out} = {root}({x}), forward:")
    for k, step in enumerate(steps):  # each op's text: `_listing_<op>` below (tpc/train/steps.py)
        if step.op != "input":
            ls.say(f"  {h[k]} = {STEPS[step.op].listing(ls, root, step, h)}")
    ls.values.pop(ins.id, None)
    ls.applied[ins.id] = (root, h)


def _listing_input(ls: _Lister, root: str, step: Step, h: list[str]) -> str:  # pragma: no cover - not listed
    return h[0]


def _listing_bias(ls: _Lister, root: str, step: Step, h: list[str]) -> str:
    return ls.layer(root, step.layer)


def _listing_fn(ls: _Lister, root: str, step: Step, h: list[str]) -> str:
    return ex.render(step.tree, [h[j] for j in step.args])


def _listing_moment(ls: _Lister, root: str, step: Step, h: list[str]) -> str:
    return f"mean({h[step.args[0]]})   # finite: one number per input"


def _listing_pool(ls: _Lister, root: str, step: Step, h: list[str]) -> str:
    return f"pool({h[step.args[0]]})   # the mean over positions"


def _listing_shift(ls: _Lister, root: str, step: Step, h: list[str]) -> str:
    return f"shift({h[step.args[0]]}, {', '.join(map(str, step.offset))})   # zero beyond the edges"


def _listing_window(ls: _Lister, root: str, step: Step, h: list[str]) -> str:
    return (f"window({h[step.args[0]]}, {window_text(step.window)})   # the mean over each window of positions "
            "(start:stop:stride xsize per axis)")


def _listing_backward_window(ls: _Lister, root: str, k: int, step: Step, h: list[str], g: str,
                             grads: dict[int, list[str]]) -> None:
    grads.setdefault(step.args[0], []).append(f"window.T({g}, {window_text(step.window)})")  # spread back


def _listing_backward_shift(ls: _Lister, root: str, k: int, step: Step, h: list[str], g: str,
                            grads: dict[int, list[str]]) -> None:
    grads.setdefault(step.args[0], []).append(f"shift({g}, {', '.join(str(-s) for s in step.offset)})")


def _listing_attend(ls: _Lister, root: str, step: Step, h: list[str]) -> str:
    hq, hk, hv = (h[j] for j in step.args)
    heads = (f"; {step.heads} heads at width n, each over n/{step.heads} coordinates, one head in the limit"
             if step.heads > 1 else "")
    return (f"a({hq}, {hk}) @ {hv}   # a = softmax over positions of ({hq} . {hk} / n) "
            f"n^{1 - ls.net.attention:g}: finite, per input{heads}")


def _listing_matmul(ls: _Lister, root: str, step: Step, h: list[str]) -> str:
    la = ls.net.layers[step.layer]
    arg = h[step.args[0]]
    if la.role == "input":
        return f"{ls.layer(root, la.name)} @ {arg}"
    if la.flattens:
        return (f"sum_p ({ls.layer(root, la.name)}[p] . {arg}[p]) / n   # finite: at each of the {la.taps} positions "
                f"its own readout rows v = n {la.name}")
    if la.role == "readout":
        return f"({ls.layer(root, la.name)} . {arg}) / n   # finite: the readout rows v = n {la.name}"
    return ls.hidden(root, la.name, arg, step.transposed)


def _listing_backward_matmul(ls: _Lister, root: str, k: int, step: Step, h: list[str], g: str,
                             grads: dict[int, list[str]]) -> None:
    la = ls.net.layers[step.layer]
    if la.role == "hidden":
        grads.setdefault(step.args[0], []).append(ls.hidden(root, la.name, g, not step.transposed).split("   #")[0])


def _listing_backward_moment(ls: _Lister, root: str, k: int, step: Step, h: list[str], g: str,
                             grads: dict[int, list[str]]) -> None:
    grads.setdefault(step.args[0], []).append(g)  # m = mean(a): n dL/da = dL/dm in every coordinate


def _listing_backward_pool(ls: _Lister, root: str, k: int, step: Step, h: list[str], g: str,
                           grads: dict[int, list[str]]) -> None:
    P = ls.net.model.steps[step.args[0]].positions  # noqa: N806
    grads.setdefault(step.args[0], []).append(f"{g} / {P}   # at every position")


def _listing_backward_attend(ls: _Lister, root: str, k: int, step: Step, h: list[str], g: str,
                             grads: dict[int, list[str]]) -> None:
    hq, hk, hv = (h[j] for j in step.args)  # a = softmax(s), s = q.k / n^e: see tpc/train/positions.py
    ds = f"ds{h[k]}"
    ls.say(f"  {ds} = softmax'({hq}, {hk}) applied to ({g} . {hv} / n)   # finite: per input, P x P")
    # n dL/dq_p = n^(1-e) sum_r ds_pr k_r: the logits' scale n^-e, against the gradient's n
    power = "" if ls.net.attention == 1 else f"n^{1 - ls.net.attention:g} "
    grads.setdefault(step.args[0], []).append(f"{power}{ds} @ {hk}")
    grads.setdefault(step.args[1], []).append(f"{power}{ds}.T @ {hq}")
    grads.setdefault(step.args[2], []).append(f"a({hq}, {hk}).T @ {g}")


def _listing_backward_fn(ls: _Lister, root: str, k: int, step: Step, h: list[str], g: str,
                         grads: dict[int, list[str]]) -> None:
    steps = ls.net.model.steps
    for j_arg, j in enumerate(step.args):
        if steps[j].kind in ("vector", "scalar"):
            d = derivative(step.tree, j_arg)
            term = f"({ex.render(d, [h[a] for a in step.args])}) * {g}"
            if steps[j].kind == "scalar" and step.kind == "vector":
                term = f"mean({term})"
            grads.setdefault(j, []).append(term)


def _list_loss(ls: _Lister, ins: Instr) -> None:
    ls.say(f"{ls.name(ins)} = {ins.attrs['loss']}({ls.ref(ins.args[0])}, {ls.ref(ins.args[1])})   # finite")


def _list_named_loss(ls: _Lister, ins: Instr) -> None:
    on = f" on {ls.ref(ins.args[1])}" if len(ins.args) > 1 else ""
    ls.say(f"{ls.name(ins)} = {ins.attrs['loss']}({ls.ref(ins.args[0])}){on}   # finite")


def _list_grad(ls: _Lister, ins: Instr) -> None:
    out = ls.name(ins)
    loss = ls.ref(ins.args[0])
    for a in ins.args[1:]:
        root, h = ls.applied[a]
        ls.backward(root, h, loss, ins.attrs["layers"], out)


def _list_zeros(ls: _Lister, ins: Instr) -> None:
    ls.names[ins.id] = f"zeros({', '.join(ins.attrs['layers'])})"


def _list_lincomb(ls: _Lister, ins: Instr) -> None:
    ls.say(f"{ls.name(ins)} = {ls.terms(ins.attrs['terms'])}")


def _list_ewise(ls: _Lister, ins: Instr) -> None:
    args = [ls.ref(i) for i in ins.args]
    ls.say(f"{ls.name(ins)} = {ex.render(ins.attrs['tree'], args)}   # entrywise, each layer's entries (grads "
           "at n^s dL/dw)")


def _list_state(ls: _Lister, ins: Instr) -> None:
    name = ins.attrs["name"]
    ls.version[(name, "")] = 0
    ls.say(f"{name}@0 = {ls.terms(ins.attrs['terms'])}")


def _list_copy(ls: _Lister, ins: Instr) -> None:
    name, src = ins.attrs["name"], ins.attrs["source"]
    for la in ins.attrs["layers"]:
        ls.version[(name, la)] = 0
    ls.say(f"{name}@0 = {ls.params(src, ins.attrs['layers'], 'model', src)}   # a copy: the same numbers a, k")


def _list_update(ls: _Lister, ins: Instr) -> None:
    text = ls.terms(ins.attrs["terms"])
    root, what = ins.attrs["root"], ins.attrs["what"]
    old = ls.params(root, ins.attrs["layers"], what, ins.attrs["target"])
    if what == "state":
        ls.version[(root, "")] = ls.version.get((root, ""), 0) + 1
    else:
        for la in ins.attrs["layers"]:
            ls.version[(root, la)] = ls.version.get((root, la), 0) + 1
    new = ls.params(root, ins.attrs["layers"], what, ins.attrs["target"])
    op = ins.attrs["mode"]
    if op != "=" and len(ins.attrs["terms"]) > 1:
        text = f"({text})"
    rhs = text if op == "=" else f"{old} {op[0]} {text}"
    note = "   # scaled per layer (header)" if ins.attrs["scaled"] else ""
    ls.say(f"{new} = {rhs}{note}")


def _list_record(ls: _Lister, ins: Instr) -> None:
    ls.say(f"record {ins.attrs['name']}[{', '.join(ls.tag)}] = {ls.ref(ins.args[0])}")


def _list_stream(ls: _Lister, ins: Instr) -> None:
    from tpc.train.cbow import checked_stream

    t = int(whole_index(ls.static(ins.args[0]), ins.span))
    if ls.stream_steps is None:
        ls.stream_steps = checked_stream(ls.net).steps
    if not 0 <= t < ls.stream_steps:
        raise TpcError(f"the stream has {ls.stream_steps} batches: there is no batch {t}", ins.span)
    ls.say(f"{ls.name(ins)} = {ins.attrs['stream']}[{t}]   # static: centre words, contexts, negatives, rate")


def _list_gather(ls: _Lister, ins: Instr) -> None:
    read = ls.prog.instrs[ins.args[0]]
    table, b = ls.layer(read.attrs["root"], ins.attrs["layer"]), ls.ref(ins.args[1])
    if ins.attrs["form"] == "bag":
        ls.say(f"{ls.name(ins)} = bag({table}, {b})   # each position's sum of its context's rows")
    else:
        ls.say(f"{ls.name(ins)} = {table}[{b}.words]   # the rows of each position's centre word and negatives")


def _list_logits(ls: _Lister, ins: Instr) -> None:
    ls.say(f"{ls.name(ins)} = logits({ls.ref(ins.args[0])}, {ls.ref(ins.args[1])})   # v . h / n: finite")


def _list_ns_loss(ls: _Lister, ins: Instr) -> None:
    ls.say(f"{ls.name(ins)} = negative_sampling({ls.ref(ins.args[0])}, {ls.ref(ins.args[1])})   # finite")


def _list_ns_grad(ls: _Lister, ins: Instr) -> None:
    ls.say(f"{ls.name(ins)} = grad({ls.ref(ins.args[0])}, {ls.ref(ins.args[1])})   # finite")


def _list_scatter_add(ls: _Lister, ins: Instr) -> None:
    root, layer = ins.attrs["root"], ins.attrs["layer"]
    b, g, rows = (ls.ref(i) for i in ins.args)
    old = ls.layer(root, layer)
    ls.version[(root, layer)] = ls.version.get((root, layer), 0) + 1
    ls.say(f"{ls.layer(root, layer)} = {old}, then {row_update_text(old, ins.attrs, b, g, rows)}   # scaled per "
           "layer (header); the other rows stay")


def _ranges(rows: list[int]) -> str:
    if len(rows) > 1 and rows == list(range(rows[0], rows[-1] + 1)):
        return f"{rows[0]}..{rows[-1]}"
    return ", ".join(map(str, rows))


def unrolled_loops(net: Network) -> str:
    return _Lister(net).run()
