"""The kernel regime (r > 0): the limit kernels that training in function space uses
(`kernel_loops.py` runs the program's loops with them).

By TP4's Dynamical Dichotomy (Yang & Hu 2021, Theorem 3.11 and Corollary 3.9), a stable
parametrization with r > 0 freezes the features: the limit of f_t is
    f_{t+1} = f_t - Theta(., X_t) chi_t,   chi_t = dL_t/df(X_t),
with a fixed kernel Theta and f_0 a Gaussian process. Per layer, with beta = a_{L+1} + b_{L+1}
and gamma_l = 2 a_l + c, Theta is lr times the sum of
    readout:  n^(1 - gamma)            <x^L, x^L'> / n
    hidden:   n^(2 - 2 beta - gamma)   <dh, dh'> / n  <x, x'> / n     (dh = n^beta df/dh)
    input:    n^(1 - 2 beta - gamma)   <dh, dh'> / n  (x . x')
    bias:     n^(1 - 2 beta - gamma)   <dh, dh'> / n
and f_0 has covariance n^(1 - 2 beta) var_{L+1} <x^L, x^L'> / n: each power of n is 1 (exponent
0) or 0 (negative) in the limit. The kernels are those of the network at initialisation: tpc
lowers it to a forward Tensor Program with its backward (`grad`) and evaluates that program's
limit (closed forms, quadrature).

"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from tpc import memory
from tpc import syntax as ast
from tpc.backends.limit.evaluate import evaluate_limit, evaluate_tree
from tpc.errors import NumericalError, Span, TpcError
from tpc.ir import Program
from tpc.ops import expr as ex
from tpc.train import position_kernels
from tpc.train.network import Network, Step

TOL = 1e-12


def limit_factor(exponent: float) -> float:
    return 1.0 if abs(exponent) <= TOL else 0.0


@dataclass
class Kernels:
    points: dict[str, slice]  # each data set's rows in the stacked points
    theta: np.ndarray  # (P, P), lr included; times the identity over the k outputs
    nngp: np.ndarray  # (P, P): covariance of f_0, times the identity over the outputs
    features: np.ndarray  # (P, P): <x^L, x^L'> / n at initialisation
    method: str


def _fresh(base: str, taken: set[str]) -> str:
    """`base`, or base_, base__, ... : a name apart from the program's layer names."""
    name = base
    while name in taken:
        name += "_"
    taken.add(name)
    return name


def _expr(tree: ex.Tree, names: list[str], span: Span) -> ast.Expr:
    """A coordinatewise tree as a syntax tree over the named values."""
    if isinstance(tree, ex.Arg):
        return ast.Name(span, names[tree.index])
    if isinstance(tree, ex.Const):
        num = ast.Num(span, abs(tree.value))
        return ast.Neg(span, num) if tree.value < 0 else num
    args = [_expr(a, names, span) for a in tree.args]
    infix = {"add": "+", "sub": "-", "mul": "*", "div": "/", "pow": "^"}
    if tree.fn in infix:
        return ast.BinOp(span, infix[tree.fn], args[0], args[1])
    if tree.fn == "neg":
        return ast.Neg(span, args[0])
    return ast.Call(span, tree.fn, tuple(args), span)


SPAN = Span(1, 1, 1, 1)
Use = tuple[str, str, int, bool]  # a layer's application: its output's and input's names, the position, transposed


