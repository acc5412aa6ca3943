"""One error type for every user mistake, rendered as `file:line:col: message` with a caret."""

from __future__ import annotations

import re
from dataclasses import dataclass

_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")  # not \t, not \n


@dataclass(frozen=True)
class Span:
    """A region of source text; lines and columns count from 1."""

    line: int
    column: int
    end_line: int
    end_column: int

    def __str__(self) -> str:
        return f"{self.line}:{self.column}"


class TpcError(Exception):
    """A mistake in a `.tp` program (or its data), located in the source when possible.

    The CLI prints `render()` and exits with status 2; it never shows a traceback.
    """

    def __init__(self, message: str, span: Span | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.span = span
        self.hint = hint
        self.filename: str = "<program>"
        self.source: str | None = None

    def locate(self, filename: str, source: str) -> TpcError:
        self.filename = filename
        self.source = source
        return self

    def render(self) -> str:
        if self.span is None:
            text = f"{self.filename}: error: {self.message}"
        else:
            text = f"{self.filename}:{self.span.line}:{self.span.column}: error: {self.message}"
            if self.source is not None:
                # "\n" only: Lark counts lines so, while str.splitlines also splits at form feeds,
                # U+2028, \x1c, \x85 and \v (which a comment may hold) and would show the wrong line
                lines = self.source.split("\n")
                if 1 <= self.span.line <= len(lines):
                    line = lines[self.span.line - 1].rstrip("\r")
                    width = 1
                    if self.span.end_line == self.span.line:
                        width = max(1, self.span.end_column - self.span.column)
                    caret = " " * (self.span.column - 1) + "^" + "~" * (width - 1)
                    text += f"\n    {line}\n    {caret}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        # a hostile file could hold terminal escapes (ESC [ ...) or line separators: one visible mark
        # each, so that the caret stays under its column
        return _CONTROL.sub("\ufffd", text)

    def __str__(self) -> str:
        return self.render()


class NumericalError(TpcError):
    """Numerical trouble (NaN, overflow, a covariance that is not PSD) tied to one instruction."""


MAX_HINT_LENGTH = 64  # longer names get no "did you mean": nobody misspells those by a letter or two


def nearest(name: str, candidates: list[str]) -> str | None:
    """The candidate closest to `name` in edit distance, if it is close enough to suggest.

    Fast on any input: a candidate whose length differs by more than the allowed distance is
    skipped, the dynamic programme runs in a band of that width, and long names are not compared."""
    if len(name) > MAX_HINT_LENGTH:
        return None
    limit = max(1, len(name) // 2)
    best, best_d = None, None
    for cand in candidates:
        if abs(len(cand) - len(name)) > limit:
            continue
        d = _edit_distance(name, cand, limit)
        if d > limit:
            continue
        if best_d is None or d < best_d or (d == best_d and cand < str(best)):
            best, best_d = cand, d
    return best


def _edit_distance(a: str, b: str, limit: int) -> int:
    """Levenshtein distance of a and b, or some number above `limit` when it exceeds it: only the
    cells within `limit` of the diagonal are computed."""
    big = limit + 1
    prev = [j if j <= limit else big for j in range(len(b) + 1)]
    for i, ca in enumerate(a, 1):
        lo, hi = max(1, i - limit), min(len(b), i + limit)
        cur = [big] * (len(b) + 1)
        cur[0] = i if i <= limit else big
        for j in range(lo, hi + 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != b[j - 1]), big)
        prev = cur
    return prev[-1]


def clip(text: str, limit: int = 40) -> str:
    """A long name shortened for a message (the source line under it shows it whole)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
