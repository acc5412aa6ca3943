"""The registry of Netsor instructions (tpc/ops/instructions.py): every op that the builder and autodiff
make has an entry with every rule (or an explicit "none"), each rule resolves, the backends dispatch
through it and keep no op -> rule table of their own, every node of the bundled programs has the kind
and shape its shape rule gives, an unknown op is a clear internal error everywhere, and the registry
costs no torch import."""

from __future__ import annotations

import dataclasses
import inspect
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tpc.errors import TpcError
from tpc.ir import Program, print_program, to_dot, to_json
from tpc.ops import expr as ex
from tpc.ops import instructions as registry
from tpc.ops.instructions import INSTRUCTIONS, KINDS, RULES, Instruction, Rule, UnknownInstructionError

ROOT = Path(__file__).resolve().parent.parent
NEVER_NONE = ("shape", "text", "torch")  # every instruction has a shape, a text and PyTorch code


def _created() -> set[str]:
    """Each op that tpc/build.py and autodiff put into a Program (`.add("op", ...)`, `.instruction("op", ...)`)."""
    ops: set[str] = set()
    for path in ("tpc/build.py", "tpc/passes/autodiff.py"):
        source = (ROOT / path).read_text()
        ops |= set(re.findall(r'\.(?:add|instruction)\("(\w+)",', source))
    return ops


def test_every_op_the_builder_makes_is_registered() -> None:
    created = _created()
    assert len(created) >= 9, created
    assert created == set(INSTRUCTIONS), created ^ set(INSTRUCTIONS)


@pytest.mark.parametrize("op", sorted(INSTRUCTIONS))
def test_every_rule_is_named_and_resolves(op: str) -> None:
    spec = INSTRUCTIONS[op]
    assert isinstance(spec, Instruction) and spec.op == op
    assert spec.kind in KINDS and spec.tag and spec.color
    assert spec.meaning and "\n" not in spec.meaning
    for field in RULES:
        rule = getattr(spec, field)
        if rule is None:
            assert field not in NEVER_NONE, (op, field)
            continue
        assert isinstance(rule, Rule)
        assert callable(rule.resolve()), (op, field, rule.path)


def test_a_missing_rule_is_written_none_not_left_out() -> None:
    """The table's constructor has no defaults for rules: an entry names each rule or says "none"."""
    params = inspect.signature(registry._ins).parameters
    assert set(RULES) <= set(params)
    for field in RULES:
        assert params[field].default is inspect.Parameter.empty, field
    assert {f.name for f in dataclasses.fields(Instruction)} >= set(RULES)
    # what has no rule says so in the table: a derivative of none, a matrix with no limit rule of its own
    assert INSTRUCTIONS["data"].derivative is None and INSTRUCTIONS["matmul"].derivative is not None
    assert INSTRUCTIONS["matrix"].gaussian is None and INSTRUCTIONS["matrix"].particles is None


def test_the_registry_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        INSTRUCTIONS["gram"].kind = "vector"  # type: ignore[misc]


def test_no_backend_keeps_its_own_table_of_ops() -> None:
    from tpc import ir
    from tpc.backends.limit import evaluate, particles
    from tpc.backends.torch import codegen
    from tpc.passes import autodiff

    assert not hasattr(ir, "INSTRUCTION"), "the tags are the registry's"
    # every rule a backend defines is in the registry (none left over, reached some other way)
    backends = ((evaluate.LimitEvaluator, "gaussian", "rule_"), (particles.ParticleEvaluator, "particles", "rule_"),
                (codegen, "torch", "_torch_"), (autodiff, "derivative", "_derive_"), (ir, "text", "_text_"),
                (registry, "shape", "_shape_"))
    for owner, field, prefix in backends:
        defined = {name for name in vars(owner) if name.startswith(prefix)}
        used = {getattr(spec, field).path.rsplit(":", 1)[1].rsplit(".", 1)[-1]
                for spec in INSTRUCTIONS.values() if getattr(spec, field) is not None}
        assert defined == used, (owner.__name__, field, defined ^ used)
    # and none of them dispatches by the op's name
    for module in (evaluate, particles):
        assert not re.search(r"rule_\{|\"rule_\"|'rule_'", inspect.getsource(module))
    assert not re.search(r"\.op\s*(==|in\b)", inspect.getsource(codegen))
    assert ".op" not in inspect.getsource(autodiff.Backward.propagate).replace("INSTRUCTIONS[node.op]", "")
    assert ".op" not in inspect.getsource(ir.describe).replace("INSTRUCTIONS[node.op]", "")


# ---------------------------------------------------------------------------- shape rules


def _check_shapes(prog: Program) -> int:
    for node in prog.nodes():
        spec = INSTRUCTIONS[node.op]
        assert node.kind == spec.kind_of(prog, node.inputs), (prog.filename, node)
        assert node.shape == spec.shape(prog, node.inputs, node.params), (prog.filename, node)
    return len(prog.nodes())


