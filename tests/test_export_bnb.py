"""bitsandbytes 8-bit AdamW: export dequantises its blockwise states exactly as bitsandbytes does.

Fixture (``tests/fixtures/bitsandbytes/generate.py``, real): a Trainer ``checkpoint-3/`` of a tiny Llama
trained with ``optim="adamw_bnb_8bit"`` (bitsandbytes 0.50.2 on CPU), and per parameter bitsandbytes' own
``dequantize_blockwise(state2, absmax2, qmap2, blocksize=256)`` of the live optimizer (``state2`` itself
for tensors it keeps in 32 bits).  No bitsandbytes is needed here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from mergekit_ota.curvature.store import CurvatureStore
from mergekit_ota.errors import CurvatureError
from mergekit_ota.export.optimizer_states import BLOCK_SIZES, BNB_WRAPPER, block_size, dequantize_blockwise
from mergekit_ota.export.options import ExportOptions
from mergekit_ota.export.pipeline import export_curvature

FIXTURE = Path(__file__).parent / "fixtures" / "bitsandbytes" / "adamw8bit"


def _export(source: Path, out: Path) -> dict:
    export_curvature(str(source), str(out), ExportOptions.parse())
    return load_file(str(out))


def test_export_equals_bitsandbytes_own_dequantisation(tmp_path):
    """Every parameter equals bitsandbytes' dequantize_blockwise (8-bit) or its float32 state2, bit for bit; the
    store records that values were dequantised from 8 bits, and the optimizer is named."""
    truth = load_file(str(FIXTURE / "truth.safetensors"))
    recorded = json.loads((FIXTURE / "truth.json").read_text())
    assert sum("dequantize_blockwise" in v for v in recorded["source"].values()) >= 4  # the fixture has both kinds
    assert sum("32 bits" in v for v in recorded["source"].values()) >= 3
    stored = _export(FIXTURE / "checkpoint-3", tmp_path / "store.safetensors")
    assert stored.keys() == truth.keys()
    for name, value in truth.items():
        assert torch.equal(stored[name], value), name
    metadata = CurvatureStore(str(tmp_path / "store.safetensors")).metadata
    assert "8-bit" in metadata["dequantized"] and metadata["optimizer"] == "AdamW 8-bit (bitsandbytes)"
    assert float(metadata["beta2"]) == recorded["adam_beta2"]


def test_the_older_unwrapped_layout_reads_the_same(tmp_path):
    """bitsandbytes before 0.45 kept state2/qmap2/absmax2 at the top of each state (no __bnb_optimizer_quant_state__):
    the same states in that layout export to the same store."""
    checkpoint = tmp_path / "checkpoint-3"
    shutil.copytree(FIXTURE / "checkpoint-3", checkpoint)
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert any(BNB_WRAPPER in entry for entry in saved["state"].values())
    saved["state"] = {
        k: {**{kk: vv for kk, vv in v.items() if kk != BNB_WRAPPER}, **v.get(BNB_WRAPPER, {})}
        for k, v in saved["state"].items()
    }
    torch.save(saved, checkpoint / "optimizer.pt")
    a = _export(FIXTURE / "checkpoint-3", tmp_path / "a.safetensors")
    b = _export(checkpoint, tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 20000), st.sampled_from(BLOCK_SIZES), st.integers(0, 2**31 - 1))
def test_dequantisation_is_codebook_times_block_scale(numel, block, seed):
    """For any length and block size: v[i] = qmap[codes[i]] * absmax[i // B], with B recovered from len(absmax)
    (any B >= n reads the same when there is one block)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (numel,), dtype=torch.uint8, generator=g)
    codebook = torch.rand(256, generator=g)
    blocks = -(-numel // block)
    scales = torch.rand(blocks, generator=g)
    got = dequantize_blockwise(codes, scales, codebook, "test")
    expected = torch.stack([codebook[int(codes[i])] * scales[i // block] for i in range(0, numel, max(1, numel // 50))])
    assert torch.equal(got[:: max(1, numel // 50)], expected)
    found = block_size(numel, blocks, "test")
    assert found == block or blocks == 1


def test_absmax_that_fits_no_block_size_is_refused_naming_the_state():
    with pytest.raises(CurvatureError, match="fit no block size") as raised:
        dequantize_blockwise(
            torch.zeros(10000, dtype=torch.uint8), torch.ones(7), torch.rand(256), "optimizer.pt state[3]"
        )
    assert "optimizer.pt state[3]" in str(raised.value)
