"""Command-line options are validated by the parser, JSON output is strict, memory is stated
and bounded before anything is allocated, and non-finite results are errors naming the
instruction."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import tpc
from tpc.cli import dumps, main
from tpc.errors import NumericalError, TpcError

RELU = "programs/kernels/relu_mlp.tp"
TRAIN = "programs/train/relu2_mup.tp"


@pytest.mark.parametrize("argv", [
    ["run", RELU, "--width", "0"],
    ["run", RELU, "--width", "-3"],
    ["run", RELU, "--width", "8", "--seeds", "0"],
    ["run", RELU, "--width", "8", "--device", "bogus"],
    ["run", RELU, "--width", "8", "--memory-gb", "0"],
    ["run", RELU, "--width", "8", "--memory-gb", "nan"],
    ["limit", RELU, "--particles", "0"],
    ["limit", RELU, "--replicates", "1"],
    ["compare", RELU, "--seeds", "-1"],
    ["classify", "--preset", "mup", "--layers", "0"],
    ["limit", RELU, "--seed", "99999999999999999999"],  # a ValueError from torch's generator before
    ["run", RELU, "--width", "8", "--first-seed", "2147483648"],
    ["limit", RELU, "--replicates", "2000000"],
])
def test_bad_options_are_refused_by_the_parser(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument" in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [
    ["classify", "--a", "1/0", "--b", "1,1,1", "--c", "1"],
    ["classify", "--a", "inf,0,0", "--b", "1,1,1", "--c", "1"],
    ["classify", "--a", ",", "--b", "1,1,1", "--c", "1"],
])
def test_bad_numbers_in_classify_are_clean_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "expects comma-separated numbers" in capsys.readouterr().err


def test_negative_fractions_read_as_values(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["classify", "--a", "-1/2,0,1/2", "--b", "1/2,1/2,1/2", "--c", "0", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["a"] == [-0.5, 0.0, 0.5] and res["regime"] == "feature learning"


def test_mean_field_preset_has_one_hidden_layer(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["classify", "--preset", "mf", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["regime"] == "feature learning"


def test_plot_to_a_missing_folder_fails_before_running(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    compare_module = importlib.import_module("tpc.compare")  # `tpc.compare` is the function

    def never(*_args: object, **_kw: object) -> None:
        raise AssertionError("compare ran before the plot's folder was checked")

    monkeypatch.setattr(compare_module, "compare", never)
    assert main(["compare", RELU, "--widths", "16", "--plot", str(tmp_path / "missing" / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_json_is_strict_with_one_seed_and_one_width(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", RELU, "--widths", "16", "--seeds", "1", "--json", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "NaN" not in text and "Infinity" not in text
    res = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    nngp = res["outputs"]["nngp"]
    assert nngp["slope"] is None  # one width: no slope
    assert all(v is None for v in np.ravel(nngp["widths"][0]["stderr"]))  # one seed: no standard error


def test_one_width_prints_no_slope(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", RELU, "--widths", "16", "--seeds", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "a slope needs two widths" in out and "nan" not in out


def test_dumps_replaces_non_finite_values() -> None:
    text = dumps({"a": float("nan"), "b": [1.0, float("inf")], "c": np.array([np.nan, 2.0]), "d": np.float64(-np.inf)})
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": [None, 2.0], "d": None}


def test_a_run_too_large_is_refused_before_allocating(capsys: pytest.CaptureFixture[str]) -> None:
    # one seed at width 200000 holds two 200000 x 200000 matrices: about 600 GB
    assert main(["run", RELU, "--width", "200000", "--seeds", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "would take about" in err and "GB" in err and "--force" in err


def test_a_limit_too_large_is_refused_with_its_figure(tmp_path: Path) -> None:
    np.save(tmp_path / "X.npy", np.ones((3000, 2)))
    (tmp_path / "big.tp").write_text(
        "width n\ndata X = load(\"X.npy\")\nmatrix U : n x 2 ~ N(0, 1)\nvector v ~ N(0, 1)\n"
        "f = v @ relu(U @ X) / sqrt(n)\noutput k = cov(f)\n")
    prog = tpc.load(str(tmp_path / "big.tp"))
    with pytest.raises(TpcError, match=r"the limit.s kernels would take about 0.2.* GB, more than the 0.01 GB"):
        tpc.limit(prog, memory_gb=0.01)
    assert tpc.limit(prog, memory_gb=0.01, force=True)["k"].value.shape == (3000, 3000)


def test_a_training_run_too_large_is_refused() -> None:
    net = tpc.load(TRAIN)
    with pytest.raises(TpcError, match="one seed at width 100000 would take about"):
        tpc.run(net, 100000, 1)


def test_float32_overflow_at_finite_width_names_the_instruction() -> None:
    prog = tpc.loads("width n\ndata X = [[1e30, 0], [0, 1]]\nmatrix U : n x 2 ~ N(0, 1)\nh = U @ X\n"
                     "output g = gram(h)\n")
    with pytest.raises(NumericalError, match=r"instruction .*line 5.* produced infinite values"):
        tpc.run(prog, 64, 2, dtype="float32")
    assert np.isfinite(tpc.run(prog, 64, 2)["g"].mean).all()  # float64 holds it


@pytest.mark.parametrize("call", [
    lambda p: tpc.run(p, 0, 2), lambda p: tpc.run(p, 2.5, 2), lambda p: tpc.run(p, 16, 0),
    lambda p: tpc.run(p, 16, 2, dtype="float16"), lambda p: tpc.run(p, 16, 2, device="bogus"),
    lambda p: tpc.limit(p, particles=0), lambda p: tpc.torch_module(p, 0),
    lambda p: tpc.run(p, 16, 2, memory_gb=float("inf")), lambda p: tpc.limit(p, memory_gb=float("nan")),
    lambda p: tpc.compare(p, [0, 16], 2), lambda p: tpc.loads(b"width n"),
])
def test_the_api_checks_what_the_parser_checks(call: object) -> None:
    # each of these once ended in a ZeroDivisionError, KeyError, RuntimeError or ValueError
    with pytest.raises(TpcError):
        call(tpc.load(RELU))  # type: ignore[operator]


def test_no_progress_bar_before_a_memory_refusal(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", RELU, "--width", "200000", "--seeds", "1"]) == 2
    assert "seed/s" not in capsys.readouterr().err


def test_compare_takes_the_limits_particles(capsys: pytest.CaptureFixture[str]) -> None:
    """`--particles` and `--replicates` reach the limit that compare measures against."""
    net = tpc.load(TRAIN)
    want = tpc.limit(net, particles=2**10, replicates=2)["pred"]
    got = tpc.compare(net, [32], 1, particles=2**10, replicates=2)["pred"].limit
    np.testing.assert_array_equal(got.value, want.value)
    assert main(["compare", TRAIN, "--widths", "32", "--seeds", "1",
                 "--particles", "1024", "--replicates", "2", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    np.testing.assert_allclose(doc["outputs"]["pred"]["limit"]["value"], want.value, rtol=1e-12)


@pytest.mark.parametrize("kwargs", [{"seed": 2**31}, {"replicates": 2**21}, {"seed": -1}])
def test_the_api_bounds_seeds_as_the_parser_does(kwargs: dict[str, int]) -> None:
    with pytest.raises(TpcError, match="seed|replicates"):
        tpc.limit(tpc.load(RELU), **kwargs)


@pytest.mark.parametrize("call", [
    lambda p: tpc.torch_module(p, 16, [2**70]),  # a ValueError from torch's generator before
    lambda p: tpc.torch_module(p, 16, []),  # a RuntimeError from torch.stack before
    lambda p: tpc.torch_module(p, 16, [-1]),
    lambda p: tpc.compare(p, [16], 2, replicates=2.5),  # a TypeError before
    lambda p: tpc.compare(p, [16], 2, particles=1),
    lambda p: tpc.run(p, 16, 3, first_seed=2**31 - 1),  # seeds past the bound
])
def test_the_api_checks_seed_lists_and_counts(call: object) -> None:
    with pytest.raises(TpcError, match="seed|replicates|particles"):
        call(tpc.load(TRAIN))  # type: ignore[operator]


def test_seeds_past_the_bound_are_refused_by_run(capsys: pytest.CaptureFixture[str]) -> None:
    """With --workers it was refused as a --grid error the user never wrote; without, it ran."""
    for extra in ([], ["--workers", "1"]):
        assert main(["run", RELU, "--width", "8", "--seeds", "3", "--first-seed", "2147483647", *extra]) == 2
        err = capsys.readouterr().err
        assert "seeds 2147483647 to 2147483649 go past 2147483647" in err and "--grid" not in err


def test_monte_carlo_replicates_of_different_seeds_are_independent() -> None:
    """Seed s draws its replicates from their own streams (s * 2^20 + r): seeds 0 and 1 share no
    replicate (with s + r they shared all but one, and the scatter between them understated the
    Monte Carlo error); seed 0's are those of before (0, 1, ...), so shown figures stay."""
    from tpc.backends.limit import evaluate_limit
    from tpc.seeds import replicate_seed

    assert [replicate_seed(0, r) for r in range(3)] == [0, 1, 2] and replicate_seed(1, 0) == 2**20
    prog = tpc.load("programs/netsor/moments.tp")
    opts = {"method": "monte-carlo", "particles": 256, "replicates": 3, "keep_replicates": True}
    runs = [evaluate_limit(prog, seed=s, **opts) for s in (0, 1)]
    name = "tanh3"
    a, b = (np.asarray(r[name].replicates).reshape(3, -1) for r in runs)
    gaps = np.abs(a[:, None, :] - b[None, :, :]).max(-1)  # every replicate of seed 0 against every one of seed 1
    assert gaps.min() > 1e-6, gaps
    again = evaluate_limit(prog, seed=0, **opts)[name].replicates
    np.testing.assert_array_equal(np.asarray(again), np.asarray(runs[0][name].replicates))


