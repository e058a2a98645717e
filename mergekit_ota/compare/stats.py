"""Paired statistics of merge quality from per-row scores (pure functions, numpy only).

This is the one home of the statistics ``mergekit-ota compare`` and the quality benchmarks report.

A *seed* is one data set's per-row results, ``{model key: {capability: items}}``: the base under
``"base"`` and capability ``c``'s own expert under ``expert_key(c)``. Every model of a seed was scored on
the same rows in the same order, so differences between models are paired. ``items`` is either a 0/1
array (the score is its mean: exact match) or a ``(2, n)`` array of per-row numerators and denominators
(the score is ``sum(num) / sum(den)``: loss = summed nats / labelled tokens, token accuracy = correct /
tokens), one column per row.

* **gain kept** of a model on capability ``c``: ``G_c = (s_c - s_base) / (s_expert - s_base)`` where ``s`` is
  the capability's score (for a loss this is ``(loss_base - loss_c) / (loss_base - loss_expert)``: the
  same ratio). ``G = mean_c G_c``: 0 = no better than the base, 1 = every capability at its expert's level;
* **mean loss**: ``mean_c loss_c`` (each capability weighted equally, whatever its row count), for data
  that names no expert: lower is better;
* **row bootstrap** (one seed): resample the rows of every capability with replacement (the same indices
  for every model: paired), recompute the statistic; ``replicates`` times;
* **two-level bootstrap** (several seeds): resample the seeds with replacement, then the rows within each
  drawn seed, and average the drawn seeds' statistics (seed-to-seed variation widens the interval);
* **interval**: the 2.5 and 97.5 percentiles of the replicates (95%, percentile bootstrap);
* **verdict**: ``win`` when the interval of the difference (method better than reference: ``G_a - G_b``, or
  ``loss_b - loss_a``) lies above 0, ``loss`` when it lies below 0, else ``tie``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

Seed = Mapping[str, Mapping[str, np.ndarray]]
LEVEL = 0.95
REPLICATES = 4000
GAIN = "gain"
LOSS = "loss"
STATISTICS = (GAIN, LOSS)


def as_items(bits: str) -> np.ndarray:
    """A per-row string of ``0``/``1`` (``"0110..."``) as a float array of 0/1."""
    if not bits or set(bits) - {"0", "1"}:
        raise ValueError(f"per-item results must be a non-empty string of 0/1, got {bits[:20]!r}")
    return np.frombuffer(bits.encode(), dtype=np.uint8).astype(np.float64) - ord("0")


def ratio_items(numerators: Sequence[float], denominators: Sequence[float]) -> np.ndarray:
    """Per-row numerators and denominators (a row's nats and labelled tokens) as a ``(2, n)`` array."""
    num, den = np.asarray(numerators, dtype=np.float64), np.asarray(denominators, dtype=np.float64)
    if num.shape != den.shape or num.ndim != 1 or not len(num) or (den <= 0).any():
        raise ValueError(
            f"per-item ratios need equally long, non-empty lists with positive denominators, got "
            f"{num.shape} and {den.shape}"
        )
    return np.stack([num, den])


def size(items: np.ndarray) -> int:
    """How many rows an entry holds."""
    return int(np.shape(items)[-1])


def score(items: np.ndarray, index: Optional[np.ndarray] = None) -> np.ndarray:
    """The score of ``items``: the mean of a 0/1 array, ``sum(num) / sum(den)`` of a ``(2, n)`` one; over the rows
    ``index`` names when given (an index of shape ``(replicates, n)`` gives one score per replicate)."""
    values = np.asarray(items, dtype=np.float64)
    if values.ndim == 1:
        return values.mean() if index is None else values[index].mean(axis=-1)
    num, den = values
    if index is None:
        return num.sum() / den.sum()
    return num[index].sum(axis=-1) / den[index].sum(axis=-1)


def expert_key(capability: str) -> str:
    """The key of ``capability``'s own expert in a seed."""
    return f"expert/{capability}"


def accuracy(seed: Seed, key: str, capability: str) -> float:
    """The score of model ``key`` on ``capability`` (exact match, token accuracy or loss: what the seed holds)."""
    return float(score(seed[key][capability]))


def _check(seed: Seed, keys: Sequence[str], capabilities: Sequence[str], statistic: str) -> None:
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    for capability in capabilities:
        needed = [*keys, "base", expert_key(capability)] if statistic == GAIN else list(keys)
        sizes = {key: size(seed[key][capability]) for key in needed}
        if len(set(sizes.values())) != 1 or not next(iter(sizes.values())):
            raise ValueError(f"{capability}: models were scored on different (or no) rows: {sizes}")


def gain_of(seed: Seed, key: str, capability: str, index: Optional[np.ndarray] = None) -> np.ndarray:
    """``G_c`` of model ``key`` (per replicate when ``index`` is given); NaN where expert and base score the same."""

    def of(model: str) -> np.ndarray:
        return score(seed[model][capability], index)

    base, expert = of("base"), of(expert_key(capability))
    span = expert - base
    return (of(key) - base) / np.where(span == 0, np.nan, span)


def _statistic_of(seed: Seed, key: str, capability: str, statistic: str, index: Optional[np.ndarray]) -> np.ndarray:
    return gain_of(seed, key, capability, index) if statistic == GAIN else score(seed[key][capability], index)


def gain(seed: Seed, key: str, capabilities: Sequence[str]) -> float:
    """``G`` of model ``key`` over ``capabilities`` (see the module docstring)."""
    return statistic_value(seed, key, capabilities, GAIN)


def statistic_value(seed: Seed, key: str, capabilities: Sequence[str], statistic: str = GAIN) -> float:
    """``G`` (``statistic="gain"``) or the mean loss (``"loss"``) of model ``key`` over ``capabilities``."""
    _check(seed, [key], capabilities, statistic)
    return float(np.mean([_statistic_of(seed, key, c, statistic, None) for c in capabilities]))


def merit(value: float, statistic: str) -> float:
    """``value`` oriented so that higher is better (a loss negated); NaN as minus infinity (for ordering)."""
    if value is None or np.isnan(value):
        return -np.inf
    return value if statistic == GAIN else -value


def item_replicates(
    seed: Seed,
    keys: Sequence[str],
    capabilities: Sequence[str],
    replicates: int,
    rng: np.random.Generator,
    statistic: str = GAIN,
) -> Dict[str, np.ndarray]:
    """``{key: (replicates,) statistic}`` under one row resampling per capability shared by all ``keys`` (paired).

    For ``G``, a replicate whose resampled expert scores the same as the resampled base on some capability is NaN
    (the ratio is undefined there); :func:`interval` leaves NaN replicates out.
    """
    _check(seed, keys, capabilities, statistic)
    out = {key: np.zeros(replicates) for key in keys}
    for capability in capabilities:
        count = size(seed[keys[0]][capability])
        index = rng.integers(0, count, size=(replicates, count))
        for key in keys:
            out[key] += _statistic_of(seed, key, capability, statistic, index)
    return {key: value / len(capabilities) for key, value in out.items()}


def two_level(per_seed: Sequence[np.ndarray], replicates: int, rng: np.random.Generator) -> np.ndarray:
    """Two-level bootstrap replicates from each seed's row-bootstrap replicates.

    Replicate ``b``: draw ``S`` seeds with replacement; for each drawn seed take one of its row replicates at
    random (an independent row resample of that seed); average.
    """
    if not per_seed:
        raise ValueError("no seeds")
    stack = np.stack([np.asarray(r, dtype=np.float64) for r in per_seed])  # (S, R)
    seeds, pool = stack.shape
    drawn = rng.integers(0, seeds, size=(replicates, seeds))
    picked = rng.integers(0, pool, size=(replicates, seeds))
    return stack[drawn, picked].mean(axis=1)


def interval(samples: np.ndarray, level: float = LEVEL) -> Tuple[float, float]:
    """The central ``level`` percentile interval of the replicates (NaN replicates left out)."""
    values = np.asarray(samples, dtype=np.float64)
    values = values[~np.isnan(values)]
    if not len(values):
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def verdict(low: float, high: float) -> str:
    """``win`` when the interval of a difference lies above 0, ``loss`` when below 0, else ``tie``."""
    if np.isnan(low) or np.isnan(high):
        return "tie"
    return "win" if low > 0 else "loss" if high < 0 else "tie"


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its 95% interval (and, for a difference, the verdict)."""

    value: float
    low: float
    high: float

    @property
    def verdict(self) -> str:
        return verdict(self.low, self.high)

    def text(self, digits: int = 3, signed: bool = True) -> str:
        sign = "+" if signed else ""
        return f"{self.value:{sign}.{digits}f} [{self.low:{sign}.{digits}f}, {self.high:{sign}.{digits}f}]"


@dataclass(frozen=True)
class Comparison:
    """``a`` against ``b``: pooled over seeds (two-level bootstrap) and per seed (rows only)."""

    pooled: Estimate
    per_seed: List[Estimate]


def compare(
    seeds: Sequence[Seed],
    a: str,
    b: str,
    capabilities: Sequence[str],
    replicates: int = REPLICATES,
    random_seed: int = 0,
    keys: Optional[Sequence[Tuple[str, str]]] = None,
    statistic: str = GAIN,
) -> Comparison:
    """The paired difference "``a`` better than ``b``": ``G(a) - G(b)``, or ``loss(b) - loss(a)``; ``keys`` gives
    per-seed ``(a, b)`` keys where they differ by seed.

    The point estimate is the mean over seeds of each seed's difference on all its rows; each seed's interval is
    its row bootstrap, the pooled one the two-level bootstrap of those replicates.
    """
    rng = np.random.default_rng(random_seed)
    sign = 1.0 if statistic == GAIN else -1.0
    pairs = list(keys) if keys is not None else [(a, b)] * len(seeds)
    per_seed, reps = [], []
    for seed, (ka, kb) in zip(seeds, pairs):
        r = item_replicates(seed, [ka, kb], capabilities, replicates, rng, statistic)
        diff = sign * (r[ka] - r[kb])
        point = sign * (
            statistic_value(seed, ka, capabilities, statistic) - statistic_value(seed, kb, capabilities, statistic)
        )
        per_seed.append(Estimate(point, *interval(diff)))
        reps.append(diff)
    pooled = two_level(reps, replicates, rng)
    return Comparison(Estimate(float(np.mean([e.value for e in per_seed])), *interval(pooled)), per_seed)


def gain_estimate(
    seeds: Sequence[Seed],
    keys: Sequence[str],
    capabilities: Sequence[str],
    replicates: int = REPLICATES,
    random_seed: int = 0,
    statistic: str = GAIN,
) -> Comparison:
    """The statistic of one model (``keys[s]`` in seed ``s``) with two-level and per-seed intervals."""
    rng = np.random.default_rng(random_seed)
    per_seed, reps = [], []
    for seed, key in zip(seeds, keys):
        r = item_replicates(seed, [key], capabilities, replicates, rng, statistic)[key]
        per_seed.append(Estimate(statistic_value(seed, key, capabilities, statistic), *interval(r)))
        reps.append(r)
    pooled = two_level(reps, replicates, rng)
    return Comparison(Estimate(float(np.mean([e.value for e in per_seed])), *interval(pooled)), per_seed)
