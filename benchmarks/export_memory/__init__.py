"""Peak memory of ``mergekit-ota export`` on native DeepSpeed ZeRO checkpoints (``python -m
benchmarks.export_memory``)."""
