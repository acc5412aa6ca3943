"""Finite width for training programs with loops: real weights in torch, gradients by autograd.

Values are the trained parameters w^l (W^l = n^-a_l w^l) with a leading seed axis, as in
`finite.py`; an update `P -= e` is literally w <- w - n^-c e, and a buffer holds what the program
says (dL/dw, w, sums of them). Nothing here knows an optimizer: this is the direct computation
that the unrolled program (`pooled.py`) must equal at the same width and seeds.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from tpc import memory
from tpc.backends.torch.run import DTYPES, FiniteResult
from tpc.ops import expr as ex
from tpc.train import positions as by_pos
from tpc.train.finite import forward, shape_of, standard_normals
from tpc.train.interp import Applied, Bundle, Interpreter, Rows, blame_steps, entrywise_args
from tpc.train.losses import _tree
from tpc.train.network import Network

Tensor = torch.Tensor


class DenseBackend:
    lead = 1

    def __init__(self, net: Network, width: int, seeds: list[int], dtype: torch.dtype, device: str) -> None:
        self.net, self.n, self.dtype, self.device = net, width, dtype, device
        self.seeds = seeds
        self.lead_shape = (len(seeds),)
        self.mult = {name: float(width ** (-net.ab(la)[0])) for name, la in net.layers.items()}
        self.decay = float(width ** (-net.abc.c))
        # an entrywise (adaptive) update moves w^l by n^-c'_l (parametrization.py)
        self.adaptive = {name: float(width ** -net.adaptive_exponent(la)) for name, la in net.layers.items()}
        self.natural_scale = {name: float(width ** net.natural_exponent(la)) for name, la in net.layers.items()}

    def initial(self) -> dict[str, Tensor]:
        normals = standard_normals(self.net, self.n, self.seeds, self.dtype, self.device)
        out = {}
        for name, la in self.net.layers.items():
            _, b = self.net.ab(la)
            out[name] = (normals[name] * float(np.sqrt(la.var / la.fan_in) * self.n ** (-b))).requires_grad_(True)
        return out

    def apply(self, params: dict[str, Tensor], rows: Rows) -> Applied:
        x = torch.as_tensor(rows.values, dtype=self.dtype, device=self.device)
        weights = {k: w if self.mult[k] == 1.0 else self.mult[k] * w for k, w in params.items()}  # W = n^-a w
        vals = forward(self.net, weights, x)
        return Applied(vals[-1], vals, params)

    def grad(self, loss: Tensor, applied: list[Applied], layers: tuple[str, ...]) -> dict[str, Tensor]:
        params = applied[0].params  # one version of the parameters (loops.py checks it)
        leaves = [params[la] for la in layers]
        grads = torch.autograd.grad(loss.sum(), leaves, allow_unused=True, retain_graph=True)
        return {la: torch.zeros_like(w) if g is None else g.detach()
                for la, w, g in zip(layers, leaves, grads, strict=True)}

    def scale(self, value: Tensor, c: Tensor | float) -> Tensor:
        if isinstance(c, Tensor):
            c = c.to(value.dtype).to(value.device)
            c = c.reshape(c.shape + (1,) * (value.dim() - c.dim()))
        elif c == 1.0:  # values are never changed in place, so sharing one is safe
            return value.detach()
        return value.detach() * c

    def add(self, a: Tensor, b: Tensor) -> Tensor:
        return a + b

    def update(self, params: dict[str, Tensor], delta: Bundle, layers: tuple[str, ...], sign: float,
               scaled: bool) -> dict[str, Tensor]:
        new = dict(params)
        with torch.no_grad():
            for la in layers:
                step = None
                factors = (self.decay, self.decay, self.adaptive[la]) if scaled else (1.0, 1.0, 1.0)
                for part, factor in zip(delta.parts(), factors, strict=True):
                    if la in part:
                        term = part[la] if factor == 1.0 or sign == 0.0 else part[la] * factor
                        step = term if step is None else step + term
                if sign == 0.0:  # P = e
                    value = step.clone() if step is not None else torch.zeros_like(params[la])
                elif step is None:
                    continue
                else:  # a new tensor: the old one may still be a copy's or a forward pass's
                    value = torch.add(params[la].detach(), step, alpha=sign)
                new[la] = value.requires_grad_(True)
        return new

    def natural(self, layer: str, grad: Tensor) -> Tensor:
        """dL/dw^l at its natural scale, n^s_l dL/dw^l (Network.natural_exponent)."""
        return grad * self.natural_scale[layer]

    def entrywise(self, tree: ex.Tree, args: list[tuple[bool, Tensor | None]], layer: str) -> Tensor:
        """An entrywise function of values of `layer` (True; None: zero) and numbers (False: one, or one
        per seed)."""
        shape = (len(self.seeds), *shape_of(self.net.layers[layer], self.n))
        return _tree(tree, entrywise_args(args, shape, self.dtype, self.device))

    def feature_gram(self, applied: Applied) -> Tensor:
        feats = applied.vals[self.net.model.features]  # over positions for V @ flatten(h): their mean
        return by_pos.mean_over_positions(feats @ feats.transpose(-1, -2) / self.n, self.net.readout().taps)

    def feature_change(self, applied: Applied, before: Applied) -> Tensor:
        diff = applied.vals[self.net.model.features] - before.vals[self.net.model.features]
        sq = (diff * diff).mean(-1)  # per row: per input, or per input and position (flatten)
        return torch.sqrt(by_pos.mean_per_input(sq, self.net.readout().taps))

    def init_kernel(self, kind: str, data: str, params: dict[str, Tensor]) -> Tensor:
        """Each seed's empirical nngp or ntk of the parameters `params` (init_kernels.py)."""
        from tpc.train.init_kernels import empirical

        weights = {k: self.mult[k] * w for k, w in params.items()}
        x = torch.as_tensor(self.net.data[data], dtype=self.dtype, device=self.device)
        return empirical(self.net, weights, x, kind, self.n)


