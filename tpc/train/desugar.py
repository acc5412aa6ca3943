"""`train sgd(...)`, `train adam(...)` (adamw, signsgd), `train fomaml(...)` and
`train cbow(...)` as loops: the statements a user would write, built as syntax trees (with the
train statement's position) and checked and lowered by `loops.py` like any other loop. `tpc graph`
prints the result. Names the user cannot write (`<step>`, `<g>`) keep them apart from the
program's own.

    train sgd(lr, steps, batch) minimize L    ->  for <step> in range(steps) {
                                                    record <history of L> = L        (history(L) wanted)
                                                    f -= lr * grad(L on rows <step> B .., f)
                                                  }
    train adam(lr, steps, batch, beta1, beta2, eps, weight_decay) minimize L   (adamw: weight_decay 0.01)
                                              ->  state <m> = zeros(f)
                                                  state <v> = zeros(f)
                                                  for <step> in range(steps) {
                                                    <g> = grad(L on rows <step> B .., f)
                                                    <m> = beta1 * <m> + (1 - beta1) * <g>
                                                    <v> = beta2 * <v> + (1 - beta2) * <g> * <g>
                                                    f -= lr * ((<m> / (1 - beta1 ^ (<step> + 1)))
                                                               / (sqrt(<v> / (1 - beta2 ^ (<step> + 1))) + eps)
                                                               + weight_decay * f)
                                                  }
    train signsgd(lr, steps, batch) minimize L  ->  for <step> in range(steps) { f -= lr * sign(grad(L.., f)) }
    train fomaml(lr, inner_lr, inner_steps, tasks = B, steps) minimize kind on P, S, SY, Q, QY
                                              ->  for <step> in range(steps) {
                                                    state <G> = zeros(f)
                                                    for <task> in range(B) {
                                                      <i> = mod(<step> * B + <task>, rows(S))
                                                      copy <g> = f
                                                      for <inner> in range(inner_steps) {
                                                        <g> -= inner_lr * grad(kind(<g>(P[S[<i>]]), SY[<i>]), <g>)
                                                      }
                                                      <G> += grad(kind(<g>(P[Q[<i>]]), QY[<i>]), <g>)
                                                    }
                                                    f -= lr / B * <G>
                                                  }
    output a = adapted(f, P, S, SY, Q)        ->  the inner loop on each task's support, recording
                                                  <g>(P[Q[<i>]]) per task
    train cbow(lr, window, ...) minimize logistic on T, for f(x) = V @ (U @ x)
                                              ->  stream <stream> = cbow(T, lr, window, ...)
                                                  for <step> in steps(<stream>) {
                                                    <b> = <stream>[<step>]      (word2vec's batch <step>)
                                                    <h> = bag(U, <b>)           (each position's context sum)
                                                    <v> = V[<b>.words]          (its centre word's and negatives' rows)
                                                    <z> = logits(<v>, <h>)      (v . h / n)
                                                    <L> = negative_sampling(<z>, <b>)
                                                    <g> = grad(<L>, <z>)
                                                    V[<b>.words] -= <b>.lr * outer(<g>, <h>)
                                                    U[<b>.context] -= <b>.lr * (<g> @ <v>)
                                                  }
The last two are indexed row updates of the tables (op `scatter_add`), which the parametrization
scales like any update (TP4: n^(e_l - 2 a_l - c)); the stream (cbow.Stream) is seeded by the
statement, so every width and the limit see the same batches. The loop records no per-step loss:
a long run's thousands of small records fragmented the heap (resident memory grew by 0.2 MB a
step at width 256); `<L>` is computed for its check that training has not diverged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tpc import syntax as ast
from tpc.errors import Span
from tpc.train.loops import TRAIN_STREAM, LoopBuilder, TrainProgram

if TYPE_CHECKING:
    from tpc.train.network import Output, Tasks, _Builder

BATCH_LOSS = "<loss on rows>"  # L on rows tB .. tB+B-1 of its data (see loops.py)


def history_name(loss: str) -> str:
    return f"<history of {loss}>"


class _Sugar:
    def __init__(self, b: _Builder, span: Span) -> None:
        self.b, self.span = b, span
        self.model = b.model.name

    def name(self, s: str) -> ast.Name:
        return ast.Name(self.span, s)

    def num(self, v: float) -> ast.Num:
        return ast.Num(self.span, float(v))

    def call(self, fn: str, *args: ast.Expr) -> ast.Call:
        return ast.Call(self.span, fn, tuple(args), self.span)

    def op(self, op: str, left: ast.Expr, right: ast.Expr) -> ast.BinOp:
        return ast.BinOp(self.span, op, left, right)

    def loop(self, counter: str, trip: ast.Expr, body: list[ast.Stmt]) -> ast.ForLoop:
        return ast.ForLoop(self.span, counter, self.span, trip, tuple(body))

    def update(self, target: str, op: str, value: ast.Expr) -> ast.Update:
        return ast.Update(self.span, target, self.span, op, value)

    def rows(self, data: str, i: str) -> ast.Index:
        return ast.Index(self.span, self.name(data), self.name(i))

    def adapt(self, tasks: Tasks, i: str, kind: str, inner_lr: float, inner_steps: int) -> list[ast.Stmt]:
        """copy <g> = f, then inner_steps SGD steps of <g> on task i's support."""
        g = "<g>"
        support = self.call(g, ast.Index(self.span, self.name(tasks.pool), self.rows(tasks.support, i)))
        loss = self.call(kind, support, self.rows(tasks.support_y, i))
        step = self.update(g, "-=", self.op("*", self.num(inner_lr), self.call("grad", loss, self.name(g))))
        return [ast.CopyDecl(self.span, g, self.model, self.span), self.loop("<inner>", self.num(inner_steps), [step])]

    def query(self, tasks: Tasks, i: str) -> ast.Call:
        return self.call("<g>", ast.Index(self.span, self.name(tasks.pool), self.rows(tasks.query, i)))


