"""CONFIG's base and experts, each grid point's mergekit config over them, and the keys finished points are
cached under.

A grid point's config keeps from CONFIG: ``base_model``, each expert's path and ``weight`` (default 1.0) and,
for ``ota``/``ffg``, its ``curvature``; ``dtype``, ``out_dtype`` and ``chat_template``. Everything else comes
from the method: ``merge_method``, its fixed parameters and the point's knobs, all in the config's top-level
``parameters:`` (mergekit reads a per-expert parameter from there when an expert does not set it). ``linear``
averages the experts alone (no base, ``normalize: true``), as the benchmarks do.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from mergekit_ota.errors import ConfigError

KEPT = ("dtype", "out_dtype", "chat_template")
REFUSED = {
    "slices": "compare takes a models: config (a slices: config merges layer ranges; compare would not know which)",
    "modules": "compare takes a models: config, not modules:",
    "tokenizer_source": "DATA is tokenized once with the base's tokenizer; a merged vocabulary would give other ids",
    "tokenizer": "DATA is tokenized once with the base's tokenizer; a merged vocabulary would give other ids",
}
OURS = ("ota", "ffg")


@dataclass(frozen=True)
class Expert:
    """An expert as CONFIG names it: its path (as written), ``weight`` and curvature store (if given)."""

    path: str
    weight: Any = 1.0
    curvature: Optional[str] = None


@dataclass(frozen=True)
class Inputs:
    """The base and experts of CONFIG, with the top-level keys a point keeps (:data:`KEPT`)."""

    base: str
    experts: Tuple[Expert, ...]
    kept: Mapping[str, Any]

    @property
    def expert_paths(self) -> List[str]:
        return [e.path for e in self.experts]


@dataclass(frozen=True)
class Point:
    """One grid point: its method, setting label, knobs, mergekit config and cache key."""

    method: str
    label: str
    knobs: Dict[str, Any]
    config: Dict[str, Any]
    key: str

    @property
    def name(self) -> str:
        return f"{self.method} ({self.label})"


def _model_path(entry: Any, where: str) -> str:
    model = entry.get("model") if isinstance(entry, dict) else None
    if not isinstance(model, str):
        raise ConfigError(f"{where}: compare needs each model as a path string (model: PATH); got {model!r}")
    return model


def read_inputs(path: str) -> Inputs:
    """CONFIG's :class:`Inputs`; :class:`ConfigError` (naming the file) if mergekit cannot read it, or it has no
    ``base_model``, no expert, or a key compare cannot keep (:data:`REFUSED`)."""
    import yaml

    from mergekit_ota.graph.preflight import read_config

    read_config(path)  # mergekit's own parser: its refusals, one line naming the file
    with open(path, encoding="utf-8") as fp:
        raw = yaml.safe_load(fp)
    for key, why in REFUSED.items():
        if raw.get(key) is not None:
            raise ConfigError(f"{path}: {key}: {why}")
    base = raw.get("base_model")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: compare needs base_model: (the model the experts were fine-tuned from)")
    experts = []
    for number, entry in enumerate(raw.get("models") or []):
        model = _model_path(entry, f"{path}: models[{number}]")
        if os.path.normpath(model) == os.path.normpath(base):
            continue
        parameters = entry.get("parameters") or {}
        experts.append(Expert(model, parameters.get("weight", 1.0), parameters.get("curvature")))
    if not experts:
        raise ConfigError(f"{path}: names no expert (models: other than base_model)")
    return Inputs(base, tuple(experts), {k: raw[k] for k in KEPT if k in raw})


def point_config(inputs: Inputs, merge_method: str, shared: Mapping[str, Any], knobs: Mapping[str, Any]) -> dict:
    """The mergekit YAML dict of one grid point (see the module docstring)."""
    models = []
    for expert in inputs.experts:
        parameters: Dict[str, Any] = {"weight": expert.weight}
        if merge_method in OURS and expert.curvature is not None:
            parameters["curvature"] = expert.curvature
        models.append({"model": expert.path, "parameters": parameters})
    config: Dict[str, Any] = {"merge_method": merge_method}
    if merge_method != "linear":
        config["base_model"] = inputs.base
    config["models"] = models
    parameters = {**({"normalize": True} if merge_method == "linear" else {}), **shared, **knobs}
    if parameters:
        config["parameters"] = parameters
    config.update(inputs.kept)
    return config


def _files(path: str) -> Iterator[Tuple[str, int, int]]:
    path = os.path.expanduser(path)
    names = sorted(os.listdir(path)) if os.path.isdir(path) else [""]
    for name in names:
        full = os.path.join(path, name) if name else path
        try:
            stat = os.stat(full)
        except OSError:
            continue
        if name == "" or os.path.isfile(full):
            yield os.path.abspath(full), stat.st_size, stat.st_mtime_ns


def inputs_fingerprint(paths: Sequence[str]) -> str:
    """SHA-256 of the name, size and modification time of every file of ``paths`` (model directories, stores;
    ``BASE+ADAPTER``: both directories): a cached score is not reused once a model it was computed from is
    rewritten."""
    from mergekit_ota.fisher import split_model

    digest = hashlib.sha256()
    for path in paths:
        base, adapter = split_model(path) if not os.path.exists(path) and "+" in path else (path, None)
        for entry in [*_files(base), *(_files(adapter) if adapter else ())]:
            digest.update(json.dumps(entry).encode("utf-8") + b"\n")
    return digest.hexdigest()


def config_paths(config: Mapping[str, Any]) -> List[str]:
    """The model and store paths a point config reads."""
    paths = [config["base_model"]] if "base_model" in config else []
    for model in config["models"]:
        paths.append(model["model"])
        if "curvature" in model.get("parameters", {}):
            paths.append(model["parameters"]["curvature"])
    return paths


def cache_key(kind: str, what: Any, fingerprints: Mapping[str, str]) -> str:
    """The cache key of a scored model: SHA-256 of its ``kind`` (``point`` or ``model``), what it is (a point's
    config, a model's path) and ``fingerprints`` (the data rows, the merge and scoring options, the inputs)."""
    text = json.dumps({"kind": kind, "what": what, **fingerprints}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
