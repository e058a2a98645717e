"""Data Fisher for the quality benchmark: an expert's diagonal Fisher on N of its own training rows, as a store.

``F = (1/B) sum_b g_b**2``, ``g_b`` the gradient of the mean token loss of mini-batch ``b`` (``B`` batches of
:data:`BATCH` rows; the first ``N`` of the expert's training rows, labelled as in its training: loss on the
answer only), from :func:`mergekit_ota.fisher.estimator.diagonal_fisher`, the estimator behind
``mergekit-ota fisher``. The store carries ``source_kind: fisher`` and ``bias_corrected: true``, as the command's
do, so ota uses it as it is. :func:`compare_with_adam` gives, per tensor, Spearman's rank correlation with the
expert's bias-corrected Adam ``exp_avg_sq`` and the ratio of their sums (the scale).
"""

from __future__ import annotations

import os
import statistics
import time
import zlib
from typing import Any, Dict, Sequence

import torch

from mergekit_ota.analysis import metrics

BATCH = 8  # rows per mini-batch (the sft evidence script's too): N = 128 gives 16 squared gradients
SAMPLE = 1_000_000  # Spearman on a seeded sample of this many entries for larger tensors


def spearman(a: torch.Tensor, b: torch.Tensor, name: str) -> float:
    """Spearman rank correlation of two same-shape tensors, as ``mergekit-ota analyze`` measures it: the product's
    :func:`~mergekit_ota.analysis.metrics.spearman` (average ranks for ties) on its deterministic sample of at most
    ``SAMPLE`` entries (:func:`~mergekit_ota.analysis.metrics.sample_indices`, seeded by the tensor's name)."""
    x, y = a.reshape(-1), b.reshape(-1)
    index = metrics.sample_indices(x.numel(), SAMPLE, zlib.crc32(name.encode()))
    if index is not None:
        x, y = x[index], y[index]
    return metrics.spearman(x, y)


def fisher_store(checkpoint: str, rows: Sequence[Any], out: str, pad_id: int, device: str = "cpu") -> float:
    """Write the data Fisher of ``checkpoint`` on ``rows`` to the store ``out`` (skipped when it exists, as the
    exports are); return the seconds it took (0.0 when skipped)."""
    if os.path.exists(out):
        return 0.0
    from transformers import AutoModelForCausalLM

    from mergekit_ota.curvature.writer import save_store
    from mergekit_ota.fisher.estimator import diagonal_fisher

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).to(device)
    result = diagonal_fisher(model, list(rows), BATCH, None, pad_id, device)
    metadata = {
        "source_kind": "fisher",
        "optimizer": "none (empirical diagonal Fisher)",
        "bias_corrected": "true",
        "fisher_samples": str(result.rows),
        "fisher_batches": str(result.batches),
        "fisher_batch_size": str(BATCH),
        "fisher_reduction": "mean",
    }
    save_store(result.fisher, out, metadata=metadata)
    return time.perf_counter() - started


def compare_with_adam(fisher_path: str, adam_path: str) -> Dict[str, float]:
    """Spearman per tensor of the Fisher store against the bias-corrected Adam store (median, min, max over
    tensors of more than one entry) and ``scale``, sum of F over sum of the bias-corrected v."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(adam_path, "pt") as fp:
        meta = fp.metadata() or {}
    factor = 1.0 - float(meta["beta2"]) ** int(meta["step"]) if "beta2" in meta and "step" in meta else 1.0
    fisher, adam = load_file(fisher_path), load_file(adam_path)
    per_tensor = [spearman(fisher[n], adam[n], n) for n in fisher if n in adam and fisher[n].numel() > 1]
    scale = sum(float(f.double().sum()) for f in fisher.values()) / (
        sum(float(v.double().sum()) for v in adam.values()) / factor
    )
    return {
        "median": statistics.median(per_tensor),
        "min": min(per_tensor),
        "max": max(per_tensor),
        "tensors": len(per_tensor),
        "scale": scale,
    }
