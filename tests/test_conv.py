"""Convolutions over positions: `shift(h, s)` on a sequence and `shift(h, dy, dx)` on a grid (zero
beyond the edges), one hidden layer per tap. Checked against torch's conv1d and conv2d on the same
weights, against an NNGP and NTK recursion written here (Novak et al. 2019's per-position
recursion: a tap's layer pairs position p of one input with position q of the other after both
move by its offset), direct against unrolled training, and finite widths against the limit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import tpc
from tests.helpers import (
    arccos_pair,
    assert_direct_equals_unrolled,
    emitted_train_outputs,
    initial_weights,
    jacobian_ntk,
)
from tpc.train.finite import forward

# 3 sequences of 5 positions with 2 numbers each; a 3-tap convolution (taps A, B, C at -1, 0, +1)
SEQ = """width n
parametrization {param}
data X = [[1, 0.5, -0.3, 0.2, 0.9, -1, 0.4, 0.1, 0.3, -0.2], [0.2, -0.8, 0.5, 1, -0.4, 0.3, 0.7, -0.6, 0.1, 0.5],
          [0.9, 0.1, -0.5, 0.6, 0.2, -0.3, -1, 0.4, 0.8, 0]]
data Y = [1, -1, 0.5]
layer U : input n x 2, var = 2
layer A : hidden n x n, var = 0.7
layer B : hidden n x n, var = 0.7
layer C : hidden n x n, var = 0.6
layer V : readout 1 x n
nonlin conv(h) = A @ shift(h, -1) + B @ h + C @ shift(h, 1)
model f(x[5]) = V @ pool(relu(conv(relu(U @ x))))
"""
SEQ_TAPS = [((-1,), "A", 0.7), ((0,), "B", 0.7), ((1,), "C", 0.6)]
# 2 images of 3 x 3 one-number pixels; a 2 x 2 convolution (taps at offsets 0 and 1 on each axis)
GRID = """width n
parametrization {param}
data X = [[1, 0.5, -0.3, 0.2, 0.9, -1, 0.4, 0.1, 0.3], [0.2, -0.8, 0.5, 1, -0.4, 0.3, 0.7, -0.6, 0.1]]
data Y = [1, -1]
layer U : input n x 1, var = 2
layer A : hidden n x n, var = 0.5
layer B : hidden n x n, var = 0.5
layer C : hidden n x n, var = 0.5
layer D : hidden n x n, var = 0.5
layer V : readout 1 x n
nonlin conv(h) = A @ h + B @ shift(h, 0, 1) + C @ shift(h, 1, 0) + D @ shift(h, 1, 1)
model f(x[3, 3]) = V @ pool(relu(conv(relu(U @ x))))
"""
GRID_TAPS = [((0, 0), "A", 0.5), ((0, 1), "B", 0.5), ((1, 0), "C", 0.5), ((1, 1), "D", 0.5)]
KERNELS = "output K = nngp(f, X)\noutput T = ntk(f, X)\n"
LOOP = """output before = f(X)
for t in range(2) {
  L = mse(f(X), Y)
  record curve = L
  f -= 0.5 * grad(L, f)
}
output pred = f(X)
output move = feature_change(f, X)
"""


def test_a_sequence_convolution_is_torchs_conv1d() -> None:
    net = tpc.loads(SEQ.format(param="ntk") + KERNELS)
    w = initial_weights(net, 32, [0])
    x = torch.as_tensor(net.data["X"]).reshape(3, 5, 2)
    got = forward(net, w, x.reshape(3, 10))[-1][0]
    h = torch.relu(x @ w["U"][0].T).transpose(1, 2)  # (B, n, positions)
    kernel = torch.stack([w["A"][0], w["B"][0], w["C"][0]], dim=-1)  # tap k reads position p + k - 1
    z = torch.relu(torch.nn.functional.conv1d(h, kernel, padding=1))
    want = z.mean(-1) @ w["V"][0].T
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_a_grid_convolution_is_torchs_conv2d() -> None:
    net = tpc.loads(GRID.format(param="mup") + KERNELS)
    w = initial_weights(net, 16, [0])
    x = torch.as_tensor(net.data["X"]).reshape(2, 3, 3, 1)
    got = forward(net, w, x.reshape(2, 9))[-1][0]
    h = torch.relu(x @ w["U"][0].T).permute(0, 3, 1, 2)  # (B, n, 3, 3)
    kernel = torch.stack([torch.stack([w["A"][0], w["B"][0]], -1), torch.stack([w["C"][0], w["D"][0]], -1)], -2)
    z = torch.relu(torch.nn.functional.conv2d(torch.nn.functional.pad(h, (0, 1, 0, 1)), kernel))
    want = z.mean((-1, -2)) @ w["V"][0].T
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _shifted(m: np.ndarray, offset: tuple[int, ...], grid: tuple[int, ...]) -> np.ndarray:
    """m[a, b, p, q] -> m[a, b, p + s, q + s], zero where either leaves the grid."""
    lead = m.shape[:2]
    g = m.reshape(*lead, *grid, *grid)
    out = np.zeros_like(g)
    src, dst = [], []
    for s, size in zip(offset, grid, strict=True):
        src.append(slice(max(s, 0), size + min(s, 0)))
        dst.append(slice(max(-s, 0), size - max(s, 0)))
    out[(..., *dst, *dst)] = g[(..., *src, *src)]
    return out.reshape(m.shape)


def _recursion(x: np.ndarray, var_u: float, taps: list, grid: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """NNGP and NTK (NTK parametrization, TP4's convention: a layer's own term has no variance) of
    V pool(relu(sum_taps W_s shift(relu(U x), s))) with x (B, P, d)."""
    d = x.shape[-1]
    dots = np.einsum("apd,bqd->abpq", x, x)

    def relu_pair(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        diag = np.einsum("aapp->ap", k)
        return arccos_pair(k, diag[:, None, :, None], diag[None, :, None, :])

    k1, t1 = var_u * dots / d, dots
    e1, d1 = relu_pair(k1)
    k2 = sum(var * _shifted(e1, s, grid) for s, _, var in taps)
    t2 = sum(_shifted(e1, s, grid) + var * _shifted(d1 * t1, s, grid) for s, _, var in taps)
    e2, d2 = relu_pair(k2)
    return e2.mean((2, 3)), e2.mean((2, 3)) + (d2 * t2).mean((2, 3))


@pytest.mark.parametrize(("program", "taps", "grid", "shape"),
                         [(SEQ, SEQ_TAPS, (5,), (3, 5, 2)), (GRID, GRID_TAPS, (3, 3), (2, 9, 1))])
def test_kernels_equal_a_recursion_written_here(program: str, taps: list, grid: tuple[int, ...],
                                                shape: tuple[int, ...]) -> None:
    net = tpc.loads(program.format(param="ntk") + KERNELS)
    lim = tpc.limit(net)
    nngp, ntk = _recursion(net.data["X"].reshape(shape), 2.0, taps, grid)
    assert lim["T"].method == "exact+closed-form"
    np.testing.assert_allclose(lim["K"].value, nngp, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(lim["T"].value, ntk, rtol=1e-9, atol=1e-12)


def test_empirical_ntk_is_the_jacobians() -> None:
    net = tpc.loads(GRID.format(param="ntk") + KERNELS)
    got = tpc.run(net, 12, 1)
    np.testing.assert_allclose(got["T"].values[0], jacobian_ntk(net, 12, 0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("param", ["mup", "ntk"])
def test_direct_equals_unrolled(param: str) -> None:
    net = tpc.loads(SEQ.format(param=param) + LOOP)
    direct = assert_direct_equals_unrolled(net, 24, 2)
    assert np.abs(direct["pred"].values - direct["before"].values).max() > 1e-3  # it trained


def test_emitted_torch_reproduces_tpc_run() -> None:
    net = tpc.loads(GRID.format(param="mup") + LOOP)
    assert "shift" not in tpc.torch_source(net).split("def forward")[1].split("return")[0]  # plain torch
    emitted = emitted_train_outputs(net, 16)
    ours = tpc.run(net, 16, 1)
    for name, res in ours.items():
        np.testing.assert_allclose(emitted[name].detach().numpy(), res.values[0], rtol=1e-10, atol=1e-12, err_msg=name)


def test_feature_learning_limit_and_convergence() -> None:
    """muP training of the sequence convolution: each seed's predictions approach the particle
    limit (16 times the width: about 4 times smaller errors, allowing for the seeds' noise)."""
    net = tpc.loads(SEQ.format(param="mup") + LOOP)
    lim = tpc.limit(net, particles=2**13, replicates=2)["pred"]
    errors = [float(np.sqrt(((tpc.run(net, w, 4)["pred"].values - lim.value) ** 2).mean())) for w in (32, 512)]
    assert errors[1] < errors[0] / 2, errors


RESIDUAL = SEQ.replace("layer V : readout 1 x n\n", "layer b : bias n, var = 0.3\nlayer V : readout 1 x n\n").replace(
    "model f(x[5]) = V @ pool(relu(conv(relu(U @ x))))",
    "model f(x[5]) = V @ (0.5 * pool(erf(conv(erf(U @ x)) + b) + erf(U @ x)) - pool(shift(erf(U @ x), 2)))")


@pytest.mark.parametrize(("program", "param"), [(SEQ, "ntk"), (GRID, "mup"), (GRID, "sp"), (RESIDUAL, "ntk")])
def test_the_recursion_equals_the_lowered_program(program: str, param: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-position recursion (position_kernels.py) against the model lowered to a Netsor program
    with one vector per position, which the limit evaluator takes: the same kernels, per layer."""
    from tpc.train import kernel, position_kernels

    net = tpc.loads(program.format(param=param) + KERNELS)
    assert position_kernels.covered(net, net.data["X"]) is not None
    fast = kernel.layer_kernels(net, ["X"])
    monkeypatch.setattr(position_kernels, "covered", lambda net, x: None)
    slow = kernel.layer_kernels(net, ["X"])
    for name in ("nngp", "features", "ntk"):  # the NTK in one pass (nothing trains)
        np.testing.assert_allclose(getattr(fast, name), getattr(slow, name), rtol=1e-10, atol=1e-13, err_msg=name)
    factors = {layer: kernel.limit_factor(kernel.term_exponent(net, layer)) for layer in net.layers}
    _, _, per_layer = position_kernels.Recursion(net, net.data["X"]).kernels(factors, per_layer=True)
    for layer in net.layers:
        np.testing.assert_allclose(per_layer[layer], slow.theta[layer], rtol=1e-10, atol=1e-13, err_msg=layer)
    assert np.abs(fast.ntk).max() > 0.1


def test_without_a_closed_form_the_lowered_program_serves() -> None:
    """erf of one value and relu of another meet in the readout: E[erf(u) relu(v)] has no closed form
    here, so the kernels come from the lowered program (numerically, with its label and error)."""
    mixed = RESIDUAL.replace("pool(shift(erf(U @ x), 2))", "pool(shift(relu(U @ x), 2))")
    lim = tpc.limit(tpc.loads(mixed.format(param="ntk") + KERNELS), particles=2**12, replicates=2)
    assert "monte-carlo" in lim["T"].method and lim["T"].stderr is not None
    assert np.isfinite(lim["T"].value).all()


# a transposed use, which the recursion leaves to the lowered program
TIED = """width n
parametrization {param}
data X = [[1, 0.5, -0.3], [0.2, -0.8, 0.5], [0.9, 0.1, -0.5]]
layer U : input n x 3, var = 2
layer W : hidden n x n, var = 2
layer V : readout 1 x n
model f(x) = V @ (tanh(W @ relu(U @ x)) * relu(W.T @ relu(U @ x)))
"""


@pytest.mark.parametrize("program", [SEQ, TIED])
def test_the_nngp_alone_takes_no_backward_pass(program: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`nngp(f, X)` without `ntk(f, X)` builds no kernel term: the lowered program has no backward
    pass (the recursion no layer's term), and the nngp is the same number either way (same particles)."""
    from tpc.train import kernel, position_kernels

    net = tpc.loads(program.format(param="ntk") + KERNELS)
    both = kernel.layer_kernels(net, ["X"], particles=2**12)
    alone = kernel.layer_kernels(net, ["X"], ntk=False, particles=2**12)
    np.testing.assert_allclose(alone.nngp, both.nngp, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(alone.features, both.features, rtol=1e-12, atol=1e-15)
    assert alone.theta == {} and "ntk" not in alone.methods and np.abs(both.ntk).max() > 0.1
    with pytest.raises(ValueError, match="not computed"):
        _ = alone.ntk
    # autodiff appends ordinary instructions: the backward pass's are more transposed products
    nodes = [kernel.lowered_program(net, net.data["X"], ntk=ntk)[0].nodes() for ntk in (False, True)]
    backward = [sum(node.op == "matmul" and bool(node.params.get("transposed")) for node in ns) for ns in nodes]
    assert backward[0] < backward[1] and len(nodes[0]) < len(nodes[1])
    # through tpc.limit: only the nngp asked for, so the recursion runs once with no layer's term
    calls: list[dict] = []
    real = position_kernels.Recursion.kernels

    def spy(self, factors, per_layer=True):  # noqa: ANN001, ANN202
        calls.append(dict(factors))
        return real(self, factors, per_layer)

    monkeypatch.setattr(position_kernels.Recursion, "kernels", spy)
    lim = tpc.limit(tpc.loads(program.format(param="ntk") + "output K = nngp(f, X)\n"), particles=2**12)
    np.testing.assert_allclose(lim["K"].value, both.nngp, rtol=1e-12, atol=1e-15)
    readout = net.readout().name
    assert calls or program is TIED  # the recursion ran for SEQ (TIED's transposes are not covered)
    assert all(f == 0 for c in calls for name, f in c.items() if name != readout)


def test_mup_kernels_alone_run_no_particles(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """In muP a program whose outputs are nngp and ntk alone takes them from the kernels, and its plan
    says so: it ran (and announced) the unrolled program's particle replicates for nothing."""
    from tpc.cli import main
    from tpc.train import pooled
    from tpc.train.kernel import layer_kernels

    monkeypatch.setattr(pooled, "run_pooled", lambda *a, **k: pytest.fail("particles ran"))
    net = tpc.loads(SEQ.format(param="mup") + KERNELS)
    lim = tpc.limit(net)
    K = layer_kernels(net, ["X"])  # noqa: N806
    np.testing.assert_allclose(lim["K"].value, K.nngp, rtol=0, atol=1e-15)
    np.testing.assert_allclose(lim["T"].value, K.ntk, rtol=0, atol=1e-15)
    assert lim["T"].method == "exact+closed-form" and np.abs(K.ntk).max() > 0.1
    path = tmp_path / "k.tp"
    path.write_text(SEQ.format(param="mup") + KERNELS)
    assert main(["limit", str(path)]) == 0
    out = capsys.readouterr()
    assert "kernels at initialisation" in out.out and "particles" not in out.out + out.err
    # kernels by the lowered program (tied weights) take the particles and seed asked for
    tied = tpc.loads(TIED.format(param="mup") + "output K = ntk(f, X)\n")
    few, more = (tpc.limit(tied, particles=p, replicates=2)["K"] for p in (2**10, 2**12))
    assert "monte-carlo" in few.method and np.abs(few.value - more.value).max() > 0
    np.testing.assert_array_equal(tpc.limit(tied, particles=2**10, replicates=2)["K"].value, few.value)
    assert np.abs(tpc.limit(tied, particles=2**10, replicates=3)["K"].value - few.value).max() > 0  # and replicates


def test_the_kernels_memory_is_stated_and_bounded(tmp_path: Path) -> None:
    from tpc.cli import main

    path = tmp_path / "conv.tp"
    path.write_text(GRID.format(param="ntk") + KERNELS)
    assert main(["limit", str(path), "--memory-gb", "1e-6"]) == 2
