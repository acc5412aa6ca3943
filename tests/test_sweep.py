"""`tpc sweep` (tpc/sweep.py): grids, parameters set in the syntax tree, results equal to serial runs,
unchanged when a worker dies, memory refused with the figure. The tests start local Dask clusters."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tpc
from tests.conftest import PROGRAMS
from tpc.cli import main
from tpc.errors import TpcError
from tpc.sweep import parse_grid, settings, sweep

pytest.importorskip("distributed")

RELU = PROGRAMS / "train" / "relu2_mup.tp"


def test_grid_syntax() -> None:
    axes = parse_grid("width=64,256 seed=0..3 lr=0.1,0.3 param=mup,sp")
    assert axes["seed"] == ["0", "1", "2", "3"] and axes["width"] == ["64", "256"]
    assert settings(axes) == [{"lr": "0.1", "param": "mup"}, {"lr": "0.1", "param": "sp"},
                              {"lr": "0.3", "param": "mup"}, {"lr": "0.3", "param": "sp"}]
    for bad, msg in (("seed=0..3", "needs widths"), ("width=64 width=8", "twice"), ("width=0", "at least 1"),
                     ("width=64 seed=3..1", "a <= b"), ("width", "name=v1")):
        with pytest.raises(TpcError, match=msg):
            parse_grid(bad)


def test_sweep_equals_serial_runs_and_sets_parameters() -> None:
    res = sweep(RELU, "width=48,96 seed=0..2 lr=0.25,0.5", workers=2)
    text = RELU.read_text()
    for si, setting in enumerate(res.settings):
        edited = tpc.loads(text.replace("lr = 0.5", f"lr = {setting['lr']}"), filename=str(RELU),
                           base_dir=RELU.parent)
        for w in (48, 96):
            serial = tpc.run(edited, w, 3)
            for name, r in serial.items():
                np.testing.assert_allclose(res.values[si, w][name], r.values, rtol=0, atol=1e-10, err_msg=name)
    a, b = res.values[0, 96]["curve"], res.values[1, 96]["curve"]
    assert np.abs(a - b).max() > 1e-3  # the learning rate took effect


def test_a_worker_killed_mid_sweep_changes_nothing() -> None:
    from dask.distributed import LocalCluster

    killed = []
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      resources={"MEMORY": 2**33}) as c:
        def kill_one(done: int, _total: int) -> None:
            if done == 2 and not killed:
                next(iter(c.workers.values())).process.process.kill()
                killed.append(done)

        res = sweep(RELU, "width=40 seed=0..7", cluster=c.scheduler_address, progress=kill_one)
    assert killed
    serial = tpc.run(tpc.load(RELU), 40, 8)
    for name, r in serial.items():
        np.testing.assert_allclose(res.values[0, 40][name], r.values, rtol=0, atol=1e-10)


def test_bad_settings_and_memory_are_refused_before_running(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(TpcError, match="names no parameter of this program.*lr, param, seed, steps, width"):
        sweep(RELU, "width=64 momentum=0.9")
    with pytest.raises(TpcError, match="more than a worker's share"):
        sweep(RELU, "width=4096", workers=2, memory_gb=0.5)
    assert main(["sweep", str(RELU), "--grid", "width=64 lr=fast"]) == 2
    assert "lr takes numbers" in capsys.readouterr().err
    assert main(["sweep", str(RELU), "--grid", "width=64 bogus=1,2"]) == 2  # no header or bar before refusing
    out = capsys.readouterr()
    assert "names no parameter" in out.err and "runs (settings" not in out.out + out.err


def test_cli_sweep_json_and_param_axis(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", str(PROGRAMS / "train" / "linear_mup.tp"), "--grid", "width=32 seed=0,1 param=mup,ntk",
                 "--workers", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["grid"]["param"] == ["mup", "ntk"]
    assert out["grid"]["width"] == [32] and out["grid"]["seed"] == [0, 1]  # numbers, as in the rows
    rows = {(tuple(r["setting"].items()), r["output"]): r for r in out["rows"]}
    mup, ntk = rows[((("param", "mup"),), "pred")], rows[((("param", "ntk"),), "pred")]
    assert len(mup["values"]) == 2 and mup["mean"] != ntk["mean"]


def test_compare_on_the_engine_equals_compare_in_process() -> None:
    net = tpc.load(PROGRAMS / "train" / "linear_mup.tp")
    here = tpc.compare(net, [32, 64], 3)
    there = tpc.compare(net, [32, 64], 3, workers=2)
    for name in here:
        for a, b in zip(here[name].rows, there[name].rows, strict=True):
            np.testing.assert_allclose(b.mean, a.mean, rtol=0, atol=1e-12)
            assert b.rms_error == pytest.approx(a.rms_error, abs=1e-12)


def test_cli_run_on_the_engine_prints_what_run_prints(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["run", str(PROGRAMS / "train" / "linear_mup.tp"), "--width", "32", "--seeds", "3", "--first-seed", "2",
            "--json"]
    assert main(args) == 0
    here = json.loads(capsys.readouterr().out)
    assert main([*args, "--workers", "2"]) == 0
    there = json.loads(capsys.readouterr().out)
    for name, o in here["outputs"].items():
        np.testing.assert_allclose(there["outputs"][name]["mean"], o["mean"], rtol=0, atol=1e-12)


def test_grid_refuses_empty_and_repeated_values() -> None:
    for bad, msg in (("width=,", "no values"), ("width=8 seed=1,1", "repeats"),
                     ("width=8 seed=0..10000000", "more than"), ("width=8 seed=0,00", "repeats"),
                     ("width=8,08", "repeats"), ("width=8 seed=99999999999999999999", "at most"),
                     ("width=8 lr=0.1,0.10", "repeats"), ("width=8 lr=1e-1,0.1", "repeats")):
        with pytest.raises(TpcError, match=msg):
            parse_grid(bad)


def test_a_sweeps_means_and_errors_near_the_largest_float() -> None:
    """The sweep took its own mean and error (inf, printed with no ±, null in JSON) where `tpc run` had
    stopped overflowing: both are FiniteResult's now."""
    from tpc.sweep import SweepResult

    vals = np.array([1.2e208, 0.1e208, 3.4e208, 0.0])
    res = SweepResult({"width": ["64"], "seed": ["0", "1", "2", "3"]}, {(0, 64): {"m": vals}}, [{}], [0, 1, 2, 3])
    row = res.to_json()["rows"][0]
    assert np.isclose(row["mean"], vals.mean()) and np.isclose(row["stderr"], np.std(vals / 1e200, ddof=1) / 2 * 1e200)
