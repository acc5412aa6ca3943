"""The grammar (Lark, LALR, positions on) and the AST: plain dataclasses with source spans."""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import lark
from lark import Lark, Token, Transformer, v_args

from tpc.errors import Span, TpcError, clip

# ---------------------------------------------------------------------------- expressions


@dataclass(frozen=True)
class Expr:
    span: Span


@dataclass(frozen=True)
class Num(Expr):
    value: float


@dataclass(frozen=True)
class Name(Expr):
    id: str


@dataclass(frozen=True)
class Call(Expr):
    fn: str
    args: tuple[Expr, ...]
    fn_span: Span


@dataclass(frozen=True)
class BinOp(Expr):
    op: str  # one of + - * / ^ @
    left: Expr
    right: Expr


@dataclass(frozen=True)
class Neg(Expr):
    operand: Expr


@dataclass(frozen=True)
class Attr(Expr):
    operand: Expr
    attr: str


def untransposed(e: Expr) -> tuple[Expr, bool]:
    """`W.T` -> (W, True); any other expression -> (itself, False)."""
    if isinstance(e, Attr) and e.attr == "T":
        return e.operand, True
    return e, False


@dataclass(frozen=True)
class ListExpr(Expr):
    items: tuple[Expr, ...]


@dataclass(frozen=True)
class Index(Expr):
    """`X[i]`: row(s) of data at a whole-number index (a loop counter expression)."""

    operand: Expr
    index: Expr


# ---------------------------------------------------------------------------- statements


@dataclass(frozen=True)
class Stmt:
    span: Span


@dataclass(frozen=True)
class Normal:
    mean: Expr
    var: Expr
    span: Span


@dataclass(frozen=True)
class WidthDecl(Stmt):
    name: str


@dataclass(frozen=True)
class DimDecl(Stmt):
    name: str
    value: int


@dataclass(frozen=True)
class DataDecl(Stmt):
    name: str
    path: str | None  # load("...") relative to the program file
    literal: object | None  # nested lists of floats
    source_span: Span


@dataclass(frozen=True)
class ScalarDecl(Stmt):
    name: str
    value: Expr


@dataclass(frozen=True)
class MatrixDecl(Stmt):
    name: str
    rows: str | int
    cols: str | int
    rows_span: Span
    cols_span: Span
    dist: Normal


@dataclass(frozen=True)
class VectorDecl(Stmt):
    names: tuple[str, ...]
    dist: Normal


@dataclass(frozen=True)
class NonlinDecl(Stmt):
    name: str
    args: tuple[str, ...]
    params: tuple[str, ...]
    body: Expr


@dataclass(frozen=True)
class OutputDecl(Stmt):
    name: str
    value: Expr


@dataclass(frozen=True)
class Assign(Stmt):
    name: str
    value: Expr


@dataclass(frozen=True)
class Kwarg:
    name: str
    value: Expr
    span: Span


@dataclass(frozen=True)
class ParamDecl(Stmt):
    """`parametrization mup(lr = 0.5)` or `abc(a = [...], b = [...], c = ...)`."""

    name: str
    name_span: Span
    kwargs: tuple[Kwarg, ...]


@dataclass(frozen=True)
class LayerDecl(Stmt):
    """`layer W : hidden n x n, var = 2`; a bias has one dimension."""

    name: str
    role: str
    role_span: Span
    dims: tuple[tuple[str | int, Span], ...]
    kwargs: tuple[Kwarg, ...]


@dataclass(frozen=True)
class ModelDecl(Stmt):
    name: str
    arg: str
    body: Expr
    positions: int = 1  # `model f(x[P])`: each input is P positions
    positions_span: Span | None = None
    grid: tuple[int, ...] = ()  # the positions' shape: (P,), or (H, W) for `model f(x[H, W])`
    lets: tuple[Assign, ...] = ()  # `model f(x) { h = ...  return ... }`: the statements before `return`


@dataclass(frozen=True)
class LossDecl(Stmt):
    name: str
    value: Expr


@dataclass(frozen=True)
class TrainDecl(Stmt):
    """`train sgd(lr = ..., steps = ..., batch = ...) minimize L`."""

    optimizer: str
    optimizer_span: Span
    kwargs: tuple[Kwarg, ...]
    loss: str
    loss_span: Span
    on: tuple[tuple[str, Span], ...] = ()  # `on P, S, SY, Q, QY` (fomaml's task data)


@dataclass(frozen=True)
class ForLoop(Stmt):
    """`for t in range(T) { body }`."""

    counter: str
    counter_span: Span
    trip: Expr
    body: tuple[Stmt, ...]


