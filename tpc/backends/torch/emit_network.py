"""A network program as a standalone PyTorch file (it imports only torch): the model as an
`nn.Module` at width n, initialised by the parametrization; a function that builds SGD with the
parametrization's per-layer learning rates; the program's losses; and its training loop.

The conventions are tpc's (see README, *Training and parametrizations*): layer l is
`W^l = n^-a_l w^l` with `w^l ~ N(0, var_l n^-2b_l / fan_in)`, the module's parameters are the
`w^l`, and SGD moves them by `lr n^-c dL/dw^l`. Seed s draws every layer's standard normals from
`torch.Generator().manual_seed(s)` in the program's order of declaration, as `tpc run` does, so
the emitted module trained by the emitted loop reproduces `tpc run` at the same seed (to
round-off: tpc vectorises over seeds).
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from tpc.backends.torch.codegen import MODULE_NAMES, PYTHON_NAMES, _comment, _num, _tree_code, safe_names
from tpc.errors import TpcError
from tpc.ops import expr as ex
from tpc.train.network import Loss, Network, Step

# names the emitted file defines or uses itself (functions, their locals and parameters)
_NET_TAKEN = PYTHON_NAMES | MODULE_NAMES | {
    "multiplier", "width", "Network", "optimizer", "train", "adapt", "LR", "loss_task", "_task_loss", "n", "x",
    "F", "f", "s", "y", "onehot", "model", "lr", "steps", "batch", "history", "rows", "value", "opt", "gen",
    "seed", "dtype", "device", "data", "m", "k", "t", "i", "g", "p", "grads", "params", "rate", "total",
    "count", "adapted", "tasks", "inner_lr", "inner_steps", "labels", "P", "S", "SY", "Q", "QY"}
# those only `train sgd`'s and `train fomaml`'s functions use: free in a program written as loops
_SUGAR_NAMES = {"adapt", "loss_task", "_task_loss", "steps", "batch", "history", "rows", "value", "opt", "k", "t",
                "i", "g", "p", "grads", "params", "rate", "total", "count", "adapted", "tasks", "inner_lr",
                "inner_steps", "labels", "P", "S", "SY", "Q", "QY"}


LOOP_OPTIMIZERS = ("adam", "adamw", "signsgd")  # train statements emitted as the loops they desugar to


def program_names(net: Network) -> dict[str, str]:
    """Python identifiers for the program's layers (attributes of Network) and data (arguments of
    train and the losses), apart from each other and from every name the file uses itself."""
    taken = _NET_TAKEN | {f"{p}{i}" for i in range(len(net.model.steps)) for p in ("s", "a", "q", "k", "v", "x")} | \
        {f"loss_{lo}" for lo in net.losses}
    keys = list(dict.fromkeys([*net.layers, *net.data]))
    idents = [_identifier(k) for k in keys]  # a convolution's taps, `A[-1,0]`, become `A_m1_0`
    if net.program is not None and (net.train is None or net.train.optimizer in LOOP_OPTIMIZERS or net.has_tables):
        # training written as loops, or a statement emitted as its loop: train()'s names (emit_loops)
        from tpc.backends.torch import emit_loops

        taken = (taken - _SUGAR_NAMES) | emit_loops.reserved(net)
        names = dict(zip(keys, safe_names(idents, taken), strict=True))
        local = [k for k in dict.fromkeys(emit_loops.user_names(net)) if k not in names]
        # a desugared statement's own names (`<m>`, `<history of L>`) become identifiers (`m`, `history_of_L`)
        idents = [k if k.isidentifier() else re.sub(r"\W+", "_", k).strip("_") or "v" for k in local]
        safe = safe_names(idents, emit_loops.reserved(net) | set(names.values()))
        return names | dict(zip(local, safe, strict=True))
    return dict(zip(keys, safe_names(idents, taken), strict=True))


def _identifier(name: str) -> str:
    return name if name.isidentifier() else re.sub(r"\W+", "_", name.replace("-", "m")).strip("_") or "v"


def _loss_code(loss: Loss, names: dict[str, str]) -> list[str]:
    """The body of `def loss_<name>(F, <data...>)`: F is (B, k); data rows match F's rows."""
    target = names.get(loss.target, loss.target) if loss.target else ""
    if loss.kind == "mse":
        return [f"return 0.5 * ((F - {target}.reshape(F.shape)) ** 2).sum(-1).mean(-1)"]
    if loss.kind == "xent":
        return [f"y = {target}",
                "if y.dim() == 2 and y.shape[1] == F.shape[-1] and F.shape[-1] > 1:  # one-hot rows",
                "    onehot = y.to(F.dtype)",
                "else:  # class labels 0..k-1",
                "    onehot = torch.nn.functional.one_hot(y.reshape(-1).long(), F.shape[-1]).to(F.dtype)",
                "return -(onehot * torch.log_softmax(F, dim=-1)).sum(-1).mean(-1)"]
    if loss.kind == "logistic":
        return [f"s = torch.where({target}.reshape(-1) > 0, 1.0, -1.0).to(F.dtype)",
                "return torch.nn.functional.softplus(-s * F[..., 0]).mean(-1)"]
    args = ["f"] + [names[a] for a in loss.args[1:]]
    hoisted: list[str] = []
    result = _reduction_code(loss.tree, args, hoisted)
    return ["f = F[..., 0] if F.shape[-1] == 1 else F",
            *[f"{a} = {a}.reshape(-1) if f.dim() == 1 and {a}.dim() == 2 else {a}" for a in args[1:]],
            *hoisted, f"return {result}"]


