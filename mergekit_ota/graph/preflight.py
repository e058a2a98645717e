"""Preflight of an ``ota``/``ffg`` merge config (``mergekit-ota check``), without executing or writing.

The merge is planned exactly as ``mergekit-yaml`` plans it (the steps of
``mergekit.merge.run_merge`` up to ``MergePlanner``), so every problem the merge
would report at planning time comes from the same code
(:class:`~mergekit_ota.graph.planner.CurvaturePlan`): missing stores and tensors
(``slices:`` layer offsets, aliases and tied weights resolved as for the weights),
wrong shapes and dtypes, bad parameters, FFG without a base or a density.
Then the values of every curvature tensor the plan reads (its
:class:`~mergekit_ota.graph.tasks.LoadCurvature` tasks) are scanned for NaN, Inf
and negative numbers: a sample of each tensor by default, every value with
``full_scan``.
"""

from __future__ import annotations

import difflib
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from mergekit_ota.compat import planner_tensors
from mergekit_ota.curvature.scan import DEFAULT_SAMPLE, scan_entry
from mergekit_ota.curvature.store import CurvatureStore
from mergekit_ota.errors import ConfigError, OTAError, PreflightError, problem_of
from mergekit_ota.io.paths import regular_file

NEVER_WRITTEN = "<mergekit-ota check: no output>"  # the planned writer's path; no task ever runs
MERGEKIT_REFUSED = "mergekit cannot plan this merge"  # heads a problem that is mergekit's own exception


class NotACurvatureMerge(ConfigError):
    """The config's ``merge_method`` is not one of this plugin's: only its parameter names were checked.

    ``report`` holds those findings (:attr:`CheckReport.warnings`).
    """

    def __init__(self, message: str, report: "CheckReport"):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class StoreUse:
    """One curvature store as the planned merge uses it; ``untouched``: the weights a LoRA store gives curvature 0
    because its adapter leaves them as the base's (metadata ``adapter_untouched``; no tensor read)."""

    path: str
    experts: Tuple[str, ...]
    tensors: int
    full: int
    rank1: int
    values: int
    scanned: int
    untouched: int = 0


@dataclass(frozen=True)
class CheckReport:
    """Everything ``check`` found; ``ok`` when ``problems`` is empty.

    ``warnings``: parameter keys a method other than ota/ffg does not take (mergekit
    ignores them silently; for ota/ffg such keys are ``problems``), and curvature that
    may be on different scales because some expert cannot be bias-corrected.
    ``notes``: what bias correction does to each expert, and why; under ``curvature_scale``, that it
    replaces bias correction and where each expert's statistic will be computed (during the merge: it
    needs every curvature value, which check does not read). ``names_only``: the
    method does not use curvature, so nothing but parameter names was checked.
    """

    config: str
    method: str
    problems: Tuple[str, ...]
    warnings: Tuple[str, ...] = ()
    notes: Tuple[str, ...] = ()
    names_only: bool = False
    experts: Tuple[str, ...] = ()
    stores: Tuple[StoreUse, ...] = ()
    output_tensors: int = 0
    with_curvature: int = 0
    full_scan: bool = False
    sample: int = DEFAULT_SAMPLE
    seconds: float = 0.0
    header_problems: Tuple[str, ...] = field(default=(), repr=False)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> Dict[str, Any]:
        data = asdict(self)
        data.pop("header_problems")
        data["ok"] = self.ok
        return data


