"""word2vec as a loop: `train cbow(...)` desugars into a loop over its stream's batches whose body
gathers rows of the tables, takes the logits of the batch's words and updates the tables' rows by
index (tpc/train/desugar.py, the table instructions of tpc/train/instructions.py), run by the one
interpreter on tables of word vectors (tpc/train/tables.py). Pinned against numbers the old cbow
executor printed; `tpc graph` prints the loop; loops written in the language (`stream S = cbow(...)`,
`for t in steps(S)`, `V[b.words] -= b.lr * outer(g, h)`) run, and equal the sugar."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tpc
from tpc import syntax as ast
from tpc.build import load_source
from tpc.cli import main
from tpc.errors import TpcError
from tpc.train import cbow, desugar, stream
from tpc.train.finite import train_finite
from tpc.train.interp import Interpreter
from tpc.train.limit import network_limit
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
    """The sugar's loop, printed as the program would write it."""
    assert main(["graph", str(PROGRAM)]) == 0
    out = capsys.readouterr().out
    for line in ("for <step> in steps(<stream>) (250 batches):", "Loop (carries U, V)",
                 "<b> = <stream>[<step>]", "<h> = bag(U, <b>)", "<v> = V[<b>.words]",
                 "<z> = logits(<v>, <h>)", "<L> = negative_sampling(<z>, <b>)", "<g> = grad(<L>, <z>)",
                 "V[<b>.words] -= <b>.lr * outer(<g>, <h>)", "U[<b>.context] -= <b>.lr * (<g> @ <v>)"):
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
    assert "<b>.step1 = <stream>[1]" in out
    assert "<h>.step1 = bag(U@f1, <b>.step1)" in out
    assert "V@f2 = V@f1, then V@f1[<b>.step1.words] -= <b>.step1.lr * outer(<g>.step1, <h>.step1)" in out


# run in a fresh interpreter: tpc is made unimportable before the emitted file is loaded
WORD2VEC_SCRIPT = """
import sys, importlib.util
sys.modules["tpc"] = None
import numpy as np, torch
spec = importlib.util.spec_from_file_location("emitted", sys.argv[1])
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
tokens = np.load(sys.argv[2])["T"]
out = {}
for seed in (0, 1):
    model, outputs = mod.Tables(width=int(sys.argv[3]), seed=seed), {}
    mod.train(model, torch.as_tensor(tokens), outputs)
    for k, v in outputs.items():
        out.setdefault(k, []).append(v.numpy())
np.savez(sys.argv[4], **{k: np.stack(v) for k, v in out.items()})
"""