def _reduction_code(tree: ex.Tree, args: list[str], hoisted: list[str]) -> str:
    """A user loss: mean_all / sum_all over every entry of f's shape, of coordinatewise trees
    (deep ones split into the `hoisted` lines)."""
    if isinstance(tree, ex.Apply) and tree.fn in ("mean_all", "sum_all"):
        inner = _tree_code(tree.args[0], args, hoisted)
        op = "mean" if tree.fn == "mean_all" else "sum"
        return f"torch.broadcast_to(torch.as_tensor({inner}, dtype=f.dtype), f.shape).{op}()"
    if isinstance(tree, ex.Apply):
        parts = [f"({_reduction_code(a, args, hoisted)})" for a in tree.args]
        from tpc.ops.functions import FUNCTIONS

        return FUNCTIONS[tree.fn].code.format(*parts)
    if isinstance(tree, ex.Const):
        return _num(tree.value)
    return args[tree.index]


def forward_code(net: Network, names: dict[str, str], owner: str, count: int) -> list[str]:
    """The model's first `count` steps on the rows of `x`, weights `owner.<layer>` times their
    multipliers `m`, ending with `return` of the last value (unindented lines). Each op's code is
    `_code_<op>` below (tpc/train/steps.py)."""
    from tpc.train.steps import STEPS

    lines: list[str] = []
    values: list[str] = []
    for i, step in enumerate(net.model.steps[:count]):
        values.append(f"s{i}")
        lines.append(f"s{i} = {STEPS[step.op].code(i, step, values, names, owner, net, lines)}")
    lines.append(f"return {values[-1]}")
    return lines


def _code_input(i: int, step: Step, values: list[str], names: dict[str, str], owner: str, net: Network,
                lines: list[str]) -> str:
    P = net.model.positions  # noqa: N806 - over positions: one row per (input, position)
    if not step.pos:
        return "x"
    rows = f"x.reshape(x.shape[0] * {P}, x.shape[-1] // {P})"
    if not step.patches:
        return rows
    lines.append(f"x{i} = {rows}")  # conv(U, x): each position's patch, the rows at p + o side by side
    return f"torch.cat([{', '.join(_shifted(f'x{i}', o, step.grid) for o in step.patches)}], -1)"


def _code_bias(i: int, step: Step, values: list[str], names: dict[str, str], owner: str, net: Network,
               lines: list[str]) -> str:
    layer = names[step.layer]
    return f"m[{layer!r}] * {owner}.{layer}"


def _code_matmul(i: int, step: Step, values: list[str], names: dict[str, str], owner: str, net: Network,
                 lines: list[str]) -> str:
    layer, la = names[step.layer], net.layers[step.layer]
    if la.flattens:  # V @ flatten(h): each input's P rows side by side, row j*P + p of V
        v = values[step.args[0]]
        return (f"{v}.reshape(*{v}.shape[:-2], -1, {la.taps} * {v}.shape[-1]) @ "
                f"(m[{layer!r}] * {owner}.{layer}).reshape({la.rows}, -1).T")
    if step.transposed:  # W.T @ h: rows times W
        return f"{values[step.args[0]]} @ (m[{layer!r}] * {owner}.{layer})"
    return f"{values[step.args[0]]} @ (m[{layer!r}] * {owner}.{layer}).T"


def _code_fn(i: int, step: Step, values: list[str], names: dict[str, str], owner: str, net: Network,
             lines: list[str]) -> str:
    return _tree_code(step.tree, [values[j] for j in step.args], lines)  # deep trees' parts go before it


