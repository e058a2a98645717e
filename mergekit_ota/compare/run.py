"""``mergekit-ota compare``: check everything, then merge and score each grid point, caching each in OUT.

Order of work (nothing is merged, and nothing written, before step 4):

1. OUT is checked against the output rules (:class:`~mergekit_ota.io.output.OutputDirectory`, policy
   :data:`COMPARE_OUTPUT`); CONFIG's base and experts are read; the methods and grids resolved.
2. DATA is read and tokenized with the base's tokenizer, grouped by capability and split in halves.
3. Every grid point's config is checked by ``check``'s code (:mod:`.preflight`).
4. OUT is claimed; the base and the experts are scored, then each grid point is merged with
   ``mergekit.merge.run_merge`` (what ``mergekit-yaml`` calls) into ``OUT/merges/<point>``, loaded, scored on
   every row, and its scores written to ``OUT/cache/<key>.json`` before its merge is deleted (kept with
   ``keep_merges``): disk holds one merged model at a time. A point whose key (:func:`.configs.cache_key`: its
   config, the merge and scoring options, the data rows, the input files' sizes and times) is cached is not
   merged again: an interrupted run is resumed by running it again.
5. ``results.json`` (every model's per-row scores), then ``report.md``, the figure and ``best.yml`` from it.

An existing OUT that an earlier compare made is resumed in place; ``--force`` starts it afresh (built beside
it, swapped in when done). Any other non-empty OUT is refused. A run that stops after step 4 began (an error
or Ctrl-C) keeps OUT with the points it finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from mergekit_ota.compare import configs, grid
from mergekit_ota.compare.cache import Cache
from mergekit_ota.compare.configs import Point
from mergekit_ota.compare.dataset import Dataset, read_dataset
from mergekit_ota.compare.merge import MERGES_DIR, PARTIAL, merge_and_score
from mergekit_ota.compare.report import write_outputs
from mergekit_ota.compare.score import RowScores, score_rows
from mergekit_ota.errors import ConfigError
from mergekit_ota.io.output import OutputDirectory, ReplacePolicy

MARKER = ".mergekit-ota-compare"
FORMAT = "mergekit-ota compare results 1"
COMPARE_OUTPUT = ReplacePolicy(
    what=f"the output of an earlier mergekit-ota compare (a directory holding {MARKER})",
    recognises=lambda path: os.path.isfile(os.path.join(path, MARKER)),
    flag="--force",
    resumable=True,  # each finished point is cached whole: a killed run's OUT is resumed, not refused
)


@dataclass(frozen=True)
class CompareOptions:
    """What ``mergekit-ota compare`` takes besides CONFIG, DATA, OUT and mergekit-yaml's options."""

    methods: Optional[Tuple[str, ...]] = None
    grids: Tuple[str, ...] = ()
    split: float = 0.5
    seed: int = 0
    max_length: int = 512
    batch_size: int = 8
    device: str = "cpu"
    dtype: str = "float32"
    replicates: int = 4000
    keep_merges: bool = False
    force: bool = False


def output(out: str, force: bool) -> OutputDirectory:
    """OUT under the output rules: an earlier compare's OUT is written in place (resumed), or replaced with
    ``force``; a missing or empty one is created; anything else is refused."""
    recognised = os.path.isdir(out) and COMPARE_OUTPUT.recognises(out)
    return OutputDirectory(out, COMPARE_OUTPUT, force=force, in_place=recognised and not force)


