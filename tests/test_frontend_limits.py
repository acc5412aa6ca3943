"""Hostile input to the front end: every program, however large, deep or strange, and every data file,
however broken, ends in a result or a located TpcError, quickly; never a traceback or a hang."""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from numpy.lib import format as npy_format

import tpc
from tpc.errors import TpcError, _edit_distance, nearest
from tpc.syntax import MAX_DEPTH, MAX_TERMS

PROGRAM = "width n\nvector a ~ N(0, 1)\nvector b ~ N(0, 1)\n"


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging (a FIFO read would block forever)."""
    def stop(*_: object) -> None:
        raise TimeoutError(f"over {seconds} s")

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def located(text: str, **kwargs: object) -> TpcError:
    """The TpcError that `text` raises; it must name a line and a column."""
    with pytest.raises(TpcError) as info:
        tpc.loads(text, **kwargs)
    err = info.value
    assert err.span is not None, err.render()
    assert "Traceback" not in err.render()
    return err


# ---------------------------------------------------------------------------- expression size and depth


def test_a_sum_of_200_terms_compiles_and_runs() -> None:
    prog = tpc.loads(PROGRAM + "x = " + " + ".join(["a", "b"] * 100) + "\noutput m = mean(x)\n")
    res = tpc.run(prog, 8, 1)
    assert np.isfinite(res["m"].values).all()


@pytest.mark.parametrize("terms", [MAX_TERMS + 1, 490, 1000, 3000])
def test_long_sums_are_refused_with_their_size(terms: int) -> None:
    err = located(PROGRAM + "x = " + " + ".join(["a * b"] * terms) + "\noutput m = mean(x)\n")
    assert f"more than {MAX_TERMS} terms" in err.message
    assert (err.span.line, err.span.column) == (4, 5)


@pytest.mark.parametrize("text", [
    "x = " + "- " * 1000 + "a",
    "x = " + "relu(" * 1000 + "a" + ")" * 1000,
    "x = a + " + "(" * 2000 + "b" + ")" * 2000 + " + " + "-" * 500 + "a",
    "data X = " + "[" * 1000 + "1" + "]" * 1000,
    "vector c ~ N(" + "[" * 1000 + "0" + "]" * 1000 + ", 1)",
    "x = a ^ " + "a ^ " * 500 + "a",
])
def test_deep_nesting_is_refused(text: str) -> None:
    err = located(PROGRAM + text + "\noutput m = mean(a)\n")
    assert f"nested deeper than {MAX_DEPTH} levels" in err.message or "more than" in err.message


def test_parentheses_alone_nest_freely() -> None:
    prog = tpc.loads(PROGRAM + "x = " + "(" * 1000 + "a" + ")" * 1000 + "\noutput m = mean(x)\n")
    assert "m" in prog.outputs


def test_the_limits_hold_deep_in_the_callers_stack() -> None:
    """A caller already deep in its own stack (a notebook, a test runner) still gets its program."""
    text = PROGRAM + "x = " + " + ".join(["relu(a)"] * MAX_TERMS) + "\noutput m = mean(x)\n"

    def nested(k: int) -> object:
        return tpc.loads(text) if k == 0 else nested(k - 1)

    assert "m" in nested(sys.getrecursionlimit() - 200).outputs


def test_doubling_nonlins_stop_quickly() -> None:
    text = "width n\nnonlin f1(x) = x + x\n" + "".join(
        f"nonlin f{i}(x) = f{i - 1}(x) + f{i - 1}(x)\n" for i in range(2, 19)) + PROGRAM[8:] + \
        "output m = mean(f18(a))\n"
    t0 = time.perf_counter()
    err = located(text)
    assert time.perf_counter() - t0 < 20
    assert "more than" in err.message and "operations" in err.message


def test_a_nonlin_used_at_depth_is_bounded_too() -> None:
    body = " + ".join(["x"] * 200)
    text = (f"width n\nnonlin g(x) = {body}\nnonlin h(x) = g(g(g(x)))\n" + PROGRAM[8:]
            + "output m = mean(h(h(h(a))))\n")
    located(text)  # 200 ** 9 nodes inlined: refused, not computed
    deep = "tanh(" * 250 + "x" + ")" * 250
    err = located(f"width n\nnonlin g(x) = {deep}\n" + PROGRAM[8:] + "output m = mean(g(g(g(g(a)))))\n")
    assert f"deeper than {MAX_DEPTH}" in err.message  # each call is shallow, the tree written out is not


# ---------------------------------------------------------------------------- names and hints


def test_a_huge_misspelt_name_is_fast() -> None:
    t0 = time.perf_counter()
    err = located(PROGRAM + "output m = mean(" + "q" * 20000 + ")\n")
    assert time.perf_counter() - t0 < 10
    assert err.message.startswith("unknown name 'qqq") and len(err.message) < 100


def test_nearest_is_fast_on_long_names_and_many_candidates() -> None:
    names = ["x" * 5000 + str(i) for i in range(50)] + [f"v{i}" for i in range(5000)]
    t0 = time.perf_counter()
    assert nearest("x" * 5000 + "9", names) is None  # too long to be a typo worth a hint
    assert nearest("v4999x", names) == "v4999"
    assert time.perf_counter() - t0 < 5


def test_banded_distance_agrees_with_the_full_one() -> None:
    def full(a: str, b: str) -> int:
        prev = list(range(len(b) + 1))
        for i, ca in enumerate(a, 1):
            cur = [i]
            for j, cb in enumerate(b, 1):
                cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
            prev = cur
        return prev[-1]

    rng = random.Random(0)
    for _ in range(3000):
        a = "".join(rng.choice("abc") for _ in range(rng.randint(0, 9)))
        b = "".join(rng.choice("abc") for _ in range(rng.randint(0, 9)))
        limit = rng.randint(1, 5)
        d, want = _edit_distance(a, b, limit), full(a, b)
        assert d == want if want <= limit else d > limit
    assert nearest("hiden", ["hidden", "x"]) == "hidden"


# ---------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("text", [
    "output m = mean(1e400 * a)",
    "output m = mean(-1e400 * a)",
    "data X = [1e400, 1]\noutput m = mean(a)",
    "data X = [[1, 2], [3, -1e999]]\noutput m = mean(a)",
    "vector c ~ N(0, [[1e400]])\noutput m = mean(c)",
    "output m = mean(1e300 * 1e300 * a)",
    "scalar s = 1e200 * 1e200\noutput m = mean(s * a)",
])
def test_non_finite_numbers_are_refused(text: str) -> None:
    err = located(PROGRAM + text + "\n")
    assert "too large" in err.message or "overflows" in err.message


@pytest.mark.parametrize("text, words", [
    ("dim d = 99999999999999999999\noutput m = mean(a)", "at most"),
    ("matrix U : n x 100000000000 ~ N(0, 1)\noutput m = mean(a)", "at most"),
    ("matrix U : n x 0 ~ N(0, 1)\noutput m = mean(a)", "positive"),
    ("dim d = 0\noutput m = mean(a)", "positive"),
    ("matrix U : n x 2000000 ~ N(0, 1)\noutput m = gram(U.T @ a / n)", "would take about"),
])
def test_dimensions_that_cannot_be_built(text: str, words: str) -> None:
    assert words in located(PROGRAM + text + "\n").message


# ---------------------------------------------------------------------------- source text


@pytest.mark.parametrize("char", ["\x0c", "\u2028", "\u2029", "\x1c", "\x1d", "\x1e", "\x85", "\x0b"])
def test_line_breaks_in_comments_do_not_shift_the_line_shown(char: str) -> None:
    err = located(f"# one {char} two {char}\nwidth n # three {char}\nvector a ~ N(0, 1)\noutput m = mean(b)\n")
    lines = err.render().split("\n")
    assert lines[0].startswith("<program>:4:17: error: unknown name 'b'")
    assert lines[1] == "    output m = mean(b)"
    assert lines[2] == "    " + " " * 16 + "^"


def test_the_end_of_a_program_is_located_by_newlines_only() -> None:
    err = located("width n\n# a \x0c b \u2028 c\nvector a ~ N(0,\n")
    assert err.span.line == 3


def test_control_characters_never_reach_the_terminal() -> None:
    err = located("width n\nvector a ~ N(0, 1)\noutput m = mean(a) \x1b[31m\n")
    assert "\x1b" not in err.render()
    path_err = located('width n\ndata X = load("\x1b]0;title\x07.csv")\n')
    assert "\x1b" not in path_err.render() and "\x07" not in path_err.render()


@pytest.mark.parametrize("source", ["", "# only a comment\n", "\x00\x01\x02", "width n\nvector λ ~ N(0, 1)\n",
                                    "width n\n" + "x" * 100000 + "\n", "width n\nvector a ~ N(0, 1)\x00\n"])
def test_odd_programs_are_clean_errors(source: str) -> None:
    with pytest.raises(TpcError):
        tpc.loads(source)


def test_a_program_that_is_not_utf8_is_located(tmp_path: Path) -> None:
    path = tmp_path / "latin1.tp"
    path.write_bytes("width n\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(TpcError) as info:
        tpc.load(path)
    assert (info.value.span.line, info.value.span.column) == (2, 6)
    assert "not UTF-8" in info.value.render()


# ---------------------------------------------------------------------------- networks


NET = ("width n\nparametrization mup(lr = 0.1)\ndata X = [[1, 2, 3], [0, 1, 0]]\ndata Y = {y}\nlayer U : input n x 3\n"
       "layer V : readout {k} x n\nmodel f(x) = V @ relu(U @ x)\nloss L = {loss}\ntrain sgd(steps = 2) minimize L\n"
       "output p = f(X)\n")


@pytest.mark.parametrize("y, k", [("[[1, 2], [3, 4]]", 1), ("[[1, 2, 3], [3, 4, 5]]", 2), ("[1, 2]", 2),
                                  ("[[[1, 2]], [[1, 2]]]", 2), ("[1, 2, 3]", 1)])
def test_a_user_loss_checks_the_shape_of_its_data(y: str, k: int) -> None:
    err = located(NET.format(y=y, k=k, loss="mean((f(X) - Y)^2)"))
    assert err.span.line == 8


@pytest.mark.parametrize("y, k", [("[1, 2]", 1), ("[[1], [2]]", 1), ("[[1, 2], [3, 4]]", 2), ("[[1], [2]]", 2),
                                  ("3", 2)])
def test_a_user_loss_with_fitting_data_trains(y: str, k: int) -> None:
    net = tpc.loads(NET.format(y=y, k=k, loss="mean((f(X) - Y)^2)"))
    res = tpc.run(net, 8, 1)
    assert np.isfinite(np.asarray(res["p"].values)).all()


def test_doubling_nonlins_in_a_model_stop_quickly() -> None:
    nonlins = "nonlin f1(x) = x + x\n" + "".join(f"nonlin f{i}(x) = f{i - 1}(x) + f{i - 1}(x)\n" for i in range(2, 16))
    text = NET.format(y="[1, 2]", k=1, loss="mse(f(X), Y)").replace("model f(x) = V @ relu(U @ x)",
                                                                   nonlins + "model f(x) = V @ f15(U @ x)")
    t0 = time.perf_counter()
    err = located(text)
    assert time.perf_counter() - t0 < 20
    assert "operations" in err.message


# ---------------------------------------------------------------------------- data files


def program(folder: Path, load: str) -> Path:
    path = folder / "prog.tp"
    path.write_text(f'width n\ndata X = load("{load}")\nmatrix U : n x 3 ~ N(0, 1)\noutput m = mean(relu(U @ X))\n')
    return path


def load_error(path: Path, **kwargs: object) -> str:
    with deadline(20), pytest.raises(TpcError) as info:
        tpc.load(path, **kwargs)
    assert info.value.span is not None and info.value.span.line == 2
    return info.value.message


def test_a_npy_too_large_for_memory_is_refused_from_its_header(tmp_path: Path) -> None:
    with open(tmp_path / "huge.npy", "wb") as f:
        npy_format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": (100000000000, 3)})
    assert "would take about 2.18 TB" in load_error(program(tmp_path, "huge.npy"))


def test_a_npy_shorter_than_its_header(tmp_path: Path) -> None:
    with open(tmp_path / "short.npy", "wb") as f:
        npy_format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": (10, 3)})
        f.write(b"\0" * 80)
    assert "shorter than its header" in load_error(program(tmp_path, "short.npy"))


@pytest.mark.parametrize("content, words", [(b"", "empty"), (b"\x93NUMPY\x01", "not a .npy"),
                                            (b"not numpy at all", "not a .npy")])
def test_broken_npy_files(tmp_path: Path, content: bytes, words: str) -> None:
    (tmp_path / "x.npy").write_bytes(content)
    assert words in load_error(program(tmp_path, "x.npy"))


def test_a_good_npy_still_loads(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.arange(12.0).reshape(4, 3), allow_pickle=False)
    np.save(tmp_path / "f.npy", np.asfortranarray(np.arange(12, dtype=np.int32).reshape(4, 3)))
    assert tpc.load(program(tmp_path, "x.npy")).outputs
    assert tpc.load(program(tmp_path, "f.npy")).outputs


def test_paths_that_are_not_data_files(tmp_path: Path) -> None:
    (tmp_path / "dir.csv").mkdir()
    os.symlink("loop2.csv", tmp_path / "loop1.csv")
    os.symlink("loop1.csv", tmp_path / "loop2.csv")
    os.mkfifo(tmp_path / "fifo.csv")
    os.symlink("/dev/zero", tmp_path / "zero.npy")
    assert "is a directory" in load_error(program(tmp_path, "dir.csv"))
    assert "loop of symbolic links" in load_error(program(tmp_path, "loop1.csv"))
    assert "not a regular file (a FIFO)" in load_error(program(tmp_path, "fifo.csv"))
    assert "outside" in load_error(program(tmp_path, "zero.npy"))
    assert "a character device" in load_error(program(tmp_path, "zero.npy"), allow_data_outside=True)
    assert "too long" in load_error(program(tmp_path, "a" * 300 + ".csv"))
    assert "no such" not in load_error(program(tmp_path, "missing.csv"))  # 'data file not found'


def test_a_nul_in_a_path(tmp_path: Path) -> None:
    assert "NUL" in load_error(program(tmp_path, "a\x00b.csv"))


def test_data_is_read_only_under_the_programs_folder_or_the_current_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inside, outside, cwd = tmp_path / "prog", tmp_path / "elsewhere", tmp_path / "cwd"
    for d in (inside / "sub", outside, cwd):
        d.mkdir(parents=True)
    for d in (inside / "sub", outside, cwd):
        (d / "x.csv").write_text("1,2,3\n4,5,6\n")
    os.symlink(outside / "x.csv", inside / "link.csv")
    monkeypatch.chdir(cwd)
    assert tpc.load(program(inside, "sub/x.csv")).outputs  # below the program's folder
    assert tpc.load(program(inside, str(cwd / "x.csv"))).outputs  # below the current folder
    for path in (str(outside / "x.csv"), "../elsewhere/x.csv", "link.csv"):
        assert "outside the program's folder" in load_error(program(inside, path))
        assert tpc.load(program(inside, path), allow_data_outside=True).outputs
    text = f'width n\ndata X = load("{outside / "x.csv"}")\nvector a ~ N(0, 1)\noutput m = mean(a)\n'
    located(text, base_dir=inside)
    assert tpc.loads(text, base_dir=inside, allow_data_outside=True).outputs


def test_data_beyond_the_memory_budget_is_refused_unless_forced(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.ones((100000, 3)))
    path = program(tmp_path, "x.npy")
    with pytest.raises(TpcError, match=r"would take about 2.29 MB, more than the 0.0001 GB allowed"):
        tpc.load(path, memory_gb=1e-4)
    assert tpc.load(path, memory_gb=1e-4, force=True) is not None
