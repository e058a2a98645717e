"""Small synthetic model families (base + experts + curvature) made without any hub.

Used by the tests, ``mergekit-ota demo`` and the benchmarks: random tiny Llama
models saved with ``save_pretrained``, experts that differ from the base by sparse
edits, and curvature stores whose values are large where an expert was edited
(as Adam's second moments are where gradients were large).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from mergekit_ota.curvature.locate import DEFAULT_STORE_NAME
from mergekit_ota.curvature.writer import save_store


def tiny_llama_config(
    vocab_size: int = 128,
    hidden_size: int = 64,
    num_layers: int = 2,
    tie_word_embeddings: bool = False,
    intermediate_size: Optional[int] = None,
):
    """A ``LlamaConfig`` small enough for unit tests."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie_word_embeddings,
    )


def save_model(path: str, config, state_dict: Dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> None:
    """Save ``state_dict`` as a transformers Llama checkpoint in ``dtype`` (safetensors)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, assign=True, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.config.dtype = dtype
    model.save_pretrained(path, safe_serialization=True)


def random_state_dict(config, seed: int) -> Dict[str, torch.Tensor]:
    """Random weights for ``config`` (deterministic in ``seed``), float32."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@dataclass
class Family:
    """Paths of a generated base model and its experts (each expert has its curvature store)."""

    base: str
    experts: List[str] = field(default_factory=list)
    stores: List[str] = field(default_factory=list)


def make_expert(
    base: Dict[str, torch.Tensor],
    seed: int,
    edit_fraction: float = 0.1,
    scale: float = 0.05,
    names: Optional[List[str]] = None,
) -> "tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]":
    """An expert (base + sparse edits) and curvature ``v`` (large on edited entries).

    Returns ``(weights, curvature)``; curvature covers ``names`` (default: all).
    """
    g = torch.Generator().manual_seed(seed)
    weights, curvature = {}, {}
    for name, value in base.items():
        edited = torch.rand(value.shape, generator=g) < edit_fraction
        delta = torch.randn(value.shape, generator=g) * scale * edited
        weights[name] = value + delta
        if names is None or name in names:
            background = torch.rand(value.shape, generator=g) * 1e-10
            curvature[name] = background + edited * torch.rand(value.shape, generator=g) * 1e-6
    return weights, curvature


def make_family(
    root: str,
    n_experts: int = 2,
    config=None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    compress: bool = False,
) -> Family:
    """Write ``root/base`` and ``root/expert_i`` (with ``exp_avg_sq.safetensors`` inside)."""
    config = config or tiny_llama_config()
    base = random_state_dict(config, seed)
    if config.tie_word_embeddings:
        base.pop("lm_head.weight", None)
    family = Family(base=os.path.join(root, "base"))
    save_model(family.base, config, base, dtype)
    for i in range(n_experts):
        path = os.path.join(root, f"expert_{i}")
        weights, curvature = make_expert(base, seed=seed * 1000 + i + 1)
        save_model(path, config, weights, dtype)
        store = os.path.join(path, DEFAULT_STORE_NAME)
        save_store(curvature, store, compress=compress, metadata={"source": "synthetic"})
        family.experts.append(path)
        family.stores.append(store)
    return family
