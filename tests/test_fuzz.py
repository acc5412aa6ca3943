"""Grammar-based fuzzing: every command, on any program, ends with a result or a clean TpcError,
never another exception and never a hang (tests/fuzzing.py; longer runs: benchmarks/fuzz.py)."""

from __future__ import annotations

import time

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

from tests.fuzzing import (  # noqa: E402
    KNOWN_BUG_STAGES,
    LOOP_BREAKS,
    Case,
    Harness,
    Outcome,
    RandomChooser,
    case,
    cases_strategy,
    loop_program,
    stages,
)

EXAMPLES = 500  # drawn in the default run (about 320 distinct ones run: about 20 s on one core)
# drawn in the slow step (pytest -m slow); 2000 draws found the bug that
# test_loop_loss_of_a_readout_wider_than_its_targets now pins
LONG_EXAMPLES = 2000
STAGE_TIMEOUT = 20.0  # seconds per command; the programs are tiny (most take milliseconds): longer is a hang
WALL_CAP = 150.0  # stop early rather than blow the suite's time on a slow machine (the default run)
LONG_WALL_CAP = 600.0  # the slow step's
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))


def _summary(failures: list[tuple[Case, Outcome]]) -> str:
    seen: dict[tuple[str, str], tuple[int, Case, Outcome]] = {}
    for c, o in failures:
        count, c0, o0 = seen.get(o.key, (0, c, o))
        seen[o.key] = (count + 1, c0, o0)
    parts = [f"{len(failures)} failure(s), {len(seen)} distinct (python benchmarks/fuzz.py minimises them):"]
    for (exc, where), (count, c, o) in seen.items():
        parts.append(f"\n== {exc} at {where} x{count}: tpc {o.stage}\n{o.message[:300]}\n--- program ---\n"
                     f"{c.source}")
    return "\n".join(parts)


def _fuzz(examples: int, wall_cap: float) -> None:
    """`examples` random programs, half of them mutated, through check, graph, emit-torch, classify, run
    and limit. A case drawn again (the same program through the same commands: hypothesis's draws
    differ, but about a third of them come out as a program already drawn) is not run again: it would
    take the same path to the same outcomes."""
    failures: list[tuple[Case, Outcome]] = []
    seen: set[tuple[object, ...]] = set()
    ran = 0
    start = time.monotonic()
    with Harness(STAGE_TIMEOUT) as h:
        @settings(FUZZ, max_examples=examples)
        @given(cases_strategy(mutate_p=0.5))
        def one(case: Case) -> None:
            nonlocal ran
            if time.monotonic() - start > wall_cap:
                return
            key = (case.source, case.skip, *(tuple(argv) for argv in stages(case)))
            if key in seen:
                return
            seen.add(key)
            ran += 1
            failures.extend((case, o) for o in h.run_case(case).outcomes if o.status in ("traceback", "hang"))

        one()
    assert not failures, _summary(failures)
    # the wall-clock cap must not turn the test into one that checks nothing
    assert ran >= examples // 4, f"only {ran} distinct programs of {examples} drawn ran within {wall_cap:g} s"


def test_no_tracebacks_and_no_hangs() -> None:
    """No traceback and no hang over EXAMPLES random programs (the slow step draws LONG_EXAMPLES)."""
    _fuzz(EXAMPLES, WALL_CAP)


@pytest.mark.slow
def test_no_tracebacks_and_no_hangs_long() -> None:
    """The same over LONG_EXAMPLES random programs."""
    _fuzz(LONG_EXAMPLES, LONG_WALL_CAP)


