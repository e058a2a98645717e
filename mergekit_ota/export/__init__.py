"""``mergekit-ota export``: optimizer checkpoints -> curvature stores.

One reader module per source kind (``torch_state``: Trainer/accelerate/plain
``torch.save``; ``dcp``: torch.distributed.checkpoint; ``zero``: native DeepSpeed ZeRO
checkpoints; ``universal``: DeepSpeed universal checkpoints; ``store_source``: an existing store), each returning a
checked
:class:`~mergekit_ota.export.moments.SourceState` whose items are read lazily;
``pipeline.export_curvature`` streams them into the store writer
(:mod:`mergekit_ota.curvature.writer`).  Nothing heavy is imported here.
"""

SOURCE_KINDS = ("trainer", "torch", "dcp", "deepspeed", "deepspeed-universal", "store")