class _Lowering:
    """The statements of the lowered program as they are built: names, the syntax-tree makers, and
    each model step's rule `lower_<op>` (tpc/train/steps.py). Over positions each position's rows
    are data `X<p>` and a positional step's value is one vector per position, `s<i>_<p>`."""

    def __init__(self, net: Network) -> None:
        self.net = net
        self.taken = set(net.layers)
        self.own = {k: _fresh(k, self.taken) for k in ("n", "X", "XX", "f", "features", "nngp")}
        self.P = P = net.model.positions  # noqa: N806
        if P > 1:
            self.own.update({f"X{p}": _fresh(f"X{p}", self.taken) for p in range(P)})
            self.own.update({f"XX{p}_{q}": _fresh(f"XX{p}_{q}", self.taken) for p in range(P) for q in range(P)})
        self.stmts: list[ast.Stmt] = [ast.WidthDecl(SPAN, self.own["n"])]
        # each step's value: one name, or one per position; None is a zero vector (a shift beyond the
        # edge), which no statement holds: a layer applied to it is zero too
        self.names: list[list[str | None]] = []
        self.carrier: dict[int, str] = {}  # a vector at each position that a constant vector can ride on
        self.readouts: list[str] = []  # f, or f_p at each position p of V @ flatten(h): f is their sum

    # --- syntax trees
    @staticmethod
    def name(v: str) -> ast.Name:
        return ast.Name(SPAN, v)

    @staticmethod
    def call(fn: str, *args: ast.Expr) -> ast.Call:
        return ast.Call(SPAN, fn, tuple(args), SPAN)

    @staticmethod
    def op(o: str, a: ast.Expr, b: ast.Expr) -> ast.BinOp:
        return ast.BinOp(SPAN, o, a, b)

    def total(self, parts: list[ast.Expr]) -> ast.Expr:
        """The sum as a balanced tree: its depth (the builder's recursion) grows like log(len)."""
        if len(parts) == 1:
            return parts[0]
        half = len(parts) // 2
        return self.op("+", self.total(parts[:half]), self.total(parts[half:]))

    def partial_sums(self, parts: list[ast.Expr], stem: str, size: int = 512) -> ast.Expr:
        """The sum of many kernel terms (a convolution's position pairs) as named partial sums of
        `size` terms each: one statement stays within the builder's bound on operations."""
        while len(parts) > size:
            names = []
            for start in range(0, len(parts), size):
                names.append(_fresh(f"{stem}_part", self.taken))
                self.assign(names[-1], self.total(parts[start:start + size]))
            parts = [self.name(v) for v in names]
        return self.total(parts)

    def at(self, j: int, p: int) -> str | None:
        """Step j's value at position p (the one value of a step without positions); None: zero."""
        return self.names[j][p] if len(self.names[j]) > 1 else self.names[j][0]

    def assign(self, value: str, e: ast.Expr) -> None:
        self.stmts.append(ast.Assign(SPAN, value, e))

    def values(self, i: int, step: Step) -> list[tuple[int, str]]:
        """Fresh names for step i, (position, name) for each of its values."""
        here = range(step.positions)
        stem = self.net.model.names.get(i, f"s{i}")  # a model's statement names its value
        self.names.append([_fresh(stem + (f"_{p}" if step.pos else ""), self.taken) for p in here])
        return list(enumerate(self.names[i]))

    # --- each step op's rule
    def lower_input(self, i: int, step: Step) -> None:
        self.names.append([self.own[f"X{p}"] for p in range(self.P)] if step.pos else [self.own["X"]])

    def lower_bias(self, i: int, step: Step) -> None:
        self.names.append([step.layer])

    def lower_matmul(self, i: int, step: Step) -> None:
        if self.net.layers[step.layer].role == "readout":  # normalised: v @ x / sqrt(n), v one row
            f = self.own["f"]
            self.names.append([f])
            # V @ flatten(h): one readout vector per position (readout_vectors), f = sum_p f_p with
            # f_p = v_p @ h_p / sqrt(n), each a Gaussian readout of its own (a Netsor program adds none)
            root_n = self.call("sqrt", self.name(self.own["n"]))
            for p, v in enumerate(self.readout_vectors(step)):
                if (x := self.at(step.args[0], p)) is not None:
                    self.readouts.append(f if len(self.readout_vectors(step)) == 1 else _fresh(f"{f}_{p}", self.taken))
                    self.assign(self.readouts[-1], self.op("/", self.op("@", self.name(v), self.name(x)), root_n))
            return
        for p, value in self.values(i, step):
            arg = self.at(step.args[0], p)
            if arg is None:
                self.names[i][p] = None
                continue
            mat = ast.Attr(SPAN, self.name(step.layer), "T") if step.transposed else self.name(step.layer)
            self.assign(value, self.op("@", mat, self.name(arg)))
            if self.net.layers[step.layer].role == "input":
                self.carrier.setdefault(p, value)

    def readout_vectors(self, step: Step) -> list[str]:
        """The readout's vectors: itself, or for V @ flatten(h) one per position of h (`V[p]`, names no
        program can write)."""
        taps = self.net.layers[step.layer].taps
        return [step.layer] if taps == 1 else [f"{step.layer}[{p}]" for p in range(taps)]

    def lower_fn(self, i: int, step: Step) -> None:
        for p, value in self.values(i, step):
            names = [self.at(j, p) for j in step.args]
            tree = ex.substitute(step.tree, {k: ex.Const(0.0) if v is None else ex.Arg(k) for k, v in enumerate(names)})
            if not ex.args_used(tree):  # every argument is zero here: a constant
                const = float(evaluate_tree(tree, []))
                if const == 0.0:
                    self.names[i][p] = None
                    continue
            elif step.kind == "vector" and not any(self.net.model.steps[step.args[k]].kind == "vector"
                                                   for k in ex.args_used(tree)):
                # a function of numbers per input alone: a norm of a value that is zero here (shifted past
                # the edge) is zero whatever its scale; anything else is not lowered
                probes = [float(evaluate_tree(tree, [torch.tensor(v, dtype=torch.float64)] * len(names)))
                          for v in (0.37, 1.9, 12.5)]
                if any(probes):
                    raise TpcError("the kernels' lowered program does not take a vector that is a function of "
                                   "numbers per input alone here (a value shifted past the edge meets a norm's "
                                   "scale)", step.span)
                self.names[i][p] = None
                continue
            self.assign(value, _expr(tree, [v or "" for v in names], SPAN))

    def lower_moment(self, i: int, step: Step) -> None:
        for p, value in self.values(i, step):
            arg = self.at(step.args[0], p)
            if arg is None:
                self.names[i][p] = None
                continue
            self.assign(value, self.call("mean", self.name(arg)))

    def lower_pool(self, i: int, step: Step) -> None:
        P = self.net.model.steps[step.args[0]].positions  # noqa: N806
        parts: list[ast.Expr] = [self.name(v) for r in range(P) if (v := self.at(step.args[0], r)) is not None]
        for _, value in self.values(i, step):
            self.assign(value, self.op("/", self.total(parts), ast.Num(SPAN, float(P))))

    def lower_shift(self, i: int, step: Step) -> None:
        """Names only: position p takes the argument's value at p + offset, or zero (None) beyond the edge."""
        from tpc.train.positions import source_position

        here: list[str | None] = []
        for p in range(step.positions):
            r = source_position(p, step.offset, step.grid)
            here.append(None if r is None else self.at(step.args[0], r))
        self.names.append(here)

    def lower_window(self, i: int, step: Step) -> None:
        """Position q is the mean of its window's values; a window of one is that value's name."""
        from tpc.train.positions import window_matrix

        m = window_matrix(self.net.model.steps[step.args[0]].grid, step.window)
        for q, value in self.values(i, step):
            parts = [(float(m[q, r]), v) for r in range(m.shape[1]) if m[q, r] and (v := self.at(step.args[0], r))]
            if len(parts) == 1 and parts[0][0] == 1.0 or not parts:
                self.names[i][q] = parts[0][1] if parts else None
                continue
            self.assign(value, self.op("*", ast.Num(SPAN, parts[0][0]), self.total([self.name(v) for _, v in parts])))

    def lower_attend(self, i: int, step: Step) -> None:
        """Logits q.k / n are moments (limit.limit_refusal admits no other scale), the softmax
        a nonlinearity of them."""
        q, k, v = step.args
        for p, value in self.values(i, step):
            weights: list[ast.Expr] = []
            for r in range(step.positions):
                qp, kr = self.at(q, p), self.at(k, r)
                if qp is None or kr is None:  # a zero query or key: logit 0
                    weights.append(ast.Num(SPAN, 1.0))
                    continue
                logit = _fresh(f"s{i}_{p}_{r}", self.taken)
                self.assign(logit, self.call("mean", self.op("*", self.name(qp), self.name(kr))))
                weights.append(self.call("exp", self.name(logit)))
            norm = _fresh(f"s{i}_{p}_sum", self.taken)
            self.assign(norm, self.total(weights))
            terms = [self.op("*", w, self.name(vr)) for r, w in enumerate(weights) if (vr := self.at(v, r)) is not None]
            if not terms:
                self.names[i][p] = None
                continue
            self.assign(value, self.op("/", self.total(terms), self.name(norm)))


