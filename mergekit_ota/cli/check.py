"""``mergekit-ota check CONFIG``: preflight an ota/ffg merge config (exit 0 ok, 1 problems, 2 usage)."""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple

import click

if TYPE_CHECKING:  # heavy imports stay inside the command
    from mergekit_ota.graph.preflight import CheckReport

EXIT_PROBLEMS = 1
# mergekit-yaml options that change what the merge reads or how it is planned: check uses them; the others
# (device, threads, shard size, card, tokenizer copy, ...) change only how the merge runs and are ignored
PLANNING_OPTIONS = (
    "trust_remote_code",
    "allow_crimes",
    "unsafe_truncate_embeddings",
    "transformers_cache",
    "lora_merge_cache",
    "lora_merge_dtype",
)
_NO_OUT = "\x00no-output-path"  # stands in for a missing OUT_PATH while mergekit-yaml's parser runs


def mergekit_yaml_arguments(config_file: str, rest: Sequence[str]) -> Tuple[Any, Optional[str], List[str], List[str]]:
    """``(MergeOptions, OUT_PATH or None, ignored options, run-time problems)`` of
    ``mergekit-yaml CONFIG_FILE [OUT_PATH] REST...``, parsed by mergekit-yaml's own command line (so check
    accepts exactly what it accepts).

    The MergeOptions keep the :data:`PLANNING_OPTIONS` given (``quiet`` set); every other option given is
    named in the ignored list (as ``--flag``); the problems are those of every option given whose run-time
    precondition fails here (:func:`mergekit_ota.devices.merge_option_problems`: ``--cuda`` without CUDA).
    Raises :class:`click.UsageError` where mergekit-yaml would.
    """
    from mergekit.options import MergeOptions
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    from mergekit_ota.devices import merge_option_problems

    def parse(argv: List[str]) -> dict:
        with mergekit_yaml.make_context("mergekit-yaml", argv) as ctx:
            return dict(ctx.params)

    try:
        try:
            params = parse([config_file, *rest])
        except click.MissingParameter as error:
            if error.param is None or error.param.name != "out_path":
                raise
            params = parse([config_file, *rest, _NO_OUT])
    except click.UsageError as error:
        raise click.UsageError(f"as mergekit-yaml would: {error.format_message()}") from None
    out_path = None if params.get("out_path") == _NO_OUT else params.get("out_path")
    defaults = parse([config_file, _NO_OUT])  # what mergekit-yaml sets when no option is given
    given = {k: v for k, v in params.items() if k in MergeOptions.model_fields and v != defaults.get(k)}
    ignored = [f"--{k.replace('_', '-')}" for k in given if k not in PLANNING_OPTIONS and k != "quiet"]
    options = MergeOptions(**{k: v for k, v in given.items() if k in PLANNING_OPTIONS}, quiet=True)
    return options, out_path, ignored, merge_option_problems(MergeOptions(**given))


def render_report(report: "CheckReport", quiet: bool = False) -> str:
    """Problems (each naming file, tensor and what was expected) or a short OK summary; then warnings.

    ``quiet``: only the FAILED line with its problems, and the warnings (nothing at all when OK without any)."""
    from mergekit_ota.errors import group_problems

    scan = "every value" if report.full_scan else f"a sample of up to {report.sample:,} values per tensor"
    lines = []
    warnings = [f"  warning: {w}" for w in report.warnings]
    if quiet:
        if not report.problems:
            return "\n".join(warnings)
        grouped = group_problems(report.problems)
        return "\n".join(
            [f"FAILED  {report.config} (merge_method {report.method}): {len(grouped)} problem(s)"]
            + [f"  - {p}" for p in grouped]
            + warnings
        )
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
        untouched = (
            f"; {use.untouched} weight(s) its LoRA adapter leaves as the base's get curvature 0 (task vector 0)"
            if use.untouched
            else ""
        )
        lines.append(
            f"  store {use.path}  [{', '.join(use.experts)}]: {use.tensors} tensors read "
            f"({use.full} full, {use.rank1} rank-1), {use.scanned:,} of {use.values:,} stored values scanned"
            + untouched
        )
    lines.append(
        f"  values scanned for NaN/Inf/negative: {scan}"
        + ("" if report.full_scan else " (--full-scan reads all; the merge itself checks every value it reads)")
    )
    ran_pass = any(n.startswith("density: auto: check ran") for n in report.notes)
    lines.append(
        "  nothing was merged or written" + (" (density: auto: only the saliency pass ran)" if ran_pass else "")
    )
    return "\n".join(lines)


