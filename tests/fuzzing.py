"""A grammar-based fuzzer of tpc: random `.tp` programs (mostly well-formed: Netsor programs, network
programs trained by `train`, and network programs trained by loops written in the language), token-level
mutations, loop programs broken on purpose (LOOP_BREAKS), and a harness that runs each program through
every command and classifies the outcome.

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
    integers lean towards small values, which would skew every probability (mutated, network, ...).
    That `Random` leans too (use_true_random=False: random() < 0.05 about a third of the time), so rare
    branches are not rare here; the loop generator puts its common cases at small integers."""

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



def model_text(c: Chooser, first: str, acts: list[str], ws: list[str]) -> str:
    """`model f(x) = V @ act(W @ act(U @ x))`, or the same model as statements ending in `return`."""
    if c.chance(0.3):
        lines = [f"  h0 = {acts[0]}({first})"]
        for i, (w, act) in enumerate(zip(ws, acts[1:], strict=True)):
            lines.append(f"  h{i + 1} = {act}({w} @ h{i})")
        return "model f(x) {\n" + "\n".join(lines) + f"\n  return V @ h{len(ws)}\n}}"
    body = f"{acts[0]}({first})"
    for w, act in zip(ws, acts[1:], strict=True):
        body = f"{act}({w} @ {body})"
    return f"model f(x) = V @ {body}"

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
    fixed = hidden > 0 and c.chance(0.2)  # the last hidden matrix a fixed `matrix`: no place in the abc lists
    loss = c.choice(["mse", "mse", "mse", "xent", "logistic", "user"])
    k = c.integer(2, 3) if loss == "xent" else 1
    lr_in_param = c.chance(0.3)
    lines.append(_parametrization(c, hidden - fixed, lr_in_param))
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
        lines.append("layer b : bias n" if c.chance(0.8) else "vector b ~ N(0, 1)")
    ws = [f"W{i + 1}" for i in range(hidden)]
    for w in ws:
        var = f", var = {num(c, 0.5, 2, 1)}" if c.chance(0.4) else ""
        lines.append(f"matrix {w} : n x n ~ N(0, 2/n)" if fixed and w == ws[-1] else f"layer {w} : hidden n x n{var}")
    named = bias and c.chance(0.25)  # the bias through a vector statement beside the layers
    if named:
        lines.append(f"z = {c.choice(ACTIVATIONS) or 'relu'}(b) * 0.5 + b")
    lines.append(f"layer V : readout {k} x n")
    tied = hidden > 0 and c.chance(0.2)  # the first hidden matrix applied again, transposed (tied weights)
    acts = [c.choice(ACTIVATIONS) if c.chance(0.85) else "" for _ in range(hidden + 1 + tied)]
    lines.append(model_text(c, "U @ x + z" if named else "U @ x + b" if bias else "U @ x", acts,
                            ws + [f"{ws[0]}.T"] if tied else ws))
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


# ---------------------------------------------------------------------------- training loops written in the language

# Ways to break a loop program on purpose (`loop_program(c, brk)`): each names what tpc must refuse
# cleanly (at check time or while running), never with a traceback or a hang.
LOOP_BREAKS = ("trip_from_loss", "width_in_loop", "grad_of_data", "entrywise_of_params", "braces", "update_local",
               "record_outside", "index_range", "index_negative", "index_fraction", "huge_trip", "deep_nesting",
               "one_row", "deeper_nesting", "model_unused")
# Breaks left out of tests/test_fuzz.py (on with `benchmarks/fuzz.py --known-bugs`). `huge_trip_runs`: a
# loop of up to 10^9 steps with nothing that stops it: check and limit answer at once (the plan is not
# counted beyond 5000 iterations, the limit refuses beyond 10^5), but a finite run takes that long.
KNOWN_BUG_BREAKS = ("huge_trip_runs",)
SCHEDULES = ("{lr}", "{lr} * min(1, ({t} + 1) / 2)", "{lr} * (1 + cos(pi * {t} / {T})) / 2",
             "{lr} * max(0.1, 1 - {t} / {T})", "{lr} * (1 + mod({t}, 2)) / 2",
             "{lr} * min(1, ({t} + 1) / 3) * (1 + cos(pi * {t} / 12)) / 2", "{lr} * exp(-{t})",
             "{lr} / sqrt({t} + 1)", "{lr} * 0.9 ^ {t}", "{lr} * (1 + sin({t})) / 2", "max({lr} - 0.1 * {t}, 0.05)")
# Stages that a reported bug fails on a kind of break: left out unless the known bugs are asked for.
KNOWN_BUG_STAGES: dict[str, tuple[str, ...]] = {}
MARK = "\x01"  # a line a break changed (tidied away before the program is returned)
HUGE_TRIPS = ("1000000000", "1e9", "999999999", "rows(X) * 250000000", "10 ^ 9")
TOO_HUGE_TRIPS = ("1000000001", "1e10", "2 ^ 31", "10 ^ 12", "99999999999999999999999", "1e400", "-1", "2.5",
                  "0.5 * 3", "1e-320")


