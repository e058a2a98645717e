"""Writing a curvature store (the format :class:`~mergekit_ota.curvature.store.CurvatureStore` reads)."""

from __future__ import annotations

import os
from typing import Mapping, Optional

import torch
from safetensors.torch import save_file

from mergekit_ota.curvature.store import COL_SUFFIX, ROW_SUFFIX
from mergekit_ota.math.rank1 import rank1_factors

FORMAT_VERSION = "1"


def save_store(
    tensors: Mapping[str, torch.Tensor],
    path: str,
    *,
    compress: bool = False,
    dtype: torch.dtype = torch.float32,
    metadata: Optional[Mapping[str, str]] = None,
) -> None:
    """Write ``{weight name: exp_avg_sq}`` to the single file ``path`` (safetensors).

    With ``compress`` every 2-D tensor is stored as its row and column sums
    (``NAME:rank1_row``, ``NAME:rank1_col``); other tensors are stored whole.
    The header records ``format_version`` and ``compression`` plus ``metadata``.
    The file is written under a temporary name and renamed, so a failure leaves no
    partial store.
    """
    out = {}
    for name, value in tensors.items():
        if compress and value.dim() == 2:
            row, col = rank1_factors(value)
            out[name + ROW_SUFFIX] = row.to(dtype).contiguous()
            out[name + COL_SUFFIX] = col.to(dtype).contiguous()
        else:
            out[name] = value.detach().to(dtype).contiguous()
    header = {
        "format_version": FORMAT_VERSION,
        "compression": "rank1" if compress else "none",
        "dtype": str(dtype).removeprefix("torch."),
        **{str(k): str(v) for k, v in (metadata or {}).items()},
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file(out, tmp, metadata=header)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
