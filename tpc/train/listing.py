"""`tpc graph --unrolled`: SGD training of a network program printed as the Netsor-transpose program
that `unroll.py` executes, step by step, for short runs.

Every hidden matrix appears only as its initial value W_0 (and W_0.T), corrected by the stored
updates: after s steps `W_s y = W_0 y + sum_{r<s} c_W dh_r (x_r . y / n)` and
`W_s.T g = W_0.T g + sum_{r<s} c_W x_r (dh_r . g / n)`. Input layers (finite fan-in), readouts and
biases have a finite side and are updated in place. Names: `h<i>` is the model's i-th value, `_t`
the step, `d` a gradient at its natural scale (n dL/dh), `chi` = dL/df.
"""

from __future__ import annotations

from tpc.errors import TpcError
from tpc.ops import expr as ex
from tpc.parametrization import limit_of_power
from tpc.passes.autodiff import derivative
from tpc.train.losses import batch_rows
from tpc.train.network import Network
from tpc.train.unroll import MAXIMAL_LR_EXPONENT

MAX_STEPS = 20


def unrolled_listing(net: Network, max_steps: int = MAX_STEPS) -> str:
    t = net.train
    if t is None:
        raise TpcError("--unrolled lists SGD training; this program has no train statement")
    if t.optimizer != "sgd":
        raise TpcError(f"--unrolled lists SGD training, not `train {t.optimizer}` (fomaml adapts a copy per task, "
                       "cbow updates tables of word vectors by index: see README)", t.span).locate(net.filename,
                                                                                                  net.source)
    if t.steps > max_steps:
        raise TpcError(f"--unrolled is for short runs: {t.steps} SGD steps, more than {max_steps}; lower steps "
                       "to read the program", t.span).locate(net.filename, net.source)
    steps = net.model.steps
    loss = net.losses[t.loss]
    m = net.data[loss.data].shape[0]
    name = ["x" if s.op == "input" else f"h{i}" for i, s in enumerate(steps)]
    name[-1] = "f"  # the readout, applied last
    lines = [f"# {net.filename}: {t.steps} SGD step(s) on {t.loss}, unrolled into a Netsor-transpose program",
             f"# parametrization {net.param_name}: a = {list(net.abc.a)}, b = {list(net.abc.b)}, c = {net.abc.c:g}"]
    regime = net.classification().regime
    if regime == "unstable":
        lines.append("# unstable: tpc refuses this program's limit")
    elif regime != "feature learning":
        lines.append(f"# {regime} regime: tpc's limit of this program is kernel gradient descent (README), not this "
                     "program with n -> oo")
    for la in net.layers.values():
        e = MAXIMAL_LR_EXPONENT[la.role] - net.lr_exponent(la)
        value = limit_of_power(e)
        limit = "oo" if value is None else f"{value:g}"
        lines.append(f"#   c_{la.name} = -{t.lr:g} n^{e:g}   (-> -{t.lr:g} x {limit} in the limit)")
    for s in range(t.steps):
        lines.append(f"\n# step {s}: rows {_rows(batch_rows(s, t.batch, m).tolist())} of {loss.data}")
        for i, step in enumerate(steps):
            if step.op != "input":
                lines.append(f"{name[i]}_{s} = {_forward(net, step, name, s, loss.data)}")
        lines.append(f"chi_{s} = d{t.loss}/df(f_{s}{', ' + loss.target if loss.target else ''})")
        lines += _backward(net, name, s)
        lines += _updates(net, name, s, loss.data)
    lines.append(f"\n# after training: every output evaluates the model at step {t.steps}'s weights")
    return "\n".join(lines) + "\n"


def _rows(rows: list[int]) -> str:
    return f"{rows[0]}..{rows[-1]}" if rows == list(range(rows[0], rows[-1] + 1)) else ", ".join(map(str, rows))


