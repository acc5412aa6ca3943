"""What a network program's limit will do, known before it runs: how many Gaussian vectors the
unrolled program needs and how much memory it takes (`tpc check` and `tpc limit` print it). Plain
counting over the Network, without torch, so `tpc check` stays fast."""

from __future__ import annotations

from dataclasses import dataclass

from tpc.ops import expr as ex
from tpc.ops.functions import LINEAR_FNS
from tpc.train.network import Network


def is_linear_model(net: Network) -> bool:
    """Every coordinatewise step is linear in its vectors: the limit is exact."""
    def linear(t: ex.Tree) -> bool:
        if not isinstance(t, ex.Apply):
            return True
        if t.fn in LINEAR_FNS:
            return all(linear(a) for a in t.args)
        if t.fn == "mul":
            a, b = t.args
            return (not ex.args_used(a) and linear(b)) or (not ex.args_used(b) and linear(a))
        if t.fn == "div":
            return linear(t.args[0]) and not ex.args_used(t.args[1])
        return not ex.args_used(t)
    return all(linear(s.tree) for s in net.model.steps if s.op == "fn")


@dataclass
class Plan:
    """What the unrolled limit will do, known before it runs."""

    forward_rows: int  # rows pushed through the model forward (all phases and steps)
    backward_rows: int
    hidden_uses: int  # hidden-layer applications per forward
    gaussians: int  # independent Gaussian vectors the limit needs
    stored_rows: int  # vectors kept for the updates of hidden matrices
    peak_rows: int = 0  # the most rows one pass pushes through the model (what is alive at once)

    def describe(self, exact: bool, particles: int, replicates: int) -> str:
        how = ("exactly: every vector is a coefficient vector over the Gaussians (a linear model)" if exact else
               f"by Monte Carlo: {particles} particles x {replicates} replicates (standard errors across them)")
        zdot = ("; W.T after W (and W after W.T) gets its Zdot by Stein's lemma"
                if self.hidden_uses else "; no n x n matrix, so no Zdot")
        return (f"{self.gaussians} Gaussian vectors ({self.forward_rows} rows forward, {self.backward_rows} backward, "
                f"{self.hidden_uses} hidden-matrix use(s) each); expectations {how}{zdot}")

    def memory_bytes(self, size: int) -> int:
        return 8 * size * (4 * self.gaussians + 2 * self.stored_rows + 8 * self.peak_rows)


def plan(net: Network) -> Plan:
    """Count the rows of every forward and backward pass of `run` without running it."""
    hidden = sum(1 for s in net.model.steps if s.op == "matmul" and net.layers[s.layer].role == "hidden")
    fwd = bwd = peak = 0
    for phase in ("init", "trained"):
        sizes = [net.data[d].shape[0] for d in _forward_sets(net, phase)]
        fwd += sum(sizes)
        peak = max([peak, *sizes])
    for o in net.outputs:
        if o.kind == "adapted":
            per = _task_rows(net, o.tasks)
            fwd += per[0]
            bwd += per[1]
            peak = max(peak, per[0] // max(1, o.tasks.count(net.data)))
    if net.train and net.train.tasks:
        t = net.train
        s, q = net.data[t.tasks.support].shape[1], net.data[t.tasks.query].shape[1]
        fwd += t.steps * t.batch * (t.inner_steps * s + q)
        bwd += t.steps * t.batch * (t.inner_steps * s + q)
        peak = max(peak, t.batch * (s + q))
    elif net.train:
        t = net.train
        m = net.data[net.losses[t.loss].data].shape[0]
        fwd += t.steps * t.batch
        bwd += t.steps * t.batch
        peak = max(peak, t.batch)
        if t.batch < m and any(o.kind == "history" for o in net.outputs):
            fwd += t.steps * m
            peak = max(peak, m)
    finite = sum({"input": la.cols, "readout": la.rows, "bias": 1}.get(la.role, 0) for la in net.layers.values())
    return Plan(fwd, bwd, hidden, int(finite + hidden * (fwd + bwd)), hidden * bwd, peak)


def _task_rows(net: Network, tasks: object) -> tuple[int, int]:
    """(forward, backward) rows of adapting to every task of `adapted(...)` and predicting its query."""
    count = tasks.count(net.data)
    s, q = net.data[tasks.support].shape[1], net.data[tasks.query].shape[1]
    k = net.train.inner_steps
    return count * (k * s + q), count * k * s


def _forward_sets(net: Network, phase: str) -> list[str]:
    """The data sets whose forward pass a phase needs (features at init for feature_change)."""
    sets = []
    for o in net.outputs:
        if o.phase == phase and o.kind in ("predict", "features", "feature_change"):
            sets.append(o.data)
        if o.phase == phase and o.kind == "loss":
            sets.append(net.losses[o.loss].data)
        if phase == "init" and o.kind == "feature_change" and net.train:
            sets.append(o.data)
    return list(dict.fromkeys(sets))