def test_generator_makes_mostly_valid_programs() -> None:
    """Unmutated programs mostly load, so the fuzzer does not degrade into testing parse errors."""
    kinds = ("netsor", "network", "loops")
    loaded = dict.fromkeys(kinds, 0)
    total = dict.fromkeys(kinds, 0)
    cases: list[Case] = []

    # the cases are drawn first and loaded after: loading inside the test changes what hypothesis draws
    # next (it sees the test's side effects), so any change to tpc would change the sample
    @settings(max_examples=300, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(cases_strategy(mutate_p=0.0))
    def one(case: Case) -> None:
        assert case.mutations == 0 and case.brk is None
        cases.append(case)

    one()
    with Harness() as h:
        for case in cases:
            total[case.kind] += 1
            try:
                h.load(case.source)
            except Exception:  # a clean error, or a traceback (test_no_tracebacks_and_no_hangs reports those)
                continue
            loaded[case.kind] += 1
    for kind in kinds:
        assert total[kind] >= 10, f"too few {kind} programs: {total}"
        assert loaded[kind] >= 0.5 * total[kind], f"only {loaded[kind]} of {total[kind]} {kind} programs load"


def test_every_way_of_breaking_a_loop_program() -> None:
    """Each kind of break (tests/fuzzing.py's LOOP_BREAKS) on a few loop programs, through every command:
    a result or a clean error, and mostly a clean error (the break is not lost on the way)."""
    failures: list[tuple[Case, Outcome]] = []
    refused = dict.fromkeys(LOOP_BREAKS, 0)
    with Harness(STAGE_TIMEOUT) as h:
        for brk in LOOP_BREAKS:
            for seed in range(2):
                case = Case(loop_program(RandomChooser(seed), brk), True, 1, 8, kind="loops", brk=brk,
                            skip=KNOWN_BUG_STAGES.get(brk, ()))
                outcomes = h.run_case(case).outcomes
                failures.extend((case, o) for o in outcomes if o.status in ("traceback", "hang"))
                refused[brk] += any(o.status == "error" for o in outcomes)
    assert not failures, _summary(failures)
    assert sum(refused.values()) >= 1.5 * len(refused), refused


# ---------------------------------------------------------------------------- bugs found by the fuzzer
# Each test below is the smallest program found for a bug the fuzzer reported (now fixed): it stays as a
# regression test. A new bug goes here first as a strict xfail, with its break in tests/fuzzing.py's
# KNOWN_BUG_BREAKS (or a stage in KNOWN_BUG_STAGES) until it is fixed.

HEADER = """width n
parametrization mup
data X = [[1, 0.5], [-0.3, 0.8]]
data Y = [1, -1]
data S = [[0, 1], [1, 0]]
layer U : input n x 2
layer V : readout 1 x n
model f(x) = V @ (U @ x)
"""


def _clean(source: str, argvs: list[list[str]], timeout: float = STAGE_TIMEOUT) -> list[Outcome]:
    """The outcomes of these commands that are a traceback or a hang."""
    with Harness(timeout) as h:
        return [o for o in (h.run_stage(source, a) for a in argvs) if o.status in ("traceback", "hang")]


def _nested(depth: int, record: bool) -> str:
    return (HEADER + "".join(f"for t{i} in range(1) {{\n" for i in range(depth))
            + ("record l = mse(f(X), Y)\n" if record else "") + "f -= 0.1 * grad(mse(f(X), Y), f)\n"
            + "}\n" * depth + "output p = f(X)\n" + ("output l = l\n" if record else ""))


def test_bug_unrolled_listing_of_a_row_index_out_of_range() -> None:
    source = HEADER + "for t in range(2) { f -= 0.1 * grad(mse(f(X[S[2]]), Y), f) }\noutput p = f(X)\n"
    assert not _clean(source, [["graph", "--unrolled"]])


def test_bug_record_in_loops_nested_64_deep() -> None:
    run = ["run", "--width", "4", "--seeds", "2", "--quiet"]
    assert not _clean(_nested(64, True), [run, ["limit", "--particles", "256", "--replicates", "2"]])


def test_bug_loops_nested_200_deep() -> None:
    assert not _clean(_nested(200, False), [["check"], ["emit-torch"], ["run", "--width", "4", "--seeds", "1"]])


def test_bug_check_of_a_loop_of_a_billion_steps() -> None:
    source = HEADER + "for t in range(1000000000) { }\noutput p = f(X)\n"
    assert not _clean(source, [["check"]], timeout=1.5)


def test_bug_loops_that_never_apply_the_model() -> None:
    source = HEADER + "for t in range(2) { record c = t }\noutput c = c\n"
    assert not _clean(source, [["graph"], ["run", "--width", "4", "--seeds", "2"]])


def test_bug_record_of_a_loop_that_runs_zero_times() -> None:
    import numpy as np

    import tpc

    source = HEADER + "for t in range(0) { record c = mse(f(X), Y)  f -= 0.1 * grad(mse(f(X), Y), f) }\n" \
        "output c = c\noutput p = f(X)\n"
    values = tpc.run(tpc.loads(source), width=4, seeds=2)["c"]
    assert values.values.shape == (2, 0) and np.asarray(values.mean).shape == (0,)


def test_bug_float32_limit_of_a_degenerate_covariance() -> None:
    source = """width n
data X = [[0.1], [0]]
matrix U : n x 1 ~ N(0, 1.5)
h = step(U @ X)
matrix W : n x n ~ N(0, 1.1/n)
x = step(W @ h + sigmoid(W @ h + h))
vector v ~ N(0, 1)
f = v @ x / sqrt(n)
output k = cov(f)
"""
    assert not _clean(source, [["limit", "--dtype", "float32"]])


def test_bug_kernel_regime_limit_with_few_particles_not_psd() -> None:
    source = """width n
parametrization ntk
data X = [[-1.2], [0.1], [1.2], [-0.2]]
layer U : input n x 1
layer b : bias n
layer V : readout 1 x n
model f(x) = V @ gelu(U @ x + b)
output pred = f(X)
"""
    assert not _clean(source, [["limit", "--particles", "256", "--replicates", "2"]])


def test_loop_loss_of_a_readout_wider_than_its_targets() -> None:
    """Found by 2000 draws of the fuzz: f(X) - Y in a loop was not shape-checked and torch raised; now
    refused where it is written (tests/errors/loop_shapes_differ.tp)."""
    source = HEADER.replace("readout 1 x n", "readout 3 x n") + \
        "for t in range(1) { L = sum((f(X) - Y) ^ 2) }\noutput p = f(X)\n"
    assert not _clean(source, [["check"], ["run", "--width", "4", "--seeds", "2"]])


def test_differential_oracles_on_random_programs() -> None:
    """Forty unmutated random programs (seeded; a quarter Netsor, the rest trained by loops, raw ones
    among them) meet the numbers' oracles: each output's shape at finite width is its limit's, the
    emitted PyTorch gives tpc run's values, and autograd and the unrolled program give the same
    training (Harness.differential). Each oracle caught a bug when it was written: a 1 x 1 input-layer
    term that broadcast seeds into a table, a backward vector that lost its batch."""
    broken: list[str] = []
    chooser = RandomChooser(20261202)
    with Harness(STAGE_TIMEOUT) as h:
        for _ in range(40):
            c = case(chooser, mutate_p=0.0, loops_p=0.75)
            broken += [f"{m}\n{c.source}" for m in h.differential(c.source)]
    assert not broken, "\n\n".join(broken)
