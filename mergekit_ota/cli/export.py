"""``mergekit-ota export SOURCE OUT``: an optimizer checkpoint's second moments -> a curvature store."""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional, Tuple

import click

from mergekit_ota.cli.store_options import compress_option, force_option, shard_size_option
from mergekit_ota.export import SOURCE_KINDS

if TYPE_CHECKING:  # heavy imports stay inside the command
    from mergekit_ota.export.pipeline import ExportResult


def _bytes(value: float) -> str:
    from mergekit_ota.cli.inspect import human_bytes

    return human_bytes(value)


_SHAPES_SHOWN = 4


def _names_lines(result: "ExportResult") -> List[str]:
    """How the names were found: exact (saved with each state), or which the shapes verify and which rest on order."""
    from mergekit_ota.export.mapping import describe_names
    from mergekit_ota.store_format import MAPPING_BY_ORDER, metadata_names

    source, meta = result.source, result.metadata
    evidence, count = source.evidence, len(source.items)
    if evidence is None:  # a store as the source: its metadata tells how its names were first found
        line = f"names: {source.mapping}"
        if meta.get("mapping_basis"):
            line += f"; first found by {meta['mapping_basis']}"
        by_order = len(metadata_names(meta, MAPPING_BY_ORDER, source.path))  # checked when the store was opened
        if by_order:
            line += f", {by_order} of them by the parameter order alone (metadata 'mapping_by_order')"
        return [line]
    if evidence.exact:
        return [f"names: {source.mapping}; exact for all {count} parameters (each state was saved with its name)"]
    lines = [f"names: {count} parameters matched by {source.mapping}"]
    verified, by_order = len(evidence.by_shape), len(evidence.by_order)
    if not by_order:
        return lines + [f"names: shapes confirm all {count} uniquely (no two parameters of the model share a shape)"]
    shown = [
        f"{len(names)} x {list(shape)}: {describe_names(names)}" for shape, names in evidence.same_shape[:_SHAPES_SHOWN]
    ]
    more = len(evidence.same_shape) - _SHAPES_SHOWN
    return lines + [
        f"names: shapes confirm {verified} of {count} uniquely; {by_order} rely on the parameter order of that rule, "
        f"since another parameter has the same shape (listed in the store's metadata 'mapping_by_order'); "
        f"same-shape groups: "
        + "; ".join(shown)
        + (f"; ... ({more} more shape{'s' if more > 1 else ''})" if more > 0 else "")
    ]


def render_summary(result: "ExportResult") -> str:
    """What was exported from where, how names were found (exact, verified by shape, or by order), sizes,
    and what has no state."""
    source, meta = result.source, result.metadata
    settings = "  ".join(
        f"{k} {meta[k]}" for k in ("beta2", "step", "bias_corrected", "dtype", "compression") if k in meta
    )
    lines = [
        f"exported {result.tensors} tensors ({result.rank1} rank-1, {result.tensors - result.rank1} full) "
        f"from {source.kind} {source.path}",
        f"optimizer {source.optimizer}  {settings}",
        *_names_lines(result),
        f"wrote {result.store} ({len(result.files)} file{'s' if len(result.files) > 1 else ''}): "
        f"{_bytes(result.bytes_on_disk)} ({result.bytes_on_disk:,} bytes); as full float32 "
        f"{_bytes(result.full_fp32_bytes)} ({result.full_fp32_bytes:,} bytes): ratio {result.ratio:.4f}"
        + (f", {1 / result.ratio:.1f}x smaller" if result.ratio < 1 else ""),
    ]
    if source.without_state:
        shown = ", ".join(source.without_state[:8]) + (", ..." if len(source.without_state) > 8 else "")
        lines.append(
            f"{len(source.without_state)} model parameter(s) have no optimizer state (frozen or never updated; "
            f"recorded in the store's metadata 'parameters_without_state'): {shown}"
        )
    if source.missing:
        from mergekit_ota.store_format import MISSING, complete_command

        lines.append(
            f"PARTIAL STORE: {len(source.missing)} parameter(s) have no curvature ("
            + "; ".join(sorted(set(source.missing.values())))
            + f"), e.g. {', '.join(list(source.missing)[:3])}; recorded in the store's metadata '{MISSING}'. A merge "
            f"refuses this store until it is completed with the data Fisher of exactly those tensors: "
            f"`{complete_command(result.store)}` (MODEL: the expert's weights; DATA: text like its training data)"
        )
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)


