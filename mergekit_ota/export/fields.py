"""Typed reads of the values in optimizer checkpoints (pickles, DCP metadata): the one place their types are checked.

A checkpoint is a tree of dicts, lists, numbers and tensors that a file says it is; a mutated or
foreign file can hold a string where a state dict belongs, ``betas={}``, ``zero_stage='x'``, a
``None`` dimension, a complex or ``meta`` tensor.  Every reader takes values out of the tree
through these accessors, each of which returns the value with the type asked for or raises
:class:`~mergekit_ota.errors.CurvatureError` naming ``where`` (the file and the key path) and what
was expected; nothing downstream sees a value of the wrong type.

* :func:`mapping`, :func:`sequence`: a dict, a list or tuple.
* :func:`integer`: an ``int`` (not ``bool``) at least ``minimum``; :func:`shape`: a sequence of them.
* :func:`step`: an optimizer step ``t``: a finite number ``>= 0`` (or a one-element tensor), or ``None``.
* :func:`beta2`: ``betas[1]`` of Adam's ``(beta1, beta2)``: finite, ``0 <= beta2 < 1`` (``beta2 = 1``
  makes bias correction ``1 / (1 - beta2**t)`` divide by zero).
* :func:`tensor`: a dense (strided), CPU, real floating-point tensor (or one of ``dtypes``).
"""

from __future__ import annotations

import math
from typing import Any, Collection, Mapping, Optional, Sequence, Tuple

import torch

from mergekit_ota.errors import CurvatureError

FLOATING = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _found(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - an object whose repr fails (an enum stand-in holding a dict)
        text = "?"
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def mapping(value: Any, where: str) -> Mapping[Any, Any]:
    """``value`` if it is a dict (any :class:`~collections.abc.Mapping`)."""
    if not isinstance(value, Mapping):
        raise CurvatureError(f"{where}: expected a dict, found {_found(value)}")
    return value


def sequence(value: Any, where: str) -> Sequence[Any]:
    """``value`` if it is a list or tuple."""
    if not isinstance(value, (list, tuple)):
        raise CurvatureError(f"{where}: expected a list, found {_found(value)}")
    return value


def integer(value: Any, where: str, minimum: int = 0) -> int:
    """``value`` as an ``int >= minimum`` (an int, an int enum, or a one-element integer tensor)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point() and not value.is_meta:
        value = int(value.reshape(-1)[0])
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CurvatureError(f"{where}: expected an integer >= {minimum}, found {_found(value)}")
    return int(value)


def shape(value: Any, where: str) -> Tuple[int, ...]:
    """A tensor shape: a list, tuple or ``torch.Size`` of non-negative ints."""
    if isinstance(value, torch.Size):
        return tuple(value)
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    ):
        raise CurvatureError(f"{where}: expected a shape (a list of non-negative ints), found {_found(value)}")
    return tuple(int(d) for d in value)


def _number(value: Any, where: str, what: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_meta or value.is_sparse or value.is_complex():
            raise CurvatureError(f"{where}: expected {what}, found a tensor {value.dtype} {list(value.shape)}")
        value = value.reshape(-1)[0].item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CurvatureError(f"{where}: expected {what}, found {_found(value)}")
    try:
        number = float(value)
    except OverflowError as error:  # an int beyond float's range
        raise CurvatureError(f"{where}: expected {what}, found an int of {len(str(abs(value)))} digits") from error
    if not math.isfinite(number):
        raise CurvatureError(f"{where}: expected {what}, found {number}")
    return number


def step(value: Any, where: str) -> Optional[float]:
    """An optimizer step ``t >= 0`` as a float, or ``None`` when not recorded."""
    if value is None:
        return None
    number = _number(value, where, "a finite step >= 0")
    if number < 0:
        raise CurvatureError(f"{where}: expected a finite step >= 0, found {number}")
    return number


def beta2_value(value: Any, where: str) -> float:
    """Adam's ``beta2``: finite, ``0 <= beta2 < 1``."""
    number = _number(value, where, "beta2 with 0 <= beta2 < 1")
    if not 0.0 <= number < 1.0:
        raise CurvatureError(
            f"{where}: beta2 is {number}; Adam's beta2 lies in [0, 1) (bias correction divides by 1 - beta2**step)"
        )
    return number


def beta2(betas: Any, where: str) -> Optional[float]:
    """``betas[1]`` of an Adam param group's ``betas`` (``None`` when absent), checked by :func:`beta2_value`."""
    if betas is None:
        return None
    pair = sequence(betas, where)
    if len(pair) != 2:
        raise CurvatureError(f"{where}: expected (beta1, beta2), found {len(pair)} values")
    return beta2_value(pair[1], f"{where}[1]")


def tensor(value: Any, where: str, dtypes: Collection[torch.dtype] = FLOATING) -> torch.Tensor:
    """``value`` if it is a dense (strided) CPU tensor of one of ``dtypes`` (real floating point by default).

    Refused: anything not a tensor, sparse and other layouts, ``meta`` tensors (no data), complex
    and integer dtypes, tensor subclasses.
    """
    if type(value) is not torch.Tensor and not isinstance(value, torch.nn.Parameter):
        raise CurvatureError(f"{where}: expected a tensor, found {_found(value)}")
    if value.layout != torch.strided or value.is_meta or value.device.type != "cpu":
        raise CurvatureError(
            f"{where}: expected a dense CPU tensor, found layout {value.layout} on device {value.device}"
        )
    if value.dtype not in dtypes:
        expected = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise CurvatureError(f"{where}: tensor has dtype {value.dtype}; expected {expected}")
    return value
