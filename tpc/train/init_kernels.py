"""`nngp(f, X)` and `ntk(f, X)`: the kernels of a network program's model at initialisation.

Both are per output (the limit kernels are the identity over the model's k outputs):
    nngp(x, x') = E[f_j(x) f_j(x')] over the readout's initial weights given the features: as a raw
                  program's cov(f), var_V n^-2(a+b) (x^L . x^L') for the readout layer V,
    ntk(x, x')  = sum_l n^-c <df(x)/dw^l, df(x')/dw^l>, averaged over the k outputs,
the tangent kernel in the program's own parametrization (TP4: W^l = n^-a_l w^l, and SGD moves w^l
by lr n^-c dL/dw^l, so `ntk` is the function-space effect of one unit-rate step). At finite width
they are one seed's empirical kernels; in the limit, `kernel.layer_kernels` (the model lowered to a
Netsor program with its backward pass: closed forms, quadrature, or Monte Carlo with standard
errors where neither serves), whose terms carry the same powers of n, each 1 or 0.

The empirical NTK never forms a Jacobian: a layer applied as h_u = W y_u at its uses u has
<df(x)/dW, df(x')/dW> = sum_{u,w} (delta_u(x) . delta_w(x')) (y_u(x) . y_w(x')), delta = df/dh,
and the deltas of every input come from one backward pass per output (inputs never mix: a
model's moments are per input).
"""

from __future__ import annotations

import numpy as np
import torch

from tpc.train.network import Network

Tensor = torch.Tensor
KERNEL_OUTPUTS = ("nngp", "ntk")


def empirical(net: Network, weights: dict[str, Tensor], x: Tensor, kind: str, width: int) -> Tensor:
    """One kernel per seed, (S, B, B); `weights` are the W^l = n^-a_l w^l, (S, *shape)."""
    from tpc.train.steps import STEPS

    with torch.enable_grad():
        # the weights join the graph so that every layer's output is in it (their own gradients are
        # never asked for)
        w = {k: v.detach().requires_grad_(True) for k, v in weights.items()}
        vals: list[Tensor] = []
        rows = x.shape[0]
        for step in net.model.steps:
            v = STEPS[step.op].finite(step, vals, w, x, net)
            if step.op == "bias":  # one copy per input (and position), so its gradient is per input
                v = v.expand(v.shape[0], rows * step.positions, v.shape[-1]).clone()
            vals.append(v)
        out = vals[-1]  # (S, B, k)
        k = out.shape[-1]
        # x . x' of the features the readout reads (summed over positions for V @ flatten(h))
        feats = _per_input(vals[net.model.features], rows)
        feats_gram = torch.einsum("sbpi,scpi->sbc", feats, feats)
        if kind == "nngp":
            # the readout's weights integrated out (as a raw program's cov(f)): a seed's value converges
            # to the limit, where f(X) f(X).T / k itself stays random
            readout = net.readout()
            scale = readout.var / readout.fan_in * float(width ** (-2 * net.init_exponent(readout)))
            return (scale * feats_gram).detach()
        c = net.abc.c
        factor = {name: float(width ** (-c - 2 * net.ab(la)[0])) for name, la in net.layers.items()}
        total = factor[net.readout().name] * feats_gram
        uses = [i for i, s in enumerate(net.model.steps)
                if s.op == "bias" or s.op == "matmul" and s.kind == "vector"]
        for j in range(k):
            deltas = torch.autograd.grad(out[..., j].sum(), [vals[i] for i in uses], retain_graph=True,
                                         allow_unused=True)
            by_layer: dict[str, list[tuple[Tensor, Tensor | None]]] = {}
            for i, d in zip(uses, deltas, strict=True):
                step = net.model.steps[i]
                d = _per_input(torch.zeros_like(vals[i]) if d is None else d, rows)
                y = None if step.op == "bias" else vals[step.args[0]]
                if y is not None:
                    y = _per_input(y.expand(d.shape[0], *y.shape[-2:]), rows)
                # W.T y_u: its gradient y_u delta_u^T pairs the other way round
                by_layer.setdefault(step.layer, []).append((y, d) if step.transposed else (d, y))
            for layer, pairs in by_layer.items():
                if net.layers[layer].fixed:  # no parameter: no term of the tangent kernel
                    continue
                term = 0.0
                for du, yu in pairs:
                    for dw, yw in pairs:
                        # over the positions p, r of two inputs b, c (one position without `model f(x[P])`)
                        dd = torch.einsum("sbpi,scri->sbcpr", du, dw)
                        if yu is not None:
                            dd = dd * torch.einsum("sbpi,scri->sbcpr", yu, yw)
                        term = term + dd.sum((-1, -2))
                total = total + factor[layer] * term / k
        return total.detach()


def limit_kernels(net: Network, wanted: list[tuple[str, str]],
                  **limit_options: object) -> dict[tuple[str, str], tuple[np.ndarray, str, np.ndarray | None]]:
    """(kind, data set) -> the limit of nngp or ntk on that data set, how it was computed and its
    standard error (None without Monte Carlo), for each (kind, data set) in `wanted`: the lowered
    program is evaluated once per data set, with `limit_options` (particles, replicates, seed) where
    it needs particles, and with its backward pass only where the ntk is wanted."""
    from tpc.train.kernel import layer_kernels

    out: dict[tuple[str, str], tuple[np.ndarray, str, np.ndarray | None]] = {}
    for data in dict.fromkeys(d for _, d in wanted):
        kinds = {k for k, d in wanted if d == data}
        K = layer_kernels(net, [data], ntk="ntk" in kinds, **limit_options)  # noqa: N806
        for kind in sorted(kinds):
            value = K.nngp if kind == "nngp" else K.ntk
            out[kind, data] = (value, K.methods.get(kind, K.method), K.stderr(kind, data))
    return out


def _per_input(v: Tensor, inputs: int) -> Tensor:
    """(S, B*P, m) -> (S, B, P, m): a value's rows grouped by input (P = 1 without positions)."""
    return v.reshape(v.shape[0], inputs, v.shape[-2] // inputs, v.shape[-1])
