"""Side-by-side quality benchmark of OTA/FFG against mergekit's merge methods, from scratch.

    .venv/bin/python -m benchmarks.quality.run --tier quick          # ~8 min on 2 idle CPU cores
    .venv/bin/python -m benchmarks.quality.run --tier full   # FullSettings.gpu() scale on a GPU, else
                                                             # the CPU budget (~55 min on 2 idle cores)

Stages (each cached under ``--cache``, so a rerun skips what is finished):
base model -> one expert per capability (``transformers.Trainer``, AdamW, checkpoint with
``optimizer.pt``) -> ``mergekit-ota export`` of every expert's curvature (full and
``--compress rank1``) -> scores of base and experts -> every grid point of every
method merged by mergekit (``merges.py``), scored on validation and test -> per method
the grid point best on validation, reported on test -> single-expert grafting curves
(``grafting.py``) -> ``benchmarks/results/quality-<tier>.md`` and its plot.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:  # `python benchmarks/quality/run.py` as well as `python -m benchmarks.quality.run`
    sys.path.insert(0, REPO)

from benchmarks.quality import grafting, merges  # noqa: E402
from benchmarks.quality.evaluate import load_model, score_rows  # noqa: E402
from benchmarks.quality.tiers import Suite  # noqa: E402
from benchmarks.quality.train import export_curvature, train  # noqa: E402

SPLITS = ("val", "test")


class Results:
    """``results.json`` in the work directory: every score, merge time and stage time, saved as it grows."""

    def __init__(self, path: str):
        self.path = path
        self.data: Dict[str, Any] = {"models": {}, "stages": {}, "training": {}, "export": {}}
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as fp:
                self.data.update(json.load(fp))

    def save(self) -> None:
        from mergekit_ota.io.atomic import write_text

        write_text(self.path, json.dumps(self.data, indent=1))

    @property
    def models(self) -> Dict[str, Any]:
        return self.data["models"]

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Add this stage's wall and CPU seconds (this process, all threads) to its running totals."""
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            record = self.data["stages"].setdefault(name, {"wall": 0.0, "cpu": 0.0})
            record["wall"] += time.perf_counter() - wall
            record["cpu"] += time.process_time() - cpu
            self.save()


