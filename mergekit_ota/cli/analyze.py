"""``mergekit-ota analyze``: where did the experts learn? (a report directory)."""

from __future__ import annotations

import os
import re
import shlex
from typing import List, Optional, Tuple

import click


def _command_line(inputs: Tuple[str, ...], base: Optional[str], out_dir: str, options: List[str]) -> str:
    words = ["mergekit-ota", "analyze", *inputs]
    if base is not None:
        words[2:2] = ["--base", base]
    return shlex.join(words + ["--out", out_dir] + options)


def _plain(text: str) -> str:
    return re.sub(r"\*\*|`", "", text)


@click.command("analyze")
@click.argument("inputs", nargs=-1, metavar="[CONFIG.yml | EXPERT[:STORE] ...]")
@click.option("--base", default=None, help="Base model directory (with EXPERT[:STORE] arguments).")
@click.option("--out", "out_dir", required=True, help="Report directory to create (report.md, PNGs, metrics.json).")
@click.option(
    "--density",
    type=click.FloatRange(0.0, 1.0, min_open=True),
    default=None,
    help="FFG density d, fraction of entries kept; also the top-d of curvature compared between "
    "experts. Default 0.05, or each expert's density in CONFIG (given here, it overrides CONFIG).",
)
@click.option(
    "--density-scope",
    type=click.Choice(["tensor", "model"]),
    default=None,
    help="'tensor': keep d of every tensor; 'model': one saliency threshold per expert over all its "
    "tensors (the paper's setting; one extra read). Default: CONFIG's density_scope, else tensor.",
)
@click.option(
    "--rank-top",
    type=click.IntRange(min=0),
    default=6,
    show_default=True,
    help="SVD the masks of this many largest matrices (effective rank); 0 skips.",
)
@click.option(
    "--spearman-sample",
    type=click.IntRange(min=100),
    default=1_000_000,
    show_default=True,
    help="Most entries per tensor for Spearman's correlation (a fixed sample above that).",
)
@click.option("--html", "with_html", is_flag=True, help="Also write report.html with the figures embedded.")
@click.option("--force", is_flag=True, help="Replace OUT if an earlier analyze made it.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars (they show only on a terminal anyway).")
def analyze_command(
    inputs: Tuple[str, ...],
    base: Optional[str],
    out_dir: str,
    density: Optional[float],
    density_scope: Optional[str],
    rank_top: int,
    spearman_sample: int,
    with_html: bool,
    force: bool,
    quiet: bool,
) -> None:
    """Where did the experts learn? Curvature similarity, FFG localisation and mask overlap.

    \b
      mergekit-ota analyze --base BASE EXPERT[:STORE] [EXPERT[:STORE] ...] --out DIR
      mergekit-ota analyze merge.yml --out DIR

    EXPERT is a model directory; its curvature store defaults to EXPERT/exp_avg_sq.safetensors.
    With a mergekit YAML config the base, experts and their curvature / density / threshold
    parameters come from the config. Streams one tensor at a time; writes DIR/report.md, PNG
    figures and metrics.json (every per-tensor number).
    """
    from mergekit_ota.analysis.collect import collect
    from mergekit_ota.analysis.findings import headline
    from mergekit_ota.analysis.inputs import open_inputs, request_from_arguments, request_from_config
    from mergekit_ota.analysis.output import StagedDirectory, check_out_dir
    from mergekit_ota.analysis.report import REPORT_MD, require_report_packages, write_report
    from mergekit_ota.errors import OTAError

    options = [f"--rank-top={rank_top}", f"--spearman-sample={spearman_sample}"]
    if density is not None:
        options.append(f"--density={density:g}")
    if density_scope is not None:
        options.append(f"--density-scope={density_scope}")
    if with_html:
        options.append("--html")
    settings = {"rank_top": rank_top, "spearman_sample": spearman_sample}
    try:
        require_report_packages(with_html)  # before reading anything: without them no report can be written
        check_out_dir(out_dir, force)
        if base is None:
            if len(inputs) != 1 or not os.path.isfile(inputs[0]):
                raise click.UsageError("give either --base BASE EXPERT[:STORE] ... or one mergekit CONFIG.yml")
            request = request_from_config(inputs[0], density=density, density_scope=density_scope, **settings)
        else:
            request = request_from_arguments(base, inputs, density=density, density_scope=density_scope, **settings)
        opened = open_inputs(request)
        with StagedDirectory(out_dir, force) as staging:
            analysis = collect(opened, quiet=quiet)
            write_report(analysis, staging, _command_line(inputs, base, out_dir, options), with_html)
    except OTAError as error:
        raise click.ClickException(str(error)) from None
    for line in headline(analysis):
        click.echo("- " + _plain(line))
    click.echo(f"Report: {os.path.join(out_dir, REPORT_MD)}")
