"""Merging LoRA experts given as ``model: BASE+ADAPTER``, with the curvature ``mergekit-ota export`` derived from
each adapter's optimizer state (docs/lora.md).

Fixtures (``tests/fixtures/peft``, real PEFT + ``transformers.Trainer`` runs, see ``test_export_lora.py``): one tiny
Llama base and three LoRA adapters of it, here three experts of one base: plain LoRA, rsLoRA and LoRA with
``modules_to_save=["lm_head"]``. Each adapter's store is exported into its own directory, where the planner finds it.

The merge of ``BASE+ADAPTER`` experts (mergekit folds each adapter into the base with peft's ``merge_and_unload``)
must equal the merge of the same adapters folded by hand here, with plain torch (``W0 + s B A``, ``s`` from
``adapter_config.json``; ``modules_to_save`` weights replaced), given the same stores; and ``ota``'s result must be
the float64 formula with curvature 0 for the weights an adapter leaves as the base's (store metadata
``adapter_untouched``), whose zeros count in no expert's ``curvature_scale`` mean.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch
import yaml
from click.testing import CliRunner
from merging import merge
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergekit_ota.cli.main import main
from mergekit_ota.curvature.store import CurvatureStore
from mergekit_ota.errors import MergeError
from mergekit_ota.math.reference import reference_ota, reference_rank1, reference_statistic
from mergekit_ota.store_format import ADAPTER_FINGERPRINT, ADAPTER_UNTOUCHED, COL_SUFFIX, ROW_SUFFIX

FIXTURES = Path(__file__).parent / "fixtures" / "peft"
VARIANTS = ("lora", "rslora", "modules_to_save")
STORE = "exp_avg_sq.safetensors"


@dataclass
class LoraExperts:
    """A base, three adapters with their stores inside, the same adapters folded by hand, and a LoRA merge cache."""

    root: Path
    base: Path
    adapters: Dict[str, Path]
    folded: Dict[str, Path]
    cache: Path

    def expert(self, variant: str) -> str:
        """``BASE+ADAPTER`` of ``variant``."""
        return f"{self.base}+{self.adapters[variant]}"

    def store(self, variant: str) -> Path:
        return self.adapters[variant] / STORE


def _invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def _scaling(adapter: Path) -> float:
    """PEFT's ``s`` from ``adapter_config.json``: ``lora_alpha / r``, ``lora_alpha / sqrt(r)`` with rsLoRA."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(r) if config["use_rslora"] else alpha / r


def fold(base: Dict[str, torch.Tensor], adapter: Path) -> Dict[str, torch.Tensor]:
    """The adapter folded into ``base`` by the formula: ``W0 + s B A`` for an adapted weight, the adapter's own
    tensor for a ``modules_to_save`` weight, ``W0`` otherwise."""
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    s = _scaling(adapter)
    folded = {}
    for name, w0 in base.items():
        module = name.removesuffix(".weight")
        a = weights.get(f"base_model.model.{module}.lora_A.weight")
        saved = weights.get(f"base_model.model.{name}")
        if a is not None:
            folded[name] = w0 + (weights[f"base_model.model.{module}.lora_B.weight"] @ a) * s
        else:
            folded[name] = saved if saved is not None else w0
    return folded


def _copy_adapter(source: Path, to: Path) -> Path:
    shutil.copytree(source, to)
    return to


@pytest.fixture(scope="module")
def experts(tmp_path_factory) -> LoraExperts:
    root = tmp_path_factory.mktemp("lora_merge")
    base = root / "base"
    shutil.copytree(FIXTURES / "base", base)
    base_weights = load_file(str(base / "model.safetensors"))
    adapters, folded = {}, {}
    for variant in VARIANTS:
        truth = json.loads((FIXTURES / variant / "truth.json").read_text())
        adapter = _copy_adapter(FIXTURES / variant / "checkpoint-3", root / variant)
        assert set(truth["scaling"].values()) == {_scaling(adapter)}  # PEFT's own s is the formula's
        result = _invoke("export", adapter, adapter / STORE, "--model", base, "--quiet")
        assert result.exit_code == 0, result.output
        adapters[variant] = adapter
        hand = root / f"folded_{variant}"
        hand.mkdir()
        shutil.copy(base / "config.json", hand / "config.json")
        save_file(fold(base_weights, adapter), str(hand / "model.safetensors"))
        folded[variant] = hand
    return LoraExperts(root, base, adapters, folded, root / "lora_cache")


