"""Registration: `ota`/`ffg` reach unmodified mergekit after a regular and an editable install."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REGISTERED = (
    "from mergekit.merge_methods import registry;"
    "print(sorted(m.spec.name for m in registry.registered_methods() if m.spec.name in ('ota','ffg')))"
)


def _python(python: str, code: str, env: dict | None = None, cwd: str | None = None) -> str:
    result = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env, cwd=cwd or "/", check=True)
    return result.stdout.strip()


def test_import_registers_idempotently():
    """`mergekit_ota.install()` registers both methods; repeating registration changes nothing."""
    from mergekit.merge_methods import registry

    import mergekit_ota
    from mergekit_ota.methods import register_methods

    mergekit_ota.install()  # register ota/ffg and patch mergekit (whether or not the start-up hook is on)

    before = registry.registered_methods()
    register_methods()
    register_methods()
    assert registry.registered_methods() == before
    assert {"ota", "ffg"} <= {m.spec.name for m in before}


@pytest.mark.parametrize(
    "first",
    [
        "mergekit_ota.methods.settings",
        "mergekit_ota.methods",
        "mergekit_ota.graph.planner",
        "mergekit.plan",
        "mergekit_ota",
    ],
)
def test_methods_registered_whatever_is_imported_first(first):
    """Registration does not depend on import order: importing a submodule of ours that itself imports
    mergekit (so the hook fires mid-import) still leaves ota and ffg registered, without warnings."""
    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        f"    import {first}\n"
        "    import mergekit.merge_methods as m\n"
        "print(m.get('ota').spec.name, m.get('ffg').spec.name, [str(w.message) for w in caught if 'mergekit-ota' in "
        "str(w.message)])"
    )
    assert _python(sys.executable, code) == "ota ffg []"


def _throwaway_venv(tmp_path: Path, name: str) -> str:
    """A fresh venv that sees this environment's dependencies but not its .pth hooks."""
    venv = tmp_path / name
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    site = _python(python, "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    # A plain path line: the dependencies become importable, their .pth files are not run.
    Path(site, "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.mark.parametrize("editable", [False, True], ids=["regular", "editable"])
def test_fresh_process_after_install_sees_methods(tmp_path, editable):
    """After `pip install .` / `pip install -e .`, a fresh interpreter's mergekit registry has ota and ffg,
    its start-up imports neither torch nor mergekit, and MERGEKIT_OTA_DISABLE=1 switches the hook off."""
    python = _throwaway_venv(tmp_path, "venv")
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "demo_out", "__pycache__", ".*cache*"))
    subprocess.run(
        [
            python,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            *(["-e"] if editable else []),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    assert _python(python, REGISTERED) == "['ffg', 'ota']"
    assert _python(python, "import sys; print('torch' in sys.modules, 'mergekit' in sys.modules)") == "False False"
    env = dict(os.environ, MERGEKIT_OTA_DISABLE="1")
    assert _python(python, REGISTERED, env=env) == "[]"
    assert _python(python, "import mergekit_ota; mergekit_ota.install();" + REGISTERED, env=env) == "['ffg', 'ota']"


def test_startup_hook_never_raises(tmp_path):
    """If mergekit_ota cannot be imported, the hook warns and mergekit still imports."""
    python = _throwaway_venv(tmp_path, "venv")
    site = _python(python, "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    shutil.copy(ROOT / "mergekit_ota_autoload.py", site)
    shutil.copy(ROOT / "mergekit_ota.pth", site)
    broken = Path(site, "mergekit_ota")
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('broken on purpose')\n")
    code = textwrap.dedent(
        """
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            from mergekit.merge_methods import registry
        print(any('mergekit-ota' in str(w.message) for w in caught), len(registry.registered_methods()) > 5)
        """
    )
    assert _python(python, code) == "True True"


def test_unmodified_mergekit_yaml_entry_point_merges(tmp_path):
    """mergekit's own `mergekit-yaml` entry point (not our code) runs an `ota` config."""
    import yaml

    from mergekit_ota.testing import make_family

    family = make_family(str(tmp_path / "models"), n_experts=2)
    config = tmp_path / "ota.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": "ota",
                "base_model": family.base,
                "models": [{"model": e} for e in family.experts],
                "dtype": "float32",
            }
        )
    )
    out = tmp_path / "out"
    code = "import sys; from mergekit.scripts.run_yaml import main; sys.argv=['mergekit-yaml', *sys.argv[1:]]; main()"
    subprocess.run(
        [sys.executable, "-c", code, str(config), str(out), "--no-copy-tokenizer", "--quiet"],
        check=True,
        capture_output=True,
        cwd="/",
    )
    assert (out / "model.safetensors").is_file()


