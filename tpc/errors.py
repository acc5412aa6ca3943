"""One error type for every user mistake, rendered as `file:line:col: message` with a caret."""

from __future__ import annotations

from dataclasses import dataclass


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
                lines = self.source.splitlines()
                if 1 <= self.span.line <= len(lines):
                    line = lines[self.span.line - 1]
                    width = 1
                    if self.span.end_line == self.span.line:
                        width = max(1, self.span.end_column - self.span.column)
                    caret = " " * (self.span.column - 1) + "^" + "~" * (width - 1)
                    text += f"\n    {line}\n    {caret}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text

    def __str__(self) -> str:
        return self.render()


class NumericalError(TpcError):
    """Numerical trouble (NaN, overflow, a covariance that is not PSD) tied to one instruction."""


def nearest(name: str, candidates: list[str]) -> str | None:
    """The candidate closest to `name` in edit distance, if it is close enough to suggest."""
    best, best_d = None, None
    for cand in candidates:
        d = _edit_distance(name, cand)
        if best_d is None or d < best_d or (d == best_d and cand < str(best)):
            best, best_d = cand, d
    if best is None or best_d is None or best_d > max(1, len(name) // 2):
        return None
    return best


def _edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]
