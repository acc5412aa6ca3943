"""Autodiff and the neural tangent kernel: the backward program against torch.autograd at
finite width, and the limit against the standard NTK recursion (Jacot et al. 2018)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import tpc
from tests.helpers import arccos_matrix
from tpc.ops import expr as ex
from tpc.passes.autodiff import derivative

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "programs" / "kernels"
X8 = np.loadtxt(ROOT / "programs" / "kernels" / "data" / "inputs8x3.csv", delimiter=",")
WITH_NTK = ["relu_mlp", "erf_mlp", "gelu_mlp", "rnn_erf"]


# network programs (programs/train, programs/word2vec, programs/arch) are checked against autograd in
# test_training.py, test_arch.py and test_model_moments.py
PROGRAMS = sorted(p for p in (ROOT / "programs").rglob("*.tp") if p.parent.name not in ("train", "word2vec", "arch"))


def differentiable_targets(prog: tpc.Program) -> list[int]:
    """Readouts, and scalar outputs that are moments (or scalar functions of moments)."""
    out = [n.id for n in prog.nodes() if n.op == "readout" and prog.node(n.inputs[0]).op == "vector"]
    for nid in prog.outputs.values():
        node = prog.node(nid)
        if node.kind == "scalar" and node.op in ("moment", "nonlin") and len(node.shape) <= 1 \
                and not node.params.get("derived") and not node.params.get("text"):
            out.append(nid)
    return out[:3]


def autograd_kernel(prog: tpc.Program, target: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(tpc's finite-width tangent kernel of `target`, the same from torch.autograd on the same
    sampled network): sum over parameters P of var(P entries) * <df_a/dP, df_b/dP>; for a
    moment tpc's kernel is n times that (its gradients are n df/dz)."""
    from tpc.passes.autodiff import backward, tangent_kernel

    grads = backward(prog, target, None)
    prog.outputs["tpc_tk"] = tangent_kernel(prog, target, grads, None)
    prog.outputs["tpc_f"] = target
    module = tpc.torch_module(prog, width=width, seeds=[3])
    out = module()
    kernel = out["tpc_tk"][0].detach().numpy()
    if prog.node(target).op != "readout":
        kernel = kernel / width
    fs = out["tpc_f"][0].reshape(-1)
    params = dict(module.named_parameters())
    var = {}
    for node in prog.nodes():
        if node.op == "matrix" and node.name in params:
            var[node.name] = node.params["var"] / (width if node.params["role"] == "hidden" else 1)
        elif node.op == "vector" and node.name in params:
            _, group = prog.group_of(node.id)
            k = group.members.index(node.id)
            var[node.name] = group.cov[k, k]
    jac = []
    for a in range(fs.shape[0]):
        grads_a = torch.autograd.grad(fs[a], [params[k] for k in var], retain_graph=True, allow_unused=True)
        jac.append([torch.zeros_like(params[k]) if g is None else g for g, k in zip(grads_a, var, strict=True)])
    # vectors declared together are v = mean + L w: the kernel w.r.t. w is J^T Sigma J
    names = list(var)
    cov = {(p, q): (var[p] if p == q else 0.0) for p in names for q in names}
    for group in prog.groups:
        for j, a in enumerate(group.members):
            for k, c in enumerate(group.members):
                pa, pc = prog.node(a).name, prog.node(c).name
                if pa in var and pc in var:
                    cov[pa, pc] = group.cov[j, k]
    b = len(jac)
    want = np.zeros((b, b))
    for i in range(b):
        for j in range(b):
            want[i, j] = sum(float(cov[p, q] * (jac[i][names.index(p)] * jac[j][names.index(q)]).sum())
                             for p in names for q in names if cov[p, q] != 0)
    return kernel.reshape(b, b), want


@pytest.mark.parametrize("path", PROGRAMS, ids=[p.stem for p in PROGRAMS])
def test_gradients_match_torch_autograd(path: Path) -> None:
    """Every bundled program: the backward program's gradients with respect to every weight,
    at finite width, against torch.autograd on the same network, to float64 round-off."""
    targets = differentiable_targets(tpc.load(path))
    assert targets, "no differentiable output"
    for target in targets:
        prog = tpc.load(path)  # a fresh graph per target
        got, want = autograd_kernel(prog, target, 48)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12, err_msg=prog.node(target).name)


def test_grad_of_readout_vector_matches_autograd() -> None:
    src = (KERNELS / "relu_mlp.tp").read_text() + "\noutput gv = gram(grad(f, v))\noutput ff = f\n"
    prog = tpc.loads(src, "relu_grad.tp", KERNELS)
    module = tpc.torch_module(prog, width=64, seeds=[0])
    out = module()
    jac = [torch.autograd.grad(out["ff"][0, a], module.v, retain_graph=True)[0][0] for a in range(8)]
    want = torch.stack([torch.stack([(ja * jb).sum() for jb in jac]) for ja in jac])
    # gram(grad(f, v)) = mean(d_v_a d_v_b) with d_v = sqrt(n) df/dv, i.e. <df_a/dv, df_b/dv>
    np.testing.assert_allclose(out["gv"][0].detach().numpy(), want.detach().numpy(), rtol=1e-12)


