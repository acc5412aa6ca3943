"""Program -> readable PyTorch source -> a torch.nn.Module.

The source is generated from the checked instruction graph only: names are identifiers
the grammar admits (mangled away from Python keywords), numbers are printed floats, and
data arrive as tensors, so nothing a `.tp` file contains is ever executed as code. User text
that is only shown (the file name, a variance as written, in comments) goes through `_comment`,
which escapes everything but printable ASCII, so it can never end a comment line.
"""

from __future__ import annotations

import builtins
import inspect
import keyword
import math
from typing import Any

import numpy as np
import torch

from tpc.backends.torch import runtime
from tpc.ir import Node, Program, data_value, describe, readout_weights
from tpc.ops import expr as ex
from tpc.ops.functions import FUNCTIONS
from tpc.ops.instructions import INSTRUCTIONS

_RUNTIME_MARKER = "# ---- runtime (copied into emitted files from here on)"
# Names an emitted module uses itself. A program's name is used both as a local and as a module
# attribute (`self.W`), so it must shadow no Python builtin the code calls (getattr, len, ...), no
# name of the module's own, and no attribute of torch.nn.Module, class or instance (`training`).
PYTHON_NAMES = set(keyword.kwlist) | set(dir(builtins)) | {"torch", "math", "annotations", "Tensor", "self"}
MODULE_NAMES = set(dir(torch.nn.Module)) | set(vars(torch.nn.Module()))
_TAKEN = PYTHON_NAMES | MODULE_NAMES | {"n", "S", "gens", "dtype", "device", "data", "z", "width", "seeds"} | {
    name for name, value in vars(runtime).items() if getattr(value, "__module__", None) == runtime.__name__
}


def safe_names(names: list[str], taken: set[str]) -> list[str]:
    """Python identifiers for a program's names, in order: each kept where it is free, else given
    a trailing `_` (names starting with `__`, which Python mangles in a class, too), and every result
    distinct from the others and from `taken`."""
    used = set(taken)
    out = []
    for name in names:
        base = name + "_" if name in taken or name.startswith("__") else name
        safe, k = base, 2
        while safe in used:
            safe, k = f"{base}_{k}", k + 1
        used.add(safe)
        out.append(safe)
    return out


def _num(x: float) -> str:
    x = float(x)
    if math.isfinite(x):
        return repr(x)
    # repr gives 'inf' / 'nan', which are not Python literals
    return "math.nan" if math.isnan(x) else ("math.inf" if x > 0 else "-math.inf")


def _comment(text: str) -> str:
    """User text made safe for a `#` comment: printable ASCII stays; anything else (a newline,
    U+2028, a form feed) is written as its escape, so it cannot end the comment's line."""
    return "".join(c if " " <= c <= "~" else c.encode("unicode_escape").decode("ascii") for c in text)


# Python's parser refuses deeply nested parentheses (about 200 levels); a Nonlin's tree deeper than
# this is split into named partial results
_MAX_INLINE_DEPTH = 40


def _tree_code(tree: ex.Tree, args: list[str], hoisted: list[str] | None = None) -> str:
    """Python source of an expression tree. Subtrees nested deeper than `_MAX_INLINE_DEPTH` are
    appended to `hoisted` as `__e<k> = ...` lines and referred to by name (names starting with
    two underscores are never a program's: `safe_names` mangles those)."""
    code, _ = _tree_code_depth(tree, args, [] if hoisted is None else hoisted)
    return code


def _tree_code_depth(tree: ex.Tree, args: list[str], hoisted: list[str]) -> tuple[str, int]:
    if isinstance(tree, ex.Arg):
        return args[tree.index], 0
    if isinstance(tree, ex.Const):
        return _num(tree.value), 0
    fn = FUNCTIONS[tree.fn]
    parts = []
    depth = 0
    for a in tree.args:
        code, d = _tree_code_depth(a, args, hoisted)
        if d >= _MAX_INLINE_DEPTH:
            hoisted.append(f"__e{len(hoisted)} = {code}")
            code, d = f"__e{len(hoisted) - 1}", 0
        if isinstance(a, ex.Apply) and (FUNCTIONS[a.fn].infix or a.fn in ("neg", "square")):
            code = f"({code})"
        elif isinstance(a, ex.Const) and a.value < 0:
            code = f"({code})"
        parts.append(code)
        depth = max(depth, d)
    return fn.code.format(*parts), depth + 1


