"""word2vec (CBOW with negative sampling): one finite step against torch autograd on the
parametrized loss, the exact limit against an independent Gram-matrix recursion, finite widths
converging to it, the kernel regime's static word vectors, and the data stream's rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tpc.build import load_source
from tpc.errors import TpcError
from tpc.train import cbow
from tpc.train.finite import train_finite
from tpc.train.limit import network_limit
from tpc.train.tables import train_tables

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = ROOT / "programs" / "word2vec" / "cbow_mup.tp"


def program(param: str = "mup", readout_var: str = "0", train: str = "lr = 0.05, window = 2, negatives = 3, "
            "sample = 0, epochs = 1, batch = 16") -> object:
    src = PROGRAM.read_text()
    src = src.replace("parametrization mup", f"parametrization {param}")
    src = src.replace("readout 12 x n, var = 0", f"readout 12 x n, var = {readout_var}")
    src = src.replace("lr = 0.05, window = 2, negatives = 3, sample = 0, epochs = 2, batch = 16", train)
    return load_source(src, str(PROGRAM), PROGRAM.parent)


@pytest.mark.parametrize("param", ["mup", "ntk", "sp", "abc(a = [-0.3, 0.4], b = [0.3, 0.2], c = 0.1, lr = 0.05)",
                                   "abc(a = [0, 0.5], b = [0.5, 0.5], c = 0, lr = 0.05)"])
def test_one_step_matches_autograd_on_the_parametrized_loss(param: str) -> None:
    """W^l = n^-a_l w^l, SGD on w^l at lr n^-c: the tables after one step equal torch autograd's."""
    train = "window = 2, negatives = 3, sample = 0.01, batch = 16" + ("" if "lr" in param else ", lr = 0.05")
    net = program(param, readout_var="0.5", train=train)
    n = 64
    u, v = cbow.finite_tables(net, n, seed=3)
    batch = next(iter(cbow.stream(net)))
    a1, _ = net.ab(net.layers["U"])
    a2, _ = net.ab(net.layers["V"])
    c = net.abc.c
    # the trained parameters: U's columns are u_w, V's rows are v_w / n (the tables hold them over sqrt(n))
    w_u = (u.T * np.sqrt(n) * n**a1).clone().requires_grad_(True)
    w_v = (v * np.sqrt(n) / n * n**a2).clone().requires_grad_(True)
    counts = torch.zeros(len(batch.center), 12, dtype=torch.float64)
    counts.index_put_((torch.as_tensor(batch.pos), torch.as_tensor(batch.ctx)), torch.tensor(1.0, dtype=torch.float64),
                      accumulate=True)
    logits = (n**-a2 * w_v) @ (n**-a1 * w_u) @ counts.T  # (words, B)
    words = np.concatenate([batch.center[:, None], batch.neg], axis=1)
    z = logits[torch.as_tensor(words), torch.arange(len(words))[:, None]]
    sign = torch.ones_like(z)
    sign[:, 0] = -1
    live = torch.ones_like(z)
    live[:, 1:] = torch.as_tensor(words[:, 1:] != words[:, :1])
    loss = (torch.nn.functional.softplus(sign * z) * live).sum()
    gu, gv = torch.autograd.grad(loss, (w_u, w_v))
    rate = batch.lr * n ** (-c)
    new_u = (w_u - rate * gu) * n**-a1  # U = n^-a1 w_U
    new_v = (w_v - rate * gv) * n**-a2 * n  # v = n W
    train_tables(net, u, v, cbow.Factors.finite(net, n), steps=1)  # the program's loop, its first step
    assert torch.allclose(u, new_u.T / np.sqrt(n), rtol=0, atol=1e-12)
    assert torch.allclose(v, new_v / np.sqrt(n), rtol=0, atol=1e-12)
    assert not torch.allclose(u, (w_u * n**-a1).T / np.sqrt(n), atol=1e-6)  # the step moved U


