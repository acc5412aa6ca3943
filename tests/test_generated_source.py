"""The generated PyTorch source never carries user text as code: hostile file names and comments
inside expressions stay inert, deep expressions compile, odd constants are valid Python."""

from __future__ import annotations

import ast
import io
import math
import tokenize
from pathlib import Path

import numpy as np
import pytest
import torch

import tpc
from tpc.backends.torch.codegen import _comment, _tree_code
from tpc.cli import main
from tpc.ops import expr as ex

HOSTILE_NAMES = [
    'a\nimport os; os.system("touch PWNED")\n#.tp',  # ran the command before generated source was escaped
    'a\nimport os\nos.system("touch PWNED")\n.tp',
    'b"""\nraise SystemExit(7)\n""".tp',
    "c\u2028raise SystemExit(8)\u2029.tp",
    "d\rraise SystemExit(9)\x0c\x1c.tp",
    "e'''\\\n#.tp",
]

PROGRAM = """width n
matrix W : n x n ~ N(0, 2 # a comment inside the variance
                       / n)
vector y ~ N(0, 1)
x = tanh(W @ y)
output m = mean(x * x)
"""


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_a_hostile_file_name_never_runs(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / name
    path.write_text(PROGRAM)
    prog = tpc.load(str(path))
    source = tpc.torch_source(prog)
    (tmp_path / "plain.tp").write_text(PROGRAM)
    plain = tpc.torch_source(tpc.load(str(tmp_path / "plain.tp")))
    # comments are not in the syntax tree: the file name changed nothing else
    assert ast.dump(ast.parse(source)) == ast.dump(ast.parse(plain))
    assert main(["run", str(path), "--width", "16", "--seeds", "2", "--quiet"]) == 0
    assert main(["compare", str(path), "--widths", "16,32", "--seeds", "2", "--quiet"]) == 0
    assert not (tmp_path / "PWNED").exists()


def test_comments_in_expressions_stay_comments() -> None:
    source = tpc.torch_source(tpc.loads(PROGRAM))
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    assert all(t.type == tokenize.COMMENT for t in tokens if "comment inside" in t.string)
    assert any("comment inside" in t.string for t in tokens)
    compile(source, "<test>", "exec")


def test_comment_escapes_every_line_break() -> None:
    for ch in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029\x00":
        text = _comment(f"x{ch}y")
        assert text.isascii() and text.isprintable() and "\n" not in text


def test_deep_expression_compiles_and_evaluates() -> None:
    # 600 nested additions: Python's parser alone refuses about 200 levels of parentheses
    tree: ex.Tree = ex.Arg(0)
    for _ in range(600):
        tree = ex.Apply("add", (tree, ex.Const(1.0)))
    hoisted: list[str] = []
    code = _tree_code(tree, ["x"], hoisted)
    namespace: dict[str, object] = {"x": torch.tensor(2.0), "math": math, "torch": torch}
    exec("\n".join([*hoisted, f"result = {code}"]), namespace)  # noqa: S102 - our own generated code
    assert float(namespace["result"]) == 602.0  # type: ignore[arg-type]


def test_non_finite_constants_are_valid_source() -> None:
    hoisted: list[str] = []
    code = _tree_code(ex.Apply("mul", (ex.Arg(0), ex.Const(math.inf))), ["x"], hoisted)
    value = eval(code, {"x": torch.tensor(-1.0), "math": math, "torch": torch})  # noqa: S307 - our own source
    assert float(value) == -math.inf


def test_data_named_like_a_group_constant() -> None:
    prog = tpc.loads("""width n
data _group0_mean = [[1, 2, 3]]
matrix U : n x 3 ~ N(0, 1)
vector v, w ~ N([0, 0], [[1, 0.5], [0.5, 1]])
h = U @ _group0_mean
output m = mean(h * v + w * w)
""")
    out = tpc.run(prog, width=4000, seeds=4)["m"]
    assert np.allclose(out.mean, 1.0, atol=0.1)
