"""torchao's low-bit AdamW states (``torchao.optim.AdamW8bit``, ``AdamW4bit``, ``AdamWFp8``; torchao 0.18.0),
read and dequantised without torchao.

torchao keeps ``exp_avg_sq`` (Adam's raw ``v``: ``v <- beta2 v + (1 - beta2) g**2``, bias-corrected only inside its
update, as torch's AdamW) of every state with ``numel >= 4096`` and ``numel % block_size == 0`` as a tensor
subclass; the others stay float32 tensors. ``torch.save`` pickles the subclass as its class and its ``__dict__``;
the loader maps each class name to an inert stand-in (:func:`torchao_globals`,
nothing of torchao is imported) whose ``__dict__`` holds the inner tensors, and :func:`flatten_subclasses` moves
them into the state as plain keys ``KEY:codes8`` / ``KEY:codes4`` / ``KEY:codesfp8``, ``KEY:scale``,
``KEY:qmap`` and ``KEY:shape`` (a ``meta`` tensor of the parameter's shape: no data).
With ``k`` the flat (row-major) index into the parameter and ``B = n / len(scale)``
the block size (256 for 8-bit and FP8, 128 for 4-bit by default), every step in float32 (torchao's
``subclass_8bit.py``, ``subclass_4bit.py``, ``subclass_fp8.py``, verified bit for bit against its own
``dequantize()`` on ``tests/fixtures/optimizers/torchao``):

* 8-bit (``OptimState8bit``): ``v[k] = qmap[codes[k]] * scale[k // B]``, ``codes`` uint8 of the parameter's
  shape, ``qmap`` its 256 values;
* 4-bit (``OptimState4bit``): ``codes`` uint8 holds two codes per byte, high nibble first
  (``c[2j] = codes[j] >> 4``, ``c[2j + 1] = codes[j] & 15``), ``v[k] = qmap[c[k]] * scale[k // B]`` with the
  16-value ``qmap``, reshaped to the saved ``_shape`` (its unsigned table has no 0: every entry reads at least
  ``scale / 16``);
* FP8 (``OptimStateFp8``): ``v[k] = float32(codes[k]) * scale[k // B]``, ``codes`` ``float8_e4m3fn``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple

import torch

from mergekit_ota.errors import CurvatureError
from mergekit_ota.export.moments import Curvature, Full

SQ = "exp_avg_sq"
CODES = {"ao8": ":codes8", "ao4": ":codes4", "aofp8": ":codesfp8"}  # the key suffix of each format's codes
TORCHAO_KINDS = tuple(CODES)
#: per kind, the state keys a reader loads
TORCHAO_KEYS: Dict[str, Tuple[str, ...]] = {
    "ao8": (SQ + ":codes8", SQ + ":scale", SQ + ":qmap"),
    "ao4": (SQ + ":codes4", SQ + ":scale", SQ + ":qmap", SQ + ":shape"),
    "aofp8": (SQ + ":codesfp8", SQ + ":scale"),
}
#: the dtype of each flattened key (checked where the state is read, as every state tensor is)
TORCHAO_DTYPES: Dict[str, Tuple[torch.dtype, ...]] = {
    SQ + ":codes8": (torch.uint8,),
    SQ + ":codes4": (torch.uint8,),
    SQ + ":codesfp8": (torch.float8_e4m3fn,),
    SQ + ":scale": (torch.float32,),
    SQ + ":qmap": (torch.float32,),
}
NAMES = {"ao8": "AdamW 8-bit (torchao)", "ao4": "AdamW 4-bit (torchao)", "aofp8": "AdamW FP8 (torchao)"}


class TorchaoOptimState(torch.Tensor):
    """Stand-in for torchao's low-bit optimizer state subclasses: the unpickler rebuilds an empty wrapper and sets
    its ``__dict__`` (``codes``, ``scale``, ``qmap``, ``_shape``, ``block_size``, ``signed``), all a reader uses
    (:mod:`mergekit_ota.export.torchao`); any tensor operation on it raises."""

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        raise TypeError(f"a torchao optimizer state stand-in holds inner tensors only; {func} is not defined")


class TorchaoOptimState8bit(TorchaoOptimState):
    """``torchao.optim.subclass_8bit.OptimState8bit``."""


class TorchaoOptimState4bit(TorchaoOptimState):
    """``torchao.optim.subclass_4bit.OptimState4bit``."""


class TorchaoOptimStateFp8(TorchaoOptimState):
    """``torchao.optim.subclass_fp8.OptimStateFp8``."""


TORCHAO_FORMAT: Dict[type, str] = {
    TorchaoOptimState8bit: "ao8",
    TorchaoOptimState4bit: "ao4",
    TorchaoOptimStateFp8: "aofp8",
}


@contextlib.contextmanager
def torchao_globals() -> Iterator[None]:
    """Within the block, ``torch.load(weights_only=True)`` also accepts torchao's low-bit state classes, by their
    exact names (:data:`~mergekit_ota.io.unpickle.TORCHAO_CLASSES`), as the inert stand-ins above."""
    from mergekit_ota.io.unpickle import TORCHAO_CLASSES, allow_stand_ins

    by_kind = {kind: cls for cls, kind in TORCHAO_FORMAT.items()}
    with allow_stand_ins([(by_kind[kind], name) for kind, name in TORCHAO_CLASSES.items()]):
        yield


def flatten_subclasses(entry: Mapping[str, Any], where: str) -> Dict[str, Any]:
    """One parameter's state with each torchao stand-in value ``KEY`` replaced by its inner tensors (module
    docstring); other values as they are. A stand-in lacking its inner tensors is refused naming ``where``."""
    flat: Dict[str, Any] = {}
    for key, value in entry.items():
        kind = TORCHAO_FORMAT.get(type(value))
        if kind is None:
            flat[key] = value
            continue
        inner = vars(value)
        needed = ("codes", "scale") + (("qmap",) if kind != "aofp8" else ())
        if any(name not in inner for name in needed):
            raise CurvatureError(
                f"{where}[{key!r}]: a torchao {NAMES[kind]} state without its {list(needed)}; found {sorted(inner)}"
            )
        flat[key + CODES[kind]] = inner["codes"]
        flat[key + ":scale"] = inner["scale"]
        if "qmap" in inner:
            flat[key + ":qmap"] = inner["qmap"]
        shape = inner.get("_shape", tuple(inner["codes"].shape))
        if not isinstance(shape, (tuple, list, torch.Size)) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise CurvatureError(f"{where}[{key!r}]: a torchao state's _shape is {shape!r}; expected a shape")
        flat[key + ":shape"] = torch.empty(tuple(shape), device="meta")  # the parameter's shape, no data
    return flat


def kind(keys: Any) -> Optional[str]:
    """``ao8``, ``ao4`` or ``aofp8`` where ``exp_avg_sq`` is a torchao low-bit state (flattened), else ``None``."""
    return next((name for name, suffix in CODES.items() if SQ + suffix in keys), None)


def dequantize(kind: str, get: Callable[[str], torch.Tensor], where: str) -> Curvature:
    """``v`` of a torchao low-bit ``exp_avg_sq`` (module docstring), float32 of the parameter's shape."""
    codes, scale = get(SQ + CODES[kind]), get(SQ + ":scale").to(torch.float32).reshape(-1)
    shape = tuple(get(SQ + ":shape").shape)
    numel = int(torch.Size(shape).numel())
    if kind == "ao4":
        flat = torch.stack([codes.reshape(-1) >> 4, codes.reshape(-1) & 15], dim=-1).reshape(-1)
    else:
        flat = codes.reshape(-1)
    if flat.numel() != numel or not scale.numel() or numel % scale.numel():
        raise CurvatureError(
            f"{where}: torchao {NAMES[kind]} state with {flat.numel()} codes and {scale.numel()} scales for a "
            f"parameter of shape {list(shape)}; expected one code per entry and equal blocks"
        )
    if kind == "aofp8":
        values = flat.to(torch.float32)
    else:
        table = get(SQ + ":qmap").to(torch.float32).reshape(-1)
        if table.numel() != (16 if kind == "ao4" else 256):
            raise CurvatureError(f"{where}: torchao {NAMES[kind]} code table has {table.numel()} values")
        values = table[flat.long()]
    return Full((values.view(scale.numel(), -1) * scale.view(-1, 1)).reshape(shape))