def gram_recursion(net: object, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """muP's limit in Gram space, written independently of tpc's coefficient tables: the words'
    vectors start orthogonal (G = var I), and a step maps U -> U + P V, V -> V + Q U."""
    var_u, var_v = net.layers["U"].var, net.layers["V"].var
    k = 12
    guu, gvv, guv = var_u * np.eye(k), var_v * np.eye(k), np.zeros((k, k))
    for i, b in enumerate(cbow.stream(net)):
        if i == steps:
            break
        counts = np.zeros((len(b.center), k))
        np.add.at(counts, (b.pos, b.ctx), 1.0)
        words = np.concatenate([b.center[:, None], b.neg], axis=1)
        z = np.einsum("bc,bkc->bk", counts, guv.T[words])  # v_j . h_b = sum_c counts[b, c] G_VU[j, c]
        label = np.zeros_like(z)
        label[:, 0] = 1
        live = np.ones_like(z)
        live[:, 1:] = words[:, 1:] != words[:, :1]
        g = (1 / (1 + np.exp(-z)) - label) * live
        p, q = np.zeros((k, k)), np.zeros((k, k))
        for r in range(len(b.center)):
            for j, w in enumerate(words[r]):
                q[w] -= b.lr * g[r, j] * counts[r]  # v_w gets -lr g h_b, h_b = counts_b U
                p[:, w] -= b.lr * g[r, j] * counts[r]  # each context word c gets -lr counts[b, c] g v_w
        guu, gvv, guv = (guu + p @ guv.T + guv @ p.T + p @ gvv @ p.T,
                         gvv + q @ guv + guv.T @ q.T + q @ guu @ q.T,
                         guv + guu @ q.T + p @ gvv + p @ guv.T @ q.T)
    return guu, gvv


@pytest.mark.parametrize("readout_var", ["0", "0.5"])
def test_exact_limit_equals_the_gram_recursion(readout_var: str) -> None:
    net = program(readout_var=readout_var, train="lr = 0.05, window = 2, negatives = 3, sample = 0, batch = 16")
    steps = 20
    net.data["T"] = net.data["T"][:, : 16 * steps]
    out = network_limit(net)
    guu, gvv = gram_recursion(net, steps)
    assert out["words"].method == "exact"
    assert np.abs(out["words"].value - guu).max() < 1e-12
    assert np.abs(out["outs"].value - gvv).max() < 1e-12
    assert np.abs(guu - np.eye(12)).max() > 0.05  # the word vectors learned something


def test_finite_widths_converge_to_the_exact_limit() -> None:
    net = program(train="lr = 0.05, window = 2, negatives = 3, sample = 0.01, epochs = 1, batch = 32")
    limit = network_limit(net)["words"].value
    widths = [128, 512, 2048]
    errors, means = [], []
    for n in widths:
        g = train_finite(net, n, seeds=4)["words"].values
        errors.append(np.sqrt(((g - limit) ** 2).mean()))
        means.append(g.mean(0))
    slope = np.polyfit(np.log(widths), np.log(errors), 1)[0]
    assert -0.75 <= slope <= -0.25, (errors, slope)
    assert np.abs(means[-1] - limit).max() < 0.1


def test_kernel_regime_word_vectors_stay_at_initialisation() -> None:
    """NTK: the limit's Gram is var * I (the vectors move by O(n^-1/2)), and finite widths approach it."""
    net = program("ntk", readout_var="1", train="lr = 0.05, window = 2, negatives = 3, sample = 0, batch = 16")
    out = network_limit(net)
    assert np.array_equal(out["words"].value, np.eye(12)) and np.array_equal(out["outs"].value, np.eye(12))
    moved = []
    for n in (256, 4096):
        g = train_finite(net, n, seeds=2)["words"].values
        u0, _ = cbow.finite_tables(net, n, seed=0)
        moved.append(np.abs(g[0] - (u0 @ u0.T).numpy()).max())  # the training's own change of seed 0's Gram
    assert moved[1] < moved[0] / 2.5  # shrinks like n^-1/2 (4x per 16x width)


def test_stream_rules() -> None:
    """Reduced windows reach at most `window` kept positions each way; negatives follow counts^0.75;
    the rate decays linearly from lr to min_lr; the stream is the same for every width."""
    net = program(train="lr = 0.05, window = 2, negatives = 3, sample = 0, batch = 16, min_lr = 0.001")
    s = cbow.stream(net)
    tokens = s.tokens
    batches = list(s)
    assert len(batches) == s.steps == -(-len(tokens) // 16)
    b = batches[3]
    centers = np.arange(48, 64)
    for row, word in zip(b.pos, b.ctx, strict=True):
        lo, hi = max(0, centers[row] - 2), centers[row] + 3
        assert word in tokens[lo:hi]
    assert np.all(np.bincount(b.pos, minlength=16) <= 4) and np.all(np.bincount(b.pos, minlength=16) >= 1)
    rates = [x.lr for x in batches]
    assert rates[0] == pytest.approx(0.05) and np.all(np.diff(rates) < 0) and rates[-1] > 0.001
    neg = np.concatenate([x.neg.ravel() for x in batches])
    want = np.bincount(tokens, minlength=12) ** 0.75
    assert np.abs(np.bincount(neg, minlength=12) / len(neg) - want / want.sum()).max() < 0.02
    again = list(cbow.stream(net))
    assert all(np.array_equal(x.neg, y.neg) and np.array_equal(x.ctx, y.ctx) for x, y in zip(batches, again,
                                                                                             strict=True))


def test_subsampling_drops_frequent_words() -> None:
    net = program(train="lr = 0.05, window = 2, negatives = 3, sample = 0.01, batch = 16")
    s = cbow.stream(net)
    kept = s.tokens[s.masks[0]]
    before = np.bincount(s.tokens, minlength=12) / len(s.tokens)
    after = np.bincount(kept, minlength=12) / len(kept)
    top = int(np.argmax(before))
    assert len(kept) < len(s.tokens) and after[top] < before[top]


def test_a_small_readout_initialisation_keeps_the_embedding_limit() -> None:
    """abc with a2 + b2 = 2 (a readout smaller than muP's at init) is stable and feature learning: the
    readout's initial rows vanish in the limit, so embeddings(U) is the zero-readout muP limit, and
    embeddings(V) at its initial scale grows with n, which is refused at the train statement."""
    train = "lr = 0.05, window = 2, negatives = 3, sample = 0, batch = 16"
    small = program("abc(a = [-0.5, 0.5], b = [0.5, 1.5], c = 0)", readout_var="1", train=train)
    small.outputs = [o for o in small.outputs if o.name == "words"]
    mup = program("mup", readout_var="0", train=train)
    assert np.abs(network_limit(small)["words"].value - network_limit(mup)["words"].value).max() < 1e-12
    with pytest.raises(TpcError, match="grows like n"):
        network_limit(program("abc(a = [-0.5, 0.5], b = [0.5, 1.5], c = 0)", readout_var="1", train=train))


def test_min_lr_defaults_below_the_parametrization_rate() -> None:
    src = PROGRAM.read_text().replace("parametrization mup", "parametrization mup(lr = 0.00001)").replace(
        "lr = 0.05, ", "")
    net = load_source(src, str(PROGRAM), PROGRAM.parent)
    rates = [b.lr for b in cbow.stream(net)]
    assert rates[0] == pytest.approx(1e-5) and max(rates) <= 1e-5 and rates[-1] >= 1e-5 * 1e-4
    with pytest.raises(TpcError, match="min_lr"):
        load_source(PROGRAM.read_text().replace("batch = 16", "batch = 16, min_lr = 1"), str(PROGRAM), PROGRAM.parent)


def test_seeds_at_once_equal_seeds_one_by_one() -> None:
    # the finite run trains every seed of a chunk in one set of (S, V, m) tables
    net = load_source(PROGRAM.read_text(), str(PROGRAM), PROGRAM.parent)
    together = train_finite(net, 32, 3)
    for name, res in together.items():
        alone = np.concatenate([train_finite(net, 32, 1, first_seed=s)[name].values for s in range(3)])
        np.testing.assert_allclose(res.values, alone, rtol=1e-10, atol=1e-12)
