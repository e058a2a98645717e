"""``python -m fuzz --cases N --seed S [--work DIR] [--timeout SECONDS]``: run N cases, print the outcome table.

Exit status 1 when any case is a finding (kept under ``WORK/findings/``). ``--replay INDEX`` reruns one
case of seed S in this process and prints its outcome (the case directory is kept).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from typing import Dict, List, Optional, Tuple


def fuzz(
    cases: int, seed: int, work: str, timeout: float = 60.0, log: Optional[str] = None, first: int = 0
) -> Tuple[Dict[Tuple[str, str], int], List[str]]:
    """Run cases ``first .. first + cases - 1`` of ``seed``; return the outcome counts and the kept findings."""
    from fuzz.runner import Pool, keep_finding, outcome_table
    from fuzz.seeds import build

    corpus = os.path.join(work, "corpus")
    seeds = build(corpus) if not os.path.isdir(corpus) else _seeds(corpus)
    pool = Pool(corpus, seeds, work, seed, timeout)
    counts: Counter = Counter()
    kept: List[str] = []
    started = time.monotonic()
    try:
        for index in range(first, first + cases):
            result = pool.run(index)
            counts[(result.get("seed", "?"), result["outcome"])] += 1
            path = keep_finding(result, work, seed)
            if path:
                kept.append(path)
                print(
                    f"case {index}: {result['outcome']} ({result.get('seed')}, {result.get('command')}) -> {path}",
                    file=sys.stderr,
                    flush=True,
                )
            if log and (index - first + 1) % 100 == 0:
                with open(log, "w") as fp:
                    fp.write(f"{index - first + 1} cases in {time.monotonic() - started:.0f} s\n")
                    fp.write(outcome_table(dict(counts)) + "\n")
    finally:
        pool.close()
    return dict(counts), kept


def _seeds(corpus: str):  # type: ignore[no-untyped-def]
    """The seeds of an existing corpus (built by an earlier run with the same code)."""
    import shutil

    from fuzz.seeds import build

    fresh = corpus + ".new"
    shutil.rmtree(fresh, ignore_errors=True)
    seeds = build(fresh)
    shutil.rmtree(corpus)
    os.rename(fresh, corpus)
    return seeds


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=200, help="number of cases (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="master seed: the same seed runs the same cases")
    parser.add_argument("--first", type=int, default=0, help="index of the first case (to continue a run)")
    parser.add_argument("--work", default=None, help="working directory (default: a new temporary one)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a case may take (more is a hang)")
    parser.add_argument("--log", default=None, help="rewrite this file with the outcome table every 100 cases")
    parser.add_argument("--replay", type=int, default=None, help="rerun case INDEX in this process")
    args = parser.parse_args(argv)
    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="mergekit-ota-fuzz-"))
    os.makedirs(work, exist_ok=True)
    if args.replay is not None:
        from fuzz.runner import CaseRunner

        corpus = os.path.join(work, "corpus")
        seeds = _seeds(corpus) if os.path.isdir(corpus) else __import__("fuzz.seeds").seeds.build(corpus)
        result = CaseRunner(corpus, seeds, work, args.seed).run(args.replay)
        print({k: v for k, v in result.items() if k != "detail"})
        print(result.get("detail", ""))
        return 0
    from fuzz.runner import findings_of, outcome_table

    started = time.monotonic()
    counts, kept = fuzz(args.cases, args.seed, work, args.timeout, args.log, args.first)
    print(f"{args.cases} cases, seed {args.seed}, {time.monotonic() - started:.0f} s, work {work}")
    print(outcome_table(counts))
    print(f"{findings_of(counts)} finding(s)" + (f", kept under {os.path.join(work, 'findings')}" if kept else ""))
    return 1 if kept else 0


if __name__ == "__main__":
    sys.exit(main())