def _config(
    experts: LoraExperts,
    models: List[str],
    method: str = "ota",
    parameters: Optional[List[dict]] = None,
    base: Optional[Path] = None,
    **shared,
) -> dict:
    return {
        "merge_method": method,
        "base_model": str(base or experts.base),
        "models": [{"model": m, "parameters": p or {}} for m, p in zip(models, parameters or [{}] * len(models))],
        "parameters": shared,
        "dtype": "float32",
    }


def _lora_config(experts: LoraExperts, method: str = "ota", **shared) -> dict:
    return _config(experts, [experts.expert(v) for v in VARIANTS], method, **shared)


def _folded_config(experts: LoraExperts, method: str = "ota", **shared) -> dict:
    """The hand-folded experts, each given its adapter's store (the same file) by ``curvature:``."""
    parameters = [{"curvature": str(experts.store(v)), **shared.pop("expert", {})} for v in VARIANTS]
    return _config(experts, [str(experts.folded[v]) for v in VARIANTS], method, parameters, **shared)


def _merge(experts: LoraExperts, cfg: dict, out: Path) -> Dict[str, torch.Tensor]:
    return merge(cfg, out, lora_merge_cache=str(experts.cache))


def _check(experts: LoraExperts, tmp_path: Path, cfg: dict, *args: str, cache: bool = True):
    """``check --json`` of ``cfg``: ``(exit code, report)``."""
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(cfg))
    extra = ["--lora-merge-cache", str(experts.cache)] if cache else []
    result = _invoke("check", path, "--json", *extra, *args)
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.stdout)


def _dense_curvature(store: Path) -> Dict[str, torch.Tensor]:
    """Every record of ``store`` as a dense float64 tensor (a rank-1 one as ``outer(r, c) / sum(r)``)."""
    tensors = load_file(str(store))
    dense = {}
    for key, value in tensors.items():
        if key.endswith(ROW_SUFFIX):
            name = key.removesuffix(ROW_SUFFIX)
            dense[name] = reference_rank1(value, tensors[name + COL_SUFFIX])
        elif not key.endswith(COL_SUFFIX):
            dense[key] = value.double()
    return dense


@pytest.fixture(scope="module")
def ota_merges(experts, tmp_path_factory):
    """The default ``ota`` merge of the three experts, as ``BASE+ADAPTER`` and folded by hand."""
    out = tmp_path_factory.mktemp("ota_merges")
    lora, hand = (
        _merge(experts, _lora_config(experts), out / "lora"),
        _merge(experts, _folded_config(experts), out / "hand"),
    )
    return lora, hand, out / "lora"


def test_ota_of_base_plus_adapter_equals_ota_of_the_adapters_folded_by_hand(experts, ota_merges):
    """mergekit's fold (peft's merge_and_unload) and the formula's give the same merge, with the same stores (found
    in each adapter's directory on one side, given by ``curvature:`` on the other)."""
    lora, hand, _ = ota_merges
    assert sorted(lora) == sorted(hand) == sorted(load_file(str(experts.base / "model.safetensors")))
    for name in hand:
        torch.testing.assert_close(lora[name], hand[name], rtol=1e-6, atol=1e-7, msg=name)


