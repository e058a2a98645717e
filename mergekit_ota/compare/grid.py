"""The merge methods ``mergekit-ota compare`` tries, their default grids, and the ``--methods``/``--grid`` options.

This module is the one home of the default grids (the benchmarks' ``merges.py`` grids; the rule, fixed
before any result is seen, at most 4 points per method):

* sparsifying methods: ``density`` in :data:`DENSITIES` x one scale knob ``lambda`` with two values;
* ``lambda`` is centred where an expert's own edit is reproduced where the others did not move:
  sum-type methods (``sum_i w_i tau_i``: task_arithmetic, dare_ties, ffg) get :data:`SUM_LAMBDAS`
  (interference adds up, so shrink); mean-type methods (``sum_i w_i m_i tau_i / sum_i w_i m_i``: ties,
  ota, ffg with sign consensus) get :data:`MEAN_LAMBDAS` (averaging shrinks, so amplify);
* ``ota`` without FFG has no density: ``power`` in :data:`POWERS` x :data:`MEAN_LAMBDAS`;
* ``task_arithmetic`` has no density: ``lambda`` in :data:`TASK_ARITHMETIC_LAMBDAS`;
* ``linear`` (the normalised average of the experts) has no knob: one point.

A method is named on the command line by its :attr:`MethodSpec.name` (``ota+ffg``, ``ffg+consensus``) or by
any merge method mergekit has registered (its grid is then one point, mergekit's defaults, unless ``--grid``
gives one). ``--grid METHOD:KEY=V1,V2,...`` sets one axis; the axes given for one method replace its default
grid with their product (its fixed parameters, e.g. ``density_scope: model`` of ``ota+ffg``, are kept).
"""

from __future__ import annotations

import difflib
import itertools
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from pydantic import BaseModel, ConfigDict, StrictBool, ValidationError, field_validator

from mergekit_ota.errors import ConfigError

DENSITIES = (0.1, 0.3)
SUM_LAMBDAS = (0.5, 1.0)
MEAN_LAMBDAS = (1.0, 1.5)
POWERS = (0.5, 1.0)
TASK_ARITHMETIC_LAMBDAS = (0.25, 0.5, 0.75, 1.0)
MAX_DEFAULT_POINTS = 4

Knobs = Dict[str, Any]


def product(**axes: Sequence[Any]) -> List[Knobs]:
    """Every combination of the axes' values, the first axis varying slowest."""
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*axes.values())]


@dataclass(frozen=True)
class MethodSpec:
    """One compared method: mergekit's ``merge_method``, parameters fixed for it, and its grid of knob dicts.

    ``baseline``: mergekit's own method (the reference a method is compared with is the best baseline).
    """

    name: str
    merge_method: str
    grid: Tuple[Knobs, ...]
    shared: Mapping[str, Any] = field(default_factory=dict)
    title: str = ""

    @property
    def baseline(self) -> bool:
        return self.merge_method not in ("ota", "ffg")

    def label(self, knobs: Mapping[str, Any]) -> str:
        """The setting as the report prints it, e.g. ``density=0.1, lambda=1.5`` (``default`` for no knob)."""
        return ", ".join(f"{k}={_text(v)}" for k, v in knobs.items()) or "default"


def _text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value).lower() if isinstance(value, bool) else str(value)


DEFAULT_METHODS: Tuple[MethodSpec, ...] = (
    MethodSpec("linear", "linear", ({},), title="linear (normalised average of the experts)"),
    MethodSpec("task_arithmetic", "task_arithmetic", tuple(product(**{"lambda": TASK_ARITHMETIC_LAMBDAS}))),
    MethodSpec("ties", "ties", tuple(product(density=DENSITIES, **{"lambda": MEAN_LAMBDAS}))),
    MethodSpec("dare_ties", "dare_ties", tuple(product(density=DENSITIES, **{"lambda": SUM_LAMBDAS}))),
    MethodSpec("ota", "ota", tuple(product(power=POWERS, **{"lambda": MEAN_LAMBDAS}))),
    MethodSpec(
        "ota+ffg",
        "ota",
        tuple(product(density=DENSITIES, **{"lambda": MEAN_LAMBDAS})),
        shared={"density_scope": "model"},
        title="ota+ffg (model-wide)",
    ),
    MethodSpec(
        "ffg+consensus",
        "ffg",
        tuple(product(density=DENSITIES, **{"lambda": MEAN_LAMBDAS})),
        shared={"normalize": True, "sign_consensus": "sum"},
        title="ffg (sign consensus): TIES with FFG saliency",
    ),
)
"""The default method set of ``compare`` (each grid at most :data:`MAX_DEFAULT_POINTS` points)."""

