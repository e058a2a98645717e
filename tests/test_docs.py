"""What README.md and docs/ claim, checked: the generated parameter table, the links, the layout table, the
README's merge config and its demo table."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]

BEGIN = "<!-- BEGIN GENERATED: python -m mergekit_ota.catalog --markdown -->\n"
END = "<!-- END GENERATED -->"


def _prose(text: str) -> str:
    """``text`` without fenced code blocks (their lines blanked, so line numbers stay) and inline code spans."""
    lines, fenced = [], False
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            lines.append("")
        else:
            lines.append("" if fenced else re.sub(r"`[^`]*`", "``", line))
    return "\n".join(lines)


def _anchors(text: str) -> set:
    """GitHub's anchors of the headings of a Markdown page (lower case, punctuation dropped, spaces to hyphens)."""
    anchors, seen = set(), {}
    for line in _prose(text.replace("`", "")).split("\n"):
        match = re.match(r"#{1,6} (.*)", line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_parameter_table_is_generated_from_the_catalog():
    """docs/parameters.md's table is exactly what the catalog generates (its one home)."""
    from mergekit_ota.catalog import markdown_table

    text = (DOCS / "parameters.md").read_text(encoding="utf-8")
    assert BEGIN in text and END in text, f"docs/parameters.md lost its markers {BEGIN.strip()} ... {END}"
    table = text.split(BEGIN, 1)[1].split(END, 1)[0]
    assert table == markdown_table(), (
        "docs/parameters.md's parameter table differs from mergekit_ota/catalog.py: regenerate it with "
        "`python -m mergekit_ota.catalog --markdown` and paste the output between the markers"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    """Every relative link of README.md and docs/*.md names a file that exists, and an anchor its page has."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file.read_text(encoding="utf-8")):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_layout_table_matches_the_tree():
    """docs/layout.md has one row per module and package of mergekit_ota/, and every path it names exists."""
    rows = re.findall(r"^\| `([^`]+)` \|", (DOCS / "layout.md").read_text(encoding="utf-8"), flags=re.M)
    assert len(rows) == len(set(rows)), "docs/layout.md names a path twice"
    package = ROOT / "mergekit_ota"
    tree = set()
    for directory, subdirectories, files in os.walk(package):
        subdirectories[:] = [d for d in subdirectories if d != "__pycache__"]
        here = Path(directory).relative_to(ROOT).as_posix()
        if "__init__.py" in files:
            tree.add(here + "/")
        tree.update(f"{here}/{f}" for f in files if f.endswith(".py") and f != "__init__.py")
    listed = {row for row in rows if row.startswith("mergekit_ota/")}
    missing, stale = sorted(tree - listed), sorted(listed - tree)
    assert not missing and not stale, (
        f"docs/layout.md is out of date: add a row for {missing}, remove or rename the rows of {stale}"
    )
    absent = [row for row in rows if not (ROOT / row.rstrip("/")).exists()]
    assert not absent, f"docs/layout.md names paths that do not exist: {absent}"


def _readme_yaml() -> str:
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "README.md has no yaml block"
    return blocks[0]


def test_readme_config_checks_and_merges(tmp_path, monkeypatch):
    """README's minimal config, verbatim, passes `mergekit-ota check` and merges, on models laid out as it says."""
    import yaml
    from click.testing import CliRunner
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    import mergekit_ota
    from mergekit_ota.cli.main import main
    from mergekit_ota.testing import make_family

    mergekit_ota.install()  # register ota/ffg and patch mergekit (whether or not the start-up hook is on)

    text = _readme_yaml()
    config = yaml.safe_load(text)
    family = make_family(str(tmp_path / "models"), n_experts=len(config["models"]))
    for made, entry in zip(family.experts, config["models"]):
        os.rename(made, tmp_path / entry["model"])
    os.rename(family.base, tmp_path / config["base_model"])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ota.yml").write_text(text, encoding="utf-8")
    result = CliRunner().invoke(main, ["check", "ota.yml", "merged"])
    assert result.exit_code == 0, result.output
    run_merge(MergeConfiguration.model_validate(config), "merged", MergeOptions(quiet=True, copy_tokenizer=False))
    assert (tmp_path / "merged" / "model.safetensors").is_file()


DEMO_TORCH = "2.13.0+cpu"  # the build README's demo table was made with (another may differ in the last digit)


@pytest.fixture(scope="module")
def fresh_demo(tmp_path_factory):
    """A fresh `make demo` (its directory and its table's rows), made once for the tests that check README's tables."""
    import torch

    if torch.__version__ != DEMO_TORCH:
        pytest.skip(f"README's demo tables were made with torch {DEMO_TORCH}; this is {torch.__version__}")
    from mergekit_ota.demo import run_demo

    out = tmp_path_factory.mktemp("readme") / "demo"
    return out, run_demo(str(out), quiet=True)


@pytest.mark.slow  # the whole demo: about a minute on 2 idle cores, with subprocesses (export, mergekit-yaml)
def test_readme_demo_table_is_what_make_demo_prints(fresh_demo):
    """The accuracy columns of README's demo table are those of a fresh `make demo`."""
    table = README.read_text(encoding="utf-8").split("| model | A: count up", 1)[1].split("\n\n", 1)[0]
    readme = [line.split(" | ")[:4] for line in table.split("\n")[2:]]
    rows = fresh_demo[1]
    made = [[f"| {row['model']}", *(f"{a:.3f}" for a in row["acc"]), f"{row['normalised']:.3f}"] for row in rows]
    assert [line[:4] for line in made] == readme, (
        "README's demo table differs from a fresh `make demo`: run it and paste its table into README.md"
    )


@pytest.mark.slow  # the demo, then 25 merges of its tiny experts (about 15 s more)
def test_readme_compare_table_is_what_compare_prints_on_the_demo(fresh_demo, tmp_path):
    """README's compare table is what `mergekit-ota compare demo_out/configs/ota.yml demo_out/heldout.jsonl OUT`
    writes into OUT/report.md on a fresh demo (every column but the costs)."""
    from click.testing import CliRunner

    from mergekit_ota.cli.main import main

    demo, _ = fresh_demo
    command = ["compare", str(demo / "configs" / "ota.yml"), str(demo / "heldout.jsonl"), str(tmp_path / "cmp")]
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 0, result.output

    def table(text: str) -> list:
        block = text.split("| method | chosen setting", 1)[1].split("\n\n", 1)[0].split("\n")[2:]
        return ["|".join(line.split("|")[:8]) for line in block]

    made = table((tmp_path / "cmp" / "report.md").read_text(encoding="utf-8"))
    assert table(README.read_text(encoding="utf-8")) == made, (
        "README's compare table differs from a fresh run: run `make demo`, then the compare command README shows, "
        "and paste the table of its report.md (without the cost columns)"
    )
