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

import importlib
from typing import TYPE_CHECKING, Any

# bound here, not lazily: importing the submodule tpc.compare later would rebind the name to it
from tpc.compare import compare

if TYPE_CHECKING:  # the names below are imported on first use: `tpc --help` needs no torch
    from tpc.backends.limit import LimitOutput
    from tpc.backends.torch.run import FiniteResult
    from tpc.errors import NumericalError, TpcError
    from tpc.ir import Program, print_program
    from tpc.train.network import Network

__version__ = "0.1.0"

_LAZY = {
    "LimitOutput": "tpc.backends.limit",
    "FiniteResult": "tpc.backends.torch.run",
    "NumericalError": "tpc.errors",
    "TpcError": "tpc.errors",
    "Program": "tpc.ir",
    "print_program": "tpc.ir",
    "Network": "tpc.train.network",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # once imported, a plain attribute
        return value
    try:  # a submodule (tpc.errors, tpc.ir, ...), as before the names above were made lazy
        return importlib.import_module(f"tpc.{name}")
    except ModuleNotFoundError:
        raise AttributeError(f"module 'tpc' has no attribute {name!r}") from None


def _count(value: object, what: str, minimum: int = 1, maximum: int | None = None) -> None:
    """The API checks what the CLI's parser checks: whole numbers, at least `minimum` (at most `maximum`)."""
    from tpc.errors import TpcError

    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise TpcError(f"{what} must be a whole number of at least {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise TpcError(f"{what} must be at most {maximum}, got {value!r}")


def is_device(device: object) -> bool:
    """cpu, cuda or cuda:K (whether CUDA is there is checked when it is used); the CLI's parser too."""
    if not isinstance(device, str):
        return False
    kind, _, index = device.partition(":")
    return kind == "cpu" and not index or kind == "cuda" and (not index or index.isdigit())


def _options(options: dict[str, object]) -> None:
    from tpc.errors import TpcError

    if "dtype" in options and options["dtype"] not in ("float32", "float64"):
        raise TpcError(f"dtype is 'float32' or 'float64', got {options['dtype']!r}")
    device = options.get("device", "cpu")
    if not is_device(device):
        raise TpcError(f"device is 'cpu', 'cuda' or 'cuda:K', got {device!r}")
    from tpc.seeds import MAX_REPLICATES, MAX_SEED

    for key, minimum, maximum in (("particles", 2, None), ("replicates", 2, MAX_REPLICATES),
                                  ("first_seed", 0, MAX_SEED), ("seed", 0, MAX_SEED)):
        if options.get(key) is not None:
            _count(options[key], key, minimum, maximum)


def _seed_range(first: object, seeds: object) -> None:
    """Seeds first .. first + seeds - 1 all within the bound every seed has."""
    from tpc.errors import TpcError
    from tpc.seeds import MAX_SEED

    if isinstance(first, int) and isinstance(seeds, int) and first + seeds - 1 > MAX_SEED:
        raise TpcError(f"seeds {first} to {first + seeds - 1} go past {MAX_SEED}, the largest seed")


def load(path: object, **options: object) -> Program | Network:
    """Parse, check and build a .tp file (see tpc.build.load_program)."""
    from tpc.build import load_program

    return load_program(path, **options)


def loads(source: str, *args: object, **options: object) -> Program | Network:
    """Parse, check and build program text (see tpc.build.load_source)."""
    from tpc.build import load_source
    from tpc.errors import TpcError

    if not isinstance(source, str):
        raise TpcError(f"loads takes the program's text as a str, got {type(source).__name__}")
    return load_source(source, *args, **options)


def _is_network(prog: object) -> bool:
    from tpc.train.network import Network

    return isinstance(prog, Network)


def limit(prog: Program | Network, **options: object) -> dict[str, LimitOutput]:
    """The infinite-width limit of every output (a network program's after its training)."""
    _options(options)
    if _is_network(prog):
        from tpc.train.limit import network_limit

        if options.pop("dtype", "float64") != "float64":  # as the command line refuses --dtype float32
            from tpc.errors import TpcError

            raise TpcError("a network program's limit is computed in float64 (dtype sets a raw program's limit)")
        return network_limit(prog, **options)
    from tpc.backends.limit import evaluate_limit

    return evaluate_limit(prog, **options)


def run(prog: Program | Network, width: int, seeds: int, **options: object) -> dict[str, FiniteResult]:
    """Every output at width `width` for `seeds` seeds (a network program is trained in torch)."""
    _count(width, "width")
    _count(seeds, "seeds")
    _options(options)
    _seed_range(options.get("first_seed", 0), seeds)
    if _is_network(prog):
        from tpc.train.finite import train_finite

        return train_finite(prog, width, seeds, **options)
    from tpc.backends.torch import run_finite

    return run_finite(prog, width, seeds, **options)


def torch_module(prog: Program | Network, width: int, seeds: int | list[int] = 1, **options: object) -> object:
    """The emitted PyTorch module at width `width` (what `tpc emit-torch` writes, instantiated): a
    Netsor program's for a batch of seeds (`module()` gives every output), a network program's
    model for one seed (a ModuleList for several)."""
    from tpc.errors import TpcError
    from tpc.seeds import MAX_SEED

    _count(width, "width")
    if isinstance(seeds, int):
        _count(seeds, "seeds")
    elif not isinstance(seeds, (list, tuple)) or not seeds:
        raise TpcError(f"seeds is a count or a non-empty list of seeds, got {seeds!r}")
    else:
        for s in seeds:
            _count(s, "a seed", 0, MAX_SEED)
    if _is_network(prog):
        from tpc.backends.torch.emit_network import network_module

        return network_module(prog, width, seeds, **options)
    from tpc.backends.torch import compile_module

    return compile_module(prog, width, seeds, **options)


def torch_source(prog: Program | Network) -> str:
    """The standalone PyTorch source that `tpc emit-torch` prints."""
    if _is_network(prog):
        from tpc.backends.torch.emit_network import emit_network_source

        if prog.has_tables:  # word2vec: tables of word vectors, a stream and its loop
            from tpc.backends.torch.emit_tables import emit_tables_source

            return emit_tables_source(prog)
        return emit_network_source(prog)
    from tpc.backends.torch import emit_source

    return emit_source(prog)


__all__ = [
    "FiniteResult", "LimitOutput", "Network", "NumericalError", "Program", "TpcError", "compare", "limit",
    "load", "loads", "print_program", "run", "torch_module", "torch_source", "__version__",
]