class _Emitter:
    """The module's source, from one walk over the needed instructions, each through its `torch` rule
    (tpc/ops/instructions.py; the `_torch_<op>` functions below), which puts its code where it
    belongs: an initial matrix sampled in __init__, a vector group sampled there once, data among
    forward()'s arguments, and every other value on a line of forward()."""

    def __init__(self, prog: Program) -> None:
        self.prog = prog
        self.nodes = prog.needed()
        # one name per node, safe both as a local and as an attribute
        wanted = [node.name.lstrip("_") if node.name.startswith("_t") else node.name for node in self.nodes]
        self.names: dict[int, str] = dict(zip((n.id for n in self.nodes), safe_names(wanted, _TAKEN),
                                              strict=True))
        self.attributes: set[int] = set()  # the module's parameters: initial matrices and vectors
        self.matrices: list[str] = []  # __init__'s lines sampling them, in order
        self.groups: set[int] = set()  # the vector groups it samples (after the matrices, in order)
        self.arguments: list[Node] = []  # the program's own data: forward()'s arguments, in order
        self.body: list[str] = []  # forward()'s lines computing the values
        for node in self.nodes:
            INSTRUCTIONS[node.op].torch(self, node)

    def ref(self, nid: int) -> str:
        return f"self.{self.names[nid]}" if nid in self.attributes else self.names[nid]

    def inputs(self) -> list[Node]:
        """The program's own data, in order: forward()'s arguments (autodiff's data Grams are
        formed from them inside forward)."""
        return self.arguments

    def compute(self, node: Node, code: str, hoisted: list[str] | None = None, comment: bool = True) -> None:
        """forward()'s line for a value: `code`, checked for NaN and overflow where it is made."""
        where = f"{node.name} (line {node.span.line})" if node.span else node.name
        note = f"  # {_comment(describe(self.prog, node))}" if comment else ""
        self.body += hoisted or []
        self.body.append(f"{self.names[node.id]} = check({code}, {where!r}, {node.id}){note}")

    def lifted(self, nid: int, rank: int, vector: bool) -> str:
        """The reference to input `nid`, indexed so it broadcasts inside an expression whose
        values have `rank` finite axes (plus the n axis when `vector`)."""
        node = self.prog.node(nid)
        code = self.ref(nid)
        missing = rank - len(node.shape)
        if node.kind == "vector":
            return code if missing == 0 else f"{code}[:, {', '.join(['None'] * missing)}]"
        idx = ["None"] * missing + ["..."] + (["None"] if vector else [])
        if missing == 0 and not vector:
            return code
        if missing == 0:
            return f"{code}[..., None]"
        return f"{code}[:, {', '.join(idx)}]"

    def init_lines(self) -> list[str]:
        lines = list(self.matrices)
        for gi, group in enumerate(self.prog.groups):
            if gi not in self.groups:
                continue
            members = [m for m in group.members if m in self.names]
            k = len(group.members)
            w, v = np.linalg.eigh(group.cov)
            factor = v * np.sqrt(np.clip(w, 0, None))  # the group was checked PSD when it was declared
            lines.append(
                f"z = vector_group(normal(gens, ({k}, n), dtype, device), "
                f"torch.tensor({_nums(group.mean)}, dtype=dtype, device=device), "
                f"torch.tensor({_nums(factor)}, dtype=dtype, device=device))"
            )
            for m in members:
                j = group.members.index(m)
                lines.append(f"self.{self.names[m]} = torch.nn.Parameter(z[:, {j}])")
        for node in self.inputs():
            name = self.names[node.id]
            lines.append(f"if {name!r} in data:  # forward()'s default for {name}")
            lines.append(f"    self.register_buffer({'__data_' + name!r}, "
                         f"torch.as_tensor(data[{name!r}], dtype=dtype, device=device)[None])")
        return lines

    def forward_lines(self) -> list[str]:
        lines = []
        for node in self.inputs():
            name = self.names[node.id]
            lines.append(f"{name} = as_data({name}, getattr(self, {'__data_' + name!r}, None), {name!r}, "
                         f"{len(node.shape)}, dtype, device)")
        lines += self.body
        outs = ", ".join(f"{k!r}: {self.ref(v)}" for k, v in self.prog.outputs.items())
        lines.append(f"return {{{outs}}}")
        return lines

    def cov_code(self, node: Node) -> str:
        f, g = (self.prog.node(i) for i in node.inputs)
        x, y = self.ref(f.inputs[1]), self.ref(g.inputs[1])
        weights = readout_weights(self.prog, f, g)
        if weights is None:  # independent readout weights
            return f"torch.zeros((S, *{x}.shape[1:-1], *{y}.shape[1:-1]), dtype=dtype, device=device)"
        scale, rows = weights
        return f"readout_cov({x}, {y}, {_num(scale)}, {rows})"


