"""``mergekit-ota check CONFIG``: preflight an ota/ffg merge config (exit 0 ok, 1 problems, 2 usage)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Optional

import click

if TYPE_CHECKING:  # heavy imports stay inside the command
    from mergekit_ota.graph.preflight import CheckReport

EXIT_PROBLEMS = 1


def render_report(report: "CheckReport") -> str:
    """Problems (each naming file, tensor and what was expected) or a short OK summary; then warnings."""
    from mergekit_ota.errors import group_problems

    scan = "every value" if report.full_scan else f"a sample of up to {report.sample:,} values per tensor"
    lines = []
    warnings = [f"  warning: {w}" for w in report.warnings]
    if report.names_only:
        lines.append(
            f"NOT CHECKED  {report.config} (merge_method {report.method} does not use curvature): "
            f"only parameter names were checked, {len(report.warnings)} warning(s)"
        )
        return "\n".join(lines + warnings)
    if report.problems:
        grouped = group_problems(report.problems)
        lines.append(f"FAILED  {report.config} (merge_method {report.method}): {len(grouped)} problem(s)")
        lines += [f"  - {p}" for p in grouped]
    else:
        lines.append(f"OK  {report.config} (merge_method {report.method}): ready to merge")
    lines += warnings
    if not report.output_tensors:
        lines.append("  the merge could not be planned past this; fix the above and check again")
        return "\n".join(lines)
    lines.append(
        f"  experts: {len(report.experts)}   stores: {len(report.stores)}   output tensors planned: "
        f"{report.output_tensors} ({report.with_curvature} with curvature)"
    )
    lines += [f"  {note}" for note in report.notes]
    for use in report.stores:
        lines.append(
            f"  store {use.path}  [{', '.join(use.experts)}]: {use.tensors} tensors read "
            f"({use.full} full, {use.rank1} rank-1), {use.scanned:,} of {use.values:,} stored values scanned"
        )
    lines.append(
        f"  values scanned for NaN/Inf/negative: {scan}"
        + ("" if report.full_scan else " (--full-scan reads all; the merge itself checks every value it reads)")
    )
    ran_pass = any(n.startswith("density: auto: check ran") for n in report.notes)
    lines.append("  nothing was merged or written" + (" (density: auto: only the saliency pass ran)" if ran_pass else ""))
    return "\n".join(lines)


@click.command("check", short_help="Preflight an ota/ffg merge config: stores, tensors, shapes, values.")
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--full-scan", is_flag=True, help="Scan every curvature value (reads every byte of every store).")
@click.option(
    "--sample", type=click.IntRange(min=1), default=None,
    help="Values scanned per curvature tensor without --full-scan.  [default: 65536]",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--trust-remote-code", is_flag=True, help="As for mergekit-yaml.")
@click.option("--allow-crimes", is_flag=True, help="As for mergekit-yaml.")
@click.option("--unsafe-truncate-embeddings", is_flag=True, help="As for mergekit-yaml.")
@click.option("--transformers-cache", default=None, help="As for mergekit-yaml.")
@click.option("--lora-merge-cache", default=None, help="As for mergekit-yaml.")
def check_command(
    config_file: str,
    full_scan: bool,
    sample: Optional[int],
    as_json: bool,
    trust_remote_code: bool,
    allow_crimes: bool,
    unsafe_truncate_embeddings: bool,
    transformers_cache: Optional[str],
    lora_merge_cache: Optional[str],
) -> None:
    """Check an ota/ffg merge config before merging: plan it exactly as
    `mergekit-yaml CONFIG_FILE OUT` would (nothing executed or written), then
    check that every expert's curvature store covers every tensor the merge reads
    (slices, aliases and tied weights resolved as for the weights) with the right
    shape and dtype, and that its values are finite and non-negative.

    Prints every problem at once and exits 1, or prints a short summary and exits 0
    (2: usage error). Relative paths in the config are resolved from the current
    directory, as by mergekit-yaml. Pass the mergekit-yaml options that change planning.
    """
    from mergekit.options import MergeOptions

    from mergekit_ota.curvature.scan import DEFAULT_SAMPLE
    from mergekit_ota.errors import ConfigError
    from mergekit_ota.graph.preflight import CheckReport, NotACurvatureMerge, check_config, read_config

    options = MergeOptions(
        quiet=True,
        trust_remote_code=trust_remote_code,
        allow_crimes=allow_crimes,
        unsafe_truncate_embeddings=unsafe_truncate_embeddings,
        transformers_cache=transformers_cache,
        lora_merge_cache=lora_merge_cache,
    )
    sample = sample or DEFAULT_SAMPLE
    try:
        report = check_config(
            read_config(config_file), options, source=config_file, full_scan=full_scan, sample=sample
        )
    except NotACurvatureMerge as error:  # exit 2, after showing what the parameter names gave
        if as_json or error.report.warnings:
            click.echo(json.dumps(error.report.to_json(), indent=2) if as_json else render_report(error.report))
        raise click.UsageError(str(error)) from None
    except ConfigError as error:
        report = CheckReport(config=config_file, method="?", problems=(str(error),), full_scan=full_scan, sample=sample)
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else render_report(report))
    if not report.ok:
        click.get_current_context().exit(EXIT_PROBLEMS)
