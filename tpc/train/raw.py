"""A raw Netsor program trained by a loop becomes a network program.

In a raw program the user writes every power of the width: the variances of the declared
matrices (`N(0, 2/n)`), the scaling of the readout (`v @ x / n`) and the learning rate of each
update (`U -= 0.5 * n * gU`, literal SGD on U's entries). Each of these is an abc-parametrization
in disguise (TP4, Yang & Hu 2021, Section 3): with W^l = n^-a w^l, w^l ~ N(0, var n^-2b) and
w <- w - lr n^-c dL/dw, a declared object P of variance s2 n^-2beta, used in the model as
n^-s P and updated by P <- P - lr n^p dL/dP, is the layer with a = s - p/2, b = beta + p/2 and
c = 0 (TP4's symmetry a += theta, b -= theta, c -= 2 theta moves any per-layer c to 0). So the
program is translated, as syntax trees with the user's positions, into the network program with
those layers, the model its readout computes, and that parametrization; the network builder
checks it and every backend runs it (finite width, the unrolled program, both limits).

What translates: `matrix` declarations applied to data (input layers, `n x d`) and to n-vectors
(hidden, `n x n`); readouts `v @ E / n` or `/ sqrt(n)` of a `vector v` or a `k x n` matrix; other
declared vectors that the network reads (biases: `U @ x + b`, gains), which take the input layer's
a and b as a weight on a constant input 1 does (TP4), so they share its variance scale and, when
both train, its power of n; vector statements that chain them through coordinatewise functions,
each readout the same function of its data (one model); losses of readouts; loops whose updates of
declared objects carry the width only as a factor `n^p` of their gradient terms, the same power for
one object throughout.
"""

from __future__ import annotations

import math
from dataclasses import fields, is_dataclass, replace

from tpc import syntax as ast
from tpc.errors import Span, TpcError

RAW = (ast.MatrixDecl, ast.VectorDecl)
MAX_EXPONENT = 16.0  # the network builder's bound on |a| and |b|
NETWORK_ONLY = (ast.LayerDecl, ast.ModelDecl, ast.ParamDecl, ast.TrainDecl, ast.CopyDecl, ast.StreamDecl)
TRAINING = (ast.ForLoop, ast.LossDecl, ast.StateDecl)


def is_trained_raw(module: ast.Module) -> bool:
    """A program with raw declarations and a loop or a loss, and no layers: one to translate. (With
    layers it is a network program, where a `matrix` is a fixed random matrix: network.py.)"""
    s = module.statements
    return any(isinstance(x, RAW) for x in s) and any(isinstance(x, TRAINING + NETWORK_ONLY) for x in s) \
        and not any(isinstance(x, (ast.LayerDecl, ast.ModelDecl)) for x in s)


def translate(module: ast.Module) -> ast.Module:
    return _Translator(module).module()