def sgd(b: _Builder, history: bool) -> list[ast.Stmt]:
    t = b.train
    s = _Sugar(b, t.span)
    m = b.data[b.losses[t.loss].data].shape[0]
    body: list[ast.Stmt] = []
    if history:
        body.append(ast.RecordStmt(t.span, history_name(t.loss), s.name(t.loss)))
    loss = s.name(t.loss) if t.batch == m else s.call(BATCH_LOSS, s.name(t.loss), s.name("<step>"), s.num(t.batch))
    body.append(s.update(s.model, "-=", s.op("*", s.num(t.lr), s.call("grad", loss, s.name(s.model)))))
    return [s.loop("<step>", s.num(t.steps), body)]


def adam(b: _Builder, history: bool) -> list[ast.Stmt]:
    """Adam with bias correction (Kingma & Ba 2015), AdamW's decoupled decay (Loshchilov & Hutter
    2019), sign-SGD: the loop a user would write (README, "Adaptive optimizers")."""
    t = b.train
    s = _Sugar(b, t.span)
    m = b.data[b.losses[t.loss].data].shape[0]
    f = s.name(s.model)
    body: list[ast.Stmt] = []
    if history:
        body.append(ast.RecordStmt(t.span, history_name(t.loss), s.name(t.loss)))
    loss = s.name(t.loss) if t.batch == m else s.call(BATCH_LOSS, s.name(t.loss), s.name("<step>"), s.num(t.batch))
    g = s.call("grad", loss, f)
    if t.optimizer == "signsgd":
        body.append(s.update(s.model, "-=", s.op("*", s.num(t.lr), s.call("sign", g))))
        return [s.loop("<step>", s.num(t.steps), body)]
    (b1, b2), step = t.betas, s.op("+", s.name("<step>"), s.num(1))

    def average(state: str, rate: float, value: ast.Expr) -> ast.Update:  # state = rate state + (1 - rate) value
        return s.update(state, "=", s.op("+", s.op("*", s.num(rate), s.name(state)), s.op("*", s.num(1 - rate), value)))

    def corrected(state: str, rate: float) -> ast.Expr:  # state / (1 - rate^(t+1))
        return s.op("/", s.name(state), s.op("-", s.num(1), s.op("^", s.num(rate), step)))

    body += [ast.Assign(t.span, "<g>", g),
             average("<m>", b1, s.name("<g>")),
             average("<v>", b2, s.op("*", s.name("<g>"), s.name("<g>")))]
    direction: ast.Expr = s.op("/", corrected("<m>", b1),
                               s.op("+", s.call("sqrt", corrected("<v>", b2)), s.num(t.eps)))
    if t.weight_decay:
        direction = s.op("+", direction, s.op("*", s.num(t.weight_decay), f))
    body.append(s.update(s.model, "-=", s.op("*", s.num(t.lr), direction)))
    states = [ast.StateDecl(t.span, name, s.call("zeros", f)) for name in ("<m>", "<v>")]
    return [*states, s.loop("<step>", s.num(t.steps), body)]


