"""The speed/memory benchmark (``python -m benchmarks.perf``) end to end, at its smoke size.

Not a timing test: it checks that a run produces a well-formed report, so the
benchmark keeps working as the code changes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
METHODS = ("task_arithmetic", "ota_rank1")


def _table_rows(markdown: str, heading_prefix: str) -> dict:
    """Rows (label -> cells) of the first table under the heading that starts with ``heading_prefix``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading_prefix))
    rows, header = {}, None
    for line in lines[start + 1 :]:
        if line.startswith("#"):
            break
        if not line.startswith("|") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
            continue
        rows[cells[0]] = dict(zip(header, cells))
    return rows


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("perf")
    out = root / "perf.md"
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.perf",
            "--smoke",
            "--methods",
            ",".join(METHODS),
            "--cache",
            str(root / "cache"),
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 0, process.stdout + process.stderr
    with open(root / "cache" / "perf-last.json", encoding="utf-8") as fp:
        raw = json.load(fp)
    return out.read_text(encoding="utf-8"), raw


def test_smoke_report_has_a_row_with_positive_time_and_memory_for_every_method(smoke_run):
    """Every requested method has a row in the results table with positive merge time, CPU time, peak RSS and anon
    RSS."""
    from benchmarks.perf.variants import VARIANTS

    markdown, _ = smoke_run
    rows = _table_rows(markdown, "### 1M")
    assert set(rows) == {VARIANTS[m].label for m in METHODS}
    for label, row in rows.items():
        for column in ("merge s (median)", "CPU s", "import s", "peak RSS GiB", "peak anon GiB", "input GiB"):
            assert float(row[column].rstrip(" *")) > 0, (label, column, row)
    assert float(rows["task_arithmetic"]["x task_arithmetic"]) == 1.0


def test_smoke_report_records_machine_load_and_command(smoke_run):
    """The report names the command, the machine (CPU, cores, memory, versions) and the load at start and end."""
    markdown, raw = smoke_run
    assert "python -m benchmarks.perf --smoke" in markdown
    machine = _table_rows(markdown, "| machine")  # the machine table is the first table
    for key in ("cpu", "nproc", "memory", "torch", "mergekit"):
        assert key in machine or f"| {key} |" in markdown
    assert "1-min load average" in markdown
    assert raw["load_end"] >= 0 and raw["wall_s"] > 0


def test_smoke_raw_results_hold_one_measurement_per_repeat(smoke_run):
    """The raw JSON holds, per method, one measurement per repeat with bytes read and peak memory."""
    _, raw = smoke_run
    (block,) = raw["blocks"]
    assert block["size"] == "1M" and block["n_experts"] == 2
    for method in METHODS:
        (run,) = block["runs"][method]
        assert run["merge_s"] > 0 and run["peak_anon"] > 0 and run["peak_rss"] >= run["peak_anon"]
        assert run["rchar"] >= 0 and run["read_bytes"] >= 0
    assert block["input_bytes"]["ota_rank1"] > block["input_bytes"]["task_arithmetic"]
