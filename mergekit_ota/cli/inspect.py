"""``mergekit-ota inspect STORE [STORE ...]``: what curvature stores hold, tensor by tensor, and, for
several, their curvature scales side by side."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, List, Optional, Sequence

import click

if TYPE_CHECKING:  # heavy imports stay inside the command
    from mergekit_ota.curvature.contents import StoreReport

SORT_KEYS = ("store", "name", "size", "max", "problems")  # StoreReport.sorted


def human_bytes(value: float) -> str:
    """``1536 -> '1.5 KiB'`` (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _number(value: Optional[float], approximate: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:.3e}{'~' if approximate else ''}"


def _short(value: object, limit: int = 120) -> str:
    """A metadata value for the table: long ones (e.g. a JSON list of names) cut, with their length."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters; --json shows all)"


def aligned(columns: Sequence[str], rows: Sequence[Sequence[str]], first_numeric: int) -> List[str]:
    """A header line and one line per row, columns padded to their widest cell (right-aligned from
    column ``first_numeric`` on)."""
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        padded = (c.rjust(w) if i >= first_numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return "  ".join(padded).rstrip()

    return [line(columns)] + [line(r) for r in rows]


def render_scales(reports: Sequence["StoreReport"]) -> str:
    """The side-by-side curvature scale of several stores (:func:`~mergekit_ota.curvature.contents.scale_table`)."""
    from mergekit_ota.curvature.contents import SCALE_NOTE, scale_table

    columns, rows = scale_table([r.scale for r in reports if r.scale is not None])
    return "\n".join(["curvature scale, side by side", "", *aligned(columns, rows, first_numeric=1), "", SCALE_NOTE])


def render_table(report: "StoreReport") -> str:
    """The report as aligned text: header fields, one row per tensor, totals, problems."""
    lines = [f"store   {report.path}  ({len(report.files)} file{'s' if len(report.files) > 1 else ''})"]
    lines.append("header  " + "  ".join(f"{k}: {v if v is not None else '-'}" for k, v in report.header().items()))
    other = report.other_metadata()
    if other:
        lines.append("other   " + "  ".join(f"{k}: {_short(v)}" for k, v in other.items()))
    lines += report.provenance_lines()
    estimators = report.estimator_of()
    columns = ("tensor", "shape", "dtype", "storage", "min", "median", "max", "zeros", "NaN", "Inf", "neg")
    columns += ("source",) if estimators else ()
    rows = []
    for t in report.tensors:
        storage = t.compression if t.stats_of != "factors" else "rank1*"
        rows.append(
            (
                t.name,
                "x".join(map(str, t.shape)) or "()",
                t.dtype,
                storage,
                _number(t.stats.min),
                _number(t.stats.median, not t.stats.median_exact),
                _number(t.stats.max),
                str(t.stats.zeros),
                str(t.stats.nan),
                str(t.stats.inf),
                str(t.stats.negative),
            )
            + ((estimators.get(t.name, "?"),) if estimators else ())
        )
    lines += ["", *aligned(columns, rows, first_numeric=4), ""]
    ratio = report.compression_ratio
    lines.append(
        f"{len(report.tensors)} tensors ({report.count('full')} full, {report.count('rank1')} rank-1) covering "
        f"{report.parameters:,} parameters; {human_bytes(report.bytes_on_disk)} on disk, "
        f"{human_bytes(report.full_fp32_bytes)} as full float32"
        + (f": compression {ratio:.2f}x" if ratio is not None else "")
    )
    lines.append(
        f"min/median/max over the finite values; median = lower median, exact for tensors of up to "
        f"{report.exact_median_limit:,} values and for rank-1 tensors (from the factors); '~' marks the median "
        f"of a deterministic strided sample of ~{report.sample_size:,} values."
    )
    if any(t.stats_of == "factors" for t in report.tensors):
        lines.append("rank1*: invalid factors (NaN/Inf/negative); the row shows the stored factors' values.")
    problems = report.problems
    if problems:
        bad = sum(bool(t.problems) for t in report.tensors)
        lines.append(f"\n{bad} tensor(s) hold values or dtypes a merge refuses:")
        lines += [f"  - {p}" for p in problems]
    else:
        lines.append("no NaN, Inf, negative or non-float values: a merge will accept every tensor.")
    return "\n".join(lines)


@click.command("inspect", short_help="Per-tensor statistics and totals of curvature stores; scales side by side.")
@click.argument("stores", nargs=-1, required=True, type=click.Path(exists=True), metavar="STORE [STORE ...]")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--sort", type=click.Choice(SORT_KEYS), default="store", show_default=True, help="Row order.")
@click.option(
    "--exact-median-limit",
    type=click.IntRange(min=1),
    default=None,
    help="Largest tensor (values) whose median is exact; larger ones use a strided sample.  [default: 16777216]",
)
@click.option(
    "--sample-size", type=click.IntRange(min=1), default=None, help="Values in a median sample.  [default: 1048576]"
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar (it shows only on a terminal anyway).")
def inspect_command(
    stores: Sequence[str],
    as_json: bool,
    sort: str,
    exact_median_limit: Optional[int],
    sample_size: Optional[int],
    quiet: bool,
) -> None:
    """Show what a curvature store holds: per tensor its shape, dtype, storage (full / rank-1)
    and min / median / max, zeros, NaN, Inf and negative counts; totals and header metadata.

    STORE is a .safetensors file, a .safetensors.index.json, or a directory holding
    exp_avg_sq.safetensors[.index.json]. Tensors are read one at a time (by blocks of
    rows); rank-1 tensors are described exactly from their factors. Values a merge
    would refuse are reported, not raised.

    Given several stores (one per expert), each is shown, then their curvature scales
    side by side: mean and median of v over all its tensors, step, beta2 and bias factor
    1 - beta2**step from the metadata, and each mean over the smallest. Each store is
    still read once.
    """
    from mergekit_ota.curvature.contents import inspect_store, scale_json
    from mergekit_ota.curvature.locate import locate_store
    from mergekit_ota.curvature.store import CurvatureStore
    from mergekit_ota.errors import CurvatureError
    from mergekit_ota.export.detect import export_hint
    from mergekit_ota.math import stats
    from mergekit_ota.progress import bar

    compare = len(stores) > 1
    reports = []
    try:
        for store in stores:
            opened = CurvatureStore(locate_store(store, "", None, advice=export_hint))
            report = inspect_store(
                opened,
                exact_median_limit=exact_median_limit or stats.EXACT_MEDIAN_LIMIT,
                sample_size=sample_size or stats.SAMPLE_SIZE,
                progress=lambda items, total: bar(items, total=total, desc="Inspecting", quiet=quiet),
                scale=compare,
                label=store,
            )
            reports.append(report.sorted(sort))
    except CurvatureError as error:
        raise click.ClickException(str(error)) from None
    if not compare:
        (report,) = reports
        click.echo(json.dumps(report.to_json(), indent=2) if as_json else render_table(report))
        return
    if as_json:
        scales = [r.scale for r in reports if r.scale is not None]
        data = {"stores": [r.to_json() for r in reports], "scale_comparison": scale_json(scales)}
        click.echo(json.dumps(data, indent=2))
        return
    click.echo("\n\n".join([render_table(r) for r in reports] + [render_scales(reports)]))
