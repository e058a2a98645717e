"""Pure tensor functions: the math of OTA, FFG, rank-1 curvature (also LoRA's) and curvature scale.

Nothing in this package knows about mergekit's graph or files; every function takes
and returns tensors, so each can be unit-tested on its own.
"""

from mergekit_ota.math.ffg import (
    KeepRule,
    density_mask,
    ffg_merge,
    kept_count,
    saliency,
    threshold_mask,
)
from mergekit_ota.math.histogram import SaliencyHistogram
from mergekit_ota.math.lora import LoraCurvature, lora_curvature, lora_scaling
from mergekit_ota.math.ota import WeightDivisor, curvature_weights, ota_merge, weight_divisor
from mergekit_ota.math.rank1 import Rank1Curvature, rank1_factors, rank1_reconstruct
from mergekit_ota.math.scale import CurvatureScale

__all__ = [
    "CurvatureScale",
    "KeepRule",
    "LoraCurvature",
    "Rank1Curvature",
    "SaliencyHistogram",
    "WeightDivisor",
    "curvature_weights",
    "density_mask",
    "ffg_merge",
    "kept_count",
    "lora_curvature",
    "lora_scaling",
    "ota_merge",
    "rank1_factors",
    "rank1_reconstruct",
    "saliency",
    "threshold_mask",
    "weight_divisor",
]
