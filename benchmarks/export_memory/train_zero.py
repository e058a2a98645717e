"""Train a 25M-parameter module for one step under DeepSpeed ZeRO (CPU) and save its checkpoint.

Run by ``benchmarks.export_memory`` under ``DS_ACCELERATOR=cpu deepspeed --num_gpus N`` with a Python
that has DeepSpeed; arguments: ``--out DIR --stage S``.  The largest parameter is the 8192 x 1024
embedding (32 MiB as float32); each rank file holds its partition of the fp32 master weights,
``exp_avg`` and ``exp_avg_sq``.
"""

import argparse

import torch
import torch.nn as nn

EMBED = (8192, 1024)
LAYERS, WIDTH = 16, 1024


class Big(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(*EMBED)
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for layer in self.layers:
            h = torch.relu(layer(h))
        return h.pow(2).mean()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--stage", type=int, required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    import deepspeed

    torch.manual_seed(0)
    model = Big()
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "zero_optimization": {"stage": args.stage},
    }
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    loss = engine(torch.randint(0, EMBED[0], (1, 16)))
    engine.backward(loss)
    engine.step()
    engine.save_checkpoint(args.out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