# --- the code of each instruction (`torch` in tpc/ops/instructions.py)
def _torch_data(em: _Emitter, node: Node) -> None:
    if node.params.get("gram"):  # autodiff's A B^T of two data arrays (an NTK's input-layer term)
        a, b = (em.ref(i) for i in node.inputs)
        em.body.append(f"{em.names[node.id]} = data_gram({a}, {b})")
    elif node.params.get("like"):  # autodiff's ones, shaped like f over the batch forward() is given
        em.body.append(f"{em.names[node.id]} = torch.ones_like({em.ref(node.inputs[0])}[:1])")
    elif node.params.get("constant"):  # tpc's own numbers (a named constant, the identity of U.T @ x)
        em.body.append(f"{em.names[node.id]} = {_constant_code(np.asarray(node.params['value'], dtype=np.float64))}")
    else:
        em.arguments.append(node)


def _constant_code(v: np.ndarray) -> str:
    """A constant as forward() builds it, with the leading seeds axis of 1 that data carry: an
    identity by its size (d x d numbers), anything else as its numbers."""
    opts = "dtype=dtype, device=device"
    if v.ndim == 2 and v.shape[0] == v.shape[1] and np.array_equal(v, np.eye(v.shape[0])):
        return f"torch.eye({v.shape[0]}, {opts})[None]"
    return f"torch.tensor([{_nums(v)}], {opts})"


def _torch_matrix(em: _Emitter, node: Node) -> None:
    p = node.params
    rows = "n" if p["rows"] == "n" else str(p["rows"])
    cols = "n" if p["cols"] == "n" else str(p["cols"])
    var = f"{_num(p['var'])} / n" if p["role"] == "hidden" else _num(p["var"])
    if p["role"] == "readout" and p.get("exponent_shift"):
        var = f"{_num(p['var'])} * n ** {_num(2 * p['exponent_shift'])}"
    em.attributes.add(node.id)
    em.matrices.append(
        f"self.{em.names[node.id]} = torch.nn.Parameter(normal(gens, ({rows}, {cols}), dtype, device) "
        f"* math.sqrt({var}))  # {_comment(describe(em.prog, node))}"
    )


def _torch_vector(em: _Emitter, node: Node) -> None:
    em.attributes.add(node.id)
    em.groups.add(em.prog.group_of(node.id)[0])  # the whole group is sampled at once


def _torch_matmul(em: _Emitter, node: Node) -> None:
    w = em.ref(node.inputs[0]) + (".mT" if node.params.get("transposed") else "")
    em.compute(node, f"matmul({w}, {em.ref(node.inputs[1])})")


def _full_batch(em: _Emitter, node: Node, code: str, vector: bool) -> str:
    """`code` expanded to the node's batch where no input carries it: autodiff's d_h of f on a batch
    is a batch even when it is one vector for every input (a linear layer's W.T v), and a lifted
    input broadcasts over a batch of 1 only."""
    used = ex.args_used(node.params["tree"])
    if not node.shape or any(em.prog.node(node.inputs[k]).shape == node.shape for k in used):
        return code
    # the batch as forward() is given it (its sizes may differ from the program's data): an input's
    full = next((i for i in node.inputs if em.prog.node(i).shape == node.shape), None)
    if full is None:  # pragma: no cover - autodiff's nodes keep the value they differentiate by
        return f"({code}).expand(-1, {', '.join(map(str, node.shape))}{', -1' if vector else ''})"
    other = em.prog.node(full)
    stop = -1 if other.kind == "vector" else len(other.shape) + 1
    return f"({code}).expand(-1, *{em.ref(full)}.shape[1:{stop}]{', -1' if vector else ''})"


def _torch_nonlin(em: _Emitter, node: Node) -> None:
    args = [em.lifted(i, len(node.shape), node.kind == "vector") for i in node.inputs]
    hoisted: list[str] = []
    code = _full_batch(em, node, _tree_code(node.params["tree"], args, hoisted), node.kind == "vector")
    em.compute(node, code, hoisted, comment=False)


def _torch_moment(em: _Emitter, node: Node) -> None:
    args = [em.lifted(i, len(node.shape), True) for i in node.inputs]
    hoisted: list[str] = []
    em.compute(node, _full_batch(em, node, f"({_tree_code(node.params['tree'], args, hoisted)}).mean(-1)", False),
               hoisted)


def _torch_gram(em: _Emitter, node: Node) -> None:
    x, y = (em.ref(i) for i in node.inputs)
    em.compute(node, f"gram({x}, {y})")


def _torch_readout(em: _Emitter, node: Node) -> None:
    v, x = (em.ref(i) for i in node.inputs)
    exponent = node.params["multiplier_exponent"]
    scale = {-0.5: " / math.sqrt(n)", 0.0: ""}.get(exponent, f" * n ** {_num(exponent)}")
    em.compute(node, f"readout({v}, {x}) * ({_num(node.params['coef'])}{scale})")


