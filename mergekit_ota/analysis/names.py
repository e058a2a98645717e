"""Layer index and module type of a weight, read from its name.

Llama / Mistral / Qwen / Gemma names (``model.layers.7.self_attn.q_proj.weight``) map
to ``(7, "q")``; Mixtral-style experts (``block_sparse_moe.experts.3.w1``) to the
MLP type they implement.  A name inside a numbered block (``layers.N``, ``h.N``,
``blocks.N``, ``layer.N``) whose module is not recognised is ``(N, "other")``; any
other unrecognised name is ``(None, "other")``.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Optional

MODULE_TYPES = ("embeddings", "q", "k", "v", "o", "gate", "up", "down", "norms", "lm_head", "other")
"""Module types, in the column order of every layer x module table."""

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")

# (pattern on the part of the name after the layer index, module type); first match wins.
_IN_LAYER = (
    (re.compile(r"(?:^|\.)(?:q_proj|wq|query)(?:\.|$)"), "q"),
    (re.compile(r"(?:^|\.)(?:k_proj|wk|key)(?:\.|$)"), "k"),
    (re.compile(r"(?:^|\.)(?:v_proj|wv|value)(?:\.|$)"), "v"),
    (re.compile(r"(?:^|\.)(?:o_proj|wo|out_proj)(?:\.|$)"), "o"),
    (re.compile(r"(?:^|\.)(?:gate_proj|w1)(?:\.|$)"), "gate"),
    (re.compile(r"(?:^|\.)(?:up_proj|w3)(?:\.|$)"), "up"),
    (re.compile(r"(?:^|\.)(?:down_proj|w2)(?:\.|$)"), "down"),
    (re.compile(r"(?:norm|ln_\d*|layernorm)[^.]*(?:\.|$)"), "norms"),
)
_OUTSIDE = (
    (re.compile(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|tok_embeddings|embed_in)\."), "embeddings"),
    (re.compile(r"^(?:lm_head|output|embed_out)\."), "lm_head"),
    (re.compile(r"(?:norm|ln_f)[^.]*\.(?:weight|bias)$"), "norms"),
)


class ParsedName(NamedTuple):
    """Where a weight sits: its decoder layer (``None`` outside the layers) and module type."""

    layer: Optional[int]
    module: str


def parse_name(name: str) -> ParsedName:
    """Return the layer index and module type (one of :data:`MODULE_TYPES`) of ``name``."""
    match = _LAYER.search(name)
    if match is not None:
        rest = name[match.end() :]
        for pattern, module in _IN_LAYER:
            if pattern.search(rest):
                return ParsedName(int(match.group(1)), module)
        return ParsedName(int(match.group(1)), "other")
    for pattern, module in _OUTSIDE:
        if pattern.search(name):
            return ParsedName(None, module)
    return ParsedName(None, "other")


def cell_label(layer: Optional[int], module: str) -> str:
    """Human label of a layer x module cell: ``layer 0 q``, ``embeddings``, ``final norms``."""
    if layer is not None:
        return f"layer {layer} {module}"
    return {"norms": "final norms", "other": "other (outside layers)"}.get(module, module)
