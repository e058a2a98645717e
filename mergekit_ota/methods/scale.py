"""``curvature_scale``: OTA compares experts' curvature on one scale, each divided by its own model-wide statistic.

Bias correction (:mod:`mergekit_ota.methods.bias`) removes the scale difference that
training length makes; learning rate, batch size, loss scale and gradient clipping
change ``v``'s scale too. ``curvature_scale`` (shared ``ota`` parameter) is one of

* ``mean`` (default, :data:`~mergekit_ota.catalog.DEFAULT_CURVATURE_SCALE`) / ``median``:
  ``v_i / m_i``, with ``m_i`` the mean or the median of *all* of
  expert i's curvature entries over every tensor the merge reads
  (:class:`~mergekit_ota.math.scale.CurvatureScale`: the median is the lower edge of its
  log-histogram bin, within ``2**-9``; rank-1 tensors count their reconstruction ``v_hat``);
* ``none``: ``v_i`` as it is (bias-corrected or not, see ``bias_correction``).

OTA applies it through the weight, like bias correction, with no tensor operation:
``w_i = weight_i (v_i / m_i)**p + eps = (weight_i / m_i**p) v_i**p + eps``.

**The statistic is of the raw ``v_i`` (as stored), and normalising replaces bias
correction.** Bias correction multiplies ``v_i`` by ``s_i = 1 / (1 - beta2**t)``, and
both statistics are positively homogeneous (``m(s v) = s m(v)``), so
``s_i v_i / m(s_i v_i) = v_i / m(v_i)``: the correction cancels whatever it was. The
merge therefore uses ``v_i / m(v_i)`` and drops ``s_i``. This is independent of the order
the two are thought of in, and also exact where homogeneity is only approximate (the
median's bins for an ``s_i`` that is not a power of two). ``check`` and the merge log say so.

FFG masks are untouched: an absolute ``threshold`` applies to the raw saliency
``v_i * tau_i**2`` (uncorrected, unnormalised, as in the authors' configs), and a
``density`` mask ranks one expert's entries, which no per-expert scale changes.

Where ``m_i`` is computed: in memory, over the tensors given (``merge_state_dicts``: every
tensor of the call; ``merge_tensors``: that one tensor); in a planned merge, in the pass
``density_scope: model`` makes anyway when it runs (no extra read), otherwise in one
extra pass over the curvature only (no weights). An expert whose curvature is all zero
keeps ``m_i = 1`` (every ``w_i`` is ``eps`` whatever ``m_i`` is); a zero median with a
positive mean (most entries exactly 0) is refused.
"""

from __future__ import annotations

import math
from typing import Dict, Hashable, Literal, Mapping, Optional

from mergekit_ota.errors import ConfigError
from mergekit_ota.math.rank1 import Curvature
from mergekit_ota.math.scale import CurvatureScale

ScaleMode = Literal["none", "mean", "median"]
# Bound parameter under which each expert's m_i reaches merge_group (filled by the in-memory
# _execute, or by the graph from the model-wide pass); not a user parameter.
STATISTICS_KEY = "_curvature_scale_statistics"


def add_curvatures(
    totals: Dict[Hashable, CurvatureScale], curvatures: Mapping[Hashable, Curvature], mode: ScaleMode
) -> None:
    """Add one tensor's curvature, per expert, into ``totals`` (``mode`` ``mean`` or ``median``)."""
    for key, v in curvatures.items():
        if key not in totals:
            totals[key] = CurvatureScale(median=mode == "median")
        totals[key].add(v)


def statistics(totals: Mapping[Hashable, CurvatureScale], mode: ScaleMode) -> Dict[Hashable, float]:
    """``m_i`` per expert (module docstring): the statistic, 1.0 for all-zero curvature.

    Raises :class:`ConfigError` for a zero median next to a positive mean, or a
    statistic that is not finite.
    """
    result: Dict[Hashable, float] = {}
    for key, scale in totals.items():
        value = scale.value("median" if mode == "median" else "mean")
        mean = scale.mean
        if value is None or mean is None or mean == 0.0:
            result[key] = 1.0  # no entries, or every entry 0: w_i = eps whatever m_i is
            continue
        if not (math.isfinite(value) and math.isfinite(mean)) or value < 0.0:
            raise ConfigError(
                f"curvature_scale: {mode}: expert {key}'s curvature {mode} is {value:.4g} (mean {mean:.4g}); "
                f"the curvature must be finite and >= 0"
            )
        if value == 0.0:
            raise ConfigError(
                f"curvature_scale: median: the median of expert {key}'s curvature is 0 (at least half of its "
                f"{scale.count:,} entries are 0, mean {mean:.4g}), so v / median is undefined; use "
                f"curvature_scale: mean"
            )
        result[key] = value
    return result


def describe(mode: ScaleMode, key: Hashable, value: float, count: Optional[int]) -> str:
    """The merge log's line for one expert."""
    entries = f" over {count:,} entries" if count is not None else ""
    return f"curvature scale, expert {key}: {mode} of v = {value:.4g}{entries}; OTA uses v / {value:.4g}"