def _torch_cov(em: _Emitter, node: Node) -> None:
    em.compute(node, em.cov_code(node))


def _nums(a: np.ndarray) -> str:
    """A float array as a Python literal (nested lists of printed floats)."""
    if np.ndim(a) == 0:
        return _num(float(a))
    return "[" + ", ".join(_nums(x) for x in a) + "]"


def source_below(module: object, marker: str) -> str:
    """A module's source after its marker line: the part an emitted file carries as its own."""
    text = inspect.getsource(module)  # type: ignore[arg-type]
    return text[text.index(marker) + len(marker):].strip("\n") + "\n"


def runtime_source() -> str:
    """The helpers every emitted module calls (tpc/backends/torch/runtime.py below its marker)."""
    return source_below(runtime, _RUNTIME_MARKER)


def emit_source(prog: Program, class_name: str = "TensorProgram") -> str:
    """A standalone Python file (imports torch only): the program as a torch.nn.Module whose
    forward() takes the program's data as arguments."""
    em = _Emitter(prog)
    params = "".join(f", {em.names[n.id]}: torch.Tensor | None = None" for n in em.inputs())
    signature = f"    def forward(self{params}) -> dict[str, torch.Tensor]:"
    data_doc = ", ".join(f"{em.names[n.id]} ({'x'.join(map(str, n.shape)) or 'scalar'})" for n in em.inputs())
    out = [
        f"# Generated by tpc from {_comment(prog.filename)}: a standalone module (it needs only torch).",
        "#",
        f"#     module = {class_name}(width=1024, seeds=[0, 1, 2])",
        "#     outputs = module(" + ", ".join(em.names[n.id] for n in em.inputs()) + ")"
        + "   # {output name: tensor with a leading seeds axis}",
        "from __future__ import annotations",
        "",
        "import math",
        "",
        "import torch",
        "",
        runtime_source(),
        "",
        f"class {class_name}(torch.nn.Module):",
        '    """The program at width n for a batch of seeds: every tensor has a leading seeds axis',
        "    (1 for data), vectors a trailing width axis. Seed s samples the same network whatever",
        "    the other seeds. forward() takes the program's data"
        + (f": {data_doc}" if data_doc else " (it has none)") + ";",
        "    the batch sizes may differ from the program's (the number of axes may not). `data` gives",
        '    defaults for them."""',
        "",
        "    def __init__(self, width: int, seeds: list[int] | tuple[int, ...] = (0,),",
        "                 data: dict[str, torch.Tensor] | None = None, dtype: torch.dtype = torch.float64,",
        "                 device: str | torch.device = 'cpu') -> None:",
        "        super().__init__()",
        "        n = self.width = width",
        "        self.dtype, self.device, self.seeds = dtype, device, list(seeds)",
        "        data = data or {}",
        f"        known = {tuple(em.names[n.id] for n in em.inputs())!r}",
        "        if set(data) - set(known):  # a name forward() does not take would be ignored",
        "            raise ValueError(f'data {sorted(set(data) - set(known))}: forward() takes {list(known)}')",
        "        gens = generators(self.seeds, device)",
    ]
    out += ["        " + line for line in em.init_lines()]
    out += [
        "",
        signature,
        "        n, S, dtype, device = self.width, len(self.seeds), self.dtype, self.device",
    ]
    out += ["        " + line for line in em.forward_lines()]
    return "\n".join(out) + "\n"


def program_data(prog: Program) -> dict[str, np.ndarray]:
    """The program's data, keyed by forward()'s argument names."""
    em = _Emitter(prog)
    return {em.names[n.id]: np.asarray(data_value(prog, n), dtype=np.float64) for n in em.inputs()}


def module_class(prog: Program) -> type[torch.nn.Module]:
    source = emit_source(prog)
    namespace: dict[str, Any] = {}
    code = compile(source, "<tpc generated module>", "exec")
    exec(code, namespace)  # noqa: S102 - source generated from the checked graph, see module doc
    return namespace["TensorProgram"]


def compile_module(prog: Program, width: int, seeds: list[int] | int = 1,
                   dtype: torch.dtype = torch.float64, device: str = "cpu") -> torch.nn.Module:
    """The emitted module of the program at width `width`, sampled for the given seeds, with the
    program's data as forward()'s defaults: `module()` gives every output."""
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    data = {k: torch.as_tensor(v) for k, v in program_data(prog).items()}
    return module_class(prog)(width, seed_list, data, dtype=dtype, device=device)
