"""Finite data: `load("file.csv" | "file.npy")` relative to the program file, and literals.

Where `load` may read: files in the program's folder and its subfolders, or in the current working
directory and its subfolders, after resolving symbolic links. Anything else needs an explicit opt-in
(`allow_data_outside=True` in the API, `--allow-data-outside` on the command line): a program
downloaded from somewhere cannot read arbitrary files of the user who runs it.
"""

from __future__ import annotations

import errno
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from tpc import memory
from tpc.errors import Span, TpcError, clip

CSV_BYTES_PER_BYTE = 40  # a CSV is parsed in Python: about 40 bytes of memory per byte of text


@dataclass(frozen=True)
class DataPolicy:
    """What building a program may read and allocate: `load` outside the allowed folders only with
    `allow_outside`; data (and arrays made at check time) within the memory budget (tpc.memory)."""

    allow_outside: bool = False
    memory_gb: float | None = None
    force: bool = False
    # arrays that stand for `load("...")` files, by the text in load(...): a tile of a large
    # kernel builds the program on some rows of its data (tpc/tiles.py)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def require(self, nbytes: float, what: str, span: Span | None) -> None:
        memory.require(nbytes, what, self.memory_gb, self.force, span)


DEFAULT_POLICY = DataPolicy()


def load_array(path_text: str, base_dir: Path, span: Span, policy: DataPolicy = DEFAULT_POLICY) -> np.ndarray:
    """The array in `path_text` (relative to `base_dir`, the program's folder); every problem with the
    path or the file is a TpcError at `span`, and nothing is read before it is known to fit."""
    if path_text in policy.arrays:
        return policy.arrays[path_text]
    shown = clip(path_text, 60)
    if not path_text.strip():
        raise TpcError("load(\"\") names no file", span)
    if "\x00" in path_text:
        raise TpcError("a data file name cannot contain a NUL character", span)
    try:
        path = (base_dir / path_text).resolve()
    except RuntimeError:  # Python < 3.13 reports a symlink loop so
        raise TpcError(f"cannot open {shown}: a loop of symbolic links", span) from None
    except (OSError, ValueError) as exc:
        raise TpcError(f"cannot open {shown}: {_reason(exc)}", span) from None
    if not policy.allow_outside and not _inside_allowed(path, base_dir):
        raise TpcError(f"data file {shown} is outside the program's folder and the current folder",
                       span, "load reads files under either; to read it anyway, allow data outside "
                       "(tpc --allow-data-outside, or allow_data_outside=True)")
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise TpcError(f"data file not found: {shown} (paths are relative to the program's folder)", span) from None
    except (OSError, ValueError) as exc:
        raise TpcError(f"cannot open {shown}: {_reason(exc)}", span) from None
    _check_regular(info.st_mode, shown, span)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".npy"):
        raise TpcError(f"cannot load '{shown}': tpc reads .csv and .npy files", span)
    try:
        # O_NONBLOCK: should the file have become a FIFO since the stat above, opening it cannot hang
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise TpcError(f"cannot open {shown}: {_reason(exc)}", span) from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        _check_regular(info.st_mode, shown, span)
        if info.st_size == 0:
            raise TpcError(f"{shown} is empty (0 bytes)", span)
        if suffix == ".csv":
            policy.require(CSV_BYTES_PER_BYTE * info.st_size, f"reading {shown} ({memory.gb(info.st_size)} of CSV; "
                           "store large data as .npy)", span)
            arr = _load_csv(f.read(), shown, span)
        else:
            arr = _load_npy(f, info.st_size, shown, span, policy)
    if arr.size == 0:
        raise TpcError(f"{shown} is empty", span)
    if not np.all(np.isfinite(arr)):
        raise TpcError(f"{shown} contains NaN or infinite values", span)
    return arr


def _inside_allowed(path: Path, base_dir: Path) -> bool:
    """Is the resolved `path` under the program's folder or the current working directory?"""
    roots = []
    for root in (base_dir, Path.cwd()):
        try:
            roots.append(root.resolve())
        except (OSError, RuntimeError):
            continue
    return any(path == root or path.is_relative_to(root) for root in roots)


def _check_regular(mode: int, shown: str, span: Span) -> None:
    if stat.S_ISDIR(mode):
        raise TpcError(f"{shown} is a directory, not a data file", span)
    if not stat.S_ISREG(mode):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a character device" if stat.S_ISCHR(mode)
                else "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "special")
        raise TpcError(f"{shown} is not a regular file ({kind})", span)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
        return "a loop of symbolic links"
    if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:
        return "the file name is too long"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    return str(exc)


def _load_npy(f, size: int, shown: str, span: Span, policy: DataPolicy) -> np.ndarray:  # noqa: ANN001
    """Read the header first: refuse a shape that would not fit, or a file shorter than its header
    says, before allocating anything."""
    try:
        version = npy_format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = npy_format.read_array_header_2_0(f)  # 3.0 has the same layout
    except (ValueError, OSError, SyntaxError, TypeError) as exc:
        raise TpcError(f"{shown} is not a .npy file ({exc})", span) from None
    if dtype.hasobject or not np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.complexfloating):
        raise TpcError(f"{shown} holds {dtype} values, not numbers", span)
    count = math.prod(shape)
    need = count * max(dtype.itemsize, 8)  # the values as float64
    dims = " x ".join(str(d) for d in shape) or "a single value"
    policy.require(need, f"{shown} ({dims} numbers)", span)
    stored = f.tell() + count * dtype.itemsize
    if stored > size:
        raise TpcError(f"{shown} is shorter than its header says: {dims} numbers need {memory.gb(stored)}, "
                       f"the file has {memory.gb(size)}", span)
    f.seek(0)
    try:
        arr = npy_format.read_array(f, allow_pickle=False)  # never pickles: a data file can never run code
    except (ValueError, OSError) as exc:
        raise TpcError(f"cannot read {shown}: {exc}", span) from None
    return np.asarray(arr, dtype=np.float64)


def _load_csv(raw: bytes, shown: str, span: Span) -> np.ndarray:
    rows: list[list[float]] = []
    try:
        text = raw.decode("utf-8-sig")  # -sig: a byte-order mark (Excel) is not data
    except UnicodeDecodeError as exc:
        raise TpcError(f"{shown} is not UTF-8 text ({exc.reason} at byte {exc.start})", span) from None
    # line ends only (not str.splitlines, which also splits at form feeds): line numbers match editors
    for lineno, line_text in enumerate(re.split(r"\r\n|\r|\n", text), 1):
        line = line_text.strip()
        if not line or line.startswith("#"):
            continue
        row = []
        for col, cell in enumerate(line.split(","), 1):
            try:
                if "_" in cell:  # float() reads 1_0 as 10: a typo, not a number of a data file
                    raise ValueError(cell)
                value = float(cell)
            except ValueError:
                raise TpcError(f"{shown}:{lineno}: field {col} is not a number: {clip(cell.strip())!r}",
                               span) from None
            row.append(value)
        if rows and len(row) != len(rows[0]):
            raise TpcError(f"{shown}:{lineno}: {len(row)} fields, but the first row has {len(rows[0])}", span)
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