def _names_in(e: object) -> set[str]:
    """The names an expression reads."""
    if isinstance(e, ast.Name):
        return {e.id}
    if isinstance(e, ast.Call):
        return set().union(*(_names_in(a) for a in e.args))
    if isinstance(e, ast.BinOp):
        return _names_in(e.left) | _names_in(e.right)
    if isinstance(e, ast.Neg):
        return _names_in(e.operand)
    return set()


def _reaching(stmts: list[ast.Stmt], target: str) -> set[str]:
    """The names whose values `target` depends on, through the assignments in stmts."""
    reads = {s.name: _names_in(s.value) for s in stmts if isinstance(s, ast.Assign)}
    seen, todo = {target}, [target]
    while todo:
        for v in reads.get(todo.pop(), ()):
            if v not in seen:
                seen.add(v)
                todo.append(v)
    return seen


def term_exponent(net: Network, layer: str) -> float:
    """The power of n on layer's NTK term (the module docstring's table)."""
    la = net.layers[layer]
    if la.fixed:  # a fixed matrix is no parameter: no term (limit_factor(inf) = 0)
        return math.inf
    beta, gamma = net.init_exponent(net.readout()), net.lr_exponent(la)
    return {"readout": 1.0, "hidden": 2 - 2 * beta}.get(la.role, 1 - 2 * beta) - gamma


