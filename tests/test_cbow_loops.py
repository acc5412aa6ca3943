"""word2vec as a loop: `train cbow(...)` desugars into a loop over its stream's batches whose body
gathers rows of the tables, takes the logits of the batch's words and updates the tables' rows by
index (tpc/train/desugar.py, the table instructions of tpc/train/instructions.py), run by the one
interpreter on tables of word vectors (tpc/train/tables.py). Pinned against numbers the old cbow
executor printed; `tpc graph` prints the loop; a loop written with the instructions runs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from tpc import syntax as ast
from tpc.build import load_source
from tpc.cli import main
from tpc.errors import TpcError
from tpc.train import cbow, desugar
from tpc.train.finite import train_finite
from tpc.train.interp import Interpreter
from tpc.train.limit import network_limit
from tpc.train.loops import RowUpdate
from tpc.train.tables import TableBackend

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = ROOT / "programs" / "word2vec" / "cbow_mup.tp"


def load(src: str | None = None) -> object:
    return load_source(src or PROGRAM.read_text(), str(PROGRAM), PROGRAM.parent)


def test_the_desugared_loop_gives_the_old_executors_numbers() -> None:
    """cbow_finite / cbow_limit (the executor this loop replaced) printed these for cbow_mup.tp."""
    net = load()
    limit = network_limit(net)
    words, outs = limit["words"].value, limit["outs"].value
    assert limit["words"].method == "exact"
    np.testing.assert_allclose([words.sum(), np.trace(words), words[5, 7]],
                               [48.255024554928525, 22.187145308842126, -0.047974339769225306], rtol=0, atol=1e-12)
    np.testing.assert_allclose(words[0, :4], [1.7158966171160273, 0.42131539284502073, 0.42331387903005496,
                                              0.5583716350751886], rtol=0, atol=1e-12)
    np.testing.assert_allclose([outs.sum(), np.trace(outs), outs[5, 7]],
                               [123.3740930055589, 25.2194130655134, 0.31450008901127274], rtol=0, atol=1e-12)
    np.testing.assert_allclose(outs[0, :4], [2.04970526484306, 1.2248566953154565, 1.2488680629655657,
                                             1.5165187269160956], rtol=0, atol=1e-12)
    finite = train_finite(net, 64, 2)
    g = finite["words"].values
    np.testing.assert_allclose([g.sum(), np.trace(g[1])], [96.82185088482447, 22.23737759834102], rtol=0, atol=1e-11)
    np.testing.assert_allclose(g[0, 0, :3], [1.7330105263241056, 0.48437392439673005, 0.48856188568240727],
                               rtol=0, atol=1e-12)
    g = finite["outs"].values
    np.testing.assert_allclose([g.sum(), np.trace(g[1])], [245.70429799781996, 25.002628212188714], rtol=0, atol=1e-11)
    np.testing.assert_allclose(g[0, 0, :3], [2.0477788014342044, 1.2204306796192481, 1.242211088148324],
                               rtol=0, atol=1e-12)


def test_the_loss_is_the_one_word2vec_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sugar's loop with `record <loss> = <L>` after the loss: each step's loss before the step
    (summed over its positions), per epoch and position, is the old executor's report."""
    sugar = desugar.cbow

    def recording(b: object) -> list[ast.Stmt]:
        loop = sugar(b)[0]
        at = next(i for i, st in enumerate(loop.body) if isinstance(st, ast.Assign) and st.name == "<L>") + 1
        body = (*loop.body[:at], ast.RecordStmt(loop.span, "<loss>", ast.Name(loop.span, "<L>")), *loop.body[at:])
        return [ast.ForLoop(loop.span, loop.counter, loop.counter_span, loop.trip, body)]

    monkeypatch.setattr(desugar, "cbow", recording)
    net = load()
    u, v = cbow.limit_tables(net)
    it = Interpreter(net, TableBackend(net, u[None], v[None], cbow.Factors.limit(net), None))
    it.run()
    losses = it.records["<loss>"].numpy()
    batches = list(cbow.stream(net))
    assert losses.shape == (len(batches),)
    epochs = np.array([b.epoch for b in batches])
    sizes = np.array([len(b.center) for b in batches])
    means = [losses[epochs == e].sum() / sizes[epochs == e].sum() for e in range(2)]
    np.testing.assert_allclose(means, [1.9205816390825317, 1.7699117689380865], rtol=0, atol=1e-12)


def test_the_stream_is_read_when_the_loop_runs() -> None:
    """The trip count and the batches follow the token data the program has when it runs (a test may
    cut it after loading, as test_word2vec does), and the settings of its train statement."""
    net = load()
    net.data["T"] = net.data["T"][:, :64]
    steps: list[int] = []
    network_limit(net, progress=lambda done, total: steps.append(total))
    assert steps[-1] == len(steps) == cbow.stream(net).steps == 8  # 2 epochs of 64 tokens, batches of 16


def test_graph_prints_the_loop(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["graph", str(PROGRAM)]) == 0
    out = capsys.readouterr().out
    for line in ("for <step> in range(250) over stream(T):", "Loop (carries U, V)",
                 "<b> = stream(T, <step>)", "<h> = bag(U, <b>.context)", "<v> = V[<b>.words]",
                 "<z> = <v> . <h> / n", "<L> = negative_sampling(<z>, <b>)", "<g> = d<L>/d<z>",
                 "V[<b>.words] -= <b>.lr * outer(<g>, <h>)", "U[<b>.context] -= <b>.lr * (<g> . <v>)"):
        assert line in out, line
    assert main(["graph", "--format", "json", str(PROGRAM)]) == 0
    out = capsys.readouterr().out
    assert all(f'"op": "{op}"' in out for op in ("stream", "gather", "logits", "ns_loss", "ns_grad", "scatter_add"))