class _Translator:
    def __init__(self, module: ast.Module) -> None:
        self.statements = _inline_scalars(module.statements)
        self.width = next((s.name for s in self.statements if isinstance(s, ast.WidthDecl)), None)
        if self.width is None:
            raise TpcError("the program declares no width: start it with `width n`")
        self.dims = {s.name: s.value for s in self.statements if isinstance(s, ast.DimDecl)}
        self.data = {s.name for s in self.statements if isinstance(s, ast.DataDecl)}
        self.objects: dict[str, tuple[ast.Stmt, Span]] = {}  # declared matrices and vectors
        for s in self.statements:
            if isinstance(s, NETWORK_ONLY):
                what = "a `train` statement" if isinstance(s, ast.TrainDecl) else "network statements"
                raise TpcError(f"a raw program (with `matrix`/`vector` declarations) cannot use {what}: write its "
                               "training as a loop, and declare every weight as a `matrix` or `vector`", s.span)
            if isinstance(s, ast.MatrixDecl):
                self.objects[s.name] = (s, s.span)
            elif isinstance(s, ast.VectorDecl):
                if any(isinstance(x, ast.ListExpr) for x in (s.dist.mean, s.dist.var)):
                    raise TpcError("correlated vectors (a list of means or a covariance matrix) have no layer to "
                                   "become in a trained raw program: declare each vector with its own variance",
                                   s.dist.span)
                for name in s.names:
                    self.objects[name] = (s, s.span)
        self.assigns = {s.name: s for s in self.statements if isinstance(s, ast.Assign)}
        taken = _names(self.statements)  # the model's argument: a name the program does not use (`vector x`)
        self.arg = next(a for a in ("x", *(f"x{k}" for k in range(len(taken) + 1))) if a not in taken)
        self.readouts: dict[str, tuple[str, float, str, ast.Expr]] = {}  # name: (object, s, data, body)
        self.model_name = ""
        self.model_body: ast.Expr | None = None
        self.order: list[str] = []  # layers in the order the model applies them
        self.biases: list[str] = []  # declared vectors that the network reads other than as its readout
        self.scale: dict[str, float] = {}  # the readout's power s
        self.power: dict[str, tuple[float, Span]] = {}  # each object's update power p
        # loop values and states that hold gradients ("grad") or parameters ("weight"): a term's power
        # of n is the object's learning rate only for gradients; parameters (decay) must carry none
        self.kinds: dict[str, set[str]] = {}
        self.chain: set[str] = set()  # vector statements that readouts use

    # ------------------------------------------------------------------ the model
    def module(self) -> ast.Module:
        for name, a in self.assigns.items():
            ro = self.readout(a.value)
            if ro is not None:
                self.add_readout(name, a, *ro)
        if not self.readouts:
            raise TpcError("a trained raw program needs a readout of its network: `f = v @ x / n` (or "
                           "`/ sqrt(n)`), with `v` a declared vector", self.statements[0].span)
        out: list[ast.Stmt] = []
        body_stmts: list[ast.Stmt] = []
        for s in self.statements:
            consumed = isinstance(s, ast.Assign) and (s.name in self.readouts or s.name in self.chain)
            if isinstance(s, (ast.MatrixDecl, ast.VectorDecl)) or consumed:
                continue
            if isinstance(s, ast.Assign):
                raise TpcError(f"'{s.name}' is not part of a readout: in a trained raw program, vector statements "
                               "build the network's readouts (other values go inside a loop or an output)", s.span)
            if isinstance(s, (ast.WidthDecl, ast.DimDecl, ast.DataDecl, ast.NonlinDecl)):
                out.append(s)
            else:
                body_stmts.append(self.statement(s))
        span = next(s.span for s in self.statements if isinstance(s, TRAINING))
        out.append(self.parametrization(span))
        out += self.layers()
        assert self.model_body is not None
        out.append(ast.ModelDecl(span, self.model_name, self.arg, self.model_body))
        return ast.Module(out + body_stmts)

    def readout(self, e: ast.Expr) -> tuple[str, float, ast.Expr] | None:
        """`v @ E / n^s`: (v, s, E), where v is a declared vector or a k x n matrix."""
        if not (isinstance(e, ast.BinOp) and e.op == "/" and isinstance(e.left, ast.BinOp) and e.left.op == "@"):
            return None
        left, transposed = ast.untransposed(e.left.left)
        if not (isinstance(left, ast.Name) and left.id in self.objects):
            return None
        decl = self.objects[left.id][0]
        if transposed and isinstance(decl, ast.VectorDecl):
            raise TpcError(f"a readout is written {left.id} @ x / n: a vector has no transpose", e.left.left.span)
        if transposed or isinstance(decl, ast.MatrixDecl) and (decl.cols != self.width or decl.rows == self.width):
            return None  # a readout matrix is k x n; W @ x / sqrt(n) with an n x n W is a hidden layer
        coef, s = self.monomial(e.right)
        if coef != 1 or s not in (0.5, 1.0):
            raise TpcError("a readout divides by n (muP's scaling) or sqrt(n)", e.right.span)
        return left.id, s, e.left.right

    def add_readout(self, name: str, a: ast.Assign, obj: str, s: float, e: ast.Expr) -> None:
        used: set[str] = set()
        body = self.inline(e, used, set())
        if len(used) != 1:
            raise TpcError(f"readout '{name}' must be a function of one data set (it uses "
                           f"{', '.join(sorted(used)) or 'none'})", a.span)
        body = ast.BinOp(a.value.span, "@", ast.Name(a.value.left.left.span, obj), body)
        if self.model_body is None:
            self.model_name, self.model_body = name, body
            self.scale[obj] = s
            self.order = self.applied(body)
            self.biases = [name for name, (decl, _) in self.objects.items() if isinstance(decl, ast.VectorDecl)
                           and name not in self.order and _mentions(body, name)]
        elif not _same(body, self.model_body) or self.scale.get(obj) != s:
            raise TpcError(f"readout '{name}' is another function of its data than '{self.model_name}': a trained raw "
                           "program trains one network (write each readout as the same network on other data)", a.span)
        self.readouts[name] = (obj, s, used.pop(), body)

    def inline(self, e: ast.Expr, used: set[str], seen: set[str]) -> ast.Expr:
        """The readout's argument with named vectors substituted and its data set replaced by `x`."""
        if isinstance(e, ast.Name):
            if e.id in self.data:
                used.add(e.id)
                return ast.Name(e.span, self.arg)
            if e.id in self.assigns and e.id not in seen:
                self.chain.add(e.id)
                return self.inline(self.assigns[e.id].value, used, seen | {e.id})
            return e
        if isinstance(e, ast.BinOp) and e.op == "@":
            if _applied_matrix(e.left) not in self.objects:
                raise TpcError("in a trained raw program a matrix product is a declared matrix (or its transpose) "
                               "applied to a vector (`W @ x`, `W.T @ x`); other products are not translated", e.span)
            return replace(e, right=self.inline(e.right, used, seen))  # W.T stays: the model applies W transposed
        if isinstance(e, ast.Attr):
            raise TpcError("a transpose is used only as a product: W.T @ x", e.span)
        return _map_children(e, lambda c: self.inline(c, used, seen))

    def applied(self, body: ast.Expr) -> list[str]:
        """The declared objects in the order the model applies them (innermost first)."""
        order: list[str] = []

        def walk(e: ast.Expr) -> None:
            if isinstance(e, ast.BinOp) and e.op == "@":
                walk(e.right)
                name = _applied_matrix(e.left)
                if name is not None and name not in order:
                    order.append(name)
                return
            for c in _children(e):
                walk(c)
        walk(body)
        return order

    # ------------------------------------------------------------------ layers and parametrization
    def role(self, name: str) -> str:
        decl = self.objects[name][0]
        if name in self.scale:
            return "readout"
        if name in self.biases:
            return "bias"
        if isinstance(decl, ast.MatrixDecl) and decl.rows == self.width and decl.cols == self.width:
            return "hidden"
        if isinstance(decl, ast.MatrixDecl) and decl.rows == self.width:
            return "input"
        raise TpcError(f"'{name}' is neither applied to data (n x d), nor to n-vectors (n x n), nor a readout: "
                       "a trained raw program cannot train it", decl.span)

    def init(self, name: str) -> tuple[float, float]:
        """(var, a + b) of the layer: the declared variance s2 n^-2beta, in the network's convention."""
        decl = self.objects[name][0]
        dist = decl.dist  # type: ignore[attr-defined]
        mean, _ = self.monomial(dist.mean)
        if mean != 0:
            raise TpcError("a trained raw program's matrices and vectors have mean 0", dist.mean.span)
        s2, power = self.monomial(dist.var)
        var = s2 * self.dim_value(decl.cols) if self.role(name) == "input" else s2  # type: ignore[attr-defined]
        return var, -power / 2 + self.scale.get(name, 0.0)

    def dim_value(self, d: str | int) -> float:
        return float(self.dims.get(d, d)) if isinstance(d, str) else float(d)

    def layers(self) -> list[ast.Stmt]:
        out: list[ast.Stmt] = []
        for name, (decl, span) in self.objects.items():
            if name not in self.order and name not in self.biases:
                use = first_mention(self.model_body, {name}) if self.model_body is not None else None
                if use is not None:
                    raise TpcError(f"the matrix '{name}' enters the network other than applied to a vector "
                                   f"(`{name} @ x`): a trained raw program does not translate that", use.span)
                raise TpcError(f"'{name}' is declared but not used by the readout '{self.model_name}'", span)
            role = self.role(name)
            if isinstance(decl, ast.MatrixDecl):
                dims = ((decl.rows, decl.rows_span), (decl.cols, decl.cols_span))
            elif role == "bias":
                dims = ((self.width, span),)
            else:
                dims = ((1, span), (self.width, span))
            var, _ = self.init(name)
            kw = (ast.Kwarg("var", ast.Num(span, var), span),)
            out.append(ast.LayerDecl(span, name, role, span, dims, kw))
        return out

    def parametrization(self, span: Span) -> ast.Stmt:
        ordered = sorted(self.order, key=lambda n: self.role(n) == "readout")  # TP4's numbering
        a, b = [], []
        for name in ordered:
            p = self.power.get(name, (0.0, span))[0]
            s = self.scale.get(name, 0.0)
            _, total = self.init(name)
            a.append(s - p / 2)
            b.append(total - s + p / 2)
            if max(abs(a[-1]), abs(b[-1])) > MAX_EXPONENT:  # as the network builder would, but here
                raise TpcError(f"{name}'s variance and learning rate give the exponents a = {a[-1]:g}, "
                               f"b = {b[-1]:g}, beyond +-{MAX_EXPONENT:g}", self.objects[name][1])
        if self.biases:
            first = next((i for i, name in enumerate(ordered) if self.role(name) == "input"), None)
            a_in, b_in = (a[first], b[first]) if first is not None else (None, None)
            self.check_biases(ordered[first] if first is not None else None, a_in, b_in)
            if first is not None and ordered[first] not in self.power:  # a fixed input layer: the biases' rate
                bias = next((x for x in self.biases if x in self.power), None)
                if bias is not None:
                    p, where = self.power[bias]
                    a[first], b[first] = -p / 2, a_in + b_in + p / 2
                    if max(abs(a[first]), abs(b[first])) > MAX_EXPONENT:
                        raise TpcError(f"{bias}'s variance and learning rate give the input layer's exponents a = "
                                       f"{a[first]:g}, b = {b[first]:g}, beyond +-{MAX_EXPONENT:g}", where)
        lists = [ast.Kwarg(k, ast.ListExpr(span, tuple(ast.Num(span, v) for v in vals)), span)
                 for k, vals in (("a", a), ("b", b))]
        return ast.ParamDecl(span, "abc", span, (*lists, ast.Kwarg("c", ast.Num(span, 0.0), span)))

    def check_biases(self, layer: str | None, a_in: float | None, b_in: float | None) -> None:
        """A bias is a weight on a constant input 1: it takes the input layer's a and b (TP4), so its
        variance has the input layer's power of n and, where both train, its update the same n^p."""
        if layer is None:
            raise TpcError(f"the vector '{self.biases[0]}' is added in a network without an input matrix (`U @ X`): a "
                           "bias takes the input layer's parametrization", self.objects[self.biases[0]][1])
        trained = [(self.power[x][0], x) for x in [layer, *self.biases] if x in self.power]
        for name in self.biases:
            _, total = self.init(name)
            if not math.isclose(total, a_in + b_in, abs_tol=1e-12):  # type: ignore[operator]
                raise TpcError(f"the bias '{name}' has variance ~ n^{0.0 - 2 * total:g} and the input layer "
                               f"'{layer}' ~ n^{0.0 - 2 * (a_in + b_in):g}: a bias takes the input layer's scale",
                               self.objects[name][0].dist.span)  # type: ignore[attr-defined]
            if name in self.power and trained and self.power[name][0] != trained[0][0]:
                p, other = trained[0]
                raise TpcError(f"{name}'s updates carry n^{self.power[name][0]:g} and {other}'s n^{p:g}: a bias moves "
                               "at the input layer's rate (it takes the input layer's a and b, TP4)",
                               self.power[name][1])

    # ------------------------------------------------------------------ statements
    def statement(self, s: ast.Stmt) -> ast.Stmt:
        if isinstance(s, ast.ForLoop):
            return replace(s, body=tuple(self.statement(b) for b in s.body))
        if isinstance(s, (ast.Assign, ast.StateDecl)) and self.has_term(s.value):
            self.kinds[s.name] = self.kinds.get(s.name, set()) | self.term_kinds(s.value)
        if isinstance(s, ast.Update):
            return self.update(s)
        value = getattr(s, "value", None)  # a loss, an output, a record, a loop value, a state
        if isinstance(value, ast.Expr):
            self.no_width(value)
            return replace(s, value=self.calls(value))  # type: ignore[call-arg]
        return s

    def update(self, s: ast.Update) -> ast.Update:
        if s.target not in self.objects:  # a state: what it holds now, and no width in it
            self.no_width(s.value)
            if s.target in self.kinds:
                self.kinds[s.target] |= self.term_kinds(s.value)
            return replace(s, value=self.calls(s.value))
        powers = self.powers(s.value)
        grads = {p for p, weight in powers if not weight}
        if any(p != 0 for p, weight in powers if weight):
            raise TpcError(f"a term with {s.target} itself (decay) carries a power of n: it would change {s.target} "
                           "by a width-dependent factor of itself; write it without n", s.value.span)
        if len(grads) > 1:
            shown = ", ".join(f"{p:g}" for p in sorted(grads))
            raise TpcError(f"the terms of this update carry different powers of n ({shown}): one learning rate n^p "
                           "per object", s.value.span)
        if grads:
            p = grads.pop()
            old = self.power.setdefault(s.target, (p, s.span))
            if old[0] != p:
                raise TpcError(f"{s.target}'s updates carry n^{p:g} here and n^{old[0]:g} at {old[1]}: one power of "
                               "the learning rate per object (it is the object's parametrization)", s.value.span)
        return replace(s, value=self.calls(self.without_width(s.value)))

    def powers(self, e: ast.Expr, factor: float = 0.0) -> list[tuple[float, bool]]:
        """Each term of a linear combination: (its power of n, whether it is the object itself)."""
        if isinstance(e, ast.BinOp) and e.op in "+-":
            return self.powers(e.left, factor) + self.powers(e.right, factor)
        if isinstance(e, ast.Neg):
            return self.powers(e.operand, factor)
        if isinstance(e, ast.BinOp) and e.op in "*/":
            left, right = self.has_term(e.left), self.has_term(e.right)
            if left and right:
                raise TpcError("a product of two updates' terms", e.span)
            if e.op == "/" and right:
                raise TpcError("an update divides by a gradient or a parameter", e.span)
            term, scalar = (e.left, e.right) if left or not right else (e.right, e.left)
            _, p = self.monomial(scalar, allow_other=True)
            return self.powers(term, factor + (p if e.op == "*" else -p))
        if self.mentions_width(e):
            raise TpcError("the width appears in an update only as a factor n^p of its terms", e.span)
        # a value holding both gradients and parameters gives both kinds of term the same power
        return [(factor, kind == "weight") for kind in sorted(self.term_kinds(e))]

    def term_kinds(self, e: ast.Expr) -> set[str]:
        """What e holds: "grad" (a gradient, or a loop value made of one), "weight" (a declared
        object, or a loop value made of one); empty for a number."""
        if isinstance(e, ast.Call) and e.fn == "grad":
            return {"grad"}
        if isinstance(e, ast.Call) and e.fn == "zeros":  # zeros(W): W's shape, none of its value
            return set()
        if isinstance(e, ast.Name):
            return {"weight"} if e.id in self.objects else set(self.kinds.get(e.id, ()))
        out: set[str] = set()
        for c in _children(e):
            out |= self.term_kinds(c)
        return out

    def has_term(self, e: ast.Expr) -> bool:
        """Whether e holds a gradient, a declared object or a loop value (a term, not a number)."""
        return bool(self.term_kinds(e))

    # ------------------------------------------------------------------ expressions
    def monomial(self, e: ast.Expr, allow_other: bool = False) -> tuple[float, float]:
        return width_monomial(e, self.width, self.dims, allow_other)

    def mentions_width(self, e: ast.Expr) -> bool:
        return _mentions_width(e, self.width)

    def no_width(self, e: ast.Expr) -> None:
        if self.mentions_width(e):
            raise TpcError("in a trained raw program the width appears in variances, readouts and as a factor n^p "
                           "of an update's terms, nowhere else", e.span)

    def without_width(self, e: ast.Expr) -> ast.Expr:
        """The update with n = 1: its powers of n are the parametrization's now."""
        if isinstance(e, ast.Name) and e.id == self.width:
            return ast.Num(e.span, 1.0)
        return _map_children(e, self.without_width)

    def calls(self, e: ast.Expr) -> ast.Expr:
        """A readout's name becomes the model applied to its data: `f` -> `f(X)`; as the model argument
        of features(f, X), feature_change(f, X), nngp(f, X) or ntk(f, X), the model itself."""
        if isinstance(e, ast.Call) and e.fn in ("features", "feature_change", "nngp", "ntk") and e.args \
                and isinstance(e.args[0], ast.Name) and e.args[0].id in self.readouts:
            model = ast.Name(e.args[0].span, self.model_name)
            return replace(e, args=(model, *(self.calls(a) for a in e.args[1:])))
        if isinstance(e, ast.Name) and e.id in self.readouts:
            data = self.readouts[e.id][2]
            return ast.Call(e.span, self.model_name, (ast.Name(e.span, data),), e.span)
        return _map_children(e, self.calls)


