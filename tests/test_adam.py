"""Entrywise (adaptive) optimizers written as loops: Adam, AdamW and sign-SGD at finite width against
torch.optim and hand-written updates on the same initial weights, with each layer's learning rate
n^-c'_l; their classification; the emitted PyTorch; and refusals."""

from __future__ import annotations

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

    groups = [{"params": [w[k]], "lr": lr * width ** (-cp[k]),
               "weight_decay": decay * width ** (-net.abc.c) / width ** (-cp[k])} for k in names]
    opt = None
    if step == "adam":
        opt = torch.optim.Adam(groups, betas=(0.9, 0.99), eps=1e-3)
    elif step == "adamw":
        opt = torch.optim.AdamW(groups, betas=(0.9, 0.99), eps=1e-3)
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


def test_the_limit_and_the_unrolled_program_are_refused_with_the_reason(capsys: pytest.CaptureFixture[str],
                                                                        tmp_path: Path) -> None:
    path = tmp_path / "adam.tp"
    path.write_text(HEADER + "parametrization mup\n" + ADAM.replace("DECAY", ""))
    for cmd in (["limit", str(path)], ["compare", str(path), "--widths", "8,16"], ["graph", str(path), "--unrolled"]):
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert "adam.tp:18:18: error:" in err and "entrywise" in err and "Traceback" not in err, err
    with pytest.raises(TpcError, match="Tensor Programs IVb"):
        tpc.limit(tpc.load(path))
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "no limit here: the limit of entrywise updates" in out


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
