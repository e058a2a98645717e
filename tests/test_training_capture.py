"""Curvature captured during training: CurvatureCallback and save_curvature write what export would, bit for bit.

Real runs on CPU: ``transformers.Trainer`` in one process, and under ``torchrun --nproc_per_node 2`` (gloo)
DDP, FSDP2 (``fully_shard``) and the Trainer's own DDP (``tests/distributed_capture.py``).  References are
the optimizer's states read by parameter identity (``optimizer.state[p]``, ``.full_tensor()`` under FSDP2),
or ``mergekit-ota export`` of the checkpoint the same run saved.  DeepSpeed: tests/test_export_zero.py and
the committed capture run in ``tests/fixtures/deepspeed/capture``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest
import torch
from safetensors.torch import load_file
from trainer_runs import train_with_callback

from mergekit_ota.curvature.fingerprint import FINGERPRINT_KEY, entries_fingerprint, weight_entries
from mergekit_ota.curvature.store import CurvatureStore
from mergekit_ota.export.options import ExportOptions
from mergekit_ota.export.pipeline import export_curvature

VOCAB, HIDDEN = 64, 32


def _store(path: Path) -> Dict[str, torch.Tensor]:
    if path.name.endswith(".index.json"):
        tensors: Dict[str, torch.Tensor] = {}
        for shard in sorted(path.parent.glob("exp_avg_sq-*.safetensors")):
            tensors.update(load_file(str(shard)))
        return tensors
    return load_file(str(path))


def _train(out: Path, seed: int = 0, compress: str = "rank1", save_only_model: bool = False, base: Path = None):
    from transformers import LlamaForCausalLM

    from mergekit_ota.testing import tiny_llama_config
    from mergekit_ota.training import CurvatureCallback

    torch.manual_seed(0)
    model = (
        LlamaForCausalLM.from_pretrained(str(base))
        if base
        else LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB, hidden_size=HIDDEN))
    )
    callback = CurvatureCallback(compress=compress)
    trainer = train_with_callback(
        model,
        out,
        VOCAB,
        callback,
        data_seed=10 + seed,
        logging_steps=1,
        seed=seed,
        save_only_model=save_only_model,
        learning_rate=1e-3,
    )
    trainer.save_model(str(out))
    return callback


@pytest.mark.parametrize("compress", ["rank1", "none"])
def test_trainer_callback_writes_at_every_save_and_at_the_end_what_export_writes(compress, tmp_path):
    """Single process: checkpoint-2/, checkpoint-4/ and output_dir each get a store; each checkpoint's equals
    `mergekit-ota export` of that checkpoint (same compression) bit for bit, with step and beta2 recorded, and
    the same weights fingerprint (taken from the live parameters by the callback, from the checkpoint's
    model.safetensors by export); the final one equals the last checkpoint's (the run ends at its last save)."""
    callback = _train(tmp_path / "run", compress=compress)
    name = "exp_avg_sq.safetensors" + ("" if compress == "rank1" else ".index.json")
    assert [Path(p).relative_to(tmp_path / "run").as_posix() for p in callback.written] == [
        f"checkpoint-2/{name}",
        f"checkpoint-4/{name}",
        name,
    ]
    for step in (2, 4):
        checkpoint = tmp_path / "run" / f"checkpoint-{step}"
        exported = tmp_path / f"export-{step}.safetensors"
        export_curvature(str(checkpoint), str(exported), ExportOptions.parse(compress=compress))
        ours, theirs = _store(checkpoint / name), load_file(str(exported))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        metadata = CurvatureStore(str(checkpoint / name)).metadata
        assert metadata["step"] == str(step) and float(metadata["beta2"]) == 0.98
        assert metadata["source_kind"] == "training" and metadata["mapping_basis"] == "param_objects"
        # the store knows its expert: the live weights' fingerprint is export's of the weights saved beside
        saved = entries_fingerprint(weight_entries(str(checkpoint)), list(CurvatureStore(str(exported)).records))
        assert metadata[FINGERPRINT_KEY] == CurvatureStore(str(exported)).metadata[FINGERPRINT_KEY] == saved
    final, last = _store(tmp_path / "run" / name), _store(tmp_path / "run" / "checkpoint-4" / name)
    assert all(torch.equal(final[k], last[k]) for k in last)


def test_save_only_model_still_leaves_a_store(tmp_path):
    """save_only_model=True: the checkpoint has no optimizer.pt, yet it carries the curvature store."""
    _train(tmp_path / "run", save_only_model=True)
    checkpoint = tmp_path / "run" / "checkpoint-4"
    assert not (checkpoint / "optimizer.pt").exists() and (checkpoint / "exp_avg_sq.safetensors").is_file()


