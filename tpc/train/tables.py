"""word2vec's tables of word vectors as a backend of the loop interpreter (interp.py).

A program with an embedding layer (`train cbow(...)`, desugared by desugar.py into a loop over the
batches of its stream) keeps its two layers as tables with one row per word, and its loop reads
and changes them with gathers and indexed row updates (the instructions `stream`, `gather`,
`logits`, `ns_loss`, `ns_grad` and `scatter_add` of tpc/train/instructions.py, whose interpreter
rules call the methods below). The representation is cbow.py's, exact in both cases:
- at width n, row w is the natural-scale vector u_w / sqrt(n) (or v_w / sqrt(n)), per seed;
- in the limit, row w is its coefficient vector over the initial Gaussian vectors.
Tables, gathered rows, logits and their gradients keep a leading seeds axis: S seeds at width n,
one in the limit (the backend's `lead` is 0 there, and a step's loss is a number). A row update
changes its table in place: no other value of a program with tables shares it (a cbow loop makes
no copy and no state), and 11164 steps over two 5000 x 5000 tables leave no room for copies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch

from tpc import memory
from tpc.backends.limit.evaluate import LimitOutput
from tpc.backends.torch.run import DTYPES, FiniteResult
from tpc.errors import TpcError
from tpc.train import cbow
from tpc.train.cbow import Factors
from tpc.train.interp import Interpreter
from tpc.train.network import Network
from tpc.train.stream import Batch, StepBatch, step_batch

Tensor = torch.Tensor


class TableBackend:
    """The tables (S, V, m) of a program's embedding layer and readout, and what a loop does with
    them; `factors` are the powers of n of their updates (cbow.Factors), `width` None in the limit."""

    def __init__(self, net: Network, u: Tensor, v: Tensor, factors: Factors, width: int | None) -> None:
        cfg = net.train.cbow
        self.net, self.width = net, width
        self.tables = {cfg.embedding: u, cfg.output: v}
        self.factor = {cfg.embedding: factors.s, cfg.output: factors.q}
        self.lead = 0 if width is None else 1
        self.lead_shape: tuple[int, ...] = () if width is None else (u.shape[0],)
        self.dtype, self.device = u.dtype, u.device

    def initial(self) -> dict[str, Tensor]:
        return dict(self.tables)

    def batch(self, b: Batch) -> StepBatch:
        return step_batch(b, self.dtype, self.device)

    def bag(self, table: Tensor, b: StepBatch) -> Tensor:
        """h_b = the sum of the rows of position b's context words: (S, B, m)."""
        if table.shape[0] == 1:  # one bag per position
            return torch.nn.functional.embedding_bag(b.ctx, table[0], b.starts, mode="sum")[None]
        seeds, m = table.shape[0], table.shape[2]
        return torch.zeros((seeds, len(b.starts), m), dtype=table.dtype, device=table.device).index_add_(
            1, b.pos, table[:, b.ctx])

    def rows(self, table: Tensor, b: StepBatch) -> Tensor:
        """The rows of each position's centre word and negatives: (S, B, 1 + K, m), a copy (a row update
        later in the step does not change it)."""
        return table[:, b.words]

    def logits(self, rows: Tensor, h: Tensor) -> Tensor:
        """v.h / n (the rows are scaled by 1/sqrt(n)); one seed: bmm, the operations of a run alone."""
        if rows.shape[0] == 1:
            return torch.bmm(rows[0], h[0, :, :, None])[None, ..., 0]
        return torch.einsum("sbkm,sbm->sbk", rows, h)

    def scatter_add(self, table: Tensor, layer: str, index: str, b: StepBatch, g: Tensor, rows: Tensor,
                    rate: float) -> None:
        """table[words] -= rate n^q g h (each position's words), or table[context] -= rate n^s sum_j g_j v_j
        (each position's context words), in place; nothing where the power of n vanishes in the limit."""
        factor = self.factor[layer]
        if not factor:
            return
        seeds, m = table.shape[0], table.shape[2]
        if index == "words":
            table.index_add_(1, b.words.reshape(-1), (g[..., None] * rows[:, :, None, :]).reshape(seeds, -1, m),
                             alpha=-rate * factor)
            return
        back = torch.bmm(g[0, :, None, :], rows[0])[None, :, 0] if seeds == 1 else torch.einsum("sbk,sbkm->sbm", g,
                                                                                                rows)
        table.index_add_(1, b.ctx, back[:, b.pos], alpha=-rate * factor)

    def embeddings(self, table: Tensor, layer: str) -> Tensor:
        return cbow.gram(self.net, layer, table if self.lead else table[0], self.width)


