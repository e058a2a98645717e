"""A short ``transformers.Trainer`` run with ``CurvatureCallback``: the capture tests' one training set-up.

4 AdamW steps on 16 random rows of 8 tokens (batch 2), a checkpoint every 2 steps (``checkpoint-2/``,
``checkpoint-4/``), ``adam_beta2=0.98``, on CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def train_with_callback(model: Any, out: Path, vocab: int, callback: Any, data_seed: int, **args: Any) -> Any:
    """Train ``model`` with ``callback`` into ``out`` (``args``: further ``TrainingArguments``, e.g. ``seed``,
    ``learning_rate``); return the trainer."""
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(data_seed)
    rows = [torch.randint(0, vocab, (8,), generator=g) for _ in range(16)]
    targs = TrainingArguments(
        output_dir=str(out),
        max_steps=4,
        save_steps=2,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        adam_beta2=0.98,
        **args,
    )
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=[{"input_ids": r, "labels": r.clone()} for r in rows],
        callbacks=[callback],
    )
    trainer.train()
    return trainer
