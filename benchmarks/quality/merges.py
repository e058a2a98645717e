"""The merge methods compared, their tuning grids, and the mergekit configurations they make.

Every setting is a mergekit YAML dictionary (written to ``configs/NAME.yml`` as the file
a user would pass to ``mergekit-yaml``) and run in-process through
``mergekit.merge.run_merge`` on ``MergeConfiguration.model_validate`` of that same dict.

Grid rule (at most 4 settings per method, fixed before any result is seen):

* sparsifying methods: ``density`` in {0.1, 0.3} x one scale knob with two values;
* the scale knob is ``lambda``, centred on the value at which an expert's own edit is
  reproduced where the others did not move: sum-type methods (``sum_i w_i tau_i``:
  task_arithmetic, dare_ties, breadcrumbs_ties, ffg) get lambda in {0.5, 1.0}
  (interference adds up, so shrink), mean-type methods (``sum_i w_i m_i tau_i / sum_i
  w_i m_i``: ties, ota) get lambda in {1.0, 1.5} (averaging shrinks, so amplify);
* ``ota`` without FFG has no density: power p in {0.5, 1.0} x lambda in {1.0, 1.5};
* ``task_arithmetic`` has no density: lambda in {0.25, 0.5, 0.75, 1.0};
* ``linear`` (the plain average of the experts) has no knob: one setting;
* ``ota (no base)`` (curvature-weighted averaging of the experts' weights, no task vectors,
  the authors' "OTA w/o FFG" configuration) has neither density nor lambda: p in {0.5, 1.0}.

Sign consensus (``sign_consensus: sum``, TIES's sign election after FFG masking):
``ota+ffg (model-wide, sign consensus)`` keeps ota+ffg (model-wide)'s grid; ``ffg (sign consensus)``
(normalised ffg with the consensus: TIES with FFG saliency in place of magnitude, per tensor) is a
mean-type method: density {0.1, 0.3} x lambda {1.0, 1.5}, TIES's grid.

``density: auto`` (the FFG-without-tuning issue's evidence): ``ota+ffg (model-wide, density: auto)``
takes each expert's density from its own saliency mass (``density: auto``, model-wide) at the default
``saliency_mass`` (chosen on the grafting curves' validation scores): no density is tuned, only
lambda {1.0, 1.5}.

Data Fisher (experts without optimizer state): ``ota (data Fisher, N=n)`` is ``ota`` with its grid on each expert's
diagonal Fisher measured on n of its own training rows (:mod:`benchmarks.quality.fisher`) instead of Adam's
``exp_avg_sq``, with ``curvature_scale: none`` like ``ota``; ``ota (data Fisher, N=n, scale: mean)`` the same under
the package's default ``mean``, against ``ota (scale: mean)``. A tier runs the n its suite measures
(``Suite.fisher_samples``).

Curvature-scale variants (the curvature-scale issue's evidence): ``ota`` and ``ota+ffg
(model-wide)`` run with the defaults (``bias_correction: auto``, which corrects every expert here,
since every store records its step and beta2) with ``curvature_scale: none`` (:data:`BENCHMARK_SCALE`, written into
every ``ota`` config: the package's default is ``mean`` since this comparison) and again with
``bias_correction: false`` (the raw ``exp_avg_sq``, as before the default changed) and with
``curvature_scale: mean`` / ``median`` (each expert's v divided by its model-wide mean / median;
that replaces bias correction).  Each variant keeps its method's grid.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from mergekit_ota.catalog import DEFAULT_SALIENCY_MASS
from mergekit_ota.compare.grid import DENSITIES, MEAN_LAMBDAS, POWERS, SUM_LAMBDAS, TASK_ARITHMETIC_LAMBDAS, product

AUTO_METHOD = "ota+ffg (model-wide, density: auto)"


@dataclass(frozen=True)
class Experts:
    """The models being merged: base, experts (by capability) and their curvature stores."""

    base: str
    models: Mapping[str, str]
    full_stores: Mapping[str, str] = field(default_factory=dict)
    rank1_stores: Mapping[str, str] = field(default_factory=dict)
    fisher_stores: Mapping[int, Mapping[str, str]] = field(default_factory=dict)  # N -> capability -> data Fisher

    def stores(self, kind: str) -> Mapping[str, str]:
        """The stores ``kind`` names: ``full``, ``rank1`` or ``fisherN`` (data Fisher on N rows; empty if not run)."""
        if kind.startswith("fisher"):
            return self.fisher_stores.get(int(kind[len("fisher") :]), {})
        return self.full_stores if kind == "full" else self.rank1_stores


@dataclass(frozen=True)
class Setting:
    """One point of one method's grid: ``label`` names the knobs, ``config`` is the mergekit dict."""

    method: str
    label: str
    config: Dict[str, Any]

    @property
    def slug(self) -> str:
        return slug(f"{self.method} {self.label}")


