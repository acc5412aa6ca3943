"""A grammar-based fuzzer of tpc: random `.tp` programs (mostly well-formed), token-level mutations,
and a harness that runs each program through every command and classifies the outcome.

The rule under test: every command, on any input, ends with a result or a clean `TpcError`
(`NumericalError` is one), never another exception and never a hang.

The generator draws through a `Chooser`, so the same code serves hypothesis (tests/test_fuzz.py)
and a seeded `random.Random` (benchmarks/fuzz.py, for long runs).
"""

from __future__ import annotations

import contextlib
import io
import math
import random
import re
import shutil
import signal
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

ROOT = Path(__file__).resolve().parent.parent
# the data the generated programs load, gathered from the bundled programs' folders
DATA_FILES = [ROOT / "programs" / "kernels" / "data" / "inputs8x3.csv",
              *(ROOT / "programs" / "train" / "data" / f for f in ("test3x3.csv", "train4x3.csv"))]
TPC_DIR = str(ROOT / "tpc")

T = TypeVar("T")

# user-visible coordinatewise functions (tpc.ops.functions.FUNCTIONS), plus the `id` alias
FUNCTIONS = ("identity", "id", "relu", "step", "sign", "abs", "tanh", "erf", "derf", "sigmoid", "gelu", "dgelu",
             "softplus", "sin", "cos", "exp", "square", "sqrt", "log")
SMOOTH = ("tanh", "erf", "sigmoid", "gelu", "softplus", "sin", "cos", "identity")  # activations that rarely blow up
ACTIVATIONS = ("relu", "tanh", "erf", "gelu", "sigmoid", "softplus", "identity", "abs", "sin", "step", "square")
KEYWORDS = ("width", "dim", "data", "scalar", "matrix", "vector", "nonlin", "output", "parametrization", "layer",
            "model", "loss", "train", "load", "N", "mean", "gram", "cov", "grad", "tangent_kernel", "sqrt", "T",
            "history", "features", "feature_change", "adapted", "embeddings", "mse", "xent", "logistic", "sgd",
            "fomaml", "cbow", "minimize", "on", "sum", "input", "hidden", "readout", "bias", "embedding", "var",
            "lr", "steps", "batch", "mup", "ntk", "sp", "mf", "abc", "x", "n")
# numbers that break naive code: overflow, underflow, zero, negatives, huge integers
NASTY_NUMBERS = ("0", "0.0", "-1", "1e400", "1e-400", "1e308", "1e-320", "-1e400", "99999999999999999999999",
                 "18446744073709551617", "1000000", "2", "0.5", "1e9", "3", "100", "-0", ".0", "1e-12", "65536")
NASTY_CHARS = ("(", ")", "[", "]", ",", ";", ":", "=", "@", "*", "/", "^", "**", "+", "-", "~", ".", "#", '"', "\n",
               "é", "\x00", "\t", "λ", "1", "x", " ", "\\", "'", "{", "$")


class Chooser(Protocol):
    """The random decisions the generator makes."""

    def integer(self, lo: int, hi: int) -> int: ...
    def choice(self, seq: Sequence[T]) -> T: ...
    def chance(self, p: float) -> bool: ...


class RandomChooser:
    """Decisions from a seeded `random.Random` (long runs, reproducible by seed)."""

    def __init__(self, seed: int | None = None) -> None:
        self.rng = random.Random(seed)

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def choice(self, seq: Sequence[T]) -> T:
        return seq[self.rng.randrange(len(seq))]

    def chance(self, p: float) -> bool:
        return self.rng.random() < p


class HypothesisChooser:
    """Decisions drawn by hypothesis (`draw` of a composite strategy or `st.data()`). Choices and
    integers are hypothesis draws; coin flips come from a `Random` that hypothesis draws, because its
    integers lean towards small values, which would skew every probability (mutated, network, ...)."""

    def __init__(self, draw: Callable[[Any], Any]) -> None:
        from hypothesis import strategies as st

        self.draw = draw
        self.st = st
        self.rng: random.Random = draw(st.randoms(use_true_random=False))

    def integer(self, lo: int, hi: int) -> int:
        return self.draw(self.st.integers(lo, hi))

    def choice(self, seq: Sequence[T]) -> T:
        return seq[self.draw(self.st.integers(0, len(seq) - 1))]

    def chance(self, p: float) -> bool:
        return self.rng.random() < p