@pytest.mark.parametrize("program", ["cbow_mup.tp", "cbow_loop_mup.tp"])
def test_emitted_word2vec_stands_alone_and_trains_like_tpc_run(program: str, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The emitted file (tables, the stream's code, the loop) in a process where tpc can't be imported:
    the same word vectors and losses as `tpc run` at the same seeds."""
    path = PROGRAM.parent / program
    assert main(["emit-torch", str(path)]) == 0
    source = capsys.readouterr().out
    assert "class Tables(torch.nn.Module):" in source and "def train(" in source and "class Stream:" in source
    assert "model.V.index_add_(0" in source
    # each line with the program's text beside it (the sugar's: its train statement)
    assert ("# V[b.words] -= b.lr * outer(g, h)" in source) == (program == "cbow_loop_mup.tp")
    net = load(path.read_text())
    (tmp_path / "emitted.py").write_text(source)
    np.savez(tmp_path / "data.npz", T=net.data["T"])
    subprocess.run([sys.executable, "-c", WORD2VEC_SCRIPT, str(tmp_path / "emitted.py"), str(tmp_path / "data.npz"),
                    "24", str(tmp_path / "out.npz")], check=True, cwd=tmp_path, timeout=300)
    got = dict(np.load(tmp_path / "out.npz"))
    ref = train_finite(net, 24, 2)
    assert set(got) == {o.name for o in net.outputs}
    for k, v in got.items():
        assert np.abs(v - ref[k].values).max() <= 1e-10 * max(1.0, np.abs(ref[k].values).max()), k
    assert np.abs(ref["words"].values[0] - np.eye(12)).max() > 0.05  # trained: not the initial Gram


def test_emitted_word2vec_takes_numbers_revisited_batches_and_a_frozen_table() -> None:
    """A loop with `S[mod(t, 2)]`, a constant rate and only the readout trained, emitted and run here
    (tpc.torch_source), against tpc run."""
    body = READOUT_ONLY.replace("V[b.words] -= b.lr * outer(g, h)", "V[b.words] -= 0.02 * outer(g, h)")
    net = load(written(body, tail="output losses = loss\n"))
    namespace: dict = {}
    exec(compile(tpc.torch_source(net), "<emitted>", "exec"), namespace)  # noqa: S102
    ref = train_finite(net, 16, 1)
    model, outputs = namespace["Tables"](16, 0), {}
    records = namespace["train"](model, torch.as_tensor(net.data["T"]), outputs)
    assert len(records["loss"]) == 4
    for k in ("words", "outs", "losses"):
        assert np.abs(outputs[k].numpy() - ref[k].values[0]).max() < 1e-12, k


HEAD = PROGRAM.read_text().split("train cbow")[0]
STREAM = "stream S = cbow(T, lr = 0.05, window = 2, negatives = 3, sample = 0, epochs = 2, batch = 16)\n"


def written(body: str, loop: str = "for t in range(4)", tail: str = "") -> str:
    """cbow_mup.tp's model with a loop written over its stream instead of `train cbow`."""
    return (HEAD + STREAM + loop + " {\n" + body + "\n}\noutput words = embeddings(U)\noutput outs = embeddings(V)\n"
            + tail)


READOUT_ONLY = """
  b = S[mod(t, 2)]
  h = bag(U, b)
  v = V[b.words]
  z = logits(v, h)
  L = negative_sampling(z, b)
  record loss = L
  g = grad(L, z)
  V[b.words] -= b.lr * outer(g, h)"""


def test_the_written_loop_equals_the_sugar() -> None:
    """programs/word2vec/cbow_loop_mup.tp writes out the loop that `train cbow` desugars to: the same
    numbers, exactly, at finite width and in the limit; its recorded losses are the sugar's."""
    sugar, loop = load(), load((PROGRAM.parent / "cbow_loop_mup.tp").read_text())
    a, b = network_limit(sugar), network_limit(loop)
    for k in ("words", "outs"):
        assert np.array_equal(a[k].value, b[k].value)
    fa, fb = train_finite(sugar, 32, 2), train_finite(loop, 32, 2)
    for k in ("words", "outs"):
        assert np.array_equal(fa[k].values, fb[k].values)
    assert b["curve"].value.shape == (250,) and fb["curve"].values.shape == (2, 250)
    # the first step's loss: every logit is 0 at the start (V starts at zero), so each position's loss is
    # (1 + live negatives) log 2
    batch = next(iter(cbow.stream(loop)))
    words = np.concatenate([batch.center[:, None], batch.neg], axis=1)
    live = len(batch.center) + (words[:, 1:] != words[:, :1]).sum()
    assert abs(b["curve"].value[0] - live * np.log(2)) < 1e-12
    assert np.abs(fb["curve"].values[:, 0] - live * np.log(2)).max() < 1e-12


def test_a_loop_written_with_the_table_instructions_runs() -> None:
    """Only the readout learns, over the stream's batches 0, 1, 0, 1: its exact limit against a Gram
    recursion written here (U stays put, V -> V + Q U)."""
    net = load(written(READOUT_ONLY, tail="output losses = loss\n"))
    out = network_limit(net)
    k = 12
    guu, gvv, guv = np.eye(k), np.zeros((k, k)), np.zeros((k, k))
    first = list(cbow.stream(net))[:2]
    losses = []
    for b in (*first, *first):
        counts = np.zeros((len(b.center), k))
        np.add.at(counts, (b.pos, b.ctx), 1.0)
        words = np.concatenate([b.center[:, None], b.neg], axis=1)
        z = np.einsum("bc,bkc->bk", counts, guv.T[words])
        live = np.ones_like(z)
        live[:, 1:] = words[:, 1:] != words[:, :1]
        label = np.arange(z.shape[1]) == 0
        losses.append((np.logaddexp(0, np.where(label, -z, z)) * live).sum())
        g = (1 / (1 + np.exp(-z)) - label) * live
        q = np.zeros((k, k))
        for r in range(len(b.center)):
            for j, w in enumerate(words[r]):
                q[w] -= b.lr * g[r, j] * counts[r]
        gvv, guv = gvv + q @ guv + guv.T @ q.T + q @ guu @ q.T, guv + guu @ q.T
    assert np.array_equal(out["words"].value, np.eye(12))  # U was never updated
    assert np.abs(out["outs"].value - gvv).max() < 1e-12 and np.abs(gvv).max() > 0.05
    assert np.abs(out["losses"].value - losses).max() < 1e-12
    assert train_finite(net, 16, 1)["outs"].values.shape == (1, 12, 12)


def test_a_row_update_takes_numbers_and_its_own_rate() -> None:
    """`V[b.words] -= 0.025 * outer(g, h)` is word2vec with a constant rate: 0.5 * b.lr * ... with
    lr = min_lr = 0.05 gives the same step; `+= -c * ...` is `-= c * ...`."""
    constant = STREAM.replace("lr = 0.05", "lr = 0.05, min_lr = 0.05")

    def limit(step: str) -> dict:
        body = READOUT_ONLY.replace("V[b.words] -= b.lr * outer(g, h)", step)
        return network_limit(load(written(body).replace(STREAM, constant)))

    base = limit("V[b.words] -= b.lr * outer(g, h)")["outs"].value
    assert np.abs(base).max() > 0.05
    for step in ("V[b.words] -= 0.05 * outer(g, h)", "V[b.words] += -2 * b.lr * outer(g, h) / 2",
                 "V[b.words] -= outer(g, h) * b.lr"):
        assert np.abs(limit(step)["outs"].value - base).max() < 1e-14, step
    half = limit("V[b.words] -= 0.5 * b.lr * outer(g, h)")["outs"].value
    assert np.abs(half - base).max() > 1e-3  # a different step size, a different result


@pytest.mark.parametrize("param", ["mup", "ntk"])
def test_an_index_past_the_stream_is_refused(param: str) -> None:
    """In the kernel regime too, where the limit (the initial Gram matrices) needs no training: the loop
    is run on tables of one coordinate to read the batches it names (before, NTK gave a number)."""
    src = written(READOUT_ONLY.replace("S[mod(t, 2)]", "S[t + 249]").replace("  record loss = L\n", ""))
    net = load(src.replace("parametrization mup", f"parametrization {param}"))
    assert net.classification().regime == ("kernel" if param == "ntk" else "feature learning")
    with pytest.raises(TpcError, match="the stream has 250 batches: step 250 is past its end"):
        network_limit(net)
    fine = load(src.replace("S[t + 249]", "S[t + 246]").replace("parametrization mup", f"parametrization {param}"))
    assert set(network_limit(fine)) == {"words", "outs"}


def test_the_kernel_regime_runs_no_loop_that_reads_its_own_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """`S[t]` of `for t in steps(S)` (train cbow's loop) is within the stream by construction: the kernel
    regime's check does not run it (on a text8-sized corpus it would cost minutes; from a review)."""
    from tpc.train import tables

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the loop ran")

    monkeypatch.setattr(tables, "train_tables", refuse)
    net = load(PROGRAM.read_text().replace("parametrization mup", "parametrization ntk"))
    assert set(network_limit(net)) == {o.name for o in net.outputs}
    bad = load(written(READOUT_ONLY.replace("S[mod(t, 2)]", "S[t + 1]").replace("  record loss = L\n", ""))
               .replace("parametrization mup", "parametrization ntk"))
    with pytest.raises(AssertionError, match="the loop ran"):
        network_limit(bad)


def test_no_executor_is_specific_to_cbow() -> None:
    """finite.py and limit.py choose the tables by the program's layers, not by the optimizer's name,
    and cbow.py runs no step of its own."""
    for module in ("finite", "limit"):
        assert 'optimizer == "cbow"' not in (ROOT / "tpc" / "train" / f"{module}.py").read_text()
    for gone in ("step", "cbow_finite", "cbow_limit"):
        assert not hasattr(cbow, gone)


def test_the_stream_reads_batches_in_any_order() -> None:
    """S[t] in any order is batch t of the stream read through (the generator's state is saved every
    CHECKPOINT batches, so reading backwards restarts from the nearest one, not from batch 0)."""
    s = cbow.stream(load())
    batches = list(s)
    order = np.random.default_rng(0).permutation(s.steps).tolist() + list(range(s.steps - 1, -1, -1))
    for t in order:
        got, want = s.at(t), batches[t]
        assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True)), t
    assert len(s._points) == -(-s.steps // stream.CHECKPOINT)
    with pytest.raises(IndexError, match="step -1 is before its first batch"):
        s.at(-1)
