"""A Muon-trained expert, end to end: ``export`` writes a partial store (the AdamW companion's ``exp_avg_sq``, the
Muon matrices listed as missing), a merge refuses it naming the one command that completes it, ``fisher
--only-missing`` writes the complete store (its own tensors as they were, the missing ones as ``c * F``), and
``ota`` merges it. Both experts are trained here by the real optimizers (``torch.optim.Muon`` with its AdamW
companion, as Muon recipes split a model; ``torch.optim.AdamW``), saved as a checkpoint directory with
``optimizer.pt`` beside the weights."""

from __future__ import annotations

import json
import os
import statistics
from typing import Dict, List

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from mergekit_ota.cli.main import main
from mergekit_ota.store_format import CALIBRATION, ESTIMATORS, MISSING

VOCAB, STEPS = 64, 30


def _tokenizer():  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0")


def _rows(low: int, count: int, seed: int) -> torch.Tensor:
    """Arithmetic progressions mod 32 over tokens ``low .. low + 31``: a skill a tiny model learns in 30 steps."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 32, (count, 1), generator=g)
    step = torch.randint(1, 4, (count, 1), generator=g)
    return low + (start + step * torch.arange(12)) % 32


def _hidden_matrix(name: str, parameter: torch.Tensor) -> bool:
    return parameter.dim() == 2 and "embed_tokens" not in name and "lm_head" not in name


def _train(root: str, name: str, low: int, muon: bool) -> str:
    """Fine-tune the base for :data:`STEPS` steps; save weights, tokenizer and the optimizer's ``state_dict()``
    (Muon's and its companion's as one, AdamW's indices after Muon's) as ``optimizer.pt``; write its data."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(os.path.join(root, "base"))
    named = list(model.named_parameters())
    if muon:
        optimizers = [
            torch.optim.Muon([(n, p) for n, p in named if _hidden_matrix(n, p)], lr=0.02, momentum=0.95),
            torch.optim.AdamW([(n, p) for n, p in named if not _hidden_matrix(n, p)], lr=3e-3, weight_decay=0.0),
        ]
    else:
        optimizers = [torch.optim.AdamW(named, lr=3e-3, weight_decay=0.0)]
    data = _rows(low, 256, seed=1)
    for step in range(STEPS):
        ids = data[(step * 16) % 256 :][:16]
        model(input_ids=ids, labels=ids).loss.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    directory = os.path.join(root, name)
    model.save_pretrained(directory)
    _tokenizer().save_pretrained(directory)
    saved = [o.state_dict() for o in optimizers]
    state, groups, offset = {}, [], 0
    for one in saved:
        state.update({offset + k: v for k, v in one["state"].items()})
        groups += [{**g, "params": [offset + k for k in g["params"]]} for g in one["param_groups"]]
        offset += sum(len(g["params"]) for g in one["param_groups"])
    torch.save({"state": state, "param_groups": groups}, os.path.join(directory, "optimizer.pt"))
    with open(os.path.join(root, f"{name}.jsonl"), "w", encoding="utf-8") as fp:
        for row in _rows(low, 64, seed=2).tolist():
            fp.write(json.dumps({"text": " ".join(f"t{i}" for i in row)}) + "\n")
    return directory


@pytest.fixture(scope="module")
def experts(tmp_path_factory) -> Dict[str, str]:
    """A tiny Llama base; a Muon+AdamW expert and an AdamW expert on two skills; their exports."""
    from transformers import LlamaForCausalLM

    from mergekit_ota.testing import tiny_llama_config

    root = str(tmp_path_factory.mktemp("muon"))
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB, hidden_size=32, num_layers=2)).save_pretrained(
        os.path.join(root, "base")
    )
    _tokenizer().save_pretrained(os.path.join(root, "base"))
    paths = {"root": root, "base": os.path.join(root, "base")}
    paths["muon"] = _train(root, "muon", 0, muon=True)
    paths["adam"] = _train(root, "adam", 32, muon=False)
    for name in ("muon", "adam"):
        paths[f"{name}_data"] = os.path.join(root, f"{name}.jsonl")
        paths[f"{name}_store"] = os.path.join(root, f"{name}_store")
        result = _cli("export", paths[name], paths[f"{name}_store"])
        assert result.exit_code == 0, result.output
        paths[f"{name}_export_output"] = result.output
    paths["completed"] = os.path.join(root, "completed")
    result = _cli(
        "fisher", paths["muon"], paths["muon_data"], paths["completed"], "--only-missing", paths["muon_store"]
    )
    assert result.exit_code == 0, result.output
    paths["all_fisher"] = os.path.join(root, "all_fisher")
    assert _cli("fisher", paths["muon"], paths["muon_data"], paths["all_fisher"]).exit_code == 0
    return paths


