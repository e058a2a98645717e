"""A model's trainable parameters, in the order an optimizer sees them, built from its config.

The model is instantiated on the ``meta`` device (no memory, no weights read) from
``config.json`` with the installed transformers (never remote code);
``named_parameters()`` gives the names and shapes, tied weights once (under the
first name, e.g. ``model.embed_tokens.weight``), exactly as ``Trainer`` and
``torch.optim`` see them.  :func:`index_candidates` lists the ways an index-keyed
optimizer may have ordered them (see :mod:`mergekit_ota.export.mapping`).
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from mergekit_ota.errors import CurvatureError
from mergekit_ota.export.mapping import Candidate, Shape

# path components that wrappers (DDP, torch.compile, FSDP1, activation checkpointing) add to names
_WRAPPERS = re.compile(r"(^|\.)(module|_orig_mod|_fsdp_wrapped_module|_checkpoint_wrapped_module)(?=\.)")


def clean_name(name: str) -> str:
    """``name`` without wrapper components: ``module._orig_mod.model.x.weight`` -> ``model.x.weight``."""
    return _WRAPPERS.sub("", name).lstrip(".")


@dataclass
class ModelParameters:
    """``named_parameters()`` of the model at ``path`` (name, shape), with the meta model."""

    path: str
    parameters: List[Tuple[str, Shape]]
    model: object
    frozen: Tuple[str, ...] = ()

    @property
    def shapes(self) -> Dict[str, Shape]:
        return dict(self.parameters)

    def trainable(self) -> List[Tuple[str, Shape]]:
        """The parameters minus those named frozen (``--frozen`` globs)."""
        return [(n, s) for n, s in self.parameters if n not in self.frozen]


def _config_dir(path: str) -> str:
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(path) and os.path.basename(path) == "config.json":
        return os.path.dirname(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        return path
    raise CurvatureError(
        f"{path}: no config.json; the model's parameter list (names and order) is built from its config: "
        f"point --model at the model directory (the one holding config.json)"
    )


#: the most layers (or experts) a config may ask for: the model is built module by module, even on ``meta``
#: (about 5 ms a layer), so a config asking for 10**9 would never finish; real models have under 200
MAX_REPEATS = 1024
_REPEATED = re.compile(r"(layers?|experts?)$")


def _check_repeats(config: Mapping[str, object], where: str) -> None:
    """Refuse an int config field counting layers or experts (``num_hidden_layers``, ``n_layer``,
    ``num_local_experts``, ...; nested configs too) above :data:`MAX_REPEATS`."""
    stack = [config]
    while stack:
        for key, value in stack.pop().items():
            if isinstance(value, Mapping):
                stack.append(value)
            elif isinstance(value, int) and not isinstance(value, bool) and _REPEATED.search(str(key)):
                if value > MAX_REPEATS:
                    raise CurvatureError(
                        f"{where}: {key} = {value:,}, more than the {MAX_REPEATS} layers or experts a model is built "
                        f"with here; is this the model's config?"
                    )


def load_model_parameters(path: str, frozen: Sequence[str] = ()) -> ModelParameters:
    """Instantiate the model of ``path`` (a directory with config.json) on ``meta``; list its parameters.

    ``frozen``: glob patterns of parameters frozen during training (they are
    left out of the index candidates); a pattern matching nothing is an error.
    """
    import transformers

    directory = _config_dir(path)
    try:
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    except Exception as error:  # transformers raises ValueError/OSError/KeyError for bad configs
        raise CurvatureError(f"{directory}/config.json: cannot load the model config ({error})") from error
    return model_parameters(config, directory, frozen)


def model_parameters(config: Any, directory: str, frozen: Sequence[str] = ()) -> ModelParameters:
    """The parameters of the model ``config`` (a ``transformers`` config) describes, instantiated on ``meta``;
    ``directory`` names where the config came from (in errors and in :attr:`ModelParameters.path`)."""
    import torch
    import transformers

    _check_repeats(config.to_dict(), f"{directory}/config.json")
    architectures = getattr(config, "architectures", None) or []
    first = architectures[0] if isinstance(architectures, (list, tuple)) and architectures else None
    cls = getattr(transformers, first, None) if isinstance(first, str) else None  # else: by model_type
    try:
        with torch.device("meta"):
            if cls is not None:
                model = cls(config)
            else:
                model = transformers.AutoModelForCausalLM.from_config(config)
    except Exception as error:
        raise CurvatureError(
            f"{directory}/config.json: cannot build the model {architectures or config.model_type!r} with the "
            "installed "
            f"transformers {transformers.__version__} ({error}); remote code is never run"
        ) from error
    parameters = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    names = [n for n, _ in parameters]
    chosen: List[str] = []
    for pattern in frozen:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise CurvatureError(f"--frozen {pattern!r} matches no parameter of the model in {directory}")
        chosen += hits
    return ModelParameters(path=directory, parameters=parameters, model=model, frozen=tuple(dict.fromkeys(chosen)))


def _norm_module_params(model: object) -> Set[str]:
    """Parameters of LayerNorm/RMSNorm modules (the pre-4.50 ``ALL_LAYERNORM_LAYERS`` rule, by class)."""
    import torch

    names: Set[str] = set()
    for module_name, module in model.named_modules():  # type: ignore[attr-defined]
        kind = type(module).__name__
        if isinstance(module, torch.nn.LayerNorm) or kind.endswith("LayerNorm") or kind.endswith("RMSNorm"):
            prefix = f"{module_name}." if module_name else ""
            names.update(prefix + n for n, _ in module.named_parameters(recurse=False))
    return names


def decay_rules(model: object) -> Dict[str, Set[str]]:
    """``{description: names that get weight decay}`` for each Trainer version's rule.

    * the installed transformers' own ``Trainer.get_decay_parameter_names`` (used as is);
    * transformers >= 4.50 (PR #35927): no ``bias``/``layernorm``/``rmsnorm``/``norm``
      name patterns, no ``nn.LayerNorm`` modules;
    * transformers < 4.50: no parameters of LayerNorm/RMSNorm modules, no ``bias`` names;
    * early transformers: no names containing ``bias`` or ``LayerNorm.weight``.
    """
    import torch
    import transformers
    from transformers.trainer_pt_utils import get_parameter_names

    names = [n for n, _ in model.named_parameters()]  # type: ignore[attr-defined]
    rules: Dict[str, Set[str]] = {}
    try:
        from transformers import Trainer

        rules[
            f"Trainer decay split (installed transformers {transformers.__version__}: "
            "Trainer.get_decay_parameter_names)"
        ] = set(
            Trainer.get_decay_parameter_names(None, model)  # type: ignore[arg-type]
        )
    except Exception:  # noqa: BLE001 - an installed Trainer that cannot be used is just one rule fewer
        pass
    patterns = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    rules["Trainer decay split (transformers >= 4.50 name rule)"] = set(
        get_parameter_names(model, [torch.nn.LayerNorm], patterns)
    )
    norms = _norm_module_params(model)
    rules["Trainer decay split (transformers < 4.50: norm modules, 'bias')"] = {
        n for n in names if n not in norms and "bias" not in n
    }
    rules["Trainer decay split (early transformers: 'bias', 'LayerNorm.weight')"] = {
        n for n in names if "bias" not in n and "LayerNorm.weight" not in n
    }
    return rules


def index_candidates(params: ModelParameters, groups: int) -> List[Candidate]:
    """Orders an index-keyed optimizer with ``groups`` param groups may have: one group of
    ``named_parameters()``, or (two groups) a Trainer decay / no-decay split."""
    trainable = tuple(params.trainable())
    candidates = [Candidate("one group in named_parameters() order", (trainable,))]
    if groups != 2:
        return candidates
    for description, decay in decay_rules(params.model).items():
        groups = (tuple(p for p in trainable if p[0] in decay), tuple(p for p in trainable if p[0] not in decay))
        candidates.append(Candidate(description, groups))
    return candidates


def verify_names(shapes: Mapping[str, Shape], params: Optional[ModelParameters], source: str) -> List[str]:
    """Check name-keyed states against the model; return the model's parameters without state.

    Every state's name must be a model parameter (after :func:`clean_name`) with the
    state's shape.  Without a model nothing can be checked and nothing is returned.
    """
    if params is None:
        return []
    model = params.shapes
    unknown = [n for n in shapes if n not in model]
    if unknown:
        raise CurvatureError(
            f"{source}: {len(unknown)} optimizer state name(s) are not parameters of the model in {params.path} "
            f"(e.g. {unknown[:3]}); is --model the model this optimizer trained?"
        )
    wrong = [(n, s) for n, s in shapes.items() if tuple(s) != tuple(model[n])]
    if wrong:
        name, shape = wrong[0]
        raise CurvatureError(
            f"{source}: {len(wrong)} state shape(s) differ from the model in {params.path}: '{name}' has state of "
            f"shape {list(shape)}, the parameter has shape {list(model[name])}; is --model the model this optimizer "
            "trained?"
        )
    return [n for n, _ in params.parameters if n not in shapes]


def check_against_model(
    shapes: Mapping[str, Shape], model_path: Optional[str], frozen: Sequence[str], source: str, mapping: str
) -> Tuple[Optional[ModelParameters], List[str], str]:
    """``--model`` check of name-keyed states: ``(parameters, parameters without state, mapping text)``.

    Without ``model_path``: ``(None, [], mapping)``.  With it, the model's parameters are
    loaded, :func:`verify_names` checks every state against them (raising
    :class:`CurvatureError` on a mismatch) and the mapping text says what it was verified against.
    """
    if model_path is None:
        return None, [], mapping
    params = load_model_parameters(model_path, frozen)
    without = verify_names(shapes, params, source)
    return params, without, f"{mapping}; verified against {params.path}"


def model_order(names: Sequence[str], params: Optional[ModelParameters]) -> List[str]:
    """``names`` in the model's ``named_parameters()`` order (unchanged without a model)."""
    if params is None:
        return list(names)
    position = {n: i for i, (n, _) in enumerate(params.parameters)}
    return sorted(names, key=lambda n: position.get(n, len(position)))