@dataclass(frozen=True)
class StateDecl(Stmt):
    """`state M = zeros(f)`: a buffer that updates can change (an optimizer's state)."""

    name: str
    value: Expr


@dataclass(frozen=True)
class RecordStmt(Stmt):
    """`record loss = L`: one value per iteration of the enclosing loop."""

    name: str
    value: Expr


@dataclass(frozen=True)
class CopyDecl(Stmt):
    """`copy g = f`: a model with f's architecture whose layers start at f's current values."""

    name: str
    source: str
    source_span: Span


@dataclass(frozen=True)
class Update(Stmt):
    """`P -= expr` or `P += expr` on a layer, a model, a copy or a state; with `index`, the rows
    `P[b.words]` or `P[b.context]` of a table of word vectors (word2vec's row update)."""

    target: str
    target_span: Span
    op: str  # "-=" | "+="
    value: Expr
    index: Expr | None = None


@dataclass(frozen=True)
class StreamDecl(Stmt):
    """`stream S = cbow(T, window = 2, ...)`: word2vec's batches over the token data T."""

    name: str
    kind: str
    kind_span: Span
    tokens: str
    tokens_span: Span
    kwargs: tuple[Kwarg, ...]


@dataclass
class Module:
    statements: list[Stmt] = field(default_factory=list)


# ---------------------------------------------------------------------------- parsing


def _span(meta_or_token: object) -> Span:
    m = meta_or_token
    return Span(m.line, m.column, m.end_line, m.end_column)  # type: ignore[attr-defined]


