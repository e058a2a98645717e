"""The formulas of ``ota`` and FFG written out plainly, in float64: what the fast kernels compute.

:func:`~mergekit_ota.math.ota.ota_merge` and :func:`~mergekit_ota.math.ffg.density_mask` reuse buffers,
pre-scale weights that would leave float32's range and select the k-th saliency from a sample; these
functions do none of that. They stack the experts and evaluate the formula directly, so a reader can check the
math in a few lines, and the property tests (``tests/test_math.py``) compare the kernels against them.

* OTA: ``theta = b + lambda * sum_i w_i m_i tau_i / sum_i w_i m_i`` with ``w_i = weight_i * v_i**p + eps`` and
  ``tau_i = t_i - b``; a coordinate where every ``w_i m_i`` is 0 keeps ``b``. Without a base:
  ``theta = sum_i w_i t_i / sum_i w_i``.
* FFG mask at density ``d``: the ``k = max(1, int(d * numel))`` largest saliencies ``s = v * tau**2``, ties
  broken by the lowest flat index (a stable sort on ``-s``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from mergekit_ota.math.ffg import kept_count


def reference_ota(
    base: Optional[torch.Tensor],
    experts: Sequence[torch.Tensor],
    curvatures: Sequence[torch.Tensor],
    weights: Sequence[float],
    masks: Optional[Sequence[torch.Tensor]] = None,
    power: float = 0.5,
    eps: float = 1e-12,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """OTA by its formula (module docstring), in float64; ``masks`` are 0/1 (or boolean) tensors ``m_i``."""
    shape = (-1,) + (1,) * experts[0].dim()
    w = torch.tensor(list(weights), dtype=torch.float64).view(shape) * torch.stack(curvatures).double() ** power + eps
    if masks is not None:
        w = w * torch.stack([m.double() for m in masks])
    t = torch.stack([e.double() for e in experts])
    if base is None:
        return (w * t).sum(0) / w.sum(0)
    b = base.double()
    den = w.sum(0)
    return b + lambda_ * (w * (t - b)).sum(0) / torch.where(den == 0, 1.0, den)


def reference_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    """FFG's density mask by its definition (module docstring): boolean, ``scores``' shape."""
    flat = scores.reshape(-1)
    keep = torch.sort(-flat.double(), stable=True).indices[: kept_count(flat.numel(), density)]
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[keep] = True
    return mask.reshape(scores.shape)
