"""The kernel regime (r > 0): training in the limit is kernel gradient descent.

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

Squared error makes f_t affine in f_0, so its mean and covariance are exact; other losses
sample f_0 and report standard errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tpc.backends.limit.evaluate import LimitOutput, evaluate_limit
from tpc.errors import Span, TpcError
from tpc.ir import Program
from tpc.ops import expr as ex
from tpc.train.losses import batch_rows, loss_gradient, loss_value
from tpc.train.network import Network, TaskRows

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


def kernel_limit(net: Network, samples: int = 2**14, seed: int = 0, **limit_options: object) -> dict[str, LimitOutput]:
    """Every output of a kernel-regime network program in the limit; `limit_options` go to the
    evaluation of its kernels (particles, replicates, memory_gb, force)."""
    K = kernels(net, **limit_options)  # noqa: N806
    k = net.output_dim()
    P = K.theta.shape[0]  # noqa: N806
    fomaml = bool(net.train and net.train.optimizer == "fomaml")
    if fomaml:
        samples = min(samples, 512)  # fomaml's outputs are kept per sample (accuracies need them)
    mse = not fomaml and (not net.train or net.losses[net.train.loss].kind == "mse")
    exact_losses = all(net.losses[o.loss].kind == "mse" for o in net.outputs if o.kind in ("loss", "history"))
    # f_t = A_t f_0 + b_t (mse) or f_t on samples of f_0 (other losses)
    if mse and exact_losses:
        A, b = np.eye(P), np.zeros((P, k))  # noqa: N806
        sample = None
    else:
        A = b = None  # noqa: N806
        rng = np.random.default_rng(seed)
        w, v = np.linalg.eigh(K.nngp)
        root = v * np.sqrt(np.clip(w, 0, None))
        sample = root @ rng.standard_normal((samples, P, k))  # (S, P, k)
    history: list = []

    def loss_stats(loss_name: str) -> tuple[np.ndarray, np.ndarray | None]:
        loss = net.losses[loss_name]
        rows = K.points[loss.data]
        m = rows.stop - rows.start
        if sample is None:
            y = net.data[loss.target].reshape(m, k)
            cov = A[rows] @ K.nngp @ A[rows].T
            value = 0.5 * np.mean(((b[rows] - y) ** 2).sum(-1) + k * np.diag(cov))
            return np.asarray(value), None
        F = torch.as_tensor(sample[:, rows])  # noqa: N806
        vals = loss_value(loss, F, net.data, np.arange(m)).numpy()
        return np.asarray(vals.mean()), np.asarray(vals.std(ddof=1) / np.sqrt(len(vals)))

    results: dict[str, LimitOutput] = {}
    method = K.method if sample is None or "monte-carlo" in K.method else K.method + "+monte-carlo"

    def evaluate(phase: str) -> None:
        for o in net.outputs:
            if o.phase != phase:
                continue
            if o.kind == "history":
                vals = np.array([h[0] for h in history])
                errs = None if history[0][1] is None else np.array([h[1] for h in history])
                results[o.name] = LimitOutput(vals, method, errs, random=True)
            elif o.kind == "loss":
                value, err = loss_stats(o.loss)
                results[o.name] = LimitOutput(value, method, err, random=True)
            elif o.kind == "features":
                r = K.points[o.data]
                results[o.name] = LimitOutput(K.features[r, r], K.method)
            elif o.kind == "feature_change":  # the features do not move in the kernel regime
                results[o.name] = LimitOutput(np.zeros(net.data[o.data].shape[0]), "exact")
            elif o.kind == "adapted":
                results[o.name] = _adapted_samples(net, o, K, sample, method)
            else:
                results[o.name] = _prediction(K.points[o.data], k, A if sample is None else None, b, sample, K,
                                              method)

    evaluate("init")
    if fomaml:
        sample = _fomaml(net, K, sample)
    elif net.train:
        t = net.train
        loss = net.losses[t.loss]
        tr = K.points[loss.data]
        m = tr.stop - tr.start
        for step in range(t.steps):
            rows = batch_rows(step, t.batch, m)
            idx = tr.start + rows
            if sample is None:
                history.append(loss_stats(t.loss))
                y = net.data[loss.target].reshape(m, k)[rows]
                # chi = (f(X_t) - y) / B, linear in f_0
                theta = K.theta[:, idx]
                A, b = A - theta @ A[idx] / len(rows), b - theta @ (b[idx] - y) / len(rows)  # noqa: N806
            else:
                history.append(loss_stats(t.loss))
                _, chi = loss_gradient(loss, torch.as_tensor(sample[:, idx]), net.data, rows)
                sample = sample - K.theta[:, idx] @ chi.numpy()
    evaluate("trained")
    return results


def _chi(net: Network, f: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """dL/df of one task's rows for every sample of f (..., rows, k)."""
    _, chi = loss_gradient(net.task_loss(), torch.as_tensor(f), {"<y>": labels}, np.arange(f.shape[-2]))
    return chi.numpy()


