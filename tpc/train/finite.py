"""Finite-width training: real weight matrices in torch, trained by SGD with autograd,
vectorised over seeds (every weight has a leading seed axis), on any device.

Seed s draws every layer's standard normals from its own generator, in declaration order, so
`unroll.py` can rebuild the same initial network.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from tpc import memory
from tpc.backends.torch.run import DTYPES, FiniteResult
from tpc.errors import NumericalError
from tpc.train.losses import batch_rows, loss_value
from tpc.train.network import Layer, Network, Output, Step

Tensor = torch.Tensor


def shape_of(layer: Layer, width: int) -> tuple[int, ...]:
    if layer.role == "bias":
        return (width,)
    return tuple(width if d is None else int(d) for d in (layer.rows, layer.cols))


def standard_normals(net: Network, width: int, seeds: list[int], dtype: torch.dtype,
                     device: str) -> dict[str, Tensor]:
    """Each layer's standard normals, (S, *shape), the same for every backend at a seed."""
    per_seed: list[dict[str, Tensor]] = []
    for s in seeds:
        gen = torch.Generator(device=device).manual_seed(int(s))
        per_seed.append({name: torch.randn(shape_of(la, width), generator=gen, dtype=dtype, device=device)
                         for name, la in net.layers.items()})
    return {name: torch.stack([p[name] for p in per_seed]) for name in net.layers}


def init_std(net: Network, layer: Layer, width: int) -> float:
    """Entries of W^l: sqrt(var / fan_in) n^-(a+b)."""
    return float(np.sqrt(layer.var / layer.fan_in) * width ** (-net.init_exponent(layer)))


def forward(net: Network, weights: dict[str, Tensor], x: Tensor, keep: bool = False) -> list[Tensor]:
    """Every step's value; `weights` are the W^l (S, *shape). Vectors are (S, B, n), the output (S, B, k)."""
    vals: list[Tensor] = []
    for step in net.model.steps:
        vals.append(_step(step, vals, weights, x))
    return vals


def _step(step: Step, vals: list[Tensor], weights: dict[str, Tensor], x: Tensor) -> Tensor:
    from tpc.train.losses import _tree

    if step.op == "input":
        return x
    if step.op == "bias":
        return weights[step.layer][:, None, :]
    if step.op == "matmul":
        w = weights[step.layer]
        arg = vals[step.args[0]]
        if arg.dim() == 2:  # the data (B, d) times the input layer (S, n, d)
            return torch.einsum("bd,snd->sbn", arg, w)
        return arg @ w.transpose(-1, -2)
    return _tree(step.tree, [vals[i] for i in step.args])


def bytes_per_seed(net: Network, width: int, itemsize: int) -> int:
    """A generous estimate of one seed's memory: the weights, their gradients and SGD's temporaries
    (x4), and every model value on every input (x4: forward, backward, autograd's saved tensors)."""
    if net.train and net.train.optimizer == "cbow":
        from tpc.train.cbow import memory_bytes

        return memory_bytes(net, width, itemsize)
    weights = sum(int(np.prod(shape_of(la, width))) for la in net.layers.values())
    rows = max(net.data[d].shape[0] for d in net.point_sets())
    return itemsize * 4 * (weights + rows * width * len(net.model.steps))


