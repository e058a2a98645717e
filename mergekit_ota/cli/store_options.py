"""The options of every command that writes a curvature store (``export``, ``fisher``): one definition each,
since both write through :func:`mergekit_ota.export.pipeline.write_store` with the same rules."""

from __future__ import annotations

import click

compress_option = click.option(
    "--compress",
    type=click.Choice(["none", "rank1"]),
    default="none",
    show_default=True,
    help="rank1: store each 2-D tensor as its row and column sums (m+n numbers).",
)
shard_size_option = click.option(
    "--shard-size",
    default=None,
    help="Largest shard in bytes (unlike mergekit's --out-shard-size, which counts parameters), e.g. 2GB, 500MB, "
    "1.5GiB (default 5GB for a directory OUT; a .safetensors OUT is one file).",
)
force_option = click.option(
    "--force",
    is_flag=True,
    help="Replace an existing OUT if it is a curvature store (never model weights or a directory with other files).",
)
