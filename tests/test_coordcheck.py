"""`tpc coordcheck`: muP's coordinate check at finite widths and in the limit. In muP every vector
keeps its size and approaches the limit; in SP with a fixed learning rate the hidden vectors grow
and are named; the kernel regime's features stay at their initial limit; the JSON holds every
number; programs it cannot follow are refused with a located message."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tpc
from tpc.cli import main
from tpc.coordcheck import CoordCheck, coordcheck, observe, probes, text, trend
from tpc.train.dense import DenseBackend
from tpc.train.interp import Rows
from tpc.train.pooled import PooledBackend
from tpc.train.spaces import FiniteSpace

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "programs" / "train"
MUP = str(TRAIN / "relu2_mup.tp")
SP = str(TRAIN / "relu2_sp.tp")
WIDTHS = [32, 64, 128, 256]
SMALL = ["--widths", "32,64", "--seeds", "2", "--steps", "1", "--particles", "1024", "--replicates", "2", "--quiet"]

DATA = """data X = [[0.8, -0.4, 0.5], [-0.6, 0.9, 0.2], [0.3, 0.7, -0.9], [-1.0, -0.2, -0.4]]
data Y = [1.0, -1.0, 0.5, -0.5]
layer U : input n x 3, var = 2
layer W : hidden n x n, var = 2
layer V : readout 1 x n
model f(x) = V @ relu(W @ relu(U @ x))
"""
# relu2_mup's network in the standard parametrization with a learning rate that does not scale
# with the width (c = 0): one SGD step moves h2 = W x1 by lr n^(1/2) (V's entries are n^-1/2)
SP_FIXED_LR = f"""width n
parametrization abc(a = [0, 0, 0], b = [0, 1/2, 1/2], c = 0)
{DATA}loss L = mse(f(X), Y)
train sgd(lr = 0.5, steps = 2) minimize L
output curve = history(L)
"""
NO_LOOP = f"""width n
parametrization mup
{DATA}output k = features(f, X)
"""


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out = capsys.readouterr()
    return status, out.out, out.err


@pytest.fixture(scope="module")
def mup() -> CoordCheck:
    return coordcheck(tpc.load(MUP), WIDTHS, seeds=2, particles=4096, replicates=2)


def test_mup_approaches_its_limit_and_nothing_grows(mup: CoordCheck) -> None:
    assert [p.label for p in mup.probes] == ["h1 = U @ x", "x1 = relu(h1)", "h2 = W @ x1", "x2 = relu(h2)",
                                            "f = V @ x2"]
    limit = mup.limit_mean()
    assert limit is not None and limit.shape == (4, 5) and np.isfinite(limit).all()
    assert (limit[:, :4] > 0.3).all()  # the vectors are of order one in the limit
    assert limit[3, 4] > 3 * limit[0, 4]  # f: about 0 at initialisation (n^-1/2), of order one once trained
    rel = (mup.mean() - limit) / limit  # (widths, steps, probes)
    rel[:, 0, 4] = 0.0  # f's initial limit is 0: no relative error
    rms = np.sqrt((rel**2).mean((1, 2)))
    assert rms[-1] < rms[0] and rms[-1] < 0.05, rms
    assert mup.flagged() == [] and all(abs(t.slope) < 0.2 for t in mup.trends)


def test_limit_at_initialisation_is_the_gaussian_expectation(mup: CoordCheck) -> None:
    """h1 = U x is Gaussian with variance 2 |x|^2 / 3: E|h1| = sqrt(2/pi) sigma, E relu(h1) = sigma / sqrt(2 pi)."""
    x = tpc.load(MUP).data["X"]
    sigma = np.sqrt(2 / 3 * (x**2).sum(1))
    lim, se = mup.limit_mean(), mup.limit_stderr()
    assert lim[0, 0] == pytest.approx(np.mean(np.sqrt(2 / np.pi) * sigma), abs=4 * se[0, 0] + 1e-3)
    assert lim[0, 1] == pytest.approx(np.mean(sigma / np.sqrt(2 * np.pi)), abs=4 * se[0, 1] + 1e-3)


def test_observing_does_not_change_the_limit() -> None:
    """The check evaluates the model between the loop's steps, on the same particles as training: f's
    limit on the test inputs after 3 steps is `tpc limit`'s prediction there (in muP, a number)."""
    net = tpc.load(MUP)
    res = coordcheck(net, [16], seeds=1, data="Xt", particles=8192, replicates=2)
    pred = tpc.limit(net, particles=8192, replicates=2)["pred"]
    se = np.hypot(res.limit_stderr()[3, 4], np.max(pred.stderr))
    assert res.limit_mean()[3, 4] == pytest.approx(np.mean(np.abs(pred.value)), abs=4 * se)
    assert res.limit_mean()[3, 4] > 0.1


