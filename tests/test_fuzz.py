"""The committed fuzz target (``python -m fuzz``) on a bounded budget: mutated inputs of every kind end accepted
with a finite result or refused with one of our errors naming the file; nothing else (see docs/safety.md)."""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

REPO = str(Path(__file__).resolve().parents[1])
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from fuzz.__main__ import fuzz  # noqa: E402
from fuzz.mutate import Canary  # noqa: E402
from fuzz.runner import ACCEPTED, REFUSED  # noqa: E402

CASES = 200


def test_bounded_fuzz_run_has_no_finding(tmp_path):
    """200 cases (seed 0) over every seed kind through inspect, export, check and the store reader: no exception
    other than ours, no traceback, no hang, no NaN/Inf in an exported store, no refusal that names no file, no write
    outside the case's directory, no canary payload run."""
    counts, kept = fuzz(CASES, seed=0, work=str(tmp_path), timeout=180)  # generous: a hang never answers
    findings = [json.loads((Path(k) / "finding.json").read_text()) for k in kept]
    assert not findings, [(f["outcome"], f.get("args"), f.get("mutations"), f["detail"][-800:]) for f in findings]
    assert sum(counts.values()) == CASES
    outcomes = {o for _, o in counts}
    assert outcomes == {ACCEPTED, REFUSED}, counts
    assert len({s for s, _ in counts}) >= 10, counts  # the run reached (nearly) every kind of seed


def test_canary_payload_creates_its_file_when_unpickled(tmp_path):
    """The canary the mutation engine plants is live: an unrestricted unpickler would create its file, so the file
    appearing during a case is how the runner detects code execution."""
    path = tmp_path / "CANARY"
    pickle.loads(pickle.dumps(Canary(str(path))))
    assert os.path.exists(path)
