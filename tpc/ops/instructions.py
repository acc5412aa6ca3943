"""The Netsor instructions (the nodes of `tpc.ir.Program`), each with all of its rules side by side.

A raw Netsor program is a graph of these instructions (tpc/build.py makes them, and autodiff appends
its backward program with the same ones); this module says, once per op, what the instruction is and
how every backend treats it, as `functions.py` does for the coordinatewise functions and
`tpc/train/instructions.py` for the loop instructions. For an op the registry holds:
- `op`: its name (`Node.op`);
- `kind`: the kind of value it makes (`Node.kind`): `scalar` (finite, deterministic in the limit),
  `vector` (an n-vector, or a batch of them), `matrix` (an initial matrix), `gaussian` (a readout,
  a Gaussian random scalar in the limit), or `vector or scalar` (a Nonlin: a vector when any input
  is one, else a function of scalars);
- `meaning`: one line, what it is;
- `tag`, `color`, `initial`: its Netsor name (the column `tpc graph` prints), its fill in
  `tpc graph --format dot`, and whether it is given rather than computed (printed `name : ...`);
- `shape`: its shape rule, `(Program, inputs, params) -> shape` (below): the batch shape of a
  vector, the shape of a scalar, from its inputs' shapes; `Program.instruction` builds a node by it
  and `Program.verify` checks every node against it;
- `text`: its `tpc graph` text, `(Program, Node) -> str` (tpc/ir.py), the right-hand side as the
  papers write it;
- `torch`: its finite-width rule, `(codegen._Emitter, Node) -> None` (tpc/backends/torch/codegen.py):
  its line of `forward()`, or what `__init__` samples for it, or its place among `forward()`'s
  arguments;
- `gaussian`: its limit rule by Gaussian propagation, `(LimitEvaluator, Node) -> None`
  (tpc/backends/limit/evaluate.py);
- `particles`: its limit rule by particles or exact coefficients, `(ParticleEvaluator, Node) -> None`
  (tpc/backends/limit/particles.py);
- `derivative`: its autodiff rule, `(autodiff.Backward, Node, gradient node) -> None`
  (tpc/passes/autodiff.py): what d_node contributes to the gradients of its inputs.

A rule that an op does not have is written `"none"` in the table (and is None): every op states
every rule, and a backend skips a None rule.

Why lazy: the backends' rules live beside the state they work on (the evaluators, the emitter, the
backward pass), and those modules import torch, which is most of a fresh `tpc check`'s time. So each
rule is named here by "module:attribute" (a method as "module:Class.method") and imported on its
first call, then kept: checking or printing a program imports nothing of the backends. It also keeps
this module free of import cycles: the backends import the registry, and the registry imports them
only when a rule is first used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tpc.ops.shapes import broadcast_shapes

if TYPE_CHECKING:
    from tpc.ir import Program

KINDS = ("scalar", "vector", "matrix", "gaussian", "vector or scalar")


class UnknownInstructionError(LookupError):
    """An op that no entry of the registry describes: a bug in whatever made the node, never a user's
    mistake (so not a TpcError, which the CLI would print as one)."""


class Rule:
    """A rule named by "module:attribute" (or "module:Class.method"), imported on its first call and
    kept."""

    __slots__ = ("path", "_fn")

    def __init__(self, path: str) -> None:
        self.path = path
        self._fn: Callable[..., Any] | None = None

    def resolve(self) -> Callable[..., Any]:
        if self._fn is None:
            module, name = self.path.split(":")
            fn: Any = importlib.import_module(module)
            for part in name.split("."):
                fn = getattr(fn, part)
            self._fn = fn
        return self._fn

    def __call__(self, *args: Any) -> Any:
        return (self._fn or self.resolve())(*args)

    def __repr__(self) -> str:
        return f"Rule({self.path!r})"


@dataclass(frozen=True)
class Instruction:
    op: str
    kind: str
    meaning: str
    tag: str
    color: str
    initial: bool
    shape: Rule
    text: Rule
    torch: Rule
    gaussian: Rule | None
    particles: Rule | None
    derivative: Rule | None

    def __post_init__(self) -> None:
        assert self.kind in KINDS, self.kind

    def kind_of(self, prog: Program, inputs: tuple[int, ...]) -> str:
        """The kind of a node of this op with these inputs."""
        if self.kind != "vector or scalar":
            return self.kind
        return "vector" if any(prog.node(i).kind == "vector" for i in inputs) else "scalar"


class _Registry(dict[str, Instruction]):
    """The table, which names an op it does not have instead of a bare KeyError."""

    def __missing__(self, op: str) -> Instruction:
        raise UnknownInstructionError(
            f"internal: unknown Netsor instruction {op!r}: tpc/ops/instructions.py registers "
            f"{', '.join(sorted(self))}")


# ---------------------------------------------------------------------------- shape rules


def _shape_data(prog: Program, inputs: tuple[int, ...], params: dict[str, Any]) -> tuple[int, ...]:
    if params.get("gram"):  # autodiff's A B^T of two data arrays, rows against rows
        a, b = (prog.node(i).shape for i in inputs)
        return a[:-1] + b[:-1]
    return tuple(params["value"].shape)


def _shape_initial(prog: Program, inputs: tuple[int, ...], params: dict[str, Any]) -> tuple[int, ...]:
    return ()  # one matrix, one vector: a batch is made by multiplying


def multiplies_data(mat_params: dict[str, Any], transposed: bool) -> bool:
    """`U x` for an input layer U, or `V.T c` for a readout matrix V: a product with finite data (one
    input per row of it), not with an n-vector."""
    return mat_params["role"] == "input" or (mat_params["role"] == "readout" and transposed)


def _shape_matmul(prog: Program, inputs: tuple[int, ...], params: dict[str, Any]) -> tuple[int, ...]:
    mat, x = prog.node(inputs[0]), prog.node(inputs[1])
    if multiplies_data(mat.params, bool(params.get("transposed"))):
        return x.shape[:-1]  # one vector per row of the data
    return x.shape


def _one_batch(prog: Program, inputs: tuple[int, ...]) -> tuple[int, ...]:
    """The batch of a coordinatewise function of vectors: every batched input has the same one (the
    builder refuses a mix with the line and column; here it is a bug)."""
    shapes = {prog.node(i).shape for i in inputs} - {()}
    if len(shapes) > 1:
        raise AssertionError(f"internal: inputs {inputs} mix batches {sorted(shapes)}")
    return shapes.pop() if shapes else ()


def _shape_nonlin(prog: Program, inputs: tuple[int, ...], params: dict[str, Any]) -> tuple[int, ...]:
    if any(prog.node(i).kind == "vector" for i in inputs):
        return _one_batch(prog, inputs)
    return broadcast_shapes(*(prog.node(i).shape for i in inputs))  # scalars broadcast as numpy's


def _shape_moment(prog: Program, inputs: tuple[int, ...], params: dict[str, Any]) -> tuple[int, ...]:
    return _one_batch(prog, inputs)


def _shape_pair(prog: Program, inputs: tuple[int, ...], params: dict[str, Any]) -> tuple[int, ...]:
    a, b = inputs  # gram(x, y), cov(f, g): one entry per pair, B x B'
    return prog.node(a).shape + prog.node(b).shape


def _shape_readout(prog: Program, inputs: tuple[int, ...], params: dict[str, Any]) -> tuple[int, ...]:
    v, x = (prog.node(i) for i in inputs)
    return x.shape + ((v.params["rows"],) if v.kind == "matrix" else ())  # a readout matrix: k rows


# ---------------------------------------------------------------------------- the table

_HERE = "tpc.ops.instructions:"
_IR = "tpc.ir:"
_TORCH = "tpc.backends.torch.codegen:"
_GAUSSIAN = "tpc.backends.limit.evaluate:LimitEvaluator."
_PARTICLES = "tpc.backends.limit.particles:ParticleEvaluator."
_AUTODIFF = "tpc.passes.autodiff:"


def _rule(prefix: str, name: str) -> Rule | None:
    return None if name == "none" else Rule(prefix + name)


def _ins(op: str, kind: str, *, tag: str, color: str, initial: bool = False, meaning: str, shape: str, text: str,
         torch: str, gaussian: str, particles: str, derivative: str) -> Instruction:
    """One entry; every rule is named, or "none" where the op has none."""
    return Instruction(op, kind, meaning, tag, color, initial, Rule(_HERE + shape), Rule(_IR + text),
                       Rule(_TORCH + torch), _rule(_GAUSSIAN, gaussian), _rule(_PARTICLES, particles),
                       _rule(_AUTODIFF, derivative))


_TABLE = (
    _ins("data", "scalar", tag="Data", color="lightgrey", initial=True,
         meaning="finite data: a declared or inline array, a named scalar, a folded constant, or autodiff's "
                 "ones and Gram A B^T of two data arrays",
         shape="_shape_data", text="_text_data", torch="_torch_data",
         gaussian="rule_data", particles="rule_data",
         derivative="none"),  # a constant: nothing to propagate
    _ins("matrix", "matrix", tag="A-var", color="lightblue", initial=True,
         meaning="an initial matrix: hidden n x n, input n x d or readout k x n, iid N(0, var) entries",
         shape="_shape_initial", text="_text_matrix", torch="_torch_matrix",
         gaussian="none", particles="none",  # it enters the limit through its MatMuls' Gaussian families
         derivative="none"),  # not a vector: its gradient's kernel is tangent_kernel's term
    _ins("vector", "vector", tag="G-var", color="palegreen", initial=True,
         meaning="an initial vector: iid N(mean, var) coordinates, jointly Gaussian across its group",
         shape="_shape_initial", text="_text_vector", torch="_torch_vector",
         gaussian="rule_vector", particles="rule_vector",
         derivative="none"),  # the recursion ends here: d_v is what grad returns
    _ins("matmul", "vector", tag="MatMul", color="khaki",
         meaning="W x or W.T x for a hidden matrix and an n-vector (a batch); U X or V.T C with finite data",
         shape="_shape_matmul", text="_text_matmul", torch="_torch_matmul",
         gaussian="rule_matmul", particles="rule_matmul",
         derivative="_derive_matmul"),
    _ins("nonlin", "vector or scalar", tag="Nonlin", color="white",
         meaning="phi(x1, ..., xk; theta1, ...): a coordinatewise function of vectors and scalars, or of "
                 "scalars alone",
         shape="_shape_nonlin", text="_text_nonlin", torch="_torch_nonlin",
         gaussian="rule_nonlin", particles="rule_nonlin",
         derivative="_derive_nonlin"),
    _ins("moment", "scalar", tag="Moment", color="pink",
         meaning="mean(psi(x1, ...; thetas)): the average over the n coordinates, one per batch element",
         shape="_shape_moment", text="_text_moment", torch="_torch_moment",
         gaussian="rule_moment", particles="rule_moment",
         derivative="_derive_moment"),
    _ins("gram", "scalar", tag="Moment", color="pink",
         meaning="gram(x, y): the B x B' matrix of moments mean(x_a * y_b)",
         shape="_shape_pair", text="_text_gram", torch="_torch_gram",
         gaussian="rule_gram", particles="rule_gram",
         derivative="_derive_gram"),  # not written yet: a gradient that reaches a gram is refused
    _ins("readout", "gaussian", tag="Readout", color="orange",
         meaning="c v . x / sqrt(n) for an initial vector (or readout matrix) v: Gaussian in the limit",
         shape="_shape_readout", text="_text_readout", torch="_torch_readout",
         gaussian="rule_readout", particles="rule_readout",
         derivative="_derive_readout"),  # as grad's f only: its one user, cov, passes no gradient back
    _ins("cov", "scalar", tag="Kernel", color="pink",
         meaning="cov(f, g): the covariance of two readouts over their batches (the NNGP kernel)",
         shape="_shape_pair", text="_text_cov", torch="_torch_cov",
         gaussian="rule_cov", particles="rule_cov",
         derivative="_derive_cov"),  # as for gram: a gradient that reaches a cov is refused
)

INSTRUCTIONS: dict[str, Instruction] = _Registry((ins.op, ins) for ins in _TABLE)
assert len(INSTRUCTIONS) == len(_TABLE), "an op is listed twice"
RULES = ("shape", "text", "torch", "gaussian", "particles", "derivative")