class _ToAst(Transformer):
    """Lark tree -> AST dataclasses; every node keeps the span of its source text."""

    # --- expressions
    @v_args(meta=True)
    def number(self, meta, children):
        value = float(children[0])
        if not math.isfinite(value):  # 1e400 is inf in float64: refuse it here, not in generated code
            raise TpcError(f"the number {clip(str(children[0]))} is too large (a float64 ends near 1.8e308)",
                           _span(meta))
        return Num(_span(meta), value)

    @v_args(meta=True)
    def name(self, meta, children):
        return Name(_span(meta), str(children[0]))

    @v_args(meta=True)
    def call(self, meta, children):
        fn, *args = children
        args = [a for a in args if a is not None]
        return Call(_span(meta), str(fn), tuple(args), _span(fn))

    def _bin(op):  # noqa: N805 - a small factory used at class creation
        @v_args(meta=True)
        def rule(self, meta, children):
            return BinOp(_span(meta), op, children[0], children[-1])

        return rule

    add = _bin("+")
    sub = _bin("-")
    mul = _bin("*")
    div = _bin("/")
    matmul = _bin("@")
    pow = _bin("^")

    @v_args(meta=True)
    def neg(self, meta, children):
        return Neg(_span(meta), children[0])

    @v_args(meta=True)
    def attr(self, meta, children):
        return Attr(_span(meta), children[0], str(children[1]))

    @v_args(meta=True)
    def index(self, meta, children):
        return Index(_span(meta), children[0], children[1])

    @v_args(meta=True)
    def list_expr(self, meta, children):
        return ListExpr(_span(meta), tuple(children))

    # --- literals in `data`
    def list(self, children):
        return [c for c in children if c is not None]

    # --- statements
    @v_args(meta=True)
    def width_decl(self, meta, children):
        return WidthDecl(_span(meta), str(children[0]))

    @v_args(meta=True)
    def dim_decl(self, meta, children):
        name, value = children
        if "." in value or "e" in value.lower():
            raise TpcError(f"dimension '{name}' must be a whole number, got {value}", _span(value))
        return DimDecl(_span(meta), str(name), int(value))

    @v_args(meta=True)
    def data_decl(self, meta, children):
        name, src = children
        if isinstance(src, tuple):  # load(...)
            path, span = src
            return DataDecl(_span(meta), str(name), path, None, span)
        return DataDecl(_span(meta), str(name), None, src, _span(meta))

    def load(self, children):
        tok = children[0]
        return (str(tok)[1:-1], _span(tok))

    @v_args(meta=True)
    def scalar_decl(self, meta, children):
        return ScalarDecl(_span(meta), str(children[0]), children[1])

    @v_args(meta=True)
    def matrix_decl(self, meta, children):
        name, rows, x, cols, dist = children
        if str(x) != "x":
            raise TpcError(
                f"expected 'x' between the dimensions of matrix '{name}', got '{x}'",
                _span(x),
                hint=f"write: matrix {name} : n x n ~ N(0, 1/n)",
            )
        return MatrixDecl(_span(meta), str(name), rows[0], cols[0], rows[1], cols[1], dist)

    def dimension(self, children):
        tok = children[0]
        value: str | int = int(tok) if tok.type == "INT" else str(tok)
        return (value, _span(tok))

    @v_args(meta=True)
    def normal(self, meta, children):
        return Normal(children[1], children[2], _span(meta))

    @v_args(meta=True)
    def vector_decl(self, meta, children):
        *names, dist = children
        return VectorDecl(_span(meta), tuple(str(n) for n in names), dist)

    @v_args(meta=True)
    def nonlin_decl(self, meta, children):
        name, params, body = children
        return NonlinDecl(_span(meta), str(name), params[0], params[1], body)

    def params(self, children):
        args, params = children
        return (tuple(args), tuple(params or ()))

    def names(self, children):
        return [str(c) for c in children]

    @v_args(meta=True)
    def output_decl(self, meta, children):
        return OutputDecl(_span(meta), str(children[0]), children[1])

    @v_args(meta=True)
    def assign(self, meta, children):
        return Assign(_span(meta), str(children[0]), children[1])

    # --- networks and training
    @v_args(meta=True)
    def kwarg(self, meta, children):
        return Kwarg(str(children[0]), children[1], _span(meta))

    def kwargs(self, children):
        return tuple(children)

    @v_args(meta=True)
    def param_decl(self, meta, children):
        name, kwargs = children
        return ParamDecl(_span(meta), str(name), _span(name), kwargs or ())

    @v_args(meta=True)
    def layer_decl(self, meta, children):
        name, role, first, _, second, *kwargs = children
        dims = (first,) if second is None else (first, second)
        return LayerDecl(_span(meta), str(name), str(role), _span(role), dims, tuple(kwargs))

    @v_args(meta=True)
    def model_decl(self, meta, children):
        name, arg, positions, *lets, body = children
        if positions is None:
            return ModelDecl(_span(meta), str(name), str(arg), body, lets=tuple(lets))
        toks = [t for t in positions if t is not None]
        grid = tuple(int(t) for t in toks)
        span = Span(toks[0].line, toks[0].column, toks[-1].end_line, toks[-1].end_column)
        return ModelDecl(_span(meta), str(name), str(arg), body, math.prod(grid), span, grid, tuple(lets))

    def positions(self, children):
        return children

    @v_args(meta=True)
    def loss_decl(self, meta, children):
        return LossDecl(_span(meta), str(children[0]), children[1])

    @v_args(meta=True)
    def train_decl(self, meta, children):
        opt, kwargs, word, loss, on, *names = children
        if str(word) != "minimize":
            raise TpcError(f"expected 'minimize' after the optimizer, got '{word}'", _span(word),
                           hint="write: train sgd(lr = 0.1, steps = 10) minimize L")
        if on is not None and str(on) != "on":
            raise TpcError(f"expected 'on' after the loss, got '{on}'", _span(on))
        data = tuple((str(n), _span(n)) for n in names if n is not None)
        return TrainDecl(_span(meta), str(opt), _span(opt), kwargs or (), str(loss), _span(loss), data)

    @v_args(meta=True)
    def loop_stmt(self, meta, children):
        counter, rng, trip, *body = children
        if str(rng) == "steps":  # one iteration per batch of a stream: the builder counts them
            trip = Call(_span(rng), "<steps>", (trip,), _span(rng))
        elif str(rng) != "range":
            raise TpcError(f"expected 'range' (or 'steps' of a stream) after 'in', got '{clip(str(rng))}'",
                           _span(rng), hint=f"write: for {counter} in range(10) {{ ... }}")
        return ForLoop(_span(meta), str(counter), _span(counter), trip, tuple(body))

    @v_args(meta=True)
    def state_decl(self, meta, children):
        return StateDecl(_span(meta), str(children[0]), children[1])

    @v_args(meta=True)
    def record_stmt(self, meta, children):
        return RecordStmt(_span(meta), str(children[0]), children[1])

    @v_args(meta=True)
    def copy_decl(self, meta, children):
        return CopyDecl(_span(meta), str(children[0]), str(children[1]), _span(children[1]))

    @v_args(meta=True)
    def update(self, meta, children):
        target, index, op, value = children
        return Update(_span(meta), str(target), _span(target), str(op), value, index)

    @v_args(meta=True)
    def stream_decl(self, meta, children):
        name, kind, tokens, *kwargs = children
        return StreamDecl(_span(meta), str(name), str(kind), _span(kind), str(tokens), _span(tokens), tuple(kwargs))

    def start(self, children):
        return Module(list(children))