@pytest.mark.parametrize("name", ["relu2_mup.tp", "momentum_relu2_mup.tp"])
def test_the_limit_measures_the_same_coordinates(name: str) -> None:
    """The unrolled program's vectors are at natural scale: at width n with the seeds' matrices its
    statistics are the dense network's to round-off, so the limit's E|Z| is their limit."""
    net = tpc.load(str(TRAIN / name))
    x = net.data["X"]
    rows, tracked = Rows(x, "X", np.arange(len(x))), probes(net)
    dense = observe(net, DenseBackend(net, 48, [0, 1], torch.float64, "cpu"), rows, tracked, 3)
    pooled = observe(net, PooledBackend(net, FiniteSpace(net, 48, [0, 1], torch.float64, "cpu")), rows, tracked, 3)
    assert dense.shape == (2, 4, 5)
    assert torch.allclose(dense, pooled, atol=1e-10, rtol=0)
    assert not torch.allclose(dense[:, 0], dense[:, 3], atol=1e-3)  # training moved them


def test_sp_with_a_fixed_learning_rate_grows(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "sp_fixed_lr.tp"
    path.write_text(SP_FIXED_LR)
    res = coordcheck(tpc.load(str(path)), WIDTHS, seeds=2)
    assert res.limit is None and "unstable" in res.limit_note
    grows = {p.name: t for p, t in res.flagged() if t.verdict == "grows"}
    assert "h2" in grows and grows["h2"].slope > 0.5 and "f" in grows
    assert "h1" not in grows
    report = text(res)
    assert "h2 = W @ x1 grows like n^" in report and "no limit: the parametrization is unstable" in report


def test_attention_logits_over_sqrt_n_have_no_limit_column() -> None:
    """NTK parametrization's q.k / sqrt(n): the finite widths run, and the limit is left out with
    the reason (it once stopped the run with an internal error)."""
    program = """width n
parametrization ntk
data X = [[1, 0, 0.5, 0, 1, 0], [0, 1, 0, 0.5, -1, 0.2]]
data Y = [1.0, -1.0]
layer E : input n x 2
layer V : readout 1 x n
model f(x[3]) = V @ pool(attend(E @ x, E @ x, E @ x))
for t in range(1) {
  f -= 0.1 * grad(mse(f(X), Y), f)
}
output p = f(X)
"""
    res = coordcheck(tpc.loads(program), [16, 32], seeds=2)
    assert res.limit is None and "q.k / sqrt(n)" in res.limit_note
    assert np.isfinite(res.values).all()
    assert "no limit: attention logits q.k / sqrt(n)" in text(res)


def test_a_layer_applied_twice_names_its_values_after_each_use() -> None:
    """Tied weights: phi(h2) is x2 and phi(h2_2) x2_2, after the pre-activation they come from (the
    post-activation read by W.T was x1_2, named after its reader's layer number)."""
    labels = [p.label for p in probes(tpc.load(ROOT / "programs" / "train" / "tied_relu2_mup.tp"))]
    assert labels == ["h1 = U @ x", "x1 = relu(h1)", "h2 = W @ x1", "x2 = relu(h2)", "h2_2 = W.T @ x2",
                      "x2_2 = relu(h2_2)", "f = V @ x2_2"], labels


def test_a_trend_needs_a_slope_beyond_the_standard_errors() -> None:
    assert trend([64, 256], np.array([1.0, 2.0]), np.array([0.01, 0.02])).verdict == "grows"
    assert trend([64, 256], np.array([1.0, 0.5]), np.array([0.01, 0.01])).verdict == "vanishes"
    assert trend([64, 256], np.array([1.0, 2.0]), np.array([0.3, 0.6])).verdict is None  # within the errors
    assert trend([64, 256], np.array([1.0, 1.2]), np.array([0.0, 0.0])).verdict is None  # slope 0.13
    assert trend([64], np.array([1.0]), np.array([0.1])).verdict is None
    assert trend([64, 256], np.array([1.0, np.inf]), np.array([0.1, np.nan])).verdict == "not finite"


def test_kernel_regime_features_keep_their_initial_limit() -> None:
    res = coordcheck(tpc.load(SP), [32, 64], seeds=2, particles=2048, replicates=2)
    lim = res.limit_mean()
    assert res.regime == "kernel" and lim is not None
    assert np.array_equal(lim[:, :4], np.broadcast_to(lim[0, :4], (4, 4))) and np.isfinite(lim[:, :4]).all()
    assert np.isnan(lim[:, 4]).all()  # f is random in the limit: no line
    assert res.to_json()["vectors"][4]["limit"] is None


def test_json_has_every_number(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "coordcheck", MUP, *SMALL, "--json")
    assert status == 0 and "feature learning" in err  # the plan goes to stderr with --json
    data = json.loads(out)
    assert data["widths"] == [32, 64] and data["seeds"] == 2 and data["steps"] == [0, 1]
    assert data["data"] == "X" and data["rows"] == 4 and data["regime"] == "feature learning"
    assert data["limit"]["particles"] == 1024 and data["limit"]["replicates"] == 2
    vecs = {v["name"]: v for v in data["vectors"]}
    assert list(vecs) == ["h1", "x1", "h2", "x2", "f"]
    h2 = vecs["h2"]
    assert h2["definition"] == "W @ x1" and h2["kind"] == "pre-activation" and h2["line"] == 14
    assert np.shape(h2["mean"]) == (2, 2) and np.shape(h2["stderr"]) == (2, 2)
    assert np.shape(h2["values"]) == (2, 2, 2) and np.shape(h2["limit"]) == (2,)
    assert h2["mean"][1][0] == pytest.approx(np.mean(h2["values"][1][0]))
    assert isinstance(h2["slope"], float) and h2["trend"] is None


def test_cli_prints_the_tables(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["coordcheck", "--help"])
    assert "--widths" in capsys.readouterr().out
    png = tmp_path / "cc.png"
    status, out, _ = run(capsys, "coordcheck", MUP, *SMALL, "--png", str(png))
    assert status == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"{MUP}: mup (r = 0, feature learning); steps 0..1 on the 4 rows of X")
    header = lines.index("step 1 (after 1 step)") + 1
    assert lines[header].split() == ["32", "64", "limit"]
    row = lines[header + 3].split()
    assert row[:4] == ["h2", "=", "W", "@"] and len(row) == 8 and all(float(v) > 0.3 for v in row[5:])
    assert "no vector grows or vanishes with the width" in out
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(("argv", "where", "message"), [
    (["--steps", "4"], "relu2_mup.tp:18:1: error", "the program's loops run 3 top-level iterations"),
    (["--data", "Q"], "relu2_mup.tp: error", "not a data set the model is applied to (those are X, Xt)"),
])
def test_bad_options_are_refused(capsys: pytest.CaptureFixture[str], argv: list[str], where: str,
                                 message: str) -> None:
    status, out, err = run(capsys, "coordcheck", MUP, *argv)
    assert status == 2 and where in err and message in err and "Traceback" not in err and out == ""