def width_monomial(e: ast.Expr, width: str, dims: dict[str, int], allow_other: bool = False) -> tuple[float, float]:
    """(c, p) with e = c n^p, n the width. With allow_other, factors without n count as c = 1 (a loop value)."""
    def mono(e: ast.Expr, allow_other: bool = allow_other) -> tuple[float, float]:
        return width_monomial(e, width, dims, allow_other)

    if isinstance(e, ast.Num):
        return e.value, 0.0
    if isinstance(e, ast.Name):
        if e.id == width:
            return 1.0, 1.0
        if e.id in dims:
            return float(dims[e.id]), 0.0
    if isinstance(e, ast.Neg):
        c, p = mono(e.operand)
        return -c, p
    if isinstance(e, ast.BinOp) and e.op in "*/":
        (c1, p1), (c2, p2) = mono(e.left), mono(e.right)
        if e.op == "*":
            return c1 * c2, p1 + p2
        if c2 == 0:
            raise TpcError("division by zero", e.span)
        return c1 / c2, p1 - p2
    if isinstance(e, ast.BinOp) and e.op == "^":
        k, kp = mono(e.right, False)  # the exponent is a number: n^-1, n^(1/2)
        if kp != 0:
            raise TpcError("an exponent of the width is a number", e.right.span)
        c, p = mono(e.left)
        return c**k, p * k
    if isinstance(e, ast.Call) and e.fn == "sqrt" and len(e.args) == 1:
        c, p = mono(e.args[0])
        return math.sqrt(c) if c >= 0 else math.nan, p / 2
    if allow_other and not _mentions_width(e, width):
        return 1.0, 0.0
    raise TpcError("expected a number times a power of the width (like 2/n or 1/sqrt(n))", e.span)