def _tokenizer(base: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(base, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{base}: the base's tokenizer does not load (DATA is tokenized with it): {err}") from err


def _option_fingerprint(merge_options: Any) -> Dict[str, Any]:
    fields = ("random_seed", "device", "cuda", "allow_crimes", "unsafe_truncate_embeddings", "lora_merge_dtype")
    return {name: getattr(merge_options, name, None) for name in fields}


def plan_points(
    inputs: configs.Inputs, methods: List[grid.MethodSpec], fingerprints: Mapping[str, str], merge_options: Any
) -> List[Point]:
    """Every grid point of every method, with its config and cache key."""
    points = []
    for method in methods:
        for knobs in method.grid:
            config = configs.point_config(inputs, method.merge_method, method.shared, knobs)
            key = configs.cache_key(
                "point",
                config,
                {
                    **fingerprints,
                    "merge": json.dumps(_option_fingerprint(merge_options), default=str),
                    "inputs": configs.inputs_fingerprint(configs.config_paths(config)),
                },
            )
            points.append(Point(method.name, method.label(knobs), dict(knobs), config, key))
    return points


def run_compare(
    config_path: str,
    data_path: str,
    out: str,
    options: CompareOptions,
    merge_options: Any,
    log: Callable[[str], None] = print,
    progress: Optional[Callable[[int], Any]] = None,
) -> Dict[str, Any]:
    """Compare the methods (see the module docstring); return the results (what ``results.json`` holds).

    ``merge_options``: mergekit's ``MergeOptions`` for every merge; ``log`` gets one line per finished point;
    ``progress(total)`` returns a bar (``update``/``close``) over the grid points.
    """
    from mergekit_ota.compare.preflight import check_points
    from mergekit_ota.devices import device_problem, merge_option_problems
    from mergekit_ota.integration import install

    install()  # ota and ffg registered with mergekit, its planner and run_merge patched, in this process
    output(out, options.force).check()
    problems = [f"--device {options.device}: {p}" for p in [device_problem(options.device)] if p]
    problems += merge_option_problems(merge_options)
    if problems:
        raise ConfigError("\n".join(dict.fromkeys(problems)))
    inputs = configs.read_inputs(config_path)
    methods = grid.resolve(options.methods, options.grids)
    tokenizer = _tokenizer(inputs.base)
    dataset = read_dataset(data_path, tokenizer, options.max_length, inputs.expert_paths, options.split, options.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    scoring = {"data": dataset.fingerprint(), "scoring": f"{options.dtype}/{options.device}"}
    points = plan_points(inputs, methods, scoring, merge_options)
    check_points([(p.name, p.config) for p in points], merge_options)

    merge_options.apply_global_options()  # as mergekit-yaml does first: logging, --random-seed, --num-threads
    with output(out, options.force) as directory:
        root = directory.build
        open(os.path.join(root, MARKER), "w").close()
        try:
            models = _score_all(inputs, dataset, pad, points, scoring, options, merge_options, root, log, progress)
            results = _results(config_path, data_path, inputs, methods, dataset, models, options, merge_options)
            write_outputs(root, results, log)
        finally:  # on success, and on an error or Ctrl-C: the finished points stay for a rerun to resume from
            _tidy(os.path.join(root, MERGES_DIR))
            directory.commit()
    return results


def _tidy(merges: str) -> None:
    """Remove a merge left unfinished, and the merges directory where nothing is kept in it."""
    shutil.rmtree(os.path.join(merges, PARTIAL), ignore_errors=True)
    with contextlib.suppress(OSError):
        os.rmdir(merges)  # only if empty


def _score_all(
    inputs: configs.Inputs,
    dataset: Dataset,
    pad: int,
    points: List[Point],
    scoring: Mapping[str, str],
    options: CompareOptions,
    merge_options: Any,
    root: str,
    log: Callable[[str], None],
    progress: Optional[Callable[[int], Any]],
) -> List[Dict[str, Any]]:
    from mergekit_ota.fisher import _load, split_model

    cache = Cache(root)
    models: List[Dict[str, Any]] = []

    def score(path: str) -> Tuple[RowScores, float]:
        started = time.perf_counter()
        base, adapter = split_model(path)  # an expert named BASE+ADAPTER is scored folded, as mergekit merges it
        model, _ = _load(base, options.dtype, options.device, adapter)  # right padding, masked: pad changes nothing
        scores = score_rows(model, dataset.rows, pad, options.batch_size, options.device)
        del model
        return scores, time.perf_counter() - started

    for kind, path in [("base", inputs.base)] + [("expert", p) for p in inputs.expert_paths]:
        key = configs.cache_key(
            "model", os.path.abspath(path), {**scoring, "inputs": configs.inputs_fingerprint([path])}
        )
        entry = cache.get(key)
        if entry is None:
            scores, seconds = score(path)
            entry = {"name": f"{kind} {path}", "kind": kind, "path": path, "scores": scores.to_json()}
            entry["score_seconds"] = seconds
            cache.put(key, entry)
        models.append({**entry, "key": key})

    bar = progress(len(points)) if progress else None
    shown: set = set()
    try:
        for number, point in enumerate(points, 1):
            entry = cache.get(point.key)
            cached = entry is not None
            if entry is None:
                entry = merge_and_score(point, root, merge_options, options.keep_merges, score)
                cache.put(point.key, entry)
            models.append({**entry, "key": point.key, "cached": cached})
            for note in entry.get("notes", []):
                if note not in shown:
                    shown.add(note)
                    log(note)
            log(
                f"[{number}/{len(points)}] {point.name}: loss {_loss(entry['scores']):.4f}"
                + (
                    " (cached)"
                    if cached
                    else f"  merge {entry['merge_seconds']:.1f}s  score {entry['score_seconds']:.1f}s"
                )
            )
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return models


def _loss(scores: Mapping[str, List[float]]) -> float:
    return sum(scores["nats"]) / max(1, sum(scores["tokens"]))


def _results(
    config_path: str,
    data_path: str,
    inputs: configs.Inputs,
    methods: List[grid.MethodSpec],
    dataset: Dataset,
    models: List[Dict[str, Any]],
    options: CompareOptions,
    merge_options: Any,
) -> Dict[str, Any]:
    return {
        "format": FORMAT,
        "config": os.path.abspath(config_path),
        "data": os.path.abspath(data_path),
        "base": inputs.base,
        "experts": {c: p for c, p in dataset.experts.items()},
        "capabilities": list(dataset.capabilities),
        "options": asdict(options),
        "merge_options": {k: v for k, v in merge_options.model_dump().items() if v is not None},
        "methods": [
            {"name": m.name, "merge_method": m.merge_method, "baseline": m.baseline, "title": m.title or m.name}
            for m in methods
        ],
        "rows": [
            {"origin": s.origin, "capability": c, "half": h, "answer": s.has_answer}
            for s, c, h in zip(dataset.samples, dataset.capability, dataset.halves)
        ],
        "models": models,
    }