def num(c: Chooser, lo: float, hi: float, digits: int = 2) -> str:
    """A short decimal in [lo, hi]."""
    scale = 10**digits
    v = c.integer(round(lo * scale), round(hi * scale)) / scale
    return f"{v:g}"


def matrix_literal(c: Chooser, rows: int, cols: int) -> str:
    return "[" + ", ".join("[" + ", ".join(num(c, -1.5, 1.5, 1) for _ in range(cols)) + "]"
                           for _ in range(rows)) + "]"


# ---------------------------------------------------------------------------- Netsor programs


@dataclass
class Vec:
    name: str
    batch: str | None  # the data set it was computed from (a batch of vectors), None: one vector
    deps: frozenset[str] = frozenset()  # the named vectors it depends on, itself included


@dataclass
class _Netsor:
    c: Chooser
    lines: list[str] = field(default_factory=list)
    vecs: list[Vec] = field(default_factory=list)
    hidden: list[str] = field(default_factory=list)
    scalars: list[str] = field(default_factory=list)
    nonlins: list[tuple[str, int]] = field(default_factory=list)  # name, number of scalar parameters
    counter: int = 0
    n: str = "n"
    k: int = 1  # rows of the readout matrix V
    has_input: bool = False

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def deps_of(self, text: str) -> frozenset[str]:
        used = set(re.findall(r"[A-Za-z_]\w*", text))
        return frozenset().union(*(v.deps for v in self.vecs if v.name in used))

    def vec(self, batch: str | None = None, strict: bool = False) -> Vec:
        """A vector compatible with `batch` (unbatched vectors broadcast)."""
        ok = [v for v in self.vecs if v.batch == batch or (not strict and (v.batch is None or batch is None))]
        return self.c.choice(self.vecs if not ok or self.c.chance(0.03) else ok)

    def coord(self, batch: str | None, depth: int = 0) -> tuple[str, str | None]:
        """A coordinatewise expression over vectors of one batch; returns (text, batch)."""
        c = self.c
        k = c.integer(0, 9 if depth < 2 else 2)
        if k <= 2:
            v = self.vec(batch)
            return v.name, v.batch or batch
        if k == 3:
            e, b = self.coord(batch, depth + 1)
            return f"{c.choice(FUNCTIONS if c.chance(0.3) else SMOOTH)}({e})", b
        if k == 4:
            (a, b1), (e, b2) = self.coord(batch, depth + 1), self.coord(batch, depth + 1)
            return f"{a} {c.choice(['+', '-', '*'])} {e}", b1 or b2
        if k == 5:
            e, b = self.coord(batch, depth + 1)
            s = c.choice(self.scalars) if self.scalars and c.chance(0.3) else num(c, -2, 2)
            return f"{s} * ({e})" if c.chance(0.7) else f"({e}) / {s if s not in ('0', '-0') else 2}", b
        if k == 6 and self.nonlins:
            name, params = c.choice(self.nonlins)
            e, b = self.coord(batch, depth + 1)
            return f"{name}({', '.join([e] + [num(c, 0, 1) for _ in range(params)])})", b
        if k == 7:  # a moment as a parameter: layer-norm style
            v = self.vec(batch)
            return f"{v.name} / sqrt(mean({v.name} * {v.name}))", v.batch or batch
        if k == 8:
            e, b = self.coord(batch, depth + 1)
            return f"({e}) ^ {c.choice(['2', '3', '0.5', '1'])}" if c.chance(0.3) else f"-({e})", b
        e, b = self.coord(batch, depth + 1)
        return f"({e})", b

    def vector_expr(self) -> tuple[str, str | None]:
        """The right-hand side of an assignment: a MatMul, a Nonlin, or a mix."""
        c = self.c
        k = c.integer(0, 5)
        if k <= 1 and self.hidden:
            w = c.choice(self.hidden)
            t = ".T" if c.chance(0.35) else ""
            if c.chance(0.5):
                v = self.vec()
                return f"{w}{t} @ {v.name}", v.batch
            e, b = self.coord(None)
            return f"{w}{t} @ ({e})", b
        if k == 2 and self.hidden and c.chance(0.5):
            w1, w2 = c.choice(self.hidden), c.choice(self.hidden)
            v = self.vec()
            return f"{w1}.T @ ({w2} @ {v.name})", v.batch
        if k == 4 and c.chance(0.3):
            v = self.vec()
            w = c.choice(self.hidden) if self.hidden else "U"
            return c.choice([f"{num(c, -2, 2)} * {w} @ {v.name}", f"{w} @ {w} @ {v.name}",
                             f"{w} @ ({v.name} ** 2)", f"{w}.T @ {w} @ {v.name}"]), v.batch
        if k == 5 and self.has_input and c.chance(0.2):  # U.T @ x / n: moments, a B x d matrix (finite)
            v = self.vec()
            return f"U.T @ {v.name} / {self.n}", v.batch
        if k == 3 and self.hidden:  # a nonlinearity of a MatMul plus a second term (an RNN step)
            w = c.choice(self.hidden)
            v = self.vec()
            other = self.vec(v.batch)
            return f"{c.choice(ACTIVATIONS)}({w} @ {v.name} + {other.name})", v.batch or other.batch
        return self.coord(None)

    def build(self) -> str:
        c = self.c
        lines = self.lines
        n = self.n = c.choice(["n", "n", "n", "m", "width"])
        lines.append(f"width {n}")
        d = c.integer(1, 3)
        dim = str(d)
        if c.chance(0.2):
            dim = "d"
            lines.append(f"dim d = {d}")
        datas: list[tuple[str, bool]] = []  # name, batched
        for i in range(c.integer(0 if c.chance(0.2) else 1, 2)):
            name = f"X{i}" if i else "X"
            if d == 3 and c.chance(0.15):
                csv = c.choice(["inputs8x3.csv", "test3x3.csv", "train4x3.csv"])
                lines.append(f'data {name} = load("data/{csv}")')
                datas.append((name, True))
            elif c.chance(0.25):
                lines.append(f"data {name} = [{', '.join(num(c, -1.5, 1.5, 1) for _ in range(d))}]")
                datas.append((name, False))
            else:
                lines.append(f"data {name} = {matrix_literal(c, c.integer(1, 3), d)}")
                datas.append((name, True))
        if c.chance(0.25):
            name = self.fresh("a")
            lines.append(f"scalar {name} = {num(c, -1, 2)}")
            self.scalars.append(name)
        if c.chance(0.3):
            name = self.fresh("nl")
            if c.chance(0.5):
                lines.append(f"nonlin {name}(x; a) = relu(x) - a * relu(-x)")
                self.nonlins.append((name, 1))
            else:
                body = c.choice(["x * sigmoid(x)", "tanh(x) + 0.1 * x", "relu(x) ^ 2", "erf(x) * cos(x)",
                                 "exp(-x * x)", "softplus(x) - log(2)", "abs(x) + step(x)"])
                lines.append(f"nonlin {name}(x) = {body}")
                self.nonlins.append((name, 0))
        if datas:
            self.has_input = True
            s2 = num(c, 0.5, 2)
            lines.append(f"matrix U : {n} x {dim} ~ N(0, {s2}/{dim})")
            for name, batched in datas:
                h = self.fresh("h")
                act = c.choice(ACTIVATIONS) if c.chance(0.7) else ""
                lines.append(f"{h} = {act}(U @ {name})" if act else f"{h} = U @ {name}")
                self.vecs.append(Vec(h, name if batched else None, frozenset({h})))
        for _ in range(c.integer(0 if self.vecs else 1, 2)):
            if c.chance(0.3):
                a, b = self.fresh("g"), self.fresh("g")
                v1, v2 = float(num(c, 0.3, 2)), float(num(c, 0.3, 2))
                rho = float(num(c, -0.9, 0.9))
                cov = round(rho * math.sqrt(v1 * v2) * 0.99, 3)
                lines.append(f"vector {a}, {b} ~ N([0, {num(c, -1, 1)}], [[{v1:g}, {cov:g}], [{cov:g}, {v2:g}]])")
                self.vecs += [Vec(a, None, frozenset({a})), Vec(b, None, frozenset({b}))]
            else:
                v = self.fresh("v")
                lines.append(f"vector {v} ~ N({num(c, -1, 1) if c.chance(0.3) else 0}, {num(c, 0.2, 2)})")
                self.vecs.append(Vec(v, None, frozenset({v})))
        for _ in range(c.integer(0, 2)):
            w = self.fresh("W")
            lines.append(f"matrix {w} : {n} x {n} ~ N(0, {num(c, 0.5, 2)}/{n})")
            self.hidden.append(w)
        for _ in range(c.integer(1, 4)):
            e, b = self.vector_expr()
            x = self.fresh("x")
            lines.append(f"{x} = {e}")
            self.vecs.append(Vec(x, b, self.deps_of(e) | {x}))
        self.outputs(n, datas)
        return "\n".join(lines) + "\n"

    def outputs(self, n: str, datas: list[tuple[str, bool]]) -> None:
        c, lines = self.c, self.lines
        last = self.vecs[-1]
        readouts: list[tuple[str, Vec]] = []
        matrix_readout = False  # grad(f, x) takes a readout by an initial vector
        if c.chance(0.6):
            for v in [last] + ([self.vec()] if c.chance(0.4) else []):
                r = self.fresh("r")  # a readout vector serves one readout
                lines.append(f"vector {r} ~ N(0, {num(c, 0.5, 2)})")
                f = self.fresh("f")
                lines.append(f"{f} = {r} @ {v.name} / sqrt({n})")
                readouts.append((f, v))
        elif c.chance(0.3):
            k = self.k = c.integer(1, 3)
            lines.append(f"matrix V : {k} x {n} ~ N(0, 1)")
            f = self.fresh("f")
            lines.append(f"{f} = V @ {last.name} / sqrt({n})")
            readouts.append((f, last))
            matrix_readout = True
        count = 0
        for _ in range(c.integer(1, 4)):
            out = self.fresh("o")
            k = c.integer(0, 12)
            v = self.vec()
            if k == 0:
                e, _ = self.coord(v.batch)
                text = f"mean({e})"
            elif k == 1:
                text = f"gram({v.name})" if c.chance(0.5) else f"gram({v.name}, {self.vec(v.batch, True).name})"
            elif k == 2:
                text = f"{v.name} @ {self.vec(v.batch).name} / {n}"
            elif k == 3:
                text = f"mean({v.name} * {v.name}) / sqrt(mean({v.name} * {v.name}) + 1)"
            elif k in (4, 5) and readouts:
                f, fv = c.choice(readouts)
                text = f"cov({f})" if c.chance(0.6) else f"cov({f}, {c.choice(readouts)[0]})"
            elif k == 6 and readouts and c.chance(0.1 if matrix_readout else 1):
                f, fv = c.choice(readouts)
                data = [d for d, _ in datas if d == fv.batch]
                text = f"tangent_kernel({f}, {data[0]})" if data and c.chance(0.5) else f"tangent_kernel({f})"
            elif k in (7, 8) and readouts and c.chance(0.1 if matrix_readout else 1):
                f, fv = c.choice(readouts)
                x = c.choice(sorted(fv.deps))
                text = c.choice([f"gram(grad({f}, {x}))", f"mean(grad({f}, {x}) * {x})", f"mean(grad({f}, {x}))"])
            elif k == 9 and readouts:
                text = c.choice(readouts)[0]
            elif k == 10:
                a, b = self.vec(), self.vec()
                text = c.choice([f"mean({a.name}) * mean({b.name})", f"mean({a.name} * {b.name}) - 1",
                                 f"sqrt(mean({a.name} * {a.name}))", f"mean({a.name} * {a.name}) ^ 2",
                                 f"gram({a.name}) / {n}", f"mean({a.name}) / mean({b.name})"])
            elif k == 11 and matrix_readout:
                text = f"V.T @ [{', '.join(num(c, -1, 1) for _ in range(self.k))}] / {n}"
            elif k == 12:
                text = c.choice([v.name, f"{v.name} @ {v.name}", f"U.T @ {v.name} / {n}", f"{v.name}.T @ {v.name}",
                                 f"mean({v.name} @ {v.name})", f"cov({v.name})", f"grad({v.name}, {v.name})"])
            else:
                text = f"mean({v.name} * {self.vec(v.batch).name})"
            lines.append(f"output {out} = {text}")
            count += 1