def fomaml(b: _Builder) -> list[ast.Stmt]:
    t = b.train
    s = _Sugar(b, t.span)
    tasks = t.tasks
    count = tasks.count(b.data)
    i = s.call("mod", s.op("+", s.op("*", s.name("<step>"), s.num(t.batch)), s.name("<task>")), s.num(count))
    query_loss = s.call(t.loss, s.query(tasks, "<i>"), s.rows(tasks.query_y, "<i>"))
    task_body = [ast.Assign(t.span, "<i>", i), *s.adapt(tasks, "<i>", t.loss, t.inner_lr, t.inner_steps),
                 s.update("<G>", "+=", s.call("grad", query_loss, s.name("<g>")))]
    body = [ast.StateDecl(t.span, "<G>", s.call("zeros", s.name(s.model))),
            s.loop("<task>", s.num(t.batch), task_body),
            s.update(s.model, "-=", s.op("*", s.num(t.lr / t.batch), s.name("<G>")))]
    return [s.loop("<step>", s.num(t.steps), body)]


def cbow(b: _Builder) -> list[ast.Stmt]:
    """word2vec's loop over the stream of `train cbow(...)`, as a program would write it:

        for <step> in steps(<stream>) {
          <b> = <stream>[<step>]
          <h> = bag(U, <b>)
          <v> = V[<b>.words]
          <z> = logits(<v>, <h>)
          <L> = negative_sampling(<z>, <b>)
          <g> = grad(<L>, <z>)
          V[<b>.words] -= <b>.lr * outer(<g>, <h>)
          U[<b>.context] -= <b>.lr * (<g> @ <v>)   # with the rows before this step, as word2vec does
        }
    """
    t = b.train
    s = _Sugar(b, t.span)
    cfg = t.cbow
    n = s.name

    def let(name: str, value: ast.Expr) -> ast.Assign:
        return ast.Assign(t.span, name, value)

    def rows(table: str, which: str) -> ast.Index:
        return ast.Index(t.span, n(table), ast.Attr(t.span, n("<b>"), which))

    rate = ast.Attr(t.span, n("<b>"), "lr")
    body = [let("<b>", ast.Index(t.span, n(TRAIN_STREAM), n("<step>"))),
            let("<h>", s.call("bag", n(cfg.embedding), n("<b>"))),
            let("<v>", rows(cfg.output, "words")),
            let("<z>", s.call("logits", n("<v>"), n("<h>"))),
            let("<L>", s.call("negative_sampling", n("<z>"), n("<b>"))),
            let("<g>", s.call("grad", n("<L>"), n("<z>"))),
            ast.Update(t.span, cfg.output, t.span, "-=", s.op("*", rate, s.call("outer", n("<g>"), n("<h>"))),
                       rows(cfg.output, "words").index),
            ast.Update(t.span, cfg.embedding, t.span, "-=", s.op("*", rate, s.op("@", n("<g>"), n("<v>"))),
                       rows(cfg.embedding, "context").index)]
    return [s.loop("<step>", s.call("<steps>", n(TRAIN_STREAM)), body)]


def adapted(b: _Builder, o: Output) -> list[ast.Stmt]:
    t = b.train
    s = _Sugar(b, o.span)
    tasks = o.tasks
    body = [*s.adapt(tasks, "<i>", t.loss, t.inner_lr, t.inner_steps),
            ast.RecordStmt(o.span, f"<adapted {o.name}>", s.query(tasks, "<i>"))]
    return [s.loop("<i>", s.num(tasks.count(b.data)), body)]


def desugar(b: _Builder) -> TrainProgram:
    """The program's `train` statement and its `history`/`adapted` outputs as loops; each output
    keeps its place before or after training."""
    lb = LoopBuilder(b, refuse_growth=False)
    lb.model_mutable()
    want = any(o.kind == "history" for o in b.outputs)

    def place(o: Output) -> None:
        if o.kind == "adapted":
            for stmt in adapted(b, o):
                lb.statement(stmt)
            o.kind, o.loss = "record", f"<adapted {o.name}>"
        elif o.kind == "history":
            o.kind, o.loss = "record", history_name(o.loss)
        o.position = len(lb.prog.top)

    for o in b.outputs:
        if o.phase == "init":
            place(o)
    adaptive = lambda: adam(b, want)  # noqa: E731
    sugar = {"fomaml": lambda: fomaml(b), "cbow": lambda: cbow(b), "adam": adaptive, "adamw": adaptive,
             "signsgd": adaptive}.get(b.train.optimizer, lambda: sgd(b, want))
    for stmt in sugar():
        lb.statement(stmt)
    for o in b.outputs:
        if o.phase != "init":
            place(o)
    return lb.finish()
