"""Test fixtures, not product: small synthetic model families (base + experts + curvature) made without any hub.

``mergekit_ota.testing`` (as ``numpy.testing`` and ``transformers.testing_utils`` are) is for the tests,
``mergekit-ota demo`` and the benchmarks, and for users who want a family to try a config on: random tiny Llama
models saved with ``save_pretrained``, experts that differ from the base by sparse
edits, and curvature stores whose values are large where an expert was edited
(as Adam's second moments are where gradients were large).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from mergekit_ota.curvature.fingerprint import FINGERPRINT_KEY, entries_fingerprint, weight_entries
from mergekit_ota.curvature.writer import save_store
from mergekit_ota.store_format import DEFAULT_STORE_NAME, INDEX_SUFFIX

RANK1_STORE_NAME = "exp_avg_sq_rank1.safetensors"


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
    rank1_stores: List[str] = field(default_factory=list)


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
        weight, v = expert_tensor(value, g, edit_fraction, scale, names is None or name in names)
        weights[name] = weight
        if v is not None:
            curvature[name] = v
    return weights, curvature


def expert_tensor(
    value: torch.Tensor,
    generator: torch.Generator,
    edit_fraction: float = 0.1,
    scale: float = 0.05,
    with_curvature: bool = True,
) -> "tuple[torch.Tensor, Optional[torch.Tensor]]":
    """One tensor of an expert: ``value + delta`` and its curvature ``v`` (or ``None``).

    A random ``edit_fraction`` of entries gets ``delta ~ scale * N(0, 1)``; ``v`` is
    ``U(0, 1e-10)`` background plus ``U(0, 1e-6)`` on edited entries.  Draws from
    ``generator`` in a fixed order, so experts are reproducible tensor by tensor.
    """
    edited = torch.rand(value.shape, generator=generator) < edit_fraction
    delta = torch.randn(value.shape, generator=generator).mul_(scale).mul_(edited)
    weight = delta.add_(value)
    if not with_curvature:
        return weight, None
    v = torch.rand(value.shape, generator=generator).mul_(1e-10)
    v.add_(torch.rand(value.shape, generator=generator).mul_(edited).mul_(1e-6))
    return weight, v


def make_family(
    root: str,
    n_experts: int = 2,
    config=None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    compress: bool = False,
) -> Family:
    """Write ``root/base`` and ``root/expert_i`` (with ``exp_avg_sq.safetensors`` inside, recording the expert's
    weights fingerprint as a store written from its optimizer does)."""
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
        owner = entries_fingerprint(weight_entries(path), list(curvature))
        save_store(curvature, store, compress=compress, metadata={"source": "synthetic", FINGERPRINT_KEY: owner})
        family.experts.append(path)
        family.stores.append(store)
    return family


def _shapes(config) -> Dict[str, Tuple[int, ...]]:
    """Names and shapes of a Llama model's saved tensors (no memory allocated)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    shapes = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def _base_tensors(
    shapes: Dict[str, Tuple[int, ...]], generator: torch.Generator, std: float
) -> Iterator[Tuple[str, torch.Tensor]]:
    """Random base weights one tensor at a time: ``N(0, std)``, norms 1."""
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape)
        else:
            yield name, torch.randn(shape, generator=generator).mul_(std)


def stream_family(
    root: str,
    n_experts: int = 2,
    config=None,
    seed: int = 0,
    shard_bytes: int = 1 << 30,
) -> Family:
    """Write a base and ``n_experts`` experts one tensor at a time (for models too big for ``make_family``).

    Weights are fp32 safetensors shards of at most ``shard_bytes`` with a
    ``model.safetensors.index.json``.  Each expert gets its full curvature store
    ``exp_avg_sq.safetensors.index.json`` (sharded like the weights) and a rank-1 one,
    ``exp_avg_sq_rank1.safetensors``.  Base tensors are ``N(0, initializer_range)``
    (norms 1); experts follow :func:`expert_tensor` with the per-expert seeds of
    :func:`make_family`.  Files stream through
    :class:`~mergekit_ota.curvature.writer.StoreWriter`: memory is one tensor per model.
    """
    from contextlib import ExitStack

    from mergekit_ota.curvature.writer import OutputLayout, StoreWriter, store_metadata, store_specs, stored_tensors

    config = copy.deepcopy(config or tiny_llama_config())
    config.dtype = torch.float32
    config.architectures = ["LlamaForCausalLM"]
    shapes = _shapes(config)
    pairs = list(shapes.items())
    family = Family(base=os.path.join(root, "base"))
    paths = [family.base] + [os.path.join(root, f"expert_{i}") for i in range(n_experts)]
    for path in paths:
        os.makedirs(path, exist_ok=True)
        config.save_pretrained(path)
    generators = [torch.Generator().manual_seed(seed)] + [
        torch.Generator().manual_seed(seed * 1000 + i + 1) for i in range(n_experts)
    ]
    metadata = {"source": "synthetic"}
    with ExitStack() as stack:

        def writer(path: str, compress: bool, header: Dict[str, str]) -> StoreWriter:
            kind = "index" if path.endswith(INDEX_SUFFIX) else "file"
            specs = store_specs(pairs, torch.float32, compress)
            return stack.enter_context(StoreWriter(OutputLayout(kind, path), specs, header, shard_bytes))

        models = [writer(os.path.join(p, "model.safetensors" + INDEX_SUFFIX), False, {"format": "pt"}) for p in paths]
        full = [
            writer(
                os.path.join(p, DEFAULT_STORE_NAME + INDEX_SUFFIX),
                False,
                store_metadata("none", torch.float32, metadata),
            )
            for p in paths[1:]
        ]
        rank1 = [
            writer(os.path.join(p, RANK1_STORE_NAME), True, store_metadata("rank1", torch.float32, metadata))
            for p in paths[1:]
        ]
        for name, value in _base_tensors(shapes, generators[0], float(config.initializer_range)):
            models[0].write(name, value)
            for expert in range(n_experts):
                weight, v = expert_tensor(value, generators[expert + 1])
                models[expert + 1].write(name, weight)
                full[expert].write(name, v)
                for key, tensor in stored_tensors(name, v, compress=True):
                    rank1[expert].write(key, tensor)
        for each in models + full + rank1:
            each.commit()
    for path in paths[1:]:
        family.experts.append(path)
        family.stores.append(os.path.join(path, DEFAULT_STORE_NAME + INDEX_SUFFIX))
        family.rank1_stores.append(os.path.join(path, RANK1_STORE_NAME))
    return family
