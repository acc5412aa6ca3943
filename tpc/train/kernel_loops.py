"""The kernel regime (r > 0) of a training program with loops: function space, as TP4's Dynamical
Dichotomy says (Yang & Hu 2021, Theorem 3.11): the features stay at initialisation, and a gradient
step on layer l moves the outputs everywhere by that layer's kernel against dL/df,
    f <- f - c Theta_l(., R) chi,    chi = dL/df(R),
with Theta_l the layer's NTK term times the power of n its update carries (`kernel.layer_kernels`).
Every value the loop keeps for a layer (the layer itself, a momentum buffer, a copy) is its effect
on f at all the points the program uses, a (P, k) array; f_0 is the Gaussian process with the
NNGP kernel.

f_0 enters through samples. Where every loss that is differentiated is of degree <= 2 in f and
every coefficient is fixed before training, everything is affine in f_0 (`affine_in_f0`): then the
samples are the 2D points +-sqrt(D) e_i of a degree-3 cubature rule for N(0, I_D), D = P k, which
gives the predictions' means and covariances and the means of losses and records of degree <= 3
exactly. Otherwise f_0 is sampled (Monte Carlo, with standard errors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tpc.backends.limit.evaluate import LimitOutput
from tpc.errors import TpcError
from tpc.ops import expr as ex
from tpc.parametrization import limit_of_power
from tpc.train.interp import Applied, Bundle, Interpreter, Rows
from tpc.train.kernel import LayerKernels, layer_kernels
from tpc.train.loops import Instr, TrainProgram
from tpc.train.network import Network

Tensor = torch.Tensor


MAX_ROWS = 256  # an Effect keeps at most this many rows of gradients lazily before it is summed up


@dataclass(frozen=True)
class Effect:
    """How a layer's value moves f at every point, kept lazily: a dense part (S, P, k) plus blocks
    (coefficient, rows R, chi at R) each meaning `coefficient * Theta_l(., R) chi`. A gradient is one
    block; a MAML task's copy adds a few to a shared dense part, so a step costs its rows, not P."""

    layer: str
    base: Tensor | None = None
    blocks: tuple[tuple[Tensor | float, Tensor, Tensor], ...] = ()

    @property
    def rows(self) -> int:
        return sum(len(r) for _, r, _ in self.blocks)


