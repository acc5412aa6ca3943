"""word2vec's CBOW with negative sampling (Mikolov et al. 2013), at finite width and in its exact
infinite-width limit (TP4: Yang & Hu 2021, Section 9): the data stream, the tables of word vectors
and their scales, the memory estimate, `describe` and the Gram matrices. The training itself is a
loop (`train cbow(...)` desugars to one, desugar.py) that the interpreter runs on the tables
(tables.py): this module runs no step of its own.

The model is `f(x) = V @ (U @ x)` with `x` the counts of a position's context words, so the columns
u_w of the embedding U and the rows v_w of the readout V are the words' n-vectors, and a step only
touches the rows of the words in its batch. Everything is linear in the initial Gaussians, so both
backends are tables of rows whose dot products are the program's inner products u.v/n:
- at width n, row w is the natural-scale vector u_w / sqrt(n);
- in the limit, row w is its coefficient vector over the initial Gaussian vectors (one per word of
  each table with nonzero variance), an orthonormal basis since E[Z^{u_a} Z^{u_b}] = var delta_ab.
A step is the same instructions on either table, so the limit costs what a finite run at width equal
to its basis size costs, and its state (two vocab x basis tables) is known before it starts.

With W^l = n^-a_l w^l and SGD on w^l (network.py), the tables hold the input vectors u_w (columns
of W^1, entries of size n^-(a1+b1)) and the readout rows at the scale of their updates, v_w = n W^2_w
(as in spaces.py; entries n^(1-a2-b2) at init), and move exactly as
    logit_j = v_j.h / n,   v_j -= lr n^q g_j h,   u_w -= lr n^s sum_j g_j v_j  (w in the context),
h = sum of the context's u_w, g_j = dL/dlogit_j, q = 1 - c - 2 a2, s = -1 - c - 2 a1 (muP: q = s = 0). In
the limit each n^e is 1 (e = 0) or 0 (e < 0), and so are the initial scales. `embeddings(V)` reports
the readout rows at their initial scale, n^(a2+b2) W^2 (entries sqrt(var) at init), like `embeddings(U)`.
In the kernel regime the word vectors stay at their initial values (they move by O(n^-1/2)), so both
Gram matrices are var * I.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from tpc.errors import TpcError
from tpc.parametrization import limit_of_power
from tpc.train.network import Layer, Network, Train
from tpc.train.stream import Stream

Tensor = torch.Tensor


def limit_of_exponent(e: float, what: str, net: Network) -> float:
    """n^e as n -> oo; a located error where the program's quantity grows with n."""
    value = limit_of_power(e)
    if value is None:
        raise TpcError(f"{what} grows like n^{e:g} in this parametrization: it has no infinite-width limit",
                       net.train.span).locate(net.filename, net.source)
    return value


@dataclass
class Factors:
    """The powers of n of the two tables' updates (see the module docstring)."""

    q: float
    s: float

    @staticmethod
    def exponents(net: Network) -> tuple[float, float]:
        a1, _ = net.ab(net.layers[net.train.cbow.embedding])
        a2, _ = net.ab(net.layers[net.train.cbow.output])
        c = net.abc.c
        return 1 - c - 2 * a2, -1 - c - 2 * a1

    @classmethod
    def finite(cls, net: Network, width: int) -> Factors:
        return cls(*(float(width**e) for e in cls.exponents(net)))

    @classmethod
    def limit(cls, net: Network) -> Factors:
        q, s = cls.exponents(net)
        return cls(limit_of_exponent(q, "the readout's update", net),
                   limit_of_exponent(s, "the embedding's update", net))


def tables(net: Network) -> list[tuple[Layer, float]]:
    """(layer, initial exponent) of the two tables: u ~ n^-(a1+b1), v = n W^2 ~ n^(1-a2-b2) (times sqrt(var))."""
    emb, out = net.layers[net.train.cbow.embedding], net.layers[net.train.cbow.output]
    return [(emb, -net.init_exponent(emb)), (out, 1 - net.init_exponent(out))]


def vocabulary(net: Network) -> int:
    return int(net.layers[net.train.cbow.embedding].cols)


def output_exponent(net: Network, layer: str) -> float:
    """embeddings(L) reports v at its initial scale: n^(a2+b2-1) v, so its Gram carries twice that."""
    return 0.0 if layer == net.train.cbow.embedding else 2 * (net.init_exponent(net.layers[layer]) - 1)


def tokens_of(net: Network) -> np.ndarray:
    return net.data[net.train.cbow.tokens].reshape(-1).astype(np.int64)


def stream(net: Network) -> Stream:
    return stream_of(net.train, tokens_of(net), vocabulary(net))


def stream_of(t: Train, tokens: np.ndarray, vocab: int) -> Stream:
    """The stream of a `train cbow` statement's or a `stream S = cbow(...)`'s settings over word ids."""
    c = t.cbow
    return Stream(tokens, vocab, c.window, c.negatives, c.sample, c.epochs, t.batch, t.lr, c.min_lr, c.seed)


