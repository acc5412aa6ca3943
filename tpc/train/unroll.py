"""SGD unrolled into a Netsor-transpose program that multiplies only by the initial matrices.

One SGD step moves a hidden matrix by a sum of outer products, so after t steps
    W_t y = W_0 y + sum_s c_s sum_j dh_{s,j} (x_{s,j} . y / n),
    W_t.T g = W_0.T g + sum_s c_s sum_j x_{s,j} (dh_{s,j} . g / n),
with the scalars c_s and the vectors dh (n times the gradient of the loss in the pre-activation)
and x (the layer's inputs) of step s. Input layers, biases and readouts have a finite side and
are kept as they are: d columns, one vector, k rows.

Every quantity is written at its natural scale (TP4, "maximal update" normalisation): vectors
have O(1) coordinates, `v = n W^{L+1}` for the readout, and the powers of n that a
parametrization puts on initial values and updates are explicit factors `n^e`. The same loop
runs on two spaces:
- `FiniteSpace`: width n, real initial matrices (the seeds' own): equal to direct training in
  `finite.py` up to round-off, for any parametrization;
- `LimitSpace`: the infinite-width limit (TP4's Master Theorem for Netsor-transpose programs):
  each `n^e` becomes 1 (e = 0) or 0 (e < 0), vectors are coefficient vectors over independent
  Gaussians (exact, linear models) or particles (Monte Carlo), and `W_0 y` is `Zhat + Zdot`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from tpc.backends.limit.evaluate import evaluate_tree
from tpc.backends.limit.particles import GaussianSpace, _evaluate_linear
from tpc.errors import NumericalError, TpcError
from tpc.ops import expr as ex
from tpc.parametrization import limit_of_power
from tpc.passes.autodiff import derivative
from tpc.train.finite import init_std, standard_normals
from tpc.train.losses import _tree, batch_rows, loss_gradient, loss_value
from tpc.train.network import Layer, Loss, Network, Output
from tpc.train.plan import Plan, _forward_sets, is_linear_model, plan  # noqa: F401 - re-exported

Tensor = torch.Tensor
# the update exponent of each role under muP: n^(target - (2a + c)) multiplies its update
MAXIMAL_LR_EXPONENT = {"input": -1.0, "bias": -1.0, "hidden": 0.0, "readout": 1.0}


class FiniteSpace:
    """The unrolled program at width n, for a batch of seeds: vectors (S, B, n)."""

    exact = False

    def __init__(self, net: Network, width: int, seeds: list[int], dtype: torch.dtype, device: str) -> None:
        self.net, self.n, self.dtype, self.device = net, width, dtype, device
        self.normals = standard_normals(net, width, seeds, dtype, device)

    def factor(self, exponent: float) -> float:
        return float(self.n**exponent)

    def initial(self, layer: Layer) -> Tensor:
        """W^l_0 entries: input (S, n, d) as columns (S, d, n); bias (S, n); readout v = n W (S, k, n)."""
        w = self.normals[layer.name] * init_std(self.net, layer, self.n)
        if layer.role == "input":
            return w.transpose(-1, -2)
        if layer.role == "readout":
            return w * self.n
        return w

    def matmul(self, layer: Layer, rows: Tensor, transposed: bool) -> Tensor:
        w = self.normals[layer.name] * init_std(self.net, layer, self.n)
        return rows @ w if transposed else rows @ w.transpose(-1, -2)

    def gram(self, a: Tensor, b: Tensor) -> Tensor:
        return a @ b.transpose(-1, -2) / self.n

    def data(self, value: np.ndarray) -> Tensor:
        return torch.as_tensor(value, dtype=self.dtype, device=self.device)

    def fn(self, tree: ex.Tree, args: list[Tensor]) -> Tensor:
        return _tree(tree, args)


class LimitSpace:
    """The limit: vectors (B, space) over coefficients (exact) or particles (Monte Carlo)."""

    def __init__(self, net: Network, exact: bool, size: int, seed: int) -> None:
        self.net = net
        self.exact = exact
        self.dtype = torch.float64
        self.device = "cpu"
        self.space = GaussianSpace(exact, size, self.dtype, seed)

    def factor(self, exponent: float) -> float:
        value = limit_of_power(exponent)
        if value is None:  # pragma: no cover - unstable parametrizations are refused before
            raise TpcError(f"internal: a factor n^{exponent:g} has no limit")
        return value

    def initial(self, layer: Layer) -> Tensor:
        e = -self.net.init_exponent(layer)
        std = np.sqrt(layer.var / layer.fan_in)
        if layer.role == "input":
            return self.factor(e) * std * self.space.normals(int(layer.cols))
        if layer.role == "readout":
            return self.factor(1 + e) * std * self.space.normals(int(layer.rows))
        return self.factor(e) * std * self.space.normals(1)[0]

    def matmul(self, layer: Layer, rows: Tensor, transposed: bool) -> Tensor:
        s2 = layer.var * self.factor(1 - 2 * self.net.init_exponent(layer))
        flat = rows.reshape(-1, rows.shape[-1])
        where = f"layer {layer.name} (line {layer.span.line})"
        return self.space.matmul((layer.name, transposed), flat, s2, where).reshape(rows.shape)

    def gram(self, a: Tensor, b: Tensor) -> Tensor:
        return self.space.gram(a, b)

    def data(self, value: np.ndarray) -> Tensor:
        return torch.as_tensor(value, dtype=self.dtype)

    def fn(self, tree: ex.Tree, args: list[Tensor]) -> Tensor:
        if self.exact:
            return _evaluate_linear(tree, args, set(range(len(args))), self.space)
        return evaluate_tree(tree, args)


Space = FiniteSpace | LimitSpace


class Unrolled:
    """The state of training: the initial network plus the updates so far."""

    def __init__(self, net: Network, space: Space) -> None:
        self.net, self.space = net, space
        self.state: dict[str, Tensor] = {}  # input columns, biases, readout rows: updated in place
        self.history: dict[str, tuple[Tensor, Tensor]] = {}  # hidden: (inputs x, scaled gradients c dh)
        for name, la in net.layers.items():
            if la.role != "hidden":
                self.state[name] = space.initial(la)
        self.rate = {name: -net.train.lr * space.factor(MAXIMAL_LR_EXPONENT[la.role] - net.lr_exponent(la))
                     for name, la in net.layers.items()} if net.train else {}

    # --- the model at the current weights
    def hidden(self, layer: Layer, y: Tensor, transposed: bool) -> Tensor:
        out = self.space.matmul(layer, y, transposed)
        if layer.name in self.history:
            xs, ds = self.history[layer.name]
            out = out + (self.space.gram(y, ds) @ xs if transposed else self.space.gram(y, xs) @ ds)
        return out

    def forward(self, x: Tensor) -> list[Tensor]:
        vals: list[Tensor] = []
        for step in self.net.model.steps:
            if step.op == "input":
                vals.append(x)
            elif step.op == "bias":
                vals.append(self.state[step.layer][..., None, :])
            elif step.op == "fn":
                vals.append(self.space.fn(step.tree, [vals[i] for i in step.args]))
            else:
                la = self.net.layers[step.layer]
                y = vals[step.args[0]]
                if la.role == "input":
                    vals.append(y @ self.state[la.name])
                elif la.role == "readout":
                    vals.append(self.space.gram(y, self.state[la.name]))  # f = W x = (v . x) / n
                else:
                    vals.append(self.hidden(la, y, False))
        return vals

    def backward(self, vals: list[Tensor], chi: Tensor) -> list[Tensor | None]:
        """n dL/d(value) for every vector step, from chi = dL/df (..., B, k)."""
        steps = self.net.model.steps
        grads: list[Tensor | None] = [None] * len(steps)

        def add(i: int, g: Tensor) -> None:
            if vals[i].shape[-2] == 1 and g.shape[-2] > 1:  # an unbatched vector (a bias) used by every row
                g = g.sum(-2, keepdim=True)
            grads[i] = g if grads[i] is None else grads[i] + g

        out = steps[-1]
        add(out.args[0], chi @ self.state[out.layer])  # n dL/dx = sum_i chi_i v_i
        for i in range(len(steps) - 2, -1, -1):
            step, g = steps[i], grads[i]
            if g is None or step.op in ("input", "bias"):
                continue
            if step.op == "matmul":
                la = self.net.layers[step.layer]
                if la.role == "hidden":
                    add(step.args[0], self.hidden(la, g, True))
                continue
            args = [vals[j] for j in step.args]
            for k, j in enumerate(step.args):
                if steps[j].kind != "vector":
                    continue
                d = derivative(step.tree, k)
                if not ex.args_used(d):
                    add(j, float(evaluate_tree(d, [torch.zeros(())] * len(args))) * g)
                else:
                    add(j, self.space.fn(ex.Apply("mul", (d, ex.Arg(len(args)))), args + [g]))
        return grads

    def copy(self) -> Unrolled:
        """An independent state from this one (fomaml adapts a copy per task); tensors are never
        written in place, so sharing them is safe."""
        new = Unrolled.__new__(Unrolled)
        new.net, new.space, new.rate = self.net, self.space, self.rate
        new.state, new.history = dict(self.state), dict(self.history)
        return new

    def gradient(self, x: Tensor, loss: Loss, data: dict[str, np.ndarray], rows: np.ndarray) -> tuple[Tensor, list]:
        """(the loss, the update directions): for each trained layer, what SGD adds to it times its
        rate: input columns x.T dh, readout rows chi.T x, bias sum dh, hidden rows (x, dh)."""
        vals = self.forward(x)
        value, chi = loss_gradient(loss, vals[-1], data, rows)
        grads = self.backward(vals, chi)
        parts: list[tuple[str, Tensor, Tensor | None]] = []
        for i, step in enumerate(self.net.model.steps):
            if grads[i] is None and step.kind == "vector":
                continue  # not reached by the loss
            if step.op == "bias":
                parts.append((step.layer, grads[i].sum(-2), None))
            if step.op != "matmul":
                continue
            la, y = self.net.layers[step.layer], vals[step.args[0]]
            if la.role == "input":
                parts.append((la.name, y.transpose(-1, -2) @ grads[i], None))
            elif la.role == "readout":
                parts.append((la.name, chi.transpose(-1, -2) @ y, None))
            else:
                parts.append((la.name, y, grads[i]))
        return value, parts

    def apply(self, parts: list, scale: float) -> None:
        """Add `scale` times each layer's rate times the update directions."""
        for name, a, b in parts:
            c = scale * self.rate[name]
            if b is None:
                self.state[name] = self.state[name] + c * a
                continue
            y, d = a, c * b
            if name in self.history:
                xs, ds = self.history[name]
                y, d = torch.cat([xs, y], dim=-2), torch.cat([ds, d], dim=-2)
            self.history[name] = (y, d)

    def sgd_step(self, x: Tensor, rows: np.ndarray) -> Tensor:
        """One step on the rows `rows` of the training set; returns the loss before it."""
        value, parts = self.gradient(x, self.net.losses[self.net.train.loss], self.net.data, rows)
        self.apply(parts, 1.0)
        return value

    def adapt(self, pool: np.ndarray, rows: np.ndarray, labels: np.ndarray) -> Unrolled:
        """fomaml's inner loop on one task's support, on a copy of this state."""
        state = self.copy()
        scale = self.net.train.inner_lr / self.net.train.lr
        x = self.space.data(pool[rows])
        for _ in range(self.net.train.inner_steps):
            _, parts = state.gradient(x, self.net.task_loss(), {"<y>": labels}, np.arange(len(rows)))
            state.apply(parts, scale)
        return state

    def fomaml_step(self, step: int) -> None:
        """One meta-step: the mean over the step's tasks of the query gradient at the adapted state."""
        t = self.net.train
        tasks = t.tasks
        pool = self.net.data[tasks.pool]
        everything: list = []
        for i in batch_rows(step, t.batch, tasks.count(self.net.data)):
            task = tasks.task(self.net.data, i)
            adapted = self.adapt(pool, task.support, task.support_y)
            _, parts = adapted.gradient(self.space.data(pool[task.query]), self.net.task_loss(),
                                        {"<y>": task.query_y}, np.arange(len(task.query)))
            everything += parts
        self.apply(everything, 1.0 / t.batch)