def netsor_program(c: Chooser) -> str:
    """A raw Netsor program: data, initial matrices and vectors, nonlins, instructions, outputs."""
    return _Netsor(c).build()


# ---------------------------------------------------------------------------- network programs


def _parametrization(c: Chooser, hidden: int, lr_in_param: bool) -> str:
    lr = f"lr = {num(c, 0.05, 1)}" if lr_in_param else ""
    kind = c.choice(["mup", "mup", "ntk", "sp", "mf" if hidden == 0 else "mup", "abc"])
    if kind == "abc":
        layers = hidden + 2  # input, hidden..., readout
        if c.chance(0.5):  # muP-like
            a = [-0.5] + [0.0] * hidden + [0.5]
            b = [0.5] * layers
        else:
            a = [float(num(c, -0.5, 0.5, 1)) for _ in range(layers)]
            b = [float(num(c, 0, 0.5, 1)) for _ in range(layers)]
        args = f"a = [{', '.join(f'{x:g}' for x in a)}], b = [{', '.join(f'{x:g}' for x in b)}], c = {num(c, 0, 1, 1)}"
        return f"parametrization abc({args}{', ' + lr if lr else ''})"
    return f"parametrization {kind}({lr})" if lr else f"parametrization {kind}"


def network_program(c: Chooser) -> str:
    """A network program: layers with roles, a parametrization, a model, a loss, SGD, outputs."""
    k_opt = c.integer(0, 9)
    if k_opt == 0:
        return maml_program(c)
    if k_opt == 1:
        return cbow_program(c)
    lines: list[str] = ["width n"]
    d = c.integer(1, 3)
    m = c.integer(1, 3)
    hidden = c.choice([0, 0, 1, 1, 2])
    loss = c.choice(["mse", "mse", "mse", "xent", "logistic", "user"])
    k = c.integer(2, 3) if loss == "xent" else 1
    lr_in_param = c.chance(0.3)
    lines.append(_parametrization(c, hidden, lr_in_param))
    lines.append(f"data X = {matrix_literal(c, m, d)}")
    if loss == "xent":
        lines.append(f"data Y = [{', '.join(str(c.integer(0, k - 1)) for _ in range(m))}]")
    elif loss == "logistic":
        lines.append(f"data Y = [{', '.join(c.choice(['0', '1']) for _ in range(m))}]")
    else:
        lines.append(f"data Y = [{', '.join(num(c, -1, 1, 1) for _ in range(m))}]")
    lines.append(f"data Xt = {matrix_literal(c, c.integer(1, 3), d)}")
    var = f", var = {num(c, 0.5, 2, 1)}" if c.chance(0.4) else ""
    lines.append(f"layer U : input n x {d}{var}")
    bias = c.chance(0.3)
    if bias:
        lines.append("layer b : bias n")
    ws = [f"W{i + 1}" for i in range(hidden)]
    for w in ws:
        var = f", var = {num(c, 0.5, 2, 1)}" if c.chance(0.4) else ""
        lines.append(f"layer {w} : hidden n x n{var}")
    lines.append(f"layer V : readout {k} x n")
    acts = [c.choice(ACTIVATIONS) if c.chance(0.85) else "" for _ in range(hidden + 1)]
    body = "U @ x + b" if bias else "U @ x"
    body = f"{acts[0]}({body})"
    for w, act in zip(ws, acts[1:], strict=True):
        body = f"{act}({w} @ {body})"
    lines.append(f"model f(x) = V @ {body}")
    if loss == "user":
        lines.append(c.choice(["loss L = mean((f(X) - Y)^2) / 2", "loss L = sum((f(X) - Y)^4) / 20",
                           "loss L = mean(abs(f(X) - Y))", "loss L = mean(softplus(-f(X) * Y))"]))
    else:
        lines.append(f"loss L = {loss}(f(X), Y)")
    if c.chance(0.4):
        lines.append("output kernel0 = features(f, X)")
    if c.chance(0.2):
        lines.append("output pred0 = f(Xt)")
    if c.chance(0.9):
        batch = f", batch = {c.integer(1, m)}" if c.chance(0.3) else ""
        lr = "" if lr_in_param else f"lr = {num(c, 0.05, 1)}, "
        lines.append(f"train sgd({lr}steps = {c.integer(1, 3)}{batch}) minimize L")
        outs = ["output pred = f(Xt)", "output curve = history(L)", "output final = L",
                "output kernel = features(f, X)", "output move = feature_change(f, X)"]
    else:
        outs = ["output pred = f(Xt)", "output final = L", "output kernel = features(f, X)"]
    chosen = [o for o in outs if c.chance(0.5)] or [outs[0]]
    lines += chosen
    return "\n".join(lines) + "\n"