def checked_stream(net: Network) -> Stream:
    """The program's stream, refused (at the train statement) when subsampling leaves nothing to train on."""
    data = stream(net)
    if data.positions == 0:
        raise TpcError("subsampling leaves no position to train on: raise sample (or set sample = 0)",
                       net.train.span).locate(net.filename, net.source)
    return data


def train(net: Network, u: Tensor, v: Tensor, f: Factors,
          on_step: Callable[[int, int], None] | None = None, steps: int | None = None) -> None:
    """Trains the tables u, v in place ((V, m) each, or (S, V, m) for S seeds) by the program's loop,
    its first `steps` steps (None: all): `tables.train_tables`, under the name benchmarks/word2vec.py
    calls."""
    from tpc.train.tables import train_tables

    train_tables(net, u, v, f, on_step, steps)


def finite_tables(net: Network, width: int, seed: int, dtype: torch.dtype = torch.float64,
                  device: str = "cpu") -> tuple[Tensor, Tensor]:
    """The initial tables at width n for a seed: rows u_w / sqrt(n) and v_w / sqrt(n)."""
    gen = torch.Generator(device=device).manual_seed(int(seed))
    u, v = (torch.randn(vocabulary(net), width, generator=gen, dtype=dtype, device=device)
            * float(np.sqrt(la.var / width) * width**e) for la, e in tables(net))
    return u, v


def _limit_scales(net: Network) -> list[float]:
    """Each table's initial scale in the limit; a table with scale 0 needs no basis vectors."""
    return [limit_of_exponent(e, f"layer {la.name}'s initial vectors", net) * float(np.sqrt(la.var))
            for la, e in tables(net)]


def basis_size(net: Network) -> int:
    """One basis vector per word of each table that starts random in the limit."""
    return vocabulary(net) * sum(scale > 0 for scale in _limit_scales(net))


def limit_tables(net: Network, dtype: torch.dtype = torch.float64, device: str = "cpu") -> tuple[Tensor, Tensor]:
    """The initial tables in the limit: their scales times distinct standard basis vectors."""
    words, m = vocabulary(net), basis_size(net)
    out, used = [], 0
    for scale in _limit_scales(net):
        t = torch.zeros(words, m, dtype=dtype, device=device)
        if scale > 0:
            t[:, used:used + words] = scale * torch.eye(words, dtype=dtype, device=device)
            used += words
        out.append(t)
    return out[0], out[1]


def gram_scale(net: Network, layer: str, width: int | None) -> float:
    """The factor of embeddings(L)'s Gram at width n (width None: its limit, refused where it grows)."""
    e = output_exponent(net, layer)
    return float(width**e) if width else limit_of_exponent(e, f"embeddings({layer})", net)


def gram(net: Network, layer: str, t: Tensor, width: int | None) -> Tensor:
    """The Gram matrix of a table's word vectors at their initial scale, u_a.u_b / n, in float64
    ((V, m) -> (V, V); per seed for (S, V, m))."""
    return gram_scale(net, layer, width) * (t @ t.transpose(-1, -2)).double()


def grams(net: Network, u: Tensor, v: Tensor, width: int | None) -> dict[str, np.ndarray]:
    """Each `embeddings(L)` output of the tables u, v (width None: the limit)."""
    cfg = net.train.cbow
    table = {cfg.embedding: u, cfg.output: v}
    return {o.name: gram(net, o.layer, table[o.layer], width).cpu().numpy() for o in net.outputs}


def memory_bytes(net: Network, m: int, itemsize: int = 8) -> int:
    """Two vocab x m tables, a batch's gathered rows and its updates, and one vocab x vocab Gram."""
    vocab = vocabulary(net)
    batch = net.train.batch * (2 * net.train.cbow.window + 2 * (1 + net.train.cbow.negatives))
    return itemsize * (2 * vocab * m + batch * m + vocab * vocab)


def describe(net: Network) -> str:
    cls = net.classification()
    data = stream(net)
    head = (f"{net.param_name}: r = {cls.r:g}, {cls.regime}; cbow over {len(data.tokens)} tokens x "
            f"{net.train.cbow.epochs} epoch(s), {data.positions} positions after subsampling, {data.steps} batches "
            f"of {net.train.batch}")
    if not cls.stable:
        return f"{head}; unstable ({'; '.join(cls.failed)}): tpc refuses its limit"
    if cls.regime == "feature learning":
        m = basis_size(net)
        return (f"{head}; exact: each word vector is a coefficient vector over {m} initial Gaussian vectors "
                f"(a finite run at width {m} costs the same); about {memory_bytes(net, m) / 2**30:.2g} GB")
    return f"{head}; the word vectors stay at initialisation (Gram = var * I over the {vocabulary(net)} words)"