def run(net: Network, space: Space, progress: Callable[[int, int], None] | None = None) -> dict[str, Tensor]:
    """Every output of the network program on `space`."""
    state = Unrolled(net, space)
    results: dict[str, Tensor] = {}
    init_features: dict[str, Tensor] = {}

    def evaluate(phase: str, history: Tensor | None) -> None:
        cache = {d: state.forward(space.data(net.data[d])) for d in _forward_sets(net, phase)}
        for o in net.outputs:
            if phase == "init" and o.kind == "feature_change":
                init_features[o.data] = cache[o.data][net.model.features]
            if o.phase != phase:
                continue
            results[o.name] = _output(net, space, o, cache, init_features, history, state)

    evaluate("init", None)
    history = None
    if net.train and net.train.optimizer == "fomaml":
        for s in range(net.train.steps):
            state.fomaml_step(s)
            if progress:
                progress(s + 1, net.train.steps)
    elif net.train:
        t = net.train
        loss = net.losses[t.loss]
        X = net.data[loss.data]  # noqa: N806
        m = X.shape[0]
        want_history = any(o.kind == "history" for o in net.outputs)
        values = []
        for s in range(t.steps):
            rows = batch_rows(s, t.batch, m)
            if want_history and t.batch < m:  # the loss on the whole training set before the step
                full = loss_value(loss, state.forward(space.data(X))[-1], net.data, np.arange(m))
            value = state.sgd_step(space.data(X[rows]), rows)
            values.append(full if want_history and t.batch < m else value)
            if not torch.isfinite(value).all():
                raise NumericalError(f"training diverged at step {s + 1}: the loss is not finite (lower the "
                                     "learning rate)", t.span).locate(net.filename, net.source)
            if progress:
                progress(s + 1, t.steps)
        history = torch.stack(values, dim=-1)
    evaluate("trained", history)
    return results