def _code_moment(i: int, step: Step, values: list[str], names: dict[str, str], owner: str, net: Network,
                 lines: list[str]) -> str:
    return f"{values[step.args[0]]}.mean(-1, keepdim=True)"


def _by_input(v: str, positions: int) -> str:
    """A positional value's rows grouped by input: (..., B, P, n)."""
    return f"{v}.reshape(*{v}.shape[:-2], -1, {positions}, {v}.shape[-1])"


def _code_pool(i: int, step: Step, values: list[str], names: dict[str, str], owner: str, net: Network,
               lines: list[str]) -> str:
    P = net.model.steps[step.args[0]].positions  # noqa: N806
    return f"{_by_input(values[step.args[0]], P)}.mean(-2)"  # the mean over each input's P rows


def _code_shift(i: int, step: Step, values: list[str], names: dict[str, str], owner: str, net: Network,
                lines: list[str]) -> str:
    """h at position p + offset, zero beyond the edges: the rows that stay, padded with zeros."""
    return _shifted(values[step.args[0]], step.offset, step.grid)


def _code_window(i: int, step: Step, values: list[str], names: dict[str, str], owner: str, net: Network,
                 lines: list[str]) -> str:
    """The mean over windows of positions, every stride-th: per axis of the grid, the positions from
    start to stop, torch's `unfold` into windows, their mean."""
    v, grid = values[step.args[0]], net.model.steps[step.args[0]].grid
    at = f"{v}.reshape(*{v}.shape[:-2], -1, {', '.join(map(str, grid))}, {v}.shape[-1])"
    for axis, (start, stop, size, stride) in enumerate(step.window):
        dim = axis - len(grid) - 1  # the grid's axes, counted from the end (n is last)
        at = f"{at}.narrow({dim}, {start}, {stop - start}).unfold({dim}, {size}, {stride})"
        at = f"{at}.mean(-1)" if size > 1 else f"{at}[..., 0]"
    return f"{at}.reshape(*{v}.shape[:-2], -1, {v}.shape[-1])"


def _shifted(v: str, offset: tuple[int, ...], grid: tuple[int, ...]) -> str:
    if not any(offset):
        return v
    keep = ", ".join(f"{max(s, 0)}:{size - max(-s, 0)}" for s, size in zip(offset, grid, strict=True))
    pad = [0, 0] + [k for s in reversed(offset) for k in (max(-s, 0), max(s, 0))]
    at = f"{v}.reshape(*{v}.shape[:-2], -1, {', '.join(map(str, grid))}, {v}.shape[-1])"
    return f"torch.nn.functional.pad({at}[..., {keep}, :], {pad}).reshape({v}.shape)"


def _code_attend(i: int, step: Step, values: list[str], names: dict[str, str], owner: str, net: Network,
                 lines: list[str]) -> str:
    q, k, v = (values[j] for j in step.args)  # softmax over an input's positions of q.k / n^e, applied to v
    P = step.positions  # noqa: N806
    if step.heads == 1:
        lines.append(f"a{i} = torch.softmax({_by_input(q, P)} @ {_by_input(k, P)}.transpose(-1, -2) / "
                     f"{q}.shape[-1] ** {_num(net.attention)}, dim=-1)")
        return f"(a{i} @ {_by_input(v, P)}).reshape({v}.shape)"
    # H heads: head h is the h-th block of n/H coordinates of q, k and v, (..., H, B*P, n/H)
    lines.append(f"q{i}, k{i}, v{i} = (t.reshape(*t.shape[:-1], {step.heads}, -1).movedim(-2, -3) "
                 f"for t in ({q}, {k}, {v}))")
    lines.append(f"a{i} = torch.softmax({_by_input(f'q{i}', P)} @ {_by_input(f'k{i}', P)}.transpose(-1, -2) / "
                 f"q{i}.shape[-1] ** {_num(net.attention)}, dim=-1)")
    return f"(a{i} @ {_by_input(f'v{i}', P)}).movedim(-4, -2).reshape({v}.shape)"  # the heads side by side