_TOKEN_NAMES = {
    "NAME": "a name",
    "BY": "'x'",
    "NUMBER": "a number",
    "SIGNED_NUMBER": "a number",
    "INT": "a whole number",
    "STRING": 'a quoted file name ("...")',
    "NORMAL": "N(mean, variance)",
    "LPAR": "'('",
    "RPAR": "')'",
    "LSQB": "'['",
    "RSQB": "']'",
    "COMMA": "','",
    "EQUAL": "'='",
    "COLON": "':'",
    "SEMICOLON": "';'",
    "TILDE": "'~'",
    "PLUS": "'+'",
    "MINUS": "'-'",
    "STAR": "'*'",
    "SLASH": "'/'",
    "AT": "'@'",
    "CIRCUMFLEX": "'^'",
    "DOT": "'.'",
    "LBRACE": "'{'",
    "RBRACE": "'}'",
    "UPDATE_OP": "'-=' or '+='",
    "$END": "the end of the program",
}


def _describe(terminal: str) -> str:
    if terminal in _TOKEN_NAMES:
        return _TOKEN_NAMES[terminal]
    if terminal.startswith("__ANON"):  # a literal Lark named for itself, such as `**`
        found = [t.pattern.value for t in _parser().terminals if t.name == terminal]
        return f"'{found[0]}'" if found else terminal.lower()
    if terminal.isupper():
        return terminal.lower()
    return terminal


def grammar_text() -> str:
    """The grammar shipped inside the package, or `grammar/tp.lark` of a source checkout."""
    try:
        return resources.files("tpc").joinpath("grammar/tp.lark").read_text()
    except (FileNotFoundError, OSError):
        return (Path(__file__).resolve().parent.parent / "grammar" / "tp.lark").read_text()


@lru_cache(maxsize=1)
def _parser() -> Lark:
    return Lark(grammar_text(), parser="lalr", propagate_positions=True, maybe_placeholders=True,
                cache=_grammar_cache())


def _grammar_cache() -> str | bool:
    """Where Lark keeps its analysis of the grammar between runs (0.1 s of every command's start). Lark
    checks a hash of the grammar, its options and the versions on loading and rebuilds a stale file.
    The file is a pickle, so it lives in the user's own cache directory, never a shared one; where
    there is none, no cache."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    try:
        base = (Path(xdg) if Path(xdg).is_absolute() else Path.home() / ".cache") / "tpc"  # XDG: relative is ignored
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode, owner = base.stat().st_mode, base.stat().st_uid
    except (OSError, RuntimeError):  # no home directory, or not writable
        return False
    if mode & 0o022 or (hasattr(os, "getuid") and owner != os.getuid()):
        return False  # others could write there
    return str(base / f"grammar-lark{lark.__version__}-py{sys.version_info[0]}.{sys.version_info[1]}.cache")


_KEYWORD_STARTS = {"width", "dim", "data", "scalar", "matrix", "vector", "nonlin", "output",
                   "parametrization", "layer", "model", "loss", "train", "for", "state", "record", "copy",
                   "stream"}


# Limits on one expression, checked on Lark's tree without recursion before anything recursive (the
# tree -> AST transform, the builder, code generation) walks it: a deeper tree would exhaust the
# Python stack. A chain `a + b + ... ` of k terms is k - 1 levels deep, so MAX_DEPTH exceeds MAX_TERMS.
MAX_TERMS = 256  # names and numbers in one expression (list literals excepted: they are data)
MAX_DEPTH = 300  # levels of operators, calls, signs and brackets
_EXPR_RULES = {"add", "sub", "mul", "div", "matmul", "pow", "neg", "attr", "number", "name", "call", "list_expr",
               "list", "unary", "index"}


@contextmanager
def stack_room(frames: int = 4000) -> Iterator[None]:
    """Room on the Python stack for recursion over an expression within the limits above, whatever
    the caller's own depth (a test runner, a notebook); restored after."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, frames))
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


def _check_limits(tree: lark.Tree) -> None:
    """Refuse an expression with more than MAX_TERMS terms or nested deeper than MAX_DEPTH levels.
    Iterative: this runs before any recursion over the tree."""
    # (node, depth within its expression, the root of its expression, inside a list literal)
    todo: list[tuple[lark.Tree, int, lark.Tree | None, bool]] = [(tree, 0, None, False)]
    terms: dict[int, int] = {}
    while todo:
        node, depth, root, in_list = todo.pop()
        is_expr = node.data in _EXPR_RULES
        if is_expr and root is None:
            root, depth = node, 0
        elif not is_expr:
            root, depth, in_list = None, 0, False
        if depth > MAX_DEPTH:
            raise TpcError(f"expression nested deeper than {MAX_DEPTH} levels; name its parts in separate "
                           "instructions", _span(node.meta))
        in_list = in_list or node.data in ("list", "list_expr")
        if root is not None and node.data in ("name", "number") and not in_list:
            count = terms[id(root)] = terms.get(id(root), 0) + 1
            if count > MAX_TERMS:
                raise TpcError(f"expression has more than {MAX_TERMS} terms; split it into several instructions",
                               _span(root.meta))
        for child in node.children:
            if isinstance(child, lark.Tree):
                todo.append((child, depth + 1, root, in_list))


