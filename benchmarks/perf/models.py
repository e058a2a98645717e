"""Generated model families for the benchmark, cached under ``benchmarks/.cache/``.

One family per size tier: a base and ``n`` experts, each expert with a full fp32
curvature store and a rank-1 one (:func:`mergekit_ota.testing.stream_family`).
A family is written under a temporary name and renamed when complete, so an
interrupted generation is never reused; reruns skip generation.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

from benchmarks.perf.sizes import Size

MANIFEST = "family.json"
FORMAT = 2  # bump when stream_family's output changes


@dataclass(frozen=True)
class CachedFamily:
    """A complete family on disk and what the report needs to know about it."""

    root: str
    size: str
    parameters: int
    largest_tensor: int  # elements of the largest tensor
    n_experts: int
    stores: Tuple[str, ...]  # full curvature store of each expert (file or index), relative to root
    rank1_stores: Tuple[str, ...]

    @property
    def base(self) -> str:
        return os.path.join(self.root, "base")

    def expert(self, index: int) -> str:
        return os.path.join(self.root, f"expert_{index}")

    def store(self, index: int, rank1: bool) -> str:
        """Path of expert ``index``'s full or rank-1 curvature store (file or index)."""
        return os.path.join(self.root, (self.rank1_stores if rank1 else self.stores)[index])

    def input_files(self, n_experts: int, curvature: str) -> List[str]:
        """The files a merge of the base and the first ``n_experts`` experts reads.

        ``curvature`` is ``"none"``, ``"full"`` or ``"rank1"``.
        """
        paths = glob.glob(os.path.join(self.base, "model*.safetensors"))
        for index in range(n_experts):
            paths += glob.glob(os.path.join(self.expert(index), "model*.safetensors"))
            if curvature == "full":
                paths += glob.glob(os.path.join(self.expert(index), "exp_avg_sq-*.safetensors"))
                paths += glob.glob(os.path.join(self.expert(index), "exp_avg_sq.safetensors"))
            elif curvature == "rank1":
                paths += glob.glob(os.path.join(self.expert(index), "exp_avg_sq_rank1*.safetensors"))
        return sorted(paths)

    def input_bytes(self, n_experts: int, curvature: str) -> int:
        """Total size of :meth:`input_files`."""
        return sum(os.path.getsize(p) for p in self.input_files(n_experts, curvature))


def warm_page_cache(paths: List[str], block: int = 16 << 20) -> None:
    """Read ``paths`` once so a merge finds them in the page cache (if memory allows)."""
    buffer = bytearray(block)
    for path in paths:
        with open(path, "rb", buffering=0) as fp:
            while fp.readinto(buffer):
                pass


def _shapes_of(directory: str) -> List[tuple]:
    from mergekit_ota.curvature.store import read_header

    shapes = []
    for path in sorted(glob.glob(os.path.join(directory, "model*.safetensors"))):
        shapes += [entry.shape for entry in read_header(path)[0].values()]
    return shapes


def _numel(shape: tuple) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def ensure_family(cache: str, size: Size, n_experts: int, log=print) -> CachedFamily:
    """Return the cached family of ``size`` with at least ``n_experts`` experts, generating it if needed."""
    root = os.path.join(cache, "models", size.key)
    manifest = os.path.join(root, MANIFEST)
    if os.path.exists(manifest):
        with open(manifest, encoding="utf-8") as fp:
            info = json.load(fp)
        if info.get("format") == FORMAT and info["n_experts"] >= n_experts:
            return _cached(root, info)
    shutil.rmtree(root, ignore_errors=True)  # outdated, too few experts, or incomplete

    from mergekit_ota.testing import stream_family

    tmp = f"{root}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.perf_counter()
    log(f"generating {size.name} family (base + {n_experts} experts) in {root} ...")
    try:
        family = stream_family(tmp, n_experts=n_experts, config=size.config())
        shapes = _shapes_of(os.path.join(tmp, "base"))
        info = {
            "format": FORMAT,
            "size": size.name,
            "parameters": sum(_numel(s) for s in shapes),
            "largest_tensor": max(_numel(s) for s in shapes),
            "n_experts": n_experts,
            "stores": [os.path.relpath(p, tmp) for p in family.stores],
            "rank1_stores": [os.path.relpath(p, tmp) for p in family.rank1_stores],
            "seconds": round(time.perf_counter() - started, 1),
        }
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as fp:
            json.dump(info, fp, indent=1)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"  {info['parameters'] / 1e6:.1f}M parameters, generated in {info['seconds']} s")
    return _cached(root, info)


def _cached(root: str, info: Dict[str, Any]) -> CachedFamily:
    return CachedFamily(
        root=root,
        size=info["size"],
        parameters=info["parameters"],
        largest_tensor=info["largest_tensor"],
        n_experts=info["n_experts"],
        stores=tuple(info["stores"]),
        rank1_stores=tuple(info["rank1_stores"]),
    )