def test_the_outputs_of_many_seeds_count_against_the_budget(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A raw program's run keeps every seed's outputs: 40000 seeds of four 16 x 16 kernels are 0.92
    GB (the parts, their concatenation, a scaled copy) however small one seed's working memory is. It
    used to run past a 0.02 GB budget (886 MB resident); a run that fits states the figure."""
    path = tmp_path / "big.tp"
    rows = ", ".join("[" + ", ".join(str((i * 7 + j) % 5 - 2) for j in range(3)) + "]" for i in range(16))
    path.write_text(f"width n\ndata X = [{rows}]\nmatrix U : n x 3 ~ N(0, 1/3)\nh = relu(U @ X)\n"
                    + "".join(f"output k{i} = gram(h, h)\n" for i in range(4)))
    assert main(["run", str(path), "--width", "2", "--seeds", "40000", "--memory-gb", "0.02"]) == 2
    out = capsys.readouterr()
    assert "with the outputs of 40000 seeds (0.916 GB)" in out.err and "seed/s" not in out.err
    assert main(["run", str(path), "--width", "2", "--seeds", "100", "--memory-gb", "0.02"]) == 0
    assert main(["run", str(path), "--width", "2", "--seeds", "1000", "--memory-gb", "0.1", "--json"]) == 0
    assert "and 23.4 MB for the outputs of all seeds" in capsys.readouterr().err
