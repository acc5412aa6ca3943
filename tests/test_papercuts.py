"""Small things a newcomer tripped over, each pinned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tpc
from tpc.cli import main
from tpc.ir import to_dot

ROOT = Path(__file__).resolve().parent.parent


def test_graph_json_unrolled_is_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["graph", str(ROOT / "programs/train/relu2_mup.tp"), "--unrolled", "--format", "json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert any("W_0" in line for line in res["unrolled"])


def test_dot_hides_the_backward_program_like_the_listing() -> None:
    prog = tpc.load(ROOT / "programs/kernels/relu_mlp.tp")
    derived = [n for n in prog.nodes() if n.params.get("derived")]
    assert derived
    plain, full = to_dot(prog), to_dot(prog, backward=True)
    assert all(f"  n{n.id} [" not in plain for n in derived)
    assert all(f"  n{n.id} [" in full for n in derived)


def test_compare_shows_the_limits_own_standard_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "mc.tp"
    path.write_text("width n\nvector v ~ N(0, 1)\noutput m = mean(log(abs(v)))\n")
    assert main(["compare", str(path), "--widths", "16,32", "--seeds", "2", "--quiet"]) == 0
    assert "the limit's own standard error" in capsys.readouterr().out
