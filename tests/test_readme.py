"""README.md holds: every `tpc` command it shows runs as shown, and where it shows the output,
the output is what the command prints.

- A `$ tpc ...` line in a code block is a command; the lines after it (to the next `$` or the
  end of the block) are its output. Each shown line must appear, in order, in what the command
  prints; a line `...` skips any number of lines, and a line ending in `(...)` is matched up to
  there.
- A complete command in running text (`tpc classify --a -1/2,0,1/2 ...`, in backquotes, with no
  placeholder such as FILE or N) must exit with status 0.
Commands that take long (large widths) are marked slow; `--plot` goes to a temporary folder, so
the test never rewrites the tracked plots under docs/.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tpc.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SUBCOMMANDS = ("check", "graph", "emit-torch", "run", "limit", "compare", "classify", "coordcheck")
PLACEHOLDER = re.compile(r"\b(FILE|N|S|F|A|B|C|L|K|PNG|NAME|ADDRESS)\b|\.\.\.|\\\||[|<>]")


def shown_commands() -> list[tuple[str, list[str]]]:
    """(command, shown output lines) for every `$ tpc ...` in a fenced block."""
    out: list[tuple[str, list[str]]] = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", README, flags=re.S):
        current: tuple[str, list[str]] | None = None
        indent = 0
        for line in block.splitlines():
            if line.lstrip().startswith("$ "):  # blocks inside a list item are indented
                indent = len(line) - len(line.lstrip())
                current = (line.strip()[2:].strip(), [])
                out.append(current)
            elif current is not None:
                current[1].append(line[indent:].rstrip())
    return [(c, lines) for c, lines in out if c.startswith("tpc ")]


def inline_commands() -> list[str]:
    """Complete `tpc <subcommand> ...` commands written in running text."""
    text = re.sub(r"```.*?```", "", README, flags=re.S).replace("\n", " ")
    found = []
    for cmd in re.findall(r"`(tpc [^`]+)`", text):
        cmd = re.sub(r"\s+", " ", cmd).strip()
        words = cmd.split()
        complete = ".tp" in cmd or words[1] == "classify" and "--" in cmd
        if len(words) < 3 or words[1] not in SUBCOMMANDS or PLACEHOLDER.search(cmd) or not complete:
            continue
        found.append(cmd)
    return list(dict.fromkeys(found))


def _slow(cmd: str) -> bool:
    widths = re.search(r"--widths (\S+)", cmd)
    return bool(widths and max(int(w) for w in widths.group(1).split(",")) > 1024) or " compare " in f" {cmd} " \
        and "--widths" not in cmd or "word2vec" in cmd or "maml" in cmd


def _params(commands: list[str]) -> list:
    return [pytest.param(c, marks=pytest.mark.slow, id=c) if _slow(c) else pytest.param(c, id=c) for c in commands]


# an example's programs load data that its script writes (`--data-only`), from a package it needs
EXAMPLE_DATA = {"examples/maml/": "sklearn", "examples/word2vec/": "gensim"}


def _example_data(cmd: str) -> None:
    for folder, package in EXAMPLE_DATA.items():
        if folder in cmd and not (ROOT / folder / "data").is_dir():
            pytest.importorskip(package)
            script = ROOT / folder / f"{folder.strip('/').split('/')[-1]}.py"
            subprocess.run([sys.executable, str(script), "--data-only"], cwd=ROOT, check=True, timeout=600)


def _run(cmd: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    _example_data(cmd)
    argv = shlex.split(cmd)[1:]
    if "--plot" in argv:
        argv[argv.index("--plot") + 1] = str(tmp_path / "plot.png")
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        code = main([*argv, "--quiet"] if argv[0] in ("run", "compare", "limit", "coordcheck") else argv)
    finally:
        os.chdir(cwd)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _matches(shown: list[str], printed: list[str]) -> bool:
    """Every shown line, in order, among the printed ones ('...' skips; '(...)' ends a prefix)."""
    i = 0
    for want in shown:
        if want.strip() in ("...", ""):
            continue
        prefix = want.endswith("(...)")
        want = want[: -len("(...)")] if prefix else want
        while i < len(printed) and not (printed[i].startswith(want) if prefix else printed[i].rstrip() == want):
            i += 1
        if i == len(printed):
            return False
        i += 1
    return True


def test_the_readme_shows_commands() -> None:
    assert len(shown_commands()) >= 4 and len(inline_commands()) >= 5


@pytest.mark.parametrize("cmd_and_output", _params([c for c, _ in shown_commands()]))
def test_shown_output_is_printed(cmd_and_output: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shown = dict(shown_commands())[cmd_and_output]
    code, out, err = _run(cmd_and_output, tmp_path, capsys)
    expected_code = 2 if "tests/errors/" in cmd_and_output else 0  # README's example of a mistake
    assert code == expected_code
    out = err if expected_code else out  # an error goes to stderr
    printed = out.splitlines()
    assert _matches(shown, printed), f"README shows:\n{chr(10).join(shown)}\n\nprinted:\n{out}"


@pytest.mark.parametrize("cmd", _params(inline_commands()))
def test_inline_command_runs(cmd: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(cmd, tmp_path, capsys)
    assert code == 0, err
