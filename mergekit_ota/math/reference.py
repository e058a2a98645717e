"""The formulas of ``ota`` and ``ffg`` written out plainly, in float64: what the fast kernels compute.

:func:`~mergekit_ota.math.ota.ota_merge`, :func:`~mergekit_ota.math.ffg.ffg_merge` and
:func:`~mergekit_ota.math.ffg.density_mask` reuse buffers, pre-scale weights that would leave float32's range,
stream sign consensus and select the k-th saliency from a sample; these functions do none of that. They stack
the experts and evaluate the formula directly, so a reader can check the math in a few lines, and the property
tests (``tests/test_math.py``, ``tests/test_degenerate.py``, ``tests/test_consensus.py``) compare the kernels
against them.

* OTA: ``theta = b + lambda * sum_i w_i m_i tau_i / sum_i w_i m_i`` with ``w_i = weight_i * v_i**p + eps`` and
  ``tau_i = t_i - b``; a coordinate where every ``w_i m_i`` is 0 keeps ``b``. Without a base:
  ``theta = sum_i w_i t_i / sum_i w_i``. Under ``curvature_scale``, ``v_i / m_i`` replaces ``v_i``
  (:func:`reference_statistic`).
* FFG merge: ``theta = b + lambda * sum_i weight_i m_i tau_i`` (divided by ``sum_i weight_i`` with ``normalize``).
* Sign consensus (both, ``rule`` ``sum`` or ``count``): with ``c_i = a_i m_i tau_i`` (``a_i = w_i`` for OTA,
  ``weight_i`` for FFG) the elected sign is ``e = +1`` where ``sum_i c_i >= 0`` (``count``: ``sum_i sign(c_i)``),
  else ``-1``; ``g_i = [sign(c_i) == e]``, ``N = sum_i g_i c_i``, ``D = sum_i g_i a_i``; OTA and normalised FFG
  give ``b + lambda * N / D`` (``b`` where ``D = 0``), plain FFG ``b + lambda * N``.
* FFG mask at density ``d``: the ``k = max(1, int(d * numel))`` largest saliencies ``s = v * tau**2``, ties
  broken by the lowest flat index (a stable sort on ``-s``).
* Rank-1 curvature: ``v_hat = outer(r, c) / sum(r)`` (0 where ``sum(r) == 0``).
* LoRA curvature (:mod:`~mergekit_ota.math.lora`): ``v_hat = outer(rho, gamma) / (s**2 sqrt(P Q))`` with
  ``rho = v_B.sum(1)``, ``gamma = v_A.sum(0)``, ``P = <gamma, (A**2).sum(0)>``, ``Q = <rho, (B**2).sum(1)>``
  (0 where ``P`` or ``Q`` is 0), and the agreement ``min(P, Q) / max(P, Q)``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

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
    consensus: Optional[str] = None,
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
    if consensus is not None:
        return b + lambda_ * _consensus(w * (t - b), w, consensus, normalize=True)
    den = w.sum(0)
    return b + lambda_ * (w * (t - b)).sum(0) / torch.where(den == 0, 1.0, den)


def reference_ffg(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    weights: Sequence[float],
    masks: Optional[Sequence[torch.Tensor]] = None,
    lambda_: float = 1.0,
    normalize: bool = False,
    consensus: Optional[str] = None,
) -> torch.Tensor:
    """FFG's merge by its formula (module docstring), in float64; ``masks`` as for :func:`reference_ota`."""
    b = base.double()
    tau = torch.stack([e.double() for e in experts]) - b
    if masks is not None:
        tau = tau * torch.stack([m.double() for m in masks])
    a = torch.tensor(list(weights), dtype=torch.float64).view((-1,) + (1,) * b.dim()).expand_as(tau)
    if consensus is not None:
        return b + lambda_ * _consensus(a * tau, a, consensus, normalize=normalize)
    merged = (a * tau).sum(0)
    return b + lambda_ * (merged / float(sum(weights)) if normalize else merged)


def _consensus(c: torch.Tensor, a: torch.Tensor, rule: str, normalize: bool) -> torch.Tensor:
    """``N / D`` (``N`` without ``normalize``) over the experts agreeing with the elected sign; 0 where ``D = 0``."""
    votes = c.sum(0) if rule == "sum" else torch.sign(c).sum(0)
    agree = (torch.sign(c) == torch.where(votes >= 0, 1.0, -1.0)).double()
    n, d = (agree * c).sum(0), (agree * a).sum(0)
    if not normalize:
        return n
    return torch.where(d == 0, 0.0, n / torch.where(d == 0, 1.0, d))


def reference_statistic(curvatures: Sequence[torch.Tensor], statistic: str) -> float:
    """``m_i`` of ``curvature_scale`` over every entry of ``curvatures``: their mean or lower median (the
    ``ceil(N/2)``-th smallest, exact: the kernel's is the lower edge of its log-bin), 1.0 when all are 0."""
    values = torch.cat([v.double().reshape(-1) for v in curvatures])
    if not values.numel() or float(values.sum()) == 0.0:
        return 1.0
    if statistic == "mean":
        return float(values.mean())
    return float(values.sort().values[(values.numel() + 1) // 2 - 1])


def reference_rank1(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``v_hat = outer(r, c) / sum(r)`` in float64 (zeros where ``sum(r) == 0``)."""
    r64, c64 = r.double(), c.double()
    total = float(r64.sum())
    return torch.outer(r64, c64) / total if total > 0.0 else torch.zeros(r64.numel(), c64.numel(), dtype=torch.float64)


def reference_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    """FFG's density mask by its definition (module docstring): boolean, ``scores``' shape."""
    flat = scores.reshape(-1)
    keep = torch.sort(-flat.double(), stable=True).indices[: kept_count(flat.numel(), density)]
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[keep] = True
    return mask.reshape(scores.shape)


def reference_lora(
    v_a: torch.Tensor, v_b: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float
) -> Tuple[torch.Tensor, float]:
    """LoRA's ``(v_hat, agreement)`` by the formula (module docstring): ``v_hat`` dense m x n float64."""
    rho, gamma = v_b.double().sum(1), v_a.double().sum(0)
    p = float(gamma @ (a.double() ** 2).sum(0))
    q = float(rho @ (b.double() ** 2).sum(1))
    if p <= 0.0 or q <= 0.0:
        return torch.zeros(rho.numel(), gamma.numel(), dtype=torch.float64), 0.0
    return torch.outer(rho, gamma) / (scaling**2 * (p * q) ** 0.5), min(p, q) / max(p, q)