@dataclass
class _Loops:
    """A network program trained by loops written in the language (README: *Training loops written in
    the language*): momentum states, schedules of the counter, mini-batches, rows picked by counter
    expressions, frozen layers, two loops in a row, nested loops with a copy and a state declared in
    the body, records and their outputs between loops. Widths are the harness's, trip counts <= 3 and
    at most a few steps in all, so every command stays fast."""

    c: Chooser
    brk: str | None = None
    lines: list[str] = field(default_factory=list)
    m: int = 3  # rows of X
    r: int = 2  # rows of S (index rows into X)
    k: int = 1  # outputs of the model
    loss: str = "mse"
    layers: list[str] = field(default_factory=list)
    counters: int = 0
    records: list[str] = field(default_factory=list)
    budget: int = 4  # gradient evaluations left: each costs the limit forward and backward passes
    top_loss: bool = False
    top_state: bool = False
    top_state_v: bool = False

    def fresh_counter(self) -> str:
        self.counters += 1
        base = self.c.choice(["t", "s", "i", "epoch", "k_"])
        return f"{base}{self.counters}" if self.counters > 1 or base == "k_" else base

    def rec(self, what: str) -> str:
        name = f"{what}{len(self.records) + 1}"
        self.records.append(name)
        return name

    def trip(self, cap: int) -> tuple[str, int]:
        """A trip count of at most `cap` iterations (or 1): 0, rows(S), the dim T, 1 + 1 or a number."""
        c = self.c
        k = c.integer(0, 12)  # hypothesis leans to small integers: they are the plain numbers
        special = {12: ("0", 0), 11: ("rows(S)", self.r), 10: ("T", 2), 9: ("1 + 1", 2)}.get(k)
        if special and special[1] <= cap:
            return special
        n = c.integer(1, max(1, min(3, cap)))
        return str(n), n

    def schedule(self, t: str, T: str) -> str:  # noqa: N803
        lr = num(self.c, 0.05, 0.5)
        T = "1" if T == "0" else f"({T})" if " " in T else T  # noqa: N806
        return self.c.choice(SCHEDULES).format(lr=lr, t=t, T=T)

    def rows(self, t: str, outer: str | None) -> tuple[str, str]:
        """The data one step uses and its targets: all of X, a mini-batch, or rows picked by the counter."""
        c = self.c
        k = c.integer(0, 5)
        if k <= 1:
            return "X", "Y"
        if k <= 3:
            b = c.integer(1, self.m)
            step = c.choice([t, t, f"{t} + 1", f"2 * {t}"] + ([f"{outer} * 2 + {t}"] if outer else []))
            return f"batch(X, {step}, {b})", f"batch(Y, {step}, {b})"
        i = c.choice([f"mod({t}, {self.r})", f"min({t}, {self.r - 1})", f"mod({t} + 1, {self.r})",
                      f"mod(2 * {t} + 1, {self.r})", "0", f"rows(S) - 1 - mod({t}, rows(S))"]
                     + ([f"mod({t} + {outer}, {self.r})"] if outer else []))
        return f"X[S[{i}]]", f"Y[S[{i}]]"

    def loss_of(self, model: str, rows: tuple[str, str]) -> str:
        c = self.c
        x, y = rows
        if self.top_loss and x == "X" and model == "f" and c.chance(0.3):
            return "L0"
        if self.loss == "user" or (self.loss == "mse" and c.chance(0.2)):
            text = c.choice([f"mean(({model}({x}) - {y}) ^ 2) / 2", f"mean(abs({model}({x}) - {y}))",
                             f"sum(({model}({x}) - {y}) ^ 2) / 4"])
        else:
            text = f"{'mse' if self.loss == 'user' else self.loss}({model}({x}), {y})"
        if c.chance(0.2):
            text += c.choice([f" + 0.1 * mean({model}({x}) ^ 2)", f" + 0.01 * sum(abs({model}(Xt)))"])
        return text

    def update(self, L: str, eta: str, body: list[str], pad: str, state: str | None) -> None:  # noqa: N803
        """The optimizer step: plain, momentum, decay, a frozen phase, a state for one layer."""
        c = self.c
        k = 2 if state and c.chance(0.6) else c.integer(0, 7)
        if k <= 1 or (k == 2 and not state):
            if c.chance(0.3):
                body.append(f"{pad}G = grad({L}, f)")
                body.append(f"{pad}f -= {eta} * G")
            else:
                body.append(f"{pad}f -= {eta} * grad({L}, f)" if c.chance(0.8)
                            else f"{pad}f += -{eta} * grad({L}, f)")
        elif k == 2:  # momentum
            step = c.choice(["{s} = 0.9 * {s} + grad({L}, f)", "{s} += grad({L}, f)",
                             "{s} = 0.5 * ({s} + grad({L}, f))"])
            body.append(pad + step.format(s=state, L=L))
            body.append(f"{pad}f -= {eta} * {state}")
        elif k == 3:  # coupled decay
            body.append(f"{pad}f -= {eta} * (grad({L}, f) + 0.01 * f)")
        elif k == 4:  # decoupled decay
            body.append(f"{pad}f -= {eta} * grad({L}, f)")
            body.append(f"{pad}f -= 0.01 * f")
        elif k == 5 and self.top_state_v:  # a state for the readout alone
            body.append(f"{pad}MV = 0.8 * MV + grad({L}, V)")
            body.append(f"{pad}V -= {eta} * MV")
        else:  # a frozen phase: one layer trains
            la = c.choice(self.layers)
            body.append(f"{pad}{la} -= {eta} * grad({L}, {la})")

    def body(self, depth: int, t: str, T: str, outer: str | None, pad: str) -> list[str]:  # noqa: N803
        """One loop's body: a schedule, a loss on some rows, records, an update (or a nested loop)."""
        c = self.c
        body: list[str] = []
        eta = num(c, 0.05, 0.5)
        if c.chance(0.6):
            body.append(f"{pad}eta = {self.schedule(t, T)}")
            eta = "eta"
        rows = self.rows(t, outer)
        body.append(f"{pad}L = {self.loss_of('f', rows)}")
        if c.chance(0.6):
            body.append(f"{pad}record {self.rec('loss')} = L")
        if c.chance(0.25):
            body.append(f"{pad}record {self.rec('out')} = f({c.choice(['Xt', 'X', rows[0]])})")
        if c.chance(0.1) and eta == "eta":
            body.append(f"{pad}record {self.rec('lr')} = eta")
        state = "M" if self.top_state else None
        if depth == 0 and c.chance(0.15):
            body.append(f"{pad}state D = zeros(f)")  # a state declared in the body: afresh each step
            state = "D"
        self.update("L", eta, body, pad, state)
        return body

    def nested(self, t: str, pad: str) -> tuple[list[str], int]:
        """First-order MAML's shape: a state and a copy per outer step, inner steps on the copy. Returns
        the body and the gradients one outer step takes."""
        c = self.c
        body: list[str] = []
        i = self.fresh_counter()
        updates = c.integer(1, 2)  # inner steps on the copy, then one gradient of the query loss
        Ti, ni = self.trip(min(2, self.budget // (updates + 1)))  # noqa: N806
        inner = pad + "  "
        body.append(f"{pad}state G = zeros(f)")
        outer_copy = c.chance(0.3)
        if outer_copy:
            body.append(f"{pad}copy g = f")
        body.append(f"{pad}for {i} in range({Ti}) {{")
        if not outer_copy:
            body.append(f"{inner}copy g = f")
        for _ in range(updates):
            rows = self.rows(i, t)
            body.append(f"{inner}g -= {num(c, 0.1, 0.8)} * grad({self.loss_of('g', rows)}, g)")
        q = self.rows(i, t)
        body.append(f"{inner}Lq = {self.loss_of('g', q)}")
        body.append(f"{inner}G += grad(Lq, g)")
        if c.chance(0.5):
            body.append(f"{inner}record {self.rec('q')} = {c.choice(['Lq', 'g(Xt)', 'f(Xt)'])}")
        body.append(f"{pad}}}")
        body.append(f"{pad}f -= {num(c, 0.05, 0.5)} * G{f' / ({Ti})' if Ti != '0' and c.chance(0.5) else ''}")
        if c.chance(0.4):
            body.append(f"{pad}record {self.rec('o')} = f(Xt)")
        return body, ni * (updates + 1)

    def loop(self) -> list[str]:
        """A top-level loop: plain steps, epochs of steps (nested), or MAML's nested shape; within the
        gradient budget."""
        c = self.c
        t = self.fresh_counter()
        shape = c.integer(0, 19)  # small (hypothesis's favourites): plain steps
        if shape >= 15 and self.budget >= 2:
            inner, per_step = self.nested(t, "  ")
            T, n = self.trip(self.budget // max(per_step, 1))  # noqa: N806
        elif shape >= 13:  # epochs of steps
            T, n = self.trip(2)  # noqa: N806
            s = self.fresh_counter()
            Ts, per_step = self.trip(self.budget // max(n, 1))  # noqa: N806
            inner = [f"  for {s} in range({Ts}) {{", *self.body(1, s, Ts, t, "    "), "  }"]
        else:
            T, n = self.trip(self.budget)  # noqa: N806
            inner, per_step = self.body(0, t, T, None, "  "), 1
        self.budget -= n * per_step
        return [f"for {t} in range({T}) {{", *inner, "}"]

    def build(self) -> str:
        c, lines = self.c, self.lines
        d = c.integer(1, 2)
        self.m = m = c.integer(2, 4)
        self.r = c.integer(1, 3)
        hidden = c.choice([0, 0, 0, 1, 1, 2])
        fixed = hidden > 0 and c.chance(0.2)  # the last hidden matrix a fixed `matrix`, never trained
        self.budget = (4, 2, 1)[hidden]  # the limit's Monte Carlo pays for every step through a hidden layer
        self.loss = c.choice(["mse", "mse", "mse", "xent", "logistic", "user"])
        self.k = c.integer(2, 3) if self.loss == "xent" else 1
        lines += ["width n", _parametrization(c, hidden - fixed, False)]
        lines.append(f"data X = {matrix_literal(c, m, d)}")
        if self.loss == "xent":
            lines.append(f"data Y = [{', '.join(str(c.integer(0, self.k - 1)) for _ in range(m))}]")
        elif self.loss == "logistic":
            lines.append(f"data Y = [{', '.join(c.choice(['0', '1']) for _ in range(m))}]")
        else:
            lines.append(f"data Y = [{', '.join(num(c, -1, 1, 1) for _ in range(m))}]")
        lines.append(f"data Xt = {matrix_literal(c, c.integer(1, 2), d)}")
        b = c.integer(1, 2)
        lines.append("data S = [" + ", ".join("[" + ", ".join(str(c.integer(0, m - 1)) for _ in range(b)) + "]"
                                            for _ in range(self.r)) + "]")
        lines.append("dim T = 2")
        lines.append(f"layer U : input n x {d}")
        self.layers = ["U", "V"]
        bias = c.chance(0.25)
        if bias:
            lines.append("layer b : bias n")
            self.layers.append("b")
        ws = [f"W{i + 1}" for i in range(hidden)]
        for w in ws:
            lines.append(f"matrix {w} : n x n ~ N(0, 1/n)" if fixed and w == ws[-1] else f"layer {w} : hidden n x n")
        self.layers += ws[:-1] if fixed else ws  # a fixed matrix is no layer to train
        named = bias and c.chance(0.25)  # the bias through a vector statement beside the layers
        if named:
            lines.append(f"z = 0.5 * {c.choice(ACTIVATIONS) or 'tanh'}(b) + b")
        lines.append(f"layer V : readout {self.k} x n")
        tied = hidden > 0 and c.chance(0.2)  # the first hidden matrix applied again, transposed (tied weights)
        acts = [c.choice(ACTIVATIONS) if c.chance(0.85) else "" for _ in range(hidden + 1 + tied)]
        lines.append(model_text(c, f"U @ x{' + z' if named else ' + b' if bias else ''}", acts,
                                ws + [f"{ws[0]}.T"] if tied else ws))
        self.top_loss = c.chance(0.3)
        if self.top_loss:
            lines.append(f"loss L0 = {'mse' if self.loss == 'user' else self.loss}(f(X), Y)")
        self.top_state = c.chance(0.35)
        if self.top_state:
            lines.append("state M = zeros(f)")
        self.top_state_v = c.chance(0.15)
        if self.top_state_v:
            lines.append("state MV = zeros(V)")
        if c.chance(0.3):
            lines.append("output p0 = f(Xt)")
        done = 0
        for j in range(1 if c.chance(0.5) else 2):
            if j and self.budget < 1:
                break
            if j:  # outputs between the loops: the records so far, predictions at this point
                lines += [f"output {name}_ = {name}" for name in self.records[done:] if c.chance(0.5)]
                if c.chance(0.4):
                    lines.append(c.choice(["output mid = f(Xt)", "output kmid = features(f, X)"]))
            done = len(self.records)
            lines += self.loop()
        outs = ["output pred = f(Xt)", "output kernel = features(f, X)", "output move = feature_change(f, X)"]
        if self.top_loss:
            outs.append("output final = L0")
        outs += [f"output {name} = {name}" for name in self.records]
        lines += [o for o in outs if c.chance(0.5)] or [outs[0]]
        if self.brk:
            self.break_it(self.brk)
            for j, line in enumerate(self.lines):  # `t` in what a break wrote: the counter of its loop
                if line.startswith(MARK):
                    heads = [q for q in range(j) if re.match(r"\s*for \w+ in", self.lines[q].lstrip(MARK))
                             and len(self.lines[q].lstrip(MARK)) - len(self.lines[q].lstrip(MARK).lstrip())
                             < len(line) - 1 - len(line[1:].lstrip())]
                    name = re.match(r"\s*for (\w+)", self.lines[heads[-1]].lstrip(MARK))[1] if heads else "t"
                    self.lines[j] = re.sub(r"\bt\b", name, line[1:])
        return "\n".join(self.lines) + "\n"

    # --- breaking the program on purpose
    def loop_lines(self) -> list[int]:
        return [j for j, line in enumerate(self.lines) if line.startswith(" ")]

    def sub(self, pattern: str, repl: str | Callable[[re.Match[str]], str], fallback: str, count: int = 1) -> None:
        """Replace the first match (`count` 0: every match) in the first loop line that has one, from a
        random start; else add `fallback` to a loop."""
        idx = self.loop_lines()
        start = self.c.integer(0, len(idx) - 1) if idx else 0
        for j in idx[start:] + idx[:start]:
            new, count = re.subn(pattern, repl, self.lines[j], count=count)
            if count:
                self.lines[j] = MARK + new
                return
        self.insert(fallback)

    def insert(self, stmt: str) -> None:
        """A statement at a random place inside the first loop's body."""
        first = next(j for j, line in enumerate(self.lines) if line.startswith("for "))
        end = next(j for j in range(first + 1, len(self.lines)) if self.lines[j] == "}")
        at = self.c.integer(first + 1, end)
        self.lines.insert(at, MARK + "  " + stmt)

    def break_it(self, brk: str) -> None:  # noqa: C901 - one branch per kind of mistake
        c, lines = self.c, self.lines
        loop_at = [j for j, line in enumerate(lines) if re.match(r"\s*for ", line)]
        if brk == "trip_from_loss":
            bad = c.choice(["L0", "mean(f(X))", "L", "eta", "f(X)", "mse(f(X), Y)", "t + 1", "Y", "rows(S) + L",
                            "zz", "grad(L0, f)", "M"])
            if bad == "L0" and not self.top_loss:
                lines.insert(loop_at[0], "loss L0 = mse(f(X), Y)" if self.k == 1 else "loss L0 = mean(f(X) ^ 2)")
                loop_at = [j + 1 for j in loop_at]
            j = c.choice(loop_at)
            lines[j] = re.sub(r"range\(.*\) \{", f"range({bad}) {{", lines[j])
        elif brk == "width_in_loop":
            k = c.integer(0, 5)
            if k == 0:
                j = c.choice(loop_at)
                lines[j] = re.sub(r"range\(.*\) \{", f"range({c.choice(['n', 'n / 2', 'sqrt(n)', 'T * n'])}) {{",
                                  lines[j])
            elif k == 1:
                self.sub(r"-= ", lambda mt: f"-= {c.choice(['n', 'sqrt(n)', '1 / n', 'n ^ -0.5'])} * ",
                         "f -= n * grad(mse(f(X), Y), f)")
            elif k == 2:
                self.insert(c.choice(["eta_n = 0.1 / n", "record w_ = n", "q_ = f(X) * n", "L_ = mse(f(X), Y) * n"]))
            elif k == 3:
                self.sub(r"batch\((\w+), ([^,]+), \d+\)", lambda mt: f"batch({mt[1]}, {mt[2]}, n)",
                         "L_ = mse(f(batch(X, 0, n)), Y)")
            elif k == 4:
                self.sub(r"S\[", lambda mt: "S[n + ", "L_ = mse(f(X[S[n]]), Y)")
            else:
                self.sub(r"grad\((\w+), (\w+)\)", lambda mt: f"grad({mt[1]} * n, {mt[2]})",
                         "f -= grad(mse(f(X), Y) / n, f)")
        elif brk == "grad_of_data":
            wrt = c.choice(["X", "Y", "Xt", "S", "eta", "t", "L", "pi", "n", "zz", "f(X)", "2", "T", "M", "G",
                            "L0", "g", "MV", "x"])
            if c.chance(0.75):
                self.sub(r"grad\(([^,]+), (\w+)\)", lambda mt: f"grad({mt[1]}, {wrt})", f"f -= grad(L, {wrt})")
            else:  # not a number as the loss
                what = c.choice(["f(X)", "eta", "grad(L, f)", "X", "f", "Y - 1", "t", "f(X) - Y", "0"])
                self.sub(r"grad\(([^,]+), (\w+)\)", lambda mt: f"grad({what}, {mt[2]})", f"f -= grad({what}, f)")
        elif brk == "entrywise_of_params":  # entrywise functions of gradients are Adam's; of the parameters, never
            k = c.integer(0, 3)
            if k <= 1:
                fn = c.choice(["sqrt", "abs", "sign", "relu", "exp", "tanh", "square", "log", "step"])
                self.sub(r"grad\([^()]*(?:\([^()]*\)[^()]*)*\)", lambda mt: f"{mt[0]} + {fn}(f)",
                         f"f -= 0.1 * {fn}(f)")
            elif k == 2:
                op = c.choice(["{g} * f(X)", "{g} - Y", "{g} * f", "f / {g}", "f(X) * {g}", "mean({g})", "{g} ^ f"])
                self.sub(r"grad\([^()]*(?:\([^()]*\)[^()]*)*\)", lambda mt: op.format(g=mt[0]),
                         "f -= 0.1 * grad(L, f) * f")
            else:
                stmt = c.choice(["f -= f * f", "f -= 0.1 * exp(f)", "f -= 0.1 * f * f(X)", "f = relu(f)",
                                 "f -= 0.1 * f / f"])
                if self.top_state:
                    stmt = c.choice([stmt, "M = M * M + grad(L, f)", "M = sqrt(M) + f", "M = M * f"])
                self.insert(stmt)
        elif brk == "braces":
            idx = [j for j, line in enumerate(lines) if "{" in line or line.strip() == "}"]
            j = c.choice(idx)
            k = c.integer(0, 4)
            if k <= 1:
                lines[j] = lines[j].replace("{" if c.chance(0.5) and "{" in lines[j] else "}", "", 1)
            elif k == 2:
                lines.insert(j, "}")
            elif k == 3:
                lines[j] = lines[j].replace("{", "{ {", 1) if "{" in lines[j] else lines[j] + " }"
            else:
                lines[j] = lines[j].replace("{", c.choice(["(", "[", ":", ""]), 1).replace("}", c.choice([")", "]",
                                                                                                          "end"]))
        elif brk == "update_local":
            stmt = c.choice(["L -= 0.1 * L", "eta -= 1", "eta += 0.1", "t = 1", "t += 1", "X -= 0.1 * grad(L, f)",
                             "Xt = f(X)", "Y += 1", "pi = 3", "f = grad(L, f)", "n -= 1", "zz -= grad(L, f)",
                             "S = 0", "T = 3", "L0 -= 0.1", "L -= grad(L, f)", "G2 = grad(L, f)\n  G2 -= 0.1 * G2",
                             "eta = 2", "L = 1", "f(X) -= 1", "grad(L, f) -= f", "f += X", "U = V",
                             "f -= 0.1 * grad(L, f)\n  L = 2"])
            if self.records and c.chance(0.2):
                stmt = f"{self.records[0]} -= 1"
            self.insert(stmt)
        elif brk == "record_outside":
            k = c.integer(0, 6)
            top = c.choice(["record r_ = L0", "record r_ = f(Xt)", "record r_ = 1", "record r_ = t",
                            "record r_ = mse(f(X), Y)"])
            if k == 0:
                lines.insert(c.choice(loop_at + [len(lines)]), top)
            elif k == 1:
                self.insert(c.choice(["record r_ = grad(L, f)", "record r_ = X", "record r_ = f", "record r_ = S[0]",
                                      "record r_ = Y", "record r_ = M", "record r_ = batch(X, 0, 1)"]))
            elif k == 2 and self.records:
                self.insert(f"record {c.choice(self.records)} = L")
            elif k == 3 and self.records:
                lines.insert(loop_at[0], f"output early = {self.records[-1]}")
            elif k == 4:
                lines.append(c.choice(["output p_ = L", "output p_ = eta", "output p_ = t", "output p_ = G",
                                       "output p_ = g(Xt)", "output p_ = D", "output p_ = Lq"]))
            elif k == 5:
                self.insert(f"record {c.choice(['V', 'U', 'X', 'f', 'L', 't', 'pi', 'n', 'mse', 'T'])} = L")
            else:
                lines.append(f"record r_ = {c.choice(['L0', 'f(Xt)', '0'])}")
        elif brk in ("index_range", "index_negative", "index_fraction"):
            bad = {"index_range": [f"mod(t, {self.r}) + {self.r}", f"{self.r}", f"min(t + {self.r} - 1, {self.r})",
                                   "rows(S)", "1000000000", "2 ^ 62", "1e300", "1e19"],
                   "index_negative": ["-1", "t - 1", f"mod(t, {self.r}) - {self.r}", "max(t - 2, -1)", "-0",
                                      "-(2 ^ 62)", "-1e300"],
                   "index_fraction": ["t / 2", "0.5", "mod(t, 2) + 0.5", "pi", "t * 1.5", "1e-320", "0.1 + 0.2",
                                      "(t + 1) / 3"]}[brk]
            i = c.choice(bad)
            k = c.integer(0, 3)
            if k <= 1:  # the index of a row of S
                self.sub(r"S\[[^\[\]]*(?:\([^()]*\)[^\[\]]*)*\]", lambda mt: f"S[{i}]", f"L_ = mean(f(X[S[{i}]]))")
            elif k == 2:  # a row of X that S names
                bad_row = {"index_range": str(self.m), "index_negative": "-1", "index_fraction": "0.5"}[brk]
                j = next(j for j, line in enumerate(lines) if line.startswith("data S"))
                lines[j] = re.sub(r"\d+\]", f"{bad_row}]", lines[j], count=1)
                if not any("S[" in line for line in lines[j + 1:]):
                    self.insert("L_ = mean(f(X[S[0]]))")
            else:  # the step or size of a mini-batch
                step = {"index_range": "t + 1000000", "index_negative": "t - 5", "index_fraction": "t / 2"}[brk]
                size = {"index_range": str(self.m + 1), "index_negative": "-1", "index_fraction": "1.5"}[brk]
                step, size = (step, "1") if c.chance(0.5) else ("t", size)
                self.sub(r"batch\((\w+), ([^,]+), (\w+)\)", lambda mt: f"batch({mt[1]}, {step}, {size})",
                         f"L_ = mean(f(batch(X, {step}, {size})))", count=0)
        elif brk == "one_row":  # f(X[i]): one row (README lists X[i]; refused today, reported)
            i = c.choice(["t", f"mod(t, {self.m})", "0", f"min(t, {self.m - 1})"])
            self.sub(r"(\w+)\(X\), Y\)", lambda mt: f"{mt[1]}(X[{i}]), Y[{i}])", f"L_ = mean(f(X[{i}]))")
        elif brk == "huge_trip":
            j = loop_at[0]
            if c.chance(0.5):  # more than a loop may run, or not a whole number: refused before running
                lines[j] = re.sub(r"range\(.*\) \{", f"range({c.choice(TOO_HUGE_TRIPS)}) {{", lines[j])
            else:  # within the limit, but a row index leaves S at step rows(S): a clean error, promptly
                counter = re.match(r"for (\w+)", lines[j])[1]
                lines[j] = re.sub(r"range\(.*\) \{", f"range({c.choice(HUGE_TRIPS)}) {{", lines[j])
                lines.insert(j + 1, f"  record stop_ = mean(f(X[S[{counter}]]))")
        elif brk == "huge_trip_runs":  # a known bug: up to 10^9 steps and nothing stops them
            j = loop_at[0]
            lines[j] = re.sub(r"range\(.*\) \{", f"range({c.choice(HUGE_TRIPS)}) {{", lines[j])
        elif brk == "model_unused":  # a known bug: only a schedule, recorded; the model is never applied
            first = next(j for j, line in enumerate(lines)
                         if line.startswith(("for ", "loss ", "state ", "output ", "copy ")))
            T = c.choice(["3", "T", "rows(S)", "0"])  # noqa: N806
            lines[first:] = [f"for t in range({T}) {{", f"  eta = {self.schedule('t', T)}", "  record lr_ = eta",
                             *(["  record t_ = t"] if c.chance(0.5) else []), "}", "output lr_ = lr_"]
        elif brk in ("deep_nesting", "deeper_nesting"):
            depth = c.integer(3, 40) if brk == "deep_nesting" else c.choice([64, 70, 150, 400, 1500])
            j = c.choice(loop_at)
            end = next(q for q in range(j + 1, len(lines))
                       if lines[q].strip() == "}" and len(lines[q]) - 1 == len(lines[j]) - len(lines[j].lstrip()))
            heads = " ".join(f"for lv{q} in range(1) {{" for q in range(depth))
            lines[j + 1:end] = [heads, *lines[j + 1:end], "}" * depth]


def loop_program(c: Chooser, brk: str | None = None) -> str:
    """A network program trained by written loops; `brk` (one of LOOP_BREAKS) breaks it on purpose."""
    return _Loops(c, brk).build()


def raw_loop_program(c: Chooser) -> str:
    """A raw Netsor program trained by a loop (tpc/train/raw.py translates it): declared matrices and
    vectors (an input matrix, 0-2 hidden ones, a readout vector, maybe a bias or a gain), vector
    statements, a readout `v @ x / n` (muP's powers in the updates) or `/ sqrt(n)` (none: NTK), and
    a loop of gradients and updates, with now and then a momentum buffer, a decay term, a schedule,
    a test readout, or one object's power of n drawn at random (refused or unstable, at times)."""
    d, rows = c.integer(1, 3), c.integer(1, 4)
    hidden = c.integer(0, 2)
    mup = c.chance(0.6)
    act = c.choice(["relu", "tanh", "", "relu", "tanh"])
    bias = c.choice(["", "", "input", "hidden", "gain"]) if hidden or c.chance(0.5) else c.choice(["", "input"])
    if bias == "hidden" and not hidden:
        bias = "input"
    lines = ["width n", f"data X = {matrix_literal(c, rows, d)}",  # rows: the inputs
             f"data Y = [{', '.join(num(c, -1, 1, 1) for _ in range(rows))}]"]
    test = c.chance(0.5)
    if test:
        lines.append(f"data Xt = {matrix_literal(c, 2, d)}")
    lr = num(c, 0.05, 0.5)
    if c.chance(0.3):
        lines.append(f"scalar lr = {lr}")
        lr = "lr"
    lines.append(f"matrix U : n x {d} ~ N(0, {num(c, 0.5, 2, 1)}/{d})")
    ws = [f"W{i + 1}" for i in range(hidden)]
    lines += [f"matrix {w} : n x n ~ N(0, {num(c, 0.5, 2, 1)}/n)" for w in ws]
    lines.append(f"vector v ~ N(0, {num(c, 0.5, 2, 1)})")
    if bias:
        lines.append(f"vector b ~ N(0, {num(c, 0.2, 1.5, 1)})")

    uses = ws + [f"{ws[0]}.T"] if hidden and c.chance(0.25) else ws  # tied weights: W1 again, transposed

    def wrap(e: str) -> str:
        return f"{act}({e})" if act else f"({e})"

    def chain(data: str) -> str:
        h = wrap(f"U @ {data} + b" if bias == "input" else f"U @ {data}")
        for j, w in enumerate(uses):
            h = wrap(f"{w} @ {h} + b" if bias == "hidden" and j == 0 else f"{w} @ {h}")
        return f"((1 + b) * {h})" if bias == "gain" else h

    scale = "n" if mup else "sqrt(n)"
    named = c.chance(0.5)
    if named:  # the training readout through named vectors, the test one inline
        prev = "X"
        h = wrap("U @ X + b" if bias == "input" else "U @ X")
        lines.append(f"h0 = {h}")
        for j, w in enumerate(uses):
            lines.append(f"h{j + 1} = " + wrap(f"{w} @ h{j} + b" if bias == "hidden" and j == 0 else f"{w} @ h{j}"))
        prev = f"h{len(uses)}"
        if bias == "gain":
            lines.append(f"g = (1 + b) * {prev}")
            prev = "g"
        lines.append(f"f = v @ {prev} / {scale}")
    else:
        lines.append(f"f = v @ {chain('X')} / {scale}")
    if test:
        lines.append(f"ft = v @ {chain('Xt')} / {scale}")
    lines.append("loss L = mse(f, Y)")
    objects = ["U", *ws, "v", *(["b"] if bias else [])]
    trained = [o for o in objects if c.chance(0.85)] or ["v"]
    # muP: n^1 on the input matrix, the readout and the bias; NTK: n^-1 on the n x n matrices' entries
    power = {o: ("1" if o in ("U", "v", "b") else "") if mup else ("-1" if o.startswith("W") else "") for o in objects}
    if c.chance(0.15):  # one object's power drawn at random
        power[c.choice(trained)] = c.choice(["", "1", "2", "0.5", "-1"])
    momentum = c.choice(trained) if c.chance(0.25) else None
    if momentum:
        lines.append(f"state M = zeros({momentum})")
    trip = c.integer(1, 4)
    lines.append(f"for t in range({trip}) {{")
    if c.chance(0.6):
        lines.append("  record loss = L")
    rate = f"{lr} * (1 - t / {trip + 1})" if c.chance(0.2) else lr
    for o in trained:
        lines.append(f"  g{o} = grad(L, {o})")
    for o in trained:
        factor = {"": "", "1": " * n", "2": " * n^2", "0.5": " * sqrt(n)", "-1": " / n"}[power[o]]
        term = f"g{o}"
        if o == momentum:
            lines.append(f"  M = 0.9 * M + g{o}")
            term = "M"
        if c.chance(0.1):  # a decay term, which carries no power of n
            lines.append(f"  {o} -= {rate} * ({term}{factor} + 0.01 * {o})")
        else:
            lines.append(f"  {o} -= {rate}{factor} * {term}")
    lines.append("}")
    lines.append(f"output pred = {'ft' if test else 'f'}")
    if any("record" in line for line in lines):
        lines.append("output curve = loss")
    return "\n".join(lines) + "\n"


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
    network: bool  # generated as a network program (before mutation), written loops included
    mutations: int  # token mutations, plus one for a loop program broken on purpose
    width: int = 8
    run_opts: tuple[str, ...] = ()  # extra options of `tpc run`
    limit_opts: tuple[str, ...] = ()  # extra options of `tpc limit`
    kind: str = ""  # netsor | network (train sgd/fomaml/cbow) | loops (written training loops)
    brk: str | None = None  # how a loop program was broken on purpose (LOOP_BREAKS), if it was
    skip: tuple[str, ...] = ()  # stages left out: where a reported bug fails this kind of break (KNOWN_BUG_STAGES)


def program(c: Chooser, broken: bool = False, known_bugs: bool = False,
            loops_p: float = 0.12) -> tuple[str, str, str | None]:
    """An unmutated program and its kind: Netsor (60%), a network trained by `train` (28%) or by loops
    written in the language (`loops_p`, 12%; a quarter of the unbroken ones raw Netsor programs). With
    `broken`, a loop program is broken on purpose three times in four (the kind of break is returned);
    `known_bugs` adds the breaks of KNOWN_BUG_BREAKS. (Under hypothesis, coin flips lean towards True:
    HypothesisChooser.)"""
    network_p = max(0.4, loops_p)
    if not c.chance(network_p):
        return netsor_program(c), "netsor", None
    if not c.chance(loops_p / network_p):
        return network_program(c), "network", None
    brk = None
    if broken and c.chance(0.75):
        brk = c.choice(LOOP_BREAKS + (KNOWN_BUG_BREAKS if known_bugs else ()))
    if brk is None and c.chance(0.25):  # a raw Netsor program trained by a loop (translated: raw.py)
        return raw_loop_program(c), "loops", None
    return loop_program(c, brk), "loops", brk


# A loop of 100 steps or more (`train`: 1000) can take `limit` minutes, and one of up to 10^9 (the most a loop
# may run) takes `check` and `limit` minutes or more even with an empty body: they count the limit's plan by
# a dry run of every step (a reported bug: tests/test_fuzz.py's xfail). A mutation that makes one (a trip
# count replaced by 1e9) is drawn again unless the known bugs are asked for.
_TRIPS = re.compile(r"(range\(|steps\s*=\s*)\s*([0-9.]+(?:[eE][-+]?[0-9]+)?)\s*[)},]")


def too_many_steps(source: str) -> bool:
    """A trip count (or `train`'s steps) that makes the commands slow, within what tpc accepts."""
    for m in _TRIPS.finditer(source):
        v = float(m[2])
        if (100 if m[1] == "range(" else 1000) <= v <= 10**9:
            return True
    return False


def case(c: Chooser, mutate_p: float = 0.5, known_bugs: bool = False, loops_p: float = 0.12) -> Case:
    """A program, mutated with probability `mutate_p` (1-3 token mutations, or a loop program broken on
    purpose and 0-1 token mutations), and the commands' options."""
    mutated = c.chance(mutate_p)
    original, kind, brk = program(c, mutated, known_bugs, loops_p)
    # a huge trip count stops at the row index that leaves S: no token mutation may take that away
    count = (c.integer(0, 1) if brk else c.integer(1, 3)) if mutated and brk not in ("huge_trip",) else 0
    for _attempt in range(3):
        source = original
        for _ in range(count):
            source = mutate(c, source)
        if known_bugs or not too_many_steps(source) or too_many_steps(original):
            break
    else:
        source, count = original, 0
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
    return Case(source, kind != "netsor", count + (brk is not None), c.choice([4, 8, 8, 16]), tuple(run_opts),
                tuple(limit_opts), kind, brk, () if known_bugs else KNOWN_BUG_STAGES.get(brk or "", ()))


def cases_strategy(mutate_p: float = 0.5, known_bugs: bool = False, loops_p: float = 0.12) -> Any:
    """A hypothesis strategy of `Case`s."""
    from hypothesis import strategies as st

    @st.composite
    def build(draw: Callable[[Any], Any]) -> Case:
        return case(HypothesisChooser(draw), mutate_p, known_bugs, loops_p)

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


def _emitted_outputs(prog: Any, source: str, width: int) -> dict[str, Any]:
    """The outputs of the emitted module for seeds 0 and 1, (2, ...) each: a Netsor program's
    TensorProgram on the program's data, or a network program's training written as loops run on
    each seed's Network (word2vec's tables and `train` statements: none)."""
    import inspect

    import torch

    namespace: dict[str, Any] = {}
    exec(compile(source, "<emitted>", "exec"), namespace)  # noqa: S102 - tpc's own output
    if "TensorProgram" in namespace:
        from tpc.backends.torch.codegen import program_data

        data = {k: torch.tensor(v) for k, v in program_data(prog).items()}
        with torch.no_grad():
            values = namespace["TensorProgram"](width=width, seeds=[0, 1])(**data)
        return {k: v.detach().numpy() for k, v in values.items()}
    train = namespace.get("train")
    if "Network" not in namespace or train is None or "outputs" not in inspect.signature(train).parameters:
        return {}
    args = [name for name, p in inspect.signature(train).parameters.items()
            if name not in ("model", "outputs") and p.default is inspect.Parameter.empty]
    per_seed = []
    for seed in (0, 1):
        outputs: dict[str, Any] = {}
        train(namespace["Network"](width, seed=seed), *[torch.tensor(prog.data[a]) for a in args], outputs=outputs)
        per_seed.append(outputs)
    return {k: [torch.as_tensor(p[k]).detach().numpy() for p in per_seed] for k in per_seed[0]}


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
        """Every stage but `case.skip`; after a clean error in `check` (the program does not load) only
        `classify`."""
        outcomes: list[Outcome] = []
        for argv in stages(case):
            if (outcomes and outcomes[0].status != "ok" and argv[0] != "classify") or " ".join(argv) in case.skip:
                continue
            outcomes.append(self.run_stage(case.source, argv))
        return Report(case, outcomes)

    def differential(self, source: str, width: int = 16) -> list[str]:
        """Oracles on a program's numbers, each broken one described (empty: none broken, or the
        program does not load): every output's shape at finite width (per seed) is its limit's;
        the emitted PyTorch (`tpc emit-torch`) gives `tpc run`'s values, seed for seed; and a
        program trained by loops gives the same values by autograd and by the unrolled program at
        that width (run_unrolled_finite). A clean TpcError anywhere ends the checks: what fails
        cleanly is the stages' business."""
        import numpy as np

        import tpc
        from tpc.errors import TpcError

        out: list[str] = []
        try:
            with time_limit(self.timeout):
                prog = self.load(source)
                fin = tpc.run(prog, width, 2, force=True)
                try:  # a limit refused cleanly leaves the other oracles to check
                    lim = tpc.limit(prog, particles=256, replicates=2, force=True)
                except TpcError:
                    lim = None
                for k in sorted(set(fin) | set(lim or ())) if lim is not None else ():
                    a = fin[k].values.shape[1:] if k in fin else None
                    b = np.shape(lim[k].value) if k in lim else None
                    if a != b:
                        out.append(f"output {k}: shape {a} at finite width, {b} in the limit")
                emitted = _emitted_outputs(prog, tpc.torch_source(prog), width)
                trained = getattr(prog, "program", None) is not None
                if trained:
                    from tpc.train.pooled import run_unrolled_finite

                    unrolled = run_unrolled_finite(prog, width, 2)
                for k, res in fin.items():
                    for what, other in (("emitted PyTorch", emitted.get(k)),
                                        ("the unrolled program", unrolled.get(k) if trained else None)):
                        if other is None:
                            continue
                        got = np.asarray(other, dtype=float)
                        want = np.asarray(res.values, dtype=float)
                        if got.shape != want.shape:
                            out.append(f"output {k}: {what} has shape {got.shape}, tpc run {want.shape}")
                            continue
                        ok = np.isfinite(want) & np.isfinite(got)
                        scale = max(1.0, float(np.abs(want[ok]).max())) if ok.any() else 1.0
                        if ok.any() and float(np.abs(got[ok] - want[ok]).max()) > 1e-8 * scale:
                            out.append(f"output {k}: {what} differs from tpc run by "
                                       f"{float(np.abs(got[ok] - want[ok]).max()):.3g}")
        except (TpcError, StageTimeout):
            return out
        except Exception as exc:  # the stages report tracebacks; here only the numbers
            out.append(f"{type(exc).__name__} in the differential checks: {str(exc)[:200]}")
        return out

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