def _adapted(state: Unrolled, o: Output) -> Tensor:
    """Each task's query predictions after the inner steps on its support: (..., T, Q[, k])."""
    net, tasks = state.net, o.tasks
    pool = net.data[tasks.pool]
    out = []
    for t in range(tasks.count(net.data)):
        task = tasks.task(net.data, t)
        adapted = state.adapt(pool, task.support, task.support_y)
        out.append(adapted.forward(state.space.data(pool[task.query]))[-1])
    F = torch.stack(out, dim=-3)  # noqa: N806
    return F[..., 0] if F.shape[-1] == 1 else F


def _output(net: Network, space: Space, o: Output, cache: dict[str, list[Tensor]],
            init_features: dict[str, Tensor], history: Tensor | None, state: Unrolled) -> Tensor:
    if o.kind == "history":
        return history
    if o.kind == "adapted":
        return _adapted(state, o)
    if o.kind == "loss":
        loss = net.losses[o.loss]
        F = cache[loss.data][-1]  # noqa: N806
        return loss_value(loss, F, net.data, np.arange(F.shape[-2]))
    vals = cache[o.data]
    if o.kind == "predict":
        F = vals[-1]  # noqa: N806
        return F[..., 0] if F.shape[-1] == 1 else F
    feats = vals[net.model.features]
    if o.kind == "features":
        return space.gram(feats, feats)
    diff = feats - init_features[o.data]
    return torch.sqrt(torch.clamp(space.gram(diff[..., None, :], diff[..., None, :])[..., 0, 0], min=0.0))


def run_unrolled_finite(net: Network, width: int, seeds: int, dtype: str = "float64", device: str = "cpu",
                        first_seed: int = 0) -> dict[str, np.ndarray]:
    """The unrolled program in torch at width n: the same numbers as `train_finite`, to round-off."""
    from tpc.backends.torch.run import DTYPES

    if net.program is not None:
        from tpc.train.pooled import loops_unrolled_finite

        return loops_unrolled_finite(net, width, seeds, dtype, device, first_seed)

    space = FiniteSpace(net, width, list(range(first_seed, first_seed + seeds)), DTYPES[dtype], device)
    with torch.no_grad():
        out = run(net, space)
    return {k: v.to("cpu", torch.float64).numpy() for k, v in out.items()}

