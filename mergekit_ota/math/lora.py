"""Rank-1 curvature of a LoRA-adapted matrix from the adapter's own Adam second moments.

Symbols. The adapted matrix is ``W = W0 + s B A`` (m x n): ``B`` is m x k, ``A`` is k x n (``k`` is PEFT's ``r``),
``s = lora_alpha / k`` (``lora_alpha / sqrt(k)`` under rsLoRA: :func:`lora_scaling`). ``G`` is the loss gradient
of ``W`` at one step; ``E[.]`` is the average Adam's ``exp_avg_sq`` takes over steps (an exponential moving
average: ``v = E[g**2]`` for a gradient ``g``, up to Adam's bias factor ``1 - beta2**t``).

Gradients. Only ``A`` and ``B`` train, and the chain rule gives ``grad_B = s G A^T`` (m x k) and
``grad_A = s B^T G`` (k x n), so the adapter's states are

    v_B[i, q] = s**2 E[(sum_j G[i, j] A[q, j])**2]        v_A[q, j] = s**2 E[(sum_i B[i, q] G[i, j])**2]

Assumptions.

1. Cross-correlations of ``G`` are ignored: ``E[G[i, j] G[i, j']] = 0`` for ``j != j'`` and
   ``E[G[i, j] G[i', j]] = 0`` for ``i != i'``. Then only the squares survive:
   ``v_B[i, q] = s**2 sum_j E[G[i, j]**2] A[q, j]**2`` and ``v_A[q, j] = s**2 sum_i B[i, q]**2 E[G[i, j]**2]``.
2. ``E[G**2] = R C^T`` is rank-1 (m numbers ``R``, n numbers ``C``): the model our rank-1 compression already
   assumes (:mod:`mergekit_ota.math.rank1`).
3. ``A`` and ``B`` are the current adapter weights, taken as constant over the steps ``v`` averages (they move
   during that window; the estimate uses where they ended).

Derivation. With ``a_j = sum_q A[q, j]**2`` (the squared column norms of ``A``) and ``b_i = sum_q B[i, q]**2``
(squared row norms of ``B``), the row sums of ``v_B`` and the column sums of ``v_A`` are

    rho_i   = sum_q v_B[i, q] = s**2 R_i <C, a>          gamma_j = sum_q v_A[q, j] = s**2 C_j <R, b>

so ``R`` is proportional to ``rho`` and ``C`` to ``gamma``, and ``E[G**2] = kappa * outer(rho, gamma)`` for one
unknown number ``kappa``. Putting ``R = x rho`` and ``C = y gamma`` (``kappa = x y``) back into the two equations
fixes it twice: the ``v_B`` equation gives ``kappa = 1 / (s**2 P)`` with ``P = <gamma, a>``, the ``v_A`` equation
``kappa = 1 / (s**2 Q)`` with ``Q = <rho, b>``. Under assumptions 1-2 both are ``s**2 <R, b> <C, a>``, so ``P = Q``;
measured, they differ, and :attr:`LoraCurvature.agreement` ``= min(P, Q) / max(P, Q)`` (1: they agree; the
smaller, the less the states fit the model) is the number a caller prints. The estimate takes their geometric
mean, ``kappa = 1 / (s**2 sqrt(P) sqrt(Q))``:

    v_hat = outer(rho, gamma) / (s**2 sqrt(P Q))

In our rank-1 form (``v_hat = outer(r, c) / sum(r)``, ``r``/``c`` its row/column sums) that is
``r = kappa * rho * sum(gamma)`` and ``c = kappa * gamma * sum(rho)``. It is exact when the assumptions hold, and
keeps every symmetry of the adapter: ``v_A, v_B -> lambda v_A, lambda v_B`` scales it by ``lambda``;
``s -> sigma s`` by ``1 / sigma**2``; the reparametrisation ``A -> alpha A``, ``B -> B / alpha`` (same ``W``;
Adam's states then scale as ``v_B -> alpha**2 v_B``, ``v_A -> v_A / alpha**2``) leaves it unchanged.

Degenerate inputs. Where ``P`` or ``Q`` is 0 (``B = 0``, as LoRA initialises it; ``A = 0``; a zero ``v_A`` or
``v_B``), one side of ``G`` is invisible to the adapter: the result is all zeros (the matrix gets no curvature,
and with ``B = 0`` or ``A = 0`` its task vector ``s B A`` is 0 too), :attr:`LoraCurvature.agreement` is 0 and
:attr:`LoraCurvature.degenerate` says why. Everything is computed in float64, the scale ``kappa`` and the
sums' factors in logarithms (never the product ``P Q``), so float32's whole range in and out stays finite; the
float32 sums returned clamp a value beyond float32's range to its largest finite value (inputs are read within
float64's range: float32 or bfloat16 states and weights always are). Non-finite or negative second moments,
non-finite weights and a scale ``s`` that is not a finite positive number are a ``ValueError``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

_F32_MAX = torch.finfo(torch.float32).max


@dataclass(frozen=True)
class LoraCurvature:
    """``v_hat = outer(r, c) / sum(r)`` of an adapted matrix (module docstring).

    ``r`` (m) and ``c`` (n): float32 row and column sums of ``v_hat``; ``agreement``: ``min(P, Q) / max(P, Q)``
    in ``[0, 1]``, how closely the two estimates of the scale agree (0 where degenerate); ``p``, ``q``: the two
    (float64) numbers themselves; ``degenerate``: why ``v_hat`` is 0, ``None`` when it is not.
    """

    r: torch.Tensor
    c: torch.Tensor
    agreement: float
    p: float
    q: float
    degenerate: Optional[str] = None


def lora_scaling(alpha: float, rank: int, rslora: bool = False) -> float:
    """PEFT's ``s``: ``lora_alpha / rank``, or ``lora_alpha / sqrt(rank)`` with ``use_rslora``."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1; got {rank}")
    return float(alpha) / (math.sqrt(rank) if rslora else float(rank))


