"""Running a merge config as ``mergekit-yaml`` does, for the tests (``from merging import merge``)."""

from __future__ import annotations

import glob
import os
from typing import Any, Dict

import torch
from safetensors.torch import load_file


def merge(cfg: Dict[str, Any], out: Any, **options: Any) -> Dict[str, torch.Tensor]:
    """``run_merge`` of the config dict ``cfg`` into ``out`` (quiet, no tokenizer copy, plus ``options`` for
    ``MergeOptions``); returns every tensor the merge wrote."""
    run_config(cfg, out, **options)
    return merged_tensors(out)


def run_config(cfg: Dict[str, Any], out: Any, **options: Any) -> Any:
    """:func:`merge` without reading the output back; returns the ``MergeConfiguration`` the merge ran (as
    ``run_merge`` left it: the card mergekit writes is generated from it)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    import mergekit_ota

    mergekit_ota.install()  # register ota/ffg and patch mergekit (whether or not the start-up hook is on)

    config = MergeConfiguration.model_validate(cfg)
    run_merge(config, str(out), MergeOptions(**{"quiet": True, "copy_tokenizer": False, **options}))
    return config


def merged_tensors(out: Any) -> Dict[str, torch.Tensor]:
    """Every tensor of the ``*.safetensors`` files in ``out`` (empty if there are none)."""
    tensors: Dict[str, torch.Tensor] = {}
    for path in sorted(glob.glob(os.path.join(str(out), "*.safetensors"))):
        tensors.update(load_file(path))
    return tensors