def maml_program(c: Chooser) -> str:
    """First-order MAML over few-shot tasks from a pool (as in tests/test_training.py)."""
    model = c.choice(["V @ (U @ x)", "V @ relu(U @ x)", "V @ tanh(W @ relu(U @ x))"])
    hidden = "layer W : hidden n x n\n" if "W" in model else ""
    layers = f"layer U : input n x 3\n{hidden}layer V : readout 2 x n\n"
    return (f"width n\n{_parametrization(c, 1 if 'W' in model else 0, False)}\n"
            "data P = [[1, 0.5, -0.2], [-0.3, 0.8, 0.4], [0.2, -1, 0.9], [0.9, 0.1, -0.7]]\n"
            "data S = [[0, 1], [2, 3], [1, 3]]\ndata SY = [[0, 1], [1, 0], [0, 1]]\n"
            "data Q = [[2, 3], [0, 1], [0, 2]]\ndata QY = [[1, 0], [1, 1], [0, 1]]\n"
            f"{layers}model f(x) = {model}\n"
            + ("output a0 = adapted(f, P, S, SY, Q)\n" if c.chance(0.5) else "")
            + f"train fomaml(lr = {num(c, 0.1, 1)}, inner_lr = {num(c, 0.1, 1.5)}, inner_steps = {c.integer(1, 2)}, "
            f"tasks = {c.integer(1, 3)}, steps = {c.integer(1, 2)}) minimize xent on P, S, SY, Q, QY\n"
            "output a = adapted(f, P, S, SY, Q)\n" + ("output p = f(P)\n" if c.chance(0.5) else ""))