class Pipeline:
    """One tier's run in ``work``: trains, exports, merges, scores (see the module docstring)."""

    def __init__(self, suite: Suite, work: str, base_dir: str, device: str = "cpu", keep_models: bool = True,
                 seed: int = 0):  # fmt: skip
        self.suite = suite
        self.work = work
        self.base_dir = base_dir
        self.device = device
        self.keep_models = keep_models
        self.seed = seed
        os.makedirs(work, exist_ok=True)
        self.results = Results(os.path.join(work, "results.json"))
        self._rows: Dict[tuple, list] = {}

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    # --- models -------------------------------------------------------------------------

    def _training_stage(self, name: str, infos: List[Dict[str, Any]]) -> None:
        """Stage time of training runs = their own recorded seconds (also when reused from the cache)."""
        self.results.data["stages"][name] = {
            "wall": sum(info.get("seconds", 0.0) for info in infos),
            "cpu": sum(info.get("cpu_seconds", info.get("seconds", 0.0)) for info in infos),
        }
        self.results.save()

    def base(self) -> str:
        path, info = self.suite.build_base(self.base_dir, self.device)
        self.results.data["training"]["base"] = info
        self._training_stage("base model", [info])
        self.log(f"base: {path} ({info.get('seconds', 0):.0f}s)")
        return path

    def experts(self, base: str) -> Dict[str, str]:
        from transformers import AutoModelForCausalLM

        paths, infos = {}, []
        for cap in self.suite.capabilities:
            model = AutoModelForCausalLM.from_pretrained(base, dtype="float32")
            path, info = train(model, self.suite.expert_rows(cap), os.path.join(self.work, "experts", cap),
                               self.suite.expert_settings, self.suite.tokenizer, self.device)  # fmt: skip
            self.results.data["training"][f"expert/{cap}"] = info
            infos.append(info)
            self.log(f"expert {cap}: {path} (loss {info['first_loss']:.3f} -> {info['last_loss']:.3f})")
            paths[cap] = path
        self._training_stage("expert fine-tuning", infos)
        return paths

    def curvature(self, base: str, experts: Dict[str, str]) -> merges.Experts:
        """Export each expert's checkpoint with ``mergekit-ota export`` (full and rank-1)."""
        full, rank1 = {}, {}
        with self.results.stage("curvature export"):
            for cap, checkpoint in experts.items():
                for kind, stores, compress in (("full", full, None), ("rank1", rank1, "rank1")):
                    out = os.path.join(self.work, "curvature", f"{cap}-{kind}.safetensors")
                    seconds = export_curvature(checkpoint, out, compress)
                    if seconds:
                        self.results.data["export"][f"{cap}/{kind}"] = {"seconds": seconds, "bytes": _size(out)}
                    stores[cap] = out
        return merges.Experts(base=base, models=experts, full_stores=full, rank1_stores=rank1)

    # --- scoring ------------------------------------------------------------------------

    def rows(self, cap: str, split: str) -> list:
        key = (cap, split)
        if key not in self._rows:
            self._rows[key] = self.suite.eval_rows(cap, split)
        return self._rows[key]

    def score(self, path: str, splits: Sequence[str], caps: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        """``{split: {capability: score_rows result}}`` of the model at ``path``."""
        model = load_model(path, self.device)
        out: Dict[str, Any] = {}
        for split in splits:
            out[split] = {
                cap: score_rows(model, self.rows(cap, split), self.suite.pad_id, self.suite.eval_batch_size, self.device)
                for cap in caps or self.suite.capabilities
            }
        return out

    def reference(self, key: str, path: str) -> None:
        if key not in self.results.models:
            self.results.models[key] = self.score(path, SPLITS)
            self.results.save()

    def merged(self, key: str, config: Dict[str, Any], directory: str, splits: Sequence[str],
               caps: Optional[Sequence[str]] = None) -> None:  # fmt: skip
        """Merge ``config`` into ``merged/DIRECTORY`` (its YAML to ``configs/DIRECTORY.yml``) and score it.

        Skipped when ``key`` is already in the results (a rerun); the merged weights are deleted
        after scoring unless ``keep_models``.
        """
        if key in self.results.models:
            return
        merges.write_config(config, os.path.join(self.work, "configs", directory + ".yml"))
        out = os.path.join(self.work, "merged", directory)
        shutil.rmtree(out, ignore_errors=True)
        seconds = merges.run_config(config, out, seed=self.seed)
        record = self.score(out, splits, caps)
        record["merge_seconds"] = seconds
        self.results.models[key] = record
        self.results.save()
        if not self.keep_models:
            shutil.rmtree(out, ignore_errors=True)

    # --- the whole run ------------------------------------------------------------------

    def run(self, methods: Optional[Sequence[str]] = None, densities: Sequence[float] = grafting.DENSITIES) -> Dict[str, Any]:
        base = self.base()
        experts = self.curvature(base, self.experts(base))
        with self.results.stage("scoring base and experts"):
            self.reference("base", base)
            for cap, path in experts.models.items():
                self.reference(f"expert/{cap}", path)
        settings = merges.settings(experts, only=methods)
        with self.results.stage("merges (grid) + scoring"):
            for index, setting in enumerate(settings):
                self.merged(f"merge/{setting.method}/{setting.label}", setting.config, setting.slug, SPLITS)
                self.log(f"merge {index + 1}/{len(settings)}: {setting.method} {setting.label}")
        planned = grafting.plan(self.suite.capabilities, tuple(densities))
        with self.results.stage("grafting + scoring"):
            for index, (cap, selector, density) in enumerate(planned):
                config = grafting.graft_config(selector, base, experts.models[cap], experts.full_stores[cap], density)
                self.merged(f"graft/{cap}/{selector}/{density:g}", config,
                            merges.slug(f"graft {cap} {selector} {density:g}"), ("test",), (cap,))  # fmt: skip
                if (index + 1) % len(densities) == 0:
                    self.log(f"grafts {index + 1}/{len(planned)}: {cap} {selector}")
        self.results.data["settings"] = [
            {"method": s.method, "label": s.label, "key": f"merge/{s.method}/{s.label}", "config": s.slug}
            for s in settings
        ]
        self.results.data["grids"] = {m.name: m.grid_text() for m in merges.methods() if not methods or m.name in methods}
        self.results.data["densities"] = list(densities)
        self.results.save()
        return self.results.data


def _size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
    return os.path.getsize(path)


def build_suite(args: argparse.Namespace) -> Suite:
    """The suite for ``--tier`` (with ``--smoke`` overrides: minutes become seconds; ``--expert-*`` overrides)."""
    suite = _tier_suite(args)
    settings = suite.settings
    expert = {k: v for k, v in (("steps", args.expert_steps), ("learning_rate", args.expert_lr)) if v is not None}
    if expert:
        settings = settings.model_copy(update={"expert": settings.expert.model_copy(update=expert)})
    if args.seed:
        settings = with_seed(settings, args.seed)
    if args.capabilities and args.tier == "quick" and not args.smoke:
        settings = settings.model_copy(update={"capabilities": tuple(args.capabilities)})
    if args.pretrain_steps is not None or args.pretrain_hard_share is not None:
        if args.tier != "quick":
            raise SystemExit("--pretrain-steps/--pretrain-hard-share: only the quick tier pretrains its base")
        if args.pretrain_steps is not None:
            settings = settings.model_copy(update={"pretrain": settings.pretrain.model_copy(update={"steps": args.pretrain_steps})})
        if args.pretrain_hard_share is not None:
            settings = settings.model_copy(update={"pretrain_hard_share": args.pretrain_hard_share})
    return suite if settings is suite.settings else _tier_suite(args, settings)


def with_seed(settings: Any, seed: int) -> Any:
    """``settings`` with every seed moved to ``seed``: data, init, Trainer order (``seed + 1`` for experts).

    The quick tier's base is then pretrained again from its own random init; the full tier's
    base is fixed (SmolLM2), so only the experts' data order and held-out sample change.
    """
    update: Dict[str, Any] = {"seed": seed, "expert": settings.expert.model_copy(update={"seed": seed + 1})}
    if hasattr(settings, "pretrain"):
        update["pretrain"] = settings.pretrain.model_copy(update={"seed": seed})
    return settings.model_copy(update=update)


def _tier_suite(args: argparse.Namespace, settings: Optional[Any] = None) -> Suite:
    if args.tier == "quick":
        from benchmarks.quality.tiers import QuickSettings, TrainSettings, quick_suite

        if settings is not None:
            return quick_suite(settings)
        if not args.smoke:
            return quick_suite(QuickSettings())
        tiny = dict(batch_size=16, learning_rate=1e-2, warmup_steps=0)
        return quick_suite(QuickSettings(
            capabilities=tuple(args.capabilities or ("reverse", "modadd")),
            hidden_size=32, layers=2, intermediate_size=64,
            pretrain=TrainSettings(steps=30, **tiny), expert=TrainSettings(steps=15, seed=1, **tiny),
            val_examples=16, test_examples=16, metric="token_accuracy",
        ))  # fmt: skip
    from benchmarks.quality.tiers import FullSettings, full_suite

    if settings is not None:
        return full_suite(settings)
    if args.smoke:
        return full_suite(FullSettings.smoke())
    return full_suite(FullSettings.gpu() if args.device.startswith("cuda") else FullSettings())


def default_densities(args: argparse.Namespace) -> Sequence[float]:
    """Grafting densities: all six, but two for --smoke and four for the full tier on a CPU (time budget)."""
    if args.smoke:
        return (0.05, 0.4)
    if args.tier == "full" and not args.device.startswith("cuda"):
        return (0.02, 0.05, 0.1, 0.4)
    return grafting.DENSITIES


def make_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m benchmarks.quality.run``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tier", choices=("quick", "full"), default="quick")
    parser.add_argument("--smoke", action="store_true", help="tiny settings: proves the pipeline end to end in seconds")
    parser.add_argument("--cache", default=os.path.join(REPO, "benchmarks", ".cache", "quality"),
                        help="work directory root (models, stores, merges, results.json); reruns reuse it")  # fmt: skip
    parser.add_argument("--results", default=os.path.join(REPO, "benchmarks", "results"), help="where the report goes")
    parser.add_argument("--device", default="auto",
                        help="auto (cuda when torch sees a GPU, else cpu), cpu or cuda: training and scoring; "
                             "merges run on CPU")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: 1 for quick, whose ops are too small to gain from more; all for full)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0,
                        help="training seed (data, init, order; also mergekit's random_seed): 0 is the published run; "
                             "another seed gets its own cache and report quality-<tier>-seed<N>.md")  # fmt: skip
    parser.add_argument("--methods", nargs="*", help="only these methods (names as in the report)")
    parser.add_argument("--capabilities", nargs="*", help="quick: which capabilities (default: the tier's)")
    parser.add_argument("--densities", type=float, nargs="*", default=None, help="grafting densities")
    parser.add_argument("--expert-steps", type=int, default=None, help="override the tier's expert fine-tuning steps")
    parser.add_argument("--expert-lr", type=float, default=None, help="override the tier's expert learning rate")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="quick: override the base's pretraining steps")
    parser.add_argument("--pretrain-hard-share", type=float, default=None,
                        help="quick: override the share of hard-size examples in pretraining")  # fmt: skip
    return parser


