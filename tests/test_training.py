"""Training: direct SGD in torch against the unrolled Netsor-transpose program (round-off), the
exact linear muP limit against a direct computation, the kernel regime against the NTK
recursion and a per-seed linearisation, and the limit's plan and refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import tpc
from tpc.cli import main
from tpc.compare import fit_slope
from tpc.errors import TpcError
from tpc.train.kernel import kernels
from tpc.train.pooled import count, run_unrolled_finite
from tpc.train.unrolled import unrolled_loops

ROOT = Path(__file__).resolve().parent.parent
TRAIN = sorted((ROOT / "programs" / "train").glob("*.tp"))

HEADER = """width n
data X = [[1, 0.5], [-0.3, 0.8], [0.2, -1], [0.9, 0.1], [-0.5, -0.5]]
data Xt = [[0.4, 0.4], [-1, 0.2]]
"""
# small programs that exercise what the bundled ones do not
VARIANTS = {
    "xent_bias_minibatch": """parametrization mup
data Y = [0, 1, 2, 1, 0]
layer U : input n x 2
layer b : bias n
layer W : hidden n x n, var = 2
layer V : readout 3 x n
nonlin act(z) = z * sigmoid(z)
model f(x) = V @ act(W @ tanh(U @ x + b) + 0.5 * b)
loss L = xent(f(X), Y)
output p0 = f(Xt)
train sgd(lr = 0.3, steps = 4, batch = 2) minimize L
output p = f(Xt)
output h = history(L)
output final = L
output k = features(f, X)
output move = feature_change(f, X)
""",
    "logistic_mf_user_loss": """parametrization mf(lr = 0.4)
data Y = [1, -1, 1, 1, -1]
layer U : input n x 2, var = 2
layer V : readout 1 x n
model f(x) = V @ relu(U @ x)
loss L = logistic(f(X), Y)
loss Q = mean((f(X) - Y)^2 + 0.1 * abs(f(X)))
train sgd(steps = 3) minimize L
output q = Q
output h = history(L)
""",
    "shared_weights_abc": """parametrization abc(a = [0, 0.5, 1], b = [0, 0, 0], c = -1, lr = 0.2)
data Y = [[1, 0], [0, 1], [1, 1], [0, 0], [0.5, 0.5]]
layer U : input n x 2
layer W : hidden n x n
layer V : readout 2 x n
model f(x) = V @ erf(W @ relu(W @ erf(U @ x)))
loss L = mse(f(X), Y)
train sgd(steps = 3, batch = 3) minimize L
output p = f(Xt)
output L1 = L
""",
    "ntk_user_loss": """parametrization ntk(lr = 0.5)