def _adapt(net: Network, K: Kernels, f: np.ndarray, pool: str, task: TaskRows) -> np.ndarray:  # noqa: N803
    """fomaml's inner steps on one task in function space: f on the query after adapting."""
    start = K.points[pool].start
    s, q = start + task.support, start + task.query
    ratio = net.train.inner_lr / net.train.lr
    fs, fq = f[:, s], f[:, q]
    for _ in range(net.train.inner_steps):
        chi = _chi(net, fs, task.support_y)
        fs = fs - ratio * K.theta[np.ix_(s, s)] @ chi
        fq = fq - ratio * K.theta[np.ix_(q, s)] @ chi
    return fq


def _fomaml(net: Network, K: Kernels, f: np.ndarray) -> np.ndarray:  # noqa: N803
    """First-order MAML with a fixed kernel: each meta-step moves f everywhere by the kernel
    against the mean over tasks of the query gradients at the adapted functions."""
    t, tasks = net.train, net.train.tasks
    start = K.points[tasks.pool].start
    for step in range(t.steps):
        total = np.zeros_like(f)
        for i in batch_rows(step, t.batch, tasks.count(net.data)):
            task = tasks.task(net.data, i)
            fq = _adapt(net, K, f, tasks.pool, task)
            total += K.theta[:, start + task.query] @ _chi(net, fq, task.query_y)
        f = f - total / t.batch
    return f


def _adapted_samples(net: Network, o: object, K: Kernels, f: np.ndarray, method: str) -> LimitOutput:  # noqa: N803
    tasks = o.tasks
    s = np.stack([_adapt(net, K, f, tasks.pool, tasks.task(net.data, t)) for t in range(tasks.count(net.data))],
                 axis=1)  # (samples, T, Q, k)
    if s.shape[-1] == 1:
        s = s[..., 0]
    err = s.std(0, ddof=1) / np.sqrt(s.shape[0])
    return LimitOutput(s.mean(0), method, err, random=True, samples=s)


def _prediction(rows: slice, k: int, A: np.ndarray | None, b: np.ndarray, sample: np.ndarray | None,  # noqa: N803
                K: Kernels, method: str) -> LimitOutput:  # noqa: N803
    if A is not None:
        mean = b[rows]
        cov = A[rows] @ K.nngp @ A[rows].T  # (m, m), times the identity over outputs
        if k == 1:
            return LimitOutput(mean[:, 0], method, None, cov, random=True)
        m = cov.shape[0]
        full = np.einsum("pq,ij->piqj", cov, np.eye(k)).reshape(m, k, m, k)
        return LimitOutput(mean, method, None, full, random=True)
    s = sample[:, rows]  # (S, m, k)
    mean = s.mean(0)
    err = s.std(0, ddof=1) / np.sqrt(s.shape[0])
    flat = s.reshape(s.shape[0], -1)
    cov = np.cov(flat, rowvar=False).reshape(*mean.shape, *mean.shape)
    if k == 1:
        return LimitOutput(mean[:, 0], method, err[:, 0], cov.reshape(mean.shape[0], mean.shape[0]), random=True)
    return LimitOutput(mean, method, err, cov, random=True)
