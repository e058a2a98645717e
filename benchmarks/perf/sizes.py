"""Model tiers of the benchmark: random Llama configurations by approximate parameter count."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict


@dataclass(frozen=True)
class Size:
    """A Llama shape (4 attention heads, 2 KV heads: see ``tiny_llama_config``)."""

    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    intermediate_size: int

    def config(self):
        """The transformers ``LlamaConfig`` of this tier."""
        from mergekit_ota.testing import tiny_llama_config

        return tiny_llama_config(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            intermediate_size=self.intermediate_size,
        )

    @property
    def key(self) -> str:
        """Identifies the generated files (changes when the shape changes)."""
        return f"{self.name}-v{self.vocab_size}-h{self.hidden_size}-l{self.num_layers}-i{self.intermediate_size}"


SIZES: Dict[str, Size] = {
    size.name: size
    for size in (
        Size("1M", vocab_size=2000, hidden_size=128, num_layers=3, intermediate_size=256),  # smoke only
        Size("15M", vocab_size=8000, hidden_size=384, num_layers=6, intermediate_size=1024),
        Size("150M", vocab_size=16000, hidden_size=1024, num_layers=10, intermediate_size=2752),
        Size("500M", vocab_size=32000, hidden_size=1536, num_layers=16, intermediate_size=4096),
    )
}
DEFAULT_SIZES = ("15M", "150M", "500M")
