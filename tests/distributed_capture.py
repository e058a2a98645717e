"""Run under ``torchrun --nproc_per_node 2`` (gloo, CPU) by tests/test_training_capture.py; not a test itself.

``python -m torch.distributed.run --nproc_per_node 2 tests/distributed_capture.py STRATEGY OUT`` trains a
tiny Llama for 2 steps under ``ddp`` (DistributedDataParallel), ``fsdp2`` (``fully_shard``) or ``trainer``
(``transformers.Trainer`` with DDP over gloo and :class:`CurvatureCallback`), then writes
``OUT/store.safetensors`` with :func:`save_curvature` (ddp, fsdp2) and ``OUT/truth.safetensors``: each
parameter's ``exp_avg_sq`` read directly, by parameter identity (``optimizer.state[p]``; under FSDP2
``.full_tensor()`` of it), gathered separately from the code under test.
"""

import os
import sys

import torch
import torch.distributed as dist


def model_and_data():
    from transformers import LlamaForCausalLM

    from mergekit_ota.testing import tiny_llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=64, hidden_size=32))
    g = torch.Generator().manual_seed(1 + int(os.environ.get("RANK", "0")))
    batches = [torch.randint(0, 64, (2, 8), generator=g) for _ in range(2)]
    return model, batches


def truth_of(model, optimizer):
    out = {}
    for name, p in model.named_parameters():
        v = optimizer.state[p]["exp_avg_sq"]
        v = v.full_tensor() if hasattr(v, "full_tensor") else v
        out[name.removeprefix("module.")] = v.detach().cpu().clone()
    return out


def main() -> None:
    strategy, out = sys.argv[1], sys.argv[2]
    from safetensors.torch import save_file

    from mergekit_ota.training import save_curvature

    if strategy == "trainer":
        from transformers import Trainer, TrainingArguments

        from mergekit_ota.training import CurvatureCallback

        model, batches = model_and_data()
        data = [{"input_ids": r, "labels": r.clone()} for b in batches for r in b] * 2
        args = TrainingArguments(
            output_dir=out,
            max_steps=2,
            save_steps=2,
            per_device_train_batch_size=2,
            report_to=[],
            use_cpu=True,
            ddp_backend="gloo",
            logging_steps=1,
            save_only_model=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[CurvatureCallback(compress="none")])
        trainer.train()
        truth = truth_of(
            trainer.model, trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
        )
        if dist.get_rank() == 0:
            save_file({k: v.contiguous() for k, v in truth.items()}, os.path.join(out, "truth.safetensors"))
        return

    dist.init_process_group("gloo")
    model, batches = model_and_data()
    if strategy == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    elif strategy in ("fsdp2", "fsdp2-nan"):
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.97))
    for batch in batches:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    truth = truth_of(model.module if strategy == "ddp" else model, optimizer)
    if strategy == "fsdp2-nan":  # rank 0's shard of one state turns NaN: only rank 0 checks values, mid-write
        name, p = list(model.named_parameters())[3]
        if dist.get_rank() == 0:
            optimizer.state[p]["exp_avg_sq"].to_local().fill_(float("nan"))
        from mergekit_ota.errors import CurvatureError

        try:
            save_curvature(model, optimizer, os.path.join(out, "store.safetensors"), compress="none")
        except CurvatureError as error:
            with open(os.path.join(out, f"error-rank{dist.get_rank()}.txt"), "w") as fp:
                fp.write(f"{name}\n{error}")
        dist.barrier()  # both ranks got here: no rank was left waiting in a gather
        dist.destroy_process_group()
        return
    result = save_curvature(model, optimizer, os.path.join(out, "store.safetensors"), compress="none")
    if dist.get_rank() == 0:
        assert result is not None
        save_file({k: v.contiguous() for k, v in truth.items()}, os.path.join(out, "truth.safetensors"))
    else:
        assert result is None
    dist.barrier()  # both ranks done (rank 0 wrote the truth file) before an orderly gloo teardown
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Every output is written and closed: leave without running gloo's destructors, which can abort at exit
    # ("terminate called without an active exception") when the two ranks tear down at different moments.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