def test_ota_is_the_formula_with_curvature_zero_where_an_adapter_leaves_the_base(experts, ota_merges):
    """Every tensor is float64 OTA (power 0.5, eps 1e-12, curvature_scale mean) over the hand-folded experts, where
    an expert whose store lists the weight in ``adapter_untouched`` has curvature 0 there and each expert's mean is
    over the weights its adapter changed only: norms and embeddings (no adapter changes them) stay the base's
    exactly, and lm_head (only the modules_to_save adapter trains it) is that expert's to within eps."""
    lora, _, out = ota_merges
    base = load_file(str(experts.base / "model.safetensors"))
    curvatures = {v: _dense_curvature(experts.store(v)) for v in VARIANTS}
    for v in VARIANTS:
        untouched = set(json.loads(CurvatureStore(str(experts.store(v))).metadata[ADAPTER_UNTOUCHED]))
        assert untouched == set(base) - set(curvatures[v])  # the store lists every weight it has no record for
    means = {v: reference_statistic(list(curvatures[v].values()), "mean") for v in VARIANTS}
    folded = {v: load_file(str(experts.folded[v] / "model.safetensors")) for v in VARIANTS}
    for name, b in base.items():
        scaled = [curvatures[v].get(name, torch.zeros(b.shape, dtype=torch.float64)) / means[v] for v in VARIANTS]
        expected = reference_ota(b, [folded[v][name] for v in VARIANTS], scaled, [1.0] * len(VARIANTS))
        torch.testing.assert_close(lora[name].double(), expected, rtol=1e-5, atol=1e-8, msg=name)
        if not any(name in curvatures[v] for v in VARIANTS):
            assert torch.equal(lora[name], b), name
    record = json.loads((out / "mergekit_ota_curvature.json").read_text())  # the provenance says which got 0
    zero = {e["model"]: e["stores"][0]["curvature_zero"] for e in record["experts"]}
    assert zero == {experts.expert(v): sorted(set(base) - set(curvatures[v])) for v in VARIANTS}
    assert f"- `{experts.expert('lora')}`: 7 weight(s)" in (out / "README.md").read_text()
    trained = folded["modules_to_save"]["lm_head.weight"]
    assert not torch.equal(trained, base["lm_head.weight"])
    torch.testing.assert_close(lora["lm_head.weight"], trained, rtol=1e-6, atol=1e-9)


def test_ffg_of_base_plus_adapter_equals_ffg_of_the_adapters_folded_by_hand(experts, tmp_path):
    """``ffg`` (density 0.5) the same way; weights no adapter changes stay the base's."""
    lora = _merge(experts, _lora_config(experts, "ffg", density=0.5), tmp_path / "lora")
    hand = _merge(experts, _folded_config(experts, "ffg", density=0.5), tmp_path / "hand")
    base = load_file(str(experts.base / "model.safetensors"))
    for name in hand:
        torch.testing.assert_close(lora[name], hand[name], rtol=1e-6, atol=1e-7, msg=name)
    assert torch.equal(lora["model.norm.weight"], base["model.norm.weight"])
    assert not torch.equal(
        lora["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"]
    )


def test_check_lists_each_adapters_store_with_the_weights_it_leaves_alone(experts, tmp_path):
    """``check`` of ``BASE+ADAPTER`` experts finds each store in its adapter's directory, lists it with its expert,
    the tensors read and how many weights get curvature 0; no fingerprint warning or note (the adapters match)."""
    code, report = _check(experts, tmp_path, _lora_config(experts))
    assert code == 0, report["problems"]
    stores = {use["path"]: use for use in report["stores"]}
    assert sorted(stores) == sorted(str(experts.store(v)) for v in VARIANTS)
    for v in VARIANTS:
        use = stores[str(experts.store(v))]
        assert use["experts"] == [experts.expert(v)]
        assert (use["tensors"], use["untouched"]) == ((15, 6) if v == "modules_to_save" else (14, 7))
    assert report["warnings"] == []
    assert not any("fingerprint" in note for note in report["notes"])
    assert f"mergekit folded 3 LoRA adapter(s) into --lora-merge-cache {experts.cache}" in report["notes"][-1]
    text = _invoke("check", tmp_path / "merge.yml", "--lora-merge-cache", experts.cache).output
    assert f"store {experts.store('lora')}  [{experts.expert('lora')}]" in text
    assert "7 weight(s) its LoRA adapter leaves as the base's get curvature 0" in text


