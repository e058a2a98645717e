"""Trainer runs (base pretraining, expert fine-tuning) and the export of their Adam curvature.

Every run is ``transformers.Trainer`` with its default AdamW, saving one checkpoint at
the last step (``checkpoint-N`` holds ``model.safetensors``, ``config.json``, the
tokenizer and ``optimizer.pt``): exactly what a user has after an SFT run.  A run is
built in ``DIR.tmp`` and renamed to ``DIR`` when it finished, so an interrupted run is
redone and a finished one is reused.  Curvature is exported with the real
``mergekit-ota export CHECKPOINT OUT [--compress rank1]`` command.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from pydantic import BaseModel, ConfigDict

# the (input ids, labels with -100 where no loss) rows and their padding are mergekit-ota's own (fisher's data)
from mergekit_ota.fisher.data import IGNORE, Row
from mergekit_ota.fisher.estimator import collate


class TrainSettings(BaseModel):
    """Hyper-parameters of one Trainer run (AdamW, betas (0.9, 0.999))."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int = 0
    weight_decay: float = 0.0
    scheduler: str = "linear"
    seed: int = 0


class RowDataset(torch.utils.data.Dataset):
    """A list of encoded ``(ids, labels)`` rows as a map-style dataset."""

    def __init__(self, rows: Sequence[Row]):
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Row:
        return self.rows[index]


class _Collator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: Sequence[Row]) -> Dict[str, torch.Tensor]:
        return collate(rows, self.pad_id)


