"""The loop instructions (loops.py), each with all of its rules side by side.

A training program written as loops is lowered by `loops.LoopBuilder` into `Instr`s; this module
says, once per op, what the instruction is and how every backend treats it, as
`tpc/ops/functions.py` does for the coordinatewise functions. For an op the registry holds:
- `op`: its name (`Instr.op`);
- `kind`: the kind of value it makes (`Instr.kind`, see loops.py): `finite` (a number or a finite
  array), `data` (rows of a data set), `outputs` (the model on data rows), `params` (a value for
  some layers: parameters, gradients or a combination), `batch` (a step's batch of word2vec's
  stream), `vectors` (rows of a table of word vectors), or `none` (a statement: it changes the
  model, a copy, a state or the records, or runs a body);
- `meaning`: one line, what it does;
- `tag`: the word `tpc graph` prints after its line;
- `inline`: True for the ops `tpc graph` and `--unrolled` write where they are used (numbers,
  counters, data sets and parameter reads), never on a line of their own;
- `run`: its interpreter rule, `(Interpreter, Instr) -> None` (tpc/train/interp.py): it puts the
  value in the environment, or changes the parameters, states or records;
- `text`: its `tpc graph` text, `(TrainProgram, Instr) -> str` (tpc/train/show.py): the right-hand
  side of a value (`mse(%3, Y)`), a whole statement (`f -= 0.1 * %7`), or for an inline op the
  text that stands for it where it is used;
- `listing`: its `tpc graph --unrolled` rule, `(_Lister, Instr) -> None` (tpc/train/unrolled.py):
  the lines of this step's unrolled program and the names later steps refer to (an inline op is
  written where it is used, by `_Lister.ref`: its rule only keeps what it knows, a number's value);
- `emit`: its `tpc emit-torch` rule, `(_Emitter, Instr) -> _Code | None`
  (tpc/backends/torch/emit_loops.py): for a value, its PyTorch expression, which the emitter
  writes where it is used or on a line `v<id> = ...`; for a statement (kind `none`), it appends
  the statement's lines at the emitter's indentation and returns None.

Why lazy: the rules live beside the state they work on (the interpreter, the lister, the
emitter), and those modules import torch, which is most of a fresh `tpc check`'s time. So each
rule is named here by "module:function" and imported on its first call, then kept (the way
functions.py's `_lazy` finds torch's functions): checking or printing a program, or a raw Netsor
program, imports nothing of the backends. It also keeps this module free of import cycles: the
backends import the registry, and the registry imports them only when a rule is first used.
"""

from __future__ import annotations

from dataclasses import dataclass

from tpc.ops.instructions import Rule  # the same lazily imported rule as the Netsor ops'

KINDS = ("finite", "data", "outputs", "params", "batch", "vectors", "none")


@dataclass(frozen=True)
class Instruction:
    op: str
    kind: str
    meaning: str
    tag: str
    run: Rule
    text: Rule
    listing: Rule
    emit: Rule
    inline: bool = False

    def __post_init__(self) -> None:
        assert self.kind in KINDS, self.kind


_INTERP = "tpc.train.interp:"
_SHOW = "tpc.train.show:"
_UNROLLED = "tpc.train.unrolled:"
_EMIT = "tpc.backends.torch.emit_loops:"
_TABLES = "tpc.backends.torch.emit_tables:"


def _ins(op: str, kind: str, *, tag: str = "", inline: bool = False, meaning: str, run: str, text: str,
         listing: str, emit: str) -> Instruction:
    emitter = emit if ":" in emit else _EMIT + emit  # the table instructions' rules: emit_tables.py
    return Instruction(op, kind, meaning, tag, Rule(_INTERP + run), Rule(_SHOW + text), Rule(_UNROLLED + listing),
                       Rule(emitter), inline)


