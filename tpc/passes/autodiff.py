"""Reverse-mode autodiff as a pass: it appends the backward program of a readout to the graph,
as ordinary Netsor-transpose instructions (Nonlin, MatMul by W.T, Moment), so both backends
run it unchanged.

For a readout `f = c v.x / sqrt(n)` the gradients are scaled to O(1) coordinates:
`d_z = sqrt(n) df/dz` for every vector z; for a moment `f = mean(psi)`, `d_z = n df/dz`.
One rule per instruction, its `derivative` in tpc/ops/instructions.py (the `_derive_<op>` functions
below; the rules are linear, so the scaling is set by the seed alone):
  readout      d_x += c v,  d_v += c x
  h = W x      d_x += W.T d_h          (h = W.T x:  d_x += W d_h)
  z = phi(xs)  d_x_i += d_z * dphi/dx_i;  for a scalar parameter theta of phi (a moment),
               d_theta = mean(d_z * dphi/dtheta)
  t = mean(psi(xs))   d_x_i += d_t * dpsi/dx_i
  s = g(thetas)       d_theta_i += d_s * dg/dtheta_i
The derivative of a coordinatewise expression comes from each function's `deriv` rule in the
op registry. Gradients have the batch shape of f: entry a is the gradient of f_a.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tpc.errors import Span, TpcError
from tpc.ir import Node, Program
from tpc.ops import expr as ex
from tpc.ops.functions import FUNCTIONS
from tpc.ops.instructions import INSTRUCTIONS


def derivative(tree: ex.Tree, i: int) -> ex.Tree:
    """d tree / d Arg(i), simplified."""
    if isinstance(tree, ex.Arg):
        return ex.Const(1.0 if tree.index == i else 0.0)
    if isinstance(tree, ex.Const):
        return ex.Const(0.0)
    fn, args = tree.fn, tree.args
    if i not in ex.args_used(tree):
        return ex.Const(0.0)
    if fn in ("add", "sub"):
        return _add(derivative(args[0], i), derivative(args[1], i), fn == "sub")
    if fn == "neg":
        return _neg(derivative(args[0], i))
    if fn == "mul":
        a, b = args
        return _add(_mul(derivative(a, i), b), _mul(a, derivative(b, i)))
    if fn == "div":
        a, b = args
        da, db = derivative(a, i), derivative(b, i)
        return _add(_div(da, b), _div(_mul(a, db), ex.Apply("square", (b,))), True)
    if fn == "pow":
        a, b = args
        if i in ex.args_used(b):
            raise TpcError("autodiff: an exponent that depends on a variable is not supported")
        return _mul(_mul(b, ex.Apply("pow", (a, _add(b, ex.Const(1.0), True)))), derivative(a, i))
    rule = FUNCTIONS[fn].deriv
    if rule is None or FUNCTIONS[fn].arity != 1:
        raise TpcError(f"autodiff: no derivative rule for '{fn}'")
    outer = ex.substitute(rule(ex.Arg(0)), {0: args[0]})
    return _mul(outer, derivative(args[0], i))


def _is(t: ex.Tree, v: float) -> bool:
    return isinstance(t, ex.Const) and t.value == v


def _add(a: ex.Tree, b: ex.Tree, sub: bool = False) -> ex.Tree:
    if _is(b, 0.0):
        return a
    if _is(a, 0.0):
        return _neg(b) if sub else b
    return ex.Apply("sub" if sub else "add", (a, b))


def _neg(a: ex.Tree) -> ex.Tree:
    return ex.Const(-a.value) if isinstance(a, ex.Const) else ex.Apply("neg", (a,))


def _mul(a: ex.Tree, b: ex.Tree) -> ex.Tree:
    if _is(a, 0.0) or _is(b, 0.0):
        return ex.Const(0.0)
    if _is(a, 1.0):
        return b
    if _is(b, 1.0):
        return a
    if isinstance(a, ex.Const) and isinstance(b, ex.Const):
        return ex.Const(a.value * b.value)
    return ex.Apply("mul", (a, b))


def _div(a: ex.Tree, b: ex.Tree) -> ex.Tree:
    if _is(a, 0.0):
        return ex.Const(0.0)
    if _is(b, 1.0):
        return a
    return ex.Apply("div", (a, b))


@dataclass
class Backward:
    """The backward program of one readout, appended to `prog`."""

    prog: Program
    f: Node
    span: Span | None
    grads: dict[int, int] = field(default_factory=dict)  # forward node -> its gradient node
    pending: dict[int, list[tuple[ex.Tree, list[int]]]] = field(default_factory=dict)

    def add(self, op: str, inputs: tuple[int, ...], kind: str, shape: tuple[int, ...], name: str | None,
            **params: object) -> Node:
        return self.prog.add(op, inputs, kind, shape, name, self.span, derived=True, **params)

    def contribute(self, target: int, tree: ex.Tree, args: list[int]) -> None:
        self.pending.setdefault(target, []).append((tree, args))

    def batch(self, *nids: int) -> tuple[int, ...]:
        shapes = {self.prog.node(i).shape for i in nids}
        shapes.discard(())
        return shapes.pop() if shapes else ()

    def run(self) -> dict[int, int]:
        f = self.f
        if f.op == "readout" and self.prog.node(f.inputs[0]).op == "vector":
            self.propagate(f, None)  # d_f = 1
            v, x = f.inputs
            cone = self.prog.ancestors(x) | {x, v}
        elif f.kind == "scalar" and f.op in ("moment", "nonlin") and len(f.shape) <= 1:
            # a moment (or a scalar function of moments): d_z = n df/dz, and d_f = 1 for each
            # element of f's batch
            # ones shaped like f (its input: the emitted module sizes them by the batch it is given)
            one = self.add("data", (f.id,), "scalar", f.shape, None, value=np.ones(f.shape), source=None, like=True)
            self.contribute(f.id, ex.Arg(0), [one.id])
            cone = self.prog.ancestors(f.id) | {f.id}
        else:
            raise TpcError("autodiff: f must be a readout v @ x / sqrt(n) with an initial vector v, "
                           "or a moment", self.span)
        for node in reversed([n for n in self.prog.nodes() if n.id in cone]):
            if node.id not in self.pending:
                continue
            g = self.total(node)
            self.grads[node.id] = g
            self.propagate(node, g)
        return self.grads

    def total(self, node: Node) -> int:
        """Sum of the contributions to d_node, as one Nonlin (or Nonlin on scalars)."""
        args: list[int] = []
        tree: ex.Tree | None = None
        for t, targs in self.pending.pop(node.id):
            mapping = {}
            for k, a in enumerate(targs):
                if a not in args:
                    args.append(a)
                mapping[k] = ex.Arg(args.index(a))
            t = ex.substitute(t, mapping)
            tree = t if tree is None else _add(tree, t)
        assert tree is not None
        if isinstance(tree, ex.Arg):
            return args[tree.index]
        kind = node.kind
        if kind == "vector" and self.f.shape and not any(self.prog.node(a).shape for a in args):
            # the same gradient for every element of f's batch (d_x = c v): give it that batch
            ones = self.add("data", (self.f.id,), "scalar", self.f.shape, None, value=np.ones(self.f.shape),
                            source=None, like=True)
            args.append(ones.id)
            tree = _mul(tree, ex.Arg(len(args) - 1))
        shape = self.batch(*args) if kind == "vector" else _broadcast(self.prog, args)
        return self.add("nonlin", tuple(args), kind, shape, f"d_{node.name.lstrip('_')}", tree=tree).id

    def propagate(self, node: Node, g: int | None) -> None:
        """What d_node (the gradient node g) contributes to its inputs' gradients: the instruction's
        `derivative` rule (tpc/ops/instructions.py): none for initial vectors and data (the leaves); a
        gram's and a cov's refuse."""
        rule = INSTRUCTIONS[node.op].derivative
        if rule is not None:
            rule(self, node, g)


# --- the derivative of each instruction (`derivative` in tpc/ops/instructions.py)
def _derive_gram(bw: Backward, node: Node, g: int | None) -> None:
    """A gradient reached gram(x, y): its derivative (a sum over the other batch) is not written yet,
    and dropping the gradient would give wrong numbers."""
    raise TpcError(f"grad and tangent_kernel do not differentiate through gram(x, y) yet ('{node.name}' is used "
                   "on the way to f); write a gram of one pair as mean(x * y), whose derivative tpc takes",
                   node.span or bw.span)


def _derive_cov(bw: Backward, node: Node, g: int | None) -> None:
    """A gradient reached cov(f, g): refused, as for gram."""
    raise TpcError(f"grad and tangent_kernel do not differentiate through cov(f, g) ('{node.name}' is used on the "
                   "way to f)", node.span or bw.span)


def _derive_readout(bw: Backward, node: Node, g: int | None) -> None:
    """f = c v.x / sqrt(n) as grad's f (d_f = 1, no gradient node): d_x = c v, d_v = c x. A readout
    is never inside what grad differentiates: its one user, cov, passes no gradient back."""
    if g is not None:
        raise AssertionError(f"internal: a gradient flows into readout '{node.name}'")
    v, x = node.inputs
    c = float(node.params["coef"])
    bw.contribute(x, _mul(ex.Const(c), ex.Arg(0)), [v])
    bw.contribute(v, _mul(ex.Const(c), ex.Arg(0)), [x])


def _derive_matmul(bw: Backward, node: Node, g: int | None) -> None:
    """h = W x: d_x += W.T d_h (h = W.T x: d_x += W d_h)."""
    mat = bw.prog.node(node.inputs[0])
    if mat.params["role"] != "hidden":
        return  # input layers multiply data: nothing to propagate
    back = bw.add("matmul", (mat.id, g), "vector", bw.batch(g), None,
                  transposed=not node.params.get("transposed"))
    bw.contribute(node.inputs[1], ex.Arg(0), [back.id])


def _derive_nonlin(bw: Backward, node: Node, g: int | None) -> None:
    """z = phi(xs): d_x_i += d_z * dphi/dx_i; for a scalar parameter theta of a vector's phi (a
    moment), d_theta = mean(d_z * dphi/dtheta)."""
    _coordinatewise(bw, node, g, averaged=node.kind == "vector")


def _derive_moment(bw: Backward, node: Node, g: int | None) -> None:
    """t = mean(psi(xs)): d_x_i += d_t * dpsi/dx_i; d_theta = mean(d_t * dpsi/dtheta)."""
    _coordinatewise(bw, node, g, averaged=True)


def _coordinatewise(bw: Backward, node: Node, g: int | None, averaged: bool) -> None:
    """The chain rule through a coordinatewise expression; `averaged`: the expression runs over the n
    coordinates, so what it contributes to a scalar input is a moment."""
    prog = bw.prog
    tree = node.params["tree"]
    for i, a in enumerate(node.inputs):
        src = prog.node(a)
        if src.op in ("data", "matrix"):
            continue
        try:
            d = derivative(tree, i)
        except TpcError as err:  # name the instruction whose derivative is missing
            raise TpcError(f"{err.message} (in '{node.name}', needed by grad or tangent_kernel)",
                           node.span or bw.span) from None
        if _is(d, 0.0):
            continue
        # d_src += d_node * dphi/dsrc  (as a coordinatewise expression in g and phi's inputs)
        shifted = ex.substitute(d, {k: ex.Arg(k + 1) for k in range(len(node.inputs))})
        expr = _mul(ex.Arg(0), shifted)
        args = [g, *node.inputs]
        if src.kind == "scalar" and averaged:
            # a scalar parameter of a Nonlin: d_theta = mean(d_z * dphi/dtheta)
            m = bw.add("moment", tuple(args), "scalar", bw.batch(g, *node.inputs), None, tree=expr)
            bw.contribute(a, ex.Arg(0), [m.id])
        else:
            bw.contribute(a, expr, args)


def _broadcast(prog: Program, args: list[int]) -> tuple[int, ...]:
    return tuple(np.broadcast_shapes(*[prog.node(a).shape for a in args]))


def as_vector(prog: Program, x: int, g: int, span: Span | None) -> int:
    """The gradient g of vector x as a vector. Backward keeps the gradient of a vector that f reaches
    only through moments (`mean(b)`) as the scalar it is at every coordinate; where it is exposed as
    a vector, it becomes a Nonlin of x itself (which it ignores)."""
    node = prog.node(g)
    if node.kind == "vector":
        return g
    tree = ex.Apply("add", (ex.Arg(0), ex.Apply("mul", (ex.Const(0.0), ex.Arg(1)))))
    shape = node.shape or prog.node(x).shape
    return prog.add("nonlin", (g, x), "vector", shape, f"d_{prog.node(x).name.lstrip('_')}", span,
                    derived=True, tree=tree).id


def backward(prog: Program, f: int, span: Span | None) -> dict[int, int]:
    """Append the backward program of readout `f`; returns forward node -> gradient node."""
    return Backward(prog, prog.node(f), span).run()


def tangent_kernel(prog: Program, f: int, grads: dict[int, int], span: Span | None,
                   name: str | None = None) -> int:
    """The neural tangent kernel of readout f over its batch: sum over every initial object
    (in NTK form: matrix entries and vectors as std * standard Gaussian) of the products of
    gradients; every term is a product of kernels (moments) of the backward program."""
    fnode = prog.node(f)
    terms: list[tuple[float, list[int]]] = []  # coef * prod of scalar nodes
    def gram(a: int, b: int) -> int:
        return prog.instruction("gram", (a, b), None, span, derived=True).id

    batched = bool(fnode.shape)
    uses: dict[int, list[Node]] = {}
    for node in prog.nodes():
        if node.op == "matmul" and node.id in grads and not node.params.get("derived"):
            uses.setdefault(node.inputs[0], []).append(node)
    for mid, nodes in sorted(uses.items()):
        mat = prog.node(mid)
        s2 = float(mat.params["var"])
        for u in nodes:
            for w in nodes:
                gu, gw, xu, xw = grads[u.id], grads[w.id], u.inputs[1], w.inputs[1]
                if batched and any(not prog.node(i).shape for i in (xu, xw)) and mat.params["role"] == "hidden":
                    raise TpcError("tangent_kernel: a matrix applied to an unbatched vector inside a batched "
                                   "network is not supported yet", span)
                if mat.params["role"] != "hidden":  # U x or V.T c: a matrix times finite data
                    if batched and (prog.node(xu).shape[:-1] == ()) != (prog.node(xw).shape[:-1] == ()):
                        # X_i . x1 would have to line up with the kernel's rows, and a Nonlin's (B,) argument
                        # lines up with its columns: refused, as for a hidden matrix, rather than transposed
                        raise TpcError(f"tangent_kernel: '{mat.name}' is applied both to a batch of inputs and to "
                                       "one input (data without a batch) inside a batched network; this is not "
                                       "supported yet", span)
                    # the data's Gram, formed where it is used (ir.data_value): the limit shares it with the
                    # covariance of U x, which is the same product, and a program stays light
                    shape = prog.node(xu).shape[:-1] + prog.node(xw).shape[:-1]
                    names = f"{prog.node(xu).name} {prog.node(xw).name}^T"
                    dot = prog.add("data", (xu, xw), "scalar", shape, None, span, derived=True, gram=True,
                                   text=f"data {'x'.join(map(str, shape))} = {names}", source=None)
                    terms.append((s2, [gram(gu, gw), dot.id]))
                    continue
                tu, tw = bool(u.params.get("transposed")), bool(w.params.get("transposed"))
                if tu == tw:
                    terms.append((s2, [gram(gu, gw), gram(xu, xw)]))
                else:  # one use of W and one of W.T
                    terms.append((s2, [gram(gu, xw), gram(xu, gw)]))
    for group in prog.groups:
        for j, a in enumerate(group.members):
            for k, b in enumerate(group.members):
                if a in grads and b in grads and group.cov[j, k] != 0:
                    ga, gb = as_vector(prog, a, grads[a], span), as_vector(prog, b, grads[b], span)
                    terms.append((float(group.cov[j, k]), [gram(ga, gb)]))
    if not terms:
        raise TpcError("tangent_kernel: f depends on no initial matrix or vector", span)
    args: list[int] = []
    tree: ex.Tree | None = None
    for coef, factors in terms:
        t: ex.Tree = ex.Const(coef)
        for fac in factors:
            if fac not in args:
                args.append(fac)
            t = _mul(t, ex.Arg(args.index(fac)))
        tree = t if tree is None else _add(tree, t)
    shape = fnode.shape + fnode.shape
    node = prog.add("nonlin", tuple(args), "scalar", shape, name, span, tree=tree, derived=False,
                    text=f"tangent_kernel({fnode.name})", symmetric=True)
    return node.id
