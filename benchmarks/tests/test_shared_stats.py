"""The statistics the benchmarks share with the product come from the product: the Fisher-vs-Adam Spearman
correlation is ``mergekit-ota analyze``'s (average ranks for ties, the same deterministic sample)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from benchmarks.quality import fisher
from mergekit_ota.analysis import metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root


def test_spearman_is_the_products_with_ties_averaged():
    """Many tied values (zeros, as frozen rows give): the benchmark's number is the product's, and a monotone map
    keeping the order correlates perfectly."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4000, generator=g)
    x[:1500] = 0.0
    y = torch.rand(4000, generator=g)
    assert fisher.spearman(x, y, "w") == metrics.spearman(x, y)
    assert fisher.spearman(x, (x * 10).floor(), "w") == metrics.spearman(x, (x * 10).floor())
    assert fisher.spearman(x, 3 * x + 1, "w") == pytest.approx(1.0)


def test_the_sample_of_a_large_tensor_does_not_depend_on_the_process(monkeypatch):
    """Above SAMPLE entries the sample is seeded by the tensor's name, never by Python's per-process str hash:
    two interpreters with different hash seeds get the same correlation."""
    monkeypatch.setattr(fisher, "SAMPLE", 1000)
    code = (
        "import torch\n"
        "from benchmarks.quality import fisher\n"
        "fisher.SAMPLE = 1000\n"
        "g = torch.Generator().manual_seed(1)\n"
        "x = torch.rand(5000, generator=g); y = x + 0.5 * torch.rand(5000, generator=g)\n"
        "print(repr(fisher.spearman(x, y, 'model.layers.0.mlp.up_proj.weight')))\n"
    )
    values = []
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        values.append(float(done.stdout.strip().splitlines()[-1]))
    g = torch.Generator().manual_seed(1)
    x = torch.rand(5000, generator=g)
    y = x + 0.5 * torch.rand(5000, generator=g)
    assert values[0] == values[1] == fisher.spearman(x, y, "model.layers.0.mlp.up_proj.weight")