@click.command(
    "check",
    short_help="Preflight an ota/ffg merge config: stores, tensors, shapes, values.",
    context_settings={"ignore_unknown_options": True},
)
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
@click.argument("mergekit_yaml_args", nargs=-1, type=click.UNPROCESSED, metavar="[OUT_PATH] [MERGEKIT-YAML OPTIONS]")
@click.option("--full-scan", is_flag=True, help="Scan every curvature value (reads every byte of every store).")
@click.option(
    "--sample",
    type=click.IntRange(min=1),
    default=None,
    help="Values scanned per curvature tensor without --full-scan.  [default: 65536]",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="Print only problems and warnings (nothing when all is well).")
def check_command(
    config_file: str,
    mergekit_yaml_args: Tuple[str, ...],
    full_scan: bool,
    sample: Optional[int],
    as_json: bool,
    quiet: bool,
) -> None:
    """Check an ota/ffg merge config before merging: plan it exactly as
    `mergekit-yaml CONFIG_FILE OUT_PATH` would (nothing executed or written), then
    check that every expert's curvature store covers every tensor the merge reads
    (slices, aliases and tied weights resolved as for the weights) with the right
    shape and dtype, and that its values are finite and non-negative.

    Put `check` in front of a mergekit-yaml line: it takes the same OUT_PATH and
    options. OUT_PATH, when given, is checked as the merge would check it (it must
    be new, empty, or an earlier merge); --trust-remote-code, --allow-crimes,
    --unsafe-truncate-embeddings, --transformers-cache, --lora-merge-cache and
    --lora-merge-dtype change planning and are used; the other options (device,
    threads, shard size, ...) change only how the merge runs and are ignored, with
    a note.

    Prints every problem at once and exits 1, or prints a short summary and exits 0
    (2: usage error). Relative paths in the config are resolved from the current
    directory, as by mergekit-yaml.
    """
    from mergekit_ota.curvature.scan import DEFAULT_SAMPLE
    from mergekit_ota.errors import ConfigError, OutputError
    from mergekit_ota.graph.preflight import CheckReport, NotACurvatureMerge, check_config, read_config
    from mergekit_ota.integration import merge_output
    from mergekit_ota.io.paths import regular_file

    try:
        regular_file(config_file, "merge config", ConfigError)  # mergekit-yaml's parser opens it: a FIFO blocks
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    options, out_path, ignored, run_problems = mergekit_yaml_arguments(config_file, mergekit_yaml_args)
    sample = sample or DEFAULT_SAMPLE
    unreadable: List[str] = []  # parameter values mergekit's parser refuses, one line each (the rest is checked)
    try:
        config = read_config(config_file, unreadable)
        report = check_config(config, options, source=config_file, full_scan=full_scan, sample=sample)
    except NotACurvatureMerge as error:  # exit 2, after showing what the parameter names gave
        if as_json or error.report.warnings:
            click.echo(json.dumps(error.report.to_json(), indent=2) if as_json else render_report(error.report))
        raise click.UsageError(str(error)) from None
    except ConfigError as error:
        report = CheckReport(config=config_file, method="?", problems=(str(error),), full_scan=full_scan, sample=sample)
    if unreadable:  # config-level: first (the planner reads such a value as reported, and does not repeat it)
        report = dataclasses.replace(report, problems=tuple(unreadable) + report.problems)
    extra_problems: List[str] = list(run_problems)
    extra_notes: List[str] = []
    if out_path is not None:
        try:
            merge_output(out_path).check()
        except OutputError as error:
            extra_problems.append(f"output {out_path}: {error}")
    if ignored:
        extra_notes.append(f"ignored (they change how the merge runs, not what it reads): {', '.join(ignored)}")
    if extra_problems or extra_notes:
        report = dataclasses.replace(
            report, problems=report.problems + tuple(extra_problems), notes=report.notes + tuple(extra_notes)
        )
    text = json.dumps(report.to_json(), indent=2) if as_json else render_report(report, quiet)
    if text:
        click.echo(text)
    if not report.ok:
        click.get_current_context().exit(EXIT_PROBLEMS)
