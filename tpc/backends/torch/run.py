"""Run a program at finite width for many seeds: chunks of seeds, each chunk one vectorised
forward pass of the generated module."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from tpc import memory
from tpc.backends import device as on_device
from tpc.backends.torch.codegen import module_class, program_data
from tpc.errors import NumericalError
from tpc.ir import Program

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class FiniteResult:
    name: str
    values: np.ndarray  # (seeds, *shape)
    width: int

    def _scale(self) -> np.ndarray:
        """Each entry's largest |value|: the mean and the spread are taken of values divided by it, so
        that values near the largest float do not overflow on the way (a sum, a square)."""
        scale = np.abs(self.values).max(axis=0) if self.values.shape[0] else np.ones(self.values.shape[1:])
        return np.where((scale > 0) & np.isfinite(scale), scale, 1.0)

    @property
    def mean(self) -> np.ndarray:
        scale = self._scale()
        return (self.values / scale).mean(axis=0) * scale

    @property
    def stderr(self) -> np.ndarray:
        s = self.values.shape[0]
        if s < 2:
            return np.full(self.values.shape[1:], np.nan)
        scale = self._scale()
        with np.errstate(over="ignore"):  # a spread beyond the largest float is inf, and printed so
            return (self.values / scale).std(axis=0, ddof=1) / np.sqrt(s) * scale

    def to_json(self) -> dict:
        return {"mean": self.mean.tolist(), "stderr": self.stderr.tolist(),
                "width": self.width, "seeds": int(self.values.shape[0])}


def bytes_per_seed(prog: Program, width: int, itemsize: int) -> int:
    """A generous estimate of the memory one seed needs: every matrix and every vector."""
    total = 0
    for node in prog.needed():
        if node.op == "matrix":
            rows = width if node.params["rows"] == "n" else node.params["rows"]
            cols = width if node.params["cols"] == "n" else node.params["cols"]
            total += rows * cols
        elif node.kind == "vector":
            total += int(np.prod(node.shape, dtype=np.int64)) * width
        else:
            total += int(np.prod(node.shape, dtype=np.int64))
    return 2 * total * itemsize  # x2: temporaries of matmuls and nonlinearities


def run_finite(prog: Program, width: int, seeds: int, dtype: str = "float64", device: str = "cpu",
               first_seed: int = 0, memory_gb: float | None = None, force: bool = False,
               progress: Callable[[int], None] | None = None) -> dict[str, FiniteResult]:
    """Outputs at width `width` for seeds first_seed .. first_seed+seeds-1, as many seeds at once
    as fit in `memory_gb`; one seed that does not fit is refused before anything is allocated."""
    on_device.check(device)
    memory_gb = on_device.memory_gb(device, memory_gb)  # on CUDA: the device's memory, not the host's
    tdtype = DTYPES[dtype]
    per_seed = bytes_per_seed(prog, width, torch.finfo(tdtype).bits // 8)
    chunk = memory.seeds_at_once(per_seed, seeds, f"one seed at width {width}", memory_gb, force,
                                 prog.filename, prog.source, kept_per_seed=memory.kept_per_seed(prog))
    cls = module_class(prog)
    data = {k: torch.as_tensor(v) for k, v in program_data(prog).items()}
    parts: dict[str, list[np.ndarray]] = {k: [] for k in prog.outputs}
    done = 0
    with torch.no_grad():
        while done < seeds:
            ids = list(range(first_seed + done, first_seed + min(seeds, done + chunk)))
            module = cls(width, ids, data, dtype=tdtype, device=device)
            try:
                out = module()
            except ArithmeticError as err:
                # the module's own NonFiniteError (each generated module defines its runtime)
                if not hasattr(err, "node"):
                    raise
                span = prog.node(err.node).span if err.node is not None else None
                raise NumericalError(err.message, span).locate(prog.filename, prog.source) from None
            for k, v in out.items():
                v = v.expand(len(ids), *v.shape[1:]) if v.shape[0] == 1 else v
                parts[k].append(v.detach().to("cpu", torch.float64).numpy())
            done += len(ids)
            del module, out
            if progress:
                progress(len(ids))
    return {k: FiniteResult(k, np.concatenate(v), width) for k, v in parts.items()}