def emit_network_source(net: Network) -> str:
    """The network program as a standalone Python file."""
    names = program_names(net)
    c = net.abc.c
    lines = [
        f"# Generated by tpc from {_comment(net.filename)}: the network, its initialisation by the",
        f"# parametrization ({_comment(net.param_name)}) and its training, as a standalone file (it needs only torch).",
        "#",
        "#     model = Network(width=1024, seed=0)",
        ("#     records = train(model, ...)    # the program's data, as tensors (see train's docstring)"
         if net.train is None and net.program is not None and net.program.top else
         "#     history = train(model, ...)    # the program's data, as tensors (see train's docstring)"),
        "#     predictions = model(inputs)   # (B, d) -> (B, k)",
        "from __future__ import annotations",
        "",
        "import math",
        "",
        "import torch",
        "",
        "",
        "class Network(torch.nn.Module):",
        f'    """The model {_comment(net.model.name)}({_comment(net.model.arg)}) at width n. Layer l is',
        "    W^l = n^-a_l w^l; the parameters are the trained w^l, initialised N(0, var_l n^-2b_l / fan_in);",
        "    `multiplier[name]` is n^-a_l.",
        '    """',
        "",
        "    def __init__(self, width: int, seed: int = 0, dtype: torch.dtype = torch.float64,",
        "                 device: str | torch.device = 'cpu') -> None:",
        "        super().__init__()",
        "        n = self.width = width",
        "        gen = torch.Generator(device=device).manual_seed(int(seed))",
        "        self.multiplier: dict[str, float] = {}",
    ]
    for name, la in net.layers.items():
        a, b = net.ab(la)
        shape = "(n,)" if la.role == "bias" else \
            "(" + ", ".join("n" if d is None else str(int(d)) for d in (la.weight_rows, la.cols)) + ")"
        std = math.sqrt(la.var / la.fan_in)
        what = f"fixed random {la.declared} (never trained)" if la.fixed else f"{la.role} layer {la.index + 1}"
        frozen = ", requires_grad=False" if la.fixed else ""
        lines += [
            f"        # {_comment(name)}: {what}, a = {a:g}, b = {b:g}, var = {la.var:g}",
            f"        self.{names[name]} = torch.nn.Parameter(torch.randn({shape}, generator=gen, dtype=dtype, "
            f"device=device) * ({_num(std)} * n ** {_num(-b)}){frozen})",
            f"        self.multiplier[{names[name]!r}] = n ** {_num(-a)}",
        ]
    lines += ["", "    def forward(self, x: torch.Tensor) -> torch.Tensor:",
              f'        """x: (B, {_row(net)}) inputs, one per row -> (B, {net.output_dim()}) outputs; one input'
              f' x ({_row(net)}) is a batch of one, as tpc reads X[k]."""',
              "        if x.dim() == 1:",
              "            x = x[None]",
              "        m = self.multiplier"]
    lines += ["        " + line for line in forward_code(net, names, "self", len(net.model.steps))]
    lines += _optimizer_lines(net, names, c)
    lines += _loss_lines(net, names)
    lines += _train_lines(net, names)
    return "\n".join(lines) + "\n"


def _row(net: Network) -> str:
    """What one input row holds: d numbers, or P positions of d numbers each."""
    d = net.layers[_input_layer(net)].row_size
    return f"{net.model.positions} * {d}" if net.model.positions > 1 else f"{d}"


def _input_layer(net: Network) -> str:
    return next(name for name, la in net.layers.items() if la.takes_data)


def _optimizer_lines(net: Network, names: dict[str, str], c: float) -> list[str]:
    if net.train and net.train.optimizer in ("adam", "adamw"):
        return _adam_lines(net, names, c)
    if net.train and net.train.optimizer == "signsgd":  # torch has none: train() below is the loop
        return []
    lr = net.train.lr if net.train else (net.lr if net.lr is not None else 0.1)
    groups = [f"        {{'params': [model.{names[name]}], 'lr': lr * n ** {_num(-c)}}},  # {_comment(name)}"
              for name in net.parameters]
    return [
        "", "",
        f"LR = {_num(lr)}",
        "",
        "",
        "def optimizer(model: Network, lr: float = LR) -> torch.optim.SGD:",
        f'    """SGD on the w^l with the parametrization\'s per-layer rates lr n^-c (c = {c:g}): W^l then moves by',
        '    lr n^-(2a_l + c) dL/dW^l (TP4\'s convention)."""',
        "    n = model.width",
        "    return torch.optim.SGD([",
        *groups,
        "    ], lr=lr)",
    ]