def cbow_program(c: Chooser) -> str:
    """word2vec's CBOW over a tiny token stream (as in programs/word2vec/cbow_mup.tp)."""
    words = c.integer(2, 4)
    tokens = ", ".join(str(c.integer(0, words - 1)) for _ in range(c.integer(4, 12)))
    return (f"width n\n{_parametrization(c, 0, False)}\ndata T = [{tokens}]\n"
            f"layer U : embedding n x {words}\nlayer V : readout {words} x n, var = {c.choice(['0', '1'])}\n"
            "model f(x) = V @ (U @ x)\n"
            f"train cbow(lr = {num(c, 0.01, 0.2)}, window = {c.integer(1, 2)}, negatives = {c.integer(0, 2)}, "
            f"sample = 0, epochs = 1, batch = {c.integer(1, 8)}) minimize logistic on T\n"
            "output words = embeddings(U)\n" + ("output outs = embeddings(V)\n" if c.chance(0.5) else ""))


# ---------------------------------------------------------------------------- mutations

TOKEN = re.compile(r'"[^"\n]*"|[A-Za-z_][A-Za-z0-9_]*|[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?|\*\*|\s+|.', re.S)


def mutate(c: Chooser, source: str) -> str:
    """One random token- or line-level mutation."""
    toks = TOKEN.findall(source)
    solid = [i for i, t in enumerate(toks) if not t.isspace()]
    if not solid:
        return source + c.choice(NASTY_CHARS)
    i = c.choice(solid)
    op = c.integer(0, 10)
    if op == 0:  # delete a token
        toks[i] = ""
    elif op == 1:  # duplicate a token
        toks[i] = toks[i] + " " + toks[i]
    elif op == 2:  # swap two tokens
        j = c.choice(solid)
        toks[i], toks[j] = toks[j], toks[i]
    elif op == 3:  # replace a name
        names = [t for t in toks if re.fullmatch(r"[A-Za-z_]\w*", t)]
        pool = list(KEYWORDS) + list(FUNCTIONS) + names + ["zz", "_", "nan", "inf", "W" * 50]
        idx = [k for k in solid if re.fullmatch(r"[A-Za-z_]\w*", toks[k])] or [i]
        toks[c.choice(idx)] = c.choice(pool)
    elif op in (4, 5):  # replace a number with a nasty one
        idx = [k for k in solid if re.fullmatch(r"[0-9.]+(?:[eE][-+]?[0-9]+)?", toks[k])] or [i]
        toks[c.choice(idx)] = c.choice(NASTY_NUMBERS)
    elif op == 6:  # insert a character
        toks[i] = c.choice(NASTY_CHARS) + toks[i] if c.chance(0.5) else toks[i] + c.choice(NASTY_CHARS)
    elif op == 7:  # truncate
        return "".join(toks[:i])
    else:  # line-level: delete, duplicate or swap lines
        lines = source.splitlines(keepends=True)
        a, b = c.integer(0, len(lines) - 1), c.integer(0, len(lines) - 1)
        if op == 8:
            del lines[a]
        elif op == 9:
            lines.insert(b, lines[a])
        else:
            lines[a], lines[b] = lines[b], lines[a]
        return "".join(lines)
    return "".join(toks)


