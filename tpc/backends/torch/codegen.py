"""Program -> readable PyTorch source -> a torch.nn.Module.

The source is generated from the checked instruction graph only: names are identifiers
the grammar admits (mangled away from Python keywords), numbers are printed floats, and
data arrive as tensors, so nothing a `.tp` file contains is ever executed as code. User text
that is only shown (the file name, a variance as written, in comments) goes through `_comment`,
which escapes everything but printable ASCII, so it can never end a comment line.
"""

from __future__ import annotations

import keyword
import math
from typing import Any

import numpy as np
import torch

from tpc.ir import Program, data_value, describe, readout_weights
from tpc.ops import expr as ex
from tpc.ops.functions import FUNCTIONS

_TAKEN = {"torch", "math", "rt", "self", "n", "S", "gens", "dtype", "device", "constants", "out"}
_MODULE_ATTRS = set(dir(torch.nn.Module))


def _local(name: str) -> str:
    return name + "_" if keyword.iskeyword(name) or name in _TAKEN or name.startswith("__") else name


def _attr(name: str) -> str:
    return name + "_" if name in _MODULE_ATTRS or keyword.iskeyword(name) else name


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
    two underscores are never a program's: `_local` mangles those)."""
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
    def __init__(self, prog: Program) -> None:
        self.prog = prog
        self.nodes = prog.needed()
        self.names: dict[int, str] = {}
        used: set[str] = set()
        for node in self.nodes:
            base = _local(node.name.lstrip("_") if node.name.startswith("_t") else node.name)
            name = base
            k = 2
            while name in used:
                name = f"{base}_{k}"
                k += 1
            used.add(name)
            self.names[node.id] = name

    def ref(self, nid: int) -> str:
        node = self.prog.node(nid)
        if node.op in ("matrix", "vector", "data"):
            return f"self.{_attr(self.names[nid])}"
        return self.names[nid]

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
        lines = []
        for node in self.nodes:
            attr = _attr(self.names[node.id])
            p = node.params
            if node.op == "data":
                lines.append(f"self.register_buffer({attr!r}, constants[{'data:' + attr!r}])")
            elif node.op == "matrix":
                rows = "n" if p["rows"] == "n" else str(p["rows"])
                cols = "n" if p["cols"] == "n" else str(p["cols"])
                var = f"{_num(p['var'])} / n" if p["role"] == "hidden" else _num(p["var"])
                if p["role"] == "readout" and p.get("exponent_shift"):
                    var = f"{_num(p['var'])} * n ** {_num(2 * p['exponent_shift'])}"
                lines.append(
                    f"self.{attr} = torch.nn.Parameter(rt.normal(gens, ({rows}, {cols}), dtype, device) "
                    f"* math.sqrt({var}))  # {_comment(describe(self.prog, node))}"
                )
        for gi, group in enumerate(self.prog.groups):
            members = [m for m in group.members if m in self.names]
            if not members:
                continue
            k = len(group.members)
            lines.append(
                f"z = rt.vector_group(rt.normal(gens, ({k}, n), dtype, device), "
                f"constants['_group{gi}_mean'], constants['_group{gi}_factor'])"
            )
            for m in members:
                j = group.members.index(m)
                lines.append(f"self.{_attr(self.names[m])} = torch.nn.Parameter(z[:, {j}])")
        return lines

    def forward_lines(self) -> list[str]:
        lines = []
        for node in self.nodes:
            if node.op in ("data", "matrix", "vector"):
                continue
            name = self.names[node.id]
            p = node.params
            where = f"{node.name} (line {node.span.line})" if node.span else node.name
            hoisted: list[str] = []
            if node.op == "matmul":
                w = self.ref(node.inputs[0]) + (".mT" if p.get("transposed") else "")
                code = f"rt.check(rt.matmul({w}, {self.ref(node.inputs[1])}), {where!r}, {node.id})"
            elif node.op == "nonlin":
                vector = node.kind == "vector"
                args = [self.lifted(i, len(node.shape), vector) for i in node.inputs]
                code = f"rt.check({_tree_code(p['tree'], args, hoisted)}, {where!r}, {node.id})"
            elif node.op == "moment":
                args = [self.lifted(i, len(node.shape), True) for i in node.inputs]
                code = f"rt.check(({_tree_code(p['tree'], args, hoisted)}).mean(-1), {where!r}, {node.id})"
            elif node.op == "gram":
                x, y = (self.ref(i) for i in node.inputs)
                code = f"rt.check(rt.gram({x}, {y}, {tuple(node.shape)}), {where!r}, {node.id})"
            elif node.op == "readout":
                v, x = (self.ref(i) for i in node.inputs)
                scale = {-0.5: " / math.sqrt(n)", 0.0: ""}.get(
                    p["multiplier_exponent"], f" * n ** {_num(p['multiplier_exponent'])}")
                code = f"rt.check(rt.readout({v}, {x}) * ({_num(p['coef'])}{scale}), {where!r}, {node.id})"
            elif node.op == "cov":
                code = f"rt.check({self.cov_code(node)}, {where!r}, {node.id})"
            else:  # pragma: no cover - every op is handled above
                raise NotImplementedError(node.op)
            comment = f"  # {_comment(describe(self.prog, node))}" if node.op != "nonlin" else ""
            lines += hoisted
            lines.append(f"{name} = {code}{comment}")
        outs = ", ".join(f"{k!r}: {self.names[v] if self.prog.node(v).op not in ('data',) else self.ref(v)}"
                         for k, v in self.prog.outputs.items())
        lines.append(f"return {{{outs}}}")
        return lines

    def cov_code(self, node: Any) -> str:
        f, g = (self.prog.node(i) for i in node.inputs)
        x, y = self.ref(f.inputs[1]), self.ref(g.inputs[1])
        sx, sy = self.prog.node(f.inputs[1]).shape, self.prog.node(g.inputs[1]).shape
        weights = readout_weights(self.prog, f, g)
        if weights is None:  # independent readout weights
            return f"torch.zeros((S, *{tuple(node.shape)}), dtype=dtype, device=device)"
        scale, rows = weights
        return f"rt.readout_cov({x}, {y}, {tuple(sx)}, {tuple(sy)}, {_num(scale)}, {rows})"