def _mentions_width(e: object, width: str) -> bool:
    return isinstance(e, ast.Name) and e.id == width or any(_mentions_width(c, width) for c in _children(e))


def _inline_scalars(statements: list[ast.Stmt]) -> list[ast.Stmt]:
    """`scalar lr = 0.5` declarations substituted into every expression and dropped: a network
    program has no such declarations, and `tpc sweep --grid lr=...` sets them before this runs."""
    values: dict[str, ast.Expr] = {}

    def expr(e: ast.Expr) -> ast.Expr:
        if isinstance(e, ast.Name) and e.id in values:
            return values[e.id]
        return _map_children(e, expr)

    def stmt(s: object) -> object:
        if isinstance(s, ast.Expr):
            return expr(s)
        if isinstance(s, tuple):
            return tuple(stmt(x) for x in s)
        if not is_dataclass(s) or isinstance(s, ast.Expr):
            return s
        changes = {f.name: stmt(getattr(s, f.name)) for f in fields(s)
                   if isinstance(getattr(s, f.name), (ast.Expr, ast.Normal, ast.Stmt, tuple))}
        return replace(s, **changes) if changes else s

    out: list[ast.Stmt] = []
    for s in statements:
        if isinstance(s, ast.ScalarDecl):
            values[s.name] = expr(s.value)
        else:
            out.append(stmt(s))  # type: ignore[arg-type]
    return out


