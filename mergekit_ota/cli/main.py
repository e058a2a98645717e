"""``mergekit-ota``: the plugin's own commands (merging itself runs in ``mergekit-yaml``)."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mergekit-ota")
def main() -> None:
    """Curvature-aware merging (OTA, FFG) for mergekit.

    Merge with the usual `mergekit-yaml config.yml OUT` and `merge_method: ota`
    or `ffg`; these commands help around it.
    """


@main.command("methods")
def methods_command() -> None:
    """List the merge methods this plugin adds, with every parameter and default.

    Reads the parameter table (mergekit_ota.catalog) and mergekit's version, without importing
    mergekit or torch; `mergekit-ota check` also verifies the mergekit internals the merge uses.
    """
    from mergekit_ota.catalog import CARDS
    from mergekit_ota.compat import SUPPORTED, mergekit_version, version_problem

    problem = version_problem()
    click.echo(f"mergekit {mergekit_version()} (supported: {SUPPORTED}.x){': ' + problem if problem else ''}")
    for card in CARDS:
        click.echo(f"\n{card.name}: {card.pretty_name}  [{card.reference_url}]")
        for parameter in card.parameters:
            scope = "per expert" if parameter.per_expert else "shared"
            click.echo(f"  {parameter.name:<16} {scope:<11} default {parameter.default!r:<10} {parameter.description}")


@main.command("demo")
@click.option("--out", "out_dir", default="demo_out", show_default=True, help="Working directory (created).")
@click.option("--steps", default=150, show_default=True, help="AdamW steps per expert.")
@click.option("--seed", default=0, show_default=True)
@click.option("--force", is_flag=True, help="Replace OUT if an earlier demo made it.")
@click.option("--quiet", "-q", is_flag=True, help="Print only the final table (no progress lines).")
def demo_command(out_dir: str, steps: int, seed: int, force: bool, quiet: bool) -> None:
    """Train a base and 2 experts, merge them with ota, ffg, ties, dare_ties, ... and compare."""
    from mergekit_ota.demo import run_demo
    from mergekit_ota.errors import OTAError

    try:
        run_demo(out_dir, steps=steps, seed=seed, force=force, quiet=quiet)
    except OTAError as error:  # e.g. OUT exists: one line that says what to do, not a traceback
        raise click.ClickException(str(error)) from error


from mergekit_ota.cli.check import check_command  # noqa: E402
from mergekit_ota.cli.inspect import inspect_command  # noqa: E402

main.add_command(inspect_command)
from mergekit_ota.cli.export import export_command  # noqa: E402

main.add_command(export_command)
main.add_command(check_command)

from mergekit_ota.cli.analyze import analyze_command  # noqa: E402
from mergekit_ota.cli.fisher import fisher_command  # noqa: E402

main.add_command(analyze_command)
main.add_command(fisher_command)

from mergekit_ota.cli.compare import compare_command  # noqa: E402

main.add_command(compare_command)

if __name__ == "__main__":
    main()
