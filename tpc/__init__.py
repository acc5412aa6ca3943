"""tpc: a Tensor Program compiler.

Write a network as a `.tp` program; get its finite-width PyTorch module, its infinite-width
limit (Master Theorem), and a check that the first converges to the second.

    import tpc
    prog = tpc.load("programs/kernels/relu_mlp.tp")
    prog.graph                                   # networkx.DiGraph of instructions
    module = tpc.torch_module(prog, width=1024, seeds=4)   # torch.nn.Module
    finite = tpc.run(prog, width=1024, seeds=16)           # name -> FiniteResult
    limit = tpc.limit(prog)                                # name -> LimitOutput
    table = tpc.compare(prog, [64, 256, 1024], seeds=8)

    net = tpc.load("programs/train/relu2_mup.tp")          # a network program (layers, SGD)
    trained = tpc.run(net, width=1024, seeds=8)            # real SGD in torch, vectorised over seeds
    tpc.limit(net)                                         # its muP limit (unrolled Netsor-transpose)
"""

from __future__ import annotations

from tpc.backends.limit import LimitOutput, evaluate_limit
from tpc.backends.torch import compile_module, emit_source, run_finite
from tpc.backends.torch.run import FiniteResult
from tpc.build import load_program, load_source
from tpc.compare import compare
from tpc.errors import NumericalError, TpcError
from tpc.ir import Program, print_program
from tpc.train.finite import train_finite
from tpc.train.limit import network_limit
from tpc.train.network import Network

__version__ = "0.1.0"

load = load_program
loads = load_source


def limit(prog: Program | Network, **options: object) -> dict[str, LimitOutput]:
    """The infinite-width limit of every output (a network program's after its training)."""
    return network_limit(prog, **options) if isinstance(prog, Network) else evaluate_limit(prog, **options)


def run(prog: Program | Network, width: int, seeds: int, **options: object) -> dict[str, FiniteResult]:
    """Every output at width `width` for `seeds` seeds (a network program is trained in torch)."""
    return (train_finite if isinstance(prog, Network) else run_finite)(prog, width, seeds, **options)


def torch_module(prog: Program | Network, width: int, seeds: int | list[int] = 1, **options: object) -> object:
    """The emitted PyTorch module at width `width` (what `tpc emit-torch` writes, instantiated): a
    Netsor program's for a batch of seeds (`module()` gives every output), a network program's
    model for one seed (a ModuleList for several)."""
    if isinstance(prog, Network):
        from tpc.backends.torch.emit_network import network_module

        return network_module(prog, width, seeds, **options)
    return compile_module(prog, width, seeds, **options)


def torch_source(prog: Program | Network) -> str:
    """The standalone PyTorch source that `tpc emit-torch` prints."""
    if isinstance(prog, Network):
        from tpc.backends.torch.emit_network import emit_network_source

        return emit_network_source(prog)
    return emit_source(prog)


__all__ = [
    "FiniteResult", "LimitOutput", "Network", "NumericalError", "Program", "TpcError", "compare", "limit",
    "load", "loads", "print_program", "run", "torch_module", "torch_source", "__version__",
]