def test_check_without_a_lora_merge_cache_says_what_to_pass(experts, tmp_path):
    """mergekit folds adapters into --lora-merge-cache and refuses without one: check says so in one line."""
    code, report = _check(experts, tmp_path, _lora_config(experts), cache=False)
    assert code == 1
    assert report["problems"] == [
        f"model {experts.expert('lora')} (and 2 more) is a LoRA adapter on a base (BASE+ADAPTER): mergekit folds it "
        f"into the base in a directory it needs to be given; pass --lora-merge-cache DIR (to mergekit-yaml, and to "
        f"check)"
    ]


def test_an_adapter_without_a_store_names_its_directory_and_the_export_to_run(experts, tmp_path):
    """No store in the adapter's directory: the problem names the expert and the adapter directory (not the base's),
    the places tried, and the export command with ``--model BASE``."""
    bare = _copy_adapter(experts.adapters["lora"], tmp_path / "bare_adapter")
    (bare / STORE).unlink()
    code, report = _check(experts, tmp_path, _config(experts, [f"{experts.base}+{bare}"]))
    assert code == 1
    (problem,) = report["problems"]
    assert problem.startswith(f"No curvature for expert {experts.base}+{bare}: ")
    assert f"in its adapter directory {bare} or its export/ subdirectory" in problem
    assert f"mergekit-ota export {bare} {bare / STORE} --model {experts.base}" in problem
    assert "export/exp_avg_sq.safetensors: no such file" in problem


def test_the_export_subdirectory_and_an_explicit_curvature_are_honoured(experts, tmp_path):
    """The adapter's ``export/`` subdirectory is searched as a model's is; ``curvature:`` wins over the adapter's own
    store. Swapping two adapters' stores that way is a warning naming both experts (their adapter fingerprints),
    never a refusal."""
    moved = _copy_adapter(experts.adapters["lora"], tmp_path / "moved")
    (moved / "export").mkdir()
    (moved / STORE).rename(moved / "export" / STORE)
    code, report = _check(experts, tmp_path, _config(experts, [f"{experts.base}+{moved}"]))
    assert code == 0 and [use["path"] for use in report["stores"]] == [str(moved / "export" / STORE)]

    swapped = _config(
        experts,
        [experts.expert("lora"), experts.expert("rslora")],
        parameters=[{"curvature": str(experts.store("rslora"))}, {"curvature": str(experts.store("lora"))}],
    )
    code, report = _check(experts, tmp_path, swapped)
    assert code == 0 and len(report["warnings"]) == 2
    for given, owner in (("lora", "rslora"), ("rslora", "lora")):
        warning = next(w for w in report["warnings"] if w.startswith(f"store {experts.store(owner)}"))
        assert f"given to expert {experts.expert(given)}" in warning
        assert f"expert {experts.expert(owner)}'s adapter" in warning and "swapped" in warning


def _rewrite_store(source: Path, to: Path, **metadata_changes: Optional[str]) -> None:
    """``source`` copied to ``to`` with metadata keys set (a ``None`` value removes the key)."""
    with safe_open(str(source), "pt") as handle:
        metadata = dict(handle.metadata())
    for key, value in metadata_changes.items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    save_file(load_file(str(source)), str(to), metadata=metadata)


