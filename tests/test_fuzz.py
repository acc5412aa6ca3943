"""Grammar-based fuzzing: every command, on any program, ends with a result or a clean TpcError,
never another exception and never a hang (tests/fuzzing.py; longer runs: benchmarks/fuzz.py)."""

from __future__ import annotations

import time

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

from tests.fuzzing import Case, Harness, Outcome, cases_strategy  # noqa: E402

EXAMPLES = 700  # about 45 s on one core
STAGE_TIMEOUT = 20.0  # seconds per command; the programs are tiny (most take milliseconds): longer is a hang
WALL_CAP = 150.0  # stop early rather than blow the suite's time on a slow machine
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


def test_no_tracebacks_and_no_hangs() -> None:
    """Random programs, half of them mutated, through check, graph, emit-torch, classify, run and limit."""
    failures: list[tuple[Case, Outcome]] = []
    ran = 0
    start = time.monotonic()
    with Harness(STAGE_TIMEOUT) as h:
        @FUZZ
        @given(cases_strategy(mutate_p=0.5))
        def one(case: Case) -> None:
            nonlocal ran
            if time.monotonic() - start > WALL_CAP:
                return
            ran += 1
            failures.extend((case, o) for o in h.run_case(case).outcomes if o.status in ("traceback", "hang"))

        one()
    assert not failures, _summary(failures)
    # the wall-clock cap must not turn the test into one that checks nothing
    assert ran >= EXAMPLES // 4, f"only {ran} of {EXAMPLES} programs ran within {WALL_CAP:g} s"


def test_generator_makes_mostly_valid_programs() -> None:
    """Unmutated programs mostly load, so the fuzzer does not degrade into testing parse errors."""
    loaded = {True: 0, False: 0}
    total = {True: 0, False: 0}
    with Harness() as h:
        @settings(max_examples=150, deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(cases_strategy(mutate_p=0.0))
        def one(case: Case) -> None:
            assert case.mutations == 0
            total[case.network] += 1
            try:
                h.load(case.source)
            except Exception:  # a clean error, or a traceback (test_no_tracebacks_and_no_hangs reports those)
                return
            loaded[case.network] += 1

        one()
    for network in (False, True):
        assert total[network] >= 20, f"too few {'network' if network else 'Netsor'} programs: {total}"
        assert loaded[network] >= 0.5 * total[network], (
            f"only {loaded[network]} of {total[network]} {'network' if network else 'Netsor'} programs load")
