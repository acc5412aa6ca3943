"""The unrolled Netsor-transpose program of a training program with loops, at width n or in the limit.

A value of an n x n layer W, whatever made it (the layer itself, a momentum buffer, a copy, a
decayed or scheduled combination), is `Pooled(a0, coef)`:
    W y = a0 W_0 y + sum_p coef_p dh_p (x_p . y / n),
over a pool of stored rows (x_p, dh_p) that every value of that layer shares: a `grad` appends
its rows (the layer's inputs x and dh = n dL/dh) with coefficient 1, and linear combinations only
combine the numbers a0 and coef. The program therefore multiplies only by W_0 and W_0.T, so the
Master Theorem applies (TP4): in the limit `W_0 y` is Zhat + Zdot (`LimitSpace`). Input columns,
readout rows and biases have a finite side and are kept as vectors.

Natural scale (TP4's convention, see `spaces.py`): vectors have O(1) coordinates, the readout is
`v = n W`, and the powers of n that the parametrization puts on updates are explicit factors: a
gradient term of `P -= e` on layer l carries n^(MAXIMAL_LR_EXPONENT[role] - 2 a_l - c), a term
with the parameters themselves (weight decay) n^-c. In the limit each is 1 or 0 (loops.py refuses
a growing one).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from tpc.backends.torch.run import DTYPES
from tpc.errors import TpcError
from tpc.ops import expr as ex
from tpc.passes.autodiff import derivative
from tpc.seeds import replicate_seed
from tpc.train import positions as by_pos
from tpc.train.interp import Applied, Bundle, Interpreter, Rows, entrywise_args
from tpc.train.loops import FAN_IN_EXPONENT, MAXIMAL_LR_EXPONENT
from tpc.train.losses import _tree
from tpc.train.network import Network, Step
from tpc.train.spaces import FiniteSpace, LimitSpace
from tpc.train.steps import STEPS

Tensor = torch.Tensor


@dataclass(frozen=True)
class Pooled:
    a0: Tensor | float  # the coefficient of the initial matrix W_0
    coef: Tensor  # (*lead, P): the coefficients of the first P rows of the layer's pool
    grid: Tensor | None = None  # (*lead, N, N): the sum of entrywise (adaptive) updates, natural scale


DEFAULT_PARTICLES = 2**16  # the limit's Monte Carlo particles unless asked otherwise (tpc limit --particles)
ENTRYWISE_PARTICLES = 2**12  # ... and when entrywise updates of n x n layers need P x P grids


def grids(net: Network) -> int:
    """How many P x P grids the limit of entrywise updates of n x n layers may hold at once: one per
    hidden layer for each entrywise value of a step, each state and copy, and the model (0: none)."""
    hidden = {name for name, la in net.layers.items() if la.role == "hidden"}
    ewise = [ins for ins in net.program.walk() if ins.op == "ewise"] if net.program else []
    if not any(hidden & set(ins.attrs["layers"]) for ins in ewise):
        return 0
    # each entrywise value, each combination of them (Adam's S / (1 - beta2^t)), and per layer five
    # temporaries (a gradient's grid, read once per argument; scaled copies in combinations and
    # updates; measured on adam_relu2_mup.tp: 13 grids' worth at 2048 particles)
    values = [ins for ins in net.program.walk()
              if ins.op == "ewise" or ins.op == "lincomb" and "adaptive" in ins.attrs["types"]]
    per_value = sum(len(hidden & set(ins.attrs["layers"])) for ins in values)
    held = sum(1 for ins in net.program.walk() if ins.op in ("state", "copy")) + 1 + 5
    return per_value + held * len(hidden)


def particles_for(net: Network, particles: int | None) -> int:
    """The particles asked for, or by default 65536, fewer where entrywise updates need P x P grids
    (stated in the plan)."""
    if particles is not None:
        return particles
    return ENTRYWISE_PARTICLES if grids(net) else DEFAULT_PARTICLES


class PooledBackend:
    def __init__(self, net: Network, space: FiniteSpace | LimitSpace) -> None:
        self.net, self.space = net, space
        self.dtype = space.dtype
        finite = isinstance(space, FiniteSpace)
        self.lead = 1 if finite else 0
        self.lead_shape: tuple[int, ...] = (space.normals[next(iter(net.layers))].shape[0],) if finite else ()
        self.pool: dict[str, tuple[Tensor, Tensor]] = {}  # layer -> (inputs x, dh), each (*lead, P, n)
        self.rate = {name: MAXIMAL_LR_EXPONENT[la.role] - net.lr_exponent(la) for name, la in net.layers.items()}
        self.kept = 0  # pool rows after the last compaction
        self.shapes: dict[str, tuple[int, ...]] = {}  # the finite-side layers' value shapes
        self.adaptive_rate = {name: FAN_IN_EXPONENT[la.role] - net.ab(la)[0] - net.adaptive_exponent(la)
                              for name, la in net.layers.items()}
        # attend's logits q.k / n^e are n^(1-e) gram(q, k) at the natural scale (network_limit refuses
        # e < 1 in the limit, where that factor grows)
        self.logit_scale = space.factor(1.0 - net.attention) if net.model.positions > 1 else 1.0
        self.finite = finite  # attention heads split the n coordinates; in the limit they coincide

    def heads(self, step: Step) -> tuple[int, float]:
        """attend's heads and their logits' factor: at width n, H heads over n/H coordinates each,
        q_h . k_h / (n/H)^e = (n/H)^(1-e) H gram(q_h, k_h); in the limit every head's logits are
        the same E[Z^q Z^k] (the coordinates are exchangeable), so the heads are one head."""
        if not self.finite or step.heads == 1:
            return 1, self.logit_scale
        return step.heads, self.logit_scale * float(step.heads ** (self.net.attention - 1.0))

    # --- parameters
    def initial(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for name, la in self.net.layers.items():
            if la.role == "hidden":
                out[name] = Pooled(1.0, torch.zeros((*self.lead_shape, 0), dtype=self.dtype))
            else:
                out[name] = self.space.initial(la)
                self.shapes[name] = tuple(out[name].shape)
        return out

    def scale(self, value: object, c: Tensor | float) -> object:
        if isinstance(value, Pooled):
            a0 = value.a0 * c
            cc = c.to(self.dtype)[..., None] if isinstance(c, Tensor) and c.dim() else c
            return Pooled(a0, value.coef * cc, None if value.grid is None else self.scale(value.grid, c))
        if isinstance(c, Tensor):
            c = c.to(value.dtype)
            c = c.reshape(c.shape + (1,) * (value.dim() - c.dim()))
        return value * c

    def add(self, a: object, b: object) -> object:
        if isinstance(a, Pooled):
            p = max(a.coef.shape[-1], b.coef.shape[-1])
            ca = torch.nn.functional.pad(a.coef, (0, p - a.coef.shape[-1]))
            cb = torch.nn.functional.pad(b.coef, (0, p - b.coef.shape[-1]))
            grid = b.grid if a.grid is None else a.grid if b.grid is None else a.grid + b.grid
            return Pooled(a.a0 + b.a0, ca + cb, grid)
        return a + b

    def update(self, params: dict[str, object], delta: Bundle, layers: tuple[str, ...], sign: float,
               scaled: bool) -> dict[str, object]:
        new = dict(params)
        for la in layers:
            if sign == 0.0:  # P = e: parameters only (loops.py refuses gradients here)
                new[la] = delta.weight[la] if la in delta.weight else self.scale(params[la], 0.0)
                continue
            value = params[la]
            for part, exponent in ((delta.weight, -self.net.abc.c), (delta.grad, self.rate[la]),
                                   (delta.adaptive, self.adaptive_rate[la])):
                if la in part:
                    factor = self.space.factor(exponent) if scaled else 1.0
                    if factor == 0.0:
                        continue
                    step = part[la]
                    if part is delta.adaptive and isinstance(value, Pooled):  # a grid: W moves by n^-(a+c') Q
                        step = Pooled(0.0, torch.zeros((*self.lead_shape, 0), dtype=self.dtype), step)
                    value = self.add(value, self.scale(step, sign * factor))
            new[la] = value
        return new

    # --- the model at a value of its parameters
    def hidden(self, name: str, w: Pooled, y: Tensor, transposed: bool) -> Tensor:
        out = None
        if not (isinstance(w.a0, float) and w.a0 == 0.0):
            out = self.scale(self.space.matmul(self.net.layers[name], y, transposed), w.a0)
        p = w.coef.shape[-1]
        if p:
            xs, ds = self.pool[name]
            left, right = (ds, xs) if transposed else (xs, ds)
            extra = (self.space.gram(y, left[..., :p, :]) * w.coef[..., None, :]) @ right[..., :p, :]
            out = extra if out is None else out + extra
        if w.grid is not None:
            extra = self.grid_apply(w.grid, y, transposed)
            out = extra if out is None else out + extra
        if out is None:
            out = torch.zeros_like(y)
        return out

    # --- entrywise (adaptive) updates: Tensor Programs IVb's entrywise functions of outer products
    def grid_apply(self, grid: Tensor, y: Tensor, transposed: bool) -> Tensor:
        """(Q y)_a = (1/n) sum_b Q_ab y_b (or Q.T y): at width n exactly; in the limit E_b[Q(a, b) y_b]
        over the particles b, leaving out b = a (which the limit's independent coordinates never pair)."""
        q = grid if transposed else grid.transpose(-1, -2)
        if isinstance(self.space, FiniteSpace):
            return y @ q / self.space.n
        size = q.shape[-1]
        return (y @ q - y * torch.diagonal(q, dim1=-2, dim2=-1)) / (size - 1)

    def natural(self, layer: str, value: object) -> object:
        """A gradient of `layer` at its natural scale, as an entrywise function reads it: for an n x n
        layer the grid sum_p k_p dh_p x_p^T (N x N over coordinates or particles); the finite-side
        layers' gradients are kept at that scale already."""
        if not isinstance(value, Pooled):
            return value
        a0 = torch.as_tensor(value.a0)
        # (a dry run with its checks off may carry a schedule's NaN here: that is not a parameter part)
        if bool((torch.isfinite(a0) & (a0 != 0)).any()) or value.grid is not None:  # pragma: no cover
            raise TpcError("internal: an entrywise function of parameters")  # loops.py refuses it first
        p = value.coef.shape[-1]
        xs, ds = self.pool[layer] if p else (None, None)
        if not p:
            return None
        return (ds[..., :p, :].transpose(-1, -2) * value.coef[..., None, :]) @ xs[..., :p, :]

    def entrywise(self, tree: ex.Tree, args: list[tuple[bool, object]], layer: str) -> Tensor:
        """The function, entry by entry, of values of `layer` (True, at their natural scale; None is
        zero) and numbers (False): a grid for an n x n layer, else the layer's own shape."""
        la = self.net.layers[layer]
        if la.role == "hidden":
            size = self.space.n if isinstance(self.space, FiniteSpace) else self.space.space.size
            shape: tuple[int, ...] = (*self.lead_shape, size, size)
        else:
            shape = self.shapes[layer]
        return _tree(tree, entrywise_args(args, shape, self.dtype, self.space.device))

    def apply(self, params: dict[str, object], rows: Rows) -> Applied:
        x = self.space.data(rows.values)
        vals: list[Tensor] = []
        for step in self.net.model.steps:  # each op's rule: `_forward_<op>` below (tpc/train/steps.py)
            vals.append(STEPS[step.op].forward(self, step, vals, params, x))
        return Applied(vals[-1].detach().requires_grad_(True), vals, params)

    def _forward_input(self, step: Step, vals: list, params: dict, x: Tensor) -> Tensor:
        P = self.net.model.positions  # noqa: N806 - over positions: one row per (input, position)
        if not step.pos:
            return x
        return by_pos.patches(x.reshape(x.shape[0] * P, x.shape[-1] // P), step.patches, self.net.model.grid)

    def _forward_bias(self, step: Step, vals: list, params: dict, x: Tensor) -> Tensor:
        return params[step.layer][..., None, :]

    def _forward_fn(self, step: Step, vals: list, params: dict, x: Tensor) -> Tensor:
        return self.space.fn(step.tree, [vals[i] for i in step.args])

    def _forward_moment(self, step: Step, vals: list, params: dict, x: Tensor) -> Tensor:
        return self.space.mean(vals[step.args[0]])

    def _forward_pool(self, step: Step, vals: list, params: dict, x: Tensor) -> Tensor:
        return by_pos.pool(vals[step.args[0]], self.net.model.steps[step.args[0]].positions)

    def _forward_shift(self, step: Step, vals: list, params: dict, x: Tensor) -> Tensor:
        return by_pos.shift(vals[step.args[0]], step.offset, step.grid)

    def _forward_window(self, step: Step, vals: list, params: dict, x: Tensor) -> Tensor:
        return by_pos.window(vals[step.args[0]], self.net.model.steps[step.args[0]].grid, step.window)

    def _forward_attend(self, step: Step, vals: list, params: dict, x: Tensor) -> Tensor:
        q, k, v = (vals[i] for i in step.args)
        P, (H, scale) = step.positions, self.heads(step)  # noqa: N806
        return by_pos.attend(by_pos.weights(q, k, P, self.space.gram, scale, H), v, P, H)

    def _forward_matmul(self, step: Step, vals: list, params: dict, x: Tensor) -> Tensor:
        la = self.net.layers[step.layer]
        y = vals[step.args[0]]
        if la.role == "input":
            return y @ params[la.name]
        if la.flattens:  # V @ flatten(h): output j sums its rows' products at each position
            return by_pos.flat_readout(self.space.gram(y, params[la.name]), la.taps)
        if la.role == "readout":
            return self.space.gram(y, params[la.name])  # f = W x = (v . x) / n
        return self.hidden(la.name, params[la.name], y, step.transposed)

    def backward(self, applied: Applied, chi: Tensor, layers: tuple[str, ...]) -> list[Tensor | None]:
        """n dL/d(value) for every vector step and dL/d(value) for every scalar step (a moment, or a
        function of moments: one number per input), from chi = dL/df (..., B, k); each op's rule is
        `_backward_<op>` below (tpc/train/steps.py). Only down to the first step of the `layers` wanted:
        below it (fixed or frozen layers) nothing is needed, and each step through an n x n matrix
        there would cost Gaussians of its transpose in the limit."""
        steps, vals, params = self.net.model.steps, applied.vals, applied.params
        low = self.net.model.first_step_of(layers)
        grads: list[Tensor | None] = [None] * len(steps)

        def add(i: int, g: Tensor) -> None:
            if vals[i].shape[-2] == 1 and g.shape[-2] > 1:  # an unbatched vector (a bias) used by every row
                g = g.sum(-2, keepdim=True)
            grads[i] = g if grads[i] is None else grads[i] + g

        out = steps[-1]
        taps = self.net.layers[out.layer].taps  # a flattening readout: each position its own rows
        add(out.args[0], (chi if taps == 1 else by_pos.spread(chi, taps)) @ params[out.layer])  # sum_i chi_i v_i
        for i in range(len(steps) - 2, low - 1, -1):
            rule = STEPS[steps[i].op].backward
            if grads[i] is not None and rule is not None:
                rule(self, steps[i], vals, params, grads[i], add)
        return grads

    def _backward_matmul(self, step: Step, vals: list, params: dict, g: Tensor, add: Callable) -> None:
        la = self.net.layers[step.layer]
        if la.role == "hidden":  # an input layer's argument is data, a readout's backward is chi's
            add(step.args[0], self.hidden(la.name, params[la.name], g, not step.transposed))

    def _backward_moment(self, step: Step, vals: list, params: dict, g: Tensor, add: Callable) -> None:
        add(step.args[0], g.expand(vals[step.args[0]].shape))  # m = mean(a): n dL/da = dL/dm everywhere

    def _backward_pool(self, step: Step, vals: list, params: dict, g: Tensor, add: Callable) -> None:
        add(step.args[0], by_pos.pool_backward(g, self.net.model.steps[step.args[0]].positions))

    def _backward_shift(self, step: Step, vals: list, params: dict, g: Tensor, add: Callable) -> None:
        add(step.args[0], by_pos.shift_backward(g, step.offset, step.grid))

    def _backward_window(self, step: Step, vals: list, params: dict, g: Tensor, add: Callable) -> None:
        add(step.args[0], by_pos.window_backward(g, self.net.model.steps[step.args[0]].grid, step.window))

    def _backward_attend(self, step: Step, vals: list, params: dict, g: Tensor, add: Callable) -> None:
        q, k, v = (vals[i] for i in step.args)
        P, gram, (H, scale) = step.positions, self.space.gram, self.heads(step)  # noqa: N806
        a = by_pos.weights(q, k, P, gram, scale, H)
        for j, d in zip(step.args, by_pos.attend_backward(a, q, k, v, g, P, gram, scale, H), strict=True):
            add(j, d)

    def _backward_fn(self, step: Step, vals: list, params: dict, g: Tensor, add: Callable) -> None:
        """The tree T has dL/dT_i = H_i / n over the coordinates i, with H = g = n dL/dv for a vector
        and H = dL/dm for a number per input, so a vector argument a gets n dL/da = H dT/da and a
        number per input dL/da = mean_i(H dT/da)."""
        from tpc.backends.limit.evaluate import evaluate_tree

        steps = self.net.model.steps
        args = [vals[j] for j in step.args]
        for k, j in enumerate(step.args):
            if steps[j].kind not in ("vector", "scalar"):
                continue
            d = derivative(step.tree, k)
            if not ex.args_used(d):
                dh = float(evaluate_tree(d, [torch.zeros(())] * len(args))) * g
            else:
                dh = self.space.fn(ex.Apply("mul", (d, ex.Arg(len(args)))), args + [g])
            if steps[j].kind == "scalar" and step.kind == "vector":
                dh = self.space.mean(dh)
            add(j, dh)

    def grad(self, loss: Tensor, applied: list[Applied], layers: tuple[str, ...]) -> dict[str, object]:
        chis = torch.autograd.grad(loss.sum(), [a.F for a in applied], allow_unused=True, retain_graph=True)
        out: dict[str, object] = {}

        def put(name: str, value: object) -> None:
            out[name] = value if name not in out else self.add(out[name], value)

        for a, chi in zip(applied, chis, strict=True):
            if chi is None:
                continue
            chi = chi.detach()
            grads = self.backward(a, chi, layers)
            for i, step in enumerate(self.net.model.steps):
                if step.layer not in layers or grads[i] is None and step.kind == "vector":
                    continue
                if step.op == "bias":
                    put(step.layer, grads[i].sum(-2))
                if step.op != "matmul":
                    continue
                la, y = self.net.layers[step.layer], a.vals[step.args[0]]
                if la.role == "input":
                    put(la.name, y.transpose(-1, -2) @ grads[i])
                elif la.role == "readout":
                    put(la.name, (chi if la.taps == 1 else by_pos.spread(chi, la.taps)).transpose(-1, -2) @ y)
                elif step.transposed:  # h = W.T y: dL/dW = y dh^T, W.T's stored rows the other way round
                    put(la.name, self.stored(la.name, grads[i], y))
                else:
                    put(la.name, self.stored(la.name, y, grads[i]))
        for name in layers:  # a layer the loss does not reach (behind a step function) has gradient zero
            if name not in out:
                value = applied[0].params[name]
                out[name] = (Pooled(0.0, torch.zeros((*self.lead_shape, 0), dtype=self.dtype))
                             if isinstance(value, Pooled) else self.scale(value, 0.0))
        return out

    def compact(self, live: list[tuple[str, object]]) -> Callable[[str, object], object] | None:
        """Drop the pool rows that no live value uses (a MAML task's copy dies with its inner steps'
        rows); returns how to renumber a value's coefficients, or None when there is little to gain."""
        total = sum(int(x.shape[-2]) for x, _ in self.pool.values())
        if total < 2 * self.kept + 64:
            return None
        used = {name: torch.zeros(int(x.shape[-2]), dtype=torch.bool) for name, (x, _) in self.pool.items()}
        for name, v in live:
            if isinstance(v, Pooled) and v.coef.shape[-1]:
                p = v.coef.shape[-1]
                used[name][:p] |= (v.coef != 0).reshape(-1, p).any(0)
        keep = {name: torch.nonzero(u).reshape(-1) for name, u in used.items()}
        self.pool = {name: (x[..., keep[name], :], d[..., keep[name], :]) for name, (x, d) in self.pool.items()}
        self.kept = sum(len(k) for k in keep.values())

        def remap(name: str, v: object) -> object:
            if not isinstance(v, Pooled) or name not in keep:
                return v
            k = keep[name]
            return Pooled(v.a0, v.coef[..., k[k < v.coef.shape[-1]]], v.grid)

        return remap

    def stored(self, name: str, x: Tensor, dh: Tensor) -> Pooled:
        """Append rows (x, dh) to the layer's pool: the direction sum_b dh_b x_b^T / n."""
        old = self.pool.get(name)
        xs, ds = (x, dh) if old is None else (torch.cat([old[0], x], dim=-2), torch.cat([old[1], dh], dim=-2))
        self.pool[name] = (xs, ds)
        p, b = xs.shape[-2], x.shape[-2]
        coef = torch.zeros((*self.lead_shape, p), dtype=self.dtype)
        coef[..., p - b:] = 1.0
        return Pooled(0.0, coef)

    def feature_gram(self, applied: Applied) -> Tensor:
        feats = applied.vals[self.net.model.features]  # over positions for V @ flatten(h): their mean
        return by_pos.mean_over_positions(self.space.gram(feats, feats), self.net.readout().taps)

    def init_kernel(self, kind: str, data: str, params: dict[str, object]) -> Tensor:
        """nngp(f, X) or ntk(f, X) at initialisation: at width n the seeds' empirical kernels (the
        dense network's, whose initial weights are this program's), in the limit the closed forms of
        the model lowered to a Netsor program (init_kernels.py)."""
        from tpc.train.init_kernels import limit_kernels

        if isinstance(self.space, FiniteSpace):
            from tpc.train.dense import DenseBackend

            sp = self.space
            dense = DenseBackend(self.net, sp.n, sp.seeds, sp.dtype, sp.device)
            return dense.init_kernel(kind, data, dense.initial())
        known = self.space.kernels.get((kind, data))  # loops_limit takes each once, for all replicates
        value = (known if known is not None else limit_kernels(self.net, [(kind, data)])[kind, data])[0]
        return torch.as_tensor(value, dtype=self.dtype)

    def feature_change(self, applied: Applied, before: Applied) -> Tensor:
        diff = applied.vals[self.net.model.features] - before.vals[self.net.model.features]
        sq = self.space.gram(diff[..., None, :], diff[..., None, :])[..., 0, 0]  # per row (and position)
        return torch.sqrt(torch.clamp(by_pos.mean_per_input(sq, self.net.readout().taps), min=0.0))


def run_pooled(net: Network, space: FiniteSpace | LimitSpace,
               progress: Callable[[int, int], None] | None = None) -> dict[str, Tensor]:
    backend = PooledBackend(net, space)
    with torch.enable_grad():  # losses are differentiated with respect to the finite outputs only
        return Interpreter(net, backend).run(progress)


def run_unrolled_finite(net: Network, width: int, seeds: int, dtype: str = "float64", device: str = "cpu",
                        first_seed: int = 0) -> dict[str, np.ndarray]:
    """The unrolled program at width n: equal to `dense.loops_finite` up to round-off."""
    space = FiniteSpace(net, width, list(range(first_seed, first_seed + seeds)), DTYPES[dtype], device)
    out = run_pooled(net, space)
    return {k: v.detach().to("cpu", torch.float64).numpy() for k, v in out.items()}


@dataclass
class Count:
    """What the unrolled limit of a program with loops will do, counted by running it at width 2."""

    gaussians: int  # independent Gaussian vectors (initial columns and rows, and one per row of W_0 y)
    stored_rows: int  # rows kept in the pools
    peak_rows: int  # the most rows of one forward pass
    plain_rows: int = 0  # rows multiplied by an initial n x n matrix W_0 (the forward pass, or W.T's backward)
    transposed_rows: int = 0  # ... by W_0.T (the backward pass, or a model's W.T forward)
    zdot: bool = False  # some matrix multiplies both ways (W_0 and W_0.T), so Zdot terms arise

    def memory_bytes(self, size: int) -> int:
        return 8 * size * (4 * self.gaussians + 2 * self.stored_rows + 8 * self.peak_rows)


class _CountingSpace(FiniteSpace):
    def __init__(self, net: Network) -> None:
        heads = [s.heads for s in net.model.steps]  # a width that attention's heads split
        super().__init__(net, math.lcm(2, *heads), [0], torch.float64, "cpu")
        self.rows = {False: 0, True: 0}
        self.peak = 0
        self.ways: dict[str, set[bool]] = {}  # each matrix's orientations

    def matmul(self, layer, rows: Tensor, transposed: bool) -> Tensor:  # noqa: ANN001
        self.rows[transposed] += int(np.prod(rows.shape[1:-1]))
        self.ways.setdefault(layer.name, set()).add(transposed)
        self.peak = max(self.peak, int(np.prod(rows.shape[1:-1])))
        return super().matmul(layer, rows, transposed)


def count(net: Network) -> Count:
    space = _CountingSpace(net)
    backend = PooledBackend(net, space)
    dry = Interpreter(net, backend)
    dry.checks = False
    with torch.enable_grad():
        dry.run()
    initial = sum(int(la.cols if la.role == "input" else la.weight_rows if la.role == "readout" else 1)
                  for la in net.layers.values() if la.role != "hidden")
    stored = sum(int(x.shape[-2]) for x, _ in backend.pool.values())
    return Count(initial + space.rows[False] + space.rows[True], stored, space.peak, space.rows[False],
                 space.rows[True], any(len(ways) == 2 for ways in space.ways.values()))


COUNTED = 5000  # loop iterations up to which `tpc check` counts the plan by a dry run
MAX_ITERATIONS = 100_000  # the limit keeps rows of every step: beyond this it is refused


KERNELS_ONLY = ("the model's kernels at initialisation (closed forms, quadrature, or Monte Carlo with standard "
                "errors where neither serves); nothing trains")


def kernels_only(net: Network) -> bool:
    """Every output is nngp(f, X) or ntk(f, X): the lowered program serves them, no particle runs."""
    from tpc.train.init_kernels import KERNEL_OUTPUTS

    return bool(net.outputs) and all(o.kind in KERNEL_OUTPUTS for o in net.outputs)


def describe_limit(net: Network, exact: bool, particles: int, replicates: int) -> str:
    if kernels_only(net):
        if net.program.iterations():
            return KERNELS_ONLY.replace("nothing trains", "every output is taken before training, so the loops "
                                        "do not run")
        return KERNELS_ONLY
    steps = net.program.iterations()
    if steps > COUNTED:
        return (f"the loops unrolled into a Netsor-transpose program over {steps} iterations (the plan is counted "
                f"when the limit runs, up to {MAX_ITERATIONS} iterations)")
    c = count(net)
    particles = particles_for(net, particles)
    how = ("exactly: every vector is a coefficient vector over the Gaussians (a linear model)" if exact else
           f"by Monte Carlo: {particles} particles x {replicates} replicates (standard errors across them)")
    g = grids(net)
    if g:
        how += (f"; entrywise updates of n x n layers as {particles} x {particles} grids over pairs of particles "
                f"(Tensor Programs IVb: for each particle, the mean over the others), up to {g} at once")
    zdot = ("; W.T after W (and W after W.T) gets its Zdot by Stein's lemma" if c.zdot
            else "; no n x n matrix is multiplied by its transpose, so no Zdot" if c.plain_rows or c.transposed_rows
            else "; no n x n matrix, so no Zdot")
    size = c.gaussians + 1 if exact else particles
    need = c.memory_bytes(size) + 8 * g * size * size
    return (f"the loops unrolled into a Netsor-transpose program: {c.gaussians} Gaussian vectors "
            f"({c.plain_rows} rows through initial n x n matrices, {c.transposed_rows} through their transposes), "
            f"{c.stored_rows} stored rows; expectations {how}{zdot}; about {need / 2**30:.2g} GB")




def loops_limit(net: Network, exact: bool, particles: int, replicates: int | None, seed: int,
                memory_gb: float | None, force: bool, progress: Callable[[int, int], None] | None,
                device: str = "cpu") -> dict:
    """Every output of a program with loops in the feature-learning limit: exact for linear models,
    else Monte Carlo replicates (independent particle sets) with standard errors across them."""
    from tpc import memory
    from tpc.backends import device as on_device
    from tpc.backends.limit.evaluate import LimitOutput
    from tpc.train.init_kernels import KERNEL_OUTPUTS, limit_kernels

    # the kernels at initialisation, by the lowered program where they need particles: those asked for
    options: dict[str, object] = {"seed": seed}
    if particles is not None:
        options["particles"] = particles
    if replicates is not None:
        options["replicates"] = replicates
    if kernels_only(net):  # the outputs do not depend on the loops, which no particle needs to run
        kernels = limit_kernels(net, [(o.kind, o.data) for o in net.outputs], **options)
        return {o.name: LimitOutput(*kernels[o.kind, o.data]) for o in net.outputs}
    steps = net.program.iterations()
    if steps > MAX_ITERATIONS:
        loop = next(i for i in net.program.walk() if i.op == "loop")
        raise TpcError(f"the limit unrolls every step and keeps what each stores: {steps} loop iterations are more "
                       f"than it takes ({MAX_ITERATIONS}); fewer steps", loop.span).locate(net.filename, net.source)
    c = count(net)
    size = c.gaussians + 1 if exact else particles_for(net, particles)
    g = grids(net)
    try:
        grid_note = f", {g} grids of {size} x {size}" if g else ""
        memory.require(c.memory_bytes(size) + 8 * g * size * size,
                       f"the unrolled limit ({c.gaussians} Gaussian vectors over {size} "
                       f"{'basis elements' if exact else 'particles'}{grid_note})", memory_gb, force, None,
                       hint="fewer particles or steps")
    except TpcError as err:
        raise err.locate(net.filename, net.source) from None
    kernels = limit_kernels(net, [(o.kind, o.data) for o in net.outputs if o.kind in KERNEL_OUTPUTS], **options)
    runs = []
    reps = 1 if exact else max(2, replicates or 4)
    steps = sum(net.program.instrs[i].attrs["trip"] for i in net.program.top if net.program.instrs[i].op == "loop")
    with on_device.on(device):
        for r in range(reps):
            def step_done(done: int, _total: int, r: int = r) -> None:
                if progress:
                    progress(r * steps + done, reps * steps)
            space = LimitSpace(net, exact, size, replicate_seed(seed, r))
            space.kernels = kernels
            runs.append(run_pooled(net, space, step_done))
    out = {}
    for o in net.outputs:
        stack = np.stack([r[o.name].detach().double().cpu().numpy() for r in runs])
        if (o.kind, o.data) in kernels:  # the lowered program's, the same in every replicate
            _, how, err = kernels[o.kind, o.data]
            out[o.name] = LimitOutput(stack[0], how, err)
        elif exact:
            out[o.name] = LimitOutput(stack[0], "exact")
        else:
            out[o.name] = LimitOutput(stack.mean(0), "monte-carlo", stack.std(0, ddof=1) / np.sqrt(len(runs)))
    return out
