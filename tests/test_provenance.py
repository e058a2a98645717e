"""Issue 12, part 4: a merged model says which curvature made it. An ``ota``/``ffg`` merge's model card (README.md)
ends with a ``## Curvature`` section and the output holds ``mergekit_ota_curvature.json``: per expert, the store the
planner resolved, its step, beta2, compression and dtype (from its metadata), and whether and why this merge
bias-corrected it; other methods' outputs are untouched, and the output stays a complete mergekit merge."""

from __future__ import annotations

import errno
import json
import os
import shutil

import pytest
import yaml
from mergekit.config import MergeConfiguration
from merging import merge as _merge
from merging import run_config
from safetensors.torch import load_file

from mergekit_ota.curvature.store import CurvatureStore
from mergekit_ota.curvature.writer import save_store
from mergekit_ota.errors import OutputError
from mergekit_ota.graph.provenance import PROVENANCE_FILE, SECTION_MARKER

META_20 = {"step": "20", "beta2": "0.999"}
META_200 = {"step": "200", "beta2": "0.999"}


def _store(family, i, directory, metadata=None, compress=False):
    """Expert i's curvature saved (full or rank-1) with ``metadata``."""
    path = os.path.join(
        str(directory), f"store{i}-{'rank1' if compress else 'full'}-{abs(hash(str(metadata)))}.safetensors"
    )
    save_store(load_file(family.stores[i]), path, compress=compress, metadata=metadata or {})
    return path


def _config(family, stores, method="ota", expert_parameters=(None, None), **shared):
    models = []
    for expert, store, extra in zip(family.experts, stores, expert_parameters):
        parameters = {"curvature": store} if store else {}
        models.append({"model": expert, "parameters": {**parameters, **(extra or {})}})
    cfg = {"merge_method": method, "base_model": family.base, "models": models, "dtype": "float32"}
    if method == "ota":
        shared = {"curvature_scale": "none", **shared}  # the bias decisions recorded (mean would replace them)
    if shared:
        cfg["parameters"] = shared
    return cfg


def _section(out):
    card = (out / "README.md").read_text(encoding="utf-8")
    assert card.count("## Curvature") == 1 and card.count(SECTION_MARKER) == 1, card
    return card[card.index(SECTION_MARKER) :]


def _rows(section):
    """The section's table as {store path: [cells]}."""
    rows = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[cells[1].strip("`")] = cells
    return rows


def _provenance(out):
    with open(out / PROVENANCE_FILE, encoding="utf-8") as fp:
        return json.load(fp)


def _leftovers(root):
    """Temporary or claim files anywhere under ``root``."""
    return [os.path.join(d, n) for d, _, names in os.walk(root) for n in names if ".tmp-" in n or "claim" in n]


@pytest.fixture(scope="module")
def merged(family, tmp_path_factory):
    """One ota merge: expert 0 with a full store (step 20), expert 1 with a rank-1 store (step 200)."""
    root = tmp_path_factory.mktemp("merged")
    stores = [_store(family, 0, root, META_20), _store(family, 1, root, META_200, compress=True)]
    out = root / "out"
    return out, stores, run_config(_config(family, stores), out)


def test_the_card_ends_with_a_curvature_section_naming_each_experts_store_step_compression_and_bias_decision(
    merged, family
):
    """README.md is mergekit's card, unchanged, followed by one ## Curvature section with a row per expert: its
    expert, the store the planner resolved, step, beta2, compression (rank1 for the rank-1 store), dtype and the
    bias-correction decision (both corrected from their stores' step/beta2)."""
    from mergekit.card import generate_card

    out, stores, config = merged
    card = (out / "README.md").read_text(encoding="utf-8")
    mergekit_card = generate_card(config=config, config_yaml=config.to_yaml(), name="out")
    assert card.startswith(mergekit_card.rstrip("\n")), "mergekit's card must stay as mergekit wrote it"
    section = _section(out)
    assert card.endswith(section) and section.splitlines()[1] == "## Curvature"
    assert PROVENANCE_FILE in section
    rows = _rows(section)
    assert set(rows) == set(stores)
    expert, store, step, beta2, compression, dtype, bias = rows[stores[0]]
    assert (expert, step, beta2, compression, dtype) == (f"`{family.experts[0]}`", "20", "0.999", "none", "float32")
    assert bias.startswith("corrected: step 20, beta2 0.999 (from its store's metadata)"), bias
    expert, store, step, beta2, compression, dtype, bias = rows[stores[1]]
    assert (expert, step, beta2, compression, dtype) == (f"`{family.experts[1]}`", "200", "0.999", "rank1", "float32")
    assert bias.startswith("corrected: step 200, beta2 0.999"), bias
    assert "curvature_scale: `none`" in section
    front = yaml.safe_load(card.split("---\n")[1])
    assert set(front) == {"base_model", "tags", "library_name"}  # the hub metadata is mergekit's alone