def lowered_module(net: Network, ntk: bool = True
                   ) -> tuple[list[ast.Stmt], dict[str, str], list[tuple[str, str, float]]]:
    """The network at initialisation as a forward Tensor Program on the stacked points (the readout
    normalised to v @ x / sqrt(n), v a single row), with one output per kernel term, built as syntax
    trees (no source text: a layer's name never meets a name of this program's own). Returns the
    statements, the names of the program's own values (width, X, XX, f, features, nngp) and the terms
    (output name, layer, exponent). ntk False: no terms, and so no backward pass (for the nngp alone)."""
    from tpc.train.steps import STEPS

    low = _Lowering(net)
    own, name, call, op = low.own, low.name, low.call, low.op
    n, P = own["n"], low.P  # noqa: N806
    shown: list[str] = []  # each variance as `tpc graph` shows it: the lowered program's only text

    def variance(value: ast.Expr, text: str) -> ast.Normal:
        shown.append(text)
        at = Span(len(shown), 1, len(shown), len(text) + 1)
        return ast.Normal(ast.Num(SPAN, 0.0), replace(value, span=at), SPAN)

    for la in net.layers.values():
        if la.role == "input":
            var = variance(op("/", ast.Num(SPAN, la.var), ast.Num(SPAN, float(la.cols))), f"{la.var!r} / {la.cols}")
            low.stmts.append(ast.MatrixDecl(SPAN, la.name, n, int(la.cols), SPAN, SPAN, var))
        elif la.role == "hidden":
            var = variance(op("/", ast.Num(SPAN, la.var), name(n)), f"{la.var!r} / n")
            low.stmts.append(ast.MatrixDecl(SPAN, la.name, n, n, SPAN, SPAN, var))
        elif la.flattens:  # V @ flatten(h): P independent vectors of var / P
            for v in low.readout_vectors(net.model.steps[-1]):
                low.stmts.append(ast.VectorDecl(SPAN, (v,), variance(ast.Num(SPAN, la.var / la.taps),
                                                                     f"{la.var!r} / {la.taps}")))
        else:
            low.stmts.append(ast.VectorDecl(SPAN, (la.name,), variance(ast.Num(SPAN, la.var), f"{la.var!r}")))
    steps = net.model.steps
    for i, step in enumerate(steps):
        STEPS[step.op].lower(low, i, step)
    # the readout's term: x . x' of what it reads, summed over the positions for V @ flatten(h)
    feats = low.total([call("gram", name(v)) for v in low.names[net.model.features] if v is not None])
    flat = net.readout().taps
    low.stmts.append(ast.OutputDecl(SPAN, own["features"], feats if flat == 1 else
                                    op("/", feats, ast.Num(SPAN, float(flat)))))
    low.stmts.append(ast.OutputDecl(SPAN, own["nngp"], low.total([call("cov", name(g)) for g in low.readouts])))
    terms: list[tuple[str, str, float]] = []
    if not ntk:
        own["<shown>"] = "\n".join(shown)
        return low.stmts, own, terms
    # each application of a layer (at each position p) that f depends on: its output's and its
    # input's names, and p (a value a shift moves past the edge, or a zero, adds nothing)
    reach = {g: _reaching(low.stmts, g) for g in low.readouts}
    reaches = set().union(*reach.values())
    uses: dict[str, list[Use]] = {}
    for i, step in enumerate(steps):
        if step.op == "matmul" and net.layers[step.layer].role in ("input", "hidden"):
            for p in range(step.positions):
                if low.names[i][p] in reaches:
                    uses.setdefault(step.layer, []).append((low.names[i][p], low.at(step.args[0], p), p,
                                                             step.transposed))

    def grad_f(v: str) -> ast.Expr:
        """df/dv: the sum over the readouts that reach v (f_p are independent readouts, f their sum)."""
        return low.total([call("grad", name(g), name(v)) for g in low.readouts if v in reach[g]])

    def pair(u: Use, w: Use) -> ast.Expr:
        return call("gram", grad_f(u[0]), grad_f(w[0]))

    def hidden_pair(u: Use, w: Use) -> ast.Expr:
        """<df/dW at use u, df'/dW at use w>: W y gives df/dW = g y^T and W.T y gives y g^T, so two uses
        the same way round pair g with g and y with y, and a use of W with one of W.T pairs g with y."""
        if u[3] == w[3]:
            return op("*", pair(u, w), call("gram", name(u[1]), name(w[1])))
        return op("*", call("gram", grad_f(u[0]), name(w[1])), call("gram", name(u[1]), grad_f(w[0])))

    def inputs(u: Use, w: Use) -> ast.Expr:
        """x . x' of the data an input layer multiplies (at those positions)."""
        return name(own["XX"] if P == 1 else own[f"XX{u[2]}_{w[2]}"])

    for layer, la in net.layers.items():
        if la.fixed:  # no parameter, no term
            continue
        out = _fresh(f"theta_{layer}", low.taken)
        if la.role == "readout":
            value = feats
        elif la.role == "bias":
            value = call("gram", grad_f(layer))
        elif la.role == "input":
            value = low.partial_sums([op("*", pair(u, w), inputs(u, w)) for u in uses[layer] for w in uses[layer]],
                                     out)
        else:
            value = low.partial_sums([hidden_pair(u, w) for u in uses[layer] for w in uses[layer]], out)
        low.stmts.append(ast.OutputDecl(SPAN, out, value))
        terms.append((out, layer, term_exponent(net, layer)))
    own["<shown>"] = "\n".join(shown)
    return low.stmts, own, terms