def locate(args: argparse.Namespace) -> Tuple[Suite, str, str, str]:
    """``(suite, run name, work directory, base directory)`` of a parsed command line.

    The run name (``quick``, ``full-smoke``, ``quick-seed1``, ...) names the report; the
    directories carry the settings' fingerprints, so a cache is reused only for identical settings.
    """
    suite = build_suite(args)
    name = f"{suite.tier}{'-smoke' if args.smoke else ''}{f'-seed{args.seed}' if args.seed else ''}"
    work = os.path.join(args.cache, f"{name}-{suite.fingerprint()}")
    base_dir = os.path.join(args.cache, f"{name}-base-{suite.fingerprint(suite.base_keys)}")  # shared by expert settings
    return suite, name, work, base_dir


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = make_parser().parse_args(argv)

    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    from transformers.utils import logging as hf_logging

    from benchmarks.quality import report

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads or (1 if args.tier == "quick" else os.cpu_count() or 1))
    started, load = time.perf_counter(), os.getloadavg()
    suite, name, work, base_dir = locate(args)
    pipeline = Pipeline(suite, work, base_dir, args.device, keep_models=suite.tier == "quick", seed=args.seed)
    densities = tuple(args.densities or default_densities(args))
    data = pipeline.run(args.methods, densities)
    data["invocation"] = {
        "argv": ["python", "-m", "benchmarks.quality.run", *(argv if argv is not None else sys.argv[1:])],
        "wall": time.perf_counter() - started,
        "load_before": load,
        "load_after": os.getloadavg(),
        "threads": torch.get_num_threads(),
        "device": args.device,
        "work": work,
    }
    pipeline.results.save()
    path = report.write(suite, data, args.results, name)
    pipeline.log(f"report: {path}")
    return data


if __name__ == "__main__":
    main()