def _cli(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, [*map(str, args), "-q"] if args[0] != "check" else list(map(str, args)))


def _store(path: str) -> Dict[str, torch.Tensor]:
    return load_file(os.path.join(path, "exp_avg_sq.safetensors"))


def _metadata(path: str) -> Dict[str, str]:
    with safe_open(os.path.join(path, "exp_avg_sq.safetensors"), "pt") as fp:
        return fp.metadata()


def _muon_names(model_dir: str) -> List[str]:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir)
    return [n for n, p in model.named_parameters() if _hidden_matrix(n, p)]


def _config(paths: Dict[str, str], muon_store: str, **shared: object) -> dict:
    return {
        "merge_method": "ota",
        "base_model": paths["base"],
        "models": [
            {"model": paths["muon"], "parameters": {"curvature": muon_store}},
            {"model": paths["adam"], "parameters": {"curvature": paths["adam_store"]}},
        ],
        "parameters": dict(shared),
        "dtype": "float32",
    }


def test_export_of_muon_writes_the_companion_curvature_and_lists_the_matrices_as_missing(experts):
    """The store holds exactly the AdamW companion's parameters, each equal to its exp_avg_sq; the 14 Muon
    matrices are in 'missing_curvature' with a reason naming torch.optim.Muon; the summary names the command."""
    names = _muon_names(experts["muon"])
    store, metadata = _store(experts["muon_store"]), _metadata(experts["muon_store"])
    missing = json.loads(metadata[MISSING])
    assert sorted(missing) == sorted(names) and len(names) == 14
    assert all("torch.optim.Muon keeps momentum only" in reason for reason in missing.values())
    assert not set(store) & set(names)
    state = torch.load(os.path.join(experts["muon"], "optimizer.pt"), weights_only=True)
    by_name = dict(zip([n for g in state["param_groups"] for n in g["param_names"]], range(10**6)))
    companion = {n: state["state"][i]["exp_avg_sq"] for n, i in by_name.items() if "exp_avg_sq" in state["state"][i]}
    assert set(store) == set(companion) and all(torch.equal(store[n], companion[n]) for n in store)
    text = " ".join(experts["muon_export_output"].split())
    assert "PARTIAL STORE: 14 parameter(s) have no curvature" in text
    assert f"--only-missing {experts['muon_store']}" in text


def test_a_merge_and_check_refuse_the_partial_store_naming_the_command_that_completes_it(experts, tmp_path):
    """mergekit-yaml stops before writing, naming the store, 'partial store' and `fisher EXPERT DATA OUT
    --only-missing STORE`; `mergekit-ota check` reports the same problem (one home: the planner)."""
    import yaml
    from mergekit.scripts.run_yaml import main as run_yaml

    config = tmp_path / "ota.yml"
    config.write_text(yaml.safe_dump(_config(experts, experts["muon_store"])))
    out = tmp_path / "out"
    result = CliRunner().invoke(run_yaml, [str(config), str(out)])
    assert result.exit_code != 0 and not out.exists()
    text = " ".join(str(result.output).split()) + " ".join(str(result.exception or "").split())
    store_file = os.path.join(experts["muon_store"], "exp_avg_sq.safetensors")
    assert "a partial store" in text and "14 tensors" in text
    assert f"`mergekit-ota fisher {experts['muon']} DATA OUT --only-missing {store_file}`" in text
    check = _cli("check", str(config))
    assert check.exit_code != 0 and "a partial store" in check.output and "--only-missing" in check.output


def test_the_completed_store_keeps_its_own_tensors_and_adds_calibrated_fisher_for_the_missing(experts):
    """Own tensors bit for bit; each missing T is c * F_T with F_T the plain `fisher` of T on the same data and c the
    median over the own tensors of mean(v)/mean(F); the metadata records estimators and calibration, lists nothing
    missing, and fingerprints every tensor."""
    partial, completed, fisher = (
        _store(experts["muon_store"]),
        _store(experts["completed"]),
        _store(experts["all_fisher"]),
    )
    metadata = _metadata(experts["completed"])
    names = _muon_names(experts["muon"])
    assert set(completed) == set(fisher) == set(partial) | set(names)
    assert all(torch.equal(completed[n], partial[n]) for n in partial)
    c = statistics.median(float(partial[n].double().mean() / fisher[n].double().mean()) for n in partial)
    calibration = json.loads(metadata[CALIBRATION])
    assert calibration["factor"] == pytest.approx(c, rel=1e-9) and calibration["tensors"] == len(partial)
    for name in names:
        torch.testing.assert_close(completed[name], fisher[name] * c, rtol=1e-6, atol=0)
    estimators = json.loads(metadata[ESTIMATORS])
    assert sorted(estimators["data Fisher"]) == sorted(names)
    assert sorted(estimators["optimizer second moment"]) == sorted(partial)
    assert MISSING not in metadata and metadata["weights_fingerprint"].startswith("sha256:")