def test_every_node_of_the_bundled_programs_has_its_rules_kind_and_shape() -> None:
    """The bundled raw Netsor programs (network programs have instructions of their own)."""
    from tpc.build import load_program

    progs = [p for p in map(load_program, sorted(ROOT.glob("programs/**/*.tp"))) if isinstance(p, Program)]
    assert len(progs) >= 10, [p.filename for p in progs]
    for prog in progs:
        assert _check_shapes(prog) > 0
    ops = {n.op for prog in progs for n in prog.nodes()}
    assert ops == set(INSTRUCTIONS), set(INSTRUCTIONS) - ops  # every rule was exercised


def test_shapes_of_generated_programs() -> None:
    """The fuzzer's raw programs, those that build (each build also runs Program.verify)."""
    from tests.fuzzing import RandomChooser, netsor_program
    from tpc.build import load_source

    built = 0
    for seed in range(60):
        try:
            prog = load_source(netsor_program(RandomChooser(seed)), f"<fuzz {seed}>", ROOT / "tests")
        except TpcError:
            continue
        assert isinstance(prog, Program)
        _check_shapes(prog)
        built += 1
    assert built >= 10


def test_instruction_takes_its_kind_and_shape_from_the_rules() -> None:
    prog = Program("<test>", "")
    x = prog.add("data", (), "scalar", (4, 3), "X", None, value=np.zeros((4, 3)), source=None)
    u = prog.add("matrix", (), "matrix", (), "U", None, role="input", rows="n", cols=3, var=1.0, var_text="1")
    h = prog.instruction("matmul", (u.id, x.id), None, None)
    assert (h.kind, h.shape) == ("vector", (4,))
    g = prog.instruction("gram", (h.id, h.id), None, None)
    assert (g.kind, g.shape) == ("scalar", (4, 4))
    c = prog.add("data", (), "scalar", (), "c", None, value=np.array(2.0), source=None)
    y = prog.instruction("nonlin", (h.id, c.id), None, None, tree=ex.Apply("mul", (ex.Arg(0), ex.Arg(1))))
    assert (y.kind, y.shape) == ("vector", (4,))
    k = prog.instruction("nonlin", (g.id, c.id), None, None, tree=ex.Apply("mul", (ex.Arg(0), ex.Arg(1))))
    assert (k.kind, k.shape) == ("scalar", (4, 4))
    prog.verify()
    # a node made with another shape than its rule's is caught by the verifier
    prog.add("gram", (h.id, h.id), "scalar", (4,), None, None)
    with pytest.raises(AssertionError, match="shape"):
        prog.verify()


# ---------------------------------------------------------------------------- an unknown op


def _with_unknown_op() -> tuple[Program, int]:
    """A program whose output depends on a node of an op nobody registered."""
    from tpc.build import load_source

    prog = load_source("width n\nvector v ~ N(0, 1)\nx = tanh(v)\noutput m = mean(x * x)\n")
    assert isinstance(prog, Program)
    x = prog.node(prog.outputs["m"]).inputs[0]
    odd = prog.add("frobnicate", (x,), "vector", (), "odd", None)
    m = prog.add("moment", (odd.id,), "scalar", (), "m2", None, tree=ex.Apply("identity", (ex.Arg(0),)))
    prog.outputs["m2"] = m.id
    return prog, m.id


def test_an_unknown_op_is_a_clear_internal_error() -> None:
    with pytest.raises(UnknownInstructionError, match=r"internal: unknown Netsor instruction 'frobnicate'.*cov"):
        INSTRUCTIONS["frobnicate"]
    assert not issubclass(UnknownInstructionError, TpcError)  # a bug in tpc, not the user's mistake


def test_every_backend_refuses_an_unknown_op_by_name() -> None:
    from tpc.backends.limit.evaluate import evaluate_limit
    from tpc.backends.torch.codegen import emit_source
    from tpc.passes.autodiff import backward

    prog, m = _with_unknown_op()
    stages = {
        "verify": prog.verify,
        "graph": lambda: print_program(prog, backward=True),
        "json": lambda: to_json(prog),
        "dot": lambda: to_dot(prog),
        "emit-torch": lambda: emit_source(prog),
        "limit": lambda: evaluate_limit(prog),
        "grad": lambda: backward(prog, m, None),
    }
    for stage, call in stages.items():
        try:
            call()
        except UnknownInstructionError as err:
            assert "unknown Netsor instruction 'frobnicate'" in str(err), stage
        else:
            pytest.fail(f"{stage}: no error for an unknown op")


def test_the_registry_and_graph_printing_import_no_torch() -> None:
    code = ("import sys, tpc.ops.instructions\n"
            "from tpc.build import load_program\n"
            "from tpc.ir import print_program, to_json\n"
            "p = load_program('programs/kernels/relu_mlp.tp')\n"
            "print_program(p, backward=True); to_json(p)\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