def test_graph_unrolled_lists_a_short_run(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    src = PROGRAM.read_text().replace('load("data/tokens2000.csv")', "[0, 1, 2, 1, 0, 2, 2, 1]").replace(
        "epochs = 2", "epochs = 1").replace("batch = 16", "batch = 4")
    (tmp_path / "short.tp").write_text(src)
    assert main(["graph", "--unrolled", str(tmp_path / "short.tp")]) == 0
    out = capsys.readouterr().out
    assert out.count("\n# step = ") == 2
    assert "<h>.step1 = bag(U@f1, <b>.step1.context)" in out
    assert "V@f2 = V@f1, rows <b>.step1.words -= <b>.step1.lr * outer(<g>.step1, <h>.step1)" in out


def test_emit_torch_refuses_the_table_instructions(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["emit-torch", str(PROGRAM)]) == 2
    assert "table instructions" in capsys.readouterr().err
    from tpc.backends.torch.emit_loops import loop_lines
    from tpc.backends.torch.emit_network import program_names

    net = dataclasses.replace(load(), train=None)  # its loop, as a program written with loops would have it
    with pytest.raises(TpcError, match="no PyTorch code for word2vec's table instruction 'stream'"):
        loop_lines(net, program_names(net))


def readout_only(b: object) -> list[ast.Stmt]:
    """A loop written with the table instructions (the language has no syntax for them: this replaces
    the sugar): only the readout learns, over the stream's batches 0, 1, 0, 1."""
    span = b.train.span

    def name(s: str) -> ast.Name:
        return ast.Name(span, s)

    def let(target: str, fn: str, *args: ast.Expr | str) -> ast.Assign:
        exprs = tuple(name(a) if isinstance(a, str) else a for a in args)
        return ast.Assign(span, target, ast.Call(span, fn, exprs, span))

    body = (let("<i>", "mod", "<step>", ast.Num(span, 2.0)),
            let("<b>", "<stream>", "T", "<i>"), let("<h>", "<bag>", "U", "<b>"), let("<v>", "<rows>", "V", "<b>"),
            let("<z>", "<logits>", "<v>", "<h>"), let("<L>", "<negative sampling>", "<z>", "<b>"),
            ast.RecordStmt(span, "<loss>", name("<L>")), let("<g>", "<dlogits>", "<L>", "<z>", "<b>"),
            RowUpdate(span, "V", "words", "<b>", "<g>", "<h>"))
    return [ast.ForLoop(span, "<step>", span, ast.Num(span, 4.0), body)]


def test_a_loop_written_with_the_table_instructions_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its exact limit against a Gram recursion written here: U stays put, V -> V + Q U."""
    monkeypatch.setattr(desugar, "cbow", readout_only)
    net = load()
    out = network_limit(net)
    k = 12
    guu, gvv, guv = np.eye(k), np.zeros((k, k)), np.zeros((k, k))
    first = list(cbow.stream(net))[:2]
    for b in (*first, *first):
        counts = np.zeros((len(b.center), k))
        np.add.at(counts, (b.pos, b.ctx), 1.0)
        words = np.concatenate([b.center[:, None], b.neg], axis=1)
        z = np.einsum("bc,bkc->bk", counts, guv.T[words])
        live = np.ones_like(z)
        live[:, 1:] = words[:, 1:] != words[:, :1]
        g = (1 / (1 + np.exp(-z)) - (np.arange(z.shape[1]) == 0)) * live
        q = np.zeros((k, k))
        for r in range(len(b.center)):
            for j, w in enumerate(words[r]):
                q[w] -= b.lr * g[r, j] * counts[r]
        gvv, guv = gvv + q @ guv + guv.T @ q.T + q @ guu @ q.T, guv + guu @ q.T
    assert np.array_equal(out["words"].value, np.eye(12))  # U was never updated
    assert np.abs(out["outs"].value - gvv).max() < 1e-12 and np.abs(gvv).max() > 0.05
    assert train_finite(net, 16, 1)["outs"].values.shape == (1, 12, 12)


def test_a_row_update_takes_the_rows_it_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The readout's words move along outer(g, h), the embedding's context along g . v: the other
    pairing is refused where the loop is built."""
    def swapped(b: object) -> list[ast.Stmt]:
        loop = readout_only(b)[0]
        span = loop.span
        body = (*loop.body[:-1], RowUpdate(span, "V", "words", "<b>", "<g>", "<v>"))
        return [ast.ForLoop(span, "<step>", span, loop.trip, body)]

    monkeypatch.setattr(desugar, "cbow", swapped)
    with pytest.raises(TpcError, match="the rows of the batch's words of the readout"):
        load()


def test_an_index_past_the_stream_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def long(b: object) -> list[ast.Stmt]:
        loop = readout_only(b)[0]
        span = loop.span
        body = (ast.Assign(span, "<i>", ast.BinOp(span, "+", ast.Name(span, "<step>"), ast.Num(span, 249.0))),
                *loop.body[1:])
        return [ast.ForLoop(span, "<step>", span, loop.trip, body)]

    monkeypatch.setattr(desugar, "cbow", long)
    with pytest.raises(TpcError, match="the stream has 250 batches: step 250 is past its end"):
        network_limit(load())


def test_no_executor_is_specific_to_cbow() -> None:
    """finite.py and limit.py choose the tables by the program's layers, not by the optimizer's name,
    and cbow.py runs no step of its own."""
    for module in ("finite", "limit"):
        assert 'optimizer == "cbow"' not in (ROOT / "tpc" / "train" / f"{module}.py").read_text()
    for gone in ("step", "cbow_finite", "cbow_limit"):
        assert not hasattr(cbow, gone)
