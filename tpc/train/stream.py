"""word2vec's data pipeline over a token stream (Mikolov et al. 2013): the batches a loop over a
`stream S = cbow(T, ...)` reads (`b = S[t]`), at every width and in the limit.

This module imports only numpy and torch: `tpc emit-torch` copies everything below the marker line
into the file it writes for a word2vec program, so the emitted file draws the same batches as tpc
(tpc/backends/torch/emit_tables.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch

# ---- stream (copied into emitted files from here on)

CHECKPOINT = 16  # Stream.at saves the generator's state every 16 batches


class Batch(NamedTuple):
    """Positions of the (subsampled) stream: their centre words, their context words as pairs
    (batch row `pos[i]` has context word `ctx[i]`, sorted by row: row b's pairs start at
    `starts[b]`), K negative words each, and the step's rate."""

    center: np.ndarray  # (B,)
    pos: np.ndarray  # (P,)
    ctx: np.ndarray  # (P,)
    starts: np.ndarray  # (B,)
    neg: np.ndarray  # (B, K)
    lr: float
    epoch: int


class Stream:
    """word2vec's batches over a token stream, seeded by `seed` alone so that every width and the
    limit see the same batches: subsampling of frequent words, a reduced window drawn per position,
    negatives from the unigram distribution to the 3/4, and a rate decaying linearly from lr to
    min_lr. `at(t)` is batch t (read in order; an earlier one is drawn again from the start)."""

    def __init__(self, tokens: np.ndarray, vocab: int, window: int, negatives: int, sample: float, epochs: int,
                 batch: int, lr: float, min_lr: float, seed: int) -> None:
        self.tokens, self.vocab, self.window, self.negatives = tokens, vocab, window, negatives
        self.sample, self.epochs, self.batch, self.lr, self.min_lr = sample, epochs, batch, lr, min_lr
        self._cursor: tuple = ()  # (an iterator, the index of its next batch, the last batch it gave)
        self._draw_masks(seed)

    def _draw_masks(self, seed: int) -> None:
        counts = np.bincount(self.tokens, minlength=self.vocab).astype(np.float64)
        rng = np.random.default_rng(seed)
        if self.sample > 0:  # word2vec.c: keep w with probability (sqrt(f / t) + 1) t / f, t = sample * total
            t = self.sample * counts.sum()
            keep = np.minimum(1.0, (np.sqrt(counts / t) + 1) * t / np.maximum(counts, 1))
            self.masks = [rng.random(len(self.tokens)) < keep[self.tokens] for _ in range(self.epochs)]
        else:
            self.masks = [np.ones(len(self.tokens), bool)] * self.epochs
        noise = counts**0.75
        self.noise_cdf = np.cumsum(noise) / noise.sum()
        self._points = [(0, 0, 0, 0, rng.bit_generator.state)]  # the draws of the batches start here
        self.positions = int(sum(m.sum() for m in self.masks))
        self.steps = sum(-(-int(m.sum()) // self.batch) for m in self.masks)  # batches in all

    def __iter__(self) -> Iterator[Batch]:
        return self._draw(self._points[0])

    def _draw(self, point: tuple) -> Iterator[Batch]:
        """The batches from a saved point on: (batch index, epoch, start, positions done, generator state).
        Every CHECKPOINT-th batch's point is saved as the draws pass it."""
        index, first_epoch, first_start, done, state = point
        rng = np.random.default_rng()
        rng.bit_generator.state = state
        w, k = self.window, self.negatives
        offsets = np.concatenate([np.arange(-w, 0), np.arange(1, w + 1)])
        for epoch in range(first_epoch, self.epochs):
            s = self.tokens[self.masks[epoch]]
            for start in range(first_start if epoch == first_epoch else 0, len(s), self.batch):
                if index == len(self._points) * CHECKPOINT:
                    self._points.append((index, epoch, start, done, rng.bit_generator.state))
                p = np.arange(start, min(start + self.batch, len(s)))
                reach = rng.integers(1, w + 1, size=len(p))  # word2vec's reduced window
                idx = p[:, None] + offsets
                valid = (np.abs(offsets) <= reach[:, None]) & (idx >= 0) & (idx < len(s))
                rows, cols = np.nonzero(valid)
                neg = np.minimum(np.searchsorted(self.noise_cdf, rng.random((len(p), k))), self.vocab - 1)
                lr = self.lr - (self.lr - self.min_lr) * done / self.positions
                done += len(p)
                index += 1
                starts = np.searchsorted(rows, np.arange(len(p)))
                yield Batch(s[p], rows, s[idx[rows, cols]], starts, neg, lr, epoch)

    def at(self, t: int) -> Batch:
        """Batch t: the next one after the last read, or drawn again from the nearest saved point before
        it (so reading backwards costs at most CHECKPOINT draws a batch)."""
        if not 0 <= t < self.steps:
            where = "past its end" if t >= self.steps else "before its first batch, 0"
            raise IndexError(f"the stream has {self.steps} batches: step {t} is {where}")
        it, following, last = self._cursor or (iter(self), 0, None)
        if t == following - 1:
            return last
        if t < following or t >= following + CHECKPOINT:
            point = self._points[min(t // CHECKPOINT, len(self._points) - 1)]
            if t < following or point[0] > following:
                it, following = self._draw(point), point[0]
        while following <= t:
            last = next(it)
            following += 1
        self._cursor = (it, following, last)
        return last


class StepBatch(NamedTuple):
    """A batch as tensors: context pairs (batch row `pos[i]` has context word `ctx[i]`; row b's pairs
    start at `starts[b]`), each position's centre word and negatives (`words`, (B, 1 + K)), their
    labels (1 for the centre word) and which of them count (`live`: a negative equal to the centre
    word is skipped, as word2vec does), and the step's rate."""

    pos: torch.Tensor
    ctx: torch.Tensor
    starts: torch.Tensor
    words: torch.Tensor
    label: torch.Tensor
    live: torch.Tensor
    lr: float
    epoch: int


def step_batch(b: Batch, dtype: torch.dtype, device: str | torch.device) -> StepBatch:
    words = torch.as_tensor(np.concatenate([b.center[:, None], b.neg], axis=1), device=device)
    label = torch.zeros(words.shape, dtype=dtype, device=device)
    label[:, 0] = 1
    live = torch.ones_like(label)
    live[:, 1:] = words[:, 1:] != words[:, :1]
    return StepBatch(torch.as_tensor(b.pos, device=device), torch.as_tensor(b.ctx, device=device),
                     torch.as_tensor(b.starts, device=device), words, label, live, b.lr, b.epoch)
