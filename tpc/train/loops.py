"""Training loops written in the language: their instructions and the checks made when building them.

A network program's training is a list of instructions. `for t in range(T) { ... }` is one
instruction, `loop`, whose body is a list of instructions run T times (as JAX's `scan` carries a
body): the counter, data rows chosen by it, forward passes `f(X)`, losses, `grad`, linear
combinations of parameters and gradients, and updates of layers, copies and optimizer states.
Every instruction is checked here, before anything runs: a body that is not a Tensor Program (a
trip count or an index computed at width n, an update whose power of n grows, an update of data,
a gradient with respect to something that is not a parameter) is refused with its position.

Values have one of these kinds:
- `finite`: a number or a finite array (a loss, a schedule, f(X) - Y); `static` ones depend only
  on the counters, numbers and data (they may choose rows), the others on the model;
- `data`: rows of a data set (`X`, `batch(X, t, B)`, `P[S[i]]`), known before training;
- `outputs`: the model's outputs f(X) on data rows (finite, and differentiable by `grad`);
- `params`: a value for some of the model's layers: the parameters of `f`, of a layer or of a
  copy (`weight` terms), gradients (`grad` terms), or a linear combination of both;
- `batch`: one step's batch of word2vec's stream (centre words, contexts, negatives, the rate),
  known before training: `S[t]` of a `stream S = cbow(T, ...)`;
- `vectors`: rows of an embedding table (n-vectors, one per position or per word of a batch).

word2vec's step on its tables (`train cbow` desugars to it, desugar.py) is written with these:
`b = S[t]` (the stream's batch t), `bag(U, b)` (each position's sum of its context words' vectors),
`V[b.words]` (the rows of its centre word and negatives), `logits(v, h)`, `negative_sampling(z, b)`,
`grad(L, z)` (its gradient with respect to the logits), and the indexed row updates of the tables
`V[b.words] -= b.lr * outer(g, h)` and `U[b.context] -= b.lr * (g @ v)` (op `scatter_add`).

Updates follow TP4's convention (Yang & Hu 2021): `P -= e` changes the trained parameter
w <- w - n^-c e, with `grad(L, P)` the gradient dL/dw; the parametrization's `c` and the layers'
`a` turn this into the natural-scale update (see `pooled.py`). Buffers (`state`) and plain
assignments are not scaled. The user never writes a power of the width.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from tpc import syntax as ast
from tpc.errors import Span, TpcError, clip
from tpc.ops import expr as ex
from tpc.ops.functions import ALIASES, FUNCTIONS

if TYPE_CHECKING:
    from tpc.train.network import _Builder

LOSSES = ("mse", "xent", "logistic")
SCALAR_FUNCTIONS = ("min", "max", "mod")  # of two finite values: warm-up schedules, cycling through tasks
MAX_TRIP = 10**9  # iterations of one loop (as `train sgd`'s steps)
MAX_NESTING = 16  # loops inside loops (a record stacks one axis per level)
# the natural-scale power of n on the gradient update of each role under muP (TP4 Table 3); an update
# of layer l by lr n^-c dL/dw^l carries n^(MAXIMAL_LR_EXPONENT[role] - 2 a_l - c)
MAXIMAL_LR_EXPONENT = {"input": -1.0, "embedding": -1.0, "bias": -1.0, "hidden": 0.0, "readout": 1.0}
TOL = 1e-12
# word2vec's step on tables: the functions a loop over a stream calls, with their arities
TABLE_CALLS = {"bag": 2, "logits": 2, "negative_sampling": 2}
TRAIN_STREAM = "<stream>"  # the name of the stream of `train cbow(...)` in its desugared loop
# a word2vec program's layers are tables of word vectors (tables.py): its loops change them by row updates only
TABLES_ONLY = ("in a word2vec program (an embedding layer) the layers are tables of word vectors: its loops read "
               "them with bag(U, b) and V[b.words] and change them with row updates, "
               "`V[b.words] -= b.lr * outer(g, h)`, `U[b.context] -= b.lr * (g @ v)`")
KIND_WORDS = {"finite": "a number or a finite value (a loss, logits(v, h), grad(L, z))",
              "batch": "a batch of the stream, b = S[t]", "vectors": "rows of a table, bag(U, b) or V[b.words]",
              "data": "data", "outputs": "the model on data, f(X)", "params": "values of layers"}
ROW_UPDATE_FORMS = ("a row update of a table is `V[b.words] -= b.lr * outer(g, h)` or "
                    "`U[b.context] -= b.lr * (g @ v)` (times numbers), with g = grad(L, z) of the batch's logits")
NONLINEAR = ("a number is expected here; values of layers (parameters, gradients, states) combine by sums, "
             "products with numbers and entrywise functions")
TERM_NAMES = {"weight": "parameters", "grad": "gradients", "adaptive": "entrywise functions of gradients"}
# entrywise (adaptive) updates: the width exponent of each role's fan-in (parametrization.fan_in_exponent)
FAN_IN_EXPONENT = {"input": 0.0, "embedding": 0.0, "bias": 0.0, "hidden": 1.0, "readout": 1.0}
ENTRYWISE_OF_WEIGHTS = ("an entrywise function of the parameters themselves is not a Tensor Program: take "
                        "entrywise functions of gradients and of states made of them (Adam's m / (sqrt(v) + eps))")


def batch_of_one(rows: int, y: np.ndarray) -> np.ndarray:
    """The targets of a batch of `rows` inputs: Y[t] (one row, or one label) before a batch of one is
    given its row axis; targets that have it (batch(Y, t, 1), a task's labels) are as they are."""
    return y[None] if rows == 1 and y.shape[:1] != (1,) else y


def whole_index(value: object, span: Span, rows: int | None = None, source: str = "") -> np.ndarray:
    """A step or a row index as whole numbers (and, given `rows`, within 0..rows-1): the one check that
    every backend and the listing make."""
    arr = np.asarray(value, dtype=np.float64)
    bad = arr[~np.isfinite(arr) | (arr != np.round(arr))]
    if bad.size:
        raise TpcError(f"an index must be a whole number, got {bad.ravel()[0]:g}", span)
    huge = arr[np.abs(arr) > 2.0**53]
    if huge.size:
        raise TpcError(f"index {huge.ravel()[0]:g} is too large (beyond 2^53)", span)
    out = arr.astype(np.int64)
    if rows is not None:
        outside = out[(out < 0) | (out >= rows)]
        if outside.size:
            raise TpcError(f"index {int(outside.ravel()[0])} is outside the {rows} rows of {source}", span)
    return out


def row_index(value: object, span: Span, rows: int, source: str) -> np.ndarray:
    """The index of `X[i]`: a whole number, or a list of them (a batch of rows), within X's rows."""
    out = whole_index(value, span, rows, source)
    if out.ndim > 1:
        raise TpcError("a row index is a number or a list of numbers; this one is a "
                       f"{' x '.join(map(str, out.shape))} array", span)
    return out


@dataclass
class Instr:
    """One instruction: `args` are ids of earlier instructions (of this body or an enclosing one)."""

    id: int
    op: str
    args: tuple[int, ...]
    kind: str  # finite | data | outputs | params | none
    span: Span
    attrs: dict = field(default_factory=dict)

    @property
    def static(self) -> bool:
        return bool(self.attrs.get("static", False))


# word2vec's indexed row updates of a table, `V[b.words] -= b.lr * outer(g, h)` (the readout's rows of
# each position's words) and `U[b.context] -= b.lr * (g @ v)` (the embedding's rows of each position's
# context): the table's role, and the rows they multiply (the context sums h, the words' rows v)
ROW_UPDATES = {"words": ("readout", "bag"), "context": ("embedding", "words")}


@dataclass
class Mutable:
    """A name that updates change: the model (`root` is itself), one of its layers, a copy, a state."""

    name: str
    what: str  # model | layer | copy | state
    root: str  # the parameters it is part of (model or copy name), or the state's own name
    layers: tuple[str, ...]
    span: Span
    types: set[str] = field(default_factory=set)  # a state's terms so far: weight and/or grad


@dataclass
class Lin:
    """A linear combination under construction: terms (number, finite coefficient ids, params id)."""

    terms: list[tuple[float, tuple[int, ...], int]]

    def scaled(self, c: float, ids: tuple[int, ...] = ()) -> Lin:
        return Lin([(k * c, cs + ids, p) for k, cs, p in self.terms])


@dataclass
class TrainProgram:
    """Every instruction, in order; `top` are the top-level ones (loops, states, copies)."""

    instrs: list[Instr] = field(default_factory=list)
    top: list[int] = field(default_factory=list)
    records: dict[str, tuple[int, Span]] = field(default_factory=dict)  # name -> (loop id, where)

    def body(self, loop: Instr) -> list[Instr]:
        return [self.instrs[i] for i in loop.attrs["body"]]

    def recorded(self, loop: Instr) -> list[str]:
        """The names a loop records: its own body's first, then its nested loops' (in the order
        their stacks are built)."""
        body = [self.instrs[i] for i in loop.attrs["body"]]
        return [i.attrs["name"] for i in body if i.op == "record"] + \
            [n for i in body if i.op == "loop" for n in self.recorded(i)]

    def inside(self, loop: Instr) -> list[int]:
        """The ids of a loop's body, nested bodies included."""
        return [ins.id for ins in self.walk(loop.attrs["body"])]

    def walk(self, ids: list[int] | None = None) -> Iterator[Instr]:
        """Every instruction, bodies after their loop."""
        for i in self.top if ids is None else ids:
            ins = self.instrs[i]
            yield ins
            if ins.op == "loop":
                yield from self.walk(ins.attrs["body"])

    def iterations(self, ids: list[int] | None = None) -> int:
        """How many loop iterations the program runs in all (nested ones included)."""
        total = 0
        for i in self.top if ids is None else ids:
            ins = self.instrs[i]
            if ins.op == "loop":
                total += ins.attrs["trip"] * (1 + self.iterations(ins.attrs["body"]))
        return total

    def applied_sets(self) -> list[str]:
        """The data sets whose rows the model is applied to, in order of first use."""
        names: list[str] = []
        for ins in self.walk():
            if ins.op == "apply":
                j = ins.args[0]
                while self.instrs[j].op in ("rows", "index"):
                    j = self.instrs[j].args[0]
                names.append(self.instrs[j].attrs["name"])
        return list(dict.fromkeys(names))

    def trained_layers(self) -> set[str]:
        return {la for ins in self.walk() if ins.op == "update" and ins.attrs["scaled"]
                for la in ins.attrs["layers"]} | {ins.attrs["target"] for ins in self.walk() if ins.op == "scatter_add"}


class LoopBuilder:
    """Builds the training instructions of a network program from its top-level statements."""

    def __init__(self, b: _Builder, refuse_growth: bool = True) -> None:
        self.b = b
        # a growing update has no limit; `train sgd` sugar keeps its finite runs and leaves the refusal
        # to the limit (the parametrization's classification), as before loops existed
        self.refuse_growth = refuse_growth
        self.prog = TrainProgram()
        self.scopes: list[dict[str, int]] = []  # the names of each open body: locals and counters
        self.mutables: dict[str, Mutable] = {}
        self.body: list[int] | None = None  # the ids of the body being built (None: top level)
        self.loops: list[Instr] = []
        self.applied: dict[tuple[str, object], int] = {}  # f(X) already computed since f last changed
        self.declared_here: list[list[str]] = []  # names declared in each open body (they die with it)
        self.gone: dict[str, Span] = {}  # names that lived in a body that has closed
        # each read of a state: where, the kinds of terms it held then, and the loops open around it
        self.state_reads: dict[str, list[tuple[Span, frozenset[str], frozenset[int]]]] = {}
        self.steps_of_stream: int | None = None  # the stream's batches, counted when first needed

    # --- building blocks
    def add(self, op: str, args: tuple[int, ...], kind: str, span: Span, **attrs: object) -> int:
        ins = Instr(len(self.prog.instrs), op, args, kind, span, dict(attrs))
        self.prog.instrs.append(ins)
        (self.prog.top if self.body is None else self.body).append(ins.id)
        return ins.id

    def ins(self, i: int) -> Instr:
        return self.prog.instrs[i]

    def model_mutable(self) -> None:
        b = self.b
        if b.model is None:
            raise TpcError("define the model before training it")
        if b.model.name not in self.mutables:
            layers = tuple(name for name, la in b.layers.items() if not la.fixed)  # a fixed matrix is no parameter
            self.mutables[b.model.name] = Mutable(b.model.name, "model", b.model.name, layers, b.model.span)
            for la in layers:
                self.mutables[la] = Mutable(la, "layer", b.model.name, (la,), b.layers[la].span)
            for conv in b.convs.values():  # a convolution's name stands for its taps
                if conv.name not in b.layers:
                    taps = tuple(conv.tap(o) for o in conv.offsets)
                    self.mutables[conv.name] = Mutable(conv.name, "layer", b.model.name, taps, conv.span)

    def local(self, name: str) -> int | None:
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        return None

    def bind(self, name: str, value: int, span: Span) -> None:
        if self.local(name) is not None or name in self.mutables:
            raise self.reassigned(name, span)
        self.b.declare(name, span)
        self.scopes[-1][name] = value
        self.declared_here[-1].append(name)
        if self.ins(value).op not in ("const", "counter", "data", "read"):
            self.ins(value).attrs.setdefault("label", name)

    def reassigned(self, name: str, span: Span) -> TpcError:
        i = self.local(name)
        if i is not None and self.ins(i).op == "counter":
            return TpcError(f"'{name}' is the loop counter: it takes the values 0, 1, ... by itself", span)
        if i is not None and self.ins(i).kind == "params":
            return TpcError(f"'{name}' is assigned once in a loop; declare 'state {name} = ...' before the loop to "
                            "change it from step to step", span)
        return TpcError(f"'{name}' is assigned once in a loop: give the new value another name (a number that "
                        "changes from step to step is computed from the loop counter)", span)

    def forget(self, parts: tuple[str, ...]) -> None:
        """f(X) must be recomputed after any update of these parameters."""
        self.applied = {k: v for k, v in self.applied.items() if k[0] not in parts}

    # --- statements
    def statement(self, s: ast.Stmt) -> None:
        self.model_mutable()
        if isinstance(s, ast.ForLoop):
            self.loop(s)
        elif isinstance(s, ast.StateDecl):
            self.state(s)
        elif isinstance(s, ast.CopyDecl):
            self.copy(s)
        elif isinstance(s, ast.Update):
            if self.body is None:
                raise TpcError("an update runs in a loop: for t in range(1) { ... }", s.span)
            if s.index is not None:
                self.row_update(s)
            else:
                self.update(s.target, s.target_span, s.op, s.value, s.span)
        elif isinstance(s, ast.Assign):
            if self.body is None:  # pragma: no cover - network.py sends top-level assignments elsewhere
                raise TpcError("a network program names values inside loops only", s.span)
            if s.name in self.mutables:
                self.update(s.name, Span(s.span.line, s.span.column, s.span.line, s.span.column + len(s.name)),
                            "=", s.value, s.span)
                return
            v = self.value(s.value)
            if isinstance(v, Lin):
                v = self.materialize(v, s.value.span)
            self.bind(s.name, v, s.span)
        elif isinstance(s, ast.RecordStmt):
            if self.body is None:
                raise TpcError("record keeps one value per step of a loop: put it inside the loop", s.span)
            v = self.value(s.value)
            if isinstance(v, Lin) or self.ins(v).kind not in ("finite", "outputs"):
                raise TpcError("record keeps finite values (a loss, f(X), a number)", s.value.span)
            if self.stream_name() is not None and not self.ins(v).attrs.get("scalar"):
                raise TpcError("a word2vec loop records numbers (a loss, mean(z)): its batches' sizes change from step "
                               "to step", s.value.span)
            if s.name in self.prog.records:
                raise TpcError(f"'{s.name}' is recorded twice (first at line {self.prog.records[s.name][1].line})",
                               s.span)
            self.b.declare(s.name, s.span)
            self.prog.records[s.name] = (self.loops[-1].id, s.span)
            self.add("record", (v,), "none", s.span, name=s.name)
        else:
            raise TpcError("a loop body holds assignments `x = ...`, `record`, `state`, `copy`, updates "
                           "(`P -= ...`) and loops", s.span)

    def loop(self, s: ast.ForLoop) -> None:
        if len(self.loops) >= MAX_NESTING:
            raise TpcError(f"loops nested deeper than {MAX_NESTING} levels", s.span)
        trip = self.trip_count(s.trip)
        ins_id = self.add("loop", (), "none", s.span, counter=s.counter, trip=trip, body=[])
        loop = self.ins(ins_id)
        if isinstance(s.trip, ast.Call) and s.trip.fn == "<steps>":  # the interpreter counts them when it runs
            loop.attrs["stream"] = s.trip.args[0].id  # type: ignore[attr-defined]
        outer = self.body
        self.body = loop.attrs["body"]
        self.loops.append(loop)
        self.scopes.append({})
        self.declared_here.append([])
        saved = dict(self.applied)
        self.applied = {}
        try:
            self.b.declare(s.counter, s.counter_span)
            self.scopes[-1][s.counter] = self.add("counter", (), "finite", s.counter_span, static=True,
                                                  scalar=True, loop=ins_id, name=s.counter)
            for stmt in s.body:
                self.statement(stmt)
        finally:
            for name in self.declared_here.pop():
                self.gone[name] = self.b.defined.pop(name, s.span)
                if name in self.mutables and self.mutables[name].what in ("copy", "state"):
                    del self.mutables[name]
            self.b.defined.pop(s.counter, None)
            self.scopes.pop()
            self.loops.pop()
            self.body = outer
        updated = {self.mutables[m].root for i in loop.attrs["body"] for m in self._updated(self.ins(i))
                   if m in self.mutables}
        self.applied = {k: v for k, v in saved.items() if k[0] not in updated}

    def _updated(self, ins: Instr) -> list[str]:
        if ins.op in ("update", "scatter_add"):
            return [ins.attrs["target"]]
        if ins.op == "loop":
            return [m for i in ins.attrs["body"] for m in self._updated(self.ins(i))]
        return []

    def trip_count(self, e: ast.Expr) -> int:
        if isinstance(e, ast.Call) and e.fn == "<steps>":  # `steps(S)`: one step per batch of the stream
            if len(e.args) != 1 or not isinstance(e.args[0], ast.Name) or e.args[0].id != self.stream_name():
                raise TpcError("steps(S) counts the batches of a stream S: declare it first, "
                               "`stream S = cbow(T, ...)`", e.span)
            return self.stream_steps(e.span)
        if isinstance(e, ast.Name) and e.id == self.b.width:
            raise TpcError("a loop can't run n times: the trip count is a number that does not depend on the "
                           "width", e.span)
        try:
            value = self.b.const(self.rows_of(e))
        except TpcError:
            raise TpcError("the trip count must be a constant whole number (numbers, dims or rows(D)); a value "
                           "computed during training can't decide how often a loop runs", e.span) from None
        if value != int(value) or not 0 <= value <= MAX_TRIP:
            raise TpcError(f"the trip count must be a whole number in 0..{MAX_TRIP}, got {value:g}", e.span)
        return int(value)

    def rows_of(self, e: ast.Expr) -> ast.Expr:
        """`rows(D)` -> its number, anywhere in a constant expression."""
        if isinstance(e, ast.Call) and e.fn == "rows":
            if len(e.args) != 1 or not isinstance(e.args[0], ast.Name) or e.args[0].id not in self.b.data:
                raise TpcError("rows(D) is the number of rows of a data set D", e.span)
            arr = self.b.data[e.args[0].id]
            return ast.Num(e.span, float(arr.shape[0] if arr.ndim else 1))
        if isinstance(e, ast.BinOp):
            return ast.BinOp(e.span, e.op, self.rows_of(e.left), self.rows_of(e.right))
        if isinstance(e, ast.Neg):
            return ast.Neg(e.span, self.rows_of(e.operand))
        return e

    def stream_steps(self, span: Span) -> int:
        """The number of batches of the train statement's stream (it depends on the subsampling draws, not
        on the width); the interpreter counts them again when it runs, from the data it has then."""
        from tpc.train.cbow import stream_of  # (imports torch: only cbow programs build one)

        if self.steps_of_stream is not None:  # drawn once per program (a corpus's masks take a while)
            return self.steps_of_stream
        t = self.b.train
        c = t.cbow
        stream = stream_of(t, self.b.data[c.tokens].reshape(-1).astype(np.int64), int(self.b.layers[c.embedding].cols))
        if stream.positions == 0:  # said at the stream's declaration (or the train statement), whose setting it is
            raise TpcError("subsampling leaves no position to train on: raise sample (or set sample = 0)", t.span)
        self.steps_of_stream = stream.steps
        return stream.steps

    def stream_name(self) -> str | None:
        """The name of the program's stream of word2vec batches (None if it has none)."""
        t = self.b.train
        if t is None or t.cbow is None:
            return None
        return t.stream or TRAIN_STREAM

    def state(self, s: ast.StateDecl) -> None:
        if self.stream_name() is not None:
            raise TpcError(f"{TABLES_ONLY}: they keep no state", s.span)
        if s.name in self.mutables:
            raise TpcError(f"'{s.name}' is already defined", s.span)
        v = self.value(s.value)
        if not isinstance(v, Lin) and self.ins(v).kind != "params":
            raise TpcError("a state holds values for layers: zeros(f), zeros(W), copy of parameters f, or a "
                           "combination of gradients", s.value.span)
        lin = v if isinstance(v, Lin) else Lin([(1.0, (), v)])
        layers, types = self.lin_layers(lin, s.value.span)
        self.b.declare(s.name, s.span)
        if self.declared_here:
            self.declared_here[-1].append(s.name)
        self.mutables[s.name] = Mutable(s.name, "state", s.name, layers, s.span, set(types))
        args, terms = self.lin_args(lin)
        self.add("state", args, "none", s.span, name=s.name, terms=terms, layers=layers)

    def copy(self, s: ast.CopyDecl) -> None:
        if self.stream_name() is not None:
            raise TpcError(f"{TABLES_ONLY}: they make no copy", s.span)
        src = self.mutables.get(s.source)
        if src is None or src.what not in ("model", "copy"):
            raise TpcError(f"copy g = {s.source}: a copy is taken of the model or of another copy",
                           s.source_span)
        if s.name in self.mutables:
            raise TpcError(f"'{s.name}' is already defined", s.span)
        self.b.declare(s.name, s.span)
        if self.declared_here:
            self.declared_here[-1].append(s.name)
        self.mutables[s.name] = Mutable(s.name, "copy", s.name, src.layers, s.span)
        # the copy's weights: its parameters and the fixed matrices, which its forward passes apply too
        self.add("copy", (), "none", s.span, name=s.name, source=src.root, layers=tuple(self.b.layers))
        self.forget((s.name,))

    def update(self, target: str, tspan: Span, op: str, e: ast.Expr, span: Span) -> None:
        m = self.mutables.get(target)
        if target == self.stream_name():
            raise TpcError(f"'{target}' is a stream: its batches are drawn from the data, not updated", tspan)
        if self.stream_name() is not None and m is not None:
            raise TpcError(TABLES_ONLY, span)
        if m is None:
            self.refuse_fixed(target, tspan)
            if target in self.b.data:
                raise TpcError(f"'{target}' is data: only layers, models, copies and states can be updated", tspan)
            if self.local(target) is not None:
                raise self.reassigned(target, tspan)
            raise self.b.unknown(target, tspan)
        earlier = list(self.state_reads.get(target, ()))  # the reads before this statement
        v = self.value(e)
        if not isinstance(v, Lin) and self.ins(v).kind != "params":
            raise TpcError(f"'{target}' holds values for layers; the right side must be too (grad(L, {target}), "
                           f"a state, {target} itself)", e.span)
        lin = v if isinstance(v, Lin) else Lin([(1.0, (), v)])
        layers, types = self.lin_layers(lin, e.span)
        extra = [la for la in layers if la not in m.layers]
        if extra:
            raise TpcError(f"the right side has layer(s) {', '.join(extra)} that '{target}' does not: "
                           f"use grad(L, {target})", e.span)
        scaled = m.what != "state" and op != "="
        if m.what != "state":
            if op == "=" and types & {"grad", "adaptive"}:
                raise TpcError(f"write '{target} -= ...' to move parameters along a gradient or an entrywise "
                               "function of it: the parametrization scales it", span)
            if scaled and self.refuse_growth:
                self.check_growth(layers, types, span)
        else:
            new = m.types | types
            if len(new & {"weight", "grad", "adaptive"}) > 1:
                kinds = [TERM_NAMES[t] for t in ("weight", "grad", "adaptive") if t in new]
                raise TpcError(f"state '{target}' would mix {' and '.join(kinds)} (they scale differently with the "
                               "width); keep them in separate states", span)
            self.check_reads(target, new, earlier, span)
            m.types = new
        args, terms = self.lin_args(lin)
        self.add("update", args, "none", span, target=target, root=m.root, what=m.what, mode=op, terms=terms,
                 layers=layers, scaled=scaled, types=sorted(types),
                 adaptive=[ins_p.op != "zeros" and "adaptive" in self.params_type(ins_p)
                           for ins_p in (self.ins(p) for _, _, p in terms)])
        self.forget((m.root,))

    def check_reads(self, target: str, new: set[str], earlier: list, span: Span) -> None:
        """A body is built once: a read of a state before the update that gives it a new kind of terms,
        in a loop around both, would be checked (and scaled) as the old kind, though from the second
        iteration on it holds the new one. Refuse it; the read belongs after that update."""
        open_loops = {loop.id for loop in self.loops}
        for where, kinds, loops in earlier:
            if kinds != new and loops & open_loops:
                what = " and ".join(TERM_NAMES[t] for t in ("weight", "grad", "adaptive") if t in new)
                raise TpcError(f"state '{target}' is read here before the update at line {span.line} makes it hold "
                               f"{what}, and the loop runs that update before this read again: read '{target}' "
                               "after that update in the body", where)

    def check_growth(self, layers: tuple[str, ...], types: set[str], span: Span) -> None:
        """Refuse an update whose natural-scale coefficient grows with n: its limit does not exist."""
        b = self.b
        abc = b.parametrization(b.param)[0] if b.param else None
        if abc is None:
            raise TpcError("training needs a parametrization: `parametrization mup` (or sp, ntk, mf, abc(...))",
                           span)
        for name in layers:
            la = b.layers[name]
            a = abc.a[la.index]
            if "grad" in types:
                e = MAXIMAL_LR_EXPONENT[la.role] - (2 * a + abc.c)
                if e > TOL:
                    raise TpcError(f"this update of {name} grows like n^{e:g} under {b.param.name} (2a + c = "
                                   f"{2 * a + abc.c:g} for the {la.role} layer; it needs >= "
                                   f"{MAXIMAL_LR_EXPONENT[la.role]:g})", span)
            if "weight" in types and abc.c < -TOL:
                raise TpcError(f"a decay term grows like n^{-abc.c:g} under {b.param.name} (c < 0)", span)
            if "adaptive" in types:
                cp = abc.adaptive_exponents()[la.index]
                e = FAN_IN_EXPONENT[la.role] - (a + cp)
                if e > TOL:
                    raise TpcError(f"this entrywise update of {name} grows like n^{e:g} under {b.param.name} "
                                   f"(a + c' = {a + cp:g} for the {la.role} layer; it needs >= "
                                   f"{FAN_IN_EXPONENT[la.role]:g}: parametrization mup, or abc(..., adaptive = "
                                   "[...]))", span)

    # --- expressions
    def value(self, e: ast.Expr) -> int | Lin:
        if isinstance(e, ast.Num):
            return self.add("const", (), "finite", e.span, value=e.value, static=True, scalar=True)
        if isinstance(e, ast.Name):
            return self.name(e)
        if isinstance(e, ast.Neg):
            v = self.value(e.operand)
            if isinstance(v, Lin) or self.ins(v).kind == "params":
                return self.as_lin(v).scaled(-1.0)  # type: ignore[union-attr]
            return self.fn("neg", [v], e.span)
        if isinstance(e, ast.BinOp):
            return self.binop(e)
        if isinstance(e, ast.Call):
            return self.call(e)
        if isinstance(e, ast.Index):
            return self.index(e)
        if isinstance(e, ast.Attr) and e.attr in ("lr", "words", "context"):
            raise TpcError(f"b.{e.attr} is read by the row updates of word2vec's tables: "
                           + ROW_UPDATE_FORMS.split(" is ", 1)[1].split(" (times")[0], e.span)
        if isinstance(e, ast.Attr) and self.stream_name() is not None:
            raise TpcError(f"a batch has .words, .context and .lr, read by row updates; not .{clip(e.attr)}", e.span)
        if isinstance(e, ast.ListExpr):  # a loop reads arrays by name, as its rows (X[t], Y[S[i]])
            raise TpcError("a list of numbers in a loop: declare it as data (`data Y2 = [...]`) and use its name",
                           e.span)
        raise TpcError("not part of a loop: numbers, data, f(X), losses, grad(L, f) and their combinations",
                       e.span)

    def name(self, e: ast.Name) -> int | Lin:
        i = self.local(e.id)
        if i is not None:
            return i
        b = self.b
        if e.id in self.mutables:
            m = self.mutables[e.id]
            if m.what == "state":
                self.state_reads.setdefault(e.id, []).append(
                    (e.span, frozenset(m.types), frozenset(loop.id for loop in self.loops)))
            return self.add("read", (), "params", e.span, name=e.id, root=m.root, what=m.what, layers=m.layers)
        if e.id == "pi":
            return self.add("const", (), "finite", e.span, value=float(np.pi), static=True, scalar=True)
        if e.id == self.stream_name():
            raise TpcError(f"'{e.id}' is a stream: a loop reads one batch of it at a time, {e.id}[t]", e.span)
        if e.id in b.dims:
            return self.add("const", (), "finite", e.span, value=float(b.dims[e.id]), static=True, scalar=True)
        if e.id in b.data:
            return self.add("data", (), "data", e.span, name=e.id, static=True, shape=b.data[e.id].shape)
        if e.id in b.losses:
            loss = b.losses[e.id]
            x = self.add("data", (), "data", e.span, name=loss.data, static=True, shape=b.data[loss.data].shape)
            f = self.apply(b.model.name, x, e.span)
            return self.add("named_loss", (f,), "finite", e.span, loss=e.id, scalar=True)
        if e.id == b.width:
            raise TpcError(f"the width can't appear in a loop: the parametrization scales updates with "
                           f"powers of {e.id}", e.span)
        self.refuse_fixed(e.id, e.span)
        raise b.unknown(e.id, e.span)

    def refuse_fixed(self, name: str, span: Span) -> None:
        la = self.b.layers.get(name)
        if la is not None and la.fixed:
            raise TpcError(f"'{name}' is a fixed random {la.declared} (declared with `{la.declared}`): the model "
                           "applies it, but it is no parameter to train, differentiate or keep state for; declare it "
                           "as a layer to train it", span)

    def binop(self, e: ast.BinOp) -> int | Lin:
        if e.op == "@":
            raise TpcError("a loop applies the model to data, f(X); the layers' products are the model's",
                           e.span)
        left, right = self.value(e.left), self.value(e.right)
        if not isinstance(left, Lin) and not isinstance(right, Lin) \
                and self.ins(left).kind != "params" and self.ins(right).kind != "params":
            fn = {"+": "add", "-": "sub", "*": "mul", "/": "div", "^": "pow"}[e.op]
            return self.fn(fn, [left, right], e.span)
        lin_l, lin_r = self.as_lin(left), self.as_lin(right)
        if e.op in "+-" and lin_l is not None and lin_r is not None:
            return Lin(lin_l.terms + (lin_r.terms if e.op == "+" else lin_r.scaled(-1.0).terms))
        if e.op == "*" and (lin_l is None) != (lin_r is None):
            coef, lin = (left, lin_r) if lin_l is None else (right, lin_l)
            return self.times(lin, coef, e.span)
        if e.op == "/" and lin_l is not None and lin_r is None:
            inv = self.fn("div", [self.add("const", (), "finite", e.span, value=1.0, static=True, scalar=True),
                                  right], e.span)
            return self.times(lin_l, inv, e.span)
        # anything else is an entrywise function: Adam's g * g and m / (sqrt(v) + eps)
        return self.entrywise({"+": "add", "-": "sub", "*": "mul", "/": "div", "^": "pow"}[e.op], [left, right],
                              e.span)

    def entrywise(self, fn: str, vals: list[int | Lin], span: Span) -> int:
        """`ewise`: a coordinatewise function, entry by entry of each layer's values, of gradients
        and states made of them (and numbers): an adaptive update's value, which the
        parametrization scales by its own exponents (parametrization.py)."""
        args: list[int] = []
        layers: list[str] = []
        for v in vals:
            lin = self.as_lin(v)
            if lin is None:
                c = self.ins(v)  # type: ignore[arg-type]
                if c.kind != "finite" or not c.attrs.get("scalar"):
                    raise TpcError("an entrywise function takes gradients, states made of them and numbers", span)
                args.append(v)  # type: ignore[arg-type]
                continue
            lin_layers, types = self.lin_layers(lin, span)
            if "weight" in types:
                raise TpcError(ENTRYWISE_OF_WEIGHTS, span)
            if {"grad", "adaptive"} <= types:
                raise TpcError("this adds gradients to an entrywise function of them (they scale differently "
                               "with the width)", span)
            p = lin.terms[0][2] if len(lin.terms) == 1 and lin.terms[0][:2] == (1.0, ()) else \
                self.materialize(lin, span)
            args.append(p)
            layers += [la for la in lin_layers if la not in layers]
        tree = ex.Apply(fn, tuple(ex.Arg(k) for k in range(len(args))))
        # which arguments are gradients (or states of them): read at their natural scale (parametrization.py)
        grads = [self.ins(a).kind == "params" and "grad" in self.params_type(self.ins(a)) for a in args]
        return self.add("ewise", tuple(args), "params", span, tree=tree, layers=tuple(layers), types=["adaptive"],
                        grads=grads)

    def as_lin(self, v: int | Lin) -> Lin | None:
        if isinstance(v, Lin):
            return v
        return Lin([(1.0, (), v)]) if self.ins(v).kind == "params" else None

    def times(self, lin: Lin, coef: int, span: Span) -> Lin:
        c = self.ins(coef)
        if c.kind != "finite" or not c.attrs.get("scalar"):
            raise TpcError("parameters and gradients are multiplied by numbers (scalars) only", span)
        if c.op == "const":
            return lin.scaled(c.attrs["value"])
        return lin.scaled(1.0, (coef,))

    def fn(self, fn: str, vals: list[int], span: Span) -> int:
        for v in vals:
            k = self.ins(v).kind
            if k == "params":
                raise TpcError(NONLINEAR, span)
        static = all(self.ins(v).static for v in vals)
        scalar = all(self.ins(v).attrs.get("scalar") for v in vals)
        consts = [self.ins(v) for v in vals]
        if all(c.op == "const" for c in consts) and fn in FUNCTIONS:  # fold numbers now
            import torch

            try:
                value = float(FUNCTIONS[fn].torch(*[torch.tensor(c.attrs["value"], dtype=torch.float64)
                                                    for c in consts]))
            except (RuntimeError, OverflowError):  # pragma: no cover - torch returns inf/nan instead
                value = float("nan")
            if not np.isfinite(value):
                raise TpcError("this constant is not finite", span)
            return self.add("const", (), "finite", span, value=value, static=True, scalar=True)
        shapes = [self.value_shape(v) for v in vals]
        shape: tuple[int, ...] | None = ()
        if any(sh is None for sh in shapes):
            shape = None
        else:
            arrays = list(dict.fromkeys(sh for sh in shapes if sh))
            if len(arrays) > 1:  # numpy would broadcast f(X) (B x k) against Y (B): refuse, say the shapes
                texts = " and ".join(" x ".join(map(str, sh)) for sh in arrays)
                raise TpcError(f"these values are {texts}: entrywise arithmetic takes values of one shape, or "
                               "numbers (f(X) is one number per row for a model with one output, else rows x outputs)",
                               span)
            shape = arrays[0] if arrays else ()
        return self.add("fn", tuple(vals), "finite", span, fn=fn, static=static, scalar=scalar, shape=shape)

    def value_shape(self, i: int) -> tuple[int, ...] | None:
        """The shape of a finite value where it is known when the loop is built (None: known when it runs)."""
        ins = self.ins(i)
        if ins.attrs.get("scalar"):
            return ()
        if ins.kind == "data" or ins.op == "fn":
            shape = ins.attrs.get("shape")
            return None if shape is None else tuple(int(d) for d in shape)
        if ins.op == "apply":
            x = self.value_shape(ins.args[0])
            if x is None:
                return None
            rows = 1 if len(x) == 1 else x[0]  # one row, X[i]: a batch of one
            k = int(next(la.rows for la in self.b.layers.values() if la.role == "readout"))
            return (rows,) if k == 1 else (rows, k)
        return None

    def call(self, e: ast.Call) -> int | Lin:
        b = self.b
        name = e.fn
        if name in self.mutables and self.mutables[name].what in ("model", "copy"):
            if len(e.args) != 1:
                raise TpcError(f"{name}(X) takes one data set", e.span)
            x = self.value(e.args[0])
            if isinstance(x, Lin) or self.ins(x).kind != "data":
                raise TpcError(f"{name}(X) takes data: a data set, batch(X, t, B) or X[i]", e.args[0].span)
            return self.apply(name, x, e.span)
        if name in LOSSES:
            return self.builtin_loss(e)
        if name == "grad":
            return self.grad(e)
        if name == "zeros":
            if len(e.args) == 1 and isinstance(e.args[0], ast.Name):
                self.refuse_fixed(e.args[0].id, e.args[0].span)
            if len(e.args) != 1 or not isinstance(e.args[0], ast.Name) or e.args[0].id not in self.mutables:
                raise TpcError("zeros(P) is zero for the layers of P (a model, a layer, a copy or a state)", e.span)
            m = self.mutables[e.args[0].id]
            return self.add("zeros", (), "params", e.span, layers=m.layers)
        if name == "batch":
            return self.batch(e)
        if name in TABLE_CALLS and self.stream_name() is not None:
            return self.table_call(e)
        if name == "<loss on rows>":  # desugared `train sgd(batch = B)`: loss L on rows tB .. tB+B-1
            loss = b.losses[e.args[0].id]
            x = self.add("data", (), "data", e.span, name=loss.data, static=True, shape=b.data[loss.data].shape)
            size = int(e.args[2].value)
            rows = self.add("rows", (x, self.static_index(e.args[1])), "data", e.span, size=size, static=True,
                            shape=(size, *b.data[loss.data].shape[1:]))
            f = self.apply(b.model.name, rows, e.span)
            return self.add("named_loss", (f, rows), "finite", e.span, loss=loss.name, scalar=True)
        if name == "rows":
            return self.add("const", (), "finite", e.span, value=self.b.const(self.rows_of(e)), static=True,
                            scalar=True)
        if name in ("mean", "sum"):
            if len(e.args) != 1:
                raise TpcError(f"{name}(x) takes one argument", e.span)
            v = self.value(e.args[0])
            if isinstance(v, Lin) or self.ins(v).kind == "params":
                raise TpcError(f"{name}(...) of parameters: a loop reduces finite values only", e.span)
            return self.add("reduce", (v,), "finite", e.span, fn=name, static=self.ins(v).static, scalar=True)
        if name in SCALAR_FUNCTIONS:
            if len(e.args) != 2:
                raise TpcError(f"{name}(a, b) takes two numbers", e.span)
            return self.fn(name, [self.finite(a) for a in e.args], e.span)
        if name in ("features", "feature_change", "history", "adapted", "embeddings"):
            raise TpcError(f"{name}(...) is an output: write it at the top level, after the loop", e.span)
        fn = ALIASES.get(name, name)
        if fn not in FUNCTIONS or not FUNCTIONS[fn].user_visible:
            if name in b.layers or name in self.mutables or name in b.data or self.local(name) is not None:
                # a name the program defines, called (was: "unknown name 'U'; did you mean 'U'?")
                what = f"a {b.layers[name].declared} of the model" if name in b.layers else "not a function"
                raise TpcError(f"'{clip(name)}' is {what}: a loop applies the whole model, {b.model.name}(X)",
                               e.fn_span)
            raise b.unknown(name, e.fn_span)
        if len(e.args) != FUNCTIONS[fn].arity:
            raise TpcError(f"'{name}' takes {FUNCTIONS[fn].arity} argument(s)", e.span)
        args = [self.value(a) for a in e.args]
        if any(isinstance(a, Lin) or self.ins(a).kind == "params" for a in args):
            return self.entrywise(fn, args, e.span)
        return self.fn(fn, args, e.span)

    # --- word2vec's step on embedding tables (a loop over a stream; `train cbow` desugars to one)
    def table_call(self, e: ast.Call) -> int:
        name, args = e.fn, e.args
        if len(args) != TABLE_CALLS[name]:
            usage = {"bag": "bag(U, b): each position's sum of its context words' vectors in U",
                     "logits": "logits(v, h): the logits v . h / n of the batch's words, v = V[b.words], h = bag(U, b)",
                     "negative_sampling": "negative_sampling(z, b): word2vec's loss of the logits z of batch b"}
            raise TpcError(usage[name], e.span)
        if name == "bag":
            table = self.table(args[0], "embedding")
            b = self.of_kind(args[1], "batch")
            read = self.ins(table)
            return self.add("gather", (table, b), "vectors", e.span, form="bag", layer=read.attrs["name"],
                            root=read.attrs["root"])
        if name == "logits":
            rows, h = self.gathered(args[0], "words"), self.gathered(args[1], "bag")
            self.same_batch(self.ins(rows).args[1], self.ins(h).args[1], args[1].span)
            return self.add("logits", (rows, h), "finite", e.span)
        z, b = self.logits_of(args[0]), self.of_kind(args[1], "batch")
        self.same_batch(b, self.ins(self.ins(z).args[0]).args[1], args[0].span,
                        "these logits are of another batch's words")
        return self.add("ns_loss", (z, b), "finite", e.span, scalar=True)

    def same_batch(self, b: int, other: int, span: Span, why: str = "these rows were gathered for another batch"
                   ) -> None:
        """Values of one batch (rows, logits, gradients, its rate) pair with that batch only: its positions,
        words and labels. `S[t]` read twice is one batch."""
        if other != b and self.ins(other).args != self.ins(b).args:
            raise TpcError(why, span)

    def stream_batch(self, e: ast.Index) -> int:
        """`S[t]`: batch t of the stream (a static step; a number is checked here)."""
        t = self.static_index(e.index)
        if self.ins(t).op == "const":
            step = int(whole_index(self.ins(t).attrs["value"], e.index.span))
            steps = self.stream_steps(e.span)
            if not 0 <= step < steps:
                raise TpcError(f"the stream has {steps} batches (0 .. {steps - 1}): there is no batch {step}",
                               e.index.span)
        return self.add("stream", (t,), "batch", e.span, tokens=self.b.train.cbow.tokens,
                        stream=self.stream_name(), static=True)

    def words_of(self, e: ast.Index) -> int:
        """`V[b.words]`: the readout's rows of each position's centre word and negatives."""
        if not isinstance(e.index, ast.Attr) or e.index.attr != "words":
            raise TpcError("a table's rows are read as V[b.words] (each position's centre word and negatives) "
                           "or bag(U, b) (each position's sum of its context words)", e.index.span)
        table = self.table(e.operand, "readout")
        b = self.of_kind(e.index.operand, "batch")
        read = self.ins(table)
        return self.add("gather", (table, b), "vectors", e.span, form="words", layer=read.attrs["name"],
                        root=read.attrs["root"])

    def dlogits(self, loss: int, z: int, span: Span) -> int:
        """`grad(L, z)`: dL/dz of a negative-sampling loss with respect to its own logits."""
        if self.ins(loss).op != "ns_loss" or self.ins(loss).args[0] != z:
            raise TpcError("grad(L, z) with logits z is the gradient of L = negative_sampling(z, b) with respect "
                           "to its own logits", span)
        return self.add("ns_grad", (loss, z, self.ins(loss).args[1]), "finite", span)

    def of_kind(self, e: ast.Expr, kind: str) -> int:
        v = self.value(e)
        if isinstance(v, Lin) or self.ins(v).kind != kind:
            raise TpcError(f"this takes {KIND_WORDS[kind]}", e.span)
        return v

    def table(self, e: ast.Expr, role: str) -> int:
        """The current rows of an embedding table: the model's layer of this role."""
        v = self.value(e)
        ins = None if isinstance(v, Lin) else self.ins(v)
        if ins is None or ins.op != "read" or ins.attrs["what"] != "layer" \
                or getattr(self.b.layers.get(ins.attrs["name"]), "role", None) != role:
            raise TpcError(f"this takes a table of word vectors: the model's {role} layer", e.span)
        return v

    def gathered(self, e: ast.Expr, form: str) -> int:
        v = self.of_kind(e, "vectors")
        if self.ins(v).attrs["form"] != form:
            what = "h = bag(U, b), each position's sum of its context words' vectors" if form == "bag" else \
                "v = V[b.words], the rows of each position's centre word and negatives"
            raise TpcError(f"this takes {what}", e.span)
        return v

    def logits_of(self, e: ast.Expr) -> int:
        v = self.of_kind(e, "finite")
        if self.ins(v).op != "logits":
            raise TpcError("this takes the logits of a batch's words", e.span)
        return v

    def row_update(self, s: ast.Update) -> None:
        """`V[b.words] -= c * b.lr * outer(g, h)` or `U[b.context] -= c * b.lr * (g @ v)`: word2vec's
        indexed row update (c: numbers, optional; so is the stream's decaying rate b.lr)."""
        idx = s.index
        if self.stream_name() is None:
            raise TpcError("indexed updates are word2vec's row updates of tables, in a loop over a stream "
                           "(`stream S = cbow(T, ...)`)", idx.span)
        if not isinstance(idx, ast.Attr) or idx.attr not in ROW_UPDATES:
            raise TpcError(ROW_UPDATE_FORMS, idx.span)
        role, form = ROW_UPDATES[idx.attr]
        m = self.mutables.get(s.target)
        if m is None and s.target != self.stream_name() and s.target not in self.b.defined:
            raise self.b.unknown(s.target, s.target_span)
        if m is None or m.what != "layer":
            raise TpcError(f"'{clip(s.target)}' is not a table: row updates change the model's embedding layer "
                           "(U[b.context]) and readout (V[b.words])", s.target_span)
        if getattr(self.b.layers.get(s.target), "role", None) != role:
            raise TpcError(f"{clip(s.target)}[b.{idx.attr}] updates the rows of the model's {role} layer",
                           s.target_span)
        b = self.of_kind(idx.operand, "batch")
        coef, rate, step = self.row_step(s.value, b)
        if step is None:
            raise TpcError(ROW_UPDATE_FORMS, s.value.span)
        fn, g_expr, rows_expr = step
        if fn != ("outer" if idx.attr == "words" else "@"):
            raise TpcError(f"the {idx.attr} of a batch move along "
                           + ("outer(g, h)" if idx.attr == "words" else "(g @ v)") + ": " + ROW_UPDATE_FORMS,
                           s.value.span)
        g = self.of_kind(g_expr, "finite")
        if self.ins(g).op != "ns_grad":
            raise TpcError("a row update moves the rows along the gradient of the logits, g = grad(L, z)",
                           g_expr.span)
        self.same_batch(b, self.ins(g).args[2], g_expr.span,
                        "g is the gradient of another batch's logits than the rows updated")
        rows = self.gathered(rows_expr, form)
        self.same_batch(b, self.ins(rows).args[1], rows_expr.span)
        self.add("scatter_add", (b, g, rows), "none", s.span, target=s.target, root=m.root, layer=s.target,
                 index=idx.attr, scaled=True, coef=coef if s.op == "-=" else -coef, rate=rate)
        self.forget((m.root,))

    def row_step(self, e: ast.Expr, b: int) -> tuple[float, bool, tuple[str, ast.Expr, ast.Expr] | None]:
        """The factors of a row update's right side: a number, whether it has the batch's rate b.lr, and its
        step `outer(g, h)` or `g @ v` (None if it has none)."""
        if isinstance(e, ast.Neg):
            coef, rate, step = self.row_step(e.operand, b)
            return -coef, rate, step
        if isinstance(e, ast.BinOp) and e.op == "*":
            c1, r1, s1 = self.row_step(e.left, b)
            c2, r2, s2 = self.row_step(e.right, b)
            if r1 and r2 or s1 and s2:
                raise TpcError(ROW_UPDATE_FORMS, e.span)
            return c1 * c2, r1 or r2, s1 or s2
        if isinstance(e, ast.BinOp) and e.op == "/":
            c1, r1, s1 = self.row_step(e.left, b)
            d = self.row_number(e.right)
            if d == 0:
                raise TpcError("division by zero", e.right.span)
            return c1 / d, r1, s1
        if isinstance(e, ast.Attr) and e.attr == "lr":
            self.same_batch(b, self.of_kind(e.operand, "batch"), e.span,
                            "the rate of another batch than the rows updated")
            return 1.0, True, None
        if isinstance(e, ast.Call) and e.fn == "outer" and len(e.args) == 2:
            return 1.0, False, ("outer", e.args[0], e.args[1])
        if isinstance(e, ast.BinOp) and e.op == "@":
            return 1.0, False, ("@", e.left, e.right)
        return self.row_number(e), False, None

    def row_number(self, e: ast.Expr) -> float:
        try:
            value = self.b.const(e)
        except TpcError:
            raise TpcError(ROW_UPDATE_FORMS, e.span) from None
        if not np.isfinite(value):
            raise TpcError("this constant is not finite", e.span)
        return value

    def finite(self, e: ast.Expr) -> int:
        v = self.value(e)
        if isinstance(v, Lin) or self.ins(v).kind == "params":
            raise TpcError(NONLINEAR, e.span)
        return v

    def apply(self, root: str, x: int, span: Span) -> int:
        if self.stream_name() is not None:
            raise TpcError(f"{TABLES_ONLY}; the model is not applied to data sets there", span)
        ins = self.ins(x)
        key: tuple[str, object] = (root, x)
        if ins.op == "data":  # the same data set: one forward pass until the parameters change
            key = (root, ins.attrs["name"])
            if key in self.applied:
                return self.applied[key]
        d = self.b.input_dim()
        shape = ins.attrs.get("shape")
        if shape is not None and len(shape) == 1 and shape[0] == d:  # one row, X[i]: a batch of one
            shape = (1, d)
        if shape is not None and (len(shape) != 2 or shape[1] != d):
            raise TpcError(f"this data is {' x '.join(map(str, shape))}; the model takes rows of dimension {d}",
                           span)
        out = self.add("apply", (x,), "outputs", span, root=root)
        self.applied[key] = out
        return out

    def builtin_loss(self, e: ast.Call) -> int:
        if len(e.args) != 2:
            raise TpcError(f"{e.fn}(f(X), Y) takes the model's outputs and the targets", e.span)
        f = self.value(e.args[0])
        if isinstance(f, Lin) or self.ins(f).op != "apply":
            raise TpcError(f"the first argument of {e.fn} is the model on data, e.g. {self.b.model.name}(X)",
                           e.args[0].span)
        y = self.value(e.args[1])
        if isinstance(y, Lin) or self.ins(y).kind != "data":
            raise TpcError("the targets are data", e.args[1].span)
        xs, ys = self.ins(self.ins(f).args[0]).attrs.get("shape"), self.ins(y).attrs.get("shape")
        if xs is not None and ys is not None:
            # f(X[t]) is one input, a batch of one (batch_of_one reads its targets)
            x_arr = np.zeros((1 if len(xs) == 1 else xs[0], 1))
            targets = batch_of_one(len(x_arr), np.zeros(ys) if e.fn != "xent" else self.data_sample(y))
            self.b.check_targets(e.fn, x_arr, targets, e.args[1].span)
        return self.add("loss", (f, y), "finite", e.span, loss=e.fn, scalar=True)

    def data_sample(self, y: int) -> np.ndarray:
        """The data of a static data instruction when it is a whole data set, for label checks."""
        ins = self.ins(y)
        if ins.op == "data":
            return self.b.data[ins.attrs["name"]]
        return np.zeros(ins.attrs["shape"])

    def grad(self, e: ast.Call) -> int:
        if len(e.args) != 2:
            raise TpcError("grad(L, P) takes a loss and parameters (the model, a layer or a copy)", e.span)
        loss = self.finite(e.args[0])
        target = e.args[1]
        z = self.local(target.id) if isinstance(target, ast.Name) else None
        if z is not None and self.ins(z).op == "logits":
            return self.dlogits(loss, z, e.span)
        m = self.mutables.get(target.id) if isinstance(target, ast.Name) else None
        if self.stream_name() is not None:
            raise TpcError("in a word2vec loop grad(L, z) is the gradient of L = negative_sampling(z, b) with respect "
                           "to its logits z, which the row updates take", target.span)
        if isinstance(target, ast.Name):
            self.refuse_fixed(target.id, target.span)
        if m is None or m.what == "state":
            what = clip(target.id) if isinstance(target, ast.Name) else "..."
            raise TpcError(f"grad(L, {what}): not a parameter (the model, a layer, or a copy of the model)",
                           target.span)
        if not self.ins(loss).attrs.get("scalar"):
            raise TpcError("grad(L, P) needs a number L (a loss, or mean(...) of f(X))", e.args[0].span)
        applies = self.applies_of(loss)
        mine = [a for a in applies if self.ins(a).attrs["root"] == m.root]
        if not mine:
            others = sorted({self.ins(a).attrs["root"] for a in applies})
            if others:
                raise TpcError(f"the loss depends on {target.id} only through the copy {others[0]}: use "
                               f"grad(L, {others[0]}) (first-order MAML); differentiating through updates is "
                               "not supported", e.span)
            raise TpcError(f"the loss does not depend on {target.id}: it has no {self.b.model.name}(X) in it",
                           e.args[0].span)
        return self.add("grad", (loss, *mine), "params", e.span, layers=m.layers, root=m.root)

    def applies_of(self, i: int) -> list[int]:
        seen: set[int] = set()
        out: list[int] = []
        todo = [i]
        while todo:
            j = todo.pop()
            if j in seen:
                continue
            seen.add(j)
            ins = self.ins(j)
            if ins.op == "apply":
                out.append(j)
            elif ins.op == "named_loss" or ins.kind in ("finite", "outputs"):
                todo.extend(ins.args)
        return sorted(out)

    def batch(self, e: ast.Call) -> int:
        if len(e.args) != 3:
            raise TpcError("batch(X, t, B) is rows tB .. tB+B-1 of X (wrapping around)", e.span)
        x = self.value(e.args[0])
        if isinstance(x, Lin) or self.ins(x).op != "data":
            raise TpcError("batch(X, t, B) takes a data set X", e.args[0].span)
        t = self.static_index(e.args[1])
        size = self.b.const(e.args[2])
        rows = self.b.data[self.ins(x).attrs["name"]]
        m = rows.shape[0] if rows.ndim else 1
        if size != int(size) or not 1 <= size <= m:
            raise TpcError(f"the batch size must be a whole number in 1..{m} (the rows of the data)", e.args[2].span)
        shape = (int(size), *rows.shape[1:])
        return self.add("rows", (x, t), "data", e.span, size=int(size), static=True, shape=shape)

    def static_index(self, e: ast.Expr) -> int:
        i = self.finite(e)
        if not self.ins(i).static:
            raise TpcError("an index or a step can't depend on a value computed at width n (use a loop counter, "
                           "numbers or data)", e.span)
        return i

    def index(self, e: ast.Index) -> int:
        if isinstance(e.operand, ast.Name) and self.stream_name() is not None:
            if e.operand.id == self.stream_name():
                return self.stream_batch(e)
            m = self.mutables.get(e.operand.id)
            if m is not None and m.what == "layer":
                return self.words_of(e)
        x = self.value(e.operand)
        if isinstance(x, Lin) or self.ins(x).kind != "data":
            raise TpcError("X[i] picks rows of data", e.operand.span)
        i = self.value(e.index)
        if isinstance(i, Lin) or not self.ins(i).static:
            raise TpcError("an index or a step can't depend on a value computed at width n (use a loop counter, "
                           "numbers or data)", e.index.span)
        shape = self.ins(x).attrs.get("shape") or self.b.data[self.ins(x).attrs["name"]].shape
        if not shape:
            raise TpcError("a single number has no rows to index", e.operand.span)
        ishape = self.ins(i).attrs.get("shape") if self.ins(i).kind == "data" else ()
        out_shape = (*ishape, *shape[1:]) if ishape is not None else None
        return self.add("index", (x, i), "data", e.span, static=True, shape=out_shape)

    # --- linear combinations
    def lin_layers(self, lin: Lin, span: Span) -> tuple[tuple[str, ...], set[str]]:
        layers: list[str] = []
        types: set[str] = set()
        weight_layers: tuple[str, ...] | None = None
        for _, _, p in lin.terms:
            ins = self.ins(p)
            t = self.params_type(ins)
            types |= t
            for la in ins.attrs["layers"]:
                if la not in layers:
                    layers.append(la)
            if "weight" in t:
                if weight_layers is not None and weight_layers != ins.attrs["layers"]:
                    raise TpcError("parameters of different layers can't be added: each term must cover the same "
                                   "layers", span)
                weight_layers = ins.attrs["layers"]
        return tuple(layers), types

    def params_type(self, ins: Instr) -> set[str]:
        if ins.op == "grad":
            return {"grad"}
        if ins.op == "zeros":
            return set()
        if ins.op == "read":
            m = self.mutables.get(ins.attrs["name"])
            if ins.attrs["what"] == "state":
                return set(m.types) if m else set()
            return {"weight"}
        if ins.op in ("lincomb", "ewise"):
            return set(ins.attrs["types"])
        return set()  # pragma: no cover

    def lin_args(self, lin: Lin) -> tuple[tuple[int, ...], list[tuple[float, tuple[int, ...], int]]]:
        args: list[int] = []
        for _, cs, p in lin.terms:
            for i in (*cs, p):
                if i not in args:
                    args.append(i)
        return tuple(args), list(lin.terms)

    def materialize(self, lin: Lin, span: Span) -> int:
        layers, types = self.lin_layers(lin, span)
        if {"weight", "grad"} <= types or {"weight", "adaptive"} <= types:
            raise TpcError("this mixes parameters and gradients (they scale differently with the width); use it "
                           "directly in an update 'f -= ...'", span)
        if {"grad", "adaptive"} <= types:
            raise TpcError("this adds gradients to an entrywise function of them (they scale differently "
                           "with the width)", span)
        args, terms = self.lin_args(lin)
        return self.add("lincomb", args, "params", span, terms=terms, layers=layers, types=sorted(types))

    def finish(self) -> TrainProgram:
        return self.prog