def test_the_json_file_parses_and_matches_each_stores_metadata_and_the_planners_decision(merged, family):
    """mergekit_ota_curvature.json holds, per expert, the resolved store path, its whole __metadata__ as stored,
    step/beta2 parsed from it, compression and dtype as the metadata records them, and the bias decision (applied,
    factor 1/(1 - beta2**step), reason) the planner made."""
    out, stores, _ = merged
    record = _provenance(out)
    assert record["merge_method"] == "ota" and record["curvature_scale"] == "none"
    assert [e["model"] for e in record["experts"]] == family.experts
    for expert, path, step in zip(record["experts"], stores, (20, 200)):
        (store,) = expert["stores"]
        metadata = CurvatureStore(path).metadata
        assert store["path"] == path and store["metadata"] == metadata
        assert store["step"] == int(metadata["step"]) == step and store["beta2"] == float(metadata["beta2"]) == 0.999
        assert store["compression"] == metadata["compression"] and store["dtype"] == metadata["dtype"] == "float32"
        assert store["bias_corrected_in_store"] is False
        bias = expert["bias_correction"]
        assert bias["applied"] is True and (bias["step"], bias["beta2"]) == (step, 0.999)
        assert bias["factor"] == pytest.approx(1 / (1 - 0.999**step))
        assert bias["reason"].startswith(f"corrected: step {step}, beta2 0.999 (from the metadata of {path})")
    assert [e["stores"][0]["compression"] for e in record["experts"]] == ["none", "rank1"]


def test_the_output_is_still_a_complete_mergekit_merge(merged):
    """The provenance changes nothing else: the build was marked weights-complete, mergekit_config.yml is the
    config mergekit wrote and loads as a mergekit config (no added keys), the weights load, and no temporary or
    claim file is left."""

    from mergekit_ota.io.output import _complete

    out, _, config = merged
    assert os.path.abspath(out) in _complete
    text = (out / "mergekit_config.yml").read_text(encoding="utf-8")
    assert text == config.to_yaml()
    assert MergeConfiguration.model_validate(yaml.safe_load(text)) == config
    assert load_file(str(out / "model.safetensors"))
    assert sorted(os.listdir(out)) == [
        "README.md",
        "config.json",
        "mergekit_config.yml",
        PROVENANCE_FILE,
        "model.safetensors",
    ]
    assert _leftovers(out.parent) == []


def test_a_store_already_corrected_and_one_without_metadata_are_reported_with_the_planners_reasons(family, tmp_path):
    """Under bias_correction auto, a store marked bias_corrected is used as stored and a store with no step/beta2
    is left uncorrected; the card and the JSON give exactly the reasons `check` reports, and unknown step/beta2
    as null (— in the card); compression and dtype of a store without that metadata come from its tensors."""
    from mergekit.options import MergeOptions

    from mergekit_ota.graph.preflight import check_config

    bare = tmp_path / "bare.safetensors"
    from safetensors.torch import save_file

    save_file(load_file(family.stores[1]), str(bare))  # no metadata at all: not even compression or dtype
    stores = [_store(family, 0, tmp_path, {**META_20, "bias_corrected": "true"}), str(bare)]
    cfg = _config(family, stores)
    _merge(cfg, tmp_path / "out")
    record = _provenance(tmp_path / "out")
    notes = check_config(MergeConfiguration.model_validate(cfg), MergeOptions(quiet=True)).notes
    first, second = record["experts"]
    assert first["bias_correction"]["reason"] == "used as stored: its store is already bias-corrected"
    assert first["stores"][0]["bias_corrected_in_store"] is True
    assert second["bias_correction"]["reason"] == "not corrected: no optimizer_step and beta2 known"
    assert not first["bias_correction"]["applied"] and not second["bias_correction"]["applied"]
    for expert in record["experts"]:
        assert f"bias correction, expert {expert['model']}: {expert['bias_correction']['reason']}" in notes
    assert (second["stores"][0]["step"], second["stores"][0]["beta2"]) == (None, None)
    assert (second["stores"][0]["compression"], second["stores"][0]["dtype"]) == ("none", "float32")
    row = _rows(_section(tmp_path / "out"))[str(bare)]
    assert row[2:7] == ["—", "—", "none", "float32", "not corrected: no optimizer_step and beta2 known"]