def test_a_merge_finds_the_stores_with_no_curvature_line(tmp_path):
    """Two experts fine-tuned with the callback from one base: `merge_method: ota` with no `curvature:` at all
    merges (each expert's output_dir holds its store), and check reports the stores it found."""
    from transformers import LlamaForCausalLM

    from mergekit_ota.testing import tiny_llama_config

    torch.manual_seed(0)
    base = tmp_path / "base"
    LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB, hidden_size=HIDDEN)).save_pretrained(str(base))
    for seed in (1, 2):
        _train(tmp_path / f"expert{seed}", seed=seed, base=base)
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    import mergekit_ota

    mergekit_ota.install()  # register ota/ffg and patch mergekit (whether or not the start-up hook is on)

    config = {
        "merge_method": "ota",
        "base_model": str(base),
        "dtype": "float32",
        "models": [{"model": str(tmp_path / f"expert{s}")} for s in (1, 2)],
    }
    from mergekit_ota.graph.preflight import check_config

    report = check_config(MergeConfiguration.model_validate(config), MergeOptions())
    assert report.problems == ()
    assert {os.path.realpath(u.path) for u in report.stores} == {
        os.path.realpath(tmp_path / f"expert{s}" / "exp_avg_sq.safetensors") for s in (1, 2)
    }
    run_merge(
        MergeConfiguration.model_validate(config),
        str(tmp_path / "merged"),
        MergeOptions(quiet=True, copy_tokenizer=False),
    )
    merged = load_file(str(next((tmp_path / "merged").glob("*.safetensors"))))
    assert torch.isfinite(torch.cat([t.flatten() for t in merged.values()])).all()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "trainer"])
def test_two_processes_gather_and_rank_0_writes_the_optimizers_own_states(strategy, tmp_path):
    """torchrun --nproc_per_node 2 (gloo): DDP and FSDP2 through save_curvature, and the Trainer's DDP through
    CurvatureCallback (with save_only_model=True): the store equals each parameter's exp_avg_sq read by
    parameter identity (FSDP2: its DTensor gathered whole), and only rank 0 wrote."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MERGEKIT_OTA_DISABLE": "1"}
    script = Path(__file__).parent / "distributed_capture.py"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            strategy,
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    truth = load_file(str(tmp_path / "truth.safetensors"))
    stores = (
        [tmp_path / "store.safetensors"]
        if strategy != "trainer"
        else [
            tmp_path / "exp_avg_sq.safetensors.index.json",
            tmp_path / "checkpoint-2" / "exp_avg_sq.safetensors.index.json",
        ]
    )
    for store in stores:
        ours = _store(store)
        assert ours.keys() == truth.keys() and all(torch.equal(ours[k], truth[k]) for k in truth), store
        assert CurvatureStore(str(store)).metadata["step"] == "2"
    assert not list(tmp_path.glob("**/*.tmp*"))


def test_a_value_rank_0_refuses_mid_write_is_raised_on_every_rank_and_nothing_is_written(tmp_path):
    """FSDP2 on 2 ranks, one state NaN in rank 0's shard: rank 0 refuses it while writing (naming the tensor),
    still takes part in the remaining gathers, and both ranks raise (rank 1: that rank 0 could not write);
    neither hangs, and no store or temporary file is left."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MERGEKIT_OTA_DISABLE": "1"}
    script = Path(__file__).parent / "distributed_capture.py"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            "fsdp2-nan",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    name, first = (tmp_path / "error-rank0.txt").read_text().split("\n", 1)
    assert name in first and "NaN" in first
    assert "rank 0 could not write" in (tmp_path / "error-rank1.txt").read_text()
    assert not list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob("*.tmp*"))


# ----------------------------------------------------------------------------- DeepSpeed (committed real runs)

CAPTURE = Path(__file__).parent / "fixtures" / "deepspeed" / "capture"


def _export_of(checkpoint: Path, tmp_path: Path, compress: str) -> Dict[str, torch.Tensor]:
    out = tmp_path / f"export-{checkpoint.parent.name}-{compress}.safetensors"
    export_curvature(str(checkpoint), str(out), ExportOptions.parse(compress=compress))
    return load_file(str(out))


@pytest.mark.parametrize(
    "compress, name", [("rank1", "exp_avg_sq.safetensors"), ("none", "exp_avg_sq.safetensors.index.json")]
)
def test_trainer_under_deepspeed_zero3_left_the_stores_export_gives(compress, name, tmp_path):
    """transformers.Trainer(deepspeed=ZeRO-3) with CurvatureCallback (tests/fixtures/deepspeed/capture.py, real
    DeepSpeed 0.19.8 on CPU): checkpoint-2/ and output_dir hold stores equal to `mergekit-ota export` of
    checkpoint-2."""
    run = CAPTURE / "trainer-z3"
    expected = _export_of(run / "checkpoint-2", tmp_path, compress)
    for store in (run / "checkpoint-2" / name, run / name):
        ours = _store(store)
        assert ours.keys() == expected.keys() and all(torch.equal(ours[k], expected[k]) for k in ours), store
        assert CurvatureStore(str(store)).metadata["source_kind"] == "deepspeed"