def parameter_warnings(config: Any) -> List[str]:
    """Parameter keys the config's (non-ota/ffg) merge method does not take where they are given.

    The names come from the registered method's ``spec``; mergekit's config reader asks
    only for those, so anything else is silently ignored by the merge.
    """
    from mergekit import merge_methods

    import mergekit_ota
    from mergekit_ota.methods.settings import unknown_parameters

    mergekit_ota.install()  # ota/ffg registered (whether or not the start-up hook is on), for the did-you-mean below

    try:
        spec = merge_methods.get(config.merge_method).spec
    except Exception:  # mergekit raises RuntimeError for a name it does not know
        names = sorted(m.spec.name for m in merge_methods.registered_methods())
        close = difflib.get_close_matches(str(config.merge_method), names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return [f"merge_method {config.merge_method!r} is not a registered mergekit method{hint}"]
    return [unknown.message(spec.name) for unknown in unknown_parameters(config, spec)]


def read_config(path: str, value_problems: Optional[List[str]] = None) -> Any:
    """Parse a mergekit YAML config as ``mergekit-yaml`` does; :class:`ConfigError` naming the file.

    With a ``value_problems`` list, an ``ota``/``ffg`` parameter value mergekit's parser would refuse is added to it
    as one line and the rest of the config is parsed (:func:`mergekit_ota.methods.settings.unreadable_values`)."""
    import yaml
    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError

    from mergekit_ota.methods.settings import unreadable_values

    regular_file(path, "merge config", ConfigError)  # a FIFO would block the read
    try:
        with open(path, "r", encoding="utf-8") as fp:
            data = yaml.safe_load(fp)
    except OSError as error:
        raise ConfigError(f"{path}: cannot read ({error})") from error
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as error:
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0][:200]})") from error
    if value_problems is not None:
        value_problems.extend(unreadable_values(data))
    try:
        return MergeConfiguration.model_validate(data)
    except RuntimeError as error:  # mergekit's own validator raises it (e.g. no 'models', 'slices' or 'modules')
        raise ConfigError(f"{path}: not a valid mergekit config ({error})") from error
    except ValidationError as error:
        details = "; ".join(
            f"{'.'.join(str(x) for x in item['loc']) or 'config'}: {item['msg']}" for item in error.errors()
        )
        raise ConfigError(f"{path}: not a valid mergekit config ({details})") from error


def lora_without_cache(config: Any, options: Any) -> List[str]:
    """A ``BASE+ADAPTER`` model with no ``--lora-merge-cache``: mergekit folds each adapter into its base there,
    and without one refuses the merge (``RuntimeError: Need to specify cache dir to merge adapters``)."""
    if getattr(options, "lora_merge_cache", None):
        return []
    loras = sorted(str(reference) for reference in config.referenced_models() if reference.lora is not None)
    if not loras:
        return []
    return [
        f"model {loras[0]}{f' (and {len(loras) - 1} more)' if len(loras) > 1 else ''} is a LoRA adapter on a base "
        f"(BASE+ADAPTER): mergekit folds it into the base in a directory it needs to be given; pass "
        f"--lora-merge-cache DIR (to mergekit-yaml, and to check)"
    ]


def lora_fold_notes(config: Any, options: Any) -> List[str]:
    """Planning a ``BASE+ADAPTER`` merge folds each adapter (mergekit does, to read the folded weights' headers):
    say where, since check otherwise writes nothing."""
    loras = {str(reference) for reference in config.referenced_models() if reference.lora is not None}
    if not loras or not getattr(options, "lora_merge_cache", None):
        return []
    return [
        f"mergekit folded {len(loras)} LoRA adapter(s) into --lora-merge-cache {options.lora_merge_cache} to plan "
        f"the merge (where it is not there yet); the merge reuses them"
    ]


def _looks_local(path: str) -> bool:
    """False only where ``path`` may be a Hub repo id: ``name``, or ``org/name`` with no local folder ``org``
    (the rule of :func:`mergekit_ota.curvature.hub.looks_like_repo_id`)."""
    from mergekit_ota.curvature.hub import looks_like_repo_id

    return not looks_like_repo_id(path, bare=True)


def _absent_models(config: Any) -> List[Tuple[str, str, Optional[str]]]:
    """``(kind, path, revision)`` of each model and LoRA of ``config`` whose path is no file or directory here."""
    absent = []
    for reference in config.referenced_models():
        for kind, part in (("model", reference.model), ("LoRA", reference.lora)):
            if part is not None and not os.path.exists(os.path.expanduser(str(part.path))):
                absent.append((kind, str(part.path), getattr(part, "revision", None)))
    return absent