def blame_initial(net: Network, X: np.ndarray, data: str, width: int = 64) -> None:  # noqa: N803
    """Where a limit's kernels came out not finite: raise at the model's first step that is not finite
    on X at a small width (seed 0), when there is one (a norm of a zero vector with eps = 0 is 0/0
    at every width)."""
    be = DenseBackend(net, width, [0], torch.float64, "cpu")
    with torch.no_grad():
        blame_steps(net, be.apply(be.initial(), Rows(X, data, np.arange(len(X)))).vals, data)


def bytes_per_seed(net: Network, width: int, itemsize: int) -> int:
    """The weights, each state's and copy's values, their gradients and temporaries (one set of weights
    per combination or entrywise function in a loop), and every model
    value on the largest data set (forward, backward and autograd's saved tensors): a value at every
    position (`model f(x[P])`) has P rows per input, and attention holds its P x P logits and weights."""
    weights = sum(int(np.prod(shape_of(la, width))) for la in net.layers.values())
    # a state or copy: its value, its next value while the old one is alive, and the update's term
    buffers = sum(1 for ins in net.program.walk() if ins.op in ("state", "copy"))
    # a step's values of layers (combinations, entrywise functions: Adam's G * G, sqrt(S), ...) and
    # gradients, each alive until the end of its iteration
    temporaries = sum(1 for ins in net.program.walk() if ins.op in ("lincomb", "ewise", "grad"))
    rows = max((net.data[d].shape[0] for d in net.point_sets()), default=1)
    values = sum(s.positions * width + (2 * s.positions**2 if s.op == "attend" else 0) for s in net.model.steps)
    # 5: the weights, their scaled copies W = n^-a w, autograd's gradients and the updated weights;
    # measured peaks at width 4096 (README, "Memory") are 5.0 and 16.0 times the weights for
    # relu2_mup.tp and adam_relu2_mup.tp (a reviewer's AdamW transformer: about 16.7), which this
    # puts at 6, 19 and 18
    return itemsize * ((5 + 3 * buffers + temporaries) * weights + 4 * rows * values)


def loops_finite(net: Network, width: int, seeds: int, dtype: str = "float64", device: str = "cpu",
                 first_seed: int = 0, memory_gb: float | None = None, force: bool = False,
                 progress: Callable[[int], None] | None = None,
                 on_step: Callable[[int, int], None] | None = None) -> dict[str, FiniteResult]:
    """Every output of a program with loops at width `width`, for seeds first_seed, ...."""
    tdtype = DTYPES[dtype]
    chunk = memory.seeds_at_once(bytes_per_seed(net, width, torch.finfo(tdtype).bits // 8), seeds,
                                 f"one seed at width {width}", memory_gb, force, net.filename, net.source)
    parts: dict[str, list[np.ndarray]] = {o.name: [] for o in net.outputs}
    done = 0
    while done < seeds:
        ids = list(range(first_seed + done, first_seed + min(seeds, done + chunk)))
        out = Interpreter(net, DenseBackend(net, width, ids, tdtype, device)).run(on_step)
        for k, v in out.items():
            arr = v.detach().to("cpu", torch.float64).numpy()
            parts[k].append(arr)
        done += len(ids)
        if progress:
            progress(len(ids))
    return {k: FiniteResult(k, np.concatenate(v), width) for k, v in parts.items()}
