"""Losses: finite functions of the model's outputs on a batch, shared by every backend.

`F` is (..., B, k): any leading axes (seeds), B rows of the data, k outputs. A loss returns
(...,): the average over the B rows. Conventions:
- mse(f(X), Y) = mean over rows of 1/2 |f(x) - y|^2 (the gradient is (f - y) / B);
- xent(f(X), Y) = mean over rows of -log softmax(f(x))[y], Y class labels 0..k-1 or one-hot;
- logistic(f(X), Y) = mean over rows of log(1 + exp(-s f(x))), s = +1 for labels 1, -1 for 0 or -1;
- user losses: expressions in mean(...) and sum(...), each over every entry (rows and outputs) of a
  coordinatewise expression in f(X) and data.
"""

from __future__ import annotations

import numpy as np
import torch

from tpc.errors import TpcError
from tpc.ops import expr as ex
from tpc.ops.functions import FUNCTIONS
from tpc.ops.shapes import broadcast_shapes
from tpc.train.network import Loss

Tensor = torch.Tensor


def _tree(tree: ex.Tree, args: list[Tensor], reduce_dims: tuple[int, ...] = ()) -> Tensor:
    """Evaluate without in-place tricks: autograd runs through this. A loss's `mean_all` and
    `sum_all` reduce over `reduce_dims` (the rows and outputs)."""
    if isinstance(tree, ex.Arg):
        return args[tree.index]
    if isinstance(tree, ex.Const):
        return torch.tensor(tree.value, dtype=args[0].dtype, device=args[0].device)
    if tree.fn in ("mean_all", "sum_all"):
        inner = _tree(tree.args[0], args)
        inner = inner.expand(broadcast_shapes(inner.shape, args[0].shape))
        return inner.mean(reduce_dims) if tree.fn == "mean_all" else inner.sum(reduce_dims)
    return FUNCTIONS[tree.fn].torch(*[_tree(a, args, reduce_dims) for a in tree.args])


def loss_value(loss: Loss, F: Tensor, data: dict[str, np.ndarray], rows: np.ndarray) -> Tensor:  # noqa: N803
    """The loss on the data rows `rows` given the model's outputs F (..., B, k) on them."""
    def arr(name: str) -> Tensor:
        a = np.asarray(data[name], dtype=np.float64)
        if a.ndim:
            a = a[rows]
        return torch.as_tensor(a, dtype=F.dtype, device=F.device)

    k = F.shape[-1]
    if loss.kind == "mse":
        y = arr(loss.target).reshape(len(rows), k)
        return 0.5 * ((F - y) ** 2).sum(-1).mean(-1)
    if loss.kind == "xent":
        y = arr(loss.target)
        if y.ndim == 2 and y.shape[1] == k and k > 1:
            onehot = y.reshape(len(rows), k)
        else:  # labels: a loop may pick rows of data that no check saw (the fuzz found one_hot's traceback)
            bad = y[~((y >= 0) & (y < k) & (y == torch.round(y)))]
            if bad.numel():
                raise TpcError(f"xent targets are class labels 0..{k - 1} (or one-hot rows); these include "
                               f"{float(bad.reshape(-1)[0]):g}", loss.span)
            onehot = torch.nn.functional.one_hot(y.reshape(-1).long(), k).to(F.dtype)
        return -(onehot * torch.log_softmax(F, dim=-1)).sum(-1).mean(-1)
    if loss.kind == "logistic":
        s = torch.where(arr(loss.target).reshape(-1) > 0, 1.0, -1.0).to(F.dtype)
        return torch.nn.functional.softplus(-s * F[..., 0]).mean(-1)
    f = F[..., 0] if k == 1 else F
    # with one output f(X) is a vector of B numbers: data of B x 1 (checked in network.py) is read as B
    args = [f] + [arr(name).reshape(len(rows)) if k == 1 and data[name].ndim == 2 else arr(name)
                  for name in loss.args[1:]]
    return _tree(loss.tree, args, tuple(range(-(1 if k == 1 else 2), 0)))


def loss_gradient(loss: Loss, F: Tensor, data: dict[str, np.ndarray], rows: np.ndarray) -> tuple[Tensor, Tensor]:  # noqa: N803
    """(the loss (...,), dL/dF (..., B, k)): every leading slice is its own loss."""
    with torch.enable_grad():
        f = F.detach().requires_grad_(True)
        value = loss_value(loss, f, data, rows)
        (grad,) = torch.autograd.grad(value.sum(), f)
    return value.detach(), grad


def batch_rows(step: int, batch: int, m: int) -> np.ndarray:
    """Fixed mini-batches: step t uses rows tB, ..., tB + B - 1 (mod m), in order."""
    return (np.arange(batch) + step * batch) % m