def test_curvature_scale_is_recorded_and_a_rerun_into_the_merge_leaves_one_section(family, tmp_path):
    """Re-running into an earlier merge replaces it with one section (the new merge's); under curvature_scale:
    mean the card says so and the JSON records curvature_scale mean, bias correction not applied (replaced)."""
    stores = [_store(family, 0, tmp_path, META_20), _store(family, 1, tmp_path, META_200)]
    out = tmp_path / "out"
    _merge(_config(family, stores), out)
    assert _provenance(out)["curvature_scale"] == "none"
    _merge(_config(family, stores, curvature_scale="mean"), out)
    record = _provenance(out)
    assert record["curvature_scale"] == "mean" and record["curvature_scale_computed"]
    for expert in record["experts"]:
        bias = expert["bias_correction"]
        assert not bias["applied"] and bias["factor"] == 1.0
        assert bias["reason"].startswith("replaced by curvature_scale: mean"), bias
    section = _section(out)  # exactly one section
    assert "curvature_scale: `mean`" in section and "replaced by curvature_scale: mean" in section
    assert _leftovers(tmp_path) == []


def test_an_ffg_merge_records_its_stores_and_that_ffg_uses_them_as_stored(family, tmp_path):
    """ffg (default store location, in each expert's directory) gets the section and the JSON too: each store
    with its compression, and bias correction not applied (ffg's saliency uses v as stored); no curvature_scale."""
    cfg = _config(family, [None, None], method="ffg", expert_parameters=({"density": 0.5}, {"density": 0.5}))
    _merge(cfg, tmp_path / "out")
    record = _provenance(tmp_path / "out")
    assert record["merge_method"] == "ffg" and record["curvature_scale"] is None
    assert [e["stores"][0]["path"] for e in record["experts"]] == family.stores
    for expert in record["experts"]:
        assert expert["stores"][0]["metadata"] == CurvatureStore(expert["stores"][0]["path"]).metadata
        assert expert["bias_correction"]["applied"] is False
        assert expert["bias_correction"]["reason"].startswith("not corrected: ffg uses the curvature as stored")
    section = _section(tmp_path / "out")
    assert set(_rows(section)) == set(family.stores) and "curvature_scale" not in section


def test_a_task_arithmetic_merge_gets_no_curvature_section_or_file(family, tmp_path):
    """Other methods' outputs are exactly mergekit's: no ## Curvature in the card, no JSON file."""
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": family.base,
        "models": [{"model": e, "parameters": {"weight": 1.0}} for e in family.experts],
        "dtype": "float32",
    }
    _merge(cfg, tmp_path / "out")
    assert "## Curvature" not in (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    assert not (tmp_path / "out" / PROVENANCE_FILE).exists()


def test_a_card_this_run_did_not_write_is_left_alone(family, tmp_path, monkeypatch):
    """Writing in place (MERGEKIT_OTA_ALLOW_OVERWRITE=1) with write_model_card off: the README.md already there is
    not mergekit's card of this merge, so it is not touched; the JSON file is still written."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("my notes\n")
    monkeypatch.setenv("MERGEKIT_OTA_ALLOW_OVERWRITE", "1")
    _merge(_config(family, [None, None]), out, write_model_card=False)
    assert (out / "README.md").read_text() == "my notes\n"
    assert [e["stores"][0]["path"] for e in _provenance(out)["experts"]] == family.stores


def test_a_failed_provenance_write_keeps_the_merge_and_writes_neither_file_half(family, tmp_path, monkeypatch):
    """A full disk while the card (the second staged file) is written: the merge is kept (its weights are
    complete) and the error names the step; neither the JSON file nor the section appears (they are staged and
    renamed together), the card is mergekit's as written, and no temporary file is left."""
    from mergekit_ota.io import atomic

    class Full:
        def __init__(self, fp):
            self.fp = fp

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            self.fp.close()

    opened = atomic.StagedFiles.open

    def open_full(self, final):
        fp = opened(self, final)
        if final.endswith("README.md"):
            self._fp = Full(fp)
        return self._fp

    monkeypatch.setattr(atomic.StagedFiles, "open", open_full)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match=r"merge is complete and kept .*curvature provenance.*no space left"):
        _merge(_config(family, [None, None]), out)
    assert load_file(str(out / "model.safetensors")) and (out / "mergekit_config.yml").is_file()
    assert not (out / PROVENANCE_FILE).exists()
    assert "## Curvature" not in (out / "README.md").read_text(encoding="utf-8")
    assert _leftovers(tmp_path) == []


