"""abc-parametrizations: TP4's classification (r, stability, nontriviality, regime)."""

from __future__ import annotations

import json

import pytest

from tpc.cli import main
from tpc.errors import TpcError
from tpc.parametrization import ABC, classify, preset


@pytest.mark.parametrize("layers", [1, 2, 3, 5])
def test_presets(layers: int) -> None:
    sp, ntk, mup = (classify(preset(p, layers)) for p in ("sp", "ntk", "mup"))
    assert sp.stable and sp.nontrivial and sp.regime == "kernel"
    assert sp.r == (1.5 if layers == 1 else 0.5)
    assert ntk.stable and ntk.nontrivial and ntk.regime == "kernel" and ntk.r == 0.5
    assert mup.stable and mup.nontrivial and mup.regime == "feature learning" and mup.r == 0.0


def test_mean_field_is_feature_learning() -> None:
    mf = classify(preset("mf", 1))
    assert mf.regime == "feature learning" and mf.r == 0.0
    with pytest.raises(TpcError, match="one hidden layer"):
        preset("mf", 2)


def test_unstable_choices_say_which_condition_fails() -> None:
    # SP with an O(1) learning rate blows up: r < 0 and 2a+c < 1
    sp_big_lr = classify(ABC((0.0, 0.0, 0.0), (0.0, 0.5, 0.5), 0.0))
    assert not sp_big_lr.stable and sp_big_lr.regime == "unstable"
    assert any("r >= 0" in f for f in sp_big_lr.failed)
    assert any("2 a_3 + c >= 1" in f for f in sp_big_lr.failed)
    # an input layer that is not O(1) at initialization
    bad_init = classify(ABC((0.0, 0.5), (0.5, 0.0), 0.0))
    assert bad_init.failed == ["initialization: a_1 + b_1 = 0 (here 0.5)"]
    # a hidden layer with the wrong scale
    bad_hidden = classify(ABC((-0.5, 0.0, 0.5), (0.5, 0.0, 0.5), 0.0))
    assert any("a_2 + b_2 = 1/2" in f for f in bad_hidden.failed)


def test_trivial_and_kernel_edges() -> None:
    # muP with a smaller learning rate (c = 1/2): stable, r > 0, and a+b+r = 1.5, 2a+c = 1.5: trivial
    slow = classify(ABC((-0.5, 0.0, 0.5), (0.5, 0.5, 0.5), 0.5))
    assert slow.stable and not slow.nontrivial and slow.regime == "trivial"
    # NTK with a readout initialised smaller (b_3 = 1/2): r = min(1, 1) + 0 - 1 + 1 = 1, still
    # nontrivial through 2 a_3 + c = 1: the kernel regime
    k = classify(ABC((0.0, 0.5, 0.5), (0.0, 0.0, 0.5), 0.0))
    assert k.stable and k.nontrivial and k.r == 1.0 and k.regime == "kernel"


def test_classify_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["classify", "--preset", "mup", "--layers", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"r", "stable", "nontrivial", "regime"} <= set(data)
    assert data["regime"] == "feature learning"
    assert main(["classify", "--a", "0,1/2", "--b", "1/2,0", "--c", "0"]) == 0
    assert "fails    initialization: a_1 + b_1 = 0" in capsys.readouterr().out
    assert main(["classify", "--a", "x", "--b", "1", "--c", "0"]) == 2
    assert capsys.readouterr().err.startswith("tpc: error:")
    # two parametrizations at once: the preset used to win silently over --a/--b/--c
    assert main(["classify", "--preset", "mup", "--a", "1,2", "--b", "1,1", "--c", "0"]) == 2
    assert "error: give one parametrization to classify: --preset or --a/--b/--c" in capsys.readouterr().err
    assert main(["classify", "--a", "0,0", "--b", "0,0", "--c", "0", "--layers", "3"]) == 2
    assert "error: --layers goes with --preset" in capsys.readouterr().err


