"""Command line of the benchmark: generate (or reuse) models, run the merge grid, write the report.

Default grid (about 30 minutes on 2 idle cores): every method at 15M, 150M and 500M
parameters with base + 2 experts, and with base + 4 experts at 15M and 150M;
at 500M with 4 experts only task_arithmetic, ota and ffg (expert-count scaling).
Within each (size, experts) block the methods alternate inside every repeat, the
order rotating from repeat to repeat, so load from other processes hits all alike.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

from benchmarks.perf import machine
from benchmarks.perf.models import CachedFamily, ensure_family, warm_page_cache
from benchmarks.perf.report import markdown
from benchmarks.perf.sizes import DEFAULT_SIZES, SIZES
from benchmarks.perf.variants import SCALING_VARIANTS, SMOKE_VARIANTS, VARIANTS, parse_variants

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CACHE = os.path.join(REPO, "benchmarks", ".cache")
DEFAULT_OUT = os.path.join(REPO, "benchmarks", "results", "perf.md")
DEFAULT_NOTES = os.path.join(REPO, "benchmarks", "perf", "notes.md")
WARM_FRACTION = 0.5  # inputs larger than this share of RAM are not pre-read: they cannot stay cached


class BenchmarkError(RuntimeError):
    """A merge failed or the arguments are inconsistent."""


def _parse_list(text: str) -> List[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.perf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", help=f"comma-separated tiers from {', '.join(SIZES)} (default {','.join(DEFAULT_SIZES)})"
    )
    parser.add_argument("--experts", help="comma-separated expert counts (default 2,4)")
    parser.add_argument("--methods", help=f"comma-separated variants from {', '.join(VARIANTS)} (default all)")
    parser.add_argument("--repeats", type=int, help="repeats per method (default 3; median reported)")
    parser.add_argument(
        "--full-grid",
        action="store_true",
        help="run every method at every size and expert count (by default the largest size "
        "with more than 2 experts runs only " + ", ".join(SCALING_VARIANTS) + ")",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="seconds-long check: 1M-parameter model, 2 experts, 1 repeat, "
        + ", ".join(SMOKE_VARIANTS)
        + "; report under the cache unless --out",
    )
    parser.add_argument("--out-shard-size", default="1B", help="mergekit --out-shard-size for every merge (default 1B)")
    parser.add_argument("--out", help=f"markdown report (default {os.path.relpath(DEFAULT_OUT, REPO)})")
    parser.add_argument("--force", action="store_true", help="replace an existing report")
    parser.add_argument(
        "--cache", default=DEFAULT_CACHE, help="where generated models live (default benchmarks/.cache)"
    )
    parser.add_argument(
        "--no-warm",
        dest="warm",
        action="store_false",
        help="do not read each merge's input files just before it (by default every merge whose "
        "inputs fit in half the RAM starts with them in the page cache)",
    )
    parser.add_argument(
        "--notes",
        default=None,
        help="markdown appended to the report (default: benchmarks/perf/notes.md, the analysis; none with --smoke)",
    )
    parser.add_argument(
        "--render",
        metavar="RAW_JSON",
        help="run nothing: rebuild the report from raw results a run saved "
        "(benchmarks/.cache/perf-last.json), e.g. with --notes",
    )
    args = parser.parse_args(argv)

    args.sizes = _parse_list(args.sizes) if args.sizes else (["1M"] if args.smoke else list(DEFAULT_SIZES))
    args.experts = [int(x) for x in _parse_list(args.experts)] if args.experts else ([2] if args.smoke else [2, 4])
    try:
        args.methods = parse_variants(args.methods) if args.methods or not args.smoke else SMOKE_VARIANTS
    except ValueError as error:
        parser.error(str(error))
    args.repeats = args.repeats or (1 if args.smoke else 3)
    unknown = [s for s in args.sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown size(s) {unknown}; choose from {', '.join(SIZES)}")
    if args.repeats < 1 or any(k < 1 for k in args.experts):
        parser.error("--repeats and --experts must be >= 1")
    if args.notes is None and not args.smoke:
        args.notes = DEFAULT_NOTES
    args.cache = os.path.abspath(args.cache)
    if args.out is None:
        args.out = os.path.join(args.cache, "perf-smoke.md") if args.smoke else DEFAULT_OUT
    args.out = os.path.abspath(args.out)
    if os.path.exists(args.out) and not args.force and not args.smoke:
        parser.error(f"{args.out} exists; pass --force to replace it")
    from mergekit.common import parse_kmb

    args.out_shard_bytes = parse_kmb(args.out_shard_size)
    return args


def grid(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """The (size, experts, variants) blocks to run, in order."""
    largest = max(args.sizes, key=lambda s: list(SIZES).index(s))
    blocks = []
    for size in sorted(args.sizes, key=lambda s: list(SIZES).index(s)):
        for n_experts in sorted(args.experts):
            variants = list(args.methods)
            if not args.full_grid and size == largest and n_experts > 2 and len(args.sizes) > 1:
                variants = [v for v in variants if v in SCALING_VARIANTS]
            if variants:
                blocks.append({"size": size, "n_experts": n_experts, "variants": variants})
    return blocks


def run_child(job: Dict[str, Any], workdir: str) -> Dict[str, Any]:
    """Run one merge in a fresh interpreter and return its measurements."""
    job_path, result_path = os.path.join(workdir, "job.json"), os.path.join(workdir, "result.json")
    with open(job_path, "w", encoding="utf-8") as fp:
        json.dump(job, fp)
    if os.path.exists(result_path):
        os.remove(result_path)
    shutil.rmtree(job["out"], ignore_errors=True)
    try:
        process = subprocess.run(
            [sys.executable, "-m", "benchmarks.perf.child", job_path, result_path],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        result = {}
        if os.path.exists(result_path):
            with open(result_path, encoding="utf-8") as fp:
                result = json.load(fp)
        if process.returncode != 0 or "error" in result or not os.listdir(job["out"]):
            raise BenchmarkError(
                f"merge {job['config']['merge_method']} failed (exit {process.returncode}): "
                f"{result.get('error', '')}\n{process.stderr[-4000:]}"
            )
        return result
    finally:
        shutil.rmtree(job["out"], ignore_errors=True)


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fp:
        fp.write(text)
    os.replace(tmp, path)


def run_block(spec: Dict[str, Any], family: CachedFamily, args: argparse.Namespace, workdir: str) -> Dict[str, Any]:
    """Measure every variant of one (size, experts) block, ``args.repeats`` times, alternating."""
    variants = spec["variants"]
    block: Dict[str, Any] = {
        "size": spec["size"],
        "parameters": family.parameters,
        "largest_tensor": family.largest_tensor,
        "n_experts": spec["n_experts"],
        "runs": {v: [] for v in variants},
        "input_bytes": {v: family.input_bytes(spec["n_experts"], VARIANTS[v].curvature) for v in variants},
    }
    for repeat in range(args.repeats):
        shift = repeat % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            warm = args.warm and block["input_bytes"][variant] <= WARM_FRACTION * machine.memory_bytes()
            if warm:
                warm_page_cache(family.input_files(spec["n_experts"], VARIANTS[variant].curvature))
            job = {
                "config": VARIANTS[variant].config(family, spec["n_experts"]),
                "out": os.path.join(workdir, "out"),
                "out_shard_size": args.out_shard_bytes,
            }
            result = run_child(job, workdir)
            result["warmed"] = warm
            block["runs"][variant].append(result)
            print(
                f"{spec['size']:>5} x{spec['n_experts']} repeat {repeat + 1}/{args.repeats} {variant:<16} "
                f"{result['merge_s']:7.2f} s  cpu {result['cpu_s']:7.1f} s  "
                f"peak anon {result['peak_anon'] / 2**30:5.2f} GiB  load {machine.load_average():.2f}",
                flush=True,
            )
    return block


def _read_notes(path: Optional[str]) -> Optional[str]:
    if not path:
        return None
    with open(path, encoding="utf-8") as fp:
        return fp.read()


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    raw_path = os.path.join(args.cache, "perf-last.json")
    if args.render:  # only rebuild the markdown from saved raw results
        with open(args.render, encoding="utf-8") as fp:
            run = json.load(fp)
        _write(args.out, markdown(run, _read_notes(args.notes)))
        print(f"report: {args.out}")
        return
    started = time.perf_counter()
    command = "python -m benchmarks.perf " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    run: Dict[str, Any] = {
        "command": command.strip(),
        "machine": machine.describe(),
        "load_start": machine.load_average(),
        "repeats": args.repeats,
        "out_shard_size": args.out_shard_size,
        "warm": args.warm,
        "blocks": [],
    }
    blocks = grid(args)
    families: Dict[str, CachedFamily] = {}
    for size in dict.fromkeys(b["size"] for b in blocks):
        needed = max(b["n_experts"] for b in blocks if b["size"] == size)
        families[size] = ensure_family(args.cache, SIZES[size], needed)
    workdir = tempfile.mkdtemp(prefix="perf-", dir=args.cache)
    try:
        for spec in blocks:
            run["blocks"].append(run_block(spec, families[spec["size"]], args, workdir))
            _write(raw_path, json.dumps(run, indent=1))  # partial results survive an interrupted run
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    run["load_end"] = machine.load_average()
    run["wall_s"] = time.perf_counter() - started
    _write(raw_path, json.dumps(run, indent=1))
    _write(args.out, markdown(run, _read_notes(args.notes)))
    print(f"report: {args.out}\nraw results: {raw_path}")


if __name__ == "__main__":
    main()
