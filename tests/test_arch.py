"""Normalised and residual architectures (programs/arch): `layernorm`, `rmsnorm` and residual
blocks in network programs, with the `nngp(f, X)` and `ntk(f, X)` outputs.

- the limit kernels against an independent NumPy recursion written here (arc-cosine closed forms
  from tests/helpers.py;
  in the limit a norm divides h by sqrt(K(x, x) + eps), and its NTK term by the same factor at x and
  at x'), to 1e-9;
- tpc's finite width against a hand-written torch module of resnet_ln.tp on the same weights (the
  prediction, and each seed's empirical NNGP and NTK by torch.autograd), to round-off;
- finite widths converging to the limit (rms error slope in [-0.75, -0.25]);
- the muP program: direct training equals the unrolled program at the same width and seeds, and
  its limit runs by particles (near width 512), and `tpc emit-torch`'s train() equals `tpc run`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import tpc
from tests.helpers import arccos_matrix as relu_pair
from tests.helpers import emitted_train_outputs
from tpc.compare import fit_slope
from tpc.train.dense import loops_finite
from tpc.train.pooled import run_unrolled_finite

ARCH = Path(__file__).resolve().parent.parent / "programs" / "arch"


# ---------------------------------------------------------------- the limit, by a recursion

def normalised(K: np.ndarray, T: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:  # noqa: N803
    """layernorm / rmsnorm in the limit: h / sqrt(K(x, x) + eps), per input (mean(h) -> 0,
    mean(h^2) -> K(x, x)); the derivative through the mean and variance drops out of the NTK."""
    s = np.sqrt(np.diag(K) + eps)
    S = np.outer(s, s)  # noqa: N806
    return K / S, T / S


def input_layer(X: np.ndarray, var: float) -> tuple[np.ndarray, np.ndarray]:  # noqa: N803
    """h = U x, U = w ~ N(0, var / d) (a = 0 in NTK): K = var x.x' / d; its NTK term is x.x' (the
    gradient of h_i with respect to w_ij is x_j, no var / d in front)."""
    return var * X @ X.T / X.shape[1], X @ X.T


def resnet_ln_kernels(X: np.ndarray, blocks: int = 4, alpha: float = 0.5, var_u: float = 2.0,  # noqa: N803
                      var_w: float = 2.0, var_v: float = 1.0, eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """h <- h + alpha W relu(layernorm(h)), W = n^-1/2 w, w ~ N(0, var_w); f = V layernorm(h),
    V = n^-1/2 v, v ~ N(0, var_v). TP4's NTK (gradients with respect to w): a layer applied to y adds
    <y, y'>/n times the backward kernel, with no var in front; the backward kernel through W carries
    var_W. So K' = K + alpha^2 var_W E[relu relu], Theta' = Theta + alpha^2 (E[relu relu] + var_W
    E[relu' relu'] Theta_z), on z = layernorm(h)."""
    K, T = input_layer(X, var_u)  # noqa: N806
    for _ in range(blocks):
        Kz, Tz = normalised(K, T, eps)  # noqa: N806
        rr, ss = relu_pair(Kz)
        K = K + alpha**2 * var_w * rr  # noqa: N806
        T = T + alpha**2 * (rr + var_w * ss * Tz)  # noqa: N806
    Kz, Tz = normalised(K, T, eps)  # noqa: N806
    return var_v * Kz, Kz + var_v * Tz  # readout: nngp; its own term <z, z'>/n plus var_V Theta_z


def rmsnorm_mlp_kernels(X: np.ndarray, eps1: float = 1e-5, eps2: float = 0.1, var_u: float = 2.0,  # noqa: N803
                        var_w: float = 2.0, var_v: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """f = V relu(rmsnorm(W relu(rmsnorm(U x, eps1)), eps2)), NTK parametrization."""
    K, T = input_layer(X, var_u)  # noqa: N806
    Kz, Tz = normalised(K, T, eps1)  # noqa: N806
    rr, ss = relu_pair(Kz)
    K, T = var_w * rr, rr + var_w * ss * Tz  # noqa: N806
    Kz, Tz = normalised(K, T, eps2)  # noqa: N806
    rr, ss = relu_pair(Kz)
    return var_v * rr, rr + var_v * ss * Tz


@pytest.mark.parametrize("name", ["resnet_ln", "rmsnorm_mlp"])
def test_limit_kernels_against_the_recursion(name: str) -> None:
    net = tpc.load(ARCH / f"{name}.tp")
    X = net.data["X"]  # noqa: N806
    nngp, ntk = (resnet_ln_kernels if name == "resnet_ln" else rmsnorm_mlp_kernels)(X)
    lim = tpc.limit(net)
    assert set(lim) == {"nngp", "ntk"}
    for key, want in (("nngp", nngp), ("ntk", ntk)):
        assert "monte-carlo" not in lim[key].method and "quadrature" not in lim[key].method, lim[key].method
        np.testing.assert_allclose(lim[key].value, want, rtol=0, atol=1e-9, err_msg=key)


def test_ntk_is_tp4s_and_jacots_differs_by_each_layers_variance() -> None:
    """ntk(f, X) is TP4's kernel (gradients with respect to w^l, which carries the variance); Jacot et
    al.'s, a raw program's tangent_kernel of the same network, weighs layer l's term by var_l (by
    var / d for the input layer). Exact on both sides (arc-cosine closed forms), so to 1e-12."""
    from tpc.train.kernel import layer_kernels

    x = "[[1, 0, 0], [0.6, 0.8, 0], [-1, 1, 2], [0.2, -0.3, 0.1]]"
    net = tpc.loads(f"width n\nparametrization ntk\ndata X = {x}\nlayer U : input n x 3, var = 1.5\n"
                    "layer W : hidden n x n, var = 2\nlayer V : readout 1 x n, var = 0.7\n"
                    "model f(x) = V @ relu(W @ relu(U @ x))\noutput ntk = ntk(f, X)\n")
    raw = tpc.loads(f"width n\ndata X = {x}\nmatrix U : n x 3 ~ N(0, 1.5/3)\nmatrix W : n x n ~ N(0, 2/n)\n"
                    "vector v ~ N(0, 0.7)\nf = v @ relu(W @ relu(U @ X)) / sqrt(n)\n"
                    "output ntk = tangent_kernel(f, X)\n")
    K = layer_kernels(net, ["X"])  # noqa: N806
    jacot = 1.5 / 3 * K.theta["U"] + 2 * K.theta["W"] + 0.7 * K.theta["V"]
    np.testing.assert_allclose(tpc.limit(raw)["ntk"].value, jacot, rtol=0, atol=1e-12)
    np.testing.assert_allclose(tpc.limit(net)["ntk"].value, K.ntk, rtol=0, atol=1e-12)
    assert np.abs(K.ntk - jacot).max() > 0.5  # the two conventions differ here


def test_norms_matter_in_the_recursion() -> None:
    """The recursion is not blind to what the tests above check: the eps of the first rmsnorm and
    the branch multiplier each change the kernels by far more than the tolerance (the first norm's
    eps does not: the second norm undoes the first one's scale, up to its own eps)."""
    net = tpc.load(ARCH / "rmsnorm_mlp.tp")
    X = net.data["X"]  # noqa: N806
    lim = tpc.limit(net)
    assert np.abs(rmsnorm_mlp_kernels(X, eps2=1e-5)[1] - lim["ntk"].value).max() > 1e-3
    res = tpc.limit(tpc.load(ARCH / "resnet_ln.tp"))
    assert np.abs(resnet_ln_kernels(X, alpha=0.6)[1] - res["ntk"].value).max() > 1e-3


# ---------------------------------------------------------------- finite width, by hand

class ResNetLN(torch.nn.Module):
    """resnet_ln.tp written by hand in TP4's NTK parametrization: trained parameters w, layers
    W^l = n^-a_l w^l (a = 0 for U, 1/2 otherwise), w^l = sqrt(var_l / fan_in) * standard normals."""

    def __init__(self, normals: dict[str, torch.Tensor], n: int, alpha: float = 0.5, eps: float = 1e-5) -> None:
        super().__init__()
        self.n, self.alpha, self.eps = n, alpha, eps
        self.u = torch.nn.Parameter(normals["U"] * math.sqrt(2.0 / 3.0))
        self.ws = torch.nn.ParameterList([torch.nn.Parameter(normals[f"W{i}"] * math.sqrt(2.0)) for i in range(1, 5)])
        self.v = torch.nn.Parameter(normals["V"] * 1.0)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        def ln(h: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.layer_norm(h, (self.n,), eps=self.eps)

        h = x @ self.u.T
        for w in self.ws:
            h = h + self.alpha * torch.relu(ln(h)) @ (w / math.sqrt(self.n)).T
        return ln(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.features(x) @ (self.v / math.sqrt(self.n)).T)[:, 0]


def standard_normals(seed: int, shapes: list[tuple[str, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    """tpc's documented draw (tpc/train/finite.py): one generator per seed, each layer's standard
    normals in declaration order."""
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen, dtype=torch.float64) for name, shape in shapes}


def test_resnet_ln_finite_width_equals_a_handwritten_module() -> None:
    n, seeds = 64, 3
    path = ARCH / "resnet_ln.tp"
    source = path.read_text() + "\noutput f0 = f(X)\n"
    net = tpc.loads(source, str(path), ARCH)
    res = tpc.run(net, n, seeds)
    X = torch.tensor(net.data["X"], dtype=torch.float64)  # noqa: N806
    shapes = [("U", (n, 3))] + [(f"W{i}", (n, n)) for i in range(1, 5)] + [("V", (1, n))]
    for s in range(seeds):
        model = ResNetLN(standard_normals(s, shapes), n)
        f = model(X)
        feats = model.features(X).detach()
        nngp = (feats @ feats.T / n).numpy()  # var_V n^-1 <z, z'>: v integrated out
        params = list(model.parameters())
        jac = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(f[i], params, retain_graph=True)])
                           for i in range(len(X))])  # (8, every entry of every w)
        ntk = (jac @ jac.T).numpy()  # c = 0: sum over layers of <df/dw, df'/dw>
        np.testing.assert_allclose(res["f0"].values[s].reshape(-1), f.detach().numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(res["nngp"].values[s], nngp, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(res["ntk"].values[s], ntk, rtol=1e-10, atol=1e-12)
    # the program without the extra output has the same kernels
    plain = tpc.run(tpc.load(path), n, seeds)
    for key in ("nngp", "ntk"):
        np.testing.assert_allclose(plain[key].values, res[key].values, rtol=1e-12, atol=0)


# ---------------------------------------------------------------- finite width -> the limit

@pytest.mark.parametrize("name", ["resnet_ln", "rmsnorm_mlp"])
def test_finite_width_converges_to_the_limit(name: str) -> None:
    """Each seed's empirical kernels approach the limit like n^-1/2; the mean over seeds at the
    largest width agrees with the limit within 5 standard errors plus an O(1/n) allowance."""
    widths, seeds = [128, 256, 512, 1024], 16  # 6 seeds: a slope or a mean off in 1 run of 8
    table = tpc.compare(tpc.load(ARCH / f"{name}.tp"), widths, seeds)
    for key, comp in table.items():
        errors = [r.rms_error for r in comp.rows]
        slope = fit_slope(widths, errors)
        assert -0.75 <= slope <= -0.25, (key, errors, slope)
        assert errors[-1] < errors[0] / 2, (key, errors)  # a factor 8 in width: sqrt(8) = 2.8 expected
        last = comp.rows[-1]
        lim = comp.limit.value
        bias = 3.0 / last.width * max(1.0, float(np.abs(lim).max()))
        assert np.all(np.abs(last.mean - lim) <= 5 * last.stderr + bias), key


# ---------------------------------------------------------------- muP: a trained residual network

def test_mup_direct_training_equals_the_unrolled_program() -> None:
    net = tpc.load(ARCH / "resnet_ln_mup.tp")
    direct = loops_finite(net, 48, 2)
    unrolled = run_unrolled_finite(net, 48, 2)
    assert set(direct) == {"pred", "curve", "move"}
    assert direct["curve"].values.shape == (2, 3) and direct["pred"].values.shape[:2] == (2, 3)
    for name, res in direct.items():
        np.testing.assert_allclose(res.values, unrolled[name], rtol=1e-9, atol=1e-10, err_msg=name)
    assert direct["move"].values.min() > 0  # training moved the features


def test_mup_limit_by_particles() -> None:
    net = tpc.load(ARCH / "resnet_ln_mup.tp")
    lim = tpc.limit(net, particles=2**13, replicates=4)
    assert set(lim) == {"pred", "curve", "move"}
    for name, out in lim.items():
        assert "monte-carlo" in out.method, (name, out.method)
        assert np.all(np.isfinite(out.value)) and out.stderr is not None, name
    curve = lim["curve"].value
    assert curve.shape == (3,) and np.all(np.diff(curve) < 0), curve  # the loss goes down
    assert np.all(lim["move"].value > 0.05)  # muP: the features move in the limit
    # width 512 is near the limit (a loose check; tests/test_convergence.py fits the rate)
    fin = tpc.run(net, 512, 4)
    for name in ("pred", "curve", "move"):
        scale = max(1.0, float(np.abs(lim[name].value).max()))
        assert np.abs(fin[name].mean - lim[name].value).max() < 0.1 * scale, name


def test_mup_emitted_torch_reproduces_tpc_run() -> None:
    """`tpc emit-torch` writes layernorm's moments as plain torch; its train() gives tpc run's
    numbers (width 64, seed 0) to round-off."""
    net = tpc.load(ARCH / "resnet_ln_mup.tp")
    outputs = emitted_train_outputs(net, 64)
    ref = tpc.run(net, 64, 1)
    assert set(outputs) == set(ref)
    for k, res in ref.items():
        np.testing.assert_allclose(outputs[k].detach().numpy(), res.values[0], rtol=1e-10, atol=1e-12, err_msg=k)


ZERO_ROW_NORMS = {
    # the per-position recursion, the lowered program (no positions), and a norm inside a residual
    "positions": ("data X = [[0.3, -1, 0.5, 0.2, 1, -0.4, 0.1, 0.9], [0, 0, 0, 0, 0, 0, 0, 0]]\n"
                  "layer U : conv n x 2, kernel = 3\n", "model f(x[4]) = V @ pool(relu(rmsnorm(conv(U, x), 0)))"),
    "plain": ("data X = [[0.3, -1], [0, 0]]\nlayer U : input n x 2\n", "model f(x) = V @ relu(rmsnorm(U @ x, 0))"),
    "layernorm": ("data X = [[0.3, -1], [0, 0]]\nlayer U : input n x 2\n",
                  "model f(x) = V @ relu(layernorm(U @ x, 0))"),
}


@pytest.mark.parametrize("name", sorted(ZERO_ROW_NORMS))
def test_a_norm_of_zero_is_named_at_the_norm(name: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """eps = 0 and an input row of zeros: 0/0 at every width. Finite width and the limit both name the
    norm (line 5). The limit used to crash in eigh (the recursion) or blame the lowered program's own
    line with a PSD hint; finite width said training diverged, with nothing trained."""
    from tpc.cli import main

    data, model = ZERO_ROW_NORMS[name]
    path = tmp_path / "z.tp"
    path.write_text(f"width n\nparametrization ntk\n{data}layer V : readout 1 x n\n{model}\noutput k = nngp(f, X)\n")
    column = model.index("rmsnorm" if "rmsnorm" in model else "layernorm") + 1
    for argv in (["limit", str(path)], ["run", str(path), "--width", "16", "--seeds", "2"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"z.tp:6:{column}: error: at initialisation, this value of model f on X is not finite" in err, err
        assert "diverged" not in err and "PSD" not in err and "Traceback" not in err
