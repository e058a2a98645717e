"""The verdicts of a compare run, computed from its results (``results.json``) alone, so a report can be rebuilt.

* the **statistic**: ``G`` (gain kept, averaged over the gain capabilities) when every capability's rows name
  their expert and at least one expert beats the base on the selection half by :data:`.select.MIN_GAIN`;
  otherwise the mean held-out loss over the capabilities. Per capability the report shows ``G_c`` where ``G``
  averages it, else the capability's loss;
* per method, its grid point chosen on the selection half, and the reference (best baseline) chosen there
  too (:mod:`.select`);
* on the report half: each method's statistic, per capability ``G_c`` (or the loss) with a 95% row-bootstrap
  interval, and the paired difference with the reference (95% paired row bootstrap, the verdict from its
  interval only);
* the **winner**: the method whose chosen point has the best report-half statistic (``best.yml``).

A verdict needs at least :data:`MIN_VERDICT_ROWS` report-half rows of every capability the statistic averages:
a bootstrap over fewer rows gives intervals that are too narrow (over one row, of width zero), so with fewer
the verdicts are ``n/a`` (:attr:`Summary.thin` names the capabilities), whatever the intervals say.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from mergekit_ota.compare import select, stats
from mergekit_ota.compare.dataset import REPORT, SELECTION

MIN_VERDICT_ROWS = 10  # report-half rows per capability below which no win/loss is declared
NO_VERDICT = "n/a"


@dataclass(frozen=True)
class MethodResult:
    """One method at its chosen point, on the report half."""

    method: str
    title: str
    baseline: bool
    model: Mapping[str, Any]  # its chosen point's entry of results["models"]
    selection: float
    value: stats.Estimate
    per_capability: Dict[str, stats.Estimate]
    versus: Optional[stats.Estimate]  # against the reference (None for the reference itself)
    exact: Optional[float]  # exact match over the report half's answer rows (chats, completions; None without)


@dataclass(frozen=True)
class Summary:
    statistic: str
    capabilities: List[str]  # what the statistic averages over
    skipped: List[str]  # capabilities whose expert does not beat the base on the selection half (G_c n/a)
    reference: Optional[str]
    methods: List[MethodResult]
    winner: Optional[str]
    losses: Dict[str, Dict[str, float]]  # model name -> capability -> report-half loss (every model)
    rows: Dict[str, Dict[str, int]]  # capability -> half -> rows
    thin: Dict[str, int]  # capabilities with fewer than MIN_VERDICT_ROWS report-half rows -> their rows

    def verdict(self, result: MethodResult) -> str:
        """``result``'s verdict against the reference: ``win``/``tie``/``loss`` from its interval, ``n/a`` when a
        capability has too few report-half rows (:data:`MIN_VERDICT_ROWS`), ``""`` for the reference itself."""
        if result.versus is None:
            return ""
        return NO_VERDICT if self.thin else result.versus.verdict


def _seed(results: Mapping[str, Any], half: str, chosen: Sequence[Mapping[str, Any]]) -> stats.Seed:
    """``{model name: {capability: (2, n) nats, tokens}}`` of ``half``, with ``base`` and ``expert/<c>``."""
    rows = results["rows"]
    by_capability = {
        c: [i for i, r in enumerate(rows) if r["capability"] == c and r["half"] == half]
        for c in results["capabilities"]
    }
    by_path = {m["path"]: m for m in results["models"] if m["kind"] in ("base", "expert")}

    def items(model: Mapping[str, Any]) -> Dict[str, np.ndarray]:
        nats, tokens = model["scores"]["nats"], model["scores"]["tokens"]
        return {
            c: stats.ratio_items([nats[i] for i in idx], [tokens[i] for i in idx]) for c, idx in by_capability.items()
        }

    seed: Dict[str, Dict[str, np.ndarray]] = {"base": items(by_path[results["base"]])}
    for capability, path in results["experts"].items():
        seed[stats.expert_key(capability)] = items(by_path[path])
    for model in chosen:
        seed[model["name"]] = items(model)
    return seed


def _exact(results: Mapping[str, Any], model: Mapping[str, Any]) -> Optional[float]:
    answered = [i for i, r in enumerate(results["rows"]) if r["answer"] and r["half"] == REPORT]
    if not answered:
        return None
    return float(np.mean([model["scores"]["exact"][i] for i in answered]))


def summarize(results: Mapping[str, Any]) -> Summary:
    """The :class:`Summary` of ``results`` (see the module docstring)."""
    options = results["options"]
    replicates, seed_value = int(options["replicates"]), int(options["seed"])
    capabilities = list(results["capabilities"])
    points = [m for m in results["models"] if m["kind"] == "point"]
    selection = _seed(results, SELECTION, points)
    report = _seed(results, REPORT, points)
    named = [c for c in capabilities if c in results["experts"]]
    gains = select.gain_capabilities(selection, named)
    statistic = stats.GAIN if gains and len(named) == len(capabilities) else stats.LOSS
    used = gains if statistic == stats.GAIN else capabilities
    skipped = [c for c in named if c not in gains]
    chosen = select.choose(selection, [(m["method"], m["name"]) for m in points], used, statistic)
    info = {m["name"]: m for m in results["methods"]}
    baselines = [m["name"] for m in results["methods"] if m["baseline"]]
    reference = select.reference(chosen, baselines, statistic)
    by_name = {m["name"]: m for m in points}
    out: List[MethodResult] = []
    for method in [m["name"] for m in results["methods"] if m["name"] in chosen]:
        key, value = chosen[method]
        whole = stats.gain_estimate([report], [key], used, replicates, seed_value, statistic).per_seed[0]
        per_capability = {}
        for capability in capabilities:
            kind = stats.GAIN if statistic == stats.GAIN and capability in used else stats.LOSS
            estimate = stats.gain_estimate([report], [key], [capability], replicates, seed_value, kind)
            per_capability[capability] = estimate.per_seed[0]
        versus = None
        if reference is not None and method != reference:
            versus = stats.compare(
                [report], key, chosen[reference][0], used, replicates, seed_value, statistic=statistic
            ).per_seed[0]
        out.append(
            MethodResult(
                method,
                info[method]["title"],
                info[method]["baseline"],
                by_name[key],
                value,
                whole,
                per_capability,
                versus,
                _exact(results, by_name[key]),
            )
        )
    winner = max(out, key=lambda r: stats.merit(r.value.value, statistic)).method if out else None
    losses = {}
    for model in [m for m in results["models"] if m["kind"] != "point"] + [r.model for r in out]:
        seed = _seed(results, REPORT, [model])
        losses[model["name"]] = {c: stats.accuracy(seed, model["name"], c) for c in capabilities}
    rows = {
        c: {h: sum(1 for r in results["rows"] if r["capability"] == c and r["half"] == h) for h in (SELECTION, REPORT)}
        for c in capabilities
    }
    thin = {c: rows[c][REPORT] for c in used if rows[c][REPORT] < MIN_VERDICT_ROWS}
    return Summary(statistic, used, skipped, reference, out, winner, losses, rows, thin)
