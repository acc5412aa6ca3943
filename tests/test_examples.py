"""The examples (examples/dichotomy.py, examples/maml/maml.py, examples/word2vec/word2vec.py):
their options (help, output paths), `--data-only` (then every example .tp program loads), and
`--quick` end to end into a temporary folder without touching docs/ (marked slow)."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import tpc

ROOT = Path(__file__).resolve().parent.parent
# script, the modules it needs beyond tpc's, what --quick writes, and lines its table prints
EXAMPLES = {
    "dichotomy": ("examples/dichotomy.py", (), ("dichotomy.png", "results.json"),
                  (" sp  n =    64: feature movement", "mup  limit (feature learning")),
    "maml": ("examples/maml/maml.py", ("sklearn",), ("maml.png", "results.json"),
             ("test accuracy (95% interval over tasks)", "linear muP     512", "ReLU NTK limit")),
    "word2vec": ("examples/word2vec/word2vec.py", ("gensim", "scipy"), ("word2vec.png", "results.json", "results.md"),
                 ("| run | analogy accuracy (%)", "| tpc muP, width 256 |", "| muP limit (exact) |")),
}
# the examples' data folders, and the file the README's table of word2vec is kept in (tracked)
DATA = {"maml": "examples/maml", "word2vec": "examples/word2vec"}


def needs(name: str) -> None:
    for module in EXAMPLES[name][1]:
        pytest.importorskip(module)


def module(name: str) -> ModuleType:
    """The example's script imported as a module (its main() does not run)."""
    needs(name)
    path = ROOT / EXAMPLES[name][0]
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tracked_outputs() -> dict[str, tuple[int, str]]:
    """(mtime, sha256) of every file under docs/ and of examples/word2vec/results.md."""
    files = [p for p in sorted((ROOT / "docs").rglob("*")) if p.is_file()]
    files.append(ROOT / "examples" / "word2vec" / "results.md")
    return {str(p.relative_to(ROOT)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in files if p.exists()}


def run(name: str, *options: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, EXAMPLES[name][0], *options], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def resolved(mod: ModuleType, *argv: str) -> argparse.Namespace:
    ap = mod.parser()
    args = ap.parse_args(list(argv))
    if hasattr(mod, "vocabulary_size"):  # word2vec's resolve needs the programs' vocabulary
        return mod.resolve(ap, args, mod.vocabulary_size(mod.PROGRAMS["mup"]))
    return mod.resolve(ap, args)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_help_is_complete(name: str) -> None:
    mod = module(name)
    ap = mod.parser()
    first = mod.__doc__.split("\n\n")[0]
    assert ap.description == first and first.rstrip().endswith(".")  # a whole paragraph, not a cut line
    for action in ap._actions:
        assert action.help, f"{name}: {action.option_strings} has no help text"
    options = {s for a in ap._actions for s in a.option_strings}
    assert {"--quick", "--out", "--update-docs"} <= options
    assert ("--data-only" in options) == (name in DATA)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_outputs_stay_out_of_tracked_files(name: str, tmp_path: Path) -> None:
    mod = module(name)
    default = resolved(mod)
    assert default.plot.parent == ROOT / "out" / name  # out/ is ignored by git
    assert resolved(mod, "--out", str(tmp_path)).plot.parent == tmp_path
    assert resolved(mod, "--out", str(tmp_path / "p.png")).plot == tmp_path / "p.png"  # the old --out FILE.png
    assert resolved(mod, "--update-docs").plot == ROOT / "docs" / f"{name}.png"
    quick = resolved(mod, "--quick")
    assert quick.quick and quick.width_list != default.width_list
    with pytest.raises(SystemExit):
        resolved(mod, "--quick", "--update-docs")
    with pytest.raises(SystemExit):
        resolved(mod, "--out", str(tmp_path), "--update-docs")


@pytest.mark.parametrize("name", sorted(DATA))
def test_data_only_then_programs_load(name: str) -> None:
    needs(name)
    before = tracked_outputs()
    r = run(name, "--data-only", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wrote" in r.stdout
    programs = sorted((ROOT / DATA[name]).glob("*.tp"))
    assert programs
    for path in programs:
        net = tpc.load(path)
        assert isinstance(net, tpc.Network) and net.train is not None, path
    assert tracked_outputs() == before


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_quick_run(name: str, tmp_path: Path) -> None:
    needs(name)
    script, _, files, lines = EXAMPLES[name]
    data = ROOT / DATA[name] / "data" if name in DATA else None
    data_before = sorted((p.name, p.stat().st_mtime_ns) for p in data.iterdir()) if data and data.exists() else None
    before = tracked_outputs()
    r = run(name, "--quick", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    for f in files:
        assert (tmp_path / f).stat().st_size > 0, f
    assert tracked_outputs() == before
    if data_before is not None:  # --quick keeps its smaller data beside its results, not in the programs' data/
        assert sorted((p.name, p.stat().st_mtime_ns) for p in data.iterdir()) == data_before
    assert "quick run" in r.stdout and "not the README's" in r.stdout
    for line in lines:
        assert line in r.stdout, f"{name}: no '{line}' in\n{r.stdout}"
