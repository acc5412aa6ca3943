"""Training loops written in the language: direct torch training (autograd on the weights) against
the unrolled Netsor-transpose program at the same width and seeds (round-off), in every
parametrization; exact limits of linear loops against computations written out here; the kernel
regime of a loop against the NTK recursion; `train sgd` through its loop against the numbers of
the executor it replaced; printing; and refusals before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tpc
from tests.helpers import emitted_train_outputs
from tpc.cli import main
from tpc.errors import TpcError
from tpc.train.dense import loops_finite
from tpc.train.pooled import run_unrolled_finite

ROOT = Path(__file__).resolve().parent.parent
LOOPS = [ROOT / "programs" / "train" / f for f in
         ("momentum_relu2_mup.tp", "wd_cosine_tanh_mup.tp", "two_phase_linear_mup.tp", "relu2_ntk_loop.tp")]

HEADER = """width n
data X = [[1, 0.5], [-0.3, 0.8], [0.2, -1], [0.9, 0.1], [-0.5, -0.5]]
data Y = [1, -1, 1, 1, -1]
data Xt = [[0.4, 0.4], [-1, 0.2]]
"""
MODEL = """layer U : input n x 2, var = 2
layer b : bias n
layer W : hidden n x n, var = 2
layer V : readout 1 x n
model f(x) = V @ tanh(W @ relu(U @ x + b) + 0.5 * b)
"""
# every construct at once: momentum, a schedule, decay, a frozen phase, mini-batches, a copy
BODY = """state M = zeros(f)
output p0 = f(Xt)
for t in range(3) {
  eta = 0.4 * (1 + cos(pi * t / 3)) / 2
  L = mse(f(batch(X, t, 2)), batch(Y, t, 2)) + 0.1 * mean(f(X) ^ 2)
  record loss = L
  M = 0.8 * M + grad(L, f)
  f -= eta * (M + 0.05 * f)
}
for t in range(2) {
  copy g = f
  g -= 0.3 * grad(mse(g(X), Y), g)
  V -= 0.2 * grad(mse(g(Xt), [0.5, -0.5]) + mse(f(X), Y), V)
  record q = g(Xt)
}
output p = f(Xt)
output curve = loss
output q = q
output k = features(f, X)
output move = feature_change(f, X)
"""
PARAMS = ["mup", "sp", "ntk", "abc(a = [0, 0, 0.5], b = [0, 0.5, 0.5], c = 0.5)",
          "abc(a = [0, 0.5, 1], b = [0, 0, 0], c = 1)"]


@pytest.mark.parametrize("path", LOOPS, ids=[p.stem for p in LOOPS])
def test_bundled_loops_direct_equals_unrolled(path: Path) -> None:
    net = tpc.load(path)
    direct = loops_finite(net, 48, 2)
    unrolled = run_unrolled_finite(net, 48, 2)
    for name, res in direct.items():
        np.testing.assert_allclose(res.values, unrolled[name], rtol=1e-9, atol=1e-10, err_msg=name)


@pytest.mark.parametrize("param", PARAMS)
def test_every_construct_direct_equals_unrolled(param: str) -> None:
    body = BODY.replace("[0.5, -0.5]", "Y2").replace("output p0", "data Y2 = [0.5, -0.5]\noutput p0")
    net = tpc.loads(HEADER + f"parametrization {param}\n" + MODEL + body)
    direct = loops_finite(net, 40, 2)
    unrolled = run_unrolled_finite(net, 40, 2)
    assert direct["curve"].values.shape == (2, 3) and direct["q"].values.shape == (2, 2, 2)
    for name, res in direct.items():
        np.testing.assert_allclose(res.values, unrolled[name], rtol=1e-9, atol=1e-10, err_msg=name)
    assert np.abs(direct["p"].values - direct["p0"].values).max() > 1e-5  # training moved the outputs


def test_train_sgd_through_its_loop_keeps_the_numbers_of_the_old_executor() -> None:
    """relu2_mup.tp and relu2_ntk.tp: values printed by tpc 94b8884 (unroll.Unrolled, finite._sgd and
    kernel.kernel_limit) at the same seeds; the loop draws the limit's Gaussians in the same order."""
    net = tpc.load(ROOT / "programs" / "train" / "relu2_mup.tp")
    lim = tpc.limit(net, particles=2**12, replicates=2)
    np.testing.assert_allclose(lim["pred"].value, [0.06957802764351924, -0.20509067331830522, 0.14878512109322029],
                               rtol=1e-9)
    np.testing.assert_allclose(lim["curve"].value, [0.3160997447251002, 0.24043307783522333, 0.1852696219441038],
                               rtol=1e-9)
    np.testing.assert_allclose(lim["move"].stderr, [0.00282163578291056, 0.00912848289087337, 0.01283938877752619,
                                                    0.00091619034973567], rtol=1e-7)
    fin = tpc.run(net, 64, 2)
    np.testing.assert_allclose(fin["curve"].values, [[0.35067292089469626, 0.2739880125172507, 0.22721186046746594],
                                                     [0.32797274988901376, 0.26185931531646145, 0.22005309738768636]],
                               rtol=1e-12)
    np.testing.assert_allclose(fin["pred"].values[1], [0.02385167606707747, -0.21185591540812015, 0.0699390684799667],
                               rtol=1e-12)
    ntk = tpc.limit(tpc.load(ROOT / "programs" / "train" / "relu2_ntk.tp"))["pred"]
    np.testing.assert_allclose(ntk.value, [0.05930528338768344, -0.17173596406869568, 0.14039933462075066],
                               rtol=1e-12)
    np.testing.assert_allclose(np.diag(ntk.cov), [0.16406952808697872, 0.17300091823771896, 0.21509087552901704],
                               rtol=1e-12)