def _end_span(source: str) -> Span:
    """The position just after the last token; lines split on "\n" only, as Lark counts them."""
    lines = source.rstrip().split("\n")
    return Span(len(lines), len(lines[-1]) + 1, len(lines), len(lines[-1]) + 2)


# the source before a token ends inside `model f(x) { ...` (a block with no `}` yet)
_IN_MODEL_BODY = re.compile(r"(?:^|\n)[ \t]*model\s+\w+\s*\([^)]*\)\s*\{[^}]*$")


# the source before a token ends in `layer W : hidden n by` (a separator other than `x`)
_LAYER_DIMS = re.compile(r"(?:^|\n)[ \t]*layer\s+(\w+)\s*:\s*(\w+)\s+(\w+)\s+(\w+)\s*$")


def parse(source: str, filename: str = "<program>") -> Module:
    """Parse `.tp` source text into a Module; a syntax error raises TpcError with its location."""
    try:
        tree = _parser().parse(source)
    except lark.UnexpectedCharacters as exc:
        span = Span(exc.line, exc.column, exc.line, exc.column + 1)
        char = source[exc.pos_in_stream] if exc.pos_in_stream < len(source) else "?"
        raise TpcError(f"syntax error: unexpected character {char!r}", span).locate(
            filename, source
        ) from None
    except lark.UnexpectedToken as exc:
        tok: Token = exc.token
        expected = sorted({_describe(t) for t in exc.expected})
        if tok.type == "$END":
            span = _end_span(source)
            what = "end of the program"
        else:
            span = _span(tok)
            what = f"'{clip(str(tok))}'"
        msg = f"syntax error: unexpected {what}"
        if expected:
            msg += "; expected " + (
                expected[0] if len(expected) == 1 else "one of " + ", ".join(expected)
            )
        hint = None
        if "RPAR" in exc.expected and tok.type != "RPAR":
            hint = "is a ')' missing?"
        if "RBRACE" in exc.expected and tok.type == "$END":
            what = "a model's" if _IN_MODEL_BODY.search(source) else "a loop's"
            hint = f"is a '}}' missing? {what} body ends with '}}'"
        before = re.search(r"([A-Za-z_][A-Za-z0-9_]*)\s*$", source[:tok.start_pos]) if tok.type != "$END" else None
        if before and before.group(1) in _KEYWORD_STARTS and tok.type in ("EQUAL", "UPDATE_OP", "LSQB"):
            hint = f"'{before.group(1)}' starts a statement of its own: give this value another name"
        if tok.type == "NAME" and str(tok) not in _KEYWORD_STARTS and "EQUAL" in exc.expected:
            hint = ("a statement is a declaration or `NAME = expression`; is an operator missing before "
                    f"'{clip(str(tok))}'?")
        layer = _LAYER_DIMS.search(source[:tok.start_pos]) if tok.type != "$END" else None
        if layer and layer.group(4) != "x" and layer.group(2) != "bias":  # (a bias has one dimension)
            name, role, first = layer.group(1, 2, 3)
            hint = f"a layer's dimensions are separated by 'x': layer {name} : {role} {first} x {clip(str(tok))}"
        if tok.type != "$END" and _IN_MODEL_BODY.search(source[:tok.start_pos]):
            hint = "a model's body is statements `NAME = expression`, then `return expression`: " \
                   "model f(x) { h = relu(U @ x)  return V @ h }"
        raise TpcError(msg, span, hint).locate(filename, source) from None
    except lark.UnexpectedEOF as exc:  # pragma: no cover - LALR reports UnexpectedToken($END)
        raise TpcError(f"syntax error: unexpected end of program, expected {exc.expected}").locate(
            filename, source
        ) from None
    try:
        _check_limits(tree)
        with stack_room():
            module = _ToAst().transform(tree)
    except TpcError as exc:
        raise exc.locate(filename, source) from None
    except lark.exceptions.VisitError as exc:
        if isinstance(exc.orig_exc, TpcError):
            raise exc.orig_exc.locate(filename, source) from None
        raise
    return module
