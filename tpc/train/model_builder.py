"""A network program's model: `model f(x) = expr` (or a body of Netsor statements ending in
`return`) checked into the model's list of steps (tpc/train/steps.py), each layer's role checked
where the model applies it."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from tpc import syntax as ast
from tpc.build import ExpansionBudget, transpose_by_caret
from tpc.errors import Span, TpcError, clip, nearest
from tpc.ops import expr as ex
from tpc.ops.functions import ALIASES, FUNCTIONS
from tpc.train.network import NORM_EPS, NORMS, POSITION_OPS, Conv, Model, Step, used_before

if TYPE_CHECKING:
    from tpc.train.network import _Builder


class ModelBuilder:
    """`model f(x) = expr` -> a list of Steps, checking each layer's role where it is applied."""

    def __init__(self, b: _Builder, decl: ast.ModelDecl) -> None:
        self.b = b
        self.decl = decl
        self.steps: list[Step] = []
        self.scope: list[dict[str, int | float]] = []
        self.order: list[str] = []  # layers in the order of first use
        self.bias_context: dict[int, tuple[int, ...]] = {}  # bias step -> the grid it is used on, () per input
        self.budget = ExpansionBudget()  # nonlins are inlined: the model's expansion is bounded
        # `model f(x) { h = ...  return ... }`: the body's names, each a step (or a number), and where they are
        self.lets: dict[str, int | float] = {}
        self.let_spans: dict[str, Span] = {}
        self.used: set[str] = set()
        self.top_values: dict[str, int | float] = {}  # the top-level names the model read, as its steps
        self.top_stack: list[str] = []  # the top-level statements being built (inner last)

    def build(self) -> Model:
        if not any(la.takes_data for la in self.b.layers.values()):
            raise TpcError("the model needs an input layer: `layer W1 : input n x d`", self.decl.span)
        if self.decl.positions_span is not None and not 2 <= self.decl.positions <= 4096 \
                or any(g < 1 for g in self.decl.grid):
            raise TpcError(f"{self.decl.arg}[P] or {self.decl.arg}[H, W] declares 2 to 4096 positions per input "
                           f"(one position: write {self.decl.name}({self.decl.arg}))", self.decl.positions_span)
        for let in self.decl.lets:
            self.let(let)
        out = self.value(self.decl.body)
        self.check_lets_used(out)
        if not isinstance(out, int) or self.steps[out].kind != "out":
            raise TpcError("a model ends with its readout layer: model f(x) = V @ ...", self.decl.body.span)
        if out != len(self.steps) - 1:  # pragma: no cover - the readout is applied last by construction
            raise TpcError("the model's readout must be its last operation", self.decl.body.span)
        roles = [self.b.layers[n].role for n in self.order]
        if roles.count("input") + roles.count("embedding") != 1 or roles.count("readout") != 1:
            raise TpcError("a model has one input layer and one readout layer", self.decl.body.span)
        numbers: dict[str, int] = {}  # a convolution's taps are one layer
        for name in self.order:  # TP4's layer numbers, in the order of application
            la = self.b.layers[name]
            la.index = {"input": 0, "embedding": 0, "bias": 0, "readout": -1}.get(la.role, -2)
            if la.role == "hidden" and not la.fixed:  # a fixed matrix has no place in the abc lists
                la.index = numbers.setdefault(la.group or name, len(numbers) + 1)
        for la in self.b.layers.values():
            if la.role == "readout":
                la.index = len(numbers) + 1
        named = {**self.top_values, **self.lets}
        names = {v: k for k, v in named.items() if isinstance(v, int) and self.steps[v].op not in ("input", "bias")}
        return Model(self.decl.name, self.decl.arg, self.steps, self.decl.span, self.decl.positions, self.decl.grid,
                     names)

    def let(self, s: ast.Assign) -> None:
        """`h = expr` in a model's body: a name for a value, which later statements and `return` use."""
        first = self.let_spans.get(s.name) or self.b.defined.get(s.name)
        if first is not None:
            raise TpcError(f"'{s.name}' is already defined (first defined at line {first.line}); a model's "
                           "statements name each value once", s.span)
        if s.name in (self.decl.arg, self.decl.name, self.b.width) or s.name in self.b.nonlins:
            raise TpcError(f"'{s.name}' already names the model, its input, the width or a nonlin", s.span)
        self.b.not_builtin(s.name, s.span)
        self.lets[s.name] = self.value(s.value)
        self.let_spans[s.name] = s.span

    def check_lets_used(self, out: int | float) -> None:
        """Every statement of a model's body feeds its output (a value it does not use would still be a
        layer's forward pass, and a layer that the output does not read)."""
        reached: set[int] = set()
        stack = [out] if isinstance(out, int) else []
        while stack:
            i = stack.pop()
            if i not in reached:
                reached.add(i)
                stack.extend(self.steps[i].args)
        for name, v in self.lets.items():  # (a name read only by unused statements reaches no step)
            if name not in self.used or isinstance(v, int) and v not in reached:
                raise TpcError(f"'{name}' is not used by the model's output", self.let_spans[name])

    def add(self, step: Step) -> int:
        self.steps.append(step)
        if step.layer and step.layer not in self.order:
            self.order.append(step.layer)
        return len(self.steps) - 1

    def value(self, e: ast.Expr) -> int | float:
        """A step index, or a float for constants. Bounds the expansion of user nonlins (each call is
        inlined: `f2(x) = f1(x) + f1(x)` doubles at every level) before it takes exponential time or
        exhausts the Python stack."""
        with self.budget.visit(e.span, "simplify them", "the model gives {what}"):
            v = self._value(e)
        return v

    def _value(self, e: ast.Expr) -> int | float:
        if isinstance(e, ast.Num):
            return e.value
        if isinstance(e, ast.Name):
            return self.name(e)
        if isinstance(e, ast.BinOp) and e.op == "@":
            return self.matmul(e)
        if isinstance(e, ast.BinOp) and transpose_by_caret(e):
            raise TpcError("the transpose of a layer is written W.T: W.T @ h", e.span)
        if isinstance(e, ast.BinOp):
            fn = {"+": "add", "-": "sub", "*": "mul", "/": "div", "^": "pow"}[e.op]
            return self.fn(fn, [self.value(e.left), self.value(e.right)], e)
        if isinstance(e, ast.Neg):
            return self.fn("neg", [self.value(e.operand)], e)
        if isinstance(e, ast.Call):
            return self.call(e)
        if isinstance(e, ast.Attr):
            if e.attr == "T":
                raise TpcError("a transpose is used only as a product: W.T @ h", e.span)
            raise TpcError(f"unknown attribute '.{clip(e.attr)}'", e.span)
        raise TpcError("not part of a model: layers, coordinatewise functions and numbers", e.span)

    def name(self, e: ast.Name) -> int | float:
        for local in reversed(self.scope):
            if e.id in local:
                return local[e.id]
        if not self.scope and not self.top_stack and e.id in self.lets:  # the model's body (a nonlin does not
            self.used.add(e.id)                                          # see its names)
            return self.lets[e.id]
        if not self.scope and e.id in self.b.top_lets:
            return self.top_value(e)
        if self.scope and (e.id in self.b.top_lets or e.id in self.lets):
            raise TpcError(f"'{clip(e.id)}' is a value of the model: a nonlin sees only its own arguments and "
                           f"parameters (pass it as an argument)", e.span)
        if self.top_stack:
            self.outside_model(e)
        if e.id == self.decl.arg:
            for i, s in enumerate(self.steps):
                if s.op == "input":
                    return i
            return self.add(Step("input", "data", span=e.span, grid=self.decl.grid if self.decl.positions > 1 else ()))
        if e.id in self.b.dims:
            return float(self.b.dims[e.id])
        if e.id in self.b.layers:
            la = self.b.layers[e.id]
            if la.role != "bias":
                raise TpcError(f"{la.declared} '{e.id}' is applied with @: {e.id} @ ...", e.span)
            for i, s in enumerate(self.steps):
                if s.op == "bias" and s.layer == e.id:
                    return i
            return self.add(Step("bias", "vector", layer=e.id, span=e.span))
        if e.id == self.b.width:
            raise TpcError(f"the parametrization supplies the powers of {e.id}; a model does not use the width",
                           e.span)
        later = next((s for s in self.decl.lets if s.name == e.id), None)
        if later is not None and not self.scope:
            raise used_before(e.id, later.span, e.span)
        if not self.scope and self.decl.lets:  # the body's names are candidates too
            near = nearest(e.id, self.b.known() + list(self.lets))
            raise TpcError(f"unknown name '{clip(e.id)}'", e.span, f"did you mean '{near}'?" if near else None)
        raise self.b.unknown(e.id, e.span)

    def outside_model(self, e: ast.Name) -> None:
        """Refuse what a value named at the top level (outside the model) cannot read: the model's argument,
        data (declared after it: data before it are refused at its line) and the model's own names."""
        where = f"'{self.top_stack[-1]}' is named outside the model, so it cannot read"
        inside = f"(name this value inside the model: model {self.decl.name}({self.decl.arg}) {{ ... }})"
        if e.id == self.decl.arg or e.id in self.b.data:
            what = "the model's argument" if e.id == self.decl.arg else "data"
            raise TpcError(f"{where} {what} '{e.id}' {inside}", e.span)
        if any(s.name == e.id for s in self.decl.lets):
            raise TpcError(f"{where} '{clip(e.id)}', a name of the model's body {inside}", e.span)

    def top_value(self, e: ast.Name) -> int | float:
        """A value named at the top level (`z = tanh(A @ y)`), built the first time the model reads it."""
        if e.id in self.top_values:
            return self.top_values[e.id]
        names = list(self.b.top_lets)
        if self.top_stack and names.index(e.id) >= names.index(self.top_stack[-1]):
            raise used_before(e.id, self.b.top_lets[e.id].span, e.span)
        self.top_stack.append(e.id)
        saved, self.scope = self.scope, []
        try:
            v = self.value(self.b.top_lets[e.id].value)
        finally:
            self.scope = saved
            self.top_stack.pop()
        self.top_values[e.id] = v
        self.b.top_used.add(e.id)
        return v

    def matmul(self, e: ast.BinOp) -> int:
        left, transposed = ast.untransposed(e.left)
        if isinstance(left, ast.Name) and left.id in self.b.convs:
            x = self.decl.arg if self.b.convs[left.id].takes_data else "h"
            name = f"{left.id}.T" if transposed else left.id
            raise TpcError(f"'{left.id}' is a convolution: apply it with conv({name}, {x})", e.left.span)
        if not isinstance(left, ast.Name) or left.id not in self.b.layers:
            raise TpcError("the left of @ in a model is a layer", e.left.span)
        la = self.b.layers[left.id]
        if transposed and la.role != "hidden":
            # U.T or V.T would map the n coordinates back to the d inputs or k outputs: not an n-vector
            what = {"input": "an input layer (n x d)", "embedding": "an embedding layer (n x d)",
                    "readout": "a readout layer (k x n)", "bias": "a bias"}.get(la.role, f"a {la.role} layer")
            if la.fixed:
                what = "a fixed n x d matrix" if la.role == "input" else "a fixed vector"
            raise TpcError(f"only an n x n layer is applied transposed (tied weights, W.T @ h); '{la.name}' is {what}",
                           e.left.span)
        if la.role == "bias":
            if la.fixed:
                raise TpcError(f"'{la.name}' is a fixed vector, added as a bias (W @ x + {la.name}); a readout is a "
                               "layer: layer V : readout 1 x n", e.left.span)
            raise TpcError(f"'{la.name}' is a bias: add it (W @ x + {la.name})", e.left.span)
        right, flat = e.right, isinstance(e.right, ast.Call) and e.right.fn == "flatten"
        if flat:  # V @ flatten(h): the readout with its own weights at each of h's positions
            if la.role != "readout" or len(e.right.args) != 1:
                raise TpcError("flatten(h) is read by the readout alone: V @ flatten(h)", e.right.span)
            right = e.right.args[0]
        x = self.value(right)
        if flat and not (isinstance(x, int) and self.steps[x].kind == "vector" and self.steps[x].pos):
            raise TpcError("flatten(h) takes an n-vector at every position", right.span)
        kind = self.steps[x].kind if isinstance(x, int) else "constant"
        want = "data" if la.takes_data else "vector"
        if kind != want:
            what = {"data": f"the model's input {self.decl.arg}", "vector": "an n-vector"}[want]
            article = "an" if la.role[0] in "aeiou" else "a"
            if la.fixed:  # the user wrote a matrix, not a role
                shape = "n x n" if la.role == "hidden" else "n x d"
                other = {"data": "an n-vector", "vector": f"the model's input {self.decl.arg}"}[want]
                raise TpcError(f"the fixed {shape} matrix '{la.name}' multiplies {what}, not {other}", e.right.span)
            raise TpcError(f"{article} {la.role} layer multiplies {what}", e.right.span)
        if self.steps[x].kind == "out":  # pragma: no cover - guarded by the kind check
            raise TpcError("the readout's output is finite", e.span)
        if la.role == "readout" and self.scope:
            raise TpcError("the readout is applied in the model's body, not inside a nonlin", e.span)
        if la.role == "readout" and self.steps[x].pos:
            if not flat:
                raise TpcError("the readout takes one vector per input: average over the positions first, "
                               "V @ pool(h), or give it weights at every position, V @ flatten(h)", e.right.span)
            la.taps = self.steps[x].positions
        return self.add(Step("matmul", "out" if la.role == "readout" else "vector", layer=la.name, args=(x,),
                             span=e.span, grid=() if la.role == "readout" else self.steps[x].grid,
                             transposed=transposed))

    def call(self, e: ast.Call) -> int | float:
        if e.fn in self.b.nonlins:
            d = self.b.nonlins[e.fn]
            names = d.args + d.params
            if len(e.args) != len(names):
                raise TpcError(f"'{e.fn}' takes {len(names)} arguments, got {len(e.args)}", e.span)
            if len(self.scope) > 16:
                raise TpcError(f"'{e.fn}' is nested too deeply", e.span)
            self.scope.append({n: self.value(a) for n, a in zip(names, e.args, strict=True)})
            try:
                with self.budget.call(e.span):
                    return self.value(d.body)
            finally:
                self.scope.pop()
        fn = ALIASES.get(e.fn, e.fn)
        if fn == "sqrt" and len(e.args) == 1:
            return self.fn("pow", [self.value(e.args[0]), 0.5], e)
        if fn == "mean":
            if len(e.args) != 1:
                raise TpcError(f"mean(h) takes one argument, got {len(e.args)}", e.span)
            return self.moment(self.value(e.args[0]), e)
        if fn in NORMS:
            return self.norm(fn, e)
        if fn in POSITION_OPS:
            return self.positional(fn, e)
        if fn == "conv":
            return self.conv(e)
        if fn == "flatten":
            raise TpcError("flatten(h) is read by the readout alone: V @ flatten(h)", e.span)
        if fn not in FUNCTIONS or not FUNCTIONS[fn].user_visible:
            if e.fn == self.decl.name:
                raise TpcError("a model cannot call itself", e.fn_span)
            if e.fn in self.b.top_lets or e.fn in self.lets:
                raise TpcError(f"'{clip(e.fn)}' is a value, not a function (a function of the model's values is "
                               f"declared as one: nonlin {clip(e.fn)}(z) = ...)", e.fn_span)
            raise self.b.unknown(e.fn, e.fn_span)
        if len(e.args) != FUNCTIONS[fn].arity:
            raise TpcError(f"'{e.fn}' takes {FUNCTIONS[fn].arity} argument(s), got {len(e.args)}", e.span)
        return self.fn(fn, [self.value(a) for a in e.args], e)

    def what(self, v: int | float) -> str:
        """What a value that is not an n-vector is, for a message."""
        kind = self.steps[v].kind if isinstance(v, int) else "number"
        return {"data": "the model's input (a finite vector)", "out": "the readout's output (finite)",
                "scalar": "a number per input", "number": "a number"}[kind]

    def moment(self, v: int | float, e: ast.Expr) -> int:
        """`mean(h)`: the average of an n-vector's coordinates, one number per input."""
        if not isinstance(v, int) or self.steps[v].kind != "vector":
            raise TpcError(f"mean(...) averages the n coordinates of a vector; this is {self.what(v)}", e.span)
        return self.add(Step("moment", "scalar", args=(v,), span=e.span, grid=self.steps[v].grid))

    def position_free(self, v: int) -> bool:
        """A bias, or a value computed from biases alone (mean(b)): the same at every position."""
        step = self.steps[v]
        return step.op == "bias" or step.op in ("moment", "fn") and all(self.position_free(a) for a in step.args)

    def take_context(self, v: int, ctx: tuple[int, ...], e: ast.Expr) -> None:
        """A position-free value used on a grid of positions (ctx) or per input (()), and its biases."""
        step = self.steps[v]
        if step.op == "bias" and self.bias_context.setdefault(v, ctx) != ctx:
            where = "at every position and after pool" if () in (ctx, self.bias_context[v]) else \
                "on grids of two sizes"
            raise TpcError(f"the bias '{step.layer}' is used both {where}: give each its own bias layer", e.span)
        step.grid = ctx
        for a in step.args:
            self.take_context(a, ctx, e)

    def positional(self, fn: str, e: ast.Call) -> int:
        """`attend(q, k, v)`: at each position p, sum_r softmax_r(q_p . k_r / n^e) v_r over the input's
        positions r (e from the parametrization: `attention` below); `pool(h)`: the mean over them;
        `shift(h, s)` (`shift(h, dy, dx)` on a grid): h at position p + s, zero beyond the edges;
        `avgpool(h, k)` (`avgpool(h, k, s)`): the mean over k (k x k) positions, every s-th (s = k)."""
        if self.decl.positions == 1:
            raise TpcError(f"{fn}(...) mixes the positions of an input; declare them: model "
                           f"{self.decl.name}({self.decl.arg}[8])", e.span)
        dims = len(self.decl.grid)
        arity = {"attend": 3, "pool": 1, "shift": 1 + dims, "avgpool": 2}[fn]
        heads = 1
        if fn == "attend" and len(e.args) == 4:  # attend(q, k, v, H): H heads
            h = self.value(e.args[3])
            if not isinstance(h, float) or h != round(h) or not 1 <= h <= 256:
                raise TpcError("attend(q, k, v, H) takes a whole number of heads H, 1 to 256", e.args[3].span)
            heads, e = int(h), replace(e, args=e.args[:3])
        if len(e.args) != arity and not (fn == "avgpool" and len(e.args) == 3):
            what = {"shift": "shift(h, s)" if dims == 1 else "shift(h, dy, dx) on a grid of positions",
                    "attend": "attend(q, k, v) or attend(q, k, v, heads)"}.get(fn, fn + "(...)")
            takes = {"attend": "3 or 4 arguments", "avgpool": "2 or 3 arguments: avgpool(h, k) or "
                     "avgpool(h, k, stride)"}.get(fn, f"{arity} argument(s)")
            raise TpcError(f"{what} takes {takes}, got {len(e.args)}", e.span)
        numbers: tuple[ast.Expr, ...] = ()  # a shift's offsets, avgpool's window and stride
        if fn in ("shift", "avgpool"):
            numbers, e = e.args[1:], replace(e, args=e.args[:1])
        args = [self.value(a) for a in e.args]
        for a, v in zip(e.args, args, strict=True):
            if isinstance(v, int) and self.steps[v].kind == "vector" and self.position_free(v):
                raise TpcError(f"{fn}(...) takes an n-vector at every position; a bias is the same vector at "
                               "every position: add it to one (E @ x + b)", a.span)
            if not isinstance(v, int) or self.steps[v].kind != "vector" or not self.steps[v].pos:
                what = "an n-vector at every position" + (", not pooled twice" if fn == "pool" else "")
                raise TpcError(f"{fn}(...) takes {what}", a.span)
        grid = self.steps[args[0]].grid
        if len({self.steps[v].grid for v in args}) > 1:
            raise TpcError("attend(q, k, v) takes q, k and v on the same grid of positions", e.span)
        offset: tuple[int, ...] = ()
        if fn == "shift":
            for a, size in zip(numbers, grid, strict=True):
                offset += (self.whole(a, -(size - 1), size - 1, "a shift is a whole number of positions"),)
            return self.add(Step("shift", "vector", args=tuple(args), span=e.span, grid=grid, offset=offset))
        if fn == "avgpool":
            least = min(grid)
            k = self.whole(numbers[0], 1, least, "avgpool's window is a whole number of positions")
            stride = self.whole(numbers[1], 1, 64, "avgpool's stride is a whole number of positions") \
                if len(numbers) == 2 else k
            return self.window(args[0], tuple((0, size, k, stride) for size in grid), e.span)
        return self.add(Step(fn, "vector", args=tuple(args), span=e.span, grid=() if fn == "pool" else grid,
                             heads=heads))

    def whole(self, e: ast.Expr, low: int, high: int, what: str) -> int:
        """A whole number from low to high, written in the model (a shift, a window)."""
        v = self.value(e)
        if not isinstance(v, float) or v != round(v) or not low <= v <= high:
            raise TpcError(f"{what}, {low} to {high} here", e.span)
        return int(v)

    def window(self, v: int, spec: tuple[tuple[int, int, int, int], ...], span: Span) -> int:
        """The mean over windows of v's positions: a strided or 'valid' convolution, avgpool."""
        from tpc.train.positions import window_grid

        return self.add(Step("window", "vector", args=(v,), span=span, grid=window_grid(spec), window=spec))

    def conv(self, e: ast.Call) -> int:
        """`conv(A, h)`: the sum over the kernel's offsets o of A[o] @ shift(h, o), each tap a hidden
        layer; `conv(U, x)` on the model's input: U @ (each position's patch of data rows)."""
        layer, transposed = ast.untransposed(e.args[0]) if len(e.args) == 2 else (None, False)
        if len(e.args) != 2 or not isinstance(layer, ast.Name) or layer.id not in self.b.convs:
            raise TpcError("conv(A, h) applies a conv layer A (`layer A : conv n x n, kernel = 3`) to h", e.span)
        conv = self.b.convs[layer.id]
        if transposed and (conv.takes_data or conv.resamples):
            # the adjoint of a strided or 'valid' convolution would upsample: not a step of a model yet
            what = "reads the data" if conv.takes_data else "has a stride or 'valid' padding"
            raise TpcError(f"conv({conv.name}.T, h), the transposed convolution, takes an n x n conv layer with 'same' "
                           f"padding and stride 1; '{conv.name}' {what}", e.args[0].span)
        if self.decl.positions == 1:
            raise TpcError(f"a convolution slides over positions; declare them: model {self.decl.name}"
                           f"({self.decl.arg}[8]) or {self.decl.name}({self.decl.arg}[8, 8])", e.span)
        arg, span = e.args[1], e.span
        h: int | float = 0.0
        if conv.takes_data:
            if not isinstance(arg, ast.Name) or arg.id != self.decl.arg or any(arg.id in sc for sc in self.scope):
                raise TpcError(f"'{conv.name}' reads the data: conv({conv.name}, {self.decl.arg})", arg.span)
        else:
            h = self.value(arg)
        # the grid it slides over: the data's, or h's (smaller after a strided convolution or avgpool)
        grid = self.steps[h].grid if isinstance(h, int) and self.steps[h].pos else self.decl.grid
        if len(conv.kernel) != len(grid):
            where = f"a sequence of {grid[0]}" if len(grid) == 1 else f"a grid of {grid[0]} x {grid[1]}"
            raise TpcError(f"'{conv.name}' has a {len(conv.kernel)}-D kernel, but {self.decl.arg} is {where} "
                           "positions", e.span)
        for k, size in zip(conv.kernel, grid, strict=True):
            if k > size:
                raise TpcError(f"the kernel of '{conv.name}' ({' x '.join(map(str, conv.kernel))}) is larger than "
                               f"the {' x '.join(map(str, grid))} positions it slides over", e.span)
        if conv.takes_data:
            x = self.name(arg)
            self.steps[x].patches = conv.offsets
            out = self.add(Step("matmul", "vector", layer=conv.name, args=(x,), span=span, grid=grid))
        else:
            out = self.taps(conv, h, span, transposed)
        return self.window(out, conv.window(grid), span) if conv.resamples else out

    def taps(self, conv: Conv, h: int | float, span: Span, transposed: bool = False) -> int:
        """The sum over the kernel's offsets o of A[o] @ shift(h, o), built as the expression it is;
        transposed, its adjoint (torch's conv_transpose with the same weights): the sum of
        A[o].T @ shift(h, -o)."""
        self.scope.append({"<h>": h})  # h once; each tap reads it shifted
        try:
            terms: list[ast.Expr] = []
            for offset in conv.offsets:
                x: ast.Expr = ast.Name(span, "<h>")
                shift = tuple(-o for o in offset) if transposed else offset
                if any(shift):
                    x = ast.Call(span, "shift", (x, *(ast.Num(span, float(o)) for o in shift)), span)
                tap: ast.Expr = ast.Name(span, conv.tap(offset))
                terms.append(ast.BinOp(span, "@", ast.Attr(span, tap, "T") if transposed else tap, x))
            total = terms[0]
            for t in terms[1:]:
                total = ast.BinOp(span, "+", total, t)
            out = self.value(total)
            assert isinstance(out, int)
            return out
        finally:
            self.scope.pop()

    def norm(self, fn: str, e: ast.Call) -> int | float:
        """`layernorm(h[, eps])` = (h - mean(h)) / sqrt(mean((h - mean(h))^2) + eps) and
        `rmsnorm(h[, eps])` = h / sqrt(mean(h^2) + eps), over the n coordinates of h (no gain: write
        one with bias layers, `(1 + g) * layernorm(h) + b`)."""
        if len(e.args) not in (1, 2):
            raise TpcError(f"{fn}(h) or {fn}(h, eps) takes one or two arguments, got {len(e.args)}", e.span)
        eps = self.value(e.args[1]) if len(e.args) == 2 else NORM_EPS
        if not isinstance(eps, float) or not eps >= 0:
            raise TpcError(f"{fn}'s eps is a number >= 0", e.args[1].span)
        h = self.value(e.args[0])
        if not isinstance(h, int) or self.steps[h].kind != "vector":
            raise TpcError(f"{fn}(...) normalises the n coordinates of a vector; this is {self.what(h)}",
                           e.args[0].span)
        if fn == "layernorm":
            h = self.fn("sub", [h, self.moment(h, e)], e)
        var = self.moment(self.fn("mul", [h, h], e), e)
        scale = self.fn("pow", [self.fn("add", [var, eps], e) if eps else var, 0.5], e)
        return self.fn("div", [h, scale], e)

    def fn(self, fn: str, vals: list[int | float], e: ast.Expr) -> int | float:
        steps = [v for v in vals if isinstance(v, int)]
        for v in steps:
            kind = self.steps[v].kind
            if kind == "data":
                raise TpcError(f"the model's input enters through its input layer: W @ {self.decl.arg}", e.span)
            if kind == "out":
                raise TpcError("the model ends at its readout; put any function of the outputs in the loss", e.span)
        kind = "vector" if any(self.steps[v].kind == "vector" for v in steps) else "scalar"
        grids = {self.steps[v].grid for v in steps if not self.position_free(v)}  # a bias is the same everywhere
        if len(grids) > 1:
            if () in grids:
                raise TpcError("this combines values at every position with values per input (after pool): "
                               "keep them apart", e.span)
            raise TpcError("this combines values on grids of positions of different sizes ("
                           f"{' and '.join(' x '.join(map(str, g)) for g in sorted(grids))}: a strided "
                           "convolution or avgpool changed one): keep them apart", e.span)
        grid = next(iter(grids)) if grids else ()
        for v in steps:  # a bias takes the context it is added in (at every position, or per input)
            if self.position_free(v) and grids:
                self.take_context(v, grid, e)
        args: list[int] = []
        trees: list[ex.Tree] = []
        for v in vals:
            if isinstance(v, int):
                if v not in args:
                    args.append(v)
                trees.append(ex.Arg(args.index(v)))
            else:
                trees.append(ex.Const(float(v)))
        tree = ex.Apply(fn, tuple(trees))
        if not args:  # a constant expression
            import torch

            value = float(FUNCTIONS[fn].torch(*[torch.tensor(float(v), dtype=torch.float64) for v in vals]))
            if not np.isfinite(value):
                raise TpcError("this constant is not finite", e.span)
            return value
        return self.add(Step("fn", kind, args=tuple(args), tree=tree, span=e.span, grid=grid))