def _adam_lines(net: Network, names: dict[str, str], c: float) -> list[str]:
    """torch's Adam (AdamW) doing what the statement does: per layer the rate lr n^-c'_l, eps n^-s_l
    (the statement's eps is at the gradient's natural scale) and AdamW's decay wd n^-c / n^-c'_l."""
    t = net.train
    kind = "AdamW" if t.optimizer == "adamw" else "Adam"
    groups = []
    for name in net.parameters:
        la = net.layers[name]
        cp = net.adaptive_exponent(la)
        decay = f", 'weight_decay': {_num(t.weight_decay)} * n ** {_num(cp - c)}" if t.weight_decay else ""
        groups.append(f"        {{'params': [model.{names[name]}], 'lr': lr * n ** {_num(-cp)}, "
                      f"'eps': {_num(t.eps)} * n ** {_num(-net.natural_exponent(la))}{decay}}},  # {_comment(name)}")
    if t.optimizer == "adam" and t.weight_decay:  # the statement's decay is decoupled; torch's Adam's is not
        kind = "AdamW"
    return [
        "", "",
        f"LR = {_num(t.lr)}",
        "",
        "",
        f"def optimizer(model: Network, lr: float = LR) -> torch.optim.{kind}:",
        f'    """torch.optim.{kind} as the program\'s `train {t.optimizer}` trains: per layer the rate lr n^-c\'_l,',
        "    eps n^-s_l (the program's eps is at the gradient's natural scale n^s_l dL/dw^l)"
        + (",\n    and the decoupled decay weight_decay n^-c / n^-c'_l" if t.weight_decay else "") + '."""',
        "    n = model.width",
        f"    return torch.optim.{kind}([",
        *groups,
        f"    ], lr=lr, betas=({_num(t.betas[0])}, {_num(t.betas[1])}))",
    ]


def _loss_lines(net: Network, names: dict[str, str]) -> list[str]:
    lines: list[str] = []
    for loss in net.losses.values():
        data = [names[loss.target]] if loss.target else [names[a] for a in loss.args[1:]]
        params = "".join(f", {d}: torch.Tensor" for d in data)
        lines += ["", "", f"def loss_{loss.name}(F: torch.Tensor{params}) -> torch.Tensor:",
                  f'    """The program\'s loss {_comment(loss.name)} ({loss.kind}) on outputs F (B, k), averaged over '
                  'the rows."""']
        lines += ["    " + line for line in _loss_code(loss, names)]
    return lines


def _train_lines(net: Network, names: dict[str, str]) -> list[str]:
    t = net.train
    if t is None and net.program is not None:
        from tpc.backends.torch.emit_loops import loop_lines

        return loop_lines(net, names)
    if t is None:
        return ["", "", "# the program has no training statement"]
    if t.optimizer == "fomaml":
        return _fomaml_lines(net)
    if t.optimizer in LOOP_OPTIMIZERS and net.program is not None:  # the loop it desugars to
        from tpc.backends.torch.emit_loops import loop_lines

        return loop_lines(net, names)
    if t.optimizer != "sgd":
        return ["", "", f"# the program trains by `{t.optimizer}`: its loop is not emitted",
                "# Network, optimizer() and the losses above are the pieces it uses"]
    loss = net.losses[t.loss]
    x = names[loss.data]
    data = [names[loss.target]] if loss.target else [names[a] for a in loss.args[1:]]
    params = "".join(f", {d}: torch.Tensor" for d in [x, *data])
    rows_of = ", ".join([f"{d}[rows] if {d}.dim() else {d}" for d in data])
    all_of = ", ".join(data)
    call = f"loss_{loss.name}(model({x}[rows]){', ' + rows_of if data else ''})"
    full = f"loss_{loss.name}(model({x}){', ' + all_of if data else ''})"
    return [
        "", "",
        f"def train(model: Network{params}, steps: int = {t.steps}, batch: int = {t.batch}, "
        "lr: float = LR) -> list[float]:",
        f'    """The program\'s `train sgd(...) minimize {_comment(t.loss)}`: step t takes rows tB .. tB + B - 1',
        f"    (mod the number of rows) of {_comment(loss.data)}, in order. Returns the loss on all rows before",
        "    each step.",
        '    """',
        "    opt = optimizer(model, lr)",
        "    history = []",
        "    for t in range(steps):",
        f"        rows = (torch.arange(batch, device={x}.device) + t * batch) % {x}.shape[0]",
        f"        value = {call}",
        "        with torch.no_grad():",
        f"            history.append(float(value if batch == {x}.shape[0] else {full}))",
        "        if not torch.isfinite(value):",
        "            raise FloatingPointError(f'training diverged at step {t + 1}: the loss is not finite')",
        "        opt.zero_grad()",
        "        value.backward()",
        "        opt.step()",
        "    return history",
    ]


