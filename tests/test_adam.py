"""Entrywise (adaptive) optimizers written as loops: Adam, AdamW and sign-SGD at finite width against
torch.optim and hand-written updates on the same initial weights, with each layer's learning rate
n^-c'_l; their classification; the emitted PyTorch; and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tpc
from tpc.cli import main
from tpc.errors import TpcError
from tpc.parametrization import ABC, classify_adaptive, preset
from tpc.train.finite import standard_normals

ROOT = Path(__file__).resolve().parent.parent

HEADER = """width n
data X = [[1, 0.5], [-0.3, 0.8], [0.2, -1], [0.9, 0.1], [-0.5, -0.5]]
data Y = [1, -1, 1, 1, -1]
data Xt = [[0.4, 0.4], [-1, 0.2]]
layer U : input n x 2, var = 2
layer b : bias n
layer W : hidden n x n, var = 2
layer V : readout 1 x n
model f(x) = V @ tanh(W @ relu(U @ x + b))
"""
ADAM = """state M = zeros(f)
state S = zeros(f)
for t in range(4) {
  L = mse(f(X), Y)
  record loss = L
  G = grad(L, f)
  M = 0.9 * M + 0.1 * G
  S = 0.99 * S + 0.01 * G * G
  f -= 0.05 * ((M / (1 - 0.9 ^ (t + 1))) / (sqrt(S / (1 - 0.99 ^ (t + 1))) + 1e-3)DECAY)
}
output p = f(Xt)
output curve = loss
"""
SIGN = """for t in range(3) {
  L = mse(f(X), Y)
  record loss = L
  f -= 0.02 * sign(grad(L, f))
}
output p = f(Xt)
output curve = loss
"""
WIDTH, SEEDS = 48, 2


def _reference(net: tpc.Network, width: int, seed: int, step: str, steps: int, lr: float,
               decay: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The same training written with torch.optim on the trained parameters w^l (W^l = n^-a_l w^l),
    one parameter group per layer with the learning rate lr n^-c'_l."""
    normals = standard_normals(net, width, [seed], torch.float64, "cpu")
    names = ["U", "b", "W", "V"]
    w = {}
    for k in names:
        la = net.layers[k]
        std = np.sqrt(la.var / la.fan_in) * width ** (-net.ab(la)[1])
        w[k] = (normals[k][0] * std).clone().requires_grad_(True)
    cp = {k: net.abc.adaptive_exponents()[net.layers[k].index] for k in names}
    X, Y, Xt = (torch.tensor(net.data[d], dtype=torch.float64) for d in ("X", "Y", "Xt"))  # noqa: N806

    def model(x: torch.Tensor) -> torch.Tensor:
        W = {k: width ** (-net.ab(net.layers[k])[0]) * w[k] for k in names}  # noqa: N806
        h = torch.relu(x @ W["U"].T + W["b"])
        return torch.tanh(h @ W["W"].T) @ W["V"].T

    # entrywise functions read the gradient at its natural scale n^s dL/dw (s = a + 1; a for the
    # readout): for torch, whose Adam reads dL/dw itself, that is eps n^-s
    s = {k: net.ab(net.layers[k])[0] + (net.layers[k].role != "readout") for k in names}
    groups = [{"params": [w[k]], "lr": lr * width ** (-cp[k]), "eps": 1e-3 * width ** (-s[k]),
               "weight_decay": decay * width ** (-net.abc.c) / width ** (-cp[k])} for k in names]
    opt = None
    if step == "adam":
        opt = torch.optim.Adam(groups, betas=(0.9, 0.99))
    elif step == "adamw":
        opt = torch.optim.AdamW(groups, betas=(0.9, 0.99))
    curve = []
    for _ in range(steps):
        loss = 0.5 * ((model(X)[:, 0] - Y.reshape(-1)) ** 2).mean()
        curve.append(float(loss.detach()))
        grads = torch.autograd.grad(loss, [w[k] for k in names])
        if opt is None:  # sign-SGD
            with torch.no_grad():
                for k, g in zip(names, grads, strict=True):
                    w[k] -= lr * width ** (-cp[k]) * torch.sign(g)
            continue
        for k, g in zip(names, grads, strict=True):
            w[k].grad = g
        opt.step()
    with torch.no_grad():
        return model(Xt)[:, 0].numpy(), np.array(curve)