@dataclass(frozen=True)
class Method:
    """A compared method: mergekit ``merge_method``, curvature kind, grid of knob dicts."""

    name: str
    merge_method: str
    grid: Sequence[Dict[str, Any]]
    curvature: Optional[str] = None  # "full", "rank1", "fisherN" (data Fisher on N rows) or None
    shared: Dict[str, Any] = field(default_factory=dict)
    note: str = ""
    base: bool = True  # False: no base_model (ota's curvature-weighted averaging of the weights)
    per_expert: Dict[str, Any] = field(default_factory=dict)  # fixed per-expert parameters (density: auto)
    varies: str = ""  # a curvature-scale variant: the method it varies

    def grid_text(self) -> str:
        """The grid as the report prints it, e.g. ``density {0.1, 0.3} x lambda {0.5, 1.0}``."""
        if len(self.grid) == 1 and not self.grid[0]:
            return "none (1 setting)"
        keys = list(self.grid[0])
        parts = [f"{_knob(k)} {{{', '.join(_fmt(v) for v in dict.fromkeys(g[k] for g in self.grid))}}}" for k in keys]
        return " x ".join(parts)


def slug(text: str) -> str:
    """A file-name-safe version of ``text``."""
    text = text.replace("+", "_plus_").replace("λ", "lambda").replace("=", "")
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _knob(key: str) -> str:
    return {"lambda": "λ", "power": "p", "density": "d", "saliency_mass": "q"}.get(key, key)


SCALE_VARIANTS = (
    ("no bias correction", {"bias_correction": False}),
    ("scale: mean", {"curvature_scale": "mean"}),
    ("scale: median", {"curvature_scale": "median"}),
)


def scale_variants(method: Method) -> List[Method]:
    """``method`` under each of :data:`SCALE_VARIANTS`, named ``"<name> (<variant>)"`` (``ota+ffg (model-wide)``
    becomes ``ota+ffg (model-wide, <variant>)``)."""
    out = []
    for label, shared in SCALE_VARIANTS:
        out.append(
            Method(
                variant_name(method.name, label),
                method.merge_method,
                method.grid,
                curvature=method.curvature,
                shared={**method.shared, **shared},
                note=", ".join(f"{k}: {v}" for k, v in shared.items()),
                base=method.base,
                per_expert=method.per_expert,
                varies=method.name,
            )
        )
    return out


def variant_name(name: str, label: str) -> str:
    """``name`` under the curvature-scale variant ``label``, e.g. ``ota (scale: mean)``."""
    return f"{name[:-1]}, {label})" if name.endswith(")") else f"{name} ({label})"


def variant_of(name: str) -> Optional[str]:
    """The method a curvature-scale variant varies (``None`` for a method that is not one)."""
    return next((m.varies for m in methods() if m.name == name and m.varies), None)


def methods() -> List[Method]:
    """The compared methods with their grids (see the module docstring for the rule)."""
    core = _core_methods() + [AUTO_MASS_METHOD]
    return core + [v for m in core if m.name in SCALED for v in scale_variants(m)]