def test_written_sgd_equals_the_train_statement() -> None:
    """The loop a user writes for SGD and the one `train sgd` desugars to compute the same numbers."""
    sugar = tpc.loads(HEADER + "parametrization mup\n" + MODEL + """loss L = mse(f(X), Y)
train sgd(lr = 0.3, steps = 3, batch = 2) minimize L
output p = f(Xt)
output h = history(L)
""")
    written = tpc.loads(HEADER + "parametrization mup\n" + MODEL + """loss L = mse(f(X), Y)
for t in range(3) {
  record h = L
  f -= 0.3 * grad(mse(f(batch(X, t, 2)), batch(Y, t, 2)), f)
}
output p = f(Xt)
output h = h
""")
    for a, b in ((tpc.run(sugar, 32, 2), tpc.run(written, 32, 2)),):
        for k in ("p", "h"):
            np.testing.assert_array_equal(a[k].values, b[k].values)
    la, lb = tpc.limit(sugar, particles=2**10), tpc.limit(written, particles=2**10)
    for k in ("p", "h"):
        np.testing.assert_allclose(la[k].value, lb[k].value, rtol=1e-12, atol=1e-14)


def _linear_direct(phases: list[tuple[int, float, list[str], float, float, float]]) -> dict:
    """f(x) = V (U x) / n in muP, in the limit, written on coefficients over the Gaussians of U's 3
    columns and of v (see test_training.test_exact_linear_mup_limit_against_a_direct_computation).
    Each phase: (steps, lr, trained layers, momentum beta, decay, output penalty)."""
    X = np.loadtxt(ROOT / "programs" / "train" / "data" / "train4x3.csv", delimiter=",")  # noqa: N806
    Xt = np.loadtxt(ROOT / "programs" / "train" / "data" / "test3x3.csv", delimiter=",")  # noqa: N806
    y = np.loadtxt(ROOT / "programs" / "train" / "data" / "targets4.csv", delimiter=",").reshape(-1)
    d = 3
    U = np.hstack([np.eye(d) / np.sqrt(d), np.zeros((d, 1))])  # noqa: N806
    v = np.eye(d + 1)[d]
    mu, mv = np.zeros_like(U), np.zeros_like(v)
    curves = []
    for steps, lr, layers, beta, decay, penalty in phases:
        for _ in range(steps):
            H = X @ U  # noqa: N806
            f = H @ v
            curves.append(0.5 * np.mean((f - y) ** 2) + penalty * np.mean(f**2))
            chi = (f - y) / len(X) + 2 * penalty * f / len(X)
            gu, gv = X.T @ np.outer(chi, v), chi @ H
            mu, mv = beta * mu + gu, beta * mv + gv
            if "U" in layers:
                U = U - lr * (mu + decay * U)  # noqa: N806
            if "V" in layers:
                v = v - lr * (mv + decay * v)
    return {"pred": (Xt @ U) @ v, "curve": np.array(curves)}