class KernelBackend:
    lead = 1  # the samples of f_0

    def __init__(self, net: Network, K: LayerKernels, f0: Tensor,  # noqa: N803
                 thetas: list[dict[str, np.ndarray]] | None = None) -> None:
        """`thetas`: training from several sets of kernels at once (Monte Carlo replicates), one per
        equal group of f_0's samples; by default K's."""
        self.net, self.K, self.f0 = net, K, f0
        self.dtype = torch.float64
        self.lead_shape = (f0.shape[0],)
        sets = thetas or [K.theta]
        # per layer (G, P, P): group g of the samples trains with kernels sets[g]
        self.theta = {name: torch.as_tensor(np.stack([t[name] for t in sets])) for name in K.theta}
        self.groups = len(sets)

    def points(self, rows: Rows) -> Tensor:
        return torch.as_tensor(self.K.points[rows.source].start + np.asarray(rows.idx))

    def initial(self) -> dict[str, Effect]:
        return {name: Effect(name) for name in self.net.layers}

    def at(self, e: Effect, pts: Tensor | None) -> Tensor | None:
        """The move of f at the points `pts` (all of them for None): (S, |pts|, k)."""
        out = None if e.base is None else (e.base if pts is None else e.base[:, pts])
        if e.blocks:  # one product over every block's rows
            rows = torch.cat([r for _, r, _ in e.blocks])
            chi = torch.cat([self.scale(chi, c) for c, _, chi in e.blocks], dim=1)  # (S, R, k)
            theta = self.theta[e.layer][:, :, rows] if pts is None else self.theta[e.layer][:, pts][:, :, rows]
            g = self.groups  # (G, P', R) @ (G, S/G, R, k) -> (S, P', k)
            term = torch.matmul(theta[:, None], chi.reshape(g, chi.shape[0] // g, *chi.shape[1:])).reshape(
                chi.shape[0], theta.shape[1], chi.shape[2])
            out = term if out is None else out + term
        return out

    def apply(self, params: dict[str, Effect], rows: Rows) -> Applied:
        pts = self.points(rows)
        F = self.f0[:, pts]  # noqa: N806
        for value in params.values():
            move = self.at(value, pts)
            if move is not None:
                F = F + move  # noqa: N806
        return Applied(F.detach().requires_grad_(True), [pts], params)

    def grad(self, loss: Tensor, applied: list[Applied], layers: tuple[str, ...]) -> dict[str, Effect]:
        chis = torch.autograd.grad(loss.sum(), [a.F for a in applied], allow_unused=True, retain_graph=True)
        blocks = tuple((1.0, a.vals[0], chi.detach()) for a, chi in zip(applied, chis, strict=True) if chi is not None)
        return {name: Effect(name, None, blocks) for name in layers}  # a unit step on a layer moves f by these

    def scale(self, value: Any, c: Tensor | float) -> Any:
        if isinstance(value, Effect):
            return Effect(value.layer, None if value.base is None else self.scale(value.base, c),
                          tuple((k * c, r, chi) for k, r, chi in value.blocks))
        if isinstance(c, Tensor):
            c = c.reshape(c.shape + (1,) * (value.dim() - c.dim()))
        return value * c

    def add(self, a: Effect, b: Effect) -> Effect:
        base = a.base if b.base is None else b.base if a.base is None else a.base + b.base
        out = Effect(a.layer, base, a.blocks + b.blocks)
        if out.rows > MAX_ROWS:  # sum the blocks into the dense part
            out = Effect(a.layer, self.at(out, None))
        return out

    def update(self, params: dict[str, Any], delta: Bundle, layers: tuple[str, ...], sign: float,
               scaled: bool) -> dict[str, Any]:
        new = dict(params)
        for la in layers:
            if la in delta.grad:
                new[la] = self.add(new[la], self.scale(delta.grad[la], sign))
        return new  # parameter terms vanish in the limit here (refused before running otherwise)

    def feature_gram(self, applied: Applied) -> Tensor:
        pts = applied.vals[0].numpy()
        return torch.as_tensor(self.K.features[np.ix_(pts, pts)])

    def feature_change(self, applied: Applied, before: Applied) -> Tensor:
        return torch.zeros(len(applied.vals[0]), dtype=torch.float64)  # the features do not move

    def init_kernel(self, kind: str, data: str, params: dict[str, Effect]) -> Tensor:
        """nngp(f, X) or ntk(f, X): the kernels this regime already has (without the rate)."""
        pts = np.arange(self.K.points[data].start, self.K.points[data].stop)
        value = self.K.nngp if kind == "nngp" else self.K.ntk
        return torch.as_tensor(value[np.ix_(pts, pts)])


def check_kernel_program(net: Network) -> None:
    """Refuse, before anything runs, what the kernel regime does not cover."""
    c = net.abc.c
    for ins in net.program.walk():
        if ins.op == "update" and ins.attrs["what"] != "state" and "weight" in ins.attrs.get("types", ()):
            vanishes = ins.attrs["scaled"] and limit_of_power(-c) == 0.0
            if not vanishes:
                raise TpcError(f"in the kernel regime ({net.param_name}), a term with the parameters themselves "
                               f"(weight decay, P = ...) changes them by order one (c = {c:g}) and moves the "
                               "features: TP4's Dynamical Dichotomy does not cover it", ins.span
                               ).locate(net.filename, net.source)


def degrees_in_f0(net: Network) -> dict[int, float]:
    """Each finite value's degree as a polynomial in f_0, where the parameters' effects on f are affine
    in it (inf: not a polynomial, or not known to be one). The model on data is degree 1, a number
    computed from counters and data 0, squared error 2; sums, products, quotients by a degree-0 value
    and whole powers follow the algebra; any other function of a value of f is inf."""
    prog = net.program
    deg: dict[int, float] = {}
    inf = float("inf")
    for ins in prog.walk():
        args = [deg.get(a, inf) for a in ins.args]
        if ins.static:
            d = 0.0
        elif ins.op == "apply":
            d = 1.0
        elif ins.op == "loss":
            d = 2 * args[0] if ins.attrs["loss"] == "mse" else inf
        elif ins.op == "named_loss":
            loss = net.losses[ins.attrs["loss"]]
            d = 2.0 if loss.kind == "mse" else _tree_degree(loss.tree) if loss.tree is not None else inf
        elif ins.op == "reduce":
            d = args[0]
        elif ins.op == "fn":
            d = _fn_degree(prog, ins, args)
        else:
            continue
        deg[ins.id] = d
    return deg


def _fn_degree(prog: TrainProgram, ins: Instr, args: list[float]) -> float:
    exponent = prog.instrs[ins.args[1]] if ins.attrs["fn"] == "pow" else None
    power = exponent.attrs.get("value") if exponent is not None and exponent.op == "const" else None
    return _degree(ins.attrs["fn"], args, power)


def _tree_degree(tree: ex.Tree) -> float:
    """A top-level loss's degree in f: Arg(0) is f(X), the other arguments data (degree 0)."""
    if isinstance(tree, ex.Arg):
        return 1.0 if tree.index == 0 else 0.0
    if isinstance(tree, ex.Const):
        return 0.0
    if tree.fn in ("mean_all", "sum_all"):
        return _tree_degree(tree.args[0])
    power = tree.args[1].value if tree.fn == "pow" and isinstance(tree.args[1], ex.Const) else None
    return _degree(tree.fn, [_tree_degree(a) for a in tree.args], power)


def _degree(fn: str, args: list[float], power: float | None) -> float:
    """The degree of fn(args) from its arguments' degrees; `power`: a whole power's exponent."""
    inf = float("inf")
    if fn in ("add", "sub"):
        return max(args)
    if fn in ("neg", "identity"):
        return args[0]
    if fn == "mul":
        return sum(args)
    if fn == "div":
        return args[0] if args[1] == 0 else inf
    if fn == "pow":
        if power is None or power < 0 or power != int(power):
            return inf
        return args[0] * power if power else 0.0
    return inf  # another function of a value of f (min, exp, ...): no polynomial


def affine_in_f0(net: Network) -> bool:
    """f_t is affine in f_0 where every loss that is differentiated is of degree <= 2 in f (squared
    error, mean(f(X)^2), ...) and every update's coefficients are fixed before training; and the
    degree-3 cubature rule is then exact for what is reported: predictions (affine: means and
    covariances) and losses and records of degree <= 3 (means)."""
    prog = net.program
    deg = degrees_in_f0(net)
    inf = float("inf")
    for ins in prog.walk():
        if ins.op == "grad" and deg.get(ins.args[0], inf) > 2:
            return False
        if ins.op == "record" and deg.get(ins.args[0], inf) > 3:
            return False
        if ins.op in ("lincomb", "state", "update") and any(not prog.instrs[c].static
                                                             for _, cs, _ in ins.attrs["terms"] for c in cs):
            return False
    return all(net.losses[o.loss].kind == "mse" for o in net.outputs if o.kind == "loss")


def loops_kernel_limit(net: Network, samples: int = 2**14, seed: int = 0, keep_replicates: bool = True,
                       **limit_options: object) -> dict[str, LimitOutput]:
    """The loops in function space. `keep_replicates`: where Monte Carlo serves the kernels, train from
    each replicate's too, so that the outputs' standard errors include the kernels' (tpc limit does
    where its memory budget allows)."""
    check_kernel_program(net)
    # the layers' terms only where something trains or the ntk is an output (else no backward pass)
    ntk = net.program.iterations() > 0 or any(o.kind == "ntk" for o in net.outputs)
    K = layer_kernels(net, net.point_sets(), ntk, seed=seed, keep_replicates=keep_replicates,  # noqa: N806
                      **limit_options)
    exact = affine_in_f0(net)
    if not exact and any(ins.op == "copy" for ins in net.program.walk()):
        samples = min(samples, 512)  # per-task records (MAML) are kept per sample, for accuracies
    out = _train(net, K, [K.theta], [K.nngp], exact, samples, seed)[0]
    spread = _replicate_means(net, K, exact, samples, seed)
    method = K.method if exact or "monte-carlo" in K.method else K.method + "+monte-carlo"
    # f_0 is random unless its readout starts at a vanishing scale (muP's n^-1: random features in muP)
    random = bool(np.any(K.nngp != 0))
    results: dict[str, LimitOutput] = {}
    for o in net.outputs:
        v = out[o.name]
        if o.kind in ("features", "nngp", "ntk"):
            results[o.name] = LimitOutput(v, K.methods.get(o.kind, K.method),
                                          K.stderr(o.kind, o.data) if o.data else None)
            continue
        if o.kind == "feature_change":
            results[o.name] = LimitOutput(v, "exact")
            continue
        mean = v.mean(0)
        err = None if exact else v.std(0, ddof=1) / np.sqrt(v.shape[0])
        if spread:
            kernel_err = np.stack([m[o.name] for m in spread]).std(0, ddof=1) / np.sqrt(len(spread))
            err = kernel_err if err is None else np.sqrt(err**2 + kernel_err**2)
        cov = None
        if o.kind == "predict" and random:
            flat = (v - mean).reshape(v.shape[0], -1)
            cov = (flat.T @ flat / (v.shape[0] - (0 if exact else 1))).reshape(*mean.shape, *mean.shape)
        kept = v if o.kind == "record" and not exact else None  # draws of f_0's outcomes (accuracies need them)
        results[o.name] = LimitOutput(mean, method, err, cov, random=random, samples=kept)
    return results


# the outputs with no axis of f_0's samples: kernels at initialisation, the (zero) feature change
UNSAMPLED = ("features", "nngp", "ntk", "feature_change")
# the samples of f_0 that the memory estimate (limit.kernel_regime_memory) allows one training
SAMPLES_BUDGET = 2**14


def _replicate_means(net: Network, K: LayerKernels, exact: bool, samples: int,  # noqa: N803
                     seed: int) -> list[dict[str, np.ndarray]]:
    """Where Monte Carlo served the kernels: the mean of every output when training from each replicate's
    kernels, with the same draws of f_0's normals (the exact rule's cubature, or the first of the
    samples), several replicates in one run as far as the samples' budget goes. Their spread is the
    error the kernels carry into the outputs."""
    if not K.replicas:
        return []
    # the exact rule's 2 P k points; or common draws of f_0, so that the spread is the kernels', not f_0's
    per = max(1, 2 * K.nngp.shape[0] * net.output_dim()) if exact else min(samples, 2048)
    chunk = max(1, SAMPLES_BUDGET // per)
    means: list[dict[str, np.ndarray]] = []
    for start in range(0, len(K.replicas), chunk):
        part = K.replicas[start:start + chunk]
        for out in _train(net, K, [t for t, _ in part], [n for _, n in part], exact, per, seed):
            means.append({o.name: out[o.name].mean(0) for o in net.outputs if o.kind not in UNSAMPLED})
    return means


def _train(net: Network, K: LayerKernels, thetas: list[dict[str, np.ndarray]], nngps: list[np.ndarray],  # noqa: N803
           exact: bool, samples: int, seed: int) -> list[dict[str, np.ndarray]]:
    """The loops in function space, once per set of kernels (thetas[g], nngps[g]) in one run: every
    output, one row per point (or draw) of f_0."""
    f0 = torch.cat([_initial_functions(nngp, net.output_dim(), exact, samples, seed) for nngp in nngps])
    with torch.enable_grad():
        out = Interpreter(net, KernelBackend(net, K, f0, thetas)).run()
    groups = len(thetas)
    values = {o.name: out[o.name].detach().numpy() for o in net.outputs}
    per = f0.shape[0] // groups  # each group's samples, in turn (an array of no points has size 0)
    return [{o.name: values[o.name] if o.kind in UNSAMPLED else  # one value for every group
             values[o.name][g * per:(g + 1) * per] for o in net.outputs} for g in range(groups)]


def _initial_functions(nngp: np.ndarray, k: int, exact: bool, samples: int, seed: int) -> Tensor:
    """Points (or draws) of f_0 ~ N(0, nngp x I_k): (S, P, k)."""
    P = nngp.shape[0]  # noqa: N806
    w, v = np.linalg.eigh(nngp)
    # a root of the NNGP that Monte Carlo kernels (few particles) left slightly indefinite: its PSD part
    root = v * np.sqrt(np.clip(w, 0, None))  # (P, P)
    if not exact:
        return torch.as_tensor(root @ np.random.default_rng(seed).standard_normal((samples, P, k)))
    # the degree-3 cubature points +-sqrt(D) e_i of N(0, I_D), D = P k
    D = P * k  # noqa: N806
    # basis[(i, o), p, j] = root[p, i] [o == j], filled in place: an identity k x k beside it would
    # take k^2 memory that no estimate counts (the fuzz found a 65536-row readout over no data: 34 GB)
    basis = torch.zeros((P, k, P, k), dtype=torch.float64)
    basis[:, torch.arange(k), :, torch.arange(k)] = torch.as_tensor(root).T.expand(k, P, P)
    basis = np.sqrt(D) * basis.reshape(D, P, k)
    return torch.cat([basis, -basis]) if D else torch.zeros((1, P, k), dtype=torch.float64)  # no points: f_0 = {}