AUTO_MASSES = (0.9, DEFAULT_SALIENCY_MASS, 0.99)
AUTO_MASS_METHOD = Method(
    "ota+ffg (model-wide, density: auto, q grid)",
    "ota",
    product(saliency_mass=AUTO_MASSES, **{"lambda": MEAN_LAMBDAS}),
    curvature="full",
    shared={"density_scope": "model"},
    per_expert={"density": "auto"},
    note="density: auto per expert at each saliency mass q (the defaults study: which q to default to in merges)",
)
SCALED = ("ota", "ota+ffg (model-wide)", AUTO_MASS_METHOD.name)  # the methods run under every SCALE_VARIANTS entry

DEFAULTS_STUDY: Tuple[str, ...] = (
    "ties",
    *(name for base in SCALED for name in (base, *(variant_name(base, label) for label, _ in SCALE_VARIANTS))),
)
"""The methods ``run.py --study defaults`` merges: what ``regret.py`` chooses the defaults of ``curvature_scale``,
``saliency_mass`` (in merges) and ``lambda`` from, and TIES as the reference."""
STUDY_ONLY = frozenset(n for n in DEFAULTS_STUDY if n.startswith(AUTO_MASS_METHOD.name[:-1]))
"""Methods merged only when named (``--study defaults``), not in a tier's default run."""


FISHER_NS = (16, 128, 1024)  # data Fisher rows: a tier runs the Ns its suite measures (smoke 16; quick 128, 1024)


def fisher_method(n: int, scale: str = "none") -> str:
    """The name of ota on the data Fisher of N rows (``scale``: its ``curvature_scale``)."""
    return f"ota (data Fisher, N={n})" if scale == "none" else f"ota (data Fisher, N={n}, scale: {scale})"


def _core_methods() -> List[Method]:
    fisher = [
        Method(
            fisher_method(n, scale),
            "ota",
            product(power=POWERS, **{"lambda": MEAN_LAMBDAS}),
            curvature=f"fisher{n}",
            shared={"curvature_scale": scale},
            note=f"curvature: each expert's diagonal Fisher on {n} of its own training rows; curvature_scale: {scale}",
        )
        for n in FISHER_NS
        for scale in ("none", "mean")
    ]
    return (
        _base_methods()
        + fisher
        + [
            Method(
                "ota+ffg (model-wide, sign consensus)",
                "ota",
                product(density=DENSITIES, **{"lambda": MEAN_LAMBDAS}),
                curvature="full",
                shared={"density_scope": "model", "sign_consensus": "sum"},
                note="sign_consensus: sum",
            ),
            Method(
                "ffg (sign consensus)",
                "ffg",
                product(density=DENSITIES, **{"lambda": MEAN_LAMBDAS}),
                curvature="full",
                shared={"normalize": True, "sign_consensus": "sum"},
                note="TIES with FFG saliency: normalize, sign_consensus: sum (disjoint mean)",
            ),
            Method(
                AUTO_METHOD,
                "ota",
                product(saliency_mass=(DEFAULT_SALIENCY_MASS,), **{"lambda": MEAN_LAMBDAS}),
                curvature="full",
                shared={"density_scope": "model"},
                per_expert={"density": "auto"},
                note="density: auto per expert (its own saliency mass), no density tuned",
            ),
        ]
    )


def _base_methods() -> List[Method]:
    return [
        Method("ota", "ota", product(power=POWERS, **{"lambda": MEAN_LAMBDAS}), curvature="full"),
        Method("ota (rank-1 curvature)", "ota", product(power=POWERS, **{"lambda": MEAN_LAMBDAS}), curvature="rank1"),
        Method("ota+ffg (per tensor)", "ota", product(density=DENSITIES, **{"lambda": MEAN_LAMBDAS}), curvature="full"),
        Method(
            "ota+ffg (model-wide)",
            "ota",
            product(density=DENSITIES, **{"lambda": MEAN_LAMBDAS}),
            curvature="full",
            shared={"density_scope": "model"},
        ),
        Method(
            "ota (no base)",
            "ota",
            product(power=POWERS),
            curvature="full",
            base=False,
            note="theta = sum_i w_i t_i / sum_i w_i: curvature-weighted averaging, no base",
        ),
        Method(
            "ffg",
            "ffg",
            product(density=DENSITIES, **{"lambda": SUM_LAMBDAS}),
            curvature="full",
            note="task arithmetic over FFG-grafted task vectors",
        ),
        Method("ties", "ties", product(density=DENSITIES, **{"lambda": MEAN_LAMBDAS})),
        Method("dare_ties", "dare_ties", product(density=DENSITIES, **{"lambda": SUM_LAMBDAS})),
        Method(
            "breadcrumbs_ties",
            "breadcrumbs_ties",
            product(density=DENSITIES, **{"lambda": SUM_LAMBDAS}),
            note="gamma 0.01 (mergekit default)",
        ),
        Method("task_arithmetic", "task_arithmetic", product(**{"lambda": TASK_ARITHMETIC_LAMBDAS})),
        Method("linear", "linear", [{}], note="equal weights, normalised"),
    ]