MERGEKIT_YAML = Path(sys.executable).parent / "mergekit-yaml"  # mergekit's console script, as pip installed it


def _mergekit_yaml(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "MERGEKIT_OTA_TRACEBACK"}
    return subprocess.run(
        [str(MERGEKIT_YAML), *args], capture_output=True, text=True, cwd=cwd, env=dict(environ, **env), timeout=300
    )


def _bad_parameter_config(tmp_path: Path, family) -> Path:
    """An ota config whose experts carry a misspelled parameter (a PreflightError while planning)."""
    import yaml

    config = tmp_path / "bad.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": "ota",
                "base_model": family.base,
                "models": [{"model": e, "parameters": {"densty": 0.5}} for e in family.experts],
                "dtype": "float32",
            }
        )
    )
    return config


def test_mergekit_yaml_ends_on_our_error_with_its_message_not_a_traceback(tmp_path, family):
    """Under the real `mergekit-yaml` script, a PreflightError (problems found while planning) and an OutputError
    (a foreign non-empty OUT) each end the run with exit status 1 and our message on stderr, no traceback."""
    assert MERGEKIT_YAML.is_file()
    config = _bad_parameter_config(tmp_path, family)
    result = _mergekit_yaml(str(config), str(tmp_path / "out"), "--no-copy-tokenizer", "--quiet", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "Error: mergekit-ota found 2 problem(s) before merging" in result.stderr, result.stderr
    assert "'densty'" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    config = tmp_path / "ok.yml"
    config.write_text(f"merge_method: ota\nbase_model: {family.base}\nmodels:\n  - model: {family.experts[0]}\n")
    result = _mergekit_yaml(str(config), str(foreign), cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"Error: {foreign} already exists and is not empty"), result.stderr


def test_mergekit_yaml_shows_the_traceback_on_request_and_for_other_errors(tmp_path, family):
    """MERGEKIT_OTA_TRACEBACK=1 shows our error with its traceback; an exception that is not ours (mergekit's
    own config validation) keeps mergekit's traceback. Both exit 1."""
    config = _bad_parameter_config(tmp_path, family)
    result = _mergekit_yaml(str(config), str(tmp_path / "out"), cwd=tmp_path, MERGEKIT_OTA_TRACEBACK="1")
    assert result.returncode == 1, result.stderr
    assert "Traceback (most recent call last)" in result.stderr
    assert "mergekit_ota.errors.PreflightError: mergekit-ota found 2 problem(s)" in result.stderr, result.stderr

    config = tmp_path / "invalid.yml"
    config.write_text("merge_method: ota\nmodels: 3\n")
    result = _mergekit_yaml(str(config), str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 1 and "Traceback (most recent call last)" in result.stderr, result.stderr
    assert "ValidationError" in result.stderr


def test_mergekit_yaml_hook_wraps_once_and_installs_no_global_hook():
    """The hook wraps mergekit-yaml's callback once however often it is applied, leaves sys.excepthook alone, and
    calling the callback's merge code directly (run_merge) still raises our error as itself."""
    import inspect

    import mergekit.scripts.run_yaml as run_yaml

    from mergekit_ota import integration

    wrapped = run_yaml.main.callback
    integration.install()
    integration.on_module("mergekit.scripts.run_yaml", run_yaml)
    assert run_yaml.main.callback is wrapped and getattr(wrapped, integration.PATCH_MARK, False)
    assert not getattr(wrapped.__wrapped__, integration.PATCH_MARK, False)
    assert inspect.unwrap(wrapped).__module__ == "mergekit.scripts.run_yaml"
    assert sys.excepthook is sys.__excepthook__


IMPORT_CHANGES_NOTHING = textwrap.dedent(
    """
    import inspect, json, sys
    import mergekit_ota, mergekit_ota.methods
    from mergekit.merge_methods import registry
    import mergekit.merge, mergekit.plan
    import mergekit.scripts.merge_raw_pytorch as raw
    import mergekit.scripts.run_yaml as run_yaml

    def state():
        planner = mergekit.plan.MergePlanner
        wrapped = [
            planner.plan_tensor, planner.__dict__["_plan"], planner.plan_to_disk, mergekit.merge.run_merge,
            mergekit.merge.generate_card, raw.plan_flat_merge, run_yaml.main.callback,
        ]
        return {
            "registered": sorted(m.spec.name for m in registry.registered_methods() if m.spec.name in ("ota", "ffg")),
            "methods": len(registry.registered_methods()),
            "patched": [getattr(f, "_mergekit_ota_patched", False) for f in wrapped],
            "twice": [getattr(inspect.unwrap(f, stop=lambda g: g is not f), "_mergekit_ota_patched", False)
                      for f in wrapped if f is not inspect.unwrap(f)],
            "finder": any(type(f).__name__ == "MergekitOTAFinder" for f in sys.meta_path),
        }

    after_import = state()
    mergekit_ota.install()
    after_install = state()
    mergekit_ota.install()
    print(json.dumps([after_import, after_install, state()]))
    """
)


def test_importing_changes_nothing_and_install_registers_and_patches_once():
    """With the start-up hook off, importing mergekit_ota and mergekit_ota.methods (which imports mergekit) registers
    nothing and patches nothing; mergekit_ota.install() then registers both methods and patches every mergekit
    internal, and a second install() changes nothing (no method registered or function wrapped twice)."""
    import json

    env = dict(os.environ, MERGEKIT_OTA_DISABLE="1")
    after_import, after_install, again = json.loads(_python(sys.executable, IMPORT_CHANGES_NOTHING, env=env))
    assert after_import["registered"] == [] and not any(after_import["patched"]) and not after_import["finder"]
    assert after_install["registered"] == ["ffg", "ota"] and all(after_install["patched"]) and after_install["finder"]
    assert after_install["methods"] == after_import["methods"] + 2
    assert not any(after_install["twice"])
    assert again == after_install


def test_late_steps_of_run_merge_say_which_step_runs():
    """run_merge's steps after the weights (mergekit's card, tokenizer and tagalong functions) are wrapped to say
    when they start, within an ota/ffg merge only: the error of a kept merge names the step from that, not from
    traceback file names."""
    import mergekit.merge

    import mergekit_ota
    from mergekit_ota import compat, integration

    mergekit_ota.install()
    for role in compat.RUN_MERGE_STEPS:
        assert compat.is_patched(compat.run_merge_step(mergekit.merge, role))

    def failing(*args, **kwargs):
        raise OSError("no space left on device")

    step = integration._announcing_step("tokenizer")(failing)
    with pytest.raises(OSError):
        step()
    assert integration._STEP.get() is None  # outside an ota/ffg merge a step announces nothing
    token = integration._STEP.set(integration.LATER_STEP)  # as _guard_run_merge does
    try:
        assert integration._late_step(None) == (integration.LATER_STEP, "")
        with pytest.raises(OSError):
            step()
        assert integration._late_step(None) == ("saving the tokenizer", "")
    finally:
        integration._STEP.reset(token)
