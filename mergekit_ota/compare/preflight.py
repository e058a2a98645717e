"""Every grid point's config checked before any merge runs, by ``mergekit-ota check``'s own code.

* ``ota``/``ffg`` points: :func:`mergekit_ota.graph.preflight.check_config` (the merge planned exactly as
  ``mergekit-yaml`` plans it; stores, tensors, shapes, parameter names and values, curvature values sampled);
* mergekit's methods: the models must exist here (:func:`~mergekit_ota.graph.preflight.missing_local_models`),
  every parameter key must be one the method takes (:func:`~mergekit_ota.graph.preflight.parameter_warnings`:
  mergekit would silently ignore it, so for compare it is an error: the grid would not vary anything) and
  mergekit must plan the merge (:func:`~mergekit_ota.graph.preflight.plan_merge`).

Each problem is one line naming the method and grid point.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence, Tuple

from mergekit_ota.errors import ConfigError, group_problems


def point_problems(config: Mapping[str, Any], options: Any) -> List[str]:
    """The problems of one point's config (a mergekit YAML dict) planned under ``options`` (``MergeOptions``)."""
    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError

    from mergekit_ota.graph import preflight
    from mergekit_ota.methods import METHOD_NAMES

    try:
        parsed = MergeConfiguration.model_validate(dict(config))
    except (ValidationError, RuntimeError) as error:
        return [f"mergekit cannot read the config ({str(error).splitlines()[0]})"]
    if parsed.merge_method in METHOD_NAMES:
        return list(preflight.check_config(parsed, options, source="<grid point>").problems)
    missing = preflight.missing_local_models(parsed, getattr(options, "transformers_cache", None))
    if missing:
        return missing
    unknown = preflight.parameter_warnings(parsed) + preflight.lora_without_cache(parsed, options)
    if unknown:
        return unknown
    return preflight.plan_merge(parsed, options)[1]


def check_points(points: Sequence[Tuple[str, Mapping[str, Any]]], options: Any) -> None:
    """Check every ``(label, config)``; raise :class:`ConfigError` with one line per problem, naming the points
    that have it (``label: problem``; ``every grid point: problem`` for one all share, such as a missing model)."""
    found: Dict[str, List[str]] = {}
    for label, config in points:
        for problem in group_problems(point_problems(config, options)):
            found.setdefault(problem, []).append(label)
    lines = []
    for problem, labels in found.items():
        named = "every grid point" if len(labels) == len(points) > 1 else "; ".join(labels)
        lines.append(f"{named}: {problem}")
    if lines:
        raise ConfigError("\n".join(lines))
