"""The NNGP and the per-layer NTK terms of a model over positions at initialisation, by the
per-position kernel recursion (Novak et al. 2019, "Bayesian deep convolutional networks with
many channels are Gaussian processes"; Arora et al. 2019 for the CNTK), on tensors
(N, N, P, P): one entry per pair of inputs and pair of positions.

`kernel.layer_kernels` lowers a model to a Netsor program with one vector per position; its cost
grows with the number of position pairs times the statements, minutes for two 3 x 3 convolutions
on 8 x 8 images. This recursion computes the same numbers (a test checks them against the lowered
program to 1e-9) with one tensor operation per pair of values, where the model is made of what
it covers: layers, biases, linear combinations, one closed-form coordinatewise function of a
Gaussian value (`relu(A @ h + B @ shift(h, 1))`), `shift` and `pool`. Anything else (moments,
attention, products of vectors, a function without a closed form, a layer applied at two steps)
returns None, and the lowered program serves.

A value is a linear combination of atoms; an atom is a base (a layer's output, a bias, or a
function of a Gaussian value) seen through a position operator (a P' x P matrix: a shift with
zero fill, the mean over positions, or their product). Expectations of products of bases are
taken once and the operators applied on the position axes:
    E[(M a)(M' b)] = M E[a b] M'^T.
Gaussian bases: two applications of one layer W to a and b have covariance var_W E[a b]; the
input layer's var / d (x_p . x'_q); a bias var. Functions: the closed forms of E[phi(u) psi(v)]
(`tpc/ops/functions.py`), Stein's lemma against a Gaussian. NTK terms per layer l, in TP4's
convention at the natural scale (a layer's own term without its variance):
    Theta_l(W a, W b) = [W = l] E[a b] + var_W Theta_l(a, b),
    Theta_l(phi(u), psi(v)) = E[phi'(u) psi'(v)] Theta_l(u, v).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from tpc.ops import expr as ex
from tpc.ops.functions import FUNCTIONS, pair_rule
from tpc.train.network import Network
from tpc.train.positions import source_position, window_matrix

Tensor = torch.Tensor
Value = list[tuple[float, "Atom"]]


class NotCoveredError(Exception):
    """The model holds something this recursion does not cover."""


@dataclass(frozen=True)
class Atom:
    base: int
    op: Tensor | None = None  # the position operator (P' x P of the base), None: the identity
    shift: tuple[int, ...] | None = None  # op is the shift by this offset (applied by slicing)


@dataclass(frozen=True, eq=False)
class Scalar:
    """A number per input (and position) at initialisation, known once the expectations are: a
    constant, the mean E[u v] of a product of two values at each input and position (a norm's
    variance), or a function of scalars."""

    kind: str  # const | mean | fn
    value: float = 0.0
    pair: tuple[Value, Value] | None = None
    fn: str | None = None
    args: tuple[Scalar, ...] = ()


@dataclass(frozen=True, eq=False)
class Product:
    """u * v for two values: only its mean (a moment) is covered."""

    u: Value
    v: Value


@dataclass
class Base:
    kind: str  # input | hidden | bias | fn | scaled
    positions: int  # 1 or P
    layer: str | None = None
    arg: Value | None = None  # hidden: the value the layer multiplies; fn, scaled: their argument
    fn: str | None = None
    upstream: frozenset[str] = frozenset()  # the layers it depends on
    scale: Scalar | None = None  # scaled: arg times this number per input and position (a norm)
    grid: tuple[int, ...] = ()  # its positions' grid (a shift of it is taken on this grid)


class Recursion:
    def __init__(self, net: Network, X: np.ndarray) -> None:  # noqa: N803
        self.net = net
        self.grid_now: tuple[int, ...] = ()  # the grid of the step being built
        self.x = torch.as_tensor(net.model.by_position(X))  # (N, P, d): a patch per position under conv(U, x)
        self._dots: Tensor | None = None  # made when first needed: `covered` allocates nothing
        self.expect_memo: dict[tuple[int, int], Tensor] = {}  # by the values' ids (bases hold them)
        self.N = X.shape[0]
        self.bases: list[Base] = []
        self.cov_memo: dict[tuple[int, int], Tensor] = {}
        self.theta_memo: dict[tuple[str | None, int, int], Tensor] = {}
        self.own_weight: dict[str, float] = {}
        self.scalar_memo: dict[tuple[int, int], Tensor] = {}
        self.values: list = []  # each step's: Value, Scalar (a number per input), Product, or None
        self.build()
        self.fn_args = {id(b.arg) for b in self.bases if b.kind in ("fn", "scaled")}  # values whose pairs are kept

    # --- the model as values over bases
    def base(self, b: Base) -> Value:
        b.grid = self.grid_now
        self.bases.append(b)
        return [(1.0, Atom(len(self.bases) - 1))]

    def build(self) -> None:
        net = self.net
        used: dict[tuple[str, tuple[int, ...]], Value | None] = {}
        for step in net.model.steps:
            n_pos, self.grid_now = step.positions, step.grid
            if step.op == "input":
                self.values.append(None)
            elif step.op == "bias":
                self.values.append(self.base(Base("bias", n_pos, step.layer, upstream=frozenset({step.layer}))))
            elif step.op == "matmul":
                la = net.layers[step.layer]
                if step.transposed:  # W.T h beside W h' correlates them (TP's Zdot): the lowered program's
                    raise NotCoveredError("a layer applied transposed")
                if (step.layer, step.args) in used:  # the same product written twice: one value
                    self.values.append(used[step.layer, step.args])
                    continue
                if any(layer == step.layer for layer, _ in used):
                    raise NotCoveredError("a layer applied to two values (weights shared)")
                if la.role == "readout":
                    self.out = self.as_value(self.values[step.args[0]])
                    self.values.append(None)
                elif la.role == "input":
                    self.values.append(self.base(Base("input", n_pos, step.layer, upstream=frozenset({step.layer}))))
                else:
                    arg = self.as_value(self.values[step.args[0]])
                    up = self.upstream(arg) | {step.layer}
                    self.values.append(self.base(Base("hidden", n_pos, step.layer, arg, upstream=up)))
                used[step.layer, step.args] = self.values[-1]
            elif step.op == "fn":
                value = self.symbolic(step.tree, [self.values[j] for j in step.args], n_pos)
                if isinstance(value, Scalar) and step.kind == "vector":
                    raise NotCoveredError("a constant vector")
                self.values.append(value)
            elif step.op == "moment":
                self.values.append(self.moment(self.values[step.args[0]]))
            elif step.op == "attend":
                self.values.append(self.uniform_attention(*(self.values[j] for j in step.args)))
            elif step.op == "shift":
                self.values.append(self.operated(self.as_value(self.values[step.args[0]]),
                                                 self.shift_matrix(step.offset, step.grid), step.offset))
            elif step.op == "pool":
                r = net.model.steps[step.args[0]].positions
                self.values.append(self.operated(self.as_value(self.values[step.args[0]]),
                                                 torch.full((1, r), 1.0 / r, dtype=torch.float64)))
            elif step.op == "window":
                m = window_matrix(net.model.steps[step.args[0]].grid, step.window)
                self.values.append(self.operated(self.as_value(self.values[step.args[0]]), m))
            else:
                raise NotCoveredError(step.op)

    def symbolic(self, tree: ex.Tree, args: list, n_pos: int) -> Value | Product | Scalar:
        """A coordinatewise step at initialisation: a linear combination of values, with numbers
        per input as coefficients (a norm: `h / sqrt(mean(h^2) + eps)`, a scaled base), a closed-form
        function of a Gaussian value (a function base), the product of two values (for a moment),
        or a number per input. NotCoveredError for anything else (a constant vector, a function
        of a non-Gaussian value)."""
        if isinstance(tree, ex.Arg):
            return args[tree.index]
        if isinstance(tree, ex.Const):
            return Scalar("const", tree.value)
        fn = tree.fn
        parts = [self.symbolic(a, args, n_pos) for a in tree.args]
        if all(isinstance(a, Scalar) for a in parts):
            if all(a.kind == "const" for a in parts):
                vals = [torch.tensor(a.value, dtype=torch.float64) for a in parts]
                return Scalar("const", float(FUNCTIONS[fn].torch(*vals)))
            return Scalar("fn", fn=fn, args=tuple(parts))
        if fn in ("add", "sub"):
            a, b = (self.as_value(x) for x in parts)
            return a + self.scaled(b, -1.0 if fn == "sub" else 1.0)
        if fn == "neg":
            return self.scaled(self.as_value(parts[0]), -1.0)
        if fn == "identity":
            return parts[0]
        if fn in ("mul", "div"):
            a, b = parts
            if fn == "mul" and isinstance(a, Scalar):
                a, b = b, a
            if isinstance(b, Scalar):
                if fn == "div":
                    b = Scalar("const", 1.0 / b.value) if b.kind == "const" else Scalar("fn", fn="div", args=(
                        Scalar("const", 1.0), b))
                return self.times(self.as_value(a), b, n_pos)
            if fn == "mul":
                return Product(self.as_value(a), self.as_value(b))
            raise NotCoveredError("a quotient of two values")
        if fn == "pow" and isinstance(parts[1], Scalar) and parts[1].kind == "const" and parts[1].value == 2:
            u = self.as_value(parts[0])
            return Product(u, u)
        if FUNCTIONS[fn].arity == 1:
            inner = self.as_value(parts[0])
            if not self.gaussian(inner):
                raise NotCoveredError("a function of a non-Gaussian value")
            self.derivative(fn)  # refuse early what has no closed form
            return self.base(Base("fn", n_pos, arg=inner, fn=fn, upstream=self.upstream(inner)))
        raise NotCoveredError(f"'{fn}'")

    @staticmethod
    def as_value(x: Value | Product | Scalar | None) -> Value:
        """A vector term: a value, or the number 0 (a constant vector is not covered)."""
        if isinstance(x, Scalar):
            if x.kind == "const" and x.value == 0.0:
                return []
            raise NotCoveredError("a constant vector")
        if isinstance(x, Product):
            raise NotCoveredError("a product of two values")
        if x is None:
            raise NotCoveredError("the input outside its layer")
        return x

    def times(self, value: Value, s: Scalar, n_pos: int) -> Value:
        """A value times a number per input: a constant scales it, any other is a scaled base."""
        if s.kind == "const":
            return self.scaled(value, s.value)
        if not value:
            return []
        return self.base(Base("scaled", n_pos, arg=value, upstream=self.upstream(value), scale=s))

    def moment(self, v: Value | Product | Scalar | None) -> Scalar:
        """mean(v) at initialisation: 0 for a Gaussian value (centred), E[u v] for a product."""
        if isinstance(v, Product):
            return Scalar("mean", pair=(v.u, v.v))
        if isinstance(v, list) and self.gaussian(v):
            return Scalar("const", 0.0)
        raise NotCoveredError("the mean of a function of a Gaussian value")

    def uniform_attention(self, q: Value, k: Value, v: Value) -> Value:
        """attend(q, k, v) at initialisation with logits q.k / n: where q and k are outputs of
        different layers (independent Gaussians), q.k / n -> 0 and the weights are uniform, so the
        output is the mean of v over the positions; Q and K get no NTK term through it (the
        backward vector meets v through independent matrices: tests/test_positions.py)."""
        if self.net.attention != 1.0:
            raise NotCoveredError("attention logits other than q.k / n")
        for value in (q, k):
            if not self.gaussian(value) or any(self.bases[a.base].kind == "scaled" for _, a in value):
                raise NotCoveredError("attention logits of non-Gaussian values")
        layers = [{self.bases[a.base].layer for _, a in value} for value in (q, k)]
        if layers[0] & layers[1] or None in layers[0] | layers[1]:
            raise NotCoveredError("attention logits that do not vanish at initialisation")
        P = self.positions_of(self.as_value(v))  # noqa: N806
        return self.operated(v, torch.full((P, P), 1.0 / P, dtype=torch.float64))

    def gaussian(self, value: Value) -> bool:
        """Every atom a layer's output, a bias, or a norm of such (a centred Gaussian per input)."""
        for _, a in value:
            b = self.bases[a.base]
            if b.kind == "fn" or b.kind == "scaled" and not self.gaussian(b.arg or []):
                return False
        return True

    def scalar(self, s: Scalar) -> Tensor | float:
        """A scalar's value: a float, or (N, P') per input and position."""
        if s.kind == "const":
            return s.value
        key = (id(s), 0)
        if key not in self.scalar_memo:
            if s.kind == "mean":
                u, v = s.pair  # type: ignore[misc]
                self.scalar_memo[key] = torch.einsum("aapp->ap", self.expect(u, v))
            else:
                vals = [self.scalar(a) for a in s.args]
                vals = [v if isinstance(v, Tensor) else torch.tensor(v, dtype=torch.float64) for v in vals]
                self.scalar_memo[key] = FUNCTIONS[s.fn].torch(*vals)  # type: ignore[index]
        return self.scalar_memo[key]

    def upstream(self, value: Value) -> frozenset[str]:
        return frozenset().union(*(self.bases[a.base].upstream for _, a in value))

    @staticmethod
    def scaled(value: Value | None, c: float) -> Value:
        if value is None:
            raise NotCoveredError("the input outside its layer")
        return [(c * ci, a) for ci, a in value]

    @staticmethod
    def operated(value: Value | None, m: Tensor, shift: tuple[int, ...] | None = None) -> Value:
        """M applied to each atom; a shift of a base itself keeps its offset (the fast path of
        `combine`), any other product is a matrix."""
        assert value is not None
        return [(c, Atom(a.base, m, shift) if a.op is None else Atom(a.base, m @ a.op)) for c, a in value]

    @staticmethod
    def shift_matrix(offset: tuple[int, ...], grid: tuple[int, ...]) -> Tensor:
        """S[p, r] = 1 where r = p + offset on the grid (row by row), else 0."""
        P = math.prod(grid)  # noqa: N806
        m = torch.zeros(P, P, dtype=torch.float64)
        for p in range(P):
            r = source_position(p, offset, grid)
            if r is not None:
                m[p, r] = 1.0
        return m

    # --- expectations
    def derivative(self, fn: str) -> tuple[str | None, float]:
        """phi' as (function name, 1) or (None, constant)."""
        d = FUNCTIONS[fn].deriv
        if d is None or FUNCTIONS[fn].jumps:
            raise NotCoveredError(f"'{fn}' has no derivative rule here")
        tree = d(ex.Arg(0))
        if isinstance(tree, ex.Const):
            return None, tree.value
        if isinstance(tree, ex.Apply) and tree.args == (ex.Arg(0),):
            return tree.fn, 1.0
        raise NotCoveredError(f"the derivative of '{fn}'")

    def pair(self, f: str | None, g: str | None, va: Tensor, vb: Tensor, c: Tensor) -> Tensor:
        """E[f(u) g(v)] for centred (u, v), Var u = va, Var v = vb, Cov = c; None: the constant 1."""
        if f is None and g is None:
            return torch.ones_like(c)
        if f is None or g is None:
            h, v = (g, vb) if f is None else (f, va)
            mean = FUNCTIONS[h].mean
            if mean is None:
                raise NotCoveredError(f"no closed form of E {h}(u)")
            return mean(torch.zeros_like(v), v) * torch.ones_like(c)
        rule = pair_rule(f, g)
        if rule is None:
            raise NotCoveredError(f"no closed form of E {f}(u) {g}(v)")
        return rule(va, vb, c)

    @property
    def dots(self) -> Tensor:
        """x_p . x'_q: (N, N, P, P)."""
        if self._dots is None:
            self._dots = torch.einsum("apd,bqd->abpq", self.x, self.x)
        return self._dots

    def diag(self, value: Value) -> Tensor:
        """E[Z^2] at each input and position: (N, P')."""
        return torch.einsum("aapp->ap", self.expect(value, value))

    def expect(self, u: Value, v: Value) -> Tensor:
        """E[u v]; a function's argument is asked for several times (its variances and its pairs)."""
        key = (id(u), id(v))
        if key in self.expect_memo:
            return self.expect_memo[key]
        value = self.combine(u, v, self.cov)
        if key[0] in self.fn_args and key[1] in self.fn_args:  # a layer's argument is asked for twice
            self.expect_memo[key] = value  # at most, and its pairs are cheap again: not kept
        return value

    def combine(self, u: Value, v: Value, rule: Callable[[int, int], Tensor | None]) -> Tensor:
        """sum_{k,l} c_k c_l M_k rule(base_k, base_l) M_l^T over the atoms of u and v."""
        total: Tensor | None = None
        for cu, a in u:
            for cv, b in v:
                k = rule(a.base, b.base)
                if k is None:
                    continue
                if (a.shift or b.shift) and (a.op is None or a.shift) and (b.op is None or b.shift):
                    # shifts on both position axes: one slice added in place, no operator products
                    if total is None:
                        total = torch.zeros(k.shape, dtype=k.dtype)
                    _add_shifted(total, k, a.shift, b.shift, self.bases[a.base].grid, self.bases[b.base].grid,
                                 cu * cv)
                    continue
                if a.op is not None:
                    k = _operate(a.op, k, 2)
                if b.op is not None:
                    k = _operate(b.op, k, 3)
                if total is None:
                    total = cu * cv * k  # a new tensor, this sum's own: later terms are added in place
                else:
                    total.add_(k, alpha=cu * cv)
        if total is None:
            pu = self.positions_of(u)
            pv = self.positions_of(v)
            return torch.zeros(self.N, self.N, pu, pv, dtype=torch.float64)
        return total

    def positions_of(self, value: Value) -> int:
        if not value:
            raise NotCoveredError("a value that is zero")
        _, a = value[0]
        return a.op.shape[0] if a.op is not None else self.bases[a.base].positions

    def cov(self, i: int, j: int) -> Tensor | None:
        """E[Z_i Z_j] of two bases: (N, N, P_i, P_j), None where it is zero. Only pairs with a
        function are kept: a layer's pair is its variance times its arguments' (cheap again)."""
        if self.bases[i].kind != "fn" and self.bases[j].kind != "fn":
            return self._cov(i, j)
        if (j, i) in self.cov_memo and (i, j) not in self.cov_memo:
            other = self.cov_memo[j, i]
            return None if other is None else other.transpose(0, 1).transpose(2, 3)
        if (i, j) not in self.cov_memo:
            self.cov_memo[i, j] = self._cov(i, j)
        return self.cov_memo[i, j]

    def _cov(self, i: int, j: int) -> Tensor | None:
        a, b = self.bases[i], self.bases[j]
        net = self.net
        if a.kind == "scaled" or b.kind == "scaled":  # s_a s_b E[arg_a arg_b]
            return self.scaled_pair(i, j, self.expect)
        if a.kind == "fn" or b.kind == "fn":
            if a.kind != "fn":
                other = self.cov(j, i)
                return None if other is None else other.transpose(0, 1).transpose(2, 3)
            va = self.diag(a.arg)[:, None, :, None]
            if b.kind == "fn":
                vb = self.diag(b.arg)[None, :, None, :]
                return self.pair(a.fn, b.fn, va, vb, self.expect(a.arg, b.arg))
            c = self.expect(a.arg, [(1.0, Atom(j))])
            vb = self.diag([(1.0, Atom(j))])[None, :, None, :]
            return self.pair(a.fn, "identity", va, vb, c)
        if a.layer != b.layer:
            return None
        var = net.layers[a.layer].var
        if a.kind == "input":
            return var / net.layers[a.layer].cols * self.dots
        if a.kind == "bias":
            return var * torch.ones(self.N, self.N, a.positions, b.positions, dtype=torch.float64)
        return var * self.expect(a.arg, b.arg)

    def scaled_pair(self, i: int, j: int, pair: Callable[[Value, Value], Tensor]) -> Tensor:
        """pair(u, v) of two bases, either a scaled base: its argument's, times its scale on its
        position axis (a norm's value is arg / sqrt(E[arg^2] + eps) per input and position)."""
        k = pair(*(self.bases[t].arg if self.bases[t].kind == "scaled" else [(1.0, Atom(t))] for t in (i, j)))
        for t, at in ((i, (slice(None), None, slice(None), None)), (j, (None, slice(None), None, slice(None)))):
            if self.bases[t].kind == "scaled":
                s = self.scalar(self.bases[t].scale)  # type: ignore[arg-type]
                k = k * (s[at] if isinstance(s, Tensor) else s)
        return k

    def theta(self, layer: str | None, u: Value, v: Value) -> Tensor:
        """Layer's NTK term of u and v; layer None: every layer's, each own term times its weight
        in `self.own_weight` (one pass, where no layer's term is needed alone)."""
        return self.combine(u, v, lambda i, j: self.theta_base(layer, i, j))

    def theta_base(self, layer: str | None, i: int, j: int) -> Tensor | None:
        a, b = self.bases[i], self.bases[j]
        if layer is not None and (layer not in a.upstream or layer not in b.upstream):
            return None
        if a.kind != "fn" or b.kind != "fn":  # a layer's term is its arguments' (kept) again
            return self._theta(layer, i, j)
        key = (layer, i, j)
        if key not in self.theta_memo:
            self.theta_memo[key] = self._theta(layer, i, j)
        return self.theta_memo[key]

    def _theta(self, layer: str, i: int, j: int) -> Tensor | None:
        a, b = self.bases[i], self.bases[j]
        if a.kind == "scaled" or b.kind == "scaled":  # a norm's NTK maps as its kernel (README)
            return self.scaled_pair(i, j, lambda u, v: self.theta(layer, u, v))
        if a.kind == "fn" or b.kind == "fn":
            ua = a.arg if a.kind == "fn" else [(1.0, Atom(i))]
            ub = b.arg if b.kind == "fn" else [(1.0, Atom(j))]
            fa, sa = self.derivative(a.fn) if a.kind == "fn" else (None, 1.0)
            fb, sb = self.derivative(b.fn) if b.kind == "fn" else (None, 1.0)
            va = self.diag(ua)[:, None, :, None]
            vb = self.diag(ub)[None, :, None, :]
            weight = sa * sb * self.pair(fa, fb, va, vb, self.expect(ua, ub))
            return weight * self.theta(layer, ua, ub)
        if a.layer != b.layer:
            return None
        w = (1.0 if a.layer == layer else 0.0) if layer is not None else self.own_weight.get(a.layer, 1.0)
        if a.kind == "input":
            return w * self.dots  # TP4's input term: x . x'
        if a.kind == "bias":
            return torch.full((self.N, self.N, a.positions, b.positions), w, dtype=torch.float64)
        upstream = self.net.layers[a.layer].var * self.theta(layer, a.arg, b.arg)
        return upstream.add_(self.expect(a.arg, b.arg), alpha=w) if w else upstream

    # --- the model's kernels
    def kernels(self, factors: dict[str, float], per_layer: bool = True
                ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """(E[g g'] of the features g, the NNGP, each layer's NTK term times its factor (its power
        of n in the limit)). per_layer False: one pass for the whole NTK, which is put under the
        readout's name (the other layers' entries zero): for the `ntk` output, where no training
        needs a layer's term alone."""
        readout_name = self.net.model.steps[-1].layer
        readout = self.net.layers[readout_name]
        g = self.out
        flat = readout.taps  # V @ flatten(h): position p read by its own vectors, var / P each

        def read(k: Tensor) -> Tensor:
            """(N, N, P, P) -> (N, N): what the readout sees, the mean over positions p of (p, p)."""
            return torch.einsum("abpp->ab", k) / flat

        if self.positions_of(g) != flat:  # pragma: no cover - the model builder refuses it
            raise NotCoveredError("the readout of positions")
        feats = read(self.expect(g, g))
        terms = {name: torch.zeros_like(feats) for name in self.net.layers}
        terms[readout_name] = factors[readout_name] * flat * feats  # its own term sums the positions
        if per_layer:
            for name, la in self.net.layers.items():
                if la.role != "readout" and factors[name]:
                    terms[name] = factors[name] * readout.var * read(self.theta(name, g, g))
                    self.theta_memo.clear()  # one layer's terms at a time
        else:
            self.own_weight = factors
            terms[readout_name] = terms[readout_name] + readout.var * read(self.theta(None, g, g))
        return feats.numpy(), (readout.var * feats).numpy(), {k: np.asarray(v) for k, v in terms.items()}


def _add_shifted(total: Tensor, k: Tensor, sa: tuple[int, ...] | None, sb: tuple[int, ...] | None,
                 grid_a: tuple[int, ...], grid_b: tuple[int, ...], alpha: float) -> None:
    """total += alpha S_a k S_b^T for shifts S_a, S_b (None: none) of the first and the second
    position axis: the entry at positions (p, q) is k's at (p + a, q + b), zero where either leaves
    the grid, so it is one slice of k added to one slice of total, on the grid's axes."""
    lead = k.shape[:2]
    src: list[slice] = [slice(None), slice(None)]
    dst: list[slice] = [slice(None), slice(None)]
    for offset, grid in ((sa, grid_a), (sb, grid_b)):
        for s, size in zip(offset or (0,) * len(grid), grid, strict=True):
            src.append(slice(max(s, 0), size + min(s, 0)))
            dst.append(slice(max(-s, 0), size - max(s, 0)))
    view = total.view(*lead, *grid_a, *grid_b)
    view[tuple(dst)].add_(k.reshape(*lead, *grid_a, *grid_b)[tuple(src)], alpha=alpha)


def _operate(m: Tensor, k: Tensor, axis: int) -> Tensor:
    """M applied to a position axis of k. A shift (each row of M one 1 or none) picks entries and
    zeros the rest, in O(N^2 P^2); other operators (pooling's one row) multiply."""
    if m.shape[0] == m.shape[1] and bool(((m == 0) | (m == 1)).all()) and bool((m.sum(1) <= 1).all()):
        keep = m.sum(1)
        picked = k.index_select(axis, m.argmax(1))
        shape = [1] * k.dim()
        shape[axis] = -1
        return picked * keep.reshape(shape)
    return torch.movedim(torch.tensordot(k, m, dims=([axis], [1])), -1, axis)


def covered(net: Network, X: np.ndarray) -> Recursion | None:  # noqa: N803
    """The recursion for this model, or None where it does not cover the model."""
    if net.model.positions == 1:
        return None
    try:
        return Recursion(net, X)
    except NotCoveredError:
        return None


def memory_bytes(net: Network, rows: int) -> int:
    """What the recursion holds at most, in (N, N, P, P) tensors: the pairs of functions of Gaussian
    values and of their arguments (kept), their NTK terms, and a few temporaries."""
    per = 8 * rows**2 * net.model.positions**2
    functions = sum(1 for s in net.model.steps if s.op == "fn" and s.tree is not None
                    and any(isinstance(t, ex.Apply) and t.fn not in ("add", "sub", "neg", "mul", "div")
                            for t in _subtrees(s.tree)))
    # measured peaks, in tensors (benchmarks/architectures.py, and conv nets of 1 to 4 relus and a
    # residual erf one): 10 for 2 functions, 13 to 17 for 3, 18 for 4; pairs of functions kept, and
    # their arguments' pairs, grow like functions^2 where paths meet (residual sums)
    return per * (functions + 1) * (functions + 2)


def output_bytes(net: Network, rows: int) -> int:
    """The kernels it returns: features, NNGP and one NTK term per layer, each rows x rows."""
    return 8 * rows**2 * (len(net.layers) + 2)


def block_size(net: Network, rows: int, memory_gb: float | None) -> int:
    """The inputs one recursion takes: all of them where they fit in the budget, else b such that a
    pair of blocks (2b inputs) fits beside the outputs; 0 where not even two inputs fit. The kernel
    of two inputs depends on them alone, so blocks of inputs give the same numbers."""
    from tpc import memory

    budget = memory.budget_gb(memory_gb) * 2**30 - output_bytes(net, rows)
    if memory_bytes(net, rows) <= budget:
        return rows
    return max(0, min(rows // 2, int(np.sqrt(max(budget, 0) / memory_bytes(net, 1)) / 2)))


def blocks_plan(net: Network, rows: int, memory_gb: float | None) -> tuple[int, int, int]:
    """(block size b, recursions, bytes needed): one recursion where all rows fit, else one per pair
    of blocks of b inputs (each over its 2b inputs, every diagonal block computed again beside
    each other block: about twice the work of one recursion); b = 0 where nothing fits."""
    b = block_size(net, rows, memory_gb)
    if b >= rows:
        return rows, 1, memory_bytes(net, rows) + output_bytes(net, rows)
    count = -(-rows // b) if b else rows
    return b, count * (count + 1) // 2, memory_bytes(net, 2 * max(b, 1)) + output_bytes(net, rows)


def blocked_kernels(net: Network, X: np.ndarray, factors: dict[str, float], per_layer: bool,  # noqa: N803
                    block: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """`Recursion(net, X).kernels(...)` by blocks of `block` inputs: the recursion over each pair of
    blocks, its four sub-blocks written into the whole kernels."""
    rows = len(X)
    if block >= rows:
        return Recursion(net, X).kernels(factors, per_layer)
    blocks = [np.arange(s, min(s + block, rows)) for s in range(0, rows, block)]
    feats, nngp = np.zeros((rows, rows)), np.zeros((rows, rows))
    terms = {name: np.zeros((rows, rows)) for name in net.layers}
    for i, first in enumerate(blocks):
        for second in blocks[i:]:
            at = first if second is first else np.concatenate([first, second])
            f, k, t = Recursion(net, X[at]).kernels(factors, per_layer)
            where = np.ix_(at, at)
            feats[where], nngp[where] = f, k
            for name, term in t.items():
                terms[name][where] = term
    return feats, nngp, terms


def _subtrees(tree: ex.Tree) -> list[ex.Tree]:
    return [tree] + [t for a in getattr(tree, "args", ()) for t in _subtrees(a)]
