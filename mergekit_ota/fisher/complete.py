"""``fisher --only-missing STORE``: complete a partial store with the data Fisher of exactly its missing tensors.

A partial store is what ``export`` writes for an optimizer that keeps a second moment for some parameters only
(``torch.optim.Muon``: momentum for the hidden matrices, AdamW's ``exp_avg_sq`` for the embeddings, norms and
head): its metadata ``missing_curvature`` (:data:`~mergekit_ota.store_format.MISSING`) lists the others, and a
merge refuses it. :func:`open_partial` reads and checks that store against MODEL before anything is computed;
``fisher`` then measures the Fisher ``F_T`` of the missing tensors and of the store's own tensors, and
:func:`completed_source` writes one store: the store's tensors as they are, the missing ones as ``c * F_T``.

**One scale.** ``v`` (Adam's ``exp_avg_sq``) and ``F`` estimate the same ``E[g**2]`` but need not agree in scale
(the mini-batch size, the training's last steps against the final weights, bias correction). The factor ``c``
puts ``F`` on the store's own scale, measured where both exist:

    c = median over the store's tensors T with mean(v_T) > 0 and mean(F_T) > 0 of  mean(v_T) / mean(F_T)

(rank-1 tensors: ``mean(v_hat_T) = sum(r_T) / numel``). So one store holds one scale, every merge setting
(``curvature_scale`` ``none``, ``mean`` or ``median``, model-wide FFG ranking) reads it as one estimator, and
the store records how: :data:`~mergekit_ota.store_format.CALIBRATION` (``c``, the tensors it came from, the
spread of their ratios) and :data:`~mergekit_ota.store_format.ESTIMATORS` (``{estimator: [tensor, ...]}``).
Where no tensor has both (an all-zero state), ``c = 1``: ``F`` at ``--batch-size`` equal to the training's batch
is on the bias-corrected Adam scale already (:mod:`mergekit_ota.fisher.estimator`), and the store says so.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Mapping, Sequence

import torch

from mergekit_ota.errors import ConfigError, CurvatureError
from mergekit_ota.export.moments import Full, Rank1, SourceState, StateItem
from mergekit_ota.store_format import CALIBRATION, ESTIMATORS, MISSING

OPTIMIZER_ESTIMATOR = "optimizer second moment"  # the partial store's own tensors (exp_avg_sq, ...)
FISHER_ESTIMATOR = "data Fisher"  # the tensors this command adds


@dataclass(frozen=True)
class PartialStore:
    """A partial store, checked against MODEL: ``source`` (its tensors, as :func:`open_store` reads them, with
    ``missing`` ``{tensor: reason}``) and ``entries``, MODEL's weights' header entries by name (its names, shapes and
    fingerprint)."""

    source: SourceState
    entries: Mapping[str, Any]

    @property
    def path(self) -> str:
        return self.source.path

    @property
    def missing(self) -> Dict[str, str]:
        return self.source.missing

    @property
    def needed(self) -> List[str]:
        """The parameters whose Fisher is measured: the missing ones and the store's own (for ``c``)."""
        return list(self.missing) + [item.name for item in self.source.items]


def open_partial(store: str, model_dir: str) -> PartialStore:
    """Read the partial store ``store`` and check it against ``model_dir``'s weights: refused naming the file when
    it lists no missing tensor, when MODEL lacks one or has another shape, or when the store records the
    fingerprint of other weights than MODEL's (:mod:`mergekit_ota.curvature.fingerprint`)."""
    from mergekit_ota.curvature.fingerprint import FINGERPRINT_KEY, entries_fingerprint, weight_entries
    from mergekit_ota.export.from_store import open_store

    source = open_store(store, None)
    missing = source.missing
    if not missing:
        raise ConfigError(
            f"--only-missing {store}: the store lists no missing tensor (metadata '{MISSING}'); it is complete "
            f"already and merges as it is"
        )
    entries = weight_entries(model_dir)
    if not entries:
        raise ConfigError(f"{model_dir}: no model.safetensors[.index.json]; --only-missing reads MODEL's weights")
    absent = [name for name in [*missing, *(i.name for i in source.items)] if name not in entries]
    if absent:
        raise ConfigError(
            f"--only-missing {store}: MODEL {model_dir} has no weight {absent[0]!r} ({len(absent)} of the store's "
            f"tensors are not in it): give the expert the store was exported from"
        )
    wrong = [i.name for i in source.items if tuple(entries[i.name].shape) != tuple(i.shape)]
    if wrong:
        raise ConfigError(
            f"--only-missing {store}: '{wrong[0]}' has shape {list(entries[wrong[0]].shape)} in MODEL {model_dir} "
            f"but {list(next(i.shape for i in source.items if i.name == wrong[0]))} in the store"
        )
    recorded = source.metadata.get(FINGERPRINT_KEY)
    if recorded:
        own = entries_fingerprint(entries, sorted(i.name for i in source.items))
        if own != recorded:
            raise ConfigError(
                f"--only-missing {store}: the store was exported for other weights than MODEL {model_dir}'s "
                f"({FINGERPRINT_KEY} {recorded[:19]}..., MODEL's {own[:19]}...): give the expert whose optimizer "
                f"state it holds"
            )
    return PartialStore(source, entries)


