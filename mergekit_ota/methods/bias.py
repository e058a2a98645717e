"""Adam's bias correction: which experts' curvature is put on the unbiased scale, and why.

Adam's stored second moment after ``t`` steps with decay ``beta2`` is biased low:
``E[v_t] = (1 - beta2**t) E[g**2]`` (for a stationary ``g**2``), so the unbiased estimate
is ``v_hat = v_t / (1 - beta2**t)``. Experts trained for different lengths therefore store
``v`` on different scales: with ``beta2 = 0.999`` the factor is 0.020 after 20 steps and
0.181 after 200, so without correction the 200-step expert's OTA weight ``v**p`` is
``(0.181 / 0.020)**0.5 = 3.0`` times larger for the same curvature.

``bias_correction`` (shared parameter) is one of

* ``auto`` (default): correct each expert whose ``optimizer_step`` and ``beta2`` are
  known (from the YAML, or from its store's metadata as ``export`` writes it); leave the
  others as stored; never correct a store marked ``bias_corrected: true``;
* ``true``: correct every expert; an expert whose step or ``beta2`` is unknown is an error;
* ``false``: use every ``v`` as stored.

Correcting expert i multiplies its ``v_i`` by ``s_i = 1 / (1 - beta2_i**step_i)``; OTA
applies it as ``w_i = weight_i * (s_i v_i)**p + eps = (weight_i s_i**p) v_i**p + eps``, so
it costs no tensor operation. FFG saliency is left raw: a ``density`` mask ranks one
expert's entries (any per-expert scale leaves it unchanged), and an absolute ``threshold``
keeps the meaning it has in the authors' configs (raw ``v * tau**2``).

``curvature_scale: mean | median`` (:mod:`mergekit_ota.methods.scale`) divides each ``v_i``
by its own model-wide statistic, which removes ``s_i`` along with any other per-expert
factor: where it is set, it replaces bias correction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from mergekit_ota.catalog import BiasMode
from mergekit_ota.math.scale import bias_factor

__all__ = ["ASSUMED_BETA2", "BiasDecision", "BiasMode", "bias_factor", "decide", "mismatch_warning"]

ASSUMED_BETA2 = 0.999  # for the size of a mismatch when an expert's beta2 is unknown (AdamW's default)


@dataclass(frozen=True)
class BiasDecision:
    """What bias correction does to one expert: ``multiplier`` multiplies its ``v`` (1.0: as stored)."""

    expert: str
    multiplier: float
    corrected: bool
    step: Optional[int]
    beta2: Optional[float]
    already_corrected: bool
    reason: str

    @property
    def unknown(self) -> bool:
        """Left as stored only because its step or ``beta2`` is unknown."""
        return not self.corrected and not self.already_corrected and self.reason.startswith("not corrected: no")


def decide(
    mode: BiasMode,
    *,
    expert: str,
    step: Optional[int],
    beta2: Optional[float],
    already_corrected: bool = False,
    source: str = "",
) -> BiasDecision:
    """The decision for one expert (see the module docstring); ``source`` says where step/beta2 came from.

    Raises ``ValueError`` under ``mode=True`` when the step or ``beta2`` is unknown.
    """
    where = f" ({source})" if source else ""
    if mode is False:
        return BiasDecision(expert, 1.0, False, step, beta2, already_corrected, "not corrected: bias_correction: false")
    if already_corrected:
        return BiasDecision(
            expert, 1.0, False, step, beta2, True, "used as stored: its store is already bias-corrected"
        )
    if step is None or beta2 is None:
        missing = " and ".join(n for n, v in (("optimizer_step", step), ("beta2", beta2)) if v is None)
        if mode is True:
            raise ValueError(
                f"bias_correction: true needs optimizer_step and beta2; {missing} unknown (set them per expert, "
                f"or use a store whose metadata records them)"
            )
        return BiasDecision(expert, 1.0, False, step, beta2, False, f"not corrected: no {missing} known")
    factor = bias_factor(step, beta2)
    return BiasDecision(
        expert,
        1.0 / factor,
        True,
        step,
        beta2,
        False,
        f"corrected: step {step}, beta2 {beta2}{where}: v / {factor:.4g} (x{1.0 / factor:.4g})",
    )


def mismatch_warning(decisions: Sequence[BiasDecision], power: float) -> Optional[str]:
    """A warning when experts' curvature may be on different scales because some could not be corrected.

    It is given exactly when some expert is left as stored for lack of its step or
    ``beta2`` (:attr:`BiasDecision.unknown`) and either another expert is on the unbiased
    scale (corrected, or stored corrected) or the known steps differ. The size is the OTA
    weight ratio ``((1 - beta2**t_max) / (1 - beta2**t_min))**p`` between the longest and
    the shortest known run, left uncorrected (``beta2`` 0.999 where unknown).
    """
    unknown = [d for d in decisions if d.unknown]
    unbiased = [d for d in decisions if d.corrected or d.already_corrected]
    steps = sorted({d.step for d in decisions if d.step is not None})
    if not unknown or not (unbiased or len(steps) > 1):
        return None
    parts = []
    if len(steps) > 1:
        short = next(d for d in decisions if d.step == steps[0])
        long = next(d for d in decisions if d.step == steps[-1])
        beta2 = long.beta2 or short.beta2 or ASSUMED_BETA2
        ratio = (bias_factor(steps[-1], beta2) / bias_factor(steps[0], beta2)) ** power
        assumed = "" if (long.beta2 or short.beta2) else f", assuming beta2 {ASSUMED_BETA2}"
        parts.append(
            f"expert {short.expert} trained {steps[0]} steps, {long.expert} {steps[-1]}: without bias correction "
            f"{long.expert}'s curvature weighs about {ratio:.1f}x more in OTA (power {power}{assumed})"
        )
    if unbiased:
        parts.append(
            f"{', '.join(d.expert for d in unbiased)} {'is' if len(unbiased) == 1 else 'are'} on Adam's unbiased scale "
            f"but {', '.join(d.expert for d in unknown)} cannot be corrected"
        )
    names = ", ".join(f"{d.expert} ({d.reason.removeprefix('not corrected: ')})" for d in unknown)
    return (
        f"curvature scales may differ between experts: {'; '.join(parts)}. Uncorrected: {names}. Set "
        f"optimizer_step and beta2 for them, or re-export their stores with mergekit-ota export (it records both)"
    )