def test_inspect_shows_what_a_partial_store_lacks_and_where_each_completed_tensor_came_from(experts):
    """inspect: the partial store's line names the count and the completing command; the completed store's line
    counts tensors per estimator with the factor c, and each row names its tensor's estimator (also in --json)."""
    partial = " ".join(_cli("inspect", experts["muon_store"]).output.split())
    assert "partial 14 tensor(s) have no curvature (torch.optim.Muon keeps momentum only" in partial
    assert "--only-missing" in partial
    completed = _cli("inspect", experts["completed"]).output
    assert "sources  optimizer second moment: 7 tensor(s), data Fisher: 14 tensor(s); data Fisher x " in completed
    rows = {line.split()[0]: line.split()[-1] for line in completed.splitlines() if line.startswith("model.")}
    assert rows["model.layers.0.self_attn.q_proj.weight"] == "Fisher" and rows["model.norm.weight"] == "moment"
    report = json.loads(_cli("inspect", experts["completed"], "--json").output)
    reports = report if isinstance(report, list) else report.get("stores", [report])
    estimators = {t["name"]: t["estimator"] for t in reports[0]["tensors"]}
    assert estimators["lm_head.weight"] == "optimizer second moment"
    assert estimators["model.layers.1.mlp.up_proj.weight"] == "data Fisher"


@pytest.mark.parametrize("scale", ["mean", "none"])
def test_the_completed_store_merges_close_to_an_all_fisher_store_of_the_same_expert(experts, tmp_path, scale):
    """ota over (Muon expert, AdamW expert): with the completed store the merged task vector is within 1/2 of the
    distance that separates the all-Fisher store's merge from a plain average, and closer than the same store
    without the calibration factor c (which the merge would read on the Fisher's own scale)."""
    from merging import merge

    completed = merge(_config(experts, experts["completed"], curvature_scale=scale), tmp_path / "completed")
    fisher = merge(_config(experts, experts["all_fisher"], curvature_scale=scale), tmp_path / "fisher")
    base = load_file(os.path.join(experts["base"], "model.safetensors"))
    experts_w = [load_file(os.path.join(experts[n], "model.safetensors")) for n in ("muon", "adam")]

    def distance(a: Dict[str, torch.Tensor]) -> float:
        num = sum(float((a[k] - fisher[k]).double().pow(2).sum()) for k in base)
        den = sum(float((fisher[k] - base[k]).double().pow(2).sum()) for k in base)
        return (num / den) ** 0.5

    average = {k: (experts_w[0][k] + experts_w[1][k]) / 2 for k in base}
    uncalibrated_dir = tmp_path / "uncalibrated_store"
    uncalibrated_dir.mkdir()
    metadata = _metadata(experts["completed"])
    c = json.loads(metadata[CALIBRATION])["factor"]
    tensors = _store(experts["completed"])
    for name in json.loads(metadata[ESTIMATORS])["data Fisher"]:
        tensors[name] = tensors[name] / c
    from safetensors.torch import save_file

    save_file(tensors, str(uncalibrated_dir / "exp_avg_sq.safetensors"), metadata=metadata)
    uncalibrated = merge(_config(experts, str(uncalibrated_dir), curvature_scale=scale), tmp_path / "uncalibrated")
    assert all(torch.isfinite(t).all() for t in completed.values())
    record = (tmp_path / "completed" / "mergekit_ota_curvature.json").read_text()
    assert '"curvature_estimators"' in record and '"curvature_calibration"' in record
    assert distance(completed) < 0.5 * distance(average)
    assert distance(completed) < distance(uncalibrated)


def test_only_missing_refuses_a_complete_store_another_model_and_its_own_store_as_output(experts, tmp_path):
    """Each before anything is written: a store with nothing missing; a MODEL whose weights are not the ones the
    store was exported for (fingerprint); OUT inside the partial store it reads; BASE+ADAPTER."""
    cases = [
        (experts["muon"], experts["completed"], tmp_path / "a", "lists no missing tensor"),
        (experts["adam"], experts["muon_store"], tmp_path / "b", "exported for other weights than MODEL"),
        (experts["muon"], experts["muon_store"], experts["muon_store"], "is the partial store --only-missing reads"),
    ]
    for model, store, out, expected in cases:
        args = ["fisher", model, experts["muon_data"], out, "--only-missing", store]
        result = _cli(*args, *(["--force"] if out == experts["muon_store"] else []))
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert expected in " ".join(result.output.split()), result.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert set(os.listdir(experts["muon_store"])) == {"exp_avg_sq.safetensors"}
