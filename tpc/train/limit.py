"""The infinite-width limit of a network program: feature learning (r = 0) by the unrolled
Netsor-transpose program of its loops (`pooled.py`), the kernel regime (r > 0) in function space
(`kernel_loops.py`), word2vec's loop on its tables by `tables.py`."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from tpc import memory
from tpc.errors import NumericalError, TpcError
from tpc.train.network import Network

if TYPE_CHECKING:  # the backends (and torch) are imported where the limit runs: `tpc check` needs none
    from tpc.backends.limit.evaluate import LimitOutput


def describe(net: Network, method: str = "auto", particles: int | None = None, replicates: int = 4,
             memory_gb: float | None = None) -> str:
    """What the limit will compute and how, before it runs."""
    cls = net.classification()
    if net.has_tables:
        from tpc.train import cbow

        return cbow.describe(net)
    head = f"{net.param_name}: r = {cls.r:g}, {cls.regime}"
    ours = net.program_classification()
    if ours.trained is not None:  # a training that leaves layers alone has its own r (computed the same way)
        head += f" (this training: r = {ours.r:g}, {ours.regime})"
    refusal = limit_refusal(net)
    if refusal is not None:
        return f"{head}: no limit here: {refusal.message}"
    if not ours.stable:
        return head  # (tpc limit refuses it, naming the conditions that fail)
    if not in_function_space(net):
        from tpc.train.pooled import describe_limit

        return f"{head}: {describe_limit(net, _exact(net, method), particles, replicates)}"
    # function space
    from tpc.train.kernel_loops import affine_in_f0, check_kernel_program

    check_kernel_program(net)
    if net.model.positions > 1:
        head += f"; {_positions_plan(net, memory_gb)}"
    if not net.program.iterations():
        from tpc.train.pooled import KERNELS_ONLY

        return f"{head}: {KERNELS_ONLY}"
    how = ("f_t is affine in f_0 (losses of degree 2 in f): exact means and covariances by a degree-3 cubature "
           "of f_0"
           if affine_in_f0(net) else "f_0 sampled (Monte Carlo)")
    return (f"{head}: the features stay at initialisation; the loops run in function space with each "
            f"layer's limit kernel (closed forms, quadrature, or Monte Carlo with standard errors where neither "
            f"serves); {how}")


def kernel_regime_memory(net: Network, memory_gb: float | None) -> tuple[int, float, tuple[int, int, int] | None]:
    """The kernel-regime limit's bytes, the budget left to the kernels themselves (their recursion's
    blocks, their Monte Carlo), and over positions the recursion's plan (blocks_plan)."""
    from tpc import memory

    points = sum(net.data[d].shape[0] for d in net.point_sets())
    # the kernels (P x P each), and per layer and per state a (samples, P, k) array of f's moves, with
    # 2^14 samples of f_0 or the exact rule's 2 P k cubature points
    k = net.output_dim()
    samples = max(2**14, 2 * points * k)
    need = 8 * (8 * points**2 + samples * points * k * (len(net.layers) + 4))
    kernels_gb = memory.budget_gb(memory_gb) - need / 2**30
    plan = None
    if net.model.positions > 1:
        from tpc.train import position_kernels

        plan = position_kernels.blocks_plan(net, points, kernels_gb if kernels_gb > 0 else None)
        need += plan[2]
    return need, kernels_gb, plan


def _positions_plan(net: Network, memory_gb: float | None = None) -> str:
    """How the kernels of a model over positions are taken, and the memory it needs."""
    import numpy as np

    from tpc import memory
    from tpc.train import position_kernels

    sets = net.point_sets()
    if not sets:
        return "no data"
    X = np.concatenate([net.data[d] for d in sets])  # noqa: N806
    if position_kernels.covered(net, X) is None:
        return "kernels by the model lowered to a Netsor program with one vector per position"
    _, _, plan = kernel_regime_memory(net, memory_gb)
    assert plan is not None
    block, count, need = plan
    by = "" if count == 1 else f" by blocks of {block} inputs ({count} recursions of {2 * block}, within the budget)"
    return (f"kernels by the per-position recursion over {len(X)}^2 input pairs x {net.model.positions}^2 "
            f"position pairs{by}, about {memory.gb(need)}")


def in_function_space(net: Network) -> bool:
    """The limit of this training is taken in function space (the kernel regime's backend): its
    parametrization is in the kernel regime, or the training itself is (one that leaves every layer
    below the readout alone: random features, r infinite, the features never move, and training the
    readout is kernel descent with the features' kernel, exactly). Otherwise the unrolled program
    takes it: the limit of any stable training whose updates keep their scale (loops.py refuses one
    that grows)."""
    cls = net.classification()
    if cls.regime in ("kernel", "trivial"):
        return True
    ours = net.program_classification()
    if ours.trained is None or ours.regime not in ("kernel", "trivial") or net.entrywise or net.has_tables:
        return False
    from tpc.train.kernel_loops import check_kernel_program

    try:
        check_kernel_program(net)  # (a decay term: the unrolled program takes it)
    except TpcError:
        return False
    return True


def limit_refusal(net: Network) -> TpcError | None:
    """What tpc's limits do not cover: entrywise updates (Adam, sign-SGD), and attention logits
    q.k / sqrt(n) of a model over positions (`model f(x[P])`)."""
    return entrywise_refusal(net) or _positions_refusal(net)


