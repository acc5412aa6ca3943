"""examples/transfer/transfer.py (muP's learning-rate transfer beside tpc's limit): its options and
output paths, its data, and its measurement in a tiny configuration (2 widths, 2 learning rates,
1 seed, 2 SGD steps, 256 x 2 particles; a few seconds), whose numbers must show what the example
is about: in muP the loss falls, the widths agree with each other and with the limit, better than
SP's do, and SP with a fixed learning rate has no limit."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "transfer" / "transfer.py"


def example() -> ModuleType:
    pytest.importorskip("sklearn")
    spec = importlib.util.spec_from_file_location("example_transfer", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def resolved(mod: ModuleType, *argv: str):  # noqa: ANN201 - an argparse.Namespace
    ap = mod.parser()
    return mod.resolve(ap, ap.parse_args(list(argv)))


def test_help_and_output_paths(tmp_path: Path) -> None:
    mod = example()
    ap = mod.parser()
    first = mod.__doc__.split("\n\n")[0]
    assert ap.description == first and first.rstrip().endswith(".")
    for action in ap._actions:
        assert action.help, f"{action.option_strings} has no help text"
    options = {s for a in ap._actions for s in a.option_strings}
    assert {"--quick", "--out", "--update-docs", "--data-only", "--lrs", "--widths", "--steps", "--workers"} <= options
    default = resolved(mod)
    assert default.plot.parent == ROOT / "out" / "transfer" and default.base == SCRIPT.parent
    assert default.width_list == [64, 256, 1024, 4096] and len(default.lr_list) == 8
    assert max(default.lr_list) / min(default.lr_list) >= 100  # two decades
    assert resolved(mod, "--update-docs").plot == ROOT / "docs" / "transfer.png"
    quick = resolved(mod, "--quick", "--out", str(tmp_path))
    assert quick.width_list == [64, 256] and quick.base == tmp_path.resolve()  # --quick's data beside its results
    for bad in (("--quick", "--update-docs"), ("--lrs", "0.1,-1"), ("--lrs", "0.1,0.1"), ("--seeds", "0")):
        with pytest.raises(SystemExit):
            resolved(mod, *bad)


def test_data(tmp_path: Path) -> None:
    mod = example()
    args = resolved(mod, "--quick", "--out", str(tmp_path))
    mod.make_data(args, tmp_path)
    x, y = np.load(tmp_path / "data" / "train_x.npy"), np.load(tmp_path / "data" / "train_y.npy")
    xt, yt = np.load(tmp_path / "data" / "test_x.npy"), np.load(tmp_path / "data" / "test_y.npy")
    assert x.shape == (64, 64) and y.shape == (64,) and xt.shape == (512, 64) and yt.shape == (512,)
    assert np.allclose(x.mean(axis=0), 0) and abs(x.var() - 1) < 1e-12  # centred, unit variance
    assert np.bincount(y.astype(int)).min() >= 6  # stratified: every class 6 or 7 times
    assert not set(map(bytes, x)) & set(map(bytes, xt))  # held-out images


def test_tiny_measurement(tmp_path: Path) -> None:
    mod = example()
    args = resolved(mod, "--quick", "--out", str(tmp_path), "--widths", "64,256", "--lrs", "0.25,1", "--seeds", "1",
                    "--steps", "2", "--particles", "256", "--replicates", "2")
    mod.make_data(args, args.base)
    start = time.perf_counter()
    res = mod.measure(args, log=lambda *a, **k: None)
    seconds = time.perf_counter() - start
    sp, mup = res["params"]["sp"], res["params"]["mup"]
    # SP with a fixed learning rate: tpc refuses its limit as unstable; muP's is feature learning
    assert sp["limit"] is None and "unstable" in sp["limit_refused"] and sp["r"] == -1
    assert mup["regime"] == "feature learning" and set(mup["limit"]["runs"]) == {repr(0.25), repr(1.0)}
    for lr in ("0.25", "1.0"):
        runs = [mup["widths"][w]["runs"][lr] for w in (64, 256)] + [mup["limit"]["runs"][lr]]
        for r in runs:  # the loss falls from its value at initialisation (log 10 in muP, where f_0 -> 0)
            assert r["curve"][0] == pytest.approx(np.log(10), abs=0.05)
            assert r["loss"] < r["curve"][0] - 0.05
        # the widest width is near the limit (its Monte Carlo error is small beside this)
        assert abs(runs[1]["loss"] - runs[2]["loss"]) < 0.15 + 3 * runs[2]["loss_se"]

    def spread(entry: dict) -> float:  # how far apart the two widths' curves are, summed over the lrs
        return sum(abs(entry["widths"][64]["runs"][lr]["loss"] - entry["widths"][256]["runs"][lr]["loss"])
                   for lr in ("0.25", "1.0"))

    assert spread(mup) < spread(sp) / 2
    table = mod.tables(res)
    assert "| SP, fixed lr | limit | none (tpc: unstable, r = -1) |" in table and "| muP | limit |" in table
    mod.plot(res, tmp_path / "transfer.png")
    assert (tmp_path / "transfer.png").stat().st_size > 10_000
    assert seconds < 60  # about 3 s on a quiet two-core machine


def test_adam_options_and_a_tiny_adam_measurement(tmp_path: Path) -> None:
    """--optimizer adam: its own grid of rates, 4096 particles and output names; in a tiny run muP's
    widths agree with its limit, and SP with one Adam rate for every layer has no limit."""
    mod = example()
    default = resolved(mod, "--optimizer", "adam")
    assert default.particles == 2**12 and max(default.lr_list) / min(default.lr_list) >= 100
    assert resolved(mod, "--optimizer", "adam", "--update-docs").plot == ROOT / "docs" / "transfer_adam.png"
    args = resolved(mod, "--optimizer", "adam", "--quick", "--out", str(tmp_path), "--widths", "64,256", "--lrs",
                    "0.0625,0.25", "--seeds", "1", "--steps", "2", "--particles", "256", "--replicates", "2")
    assert "train adam(lr = 0.0625, steps = 2)" in mod.program_text("mup", 0.0625, 2, optimizer="adam")
    mod.make_data(args, args.base)
    res = mod.measure(args, log=lambda *a, **k: None)
    sp, mup = res["params"]["sp"], res["params"]["mup"]
    assert res["optimizer"] == "adam" and sp["limit"] is None and "unstable" in sp["limit_refused"]
    for lr in ("0.0625", "0.25"):
        runs = [mup["widths"][w]["runs"][lr] for w in (64, 256)] + [mup["limit"]["runs"][lr]]
        assert all(r["loss"] < r["curve"][0] - 0.05 for r in runs)
        assert abs(runs[1]["loss"] - runs[2]["loss"]) < 0.15 + 3 * runs[2]["loss_se"]
    assert "after 2 Adam steps" in mod.tables(res)
