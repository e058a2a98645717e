"""``mergekit-ota compare CONFIG DATA OUT [mergekit-yaml options]``: merge methods side by side on held-out data."""

from __future__ import annotations

import sys
from typing import Any, Optional, Sequence, Tuple

import click

COMPARE_RUN = "<compare: each grid point's own directory>"  # stands in for OUT_PATH while mergekit-yaml's parser runs


def merge_options(config_file: str, rest: Sequence[str], device: str) -> Any:
    """``MergeOptions`` of ``mergekit-yaml CONFIG_FILE OUT_PATH REST...``, parsed by mergekit-yaml's own command
    line (so compare takes what it takes), for every grid point's merge: computed on ``device`` (compare's
    ``--device``) unless ``--cuda``/``--gpu-rich`` is given, ``random_seed`` 0 unless given (dare_ties draws at
    random), quiet (compare shows its own progress), with the tokenizer copied (the merge is loaded to be scored)
    and without a model card (neither changes a weight; mergekit's card step would ask the Hub about relative
    model paths)."""
    from mergekit.options import MergeOptions
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    try:
        with mergekit_yaml.make_context("mergekit-yaml", [config_file, COMPARE_RUN, *rest]) as ctx:
            params = dict(ctx.params)
    except click.UsageError as error:
        raise click.UsageError(f"as mergekit-yaml would: {error.format_message()}") from None
    given = {k: v for k, v in params.items() if k in MergeOptions.model_fields and v is not None}
    if not (given.get("cuda") or given.get("gpu_rich")):
        given["device"] = device
    if given.get("random_seed") is None:
        given["random_seed"] = 0
    return MergeOptions(**{**given, "quiet": True, "copy_tokenizer": True, "write_model_card": False})


def default_device() -> str:
    """``cuda`` where torch sees a CUDA device, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@click.command(
    "compare",
    short_help="Which merge method is best for these experts, on held-out data, with intervals.",
    context_settings={"ignore_unknown_options": True},
)
@click.argument("config_file", metavar="CONFIG", type=click.Path(exists=True, dir_okay=False))
@click.argument("data", type=click.Path(exists=True))
@click.argument("out", type=click.Path())
@click.argument("mergekit_yaml_args", nargs=-1, type=click.UNPROCESSED, metavar="[MERGEKIT-YAML OPTIONS]")
@click.option(
    "--methods",
    default=None,
    help="Comma-separated methods to compare: linear, task_arithmetic, ties, dare_ties, ota, ota+ffg, "
    "ffg+consensus (the default set), or any merge method mergekit knows.",
)
@click.option(
    "--grid",
    "grids",
    multiple=True,
    metavar="METHOD:KEY=V1,V2,...",
    help="One axis of a method's grid (repeatable); the axes given for a method replace its default grid with "
    "their product, e.g. --grid ota:density=0.05,0.1,0.2.",
)
@click.option(
    "--split",
    type=float,
    default=0.5,
    show_default=True,
    help="Share of each capability's rows in the selection half (the rest is the report half).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split and of the bootstrap.")
@click.option(
    "--replicates", type=click.IntRange(min=100), default=4000, show_default=True, help="Bootstrap replicates."
)
@click.option("--max-length", type=click.IntRange(min=2), default=512, show_default=True, help="Tokens kept per row.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Rows per forward pass.")
@click.option(
    "--device",
    default=None,
    help="torch device the merges are computed and the models scored on.  [default: cuda when present, else cpu]",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16"]),
    default="float32",
    show_default=True,
    help="The dtype models are scored in.",
)
@click.option("--keep-merges", is_flag=True, help="Keep each grid point's merged model in OUT/merges.")
@click.option("--force", is_flag=True, help="Start an earlier compare's OUT afresh (without it, it is resumed).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or per-point lines.")
def compare_command(
    config_file: str,
    data: str,
    out: str,
    mergekit_yaml_args: Tuple[str, ...],
    methods: Optional[str],
    grids: Tuple[str, ...],
    split: float,
    seed: int,
    replicates: int,
    max_length: int,
    batch_size: int,
    device: Optional[str],
    dtype: str,
    keep_merges: bool,
    force: bool,
    quiet: bool,
) -> None:
    """Merge CONFIG's base and experts with each method's grid, score every merge on DATA, and say which method
    is best for these experts.

    \b
      mergekit-ota compare merge.yml heldout.jsonl OUT
      mergekit-ota compare merge.yml heldout.jsonl OUT --methods ties,ota+ffg --grid ties:density=0.3,0.5

    CONFIG: any mergekit YAML naming base_model and the experts (models:). DATA: held-out rows as for
    `mergekit-ota fisher` (JSONL {"text": ...}, {"prompt": ..., "completion": ...} or {"messages": [...]}, a
    text file, a directory); a JSONL row may name its capability ("task") and the expert it belongs to
    ("expert": its path as in CONFIG, or its directory name): G, the gain kept, is then reported against that
    expert. DATA is split per capability into a selection half (each method's setting and the reference
    baseline are chosen there) and a report half (paired bootstrap verdicts: win / tie / loss); rows that
    name their half ("half": "selection" or "report") keep it.

    OUT gets report.md, results.json (per-row scores), compare.png and best.yml (the winner's config, for
    mergekit-yaml). Each grid point is a real merge by mergekit-yaml's run_merge, deleted once scored;
    finished points are cached in OUT, so running the same command again resumes. Options after OUT that
    compare does not take are mergekit-yaml's (e.g. --random-seed, --lazy-unpickle).
    """
    from mergekit_ota.compare.run import CompareOptions, run_compare
    from mergekit_ota.errors import OTAError
    from mergekit_ota.progress import bar

    chosen = None if methods is None else tuple(m.strip() for m in methods.split(",") if m.strip())
    device = device or default_device()
    options = CompareOptions(
        methods=chosen,
        grids=grids,
        split=split,
        seed=seed,
        max_length=max_length,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        replicates=replicates,
        keep_merges=keep_merges,
        force=force,
    )

    def progress(total: int) -> Any:
        return bar(total=total, desc="compare", quiet=quiet, unit="point")

    def log(line: str) -> None:
        if not quiet:
            from tqdm import tqdm

            tqdm.write(line, file=sys.stderr)  # above the progress bar, where one is shown

    try:
        run_compare(
            config_file, data, out, options, merge_options(config_file, mergekit_yaml_args, device), log, progress
        )
    except OTAError as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"wrote {out}/report.md, results.json, best.yml")
