"""The infinite-width limit of a network program: feature learning (r = 0) by the unrolled
Netsor-transpose program, the kernel regime (r > 0) by kernel gradient descent."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from tpc import memory
from tpc.errors import TpcError
from tpc.train.network import Network
from tpc.train.plan import Plan, is_linear_model, plan

if TYPE_CHECKING:  # the backends (and torch) are imported where the limit runs: `tpc check` needs none
    from tpc.backends.limit.evaluate import LimitOutput


def describe(net: Network, method: str = "auto", particles: int = 2**16, replicates: int = 4) -> str:
    """What the limit will compute and how, before it runs."""
    cls = net.classification()
    if net.train and net.train.optimizer == "cbow":
        from tpc.train import cbow

        return cbow.describe(net)
    head = f"{net.param_name}: r = {cls.r:g}, {cls.regime}"
    if net.program is not None and cls.regime == "feature learning":
        from tpc.train.pooled import describe_limit

        return f"{head}: {describe_limit(net, _exact(net, method), particles, replicates)}"
    if net.program is not None and cls.regime in ("kernel", "trivial"):
        from tpc.train.kernel_loops import affine_in_f0, check_kernel_program

        check_kernel_program(net)
        how = ("f_t is affine in f_0 (squared error): exact means and covariances by a degree-3 cubature of f_0"
               if affine_in_f0(net) else "f_0 sampled (Monte Carlo)")
        return (f"{head}: the features stay at initialisation; the loops run in function space with each "
                f"layer's limit kernel (closed forms or quadrature); {how}")
    if cls.regime == "feature learning":
        p = plan(net)
        exact = _exact(net, method)
        size = p.gaussians + 1 if exact else particles
        mem = p.memory_bytes(size) / 2**30
        steps = net.train.steps if net.train else 0
        return (f"{head}: SGD unrolled over {steps} step(s) into a Netsor-transpose program; "
                f"{p.describe(exact, particles, replicates)}; about {mem:.2g} GB")
    if cls.regime in ("kernel", "trivial"):
        return (f"{head}: the features stay at initialisation; kernel gradient descent with the limit "
                "NNGP and NTK of the initial network (closed forms or quadrature)")
    return head


def _exact(net: Network, method: str) -> bool:
    linear = is_linear_model(net)
    if method == "exact" and not linear:
        raise TpcError("--method exact: this model has a nonlinearity, so its limit is taken by Monte Carlo; use "
                       "--method auto or monte-carlo")
    if method not in ("auto", "exact", "monte-carlo"):
        raise TpcError(f"--method {method}: a training limit is exact (linear models) or monte-carlo")
    return linear and method in ("auto", "exact")


def network_limit(net: Network, method: str = "auto", particles: int = 2**16, replicates: int | None = None,
                  seed: int = 0, memory_gb: float | None = None, force: bool = False,
                  progress: Callable[[int, int], None] | None = None) -> dict[str, LimitOutput]:
    import torch

    from tpc.backends.limit.evaluate import LimitOutput
    from tpc.train import cbow
    from tpc.train.kernel import kernel_limit
    from tpc.train.unroll import LimitSpace, run

    cls = net.classification()
    if not cls.stable:
        raise TpcError(f"the parametrization is unstable (its limit blows up): {'; '.join(cls.failed)}",
                       net.param_span).locate(net.filename, net.source)
    if net.program is not None and cls.regime == "feature learning":
        from tpc.train.pooled import loops_limit

        return loops_limit(net, _exact(net, method), particles, replicates, seed, memory_gb, force, progress)
    if net.program is not None:
        from tpc.train.kernel_loops import loops_kernel_limit

        points = sum(net.data[d].shape[0] for d in net.point_sets())
        # per layer and per state a (samples, P, k) array; the cubature takes 2 P k samples
        need = 8 * (8 * points**2 + 2**14 * points * net.output_dim() * (len(net.layers) + 4))
        try:
            memory.require(need, f"the kernel-regime limit over {points} inputs", memory_gb, force)
        except TpcError as err:
            raise err.locate(net.filename, net.source) from None
        return loops_kernel_limit(net, seed=seed, particles=particles, replicates=replicates or 8,
                                  memory_gb=memory_gb, force=force)
    if net.train and net.train.optimizer == "cbow":
        m = cbow.basis_size(net) if cls.regime == "feature learning" else 0
        if m:
            try:
                memory.require(cbow.memory_bytes(net, m), f"the word2vec limit (two tables over {m} basis vectors)",
                               memory_gb, force, net.train.span)
            except TpcError as err:
                raise err.locate(net.filename, net.source) from None
        return cbow.cbow_limit(net, progress=progress)
    if cls.regime != "feature learning":
        points = sum(net.data[d].shape[0] for d in net.point_sets())
        # the NNGP, the NTK, the layers' kernels and f_t's affine map (P x P each), and samples of f_0
        need = 8 * (8 * points**2 + 2**14 * points * net.output_dim())
        try:
            memory.require(need, f"the kernel-regime limit over {points} inputs", memory_gb, force)
        except TpcError as err:
            raise err.locate(net.filename, net.source) from None
        # the kernels' own Monte Carlo, where one is needed, keeps evaluate_limit's 8 replicates by default
        return kernel_limit(net, seed=seed, particles=particles, replicates=replicates or 8,
                            memory_gb=memory_gb, force=force)
    p: Plan = plan(net)
    exact = _exact(net, method)
    size = p.gaussians + 1 if exact else particles
    try:
        memory.require(p.memory_bytes(size), f"the unrolled limit ({p.gaussians} Gaussian vectors over {size} "
                       f"{'basis elements' if exact else 'particles'})", memory_gb, force,
                       net.train.span if net.train else None, hint="fewer particles or steps")
    except TpcError as err:
        raise err.locate(net.filename, net.source) from None
    runs = []
    count = 1 if exact else max(2, replicates or 4)
    steps = net.train.steps if net.train else 0
    with torch.no_grad():
        for r in range(count):
            def step_done(done: int, _total: int, r: int = r) -> None:
                if progress:
                    progress(r * steps + done, count * steps)
            runs.append(run(net, LimitSpace(net, exact, size, seed + r), step_done))
    out = {}
    for o in net.outputs:
        stack = np.stack([r[o.name].double().numpy() for r in runs])
        if exact:
            out[o.name] = LimitOutput(stack[0], "exact")
        else:
            out[o.name] = LimitOutput(stack.mean(0), "monte-carlo", stack.std(0, ddof=1) / np.sqrt(len(runs)))
    return out