def _hidden(layer: str, arg: str, s: int, transposed: bool) -> str:
    w = f"{layer}_0.T" if transposed else f"{layer}_0"
    if s == 0:
        return f"{w} @ {arg}"
    if transposed:
        return f"{w} @ {arg} + sum_(r<{s}) c_{layer} x{layer}_r ({layer}dh_r . {arg} / n)"
    return f"{w} @ {arg} + sum_(r<{s}) c_{layer} {layer}dh_r (x{layer}_r . {arg} / n)"


def _forward(net: Network, step: object, name: list[str], s: int, data: str) -> str:
    if step.op == "bias":
        return f"{step.layer}_{s}"
    if step.op == "fn":
        return ex.render(step.tree, [f"{name[j]}_{s}" for j in step.args])
    la = net.layers[step.layer]
    arg = f"{name[step.args[0]]}_{s}" if net.model.steps[step.args[0]].op != "input" else f"{data}[rows]"
    if la.role == "input":
        return f"{la.name}_{s} @ {arg}"
    if la.role == "readout":
        return f"({la.name}_{s} . {arg}) / n   # the readout rows v = n {la.name}"
    return _hidden(la.name, arg, s, False)


def _backward(net: Network, name: list[str], s: int) -> list[str]:
    steps = net.model.steps
    out = steps[-1]
    grads: dict[int, list[str]] = {out.args[0]: [f"{out.layer}_{s}.T @ chi_{s}"]}
    lines = []
    for i in range(len(steps) - 2, -1, -1):
        step = steps[i]
        if i not in grads or step.op in ("input",):
            continue
        g = f"d{name[i]}_{s}"
        lines.append(f"{g} = {' + '.join(grads[i])}")
        if step.op == "bias":
            continue
        if step.op == "matmul":
            la = net.layers[step.layer]
            if la.role == "hidden":
                grads.setdefault(step.args[0], []).append(_hidden(la.name, g, s, True))
            continue
        for k, j in enumerate(step.args):
            if steps[j].kind != "vector":
                continue
            d = derivative(step.tree, k)
            grads.setdefault(j, []).append(f"({ex.render(d, [f'{name[a]}_{s}' for a in step.args])}) * {g}")
    return lines


def _updates(net: Network, name: list[str], s: int, data: str) -> list[str]:
    """One line per layer; a layer used several times sums its uses (hidden: stores one pair per use)."""
    terms: dict[str, list[str]] = {}  # finite layers' update terms
    pairs: dict[str, list[tuple[str, str]]] = {}  # hidden layers' stored (x, dh)
    for i, step in enumerate(net.model.steps):
        if step.op not in ("matmul", "bias"):
            continue
        la, dh = net.layers[step.layer], f"d{name[i]}_{s}"
        x = f"{data}[rows]" if la.role == "input" else f"{name[step.args[0]]}_{s}" if step.args else ""
        if la.role == "hidden":
            pairs.setdefault(la.name, []).append((x, dh))
        else:
            term = {"bias": f"sum_rows {dh}", "input": f"{x}.T {dh}", "readout": f"chi_{s}.T {x}"}[la.role]
            terms.setdefault(la.name, []).append(term)
    lines = []
    for layer, parts in terms.items():
        total = parts[0] if len(parts) == 1 else "(" + " + ".join(parts) + ")"
        note = {"input": "   # d columns", "readout": "   # rows v: finite k x n"}.get(net.layers[layer].role, "")
        lines.append(f"{layer}_{s + 1} = {layer}_{s} + c_{layer} {total}{note}")
    for layer, used in pairs.items():
        xs, ds = (used[0][0], used[0][1]) if len(used) == 1 else \
            (f"[{', '.join(x for x, _ in used)}]", f"[{', '.join(d for _, d in used)}]")
        per_use = " (one pair per use)" if len(used) > 1 else ""
        lines.append(f"x{layer}_{s}, {layer}dh_{s} = {xs}, {ds}   # stored{per_use}; {layer}_{s + 1} is never formed")
    return lines
