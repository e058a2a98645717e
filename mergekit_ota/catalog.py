"""What each merge method is called and takes: names, scopes, defaults and descriptions, as plain data.

The one table behind mergekit's ``ParameterSpec`` lists (:mod:`mergekit_ota.methods.settings`) and
``mergekit-ota methods``, which prints it without importing mergekit or torch.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, Optional, Tuple, Union

DEFAULT_SALIENCY_MASS = 0.95
"""``ffg``'s ``saliency_mass`` (grafting: ``density: auto`` keeps the fewest entries whose saliency ``v * tau**2`` sums
to this share of the expert's total). Chosen on validation (benchmarks/results/quality-sft.md, "density: auto"):
grafting each sft expert alone at masses 0.5-0.99, 0.95 is the smallest at which every expert kept >= 0.95 of its
validation score in every seed (0.9 kept 0.69-0.77 of the ISO-date expert)."""

DEFAULT_OTA_SALIENCY_MASS = 0.99
"""``ota``'s ``saliency_mass`` (merging with ``density: auto``): the mass with the smallest worst-case regret over
the tiers and variants of benchmarks/results/quality-defaults.md (``python -m benchmarks.quality.regret``). Under the
default ``curvature_scale`` it was never beaten on any tier that ran the mass grid (0.95, grafting's value, by up to
0.313 in validation G, on the quick tier's constant-learning-rate variant). It keeps 2-4x more entries than 0.95
(7-34% against 2-14% on the quick tiers): a merge needs each expert's smaller edits too."""


def saliency_mass_default(method: str) -> float:
    """The default ``saliency_mass`` of ``method`` (``ota`` merges: 0.99; ``ffg``, the grafting method: 0.95)."""
    return DEFAULT_OTA_SALIENCY_MASS if method == "ota" else DEFAULT_SALIENCY_MASS


DEFAULT_CURVATURE_SCALE = "mean"
"""``curvature_scale``'s default: each expert's ``v`` divided by its model-wide mean. The setting with the smallest
worst-case regret over six kinds of experts (benchmarks/results/quality-defaults.md, ``python -m
benchmarks.quality.regret``): 0.085 in validation G (on constant-learning-rate SmolLM2 chat experts, where ``none``
is best), against 0.500 for ``none`` (bias-corrected), 0.676 without bias correction and 0.346 for ``median``."""

BiasMode = Union[Literal["auto"], bool]


class Parameter(NamedTuple):
    """One method parameter: ``per_expert`` ones go under each model's ``parameters``, the others at the top.

    ``expects`` says what a value must be (``NAME must be EXPECTS; got VALUE``, the one message for a bad value,
    :class:`mergekit_ota.methods.settings.BadValue`); ``choices`` are the words it takes, for a did-you-mean.
    """

    name: str
    value_type: Any
    per_expert: bool
    default: Any
    description: str
    expects: str = ""
    choices: Tuple[str, ...] = ()


class MethodCard(NamedTuple):
    """A merge method as ``mergekit-ota methods`` lists it."""

    name: str
    pretty_name: str
    reference_url: str
    parameters: Tuple[Parameter, ...]


EXPERT: Tuple[Parameter, ...] = (
    Parameter(
        "weight", float, True, 1.0, "relative weight of the expert (ota: >= 0; ffg: any sign)", "a finite number"
    ),
    Parameter(
        "density",
        Any,
        True,
        None,
        "FFG: fraction of entries kept, or 'auto' (model-wide, from the expert's saliency mass)",
        "a number in (0, 1] or 'auto'",
        ("auto",),
    ),
    Parameter("threshold", Optional[float], True, None, "FFG: absolute saliency threshold", "a finite number >= 0"),
    Parameter("curvature", Any, True, None, "exp_avg_sq store path, or a tensor in memory"),
    Parameter(
        "optimizer_step", Optional[int], True, None, "Adam step count, for bias_correction", "a whole number >= 1"
    ),
    Parameter("beta2", Optional[float], True, None, "Adam beta2, for bias_correction", "a number in (0, 1)"),
    Parameter(
        "bias_corrected",
        Optional[bool],
        True,
        None,
        "the curvature is already bias-corrected (default: its store's metadata)",
        "true or false",
    ),
)
COMMON_SHARED: Tuple[Parameter, ...] = (
    Parameter("lambda", float, False, 1.0, "scale of the merged task vector", "a finite number"),
    Parameter(
        "density_scope",
        Optional[str],
        False,
        None,
        "'tensor' or 'model': where density applies (unset: tensor, and model for an expert with density: auto)",
        "'tensor' or 'model'",
        ("tensor", "model"),
    ),
    Parameter(
        "bias_correction",
        BiasMode,
        False,
        "auto",
        "auto | true | false: divide v by (1 - beta2**step) where step and beta2 are known",
        "'auto', true or false",
        ("auto", "true", "false"),
    ),
    Parameter(
        "sign_consensus",
        str,
        False,
        "none",
        "none | sum | count: elect a sign per coordinate (TIES) and keep only the FFG-kept entries that agree "
        "(true = sum, false = none)",
        "'none', 'sum' or 'count' (or true for sum, false for none)",
        ("none", "sum", "count"),
    ),
)


def _saliency_mass(default: float, why: str) -> Parameter:
    return Parameter(
        "saliency_mass",
        float,
        False,
        default,
        f"density: auto keeps the fewest entries holding this share of each expert's saliency ({why})",
        "a number in (0, 1]",
    )


OTA_ONLY: Tuple[Parameter, ...] = (
    _saliency_mass(DEFAULT_OTA_SALIENCY_MASS, "merging: the smallest worst-case regret in the defaults study"),
    Parameter("power", float, False, 0.5, "exponent p in w = weight * v**p + eps", "a finite number >= 0"),
    Parameter("eps", float, False, 1e-12, "eps in w = weight * v**p + eps", "a finite number > 0"),
    Parameter(
        "curvature_scale",
        str,
        False,
        DEFAULT_CURVATURE_SCALE,
        "none | mean | median: divide each expert's v by its model-wide mean or median",
        "'none', 'mean' or 'median'",
        ("none", "mean", "median"),
    ),
)
FFG_ONLY: Tuple[Parameter, ...] = (
    _saliency_mass(DEFAULT_SALIENCY_MASS, "grafting: the smallest mass that held every sft expert"),
    Parameter(
        "normalize", bool, False, False, "divide the sum by sum_i weight_i (which must not be 0)", "true or false"
    ),
)

BY_NAME = {p.name: p for card in (EXPERT, COMMON_SHARED, OTA_ONLY, FFG_ONLY) for p in card}
"""Every parameter of both methods by name (a name means the same in each; ``saliency_mass``'s default differs:
:func:`saliency_mass_default`)."""

PAPER = "https://arxiv.org/abs/2509.11167"
OTA = MethodCard("ota", "OTA (Optimization Trajectory Aware)", PAPER, EXPERT + COMMON_SHARED + OTA_ONLY)
FFG = MethodCard("ffg", "FFG (Fast Fisher Grafting)", PAPER, EXPERT + COMMON_SHARED + FFG_ONLY)
CARDS: Tuple[MethodCard, ...] = (OTA, FFG)


def _markdown_value(value: Any) -> str:
    """A default as YAML spells it, in backticks; ``None`` (no default: the parameter is unset) as ``unset``."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    return f"`{value}`"


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table() -> str:
    """The parameter table of docs/parameters.md: one row per parameter of either method, from :data:`CARDS`.

    ``python -m mergekit_ota.catalog --markdown`` prints it; a test compares it with the docs page. A method's
    column holds its default, or ``-`` where it does not take the parameter; a parameter described differently
    per method (``saliency_mass``) gets each method's description.
    """
    rows: dict = {}  # name -> {method: Parameter}, in the cards' order
    for card in CARDS:
        for parameter in card.parameters:
            rows.setdefault(parameter.name, {})[card.name] = parameter
    header = ["parameter", "where"] + [f"`{card.name}` default" for card in CARDS] + ["takes", "meaning"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, per_method in rows.items():
        first = next(iter(per_method.values()))
        cells = [f"`{name}`", "per expert" if first.per_expert else "shared"]
        cells += [_markdown_value(per_method[c.name].default) if c.name in per_method else "-" for c in CARDS]
        meanings = {p.description for p in per_method.values()}
        meaning = (
            first.description
            if len(meanings) == 1
            else "; ".join(f"{m}: {p.description}" for m, p in per_method.items())
        )
        cells += [first.expects, meaning]
        lines.append("| " + " | ".join(_markdown_cell(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import argparse

    arguments = argparse.ArgumentParser(
        prog="python -m mergekit_ota.catalog", description="Print the parameter table of both merge methods."
    )
    arguments.add_argument("--markdown", action="store_true", help="as the Markdown table of docs/parameters.md")
    if arguments.parse_args().markdown:
        print(markdown_table(), end="")
    else:
        for card in CARDS:
            print(f"{card.name}: " + ", ".join(p.name for p in card.parameters))