def tables_finite(net: Network, width: int, seeds: int, dtype: str = "float64", device: str = "cpu",
                  first_seed: int = 0, progress: Callable[[int], None] | None = None,
                  on_step: Callable[[int, int], None] | None = None, memory_gb: float | None = None,
                  force: bool = False) -> dict[str, FiniteResult]:
    """Every output at width `width`: as many seeds at once as the memory budget holds (each seed's
    tables are drawn as for a run of that seed alone, and every seed sees the same batches)."""
    chunk = memory.seeds_at_once(cbow.memory_bytes(net, width, torch.finfo(DTYPES[dtype]).bits // 8), seeds,
                                 f"a word2vec run at width {width}", memory_gb, force, net.filename, net.source)
    parts: dict[str, list[np.ndarray]] = {o.name: [] for o in net.outputs}
    for start in range(0, seeds, chunk):
        ids = range(first_seed + start, first_seed + min(seeds, start + chunk))
        drawn = [cbow.finite_tables(net, width, s, DTYPES[dtype], device) for s in ids]
        u, v = torch.stack([t[0] for t in drawn]), torch.stack([t[1] for t in drawn])
        del drawn
        backend = TableBackend(net, u, v, Factors.finite(net, width), width)
        with torch.no_grad():
            out = Interpreter(net, backend).run(on_step)
        for k, g in out.items():
            parts[k].append(g.cpu().numpy())
        if progress:
            progress(len(ids))
    return {k: FiniteResult(k, np.concatenate(p), width) for k, p in parts.items()}


def tables_limit(net: Network, dtype: str = "float64", device: str = "cpu",
                 progress: Callable[[int, int], None] | None = None, memory_gb: float | None = None,
                 force: bool = False) -> dict[str, LimitOutput]:
    """The exact limit: the loop on coefficient tables (feature learning), or the initial Gram
    matrices in the kernel regime, where the word vectors stay at initialisation (TP4's Dichotomy)."""
    if net.classification().regime != "feature learning":
        for o in net.outputs:
            if o.kind != "embeddings":  # the logits move in function space there: not built
                raise TpcError(f"the kernel-regime limit of '{o.name}' (a value recorded in a word2vec loop) is not "
                               "built: only the word vectors' Gram matrices, which stay at initialisation",
                               o.span).locate(net.filename, net.source)
        if not _reads_own_steps(net):
            # the Gram matrices need no training, but the loop must be one that runs: it is run on tables of
            # one coordinate, which reads every batch it names (one past the stream's end is refused here too)
            tiny = torch.zeros(cbow.vocabulary(net), 1, dtype=DTYPES[dtype])
            train_tables(net, tiny, tiny.clone(), Factors.finite(net, 1), progress)
        return {o.name: LimitOutput(net.layers[o.layer].var * np.eye(cbow.vocabulary(net)), "exact")
                for o in net.outputs}
    m = cbow.basis_size(net)  # refuses a table whose initial vectors grow
    try:
        memory.require(cbow.memory_bytes(net, m), f"the word2vec limit (two tables over {m} basis vectors)",
                       memory_gb, force, net.train.span)
    except TpcError as err:
        raise err.locate(net.filename, net.source) from None
    factors = Factors.limit(net)  # refuses an update that grows
    for o in net.outputs:  # and an output that does, before the run rather than after it
        if o.kind == "embeddings":
            cbow.gram_scale(net, o.layer, None)
    u, v = cbow.limit_tables(net, DTYPES[dtype], device)
    with torch.no_grad():
        out = Interpreter(net, TableBackend(net, u[None], v[None], factors, None)).run(progress)
    return {k: LimitOutput(g.cpu().numpy(), "exact") for k, g in out.items()}


def _reads_own_steps(net: Network) -> bool:
    """Every batch the loops read is `S[t]` of its own `for t in steps(S)` (as `train cbow`'s loop): within
    the stream by construction."""
    prog = net.program
    for ins in prog.walk():
        if ins.op == "stream":
            index = prog.instrs[ins.args[0]]
            if index.op != "counter" or "stream" not in prog.instrs[index.attrs["loop"]].attrs:
                return False
    return True


def train_tables(net: Network, u: Tensor, v: Tensor, factors: Factors,
                 on_step: Callable[[int, int], None] | None = None, steps: int | None = None) -> None:
    """Trains given tables in place by the program's loop: (V, m) each (one run: at width m, or the
    limit's coefficient tables), or (S, V, m) for S seeds at width m; `on_step(done, total)` after
    each step; `steps`: only the first ones. No output is computed (the caller has the tables:
    cbow.grams)."""
    seeded = u.dim() == 3
    backend = TableBackend(net, u if seeded else u[None], v if seeded else v[None], factors,
                           u.shape[-1] if seeded else None)
    with torch.no_grad():
        Interpreter(dataclasses.replace(net, outputs=[]), backend).run(on_step, steps)