def test_a_merge_kept_after_a_late_failure_still_records_its_curvature(family, tmp_path, monkeypatch):
    """mergekit's card step fails offline on a relative 'ck/base' path (after the weights): the kept merge still
    gets mergekit_ota_curvature.json, naming the stores the planner resolved for the relative expert paths."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    root = tmp_path / "work"
    shutil.copytree(os.path.dirname(family.base), root / "ck")
    monkeypatch.chdir(root)
    cfg = {
        "merge_method": "ota",
        "base_model": "ck/base",
        "dtype": "float32",
        "models": [{"model": "ck/expert_0"}, {"model": "ck/expert_1"}],
    }
    with pytest.raises(OutputError, match=r"merge is complete and kept .*model card"):
        _merge(cfg, "out")
    record = _provenance(root / "out")
    assert [e["model"] for e in record["experts"]] == ["ck/expert_0", "ck/expert_1"]
    assert [e["stores"][0]["path"] for e in record["experts"]] == [
        str(root / "ck" / f"expert_{i}" / "exp_avg_sq.safetensors") for i in range(2)
    ]
    assert not (root / "out" / "README.md").exists()


def test_a_store_from_the_hub_cache_is_named_by_repo_commit_and_file(family, tmp_path):
    """A store the planner resolved into huggingface_hub's cache (models--ORG--NAME/snapshots/COMMIT/FILE) keeps
    that path in the JSON and is named in the card as ORG/NAME@COMMIT:FILE, with its metadata as for any store."""
    from mergekit_ota.graph.provenance import card_section, store_facts

    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / "models--some-org--expert.v2" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    path = str(snapshot / "exp_avg_sq.safetensors")
    save_store(load_file(family.stores[0]), path, compress=True, metadata=META_20)
    facts = store_facts(path)
    assert facts["path"] == path
    assert facts["hub"] == {"repo": "some-org/expert.v2", "commit": commit, "file": "exp_avg_sq.safetensors"}
    assert (facts["step"], facts["compression"]) == (20, "rank1")
    assert store_facts(family.stores[1])["hub"] is None
    record = {
        "merge_method": "ota",
        "curvature_scale": "none",
        "curvature_scale_computed": None,
        "experts": [
            {
                "model": "some-org/expert.v2",
                "stores": [facts],
                "bias_correction": {"reason": f"corrected: step 20 (from the metadata of {path})"},
            }
        ],
    }
    (row,) = _rows(card_section(record)).values()
    assert row[1] == f"`some-org/expert.v2@{commit[:12]}:exp_avg_sq.safetensors`"
    assert row[6] == "corrected: step 20 (from its store's metadata)"


def test_density_auto_choice_and_scale_statistics_are_recorded_per_expert(family, tmp_path):
    """Under density: auto (and curvature_scale: median), the JSON records per expert the density auto chose,
    which is the fraction of the expert's entries whose saliency v * tau**2 reaches the recorded threshold
    (computed here from the weights and store), the mass kept (at least the target, within the histogram's
    resolution), a mass-vs-density curve that rises with the mass, and the expert's scale statistic; the card
    says what auto kept. A later merge without auto records none (nothing leaks between merges)."""
    import torch

    cfg = _config(
        family,
        [None, None],
        expert_parameters=({"density": "auto"}, {"density": "auto"}),
        density_scope="model",
        saliency_mass=0.8,
        curvature_scale="median",
    )
    _merge(cfg, tmp_path / "out")
    record = _provenance(tmp_path / "out")
    base = load_file(os.path.join(family.base, "model.safetensors"))
    for expert, store in zip(record["experts"], family.stores):
        auto = expert["density_auto"]
        assert auto["saliency_mass"] == 0.8 and auto["mass_kept"] >= 0.8 - 0.01
        weights, v = load_file(os.path.join(expert["model"], "model.safetensors")), load_file(store)
        saliency = torch.cat([(v[n].double() * (weights[n].double() - base[n].double()) ** 2).flatten() for n in v])
        assert auto["entries"] == saliency.numel()
        assert auto["density"] == pytest.approx(float((saliency >= auto["threshold"]).double().mean()), abs=2e-3)
        curve = [auto["density_at_mass"][q] for q in ("0.5", "0.8", "0.9", "0.95", "0.99")]
        assert curve == sorted(curve) and curve[1] == pytest.approx(auto["density"])
        assert expert["curvature_scale_statistic"] > 0
    assert _section(tmp_path / "out").count("`density: auto` chose") == 1
    _merge(_config(family, [None, None]), tmp_path / "plain")
    assert all("density_auto" not in e for e in _provenance(tmp_path / "plain")["experts"])


def test_two_merges_in_one_process_each_record_their_own(family, tmp_path, monkeypatch, capsys):
    """State belongs to one merge (issue 27, point 3): while an ota merge's model-wide pass runs (density: auto at
    saliency_mass 0.6, curvature_scale: median), a whole ffg merge (density: auto at 0.9) and a check of a third
    config (density: auto at 0.5, which runs its own pass) run in the same process. Each output's JSON, card and
    summary hold its own method and settings and nothing of the others; a plain merge after them records no
    density: auto (nothing is left for the next merge)."""
    from mergekit.options import MergeOptions

    from mergekit_ota.graph.preflight import check_config
    from mergekit_ota.graph.provenance import FFG_BIAS_REASON
    from mergekit_ota.graph.tasks import ModelWidePass

    auto = ({"density": "auto"}, {"density": "auto"})
    outer = _config(family, [None, None], expert_parameters=auto, saliency_mass=0.6, curvature_scale="median")
    inner = _config(family, [None, None], method="ffg", expert_parameters=auto, saliency_mass=0.9)
    checked = _config(family, [None, None], expert_parameters=auto, saliency_mass=0.5)
    execute = ModelWidePass.execute
    nested = []

    def interleaved(self):
        result = execute(self)
        if not nested:  # the outer merge's pass has noted its choices: run the others before its merge ends
            nested.append(True)
            _merge(inner, tmp_path / "ffg")
            assert check_config(MergeConfiguration.model_validate(checked), MergeOptions(quiet=True)).ok
        return result

    monkeypatch.setattr(ModelWidePass, "execute", interleaved)
    _merge(outer, tmp_path / "ota")
    monkeypatch.setattr(ModelWidePass, "execute", execute)
    assert nested
    summary = capsys.readouterr().err
    ota, ffg = _provenance(tmp_path / "ota"), _provenance(tmp_path / "ffg")
    assert (ota["merge_method"], ota["curvature_scale"]) == ("ota", "median")
    assert (ffg["merge_method"], ffg["curvature_scale"]) == ("ffg", None)
    for record, mass in ((ota, 0.6), (ffg, 0.9)):
        assert [e["model"] for e in record["experts"]] == family.experts
        assert {e["density_auto"]["saliency_mass"] for e in record["experts"]} == {mass}
    assert all(e["curvature_scale_statistic"] > 0 for e in ota["experts"])
    assert all("curvature_scale_statistic" not in e for e in ffg["experts"])
    assert {e["bias_correction"]["reason"] for e in ffg["experts"]} == {FFG_BIAS_REASON}
    assert "(target 0.6)" in _section(tmp_path / "ota") and "(target 0.9)" not in _section(tmp_path / "ota")
    assert "(target 0.9)" in _section(tmp_path / "ffg") and "(target 0.6)" not in _section(tmp_path / "ffg")
    assert summary.count("target 0.6)") == summary.count("target 0.9)") == len(family.experts)
    assert "target 0.5)" not in summary
    _merge(_config(family, [None, None]), tmp_path / "plain")
    plain = _provenance(tmp_path / "plain")
    assert all("density_auto" not in e and "curvature_scale_statistic" not in e for e in plain["experts"])


def test_a_model_rewritten_between_two_plans_in_one_process_is_read_again(tmp_path):
    """The weights' headers a plan reads are that plan's own (issue 27, point 3): an expert rewritten in place with
    another base's sizes after one check is read again by the next check in the same process, which refuses it for
    its new sizes (a cache of the process once kept the old ones and blamed the expert's matching store)."""
    from mergekit.options import MergeOptions

    from mergekit_ota.graph.preflight import check_config
    from mergekit_ota.testing import make_family, tiny_llama_config

    family = make_family(str(tmp_path / "family"))
    cfg = MergeConfiguration.model_validate(_config(family, [None, None]))
    assert check_config(cfg, MergeOptions(quiet=True)).ok
    wider = make_family(str(tmp_path / "wide"), n_experts=1, config=tiny_llama_config(hidden_size=96))
    for name in os.listdir(wider.experts[0]):  # expert 1 rewritten in place, its store with it
        shutil.copy(os.path.join(wider.experts[0], name), os.path.join(family.experts[1], name))
    report = check_config(cfg, MergeOptions(quiet=True))
    stem = f"expert {family.experts[1]}: weight 'model.embed_tokens.weight' has shape (128, 96), the base"
    assert any(p.startswith(stem) for p in report.problems), report.problems  # its new size, not the one read first
    assert not any("curvature tensor" in p for p in report.problems), report.problems  # its store matches it