def entrywise_refusal(net: Network) -> TpcError | None:
    """Entrywise updates have a limit in the feature-learning regime (pooled.py's grids, Tensor
    Programs IVb); in the kernel regime their training is no kernel descent, and tpc has no rule."""
    ewise = next((ins for ins in net.program.walk() if ins.op == "ewise"), None) if net.program else None
    if ewise is None or net.classification().regime in ("feature learning", "unstable"):
        return None
    return TpcError(f"this training has entrywise updates (Adam, sign-SGD) in the {net.classification().regime} "
                    "regime: an entrywise function of the gradient is not a kernel step, and tpc takes their limit "
                    "in the feature-learning regime only (r = 0, e.g. parametrization mup); finite width runs "
                    "(tpc run)", ewise.span)


def _positions_refusal(net: Network) -> TpcError | None:
    """What the limit of a model over positions (`model f(x[P])`) does not cover: attention logits
    q.k / sqrt(n). With q.k / n, the unrolled program takes attention and pooling through the
    feature-learning limit (the logits are finite at the natural scale), and the kernel regime and
    `nngp`/`ntk` lower the model to a Netsor program with one vector per position, the logits as
    moments and the softmax as a nonlinearity of them (kernel.py)."""
    if net.model.positions == 1 or net.attention == 1.0 or not any(s.op == "attend" for s in net.model.steps):
        return None
    if net.classification().regime == "feature learning":
        return TpcError("attention logits q.k / sqrt(n) grow like sqrt(n) once q and k correlate, so this "
                        "training has no limit; muP divides by n (`attention = 1`, the default)", net.param_span)
    return TpcError("attention logits q.k / sqrt(n) stay random at initialisation (a CLT sum, not a Tensor Program "
                    "moment: Hron et al. 2020), so the kernels have no closed form here; with q.k / n they are "
                    f"(`parametrization {net.param_name}(attention = 1)`); finite width runs", net.param_span)


def _exact(net: Network, method: str) -> bool:
    linear = net.is_linear() and not net.entrywise
    if method == "exact" and not linear:
        why = "entrywise updates (Adam, sign-SGD)" if net.entrywise else "a nonlinearity"
        raise TpcError(f"--method exact: this training has {why}, so its limit is taken by Monte Carlo; use "
                       "--method auto or monte-carlo")
    if method not in ("auto", "exact", "monte-carlo"):
        raise TpcError(f"--method {method}: a training limit is exact (linear models) or monte-carlo")
    return linear and method in ("auto", "exact")


def network_limit(net: Network, method: str = "auto", particles: int | None = None, replicates: int | None = None,
                  seed: int = 0, memory_gb: float | None = None, force: bool = False,
                  progress: Callable[[int, int], None] | None = None, device: str = "cpu") -> dict[str, LimitOutput]:
    from tpc.backends import device as on_device

    on_device.check(device)
    memory_gb = on_device.memory_gb(device, memory_gb)
    cls = net.program_classification()  # a training that leaves layers alone: its own conditions
    if not cls.stable:
        what = "the parametrization is" if cls.trained is None else "this training is"
        raise TpcError(f"{what} unstable (its limit blows up): {'; '.join(cls.failed)}",
                       net.param_span).locate(net.filename, net.source)
    refusal = limit_refusal(net)
    if refusal is not None:
        raise refusal.locate(net.filename, net.source)
    if net.has_tables:  # word2vec: its loop on coefficient tables
        from tpc.train.tables import tables_limit

        if method not in ("auto", "exact"):
            raise TpcError(f"--method {method}: word2vec's limit is exact (its coefficient tables); use --method "
                           "auto or exact").locate(net.filename, net.source)

        return tables_limit(net, device=device, progress=progress, memory_gb=memory_gb, force=force)
    if not in_function_space(net):
        from tpc.train.pooled import loops_limit

        try:
            return loops_limit(net, _exact(net, method), particles, replicates, seed, memory_gb, force, progress,
                               device)
        except NumericalError:  # named in the unrolled program: first, a model not finite at initialisation
            from tpc.train.dense import blame_initial

            for d in net.point_sets():
                blame_initial(net, net.data[d], d)
            raise
    from tpc.train.kernel_loops import loops_kernel_limit

    if method != "auto":  # not silently ignored: nothing below takes it
        raise TpcError(f"--method {method}: the kernel regime's limit takes each kernel by the method that fits it "
                       "(closed forms, quadrature or Monte Carlo, as `tpc limit` prints) and its training exactly or "
                       "from sampled f_0; use --method auto").locate(net.filename, net.source)
    points = sum(net.data[d].shape[0] for d in net.point_sets())
    replicates = replicates or 8  # the kernels' own Monte Carlo, where one is needed: evaluate_limit's default
    try:
        need, kernels_gb, _ = kernel_regime_memory(net, memory_gb)
        # where Monte Carlo serves the kernels, each replicate's kernels are kept to carry their error into
        # the trained outputs (a few copies of every layer's P x P kernel), within the budget only
        spread = 3 * 8 * replicates * points**2 * (len(net.layers) + 2)
        keep = need + spread <= memory.budget_gb(memory_gb) * 2**30
        memory.require(need + (spread if keep else 0), f"the kernel-regime limit over {points} inputs", memory_gb,
                       force)
    except TpcError as err:
        raise err.locate(net.filename, net.source) from None
    return loops_kernel_limit(net, seed=seed, particles=particles or 2**16, replicates=replicates,
                              memory_gb=kernels_gb if kernels_gb > 0 else memory_gb, force=force, device=device,
                              keep_replicates=keep)