def _names(node: object) -> set[str]:
    """Every name a statement (or expression, or list of them) declares or reads."""
    if isinstance(node, (list, tuple)):
        return set().union(*(_names(x) for x in node)) if node else set()
    if not is_dataclass(node):
        return set()
    out: set[str] = {node.id} if isinstance(node, ast.Name) else set()
    for f in fields(node):
        v = getattr(node, f.name)
        if f.name in ("name", "counter", "target") and isinstance(v, str):
            out.add(v)
        elif f.name == "names" and isinstance(v, tuple):
            out |= {x for x in v if isinstance(x, str)}
        elif isinstance(v, (list, tuple)) or is_dataclass(v):
            out |= _names(v)
    return out


def _mentions(e: object, name: str) -> bool:
    return isinstance(e, ast.Name) and e.id == name or any(_mentions(c, name) for c in _children(e))


def first_mention(e: object, names: set[str] | dict) -> ast.Name | None:
    """The first name of `names` that expression e reads (in source order), or None."""
    if isinstance(e, ast.Name) and e.id in names:
        return e
    return next((m for c in _children(e) if (m := first_mention(c, names)) is not None), None)


def _applied_matrix(e: ast.Expr) -> str | None:
    """The declared name on the left of a product: W in `W @ x` and in `W.T @ x`."""
    e, _ = ast.untransposed(e)
    return e.id if isinstance(e, ast.Name) else None


