"""The `mergekit-ota` command."""

from __future__ import annotations

from click.testing import CliRunner

from mergekit_ota.cli.main import main


def test_help_lists_subcommands():
    """`mergekit-ota --help` lists its subcommands."""
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "demo" in result.output and "methods" in result.output


def test_methods_lists_every_parameter():
    """`mergekit-ota methods` prints both methods with each parameter of their specs."""
    from mergekit_ota.methods import METHODS

    result = CliRunner().invoke(main, ["methods"])
    assert result.exit_code == 0, result.output
    for method in METHODS:
        assert f"{method.spec.name}:" in result.output
        for parameter in method.spec.parameters:
            assert parameter.name in result.output


def test_demo_runs_end_to_end_and_refuses_foreign_dirs(tmp_path):
    """A short demo trains with the Trainer, exports curvature (full and rank-1) from its checkpoints, checks
    and merges with every method, writes report.md; --force never deletes a foreign dir."""
    from mergekit_ota.demo import merge_configs

    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--out", str(out), "--steps", "5"])
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    assert (out / "models" / "expert_a" / "exp_avg_sq.safetensors").is_file()
    assert (out / "stores" / "expert_b_rank1" / "exp_avg_sq.safetensors").is_file()
    for name in merge_configs("b", ["e"], ["s"]):
        assert f"| {name} |" in report
    assert "identical to the in-process run: True" in report

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    result = CliRunner().invoke(main, ["demo", "--out", str(foreign), "--force"])
    assert result.exit_code != 0
    assert (foreign / "precious.txt").read_text() == "keep me"
    # an earlier demo's directory without --force: one line that names --force, no traceback
    result = CliRunner().invoke(main, ["demo", "--out", str(out), "--steps", "5"])
    assert result.exit_code == 1 and "--force" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
