"""Which capabilities ``G`` averages over, each method's grid point, and the reference baseline: all on the
selection half only, so the report half's comparisons are not biased by the choices.

* **gain capabilities**: those whose own expert beats the base on the selection half by at least
  :data:`MIN_GAIN` (in the capability's loss: ``loss_base - loss_expert >= MIN_GAIN`` nats per token);
  elsewhere ``G_c`` divides by noise and is reported as n/a;
* a method's **chosen point**: its grid point with the best selection-half statistic (highest ``G``, or
  lowest mean loss); the first in grid order on a tie;
* the **reference**: the baseline method (mergekit's own) whose chosen point is best on the selection half;
  with no baseline compared, the best method of all.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from mergekit_ota.compare import stats

MIN_GAIN = 0.05


def gain_capabilities(
    seed: stats.Seed, capabilities: Sequence[str], lower_is_better: bool = True, min_gain: float = MIN_GAIN
) -> List[str]:
    """The capabilities (in the order given) whose expert beats the base by at least ``min_gain`` in ``seed``."""
    out = []
    for capability in capabilities:
        better = stats.accuracy(seed, stats.expert_key(capability), capability) - stats.accuracy(
            seed, "base", capability
        )
        if (-better if lower_is_better else better) >= min_gain:
            out.append(capability)
    return out


def choose(
    seed: stats.Seed,
    points: Sequence[Tuple[str, str]],
    capabilities: Sequence[str],
    statistic: str = stats.GAIN,
) -> Dict[str, Tuple[str, float]]:
    """``{method: (point key, its statistic)}``: each method's best point of ``points`` (``(method, key)`` pairs,
    in grid order) on ``seed`` (the selection half)."""
    best: Dict[str, Tuple[str, float]] = {}
    for method, key in points:
        value = stats.statistic_value(seed, key, capabilities, statistic) if capabilities else float("nan")
        current = best.get(method)
        if current is None or stats.merit(value, statistic) > stats.merit(current[1], statistic):
            best[method] = (key, value)
    return best


def reference(
    chosen: Mapping[str, Tuple[str, float]], baselines: Sequence[str], statistic: str = stats.GAIN
) -> Optional[str]:
    """The method of ``baselines`` (else of all) whose chosen point is best (see the module docstring)."""
    present = [m for m in baselines if m in chosen] or list(chosen)
    if not present:
        return None
    return max(present, key=lambda m: stats.merit(chosen[m][1], statistic))