def lowered_program(net: Network, X: np.ndarray, ntk: bool = True  # noqa: N803
                    ) -> tuple[Program, dict[str, str], list[tuple[str, str, float]]]:
    from tpc.build import Builder, ExpansionBudget

    stmts, own, terms = lowered_module(net, ntk)
    prog = Program(filename=f"<{net.filename} at initialisation>", source=own.pop("<shown>"))
    b = Builder(prog, Path.cwd())
    arrays = {"X": X, "XX": X @ X.T}
    P = net.model.positions  # noqa: N806
    if P > 1:  # a row holds P positions of d numbers: each position's rows, and their cross products
        at = net.model.by_position(X)
        arrays.update({f"X{p}": at[:, p] for p in range(P)})
        arrays.update({f"XX{p}_{q}": at[:, p] @ at[:, q].T for p in range(P) for q in range(P)})
    for key, value in arrays.items():
        b.names[own[key]] = prog.add("data", (), "scalar", value.shape, own[key], None, value=value, source=None).id
        b.defined_at[own[key]] = Span(1, 1, 1, 1)
    for stmt in stmts:
        b.budget = ExpansionBudget()  # per statement, as for a written program
        try:
            b.statement(stmt)
        except TpcError as err:
            # a layer that f does not reach by a nonzero derivative (behind a step function):
            # its kernel term is zero
            if "does not depend on" not in err.message:
                raise
            if not (isinstance(stmt, (ast.OutputDecl, ast.Assign)) and stmt.name.startswith("theta_")):
                raise
    prog.verify()
    return prog, own, [t for t in terms if t[0] in prog.outputs]


