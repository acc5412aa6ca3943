"""A longer fuzzing run of tpc (the generator and harness of tests/fuzzing.py).

Random programs (mostly well-formed, half of them mutated) go through every command in-process
(check, graph in every format, emit-torch, classify, run, limit); any exception other than a
clean TpcError, and any stage over the time limit, is a failure. The programs are Netsor programs,
network programs trained by `train`, and network programs trained by loops written in the language
(a mutated one of those is often broken on purpose: tests/fuzzing.py's LOOP_BREAKS; `--known-bugs`
adds the breaks that reproduce bugs already reported, KNOWN_BUG_BREAKS). Each distinct failure (exception
type and innermost tpc frame) is minimised by deleting lines while it persists, and written to
the output folder with its command and traceback; a summary table ends the run. With
`--differential`, every program that loads also meets the numbers' oracles (Harness.differential:
finite and limit shapes agree, emitted PyTorch equals tpc run, autograd equals the unrolled
program); a broken one is a failure too, written as found.

    python benchmarks/fuzz.py --seconds 600 --out fuzz_failures/ [--seed 0] [--jobs 2]
                              [--mutate 0.5] [--timeout 20] [--cases N] [--loops 0.12]
                              [--known-bugs] [--differential]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fuzzing import Case, Harness, Outcome, RandomChooser, case, stages  # noqa: E402


@dataclass
class Failure:
    case: Case
    argv: list[str]
    outcome: Outcome


def worker(seed: int, seconds: float, mutate_p: float, timeout: float, cases: int | None = None,
           known_bugs: bool = False, loops_p: float = 0.12,
           differential: bool = False) -> tuple[list[Failure], Counter, int]:
    """Fuzz for `seconds` (or `cases` programs, whichever comes first) from `seed`: the failures, outcome
    counts and the number of programs."""
    import torch

    torch.set_num_threads(1)
    chooser = RandomChooser(seed)
    failures: list[Failure] = []
    counts: Counter = Counter()
    programs = 0
    deadline = time.monotonic() + seconds
    with Harness(timeout) as h:
        while time.monotonic() < deadline and (cases is None or programs < cases):
            c = case(chooser, mutate_p, known_bugs, loops_p)
            report = h.run_case(c)
            programs += 1
            counts["loads" if report.outcomes[0].status == "ok" else "does not load"] += 1
            counts[f"kind {c.kind}{' broken' if c.brk else ''}"] += 1
            argvs = {" ".join(a): a for a in stages(c)}
            for o in report.outcomes:
                counts[o.status] += 1
                if o.status in ("traceback", "hang"):
                    failures.append(Failure(c, argvs[o.stage], o))
            if differential and report.outcomes[0].status == "ok":
                for message in h.differential(c.source):
                    counts["mismatch"] += 1
                    kind = re.sub(r"-?\d[\d.e+-]*|output \S+", "#", message)  # one failure per kind of mismatch
                    failures.append(Failure(c, ["differential"], Outcome("differential", "mismatch", 0.0,
                                                                         "Mismatch", kind[:80], message)))
    return failures, counts, programs


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:60]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=600, help="how long to fuzz (default 600)")
    p.add_argument("--out", default="fuzz_failures", help="folder for the failing programs")
    p.add_argument("--seed", type=int, default=0, help="the first worker's seed (the others follow)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes")
    p.add_argument("--mutate", type=float, default=0.5, help="the fraction of programs mutated (default 0.5)")
    p.add_argument("--timeout", type=float, default=20, help="seconds per command before it counts as a hang")
    p.add_argument("--no-minimise", action="store_true", help="write the failing programs as found")
    p.add_argument("--cases", type=int, default=None, help="stop each worker after this many programs")
    p.add_argument("--loops", type=float, default=0.12,
                   help="the fraction of programs trained by written loops (default 0.12)")
    p.add_argument("--known-bugs", action="store_true",
                   help="also break loop programs in the ways that reproduce bugs already reported")
    p.add_argument("--differential", action="store_true",
                   help="also check the numbers' oracles on every program that loads (shapes, emitted PyTorch, "
                        "the unrolled program)")
    args = p.parse_args(argv)

    t0 = time.monotonic()
    jobs = [(args.seed + i, args.seconds, args.mutate, args.timeout, args.cases, args.known_bugs, args.loops,
             args.differential) for i in range(args.jobs)]
    if args.jobs == 1:
        results = [worker(*jobs[0])]
    else:
        with mp.get_context("fork").Pool(args.jobs) as pool:
            results = pool.starmap(worker, jobs)
    failures = [f for r in results for f in r[0]]
    counts = sum((r[1] for r in results), Counter())
    programs = sum(r[2] for r in results)
    print(f"{programs} programs in {time.monotonic() - t0:.0f} s ({args.jobs} job(s)); "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))

    groups: dict[tuple[str, str], list[Failure]] = {}
    for f in failures:
        groups.setdefault(f.outcome.key, []).append(f)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with Harness(args.timeout) as h:
        for i, ((exc, where), group) in enumerate(sorted(groups.items(), key=lambda kv: -len(kv[1]))):
            # the shortest example, minimised
            ex = min(group, key=lambda f: len(f.case.source))
            if ex.outcome.status == "mismatch":  # written as found: minimising would re-run every oracle
                small, check = ex.case.source, ex.outcome
            else:
                small = ex.case.source if args.no_minimise else h.minimise(ex.case.source, ex.argv, (exc, where))
                check = h.run_stage(small, ex.argv)
            name = f"{i:03d}_{slug(exc)}_{slug(where)}"
            (out / f"{name}.tp").write_text(small, encoding="utf-8", errors="surrogateescape")
            command = f"tpc {ex.argv[0]} {name}.tp {' '.join(ex.argv[1:])}".rstrip()
            (out / f"{name}.txt").write_text(
                f"command: {command}\nexception: {exc}: {ex.outcome.message}\nwhere: {where}\n"
                f"occurrences: {len(group)}\nprogram: {ex.case.kind}"
                f"{f', broken on purpose ({ex.case.brk})' if ex.case.brk else ''}, {ex.case.mutations} mutation(s)\n"
                f"\n--- minimised program ---\n{small}\n"
                f"--- traceback (minimised program) ---\n{check.trace or check.message}\n"
                f"--- original program ---\n{ex.case.source}\n--- original traceback ---\n{ex.outcome.trace}\n",
                encoding="utf-8", errors="surrogateescape")
            rows.append((exc, where, len(group), f"{name}.tp: {ex.outcome.message.splitlines()[0][:70]}"
                         if ex.outcome.message else f"{name}.tp"))

    if not rows:
        print("no tracebacks and no hangs")
        return 0
    w = [max(len(str(r[k])) for r in rows + [("exception", "where", "count", "")]) for k in range(3)]
    print(f"{'exception':<{w[0]}}  {'where':<{w[1]}}  {'count':>{w[2]}}  example")
    for exc, where, count, example in rows:
        print(f"{exc:<{w[0]}}  {where:<{w[1]}}  {count:>{w[2]}}  {example}")
    print(f"\n{len(rows)} distinct failure(s) written to {out}/")
    return 1


if __name__ == "__main__":
    sys.exit(main())