def test_lora_store_fingerprints_accept_their_adapter_and_warn_about_another(experts, tmp_path):
    """The export records the adapter file's fingerprint. A hand-folded expert (no adapter to compare) and a store
    without the fingerprint get a note; an adapter whose weights changed since the store was written gets a warning
    naming the store and the expert; none is refused."""
    code, report = _check(experts, tmp_path, _folded_config(experts))
    assert code == 0 and report["warnings"] == []
    notes = [n for n in report["notes"] if "holds a LoRA adapter's curvature" in n]
    assert len(notes) == 3 and all("not given as BASE+ADAPTER" in n for n in notes)

    changed = _copy_adapter(experts.adapters["lora"], tmp_path / "changed")
    weights = load_file(str(changed / "adapter_model.safetensors"))
    key = next(k for k in sorted(weights) if "lora_B" in k)
    weights[key] = weights[key] * 2  # a later checkpoint, say
    save_file(weights, str(changed / "adapter_model.safetensors"))
    code, report = _check(experts, tmp_path, _config(experts, [f"{experts.base}+{changed}"]))
    assert code == 0
    (warning,) = report["warnings"]
    assert warning.startswith(f"store {changed / STORE}") and f"expert {experts.base}+{changed}'s" in warning
    assert "another adapter" in warning

    older = _copy_adapter(experts.adapters["rslora"], tmp_path / "older")
    _rewrite_store(experts.store("rslora"), older / STORE, **{ADAPTER_FINGERPRINT: None})
    code, report = _check(experts, tmp_path, _config(experts, [f"{experts.base}+{older}"]))
    assert code == 0 and report["warnings"] == []
    assert any(str(older / STORE) in n and "not checked" in n for n in report["notes"])


def test_a_weight_neither_stored_nor_listed_untouched_is_still_missing(experts, tmp_path):
    """Curvature 0 only for the weights the store lists in ``adapter_untouched``: another missing weight is the
    usual problem naming the store, the expert and the weight."""
    adapter = _copy_adapter(experts.adapters["lora"], tmp_path / "partial")
    listed = json.loads(CurvatureStore(str(experts.store("lora"))).metadata[ADAPTER_UNTOUCHED])
    _rewrite_store(
        experts.store("lora"),
        adapter / STORE,
        **{ADAPTER_UNTOUCHED: json.dumps(sorted(set(listed) - {"model.norm.weight"}))},
    )
    code, report = _check(experts, tmp_path, _config(experts, [f"{experts.base}+{adapter}"]))
    assert code == 1
    (problem,) = report["problems"]
    assert f"{adapter / STORE}: no curvature tensor 'model.norm.weight' for expert {experts.base}+{adapter}" in problem