@dataclass
class LayerKernels:
    """The limit kernels of the network at initialisation on stacked points: per trained layer, the
    function-space effect of a unit-rate gradient step on it (its NTK term with the power of n that
    the parametrization's update carries, 1 or 0); f_0's covariance; the features' Gram matrix."""

    points: dict[str, slice]
    theta: dict[str, np.ndarray]  # layer -> (P, P), times the identity over the k outputs
    nngp: np.ndarray
    features: np.ndarray
    method: str
    # standard errors where Monte Carlo served an expectation (None: none did): the nngp's, the
    # features', and the NTK's as the sum of its terms' (they share particles, so a bound)
    errors: dict[str, np.ndarray] = field(default_factory=dict)
    methods: dict[str, str] = field(default_factory=dict)  # nngp, ntk, features -> how each was computed
    # where Monte Carlo served the kernels: each replicate's (theta, nngp), so that what training computes
    # from them carries their error (the spread of its results across replicates)
    replicas: list[tuple[dict[str, np.ndarray], np.ndarray]] = field(default_factory=list)

    @property
    def ntk(self) -> np.ndarray:
        """The tangent kernel: every layer's term, at unit rate."""
        if not self.theta and self.nngp.size:
            raise ValueError("the tangent kernel was not computed (layer_kernels(..., ntk=False))")
        return sum(self.theta.values(), np.zeros_like(self.nngp))

    def stderr(self, kind: str, data: str) -> np.ndarray | None:
        """The standard error of kernel `kind` (nngp, ntk, features) on data set `data`."""
        err = self.errors.get(kind)
        if err is None:
            return None
        pts = np.arange(self.points[data].start, self.points[data].stop)
        return err[np.ix_(pts, pts)]


def _not_finite(net: Network, X: np.ndarray, sets: list[str]) -> None:  # noqa: N803
    """Kernels that are not finite: named at the model's step that makes them so, else at the model."""
    from tpc.train.dense import blame_initial

    blame_initial(net, X, " and ".join(sets))
    raise NumericalError(f"the kernels of model {net.model.name} at initialisation are not finite",
                         net.model.span)