_TABLE = (
    _ins("const", "finite", inline=True,
         meaning="a number: written, a dim, pi, or the rows of a data set",
         run="_run_const", text="_text_const", listing="_list_const", emit="_emit_const"),
    _ins("counter", "finite", inline=True,
         meaning="a loop's counter, 0 .. trip - 1 (its loop sets it)",
         run="_run_counter", text="_text_name", listing="_list_inline", emit="_emit_counter"),
    _ins("data", "data", inline=True,
         meaning="a data set, all its rows",
         run="_run_data", text="_text_name", listing="_list_inline", emit="_emit_data"),
    _ins("rows", "data", tag="Rows",
         meaning="batch(X, t, B): rows tB .. tB + B - 1 (mod its rows) of a data set",
         run="_run_rows", text="_text_rows", listing="_list_rows", emit="_emit_rows"),
    _ins("index", "data", tag="Index",
         meaning="X[i]: the rows of a data set (or of rows) that a static index picks",
         run="_run_index", text="_text_index", listing="_list_index", emit="_emit_index"),
    _ins("fn", "finite", tag="Scalar",
         meaning="a function of finite values: arithmetic, coordinatewise functions, min, max, mod",
         run="_run_fn", text="_text_fn", listing="_list_fn", emit="_emit_fn"),
    _ins("reduce", "finite", tag="Reduce",
         meaning="mean(v) or sum(v): a finite value reduced over its own axes (not the seeds')",
         run="_run_reduce", text="_text_reduce", listing="_list_reduce", emit="_emit_reduce"),
    _ins("apply", "outputs", tag="Apply",
         meaning="f(X): the model, or a copy, on data rows",
         run="_run_apply", text="_text_apply", listing="_list_apply", emit="_emit_apply"),
    _ins("loss", "finite", tag="Loss",
         meaning="mse(f(X), Y), xent(...), logistic(...): a built-in loss of the outputs",
         run="_run_loss", text="_text_loss", listing="_list_loss", emit="_emit_loss"),
    _ins("named_loss", "finite", tag="Loss",
         meaning="a top-level `loss L` at the current weights, on its data or on rows of it",
         run="_run_named_loss", text="_text_named_loss", listing="_list_named_loss", emit="_emit_named_loss"),
    _ins("grad", "params", tag="Grad",
         meaning="grad(L, P): dL/dw for P's layers, through the model applications it names",
         run="_run_grad", text="_text_grad", listing="_list_grad", emit="_emit_grad"),
    _ins("read", "params", inline=True,
         meaning="the current parameters of the model, a layer or a copy, or a state's value",
         run="_run_read", text="_text_name", listing="_list_inline", emit="_emit_read"),
    _ins("zeros", "params", tag="Zeros",
         meaning="zeros(f): a value with no layer yet (a state's start)",
         run="_run_zeros", text="_text_zeros", listing="_list_zeros", emit="_emit_zeros"),
    _ins("lincomb", "params", tag="LinComb",
         meaning="sum_i k_i c_i P_i: numbers times finite coefficients times params values",
         run="_run_lincomb", text="_text_lincomb", listing="_list_lincomb", emit="_emit_lincomb"),
    _ins("ewise", "params", tag="Entrywise",
         meaning="an entrywise function of gradients and states made of them, layer by layer (Adam's "
                 "m / (sqrt(v) + eps), sign-SGD's sign(g)): an adaptive value, scaled by its own exponents c'",
         run="_run_ewise", text="_text_ewise", listing="_list_ewise", emit="_emit_ewise"),
    _ins("state", "none", tag="State",
         meaning="state M = ...: an optimizer buffer, set afresh",
         run="_run_state", text="_text_state", listing="_list_state", emit="_emit_state"),
    _ins("copy", "none", tag="Copy",
         meaning="copy g = f: a model whose layers start at f's current values",
         run="_run_copy", text="_text_copy", listing="_list_copy", emit="_emit_copy"),
    _ins("update", "none", tag="Update",
         meaning="P -= e, P += e, P = e: parameters (scaled by the parametrization) or a state",
         run="_run_update", text="_text_update", listing="_list_update", emit="_emit_update"),
    _ins("record", "none", tag="Record",
         meaning="record name = v: keep a finite value per step",
         run="_run_record", text="_text_record", listing="_list_record", emit="_emit_record"),
    _ins("loop", "none", tag="Loop",
         meaning="for t in range(T) { body }: the body run T times",
         run="_run_loop", text="_text_loop", listing="_list_loop", emit="_emit_loop"),
    # word2vec's step on tables of word vectors (a loop over a stream; the backend is tables.TableBackend)
    _ins("stream", "batch", tag="Stream",
         meaning="S[t]: batch t of word2vec's stream S over its tokens (centre words, contexts of "
                 "reduced windows, negatives, the decaying rate), the same at every width",
         run="_run_stream", text="_text_stream", listing="_list_stream", emit=_TABLES + "_emit_stream"),
    _ins("gather", "vectors", tag="Gather",
         meaning="bag(U, b): each position's sum of its context words' rows; V[b.words]: the rows "
                 "of its centre word and negatives",
         run="_run_gather", text="_text_gather", listing="_list_gather", emit=_TABLES + "_emit_gather"),
    _ins("logits", "finite", tag="Logits",
         meaning="logits(v, h) = v . h / n: each position's logits of its centre word and negatives",
         run="_run_logits", text="_text_logits", listing="_list_logits", emit=_TABLES + "_emit_logits"),
    _ins("ns_loss", "finite", tag="Loss",
         meaning="negative_sampling(z, b): -log s(z_centre) - sum_neg log s(-z_neg), summed over the batch",
         run="_run_ns_loss", text="_text_ns_loss", listing="_list_ns_loss", emit=_TABLES + "_emit_ns_loss"),
    _ins("ns_grad", "finite", tag="Grad",
         meaning="grad(L, z): dL/dz of the negative-sampling loss, s(z) - label, per position and word",
         run="_run_ns_grad", text="_text_ns_grad", listing="_list_ns_grad", emit=_TABLES + "_emit_ns_grad"),
    _ins("scatter_add", "none", tag="Scatter",
         meaning="V[b.words] -= b.lr * outer(g, h), U[b.context] -= b.lr * (g @ v) (times numbers): indexed "
                 "row updates of a table, scaled by the parametrization",
         run="_run_scatter_add", text="_text_scatter_add", listing="_list_scatter_add",
         emit=_TABLES + "_emit_scatter_add"),
)

INSTRUCTIONS: dict[str, Instruction] = {ins.op: ins for ins in _TABLE}
assert len(INSTRUCTIONS) == len(_TABLE), "an op is listed twice"
