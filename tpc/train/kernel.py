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

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tpc.backends.limit.evaluate import evaluate_limit
from tpc.errors import Span, TpcError
from tpc.ir import Program
from tpc.ops import expr as ex
from tpc.train.network import Network

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


def lowered_source(net: Network) -> tuple[str, list[tuple[str, str, float]]]:
    """The network at initialisation as a forward Tensor Program on the stacked points `X`
    (readout normalised to v @ x / sqrt(n), v a single row), with one output per kernel term.
    Returns the source and the terms (output name, layer, exponent)."""
    lines = ["width n"]
    for la in net.layers.values():
        if la.role == "input":
            lines.append(f"matrix {la.name} : n x {la.cols} ~ N(0, {la.var!r} / {la.cols})")
        elif la.role == "hidden":
            lines.append(f"matrix {la.name} : n x n ~ N(0, {la.var!r} / n)")
        else:
            lines.append(f"vector {la.name} ~ N(0, {la.var!r})")
    names: list[str] = []
    steps = net.model.steps
    for i, s in enumerate(steps):
        if s.op == "input":
            names.append("X")
            continue
        if s.op == "bias":
            names.append(s.layer)
            continue
        name = f"s{i}"
        names.append(name)
        if s.op == "fn":
            lines.append(f"{name} = {ex.render(s.tree, [names[j] for j in s.args])}")
        elif net.layers[s.layer].role == "readout":
            lines.append(f"f = {s.layer} @ {names[s.args[0]]} / sqrt(n)")
        else:
            lines.append(f"{name} = {s.layer} @ {names[s.args[0]]}")
    beta = net.init_exponent(net.readout())
    terms: list[tuple[str, str, float]] = []
    feats = names[net.model.features]
    lines.append(f"output features = gram({feats})")
    lines.append("output nngp = cov(f)")
    uses: dict[str, list[int]] = {}
    for i, s in enumerate(steps):
        if s.op == "matmul" and net.layers[s.layer].role in ("input", "hidden"):
            uses.setdefault(s.layer, []).append(i)
    for name, la in net.layers.items():
        gamma = net.lr_exponent(la)
        out = f"theta_{name}"
        if la.role == "readout":
            lines.append(f"output {out} = gram({feats})")
            terms.append((out, name, 1 - gamma))
        elif la.role == "bias":
            lines.append(f"output {out} = gram(grad(f, {name}))")
            terms.append((out, name, 1 - 2 * beta - gamma))
        elif la.role == "input":
            parts = [f"gram(grad(f, {names[u]}), grad(f, {names[w]}))" for u in uses[name] for w in uses[name]]
            lines.append(f"output {out} = ({' + '.join(parts)}) * XX")
            terms.append((out, name, 1 - 2 * beta - gamma))
        else:
            parts = [f"gram(grad(f, {names[u]}), grad(f, {names[w]})) * gram({names[steps[u].args[0]]}, "
                     f"{names[steps[w].args[0]]})" for u in uses[name] for w in uses[name]]
            lines.append(f"output {out} = {' + '.join(parts)}")
            terms.append((out, name, 2 - 2 * beta - gamma))
    return "\n".join(lines) + "\n", terms


def lowered_program(net: Network, X: np.ndarray) -> tuple[Program, list[tuple[str, str, float]]]:  # noqa: N803
    from tpc.build import Builder
    from tpc.syntax import parse

    source, terms = lowered_source(net)
    prog = Program(filename=f"<{net.filename} at initialisation>", source=source)
    b = Builder(prog, Path.cwd())
    for name, value in (("X", X), ("XX", X @ X.T)):
        b.names[name] = prog.add("data", (), "scalar", value.shape, name, None, value=value, source=None).id
        b.defined_at[name] = Span(1, 1, 1, 1)
    from tpc.syntax import OutputDecl

    for stmt in parse(source, prog.filename).statements:
        try:
            b.statement(stmt)
        except TpcError:
            # a layer that f does not reach by a nonzero derivative (behind a step function):
            # its kernel term is zero
            if not (isinstance(stmt, OutputDecl) and stmt.name.startswith("theta_")):
                raise
    prog.verify()
    return prog, [t for t in terms if t[0] in prog.outputs]


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


def layer_kernels(net: Network, sets: list[str], **limit_options: object) -> LayerKernels:
    points, start = {}, 0
    for d in sets:
        points[d] = slice(start, start + net.data[d].shape[0])
        start += net.data[d].shape[0]
    X = np.concatenate([net.data[d] for d in sets])  # noqa: N806
    prog, terms = lowered_program(net, X)
    lim = evaluate_limit(prog, **limit_options)
    theta = {name: np.zeros((len(X), len(X))) for name in net.layers}
    for out, layer, exponent in terms:
        theta[layer] = theta[layer] + limit_factor(exponent) * lim[out].value
    beta = net.init_exponent(net.readout())
    nngp = limit_factor(1 - 2 * beta) * lim["nngp"].value
    methods = {m for v in lim.values() for m in v.method.split("+")}
    order = ("exact", "closed-form", "quadrature", "monte-carlo")
    return LayerKernels(points, theta, nngp, lim["features"].value, "+".join(m for m in order if m in methods))


def kernels(net: Network, **limit_options: object) -> Kernels:
    K = layer_kernels(net, net.point_sets(), **limit_options)  # noqa: N806
    lr = net.train.lr if net.train else 0.0
    theta = lr * sum(K.theta.values())
    return Kernels(K.points, theta, K.nngp, K.features, K.method)