def layer_kernels(net: Network, sets: list[str], ntk: bool = True, **limit_options: object) -> LayerKernels:
    """The kernels on the data sets `sets`, stacked; ntk False: the nngp and the features' Gram matrix
    alone (no layer's term: `theta` is empty), which needs no backward pass."""
    points, start = {}, 0
    for d in sets:
        points[d] = slice(start, start + net.data[d].shape[0])
        start += net.data[d].shape[0]
    if not sets:  # the model is never applied: nothing to take kernels of
        empty = np.zeros((0, 0))
        return LayerKernels(points, {name: empty for name in net.layers}, empty, empty, "exact")
    X = np.concatenate([net.data[d] for d in sets])  # noqa: N806
    fast = position_kernels.covered(net, X)
    if fast is not None:  # a model over positions that the per-position recursion may cover
        memory_gb = limit_options.get("memory_gb")
        block, _, need = position_kernels.blocks_plan(net, len(X), memory_gb)  # type: ignore[arg-type]
        memory.require(need, f"the kernels over {len(X)} inputs of {net.model.positions} positions, even by "
                       "blocks of two inputs", memory_gb,  # type: ignore[arg-type]
                       bool(limit_options.get("force", False)), hint="fewer inputs")
        factors = {layer: limit_factor(term_exponent(net, layer)) if ntk or la.role == "readout" else 0.0
                   for layer, la in net.layers.items()}
        # per layer where training needs each term, or where there is none to take (ntk False)
        per_layer = net.program is not None and net.program.iterations() > 0 or net.train is not None or not ntk
        try:
            feats, f0, theta = position_kernels.blocked_kernels(net, X, factors, per_layer, max(block, 1))
        except position_kernels.NotCoveredError:  # an expectation without a closed form: the lowered program
            fast = None
    if fast is not None:
        if not (np.isfinite(f0).all() and all(np.isfinite(t).all() for t in theta.values())):
            _not_finite(net, X, sets)
        nngp = limit_factor(1 - 2 * net.init_exponent(net.readout())) * f0
        methods = dict.fromkeys(("nngp", "ntk", "features") if ntk else ("nngp", "features"), "exact+closed-form")
        return LayerKernels(points, theta if ntk else {}, nngp, feats, "exact+closed-form", {}, methods)
    prog, own, terms = lowered_program(net, X, ntk)
    try:
        lim = evaluate_limit(prog, **limit_options)
    except NumericalError as err:  # named in the lowered program, whose lines the user never wrote
        if "not finite" in err.message:
            _not_finite(net, X, sets)
        raise NumericalError(
            f"the kernels of model {net.model.name} at initialisation, by its lowered Netsor program: {err.message}",
            net.model.span, hint="a Monte Carlo covariance can miss the PSD check by its sampling error: more "
            "--particles make that smaller" if "PSD" in err.message else None) from None
    theta = _layer_terms(terms, list(net.layers), lambda out: lim[out].value, len(X)) if ntk else {}
    errors: dict[str, np.ndarray] = {}
    for out, _, exponent in terms:
        if lim[out].stderr is not None:
            errors["ntk"] = errors.get("ntk", 0.0) + abs(limit_factor(exponent)) * np.asarray(lim[out].stderr)
    scale = limit_factor(1 - 2 * net.init_exponent(net.readout()))  # f_0's: 0 where the readout starts small
    nngp = scale * lim[own["nngp"]].value
    for kind, out, factor in (("nngp", own["nngp"], scale), ("features", own["features"], 1.0)):
        if lim[out].stderr is not None:
            errors[kind] = abs(factor) * np.asarray(lim[out].stderr)
    order = ("exact", "closed-form", "quadrature", "monte-carlo")

    def how(outs: list[str]) -> str:
        methods = {m for out in outs for m in lim[out].method.split("+")}
        return "+".join(m for m in order if m in methods)

    methods = {"nngp": how([own["nngp"]]), "features": how([own["features"]])}
    if ntk:
        methods["ntk"] = how([t[0] for t in terms])
    return LayerKernels(points, theta, nngp, lim[own["features"]].value, how(list(lim)), errors, methods,
                        _replicas(lim, own["nngp"], terms, list(net.layers), scale))


def _layer_terms(terms: list[tuple[str, str, float]], layers: list[str],
                 value: Callable[[str], np.ndarray], points: int) -> dict[str, np.ndarray]:
    """Each layer's training kernel over the points: the sum of its terms' kernels (outputs of the lowered
    program, read by `value`), each times the limit of its power of n; zero for a layer with none."""
    theta = {name: np.zeros((points, points)) for name in layers}
    for out, layer, exponent in terms:
        theta[layer] = theta[layer] + limit_factor(exponent) * value(out)
    return theta


def _replicas(lim: dict, nngp: str, terms: list[tuple[str, str, float]], layers: list[str],
              scale: float) -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    """Each Monte Carlo replicate's kernels (theta per layer, nngp), or none where no kernel had Monte Carlo
    error or the replicates are not all there."""
    outs = [nngp] + [t[0] for t in terms]
    if all(lim[o].replicates is None for o in outs):
        return []
    counts = {len(lim[o].replicates) for o in outs if lim[o].replicates is not None}
    if len(counts) != 1:  # pragma: no cover - one evaluation: every Monte Carlo output has each replicate
        return []
    (count,) = counts

    def rep(o: str, r: int) -> np.ndarray:  # an exact output is the same in every replicate
        return lim[o].value if lim[o].replicates is None else lim[o].replicates[r]

    points = lim[nngp].value.shape[0]
    return [(_layer_terms(terms, layers, lambda o, r=r: rep(o, r), points), scale * rep(nngp, r))
            for r in range(count)]


def kernels(net: Network, **limit_options: object) -> Kernels:
    K = layer_kernels(net, net.point_sets(), **limit_options)  # noqa: N806
    lr = net.train.lr if net.train else 0.0
    theta = lr * K.ntk
    return Kernels(K.points, theta, K.nngp, K.features, K.method)
