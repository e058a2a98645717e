"""The `mergekit-ota` command."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from mergekit_ota.cli.main import main


def test_help_lists_subcommands():
    """`mergekit-ota --help` lists its subcommands."""
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "demo" in result.output and "methods" in result.output


def test_methods_lists_every_parameter():
    """`mergekit-ota methods` prints both methods with each parameter of the specs mergekit sees, with its
    scope and default (the catalog it reads is the one the mergekit specs are built from)."""
    from mergekit_ota.methods import METHODS

    result = CliRunner().invoke(main, ["methods"])
    assert result.exit_code == 0, result.output
    for method in METHODS:
        section = result.output.split(f"\n{method.spec.name}: ", 1)[1].split("\n\n", 1)[0]
        assert method.spec.pretty_name in section
        lines = {line.split()[0]: line for line in section.splitlines()[1:]}
        assert set(lines) == {p.name for p in method.spec.parameters}
        for parameter in method.spec.parameters:
            scope = "per expert" if parameter.scope.value != "shared" else "shared"
            assert f" {scope} " in lines[parameter.name] and f"default {parameter.default!r}" in lines[parameter.name]


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["methods"],
        *([c, "--help"] for c in ("check", "export", "inspect", "fisher", "analyze", "demo", "methods")),
    ],
)
def test_help_and_methods_start_without_torch_or_mergekit(argv):
    """Help texts and `methods` import neither torch nor mergekit (each costs seconds at start-up)."""
    code = (
        "import sys\nfrom mergekit_ota.cli.main import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
        "print('IMPORTED', 'torch' in sys.modules, 'mergekit' in sys.modules)" % (argv,)
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "IMPORTED False False", out


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


def test_every_long_running_command_takes_q_and_quiet():
    """check, export, inspect, analyze, demo and fisher all take `-q` and `--quiet` (the same spelling everywhere)."""
    for name in ("check", "export", "inspect", "analyze", "demo", "fisher"):
        options = {opt for param in main.commands[name].params for opt in getattr(param, "opts", [])}
        assert {"-q", "--quiet"} <= options, name


def test_progress_bars_show_on_a_terminal_only_and_never_under_quiet(monkeypatch):
    """A bar writes to a terminal; into a log file (stderr not a tty) or under -q it is disabled."""
    import io

    from mergekit_ota.progress import bar

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert bar(range(3), desc="log").disable
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert not bar(range(3), desc="terminal").disable
    assert bar(range(3), desc="terminal", quiet=True).disable