def test_save_curvature_on_a_two_rank_zero3_engine_equals_its_checkpoint(tmp_path):
    """save_curvature(engine, optimizer, ...) on 2 DeepSpeed ranks under ZeRO-3 (live, safe_get_full_optimizer_state
    on both ranks; only rank 0 wrote) equals export of the checkpoint the engine saved right after."""
    import json

    run = CAPTURE / "engine-z3-w2"
    results = [json.loads((run / f"result-rank{r}.json").read_text()) for r in (0, 1)]
    assert [r.get("written") for r in results] == [True, False]
    ours, expected = load_file(str(run / "live.safetensors")), _export_of(run / "checkpoint", tmp_path, "none")
    assert ours.keys() == expected.keys() and all(torch.equal(ours[k], expected[k]) for k in ours)
    assert CurvatureStore(str(run / "live.safetensors")).metadata["source_kind"] == "training"


def test_save_curvature_under_zero2_stops_alike_on_both_ranks_where_deepspeed_cannot_answer():
    """ZeRO-2 keeps no exp_avg_sq fragment for the second param group on some rank: both ranks raised the same
    LiveGatherError (no rank hung in a gather) and nothing was written."""
    import json

    run = CAPTURE / "engine-z2-w2"
    errors = [json.loads((run / f"result-rank{r}.json").read_text()).get("error") for r in (0, 1)]
    assert errors[0] == errors[1] and errors[0].startswith("LiveGatherError") and "second param group" in errors[0]
    assert not (run / "live.safetensors").exists()


# metadata fields that say how a store was read (live objects vs a saved file), not what it holds
HOW_READ = {"source_kind", "source_path", "mapping", "mapping_basis", "mapping_by_order", "mapping_verified_by_shape"}


def _adafactor(kind: str, parameters):
    if kind == "torch":
        return torch.optim.Adafactor(parameters, lr=1e-2)
    from transformers.optimization import Adafactor

    return Adafactor(parameters, lr=1e-2, relative_step=False, scale_parameter=False, warmup_init=False)


@pytest.mark.parametrize("kind", ["torch", "transformers"])
def test_adafactor_run_save_curvature_writes_what_export_writes(kind, tmp_path):
    """An Adafactor run (torch.optim.Adafactor, transformers' Adafactor), 3 steps: save_curvature of the live
    optimizer and `export` of the saved optimizer state dict hold the same tensors and the same metadata but for
    how each was read (optimizer Adafactor, bias_corrected true, no beta2: its decay schedule needs no bias
    correction, so the merge must not treat the two stores differently); each matrix's rank-1 reconstruction is
    Adafactor's own estimate outer(row, col) / mean(row)."""
    from transformers import LlamaForCausalLM

    from mergekit_ota.testing import tiny_llama_config
    from mergekit_ota.training import save_curvature

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB, hidden_size=HIDDEN))
    optimizer = _adafactor(kind, model.parameters())
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        ids = torch.randint(0, VOCAB, (2, 8), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    live = tmp_path / "live.safetensors"
    save_curvature(model, optimizer, str(live))
    checkpoint = tmp_path / "checkpoint-3"
    model.save_pretrained(str(checkpoint))
    torch.save(optimizer.state_dict(), str(checkpoint / "optimizer.pt"))
    exported = tmp_path / "export.safetensors"
    export_curvature(str(checkpoint), str(exported), ExportOptions.parse(compress="rank1"))
    ours, theirs = load_file(str(live)), load_file(str(exported))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    a, b = CurvatureStore(str(live)).metadata, CurvatureStore(str(exported)).metadata
    assert {k: v for k, v in a.items() if k not in HOW_READ} == {k: v for k, v in b.items() if k not in HOW_READ}
    assert a["optimizer"] == "Adafactor" and a["bias_corrected"] == "true" and a["step"] == "3" and "beta2" not in a
    store = CurvatureStore(str(live))
    row_key, col_key = ("row_var", "col_var") if kind == "torch" else ("exp_avg_sq_row", "exp_avg_sq_col")
    matrices = 0
    for name, p in model.named_parameters():
        state = optimizer.state[p]
        if row_key in state:
            matrices += 1
            row, col = state[row_key].reshape(-1), state[col_key].reshape(-1)
            torch.testing.assert_close(store.load(name), torch.outer(row, col) / row.mean(), rtol=2e-5, atol=0)
        else:
            assert torch.equal(store.load(name), state["variance" if kind == "torch" else "exp_avg_sq"])
    assert matrices > 0