# ---------------------------------------------------------------------------- cases


@dataclass
class Case:
    source: str
    network: bool  # generated as a network program (before mutation)
    mutations: int
    width: int = 8
    run_opts: tuple[str, ...] = ()  # extra options of `tpc run`
    limit_opts: tuple[str, ...] = ()  # extra options of `tpc limit`


def program(c: Chooser) -> tuple[str, bool]:
    """An unmutated program: Netsor (60%) or a network (40%)."""
    network = c.chance(0.4)
    return (network_program(c) if network else netsor_program(c)), network


def case(c: Chooser, mutate_p: float = 0.5) -> Case:
    """A program, mutated with probability `mutate_p` (1-3 mutations), and the commands' options."""
    source, network = program(c)
    count = c.integer(1, 3) if c.chance(mutate_p) else 0
    for _ in range(count):
        source = mutate(c, source)
    run_opts: list[str] = []
    limit_opts: list[str] = []
    if c.chance(0.3):
        run_opts.append("--json")
    if c.chance(0.15):
        run_opts += ["--dtype", "float32"]
    if c.chance(0.4):
        limit_opts.append("--json")
    if c.chance(0.2):
        limit_opts += ["--method", c.choice(["exact", "closed-form", "quadrature", "monte-carlo"])]
    if c.chance(0.1):
        limit_opts += ["--dtype", "float32"]
    return Case(source, network, count, c.choice([4, 8, 8, 16]), tuple(run_opts), tuple(limit_opts))