def missing_local_models(config: Any, cache_dir: Optional[str] = None) -> List[str]:
    """Models that are no directory here and that mergekit would look up on the Hugging Face Hub in vain.

    * A local-looking path (:func:`_looks_local`: the rule of
      :func:`~mergekit_ota.curvature.hub.looks_like_repo_id`) that does not exist: mergekit would send it
      to the Hub as a repo id (retrying for ~30 s without a network before failing).
    * While ``HF_HUB_OFFLINE`` is set, a possible repo id (``org/name``, ``name``) that is no local
      directory: mergekit 0.1.5 cannot load a Hub id offline, even cached (its cached snapshot, in
      ``cache_dir`` or huggingface_hub's default cache, is named where there is one).

    Each is one line naming the path, ``no such directory (relative to CWD)``; nothing asks the Hub.
    """
    from huggingface_hub import constants

    from mergekit_ota.curvature.hub import cached_snapshot, no_such_directory
    from mergekit_ota.curvature.locate import MERGEKIT_OFFLINE_NOTE

    problems = []
    for kind, path, revision in _absent_models(config):
        if _looks_local(path):
            problems.append(f"{kind} {path}: {no_such_directory(path)}")
        elif constants.HF_HUB_OFFLINE:
            snapshot = cached_snapshot(path, revision, cache_dir)
            problems.append(
                f"{kind} {path}: {no_such_directory(path)}, and as a Hub repo id: {MERGEKIT_OFFLINE_NOTE}"
                + (f" ({snapshot})" if snapshot else "")
            )
    return problems


def hub_lookup_notes(config: Any) -> List[str]:
    """For a merge mergekit could not plan: each possible repo id that is no local directory, said to have been
    looked up on the Hub (the path may be a local one, mistyped or relative to another directory)."""
    from mergekit_ota.curvature.hub import no_such_directory

    return [
        f"{kind} {path}: {no_such_directory(path)}, so mergekit looked it up on the Hugging Face Hub as a repo id"
        for kind, path, _ in _absent_models(config)
        if not _looks_local(path)
    ]


def asked_of_the_hub(path: str) -> bool:
    """Whether mergekit's model-card step asks the Hugging Face Hub about local model path ``path``.

    ``mergekit/card.py``'s ``is_hf`` treats a path not starting with ``/`` or ``~`` and with at most
    one ``/`` as a possible repo id and calls ``huggingface_hub.repo_exists`` even when it exists
    locally; offline that raises after the weights are written. ``./org/name`` is never asked.
    """
    return bool(path) and path[0] not in "/~" and path.count("/") <= 1 and not path.startswith(".")


HUB_HINT = (
    "mergekit's model card asks the Hugging Face Hub whether a relative model path of at most two parts "
    "is a repo, even when it exists here (offline that fails after the weights are written); write such paths "
    "as ./{path} or absolute, or pass --no-write-model-card"
)


def hub_lookup_warnings(config: Any) -> List[str]:
    """Local model paths that the model-card step would look up on the Hub (see :func:`asked_of_the_hub`)."""
    paths = sorted({str(r.model.path) for r in config.referenced_models()})
    asked = [p for p in paths if asked_of_the_hub(p) and os.path.exists(os.path.expanduser(p))]
    if not asked:
        return []
    return [f"model path(s) {', '.join(asked)}: " + HUB_HINT.format(path=asked[0])]


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json")


def _weight_files_are_regular(directory: str) -> None:
    """Refuse a local model directory holding a weights or index file that is no regular file (a FIFO, a device):
    mergekit's tensor loader opens every such file and would block on it. Hub ids (no such directory) pass."""
    if not os.path.isdir(directory):
        return
    for name in sorted(os.listdir(directory)):
        if name.endswith(WEIGHT_SUFFIXES):
            regular_file(os.path.join(directory, name), "model file", ConfigError)