@pytest.mark.parametrize(("param", "step"), [("mup", "adam"), ("mup", "adamw"), ("mup", "sign"),
                                             ("abc(a = [0, 0.5, 0.5], b = [0, 0, 0], c = 0, adaptive = [1, 1, 1])",
                                              "adam")])
def test_entrywise_loops_equal_torch_optim(param: str, step: str) -> None:
    """Adam (bias-corrected), AdamW (decoupled decay) and sign-SGD written as loops equal torch.optim's
    Adam and AdamW (sign-SGD: its update written out) on the same weights, to round-off; muP's rates
    are n^-c'_l = 1/n for hidden layers and the readout, 1 for the input layer and biases (TP5)."""
    body = SIGN if step == "sign" else ADAM.replace("DECAY", " + 0.1 * f" if step == "adamw" else "")
    net = tpc.loads(HEADER + f"parametrization {param}\n" + body)
    got = tpc.run(net, WIDTH, SEEDS)
    for seed in range(SEEDS):
        lr, steps = (0.02, 3) if step == "sign" else (0.05, 4)
        pred, curve = _reference(net, WIDTH, seed, step, steps, lr, 0.1 if step == "adamw" else 0.0)
        np.testing.assert_allclose(got["p"].values[seed], pred, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(got["curve"].values[seed], curve, rtol=1e-10, atol=1e-12)


def test_mup_adam_rates_are_tp5s() -> None:
    p = preset("mup", 2)
    assert p.adaptive_exponents() == (0.5, 1.0, 0.5)  # W^l moves by n^-(a_l + c'_l): 1, 1/n, 1/n
    assert [a + c for a, c in zip(p.a, p.adaptive_exponents(), strict=True)] == [0.0, 1.0, 1.0]
    # other presets keep c unless abc(..., adaptive = ...) says otherwise
    assert preset("sp", 2).adaptive_exponents() == (1.0, 1.0, 1.0)


@pytest.mark.parametrize(("abc", "regime", "stable"), [
    (preset("mup", 2), "feature learning", True),
    (ABC((0.0, 0.5, 0.5), (0.0, 0.0, 0.0), 0.0, (1.0, 1.0, 1.0)), "kernel", True),  # NTK, Adam's lr 1/n
    (ABC((0.0, 0.5, 0.5), (0.0, 0.0, 0.0), 0.0), "unstable", False),  # NTK, Adam's lr fixed: W moves n^1/2
    (preset("sp", 2), "unstable", False),  # SP, lr 1/n: the readout times the features' O(1) move grows
    (ABC((0.0, 0.0, 0.0), (0.0, 0.5, 1.0), 0.0, (0.0, 1.0, 1.0)), "feature learning", True),  # muP in SP form
    (ABC((-0.5, 0.0, 0.5), (0.5, 0.5, 0.5), 0.0, (1.5, 2.0, 1.5)), "trivial", True),  # every rate n times smaller
])
def test_classification_of_entrywise_updates(abc: ABC, regime: str, stable: bool) -> None:
    cls = classify_adaptive(abc)
    assert cls.stable == stable, cls.failed
    assert cls.regime == regime


def test_classify_reports_adam_programs(capsys: pytest.CaptureFixture[str]) -> None:
    net = tpc.loads(HEADER + "parametrization mup\n" + ADAM.replace("DECAY", ""))
    assert net.entrywise
    cls = net.classification()
    assert (cls.regime, cls.r) == ("feature learning", 0.0)


SIGN_LINEAR = """width n
parametrization mup
data X = [[1, 0.5]]
data Y = [1]
data Xt = [[0.4, 0.4], [-1, 0.2]]
layer U : input n x 2, var = 2
layer W : hidden n x n, var = 2
layer V : readout 1 x n
model f(x) = V @ (W @ (U @ x))
for t in range(1) {
  L = mse(f(X), Y)
  GW = grad(L, W)
  GV = grad(L, V)
  W -= 0.5 * sign(GW)
  V -= 0.5 * sign(GV)
}
output p = f(Xt)
"""


def _sign_step_closed_form() -> np.ndarray:
    """One sign-SGD step of W and V from initialisation, f = V W U x in muP, one training point x with
    target y = 1, in the limit. f_0 -> 0, so dL/df = -1; with h = U x, z = W h and v = n V:
    - W's gradient at its natural scale is -v_a h_b, so W y moves by 0.5 sign(v_a) E[sign(h) y];
    - V's is -z, so v moves by 0.5 sign(z).
    On a test point x' (h', z' = W h'), f = E[v' z'] = 0.5 E|v| E[sign(h) h'] + 0.5 E[sign(z) z'],
    and E[sign(A) B] = sqrt(2/pi) Cov(A, B) / sd(A) for jointly Gaussian A, B: Cov(h, h') = x.x'
    (U's entries have variance 2/2), sd(h) = |x|, Cov(z, z') = 2 x.x', sd(z) = sqrt(2) |x|, E|v| =
    sqrt(2/pi)."""
    x, xt = np.array([1.0, 0.5]), np.array([[0.4, 0.4], [-1.0, 0.2]])
    c, sd = xt @ x, np.sqrt(x @ x)
    return 0.5 * np.sqrt(2 / np.pi) * c / sd * (np.sqrt(2 / np.pi) + np.sqrt(2))


def test_one_step_sign_sgd_limit_equals_its_closed_form() -> None:
    """Tensor Programs IVb's limit of an entrywise update, by grids over pairs of particles, against
    the closed form; finite width agrees too."""
    net = tpc.loads(SIGN_LINEAR)
    want = _sign_step_closed_form()
    lim = tpc.limit(net, particles=2**11, replicates=8)["p"]
    assert lim.method == "monte-carlo"
    assert np.all(np.abs(lim.value - want) <= 4 * lim.stderr), (lim.value, lim.stderr, want)
    assert np.all(lim.stderr < 0.05)
    fin = tpc.run(net, 1024, 8)["p"]
    assert np.all(np.abs(fin.mean - want) <= 4 * fin.stderr + 0.02), (fin.mean, fin.stderr, want)


@pytest.mark.parametrize("body", ["adam", "adamw", "sign"])
def test_the_unrolled_program_equals_direct_training(body: str) -> None:
    """At width n the unrolled program, where an n x n layer's entrywise updates are n x n grids of
    the stored pairs, equals training with real matrices to round-off."""
    from tpc.train.pooled import run_unrolled_finite

    text = SIGN if body == "sign" else ADAM.replace("DECAY", " + 0.1 * f" if body == "adamw" else "")
    net = tpc.loads(HEADER + "parametrization mup\n" + text)
    direct, unrolled = tpc.run(net, 24, 2), run_unrolled_finite(net, 24, 2)
    for k, res in direct.items():
        np.testing.assert_allclose(res.values, unrolled[k], rtol=0, atol=1e-12, err_msg=k)


def test_the_kernel_regime_of_entrywise_updates_is_refused(capsys: pytest.CaptureFixture[str],
                                                           tmp_path: Path) -> None:
    path = tmp_path / "adam.tp"
    path.write_text(HEADER + "parametrization abc(a = [0, 0.5, 0.5], b = [0, 0, 0], c = 0, adaptive = [1, 1, 1])\n"
                    + ADAM.replace("DECAY", ""))
    for cmd in (["limit", str(path)], ["compare", str(path), "--widths", "8,16"]):
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert "adam.tp:18:18: error:" in err and "kernel regime" in err and "Traceback" not in err, err
    with pytest.raises(TpcError, match="feature-learning regime only"):
        tpc.limit(tpc.load(path))
    assert main(["graph", str(path), "--unrolled"]) == 0  # the program itself is listed, as any other
    out = capsys.readouterr().out
    assert "W (hidden): gradient terms n^-1, parameter terms n^0, entrywise terms n^-0.5" in out, out
    assert "= sqrt(" in out and "kernel regime with entrywise updates: tpc refuses" in out


def test_graph_prints_entrywise_instructions(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "adam.tp"
    path.write_text(HEADER + "parametrization mup\n" + ADAM.replace("DECAY", ""))
    assert main(["graph", str(path)]) == 0
    out = capsys.readouterr().out
    assert "sqrt(%" in out and "Entrywise" in out and "S = 0.99 * S + %" in out


@pytest.mark.parametrize("opt", ["adam", "adamw", "signsgd"])
def test_train_statements_are_the_loops_a_user_writes(opt: str) -> None:
    """`train adam(...)`, `train adamw(...)` and `train signsgd(...)` desugar into the loops above:
    the same numbers, bit for bit (AdamW's default decay is torch's 0.01)."""
    settings = {"adam": "lr = 0.05, steps = 4, beta2 = 0.99, eps = 1e-3",
                "adamw": "lr = 0.05, steps = 4, beta2 = 0.99, eps = 1e-3",
                "signsgd": "lr = 0.02, steps = 3"}[opt]
    sugar = tpc.loads(HEADER + f"""parametrization mup
loss L = mse(f(X), Y)
train {opt}({settings}) minimize L
output p = f(Xt)
output curve = history(L)
""")
    written = SIGN if opt == "signsgd" else ADAM.replace("DECAY", " + 0.01 * f" if opt == "adamw" else "")
    a, b = tpc.run(sugar, WIDTH, SEEDS), tpc.run(tpc.loads(HEADER + "parametrization mup\n" + written), WIDTH, SEEDS)
    for k in ("p", "curve"):
        np.testing.assert_allclose(a[k].values, b[k].values, rtol=1e-13, atol=1e-15)


def test_adam_in_sp_runs_at_finite_width_and_its_limit_is_refused_as_unstable(capsys: pytest.CaptureFixture[str],
                                                                               tmp_path: Path) -> None:
    """SP with Adam at a fixed rate: the statement runs (as `train sgd` does in SP); the limit is refused
    because the classification says it blows up, naming the failed condition."""
    path = tmp_path / "sp.tp"
    path.write_text(HEADER + """parametrization sp
loss L = mse(f(X), Y)
train adam(lr = 0.01, steps = 2) minimize L
output p = f(Xt)
""")
    net = tpc.load(path)
    assert not net.classification().stable
    assert np.isfinite(tpc.run(net, 32, 2)["p"].values).all()
    assert main(["limit", str(path)]) == 2
    assert "unstable" in capsys.readouterr().err


def test_coordcheck_of_adam_names_sp_and_follows_mup_to_its_limit() -> None:
    """The `mup` package's check with Adam: at a width-independent rate SP's hidden pre-activations
    grow like n (each entry of W moves by lr, and n of them add up); muP's stay put and approach the
    limit's E|Z|."""
    from tpc.coordcheck import coordcheck

    def body(lr: float, steps: int) -> str:
        return f"loss L = mse(f(X), Y)\ntrain adam(lr = {lr}, steps = {steps}) minimize L\noutput p = f(Xt)\n"

    sp = coordcheck(tpc.loads(HEADER + "parametrization abc(a = [0, 0, 0], b = [0, 1/2, 1/2], c = 0)\n"
                              + body(0.05, 2)), [32, 64, 128, 256], seeds=2)
    grows = {p.name: t for p, t in sp.flagged() if t.verdict == "grows"}
    assert sp.limit is None and "h2" in grows and grows["h2"].slope > 0.5, grows
    # (enough training that f's learned part, not its n^-1/2 start, dominates at these widths)
    mup = coordcheck(tpc.loads(HEADER + "parametrization mup\n" + body(0.2, 3)), [32, 64, 128, 256], seeds=2,
                     particles=1024, replicates=2)
    assert mup.flagged() == [] and mup.limit is not None
    mean, lim = mup.mean()[-1, -1], mup.limit.mean(0)[-1]  # the widest width, the last step
    assert np.allclose(mean, lim, rtol=0.15), (mean, lim)


def test_tpc_classify_of_entrywise_updates(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["classify", str(ROOT / "programs" / "train" / "adam_relu2_mup.tp"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["adaptive"] == [0.5, 1.0, 0.5] and out["regime"] == "feature learning"
    assert main(["classify", "--preset", "ntk", "--adaptive", "1,1,1"]) == 0
    out = capsys.readouterr().out
    assert "c' = [1.0, 1.0, 1.0]" in out and "regime     kernel" in out
    assert main(["classify", "--a", "0,0,0", "--b", "0,1/2,1/2", "--c", "0", "--adaptive"]) == 0
    assert "a_2 + c'_2 >= 1 (here 0)" in capsys.readouterr().out
    assert main(["classify", "--preset", "mup", "--adaptive", "1,1"]) == 2
    assert "--adaptive has 2 exponents" in capsys.readouterr().err


@pytest.mark.parametrize("opt", ["adam", "adamw", "signsgd"])
def test_emit_torch_of_train_adam_writes_its_loop_and_torch_optimizer(opt: str) -> None:
    """The emitted file of `train adam/adamw/signsgd`: train() is the loop it desugars to, and (Adam,
    AdamW) optimizer() is torch.optim with the per-layer settings; both give tpc run's numbers."""
    net = tpc.loads(HEADER.replace("layer b : bias n\n", "").replace(" + b", "") + f"""parametrization mup
loss L = mse(f(X), Y)
train {opt}(lr = 0.05, steps = 3, beta2 = 0.99, eps = 1e-3) minimize L
output p = f(Xt)
""".replace(", beta2 = 0.99, eps = 1e-3" if opt == "signsgd" else "@@", ""))
    want = tpc.run(net, 64, 1)["p"].values[0]
    mod: dict = {}
    exec(compile(tpc.torch_source(net), "<emitted>", "exec"), mod)  # noqa: S102 - our own generated source
    X, Y, Xt = (torch.tensor(net.data[d]) for d in ("X", "Y", "Xt"))  # noqa: N806
    model = mod["Network"](width=64, seed=0)
    mod["train"](model, X, Y, Xt)
    with torch.no_grad():
        np.testing.assert_allclose(model(Xt)[:, 0].numpy(), want, rtol=1e-10, atol=1e-12)
    if opt == "signsgd":
        assert "def optimizer" not in tpc.torch_source(net)
        return
    model = mod["Network"](width=64, seed=0)
    optimizer = mod["optimizer"](model)
    for _ in range(3):
        optimizer.zero_grad()
        mod["loss_L"](model(X), Y).backward()
        optimizer.step()
    with torch.no_grad():
        np.testing.assert_allclose(model(Xt)[:, 0].numpy(), want, rtol=1e-10, atol=1e-12)


def test_a_non_finite_entrywise_function_is_named(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """sqrt of a gradient (negative entries) without eps: the error names the instruction and the layer."""
    path = tmp_path / "nan.tp"
    path.write_text(HEADER + "parametrization mup\nfor t in range(2) {\n  f -= 0.1 * sqrt(grad(mse(f(X), Y), f))\n}\n"
                    "output p = f(Xt)\n")
    assert main(["run", str(path), "--width", "16", "--seeds", "2"]) == 2
    err = capsys.readouterr().err
    assert "nan.tp:12:14: error: at t = 0, this entrywise function of layer U is not finite" in err, err


def test_a_bias_correction_dividing_by_zero_is_named_by_every_command(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """`1 - 0.9 ^ t` is 0 at t = 0. `tpc run` named it; check, limit and coordcheck said "internal: an
    entrywise function of parameters" (their dry run, checks off, carried the NaN into the grid)."""
    root = Path(__file__).resolve().parent.parent / "programs" / "train"
    src = (root / "adam_relu2_mup.tp").read_text()
    assert "(1 - 0.9 ^ (t + 1))" in src
    path = tmp_path / "adam_bc.tp"
    path.write_text(src.replace("(1 - 0.9 ^ (t + 1))", "(1 - 0.9 ^ t)").replace('"data/', f'"{root}/data/'))
    assert main(["check", str(path), "--allow-data-outside"]) == 0
    capsys.readouterr()
    for argv in (["run", "--width", "32", "--seeds", "1"], ["limit", "--particles", "256", "--replicates", "2"],
                 ["coordcheck", "--widths", "32,64", "--seeds", "1", "--particles", "256", "--replicates", "2"]):
        assert main([argv[0], str(path), *argv[1:], "--allow-data-outside"]) == 2
        err = capsys.readouterr().err
        assert "adam_bc.tp:25:16: error: at t = 0, this value is not finite (inf)" in err and "internal" not in err, err
