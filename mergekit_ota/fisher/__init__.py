"""Diagonal Fisher from calibration data, written as a curvature store (``mergekit-ota fisher``).

:mod:`.data` reads the calibration samples into token rows, :mod:`.estimator` computes the
empirical diagonal Fisher, and :func:`fisher_store` writes it through export's store writer, so the
store has the layout, metadata, compression and checks of any exported store.

``MODEL`` may be ``BASE+ADAPTER`` (mergekit's LoRA syntax): the adapter is folded into the base as mergekit folds
it (``peft``'s ``merge_and_unload``), and the Fisher is of the folded weights (:func:`split_model`,
:func:`_load`). Only the weights the adapter changes get one: a weight whose folded value is exactly the base's
(task vector 0) is left frozen, no gradient or accumulator is kept for it, and the store lists it in
``adapter_untouched``, where the merge gives it curvature 0 as it does for an exported adapter's store
(:class:`~mergekit_ota.graph.tasks.CurvatureMergeTask`). The store records the adapter file's fingerprint, so a
merge of ``BASE+ADAPTER`` checks it belongs to that adapter. Any PEFT adapter type ``peft`` can fold (DoRA,
AdaLoRA, LoHa, ...) is accepted here: this is the route ``export`` names for the adapters it refuses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from mergekit_ota.errors import ConfigError, CurvatureError


@dataclass(frozen=True)
class FisherOptions:
    """What ``mergekit-ota fisher`` takes (validated by :func:`fisher_store`)."""

    samples: int = 1024
    batch_size: int = 8
    micro_batch_size: Optional[int] = None
    max_length: int = 512
    device: str = "cpu"
    dtype: str = "float32"  # the model's dtype while computing (the accumulators are always float32)
    compress: str = "none"
    shard_size: Optional[str] = None
    force: bool = False
    only_missing: Optional[str] = None  # a partial store to complete (:mod:`.complete`)


ADAPTER_CONFIG_FILE = "adapter_config.json"  # PEFT's (export.peft_config.CONFIG_FILE)
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def split_model(model: str) -> Tuple[str, Optional[str]]:
    """``(base, adapter)`` of ``BASE+ADAPTER`` (split at ``+`` as mergekit's ``ModelReference`` does), or
    ``(model, None)``; a directory whose own name holds ``+`` is a model. Each must be a local directory, the
    adapter one holding PEFT's ``adapter_config.json``: :class:`ConfigError` naming the path otherwise."""
    if "+" not in model or os.path.isdir(model):
        return model, None
    parts = model.split("+")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"{model}: MODEL is a model directory or BASE+ADAPTER (one '+'), as mergekit writes a LoRA")
    base, adapter = parts
    for what, path in (("base model", base), ("adapter", adapter)):
        if not os.path.isdir(path):
            raise ConfigError(f"{model}: the {what} {path} is no local directory; fisher reads local models")
    if not os.path.isfile(os.path.join(adapter, ADAPTER_CONFIG_FILE)):
        raise ConfigError(
            f"{model}: the adapter {adapter} holds no {ADAPTER_CONFIG_FILE}; BASE+ADAPTER needs a PEFT adapter "
            f"directory"
        )
    return base, adapter


def _fold(model: Any, adapter: str) -> Any:
    """``model`` with the PEFT adapter in ``adapter`` folded in, as mergekit folds ``BASE+ADAPTER``."""
    import peft

    try:
        folded = peft.PeftModel.from_pretrained(model, adapter, is_trainable=False)
        return folded.merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ConfigError(f"{adapter}: the adapter does not load onto its base or does not fold: {err}") from err


def _load(model_dir: str, dtype: str, device: str, adapter: Optional[str] = None) -> Any:
    """``(model, tokenizer)`` of ``model_dir`` (with ``adapter`` folded in: its tokenizer where it saved one, else
    the base's)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its "Loading weights" bar: fisher shows its own

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ConfigError(f"{model_dir}: not a model directory (no config.json); fisher reads a local model")
    has_tokenizer = adapter is not None and any(os.path.isfile(os.path.join(adapter, f)) for f in TOKENIZER_FILES)
    tokenizer_dir = adapter if adapter is not None and has_tokenizer else model_dir
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{model_dir}: the model or its tokenizer does not load: {err}") from err
    if adapter is not None:
        model = _fold(model, adapter)
    return model.to(device), tokenizer


def _freeze_untouched(model: Any, base_dir: str) -> List[str]:
    """Freeze every parameter of the folded ``model`` equal to the base's (``base_dir``'s safetensors weights, read
    one tensor at a time, in the parameter's dtype) and make every other trainable; return the frozen names.

    Equality, not the adapter's structure, decides, so it holds for any adapter type: the task vector there is 0,
    which is what the merge's curvature 0 assumes and checks."""
    import torch

    from mergekit_ota.curvature.fingerprint import weight_entries
    from mergekit_ota.io.handles import read_tensor

    entries = weight_entries(base_dir)
    frozen = []
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            entry = entries.get(name)
            same = entry is not None and tuple(entry.shape) == tuple(parameter.shape)
            if same:
                base = read_tensor(entry).to(device=parameter.device, dtype=parameter.dtype)
                same = torch.equal(base, parameter)
            parameter.requires_grad_(not same)
            if same:
                frozen.append(name)
    return frozen