def k_erf(k: np.ndarray) -> np.ndarray:
    """E erf(u) erf(v) over the kernel k (Williams 1997)."""
    d = 1 + 2 * np.diag(k)
    return 2 / np.pi * np.arcsin(2 * k / np.sqrt(np.outer(d, d)))


def k_derf(k: np.ndarray) -> np.ndarray:
    """E erf'(u) erf'(v)."""
    d = 1 + 2 * np.diag(k)
    return 4 / np.pi / np.sqrt(np.outer(d, d) - 4 * k**2)


def arccos(k: np.ndarray, degree: int) -> np.ndarray:
    return arccos_matrix(k)[1 - degree]  # degree 1: E[relu relu], degree 0: E[relu' relu']


def test_relu_ntk_is_the_standard_recursion() -> None:
    """Theta_1 = Sigma_1 = (2/3) X X^T; Theta_{l+1} = Sigma_{l+1} + s2 Theta_l E[phi' phi'];
    the readout has variance 1."""
    out = tpc.limit(tpc.load(KERNELS / "relu_mlp.tp"))
    sigma = 2 / 3 * X8 @ X8.T
    theta = sigma.copy()
    for s2 in (2.0, 2.0, 1.0):  # W2, W3, then the readout
        theta = s2 * arccos(sigma, 1) + s2 * theta * arccos(sigma, 0)
        sigma = s2 * arccos(sigma, 1)
    assert out["ntk"].method == "exact+closed-form"
    np.testing.assert_allclose(out["ntk"].value, theta, rtol=1e-12, atol=1e-14)


def test_erf_ntk_is_the_standard_recursion() -> None:
    out = tpc.limit(tpc.load(KERNELS / "erf_mlp.tp"))
    sigma = 1.5 / 3 * X8 @ X8.T
    theta = sigma.copy()
    for s2 in (1.5, 1.0):
        theta = s2 * k_erf(sigma) + s2 * theta * k_derf(sigma)
        sigma = s2 * k_erf(sigma)
    assert out["ntk"].method == "exact+closed-form"
    np.testing.assert_allclose(out["ntk"].value, theta, rtol=1e-12, atol=1e-14)


def test_gelu_ntk_by_independent_quadrature() -> None:
    from tests.test_limits import gh2

    def gelu(x: np.ndarray) -> np.ndarray:
        return x * 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))

    def dgelu(x: np.ndarray) -> np.ndarray:
        return 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2))) + x * np.exp(-x * x / 2) / math.sqrt(2 * math.pi)

    out = tpc.limit(tpc.load(KERNELS / "gelu_mlp.tp"))
    sigma = X8 @ X8.T / 3
    theta = sigma.copy()
    for s2 in (1.0, 1.0):
        theta = s2 * gh2(gelu, sigma) + s2 * theta * gh2(dgelu, sigma)
        sigma = s2 * gh2(gelu, sigma)
    np.testing.assert_allclose(out["ntk"].value, theta, rtol=1e-4, atol=1e-6)