def test_linear_loops_exact_against_a_direct_computation() -> None:
    """Momentum, decoupled phases (readout first), decay and a penalty in the loss: the exact limit
    of a linear muP network equals linear algebra on its Gaussians' coefficients, to 1e-10."""
    head = """width n
parametrization mup
data X  = load("data/train4x3.csv")
data Y  = load("data/targets4.csv")
data Xt = load("data/test3x3.csv")
layer U : input n x 3
layer V : readout 1 x n
model f(x) = V @ (U @ x)
"""
    cases = {
        "momentum": ("""state M = zeros(f)
for t in range(5) { L = mse(f(X), Y)  record c = L  M = 0.9 * M + grad(L, f)  f -= 0.3 * M }
""", [(5, 0.3, ["U", "V"], 0.9, 0.0, 0.0)]),
        "phases": ("""for t in range(3) { L = mse(f(X), Y)  record c = L  V -= 0.5 * grad(L, V) }
for s in range(3) { L = mse(f(X), Y) + 0.1 * mean(f(X) ^ 2)  record c2 = L  f -= 0.5 * grad(L, f) }
""", [(3, 0.5, ["V"], 0.0, 0.0, 0.0), (3, 0.5, ["U", "V"], 0.0, 0.0, 0.1)]),
        "decay": ("""for t in range(4) { L = mse(f(X), Y)  record c = L  f -= 0.5 * (grad(L, f) + 0.2 * f) }
""", [(4, 0.5, ["U", "V"], 0.0, 0.2, 0.0)]),
    }
    for name, (loops, phases) in cases.items():
        path = ROOT / "programs" / "train" / f"_loop_test_{name}.tp"
        records = "output c = c\n" + ("output c2 = c2\n" if "c2" in loops else "")
        path.write_text(head + loops + "output pred = f(Xt)\n" + records)
        try:
            lim = tpc.limit(tpc.load(path))
        finally:
            path.unlink()
        want = _linear_direct(phases)
        assert lim["pred"].method == "exact"
        curve = np.concatenate([lim["c"].value] + ([lim["c2"].value] if "c2" in lim else []))
        np.testing.assert_allclose(lim["pred"].value, want["pred"], atol=1e-10, err_msg=name)
        np.testing.assert_allclose(curve, want["curve"], atol=1e-10, err_msg=name)


def test_two_phase_program_exact_limit_is_a_deep_linear_network_limit() -> None:
    """two_phase_linear_mup.tp (an n x n layer, so Zdot terms): exact, and phase 1 moves only the
    readout, so its middle predictions are the readout-only regression on fixed features."""
    lim = tpc.limit(tpc.load(ROOT / "programs" / "train" / "two_phase_linear_mup.tp"))
    assert all(v.method == "exact" for v in lim.values())
    assert np.all(np.diff(lim["phase1"].value) < 0) and np.all(np.diff(lim["phase2"].value) < 0)
    assert lim["move"].value.min() > 0.05  # phase 2 moves the features (muP)


def test_ntk_loop_against_the_ntk_recursion_and_kernel_descent() -> None:
    """relu2_ntk_loop.tp: the limit is kernel gradient descent with the NTK (Jacot et al.; TP4's
    Dichotomy) at each step's warm-up rate; NTK and NNGP from the ReLU arc-cosine recursion."""
    net = tpc.load(ROOT / "programs" / "train" / "relu2_ntk_loop.tp")
    lim = tpc.limit(net)
    ntk, nngp = relu2_ntk_kernels(net)
    check_warmup_kernel_descent(lim, ntk, nngp, net.data["Y"].reshape(-1))
    assert lim["pred"].method == "exact+closed-form"


def relu2_ntk_kernels(net: tpc.Network) -> tuple[np.ndarray, np.ndarray]:
    """The NTK and NNGP of relu2_ntk_loop.tp's model on its training and test points, from the ReLU
    arc-cosine recursion."""
    from tests.test_training import _relu_kernels

    P = np.vstack([net.data["X"], net.data["Xt"]])  # noqa: N806
    s1 = 2.0 * P @ P.T / 3  # input layer, var 2, fan-in 3
    x1, d1 = _relu_kernels(s1, 1.0)
    x2, d2 = _relu_kernels(2.0 * x1, 1.0)  # hidden layer, var 2
    g2 = d2  # <dh2, dh2'> / n: v times step(h2)
    g1 = 2.0 * g2 * d1  # back through W (var 2) and step(h1)
    return x2 + g2 * x1 + g1 * (P @ P.T), x2  # readout, hidden and input layers' terms; readout var 1