PER_EXPERT = ("density", "weight")
BENCHMARK_SCALE = "none"
"""``curvature_scale`` of every ``ota`` method that does not set its own: ``none``, what the comparison that chose
the default (``mean``, :data:`mergekit_ota.catalog.DEFAULT_CURVATURE_SCALE`) ran with. Written into each config, so
``ota`` rows stay the rows the cached results and the reports hold whatever the package's default is, and the
``(scale: mean)`` rows are the default's."""


def config_for(method: Method, knobs: Mapping[str, Any], experts: Experts, dtype: str = "float32") -> Dict[str, Any]:
    """The mergekit YAML dict of ``method`` at ``knobs`` over all of ``experts``."""
    if method.merge_method == "linear":
        return {
            "merge_method": "linear",
            "models": [{"model": path, "parameters": {"weight": 1.0}} for path in experts.models.values()],
            "parameters": {"normalize": True},
            "dtype": dtype,
        }
    per_expert = {"weight": 1.0, **method.per_expert, **{k: v for k, v in knobs.items() if k in PER_EXPERT}}
    shared = {**method.shared, **{k: v for k, v in knobs.items() if k not in PER_EXPERT}}
    if method.merge_method == "ota":
        shared = {"curvature_scale": BENCHMARK_SCALE, **shared}
    models = []
    for cap, path in experts.models.items():
        parameters = dict(per_expert)
        if method.curvature:
            parameters["curvature"] = experts.stores(method.curvature)[cap]
        models.append({"model": path, "parameters": parameters})
    config: Dict[str, Any] = {"merge_method": method.merge_method, "models": models}
    if method.base:
        config["base_model"] = experts.base
    if shared:
        config["parameters"] = shared
    config["dtype"] = dtype
    return config


def settings(experts: Experts, dtype: str = "float32", only: Optional[Sequence[str]] = None) -> List[Setting]:
    """Every grid point of every method but :data:`STUDY_ONLY` (or of the methods named in ``only``)."""
    out = []
    for method in methods():
        if (method.name not in only) if only is not None else (method.name in STUDY_ONLY):
            continue
        if method.curvature and not experts.stores(method.curvature):
            continue  # a data Fisher this tier did not measure
        for knobs in method.grid:
            label = ", ".join(f"{_knob(k)}={_fmt(v)}" for k, v in knobs.items()) or "default"
            out.append(Setting(method.name, label, config_for(method, knobs, experts, dtype)))
    return out


def write_config(config: Mapping[str, Any], path: str) -> None:
    """Write ``config`` as the YAML file a user would pass to ``mergekit-yaml``."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fp:
        yaml.safe_dump(dict(config), fp, sort_keys=False)


def run_config(config: Mapping[str, Any], out_dir: str, seed: int = 0, device: str = "cpu") -> float:
    """Merge ``config`` into ``out_dir`` in-process with mergekit; return the wall seconds.

    ``random_seed`` is fixed so ``dare_ties`` and the random grafting masks repeat.
    """
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    import mergekit_ota

    mergekit_ota.install()  # register ota/ffg and patch mergekit (whether or not the start-up hook is on)

    options = MergeOptions(quiet=True, random_seed=seed, device=device)
    started = time.perf_counter()
    run_merge(MergeConfiguration.model_validate(dict(config)), out_dir, options)
    return time.perf_counter() - started