def test_rnn_ntk_against_a_direct_recursion() -> None:
    """The erf RNN by hand: NNGP through time, and the NTK summing every use of U and W."""
    prog = tpc.load(KERNELS / "rnn_erf.tp")
    out = tpc.limit(prog)
    xs = [np.asarray(prog.node(prog.node(i).id).params["value"]) for i in range(3)]

    s2w = 1.5
    pre = xs[0] @ xs[0].T  # covariance of the pre-activation of h1
    theta = pre.copy()  # NTK of the pre-activation w.r.t. everything before
    for x in xs[1:]:
        h = k_erf(pre)
        theta = s2w * h + s2w * k_derf(pre) * theta + x @ x.T
        pre = s2w * h + x @ x.T
    nngp = k_erf(pre)
    ntk = nngp + k_derf(pre) * theta
    np.testing.assert_allclose(out["nngp"].value, nngp, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(out["ntk"].value, ntk, rtol=1e-12, atol=1e-14)


def test_derivative_rules() -> None:
    t = ex.Apply("mul", (ex.Arg(0), ex.Apply("tanh", (ex.Arg(1),))))
    assert derivative(t, 0) == ex.Apply("tanh", (ex.Arg(1),))
    assert ex.render(derivative(t, 1), ["a", "b"]) == "a * (1 - square(tanh(b)))"
    assert derivative(t, 2) == ex.Const(0.0)


def test_backward_is_hidden_unless_asked() -> None:
    prog = tpc.load(KERNELS / "relu_mlp.tp")
    short = tpc.print_program(prog)
    full = tpc.print_program(prog, backward=True)
    assert "W3.T" not in short and "backward instructions" in short
    assert "W3.T d_t9" in full and "W2.T" in full


def test_the_ntk_of_one_input_is_one_number_per_seed() -> None:
    """f on one input (data without a batch): its tangent kernel is a number per seed, at finite
    width as in the limit, and in the emitted module. The input layer's term X X^T was a 1 x 1 array
    there, which broadcast the seeds into an S x S table of which each row was every seed's value
    (the emit-torch fuzz found it). Linear, NTK convention (each term carries its parameter's
    variance, as the recursion above): Theta = s2_v Sigma (readout) + s2_v Sigma (input), with
    Sigma = (s2_U / 3) |x|^2."""
    source = """width n
data X1 = [-0.4, -0.7, -0.2]
matrix U : n x 3 ~ N(0, 1.5/3)
vector r ~ N(0, 2)
f = r @ (U @ X1) / sqrt(n)
output k = tangent_kernel(f)
"""
    prog = tpc.loads(source)
    x2 = 0.4**2 + 0.7**2 + 0.2**2
    exact = 2 * (1.5 / 3 * x2) * 2
    lim = tpc.limit(prog)["k"]
    assert np.shape(lim.value) == () and lim.value == pytest.approx(exact, rel=1e-12)
    fin = tpc.run(prog, 2048, 6)["k"]
    assert fin.values.shape == (6,)
    assert abs(fin.mean - exact) < 5 * fin.stderr + 1e-3
    module = tpc.torch_module(prog, width=2048, seeds=list(range(6)))
    emitted = module(X1=torch.tensor([-0.4, -0.7, -0.2], dtype=torch.float64))["k"]
    np.testing.assert_allclose(emitted.detach().numpy(), fin.values, rtol=1e-12)


def test_a_gradient_that_is_one_vector_for_every_input_keeps_the_batch() -> None:
    """f = r . W (1.45 h) / sqrt(n) on a batch of 2: df_i/dh_i = 1.45 W.T r for every input, one
    vector, but a batch of 2 in the program (autodiff's d_h), so gram(d_h, d_h) is 2 x 2 at finite
    width as in the limit (it was 1 x 1 per seed in tpc run and emit-torch; the shape fuzz found
    it). Its limit is 1.45^2 * 0.74 * 1.85 in every entry (E[(W.T r)^2] = s2_W E[r^2])."""
    source = """width n
data X = [[-0.9, -0.7], [-1.2, 1]]
matrix U : n x 2 ~ N(0, 1.11/2)
h = U @ X
matrix W : n x n ~ N(0, 0.74/n)
vector r ~ N(0, 1.85)
f = r @ (W @ (1.45 * h)) / sqrt(n)
output k = gram(grad(f, h))
output m = mean(grad(f, h) * grad(f, h))
"""
    prog = tpc.loads(source)
    exact = 1.45**2 * 0.74 * 1.85
    lim = tpc.limit(prog)
    np.testing.assert_allclose(lim["k"].value, np.full((2, 2), exact), rtol=1e-12)
    np.testing.assert_allclose(lim["m"].value, np.full(2, exact), rtol=1e-12)
    fin = tpc.run(prog, 2048, 6)
    assert fin["k"].values.shape == (6, 2, 2) and fin["m"].values.shape == (6, 2)
    assert np.all(np.abs(fin["k"].mean - exact) < 5 * fin["k"].stderr + 1e-3)
    module = tpc.torch_module(prog, width=256, seeds=[0, 1])
    emitted = module()["k"].detach().numpy()
    np.testing.assert_allclose(emitted, tpc.run(prog, 256, 2)["k"].values, rtol=1e-12)
    # the batch is forward()'s, not the program's: three other rows, and one (the expansion was a
    # literal 2, which broke on other data)
    for rows in ([[-0.9, -0.7], [-1.2, 1], [0.3, 0.2]], [[0.5, 0.5]]):
        other = module(X=torch.tensor(rows, dtype=torch.float64))
        assert other["k"].shape == (2, len(rows), len(rows)) and other["m"].shape == (2, len(rows))


def test_a_sampled_tangent_kernel_is_symmetric() -> None:
    """Over a correlated group the cross Grams of the NTK's terms are sampled entry by entry, so the
    kernel came out slightly asymmetric (by 1e-3, within its standard error); it is the mean of itself
    and its transpose, symmetric like the kernel (found by a reviewer)."""
    prog = tpc.loads("""width n
data X = [[1, 0, 0], [0.6, 0.8, 0], [-1, 1, 2]]
matrix U : n x 3 ~ N(0, 1)
vector g1, g2 ~ N([1, 0.5], [[1, 0.8], [0.8, 2]])
vector v ~ N(0, 1)
h = U @ X
f = v @ (g1 * relu(h) + g2 * tanh(h)) / sqrt(n)
output ntk = tangent_kernel(f, X)
""")
    lim = tpc.limit(prog, particles=2**12, replicates=2)["ntk"]
    assert "monte-carlo" in lim.method
    np.testing.assert_array_equal(lim.value, lim.value.T)
    one = tpc.loads(prog.source.replace("[[1, 0, 0], [0.6, 0.8, 0], [-1, 1, 2]]", "[1, 0.5, 0]"))  # one input
    assert np.shape(tpc.limit(one, particles=2**10, replicates=2)["ntk"].value) == ()
