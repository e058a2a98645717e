"""Float helpers shared by the kernels: float32 operands, zero-free divisors and scalars kept within range.

Nothing here knows a merge method; :mod:`~mergekit_ota.math.ota`, :mod:`~mergekit_ota.math.ffg` and
:mod:`~mergekit_ota.math.consensus` import it, and it imports none of them.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

SAFE_LOG2 = 120  # float32 factors (v**p, weight_i / s) kept within 2**-120 .. 2**120


def exp2(x: float) -> float:
    """``2**x`` in float64, 0 or inf instead of an OverflowError."""
    if x > 1023.0:
        return math.inf
    if x < -1074.0:
        return 0.0
    return 2.0**x


def scaled_scalar(x: float, log2_factor: float) -> float:
    """``x * 2**log2_factor`` in float64 (exact for an integer power), inf or 0 instead of an OverflowError."""
    if x == 0.0:
        return 0.0
    if float(log2_factor).is_integer():
        try:
            return math.ldexp(x, int(log2_factor))
        except OverflowError:
            return math.copysign(math.inf, x)
    return math.copysign(exp2(math.log2(abs(x)) + log2_factor), x)


def f32_operand(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when an op with a float32 tensor computes in float32 (bf16/f16/f32), else ``t`` as float32.

    Saves converting a half-precision input to a float32 copy before subtracting it.
    """
    return t if torch.promote_types(t.dtype, torch.float32) == torch.float32 else t.to(torch.float32)


def lift_zeros(t: torch.Tensor, scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``t`` with every exact 0 replaced by 1, in place: ``t + [t == 0]`` (a divisor under which a zero
    numerator stays 0, so ``b + N / D`` keeps the base there).

    Two float passes through ``scratch`` (float32, ``t``'s shape; allocated if ``None``); equal to
    ``t.masked_fill_(t == 0, 1.0)``, which takes a boolean path about 8x slower on CPU.
    """
    return t.add_(torch.eq(t, 0.0, out=torch.empty_like(t) if scratch is None else scratch))