data Y = [1, -1, 1, 1, -1]
layer U : input n x 2
layer W : hidden n x n
layer V : readout 1 x n
model f(x) = V @ gelu(W @ gelu(U @ x))
loss L = sum((f(X) - Y)^4) / 20
train sgd(steps = 2) minimize L
output p = f(Xt)
""",
}


MAML = """width n
parametrization mup
data P = [[1, 0.5, -0.2], [-0.3, 0.8, 0.4], [0.2, -1, 0.9], [0.9, 0.1, -0.7], [-0.5, -0.5, 0.3], [0.4, 0.6, 0.8]]
data S = [[0, 1], [2, 3], [4, 5], [1, 3]]
data SY = [[0, 1], [1, 0], [0, 1], [1, 0]]
data Q = [[2, 3, 4], [0, 1, 5], [1, 2, 3], [0, 4, 5]]
data QY = [[1, 0, 0], [1, 1, 0], [0, 1, 1], [0, 0, 1]]
layer U : input n x 3
layer V : readout 2 x n
model f(x) = V @ (U @ x)
output a0 = adapted(f, P, S, SY, Q)
train fomaml(lr = 0.7, inner_lr = 1.5, inner_steps = 2, tasks = 2, steps = 3) minimize xent on P, S, SY, Q, QY
output a = adapted(f, P, S, SY, Q)
output p = f(P)
"""
VARIANTS["bias_into_hidden"] = """parametrization mup
data Y = [1, -1, 1, 1, -1]
layer U : input n x 2
layer b : bias n
layer W : hidden n x n
layer V : readout 1 x n
model f(x) = V @ relu(W @ b + U @ x)
loss L = mse(f(X), Y)
train sgd(lr = 0.5, steps = 2) minimize L
output p = f(Xt)
"""
VARIANTS["step_ntk"] = """parametrization ntk(lr = 0.5)
data Y = [1, -1, 1, 1, -1]
layer U : input n x 2
layer W : hidden n x n
layer V : readout 1 x n
model f(x) = V @ step(W @ relu(U @ x))
loss L = mse(f(X), Y)
train sgd(steps = 2) minimize L
output p = f(Xt)
"""
VARIANTS["fomaml_linear"] = MAML.split("\n", 1)[1]
VARIANTS["fomaml_relu_bias"] = MAML.split("\n", 1)[1].replace(
    "model f(x) = V @ (U @ x)", "layer b : bias n\nlayer W : hidden n x n\nmodel f(x) = V @ relu(W @ tanh(U @ x + b))")
VARIANTS["fomaml_ntk"] = VARIANTS["fomaml_relu_bias"].replace("parametrization mup", "parametrization ntk")


def _variant(name: str) -> tpc.Network:
    return tpc.loads(HEADER + VARIANTS[name], f"<{name}>")


CASES = [(p.stem, lambda p=p: tpc.load(p)) for p in TRAIN] + [(k, lambda k=k: _variant(k)) for k in VARIANTS]


@pytest.mark.parametrize("load", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_unrolled_program_equals_direct_training(load) -> None:  # noqa: ANN001
    """Same width, same seeds: SGD on real matrices with autograd, and the unrolled program that
    multiplies only by the initial matrices, agree to round-off for every parametrization."""
    net = load()
    direct = tpc.run(net, 48, 2)
    unrolled = run_unrolled_finite(net, 48, 2)
    assert set(direct) == set(unrolled)
    for name, res in direct.items():
        np.testing.assert_allclose(res.values, unrolled[name], rtol=0, atol=1e-10, err_msg=name)


def test_training_moves_the_outputs() -> None:
    """Guards the test above against a vacuous pass: training does change the predictions."""
    net = _variant("xent_bias_minibatch")
    res = tpc.run(net, 64, 2)
    assert np.abs(res["p"].values - res["p0"].values).max() > 1e-2
    assert np.all(np.diff(res["h"].mean) != 0)


def test_exact_linear_mup_limit_against_a_direct_computation() -> None:
    """linear_mup.tp: every vector lies in the span of U's 3 column Gaussians and v's; the limit
    is linear algebra on their coefficients, written out here independently of tpc."""
    net = tpc.load(ROOT / "programs" / "train" / "linear_mup.tp")
    lim = tpc.limit(net)
    X, Xt, y = net.data["X"], net.data["Xt"], net.data["Y"].reshape(-1)  # noqa: N806
    eta, steps, d = 0.5, 5, 3
    U = np.zeros((d, d + 1))  # noqa: N806 - columns of U as coefficients over (u1, u2, u3, v)
    U[:, :d] = np.eye(d) / np.sqrt(d)  # var 1, fan-in 3
    v = np.zeros(d + 1)
    v[d] = 1.0
    h0 = X @ U
    losses = []
    for _ in range(steps):
        H = X @ U  # noqa: N806 - the hidden vectors of the 4 inputs, (4, 4 coefficients)
        f = H @ v  # E[Z^v Z^h]
        losses.append(0.5 * np.mean((f - y) ** 2))
        chi = (f - y) / len(X)
        dH = np.outer(chi, v)  # noqa: N806 - n dL/dh = chi v
        U, v = U - eta * X.T @ dH, v - eta * chi @ H  # noqa: N806 - muP: both updates at lr eta
    H = X @ U  # noqa: N806
    assert lim["pred"].method == "exact"
    np.testing.assert_allclose(lim["pred"].value, (Xt @ U) @ v, atol=1e-12)
    np.testing.assert_allclose(lim["curve"].value, losses, atol=1e-12)
    np.testing.assert_allclose(lim["final"].value, 0.5 * np.mean((H @ v - y) ** 2), atol=1e-12)
    np.testing.assert_allclose(lim["kernel"].value, H @ H.T, atol=1e-12)
    np.testing.assert_allclose(lim["move"].value, np.linalg.norm(H - h0, axis=1), atol=1e-12)
    assert lim["move"].value.min() > 0.1  # muP: features move by order one


def test_exact_fomaml_limit_against_a_direct_computation() -> None:
    """First-order MAML of a linear network in muP: the limit written out on the coefficients of
    U's columns and V's rows over their 3 + 2 Gaussians, independently of tpc."""
    net = tpc.loads(MAML)
    lim = tpc.limit(net)
    P, S, SY, Q, QY = (net.data[k] for k in ("P", "S", "SY", "Q", "QY"))  # noqa: N806
    S, Q = S.astype(int), Q.astype(int)  # noqa: N806
    d, k = 3, 2
    U = np.hstack([np.eye(d) / np.sqrt(d), np.zeros((d, k))])  # noqa: N806
    V = np.hstack([np.zeros((k, d)), np.eye(k)])  # noqa: N806

    def grads(U, V, x, y):  # noqa: ANN001, ANN202, N803
        h = x @ U
        f = h @ V.T
        p = np.exp(f - f.max(1, keepdims=True))
        chi = (p / p.sum(1, keepdims=True) - np.eye(k)[y.astype(int)]) / len(x)
        return x.T @ (chi @ V), chi.T @ h  # directions of U and V (n dL/dh = chi V)

    def adapt(U, V, t):  # noqa: ANN001, ANN202, N803
        for _ in range(2):
            gu, gv = grads(U, V, P[S[t]], SY[t])
            U, V = U - 1.5 * gu, V - 1.5 * gv  # noqa: N806
        return U, V

    def predictions(U, V):  # noqa: ANN001, ANN202, N803
        return np.stack([(lambda a: (P[Q[t]] @ a[0]) @ a[1].T)(adapt(U, V, t)) for t in range(4)])

    np.testing.assert_allclose(lim["a0"].value, predictions(U, V), atol=1e-12)
    for step in range(3):
        tu, tv = np.zeros_like(U), np.zeros_like(V)
        for t in ((2 * step) % 4, (2 * step + 1) % 4):
            au, av = adapt(U, V, t)
            gu, gv = grads(au, av, P[Q[t]], QY[t])
            tu, tv = tu + gu, tv + gv
        U, V = U - 0.7 * tu / 2, V - 0.7 * tv / 2  # noqa: N806
    assert lim["a"].method == "exact"
    np.testing.assert_allclose(lim["a"].value, predictions(U, V), atol=1e-12)
    np.testing.assert_allclose(lim["p"].value, (P @ U) @ V.T, atol=1e-12)
    assert np.abs(lim["a"].value - lim["a0"].value).max() > 0.1  # meta-training changed something


def test_fomaml_finite_width_converges_to_the_exact_limit() -> None:
    net = tpc.loads(MAML)
    lim = tpc.limit(net)["a"].value
    widths = [64, 256, 1024, 4096]
    errors = [np.sqrt(np.mean((tpc.run(net, w, 8)["a"].values - lim) ** 2)) for w in widths]
    slope = fit_slope(widths, errors)
    assert -0.75 <= slope <= -0.25, (errors, slope)


def _relu_kernels(s11: np.ndarray, var: float) -> tuple[np.ndarray, np.ndarray]:
    """var E[relu(u) relu(u')] and var E[step(u) step(u')] for u ~ N(0, s11) (Cho & Saul)."""
    d = np.sqrt(np.diag(s11))
    cos = np.clip(s11 / np.outer(d, d), -1, 1)
    th = np.arccos(cos)
    relu = np.outer(d, d) / (2 * np.pi) * (np.sin(th) + (np.pi - th) * cos)
    return var * relu, var * (np.pi - th) / (2 * np.pi)


@pytest.mark.parametrize("param", ["ntk", "sp"])
def test_kernel_regime_kernels_against_the_ntk_recursion(param: str) -> None:
    """relu2 in NTK and SP: the NNGP and the training kernel against the arc-cosine recursion.
    SP (lr n^-1) trains the hidden and readout layers only; NTK trains all three."""
    net = tpc.load(ROOT / "programs" / "train" / f"relu2_{param}.tp")
    K = kernels(net)  # noqa: N806
    P = np.concatenate([net.data["X"], net.data["Xt"]])  # noqa: N806 - the order of point_sets
    s1 = 2.0 * P @ P.T / 3  # input layer, var 2, fan-in 3
    x1, d1 = _relu_kernels(s1, 1.0)
    s2 = 2.0 * x1  # hidden layer, var 2
    x2, d2 = _relu_kernels(s2, 1.0)
    nngp = 1.0 * x2  # readout var 1
    g2 = 1.0 * d2  # <dh2, dh2'>/n: v (var 1) times step(h2)
    g1 = 2.0 * g2 * d1  # back through W (var 2) and step(h1)
    theta = x2 + g2 * x1 + (g1 * (P @ P.T) if param == "ntk" else 0.0)
    np.testing.assert_allclose(K.nngp, nngp, atol=1e-10)
    np.testing.assert_allclose(K.theta, 0.5 * theta, atol=1e-10)  # lr 0.5


def test_kernel_regime_is_kernel_gradient_descent_seed_by_seed() -> None:
    """NTK parametrization: each seed's trained predictions approach kernel gradient descent
    started from that seed's own f_0, with error shrinking like n^-1/2."""
    src = HEADER + """parametrization ntk(lr = 0.5)
data Y = [1, -1, 1, 1, -1]
layer U : input n x 2
layer W : hidden n x n
layer V : readout 1 x n
model f(x) = V @ erf(W @ relu(U @ x))
loss L = mse(f(X), Y)
output f0 = f(X)
output f0t = f(Xt)
train sgd(steps = 4) minimize L
output ft = f(Xt)
"""
    net = tpc.loads(src)
    K = kernels(net)  # noqa: N806
    theta, y = K.theta, net.data["Y"]
    lim = tpc.limit(net)
    errors, widths = [], [128, 512, 2048]
    for width in widths:
        res = tpc.run(net, width, 4)
        f = np.concatenate([res["f0"].values, res["f0t"].values], axis=1)  # (seeds, 7)
        for _ in range(4):
            f = f - (f[:, :5] - y) @ theta[:, :5].T / 5
        errors.append(np.sqrt(np.mean((res["ft"].values - f[:, 5:]) ** 2)))
    slope = fit_slope(widths, errors)
    assert -0.75 <= slope <= -0.25, (errors, slope)
    assert errors[-1] < 0.05
    # the limit's mean is the same recursion started from E f_0 = 0
    f = np.zeros(7)
    for _ in range(4):
        f = f - theta[:, :5] @ (f[:5] - y) / 5
    np.testing.assert_allclose(lim["ft"].value, f[5:], atol=1e-12)
    assert lim["ft"].random and lim["ft"].cov.shape == (2, 2)


