"""Pieces several test files share: the arc-cosine closed forms that independent kernel
recursions are written with, a network's initial weights as the finite backends draw them, the
tangent kernel from full Jacobians (torch.func, not tpc's own rule), and running the standalone
file that `tpc emit-torch` writes."""

from __future__ import annotations

import inspect

import numpy as np
import torch

import tpc
from tpc.train.finite import forward, init_std, standard_normals


def arccos_pair(kab: np.ndarray, kaa: np.ndarray, kbb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """E[relu(u) relu(v)] and E[relu'(u) relu'(v)] for a centred Gaussian pair with variances kaa,
    kbb and covariance kab, elementwise (Cho & Saul 2009); a cosine within round-off of +-1 is
    taken as exactly +-1 (arccos(1 - ulp) would be 1e-8)."""
    sd = np.sqrt(kaa * kbb)
    cos = np.clip(kab / sd, -1, 1)
    cos = np.where(np.abs(cos) > 1 - 4e-15, np.sign(cos), cos)
    theta = np.arccos(cos)
    return sd * (np.sin(theta) + (np.pi - theta) * cos) / (2 * np.pi), (np.pi - theta) / (2 * np.pi)


def arccos_matrix(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`arccos_pair` over the entries of one covariance matrix."""
    d = np.diag(k)
    return arccos_pair(k, d[:, None], d[None, :])


def initial_weights(net: tpc.Network, width: int, seeds: list[int]) -> dict[str, torch.Tensor]:
    """Each seed's W^l = n^-a w^l, as the finite backends draw them (init_std is W's)."""
    normals = standard_normals(net, width, seeds, torch.float64, "cpu")
    return {k: normals[k] * init_std(net, la, width) for k, la in net.layers.items()}


def jacobian_ntk(net: tpc.Network, width: int, seed: int) -> np.ndarray:
    """sum_l n^-c <df/dw^l, df'/dw^l> averaged over the k outputs, on the data set X, from the full
    Jacobian of f with respect to the trained w^l (W^l = n^-a w^l); a fixed `matrix` or `vector` is
    no parameter, so it has no term."""
    x = torch.as_tensor(net.data["X"])
    mult = {k: width ** (-net.ab(la)[0]) for k, la in net.layers.items()}
    w0 = {k: v / mult[k] for k, v in initial_weights(net, width, [seed]).items()}
    fixed = {k: w0.pop(k) for k, la in net.layers.items() if la.fixed}

    def f(ws: dict[str, torch.Tensor]) -> torch.Tensor:
        return forward(net, {k: mult[k] * v for k, v in {**ws, **fixed}.items()}, x)[-1][0]  # (B, k)

    rows, k = len(x), net.output_dim()
    theta = np.zeros((rows, rows))
    for jac in torch.func.jacrev(f)(w0).values():
        j = jac.reshape(rows, k, -1).numpy()
        theta += width ** (-net.abc.c) * np.einsum("bjp,cjp->bc", j, j) / k
    return theta


def emitted_train_outputs(net: tpc.Network, width: int) -> dict[str, torch.Tensor]:
    """The outputs of `tpc emit-torch`'s file for a program trained by loops: its Network at `width`,
    seed 0, trained by its train() on the program's data (a `train` statement's file has another
    train(), of its hyperparameters, returning the loss history)."""
    from tpc.backends.torch.emit_network import program_arrays

    source = tpc.torch_source(net)
    assert "import tpc" not in source and "from tpc" not in source
    namespace: dict = {}
    exec(compile(source, "<emitted>", "exec"), namespace)  # noqa: S102 - tpc's own output
    model = namespace["Network"](width, seed=0)
    data = program_arrays(net)
    names = list(inspect.signature(namespace["train"]).parameters)[1:-1]
    outputs: dict = {}
    namespace["train"](model, *[torch.tensor(data[k]) for k in names], outputs=outputs)
    return outputs


def assert_direct_equals_unrolled(net: tpc.Network, width: int, seeds: int) -> dict:
    """Direct training in torch and the unrolled Netsor-transpose program at the same width and
    seeds give every output to round-off; returns the direct results."""
    from tpc.train.dense import loops_finite
    from tpc.train.pooled import run_unrolled_finite

    direct = loops_finite(net, width, seeds)
    unrolled = run_unrolled_finite(net, width, seeds)
    for name, res in direct.items():
        np.testing.assert_allclose(res.values, unrolled[name], rtol=1e-9, atol=1e-10, err_msg=name)
    return direct
