"""One interpreter for training programs written as loops (loops.py), on any backend.

An environment from instruction ids to values and one loop over the instructions, with a rule
per instruction (as JAX's `eval_jaxpr`): the functions `_run_<op>` below, which the registry
(tpc/train/instructions.py, the field `run`) lists beside each op's other rules and through which
`Interpreter.execute` dispatches. A `loop` runs its body `trip` times. What a backend supplies
is the algebra of parameters: their initial values, the forward pass, `grad`, linear
combinations and scaled updates. Two backends implement it for dense layers:
- `dense.DenseBackend`: finite width, real weights in torch, gradients by autograd (w-space);
- `pooled.PooledBackend`: the unrolled Netsor-transpose program, at width n (`FiniteSpace`) or in
  the limit (`LimitSpace`): an n x n layer is its initial matrix times a number plus a linear
  combination of stored outer products.
Numbers, data rows, losses and records are the same in both: finite torch tensors, with the
backend's leading axes (seeds at finite width, none in the limit). (`kernel_loops.KernelBackend`
runs the kernel regime in function space.) Word2vec's programs (desugared `train cbow`) keep their
layers as tables of word vectors, `tables.TableBackend`, whose algebra is different: gathers of
rows, the logits of a batch's words and indexed row updates, at width n or in the exact limit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from tpc.errors import NumericalError, TpcError
from tpc.ops.functions import FUNCTIONS
from tpc.ops.shapes import broadcast_shapes
from tpc.train.instructions import INSTRUCTIONS
from tpc.train.loops import Instr, batch_of_one, row_index, whole_index
from tpc.train.losses import batch_rows, loss_value
from tpc.train.network import Loss, Network, Output

if TYPE_CHECKING:
    from tpc.train.stream import Stream

Tensor = torch.Tensor


@dataclass
class Bundle:
    """Values for some layers of a model: `weight` terms (parameters), `grad` terms (gradients) and
    `adaptive` terms (entrywise functions of gradients: Adam's, sign-SGD's), kept apart because the
    parametrization scales each differently."""

    weight: dict[str, Any] = field(default_factory=dict)
    grad: dict[str, Any] = field(default_factory=dict)
    adaptive: dict[str, Any] = field(default_factory=dict)

    def parts(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        return self.weight, self.grad, self.adaptive


@dataclass
class Rows:
    """Rows of a data set: their values, and which rows of which set they are (the kernel regime
    evaluates the model on the union of every set's rows)."""

    values: np.ndarray
    source: str
    idx: np.ndarray


@dataclass
class Applied:
    """The model on data rows: its outputs F (..., B, k) and every step's value (for `grad`)."""

    F: Tensor
    vals: list[Any]
    params: dict[str, Any]


class Backend(Protocol):
    lead: int  # leading axes of every model-dependent value (1: seeds; 0: the limit)
    lead_shape: tuple[int, ...]
    dtype: torch.dtype

    def initial(self) -> dict[str, Any]: ...
    def apply(self, params: dict[str, Any], x: Rows) -> Applied: ...
    def grad(self, loss: Tensor, applied: list[Applied], layers: tuple[str, ...]) -> dict[str, Any]: ...
    def scale(self, value: Any, c: Tensor | float) -> Any: ...
    def add(self, a: Any, b: Any) -> Any: ...
    def update(self, params: dict[str, Any], delta: Bundle, layers: tuple[str, ...], sign: float,
               scaled: bool) -> dict[str, Any]: ...
    def feature_gram(self, applied: Applied) -> Tensor: ...
    def feature_change(self, applied: Applied, before: Applied) -> Tensor: ...
    def init_kernel(self, kind: str, data: str, params: dict[str, Any]) -> Tensor: ...


class Interpreter:
    def __init__(self, net: Network, backend: Backend) -> None:
        assert net.program is not None
        self.net, self.prog, self.be = net, net.program, backend
        self.env: dict[int, Any] = {}
        self.params: dict[str, dict[str, Any]] = {}  # the model's and each copy's parameters
        self.states: dict[str, Bundle] = {}
        self.recording: list[dict[str, list[Tensor]]] = []
        self.records: dict[str, Tensor] = {}
        self.progress: Callable[[int, int], None] | None = None
        self.done = 0
        self.updated = False  # whether any parameters have moved: a value not finite before is no divergence
        self.active: list[list[Any]] = []  # [counter name, value] of each loop running, outermost first
        self.stop: int | None = None  # run only this many top-level iterations (None: all)
        self.checks = True  # off for a dry run that only counts (pooled.count)
        self.stream: Stream | None = None  # cbow's batches, read in order
        self.batch: tuple[int, Any] | None = None  # the last batch read: its step and its backend form
        self.rules: dict[int, list[tuple[Callable[[Interpreter, Instr], None], Instr]]] = {}  # per loop body

    # --- running
    def run(self, progress: Callable[[int, int], None] | None = None, steps: int | None = None) -> dict[str, Tensor]:
        """Every output of the program, each evaluated where it stands among the loops; `steps`: stop
        the top-level loops after that many iterations in all (the outputs see the parameters then)."""
        self.progress, self.stop = progress, steps
        self.params[self.net.model.name] = self.be.initial()
        results: dict[str, Tensor] = {}
        init_features: dict[str, Applied] = {}
        top = self.prog.top
        for position in range(len(top) + 1):
            outs = [o for o in self.net.outputs if o.position == position]
            if position == 0:
                outs += [o for o in self.net.outputs if o.kind == "feature_change"]
            cache: dict[str, Applied] = {}
            for o in outs:
                if position == 0 and o.kind == "feature_change":
                    init_features[o.data] = self.forward(o.data, cache)
                    continue
                try:
                    results[o.name] = self.output(o, cache, init_features)
                except NumericalError as err:  # a backend's trouble in the output's own computation: named there
                    if err.span is None:
                        err.span = o.span
                        if self.updated:
                            err.message += " (after training: did it diverge? lower the learning rate)"
                    raise err.locate(self.net.filename, self.net.source) from None
                self.check_output(o, results[o.name])
            if position < len(top):
                self.execute(self.prog.instrs[top[position]])
        return results

    def total_steps(self) -> int:
        return sum(self.trip(self.prog.instrs[i]) for i in self.prog.top if self.prog.instrs[i].op == "loop")

    def trip(self, loop: Instr) -> int:
        """A loop's trip count. A loop over cbow's stream takes the stream's number of batches when it
        runs: the stream is read then (like any data a loop reads), from the token data and the train
        statement's settings."""
        if "stream" in loop.attrs:
            return _stream(self).steps
        return loop.attrs["trip"]

    def execute(self, ins: Instr) -> None:
        self._apply(INSTRUCTIONS[ins.op].run.resolve(), ins)

    def _apply(self, rule: Callable[[Interpreter, Instr], None], ins: Instr) -> None:
        try:
            rule(self, ins)
        except TpcError as err:
            if err.span is None:
                err.span = ins.span
            raise err.locate(self.net.filename, self.net.source) from None

    def body(self, ins: Instr) -> None:
        steps = self.rules.get(ins.id)
        if steps is None:  # each instruction's rule, looked up once per loop, not once per step
            steps = self.rules[ins.id] = [(INSTRUCTIONS[b.op].run.resolve(), b) for b in self.prog.body(ins)]
        for rule, b in steps:
            self._apply(rule, b)

    def collect(self, finished: list[int]) -> None:
        """After an iteration: its values are dead (names are scoped to their body), and a backend
        that keeps shared storage (pooled.py's rows) may drop what no live value uses."""
        for i in finished:  # (this also frees their autograd graphs before the next forward pass)
            self.env.pop(i, None)
        compact = getattr(self.be, "compact", None)
        if compact is None:
            return
        remap = compact(self.live())
        if remap is None:
            return
        for root, params in self.params.items():
            self.params[root] = {la: remap(la, v) for la, v in params.items()}
        for name, b in self.states.items():
            self.states[name] = _remap_bundle(b, remap)
        for i, v in self.env.items():
            if isinstance(v, Bundle):
                self.env[i] = _remap_bundle(v, remap)
            elif isinstance(v, Applied):
                self.env[i] = Applied(v.F, v.vals, {la: remap(la, w) for la, w in v.params.items()})

    def live(self) -> list[tuple[str, Any]]:
        """(layer, value) of every parameter value that a later instruction can still read."""
        out = [(la, v) for params in self.params.values() for la, v in params.items()]
        bundles = list(self.states.values()) + [v for v in self.env.values() if isinstance(v, Bundle)]
        out += [(la, v) for b in bundles for part in b.parts() for la, v in part.items()]
        out += [(la, v) for v in self.env.values() if isinstance(v, Applied) for la, v in v.params.items()]
        return out

    def finite(self, i: int) -> Tensor:
        """A finite value; f(X) of a model with one output is a number per row, (..., B), so that
        `f(X) - Y` is taken row by row."""
        v = self.env[i]
        if isinstance(v, Applied):
            return v.F[..., 0] if v.F.shape[-1] == 1 else v.F
        if isinstance(v, Rows):
            return torch.as_tensor(v.values, dtype=self.be.dtype)
        return v

    def combine(self, terms: list[tuple[float, tuple[int, ...], int]]) -> Bundle:
        """sum_i k_i c_i P_i, part by part and layer by layer."""
        out = Bundle()
        with torch.no_grad():
            for k, coefs, p in terms:
                c: Tensor | float = k
                for ci in coefs:
                    value = self.finite(ci).detach()
                    if self.prog.instrs[ci].static:
                        self.check_static(value, self.prog.instrs[ci])
                    c = c * value
                b: Bundle = self.env[p]
                for part, acc in zip(b.parts(), out.parts(), strict=True):
                    for layer, value in part.items():
                        term = self.be.scale(value, c)
                        acc[layer] = term if layer not in acc else self.be.add(acc[layer], term)
        return out

    def check_finite(self, value: Tensor, ins: Instr, what: str) -> None:
        if self.checks and not torch.isfinite(value).all():
            self.blame_static(ins)  # a schedule on its way that is not finite, rather than divergence
            if not self.updated:  # nothing has trained: the model's or the loss's own doing
                for applied in self.applied_under(ins):
                    blame_steps(self.net, applied.vals, None, "at initialisation")
                raise NumericalError(f"at {self.where()}, before any update, {what} is not finite: a division by zero, "
                                     "or a square root or logarithm of a negative number?", ins.span
                                     ).locate(self.net.filename, self.net.source)
            raise NumericalError(f"training diverged at {self.where()}: {what} is not finite (lower the "
                                 "learning rate)", ins.span).locate(self.net.filename, self.net.source)

    def applied_under(self, ins: Instr) -> list[Applied]:
        """The model's applications that `ins` is computed from (through losses and arithmetic)."""
        out, todo, seen = [], list(ins.args), set()
        while todo:
            i = todo.pop(0)
            if i in seen:
                continue
            seen.add(i)
            v = self.env.get(i)
            if isinstance(v, Applied):
                out.append(v)
            elif isinstance(v, Tensor):
                todo += self.prog.instrs[i].args
        return out

    def check_static(self, value: Tensor, ins: Instr) -> None:
        """A number the loop computes from its counters and data (a schedule), where it is used (an
        update's coefficient, a record): one that is not finite is an error at the first of the values
        it is computed from that is not finite while their own arguments are (min(1, 1 / t) at t = 0 is
        1, and no error)."""
        if not self.checks or torch.isfinite(value).all():
            return
        while True:  # back to where it stopped being finite
            bad = [a for a in ins.args if self.prog.instrs[a].static and self.prog.instrs[a].op in ("fn", "reduce")
                   and not torch.isfinite(torch.as_tensor(self.env[a])).all()]
            if not bad:
                break
            ins = self.prog.instrs[bad[0]]
        value = torch.as_tensor(self.env[ins.id])
        shown = float(value[~torch.isfinite(value)].reshape(-1)[0]) if value.dim() else float(value)
        raise NumericalError(f"at {self.where()}, this value is not finite ({shown}): a square root or "
                             "logarithm of a negative number, or a division by zero?", ins.span
                             ).locate(self.net.filename, self.net.source)

    def where(self) -> str:
        """Where the loops are: a loop's variable and its value (`e = 0, t = 2`), a train statement's
        step from 1 (`step 3`)."""
        parts = [f"{name} = {t}" if not name.startswith("<") else f"{name.strip('<>')} {t + 1}"
                 for name, t in self.active]
        return ", ".join(parts) if parts else f"step {self.done + 1}"

    def blame_static(self, ins: Instr) -> None:
        """Raise at a number computed from counters and data that is not finite, among the values `ins`
        is computed from (through the loop's arithmetic, not through the model)."""
        todo, seen = list(ins.args), set()
        while todo:
            i = todo.pop(0)
            arg = self.prog.instrs[i]
            if i in seen or arg.op not in ("fn", "reduce") or not isinstance(self.env.get(i), Tensor):
                continue
            seen.add(i)
            if arg.static:
                self.check_static(self.env[i], arg)
            else:
                todo += arg.args

    def check_output(self, o: Output, value: Tensor) -> None:
        """A non-finite output is never printed. Before any update it is the model's own doing (a
        norm of a zero vector with eps = 0, ...), named at its first step that is not finite; after,
        the steps before it diverged (the losses, schedules and records the loop computes are checked
        where they are computed; an update of the last step is not)."""
        if not self.checks or torch.isfinite(torch.as_tensor(value)).all():
            return
        if not self.updated:  # the same test as check_finite's: nothing has moved the parameters
            if o.data is not None:
                self.blame_model(o.data)
            raise NumericalError(f"output {o.name} is not finite at initialisation: a division by zero, or a square "
                                 "root or logarithm of a negative number?", o.span
                                 ).locate(self.net.filename, self.net.source)
        raise NumericalError(f"output {o.name} is not finite: training diverged (lower the learning rate)",
                             o.span).locate(self.net.filename, self.net.source)

    def blame_model(self, data: str) -> None:
        """Raise at the model's first step whose value on `data` is not finite (finite width: the
        backends whose steps' values are tensors)."""
        with torch.no_grad():
            blame_steps(self.net, self.forward(data, {}).vals, data)

    # --- outputs
    def forward(self, data: str, cache: dict[str, Applied]) -> Applied:
        if data not in cache:
            arr = self.net.data[data]
            with torch.no_grad():
                cache[data] = self.be.apply(self.params[self.net.model.name], Rows(arr, data, np.arange(len(arr))))
        return cache[data]

    def output(self, o: Output, cache: dict[str, Applied], init_features: dict[str, Applied]) -> Tensor:
        if o.kind == "record":
            return self.records[o.loss]
        if o.kind == "embeddings":
            return self.embeddings(o)
        if o.kind == "loss":
            loss = self.net.losses[o.loss]
            F = self.forward(loss.data, cache).F.detach()  # noqa: N806
            return loss_value(loss, F, self.net.data, np.arange(F.shape[-2]))
        if o.kind in ("nngp", "ntk"):  # at initialisation (network.py): the backend's own kernels
            return self.be.init_kernel(o.kind, o.data, self.params[self.net.model.name])
        applied = self.forward(o.data, cache)
        if o.kind == "predict":
            F = applied.F.detach()  # noqa: N806
            return F[..., 0] if F.shape[-1] == 1 else F
        if o.kind == "features":
            return self.be.feature_gram(applied)
        return self.be.feature_change(applied, init_features[o.data])

    def embeddings(self, o: Output) -> Tensor:
        return self.be.embeddings(self.params[self.net.model.name][o.layer], o.layer)


def _remap_bundle(b: Bundle, remap: Callable[[str, Any], Any]) -> Bundle:
    return Bundle(*({la: remap(la, v) for la, v in part.items()} for part in b.parts()))


# --- the rules, one per instruction (`run` in tpc/train/instructions.py)


def _run_const(it: Interpreter, ins: Instr) -> None:
    it.env[ins.id] = torch.tensor(ins.attrs["value"], dtype=torch.float64)


def _run_data(it: Interpreter, ins: Instr) -> None:
    arr = it.net.data[ins.attrs["name"]]
    it.env[ins.id] = Rows(arr, ins.attrs["name"], np.arange(arr.shape[0] if arr.ndim else 1))


def _whole(it: Interpreter, ins: Instr, value: Tensor | Rows, rows: int | None = None, source: str = "") -> np.ndarray:
    return whole_index(value.detach().numpy() if isinstance(value, Tensor) else value.values, ins.span, rows, source)


def _run_rows(it: Interpreter, ins: Instr) -> None:
    x: Rows = it.env[ins.args[0]]
    t = int(_whole(it, ins, it.env[ins.args[1]]))
    rows = batch_rows(t, ins.attrs["size"], x.values.shape[0])
    it.env[ins.id] = Rows(x.values[rows], x.source, x.idx[rows])


def _run_index(it: Interpreter, ins: Instr) -> None:
    x: Rows = it.env[ins.args[0]]
    v = it.env[ins.args[1]]
    i = row_index(v.detach().numpy() if isinstance(v, Tensor) else v.values, ins.span, x.values.shape[0], x.source)
    it.env[ins.id] = Rows(x.values[i], x.source, x.idx[i])


def _run_fn(it: Interpreter, ins: Instr) -> None:
    args = [it.finite(i) for i in ins.args]
    fn = ins.attrs["fn"]
    if fn == "min":
        it.env[ins.id] = torch.minimum(*args)
    elif fn == "max":
        it.env[ins.id] = torch.maximum(*args)
    elif fn == "mod":
        it.env[ins.id] = torch.remainder(*args)
    else:
        it.env[ins.id] = FUNCTIONS[fn].torch(*args)


def _run_reduce(it: Interpreter, ins: Instr) -> None:
    v = it.finite(ins.args[0])
    lead = 0 if it.prog.instrs[ins.args[0]].static else it.be.lead
    dims = tuple(range(lead, v.dim()))
    it.env[ins.id] = (v.mean(dims) if ins.attrs["fn"] == "mean" else v.sum(dims)) if dims else v


def _run_apply(it: Interpreter, ins: Instr) -> None:
    rows: Rows = it.env[ins.args[0]]
    if rows.values.ndim == 1:  # one row, X[i]: a batch of one
        rows = Rows(rows.values[None], rows.source, np.atleast_1d(rows.idx))
    it.env[ins.id] = it.be.apply(it.params[ins.attrs["root"]], rows)


def _run_loss(it: Interpreter, ins: Instr) -> None:
    F = it.env[ins.args[0]].F  # noqa: N806
    y = batch_of_one(F.shape[-2], np.asarray(it.env[ins.args[1]].values, dtype=np.float64))
    loss = Loss("<loss>", ins.attrs["loss"], "<x>", "<y>", ins.span)
    value = loss_value(loss, F, {"<y>": y}, np.arange(F.shape[-2]))
    it.check_finite(value, ins, "the loss")
    it.env[ins.id] = value


def _run_named_loss(it: Interpreter, ins: Instr) -> None:
    F = it.env[ins.args[0]].F  # noqa: N806
    rows = it.env[ins.args[1]].idx if len(ins.args) > 1 else np.arange(F.shape[-2])
    value = loss_value(it.net.losses[ins.attrs["loss"]], F, it.net.data, rows)
    it.check_finite(value, ins, f"the loss {ins.attrs['loss']}")
    it.env[ins.id] = value


def _run_grad(it: Interpreter, ins: Instr) -> None:
    loss = it.finite(ins.args[0])
    it.check_finite(loss.detach(), it.prog.instrs[ins.args[0]], "the loss")
    applied = [it.env[i] for i in ins.args[1:]]
    grads = it.be.grad(loss, applied, ins.attrs["layers"])
    if it.checks and any(isinstance(g, Tensor) and not torch.isfinite(g).all() for g in grads.values()):
        # a finite loss with a gradient that is not: an overflow on the way (exp in float32, then 0 * inf),
        # the model's own before any update, else the training's
        if not it.updated:
            for a in applied:
                blame_steps(it.net, a.vals, None, "at initialisation")
        raise NumericalError(f"training diverged at {it.where()}: the gradient is not finite though the loss is "
                             "(lower the learning rate)" if it.updated else f"at {it.where()}, the gradient is not "
                             "finite though the loss is: an overflow in the backward pass?", ins.span
                             ).locate(it.net.filename, it.net.source)
    it.env[ins.id] = Bundle(grad=grads)


def _run_read(it: Interpreter, ins: Instr) -> None:
    if ins.attrs["what"] == "state":
        it.env[ins.id] = it.states[ins.attrs["name"]]
        return
    params = it.params[ins.attrs["root"]]
    it.env[ins.id] = Bundle(weight={la: params[la] for la in ins.attrs["layers"]})


def _run_zeros(it: Interpreter, ins: Instr) -> None:
    it.env[ins.id] = Bundle()


def _run_lincomb(it: Interpreter, ins: Instr) -> None:
    it.env[ins.id] = it.combine(ins.attrs["terms"])


def _run_ewise(it: Interpreter, ins: Instr) -> None:
    """An entrywise function of gradients and states made of them, layer by layer: its arguments are
    values of layers, each read at its natural scale (`natural`: entries of order one at any width),
    and numbers. A layer a value lacks is zero there (None)."""
    entrywise = getattr(it.be, "entrywise", None)
    if entrywise is None:  # pragma: no cover - limit.py refuses such programs first
        raise TpcError("this backend has no entrywise updates", ins.span)
    out = {}
    with torch.no_grad():
        for la in ins.attrs["layers"]:
            args = []
            for i in ins.args:
                v = it.env[i]
                if not isinstance(v, Bundle):
                    args.append((False, it.finite(i)))
                    continue
                if la in v.weight or (la in v.grad and la in v.adaptive):  # pragma: no cover - loops.py refuses
                    raise TpcError("internal: an entrywise function of parameters, or of gradients plus entrywise "
                                   "values", ins.span)
                if la in v.grad:
                    args.append((True, it.be.natural(la, v.grad[la])))
                else:  # an entrywise value, or zero (loops.py refuses parameters and mixed terms here)
                    args.append((True, v.adaptive.get(la)))
            out[la] = entrywise(ins.attrs["tree"], args, la)
            # one pass over the sum first (isfinite of a whole n x n tensor cost a fifth of Adam's step); a
            # sum that overflows only is not an error, so the entries decide
            if it.checks and not math.isfinite(float(out[la].sum())) and not torch.isfinite(out[la]).all():
                raise NumericalError(f"at {it.where()}, this entrywise function of layer {la} is not finite: a "
                                     "square root of a negative number or a division by zero? (Adam adds eps to "
                                     "the denominator)", ins.span).locate(it.net.filename, it.net.source)
    it.env[ins.id] = Bundle(adaptive=out)


def entrywise_args(args: list[tuple[bool, Tensor | None]], shape: tuple[int, ...], dtype: torch.dtype,
                   device: str | torch.device) -> list[Tensor]:
    """A backend's arguments of an entrywise function, all of `shape`: values of a layer (True; None is
    zero) as they are, and numbers (False: one, or one per seed) given trailing axes to broadcast."""
    out = []
    for is_layer, a in args:
        if a is None:
            a = torch.zeros(shape, dtype=dtype, device=device)
        elif not is_layer:
            a = a.to(dtype).to(device)
            a = a.reshape(a.shape + (1,) * (len(shape) - a.dim()))
        out.append(a)
    return out


def _run_state(it: Interpreter, ins: Instr) -> None:
    it.states[ins.attrs["name"]] = it.combine(ins.attrs["terms"])


def _run_copy(it: Interpreter, ins: Instr) -> None:
    it.params[ins.attrs["name"]] = dict(it.params[ins.attrs["source"]])  # values are never changed in place


def _run_update(it: Interpreter, ins: Instr) -> None:
    delta = it.combine(ins.attrs["terms"])
    op, name = ins.attrs["mode"], ins.attrs["target"]
    if ins.attrs["what"] == "state":
        old = it.states[name]
        if op == "=":
            it.states[name] = delta
            return
        sign = -1.0 if op == "-=" else 1.0
        new = Bundle(*(dict(part) for part in old.parts()))
        for part, acc in zip(delta.parts(), new.parts(), strict=True):
            for layer, value in part.items():
                term = it.be.scale(value, sign)
                acc[layer] = term if layer not in acc else it.be.add(acc[layer], term)
        it.states[name] = new
        return
    root = ins.attrs["root"]
    sign = {"-=": -1.0, "+=": 1.0, "=": 0.0}[op]
    it.params[root] = it.be.update(it.params[root], delta, ins.attrs["layers"], sign, ins.attrs["scaled"])
    it.updated = True


def _run_record(it: Interpreter, ins: Instr) -> None:
    v = it.finite(ins.args[0]).detach()
    name = ins.attrs["name"]
    if it.prog.instrs[ins.args[0]].static:
        it.check_static(v, it.prog.instrs[ins.args[0]])
    it.check_finite(v, ins, "the recorded value" if name.startswith("<") else f"the recorded {name}")
    if it.prog.instrs[ins.args[0]].static:  # the same for every seed: give it the seed axes all the same
        v = v.to(it.be.dtype).expand(*it.be.lead_shape, *v.shape) if it.be.lead_shape else v
    it.recording[-1].setdefault(ins.attrs["name"], []).append(v)


def _run_counter(it: Interpreter, ins: Instr) -> None:  # pragma: no cover - set by its loop
    pass


def _run_loop(it: Interpreter, ins: Instr) -> None:
    counter = next(i for i in ins.attrs["body"] if it.prog.instrs[i].op == "counter")
    it.recording.append({})
    top = len(it.recording) == 1
    body = it.prog.inside(ins)
    it.active.append([it.prog.instrs[counter].attrs["name"], 0])
    for t in range(it.trip(ins)):
        if top and it.stop is not None and it.done >= it.stop:
            break
        it.env[counter] = torch.tensor(float(t), dtype=torch.float64)
        it.active[-1][1] = t
        it.body(ins)
        it.collect(body)
        if top:
            it.done += 1
            if it.progress:
                it.progress(it.done, it.total_steps())
    it.active.pop()
    kept = it.recording.pop()
    names = it.prog.recorded(ins)
    for name in names:
        values = kept.get(name, [])
        stacked = _stack(values, it.be.lead) if values else torch.zeros((*it.be.lead_shape, 0), dtype=it.be.dtype)
        if it.recording:
            it.recording[-1].setdefault(name, []).append(stacked)
        else:
            it.records[name] = stacked


def _stack(values: list[Tensor], lead: int) -> Tensor:
    """Stack one value per step along a new axis after the leading (seed) axes."""
    shape = broadcast_shapes(*[v.shape for v in values])  # numpy's rule (torch's imports sympy)
    lead = min(lead, len(shape))
    return torch.stack([v.expand(shape) for v in values], dim=lead)


# --- word2vec's step on embedding tables (desugared `train cbow`; the backend is tables.TableBackend)


def _stream(it: Interpreter) -> Stream:
    """The program's stream, made when the loop first runs (from the data the program has then)."""
    if it.stream is None:
        from tpc.train.cbow import checked_stream

        it.stream = checked_stream(it.net)
    return it.stream


def _run_stream(it: Interpreter, ins: Instr) -> None:
    """Batch t in the backend's form (tables.StepBatch), converted once per batch read."""
    step = it.env[ins.args[0]]
    counter = it.prog.instrs[ins.args[0]].op == "counter"  # whole by construction: no check (a step of 11164)
    t = int(step) if counter else int(_whole(it, ins, step))
    if it.batch is not None and it.batch[0] == t:
        it.env[ins.id] = it.batch[1]
        return
    try:
        b = _stream(it).at(t)
    except IndexError as err:
        raise TpcError(str(err), ins.span) from None
    it.batch = (t, it.be.batch(b))
    it.env[ins.id] = it.batch[1]


def _run_gather(it: Interpreter, ins: Instr) -> None:
    table = it.env[ins.args[0]].weight[ins.attrs["layer"]]
    gather = it.be.bag if ins.attrs["form"] == "bag" else it.be.rows
    it.env[ins.id] = gather(table, it.env[ins.args[1]])


def _run_logits(it: Interpreter, ins: Instr) -> None:
    it.env[ins.id] = it.be.logits(it.env[ins.args[0]], it.env[ins.args[1]])


def _run_ns_loss(it: Interpreter, ins: Instr) -> None:
    """-log s(z_centre) - sum_neg log s(-z_neg), summed over the batch (a negative equal to the centre
    word is skipped, as word2vec does): one number per seed."""
    z, b = it.env[ins.args[0]], it.env[ins.args[1]]
    loss = (torch.nn.functional.softplus(torch.where(b.label > 0, -z, z)) * b.live).sum((-2, -1))
    loss = loss if it.be.lead else loss[0]  # the tables keep a seeds axis, of length 1 in the limit
    if not math.isfinite(float(loss.sum())):  # one number to look at (a step of 11164)
        it.check_finite(loss, ins, "the loss")
    it.env[ins.id] = loss


def _run_ns_grad(it: Interpreter, ins: Instr) -> None:
    z, b = it.env[ins.args[1]], it.env[ins.args[2]]
    it.env[ins.id] = (torch.sigmoid(z) - b.label) * b.live


def _run_scatter_add(it: Interpreter, ins: Instr) -> None:
    table = it.params[ins.attrs["root"]][ins.attrs["layer"]]
    b, g, rows = (it.env[i] for i in ins.args)
    rate = ins.attrs["coef"] * (b.lr if ins.attrs["rate"] else 1.0)  # c * b.lr, or c alone
    it.be.scatter_add(table, ins.attrs["layer"], ins.attrs["index"], b, g, rows, rate)
    it.updated = True


def blame_steps(net: Network, vals: list[Any], data: str | None, when: str = "at initialisation") -> None:
    """Raise at the first of the model's steps whose value (`vals`, one per step, on data set `data`)
    is not finite: infinite values overflowed, NaN came from 0/0 or a function outside its domain."""
    for step, v in zip(net.model.steps, vals, strict=False):
        if isinstance(v, Tensor) and not torch.isfinite(v).all():
            m = net.model
            why = "it overflows (smaller inputs or variances, or float64?)" if not torch.isnan(v).any() else \
                "a division by zero (a norm of a zero vector with eps = 0?), or a square root or logarithm of a " \
                "negative number?"
            on = f" on {data}" if data else ""
            raise NumericalError(f"{when}, this value of model {m.name}{on} is not finite: {why}", step.span or m.span
                                 ).locate(net.filename, net.source)
