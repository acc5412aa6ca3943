"""Finite data: `load("file.csv" | "file.npy")` relative to the program file, and literals."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tpc.errors import Span, TpcError


def load_array(path_text: str, base_dir: Path, span: Span) -> np.ndarray:
    path = (base_dir / path_text).resolve()
    if not path.is_file():
        raise TpcError(f"data file not found: {path_text} (paths are relative to the program's folder)", span)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        arr = _load_csv(path, path_text, span)
    elif suffix == ".npy":
        try:
            # allow_pickle=False: a data file can never run code
            arr = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise TpcError(f"cannot read {path_text}: {exc}", span) from None
        if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
            raise TpcError(f"{path_text} holds {arr.dtype} values, not numbers", span)
        arr = arr.astype(np.float64)
    else:
        raise TpcError(f"cannot load '{path_text}': tpc reads .csv and .npy files", span)
    if arr.size == 0:
        raise TpcError(f"{path_text} is empty", span)
    if not np.all(np.isfinite(arr)):
        raise TpcError(f"{path_text} contains NaN or infinite values", span)
    return arr


def _load_csv(path: Path, path_text: str, span: Span) -> np.ndarray:
    rows: list[list[float]] = []
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark (Excel) is not data
    except UnicodeDecodeError as exc:
        raise TpcError(f"{path_text} is not UTF-8 text ({exc.reason} at byte {exc.start})", span) from None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        row = []
        for col, cell in enumerate(line.split(","), 1):
            try:
                row.append(float(cell))
            except ValueError:
                raise TpcError(f"{path_text}:{lineno}: field {col} is not a number: {cell.strip()!r}", span) from None
        if rows and len(row) != len(rows[0]):
            raise TpcError(f"{path_text}:{lineno}: {len(row)} fields, but the first row has {len(rows[0])}", span)
        rows.append(row)
    arr = np.array(rows, dtype=np.float64)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    return arr


def literal_array(value: object, span: Span) -> np.ndarray:
    """Nested lists of numbers -> array; ragged lists are an error."""

    def plain(v: object) -> object:
        if isinstance(v, list):
            return [plain(x) for x in v]
        return float(getattr(v, "value", v))  # type: ignore[arg-type]

    try:
        arr = np.array(plain(value), dtype=np.float64)
    except ValueError:
        raise TpcError("data literal is ragged: every row must have the same length", span) from None
    if arr.size == 0:
        raise TpcError("data literal is empty", span)
    return arr