def test_a_program_that_leaves_layers_untrained_has_its_own_r() -> None:
    """TP4's r sums the moves of the trained layers only: an untrained layer's update is no term, an
    untrained readout's update no part of the backward pass (Yang & Hu 2021, Section 3)."""
    mup = preset("mup", 2)  # a = [-1/2, 0, 1/2], b = [1/2, 1/2, 1/2], c = 0
    every = classify(mup)
    assert every.r == 0 and every.regime == "feature learning" and every.trained is None
    readout = classify(mup, (False, False, True))  # random features: the features never move
    assert readout.r == float("inf") and readout.stable and readout.nontrivial and readout.regime == "kernel"
    hidden = classify(mup, (False, True, False))  # the readout frozen at its n^-1 start: still r = 0
    assert hidden.r == 0 and hidden.regime == "feature learning"
    nothing = classify(mup, (False, False, False))
    assert nothing.stable and not nothing.nontrivial and nothing.regime == "trivial"
    ntk = preset("ntk", 2)
    assert classify(ntk).r == 0.5 and classify(ntk, (True, True, False)).r == 0.5  # back: n^-(a+b) either way
    sp = ABC((0.0, 0.0, 0.0), (0.0, 0.5, 0.5), 0.0)  # SP at rate O(1): its readout step blows up (2 a + c = 0 < 1)
    assert not classify(sp, (False, False, True)).stable
    assert any("2 a_3 + c" in why for why in classify(sp, (False, False, True)).failed)
    assert not any("2 a_3 + c" in why for why in classify(sp, (True, True, False)).failed)


RANDOM_FEATURES = """width n
parametrization mup
data X = [[1, 0.5, 0], [0.2, -1, 0.3]]
data Y = [1, -1]
matrix U : n x 3 ~ N(0, 2/3)
matrix A : n x n ~ N(0, 2/n)
layer V : readout 1 x n
model f(x) = V @ relu(A @ relu(U @ x))
for t in range(2) { L = mse(f(X), Y)  f -= 0.5 * grad(L, f) }
output p = f(X)
"""


def test_classify_and_check_of_a_program_name_what_it_trains(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    path = tmp_path / "rf.tp"
    path.write_text(RANDOM_FEATURES)
    assert main(["classify", str(path)]) == 0
    out = capsys.readouterr().out
    assert "this program trains V only (every layer trained: r = 0, feature learning)" in out
    assert "r          inf" in out and "regime     kernel" in out
    assert main(["classify", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["r"] is None and data["trained"] == [False, True] and data["regime"] == "kernel"
    assert main(["check", str(path)]) == 0
    assert "this training moves V only: r = inf, kernel" in capsys.readouterr().out
    path.write_text(RANDOM_FEATURES.replace("matrix U : n x 3 ~ N(0, 2/3)", "layer U : input n x 3, var = 2"))
    assert main(["classify", str(path)]) == 0
    out = capsys.readouterr().out  # every layer trained: the parametrization's own class, no extra line
    assert "this program trains" not in out and "r          0" in out and "feature learning" in out


STABLE_TRAINING = """width n
parametrization abc(a = [-0.25, 0.25, 0.5], b = [0.25, 0.25, 0.5], c = -0.5)
data X = [[1, 2, 3], [0, 1, 0]]
data Y = [1, -1]
layer U : input n x 3
layer W : hidden n x n
layer V : readout 1 x n
model f(x) = V @ relu(W @ relu(U @ x))
for t in range(3) {
  L = mse(f(X), Y)
  U -= 0.5 * grad(L, U)
  W -= 0.5 * grad(L, W)
}
output p = f(X)
"""


def test_a_stable_training_in_an_unstable_parametrization_has_a_limit() -> None:
    """Every layer trained, this abc is unstable (r = -1/2: the readout's step); the program never steps the
    readout, and its own training is stable feature learning (r = 0): tpc limit takes it (it refused
    it, naming the parametrization), and finite widths approach it."""
    import numpy as np

    import tpc

    net = tpc.loads(STABLE_TRAINING)
    assert not net.classification().stable
    ours = net.program_classification()
    assert ours.stable and ours.r == 0 and ours.regime == "feature learning"
    lim = tpc.limit(net, particles=2**14)
    finite = tpc.run(net, 1024, 8)
    gap = np.abs(finite["p"].values.mean(0) - lim["p"].value)
    assert np.all(gap <= 5 * np.sqrt(finite["p"].stderr ** 2 + lim["p"].stderr ** 2) + 0.05), gap
    # SP at rate O(1) stepping U and W only: its features blow up (r = 1/2 + 0 - 1 + 0 < 0)
    sp = STABLE_TRAINING.replace("abc(a = [-0.25, 0.25, 0.5], b = [0.25, 0.25, 0.5], c = -0.5)",
                                 "abc(a = [0, 0, 0], b = [0, 0.5, 0.5], c = 0)")
    with pytest.raises(TpcError, match="this training is unstable .*r >= 0 \\(here r = -0.5\\)"):
        tpc.limit(tpc.loads(sp))