def refuse_same_output(partial: PartialStore, out: str) -> None:
    """The completed store is a new one: OUT may not be the partial store it reads (nor its directory)."""
    store, target = os.path.realpath(partial.path), os.path.realpath(out)
    if target == store or store.startswith(target.rstrip(os.sep) + os.sep):
        raise ConfigError(
            f"OUT {out} is the partial store --only-missing reads ({partial.path}); write the completed store to a "
            f"new path and merge with that"
        )


def restrict(model: Any, partial: PartialStore) -> None:
    """Let only ``partial.needed`` parameters take a gradient (the estimator accumulates trainable ones only)."""
    needed = set(partial.needed)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in needed)
    lacking = needed - {name for name, _ in model.named_parameters()}
    if lacking:
        raise ConfigError(
            f"--only-missing {partial.path}: the loaded model has no parameter {sorted(lacking)[0]!r} (named in the "
            f"store); was it saved with tied or renamed weights?"
        )


def _mean(value: Any) -> float:
    """``mean(v)`` of a store tensor (``Full``) or of the rank-1 ``v_hat`` (``Rank1``: ``sum(r) / numel``)."""
    if isinstance(value, Rank1):
        return float(value.r.double().sum()) / (value.r.numel() * value.c.numel())
    return float(value.v.double().mean()) if value.v.numel() else 0.0


@dataclass(frozen=True)
class Calibration:
    """``c`` of the module docstring, with the tensors and the spread of the ratios it came from."""

    factor: float
    tensors: List[str]
    ratio_min: float
    ratio_max: float

    def record(self) -> Dict[str, Any]:
        """The JSON object written as :data:`~mergekit_ota.store_format.CALIBRATION`."""
        return {
            "estimator": FISHER_ESTIMATOR,
            "rule": "F * c, c = median over the store's own tensors T of mean(v_T) / mean(F_T)",
            "factor": self.factor,
            "tensors": len(self.tensors),
            "ratio_min": self.ratio_min,
            "ratio_max": self.ratio_max,
        }


def calibrate(own: Mapping[str, float], fisher_means: Mapping[str, float]) -> Calibration:
    """``c`` from the store's ``own`` tensor means ``mean(v_T)`` and the Fisher's ``mean(F_T)`` of the same T."""
    ratios = {
        name: own[name] / fisher_means[name]
        for name in own
        if own[name] > 0.0 and fisher_means.get(name, 0.0) > 0.0 and math.isfinite(own[name])
    }
    if not ratios:
        return Calibration(1.0, [], float("nan"), float("nan"))
    values = list(ratios.values())
    return Calibration(float(statistics.median(values)), sorted(ratios), min(values), max(values))


def completed_source(
    partial: PartialStore,
    fisher: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    model_dir: str,
    order: Sequence[str],
) -> SourceState:
    """The complete store's source: ``partial``'s tensors as they are, each missing ``T`` as ``c * F_T``
    (:func:`calibrate`), the metadata of both (``missing_curvature`` dropped, ``curvature_estimators`` and
    ``curvature_calibration`` added, the weights fingerprint taken over every tensor), in ``order`` (the model's
    ``named_parameters()``)."""
    from mergekit_ota.curvature.fingerprint import FINGERPRINT_KEY, entries_fingerprint

    own = {item.name: _mean(item.load()) for item in partial.source.items}
    calibration = calibrate(own, {name: float(fisher[name].double().mean()) for name in own if name in fisher})
    for name in partial.missing:
        if name not in fisher:
            raise CurvatureError(f"--only-missing {partial.path}: no Fisher was measured for '{name}'")
    added = [
        StateItem(
            name,
            tuple(fisher[name].shape),
            (lambda f=fisher[name]: Full(f * calibration.factor)),
            f"fisher of {model_dir} '{name}' (x {calibration.factor:.6g})",
        )
        for name in partial.missing
    ]
    items = {item.name: item for item in [*partial.source.items, *added]}
    position = {name: i for i, name in enumerate(order)}
    carried = {k: v for k, v in partial.source.metadata.items() if k != FINGERPRINT_KEY}
    estimators = {
        OPTIMIZER_ESTIMATOR: [item.name for item in partial.source.items],
        FISHER_ESTIMATOR: list(partial.missing),
    }
    return replace(
        partial.source,
        kind="store+fisher",
        items=[items[name] for name in sorted(items, key=lambda n: position.get(n, len(position)))],
        missing={},
        metadata={
            **carried,
            **metadata,
            ESTIMATORS: json.dumps(estimators),
            CALIBRATION: json.dumps(calibration.record()),
            "completed_from": partial.path,
        },
        fingerprint=entries_fingerprint(partial.entries, sorted(items)),
        notes=[
            *partial.source.notes,
            f"completed: {len(added)} tensor(s) from the data Fisher, x c = {calibration.factor:.4g} "
            + (
                f"(median of mean(v)/mean(F) over the store's {len(calibration.tensors)} own tensors; ratios "
                f"{calibration.ratio_min:.3g} to {calibration.ratio_max:.3g})"
                if calibration.tensors
                else "(no tensor of the store had both a positive v and a positive F: the Fisher's own scale)"
            ),
        ],
    )
