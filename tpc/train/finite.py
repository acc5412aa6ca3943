"""Finite width: a network program's weights in torch, vectorised over seeds (every weight has a
leading seed axis), on any device. The training itself is the program's loops, run by
`interp.py` on `dense.py`'s backend (word2vec's tables: on `tables.py`'s).

Seed s draws every layer's standard normals from its own generator, in declaration order, so
the unrolled program (`pooled.py`) can rebuild the same initial network.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from tpc.backends.torch.run import FiniteResult
from tpc.errors import TpcError
from tpc.train.network import Layer, Network, Step

Tensor = torch.Tensor


def shape_of(layer: Layer, width: int) -> tuple[int, ...]:
    if layer.role == "bias":
        return (width,)
    return tuple(width if d is None else int(d) for d in (layer.weight_rows, layer.cols))


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
    """Every step's value; `weights` are the W^l (S, *shape). Vectors are (S, B, n) (B*P rows over
    positions), the output (S, B, k). Each op's rule is `_finite_<op>` below (tpc/train/steps.py)."""
    from tpc.train.steps import STEPS

    vals: list[Tensor] = []
    for step in net.model.steps:
        vals.append(STEPS[step.op].finite(step, vals, weights, x, net))
    return vals


def _finite_input(step: Step, vals: list[Tensor], weights: dict[str, Tensor], x: Tensor, net: Network) -> Tensor:
    from tpc.train import positions

    P = net.model.positions  # noqa: N806 - over positions: one row per (input, position), (B*P, d)
    if not step.pos:
        return x
    return positions.patches(x.reshape(x.shape[0] * P, x.shape[-1] // P), step.patches, net.model.grid)


def _finite_bias(step: Step, vals: list[Tensor], weights: dict[str, Tensor], x: Tensor, net: Network) -> Tensor:
    return weights[step.layer][:, None, :]


def _finite_matmul(step: Step, vals: list[Tensor], weights: dict[str, Tensor], x: Tensor, net: Network) -> Tensor:
    w = weights[step.layer]
    arg = vals[step.args[0]]
    if arg.dim() == 2:  # the data (B, d) times the input layer (S, n, d)
        return torch.einsum("bd,snd->sbn", arg, w)
    la = net.layers[step.layer]
    if la.flattens:  # V @ flatten(h): each input's P rows side by side
        rows = arg.reshape(arg.shape[0], -1, la.taps * arg.shape[-1])
        return rows @ w.reshape(w.shape[0], -1, la.taps * w.shape[-1]).transpose(-1, -2)
    return arg @ w if step.transposed else arg @ w.transpose(-1, -2)  # rows: h W.T is (W h)^T


def _finite_fn(step: Step, vals: list[Tensor], weights: dict[str, Tensor], x: Tensor, net: Network) -> Tensor:
    from tpc.train.losses import _tree

    return _tree(step.tree, [vals[i] for i in step.args])


def _finite_moment(step: Step, vals: list[Tensor], weights: dict[str, Tensor], x: Tensor, net: Network) -> Tensor:
    return vals[step.args[0]].mean(-1, keepdim=True)  # (S, B, 1): one number per input


def _finite_pool(step: Step, vals: list[Tensor], weights: dict[str, Tensor], x: Tensor, net: Network) -> Tensor:
    from tpc.train import positions

    return positions.pool(vals[step.args[0]], net.model.steps[step.args[0]].positions)


def _finite_shift(step: Step, vals: list[Tensor], weights: dict[str, Tensor], x: Tensor, net: Network) -> Tensor:
    from tpc.train import positions

    return positions.shift(vals[step.args[0]], step.offset, step.grid)


def _finite_window(step: Step, vals: list[Tensor], weights: dict[str, Tensor], x: Tensor, net: Network) -> Tensor:
    from tpc.train import positions

    return positions.window(vals[step.args[0]], net.model.steps[step.args[0]].grid, step.window)


def _finite_attend(step: Step, vals: list[Tensor], weights: dict[str, Tensor], x: Tensor, net: Network) -> Tensor:
    from tpc.train import positions

    q, k, v = (vals[i] for i in step.args)
    n, P, H = q.shape[-1], step.positions, step.heads  # noqa: N806
    check_heads(step, n)

    def gram(a: Tensor, b: Tensor) -> Tensor:
        return a @ b.transpose(-1, -2) / n

    # a head's logits: q_h . k_h / (n/H)^e over its n/H coordinates
    a = positions.weights(q, k, P, gram, float((n / H) ** (1 - net.attention)), H)
    return positions.attend(a, v, P, H)


def check_heads(step: Step, width: int) -> None:
    if width % step.heads:
        raise TpcError(f"width {width} does not split into {step.heads} heads: give a width that is a multiple "
                       f"of {step.heads}", step.span)


def bytes_per_seed(net: Network, width: int, itemsize: int) -> int:
    """A generous estimate of one seed's memory at width `width`."""
    if net.has_tables:
        from tpc.train.cbow import memory_bytes

        return memory_bytes(net, width, itemsize)
    from tpc.train.dense import bytes_per_seed as dense_bytes

    return dense_bytes(net, width, itemsize)


def train_finite(net: Network, width: int, seeds: int, dtype: str = "float64", device: str = "cpu",
                 first_seed: int = 0, memory_gb: float | None = None, force: bool = False,
                 progress: Callable[[int], None] | None = None,
                 on_step: Callable[[int, int], None] | None = None) -> dict[str, FiniteResult]:
    """Every output of the network program at width `width` for seeds first_seed...; training runs
    SGD on the trained parameters w^l (W^l = n^-a_l w^l) with learning rate lr n^-c. `progress`
    counts finished seeds, `on_step(done, steps)` the SGD steps of the current chunk of seeds."""
    from tpc.backends import device as on_device

    for step in net.model.steps:  # before anything runs
        if step.op == "attend":
            try:
                check_heads(step, width)
            except TpcError as err:
                raise err.locate(net.filename, net.source) from None
    on_device.check(device)
    memory_gb = on_device.memory_gb(device, memory_gb)  # on CUDA: the device's memory, not the host's
    if net.has_tables:  # word2vec: its loop runs on tables of word vectors, not dense layers
        from tpc.train.tables import tables_finite

        return tables_finite(net, width, seeds, dtype, device, first_seed, progress, on_step, memory_gb, force)
    from tpc.train.dense import loops_finite  # every other program's training is loops (train/loops.py)

    return loops_finite(net, width, seeds, dtype, device, first_seed, memory_gb, force, progress, on_step)