def test_a_quadratic_loss_in_the_kernel_regime_is_exact() -> None:
    """Squared error plus an output penalty 0.3 mean(f(X)^2) is of degree 2 in f: its gradient is affine,
    so f_t is affine in f_0 and the cubature rule is exact (it was sampled: only mse counted). Against
    kernel descent by hand, with a record of degree 3, E[f^3] = mu^3 + 3 mu sigma^2 (a Gaussian f)."""
    src = (ROOT / "programs" / "train" / "relu2_ntk_loop.tp").read_text()
    src = src.replace("L = mse(f(X), Y)", "L = mse(f(X), Y) + 0.3 * mean(f(X) ^ 2)").replace(
        "record loss = L", "record loss = L\n  record cube = mean(f(Xt) ^ 3)").replace(
        "output curve = loss", "output curve = loss\noutput cube = cube")
    net = tpc.loads(src, "penalty.tp", ROOT / "programs" / "train")
    lim = tpc.limit(net)
    assert all(lim[k].method == "exact+closed-form" and lim[k].stderr is None for k in ("pred", "curve", "cube"))
    ntk, nngp = relu2_ntk_kernels(net)
    y = net.data["Y"].reshape(-1)
    m, P = len(y), len(ntk)  # noqa: N806
    mean, A = np.zeros(P), np.eye(P)  # noqa: N806
    curve, cube = [], []
    for t in range(4):
        var = np.diag(A @ nngp @ A.T)
        curve.append(0.5 * np.mean((mean[:m] - y) ** 2 + var[:m]) + 0.3 * np.mean(mean[:m] ** 2 + var[:m]))
        cube.append(np.mean(mean[m:] ** 3 + 3 * mean[m:] * var[m:]))
        rate = 0.5 * min(1, (t + 1) / 2)
        mean = mean - rate * ntk[:, :m] @ (1.6 * mean[:m] - y) / m
        A = A - rate * 1.6 * ntk[:, :m] @ A[:m] / m  # noqa: N806
    np.testing.assert_allclose(lim["pred"].value, mean[m:], atol=1e-10)
    np.testing.assert_allclose(lim["pred"].cov, A[m:] @ nngp @ A[m:].T, atol=1e-10)
    np.testing.assert_allclose(lim["curve"].value, curve, atol=1e-10)
    np.testing.assert_allclose(lim["cube"].value, cube, atol=1e-10)
    # degree 4 is past the rule: sampled, with standard errors
    quartic = tpc.loads(src.replace("mean(f(Xt) ^ 3)", "mean(f(Xt) ^ 4)"), "q.tp", ROOT / "programs" / "train")
    assert "monte-carlo" in tpc.limit(quartic)["cube"].method


def test_a_top_level_quadratic_loss_is_exact_too() -> None:
    """`loss Q = 0.5 * mean((f(X) - Y) ^ 2)` is mse written out: its degree comes from its expression
    (only a top-level mse counted, so it was sampled while the same loss inside the loop was exact)."""
    src = (ROOT / "programs" / "train" / "relu2_ntk_loop.tp").read_text()
    want = tpc.limit(tpc.loads(src, "mse.tp", ROOT / "programs" / "train"))
    written = src.replace("for t in range(4) {", "loss Q = 0.5 * mean((f(X) - Y) ^ 2)\nfor t in range(4) {").replace(
        "L = mse(f(X), Y)", "L = Q")
    got = tpc.limit(tpc.loads(written, "q.tp", ROOT / "programs" / "train"))
    for k in ("pred", "curve"):
        assert got[k].method == "exact+closed-form" and got[k].stderr is None, got[k].method
        np.testing.assert_allclose(got[k].value, want[k].value, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got["pred"].cov, want["pred"].cov, rtol=0, atol=1e-12)


def check_warmup_kernel_descent(lim: dict, ntk: np.ndarray, nngp: np.ndarray, y: np.ndarray) -> None:
    """relu2_ntk_loop.tp's limit against kernel gradient descent by hand: 4 steps of mse at rate
    0.5 min(1, (t + 1) / 2) from f_0 ~ GP(0, nngp), the first len(y) points the training ones; f_t
    = A f_0 + mean, so the predictions' mean and covariance and the expected loss are exact."""
    m, P = len(y), len(ntk)  # noqa: N806
    mean, A = np.zeros(P), np.eye(P)  # noqa: N806
    curve = []
    for t in range(4):
        curve.append(0.5 * np.mean((mean[:m] - y) ** 2 + np.diag(A[:m] @ nngp @ A[:m].T)))
        rate = 0.5 * min(1, (t + 1) / 2)
        mean = mean - rate * ntk[:, :m] @ (mean[:m] - y) / m
        A = A - rate * ntk[:, :m] @ A[:m] / m  # noqa: N806
    np.testing.assert_allclose(lim["pred"].value, mean[m:], atol=1e-10)
    np.testing.assert_allclose(lim["pred"].cov, A[m:] @ nngp @ A[m:].T, atol=1e-10)
    np.testing.assert_allclose(lim["curve"].value, curve, atol=1e-10)


