"""Coordinatewise expressions: the `phi` of a Nonlin instruction and the `psi` of a Moment.

A tree of `Apply(fn, args)` over `Arg(i)` (the i-th input of the instruction) and `Const`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arg:
    index: int


@dataclass(frozen=True)
class Const:
    value: float


@dataclass(frozen=True)
class Apply:
    fn: str
    args: tuple[Tree, ...]


Tree = Arg | Const | Apply

_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2, "^": 3}


def args_used(tree: Tree) -> set[int]:
    if isinstance(tree, Arg):
        return {tree.index}
    if isinstance(tree, Apply):
        out: set[int] = set()
        for a in tree.args:
            out |= args_used(a)
        return out
    return set()


def substitute(tree: Tree, mapping: dict[int, Tree]) -> Tree:
    """Replace each Arg(i) by mapping[i]."""
    if isinstance(tree, Arg):
        return mapping[tree.index]
    if isinstance(tree, Apply):
        return Apply(tree.fn, tuple(substitute(a, mapping) for a in tree.args))
    return tree


def render(tree: Tree, names: list[str]) -> str:
    """Math-style text of a tree, e.g. `relu(h1) * 2`, for the graph printer."""
    from tpc.ops.functions import FUNCTIONS

    if isinstance(tree, Arg):
        return names[tree.index]
    if isinstance(tree, Const):
        v = tree.value
        return repr(int(v)) if float(v).is_integer() and abs(v) < 1e15 else repr(v)
    fn = FUNCTIONS[tree.fn]
    inner = [render(a, names) for a in tree.args]
    if fn.infix:
        prec = _PRECEDENCE[fn.infix]
        left, right = inner
        a, b = tree.args
        if isinstance(a, Apply) and FUNCTIONS[a.fn].infix and _PRECEDENCE[FUNCTIONS[a.fn].infix] < prec:
            left = f"({left})"
        if isinstance(b, Apply) and FUNCTIONS[b.fn].infix:
            pb = _PRECEDENCE[FUNCTIONS[b.fn].infix]
            if pb < prec or (pb == prec and fn.infix in "-/^"):
                right = f"({right})"
        return f"{left} {fn.infix} {right}"
    if tree.fn == "neg":
        return f"-{inner[0]}" if not isinstance(tree.args[0], Apply) else f"-({inner[0]})"
    return f"{tree.fn}({', '.join(inner)})"
