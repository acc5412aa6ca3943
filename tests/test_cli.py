"""The command line: every command, its --help, and the JSON that scripts rely on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tpc import __version__
from tpc.cli import main

ROOT = Path(__file__).resolve().parent.parent
RELU = str(ROOT / "programs" / "kernels" / "relu_mlp.tp")
MOMENTS = str(ROOT / "programs" / "netsor" / "moments.tp")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out = capsys.readouterr()
    return status, out.out, out.err


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert __version__ in capsys.readouterr().out
    for cmd in ["check", "graph", "emit-torch", "run", "limit", "compare"]:
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert "FILE" in capsys.readouterr().out


def test_check_summary(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, out, _ = run(capsys, "check", RELU)
    assert status == 0
    assert "width      n" in out and "W2 (hidden, n x n)" in out
    assert "MatMul 3" in out and "nngp [8x8]" in out
    # the identity behind U.T @ x / n is tpc's, not the user's data (it was listed as `_t4 2x2`)
    path = tmp_path / "ut.tp"
    path.write_text("width n\ndata X = [[1, 0.5], [-0.3, 0.8]]\nmatrix U : n x 2 ~ N(0, 1/2)\n"
                    "z = U.T @ relu(U @ X) / n\noutput k = gram(U @ z)\n")
    status, out, _ = run(capsys, "check", str(path))
    assert status == 0 and "  data       X 2x2\n" in out


def test_graph_formats(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "graph", RELU)
    assert status == 0 and "MatMul" in out and "outputs: nngp" in out
    status, out, _ = run(capsys, "graph", RELU, "--format", "dot")
    assert out.startswith("digraph tpc {") and "->" in out
    status, out, _ = run(capsys, "graph", RELU, "--format", "json")
    data = json.loads(out)
    assert {n["instruction"] for n in data["nodes"]} >= {"MatMul", "Nonlin", "A-var", "G-var", "Kernel"}


def test_emit_torch(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "emit-torch", RELU)
    assert status == 0
    compile(out, "<emitted>", "exec")


def test_limit_json(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "limit", MOMENTS, "--json")
    data = json.loads(out)["outputs"]
    assert data["ab"] == {"value": pytest.approx(0.6), "method": "exact"}
    assert data["arccos"]["method"] == "closed-form"
    assert data["tanh3"]["method"] == "quadrature"
    status, out, _ = run(capsys, "limit", MOMENTS, "--json", "--method", "monte-carlo",
                         "--particles", "4096", "--replicates", "4")
    data = json.loads(out)["outputs"]
    assert data["tanh3"]["method"] == "monte-carlo" and "stderr" in data["tanh3"]
    status, out, _ = run(capsys, "limit", RELU, "--json")
    nngp = json.loads(out)["outputs"]["nngp"]
    assert nngp["method"] == "exact+closed-form" and len(nngp["value"]) == 8 and len(nngp["value"][0]) == 8


def test_run_json(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "run", MOMENTS, "--width", "128", "--seeds", "3", "--json")
    data = json.loads(out)["outputs"]["ab"]
    assert set(data) == {"mean", "stderr", "width", "seeds"}
    assert data["width"] == 128 and data["seeds"] == 3


def test_compare_json_and_plot(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    png = tmp_path / "conv.png"
    status, out, _ = run(capsys, "compare", MOMENTS, "--widths", "64,256", "--seeds", "4", "--json",
                         "--plot", str(png))
    assert status == 0
    data = json.loads(out)
    assert data["widths"] == [64, 256]
    assert isinstance(data["outputs"]["ab"]["slope"], float)
    assert png.read_bytes()[:4] == b"\x89PNG"
    status, out, _ = run(capsys, "compare", MOMENTS, "--widths", "64,256", "--seeds", "2", "--quiet")
    assert "fitted slope" in out


def test_bad_arguments_are_clean_errors(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "compare", MOMENTS, "--widths", "a,b")
    assert status == 2 and "--widths" in err and "Traceback" not in err
    if not _cuda():
        status, _, err = run(capsys, "run", MOMENTS, "--width", "64", "--device", "cuda:0")
        assert status == 2 and "no CUDA device" in err


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_limit_options_a_network_program_cannot_take_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """--method and --dtype were silently ignored by the kernel regime and word2vec's tables, and
    --dtype by every network program's limit (computed in float64)."""
    train = ROOT / "programs" / "train"
    cases = [((str(train / "relu2_ntk.tp"), "--method", "monte-carlo"), "use --method auto"),
             ((str(train / "relu2_ntk.tp"), "--method", "exact"), "use --method auto"),
             ((str(ROOT / "programs" / "word2vec" / "cbow_mup.tp"), "--method", "quadrature"), "exact"),
             ((str(train / "linear_mup.tp"), "--dtype", "float32"), "computed in float64")]
    for argv, says in cases:
        status, _, err = run(capsys, "limit", *argv)
        assert status == 2 and says in err and "Traceback" not in err, (argv, err)
    import tpc
    from tpc.errors import TpcError

    net = tpc.load(train / "linear_mup.tp")  # the API as the command line (dtype was a TypeError)
    assert tpc.limit(net, dtype="float64")["pred"].value.shape == (3,)
    with pytest.raises(TpcError, match="computed in float64"):
        tpc.limit(net, dtype="float32")
    status, out, _ = run(capsys, "limit", str(train / "relu2_ntk.tp"), "--json")  # auto: as before
    assert status == 0 and json.loads(out)


def test_plot_and_widths_are_checked_before_any_run(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A --plot matplotlib cannot write (x.foo was a traceback after every run; a folder or a name
    without an extension was written as NAME.png while tpc named NAME), and a width given twice
    (a slope fitted to it meant nothing): one line, exit 2, nothing run."""
    pytest.importorskip("matplotlib")
    for plot, says in (("x.foo", "matplotlib's formats"), ("noext", "matplotlib's formats"),
                       (str(tmp_path), "that is a folder")):
        for cmd in (["compare", RELU], ["coordcheck", str(ROOT / "programs" / "train" / "relu2_mup.tp")]):
            status, out, err = run(capsys, *cmd, "--widths", "64,128", "--seeds", "2", "--plot", plot)
            assert status == 2 and says in err and "Traceback" not in err and not out, (cmd, plot, err)
    status, out, err = run(capsys, "compare", RELU, "--widths", "64,64", "--seeds", "2")
    assert status == 2 and "64 given more than once" in err and not out


def test_means_and_standard_errors_near_the_largest_float(capsys: pytest.CaptureFixture[str]) -> None:
    """Their sum and squares overflowed: the mean of 1e308, 1e308, -1e308, 1e308 came out inf, and a
    standard error of 1e208s (mean(exp(184 a)) at width 64) inf, printed with no ± and null in JSON."""
    import numpy as np

    from tpc.backends.torch.run import FiniteResult

    r = FiniteResult("m", np.array([[1e308], [1e308], [-1e308], [1e308]]), 64)
    np.testing.assert_allclose(r.mean, [5e307], rtol=1e-12)
    np.testing.assert_allclose(r.stderr, [5e307], rtol=1e-12)  # std 1e308, over sqrt(4)
    big = FiniteResult("m", np.array([1.2e208, 0.1e208, 3.4e208, 0.0]), 64)
    assert np.isfinite(big.stderr) and np.isclose(big.stderr, np.std(big.values / 1e200, ddof=1) / 2 * 1e200)


def test_the_api_refuses_a_width_given_twice() -> None:
    import tpc
    from tpc.errors import TpcError

    with pytest.raises(TpcError, match="16 given more than once"):
        tpc.compare(tpc.load(RELU), [16, 16], 2)