@click.command("export")
@click.argument("source", type=click.Path(exists=True))
@click.argument("out", type=click.Path())
@click.option(
    "--model",
    "model",
    type=click.Path(exists=True),
    default=None,
    help="Model directory (config.json) the optimizer trained; default: SOURCE if it holds config.json. "
    "Needed to name an index-keyed state; otherwise used to verify names and shapes.",
)
@click.option(
    "--source-kind", type=click.Choice(SOURCE_KINDS), default=None, help="Force the source kind (default: detect)."
)
@compress_option
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16"]),
    default="float32",
    show_default=True,
    help="Stored dtype (bfloat16 halves the size and rounds each value by up to 0.4%).",
)
@click.option(
    "--bias-correct", is_flag=True, help="Divide by 1 - beta2**step (each parameter's step, its group's beta2)."
)
@shard_size_option
@click.option(
    "--frozen",
    multiple=True,
    metavar="GLOB",
    help="Parameter(s) frozen during training (glob, repeatable): resolves an index-keyed state that is otherwise "
    "ambiguous.",
)
@click.option(
    "--beta2",
    type=float,
    default=None,
    help="Adam beta2 where the source records none (for --bias-correct and metadata).",
)
@click.option("--step", type=int, default=None, help="Optimizer step where the source records none.")
@force_option
@click.option("--quiet", "-q", is_flag=True, help="No progress bar (it shows only on a terminal anyway).")
def export_command(
    source: str,
    out: str,
    model: Optional[str],
    source_kind: Optional[str],
    compress: str,
    dtype: str,
    bias_correct: bool,
    shard_size: Optional[str],
    frozen: Tuple[str, ...],
    beta2: Optional[float],
    step: Optional[int],
    force: bool,
    quiet: bool,
) -> None:
    """Export Adam's second moments (exp_avg_sq) from SOURCE into the curvature store OUT.

    SOURCE: a Trainer/accelerate checkpoint directory (optimizer.pt / optimizer.bin), a torch.save
    of an optimizer state dict, a torch.distributed.checkpoint (FSDP) directory, a DeepSpeed
    universal checkpoint, or an existing store (to re-shard, convert or compress it).
    Adafactor's factored states are exported as rank-1 pairs.

    OUT: a .safetensors file, a .safetensors.index.json (shards next to it), or a new
    directory (exp_avg_sq.safetensors, or shards + exp_avg_sq.safetensors.index.json).
    Give it to a merge as `curvature: OUT`, or write it as MODEL_DIR/exp_avg_sq.safetensors.
    """
    from mergekit_ota.errors import OTAError
    from mergekit_ota.export.options import ExportOptions
    from mergekit_ota.export.pipeline import BF16_WARNING, export_curvature
    from mergekit_ota.progress import bar

    try:
        options = ExportOptions.parse(
            source_kind=source_kind,
            model=model,
            compress=compress,
            dtype=dtype,
            bias_correct=bias_correct,
            shard_size=shard_size,
            frozen=frozen,
            beta2=beta2,
            step=step,
            force=force,
        )
        if options.dtype == "bfloat16":
            click.echo(BF16_WARNING, err=True)

        def progress(items, total):  # type: ignore[no-untyped-def]
            return bar(items, total=total, desc="export", quiet=quiet)

        result = export_curvature(source, out, options, progress)
    except OTAError as error:
        raise click.ClickException(str(error)) from None
    click.echo(render_summary(result))
