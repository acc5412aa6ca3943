"""Finite width: the Program as a generated PyTorch module, vectorised over seeds."""

from tpc.backends.torch.codegen import compile_module, emit_source
from tpc.backends.torch.run import run_finite

__all__ = ["compile_module", "emit_source", "run_finite"]