def _fomaml_lines(net: Network) -> list[str]:
    """First-order MAML as tpc runs it (tpc/train/finite.py): per task, `inner_steps` SGD steps on a
    copy of the weights on its support, then the query loss's gradient at the adapted weights;
    the meta-weights move by the mean over the step's tasks, at lr n^-c."""
    t = net.train
    task = Loss("task", t.loss, "<x>", "y", t.span)
    c = net.abc.c
    return [
        "", "",
        "def loss_task(F: torch.Tensor, y: torch.Tensor) -> torch.Tensor:",
        f'    """A task\'s loss ({t.loss}) on outputs F (B, k) against its labels y."""',
        *["    " + line for line in _loss_code(task, {})],
        "", "",
        "def _task_loss(model: Network, params: dict[str, torch.Tensor], P: torch.Tensor, rows: torch.Tensor,",
        "               labels: torch.Tensor) -> torch.Tensor:",
        "    return loss_task(torch.func.functional_call(model, params, (P[rows.long()],)), labels)",
        "", "",
        "def adapt(model: Network, P: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor,",
        f"          inner_lr: float = {_num(t.inner_lr)},",
        f"          inner_steps: int = {t.inner_steps}) -> dict[str, torch.Tensor]:",
        '    """fomaml\'s inner loop: SGD from the model\'s weights on one task\'s rows of the pool P, at',
        f'    inner_lr n^-c (c = {c:g}). Returns the adapted parameters (use them with',
        '    torch.func.functional_call(model, params, (x,)))."""',
        f"    rate = inner_lr * model.width ** {_num(-c)}",
        "    params = {k: v.detach().requires_grad_(True) for k, v in model.named_parameters() if v.requires_grad}",
        "    for _ in range(inner_steps):",
        "        grads = torch.autograd.grad(_task_loss(model, params, P, rows, labels), list(params.values()),",
        "                                    allow_unused=True)",
        "        params = {k: (v - rate * (0 if g is None else g)).detach().requires_grad_(True)",
        "                  for (k, v), g in zip(params.items(), grads)}",
        "    return params",
        "", "",
        "def train(model: Network, P: torch.Tensor, S: torch.Tensor, SY: torch.Tensor, Q: torch.Tensor,",
        f"          QY: torch.Tensor, steps: int = {t.steps}, tasks: int = {t.batch}, lr: float = LR) -> None:",
        '    """The program\'s `train fomaml(...)`: row t of S / SY (Q / QY) lists task t\'s support (query) rows',
        "    of the pool P and their labels; meta-step t takes tasks tB .. tB + B - 1 (mod their number),",
        '    B = tasks."""',
        "    opt = optimizer(model, lr)",
        "    count = S.shape[0]",
        "    for t in range(steps):",
        "        total = {k: torch.zeros_like(v) for k, v in model.named_parameters()}",
        "        for i in ((torch.arange(tasks) + t * tasks) % count).tolist():",
        "            adapted = adapt(model, P, S[i], SY[i])",
        "            grads = torch.autograd.grad(_task_loss(model, adapted, P, Q[i], QY[i]), list(adapted.values()),",
        "                                        allow_unused=True)",
        "            for k, g in zip(adapted, grads):",
        "                if g is not None:",
        "                    total[k] += g",
        "        opt.zero_grad()",
        "        for k, p in model.named_parameters():",
        "            p.grad = total[k] / tasks",
        "        opt.step()",
        "        if not all(torch.isfinite(p).all() for p in model.parameters()):",
        "            raise FloatingPointError(f'meta-training diverged at step {t + 1}')",
    ]


def network_module(net: Network, width: int, seeds: int | list[int] = 1, dtype: Any = None,
                   device: str = "cpu") -> Any:
    """The emitted Network at width `width`: one module for one seed, a ModuleList for several."""
    import torch

    if net.has_tables:
        raise TpcError("a cbow program's word vectors are tables updated by index; it has no dense module")
    namespace: dict[str, Any] = {}
    exec(compile(emit_network_source(net), "<tpc generated network>", "exec"), namespace)  # noqa: S102
    cls = namespace["Network"]
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    dtype = dtype or torch.float64
    modules = [cls(width, s, dtype=dtype, device=device) for s in seed_list]
    return modules[0] if len(modules) == 1 else torch.nn.ModuleList(modules)


def program_arrays(net: Network) -> dict[str, np.ndarray]:
    """The program's data under the names the emitted file uses."""
    names = program_names(net)
    return {names[k]: v for k, v in net.data.items()}
