"""Diagonal Fisher from calibration data, written as a curvature store (``mergekit-ota fisher``).

:mod:`.data` reads the calibration samples into token rows, :mod:`.estimator` computes the
empirical diagonal Fisher, and :func:`fisher_store` writes it through export's store writer, so the
store has the layout, metadata, compression and checks of any exported store.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

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


def _load(model_dir: str, dtype: str, device: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its "Loading weights" bar: fisher shows its own

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ConfigError(f"{model_dir}: not a model directory (no config.json); fisher reads a local model")
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{model_dir}: the model or its tokenizer does not load: {err}") from err
    return model.to(device), tokenizer


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
    check_output(store_layout(out), export.force)  # before anything is computed
    samples = calibration.read_samples(data, options.samples)
    model, tokenizer = _load(model_dir, options.dtype, options.device)
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
        raise CurvatureError(f"{model_dir}: the model has no trainable parameter")
    source = SourceState(
        kind="fisher",
        path=os.path.abspath(model_dir),
        optimizer="none (empirical diagonal Fisher)",
        items=items,
        mapping="parameter names of the model (named_parameters)",
        bias_corrected=True,
        metadata={
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
        },
        evidence=NameEvidence(BASIS_PARAM_NAMES),
    )
    return write_store(source, out, export)