def answer_only_loss(model: Any, inputs: Dict[str, torch.Tensor], num_items_in_batch: Any = None) -> torch.Tensor:
    """The causal-LM loss of ``model`` on ``inputs``, computing vocabulary logits only where a label is set.

    Equal to ``model(**inputs).loss`` (mean cross-entropy over the labelled next-token positions, or
    their sum divided by ``num_items_in_batch`` as the Trainer passes it under gradient accumulation),
    but the output head runs on the labelled positions only: on chat rows whose answer is a few tokens
    of a prompt's dozens, that skips most of the vocabulary projection and its softmax.
    """
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    hidden = decoder(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")).last_hidden_state
    target = inputs["labels"][:, 1:]
    scored = target != IGNORE
    logits = head(hidden[:, :-1][scored]).float()
    total = torch.nn.functional.cross_entropy(logits, target[scored], reduction="sum")
    if num_items_in_batch is not None:
        count = num_items_in_batch.to(total.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
        return total / count
    return total / scored.sum().clamp(min=1)


def _answer_only_trainer(bf16: bool = False):
    """A ``transformers.Trainer`` subclass whose ``compute_loss`` is :func:`answer_only_loss`, under
    bfloat16 autocast when ``bf16`` (the Trainer's own ``bf16`` flag autocasts on a GPU but, as measured
    with transformers 5.24 on this CPU, leaves a CPU run in float32 matmuls)."""
    from transformers import Trainer

    class AnswerOnlyTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: D401
            kind = "cuda" if inputs["input_ids"].is_cuda else "cpu"
            with torch.autocast(kind, dtype=torch.bfloat16, enabled=bf16):
                loss = answer_only_loss(model, inputs, num_items_in_batch)
            return (loss, None) if return_outputs else loss

    return AnswerOnlyTrainer


def _step_clock():
    """A ``TrainerCallback`` that records the wall time at the end of every optimizer step."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times: List[float] = []

        def on_step_end(self, args, state, control, **kwargs):  # noqa: D401
            self.times.append(time.perf_counter())

    return StepClock()


def checkpoint_of(run_dir: str, steps: int) -> str:
    """The checkpoint directory a finished run of ``steps`` steps leaves in ``run_dir``."""
    return os.path.join(run_dir, f"checkpoint-{steps}")


def train(
    model: Any,
    rows: Sequence[Row],
    run_dir: str,
    settings: TrainSettings,
    tokenizer: Any,
    device: str = "cpu",
    bf16: bool = False,
    answer_only: bool = False,
) -> Tuple[str, Dict[str, Any]]:
    """Train ``model`` (a ``PreTrainedModel``) on ``rows``; return (checkpoint dir, run info).

    Reuses a finished run in ``run_dir`` (its ``run.json`` holds the info: wall and CPU
    seconds of the training loop, loss at the first and the last logging step).
    ``bf16``: the Trainer's bfloat16 mixed precision (autocast; weights, gradients and AdamW's
    moments stay float32). ``answer_only``: the loss through :func:`answer_only_loss` (the same
    loss, the vocabulary projection only where labels are set).
    """
    info_path = os.path.join(run_dir, "run.json")
    checkpoint = checkpoint_of(run_dir, settings.steps)
    if os.path.isfile(info_path) and os.path.isfile(os.path.join(checkpoint, "optimizer.pt")):
        with open(info_path, encoding="utf-8") as fp:
            return checkpoint, json.load(fp)

    from transformers import Trainer, TrainingArguments

    tmp = run_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    args = TrainingArguments(
        output_dir=tmp,
        max_steps=settings.steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay,
        lr_scheduler_type=settings.scheduler,
        optim="adamw_torch",
        save_strategy="steps",
        save_steps=settings.steps,
        logging_steps=max(1, settings.steps // 20),
        report_to=[],
        use_cpu=device == "cpu",
        seed=settings.seed,
        data_seed=settings.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        bf16=bf16,
    )
    clock = _step_clock()
    trainer = (_answer_only_trainer(bf16) if answer_only else Trainer)(
        callbacks=[clock],
        model=model,
        args=args,
        train_dataset=RowDataset(rows),
        data_collator=_Collator(tokenizer.pad_token_id),
        processing_class=tokenizer,
    )
    started, cpu = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    info = {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "steps": settings.steps,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "settings": settings.model_dump(),
        "bf16": bf16,
        "answer_only": answer_only,
        "seconds_per_step": seconds / settings.steps,
        # median wall seconds between optimizer steps after the first (no start-up, no checkpoint saving)
        "step_seconds": _median([b - a for a, b in zip(clock.times[1:], clock.times[2:])]),
        "log": [
            {k: entry[k] for k in ("step", "loss") if k in entry}
            for entry in trainer.state.log_history
            if "loss" in entry
        ],
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    with open(os.path.join(tmp, "run.json"), "w", encoding="utf-8") as fp:
        json.dump(info, fp, indent=1)
    if not os.path.isfile(os.path.join(checkpoint_of(tmp, settings.steps), "optimizer.pt")):
        raise RuntimeError(f"Trainer run in {tmp} left no checkpoint-{settings.steps}/optimizer.pt")
    shutil.rmtree(run_dir, ignore_errors=True)
    os.replace(tmp, run_dir)
    return checkpoint, info


def _median(values: Sequence[float]) -> Optional[float]:
    ordered = sorted(values)
    if not ordered:
        return None
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def export_curvature(checkpoint: str, out: str, compress: Optional[str] = None) -> float:
    """Run ``mergekit-ota export CHECKPOINT OUT [--compress rank1]`` in-process; return seconds.

    Skips the export when ``out`` exists (it is written under a temporary name and renamed
    by the command, so an existing ``out`` is complete).
    """
    if os.path.exists(out):
        return 0.0
    from mergekit_ota.cli.main import main as cli

    if "export" not in cli.commands:
        raise RuntimeError(
            "this mergekit-ota has no `export` command (mergekit_ota/cli/export.py); "
            "the benchmark exports Trainer checkpoints with it"
        )
    args = ["export", checkpoint, out, "--quiet"] + (["--compress", compress] if compress else [])
    started = time.perf_counter()
    cli.main(args=args, prog_name="mergekit-ota", standalone_mode=False)
    if not os.path.exists(out):
        raise RuntimeError(f"mergekit-ota {' '.join(args)} wrote nothing at {out}")
    return time.perf_counter() - started