def train_finite(net: Network, width: int, seeds: int, dtype: str = "float64", device: str = "cpu",
                 first_seed: int = 0, memory_gb: float | None = None, force: bool = False,
                 progress: Callable[[int], None] | None = None,
                 on_step: Callable[[int, int], None] | None = None) -> dict[str, FiniteResult]:
    """Every output of the network program at width `width` for seeds first_seed...; training runs
    SGD on the trained parameters w^l (W^l = n^-a_l w^l) with learning rate lr n^-c. `progress`
    counts finished seeds, `on_step(done, steps)` the SGD steps of the current chunk of seeds."""
    if net.program is not None:  # training written as loops
        from tpc.train.dense import loops_finite

        return loops_finite(net, width, seeds, dtype, device, first_seed, memory_gb, force, progress, on_step)
    if net.train and net.train.optimizer == "cbow":  # word2vec: tables of word vectors, not dense layers
        from tpc.train.cbow import cbow_finite

        return cbow_finite(net, width, seeds, dtype, device, first_seed, progress, on_step, memory_gb, force)
    tdtype = DTYPES[dtype]
    chunk = memory.seeds_at_once(bytes_per_seed(net, width, torch.finfo(tdtype).bits // 8), seeds,
                                 f"one seed at width {width}", memory_gb, force, net.filename, net.source)
    parts: dict[str, list[np.ndarray]] = {o.name: [] for o in net.outputs}
    done = 0
    while done < seeds:
        ids = list(range(first_seed + done, first_seed + min(seeds, done + chunk)))
        out = _train_chunk(net, width, ids, tdtype, device, progress, on_step)
        for k, v in out.items():
            parts[k].append(v)
        done += len(ids)
    return {k: FiniteResult(k, np.concatenate(v), width) for k, v in parts.items()}


def _train_chunk(net: Network, width: int, ids: list[int], dtype: torch.dtype, device: str,
                 progress: Callable[[int], None] | None,
                 on_step: Callable[[int, int], None] | None) -> dict[str, np.ndarray]:
    normals = standard_normals(net, width, ids, dtype, device)
    params: dict[str, Tensor] = {}
    mult: dict[str, float] = {}
    for name, la in net.layers.items():
        a, b = net.ab(la)
        params[name] = (normals[name] * float(np.sqrt(la.var / la.fan_in) * width ** (-b))).requires_grad_(True)
        mult[name] = float(width ** (-a))

    def weights() -> dict[str, Tensor]:
        return {k: mult[k] * w for k, w in params.items()}

    def data(name: str) -> Tensor:
        return torch.as_tensor(net.data[name], dtype=dtype, device=device)

    results: dict[str, np.ndarray] = {}
    init_features: dict[str, Tensor] = {}

    def evaluate(outputs: list[Output], history: np.ndarray | None) -> None:
        for o in outputs:
            if o.kind == "adapted":
                results[o.name] = _adapted(net, o, params, mult, width, data)
        with torch.no_grad():
            w = weights()
            for o in outputs:
                if o.kind != "adapted":
                    results[o.name] = _output(net, o, w, data, init_features, history)

    init_outs = [o for o in net.outputs if o.phase == "init"]
    evaluate(init_outs, None)
    history = None
    if net.train:
        with torch.no_grad():
            w = weights()
            for o in net.outputs:
                if o.kind == "feature_change":
                    init_features[o.data] = forward(net, w, data(o.data))[net.model.features]
        if net.train.optimizer == "fomaml":
            _fomaml(net, params, mult, data, width, on_step)
        else:
            history = _sgd(net, params, weights, data, width, on_step)
    evaluate([o for o in net.outputs if o.phase == "trained"], history)
    if progress:
        progress(len(ids))
    return results


def _sgd(net: Network, params: dict[str, Tensor], weights: Callable[[], dict[str, Tensor]],
         data: Callable[[str], Tensor], width: int, on_step: Callable[[int, int], None] | None) -> np.ndarray:
    train = net.train
    loss = net.losses[train.loss]
    X = data(loss.data)  # noqa: N806
    m = X.shape[0]
    rate = {k: train.lr * width ** (-net.abc.c) for k in params}
    history = []
    for t in range(train.steps):
        rows = batch_rows(t, train.batch, m)
        F = forward(net, weights(), X[torch.as_tensor(rows, device=X.device)])[-1]  # noqa: N806
        value = loss_value(loss, F, net.data, rows)
        if train.batch == m:
            history.append(value.detach())
        else:
            with torch.no_grad():
                history.append(loss_value(loss, forward(net, weights(), X)[-1], net.data, np.arange(m)))
        if not torch.isfinite(value).all():
            raise NumericalError(f"training diverged at step {t + 1}: the loss is not finite (lower the "
                                 "learning rate)", train.span).locate(net.filename, net.source)
        grads = _grads(value, params)
        with torch.no_grad():
            for (k, w), g in zip(params.items(), grads, strict=True):
                w -= rate[k] * g
        if on_step:
            on_step(t + 1, train.steps)
    return torch.stack(history, dim=-1).detach().to("cpu", torch.float64).numpy()


def _task_grad(net: Network, w: dict[str, Tensor], mult: dict[str, float], pool: Tensor, rows: np.ndarray,
               labels: np.ndarray) -> tuple[Tensor, ...]:
    """dL/dw of one task's rows of the pool (every seed's loss summed: seeds are independent)."""
    weights = {k: mult[k] * v for k, v in w.items()}
    F = forward(net, weights, pool[torch.as_tensor(rows, device=pool.device)])[-1]  # noqa: N806
    value = loss_value(net.task_loss(), F, {"<y>": labels}, np.arange(len(rows)))
    return _grads(value, w)


def _grads(value: Tensor, params: dict[str, Tensor]) -> tuple[Tensor, ...]:
    """dL/dw for every layer; zero for a layer the loss does not reach (behind a step function)."""
    grads = torch.autograd.grad(value.sum(), list(params.values()), allow_unused=True)
    return tuple(torch.zeros_like(w) if g is None else g for w, g in zip(params.values(), grads, strict=True))


def adapt(net: Network, w: dict[str, Tensor], mult: dict[str, float], width: int, pool: Tensor,
          rows: np.ndarray, labels: np.ndarray) -> dict[str, Tensor]:
    """fomaml's inner loop: SGD from w on one task's support, at lr inner_lr n^-c."""
    rate = net.train.inner_lr * width ** (-net.abc.c)
    for _ in range(net.train.inner_steps):
        grads = _task_grad(net, w, mult, pool, rows, labels)
        w = {k: (v - rate * g).detach().requires_grad_(True) for (k, v), g in zip(w.items(), grads, strict=True)}
    return w


def _adapted(net: Network, o: Output, params: dict[str, Tensor], mult: dict[str, float], width: int,
             data: Callable[[str], Tensor]) -> np.ndarray:
    """Each task's query predictions after fomaml's inner steps on its support: (S, T, Q[, k])."""
    tasks = o.tasks
    pool = data(tasks.pool)
    out = []
    for t in range(tasks.count(net.data)):
        task = tasks.task(net.data, t)
        w = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        w = adapt(net, w, mult, width, pool, task.support, task.support_y)
        with torch.no_grad():
            query = torch.as_tensor(task.query, device=pool.device)
            out.append(forward(net, {k: mult[k] * v for k, v in w.items()}, pool[query])[-1])
    F = torch.stack(out, dim=1)  # noqa: N806
    return (F[..., 0] if F.shape[-1] == 1 else F).detach().to("cpu", torch.float64).numpy()


def _fomaml(net: Network, params: dict[str, Tensor], mult: dict[str, float], data: Callable[[str], Tensor],
            width: int, on_step: Callable[[int, int], None] | None) -> None:
    """First-order MAML: for each task of a step, adapt on its support, take the query loss's
    gradient at the adapted weights, and move the meta-weights by the mean over the step's tasks."""
    train, tasks = net.train, net.train.tasks
    pool = data(tasks.pool)
    count = tasks.count(net.data)
    rate = train.lr * width ** (-net.abc.c)
    for t in range(train.steps):
        total = [torch.zeros_like(v) for v in params.values()]
        for i in batch_rows(t, train.batch, count):
            task = tasks.task(net.data, i)
            adapted = adapt(net, params, mult, width, pool, task.support, task.support_y)
            grads = _task_grad(net, adapted, mult, pool, task.query, task.query_y)
            for acc, g in zip(total, grads, strict=True):
                acc += g
        with torch.no_grad():
            for w, g in zip(params.values(), total, strict=True):
                w -= rate / train.batch * g
            if not all(torch.isfinite(w).all() for w in params.values()):
                raise NumericalError(f"meta-training diverged at step {t + 1} (lower the learning rates)",
                                     train.span).locate(net.filename, net.source)
        if on_step:
            on_step(t + 1, train.steps)


def _output(net: Network, o: Output, w: dict[str, Tensor], data: Callable[[str], Tensor],
            init_features: dict[str, Tensor], history: np.ndarray | None) -> np.ndarray:
    def numpy(t: Tensor) -> np.ndarray:
        return t.detach().to("cpu", torch.float64).numpy()

    if o.kind == "history":
        return history
    if o.kind == "loss":
        loss = net.losses[o.loss]
        F = forward(net, w, data(loss.data))[-1]  # noqa: N806
        return numpy(loss_value(loss, F, net.data, np.arange(F.shape[-2])))
    vals = forward(net, w, data(o.data))
    if o.kind == "predict":
        F = vals[-1]  # noqa: N806
        return numpy(F[..., 0] if F.shape[-1] == 1 else F)
    feats = vals[net.model.features]
    n = feats.shape[-1]
    if o.kind == "features":
        return numpy(feats @ feats.transpose(-1, -2) / n)
    diff = feats - init_features[o.data]
    return numpy(torch.sqrt((diff * diff).mean(-1)))

