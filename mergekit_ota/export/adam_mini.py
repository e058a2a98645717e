"""Adam-mini (``adam_mini.Adam_mini``, adam-mini 1.1.1): one second moment per block, expanded to the parameter.

Adam-mini keeps Adam's ``v`` per *block* of a parameter, chosen by the parameter's name, and divides each
coordinate's update by ``sqrt(v_block / (1 - beta2**step)) + eps``, exactly as Adam does with its own ``v``. Its
state dict (one param group per parameter, the lower-cased name under the group key ``name``, ``beta2`` a key of
its own, ``step`` a Python int per parameter) keeps, per parameter (keys as ``adam_mini.py`` 1.1.1 saves them):

* ``v`` (with ``m``, ``step``): names containing "bias", per coordinate: Adam's ``exp_avg_sq`` (kind ``mini_v``);
* ``vmean`` of shape ``(H, 1)`` with ``head_per_gpu``: q/k projections, one value per attention head, over
  ``grad.view(-1, dim * dim // n_heads)`` of the flattened parameter (kind ``mini_heads``);
* ``vmean`` of shape ``(rows, 1)`` with ``neuron_per_gpu``: embeddings, output head, v/o projections, MLP, one
  value per output row (kind ``mini_rows``);
* ``vmean`` 0-d with ``block_numel``: everything else (the norms), one value for the whole tensor
  (kind ``mini_tensor``).

Each is exported as what it is, the value each coordinate's update used: ``v[i, j] = vmean[row i]``. A matrix
whose value is constant per row (per-row blocks, and head blocks whose size is a multiple of the row length, as
for every Llama q/k) is exactly rank 1, ``v = outer(r, c) / sum(r)`` with ``r = n * vrow`` (row sums) and
``c = sum(vrow) * 1`` (column sums), so it is stored as a rank-1 pair (m + n numbers) with no loss; the others
are expanded. Bias correction: as Adam's (``bias_corrected: false``, ``step``, ``beta2``).

The shape of a q/k parameter is not in its state (``m`` is ``(H, dim * dim / n_heads)``, and ``dim`` is an
optimizer attribute, not saved): it is ``(numel / d, d)`` with ``d`` the row length most of the per-row matrices
share (the hidden size: embeddings, v/o projections, MLP inputs), and ``--model`` checks it.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Collection, Dict, Mapping, Optional, Tuple

import torch

from mergekit_ota.errors import CurvatureError
from mergekit_ota.export.moments import Curvature, Full, Rank1

Shape = Tuple[int, ...]
MINI_KINDS = ("mini_v", "mini_heads", "mini_rows", "mini_tensor")
MINI_TENSOR_KEYS = ("m", "v", "vmean")  # the state tensors a reader relies on (shapes, values): checked as tensors
#: per kind, the state key holding its second moment
MINI_KEYS: Dict[str, Tuple[str, ...]] = {
    "mini_v": ("v",),
    "mini_heads": ("vmean",),
    "mini_rows": ("vmean",),
    "mini_tensor": ("vmean",),
}


def mini_kind(keys: Collection[str]) -> Optional[str]:
    """The Adam-mini kind of one parameter's state keys (module docstring), or ``None``."""
    own = set(keys)
    if {"m", "vmean"} <= own:
        for marker, kind in (("head_per_gpu", "mini_heads"), ("neuron_per_gpu", "mini_rows")):
            if marker in own:
                return kind
        if "block_numel" in own:
            return "mini_tensor"
        return None
    if {"m", "v"} <= own and own <= {"m", "v", "step"}:
        return "mini_v"
    return None


def mini_shape(kind: str, shapes: Mapping[str, Shape]) -> Shape:
    """The parameter's shape from its state shapes; a q/k parameter's (``mini_heads``) is flat until
    :func:`head_shapes` gives it its rows."""
    if kind == "mini_v":
        return tuple(shapes["v"])
    if kind == "mini_heads":
        m = shapes["m"]
        return (int(torch.Size(m).numel()),)
    return tuple(shapes["m"])


def head_shapes(kinds: Mapping[str, str], shapes: Dict[str, Shape], where: str) -> None:
    """Give each ``mini_heads`` parameter in ``shapes`` (``{label: shape}``) the shape ``(numel / d, d)``, ``d`` the
    row length most ``mini_rows`` matrices share (module docstring); refused naming ``where`` where there is none
    or it does not divide the parameter."""
    heads = [label for label, kind in kinds.items() if kind == "mini_heads" and label in shapes]
    if not heads:
        return
    lengths = Counter(
        shapes[label][1] for label, kind in kinds.items() if kind == "mini_rows" and len(shapes[label]) == 2
    )
    if not lengths:
        raise CurvatureError(
            f"{where}: Adam-mini keeps q/k projections per head without their shape, and no per-row matrix "
            f"(embeddings, MLP) tells the hidden size; export the whole model's optimizer state"
        )
    hidden = lengths.most_common(1)[0][0]
    for label in heads:
        (numel,) = shapes[label]
        if numel % hidden:
            raise CurvatureError(
                f"{where}: Adam-mini q/k state '{label}' has {numel} values, not a multiple of the hidden size "
                f"{hidden} read from the per-row matrices"
            )
        shapes[label] = (numel // hidden, hidden)


def _per_row(values: torch.Tensor, shape: Shape) -> Curvature:
    """``v[i, j] = values[i]`` over a 2-D ``shape``: exactly the rank-1 pair ``r = n * values``, ``c = sum(values)``."""
    rows = values.to(torch.float64).reshape(-1)
    n = shape[1]  # in float64, then float32: a sum beyond float32 becomes inf, which the writer refuses by name
    return Rank1((rows * n).to(torch.float32), torch.full((n,), float(rows.sum()), dtype=torch.float64).float())


def per_row(kind: str, shape: Shape, blocks: int) -> bool:
    """Whether a ``kind`` parameter of ``shape`` with ``blocks`` block values is constant per row, so stored as an
    exact rank-1 pair: per-row blocks, and head blocks holding whole rows, of a 2-D parameter."""
    numel = int(torch.Size(shape).numel())
    if kind not in ("mini_rows", "mini_heads") or len(shape) != 2 or not blocks or numel % blocks:
        return False
    return (numel // blocks) % shape[1] == 0


def load_mini(kind: str, get: Callable[[str], torch.Tensor], shape: Shape, where: str) -> Curvature:
    """The second moment every coordinate of a parameter of ``shape`` used, from its Adam-mini state."""
    if kind == "mini_v":
        return Full(get("v"))
    vmean = get("vmean").to(torch.float32)
    numel = int(torch.Size(shape).numel())
    if kind == "mini_tensor":
        if vmean.numel() != 1:
            raise CurvatureError(f"{where}: Adam-mini's whole-tensor 'vmean' holds {vmean.numel()} values; expected 1")
        return Full(vmean.reshape(()).expand(shape).clone())
    blocks = vmean.numel()
    if not blocks or numel % blocks:
        raise CurvatureError(f"{where}: Adam-mini 'vmean' has {blocks} blocks for a parameter of shape {list(shape)}")
    size = numel // blocks
    if per_row(kind, shape, blocks):
        return _per_row(vmean.reshape(-1).repeat_interleave(size // shape[1]), shape)
    return Full(vmean.reshape(-1, 1).expand(blocks, size).reshape(shape).clone())
