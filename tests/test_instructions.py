"""The registry of loop instructions (tpc/train/instructions.py): every op that LoopBuilder emits has
an entry with all of its rules, of the kind LoopBuilder gives it; the backends dispatch through it
and keep no op -> rule table of their own; and the registry costs no torch import."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tpc.train.instructions import INSTRUCTIONS, KINDS, Instruction, Rule

ROOT = Path(__file__).resolve().parent.parent
RULES = ("run", "text", "listing", "emit")


def _emitted() -> dict[str, set[str]]:
    """Each op that loops.py adds, with the kinds it gives it (`self.add("op", args, "kind", ...)`)."""
    source = (ROOT / "tpc" / "train" / "loops.py").read_text()
    ops: dict[str, set[str]] = {}
    for m in re.finditer(r'self\.add\("(\w+)",', source):
        kind = re.search(r'"(\w+)", (?:e\.|s\.)?\w*span', source[m.end():m.end() + 200])
        ops.setdefault(m.group(1), set()).add(kind.group(1) if kind else "?")
    return ops


def test_every_op_loops_emit_is_registered_with_its_kind() -> None:
    emitted = _emitted()
    assert len(emitted) >= 19, emitted
    assert set(emitted) == set(INSTRUCTIONS), (set(emitted) ^ set(INSTRUCTIONS))
    for op, kinds in emitted.items():
        assert kinds == {INSTRUCTIONS[op].kind}, (op, kinds)


@pytest.mark.parametrize("op", sorted(INSTRUCTIONS))
def test_every_rule_resolves_to_a_function(op: str) -> None:
    spec = INSTRUCTIONS[op]
    assert isinstance(spec, Instruction) and spec.op == op
    assert spec.kind in KINDS and spec.meaning and "\n" not in spec.meaning
    assert spec.inline or spec.tag, "an instruction on a line of its own has a tag"
    for field in RULES:
        rule = getattr(spec, field)
        assert isinstance(rule, Rule) and callable(rule)
        assert callable(rule.resolve()), (op, field, rule.path)


def test_the_registry_is_frozen() -> None:
    with pytest.raises(AttributeError):
        INSTRUCTIONS["loop"].kind = "finite"  # type: ignore[misc]


def test_no_backend_keeps_its_own_table_of_ops() -> None:
    from tpc.backends.torch import emit_loops, emit_tables
    from tpc.train import interp, show, unrolled

    for module, names in ((interp, ("RULES",)), (show, ("TEXT", "TAG", "INLINE")), (emit_loops, ("INLINE", "DATA"))):
        for name in names:
            assert not hasattr(module, name), f"{module.__name__}.{name}"
    assert not [m for m in vars(unrolled._Lister) if m.startswith("do_")]
    assert not hasattr(emit_loops._Emitter, "code") and not hasattr(emit_loops._Emitter, "inline")
    # every rule each backend defines is in the registry (none left over, reached some other way); the
    # emitter's rules of word2vec's table instructions sit with the rest of its file (emit_tables.py)
    for modules, field, prefix in (((interp,), "run", "_run_"), ((show,), "text", "_text_"),
                                   ((unrolled,), "listing", "_list_"), ((emit_loops, emit_tables), "emit", "_emit_")):
        defined = {f"{m.__name__}:{name}" for m in modules for name in vars(m) if name.startswith(prefix)}
        used = {getattr(spec, field).path for spec in INSTRUCTIONS.values()}
        assert defined == used, (field, defined ^ used)


def test_the_registry_and_graph_printing_import_no_torch() -> None:
    code = "import tpc.train.instructions, tpc.train.show, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---------------------------------------------------------------- the model's steps (tpc/train/steps.py)

STEP_RULES = ("finite", "forward", "backward", "lower", "code", "listing", "listing_backward", "text")


def test_every_model_step_op_has_all_its_rules() -> None:
    """Each op ModelBuilder makes (`Step("op", ...)` in model_builder.py) has an entry, and each of its
    rules resolves; every per-op rule a backend defines is the registry's (no if-chain left over)."""
    import inspect

    from tpc.backends.torch import emit_network
    from tpc.train import finite, kernel, model_builder, network, pooled, show, unrolled
    from tpc.train.steps import STEPS

    # Step(fn, ...) for the position ops, but avgpool(h, k) makes a window step
    made = set(re.findall(r'Step\("(\w+)"', inspect.getsource(model_builder))) | {
        {"avgpool": "window"}.get(fn, fn) for fn in network.POSITION_OPS}
    assert made == set(STEPS), made ^ set(STEPS)
    for op, spec in STEPS.items():
        assert spec.op == op and spec.meaning and spec.makes
        for field in STEP_RULES:
            rule = getattr(spec, field)
            assert rule is None and field in ("backward", "listing_backward") and op in ("input", "bias") \
                or callable(rule.resolve()), (op, field)
    for owner, field, prefix in ((finite, "finite", "_finite_"), (pooled.PooledBackend, "forward", "_forward_"),
                                 (pooled.PooledBackend, "backward", "_backward_"),
                                 (kernel._Lowering, "lower", "lower_"), (emit_network, "code", "_code_"),
                                 (unrolled, "listing", "_listing_"), (show, "text", "_step_text_")):
        defined = {name for name in vars(owner) if name.startswith(prefix) and
                   not (prefix == "_listing_" and name.startswith("_listing_backward_"))}
        used = {getattr(spec, field).path.split(":")[1].split(".")[-1] for spec in STEPS.values()
                if getattr(spec, field) is not None}
        assert defined == used, (field, defined ^ used)
