"""Network programs: layers with roles, a parametrization, a model, losses, training and outputs.

A `.tp` program with a `layer`, `model`, `train` or `for` statement is a network program. It is
checked here into a `Network`: plain data, with its training as a `TrainProgram` of loops
(`loops.py`; a `train` statement desugars to one, `desugar.py`) that every backend interprets.

Conventions (TP4, Yang & Hu 2021, Definition 3.1): layer l has `W^l = n^-a_l w^l` with
`w^l ~ N(0, var_l n^-2b_l / d)` (the finite fan-in `d` divides the input layer's variance
only), and SGD updates the trained parameter `w^l <- w^l - lr n^-c dL/dw^l`. Layers are numbered
in the order the model applies them: the input layer is 1, hidden layers 2..L, the readout
L+1; a bias takes the input layer's `a` and `b` (a weight on a constant input 1).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tpc import syntax as ast
from tpc.build import check_dim
from tpc.data import DEFAULT_POLICY, DataPolicy, literal_array, load_array
from tpc.errors import Span, TpcError, clip, nearest
from tpc.ops import expr as ex
from tpc.ops.functions import ALIASES, FUNCTIONS, LINEAR_FNS
from tpc.parametrization import ABC, Classification, classify, classify_adaptive, preset
from tpc.train.loops import LoopBuilder, TrainProgram
from tpc.train.raw import first_mention, width_monomial

if TYPE_CHECKING:
    import networkx as nx

# `train OPT(...) minimize L` with a gradient optimizer, and the settings each takes (desugar.py writes the loop)
GRADIENT_OPTIMIZERS = {
    "sgd": ("lr", "steps", "batch"),
    "adam": ("lr", "steps", "batch", "beta1", "beta2", "eps", "weight_decay"),
    "adamw": ("lr", "steps", "batch", "beta1", "beta2", "eps", "weight_decay"),
    "signsgd": ("lr", "steps", "batch"),
}
MAX_EXPONENT = 16.0  # the largest |a|, |b| or |c| an abc(...) may give
ROLES = ("input", "embedding", "hidden", "readout", "bias", "conv")
LOSSES = ("mse", "xent", "logistic")
NORMS = ("layernorm", "rmsnorm")  # a model's normalisations over the n coordinates, with eps (default below)
POSITION_OPS = ("attend", "pool", "shift", "avgpool")  # over positions (`model f(x[P])`): attention, pooling, shifts
NORM_EPS = 1e-5  # torch.nn.LayerNorm's default
OUTPUT_FUNCTIONS = ("history", "features", "feature_change", "adapted", "embeddings", "nngp", "ntk")
NETWORK_STATEMENTS = (ast.ParamDecl, ast.LayerDecl, ast.ModelDecl, ast.LossDecl, ast.TrainDecl, ast.ForLoop,
                      ast.StateDecl, ast.CopyDecl, ast.StreamDecl)
LOOP_STATEMENTS = (ast.ForLoop, ast.StateDecl, ast.CopyDecl, ast.Update, ast.RecordStmt)


@dataclass
class Layer:
    name: str
    role: str  # input | embedding | hidden | readout | bias
    rows: int | None  # None: the width n
    cols: int | None
    var: float  # sigma_l^2
    span: Span
    index: int = -1  # its place l-1 in the parametrization's lists
    group: str | None = None  # a tap of this convolution (`layer A : conv n x n, kernel = 3`)

    @property
    def fan_in(self) -> int:
        # an embedding's input counts words (one-hot rows), so its columns are unit-variance n-vectors;
        # a readout of flattened positions has P vectors of n per output (var / P each)
        return int(self.cols) if self.role == "input" else self.taps if self.role == "readout" else 1

    # an input convolution's offsets: its columns are `taps` rows of data (conv(U, x)); a readout of
    # flatten(h): h's positions, one row of n weights per output and position (k * taps rows)
    taps: int = 1
    # `matrix A : n x n ~ N(0, 2/n)` (or `vector y ~ N(0, 1)`, added as a bias): drawn once at the variance
    # written, never trained, outside the parametrization's lists (the model applies it; grad, updates,
    # zeros(f) and the NTK skip it)
    fixed: bool = False

    @property
    def declared(self) -> str:
        """What the program declared: a layer, or a fixed `matrix` or `vector` (a fixed bias)."""
        return ("vector" if self.role == "bias" else "matrix") if self.fixed else "layer"

    @property
    def flattens(self) -> bool:
        """A readout of flatten(h): its own rows at each of h's positions."""
        return self.role == "readout" and self.taps > 1

    @property
    def weight_rows(self) -> int | None:
        """The rows of its weight matrix (None: the width n): a flattening readout's k * P."""
        return int(self.rows) * self.taps if self.role == "readout" else self.rows

    @property
    def takes_data(self) -> bool:
        return self.role in ("input", "embedding")

    @property
    def row_size(self) -> int:
        """The numbers of one position of the data that this input layer reads."""
        return int(self.cols) // self.taps