def cases_strategy(mutate_p: float = 0.5) -> Any:
    """A hypothesis strategy of `Case`s."""
    from hypothesis import strategies as st

    @st.composite
    def build(draw: Callable[[Any], Any]) -> Case:
        return case(HypothesisChooser(draw), mutate_p)

    return build()


# ---------------------------------------------------------------------------- the harness


class StageTimeout(BaseException):  # noqa: N818 - a BaseException, so that tpc's `except Exception` can't eat it
    """A stage ran past its time limit."""


@dataclass
class Outcome:
    stage: str  # the command line, e.g. "limit --particles 256 --replicates 2"
    status: str  # ok | error (a clean TpcError) | traceback | hang
    seconds: float
    exc_type: str = ""
    where: str = ""  # file:line of the innermost tpc frame
    message: str = ""
    trace: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return self.exc_type, self.where


@dataclass
class Report:
    case: Case
    outcomes: list[Outcome]

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status in ("traceback", "hang")]


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise StageTimeout in the main thread after `seconds` of wall-clock time (SIGALRM)."""
    def fire(_sig: int, _frame: object) -> None:
        raise StageTimeout(f"over {seconds:g} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)  # repeating, in case tpc swallows one in a bare `except:`
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def innermost_tpc_frame(tb: Any) -> str:
    where = "?"
    for fr in traceback.extract_tb(tb):
        if fr.filename.startswith(TPC_DIR):
            where = f"{Path(fr.filename).relative_to(ROOT)}:{fr.lineno}"
    return where


def stages(case: Case) -> list[list[str]]:
    """The commands each program goes through (argv after `tpc`, without the file)."""
    return [
        ["check"],
        ["graph"],
        ["graph", "--backward"],
        ["graph", "--format", "dot"],
        ["graph", "--format", "json"],
        ["graph", "--unrolled"],
        ["emit-torch"],
        ["classify"],
        ["run", "--width", str(case.width), "--seeds", "2", "--quiet", *case.run_opts],
        ["limit", "--particles", "256", "--replicates", "2", *case.limit_opts],
    ]


class Harness:
    """Runs programs in-process through tpc's commands (`tpc.cli`), with stdout and stderr captured.

    A program is written to `<tmp>/prog/prog.tp` with `<tmp>/prog/data` the bundled programs' data, so
    that `load("data/inputs8x3.csv")` works."""

    def __init__(self, timeout: float = 20.0) -> None:
        self.timeout = timeout
        self.tmp = Path(tempfile.mkdtemp(prefix="tpc-fuzz-"))
        (self.tmp / "prog" / "data").mkdir(parents=True)
        for f in DATA_FILES:
            shutil.copy(f, self.tmp / "prog" / "data" / f.name)
        self.path = self.tmp / "prog" / "prog.tp"

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def load(self, source: str) -> object:
        """tpc.loads in the program's folder (raises what tpc raises)."""
        import tpc

        return tpc.loads(source, str(self.path), self.path.parent)

    def run_stage(self, source: str, argv: list[str]) -> Outcome:
        from tpc.cli import parser
        from tpc.errors import TpcError

        self.path.write_text(source, encoding="utf-8", errors="surrogateescape")
        stage = " ".join(argv)
        full = [argv[0], str(self.path), *argv[1:]]
        t0 = time.perf_counter()
        sink = io.StringIO()
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), time_limit(self.timeout):
                args = parser().parse_args(full)
                args.fn(args)
        except StageTimeout:
            return Outcome(stage, "hang", time.perf_counter() - t0, "Timeout", message=f"over {self.timeout:g} s")
        except TpcError as err:
            return Outcome(stage, "error", time.perf_counter() - t0, type(err).__name__, message=err.message)
        except SystemExit as exc:  # argparse: never expected, since argv is ours
            return Outcome(stage, "traceback", time.perf_counter() - t0, "SystemExit", message=str(exc.code),
                           trace=traceback.format_exc())
        except Exception as exc:
            return Outcome(stage, "traceback", time.perf_counter() - t0, type(exc).__name__,
                           innermost_tpc_frame(exc.__traceback__), str(exc)[:500], traceback.format_exc())
        return Outcome(stage, "ok", time.perf_counter() - t0)

    def run_case(self, case: Case) -> Report:
        """Every stage; after a clean error in `check` (the program does not load) only `classify`."""
        outcomes: list[Outcome] = []
        for argv in stages(case):
            if outcomes and outcomes[0].status != "ok" and argv[0] != "classify":
                continue
            outcomes.append(self.run_stage(case.source, argv))
        return Report(case, outcomes)

    def minimise(self, source: str, argv: list[str], key: tuple[str, str], budget_s: float = 30.0) -> str:
        """Delete lines (then tokens) one at a time while the same exception type and frame persist."""
        deadline = time.monotonic() + budget_s

        def same(src: str) -> bool:
            o = self.run_stage(src, argv)
            return o.status in ("traceback", "hang") and o.key == key

        lines = source.splitlines()
        i = len(lines) - 1
        while i >= 0 and time.monotonic() < deadline:
            cand = lines[:i] + lines[i + 1:]
            if same("\n".join(cand) + "\n"):
                lines = cand
            i -= 1
        return "\n".join(lines) + "\n"
