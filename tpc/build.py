"""AST -> Program: resolves names, checks kinds and shapes, and builds the instruction graph.

Every user mistake raises TpcError at the offending source span. The width `n` may appear
only in variances and in the scaling of readouts; everything else is finite.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tpc import syntax as ast
from tpc.data import DEFAULT_POLICY, DataPolicy, literal_array, load_array
from tpc.errors import Span, TpcError, clip, nearest
from tpc.ir import Program, VectorGroup
from tpc.ops import expr as ex
from tpc.ops.functions import ALIASES, FUNCTIONS

if TYPE_CHECKING:
    from tpc.train.network import Network

BUILTINS = ("mean", "gram", "cov", "sqrt", "grad", "tangent_kernel")
RESERVED = {"load", "N", *BUILTINS}
# User nonlins are inlined where they are called, so one statement can expand far beyond its text
# (`f2(x) = f1(x) + f1(x)` doubles at each level). Bound the work and the depth of the expansion.
MAX_EXPANDED = 20_000  # expression nodes visited for one statement, nonlin bodies included
MAX_DIM = 2**31 - 1  # a dimension must index a tensor (torch counts elements in 64 bits, rows in 32)


@dataclass(frozen=True)
class Mono:
    """A constant `c * n^p` (numbers, dimensions and the width)."""

    c: float
    p: float = 0.0


@dataclass
class Pending:
    """A coordinatewise expression not yet turned into an instruction."""

    tree: ex.Tree
    args: list[int]
    kind: str  # 'vector' or 'scalar'
    shape: tuple[int, ...]
    span: Span
    # nodes and depth of `tree` written out: an argument used twice in a nonlin's body is shared here but
    # copied by everything downstream (code generation, the limit), so `g(g(g(x)))` multiplies them
    size: int = 1
    depth: int = 1


@dataclass
class RawReadout:
    """`v @ x` (a sum over the n coordinates) waiting for its `1/sqrt(n)` or `1/n`."""

    left: int
    right: int
    span: Span
    coef: float = 1.0
    exponent: float = 0.0
    gram: bool = False  # U.T @ x for an input layer: `left` is the batch of U's columns


@dataclass
class Ref:
    """A matrix, or a readout that is Gaussian in the limit."""

    nid: int


Value = Mono | Pending | RawReadout | Ref


@dataclass
class UserNonlin:
    args: tuple[str, ...]
    params: tuple[str, ...]
    body: ast.Expr
    span: Span


@dataclass
class ExpansionBudget:
    """What one statement expands to: user nonlinearities are inlined (`f2(x) = f1(x) + f1(x)` doubles
    at every level), so each visit of an expression counts, with the nesting depth, and a statement
    past either bound is refused before it takes exponential time or exhausts Python's stack. Both
    builders (Netsor programs and models) keep one."""

    visits: int = 0  # expressions visited for the current statement, nonlin bodies included
    depth: int = 0  # nesting of visits now
    calls: list[Span] = field(default_factory=list)  # the user nonlin calls being expanded, outermost first

    @contextmanager
    def visit(self, span: Span, inside: str, whole: str) -> Iterator[None]:
        """One expression's visit; past a bound, an error at the outermost nonlin call ("expanding
        the nonlinearities called here gives ...; {inside}") or at the expression (`whole`, with
        `{what}` in it)."""
        self.visits += 1
        self.depth += 1
        try:
            if self.visits > MAX_EXPANDED or self.depth > ast.MAX_DEPTH:
                what = (f"more than {MAX_EXPANDED} operations" if self.visits > MAX_EXPANDED
                        else f"an expression nested deeper than {ast.MAX_DEPTH} levels")
                if self.calls:
                    raise TpcError(f"expanding the nonlinearities called here gives {what}; {inside}", self.calls[0])
                raise TpcError(whole.format(what=what), span)
            yield
        finally:
            self.depth -= 1

    @contextmanager
    def call(self, span: Span) -> Iterator[None]:
        """Inside the expansion of the user nonlin called at `span`."""
        self.calls.append(span)
        try:
            yield
        finally:
            self.calls.pop()


def transpose_by_caret(e: ast.BinOp) -> bool:
    """`W^T` or `W^T @ x` (which parses as `W ^ (T @ x)`): a transpose written the maths way."""
    right = e.right.left if isinstance(e.right, ast.BinOp) and e.right.op == "@" else e.right
    return e.op == "^" and isinstance(right, ast.Name) and right.id == "T"


@dataclass
class Builder:
    prog: Program
    base_dir: Path
    names: dict[str, int] = field(default_factory=dict)
    defined_at: dict[str, Span] = field(default_factory=dict)
    dims: dict[str, int] = field(default_factory=dict)
    nonlins: dict[str, UserNonlin] = field(default_factory=dict)
    width: str | None = None
    scope: list[dict[str, Pending]] = field(default_factory=list)
    backward_of: dict[int, dict[int, int]] = field(default_factory=dict)  # readout -> gradients
    data_policy: DataPolicy = field(default_factory=DataPolicy)  # where load(...) reads, how much it may take
    budget: ExpansionBudget = field(default_factory=ExpansionBudget)  # per statement

    # ------------------------------------------------------------------ helpers
    def node(self, nid: int):  # noqa: ANN201
        return self.prog.node(nid)

    def known_names(self) -> list[str]:
        out = list(self.names) + list(self.dims) + list(self.nonlins)
        out += [k for k, f in FUNCTIONS.items() if f.user_visible] + list(BUILTINS)
        if self.width:
            out.append(self.width)
        if self.scope:
            out += list(self.scope[-1])
        return out

    def declare(self, name: str, span: Span) -> None:
        if name in self.names or name in self.dims or name in self.nonlins or name == self.width:
            prev = self.defined_at.get(name)
            where = f" (first defined at line {prev.line})" if prev else ""
            raise TpcError(
                f"'{name}' is already defined{where}; a Tensor Program assigns each name once",
                span,
            )
        if name in FUNCTIONS and FUNCTIONS[name].user_visible or name in RESERVED or name in ALIASES:
            raise TpcError(f"'{name}' is a built-in function; choose another name", span)
        self.defined_at[name] = span

    def source_text(self, span: Span) -> str:
        lines = self.prog.source.split("\n")  # as Lark counts lines: not at form feeds or U+2028
        if span.line == span.end_line:
            return lines[span.line - 1][span.column - 1 : span.end_column - 1]
        return lines[span.line - 1][span.column - 1 :]

    # ------------------------------------------------------------------ constants
    def mono(self, e: ast.Expr) -> Mono:
        """Evaluate a constant expression (numbers, dims, the width) to `c * n^p`."""
        v = self.expr(e)
        if not isinstance(v, Mono):
            raise TpcError("expected a constant (numbers, dimensions and the width only)", e.span)
        return v

    # ------------------------------------------------------------------ values
    def pending(self, v: Value, span: Span) -> Pending:
        if isinstance(v, Pending):
            return v
        if isinstance(v, Mono):
            if v.p != 0:
                raise TpcError(
                    f"the width {self.width} can only scale a readout (v @ x / sqrt({self.width}) or "
                    f"v @ x / {self.width}) or appear in a variance",
                    span,
                )
            return Pending(ex.Const(v.c), [], "scalar", (), span)
        if isinstance(v, RawReadout):
            return self.pending(self.finish_readout(v, None), span)
        node = self.node(v.nid)
        if node.kind == "matrix":
            raise TpcError(f"matrix '{node.name}' is not a value; multiply it: {node.name} @ x", span)
        raise TpcError(
            f"'{node.name}' is a readout, a Gaussian random scalar in the limit; it can be an "
            "output or go into cov(...), but not into further arithmetic",
            span,
        )

    def ref_pending(self, nid: int, span: Span) -> Pending:
        node = self.node(nid)
        if node.kind in ("matrix", "gaussian"):
            return self.pending(Ref(nid), span)  # raises with a clear message
        return Pending(ex.Arg(0), [nid], node.kind, node.shape, span)

    def combine(self, fn: str, parts: list[Pending], span: Span) -> Pending:
        args: list[int] = []
        trees = []
        for p in parts:
            mapping = {}
            for i, nid in enumerate(p.args):
                if nid not in args:
                    args.append(nid)
                mapping[i] = ex.Arg(args.index(nid))
            # renumbering Arg(i) to itself copies the tree for nothing: a chain `a + b + ...` would be quadratic
            same = all(m.index == i for i, m in mapping.items())
            trees.append(p.tree if same else ex.substitute(p.tree, mapping))
        if fn == "div" and isinstance(trees[1], ex.Const) and trees[1].value == 0:
            raise TpcError("division by zero", span)
        # constant folding keeps `2 * 3` and `-1` out of the graph
        if all(isinstance(t, ex.Const) for t in trees):
            import torch

            val = float(FUNCTIONS[fn].torch(*[torch.tensor(t.value, dtype=torch.float64) for t in trees]))
            if not math.isfinite(val):
                raise TpcError(f"this constant is not finite ({val})", span)
            return Pending(ex.Const(val), [], "scalar", (), span)
        kind = "vector" if any(p.kind == "vector" for p in parts) else "scalar"
        shape = self.broadcast(parts, kind, span)
        tree: ex.Tree = ex.Apply(fn, tuple(trees))
        if fn == "pow" and isinstance(trees[1], ex.Const) and trees[1].value == 2.0:
            tree = ex.Apply("square", (trees[0],))
        size, depth = 1 + sum(p.size for p in parts), 1 + max(p.depth for p in parts)
        if size > MAX_EXPANDED or depth > ast.MAX_DEPTH:
            what = (f"more than {MAX_EXPANDED} operations" if size > MAX_EXPANDED
                    else f"an expression nested deeper than {ast.MAX_DEPTH} levels")
            raise TpcError(f"written out, this coordinatewise expression is {what} (each use of a nonlin's argument "
                           "copies it); compute intermediate vectors in separate instructions",
                           self.budget.calls[0] if self.budget.calls else span)
        return Pending(tree, args, kind, shape, span, size, depth)

    def broadcast(self, parts: list[Pending], kind: str, span: Span) -> tuple[int, ...]:
        if kind == "scalar":
            try:
                return tuple(np.broadcast_shapes(*[p.shape for p in parts]))
            except ValueError:
                shapes = " and ".join(_shape(p.shape) for p in parts)
                raise TpcError(f"shapes {shapes} do not broadcast", span) from None
        shapes = {p.shape for p in parts if p.shape != ()}
        if len(shapes) > 1:
            raise TpcError(
                "a coordinatewise expression mixes batches of different sizes: "
                + " and ".join(_shape(s) for s in sorted(shapes)),
                span,
            )
        shape = shapes.pop() if shapes else ()
        if len(shape) > 1:
            raise TpcError(
                f"a vector can be a batch along one axis only, here it would be {_shape(shape)}",
                span,
            )
        return shape

    def materialize(self, p: Pending, name: str | None, span: Span) -> int:
        if isinstance(p.tree, ex.Arg) and name is None:
            return p.args[p.tree.index]
        if not p.args:  # combine() folds constants, so an expression without inputs is a Const
            assert isinstance(p.tree, ex.Const)
            node = self.prog.add("data", (), "scalar", (), name, span, value=np.array(p.tree.value), source=None,
                                  constant=True)
            return node.id
        node = self.prog.add("nonlin", tuple(p.args), p.kind, p.shape, name, span, tree=p.tree)
        return node.id

    def finish_readout(self, r: RawReadout, name: str | None) -> Value:
        left = self.node(r.left)
        right = self.node(r.right)
        n = self.width
        if r.gram:
            if r.exponent != -1.0:
                raise TpcError(f"U.T @ x for an input layer U is supported as a moment, U.T @ x / {n}",
                               r.span)
            g = self.prog.instruction("gram", (r.right, r.left), None, r.span)
            tree: ex.Tree = ex.Arg(0) if r.coef == 1.0 else ex.Apply("mul", (ex.Const(r.coef), ex.Arg(0)))
            return Pending(tree, [g.id], "scalar", g.shape, r.span)
        if r.exponent == -1.0 and left.kind == "vector":
            tree = ex.Apply("mul", (ex.Arg(0), ex.Arg(1))) if r.left != r.right else ex.Apply(
                "square", (ex.Arg(0),)
            )
            args = [r.left, r.right] if r.left != r.right else [r.left]
            shape = self.broadcast(
                [Pending(ex.Arg(0), [], "vector", left.shape, r.span),
                 Pending(ex.Arg(0), [], "vector", right.shape, r.span)], "vector", r.span)
            m = self.prog.add("moment", tuple(args), "scalar", shape, None if r.coef != 1 else name,
                              r.span, tree=tree)
            if r.coef == 1.0:
                return Pending(ex.Arg(0), [m.id], "scalar", shape, r.span)
            return Pending(ex.Apply("mul", (ex.Const(r.coef), ex.Arg(0))), [m.id], "scalar", shape, r.span)
        extra = left.params.get("exponent_shift", 0.0)
        exponent = r.exponent + extra
        if exponent == -0.5:
            if r.left == r.right or r.left in self.prog.ancestors(r.right):
                raise TpcError(
                    f"'{left.name}' is used in a readout / sqrt({n}) and also in the vector it reads "
                    f"out; a Gaussian readout needs a vector that the rest of the program does not use",
                    r.span,
                )
            if left.op not in ("vector", "matrix"):
                raise TpcError(
                    f"'{left.name} @ {right.name} / sqrt({n})' needs an initial vector (or readout "
                    f"matrix) on the left; '{left.name}' is computed, so this sum is not O(1). "
                    f"Use {left.name} @ {right.name} / {n} for a moment.",
                    r.span,
                )
            if left.op == "vector":
                _, group = self.prog.group_of(left.id)
                if group.mean[group.members.index(left.id)] != 0:
                    raise TpcError(
                        f"readout vector '{left.name}' has a nonzero mean, so "
                        f"{left.name} @ x / sqrt({n}) grows like sqrt({n}); use / {n}",
                        r.span,
                    )
            node = self.prog.instruction("readout", (r.left, r.right), name, r.span,
                                         coef=r.coef, exponent=-0.5, multiplier_exponent=r.exponent)
            return Ref(node.id)
        raise TpcError(
            f"'{left.name} @ {right.name}' sums {n} terms; scale it by 1/sqrt({n}) (a Gaussian in "
            f"the limit) or by 1/{n} (a moment); here the scaling is {n}^{r.exponent:g}",
            r.span,
        )

    # ------------------------------------------------------------------ expressions
    def expr(self, e: ast.Expr) -> Value:
        """Every expression goes through here: bounds the expansion of user nonlins before it can
        take exponential time or exhaust the Python stack."""
        with self.budget.visit(e.span, "compute intermediate values in separate instructions",
                               "this statement gives {what}; split it into several instructions"):
            v = self._expr(e)
        return v

    def _expr(self, e: ast.Expr) -> Value:
        if isinstance(e, ast.Num):
            return Mono(e.value)
        if isinstance(e, ast.Name):
            return self.lookup(e)
        if isinstance(e, ast.Neg):
            v = self.expr(e.operand)
            if isinstance(v, Mono):
                return Mono(-v.c, v.p)
            if isinstance(v, RawReadout):
                v.coef = -v.coef
                return v
            return self.combine("neg", [self.pending(v, e.span)], e.span)
        if isinstance(e, ast.BinOp):
            if e.op == "@":
                return self.matmul(e)
            return self.binop(e)
        if isinstance(e, ast.Call):
            return self.call(e)
        if isinstance(e, ast.Attr):
            if e.attr == "T":
                raise TpcError("a transpose is used only as a product: W.T @ x", e.span)
            raise TpcError(f"unknown attribute '.{e.attr}'", e.span)
        if isinstance(e, ast.ListExpr):
            raise TpcError("a list is allowed only in `data` and in N(...) of a vector group", e.span)
        raise TpcError("unsupported expression", e.span)  # pragma: no cover

    def lookup(self, e: ast.Name) -> Value:
        if self.scope and e.id in self.scope[-1]:
            return self.scope[-1][e.id]
        if self.scope:
            raise TpcError(
                f"unknown name '{e.id}' in a nonlin body: a nonlin may use only its own arguments "
                "and parameters",
                e.span,
            )
        if e.id == self.width:
            return Mono(1.0, 1.0)
        if e.id in self.dims:
            return Mono(float(self.dims[e.id]))
        if e.id in self.names:
            nid = self.names[e.id]
            node = self.node(nid)
            if node.kind in ("matrix", "gaussian"):
                return Ref(nid)
            return Pending(ex.Arg(0), [nid], node.kind, node.shape, e.span)
        if e.id == "pi":
            return Mono(math.pi)
        sugg = nearest(e.id, self.known_names())
        hint = f"did you mean '{sugg}'?" if sugg else None
        if self.width is None and len(e.id) == 1:
            hint = (hint + " " if hint else "") + "(declare the width first: `width n`)"
        raise TpcError(f"unknown name '{clip(e.id)}'", e.span, hint)

    def binop(self, e: ast.BinOp) -> Value:
        v = self._binop(e)
        if isinstance(v, Mono) and not math.isfinite(v.c):  # 1e300 * 1e300: no inf in generated code
            raise TpcError("this constant overflows", e.span)
        return v

    def _binop(self, e: ast.BinOp) -> Value:
        if transpose_by_caret(e) and "T" not in self.names:
            left = e.left.id if isinstance(e.left, ast.Name) else "W"
            raise TpcError(f"'{clip(left)}^T': the transpose of a matrix is written {clip(left)}.T", e.span,
                           f"write {clip(left)}.T @ ...")
        a = self.expr(e.left)
        b = self.expr(e.right)
        op = e.op
        if isinstance(a, Mono) and isinstance(b, Mono):
            if op in "+-":
                if a.p != b.p and a.c != 0 and b.c != 0:
                    raise TpcError(f"cannot add terms of different orders in {self.width}", e.span)
                p = a.p if a.c != 0 else b.p
                return Mono(a.c + b.c if op == "+" else a.c - b.c, p)
            if op == "*":
                return Mono(a.c * b.c, a.p + b.p)
            if op == "/":
                if b.c == 0:
                    raise TpcError("division by zero", e.right.span)
                return Mono(a.c / b.c, a.p - b.p)
            if op == "^":
                if b.p != 0:
                    raise TpcError(f"an exponent cannot depend on {self.width}", e.right.span)
                if a.c < 0 and not float(b.c).is_integer():
                    raise TpcError("a negative number to a fractional power", e.span)
                try:
                    value = a.c**b.c
                except OverflowError:
                    raise TpcError("this power overflows", e.span) from None
                except ZeroDivisionError:
                    raise TpcError("zero to a negative power", e.span) from None
                return Mono(value, a.p * b.c)
        if isinstance(a, RawReadout) and isinstance(b, Mono) and op in "*/":
            if op == "/" and b.c == 0:
                raise TpcError("division by zero", e.right.span)
            a.coef *= b.c if op == "*" else 1.0 / b.c
            a.exponent += b.p if op == "*" else -b.p
            return a
        if isinstance(b, RawReadout) and isinstance(a, Mono) and op == "*":
            b.coef *= a.c
            b.exponent += a.p
            return b
        if isinstance(a, Ref) and isinstance(b, Mono) and b.p == 0 and op in "*/":
            return self.scale_readout(a, b.c if op == "*" else 1.0 / b.c, e.span)
        if isinstance(b, Ref) and isinstance(a, Mono) and a.p == 0 and op == "*":
            return self.scale_readout(b, a.c, e.span)
        pa = self.pending(a, e.left.span)
        pb = self.pending(b, e.right.span)
        fn = {"+": "add", "-": "sub", "*": "mul", "/": "div", "^": "pow"}[op]
        return self.combine(fn, [pa, pb], e.span)

    def scale_readout(self, ref: Ref, factor: float, span: Span) -> Value:
        node = self.node(ref.nid)
        if node.op != "readout":
            return self.pending(ref, span)
        new = self.prog.instruction("readout", node.inputs, None, span,
                                    coef=node.params["coef"] * factor, exponent=node.params["exponent"],
                                    multiplier_exponent=node.params["multiplier_exponent"])
        return Ref(new.id)

    def matmul(self, e: ast.BinOp) -> Value:
        left, transposed = ast.untransposed(e.left)
        a = self.expr(left)
        if transposed and not (isinstance(a, Ref) and self.node(a.nid).kind == "matrix"):
            raise TpcError("'.T' transposes a matrix: W.T @ x", e.left.span)
        if isinstance(a, Ref) and self.node(a.nid).kind == "matrix":
            mat = self.node(a.nid)
            b = self.expr(e.right)
            role = mat.params["role"]
            if role == "input" and transposed:
                return self.input_transpose(mat, b, e)
            if role == "readout" and transposed and mat.params.get("exponent_shift"):
                raise TpcError(f"'{mat.name}.T' needs entries of variance independent of {self.width}",
                               e.left.span)
            if role == "input" or (role == "readout" and transposed):
                pb = self.pending(b, e.right.span)
                if pb.kind != "scalar":
                    raise TpcError(
                        f"'{mat.name}' is an input layer ({self.width} x {mat.params['cols']}): it "
                        f"multiplies finite data, but this is an {self.width}-vector",
                        e.right.span,
                    )
                d = mat.params["cols"] if role == "input" else mat.params["rows"]
                if not pb.shape or pb.shape[-1] != d or len(pb.shape) > 2:
                    got = _shape(pb.shape)
                    raise TpcError(
                        f"'{mat.name}' is {self.width} x {d}, so it multiplies inputs of dimension "
                        f"{d} (one per row), but the data here has shape {got}",
                        e.span,
                    )
                x = self.materialize(pb, None, e.right.span)
                node = self.prog.instruction("matmul", (mat.id, x), None, e.span, transposed=transposed)
                return Pending(ex.Arg(0), [node.id], "vector", node.shape, e.span)
            pb = self.pending(b, e.right.span)
            if pb.kind != "vector":
                raise TpcError(
                    f"'{mat.name}' is {_dims(mat, self.width)}: it multiplies an {self.width}-vector, "
                    f"but this is finite ({_shape(pb.shape)})",
                    e.right.span,
                )
            x = self.materialize(pb, None, e.right.span)
            if role == "readout":
                return RawReadout(mat.id, x, e.span)
            node = self.prog.instruction("matmul", (mat.id, x), None, e.span, transposed=transposed)
            return Pending(ex.Arg(0), [node.id], "vector", node.shape, e.span)
        pa = self.pending(a, e.left.span)
        pb = self.pending(self.expr(e.right), e.right.span)
        if pa.kind == "vector" and pb.kind == "vector":
            left = self.materialize(pa, None, e.left.span)
            right = self.materialize(pb, None, e.right.span)
            return RawReadout(left, right, e.span)
        raise TpcError(
            "'@' multiplies a matrix by a vector (W @ x), or two n-vectors (v @ x / sqrt(n)); "
            "finite data only goes through an input layer",
            e.span,
        )

    def input_transpose(self, mat, b: Value, e: ast.BinOp) -> Value:  # noqa: ANN001
        """`U.T @ x` for an input layer U (n x d): d sums over n, one per column u_j of U. Its
        columns are the MatMul of U with the identity, so `U.T @ x / n` is gram(x, columns)."""
        pb = self.pending(b, e.right.span)
        if pb.kind != "vector":
            raise TpcError(f"'{mat.name}.T' multiplies an {self.width}-vector", e.right.span)
        x = self.materialize(pb, None, e.right.span)
        d = mat.params["cols"]
        # the columns are U @ identity: d x d float64 numbers, made at check time
        self.data_policy.require(d * d * 8, f"'{mat.name}.T @ x' (the {d} x {d} identity)", e.span)
        eye = self.prog.add("data", (), "scalar", (d, d), None, e.span, value=np.eye(d), source=None, constant=True)
        cols = self.prog.instruction("matmul", (mat.id, eye.id), f"{mat.name}_columns", e.span)
        return RawReadout(cols.id, x, e.span, gram=True)

    def call(self, e: ast.Call) -> Value:
        fn = ALIASES.get(e.fn, e.fn)
        if fn == "load":
            raise TpcError("load(...) is allowed only in a data declaration: data X = load(\"x.csv\")", e.span)
        if fn == "mean":
            self.arity(e, 1)
            p = self.pending(self.expr(e.args[0]), e.args[0].span)
            if p.kind != "vector":
                raise TpcError("mean(...) averages over the n coordinates of a vector; this is finite",
                               e.args[0].span)
            if isinstance(p.tree, ex.Arg):
                p = Pending(ex.Apply("identity", (p.tree,)), p.args, p.kind, p.shape, p.span)
            m = self.prog.add("moment", tuple(p.args), "scalar", p.shape, None, e.span, tree=p.tree)
            return Pending(ex.Arg(0), [m.id], "scalar", p.shape, e.span)
        if fn == "gram":
            self.arity(e, 1, 2)
            xs = []
            for a in e.args:
                p = self.pending(self.expr(a), a.span)
                if p.kind != "vector":
                    raise TpcError("gram(...) takes n-vectors (or batches of them)", a.span)
                xs.append(self.materialize(p, None, a.span))
            if len(xs) == 1:
                xs.append(xs[0])
            g = self.prog.instruction("gram", tuple(xs), None, e.span)
            return Pending(ex.Arg(0), [g.id], "scalar", g.shape, e.span)
        if fn == "cov":
            self.arity(e, 1, 2)
            fs = []
            for a in e.args:
                v = self.expr(a)
                if isinstance(v, RawReadout):
                    v = self.finish_readout(v, None)
                if not (isinstance(v, Ref) and self.node(v.nid).op == "readout"):
                    raise TpcError("cov(...) takes readouts v @ x / sqrt(n) (Gaussian in the limit)",
                                   a.span)
                fs.append(v.nid)
            if len(fs) == 1:
                fs.append(fs[0])
            c = self.prog.instruction("cov", tuple(fs), None, e.span)
            return Pending(ex.Arg(0), [c.id], "scalar", c.shape, e.span)
        if fn in ("grad", "tangent_kernel"):
            return self.autodiff(e, fn)
        if fn == "sqrt" and len(e.args) == 1:
            v = self.expr(e.args[0])
            if isinstance(v, Mono):
                if v.c < 0:
                    raise TpcError("square root of a negative number", e.span)
                return Mono(math.sqrt(v.c), v.p / 2)
            return self.combine("sqrt", [self.pending(v, e.args[0].span)], e.span)
        if fn in self.nonlins:
            return self.call_user(e, self.nonlins[fn])
        if fn in FUNCTIONS and FUNCTIONS[fn].user_visible:
            self.arity(e, FUNCTIONS[fn].arity)
            parts = [self.pending(self.expr(a), a.span) for a in e.args]
            return self.combine(fn, parts, e.span)
        sugg = nearest(e.fn, self.known_names())
        raise TpcError(f"unknown function '{clip(e.fn)}'", e.fn_span,
                       f"did you mean '{sugg}'?" if sugg else None)

    def autodiff(self, e: ast.Call, fn: str) -> Value:
        from tpc.passes.autodiff import as_vector, backward, tangent_kernel

        self.arity(e, 1, 2) if fn == "tangent_kernel" else self.arity(e, 2)
        v = self.expr(e.args[0])
        if isinstance(v, RawReadout):
            v = self.finish_readout(v, None)
        is_readout = (isinstance(v, Ref) and self.node(v.nid).op == "readout"
                      and self.node(self.node(v.nid).inputs[0]).op == "vector")
        is_moment = (fn == "grad" and isinstance(v, Pending) and isinstance(v.tree, ex.Arg)
                     and self.node(v.args[0]).op in ("moment", "nonlin") and v.kind == "scalar"
                     and len(v.shape) <= 1)
        if not (is_readout or is_moment):
            what = "a readout f = v @ x / sqrt(n) with an initial vector v" + (
                " or a named moment" if fn == "grad" else "")
            raise TpcError(f"{fn}(f, ...) differentiates {what}", e.args[0].span)
        f = v.nid if isinstance(v, Ref) else v.args[0]  # type: ignore[union-attr]
        if f not in self.backward_of:
            self.backward_of[f] = backward(self.prog, f, e.span)
        grads = self.backward_of[f]
        if fn == "tangent_kernel":
            if len(e.args) == 2:
                x = self.expr(e.args[1])
                ok = isinstance(x, Pending) and isinstance(x.tree, ex.Arg) and self.node(x.args[0]).op == "data"
                if not ok or x.args[0] not in self.prog.ancestors(f):
                    raise TpcError("the second argument of tangent_kernel is the data that f is computed on",
                                   e.args[1].span)
            nid = tangent_kernel(self.prog, f, grads, e.span)
            node = self.node(nid)
            return Pending(ex.Arg(0), [nid], "scalar", node.shape, e.span)
        target = self.expr(e.args[1])
        if not (isinstance(target, Pending) and isinstance(target.tree, ex.Arg) and target.kind == "vector"):
            raise TpcError("grad(f, x) differentiates with respect to a named vector x", e.args[1].span)
        x = target.args[0]
        if x not in grads:
            raise TpcError(f"f does not depend on '{self.node(x).name}'", e.args[1].span)
        g = self.node(as_vector(self.prog, x, grads[x], e.span))
        return Pending(ex.Arg(0), [g.id], "vector", g.shape, e.span)

    def call_user(self, e: ast.Call, f: UserNonlin) -> Value:
        want = len(f.args) + len(f.params)
        if len(e.args) != want:
            raise TpcError(f"'{e.fn}' takes {want} argument{'s' if want != 1 else ''}, got {len(e.args)}",
                           e.span)
        local: dict[str, Pending] = {}
        for name, a in zip(f.args + f.params, e.args, strict=True):
            p = self.pending(self.expr(a), a.span)
            if name in f.params and p.kind != "scalar":
                raise TpcError(f"parameter '{name}' of '{e.fn}' must be a scalar", a.span)
            local[name] = p
        self.scope.append(local)
        try:
            with self.budget.call(e.span):
                return self.expr(f.body)
        finally:
            self.scope.pop()

    def arity(self, e: ast.Call, *counts: int) -> None:
        if len(e.args) not in counts:
            want = " or ".join(str(c) for c in counts)
            raise TpcError(f"'{e.fn}' takes {want} argument{'s' if counts != (1,) else ''}, got {len(e.args)}",
                           e.span)

    # ------------------------------------------------------------------ statements
    def statement(self, s: ast.Stmt) -> None:
        if isinstance(s, ast.WidthDecl):
            if self.width is not None:
                raise TpcError("the width is declared twice", s.span)
            self.declare(s.name, s.span)
            self.width = s.name
            self.prog.width_name = s.name
        elif isinstance(s, ast.DimDecl):
            self.declare(s.name, s.span)
            check_dim(s.value, s.span)
            self.dims[s.name] = s.value
        elif isinstance(s, ast.DataDecl):
            self.declare(s.name, s.span)
            if s.path is not None:
                arr = load_array(s.path, self.base_dir, s.source_span, self.data_policy)
            else:
                arr = literal_array(s.literal, s.span)
            self.names[s.name] = self.prog.add("data", (), "scalar", arr.shape, s.name, s.span,
                                               value=arr, source=s.path).id
        elif isinstance(s, ast.ScalarDecl):
            self.declare(s.name, s.span)
            p = self.pending(self.expr(s.value), s.value.span)
            if p.kind != "scalar":
                raise TpcError(f"scalar '{s.name}' must be finite, but this is an n-vector", s.value.span)
            self.names[s.name] = self.materialize_named(p, s.name, s.span)
        elif isinstance(s, ast.MatrixDecl):
            self.matrix(s)
        elif isinstance(s, ast.VectorDecl):
            self.vectors(s)
        elif isinstance(s, ast.NonlinDecl):
            self.declare(s.name, s.span)
            seen = set()
            for a in s.args + s.params:
                if a in seen:
                    raise TpcError(f"argument '{a}' appears twice", s.span)
                seen.add(a)
            # check the body once, on placeholder arguments, so mistakes show at the definition;
            # the name is registered after, so a nonlin cannot call itself
            local = {a: Pending(ex.Const(0.5), [], "scalar", (), s.span) for a in s.args + s.params}
            self.scope.append(local)
            try:
                self.pending(self.expr(s.body), s.body.span)
            finally:
                self.scope.pop()
            self.nonlins[s.name] = UserNonlin(s.args, s.params, s.body, s.span)
        elif isinstance(s, (ast.Assign, ast.OutputDecl)):
            is_output = isinstance(s, ast.OutputDecl)
            if is_output:
                if s.name in self.prog.outputs:
                    raise TpcError(f"output '{s.name}' is defined twice", s.span)
            else:
                self.declare(s.name, s.span)
            v = self.expr(s.value)
            if isinstance(v, RawReadout):
                v = self.finish_readout(v, s.name)
            if isinstance(v, Ref):
                nid = v.nid
                node = self.node(nid)
                if node.kind == "matrix":
                    if is_output:
                        raise TpcError("an output must be finite; a matrix is n x n", s.value.span)
                elif node.name.startswith("_t"):
                    node.name = s.name
            else:
                p = self.pending(v, s.value.span)
                nid = self.materialize_named(p, s.name, s.span)
                if is_output and p.kind == "vector":
                    raise TpcError(
                        f"output '{s.name}' is an n-vector; outputs must be finite: take mean(...), "
                        "gram(...), or a readout v @ x / sqrt(n)",
                        s.value.span,
                    )
            if is_output:
                self.prog.outputs[s.name] = nid
            else:
                self.names[s.name] = nid

    def materialize_named(self, p: Pending, name: str, span: Span) -> int:
        if isinstance(p.tree, ex.Arg):
            nid = p.args[p.tree.index]
            node = self.node(nid)
            if node.name.startswith("_t"):
                node.name = name
            return nid
        return self.materialize(p, name, span)

    def matrix(self, s: ast.MatrixDecl) -> None:
        self.declare(s.name, s.span)
        rows = self.dim(s.rows, s.rows_span)
        cols = self.dim(s.cols, s.cols_span)
        mean = self.mono(s.dist.mean)
        if mean.c != 0:
            raise TpcError("matrix entries must have mean 0", s.dist.mean.span)
        var = self.mono(s.dist.var)
        if var.c <= 0:
            raise TpcError("a variance must be positive", s.dist.var.span)
        n = self.width
        text = self.source_text(s.dist.var.span)
        if rows == "n" and cols == "n":
            role = "hidden"
            if var.p != -1:
                raise TpcError(
                    f"entries of an {n} x {n} matrix must have variance c/{n} (Netsor scaling); "
                    f"this variance scales like {n}^{var.p:g}",
                    s.dist.var.span,
                )
        elif rows == "n":
            role = "input"
            if var.p != 0:
                raise TpcError(
                    f"entries of an input layer {n} x {cols} have a variance that does not depend "
                    f"on {n}; this one scales like {n}^{var.p:g}",
                    s.dist.var.span,
                )
        elif cols == "n":
            role = "readout"
            if var.p > 0:
                raise TpcError(f"readout variance grows with {n}", s.dist.var.span)
        else:
            raise TpcError(
                f"a matrix needs the width {n} as one of its dimensions; use `data` for finite arrays",
                s.span,
            )
        node = self.prog.add("matrix", (), "matrix", (), s.name, s.span, role=role, rows=rows,
                             cols=cols, var=var.c, var_text=text, exponent_shift=var.p / 2)
        self.names[s.name] = node.id

    def dim(self, d: str | int, span: Span) -> str | int:
        if isinstance(d, int):
            check_dim(d, span)
            return d
        if self.width is not None and d == self.width:
            return "n"
        if d in self.dims:
            return self.dims[d]
        sugg = nearest(d, list(self.dims) + ([self.width] if self.width else []))
        hint = f"did you mean '{sugg}'?" if sugg else "declare it: `dim d = 3` (or `width n` first)"
        raise TpcError(f"unknown dimension '{clip(d)}'", span, hint)

    def vectors(self, s: ast.VectorDecl) -> None:
        k = len(s.names)
        for i, name in enumerate(s.names):
            if name in s.names[:i]:
                raise TpcError(f"'{name}' appears twice in this group", s.span)
            self.declare(name, s.span)
        mean = self.const_array(s.dist.mean, (k,), "mean")
        if k == 1:
            cov = self.const_array(s.dist.var, (1, 1), "variance")
        else:
            cov = self.const_array(s.dist.var, (k, k), "covariance")
        if not np.allclose(cov, cov.T, rtol=0, atol=1e-12):
            raise TpcError("the declared covariance is not symmetric", s.dist.var.span)
        eig = np.linalg.eigvalsh(cov)
        if eig.min() < -1e-12 * max(1.0, float(np.abs(eig).max())):
            raise TpcError(
                f"the declared covariance is not positive semidefinite (smallest eigenvalue {eig.min():.4g})",
                s.dist.var.span,
            )
        ids = []
        for name in s.names:
            node = self.prog.add("vector", (), "vector", (), name, s.span)
            self.names[name] = node.id
            ids.append(node.id)
        self.prog.groups.append(VectorGroup(tuple(ids), mean, cov))

    def const_value(self, x: ast.Expr, what: str) -> object:
        """A (nested) list of width-independent constants. A method, not a recursive closure:
        that would be a reference cycle keeping the builder and its program alive."""
        if isinstance(x, ast.ListExpr):
            return [self.const_value(i, what) for i in x.items]
        m = self.mono(x)
        if m.p != 0:
            raise TpcError(f"an initial vector's {what} cannot depend on the width", x.span)
        return m.c

    def const_array(self, e: ast.Expr, shape: tuple[int, ...], what: str) -> np.ndarray:
        raw = self.const_value(e, what)
        try:
            arr = np.array(raw, dtype=np.float64)
        except ValueError:
            raise TpcError(f"the {what} is ragged", e.span) from None
        if arr.shape == ():
            if shape == (1, 1) or shape == (1,) or what == "mean":
                arr = np.full(shape, float(arr)) if what == "mean" else arr.reshape(shape)
            else:
                raise TpcError(f"a group of {shape[0]} vectors needs a {shape[0]} x {shape[0]} {what}", e.span)
        if arr.shape != shape:
            want = "x".join(map(str, shape))
            raise TpcError(f"the {what} must have shape {want}, got {_shape(arr.shape)}", e.span)
        if what == "variance" and arr[0, 0] < 0:
            raise TpcError("a variance must be nonnegative", e.span)
        return arr


def check_dim(value: int, span: Span) -> None:
    """A dimension is a positive whole number that a tensor can have."""
    if value <= 0:
        raise TpcError("a dimension must be positive", span)
    if value > MAX_DIM:
        raise TpcError(f"a dimension must be at most {MAX_DIM}, got {_clip_int(value)}", span)


def _clip_int(value: int) -> str:
    text = str(value)
    return text if len(text) <= 30 else f"{text[:12]}... ({len(text)} digits)"


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape) if shape else "a single value"


def _dims(node, width: str | None) -> str:  # noqa: ANN001
    r = width if node.params["rows"] == "n" else node.params["rows"]
    c = width if node.params["cols"] == "n" else node.params["cols"]
    return f"{r} x {c}"


def build(module: ast.Module, filename: str, source: str, base_dir: Path,
          policy: DataPolicy = DEFAULT_POLICY) -> Program:
    """Check a parsed module and build its Program; errors carry file, line and column.
    `policy`: see `load_program`."""
    prog = Program(filename=filename, source=source)
    b = Builder(prog, base_dir, data_policy=policy)
    try:
        with ast.stack_room():
            for stmt in module.statements:
                if b.width is None and not isinstance(stmt, (ast.WidthDecl, ast.DimDecl, ast.DataDecl,
                                                             ast.NonlinDecl)):
                    if isinstance(stmt, (ast.MatrixDecl, ast.VectorDecl)):
                        raise TpcError("declare the width before any matrix or vector: `width n`", stmt.span)
                b.budget = ExpansionBudget()  # the expansion budget is per statement
                b.statement(stmt)
            if b.width is None:
                raise TpcError("the program declares no width: start it with `width n`")
            if not prog.outputs:
                raise TpcError("the program has no outputs: add `output NAME = ...`")
            _check_readouts(prog)
            prog.verify()
    except TpcError as err:
        raise err.locate(filename, source) from None
    return prog


def _check_readouts(prog: Program) -> None:
    """A 1/sqrt(n) readout needs a vector that nothing else in the program touches."""
    needed = {n.id for n in prog.needed()}
    for node in prog.nodes():
        if node.op != "readout":
            continue
        left = prog.node(node.inputs[0])
        for user in prog.successors(left.id):
            u = prog.node(user)
            # the backward program of f uses v by construction (d_x = c v): that is fine
            if u.op != "readout" and not u.params.get("derived") and u.id in needed:
                raise TpcError(
                    f"'{left.name}' is used in a readout / sqrt(n) and also at line "
                    f"{u.span.line if u.span else '?'}; a Gaussian readout needs a vector that the "
                    "rest of the program does not use",
                    node.span,
                )


def load_program(path: str | Path, *, allow_data_outside: bool = False, memory_gb: float | None = None,
                 force: bool = False) -> Program | Network:
    """Read, parse and build a `.tp` file: a Program, or a Network for programs with layers,
    a model and training. `load(...)` in the program reads files under the program's folder or the
    current working directory (symbolic links resolved); `allow_data_outside=True` lifts that. Data
    (and arrays made while building) beyond `memory_gb` (default: half the machine's) are refused
    before they are read, unless `force`."""
    policy = DataPolicy(allow_data_outside, memory_gb, force)
    from tpc.syntax import parse

    p = Path(path)
    try:
        source = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TpcError("no such file").locate(str(path), "") from None
    except UnicodeDecodeError as exc:
        raise _not_utf8(p, exc).locate(str(path), p.read_bytes().decode("utf-8", "replace")) from None
    except (OSError, ValueError) as exc:
        raise TpcError(f"cannot read the program: {exc}").locate(str(path), "") from None
    return _build_any(parse(source, str(path)), str(path), source, p.resolve().parent, policy)


def _not_utf8(path: Path, exc: UnicodeDecodeError) -> TpcError:
    """Where the first byte that is not UTF-8 sits, as a line and a column (of characters)."""
    before = exc.object[: exc.start]
    line = before.count(b"\n") + 1
    column = len(before[before.rfind(b"\n") + 1 :].decode("utf-8", "replace")) + 1
    return TpcError(f"the program is not UTF-8 text ({exc.reason}: byte 0x{exc.object[exc.start]:02x})",
                    Span(line, column, line, column + 1))


def load_source(source: str, filename: str = "<program>", base_dir: Path | str | None = None, *,
                allow_data_outside: bool = False, memory_gb: float | None = None,
                force: bool = False) -> Program | Network:
    """Parse and build program text; `load(...)` paths are relative to `base_dir` (default: the
    current folder) and limited as in `load_program`."""
    from tpc.syntax import parse

    policy = DataPolicy(allow_data_outside, memory_gb, force)
    return _build_any(parse(source, filename), filename, source, Path(base_dir or Path.cwd()), policy)


def _build_any(module: ast.Module, filename: str, source: str, base_dir: Path,
               policy: DataPolicy) -> Program | Network:
    from tpc.train.network import build_network, is_network
    from tpc.train.raw import is_trained_raw, translate

    if is_trained_raw(module):  # raw declarations trained by a loop: translated into a network program
        try:
            module = translate(module)
        except TpcError as err:
            raise err.locate(filename, source) from None
    if is_network(module):
        return build_network(module, filename, source, base_dir, policy)
    return build(module, filename, source, base_dir, policy)