def _check(name: str, t: torch.Tensor, moment: bool) -> torch.Tensor:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D; got shape {tuple(t.shape)}")
    t64 = t.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(t64).all()):
        raise ValueError(f"{name} holds NaN or Inf")
    if moment and bool((t64 < 0).any()):
        raise ValueError(f"{name} holds negative values; a second moment is >= 0")
    return t64


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.clamp(max=_F32_MAX).to(torch.float32)


def lora_curvature(
    v_a: torch.Tensor, v_b: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float
) -> LoraCurvature:
    """The rank-1 curvature of ``W = W0 + scaling * b @ a`` from Adam's ``v_a`` (k x n) and ``v_b`` (m x k).

    ``a``: ``lora_A`` (k x n), ``b``: ``lora_B`` (m x k); any float dtype, read in float64.
    """
    v_a64, v_b64 = _check("v_A", v_a, True), _check("v_B", v_b, True)
    a64, b64 = _check("A", a, False), _check("B", b, False)
    m, k = b64.shape
    n = a64.shape[1]
    if tuple(a64.shape) != (k, n) or tuple(v_a64.shape) != (k, n) or tuple(v_b64.shape) != (m, k):
        raise ValueError(
            f"LoRA shapes disagree: B {tuple(b64.shape)}, A {tuple(a64.shape)}, v_B {tuple(v_b64.shape)}, "
            f"v_A {tuple(v_a64.shape)}; expected B and v_B m x k, A and v_A k x n"
        )
    if not (math.isfinite(scaling) and scaling > 0.0):
        raise ValueError(f"LoRA scaling s must be a finite positive number; got {scaling}")
    rho, gamma = v_b64.sum(dim=1), v_a64.sum(dim=0)
    p = float(gamma @ (a64 * a64).sum(dim=0))
    q = float(rho @ (b64 * b64).sum(dim=1))
    if p <= 0.0 or q <= 0.0:
        named = (("P = <colsum(v_A), colnorm(A)**2> = 0", p), ("Q = <rowsum(v_B), rownorm(B)**2> = 0", q))
        why = [what for what, value in named if value <= 0.0]
        return LoraCurvature(
            r=torch.zeros(m, dtype=torch.float32),
            c=torch.zeros(n, dtype=torch.float32),
            agreement=0.0,
            p=p,
            q=q,
            degenerate="; ".join(why) + " (B or A zero, or no second moment): no curvature",
        )
    # kappa = 1 / (s**2 sqrt(P) sqrt(Q)) and the sums' factors in logs: no product leaves float64's range
    log_kappa = -(2.0 * math.log(scaling) + 0.5 * math.log(p) + 0.5 * math.log(q))
    r = _scaled(rho, log_kappa + math.log(float(gamma.sum())))
    c = _scaled(gamma, log_kappa + math.log(float(rho.sum())))
    return LoraCurvature(r=_f32(r), c=_f32(c), agreement=min(p, q) / max(p, q), p=p, q=q)


def _scaled(t: torch.Tensor, log_factor: float) -> torch.Tensor:
    """``t * exp(log_factor)`` for ``t >= 0`` (float64), as ``exp(log t + log_factor)`` where ``t > 0``, else 0."""
    positive = t > 0
    return torch.where(positive, torch.exp(torch.log(torch.where(positive, t, 1.0)) + log_factor), 0.0)
