"""``mergekit-ota fisher MODEL DATA OUT``: curvature for an expert without optimizer state, from calibration data."""

from __future__ import annotations

import os
from typing import Optional

import click

from mergekit_ota.cli.store_options import compress_option, force_option, shard_size_option


@click.command("fisher", short_help="Diagonal Fisher of a model on calibration data, as a curvature store.")
@click.argument("model")
@click.argument("data", type=click.Path(exists=True))
@click.argument("out", type=click.Path())
@click.option(
    "--samples",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="Calibration samples used (the first ones, in file order).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Rows per mini-batch whose mean-loss gradient is squared (match the training's effective batch "
    "to be on Adam's scale; 1 = the per-example estimator).",
)
@click.option("--per-example", is_flag=True, help="The per-example estimator (the same as --batch-size 1).")
@click.option(
    "--micro-batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Rows per forward/backward (gradients accumulate over a mini-batch before squaring).  [default: --batch-size]",
)
@click.option(
    "--max-length", type=click.IntRange(min=2), default=512, show_default=True, help="Tokens kept per sample."
)
@click.option("--device", default="cpu", show_default=True, help="torch device (cpu, cuda, cuda:1, ...).")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16"]),
    default="float32",
    show_default=True,
    help="The model's dtype while computing (the accumulators are float32).",
)
@click.option(
    "--only-missing",
    "only_missing",
    metavar="STORE",
    type=click.Path(exists=True),
    default=None,
    help="Complete the partial store STORE (export of a Muon-like run, whose matrices kept momentum only): the "
    "Fisher of exactly its missing tensors, put on its scale, and its own tensors as they are, as one new store.",
)
@compress_option
@shard_size_option
@force_option
@click.option("--quiet", "-q", is_flag=True, help="No progress bar (it shows only on a terminal anyway).")
def fisher_command(
    model: str,
    data: str,
    out: str,
    samples: int,
    batch_size: int,
    per_example: bool,
    micro_batch_size: Optional[int],
    max_length: int,
    device: str,
    dtype: str,
    compress: str,
    only_missing: Optional[str],
    shard_size: Optional[str],
    force: bool,
    quiet: bool,
) -> None:
    """Compute MODEL's empirical diagonal Fisher on DATA and write it to OUT as a curvature store, for an
    expert whose optimizer state is gone (or to check the Adam proxy).

    MODEL: a local model directory, or BASE+ADAPTER (mergekit's LoRA syntax): the PEFT adapter folded into
    the base as mergekit folds it, the Fisher taken of the weights it changes only (the others are listed
    in the store as untouched: curvature 0 in the merge); put OUT in the adapter's directory.

    F = (1/B) sum_b (grad L_b)**2 over B mini-batches of --batch-size rows, L_b the mini-batch's mean
    token loss: on the scale of Adam's bias-corrected exp_avg_sq. DATA: JSONL of {"text": ...}, of
    {"prompt": ..., "completion": ...} (loss on the completion only) or of chats {"messages": [...]}
    (rendered with MODEL's chat template, loss on assistant tokens only), a text file, or a directory of
    text files. OUT: as for export (a .safetensors file, an index, or a
    new directory); use it as `curvature: OUT`.

    With --only-missing STORE: MODEL is the expert a partial STORE was exported from; OUT gets STORE's tensors
    and the Fisher of the tensors STORE lists as missing, times c = the median over STORE's tensors of
    mean(v) / mean(F), so that the store has one scale (docs/export.md, "Completing a partial store").
    """
    from mergekit_ota.cli.export import render_summary
    from mergekit_ota.errors import OTAError
    from mergekit_ota.fisher import FisherOptions, fisher_store
    from mergekit_ota.progress import bar

    if "+" not in model and not os.path.isdir(model):
        raise click.BadParameter(f"Directory '{model}' does not exist.", param_hint="'MODEL'")
    given = click.get_current_context().get_parameter_source("batch_size") == click.core.ParameterSource.COMMANDLINE
    if per_example and given and batch_size != 1:
        raise click.UsageError(f"--per-example is --batch-size 1; it contradicts --batch-size {batch_size}")
    options = FisherOptions(
        samples=samples,
        batch_size=1 if per_example else batch_size,
        micro_batch_size=micro_batch_size,
        max_length=max_length,
        device=device,
        dtype=dtype,
        compress=compress,
        shard_size=shard_size,
        force=force,
        only_missing=only_missing,
    )
    progress_bar = None

    def progress(total: int):  # type: ignore[no-untyped-def]
        nonlocal progress_bar
        progress_bar = bar(total=total, desc="fisher", quiet=quiet, unit="sample")
        return progress_bar.update

    try:
        result = fisher_store(model, data, out, options, progress)
    except OTAError as error:
        raise click.ClickException(str(error)) from error
    finally:
        if progress_bar is not None:
            progress_bar.close()
    click.echo(render_summary(result))
