"""The kernel regime (r > 0) of a training program with loops: function space, as TP4's Dynamical
Dichotomy says (Yang & Hu 2021, Theorem 3.11): the features stay at initialisation, and a gradient
step on layer l moves the outputs everywhere by that layer's kernel against dL/df,
    f <- f - c Theta_l(., R) chi,    chi = dL/df(R),
with Theta_l the layer's NTK term times the power of n its update carries (`kernel.layer_kernels`).
Every value the loop keeps for a layer (the layer itself, a momentum buffer, a copy) is its effect
on f at all the points the program uses, a (P, k) array; f_0 is the Gaussian process with the
NNGP kernel.

f_0 enters through samples. Where every loss is squared error and every coefficient is fixed
before training, everything is affine in f_0, and each output is a polynomial of degree <= 2 in
it: then the samples are the 2D points +-sqrt(D) e_i of a degree-3 cubature rule for N(0, I_D),
D = P k, and means and covariances are exact. Otherwise f_0 is sampled (Monte Carlo, with
standard errors).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tpc.backends.limit.evaluate import LimitOutput
from tpc.backends.limit.expect import psd_factor
from tpc.errors import TpcError
from tpc.parametrization import limit_of_power
from tpc.train.interp import Applied, Bundle, Interpreter, Rows
from tpc.train.kernel import LayerKernels, layer_kernels
from tpc.train.network import Network

Tensor = torch.Tensor


class KernelBackend:
    lead = 1  # the samples of f_0

    def __init__(self, net: Network, K: LayerKernels, f0: Tensor) -> None:  # noqa: N803
        self.net, self.K, self.f0 = net, K, f0
        self.dtype = torch.float64
        self.lead_shape = (f0.shape[0],)
        self.theta = {name: torch.as_tensor(t) for name, t in K.theta.items()}

    def points(self, rows: Rows) -> np.ndarray:
        return self.K.points[rows.source].start + np.asarray(rows.idx)

    def initial(self) -> dict[str, Tensor]:
        return {name: torch.zeros_like(self.f0) for name in self.net.layers}

    def apply(self, params: dict[str, Tensor], rows: Rows) -> Applied:
        pts = torch.as_tensor(self.points(rows))
        F = self.f0[:, pts]  # noqa: N806
        for value in params.values():
            F = F + value[:, pts]  # noqa: N806
        return Applied(F.detach().requires_grad_(True), [pts], params)

    def grad(self, loss: Tensor, applied: list[Applied], layers: tuple[str, ...]) -> dict[str, Tensor]:
        chis = torch.autograd.grad(loss.sum(), [a.F for a in applied], allow_unused=True, retain_graph=True)
        out = {name: torch.zeros_like(self.f0) for name in layers}
        for a, chi in zip(applied, chis, strict=True):
            if chi is None:
                continue
            for name in layers:  # the direction that a unit step on this layer moves f in
                out[name] = out[name] + torch.einsum("pb,sbk->spk", self.theta[name][:, a.vals[0]], chi.detach())
        return out

    def scale(self, value: Tensor, c: Tensor | float) -> Tensor:
        if isinstance(c, Tensor):
            c = c.reshape(c.shape + (1,) * (value.dim() - c.dim()))
        return value * c

    def add(self, a: Tensor, b: Tensor) -> Tensor:
        return a + b

    def update(self, params: dict[str, Any], delta: Bundle, layers: tuple[str, ...], sign: float,
               scaled: bool) -> dict[str, Any]:
        new = dict(params)
        for la in layers:
            if la in delta.grad:
                new[la] = new[la] + sign * delta.grad[la]
        return new  # parameter terms vanish in the limit here (refused before running otherwise)

    def feature_gram(self, applied: Applied) -> Tensor:
        pts = applied.vals[0].numpy()
        return torch.as_tensor(self.K.features[np.ix_(pts, pts)])

    def feature_change(self, applied: Applied, before: Applied) -> Tensor:
        return torch.zeros(len(applied.vals[0]), dtype=torch.float64)  # the features do not move


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


def affine_in_f0(net: Network) -> bool:
    """Squared-error losses only and coefficients fixed before training: f_t is affine in f_0."""
    prog = net.program
    for ins in prog.walk():
        if ins.op == "loss" and ins.attrs["loss"] != "mse":
            return False
        if ins.op == "named_loss" and net.losses[ins.attrs["loss"]].kind != "mse":
            return False
        if ins.op in ("fn", "reduce") and not ins.static:
            return False
        if ins.op in ("lincomb", "state", "update") and any(not prog.instrs[c].static
                                                             for _, cs, _ in ins.attrs["terms"] for c in cs):
            return False
    return all(net.losses[o.loss].kind == "mse" for o in net.outputs if o.kind == "loss")


def loops_kernel_limit(net: Network, samples: int = 2**14, seed: int = 0,
                       **limit_options: object) -> dict[str, LimitOutput]:
    check_kernel_program(net)
    K = layer_kernels(net, net.point_sets(), **limit_options)  # noqa: N806
    k = net.output_dim()
    P = K.nngp.shape[0]  # noqa: N806
    exact = affine_in_f0(net)
    if exact:
        # the degree-3 cubature points +-sqrt(D) e_i of N(0, I_D), D = P k
        root = psd_factor(torch.as_tensor(K.nngp))  # (P, P)
        D = P * k  # noqa: N806
        basis = np.sqrt(D) * torch.einsum("pi,oj->iopj", root, torch.eye(k, dtype=torch.float64)).reshape(D, P, k)
        f0 = torch.cat([basis, -basis])
    else:
        if any(ins.op == "copy" for ins in net.program.walk()):
            samples = min(samples, 512)  # per-task records (MAML) are kept per sample, for accuracies
        rng = np.random.default_rng(seed)
        w, v = np.linalg.eigh(K.nngp)
        f0 = torch.as_tensor((v * np.sqrt(np.clip(w, 0, None))) @ rng.standard_normal((samples, P, k)))
    with torch.enable_grad():
        out = Interpreter(net, KernelBackend(net, K, f0)).run()
    method = K.method if exact or "monte-carlo" in K.method else K.method + "+monte-carlo"
    results: dict[str, LimitOutput] = {}
    for o in net.outputs:
        v = out[o.name].detach().numpy()
        if o.kind == "features":
            results[o.name] = LimitOutput(v, K.method)
            continue
        if o.kind == "feature_change":
            results[o.name] = LimitOutput(v, "exact")
            continue
        mean = v.mean(0)
        err = None if exact else v.std(0, ddof=1) / np.sqrt(v.shape[0])
        cov = None
        if o.kind == "predict":
            flat = (v - mean).reshape(v.shape[0], -1)
            cov = (flat.T @ flat / (v.shape[0] - (0 if exact else 1))).reshape(*mean.shape, *mean.shape)
        kept = v if o.kind == "record" and not exact else None  # draws of f_0's outcomes (accuracies need them)
        results[o.name] = LimitOutput(mean, method, err, cov, random=True, samples=kept)
    return results