def test_kernel_regime_non_mse_loss_samples_f0() -> None:
    net = _variant("ntk_user_loss")
    lim = tpc.limit(net)
    assert "monte-carlo" in lim["p"].method and lim["p"].stderr is not None
    res = tpc.run(net, 1024, 64)
    z = np.abs(res["p"].mean - lim["p"].value) / np.sqrt(res["p"].stderr ** 2 + lim["p"].stderr ** 2)
    assert np.all(z < 5), z


def test_plan_counts_gaussians() -> None:
    net = tpc.load(ROOT / "programs" / "train" / "relu2_mup.tp")
    p = count(net)
    # init forward on X (kernel0, feature_change), 3 steps x (4 forward + 4 backward), trained forward
    # on X and Xt: one hidden matrix, so one Gaussian per row; plus U's 3 columns and V's row
    assert (p.plain_rows, p.transposed_rows) == (4 + 12 + 4 + 3, 12)
    assert p.gaussians == 3 + 1 + p.plain_rows + p.transposed_rows
    assert p.stored_rows == 12


def test_limit_refuses_what_would_not_fit(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(ROOT / "programs" / "train" / "relu2_mup.tp")
    assert main(["limit", path, "--memory-gb", "0.001"]) == 2
    err = capsys.readouterr().err
    assert "relu2_mup.tp:" in err and "--force" in err and "Gaussian vectors" in err


def test_unstable_parametrization_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    src = HEADER + """parametrization abc(a = [0, 0], b = [0, 0], c = 0)
layer U : input n x 2
layer V : readout 1 x n
model f(x) = V @ relu(U @ x)
output p = f(Xt)
"""
    with pytest.raises(tpc.TpcError, match="unstable.*a_2 \\+ b_2 >= 1/2"):
        tpc.limit(tpc.loads(src))


@pytest.mark.slow  # 28 s (64 seeds at width 2048): the default run stays under 5 minutes here
def test_step_function_model_trains_only_its_readout() -> None:
    """step has a zero derivative: U and W get no gradient, and the kernel regime keeps only the
    readout's term (the lowering drops the unreachable layers' terms instead of failing)."""
    net = _variant("step_ntk")
    lim = tpc.limit(net)
    res = tpc.run(net, 2048, 64)
    z = np.abs(res["p"].mean - lim["p"].value) / res["p"].stderr
    assert np.all(z < 5), z


def test_overflow_in_the_limit_names_the_layer() -> None:
    src = HEADER + """parametrization mup
data Y = [1, -1, 1, 1, -1]
layer U : input n x 2
layer W : hidden n x n, var = 1e300
layer V : readout 1 x n
model f(x) = V @ relu(W @ relu(U @ x))
loss L = mse(f(X), Y)
train sgd(lr = 0.5, steps = 2) minimize L
output p = f(Xt)
"""
    with pytest.raises(tpc.NumericalError, match="layer W .*overflow"):
        tpc.limit(tpc.loads(src))
    with pytest.raises(tpc.NumericalError, match=":11:1: error: training diverged at step 2"):
        tpc.run(tpc.loads(src), 64, 1)


@pytest.mark.parametrize("how", ["run", "limit", "compare", "kernel"])
def test_a_non_finite_result_is_never_printed(how: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A schedule that is not finite at some step is an error at its line (it was printed as nan,
    exit 0); so is an output after a last step that diverged, or a record that is not finite."""
    param = "ntk" if how == "kernel" else "mup"
    head = HEADER + f"parametrization {param}\n" + """data Y = [1, -1, 1, 1, -1]
layer U : input n x 2
layer V : readout 1 x n
model f(x) = V @ tanh(U @ x)
"""
    command = {"run": ["run", "--width", "32", "--seeds", "2"], "limit": ["limit", "--particles", "1024"],
               "compare": ["compare", "--widths", "32,64", "--seeds", "2", "--particles", "1024"],
               "kernel": ["limit"]}[how]
    cases = {
        "schedule": ("for t in range(3) {\n  eta = 0.5 * sqrt(1 - t)\n  f -= eta * grad(mse(f(X), Y), f)\n}\n"
                     "output p = f(Xt)\n", ":10:15: error: at t = 2, this value is not finite (nan)"),
        "record": ("for t in range(3) {\n  record r = sqrt(f(Xt) * 0 - t)\n  f -= 0.1 * grad(mse(f(X), Y), f)\n}\n"
                   "output r = r\n", ":10:3: error: training diverged at t = 1: the recorded r is not finite"),
    }
    if how in ("run", "compare"):  # at width n; the limit of f_0 = 0 (muP) has no rate^2 term to overflow
        cases["last step"] = ("for t in range(1) {\n  f -= 1e200 * grad(mse(f(X), Y), f)\n}\noutput p = f(Xt)\n",
                              ":12:1: error: output p is not finite: training diverged")
    # inside a loss of nested loops, not recorded: named at the sqrt with both counters, not as divergence
    cases["nested"] = ("for e in range(2) {\n  for t in range(3) {\n    L = mse(f(X), Y) * sqrt(1 - t)\n"
                       "    f -= 0.1 * grad(L, f)\n  }\n}\noutput p = f(Xt)\n",
                       ":11:24: error: at e = 0, t = 2, this value is not finite (nan)")
    # an infinity on the way to a finite number is no error: min(1, 1 / t) is 1 at t = 0
    cases["fine"] = ("for t in range(3) {\n  eta = 0.5 * min(1, 1 / t)\n  f -= eta * grad(mse(f(X), Y), f)\n"
                     "  record e = eta\n}\noutput p = f(Xt)\noutput e = e\n", "")
    for name, (body, where) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.tp"
        # a linear model: the weights of the last step overflow into the outputs (tanh would saturate)
        path.write_text((head.replace("tanh(U @ x)", "(U @ x)") if name == "last step" else head) + body)
        if name == "fine":
            assert main([*command, str(path)]) == 0, capsys.readouterr().err
            capsys.readouterr()
            continue
        assert main([*command, str(path)]) == 2, name
        err = capsys.readouterr().err
        assert where in err and "Traceback" not in err, (name, err)


def test_cli_limit_prints_its_plan_and_classify_reads_a_program(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(ROOT / "programs" / "train" / "linear_mup.tp")
    assert main(["limit", path]) == 0
    out = capsys.readouterr().out
    assert "4 Gaussian vectors" in out and "exactly" in out and "pred [exact]" in out
    assert main(["classify", path, "--json"]) == 0
    import json

    res = json.loads(capsys.readouterr().out)
    assert res["regime"] == "feature learning" and res["r"] == 0 and res["stable"]


def test_fomaml_relu_mup_particle_limit_against_finite_widths() -> None:
    """Beyond TP4: MAML of a ReLU network in muP has no exact limit; its particle limit (with
    standard errors) is what finite widths converge to."""
    net = tpc.loads(MAML.replace("model f(x) = V @ (U @ x)", "model f(x) = V @ relu(U @ x)"))
    lim = tpc.limit(net)["a"]
    assert lim.method == "monte-carlo" and lim.stderr.max() < 0.01
    widths = [64, 256, 1024]
    runs = [tpc.run(net, w, 8)["a"] for w in widths]
    errors = [np.sqrt(np.mean((r.values - lim.value) ** 2)) for r in runs]
    slope = fit_slope(widths, errors)
    assert -0.75 <= slope <= -0.25, (errors, slope)
    gap = np.abs(runs[-1].mean - lim.value)
    assert np.all(gap < 5 * np.sqrt(runs[-1].stderr ** 2 + lim.stderr ** 2) + 0.01), gap.max()


def test_graph_unrolled_lists_the_netsor_transpose_program(capsys: pytest.CaptureFixture[str]) -> None:
    """Hidden matrices appear only as W_0 and W_0.T plus the stored rows; finite layers are updated.
    (The listing is derived from the loop that `train sgd` desugars to; its format changed with it.)"""
    assert main(["graph", "--unrolled", str(ROOT / "programs" / "train" / "relu2_mup.tp")]) == 0
    out = capsys.readouterr().out
    assert out.count("\n# step = ") == 3
    assert "h3.step0 = W_0 @ h2.step0\n" in out
    assert "h3.step2 = a W_0 @ h2.step2 + sum_(p<2) k_p Wdh_p (Wx_p . h2.step2 / n)" in out
    assert "dh2.step1 = a W_0.T @ dh3.step1 + sum_(p<1) k_p Wx_p (Wdh_p . dh3.step1 / n)" in out
    assert "W@f1 @" not in out and "W@f2 @" not in out
    assert "f@3 = f@2 - 0.5 * " in out and "W (hidden): gradient terms n^0" in out
    for program in ("word2vec/cbow_mup.tp", "train/relu2_sp.tp"):
        status = main(["graph", "--unrolled", str(ROOT / "programs" / program)])
        assert status == (2 if "cbow" in program else 0)
    assert "kernel gradient descent" in capsys.readouterr().out
    long = HEADER + """parametrization mup
data Y = [1, -1, 1, 1, -1]
layer U : input n x 2
layer V : readout 1 x n
model f(x) = V @ (U @ x)
loss L = mse(f(X), Y)
train sgd(lr = 0.1, steps = 250) minimize L
output p = f(Xt)
"""
    with pytest.raises(TpcError, match="short runs"):
        unrolled_loops(tpc.loads(long))
    listing = unrolled_loops(tpc.loads(HEADER + """parametrization mup
data Y = [1, -1, 1, 1, -1]
layer U : input n x 2
layer W : hidden n x n
layer V : readout 1 x n
model f(x) = V @ relu(W @ tanh(W @ relu(U @ x)) + U @ x)
loss L = mse(f(X), Y)
train sgd(lr = 0.3, steps = 2, batch = 2) minimize L
output p = f(Xt)
"""))
    assert "Wx_0, Wdh_0 = h2.step0, dh3.step0" in listing and "Wx_1, Wdh_1 = h4.step0, dh5.step0" in listing
    assert "U = X[0..1].T dh1.step0 + X[0..1].T dh6.step0   # d columns" in listing


def test_an_overflow_after_the_last_step_is_named_at_the_output(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """lr 1e200: the one step is finite, the predictions after it overflow in the limit's MatMul. The
    error had no position at all; it is the output's, and says that training came before it."""
    src = (ROOT / "programs" / "train" / "relu2_mup.tp").read_text()
    path = tmp_path / "last.tp"
    path.write_text(src.replace("train sgd(lr = 0.5, steps = 3)", "train sgd(lr = 1e200, steps = 1)").replace(
        '"data/', f'"{ROOT}/programs/train/data/'))
    assert main(["limit", str(path), "--allow-data-outside", "--particles", "1024", "--replicates", "2"]) == 2
    err = capsys.readouterr().err
    assert "last.tp:20:1: error: layer W (line 11): the covariance of this MatMul's Gaussians overflows (after " \
           "training: did it diverge?" in err, err


def test_a_training_runs_memory_estimate_covers_its_measured_peak() -> None:
    """At width 4096 the peaks above a width-64 run measure 5.0 and 16.0 times the weights for
    relu2_mup.tp and adam_relu2_mup.tp (README, "Memory": 0.63 and 2.00 GB); the estimate stated 4
    and 15 before."""
    from tpc.train.dense import bytes_per_seed
    from tpc.train.finite import shape_of

    for name, peak in (("relu2_mup.tp", 5.0), ("adam_relu2_mup.tp", 16.0)):
        net = tpc.load(ROOT / "programs" / "train" / name)
        weights = 8 * sum(int(np.prod(shape_of(la, 4096))) for la in net.layers.values())
        assert bytes_per_seed(net, 4096, 8) >= 1.1 * peak * weights, name
