"""Every user mistake: `file:line:col: message`, the source line, a caret, exit status 2,
no traceback. The expected text of each lives in tests/errors/NAME.err (golden files);
set TPC_UPDATE_GOLDEN=1 to rewrite them after a deliberate change."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tpc.cli import main

ROOT = Path(__file__).resolve().parent.parent
CASES = sorted((ROOT / "tests" / "errors").glob("*.tp"))


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_error_matches_golden(path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    rel = path.relative_to(ROOT).as_posix()
    status = main(["check", rel])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith(f"{rel}:")
    assert "Traceback" not in err
    golden = path.with_suffix(".err")
    if os.environ.get("TPC_UPDATE_GOLDEN"):
        golden.write_text(err)
    assert err == golden.read_text()


def test_every_error_names_a_line_and_column() -> None:
    for golden in (ROOT / "tests" / "errors").glob("*.err"):
        first = golden.read_text().splitlines()[0]
        parts = first.split(":")
        assert parts[1].isdigit() and parts[2].isdigit(), first


def test_no_traceback_from_the_command_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tpc", "limit", "tests/errors/unknown_name.tp"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "unknown name 'hiden'" in proc.stderr and "did you mean 'hidden'?" in proc.stderr


def test_missing_program_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "does/not/exist.tp"]) == 2
    assert "does/not/exist.tp: error: no such file" in capsys.readouterr().err


def test_a_program_cannot_run_python(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # names that would be dangerous in generated source are just unknown names here
    for text in ['output m = __import__("os")', "output m = exec(1)", "output m = eval"]:
        prog = tmp_path / "evil.tp"
        prog.write_text("width n\n" + text + "\n")
        assert main(["check", str(prog)]) == 2
        assert "error" in capsys.readouterr().err


def test_python_keywords_as_names_compile(tmp_path: Path) -> None:
    import tpc

    prog = tpc.loads(
        "width n\nvector lambda ~ N(0, 1)\nvector forward ~ N(0, 1)\nclass = relu(lambda)\n"
        "torch = class * forward\noutput import = mean(torch)\n"
    )
    res = tpc.run(prog, 64, 2)
    assert res["import"].values.shape == (2,)


def test_the_grammar_cache_is_private_and_a_broken_one_is_rebuilt(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Lark's analysis of the grammar is kept between runs in the user's cache directory (a pickle:
    never in a shared place). A damaged file costs a rebuild, never a failure."""
    from tpc import syntax

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    source = "width n\nvector v ~ N(0, 1)\noutput m = mean(v * v)\n"
    syntax._parser.cache_clear()
    try:
        want = syntax.parse(source)
        (cache,) = (tmp_path / "tpc").iterdir()
        assert (tmp_path / "tpc").stat().st_mode & 0o077 == 0  # only the user can write there
        cache.write_bytes(b"not a pickle\n" + cache.read_bytes()[:100])
        syntax._parser.cache_clear()
        assert syntax.parse(source) == want
        assert len(cache.read_bytes().split(b"\n")[0]) == 64  # rewritten: a sha256 of the grammar first
    finally:
        syntax._parser.cache_clear()


def test_no_grammar_cache_where_others_could_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache is a pickle: not in a directory that others may write to, and not under a
    relative XDG_CACHE_HOME (which the XDG rules say to ignore: the home directory's is used)."""
    from tpc import syntax

    shared = tmp_path / "tpc"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert syntax._grammar_cache() is False
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert str(syntax._grammar_cache()).startswith(str(tmp_path / "home" / ".cache" / "tpc") + os.sep)