def test_programs_it_cannot_follow_are_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "no_loop.tp"
    path.write_text(NO_LOOP)
    status, out, err = run(capsys, "coordcheck", str(path))
    assert status == 2 and out == ""
    assert f"{path}:8:1: error: coordcheck follows training, and this program has no training loop" in err
    status, _, err = run(capsys, "coordcheck", str(ROOT / "programs" / "kernels" / "relu_mlp.tp"))
    assert status == 2 and "a Netsor program without training" in err
    with pytest.raises(tpc.TpcError, match="cbow program"):
        coordcheck(tpc.load(str(ROOT / "programs" / "word2vec" / "cbow_mup.tp")), [16])


def test_a_vector_falling_to_a_positive_limit_does_not_vanish() -> None:
    """f after two muP steps of a MAML loop: mean |f| falls from 0.066 to 0.030 as its n^-1/2 part
    at initialisation fades, towards the limit's 0.026. That is convergence, not vanishing (a
    reviewer saw "vanishes like n^-0.57" beside the limit's column); a mean that falls below a
    positive limit, beyond the errors, still vanishes."""
    widths, mean, se = [64, 256, 1024], np.array([0.066, 0.030, 0.027]), np.array([0.002, 0.001, 0.0005])
    assert trend(widths, mean, se).verdict == "vanishes"  # without a limit: the slope alone
    assert trend(widths, mean, se, np.array([0.0255, 0.0258])).verdict is None
    assert trend(widths, mean, se, np.array([0.05, 0.0502])).verdict == "vanishes"
    assert trend(widths, mean, se, np.array([0.0, 0.0])).verdict == "vanishes"