def plan_merge(config: Any, options: Any) -> Tuple[Optional[Any], List[str]]:
    """Plan ``config`` as ``run_merge`` does, executing and writing nothing.

    Returns the planner (``None`` if planning could not start) and the problems
    found: those :class:`CurvaturePlan` collected, or mergekit's own error.
    """
    from mergekit.architecture import get_architecture_info
    from mergekit.io.tasks import LoaderCache
    from mergekit.plan import MergePlanner

    import mergekit_ota
    from mergekit_ota.compat import incompatibility, model_out_config
    from mergekit_ota.graph.planner import CurvaturePlan

    mergekit_ota.install()  # register ota/ffg and patch mergekit (whether or not the start-up hook is on)

    problem = incompatibility()
    if problem:
        return None, [problem]
    planner = None
    try:
        arch_info = get_architecture_info(config, options)
        loader_cache = LoaderCache()
        loader_cache.setup(options=options)
        out_config = model_out_config(config, arch_info, trust_remote_code=options.trust_remote_code)
        for model in config.referenced_models():
            _weight_files_are_regular(model.model.path)  # mergekit's loader would block on a FIFO
            loader_cache.get(model)
        planner = MergePlanner(config, arch_info, options=options, out_model_config=out_config)
        planner.plan_to_disk(out_path=NEVER_WRITTEN)  # builds tasks only; nothing executes
    except PreflightError as error:
        return planner, list(error.problems)
    except Exception as error:  # a refusal by mergekit (architecture, slices, ...) or by our methods' validation
        found: List[str] = []
        if planner is not None:
            plan = CurvaturePlan.of(planner)
            plan.check_names()  # a refusal before the first tensor hides no misspelled parameter
            found = plan.listed()
        if isinstance(error, OTAError):
            return planner, found + [str(error)]
        return planner, found + [f"{MERGEKIT_REFUSED}: {type(error).__name__}: {error}"]
    return planner, []


def planned_loads(planner: Any) -> Dict[Tuple[str, str], List[str]]:
    """``{(store, tensor): [output weights]}`` for every curvature tensor the plan reads."""
    from mergekit_ota.graph.tasks import CurvatureMergeTask, PermutedCurvature

    loads: Dict[Tuple[str, str], List[str]] = {}
    for weight, task in planner_tensors(planner):
        if not isinstance(task, CurvatureMergeTask):
            continue
        gather = task.curvature.curvature if isinstance(task.curvature, PermutedCurvature) else task.curvature
        for load in gather.loads.values():
            loads.setdefault((load.store, load.tensor), []).append(weight.name)
    return loads


def _store_uses(
    planner: Any, loads: Dict[Tuple[str, str], List[str]], scanned: Dict[Tuple[str, str], Tuple[int, int]]
) -> Tuple[StoreUse, ...]:
    from mergekit_ota.graph.planner import CurvaturePlan

    experts: Dict[str, List[str]] = {}
    for (model, _), path in CurvaturePlan.of(planner).stores.items():
        if path is not None:
            experts.setdefault(path, []).append(str(model))
    uses = []
    for path, names in sorted(experts.items()):
        keys = [key for (store, key) in loads if store == path]
        records = CurvatureStore.open(path).records
        rank1 = sum(records[key].compressed for key in keys)
        uses.append(
            StoreUse(
                path=path,
                experts=tuple(sorted(set(names))),
                tensors=len(keys),
                full=len(keys) - rank1,
                rank1=rank1,
                values=sum(scanned.get((path, key), (0, 0))[1] for key in keys),
                scanned=sum(scanned.get((path, key), (0, 0))[0] for key in keys),
                untouched=len(CurvaturePlan.of(planner).untouched.get(path, {})),
            )
        )
    return tuple(uses)