@dataclass(frozen=True)
class Conv:
    """`layer A : conv n x n, kernel = 3` (`kernel = [3, 3]` on a grid; `n x d` reads the data):
    weights shared across positions, one offset of the kernel each, with 'same' zero padding (torch's
    `padding="same"`: an even kernel reaches one position further forward than back)."""

    name: str
    kernel: tuple[int, ...]
    takes_data: bool
    span: Span
    stride: int = 1  # the output keeps every stride-th position (torch's `stride`)
    valid: bool = False  # 'valid' padding: only the positions where the whole kernel fits

    def window(self, grid: tuple[int, ...]) -> tuple[tuple[int, int, int, int], ...]:
        """The positions the output keeps, as a `window` step's (start, stop, size 1, stride) per axis:
        'same', 0, s, 2s, ... of the 'same' output (torch's padding (k - 1) // 2 for an odd kernel; an
        even one is padded (k - 1) // 2 before and k // 2 after, as torch's padding="same", so it keeps
        ceil(size / s) positions, one more than padding (k - 1) // 2 can where size - 1 is a multiple
        of s); 'valid', the positions where every tap is inside the grid (the first tap's offset is
        -(k - 1) // 2), every s-th of them."""
        return tuple(((k - 1) // 2, size - k + (k - 1) // 2 + 1, 1, self.stride) if self.valid else
                     (0, size, 1, self.stride) for k, size in zip(self.kernel, grid, strict=True))

    @property
    def resamples(self) -> bool:
        return self.valid or self.stride > 1

    @property
    def offsets(self) -> tuple[tuple[int, ...], ...]:
        return tuple(itertools.product(*[range(-((k - 1) // 2), k - (k - 1) // 2) for k in self.kernel]))

    def tap(self, offset: tuple[int, ...]) -> str:
        """The hidden layer of one offset (a name no program can write, so it never clashes)."""
        return f"{self.name}[{','.join(map(str, offset))}]"


@dataclass
class Step:
    """One value of the model: the input, a layer applied to a value, a bias, a coordinatewise
    function of earlier values (a tree over `Arg(i)` = the i-th of `args`), or a moment: the mean
    of a vector over its n coordinates, one number per input (a norm's scale, as `mean` in a raw
    Netsor program)."""

    op: str  # input | matmul | bias | fn | moment | attend | pool | shift
    kind: str  # data | vector | scalar (per input: a moment, or a function of moments) | out
    layer: str | None = None
    args: tuple[int, ...] = ()
    tree: ex.Tree | None = None
    span: Span | None = None
    grid: tuple[int, ...] = ()  # the positions it holds a value at, row by row (the model's grid, or a
    # smaller one after a strided convolution or a windowed pool); () one value per input
    offset: tuple[int, ...] = ()  # shift: the value at position p is its argument's at p + offset
    window: tuple[tuple[int, int, int, int], ...] = ()  # window: (start, stop, size, stride) per axis of
    # its argument's grid: the mean over each window of `size` positions, every stride-th from start
    patches: tuple[tuple[int, ...], ...] = ()  # input: each position's row holds these offsets' rows (conv(U, x))
    heads: int = 1  # attend: the heads, each over its block of n / heads coordinates
    transposed: bool = False  # matmul: W.T @ h, an n x n layer applied transposed (tied weights)

    @property
    def pos(self) -> bool:
        """One value per position of an input (`model f(x[P])`), until `pool`."""
        return bool(self.grid)

    @property
    def positions(self) -> int:
        """The rows per input: its positions, or 1."""
        return math.prod(self.grid) if self.grid else 1


@dataclass
class Model:
    name: str
    arg: str
    steps: list[Step]
    span: Span
    positions: int = 1  # `model f(x[P])`: the steps with `pos` hold P rows per input
    grid: tuple[int, ...] = ()  # the positions' shape, row by row: (P,) or (H, W); () without positions
    names: dict[int, str] = field(default_factory=dict)  # steps the model's body named (`h = ...`)

    def step_name(self, k: int) -> str:
        """Step k's name where it is shown: the body's own name for it, else h<k> (or _h<k>, where the
        body used h<k> for another step)."""
        if k in self.names:
            return self.names[k]
        return f"_h{k}" if f"h{k}" in self.names.values() else f"h{k}"

    @property
    def out(self) -> int:
        return len(self.steps) - 1

    @property
    def features(self) -> int:
        """The last hidden vector: what the readout multiplies."""
        return self.steps[self.out].args[0]

    def first_step_of(self, layers: tuple[str, ...]) -> int:
        """The first step below the readout that applies one of `layers` (the readout's, if none): a
        backward pass for their gradients stops there; nothing under it is needed."""
        return min((i for i, s in enumerate(self.steps[:-1]) if s.layer in layers), default=self.out)

    def by_position(self, X: np.ndarray) -> np.ndarray:  # noqa: N803
        """Data rows (N, P*d) as what the input layer reads at each position, (N, P, d'): d' = d, or
        K*d for an input convolution (each position's patch of K rows)."""
        import torch

        from tpc.train import positions

        at = torch.as_tensor(X, dtype=torch.float64).reshape(X.shape[0] * self.positions, -1)
        patches = next((s.patches for s in self.steps if s.op == "input"), ())
        return positions.patches(at, patches, self.grid).reshape(X.shape[0], self.positions, -1).numpy()


@dataclass
class Loss:
    name: str
    kind: str  # mse | xent | logistic | user
    data: str  # the inputs X of f(X)
    target: str | None  # Y for the built-in losses
    span: Span
    tree: ex.Tree | None = None  # user losses: Arg(0) = f(X), Arg(i) = data `args[i]`, mean_all / sum_all
    args: tuple[str, ...] = ()


@dataclass
class Tasks:
    """Few-shot tasks drawn from a pool of inputs: task t's support is pool rows support[t] with
    labels support_y[t], its query pool rows query[t] with labels query_y[t]."""

    pool: str
    support: str
    support_y: str
    query: str
    query_y: str

    def count(self, data: dict[str, np.ndarray]) -> int:
        return int(data[self.support].shape[0])

    def task(self, data: dict[str, np.ndarray], t: int) -> TaskRows:
        """Task t's pool rows and labels (no query labels for `adapted(...)`'s tasks)."""
        return TaskRows(data[self.support][t].astype(int), data[self.support_y][t],
                        data[self.query][t].astype(int), data[self.query_y][t] if self.query_y else None)


@dataclass
class TaskRows:
    support: np.ndarray
    support_y: np.ndarray
    query: np.ndarray
    query_y: np.ndarray | None


@dataclass
class Cbow:
    """word2vec's CBOW with negative sampling over a token stream (see cbow.py)."""

    tokens: str  # the data set of word ids
    window: int
    negatives: int
    sample: float  # word2vec's subsampling threshold of frequent words (0: none)
    epochs: int
    min_lr: float  # the learning rate decays linearly from lr to min_lr, as in word2vec
    seed: int  # the data stream's seed (windows, subsampling, negatives), the same at every width
    embedding: str = ""  # the input embedding layer U and the output embedding layer V of V @ (U @ x)
    output: str = ""


@dataclass
class Train:
    lr: float
    steps: int
    batch: int  # rows per step (sgd; the full training set unless `batch = ...`) or tasks per step (fomaml)
    loss: str  # a loss name (sgd) or a loss kind (fomaml: mse, xent, logistic)
    span: Span
    optimizer: str = "sgd"  # sgd | adam | adamw | signsgd | fomaml (first-order MAML) | cbow
    tasks: Tasks | None = None
    inner_lr: float = 0.0
    inner_steps: int = 0
    cbow: Cbow | None = None
    stream: str = ""  # cbow: the name of a `stream S = cbow(...)` that a written loop reads ('' for `train cbow`)
    betas: tuple[float, float] = (0.9, 0.999)  # adam, adamw: the moving averages' rates
    eps: float = 1e-8  # adam, adamw
    weight_decay: float = 0.0  # adam, adamw: decoupled, w <- w - lr n^-c weight_decay w


@dataclass
class Output:
    name: str
    kind: str  # predict | loss | history | features | feature_change | adapted | embeddings | nngp | ntk
    phase: str  # init | trained
    span: Span
    data: str | None = None
    loss: str | None = None
    tasks: Tasks | None = None  # adapted: predictions on each task's query after inner SGD on its support
    layer: str | None = None  # embeddings: the layer whose columns (or rows) are the words' vectors
    position: int = -1  # programs with loops: how many top-level training instructions run before it


@dataclass
class Network:
    filename: str
    source: str
    width_name: str
    param_name: str
    abc: ABC
    lr: float | None
    layers: dict[str, Layer]
    model: Model
    data: dict[str, np.ndarray] = field(default_factory=dict)
    losses: dict[str, Loss] = field(default_factory=dict)
    train: Train | None = None
    outputs: list[Output] = field(default_factory=list)
    param_span: Span | None = None
    program: TrainProgram | None = None  # training written as loops (loops.py), instead of `train`
    attention: float = 1.0  # attend(q, k, v) divides q.k by n^attention (the parametrization's)

    @property
    def hidden_layers(self) -> int:
        return self.abc.hidden_layers

    @property
    def parameters(self) -> list[str]:
        """The layers that training may move: all but the fixed random matrices and vectors."""
        return [name for name, la in self.layers.items() if not la.fixed]

    @property
    def graph(self) -> nx.DiGraph:
        """The whole program as one networkx DiGraph: data, layers, losses, the model and each loop as a
        node whose `body` is a graph of its own, and the outputs (tpc/train/graph.py). Made when asked."""
        from tpc.train.graph import program_graph

        return program_graph(self)

    @property
    def entrywise(self) -> bool:
        """The training has entrywise (adaptive) updates: Adam, sign-SGD (loops.py's `ewise`)."""
        return self.program is not None and any(ins.op == "ewise" for ins in self.program.walk())

    def classification(self) -> Classification:
        """The parametrization's class (TP4), every layer trained: what chooses the limit's backend."""
        return classify_adaptive(self.abc) if self.entrywise else classify(self.abc)

    def trained_entries(self) -> tuple[bool, ...] | None:
        """Which entries of the abc lists this program's training moves (a layer, or a bias on the input's
        entry); None where it moves every one or runs no loop (a loop that moves none: all False)."""
        if self.program is None or not self.program.iterations():
            return None
        on = [False] * len(self.abc.a)
        for name in self.program.trained_layers():
            la = self.layers.get(name)
            if la is not None and not la.fixed and 0 <= la.index < len(on):
                on[la.index] = True
        return None if all(on) else tuple(on)

    def program_classification(self) -> Classification:
        """The class of this program's training: the parametrization's, with the layers it never trains
        left out of r (readout-only training of a muP network is a kernel method: r is infinite)."""
        trained = self.trained_entries()
        if trained is None:
            return self.classification()
        return classify_adaptive(self.abc, trained) if self.entrywise else classify(self.abc, trained)

    def ab(self, layer: Layer) -> tuple[float, float]:
        if layer.fixed:  # a fixed matrix's entries: c/n (n x n) or c/d (n x d), whatever the parametrization
            return 0.0, 0.5 if layer.role == "hidden" else 0.0
        return self.abc.a[layer.index], self.abc.b[layer.index]

    def init_exponent(self, layer: Layer) -> float:
        """Entries of W = n^-a w have standard deviation sqrt(var / fan_in) n^-(a+b)."""
        a, b = self.ab(layer)
        return a + b

    def adaptive_exponent(self, layer: Layer) -> float:
        """c'_l: an entrywise (Adam-like) update moves w^l by n^-c'_l (parametrization.py)."""
        return 0.0 if layer.fixed else self.abc.adaptive_exponents()[layer.index]  # fixed: never updated

    def natural_exponent(self, layer: Layer) -> float:
        """s_l: an entrywise function reads dL/dw^l as n^s_l dL/dw^l, entries of order one (a_l + 1: the
        backward signal n dL/dh is O(1) in muP; a_{L+1} for the readout)."""
        return self.ab(layer)[0] + (layer.role != "readout")

    def lr_exponent(self, layer: Layer) -> float:
        """SGD on w moves W by -lr n^-(2a+c) dL/dW."""
        a, _ = self.ab(layer)
        return 2 * a + self.abc.c

    @property
    def has_tables(self) -> bool:
        """word2vec's programs: an embedding layer, so the layers are tables of word vectors updated by
        index (tables.py), not dense weights."""
        return any(la.role == "embedding" for la in self.layers.values())

    def is_linear(self) -> bool:
        """Every coordinatewise step of the model is linear in its vectors, and no step takes a
        moment (a norm divides by one): the limit is exact."""
        return all(s.op != "moment" and (s.op != "fn" or _linear(s.tree)) for s in self.model.steps)

    def readout(self) -> Layer:
        return next(la for la in self.layers.values() if la.role == "readout")

    def output_dim(self) -> int:
        return int(self.readout().rows)

    def point_sets(self) -> list[str]:
        """Every data set the model is evaluated on, training data first."""
        names: list[str] = self.program.applied_sets() if self.program else []
        if self.train and self.train.tasks:
            names.append(self.train.tasks.pool)
        elif self.train and not self.train.cbow:  # cbow's model takes counts of context words, not a data set
            names.append(self.losses[self.train.loss].data)
        for loss in self.losses.values():
            names.append(loss.data)
        names += [o.data for o in self.outputs if o.data]
        names += [o.tasks.pool for o in self.outputs if o.tasks]
        return list(dict.fromkeys(names))

    def task_loss(self) -> Loss:
        """The loss of one task's rows: targets in the data entry '<y>' (see losses.py)."""
        return Loss(self.train.loss, self.train.loss, "<x>", "<y>", self.train.span)


def _linear(t: ex.Tree) -> bool:
    if not isinstance(t, ex.Apply):
        return True
    if t.fn in LINEAR_FNS:
        return all(_linear(a) for a in t.args)
    if t.fn == "mul":
        a, b = t.args
        return (not ex.args_used(a) and _linear(b)) or (not ex.args_used(b) and _linear(a))
    if t.fn == "div":
        return _linear(t.args[0]) and not ex.args_used(t.args[1])
    return not ex.args_used(t)


# ---------------------------------------------------------------------------- building


@dataclass
class _Builder:
    base_dir: Path
    data_policy: DataPolicy = field(default_factory=DataPolicy)  # where load(...) reads, how much it may take
    width: str | None = None
    dims: dict[str, int] = field(default_factory=dict)
    data: dict[str, np.ndarray] = field(default_factory=dict)
    nonlins: dict[str, ast.NonlinDecl] = field(default_factory=dict)
    layers: dict[str, Layer] = field(default_factory=dict)
    defined: dict[str, Span] = field(default_factory=dict)
    param: ast.ParamDecl | None = None
    model: Model | None = None
    losses: dict[str, Loss] = field(default_factory=dict)
    train: Train | None = None
    outputs: list[Output] = field(default_factory=list)
    adapted: list[tuple[Output, list[tuple[str, Span]], Span]] = field(default_factory=list)
    loops: LoopBuilder | None = None
    later: dict[str, Span] = field(default_factory=dict)  # states and copies, where the program declares them
    convs: dict[str, Conv] = field(default_factory=dict)
    # where the program first declares a layer or model (what makes its `matrix`/`vector` fixed), if it
    # declares raw objects too: a raw program with a stray `layer` gets told which line did it
    network_at: Span | None = None
    # `z = tanh(A @ y)` at the top level: names of values the model reads (raw statements beside layers),
    # built where the model first uses them; and which ones it did use
    top_lets: dict[str, ast.Assign] = field(default_factory=dict)
    top_used: set[str] = field(default_factory=set)
    declared_names: dict[str, Span] = field(default_factory=dict)  # every top-level name: for a use before it
    previous: ast.Stmt | None = None  # the statement before the one being built

    def declare(self, name: str, span: Span) -> None:
        if name in self.defined:
            raise TpcError(f"'{name}' is already defined (first defined at line {self.defined[name].line})", span)
        self.not_builtin(name, span)
        self.defined[name] = span

    def not_builtin(self, name: str, span: Span) -> None:
        if name in FUNCTIONS and FUNCTIONS[name].user_visible or name in ALIASES or name in LOSSES \
                or name in OUTPUT_FUNCTIONS or name in NORMS + POSITION_OPS \
                or name in ("mean", "sum", "load", "N", "flatten"):
            raise TpcError(f"'{name}' is a built-in function; choose another name", span)

    def known(self) -> list[str]:
        return list(self.defined) + [k for k, f in FUNCTIONS.items() if f.user_visible]

    def unknown(self, name: str, span: Span) -> TpcError:
        if name in self.top_lets:
            return TpcError(f"'{clip(name)}' is a value of the model (line {self.top_lets[name].span.line}): outside "
                            "the model, a program reads the model's outputs, f(X)", span)
        if name in self.later and name not in self.defined:
            return TpcError(f"'{clip(name)}' is used before it is defined (line {self.later[name].line}): declare a "
                            "state or copy before the statements that read it", span)
        if name in self.declared_names and name not in self.defined:
            return used_before(name, self.declared_names[name], span)
        near = nearest(name, self.known())
        return TpcError(f"unknown name '{clip(name)}'", span, f"did you mean '{near}'?" if near else None)

    # --- constants (numbers and dimensions; the width never appears in a network's statements)
    def const(self, e: ast.Expr) -> float:
        if isinstance(e, ast.Num):
            return e.value
        if isinstance(e, ast.Neg):
            return -self.const(e.operand)
        if isinstance(e, ast.Name) and e.id in self.dims:
            return float(self.dims[e.id])
        if isinstance(e, ast.Name) and e.id == self.width:
            raise TpcError(f"the parametrization supplies the powers of {e.id}; write a number here", e.span)
        if isinstance(e, ast.BinOp) and e.op in "+-*/^":
            a, b = self.const(e.left), self.const(e.right)
            if e.op == "/" and b == 0:
                raise TpcError("division by zero", e.span)
            try:
                value = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else 0.0, "^": a**b}[e.op]
            except (OverflowError, ZeroDivisionError):
                raise TpcError("this constant overflows", e.span) from None
            if isinstance(value, complex):
                raise TpcError("a negative number to a fractional power", e.span)
            if not np.isfinite(value):  # 1e300 * 1e300 is inf without an exception
                raise TpcError("this constant overflows", e.span)
            return value
        if isinstance(e, ast.Call) and e.fn == "sqrt" and len(e.args) == 1:
            v = self.const(e.args[0])
            if v < 0:
                raise TpcError("sqrt of a negative number", e.span)
            return float(np.sqrt(v))
        raise TpcError("expected a number", e.span)

    def const_list(self, e: ast.Expr) -> tuple[float, ...]:
        if not isinstance(e, ast.ListExpr):
            raise TpcError("expected a list of numbers, e.g. [-0.5, 0, 0.5]", e.span)
        return tuple(self.const(x) for x in e.items)

    def kwargs(self, kwargs: tuple[ast.Kwarg, ...], allowed: tuple[str, ...], what: str) -> dict[str, ast.Kwarg]:
        out: dict[str, ast.Kwarg] = {}
        for kw in kwargs:
            if kw.name not in allowed:
                near = nearest(kw.name, list(allowed))
                raise TpcError(f"{what} takes {', '.join(allowed)}; unknown argument '{kw.name}'", kw.span,
                               f"did you mean '{near}'?" if near else None)
            if kw.name in out:
                raise TpcError(f"argument '{kw.name}' is given twice", kw.span)
            out[kw.name] = kw
        return out

    # --- statements
    def statement(self, s: ast.Stmt) -> None:
        if isinstance(s, ast.WidthDecl):
            if self.width is not None:
                raise TpcError("the width is declared twice", s.span)
            self.declare(s.name, s.span)
            self.width = s.name
        elif isinstance(s, ast.DimDecl):
            self.declare(s.name, s.span)
            check_dim(s.value, s.span)
            self.dims[s.name] = s.value
        elif isinstance(s, ast.DataDecl):
            self.declare(s.name, s.span)
            arr = load_array(s.path, self.base_dir, s.source_span, self.data_policy) \
                if s.path is not None else literal_array(s.literal, s.span)
            self.data[s.name] = np.asarray(arr, dtype=np.float64)
        elif isinstance(s, ast.NonlinDecl):
            self.declare(s.name, s.span)
            self.nonlins[s.name] = s
        elif isinstance(s, ast.ParamDecl):
            if self.param is not None:
                raise TpcError("the parametrization is declared twice", s.span)
            self.param = s
        elif isinstance(s, ast.LayerDecl):
            self.layer(s)
        elif isinstance(s, ast.ModelDecl):
            if self.model is not None:
                raise TpcError("a network program has one model", s.span)
            self.declare(s.name, s.span)
            from tpc.train.model_builder import ModelBuilder  # it builds on this module's types

            self.model = ModelBuilder(self, s).build()
        elif isinstance(s, ast.LossDecl):
            self.declare(s.name, s.span)
            self.losses[s.name] = self.loss(s)
        elif isinstance(s, ast.StreamDecl):
            self.stream(s)
        elif isinstance(s, ast.TrainDecl):
            if self.train is not None and self.train.stream:
                raise TpcError(f"this program declares the stream '{self.train.stream}' for a loop it writes: write "
                               "its training as that loop, not `train`", s.span)
            if self.loops is not None:
                raise TpcError("this program trains with loops: write the optimizer as a loop too, not `train`",
                               s.span)
            self.train_stmt(s)
        elif isinstance(s, LOOP_STATEMENTS):
            if self.train is not None and not self.train.stream:
                raise TpcError("this program already trains with `train ...`: write its training as loops "
                               "instead", s.span)
            if self.model is None:
                raise TpcError("define the model before training it", s.span)
            if self.param is None:
                raise TpcError("declare the parametrization before training: `parametrization mup` (or sp, "
                               "ntk, mf, abc(...))", s.span)
            if self.loops is None:
                self.loops = LoopBuilder(self)
            self.loops.statement(s)
        elif isinstance(s, ast.OutputDecl):
            self.output(s)
        elif isinstance(s, ast.MatrixDecl):
            self.fixed_matrix(s)
        elif isinstance(s, ast.VectorDecl):
            self.fixed_vectors(s)
        elif isinstance(s, ast.Assign):
            self.top_let(s)
        elif isinstance(s, ast.ScalarDecl):
            raise TpcError("a network program has no `scalar` declarations: write the number where it is used (a "
                           "whole number may be a `dim`)", s.span, self.raw_hint())
        else:
            raise TpcError("not a statement of a network program", s.span, self.raw_hint())

    def top_let(self, s: ast.Assign) -> None:
        """`z = tanh(A @ y)` beside the layers, as a raw program writes it: a name for a value built from the
        fixed matrices and vectors, the layers and earlier such names, which the model reads by name. It is
        built into the model where the model first uses it (a definition: one that reads a layer stands for
        its current value); data enter through the model's argument, so it reads none."""
        layer = self.previous if isinstance(self.previous, ast.LayerDecl) else None
        if layer is not None and layer.span.end_line == s.span.line and s.name == "var":
            raise TpcError("a layer's arguments follow a comma", s.span,
                           f"write: layer {layer.name} : ..., var = ...")
        self.declare(s.name, s.span)
        if self.model is not None:
            raise TpcError(f"'{s.name}' is named after the model: a value named at the top level is one the model "
                           f"reads, named before it (an output is written `output {s.name} = ...`)", s.span)
        later = first_mention(s.value, {n: sp for n, sp in self.declared_names.items() if n not in self.defined})
        if later is not None:
            raise used_before(later.id, self.declared_names[later.id], later.span)
        data = first_mention(s.value, self.data)
        if data is not None:
            raise TpcError(f"'{s.name}' is named outside the model, so it reads no data ('{data.id}'): the data enter "
                           "through the model's argument (name this value inside the model: model f(x) { ... })",
                           data.span, self.raw_hint())
        self.top_lets[s.name] = s

    def dim(self, d: str | int, span: Span) -> int | None:
        if d == self.width:
            return None
        if isinstance(d, int):
            check_dim(d, span)
            return d
        if d in self.dims:
            return self.dims[d]
        raise self.unknown(d, span)

    def layer(self, s: ast.LayerDecl) -> None:
        self.declare(s.name, s.span)
        if self.width is None:
            raise TpcError("declare the width before any layer: `width n`", s.span)
        if s.role not in ROLES:
            near = nearest(s.role, list(ROLES))
            raise TpcError(f"unknown layer role '{s.role}'; a layer is input, embedding, hidden, readout or bias",
                           s.role_span,
                           f"did you mean '{near}'?" if near else None)
        dims = [self.dim(d, sp) for d, sp in s.dims]
        want = {"input": "n x d", "embedding": "n x d", "hidden": "n x n", "readout": "k x n", "bias": "n",
                "conv": "n x n (or n x d, reading the data)"}[s.role]
        ok = {
            "conv": len(dims) == 2 and dims[0] is None,
            "input": len(dims) == 2 and dims[0] is None and dims[1] is not None,
            "embedding": len(dims) == 2 and dims[0] is None and dims[1] is not None,
            "hidden": len(dims) == 2 and dims[0] is None and dims[1] is None,
            "readout": len(dims) == 2 and dims[0] is not None and dims[1] is None,
            "bias": len(dims) == 1 and dims[0] is None,
        }[s.role]
        if not ok:
            raise TpcError(f"a {s.role} layer is {want.replace('n', self.width)} (n the width, d and k finite)",
                           s.span)
        if s.role == "conv":
            return self.conv_layer(s, dims)
        kw = self.kwargs(s.kwargs, ("var",), "a layer")
        var = self.const(kw["var"].value) if "var" in kw else 1.0
        # a readout may start at zero (word2vec's output embeddings do), and a bias (a norm's learned
        # shift or gain, `(1 + g) * layernorm(h) + b`); every matrix with a side n is random
        if not (var > 0 or var == 0 and s.role in ("readout", "bias")) or not np.isfinite(var):
            raise TpcError("a layer's variance must be positive (a readout's or a bias's may be 0)",
                           kw["var"].value.span)
        rows, cols = (dims + [1])[:2] if s.role == "bias" else dims
        self.layers[s.name] = Layer(s.name, s.role, rows, cols, var, s.span)

    def raw_hint(self) -> str | None:
        if self.network_at is None:
            return None
        return (f"line {self.network_at.line} declares a layer or a model, so this is a network program (where a "
                "`matrix` or `vector` is fixed random weights); a raw Netsor program declares none")

    def fixed_variance(self, dist: ast.Normal, what: str) -> tuple[float, float]:
        """(c, p): a fixed object's N(0, c n^p), the powers of the width read as a raw program's are."""
        assert self.width is not None
        if width_monomial(dist.mean, self.width, self.dims)[0] != 0:
            raise TpcError(f"a fixed {what} has mean 0", dist.mean.span)
        return width_monomial(dist.var, self.width, self.dims)

    def fixed_matrix(self, s: ast.MatrixDecl) -> None:
        """`matrix A : n x n ~ N(0, 2/n)` (or `n x d ~ N(0, 1/d)`, applied to the data): a Gaussian matrix of
        the Tensor Program, drawn once at the variance written and never trained. Its entries have
        variance c/n (n x n) or c (n x d), as a layer's have at initialisation in every stable
        parametrization (a + b = 1/2 for a hidden layer, 0 for an input layer, TP4), so it is the layer of
        var c (c d) that no update moves: exponents a = 0 and b = 1/2 (0), outside the abc lists."""
        self.declare(s.name, s.span)
        if self.width is None:
            raise TpcError("declare the width before any matrix: `width n`", s.span)
        rows = self.dim(s.rows, s.rows_span)
        cols = self.dim(s.cols, s.cols_span)
        if rows is not None:
            raise TpcError(f"a fixed matrix in a network program is {self.width} x {self.width} or {self.width} x d "
                           "(applied to n-vectors or to the data); a readout is a layer", s.rows_span)
        c, power = self.fixed_variance(s.dist, "matrix")
        want = -1.0 if cols is None else 0.0
        if not (c > 0 and np.isfinite(c)) or power != want:
            form = f"c/{self.width}, like N(0, 2/{self.width})" if cols is None else "a number c, like N(0, 1/3)"
            raise TpcError(f"the entries of a fixed {self.width} x {s.cols} matrix have variance {form}: the "
                           "scale at which every parametrization initialises such a layer", s.dist.var.span,
                           self.raw_hint())
        role = "hidden" if cols is None else "input"
        var = c if cols is None else c * cols  # a layer's var is over its fan-in
        self.layers[s.name] = Layer(s.name, role, None, cols, var, s.span, fixed=True)

    def fixed_vectors(self, s: ast.VectorDecl) -> None:
        """`vector y ~ N(0, 1)`: n-vectors of the Tensor Program drawn once and never trained, which the
        model adds as it adds a bias (`h + y`): bias layers of var c that no update moves (a = b = 0)."""
        if self.width is None:
            raise TpcError("declare the width before any vector: `width n`", s.span)
        if isinstance(s.dist.mean, ast.ListExpr) or isinstance(s.dist.var, ast.ListExpr):
            raise TpcError("fixed vectors in a network program are independent, each N(0, c): declare them one "
                           "by one", s.dist.span)
        c, power = self.fixed_variance(s.dist, "vector")
        if not (c > 0 and np.isfinite(c)) or power != 0:
            raise TpcError("the coordinates of a fixed vector have variance a number c, like N(0, 1): a "
                           "Tensor Program's initial vectors", s.dist.var.span, self.raw_hint())
        for name in s.names:
            self.declare(name, s.span)
            self.layers[name] = Layer(name, "bias", None, 1, c, s.span, fixed=True)

    def conv_layer(self, s: ast.LayerDecl, dims: list[int | None]) -> None:
        """A convolution: one hidden layer per offset of its kernel (each of variance var / K, the
        kernel's fan-in), or, reading the data, one input layer of K x d columns (each position's
        patch of K rows)."""
        kw = self.kwargs(s.kwargs, ("kernel", "var", "stride", "padding"), "a conv layer")
        if "kernel" not in kw:
            raise TpcError("a conv layer gives its kernel size: `kernel = 3` on a sequence, `kernel = [3, 3]` on "
                           "a grid", s.span)
        e = kw["kernel"].value
        items = e.items if isinstance(e, ast.ListExpr) else (e,)
        kernel = tuple(self.const(k) for k in items)
        if not 1 <= len(kernel) <= 2 or not all(k == round(k) and 1 <= k <= 64 for k in kernel):
            raise TpcError("a kernel is one or two whole numbers of positions, 1 to 64: `kernel = 3` or "
                           "`kernel = [3, 3]`", e.span)
        var = self.const(kw["var"].value) if "var" in kw else 1.0
        if not var > 0 or not np.isfinite(var):
            raise TpcError("a layer's variance must be positive", kw["var"].value.span)
        stride = self.const(kw["stride"].value) if "stride" in kw else 1.0
        if not (stride == round(stride) and 1 <= stride <= 64):
            raise TpcError("a stride is a whole number of positions, 1 to 64", kw["stride"].value.span)
        padding = kw["padding"].value if "padding" in kw else None
        if padding is not None and not (isinstance(padding, ast.Name) and padding.id in ("same", "valid")):
            raise TpcError("padding is `same` (zeros around the edges: as many positions out as in, before "
                           "the stride) or `valid` (no padding: only where the kernel fits)", padding.span)
        valid = isinstance(padding, ast.Name) and padding.id == "valid"
        conv = Conv(s.name, tuple(int(k) for k in kernel), dims[1] is not None, s.span, int(stride), valid)
        self.convs[s.name] = conv
        taps = len(conv.offsets)
        if conv.takes_data:
            self.layers[s.name] = Layer(s.name, "input", None, int(dims[1]) * taps, var, s.span, taps=taps)
            return
        for offset in conv.offsets:
            tap = conv.tap(offset)
            self.layers[tap] = Layer(tap, "hidden", None, None, var / taps, s.span, group=s.name)

    def f_call(self, e: ast.Expr) -> str | None:
        """`f(X)` with f the model and X data: the name of X, else None."""
        if isinstance(e, ast.Call) and self.model and e.fn == self.model.name:
            if len(e.args) != 1 or not isinstance(e.args[0], ast.Name) or e.args[0].id not in self.data:
                raise TpcError(f"{e.fn}(X) takes one data set X", e.span)
            x = e.args[0].id
            d = self.input_dim()
            arr = self.data[x]
            if arr.ndim != 2 or arr.shape[1] != d:
                p = self.model.positions
                what = f"{d} numbers ({p} positions of {d // p})" if p > 1 else f"dimension {d}"
                raise TpcError(f"'{x}' is {' x '.join(map(str, arr.shape))}; the model takes rows of {what}",
                               e.args[0].span)
            return x
        return None

    def input_dim(self) -> int:
        """The numbers in one data row: the input layer's d, times the model's positions."""
        d = next(la.row_size for la in self.layers.values() if la.takes_data)
        return d * (self.model.positions if self.model else 1)

    def output_dim(self) -> int:
        return int(next(la.rows for la in self.layers.values() if la.role == "readout"))

    def loss(self, s: ast.LossDecl) -> Loss:
        if self.model is None:
            raise TpcError("define the model before its losses", s.span)
        e = s.value
        if isinstance(e, ast.Call) and e.fn in LOSSES:
            if len(e.args) != 2:
                raise TpcError(f"{e.fn}(f(X), Y) takes the model's outputs and the targets", e.span)
            x = self.f_call(e.args[0])
            if x is None:
                raise TpcError(f"the first argument of {e.fn} is the model on data, e.g. {self.model.name}(X)",
                               e.args[0].span)
            y = e.args[1]
            if not isinstance(y, ast.Name) or y.id not in self.data:
                raise TpcError("the targets are a data set", y.span)
            self.check_targets(e.fn, self.data[x], self.data[y.id], y.span)
            return Loss(s.name, e.fn, x, y.id, s.span)
        names: list[str] = []
        xs: list[str] = []
        tree = self.loss_tree(e, names, xs, inside=False)
        if not xs:
            raise TpcError(f"a loss depends on the model: use {self.model.name}(X)", e.span)
        m = self.data[xs[0]].shape[0]
        k = self.output_dim()
        for name in names:
            arr = self.data[name]
            if arr.ndim and arr.shape[0] != m:
                raise TpcError(f"'{name}' has {arr.shape[0]} rows but {xs[0]} has {m}", e.span)
            # data meets f(X) coordinatewise: it must broadcast to f(X)'s m x k, not beyond (a vector
            # of m numbers against m x k would pair rows with outputs); losses.py reads m x 1 as m when k = 1
            if not (arr.ndim == 0 or arr.shape in ((m, 1), (m, k)) or k == 1 and arr.shape == (m,)):
                got = f"a vector of {m}" if arr.ndim == 1 else " x ".join(map(str, arr.shape))
                fits = f"{m} numbers (or {m} x 1)" if k == 1 else f"{m} x {k}, {m} x 1 (a number per row)"
                raise TpcError(f"'{name}' is {got}, but {self.model.name}({xs[0]}) is {m} x {k}: data in a loss "
                               f"is {fits} or a single number", e.span)
        return Loss(s.name, "user", xs[0], None, s.span, tree, tuple(["<f>"] + names))

    def loss_tree(self, e: ast.Expr, names: list[str], xs: list[str], inside: bool) -> ex.Tree:
        """A user loss: numbers and reductions `mean(...)` / `sum(...)` (over every entry) of
        coordinatewise expressions in f(X) and data; `inside` is True within a reduction."""
        def sub(a: ast.Expr) -> ex.Tree:
            return self.loss_tree(a, names, xs, inside)

        if isinstance(e, ast.Call) and e.fn in ("mean", "sum") and len(e.args) == 1:
            if inside:
                raise TpcError(f"{e.fn}(...) inside a reduction: a loss reduces once over the rows", e.span)
            return ex.Apply(f"{e.fn}_all", (self.loss_tree(e.args[0], names, xs, True),))
        x = self.f_call(e)
        if x is not None and not inside:
            raise TpcError(f"a loss reduces {e.fn}(X) over its rows: mean(...) or sum(...)", e.span)
        if x is not None:
            if xs and xs[0] != x:
                raise TpcError("a loss evaluates the model on one data set", e.span)
            xs.append(x)
            return ex.Arg(0)
        if isinstance(e, ast.Num):
            return ex.Const(e.value)
        if isinstance(e, ast.Name):
            if e.id in self.data and not inside:
                raise TpcError(f"data '{e.id}' in a loss is used inside mean(...) or sum(...)", e.span)
            if e.id in self.data:
                if e.id not in names:
                    names.append(e.id)
                return ex.Arg(1 + names.index(e.id))
            if e.id in self.dims:
                return ex.Const(float(self.dims[e.id]))
            raise self.unknown(e.id, e.span)
        if isinstance(e, ast.Neg):
            return ex.Apply("neg", (sub(e.operand),))
        if isinstance(e, ast.BinOp) and e.op in "+-*/^":
            fn = {"+": "add", "-": "sub", "*": "mul", "/": "div", "^": "pow"}[e.op]
            return ex.Apply(fn, (sub(e.left), sub(e.right)))
        if isinstance(e, ast.Call) and e.fn in LOSSES:
            raise TpcError(f"{e.fn}(...) is a whole loss, not a term of one: a top-level loss is {e.fn}(f(X), Y) "
                           "alone or an expression in mean(...) and sum(...) (mse of one output: 0.5 * mean((f(X) - "
                           f"Y) ^ 2)); inside a loop, L = {e.fn}(f(X), Y) + ... combines them", e.fn_span)
        if isinstance(e, ast.Call):
            fn = ALIASES.get(e.fn, e.fn)
            if fn == "sqrt" and len(e.args) == 1:
                return ex.Apply("pow", (sub(e.args[0]), ex.Const(0.5)))
            if fn not in FUNCTIONS or not FUNCTIONS[fn].user_visible:
                raise self.unknown(e.fn, e.fn_span)
            if len(e.args) != FUNCTIONS[fn].arity:
                raise TpcError(f"'{e.fn}' takes {FUNCTIONS[fn].arity} argument(s)", e.span)
            return ex.Apply(fn, tuple(sub(a) for a in e.args))
        raise TpcError("a loss is mse(f(X), Y), xent(f(X), Y), logistic(f(X), Y), or an expression in mean(...) "
                       "and sum(...) of coordinatewise functions of f(X) and data", e.span)

    def check_targets(self, kind: str, x: np.ndarray, y: np.ndarray, span: Span) -> None:
        m, k = x.shape[0], self.output_dim()
        if y.ndim == 0 or y.shape[0] != m:
            rows = y.shape[0] if y.ndim else "no"
            raise TpcError(f"the targets have {rows} rows but the inputs have {m}", span)
        if kind == "mse" and not (y.shape == (m, k) or (k == 1 and y.shape in ((m,), (m, 1)))):
            raise TpcError(f"mse targets are {m} x {k}", span)
        if kind == "xent":
            if k < 2:
                raise TpcError("xent (softmax cross-entropy) needs a readout with at least 2 rows", span)
            labels = y.reshape(m, -1)
            if labels.shape[1] == 1:
                ok = np.all((labels >= 0) & (labels < k) & (labels == np.round(labels)))
                if not ok:
                    raise TpcError(f"xent targets are class labels 0..{k - 1} (or one-hot rows)", span)
            elif labels.shape != (m, k):
                raise TpcError(f"xent targets are {m} class labels or a {m} x {k} one-hot matrix", span)
        if kind == "logistic":
            if k != 1:
                raise TpcError("logistic loss needs a readout with one row", span)
            if not np.all(np.isin(y, (-1.0, 0.0, 1.0))) or y.size != m:
                raise TpcError("logistic targets are labels in {0, 1} or {-1, +1}", span)

    def train_stmt(self, s: ast.TrainDecl) -> None:
        if self.train is not None:
            raise TpcError("a network program has one train statement", s.span)
        if self.model is None:  # (the fuzz found fomaml reading the input layer before there was one)
            raise TpcError("define the layers and the model before the train statement", s.span)
        if s.optimizer == "fomaml":
            self.train = self.fomaml(s)
            return
        if s.optimizer == "cbow":
            self.train = self.cbow(s)
            return
        if s.optimizer not in GRADIENT_OPTIMIZERS:
            raise TpcError(f"unknown optimizer '{s.optimizer}'; tpc trains with {', '.join(GRADIENT_OPTIMIZERS)}, "
                           "fomaml or cbow (or a loop you write)", s.optimizer_span)
        opt = s.optimizer
        if s.on:
            raise TpcError(f"{opt} minimizes a declared loss, which names its data: drop `on ...`", s.on[0][1])
        if s.loss not in self.losses:
            raise self.unknown(s.loss, s.loss_span)
        kw = self.kwargs(s.kwargs, GRADIENT_OPTIMIZERS[opt], opt)
        if "steps" not in kw:
            raise TpcError(f"{opt} needs the number of steps: {opt}(steps = 10)", s.span)
        steps = self.const(kw["steps"].value)
        if steps != int(steps) or not 1 <= steps <= 10**9:  # the bound of fomaml's steps
            raise TpcError("steps is a whole number from 1 to 1000000000", kw["steps"].value.span)
        m = self.data[self.losses[s.loss].data].shape[0]
        batch = self.const(kw["batch"].value) if "batch" in kw else m
        if batch != int(batch) or not 1 <= batch <= m:
            raise TpcError(f"batch is a whole number from 1 to the {m} training rows", kw["batch"].value.span)
        lr = self.const(kw["lr"].value) if "lr" in kw else None
        if lr is not None and not lr > 0:
            raise TpcError("the learning rate must be positive", kw["lr"].value.span)
        self.train = Train(lr if lr is not None else np.nan, int(steps), int(batch), s.loss, s.span, opt)
        if opt in ("adam", "adamw"):
            self.adam_settings(self.train, kw)

    def adam_settings(self, t: Train, kw: dict) -> None:
        """beta1, beta2 in [0, 1), eps > 0, weight_decay >= 0 (AdamW's default 0.01, as torch's)."""
        def get(key: str, default: float) -> float:
            return self.const(kw[key].value) if key in kw else default

        b1, b2 = get("beta1", 0.9), get("beta2", 0.999)
        for key, v in (("beta1", b1), ("beta2", b2)):
            if not 0 <= v < 1:
                raise TpcError(f"{key} is a moving average's rate, in [0, 1) (here {v:g})", kw[key].value.span)
        eps = get("eps", 1e-8)
        if not eps > 0:
            raise TpcError(f"eps must be positive (here {eps:g}): it keeps Adam's denominator away from zero",
                           kw["eps"].value.span)
        decay = get("weight_decay", 0.01 if t.optimizer == "adamw" else 0.0)
        if not decay >= 0:
            raise TpcError(f"weight_decay must be >= 0 (here {decay:g})", kw["weight_decay"].value.span)
        t.betas, t.eps, t.weight_decay = (b1, b2), eps, decay

    def fomaml(self, s: ast.TrainDecl) -> Train:
        """`train fomaml(lr, inner_lr, inner_steps, tasks, steps) minimize KIND on P, S, SY, Q, QY`."""
        if s.loss not in LOSSES:
            raise TpcError(f"fomaml minimizes a loss kind ({', '.join(LOSSES)}) on each task", s.loss_span)
        if len(s.on) != 5:
            raise TpcError("fomaml trains on P, S, SY, Q, QY: a pool of inputs, each task's support rows and "
                           "labels, and its query rows and labels", s.span)
        tasks = self.tasks(s.on, s.loss, s.span)
        kw = self.kwargs(s.kwargs, ("lr", "inner_lr", "inner_steps", "tasks", "steps"), "fomaml")
        for need in ("inner_lr", "steps"):
            if need not in kw:
                raise TpcError(f"fomaml needs {need}", s.span)

        def whole(name: str, default: int, top: int) -> int:
            v = self.const(kw[name].value) if name in kw else default
            if v != int(v) or not 1 <= v <= top:
                raise TpcError(f"{name} is a whole number from 1 to {top}", kw[name].value.span)
            return int(v)

        count = tasks.count(self.data)
        inner = self.const(kw["inner_lr"].value)
        lr = self.const(kw["lr"].value) if "lr" in kw else None
        for name, v in (("inner_lr", inner), ("lr", lr)):
            if v is not None and not v > 0:
                raise TpcError("a learning rate must be positive", kw[name].value.span)
        return Train(lr if lr is not None else np.nan, whole("steps", 1, 10**9), whole("tasks", 1, count), s.loss,
                     s.span, "fomaml", tasks, inner, whole("inner_steps", 1, 1000))

    def cbow(self, s: ast.TrainDecl) -> Train:
        """`train cbow(lr, window, negatives, sample, epochs, batch, min_lr, seed) minimize logistic on T`:
        word2vec's CBOW with negative sampling over the token stream T, for `model f(x) = V @ (U @ x)`."""
        if s.loss != "logistic":
            raise TpcError("cbow minimizes the logistic loss of word2vec's negative sampling: `minimize logistic`",
                           s.loss_span)
        if self.model is None:
            raise TpcError("define the model before the train statement", s.span)
        if len(s.on) != 1:
            raise TpcError("cbow trains on one token stream: `minimize logistic on T`", s.span)
        return self.cbow_stream(s.on[0][0], s.on[0][1], s.kwargs, s.span)

    def stream(self, s: ast.StreamDecl) -> None:
        """`stream S = cbow(T, ...)`: the batches of word2vec's stream over T, with the settings of
        `train cbow`, for a loop written with the table instructions (`for t in steps(S)`)."""
        if self.train is not None:
            raise TpcError(f"a program has one stream ('{self.train.stream}', line {self.train.span.line})"
                           if self.train.stream else "this program trains with `train ...`, which makes its own "
                           "stream: write its training as a loop instead", s.span)
        if s.kind != "cbow":
            raise TpcError(f"unknown stream '{clip(s.kind)}': tpc has word2vec's cbow(T, ...)", s.kind_span)
        if self.model is None:
            raise TpcError("define the model before its stream", s.span)
        if self.param is None:
            raise TpcError("declare the parametrization before the stream: `parametrization mup` (or sp, ntk, mf, "
                           "abc(...))", s.span)
        self.declare(s.name, s.span)
        self.train = self.cbow_stream(s.tokens, s.tokens_span, s.kwargs, s.span)
        self.train.stream = s.name

    def cbow_stream(self, tokens: str, tsp: Span, kwargs: tuple[ast.Kwarg, ...], span: Span) -> Train:
        """The settings of word2vec's stream over the token data `tokens` (train cbow's and a stream's)."""
        if tokens not in self.data:
            raise self.unknown(tokens, tsp)
        steps = self.model.steps
        shape = [(st.op, st.layer and self.layers[st.layer].role) for st in steps]
        if shape != [("input", None), ("matmul", "embedding"), ("matmul", "readout")]:
            raise TpcError("cbow trains word2vec's linear model f(x) = V @ (U @ x): U an embedding layer (one "
                           "column per word), V a readout (one row per word)", self.model.span)
        emb, out = self.layers[steps[1].layer], self.layers[steps[2].layer]
        if emb.cols != out.rows:
            raise TpcError(f"the embedding has {emb.cols} words but the readout {out.rows}: one vocabulary",
                           out.span)
        t = self.data[tokens]
        if t.ndim != 1 and not (t.ndim == 2 and 1 in t.shape) or t.size < 2 or not np.all(
                (t >= 0) & (t < emb.cols) & (t == np.round(t))):
            raise TpcError(f"'{tokens}' is a stream of word ids 0..{emb.cols - 1} (one column or row)", tsp)
        kw = self.kwargs(kwargs, ("lr", "window", "negatives", "sample", "epochs", "batch", "min_lr", "seed"),
                         "cbow")

        def number(name: str, default: float, low: float, high: float, whole: bool) -> float:
            v = self.const(kw[name].value) if name in kw else default
            if not low <= v <= high or whole and v != int(v):
                what = "a whole number" if whole else "a number"
                raise TpcError(f"{name} is {what} from {low:g} to {high:g}", kw[name].value.span)
            return int(v) if whole else float(v)

        lr = number("lr", np.nan, 1e-12, 1e6, False) if "lr" in kw else np.nan
        cfg = Cbow(tokens, number("window", 5, 1, 100, True), number("negatives", 5, 0, 100, True),
                   number("sample", 1e-3, 0, 1, False), number("epochs", 1, 1, 10**4, True),
                   number("min_lr", np.nan, 0, 1e6, False) if "min_lr" in kw else np.nan,  # default: finish()
                   number("seed", 0, 0, 2**31, True), emb.name, out.name)
        return Train(lr, 0, number("batch", 256, 1, 10**6, True), "logistic", span, "cbow", cbow=cfg)

    def adapted_tasks(self, names: list[tuple[str, Span]], span: Span) -> Tasks:
        """adapted(f, P, S, SY, Q): checked like fomaml's tasks, without query labels."""
        (p, psp), (su, ssp), (sy, sysp), (q, qsp) = names
        tasks = self.tasks(((p, psp), (su, ssp), (sy, sysp), (su, ssp), (sy, sysp)), self.train.loss, span)
        if q not in self.data:
            raise self.unknown(q, qsp)
        r = self.data[q]
        if r.ndim != 2 or r.shape[0] != self.data[su].shape[0] or not np.all(
                (r >= 0) & (r < len(self.data[p])) & (r == np.round(r))):
            raise TpcError(f"'{q}' holds, per task, whole row numbers of the pool", qsp)
        return Tasks(tasks.pool, su, sy, q, "")

    def tasks(self, names: tuple[tuple[str, Span], ...], kind: str, span: Span) -> Tasks:
        for name, sp in names:
            if name not in self.data:
                raise self.unknown(name, sp)
        (p, psp), (su, ssp), (sy, sysp), (q, qsp), (qy, qysp) = names
        pool = self.data[p]
        d = self.input_dim()
        if pool.ndim != 2 or pool.shape[1] != d:
            raise TpcError(f"the pool '{p}' has rows of dimension {d}, one input per row", psp)
        k = self.output_dim()
        for rows, rsp, labels, lsp in ((su, ssp, sy, sysp), (q, qsp, qy, qysp)):
            r, y = self.data[rows], self.data[labels]
            if r.ndim != 2 or not np.all((r >= 0) & (r < len(pool)) & (r == np.round(r))):
                raise TpcError(f"'{rows}' holds, per task, whole row numbers of the pool (0..{len(pool) - 1})", rsp)
            if y.shape[:2] != r.shape:
                raise TpcError(f"'{labels}' has the shape of '{rows}' ({r.shape[0]} x {r.shape[1]})"
                               + (" plus the outputs" if kind == "mse" else ""), lsp)
            if kind == "xent" and not np.all((y >= 0) & (y < k) & (y == np.round(y))):
                raise TpcError(f"xent labels are classes 0..{k - 1}", lsp)
        if self.data[su].shape[0] != self.data[q].shape[0]:
            raise TpcError(f"'{su}' and '{q}' have one row per task: the same number of rows", qsp)
        return Tasks(p, su, sy, q, qy)

    def output(self, s: ast.OutputDecl) -> None:
        if any(o.name == s.name for o in self.outputs):
            raise TpcError(f"output '{s.name}' is defined twice", s.span)
        phase = "trained" if self.train and not self.train.stream else "init"  # a stream is not training yet
        e = s.value
        if self.model is None:
            raise TpcError("define the model before the outputs", s.span)
        position = -1
        if self.loops is not None:
            top = self.loops.prog.top
            position = len(top)
            phase = "trained" if any(self.loops.prog.instrs[i].op == "loop" for i in top) else "init"
            if isinstance(e, ast.Name) and e.id in self.loops.prog.records:
                self.outputs.append(Output(s.name, "record", phase, s.span, loss=e.id, position=position))
                return
            if isinstance(e, ast.Name) and e.id in self.loops.gone:
                raise TpcError(f"'{e.id}' is named inside the loop at line {self.loops.gone[e.id].line} and lives "
                               f"only there: `record` it in the loop and output the record", e.span)
            if isinstance(e, ast.Name) and e.id not in self.losses and e.id not in self.defined:
                raise self.unknown(e.id, e.span)
            stream = self.train is not None and self.train.stream
            if isinstance(e, ast.Call) and e.fn in ("history", "adapted", "embeddings") \
                    and not (stream and e.fn == "embeddings"):
                if e.fn == "embeddings":
                    raise TpcError("embeddings(U) is an output of word2vec programs, after `train cbow(...)` or a "
                                   "loop over a `stream S = cbow(T, ...)`", e.span)
                raise TpcError(f"{e.fn}(...) belongs to `train` statements; in a loop, `record` what you need "
                               "and output it", e.span)
            if isinstance(e, ast.Call) and e.fn == "feature_change" and phase == "init":
                raise TpcError("feature_change(f, X) compares the features after training with those at "
                               "initialisation: put it after a loop", e.span)
        before = len(self.outputs)
        self._output(s, e, phase)
        for o in self.outputs[before:]:
            o.position = position

    def _output(self, s: ast.OutputDecl, e: ast.Expr, phase: str) -> None:
        is_embeddings = isinstance(e, ast.Call) and e.fn == "embeddings"
        if self.train and self.train.optimizer == "cbow" and not is_embeddings:
            raise TpcError("a cbow program outputs embeddings(U): the Gram matrix of the trained word vectors",
                           e.span)
        x = self.f_call(e)
        if x is not None:
            self.outputs.append(Output(s.name, "predict", phase, s.span, data=x))
            return
        if isinstance(e, ast.Name) and e.id in self.losses:
            self.outputs.append(Output(s.name, "loss", phase, s.span, loss=e.id))
            return
        if isinstance(e, ast.Call) and e.fn == "history":
            if len(e.args) != 1 or not isinstance(e.args[0], ast.Name) or self.train is None \
                    or e.args[0].id != self.train.loss:
                raise TpcError("history(L) is the trained loss L at every step, after `train ... minimize L`",
                               e.span)
            self.outputs.append(Output(s.name, "history", phase, s.span, loss=e.args[0].id))
            return
        if isinstance(e, ast.Call) and e.fn == "embeddings":
            if len(e.args) != 1 or not isinstance(e.args[0], ast.Name) or e.args[0].id not in self.layers \
                    or self.layers[e.args[0].id].role not in ("embedding", "readout"):
                raise TpcError("embeddings(U) is the Gram matrix of the words' vectors of an embedding layer U "
                               "(its columns) or of a readout (its rows)", e.span)
            if self.train is None or self.train.optimizer != "cbow":
                raise TpcError("embeddings(U) is an output of word2vec programs, after `train cbow(...)` or a loop "
                               "over a `stream S = cbow(T, ...)`", e.span)
            self.outputs.append(Output(s.name, "embeddings", phase, s.span, layer=e.args[0].id))
            return
        if isinstance(e, ast.Call) and e.fn == "adapted":
            names = [(a.id, a.span) if isinstance(a, ast.Name) else ("", a.span) for a in e.args[1:]]
            if len(e.args) != 5 or not isinstance(e.args[0], ast.Name) or e.args[0].id != self.model.name:
                raise TpcError("adapted(f, P, S, SY, Q): the model, a pool, each task's support rows and labels, "
                               "and its query rows", e.span)
            out = Output(s.name, "adapted", phase, s.span)
            self.adapted.append((out, names, e.span))  # checked once the train statement is known
            self.outputs.append(out)
            return
        if isinstance(e, ast.Call) and e.fn in ("features", "feature_change"):
            ok = len(e.args) == 2 and isinstance(e.args[0], ast.Name) and e.args[0].id == self.model.name
            x = self.f_call(ast.Call(e.span, self.model.name, e.args[1:], e.fn_span)) if ok else None
            if x is None:
                raise TpcError(f"{e.fn}(f, X) takes the model and a data set", e.span)
            if e.fn == "feature_change" and self.train is None and self.loops is None:
                raise TpcError("feature_change(f, X) compares the features after training with those at "
                               "initialisation: put it after the train statement", e.span)
            self.outputs.append(Output(s.name, e.fn, phase, s.span, data=x))
            return
        if isinstance(e, ast.Call) and e.fn in ("nngp", "ntk"):
            ok = len(e.args) == 2 and isinstance(e.args[0], ast.Name) and e.args[0].id == self.model.name
            x = self.f_call(ast.Call(e.span, self.model.name, e.args[1:], e.fn_span)) if ok else None
            if x is None:
                raise TpcError(f"{e.fn}(f, X) takes the model and a data set", e.span)
            if phase != "init":
                raise TpcError(f"{e.fn}(f, X) is the model's kernel at initialisation: write it before the "
                               "training", e.span)
            self.outputs.append(Output(s.name, e.fn, phase, s.span, data=x))
            return
        top = first_mention(e, self.top_lets)
        if top is not None:
            raise self.unknown(top.id, top.span)
        raise TpcError(f"a network program outputs {self.model.name}(X), a loss, history(L), features(f, X), "
                       "feature_change(f, X), nngp(f, X), ntk(f, X), adapted(f, P, S, SY, Q) or embeddings(U)",
                       e.span)

    def finish(self, filename: str, source: str) -> Network:
        if self.width is None:
            raise TpcError("the program declares no width: start it with `width n`")
        if self.model is None:
            raise TpcError("a network program needs a model: `model f(x) = ...`")
        if self.param is None:
            raise TpcError("a network program needs a parametrization: `parametrization mup` (or sp, ntk, mf, "
                           "abc(...))")
        if not self.outputs:
            raise TpcError("the program has no outputs: add `output NAME = ...`")
        for name, let in reversed(self.top_lets.items()):  # the last first: an earlier one may feed it
            if name not in self.top_used:
                raise TpcError(f"'{name}' is not used by the model", let.span)
        used = {s.layer for s in self.model.steps if s.layer}
        for la in self.layers.values():
            if la.name not in used:
                raise TpcError(f"{la.declared} '{la.name}' is not used by the model", la.span)
        for out, names, span in self.adapted:
            if self.train is None or self.train.optimizer != "fomaml":
                raise TpcError("adapted(f, P, S, SY, Q) adapts with fomaml's inner steps: the program needs a "
                               "`train fomaml(...)` statement", span)
            out.tasks = self.adapted_tasks(names, span)
        cbow = self.train is not None and self.train.optimizer == "cbow"
        for la in self.layers.values():
            if la.role == "embedding" and not cbow:
                raise TpcError("an embedding layer is trained by `train cbow(...)` or a loop over a `stream S = "
                               "cbow(T, ...)`; other models take an input layer", la.span)
            if la.var == 0 and la.role == "readout" and not cbow:
                raise TpcError("a readout that starts at zero is supported in cbow programs only", la.span)
        stream = self.train.stream if self.train is not None else ""
        if stream and (self.loops is None or not any(i.op == "stream" for i in self.loops.prog.walk())):
            raise TpcError(f"no loop reads the stream '{stream}': for t in steps({stream}) {{ b = {stream}[t] ... }}",
                           self.train.span)
        if cbow and any(o.phase == "init" for o in self.outputs):
            raise TpcError("a cbow program's outputs come after its training",
                           next(o.span for o in self.outputs if o.phase == "init"))
        abc, lr, attention = self.parametrization(self.param)
        if self.train:
            if np.isnan(self.train.lr) and lr is None:
                raise TpcError("give the learning rate: sgd(lr = 0.1, ...) or parametrization mup(lr = 0.1)",
                               self.train.span)
            if not np.isnan(self.train.lr) and lr is not None:
                raise TpcError("the learning rate is given twice (in the parametrization and in "
                               f"{self.train.optimizer})", self.train.span)
            if np.isnan(self.train.lr):
                self.train.lr = float(lr)
            cfg = self.train.cbow
            if cfg and np.isnan(cfg.min_lr):
                cfg.min_lr = min(1e-4, self.train.lr)  # word2vec's floor, below the rate it decays from
            if cfg and cfg.min_lr > self.train.lr:
                raise TpcError(f"min_lr ({cfg.min_lr:g}) is above lr ({self.train.lr:g}): the rate decays from lr "
                               "to min_lr", self.train.span)
        elif lr is not None and self.param is not None:  # nothing would read it (a sweep of it would change nothing)
            given = next(kw for kw in self.param.kwargs if kw.name == "lr")
            raise TpcError(f"lr = {lr:g} is the rate of a `train` statement, and this program has none: a loop "
                           "writes its own rates (f -= 0.1 * grad(L, f))", given.span)
        program = None
        if self.loops is not None:
            program = self.loops.finish()
            for o in self.outputs:
                if o.position < 0:  # written before the first loop
                    o.position = 0
        elif self.train is not None:
            from tpc.train.desugar import desugar

            program = desugar(self)
        else:  # no training: every output is at initialisation
            program = TrainProgram()
            for o in self.outputs:
                o.position = 0
        return Network(filename, source, self.width, self.param.name, abc, lr, self.layers, self.model,
                       self.data, self.losses, self.train, self.outputs, self.param.span,
                       program, attention)

    def parametrization(self, p: ast.ParamDecl) -> tuple[ABC, float | None, float]:
        """The abc exponents, the learning rate if given, and the power of n that divides attention
        logits: 1 under muP (TP4/TP5: q.k/n, so logits stay O(1) as features learn) and wherever
        the parametrization learns features, 1/2 (q.k/sqrt(n)) otherwise; `attention = ...` sets it."""
        hidden = len({la.group or la.name for la in self.layers.values() if la.role == "hidden" and not la.fixed})
        L = hidden + 1  # noqa: N806 - the paper's name: the input layer is hidden layer 1
        if p.name == "abc":
            kw = self.kwargs(p.kwargs, ("a", "b", "c", "lr", "attention", "adaptive"), "abc")
            for need in ("a", "b", "c"):
                if need not in kw:
                    raise TpcError(f"abc(...) needs {need}", p.span)
            a, b = self.const_list(kw["a"].value), self.const_list(kw["b"].value)
            fixed = " (a fixed matrix takes no entry)" if any(la.fixed and la.role == "hidden"
                                                               for la in self.layers.values()) else ""
            for key, vals in (("a", a), ("b", b)):
                if len(vals) != L + 1:
                    raise TpcError(f"{key} has {len(vals)} entries; this network has {L + 1} layers "
                                   f"(the input layer, {L - 1} hidden, the readout){fixed}", kw[key].value.span)
            c = self.const(kw["c"].value)
            adaptive = self.const_list(kw["adaptive"].value) if "adaptive" in kw else None
            if adaptive is not None and len(adaptive) != L + 1:
                raise TpcError(f"adaptive has {len(adaptive)} entries; this network has {L + 1} layers "
                               f"(the input layer, {L - 1} hidden, the readout)", kw["adaptive"].value.span)
            for key, vals in (("a", a), ("b", b), ("c", (c,)), ("adaptive", adaptive or ())):
                # exponents of the width: beyond this, n^e over- or underflows at any useful width
                if not all(abs(v) <= MAX_EXPONENT for v in vals):
                    raise TpcError(f"{key} holds an exponent of the width beyond +-{MAX_EXPONENT:g}; "
                                   "parametrizations use small ones (TP4's are within [-1, 2])", kw[key].value.span)
            abc = ABC(a, b, c, None if adaptive is None else tuple(adaptive))
        else:
            kw = self.kwargs(p.kwargs, ("lr", "attention"), p.name)
            try:
                abc = preset(p.name, L)
            except TpcError as err:
                raise TpcError(err.message, p.name_span) from None
        lr = self.const(kw["lr"].value) if "lr" in kw else None
        if lr is not None and not lr > 0:
            raise TpcError("the learning rate must be positive", kw["lr"].value.span)
        attention = 1.0 if classify(abc).regime == "feature learning" else 0.5
        if "attention" in kw:
            attention = self.const(kw["attention"].value)
            if attention not in (0.5, 1.0):
                raise TpcError("attention is the power of n that divides the logits q.k: 1 (muP's q.k/n) or 0.5 "
                               "(q.k/sqrt(n))", kw["attention"].value.span)
        return abc, lr, attention


def is_network(module: ast.Module) -> bool:
    return any(isinstance(s, NETWORK_STATEMENTS) for s in module.statements)


def used_before(name: str, where: Span, span: Span) -> TpcError:
    """A name read above the statement that defines it (at `where`)."""
    return TpcError(f"'{clip(name)}' is used before the statement that defines it (line {where.line})", span)


def _top_level_names(stmts: tuple[ast.Stmt, ...]) -> dict[str, Span]:
    """Every name a top-level statement defines, where it first does (a parametrization's is a preset's)."""
    out: dict[str, Span] = {}
    for s in stmts:
        if isinstance(s, ast.ParamDecl):
            continue
        for name in (getattr(s, "name", None), *getattr(s, "names", ())):
            if isinstance(name, str):
                out.setdefault(name, s.span)
    return out


def _declared(stmts: tuple[ast.Stmt, ...]) -> dict[str, Span]:
    """Every state and copy the program declares, in loops too (for the error of a use before it)."""
    out: dict[str, Span] = {}
    todo = list(reversed(stmts))  # a stack, not recursion: loops may nest deeply before they are checked
    while todo:
        s = todo.pop()
        if isinstance(s, (ast.StateDecl, ast.CopyDecl)):
            out.setdefault(s.name, s.span)
        elif isinstance(s, ast.ForLoop):
            todo += reversed(s.body)
    return out


def build_network(module: ast.Module, filename: str, source: str, base_dir: Path,
                  policy: DataPolicy = DEFAULT_POLICY) -> Network:
    b = _Builder(base_dir, policy)
    b.later = _declared(module.statements)
    b.declared_names = _top_level_names(module.statements)
    if any(isinstance(s, (ast.MatrixDecl, ast.VectorDecl)) for s in module.statements):
        b.network_at = next((s.span for s in module.statements if isinstance(s, (ast.LayerDecl, ast.ModelDecl))),
                            None)
    try:
        with ast.stack_room():
            for s in module.statements:
                b.statement(s)
                b.previous = s
            return b.finish(filename, source)
    except TpcError as err:
        raise err.locate(filename, source) from None