def emit_source(prog: Program, class_name: str = "TensorProgram") -> str:
    """The generated PyTorch module as Python source."""
    em = _Emitter(prog)
    out = [
        f"# Generated by tpc from {_comment(prog.filename)}",
        "import math",
        "",
        "import torch",
        "",
        "from tpc.backends.torch import runtime as rt",
        "",
        "",
        f"class {class_name}(torch.nn.Module):",
        '    """The program at width n for a batch of seeds: every tensor has a leading',
        '    seeds axis (1 for data); vectors have a trailing width axis."""',
        "",
        "    def __init__(self, width: int, seeds: list[int], constants: dict[str, torch.Tensor],",
        "                 dtype: torch.dtype = torch.float64, device: str = 'cpu') -> None:",
        "        super().__init__()",
        "        n = self.width = width",
        "        self.dtype, self.device, self.seeds = dtype, device, list(seeds)",
        "        gens = rt.generators(seeds, device)",
    ]
    out += ["        " + line for line in em.init_lines()]
    out += [
        "",
        "    def forward(self) -> dict[str, torch.Tensor]:",
        "        n, S, dtype, device = self.width, len(self.seeds), self.dtype, self.device",
    ]
    out += ["        " + line for line in em.forward_lines()]
    return "\n".join(out) + "\n"


def constants(prog: Program, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    em = _Emitter(prog)
    consts: dict[str, torch.Tensor] = {}
    for node in em.nodes:
        if node.op == "data":
            arr = np.asarray(data_value(prog, node), dtype=np.float64)
            # keyed apart from the groups' constants, whatever the program names its data
            consts["data:" + _attr(em.names[node.id])] = torch.tensor(arr, dtype=dtype, device=device)[None]
    for gi, group in enumerate(prog.groups):
        w, v = np.linalg.eigh(group.cov)
        factor = v * np.sqrt(np.clip(w, 0, None))
        consts[f"_group{gi}_mean"] = torch.tensor(group.mean, dtype=dtype, device=device)
        consts[f"_group{gi}_factor"] = torch.tensor(factor, dtype=dtype, device=device)
    return consts


def module_class(prog: Program) -> type[torch.nn.Module]:
    source = emit_source(prog)
    namespace: dict[str, Any] = {}
    code = compile(source, f"<tpc generated from {prog.filename}>", "exec")
    exec(code, namespace)  # noqa: S102 - source generated from the checked graph, see module doc
    return namespace["TensorProgram"]


def compile_module(prog: Program, width: int, seeds: list[int] | int = 1,
                   dtype: torch.dtype = torch.float64, device: str = "cpu") -> torch.nn.Module:
    """A torch.nn.Module of the program at width `width`, sampled for the given seeds."""
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    cls = module_class(prog)
    return cls(width, seed_list, constants(prog, dtype, device), dtype=dtype, device=device)