def test_kernel_regime_refuses_order_one_weight_decay() -> None:
    net = tpc.loads(HEADER + "parametrization ntk\n" + MODEL + """for t in range(2) {
  f -= 0.5 * (grad(mse(f(X), Y), f) + 0.1 * f)
}
output p = f(Xt)
""")
    with pytest.raises(TpcError, match=r"<program>:\d+:\d+: error: in the kernel regime .*weight decay"):
        tpc.limit(net)


def test_graph_prints_the_loop_and_its_body(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(ROOT / "programs" / "train" / "momentum_relu2_mup.tp")
    assert main(["graph", path]) == 0
    out = capsys.readouterr().out
    assert "for t in range(6):" in out and "Loop (carries M, f; records loss)" in out
    assert "      M = 0.9 * M + %" in out and "f -= 0.2 * M" in out
    assert main(["graph", path, "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    loop = next(n for n in doc["program"] if n["op"] == "loop")  # the program graph (test_program_graph.py)
    assert loop["trip"] == 6 and any(b["op"] == "grad" for b in loop["body"])
    assert main(["graph", path, "--format", "dot"]) == 0
    assert f"subgraph cluster_{loop['id']} {{" in capsys.readouterr().out
    assert main(["graph", "--unrolled", path]) == 0
    out = capsys.readouterr().out
    assert out.count("\n# t = ") == 6 and "dh2.t1 = a W_0.T @ dh3.t1 + sum_(p<1)" in out
    assert "W@f1 @" not in out  # only W_0 multiplies


def test_a_bad_loop_is_refused_before_anything_runs(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.tp"
    bad.write_text(HEADER + "parametrization mup\n" + MODEL + """for t in range(3) {
  record loss = mse(f(X), Y)
  f -= 0.1 * grad(mse(f(X), Y), f)
}
for s in range(loss) { }
output p = f(Xt)
""")
    for cmd in (["run", str(bad), "--width", "16"], ["limit", str(bad)], ["compare", str(bad), "--widths", "8,16"]):
        assert main(cmd) == 2
        err = capsys.readouterr()
        assert "bad.tp:15:16: error: the trip count must be a constant" in err.err and err.out == ""


def test_kernel_regime_names_apart_from_the_layers() -> None:
    """The kernels' program is built as syntax trees with its own names kept apart from the layers':
    a layer named `n` or `s1` (names the lowering uses) is an ordinary layer."""
    src = """width m
parametrization ntk
data X = [[1, 0.5], [-0.3, 0.8]]
data Y = [1, -1]
layer n : input m x 2
layer s1 : hidden m x m
layer V : readout 1 x m
model f(x) = V @ relu(s1 @ relu(n @ x))
loss L = mse(f(X), Y)
train sgd(lr = 0.1, steps = 2) minimize L
output p = f(X)
"""
    renamed = src.replace("layer n ", "layer A ").replace("n @ x", "A @ x").replace("s1", "B")
    np.testing.assert_array_equal(tpc.limit(tpc.loads(src))["p"].value, tpc.limit(tpc.loads(renamed))["p"].value)


def test_rows_of_dead_copies_are_dropped() -> None:
    """First-order MAML with an n x n layer: each task's copy stores its inner steps' rows in W's pool
    and dies at the end of the task; those rows are dropped, the query rows (in the meta-gradient)
    kept, and the numbers are unchanged (direct = unrolled)."""
    from tpc.train.interp import Interpreter
    from tpc.train.pooled import PooledBackend
    from tpc.train.spaces import FiniteSpace

    net = tpc.loads(HEADER + """parametrization mup
layer U : input n x 2
layer W : hidden n x n
layer V : readout 1 x n
model f(x) = V @ tanh(W @ tanh(U @ x))
for t in range(12) {
  state G = zeros(f)
  for k in range(2) {
    copy g = f
    for s in range(2) { g -= 0.3 * grad(mse(g(batch(X, t + k, 2)), batch(Y, t + k, 2)), g) }
    G += grad(mse(g(batch(X, t + k + 2, 3)), batch(Y, t + k + 2, 3)), g)
  }
  f -= 0.2 * G
}
output p = f(Xt)
""")
    direct = loops_finite(net, 32, 2)["p"].values
    backend = PooledBackend(net, FiniteSpace(net, 32, [0, 1], torch.float64, "cpu"))
    with torch.enable_grad():
        unrolled = Interpreter(net, backend).run()["p"].numpy()
    np.testing.assert_allclose(direct, unrolled, rtol=1e-9, atol=1e-10)
    appended = 12 * 2 * (2 * 2 + 3)  # per task: two inner steps on 2 rows, the query on 3
    assert backend.pool["W"][0].shape[-2] <= 12 * 2 * 3 + 64 < appended  # the query rows stay


def test_a_model_with_one_output_is_a_number_per_row_in_loop_arithmetic() -> None:
    """f(X) - Y with one output is taken row by row (not B x B by broadcasting): mean((f(X) - Y)^2) is
    twice mse(f(X), Y) (which halves), at finite width, in the emitted file, and in the limit."""
    src = HEADER_ONE_OUTPUT + """for t in range(2) {
  record a = mean((f(X) - Y) ^ 2)
  record b = mse(f(X), Y)
  f -= 0.5 * grad(mean((f(X) - Y) ^ 2), f)
}
output a = a
output b = b
"""
    net = tpc.loads(src)
    run = tpc.run(net, 64, 2)
    assert np.abs(run["a"].values - 2 * run["b"].values).max() < 1e-12
    assert np.abs(run["a"].values).min() > 0.1
    lim = tpc.limit(net)
    assert np.abs(lim["a"].value - 2 * lim["b"].value).max() < 1e-12
    namespace: dict = {}
    exec(compile(tpc.torch_source(net), "<emitted>", "exec"), namespace)  # noqa: S102
    model = namespace["Network"](64, 0)
    records = namespace["train"](model, *[torch.as_tensor(net.data[k]) for k in ("X", "Y")])
    assert np.allclose(records["a"], 2 * np.asarray(records["b"]), rtol=0, atol=1e-12)
    assert np.allclose(records["a"], run["a"].values[0], rtol=0, atol=1e-10)


HEADER_ONE_OUTPUT = """width n
parametrization mup
data X = [[1, 0.5], [-0.3, 0.8], [0.2, 0.1]]
data Y = [1, -1, 0.5]
layer U : input n x 2
layer W : hidden n x n
layer V : readout 1 x n
model f(x) = V @ tanh(W @ tanh(U @ x))
"""


def test_unrolled_listing_folds_indices_computed_from_data(capsys: pytest.CaptureFixture[str],
                                                          tmp_path: Path) -> None:
    """(Found by the fuzz.) `S[min(k, D[k])]` picks rows by arithmetic on data: --unrolled folded it
    without the data's values and crashed (KeyError); now it lists the rows that the run uses."""
    path = tmp_path / "p.tp"
    path.write_text("""width n
parametrization sp
data X = [[-0.3, 1.4], [1, 1.1], [-0.6, 1.5]]
data Y = [1, 1, 0]
data S = [[2], [1]]
data D = [1, 0]
layer U : input n x 2
layer V : readout 1 x n
model f(x) = V @ (U @ x)
for k in range(2) {
  L = logistic(f(X[S[min(k, D[k])]]), Y[S[0]])
  f -= 0.8 * grad(L, f)
}
output p = f(X)
""")
    assert main(["graph", "--unrolled", str(path)]) == 0
    out = capsys.readouterr().out
    assert "v9.k0 = f(X[2])" in out and "v9.k1 = f(X[2])" in out  # min(0, 1) = 0 and min(1, 0) = 0: S[0]
    path.write_text(path.read_text().replace("D = [1, 0]", "D = [1, 1]"))
    assert main(["graph", "--unrolled", str(path)]) == 0
    assert "f(X[1])" in capsys.readouterr().out  # k = 1: min(1, 1) = 1: S[1]


def test_a_wide_readout_over_no_data_needs_no_k_squared_memory() -> None:
    """(Found by the fuzz.) The kernel regime's exact cubature built its basis beside a k x k identity:
    34 GB for a readout of 65536 rows, over no data at all. Now the basis is filled in place, and the
    memory estimate counts the 2 P k cubature points where they outnumber the 2^14 samples."""
    from tpc.train.limit import kernel_regime_memory

    net = tpc.loads("""width n
parametrization ntk
layer U : input n x 1
layer W : hidden n x n
layer V : readout 65536 x n
model f(x) = V @ relu(W @ (U @ x))
for t in range(0) {
  record r = 0.5 * (1 + t)
}
output r = r
""")
    assert tpc.limit(net)["r"].value.shape == (0,)
    wide = tpc.loads(HEADER + "layer U : input n x 2\nlayer V : readout 1000 x n\nmodel f(x) = V @ relu(U @ x)\n"
                     "parametrization ntk\noutput p = f(Xt)\noutput q = f(X)\n")
    points, k = 7, 1000
    assert kernel_regime_memory(wide, None)[0] >= 8 * (2 * points * k) * points * k


def test_a_row_index_of_more_than_one_axis_is_refused_by_every_backend(capsys: pytest.CaptureFixture[str],
                                                                     tmp_path: Path) -> None:
    """`X[S[min(k, S)]]`: an index computed from a 2 x 2 data array is a 2 x 2 array of rows, which no
    backend's batch is (the kernel regime crashed on it, the unrolled listing too; finite width ran it as
    a batch of batches). The fuzz found it."""
    source = """width n
parametrization ntk
data X = [[1.3, -0.3], [-0.9, -1.1]]
data Y = [1, 0]
data S = [[0, 1], [0, 0]]
layer U : input n x 2
layer V : readout 3 x n
model f(x) = V @ tanh(U @ x)
for k in range(2) {
  f -= 0.3 * grad(xent(f(X[S[min(k, S)]]), Y[S[min(k, 1)]]), f)
}
output pred = f(X)
"""
    net = tpc.loads(source)
    for run in (lambda: tpc.run(net, 32, 2), lambda: tpc.limit(net)):
        with pytest.raises(TpcError, match="a row index is a number or a list of numbers; this one is a 2 x 2 array"):
            run()
    path = tmp_path / "rows.tp"
    path.write_text(source)
    assert main(["graph", "--unrolled", str(path)]) == 2
    err = capsys.readouterr().err
    assert "10:28: error: a row index" in err
    assert "f -= 0.3 * grad(xent(f(X[S[min(k, S)]])" in err and "^~~~" in err  # the line, as other commands show


@pytest.mark.parametrize(("loss", "targets", "readout"), [("mse", "[1, -1, 0.5]", 1), ("mse", "[[1], [-1], [0.5]]", 1),
                                                          ("mse", "[[1, 0], [0, 1], [1, 1]]", 2),
                                                          ("xent", "[0, 2, 1]", 3)])
def test_one_example_per_step(loss: str, targets: str, readout: int) -> None:
    """`mse(f(X[t]), Y[t])`: one input is a batch of one, and its target that batch's row (it was
    refused: "the targets have no rows"). The same numbers as `batch(X, t, 1)`, at finite width
    (direct and unrolled) and in the limit."""
    head = HEADER_ONE_OUTPUT.replace("data Y = [1, -1, 0.5]", f"data Y = {targets}").replace(
        "readout 1 x n", f"readout {readout} x n")
    loop = "for t in range(3) {{\n  L = {loss}(f({x}), {y})\n  record c = L\n  f -= 0.5 * grad(L, f)\n}}\n" \
           "output p = f(X)\noutput c = c\n"
    one = tpc.loads(head + loop.format(loss=loss, x="X[t]", y="Y[t]"))
    batch = tpc.loads(head + loop.format(loss=loss, x="batch(X, t, 1)", y="batch(Y, t, 1)"))
    a, b = tpc.run(one, 64, 2), tpc.run(batch, 64, 2)
    mixed = [tpc.run(tpc.loads(head + loop.format(loss=loss, x=x, y=y)), 64, 2)
             for x, y in (("X[t]", "batch(Y, t, 1)"), ("batch(X, t, 1)", "Y[t]"))]
    for name in ("p", "c"):
        np.testing.assert_allclose(a[name].values, b[name].values, rtol=1e-12, atol=1e-13, err_msg=name)
        for m in mixed:  # one row and a batch of one, either way round
            np.testing.assert_allclose(m[name].values, b[name].values, rtol=1e-12, atol=1e-13, err_msg=name)
        np.testing.assert_allclose(run_unrolled_finite(one, 64, 2)[name], a[name].values, rtol=1e-9, atol=1e-10)
    la, lb = tpc.limit(one, particles=2**10, replicates=2), tpc.limit(batch, particles=2**10, replicates=2)
    np.testing.assert_allclose(la["p"].value, lb["p"].value, rtol=1e-12, atol=1e-13)
    assert np.abs(a["p"].values).max() > 0.05  # not a trivial zero
    emitted = emitted_train_outputs(one, 64)
    np.testing.assert_allclose(np.asarray(emitted["p"]), a["p"].values[0], rtol=1e-9, atol=1e-10)
    in_ntk = head.replace("parametrization mup", "parametrization ntk")  # the kernel regime
    ntk = tpc.loads(in_ntk + loop.format(loss=loss, x="X[t]", y="Y[t]"))
    ntk_batch = tpc.loads(in_ntk + loop.format(loss=loss, x="batch(X, t, 1)", y="batch(Y, t, 1)"))
    np.testing.assert_allclose(tpc.limit(ntk)["p"].value, tpc.limit(ntk_batch)["p"].value, rtol=1e-12, atol=1e-13)


NOT_FINITE_BEFORE_TRAINING = {
    # (model, the loop's loss, options of tpc run, where the error is, what it says)
    "log in the model": ("V @ relu(W @ log(U @ x))", "mse(f(X), Y)", [], "8:27",
                         "at initialisation, this value of model f"),
    "log in the loss": ("V @ relu(W @ relu(U @ x))", "mean(log(f(X) - 100))", [], "10:7",
                        "at t = 0, before any update, the loss is not finite"),
    "exp overflows in float32": ("V @ tanh(exp(U @ x))", "mse(f(X), Y)", ["--dtype", "float32"], "8:23",
                                 "at initialisation, this value of model f is not finite: it overflows"),
}


@pytest.mark.parametrize("case", sorted(NOT_FINITE_BEFORE_TRAINING))
def test_trouble_before_any_update_is_not_called_divergence(case: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A model or loss that is not finite before any update used to be 'training diverged ... (lower
    the learning rate)', even at lr 1e-9; it is named where it happens. The overflow: exp in float32
    gives inf, tanh(inf) = 1 keeps the loss finite, and the backward pass's 0 * inf is NaN."""
    from tpc.cli import main

    model, loss, opts, where, says = NOT_FINITE_BEFORE_TRAINING[case]
    path = tmp_path / "p.tp"
    hidden = "layer W : hidden n x n" if "W @" in model else "# no hidden layer"
    path.write_text("width n\nparametrization mup\ndata X = [[1, 0.5, -1], [0.3, -0.8, 2]]\ndata Y = [1, -1]\n"
                    f"layer U : input n x 3, var = {6000 if 'exp' in model else 2}\n{hidden}\n"
                    f"layer V : readout 1 x n\nmodel f(x) = {model}\nfor t in range(2) {{\n  L = {loss}\n"
                    "  f -= 1e-9 * grad(L, f)\n}\noutput p = f(X)\n")
    commands = [["run", str(path), "--width", "64", "--seeds", "2", *opts]]
    if not opts:  # the limit: the unrolled program, then the model at initialisation at a small width
        commands.append(["limit", str(path), "--particles", "1024", "--replicates", "2"])
    for argv in commands:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"p.tp:{where}: error: {says}" in err and "not finite" in err and "diverged" not in err, (argv, err)


def test_trouble_after_updates_is_still_divergence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The other side of the test above: after updates, a loss or gradient that is not finite is
    divergence, also where the updates are word2vec's row updates or the gradient overflows first
    (the first versions of these checks blamed the model, or said 'before any update' at t = 24)."""
    from tpc.cli import main

    path = tmp_path / "ov.tp"
    path.write_text("width n\nparametrization mup\ndata X = [[1, 0.5, -1], [0.3, -0.8, 2]]\ndata Y = [1, -1]\n"
                    "layer U : input n x 3, var = 1\nlayer V : readout 1 x n\nmodel f(x) = V @ tanh(exp(U @ x))\n"
                    "for t in range(6) {\n  L = mse(f(X), Y)\n  f -= 100 * grad(L, f)\n}\noutput p = f(X)\n")
    assert main(["run", str(path), "--width", "64", "--seeds", "2", "--dtype", "float32"]) == 2
    err = capsys.readouterr().err
    assert "error: training diverged at t = " in err and "lower the learning rate" in err, err
    src = (ROOT / "programs" / "word2vec" / "cbow_loop_mup.tp").read_text()
    assert "lr = 0.05" in src
    w2v = tpc.loads(src.replace("lr = 0.05", "lr = 1e6"), "w.tp", ROOT / "programs" / "word2vec")
    with pytest.raises(tpc.TpcError, match="training diverged at t = ") as err_info:
        tpc.run(w2v, 64, 1)
    assert "before any update" not in str(err_info.value)
