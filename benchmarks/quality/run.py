"""Side-by-side quality benchmark of OTA/FFG against mergekit's merge methods, from scratch.

    .venv/bin/python -m benchmarks.quality.run --tier quick          # ~8 min on 2 idle CPU cores
    .venv/bin/python -m benchmarks.quality.run --tier full   # FullSettings.gpu() scale on a GPU, else
                                                             # the CPU budget (~55 min on 2 idle cores)
    .venv/bin/python -m benchmarks.quality.run --tier sft    # seeds 0 1 2, each cached, pooled in quality-sft.md
                                                             # (~55 min per seed on 2 cores: tiers.SftSettings)

Stages (each cached under ``--cache``, so a rerun skips what is finished):
base model -> one expert per capability (``transformers.Trainer``, AdamW, checkpoint with
``optimizer.pt``) -> ``mergekit-ota export`` of every expert's curvature (full and
``--compress rank1``) -> scores of base and experts -> every grid point of every
method merged by mergekit (``merges.py``), scored on validation and test -> per method
the grid point best on validation, reported on test -> single-expert grafting curves
(``grafting.py``) -> ``benchmarks/results/quality-<tier>.md`` and its plot.

The ``sft`` tier adds a multi-task reference after the experts, a real greedy-decoding check of
the references, keys its training runs by their own settings (``<base dir>-runs/``, shared by
settings that train the same), scores test only at each method's point chosen on validation
(``SftSettings.test_every_point`` for all), and writes ``report_sft``'s pooled report over seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from benchmarks.quality import grafting, merges
from benchmarks.quality.evaluate import greedy_answers, load_model, score_items
from benchmarks.quality.tiers import QUICK_VARIANTS, SFT_VARIANTS, Suite
from benchmarks.quality.train import checkpoint_of, export_curvature, train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

SPLITS = ("val", "test")
SFT_SEEDS = (0, 1, 2)  # the sft tier's default training seeds (pooled in quality-sft.md)
SFT_CPU_DENSITIES = (0.02, 0.1)  # the sft tier's grafting densities on a CPU (time budget; all six on a GPU)


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

    def __init__(
        self, suite: Suite, work: str, base_dir: str, device: str = "cpu", keep_models: bool = True, seed: int = 0
    ):
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
        paths, infos = {}, []
        for cap in self.suite.capabilities:
            path, info = self._train(base, self.suite.expert_rows(cap), self.run_dir(cap), self.suite.settings_of(cap))
            self.results.data["training"][f"expert/{cap}"] = info
            infos.append(info)
            self.log(
                f"expert {cap}: {path} ({info['steps']} steps, loss {_loss(info['first_loss'])} -> "
                f"{_loss(info['last_loss'])})"
            )
            paths[cap] = path
        self._training_stage("expert fine-tuning", infos)
        return paths

    def run_dir(self, name: str) -> str:
        """Where the training run ``name`` (a capability, or ``multitask``) lives.

        With ``suite.run_key`` (the sft tier) it is keyed by that run's own settings in a directory
        beside the work directory, so changing one expert's steps, the held-out sizes or the grids
        retrains nothing else; otherwise ``WORK/experts/CAP`` (``WORK/multitask``).
        """
        if self.suite.run_key is not None:
            return os.path.join(
                os.path.dirname(self.work),
                f"{os.path.basename(self.base_dir)}-runs",
                f"{name}-{self.suite.run_key(name)}",
            )
        return os.path.join(self.work, "multitask" if name == "multitask" else os.path.join("experts", name))

    def _train(self, base: str, rows: list, directory: str, settings: Any) -> Tuple[str, Dict[str, Any]]:
        from transformers import AutoModelForCausalLM

        finished = os.path.isfile(os.path.join(directory, "run.json")) and os.path.isfile(
            os.path.join(checkpoint_of(directory, settings.steps), "optimizer.pt")
        )  # train() reuses it: no model needed
        model = None if finished else AutoModelForCausalLM.from_pretrained(base, dtype="float32")
        return train(model, rows, directory, settings, self.suite.tokenizer, self.device, **self.suite.train_options)

    def multitask(self, base: str) -> Optional[str]:
        """The multi-task reference (trained on the union of the experts' rows), when the tier has one."""
        if self.suite.multitask_rows is None:
            return None
        path, info = self._train(
            base, self.suite.multitask_rows(), self.run_dir("multitask"), self.suite.multitask_settings
        )
        self.results.data["training"]["multitask"] = info
        self._training_stage("multi-task reference", [info])
        self.log(
            f"multitask: {path} ({info['steps']} steps, loss {_loss(info['first_loss'])} -> {_loss(info['last_loss'])})"
        )
        return path

    def curvature(self, base: str, experts: Dict[str, str]) -> merges.Experts:
        """Export each expert's checkpoint with ``mergekit-ota export`` (full and rank-1)."""
        full, rank1 = {}, {}
        with self.results.stage("curvature export"):
            for cap, checkpoint in experts.items():
                for kind, stores, compress in (("full", full, None), ("rank1", rank1, "rank1")):
                    out = self.store_path(cap, kind)
                    seconds = export_curvature(checkpoint, out, compress)
                    if seconds:
                        self.results.data["export"][f"{cap}/{kind}"] = {"seconds": seconds, "bytes": _size(out)}
                    stores[cap] = out
        return merges.Experts(base=base, models=experts, full_stores=full, rank1_stores=rank1)

    def store_path(self, cap: str, kind: str) -> str:
        """Where the export of ``cap``'s expert's curvature (``full`` or ``rank1``) is cached."""
        if self.suite.run_key is not None:  # next to its run: exported once per run
            return os.path.join(self.run_dir(cap), f"curvature-{kind}.safetensors")
        return os.path.join(self.work, "curvature", f"{cap}-{kind}.safetensors")

    def data_fisher(self, experts: merges.Experts) -> merges.Experts:
        """Each expert's data Fisher on the first N of its own training rows, for each N of
        ``suite.fisher_samples`` (:mod:`benchmarks.quality.fisher`; cached as the exports are), with its Spearman
        correlation to the expert's Adam store; ``experts`` with those stores added."""
        if not self.suite.fisher_samples:
            return experts
        from benchmarks.quality import fisher

        stores: Dict[int, Dict[str, str]] = {}
        with self.results.stage("data Fisher"):
            for n in self.suite.fisher_samples:
                for cap, checkpoint in experts.models.items():
                    out = os.path.join(self.work, "curvature", f"{cap}-fisher{n}.safetensors")
                    rows = self.suite.expert_rows(cap)[:n]
                    seconds = fisher.fisher_store(checkpoint, rows, out, self.suite.pad_id, self.device)
                    record = self.results.data.setdefault("fisher", {}).setdefault(f"{cap}/{n}", {})
                    if seconds:
                        record["seconds"] = seconds
                    if "median" not in record:
                        record.update(fisher.compare_with_adam(out, experts.full_stores[cap]))
                        self.log(f"data Fisher {cap}, N={n}: Spearman with Adam v, median {record['median']:.3f}")
                    stores.setdefault(n, {})[cap] = out
            self.results.save()
        return dataclasses.replace(experts, fisher_stores=stores)

    # --- scoring ------------------------------------------------------------------------

    def rows(self, cap: str, split: str) -> list:
        key = (cap, split)
        if key not in self._rows:
            self._rows[key] = self.suite.eval_rows(cap, split)
        return self._rows[key]

    def score(self, path: str, splits: Sequence[str], caps: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        """``{split: {capability: score_rows result}}`` of the model at ``path``."""
        model = load_model(path, self.device)
        out: Dict[str, Any] = {"score_seconds": {}}
        for split in splits:
            started = time.perf_counter()
            out[split] = {
                cap: score_items(
                    model,
                    self.rows(cap, split),
                    self.suite.pad_id,
                    self.suite.eval_batch_size,
                    self.device,
                    **self.suite.score_options,
                )
                for cap in caps or self.suite.capabilities
            }
            out["score_seconds"][split] = time.perf_counter() - started
        return out

    def greedy_check(self, key: str, path: str) -> None:
        """Decode the first ``suite.greedy_check`` test items of every skill with ``model.generate`` and
        record, per skill, how often real greedy decoding's exact match agrees with the stored teacher-forced one."""
        count = self.suite.greedy_check
        record = self.results.models[key]
        if not count or "greedy_check" in record:
            return
        from benchmarks.quality.skills import answer_of, end_of_turn_id

        model = load_model(path, self.device)
        end = end_of_turn_id(self.suite.tokenizer)
        check = {}
        for cap in self.suite.capabilities:
            rows = self.rows(cap, "test")[:count]
            decoded = greedy_answers(
                model,
                self.suite.tokenizer,
                rows,
                end,
                self.suite.eval_batch_size,
                self.device,
                bf16=self.suite.score_options.get("bf16", False),
            )
            greedy = ["1" if answer == answer_of(row) else "0" for answer, row in zip(decoded, rows)]
            forced = record["test"][cap]["items"][:count]
            check[cap] = {
                "items": len(rows),
                "greedy_exact": greedy.count("1"),
                "agree": sum(a == b for a, b in zip(greedy, forced)),
            }
        record["greedy_check"] = check
        self.results.save()

    def reference(self, key: str, path: str) -> None:
        if key not in self.results.models:
            self.results.models[key] = self.score(path, SPLITS)
            self.results.save()

    def recorded(self, key: str, config: Dict[str, Any]) -> bool:
        """Whether the merge ``key`` is in the results for this same ``config`` (a rerun skips it; a record made
        before configs were recorded is trusted)."""
        record = self.results.models.get(key)
        return record is not None and record.get("config", config) == config

    def merged(
        self,
        key: str,
        config: Dict[str, Any],
        directory: str,
        splits: Sequence[str],
        caps: Optional[Sequence[str]] = None,
    ) -> None:
        """Merge ``config`` into ``merged/DIRECTORY`` (its YAML to ``configs/DIRECTORY.yml``) and score it.

        Skipped when :meth:`recorded`; the merged weights are deleted after scoring unless ``keep_models``.
        """
        if self.recorded(key, config):
            return
        merges.write_config(config, os.path.join(self.work, "configs", directory + ".yml"))
        out = os.path.join(self.work, "merged", directory)
        shutil.rmtree(out, ignore_errors=True)
        seconds = merges.run_config(config, out, seed=self.seed)
        record = self.score(out, splits, caps)
        record["merge_seconds"] = seconds
        record["config"] = config
        _record_auto(record, out)
        self.results.models[key] = record
        self.results.save()
        if not self.keep_models:
            shutil.rmtree(out, ignore_errors=True)

    def method_grid(self, settings: Sequence[merges.Setting]) -> None:
        """One method's grid, test scored only at its point chosen on validation (``suite.test_chosen_only``).

        Every point is merged and scored on validation (its weights kept until the grid is done); the
        point :func:`paired.choose` picks (best validation gain kept) is then scored on test. A
        rerun skips what is recorded and merges a chosen point again only if its test score is missing.
        """
        from benchmarks.quality import paired

        for setting in settings:
            key = f"merge/{setting.method}/{setting.label}"
            if self.recorded(key, setting.config):
                continue
            out = os.path.join(self.work, "merged", setting.slug)
            merges.write_config(setting.config, os.path.join(self.work, "configs", setting.slug + ".yml"))
            shutil.rmtree(out, ignore_errors=True)
            seconds = merges.run_config(setting.config, out, seed=self.seed)
            record = self.score(out, ("val",))
            record["merge_seconds"] = seconds
            record["config"] = setting.config
            _record_auto(record, out)
            self.results.models[key] = record
            self.results.save()
        partial = {
            "models": self.results.models,
            "settings": [
                {"method": s.method, "label": s.label, "key": f"merge/{s.method}/{s.label}"} for s in settings
            ],
        }
        best = paired.choose(self.suite, partial)[settings[0].method]
        record = self.results.models[best["key"]]
        if "test" not in record:
            chosen = next(s for s in settings if f"merge/{s.method}/{s.label}" == best["key"])
            out = os.path.join(self.work, "merged", chosen.slug)
            if not os.path.isfile(os.path.join(out, "config.json")):
                shutil.rmtree(out, ignore_errors=True)
                merges.run_config(chosen.config, out, seed=self.seed)
            scored = self.score(out, ("test",))
            record["test"] = scored["test"]
            record.setdefault("score_seconds", {})["test"] = scored["score_seconds"]["test"]
            self.results.save()
        for setting in settings:
            shutil.rmtree(os.path.join(self.work, "merged", setting.slug), ignore_errors=True)

    def grafts(self, base: str, experts: merges.Experts, densities: Sequence[float]) -> None:
        """Single-expert grafts: every (expert, selector, density) of the curves, scored on test; with
        ``suite.auto_grafts`` (sft), ``density: auto`` at each saliency mass and the knee rule, scored on val + test."""
        planned = grafting.plan(self.suite.capabilities, tuple(densities))
        if experts.fisher_stores:  # FFG with the data Fisher of the largest N in place of Adam's v
            fisher_stores = experts.fisher_stores[max(experts.fisher_stores)]
            planned += [(cap, grafting.FISHER, d) for cap in self.suite.capabilities for d in densities]
        for index, (cap, selector, density) in enumerate(planned):
            store = fisher_stores[cap] if selector == grafting.FISHER else experts.full_stores[cap]
            config = grafting.graft_config(selector, base, experts.models[cap], store, density)
            self.merged(
                f"graft/{cap}/{selector}/{density:g}",
                config,
                merges.slug(f"graft {cap} {selector} {density:g}"),
                ("test",),
                (cap,),
            )
            if (index + 1) % len(densities) == 0:
                self.log(f"grafts {index + 1}/{len(planned)}: {cap} {selector}")
        masses = self.suite.auto_grafts if densities else ()
        for cap in self.suite.capabilities if masses else ():
            for mass in masses:
                config = grafting.auto_graft_config(base, experts.models[cap], experts.full_stores[cap], mass)
                self.merged(
                    f"graft/{cap}/{grafting.AUTO}/{mass:g}",
                    config,
                    merges.slug(f"graft {cap} auto {mass:g}"),
                    SPLITS,
                    (cap,),
                )
            self.log(f"grafts {grafting.AUTO}: {cap} at saliency mass {', '.join(f'{m:g}' for m in masses)}")
        from benchmarks.quality import saliency

        for cap in self.suite.capabilities if masses else ():  # the knee rule, density: auto's other candidate
            key = f"graft/{cap}/{grafting.KNEE}/mean"
            if key not in self.results.models:
                found = saliency.knee(base, experts.models[cap], experts.full_stores[cap])
                config = grafting.knee_graft_config(
                    base, experts.models[cap], experts.full_stores[cap], found["threshold"]
                )
                self.merged(key, config, merges.slug(f"graft {cap} knee"), SPLITS, (cap,))
                self.results.models[key]["knee"] = found
                self.results.save()
                self.log(
                    f"graft {grafting.KNEE}: {cap} keeps {100 * found['density']:.2f}% of entries, "
                    f"{found['mass']:.3f} of its saliency"
                )

    # --- the whole run ------------------------------------------------------------------

    def run(
        self,
        methods: Optional[Sequence[str]] = None,
        densities: Sequence[float] = grafting.DENSITIES,
        stop_after: Optional[str] = None,
    ) -> Dict[str, Any]:
        """Every stage in order; ``stop_after="references"`` ends after base, experts (and multitask) are scored,
        ``"merges"`` leaves out the grafting curves."""
        base = self.base()
        experts = self.data_fisher(self.curvature(base, self.experts(base)))
        multitask = self.multitask(base)
        references = {"base": base, **{f"expert/{cap}": path for cap, path in experts.models.items()}}
        if multitask:
            references["multitask"] = multitask
        with self.results.stage("scoring base and experts"):
            for key, path in references.items():
                self.reference(key, path)
                self.log(
                    f"scored {key}: "
                    + ", ".join(
                        f"{c} {self.results.models[key]['test'][c]['exact_match']:.3f}" for c in self.suite.capabilities
                    )
                )
        if self.suite.greedy_check:
            with self.results.stage("greedy decoding check"):
                for key, path in references.items():
                    self.greedy_check(key, path)
        if stop_after == "references":
            self.results.save()
            return self.results.data
        settings = merges.settings(experts, only=methods)
        with self.results.stage("merges (grid) + scoring"):
            if self.suite.test_chosen_only:
                for method in dict.fromkeys(s.method for s in settings):
                    grid = [s for s in settings if s.method == method]
                    self.method_grid(grid)
                    self.log(f"merged {method}: {len(grid)} settings")
            else:
                for index, setting in enumerate(settings):
                    self.merged(f"merge/{setting.method}/{setting.label}", setting.config, setting.slug, SPLITS)
                    self.log(f"merge {index + 1}/{len(settings)}: {setting.method} {setting.label}")
        if stop_after == "merges":
            densities = ()
        with self.results.stage("grafting + scoring"):
            self.grafts(base, experts, densities)
        self.results.data["settings"] = [
            {"method": s.method, "label": s.label, "key": f"merge/{s.method}/{s.label}", "config": s.slug}
            for s in settings
        ]
        ran = {s.method for s in settings}
        self.results.data["grids"] = {m.name: m.grid_text() for m in merges.methods() if m.name in ran}
        self.results.data["densities"] = list(densities)
        self.results.data["auto_masses"] = list(self.suite.auto_grafts if densities else ())
        self.results.save()
        return self.results.data


def _record_auto(record: Dict[str, Any], out: str) -> None:
    """Add ``density_auto``, ``{expert: density auto chose}``, from the merge's provenance (when it used auto)."""
    from mergekit_ota.graph.provenance import PROVENANCE_FILE

    path = os.path.join(out, PROVENANCE_FILE)
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as fp:
        experts = json.load(fp).get("experts", [])
    chosen = {e["model"]: e["density_auto"]["density"] for e in experts if e.get("density_auto")}
    if chosen:
        record["density_auto"] = chosen


def _loss(value: Optional[float]) -> str:
    return "?" if value is None else f"{value:.3f}"


def _size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
    return os.path.getsize(path)


def build_suite(args: argparse.Namespace) -> Suite:
    """The suite for ``--tier`` (with ``--smoke`` overrides: minutes become seconds; ``--expert-*`` overrides)."""
    suite = _tier_suite(args)
    settings = suite.settings
    if args.variant:
        variants = {"quick": QUICK_VARIANTS, "sft": SFT_VARIANTS}.get(args.tier, {})
        if args.smoke or args.variant not in variants:
            raise SystemExit(f"--variant {args.variant}: the {args.tier} tier has {sorted(variants) or 'none'}")
        from benchmarks.quality.tiers import tier_variant

        settings = tier_variant(settings, args.variant)
    if args.tier == "sft" and args.expert_steps is not None:
        raise SystemExit(
            "--expert-steps: the sft tier's experts train for per-skill lengths; use --skill-steps SKILL=N"
        )
    expert = {k: v for k, v in (("steps", args.expert_steps), ("learning_rate", args.expert_lr)) if v is not None}
    if expert:
        settings = settings.model_copy(update={"expert": settings.expert.model_copy(update=expert)})
    if getattr(args, "skill_steps", None):
        if args.tier != "sft":
            raise SystemExit("--skill-steps: only the sft tier trains its experts for per-skill lengths")
        steps = dict(settings.expert_steps)
        for part in args.skill_steps:
            name, _, value = part.partition("=")
            steps[name] = int(value)
        settings = settings.model_copy(update={"expert_steps": steps})
    if args.tier == "sft" and args.capabilities and not args.smoke:
        settings = settings.model_copy(update={"skills": tuple(args.capabilities)})
    if args.seed:
        settings = with_seed(settings, args.seed)
    if args.capabilities and args.tier == "quick" and not args.smoke:
        settings = settings.model_copy(update={"capabilities": tuple(args.capabilities)})
    if args.pretrain_steps is not None or args.pretrain_hard_share is not None:
        if args.tier != "quick":
            raise SystemExit("--pretrain-steps/--pretrain-hard-share: only the quick tier pretrains its base")
        if args.pretrain_steps is not None:
            settings = settings.model_copy(
                update={"pretrain": settings.pretrain.model_copy(update={"steps": args.pretrain_steps})}
            )
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
    if args.tier == "sft":
        from benchmarks.quality.tiers import SftSettings, sft_suite

        if settings is not None:
            return sft_suite(settings)
        return sft_suite(SftSettings.smoke() if args.smoke else SftSettings())
    if args.tier == "quick":
        from benchmarks.quality.tiers import QuickSettings, TrainSettings, quick_suite

        if settings is not None:
            return quick_suite(settings)
        if not args.smoke:
            return quick_suite(QuickSettings())
        tiny = dict(batch_size=16, learning_rate=1e-2, warmup_steps=0)
        return quick_suite(
            QuickSettings(
                capabilities=tuple(args.capabilities or ("reverse", "modadd")),
                hidden_size=32,
                layers=2,
                intermediate_size=64,
                # experts: enough steps for each to lower its own held-out loss by > MIN_GAIN (G is defined)
                pretrain=TrainSettings(steps=30, **tiny),
                expert=TrainSettings(steps=60, seed=1, **{**tiny, "learning_rate": 3e-3}),
                val_examples=16,
                test_examples=16,
                metric="token_accuracy",
            )
        )
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
    if args.tier == "sft" and not args.device.startswith("cuda"):
        return SFT_CPU_DENSITIES
    return grafting.DENSITIES


def make_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m benchmarks.quality.run``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tier", choices=("quick", "full", "sft"), default="quick")
    parser.add_argument("--smoke", action="store_true", help="tiny settings: proves the pipeline end to end in seconds")
    parser.add_argument(
        "--cache",
        default=os.path.join(REPO, "benchmarks", ".cache", "quality"),
        help="work directory root (models, stores, merges, results.json); reruns reuse it",
    )
    parser.add_argument("--results", default=os.path.join(REPO, "benchmarks", "results"), help="where the report goes")
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (cuda when torch sees a GPU, else cpu), cpu or cuda: training and scoring; merges run on CPU",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: 1 for quick, whose ops are too small to gain from more, and for sft "
        "(see tiers.SftSettings); all for full)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="training seed (data, init, order; also mergekit's random_seed): 0 is the published run; "
        "another seed gets its own cache and report quality-<tier>-seed<N>.md",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="sft: the training seeds to run (each cached on its own) and pool in one report "
        "(default 0 1 2; --seed N alone runs and reports that one seed)",
    )
    parser.add_argument(
        "--skill-steps",
        nargs="*",
        default=None,
        metavar="SKILL=STEPS",
        help="sft: override an expert's training steps, e.g. snake=60",
    )
    parser.add_argument(
        "--stop-after",
        choices=("references", "merges"),
        default=None,
        help="references: end after base, experts (and the multi-task reference) are trained and "
        "scored; merges: skip the grafting curves",
    )
    parser.add_argument(
        "--variant",
        choices=tuple(dict.fromkeys([*QUICK_VARIANTS, *SFT_VARIANTS])),
        default=None,
        help="quick and sft: experts trained otherwise (tiers.QUICK_VARIANTS, SFT_VARIANTS: constant = constant "
        "learning rate, lengths 10x apart; lr (quick) = learning rates 10x apart), for choosing defaults by their "
        "worst case (regret.py)",
    )
    parser.add_argument("--methods", nargs="*", help="only these methods (names as in the report)")
    parser.add_argument(
        "--study",
        choices=("defaults",),
        default=None,
        help="defaults: only the methods regret.py chooses the defaults from (merges.DEFAULTS_STUDY)",
    )
    parser.add_argument("--capabilities", nargs="*", help="quick: which capabilities (default: the tier's)")
    parser.add_argument("--densities", type=float, nargs="*", default=None, help="grafting densities")
    parser.add_argument("--expert-steps", type=int, default=None, help="override the tier's expert fine-tuning steps")
    parser.add_argument("--expert-lr", type=float, default=None, help="override the tier's expert learning rate")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="quick: override the base's pretraining steps")
    parser.add_argument(
        "--pretrain-hard-share",
        type=float,
        default=None,
        help="quick: override the share of hard-size examples in pretraining",
    )
    return parser


def locate(args: argparse.Namespace) -> Tuple[Suite, str, str, str]:
    """``(suite, run name, work directory, base directory)`` of a parsed command line.

    The run name (``quick``, ``full-smoke``, ``quick-seed1``, ``quick-constant-seed1``, ...) names the report; the
    directories carry the settings' fingerprints, so a cache is reused only for identical settings.
    """
    suite = build_suite(args)
    base_name = f"{suite.tier}{'-smoke' if args.smoke else ''}{f'-seed{args.seed}' if args.seed else ''}"
    variant = f"-{args.variant}" if getattr(args, "variant", None) else ""
    name = base_name.replace(suite.tier, suite.tier + variant, 1)
    work = os.path.join(args.cache, f"{name}-{suite.fingerprint()}")
    base_dir = os.path.join(
        args.cache, f"{base_name}-base-{suite.fingerprint(suite.base_keys)}"
    )  # shared by expert settings and variants
    if suite.tier == "sft" and not args.smoke:  # SmolLM2 converted once, shared by every seed and setting
        from benchmarks.quality.smollm import SFT_BASE_DIR

        base_dir = os.path.join(args.cache, SFT_BASE_DIR)
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
    # quick: ops too small to gain from threads; sft: measured robust (2 threads on 2 shared cores made a
    # Trainer step ~60 s instead of ~3 s, OpenMP threads waiting for each other); full: all cores
    torch.set_num_threads(args.threads or (1 if args.tier in ("quick", "sft") else os.cpu_count() or 1))
    started, load = time.perf_counter(), os.getloadavg()
    densities = tuple(args.densities or default_densities(args))
    if args.study == "defaults":
        args.methods = list(merges.DEFAULTS_STUDY)
    if args.tier == "sft":
        return _main_sft(args, argv, started, load, densities)
    suite, name, work, base_dir = locate(args)
    pipeline = Pipeline(suite, work, base_dir, args.device, keep_models=suite.tier == "quick", seed=args.seed)
    data = pipeline.run(args.methods, densities, args.stop_after)
    if args.stop_after:
        return data
    data["invocation"] = invocation(argv, started, load, args.device, work)
    pipeline.results.save()
    path = report.write(suite, data, args.results, name)
    pipeline.log(f"report: {path}")
    return data


def invocation(
    argv: Optional[List[str]], started: float, load: Tuple[float, ...], device: str, work: str
) -> Dict[str, Any]:
    """What a report says about the run that made it: its command line, wall time, load, threads and device."""
    import torch

    return {
        "argv": ["python", "-m", "benchmarks.quality.run", *(argv if argv is not None else sys.argv[1:])],
        "wall": time.perf_counter() - started,
        "load_before": load,
        "load_after": os.getloadavg(),
        "threads": torch.get_num_threads(),
        "device": device,
        "work": work,
    }


def sft_seeds(args: argparse.Namespace) -> List[int]:
    """The sft tier's seeds: ``--seeds``, else ``--seed`` when given (non-zero), else :data:`SFT_SEEDS`."""
    if args.seeds:
        return list(dict.fromkeys(args.seeds))
    return [args.seed] if args.seed else list(SFT_SEEDS)


def sft_report_name(args: argparse.Namespace, seeds: Sequence[int]) -> str:
    """``sft`` for the default seeds, ``sft-seed1`` for one other seed, ``sft-seeds0-1`` otherwise (``-smoke``
    added)."""
    smoke = "-smoke" if args.smoke else ""
    if list(seeds) == list(SFT_SEEDS):
        return f"sft{smoke}"
    if len(seeds) == 1:
        return f"sft{smoke}-seed{seeds[0]}"
    return f"sft{smoke}-seeds{'-'.join(map(str, seeds))}"


def _main_sft(
    args: argparse.Namespace,
    argv: Optional[List[str]],
    started: float,
    load: Tuple[float, ...],
    densities: Sequence[float],
) -> Dict[str, Any]:
    """Run every seed of the sft tier (each its own cached work directory), then the pooled report."""

    from benchmarks.quality import report_sft

    seeds = sft_seeds(args)
    runs = []
    for seed in seeds:
        seed_args = argparse.Namespace(**{**vars(args), "seed": seed})
        suite, _, work, base_dir = locate(seed_args)
        pipeline = Pipeline(suite, work, base_dir, args.device, keep_models=False, seed=seed)
        pipeline.log(f"sft seed {seed}: {work}")
        data = pipeline.run(args.methods, densities, args.stop_after)
        data["invocation"] = invocation(argv, started, load, args.device, work)
        pipeline.results.save()
        runs.append((seed, suite, data))
    if args.stop_after == "merges":  # the defaults study reads results.json (regret.py); no report
        return {"seeds": {seed: data for seed, _, data in runs}}
    name = sft_report_name(args, seeds)
    path = report_sft.write(runs, args.results, name, partial=args.stop_after == "references")
    print(f"report: {path}", flush=True)
    return {"seeds": {seed: data for seed, _, data in runs}, "report": path}


if __name__ == "__main__":
    main()