def _children(e: object) -> list[ast.Expr]:
    out: list[ast.Expr] = []
    if not is_dataclass(e):
        return out
    for f in fields(e):
        v = getattr(e, f.name)
        if isinstance(v, ast.Expr):
            out.append(v)
        elif isinstance(v, tuple):
            out += [x for x in v if isinstance(x, ast.Expr)]
    return out


def _map_children(e: ast.Expr, fn) -> ast.Expr:  # noqa: ANN001 - Expr -> Expr
    changes = {}
    for f in fields(e):
        v = getattr(e, f.name)
        if isinstance(v, ast.Expr):
            changes[f.name] = fn(v)
        elif isinstance(v, tuple) and any(isinstance(x, ast.Expr) for x in v):
            changes[f.name] = tuple(fn(x) if isinstance(x, ast.Expr) else x for x in v)
    return replace(e, **changes) if changes else e


def _same(a: object, b: object) -> bool:
    """Structural equality of two expressions, positions aside."""
    if type(a) is not type(b):
        return False
    if not is_dataclass(a):
        if isinstance(a, tuple):
            return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))  # type: ignore[arg-type]
        return a == b
    return all(_same(getattr(a, f.name), getattr(b, f.name)) for f in fields(a) if f.name not in ("span", "fn_span"))