def auto_density_notes(planner: Any) -> List[str]:
    """For ``density: auto``: run the model-wide saliency pass the merge will make (every weight and curvature
    read once) and say, per expert, what auto keeps and the density at 50/80/90/95/99% of its saliency mass."""
    from mergekit_ota.graph.tasks import CurvatureMergeTask

    passes = {}
    for _, task in planner_tensors(planner):
        if not isinstance(task, CurvatureMergeTask) or task.model_wide is None:
            continue
        if any(dict(values.items()).get("density") == "auto" for values in task.input_parameters.values()):
            passes[task.model_wide.key] = task.model_wide
    notes = []
    for model_wide in passes.values():
        started = time.perf_counter()
        result = model_wide.execute()
        seconds = time.perf_counter() - started
        for model, choice in sorted((result.auto or {}).items(), key=lambda item: str(item[0])):
            notes.append(choice.describe(model))
        notes.append(
            f"density: auto: check ran the model-wide saliency pass the merge makes (every weight and curvature "
            f"of those tensors read once) in {seconds:.1f} s"
        )
    return notes


def check_config(
    config: Any, options: Any, *, source: str = "<config>", full_scan: bool = False, sample: int = DEFAULT_SAMPLE
) -> CheckReport:
    """Plan ``config`` (a ``MergeConfiguration``) and check the curvature it reads; nothing is written.

    Raises :class:`NotACurvatureMerge` if its method is not ``ota``/``ffg``, with a report
    whose ``warnings`` name the parameter keys that method does not take.
    """
    from mergekit_ota.graph.planner import CurvaturePlan
    from mergekit_ota.methods import METHOD_NAMES

    started = time.perf_counter()
    method = config.merge_method
    if method not in METHOD_NAMES:
        report = CheckReport(
            config=source,
            method=method,
            problems=(),
            warnings=tuple(parameter_warnings(config)),
            names_only=True,
            seconds=time.perf_counter() - started,
        )
        raise NotACurvatureMerge(
            f"{source}: merge_method {method!r} does not use curvature; check handles {sorted(METHOD_NAMES)}",
            report,
        )
    base = dict(config=source, method=method, full_scan=full_scan, sample=sample)
    missing = missing_local_models(config, getattr(options, "transformers_cache", None))
    missing += lora_without_cache(config, options)
    if missing:
        return CheckReport(problems=tuple(missing), seconds=time.perf_counter() - started, **base)
    planner, header_problems = plan_merge(config, options)
    if any(p.startswith(MERGEKIT_REFUSED) for p in header_problems):
        header_problems += hub_lookup_notes(config)
    if planner is None:
        return CheckReport(problems=tuple(header_problems), seconds=time.perf_counter() - started, **base)
    loads = planned_loads(planner)
    value_problems: List[str] = []
    scanned: Dict[Tuple[str, str], Tuple[int, int]] = {}
    for path, key in sorted(loads):
        store = CurvatureStore.open(path)
        for entry in store.records[key].entries:
            try:
                result = scan_entry(store, entry, None if full_scan else sample)
            except OTAError as error:
                value_problems.append(problem_of(error))
                continue
            value_problems += result.problems
            done, total = scanned.get((path, key), (0, 0))
            scanned[(path, key)] = (done + result.scanned, total + result.total)
    with_curvature = {weight for weights in loads.values() for weight in weights}
    plan = CurvaturePlan.of(planner)
    auto_notes = auto_density_notes(planner) if not (header_problems or value_problems) else []
    return CheckReport(
        problems=tuple(header_problems + value_problems),
        warnings=tuple(plan.warnings + hub_lookup_warnings(config)),
        notes=tuple(plan.bias_notes() + plan.store_notes + auto_notes + lora_fold_notes(config, options)),
        experts=tuple(sorted({str(model) for model, _ in CurvaturePlan.of(planner).stores})),
        stores=_store_uses(planner, loads, scanned),
        output_tensors=len(planner_tensors(planner)),
        with_curvature=sum(weight.name in with_curvature for weight, _ in planner_tensors(planner)),
        seconds=time.perf_counter() - started,
        header_problems=tuple(header_problems),
        **base,
    )