def test_an_untouched_weight_that_differs_from_the_base_is_refused(experts, tmp_path, caplog):
    """Curvature 0 assumes task vector 0: a base_model other than the adapter's base (here one norm changed) is
    refused while merging, naming the expert, the weight and what to check; nothing is written."""
    other = tmp_path / "other_base"
    shutil.copytree(experts.base, other)
    weights = load_file(str(other / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] + 1
    save_file(weights, str(other / "model.safetensors"))
    cfg = _config(experts, [experts.expert("lora")], base=other)
    with caplog.at_level(logging.ERROR), pytest.raises(MergeError) as raised:
        _merge(experts, cfg, tmp_path / "out")
    message = str(raised.value)
    assert f"expert {experts.expert('lora')}" in message and "model.norm.weight" in message
    assert f"differs from base_model {other}'s in 32 value(s)" in message and "--lora-merge-dtype" in message
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.fixture(scope="module")
def with_tokenizer(experts, tmp_path_factory) -> Dict[str, Path]:
    """The base and the hand-folded modules_to_save expert with a word-level tokenizer (t0 ... t61), and six
    calibration texts: what ``mergekit-ota fisher`` needs."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("fisher_lora")
    words = [f"t{i}" for i in range(62)] + ["<pad>", "<unk>"]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")
    paths = {"base": root / "base", "folded": root / "folded"}
    shutil.copytree(experts.base, paths["base"])
    shutil.copytree(experts.folded["modules_to_save"], paths["folded"])
    for path in paths.values():
        tokenizer.save_pretrained(path)
    g = torch.Generator().manual_seed(3)
    lines = [" ".join(f"t{int(i)}" for i in torch.randint(0, 62, (7,), generator=g)) for _ in range(6)]
    paths["data"] = root / "data.jsonl"
    paths["data"].write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    return paths


def test_fisher_of_base_plus_adapter_is_the_folded_models_on_the_weights_it_changes(experts, with_tokenizer, tmp_path):
    """``mergekit-ota fisher BASE+ADAPTER``: the Fisher of the adapter folded into the base (peft), equal to the
    Fisher of the model folded by hand on every weight the adapter changes; the weights it leaves as the base's
    are not in the store but listed in ``adapter_untouched`` (the same list export writes), with the adapter's
    fingerprint. Put in the adapter's directory, the merge planner finds it and check passes, no warning."""
    adapter = _copy_adapter(experts.adapters["modules_to_save"], tmp_path / "adapter")
    exported = CurvatureStore(str(adapter / STORE)).metadata
    (adapter / STORE).unlink()
    model = f"{with_tokenizer['base']}+{adapter}"
    common = [with_tokenizer["data"], "--batch-size", "2", "--quiet"]
    result = _invoke("fisher", model, *common[:1], adapter / STORE, *common[1:])
    assert result.exit_code == 0, result.output
    result = _invoke("fisher", with_tokenizer["folded"], *common[:1], tmp_path / "hand.safetensors", *common[1:])
    assert result.exit_code == 0, result.output

    store, hand = load_file(str(adapter / STORE)), load_file(str(tmp_path / "hand.safetensors"))
    untouched = json.loads(exported[ADAPTER_UNTOUCHED])
    assert sorted(store) == sorted(set(hand) - set(untouched)) and len(store) == 15
    for name, value in store.items():
        torch.testing.assert_close(value, hand[name], rtol=1e-5, atol=1e-12, msg=name)
    metadata = CurvatureStore(str(adapter / STORE)).metadata
    assert json.loads(metadata[ADAPTER_UNTOUCHED]) == untouched and metadata["adapter"] == "lora"
    assert metadata[ADAPTER_FINGERPRINT] == exported[ADAPTER_FINGERPRINT]

    code, report = _check(experts, tmp_path, _config(experts, [model], base=with_tokenizer["base"]))
    assert code == 0 and report["warnings"] == []
    (use,) = report["stores"]
    assert (use["path"], use["tensors"], use["untouched"]) == (str(adapter / STORE), 15, 6)


def test_fisher_refuses_a_model_that_is_neither_a_directory_nor_base_plus_adapter(experts, tmp_path):
    """MODEL names what is wrong: a missing directory, an adapter without adapter_config.json."""
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": "t1 t2 t3"}) + "\n")
    result = _invoke("fisher", tmp_path / "nothing", data, tmp_path / "out.safetensors")
    assert result.exit_code == 2 and "does not exist" in result.output
    result = _invoke("fisher", f"{experts.base}+{experts.base}", data, tmp_path / "out.safetensors")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"the adapter {experts.base} holds no adapter_config.json" in result.output
    assert not (tmp_path / "out.safetensors").exists()


def test_model_wide_density_is_a_fraction_of_the_entries_the_adapter_changed(experts, tmp_path):
    """``density_scope: model`` over one LoRA expert keeps half of the entries of the weights its adapter changes
    (to the histogram's precision): the weights it leaves alone count in no fraction, and stay the base's."""
    cfg = _config(experts, [experts.expert("lora")], "ffg", density=0.5, density_scope="model")
    merged = _merge(experts, cfg, tmp_path / "out")
    base = load_file(str(experts.base / "model.safetensors"))
    adapted = _dense_curvature(experts.store("lora"))
    kept = sum(int((merged[name] != base[name]).sum()) for name in adapted)
    total = sum(base[name].numel() for name in adapted)
    assert kept / total == pytest.approx(0.5, abs=0.01)
    assert all(torch.equal(merged[name], base[name]) for name in base if name not in adapted)


def test_fisher_is_the_route_for_an_adapter_export_refuses(experts, with_tokenizer, tmp_path):
    """DoRA (export refuses it, naming this route): ``fisher BASE+ADAPTER`` folds it with peft and stores the
    Fisher of the weights it changes, with the adapter's metadata; ``check`` of ``BASE+ADAPTER`` takes the store."""
    adapter = _copy_adapter(FIXTURES / "dora" / "checkpoint-3", tmp_path / "dora")
    refused = _invoke("export", adapter, tmp_path / "refused.safetensors", "--model", experts.base)
    assert refused.exit_code != 0 and "mergekit-ota fisher BASE+ADAPTER" in refused.output
    model = f"{with_tokenizer['base']}+{adapter}"
    result = _invoke("fisher", model, with_tokenizer["data"], adapter / STORE, "--batch-size", "2", "--quiet")
    assert result.exit_code == 0, result.output
    metadata = CurvatureStore(str(adapter / STORE)).metadata
    untouched = json.loads(metadata[ADAPTER_UNTOUCHED])
    assert len(load_file(str(adapter / STORE))) == 14 and len(untouched) == 7 and metadata["adapter"] == "lora"
    code, report = _check(experts, tmp_path, _config(experts, [model], base=with_tokenizer["base"]))
    assert code == 0 and report["warnings"] == [] and report["stores"][0]["untouched"] == 7


def test_compare_scores_a_base_plus_adapter_expert_folded_and_merges_it(experts, with_tokenizer, tmp_path):
    """``mergekit-ota compare`` with experts named ``BASE+ADAPTER``: each is scored as its adapter folded into the
    base (the modules_to_save expert's scores equal those of the same adapter folded by hand), and its grid
    points are real merges of the adapters, ota with each adapter's own store."""
    base = with_tokenizer["base"]
    models = [f"{base}+{experts.adapters[v]}" for v in VARIANTS]
    cfg = tmp_path / "merge.yml"
    cfg.write_text(yaml.safe_dump(_config(experts, models, "linear", base=base)))
    rows = [
        {**json.loads(line), "task": "saved", "expert": "modules_to_save", "half": ("report", "selection")[i % 2]}
        for i, line in enumerate(with_tokenizer["data"].read_text().splitlines() * 2)
    ]
    data = tmp_path / "heldout.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    grid = ["--methods", "task_arithmetic,ota", "--grid", "task_arithmetic:lambda=1", "--grid", "ota:power=0.5"]
    result = _invoke(
        "compare", cfg, data, out, *grid, "--replicates", "200", "--device", "cpu", "--lora-merge-cache", experts.cache
    )
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    by_path = {m["path"]: m for m in results["models"] if m["kind"] == "expert"}
    saved = by_path[f"{base}+{experts.adapters['modules_to_save']}"]["scores"]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_ota.compare.score import score_rows
    from mergekit_ota.fisher import data as fisher_data

    tokenizer = AutoTokenizer.from_pretrained(with_tokenizer["folded"])
    folded = AutoModelForCausalLM.from_pretrained(with_tokenizer["folded"], dtype=torch.float32)
    samples = fisher_data.read_samples(str(data), 100)
    by_hand = score_rows(folded, fisher_data.rows(tokenizer, samples, 512, as_generated=True), tokenizer.pad_token_id)
    assert saved["tokens"] == by_hand.tokens
    assert saved["nats"] == pytest.approx(by_hand.nats, rel=1e-5)
    points = [m for m in results["models"] if m["kind"] == "point"]
    assert [p["method"] for p in points] == ["task_arithmetic", "ota"]
    assert (out / "best.yml").is_file()


def test_compare_of_base_plus_adapter_experts_without_a_lora_merge_cache_says_what_to_pass(
    experts, with_tokenizer, tmp_path
):
    """Without --lora-merge-cache every grid point, mergekit's methods' too, is refused by check's own rule before
    any merge, naming the option (not mergekit's bare RuntimeError), and OUT is not written."""
    base = with_tokenizer["base"]
    cfg = tmp_path / "merge.yml"
    models = [f"{base}+{experts.adapters[v]}" for v in VARIANTS]
    cfg.write_text(yaml.safe_dump(_config(experts, models, "linear", base=base)))
    out = tmp_path / "out"
    grid = ["--methods", "task_arithmetic,ota", "--grid", "task_arithmetic:lambda=1", "--grid", "ota:power=0.5"]
    result = _invoke("compare", cfg, with_tokenizer["data"], out, *grid, "--device", "cpu")
    assert result.exit_code == 1, result.output
    assert "every grid point: model" in result.output and "pass --lora-merge-cache DIR" in result.output
    assert "Need to specify cache dir" not in result.output and not out.exists()
