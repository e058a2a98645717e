"""Curvature captured during training: the store is written beside every checkpoint, rank 0 only, atomically.

* :class:`~mergekit_ota.training.callback.CurvatureCallback`: a ``transformers.TrainerCallback`` (so also
  TRL's ``SFTTrainer``, LLaMA-Factory, axolotl) writing ``exp_avg_sq.safetensors`` into every
  ``checkpoint-N/`` and, at the end of training, into ``output_dir``;
* :func:`~mergekit_ota.training.save.save_curvature`: the same for a custom loop (plain PyTorch,
  DDP, FSDP2, accelerate, DeepSpeed).

What each strategy's state looks like and how one parameter is gathered: :mod:`.gather`.  Imports
are lazy: ``import mergekit_ota.training`` loads neither transformers nor torch.distributed.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CurvatureCallback", "save_curvature"]


def __getattr__(name: str) -> Any:
    if name == "CurvatureCallback":
        from mergekit_ota.training.callback import CurvatureCallback

        return CurvatureCallback
    if name == "save_curvature":
        from mergekit_ota.training.save import save_curvature

        return save_curvature
    raise AttributeError(name)