def _adapter_metadata(adapter: str, untouched: List[str]) -> Dict[str, str]:
    """The adapter keys of a Fisher store of ``BASE+ADAPTER`` (:mod:`mergekit_ota.store_format`)."""
    import json

    from mergekit_ota.curvature.fingerprint import adapter_fingerprint
    from mergekit_ota.io.safetensors import parse_json
    from mergekit_ota.store_format import ADAPTER, ADAPTER_FINGERPRINT, ADAPTER_UNTOUCHED

    path = os.path.join(adapter, ADAPTER_CONFIG_FILE)
    try:
        with open(path, "rb") as fp:
            raw = fp.read()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the adapter's config ({err})") from err
    config = parse_json(raw, path, "adapter config")  # the one strict JSON parser
    kind = str(config.get("peft_type") or "lora").lower() if isinstance(config, dict) else "lora"
    metadata = {ADAPTER: kind, ADAPTER_UNTOUCHED: json.dumps(untouched), "fisher_adapter": os.path.abspath(adapter)}
    found = adapter_fingerprint(adapter)
    if found is not None:
        metadata[ADAPTER_FINGERPRINT] = found
    return metadata


def fisher_store(
    model_dir: str,
    data: str,
    out: str,
    options: FisherOptions,
    progress: Optional[Callable[[int, int], Callable[[int], None]]] = None,
) -> Any:
    """Compute the Fisher of ``model_dir`` on the first ``options.samples`` samples of ``data`` and write the
    store ``out`` (as ``mergekit-ota export`` writes one); return the
    :class:`~mergekit_ota.export.pipeline.ExportResult`.

    ``progress(total)`` returns the callback the estimator calls with each mini-batch's rows. The output
    is checked before the model loads; on any error nothing is written.
    """
    from mergekit_ota.curvature.writer import check_output, store_layout
    from mergekit_ota.export.mapping import BASIS_PARAM_NAMES, NameEvidence
    from mergekit_ota.export.moments import Full, SourceState, StateItem
    from mergekit_ota.export.options import ExportOptions
    from mergekit_ota.export.pipeline import write_store
    from mergekit_ota.fisher import complete
    from mergekit_ota.fisher import data as calibration
    from mergekit_ota.fisher.estimator import diagonal_fisher

    for name in ("samples", "batch_size", "max_length"):
        if getattr(options, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(options, name)}")
    if options.micro_batch_size is not None and not 1 <= options.micro_batch_size <= options.batch_size:
        raise ConfigError(
            f"--micro-batch-size must be in [1, --batch-size {options.batch_size}]; got {options.micro_batch_size}"
        )
    from mergekit_ota.devices import device_problem

    problem = device_problem(options.device)
    if problem:
        raise ConfigError(f"--device {options.device}: {problem}")
    export = ExportOptions.parse(compress=options.compress, shard_size=options.shard_size, force=options.force)
    layout = store_layout(out)
    check_output(layout, export.force)  # before anything is computed
    base_dir, adapter = split_model(model_dir)
    partial = None
    if options.only_missing is not None:
        if adapter is not None:
            raise ConfigError(f"--only-missing completes a full model's store; {model_dir} is BASE+ADAPTER")
        partial = complete.open_partial(options.only_missing, base_dir)
        complete.refuse_same_output(partial, layout.path)
    samples = calibration.read_samples(data, options.samples)
    model, tokenizer = _load(base_dir, options.dtype, options.device, adapter)
    untouched = _freeze_untouched(model, base_dir) if adapter is not None else []
    if partial is not None:
        complete.restrict(model, partial)
    order = [name for name, _ in model.named_parameters()]
    rows = calibration.rows(tokenizer, samples, options.max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    result = diagonal_fisher(
        model,
        rows,
        options.batch_size,
        options.micro_batch_size,
        pad,
        options.device,
        progress(len(rows)) if progress else None,
    )
    del model
    estimator = "per-example" if options.batch_size == 1 else "mini-batch"
    items = [
        StateItem(name, tuple(v.shape), (lambda v=v: Full(v)), f"fisher of {model_dir}")
        for name, v in result.fisher.items()
    ]
    if not items:
        what = (
            "the adapter changes no weight of its base"
            if adapter is not None
            else "the model has no trainable parameter"
        )
        raise CurvatureError(f"{model_dir}: {what}")
    extra = _adapter_metadata(adapter, untouched) if adapter is not None else {}
    fisher_fields = {
        "fisher_estimator": f"{estimator}: mean over mini-batches of the squared gradient of the mini-batch "
        "mean token loss",
        "fisher_reduction": "mean",  # the authors' baseline sums: multiply by fisher_batches for theirs
        "fisher_samples": str(result.rows),
        "fisher_batches": str(result.batches),
        "fisher_batch_size": str(options.batch_size),
        "fisher_tokens": str(result.tokens),
        "fisher_max_length": str(options.max_length),
        "fisher_data": os.path.abspath(data),
        "fisher_data_sha256": calibration.data_hash(samples),
        "fisher_model_dtype": options.dtype,
    }
    if partial is not None:
        completed = complete.completed_source(partial, result.fisher, fisher_fields, model_dir, order)
        return write_store(completed, out, export)
    source = SourceState(
        kind="fisher",
        path=os.path.abspath(adapter if adapter is not None else model_dir),  # an adapter's: no weights beside it
        optimizer="none (empirical diagonal Fisher)",
        items=items,
        mapping="parameter names of the model (named_parameters)",
        bias_corrected=True,
        metadata={**fisher_fields, **extra},
        without_state=untouched,
        evidence=NameEvidence(BASIS_PARAM_NAMES),
    )
    return write_store(source, out, export)
