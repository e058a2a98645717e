"""Paired statistics of merge quality from per-item correctness (pure functions, numpy only).

A *seed* is one training seed's per-item results: ``{model key: {skill: items}}``, with the
base under ``"base"`` and each skill's own expert under ``"expert/<skill>"``; every model of a
seed was scored on the same items, in the same order, so differences are paired. ``items`` is
either a 0/1 array (the score is its mean: exact match) or a ``(2, n)`` array of per-item
numerators and denominators (the score is ``sum(num) / sum(den)`` over the items: token
accuracy = correct / tokens, loss = nats / tokens, each row of text one item).

* **gain kept** of a model: ``G = mean_c (acc_c - base_c) / (expert_c - base_c)`` over the
  skills ``c`` (0 = no better than the base, 1 = every skill at its own expert's level). For a
  loss it is the same ratio, ``(loss_base - loss_c) / (loss_base - loss_expert)``;
* **item bootstrap** (one seed): resample the items of every skill with replacement, the same
  indices for every model, and recompute; ``B`` replicates;
* **two-level bootstrap** (several seeds): resample the seeds with replacement, then the items
  within each drawn seed, and average the drawn seeds' statistics. A seed drawn twice gets two
  independent item resamples. Seed-to-seed variation of a method (which an item-only interval
  leaves out) widens the interval;
* **interval**: the 2.5 and 97.5 percentiles of the replicates (95%, percentile bootstrap);
* **verdict**: ``win`` when the interval of (method - reference) lies above 0, ``loss`` when it
  lies below 0, else ``tie``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

Seed = Mapping[str, Mapping[str, np.ndarray]]  # model key -> skill -> per-item 0/1, or (2, n) numerators, denominators
LEVEL = 0.95


def as_items(bits: str) -> np.ndarray:
    """The per-item string ``score_items`` stores (``"0110..."``) as a float array of 0/1."""
    if not bits or set(bits) - {"0", "1"}:
        raise ValueError(f"per-item results must be a non-empty string of 0/1, got {bits[:20]!r}")
    return np.frombuffer(bits.encode(), dtype=np.uint8).astype(np.float64) - ord("0")


def ratio_items(numerators: Sequence[float], denominators: Sequence[float]) -> np.ndarray:
    """Per-item numerators and denominators (e.g. a row's nats and tokens) as the ``(2, n)`` array a seed holds."""
    num, den = np.asarray(numerators, dtype=np.float64), np.asarray(denominators, dtype=np.float64)
    if num.shape != den.shape or num.ndim != 1 or not len(num) or (den <= 0).any():
        raise ValueError(
            f"per-item ratios need equally long, non-empty lists with positive denominators, got "
            f"{num.shape} and {den.shape}"
        )
    return np.stack([num, den])


def size(items: np.ndarray) -> int:
    """How many items (rows) a seed's entry holds."""
    return int(np.shape(items)[-1])


def score(items: np.ndarray, index: Optional[np.ndarray] = None) -> np.ndarray:
    """The score of ``items`` (mean, or ratio of sums for a ``(2, n)`` array), over ``index`` rows when given
    (``index`` of shape ``(replicates, n)`` gives one score per replicate)."""
    values = np.asarray(items, dtype=np.float64)
    if values.ndim == 1:
        return values.mean() if index is None else values[index].mean(axis=-1)
    num, den = values
    if index is None:
        return num.sum() / den.sum()
    return num[index].sum(axis=-1) / den[index].sum(axis=-1)


def expert_key(skill: str) -> str:
    """The key of ``skill``'s own expert in a seed."""
    return f"expert/{skill}"


def _check(seed: Seed, keys: Sequence[str], skills: Sequence[str]) -> None:
    for skill in skills:
        sizes = {key: size(seed[key][skill]) for key in [*keys, "base", expert_key(skill)]}
        if len(set(sizes.values())) != 1 or not next(iter(sizes.values())):
            raise ValueError(f"{skill}: models were scored on different (or no) items: {sizes}")


def gain(seed: Seed, key: str, skills: Sequence[str]) -> float:
    """``G`` of model ``key`` in ``seed`` over ``skills`` (see the module docstring)."""
    _check(seed, [key], skills)
    return float(np.mean([_gain_of(seed, key, skill, None) for skill in skills]))


def _gain_of(seed: Seed, key: str, skill: str, index: Optional[np.ndarray]) -> np.ndarray:
    def acc(model: str) -> np.ndarray:
        return score(seed[model][skill], index)

    base, expert = acc("base"), acc(expert_key(skill))
    span = expert - base
    return (acc(key) - base) / np.where(span == 0, np.nan, span)


def item_replicates(
    seed: Seed, keys: Sequence[str], skills: Sequence[str], replicates: int, rng: np.random.Generator
) -> Dict[str, np.ndarray]:
    """``{key: (replicates,) G}`` under one item resampling shared by all ``keys`` (paired).

    A replicate whose resampled expert does not beat the resampled base on some skill is NaN
    (the ratio is undefined there); :func:`interval` ignores NaN replicates and reports how many.
    """
    _check(seed, keys, skills)
    out = {key: np.zeros(replicates) for key in keys}
    for skill in skills:
        count = size(seed["base"][skill])
        index = rng.integers(0, count, size=(replicates, count))
        for key in keys:
            out[key] += _gain_of(seed, key, skill, index)
    return {key: value / len(skills) for key, value in out.items()}


def two_level(per_seed: Sequence[np.ndarray], replicates: int, rng: np.random.Generator) -> np.ndarray:
    """Two-level bootstrap replicates from each seed's item-bootstrap replicates.

    Replicate ``b``: draw ``S`` seeds with replacement; for each drawn seed take one of its item
    replicates at random (an independent item resample of that seed); average.
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
    """``win`` when the interval excludes 0 from above, ``loss`` from below, else ``tie``."""
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
    """``a - b`` in gain kept: pooled over seeds (two-level) and per seed (items only)."""

    pooled: Estimate
    per_seed: List[Estimate]


def compare(
    seeds: Sequence[Seed],
    a: str,
    b: str,
    skills: Sequence[str],
    replicates: int = 4000,
    random_seed: int = 0,
    keys: Optional[Sequence[Tuple[str, str]]] = None,
) -> Comparison:
    """Paired difference ``G(a) - G(b)``; ``keys`` gives per-seed (a, b) keys when they differ by seed.

    The point estimate is the mean over seeds of each seed's difference on all its items.
    """
    rng = np.random.default_rng(random_seed)
    pairs = list(keys) if keys is not None else [(a, b)] * len(seeds)
    per_seed, reps = [], []
    for seed, (ka, kb) in zip(seeds, pairs):
        r = item_replicates(seed, [ka, kb], skills, replicates, rng)
        diff = r[ka] - r[kb]
        point = gain(seed, ka, skills) - gain(seed, kb, skills)
        per_seed.append(Estimate(point, *interval(diff)))
        reps.append(diff)
    pooled = two_level(reps, replicates, rng)
    return Comparison(Estimate(float(np.mean([e.value for e in per_seed])), *interval(pooled)), per_seed)


def gain_estimate(
    seeds: Sequence[Seed], keys: Sequence[str], skills: Sequence[str], replicates: int = 4000, random_seed: int = 0
) -> Comparison:
    """``G`` of one model (``keys[s]`` in seed ``s``) with two-level and per-seed intervals."""
    rng = np.random.default_rng(random_seed)
    per_seed, reps = [], []
    for seed, key in zip(seeds, keys):
        r = item_replicates(seed, [key], skills, replicates, rng)[key]
        per_seed.append(Estimate(gain(seed, key, skills), *interval(r)))
        reps.append(r)
    pooled = two_level(reps, replicates, rng)
    return Comparison(Estimate(float(np.mean([e.value for e in per_seed])), *interval(pooled)), per_seed)


def accuracy(seed: Seed, key: str, skill: str) -> float:
    """The score of model ``key`` on ``skill`` (exact match, token accuracy or loss: what the seed holds)."""
    return float(score(seed[key][skill]))