BY_NAME = {method.name: method for method in DEFAULT_METHODS}

GridValue = Union[StrictBool, int, float, str]
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class GridAxis(BaseModel):
    """One ``--grid METHOD:KEY=V1,V2,...`` option: values are read as YAML scalars (``0.1``, ``true``, ``auto``)."""

    model_config = ConfigDict(frozen=True)

    method: str
    key: str
    values: Tuple[GridValue, ...]

    @field_validator("key")
    @classmethod
    def _key(cls, key: str) -> str:
        if not _KEY.match(key):
            raise ValueError(f"{key!r} is not a parameter name")
        return key

    @field_validator("values")
    @classmethod
    def _values(cls, values: Tuple[GridValue, ...]) -> Tuple[GridValue, ...]:
        if not values:
            raise ValueError("no value given")
        if len({(isinstance(v, bool), v) for v in values}) != len(values):  # 1 and 1.0 are one value; true is not 1
            raise ValueError(f"a value is repeated: {', '.join(map(_text, values))}")
        return values

    @classmethod
    def parse(cls, text: str) -> "GridAxis":
        """``METHOD:KEY=V1,V2,...`` as a :class:`GridAxis`; :class:`ConfigError` naming the option otherwise."""
        import yaml

        method, colon, rest = text.partition(":")
        key, equals, listed = rest.partition("=")
        if not (colon and equals and method.strip()):
            raise ConfigError(f"--grid {text!r}: expected METHOD:KEY=V1,V2,... (e.g. ota:density=0.05,0.1,0.2)")
        words = [v.strip() for v in listed.split(",")]
        if not all(words):
            raise ConfigError(f"--grid {text!r}: an empty value (values are separated by single commas)")
        try:
            values = tuple(yaml.safe_load(v) for v in words)
        except yaml.YAMLError as err:
            raise ConfigError(f"--grid {text!r}: a value is not a YAML scalar") from err
        odd = [w for w, v in zip(words, values) if not isinstance(v, (bool, int, float, str))]
        if odd:
            raise ConfigError(f"--grid {text!r}: {odd[0]!r} is not a number, true/false or a word")
        try:
            return cls(method=method.strip(), key=key.strip(), values=values)
        except ValidationError as err:
            reasons = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in err.errors())
            raise ConfigError(f"--grid {text!r}: {reasons}") from err


def _registered() -> List[str]:
    from mergekit import merge_methods

    return sorted(m.spec.name for m in merge_methods.registered_methods())


def _unknown(name: str, known: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(
        f"--methods: {name!r} is neither a compare method ({', '.join(BY_NAME)}) nor a merge method mergekit "
        f"knows{hint}"
    )


def resolve(methods: Optional[Sequence[str]], grids: Sequence[str]) -> List[MethodSpec]:
    """The methods to compare: ``methods`` (default :data:`DEFAULT_METHODS`), each grid replaced where ``grids``
    (``--grid`` options) give axes for it. Raises :class:`ConfigError` for an unknown name, a repeated one, or a
    ``--grid`` naming a method not compared."""
    names = list(methods) if methods is not None else [m.name for m in DEFAULT_METHODS]
    if not names:
        raise ConfigError("--methods: no method named")
    registered = _registered()
    chosen: List[MethodSpec] = []
    for name in names:
        if name in BY_NAME:
            chosen.append(BY_NAME[name])
        elif name in registered:
            chosen.append(MethodSpec(name, name, ({},)))
        else:
            raise _unknown(name, list(BY_NAME) + registered)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"--methods: {', '.join(repeated)} named twice")
    axes: Dict[str, Dict[str, Tuple[GridValue, ...]]] = {}
    for text in grids:
        axis = GridAxis.parse(text)
        if axis.method not in names:
            raise ConfigError(
                f"--grid {text!r}: method {axis.method!r} is not compared (compared: {', '.join(names)}; "
                "add it with --methods)"
            )
        if axis.key in axes.get(axis.method, {}):
            raise ConfigError(f"--grid {text!r}: {axis.method}:{axis.key} is given twice")
        axes.setdefault(axis.method, {})[axis.key] = axis.values
    return [
        MethodSpec(m.name, m.merge_method, tuple(product(**axes[m.name])), m.shared, m.title) if m.name in axes else m
        for m in chosen
    ]
