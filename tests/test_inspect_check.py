"""`mergekit-ota inspect` (what a curvature store holds) and `mergekit-ota check` (preflight of a merge config).

Expected statistics are computed here independently (a full sort, an explicit outer product);
check's verdicts are compared with what run_merge itself raises.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import yaml
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from mergekit_ota.cli.main import main

Q_PROJ = "model.layers.{}.self_attn.q_proj.weight"
K_PROJ = "model.layers.1.self_attn.k_proj.weight"


# ----------------------------------------------------------------------------- helpers


def _expected_stats(values: torch.Tensor) -> dict:
    """Statistics written out directly: counts, then min / lower median / max of the sorted finite values."""
    flat = values.double().reshape(-1)
    finite = flat[torch.isfinite(flat)]
    ordered = torch.sort(finite).values
    return {
        "numel": flat.numel(),
        "zeros": int((flat == 0).sum()),
        "nan": int(torch.isnan(flat).sum()),
        "inf": int(torch.isinf(flat).sum()),
        "negative": int((finite < 0).sum()),
        "min": float(ordered[0]),
        "median": float(ordered[(ordered.numel() - 1) // 2]),
        "max": float(ordered[-1]),
    }


def _assert_stats(row: dict, expected: dict, rel: float = 1e-6) -> None:
    for key in ("numel", "zeros", "nan", "inf", "negative"):
        assert row[key] == expected[key], (row["name"], key)
    for key in ("min", "median", "max"):
        assert row[key] == pytest.approx(expected[key], rel=rel, abs=1e-30), (row["name"], key)


def _invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def _inspect_json(path: str, *args: str) -> dict:
    result = _invoke("inspect", path, "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _rows(report: dict) -> dict:
    return {row["name"]: row for row in report["tensors"]}


def _write_config(tmp_path, cfg: dict, name: str = "merge.yml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _check(tmp_path, cfg: dict, *args: str):
    """Run `check --json` on ``cfg``; return (exit code, report dict)."""
    result = _invoke("check", _write_config(tmp_path, cfg), "--json", *args)
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.stdout)


def _ota(family, expert_parameters=(None, None), base=True, **shared) -> dict:
    cfg = {
        "merge_method": "ota",
        "models": [{"model": e, **({"parameters": p} if p else {})} for e, p in zip(family.experts, expert_parameters)],
        "dtype": "float32",
    }
    if base:
        cfg["base_model"] = family.base
    if shared:
        cfg["parameters"] = shared
    return cfg


def _store_with(family, path, change, expert: int = 0) -> str:
    """A copy of an expert's store with ``change(dict)`` applied, saved at ``path``."""
    tensors = load_file(family.stores[expert])
    change(tensors)
    save_file(tensors, str(path))
    return str(path)


def _set(name, index, value):
    def change(tensors):
        tensors[name][index] = value

    return change


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Untied 2-layer Llama base + 2 experts with full stores; expert 1 also gets a rank-1 copy of its store."""
    from mergekit_ota.curvature.writer import save_store
    from mergekit_ota.testing import make_family

    fam = make_family(str(tmp_path_factory.mktemp("fam")), n_experts=2)
    fam.rank1 = str(tmp_path_factory.mktemp("rank1") / "expert_1_rank1.safetensors")
    save_store(load_file(fam.stores[1]), fam.rank1, compress=True)
    return fam


@pytest.fixture(scope="module")
def tied_family(tmp_path_factory):
    from mergekit_ota.testing import make_family, tiny_llama_config

    return make_family(
        str(tmp_path_factory.mktemp("tied")), n_experts=1, config=tiny_llama_config(tie_word_embeddings=True)
    )


# ----------------------------------------------------------------------------- stats (pure)


factor = st.lists(st.sampled_from([0.0, 1e-12, 3e-9, 0.5, 1.0, 2.0, 7.0]), min_size=1, max_size=9)


@settings(max_examples=60, deadline=None)
@given(r=factor, c=factor)
def test_rank1_stats_equal_stats_of_the_explicit_outer_product(r, c):
    """rank1_stats(r, c) (from the factors only) equals min/median/max/zeros of outer(r, c) / sum(r) built in full."""
    from mergekit_ota.math.stats import rank1_stats

    r64, c64 = torch.tensor(r, dtype=torch.float64), torch.tensor(c, dtype=torch.float64)
    total = float(r64.sum())
    full = torch.outer(r64, c64) / total if total > 0 else torch.zeros(len(r), len(c), dtype=torch.float64)
    stats = rank1_stats(r64, c64)
    expected = _expected_stats(full)
    _assert_stats({"name": "x", **vars(stats)}, expected, rel=1e-12)
    assert stats.median_exact


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), cuts=st.lists(st.integers(0, 60), max_size=5))
def test_streamed_stats_do_not_depend_on_how_the_tensor_is_cut(seed, cuts):
    """Feeding a tensor (with zeros, NaN, +-Inf, negatives) to StatsAccumulator in any chunks gives its exact stats."""
    from mergekit_ota.math.stats import StatsAccumulator

    g = torch.Generator().manual_seed(seed)
    values = torch.randn(60, generator=g)
    special = torch.randint(0, 60, (6,), generator=g)
    values[special[:2]] = 0.0
    values[special[2]] = float("nan")
    values[special[3]] = float("inf")
    values[special[4]] = float("-inf")
    accumulator = StatsAccumulator(60)
    for start, stop in zip([0, *sorted(cuts)], [*sorted(cuts), 60]):
        accumulator.add(values[start:stop])
    stats = accumulator.result()
    _assert_stats({"name": "x", **vars(stats)}, _expected_stats(values), rel=0)
    assert stats.median_exact


def test_sampled_median_covers_every_column_of_a_wide_tensor():
    """Above the exact limit the median comes from a strided sample that visits every column (no aliasing)."""
    from mergekit_ota.math.stats import tensor_stats

    columns = torch.arange(56, dtype=torch.float32)  # column j holds the value j in every row
    tensor = columns.repeat(4096, 1)
    stats = tensor_stats(
        tensor, exact_median_limit=1000, sample_size=4096
    )  # stride ~56: aliasing would pick one column
    assert not stats.median_exact and stats.median_from < tensor.numel()
    assert stats.median in (27.0, 28.0)


# ----------------------------------------------------------------------------- inspect


def test_inspect_full_store_stats_equal_independent_computation(tmp_path):
    """Per tensor: name, shape, stored dtype, 'full', and min/median/max/zeros/NaN/Inf equal a sort-based
    computation."""
    g = torch.Generator().manual_seed(1)
    tensors = {
        "w": torch.rand(33, 17, generator=g) * 1e-6,
        "with_zeros": torch.where(torch.rand(40, generator=g) < 0.3, 0.0, torch.rand(40, generator=g)),
        "half": (torch.rand(8, 8, generator=g) * 1e-3).to(torch.bfloat16),
    }
    path = str(tmp_path / "full.safetensors")
    save_file(tensors, path)
    rows = _rows(_inspect_json(path))
    assert set(rows) == set(tensors)
    for name, value in tensors.items():
        assert rows[name]["shape"] == list(value.shape) and rows[name]["compression"] == "full"
        _assert_stats(rows[name], _expected_stats(value.float()))
        assert rows[name]["median_exact"]
    assert rows["half"]["dtype"] == "BF16" and rows["w"]["dtype"] == "F32"


def test_inspect_rank1_stats_equal_stats_of_outer_product_over_sum(tmp_path):
    """A rank-1 record's stats equal those of outer(r, c) / sum(r) computed here from the stored factors."""
    from mergekit_ota.curvature.writer import save_store

    g = torch.Generator().manual_seed(2)
    v = torch.rand(24, 10, generator=g) * 1e-5
    v[3] = 0.0  # a zero row: zeros in the reconstruction
    path = str(tmp_path / "r1.safetensors")
    save_store({"m": v, "bias": torch.rand(10, generator=g)}, path, compress=True)
    stored = load_file(path)
    r, c = stored["m:rank1_row"].double(), stored["m:rank1_col"].double()
    rows = _rows(_inspect_json(path))
    assert rows["m"]["compression"] == "rank1" and rows["m"]["shape"] == [24, 10]
    assert rows["m"]["keys"] == ["m:rank1_row", "m:rank1_col"]
    _assert_stats(rows["m"], _expected_stats(torch.outer(r, c) / r.sum()))
    assert rows["m"]["zeros"] == 10
    assert rows["bias"]["compression"] == "full"


def test_inspect_reports_nan_inf_and_negative_values_instead_of_raising(tmp_path):
    """Values the merge refuses (CurvatureStore.load raises) are counted and listed with file and tensor; exit 0."""
    from mergekit_ota.curvature.store import CurvatureStore
    from mergekit_ota.errors import CurvatureError

    bad = torch.rand(6, 5)
    bad[0, 0], bad[1, 1], bad[2, 2], bad[3, 3] = float("nan"), float("inf"), -2.0, -1.0
    path = str(tmp_path / "bad.safetensors")
    save_file({"bad": bad, "good": torch.rand(4)}, path)
    with pytest.raises(CurvatureError):
        CurvatureStore(path).load("bad")
    report = _inspect_json(path)
    row = _rows(report)["bad"]
    assert (row["nan"], row["inf"], row["negative"]) == (1, 1, 2)
    _assert_stats(row, _expected_stats(bad))
    assert any("bad.safetensors: tensor 'bad' has 1 NaN and 1 Inf" in p for p in report["problems"])
    assert any("tensor 'bad' has 2 negative values" in p for p in report["problems"])
    assert _rows(report)["good"]["problems"] == []
    text = _invoke("inspect", path)
    assert text.exit_code == 0 and "1 tensor(s) hold values" in text.output


def test_inspect_rank1_with_negative_factor_shows_the_factors(tmp_path):
    """Invalid rank-1 factors are described as stored (NaN/negative counts of the factors), flagged, not raised."""
    path = str(tmp_path / "r1bad.safetensors")
    save_file({"m:rank1_row": torch.tensor([1.0, -1.0, 2.0]), "m:rank1_col": torch.tensor([1.0, float("nan")])}, path)
    row = _rows(_inspect_json(path))["m"]
    assert row["stats_of"] == "factors" and row["negative"] == 1 and row["nan"] == 1
    assert any("m:rank1_row' has 1 negative" in p for p in row["problems"])
    assert any("m:rank1_col' has 1 NaN" in p for p in row["problems"])


def test_inspect_totals_of_a_sharded_mixed_store_given_as_a_directory(tmp_path):
    """Totals: tensors, full/rank-1 counts, parameters m*n, bytes on disk = shard sizes, full fp32 bytes, ratio."""
    from mergekit_ota.curvature.writer import save_store

    g = torch.Generator().manual_seed(3)
    store_dir = tmp_path / "store"
    save_store({"a": torch.rand(100, 50, generator=g)}, str(store_dir / "part1.safetensors"), compress=True)
    save_store(
        {"b": torch.rand(7, generator=g), "c": torch.rand(3, 4, generator=g)}, str(store_dir / "part2.safetensors")
    )
    index = {
        "weight_map": {
            "a:rank1_row": "part1.safetensors",
            "a:rank1_col": "part1.safetensors",
            "b": "part2.safetensors",
            "c": "part2.safetensors",
        }
    }
    (store_dir / "exp_avg_sq.safetensors.index.json").write_text(json.dumps(index))
    report = _inspect_json(str(store_dir))
    totals = report["totals"]
    on_disk = sum(os.path.getsize(store_dir / f) for f in ("part1.safetensors", "part2.safetensors"))
    assert (totals["tensors"], totals["full"], totals["rank1"]) == (3, 2, 1)
    assert totals["parameters"] == 100 * 50 + 7 + 12
    assert totals["bytes_on_disk"] == on_disk
    assert totals["bytes_full_fp32"] == 4 * (5000 + 7 + 12)
    assert totals["compression_ratio"] == pytest.approx(4 * 5019 / on_disk)
    assert report["header"]["compression"] in ("rank1", "none") and report["header"]["format version"] == "1"
    assert len(report["files"]) == 2
    text = _invoke("inspect", str(store_dir), "--sort", "size")
    assert text.exit_code == 0
    table = text.output.splitlines()
    assert [line.split()[0] for line in table if line.split() and line.split()[0] in ("a", "b", "c")] == ["a", "c", "b"]


def test_inspect_header_metadata_and_sampled_median_are_shown(tmp_path):
    """Header fields come from the store's metadata; a median from a sample is marked '~' and median_exact false."""
    from mergekit_ota.curvature.writer import save_store

    path = str(tmp_path / "meta.safetensors")
    metadata = {"optimizer": "adamw", "beta2": "0.999", "step": "150", "bias_corrected": "false", "source": "trainer"}
    save_store({"w": torch.rand(64, 64)}, path, metadata=metadata)
    report = _inspect_json(path, "--exact-median-limit", "100", "--sample-size", "500")
    header = report["header"]
    assert (header["optimizer"], header["beta2"], header["step"], header["bias-corrected"], header["source"]) == (
        "adamw",
        "0.999",
        "150",
        "false",
        "trainer",
    )
    row = _rows(report)["w"]
    assert not row["median_exact"] and 0 < row["median_from"] < 64 * 64
    assert 0.3 < row["median"] < 0.7  # uniform(0, 1) values
    text = _invoke("inspect", path, "--exact-median-limit", "100", "--sample-size", "500").output
    assert "optimizer: adamw" in text and "~" in next(line for line in text.splitlines() if line.startswith("w "))


def test_inspect_missing_store_is_a_clear_error(tmp_path):
    """A directory without a store: exit 1 with the directory and the expected file names in the message."""
    (tmp_path / "empty").mkdir()
    result = _invoke("inspect", str(tmp_path / "empty"))
    assert result.exit_code == 1 and "holds neither exp_avg_sq.safetensors" in result.output


# ----------------------------------------------------------------------------- check


def test_check_good_config_exits_0_with_summary(family, tmp_path):
    """A correct config (expert 1 on a rank-1 store): exit 0; experts, stores and full vs rank-1 counts reported."""
    cfg = _ota(family, expert_parameters=(None, {"curvature": family.rank1}))
    code, report = _check(tmp_path, cfg)
    assert code == 0 and report["ok"] and report["problems"] == []
    assert len(report["experts"]) == 2
    stores = {s["path"]: s for s in report["stores"]}
    names = load_file(family.stores[0]).keys()
    two_d = sum(v.dim() == 2 for v in load_file(family.stores[0]).values())
    assert stores[family.stores[0]]["tensors"] == len(names) and stores[family.stores[0]]["rank1"] == 0
    assert stores[family.rank1]["rank1"] == two_d and stores[family.rank1]["full"] == len(names) - two_d
    assert report["output_tensors"] == report["with_curvature"] == len(names)
    text = _invoke("check", _write_config(tmp_path, cfg, "text.yml"))
    assert text.exit_code == 0 and text.stdout.startswith("OK")


def test_check_expert_without_store(family, tmp_path):
    """An expert directory with no exp_avg_sq store and no `curvature:`: exit 1 naming the expert and the default
    file."""
    bare = tmp_path / "bare_expert"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(family.experts[0], name), bare / name)
    cfg = _ota(family)
    cfg["models"][0]["model"] = str(bare)
    code, report = _check(tmp_path, cfg)
    assert code == 1
    assert any(
        "No curvature for expert" in p and "bare_expert" in p and "exp_avg_sq.safetensors" in p
        for p in report["problems"]
    )


def test_check_store_lacking_a_tensor_names_tensor_and_file(family, tmp_path):
    path = _store_with(family, tmp_path / "partial.safetensors", lambda t: t.pop(K_PROJ))
    code, report = _check(tmp_path, _ota(family, expert_parameters=({"curvature": path}, None)))
    assert code == 1
    assert report["problems"] == [
        f"{path}: no curvature tensor '{K_PROJ}' for expert {family.experts[0]}, weight {K_PROJ}"
    ]


def test_check_wrong_shape_names_both_shapes(family, tmp_path):
    path = _store_with(
        family, tmp_path / "shape.safetensors", lambda t: t.update({K_PROJ: t[K_PROJ][:, :-1].contiguous()})
    )
    code, report = _check(tmp_path, _ota(family, expert_parameters=({"curvature": path}, None)))
    assert code == 1 and len(report["problems"]) == 1
    assert f"shape.safetensors: curvature tensor '{K_PROJ}' has shape (32, 63)" in report["problems"][0]
    assert "has shape (32, 64)" in report["problems"][0]


@pytest.mark.parametrize(
    "value, message",
    [
        (float("nan"), "has 1 NaN and 0 Inf values"),
        (float("inf"), "has 0 NaN and 1 Inf values"),
        (-1e-9, "has 1 negative values"),
    ],
    ids=["nan", "inf", "negative"],
)
def test_check_scan_finds_bad_values(family, tmp_path, value, message):
    """NaN, Inf or a negative value in a tensor the merge reads: exit 1, file and tensor named (found by the value
    scan)."""
    path = _store_with(family, tmp_path / "values.safetensors", _set(K_PROJ, (0, 5), value), expert=1)
    code, report = _check(tmp_path, _ota(family, expert_parameters=(None, {"curvature": path})))
    assert code == 1
    assert len(report["problems"]) == 1 and report["problems"][0].startswith(f"{path}: tensor '{K_PROJ}' {message}")


def test_check_sample_can_miss_what_full_scan_finds(family, tmp_path):
    """A NaN between the sampled row windows passes a small sample; --full-scan (every value) reports it."""
    embed = "model.embed_tokens.weight"  # 128 x 64: with --sample 512, 8 windows of one row each (rows 0, 18, 36, ...)
    path = _store_with(family, tmp_path / "hidden.safetensors", _set(embed, (5, 7), float("nan")))
    cfg = _ota(family, expert_parameters=({"curvature": path}, None))
    code, report = _check(tmp_path, cfg, "--sample", "512")
    assert code == 0
    store = next(s for s in report["stores"] if s["path"] == path)
    assert store["scanned"] < store["values"]
    code, report = _check(tmp_path, cfg, "--full-scan")
    assert code == 1 and report["problems"] == [
        f"{path}: tensor '{embed}' has 1 NaN and 0 Inf values; exp_avg_sq must be finite"
    ]
    assert next(s for s in report["stores"] if s["path"] == path)["scanned"] == store["values"]


def test_check_honours_slices_layer_offset(family, tmp_path):
    """slices: layer_range [1, 2] -> output layer 0 reads INPUT layer 1: a store lacking layer 0's q_proj passes,
    one lacking layer 1's q_proj fails naming the layer-1 tensor."""

    def sliced(path):
        sources = [{"model": family.base, "layer_range": [1, 2]}] + [
            {"model": e, "layer_range": [1, 2], **({"parameters": {"curvature": path}} if i == 0 else {})}
            for i, e in enumerate(family.experts)
        ]
        return {"merge_method": "ota", "base_model": family.base, "slices": [{"sources": sources}], "dtype": "float32"}

    no_layer0 = _store_with(family, tmp_path / "no_layer0.safetensors", lambda t: t.pop(Q_PROJ.format(0)))
    code, report = _check(tmp_path, sliced(no_layer0))
    assert code == 0, report["problems"]
    no_layer1 = _store_with(family, tmp_path / "no_layer1.safetensors", lambda t: t.pop(Q_PROJ.format(1)))
    code, report = _check(tmp_path, sliced(no_layer1))
    assert code == 1 and len(report["problems"]) == 1
    assert f"no_layer1.safetensors: no curvature tensor '{Q_PROJ.format(1)}'" in report["problems"][0]
    assert f"weight {Q_PROJ.format(1)}" in report["problems"][0]


def test_check_tied_embeddings_read_from_embed_tokens_but_untied_lm_head_is_required(family, tied_family, tmp_path):
    """Tied model, store has model.embed_tokens.weight only: passes. Untied model, store lacks lm_head.weight: fails."""
    assert "lm_head.weight" not in load_file(tied_family.stores[0])
    tied = {"merge_method": "ota", "base_model": tied_family.base, "models": [{"model": tied_family.experts[0]}]}
    code, report = _check(tmp_path, tied)
    assert code == 0, report["problems"]
    path = _store_with(family, tmp_path / "no_head.safetensors", lambda t: t.pop("lm_head.weight"))
    code, report = _check(tmp_path, _ota(family, expert_parameters=({"curvature": path}, None)))
    assert code == 1 and report["problems"] == [
        f"{path}: no curvature tensor 'lm_head.weight' for expert {family.experts[0]}, weight lm_head.weight"
    ]


@pytest.mark.parametrize("density", [0.0, 1.5, -0.2])
def test_check_density_outside_unit_interval(family, tmp_path, density):
    code, report = _check(tmp_path, _ota(family, expert_parameters=({"density": density}, None)))
    assert code == 1 and report["problems"]
    assert report["problems"] == [
        f"model {family.experts[0]}: density must be a number in (0, 1] or 'auto'; got {density}"
    ]
    text = _invoke(
        "check", _write_config(tmp_path, _ota(family, expert_parameters=({"density": density}, None)), "t.yml")
    )
    assert text.exit_code == 1 and "1 problem(s)" in text.stdout  # one line, where the value is written


@pytest.mark.parametrize(
    "cfg_change, message",
    [
        (lambda c: c["parameters"].update(density_scope="model"), "density_scope: model needs one density per expert"),
        (lambda c: c.update(merge_method="ffg", parameters={}), "ffg needs a density or a threshold for every expert"),
        (lambda c: (c.pop("base_model"), c.update(parameters={})), "density/threshold (FFG), which needs a base_model"),
    ],
    ids=["model-scope-two-densities", "ffg-without-density", "ffg-mask-without-base"],
)
def test_check_reports_what_the_planner_reports(family, tmp_path, cfg_change, message):
    """Parameter problems the merge's planner finds are check problems too (exit 1, same message)."""
    from mergekit_ota.errors import PreflightError

    mixed = [{"filter": "mlp", "value": 0.5}, {"value": 0.2}]  # one expert, two densities
    cfg = _ota(family, expert_parameters=({"density": mixed}, None), density_scope="tensor")
    cfg_change(cfg)
    code, report = _check(tmp_path, cfg)
    assert code == 1 and any(message in p for p in report["problems"])
    with pytest.raises(PreflightError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _merge(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_check_lists_several_problems_in_one_run(family, tmp_path):
    """A wrong shape (expert 0) and a negative value plus a missing tensor (expert 1): all reported, exit 1."""
    shape = _store_with(family, tmp_path / "s0.safetensors", lambda t: t.update({K_PROJ: t[K_PROJ][:1].contiguous()}))

    def both(tensors):
        tensors.pop("model.norm.weight")
        tensors[Q_PROJ.format(0)][0, 0] = -1.0

    other = _store_with(family, tmp_path / "s1.safetensors", both, expert=1)
    code, report = _check(tmp_path, _ota(family, expert_parameters=({"curvature": shape}, {"curvature": other})))
    assert code == 1 and len(report["problems"]) == 3
    joined = "\n".join(report["problems"])
    assert "s0.safetensors: curvature tensor" in joined and "has shape (1, 64)" in joined
    assert "s1.safetensors: no curvature tensor 'model.norm.weight'" in joined
    assert f"s1.safetensors: tensor '{Q_PROJ.format(0)}' has 1 negative values" in joined


def _snapshot(*roots) -> dict:
    return {
        os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
        for root in roots
        for d, _, files in os.walk(root)
        for f in files
    }


def test_check_writes_nothing(family, tmp_path, monkeypatch):
    """A failing and a passing check create no file or directory anywhere we look, and leave every store untouched."""
    config_dir = tmp_path / "cfg"
    config_dir.mkdir()
    monkeypatch.chdir(config_dir)
    roots = [str(tmp_path), os.path.dirname(family.base), os.path.dirname(family.rank1)]
    good = _write_config(config_dir, _ota(family), "good.yml")
    bad = _write_config(
        config_dir,
        _ota(family, expert_parameters=({"curvature": str(tmp_path / "absent.safetensors")}, None)),
        "bad.yml",
    )
    before = _snapshot(*roots)
    assert _invoke("check", good).exit_code == 0
    assert _invoke("check", bad, "--full-scan").exit_code == 1
    assert _snapshot(*roots) == before


def _merge(cfg, out):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    import mergekit_ota

    mergekit_ota.install()  # register ota/ffg and patch mergekit (whether or not the start-up hook is on)

    run_merge(MergeConfiguration.model_validate(cfg), str(out), MergeOptions(quiet=True, copy_tokenizer=False))


def test_check_and_merge_report_the_same_header_problems(family, tmp_path):
    """For a config check rejects (wrong shape, missing tensor, missing store), run_merge raises PreflightError
    listing exactly check's problems, before writing anything."""
    from mergekit_ota.errors import PreflightError

    def shape_and_gap(tensors):
        tensors[K_PROJ] = tensors[K_PROJ][:1].contiguous()
        tensors.pop("model.norm.weight")

    path = _store_with(family, tmp_path / "s0.safetensors", shape_and_gap)
    cfg = _ota(family, expert_parameters=({"curvature": path}, {"curvature": str(tmp_path / "absent.safetensors")}))
    code, report = _check(tmp_path, cfg)
    assert code == 1 and len(report["problems"]) == 3
    out = tmp_path / "out"
    with pytest.raises(PreflightError) as caught:
        _merge(cfg, out)
    assert caught.value.problems == report["problems"]
    assert not out.exists()


def test_check_usage_and_config_errors(family, tmp_path):
    """Exit 2 for a missing config file or a method without curvature; exit 1 naming the file for invalid YAML
    and for a local model directory that does not exist (never sent to the Hub)."""
    assert _invoke("check", str(tmp_path / "none.yml")).exit_code == 2
    ties = _write_config(tmp_path, {**_ota(family), "merge_method": "ties"}, "ties.yml")
    result = _invoke("check", ties)
    assert result.exit_code == 2 and "does not use curvature" in result.output
    broken = tmp_path / "broken.yml"
    broken.write_text("merge_method: ota\nmodels: [\n")
    result = _invoke("check", str(broken))
    assert result.exit_code == 1 and "broken.yml: not valid YAML" in result.stdout
    cfg = _ota(family)
    cfg["models"][1]["model"] = str(tmp_path / "no" / "such_expert")
    code, report = _check(tmp_path, cfg)
    assert code == 1 and report["problems"] == [f"model {tmp_path / 'no' / 'such_expert'}: no such directory"]


@pytest.fixture
def hub_offline(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 (environment and huggingface_hub.constants), an empty default hub cache."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


@pytest.mark.parametrize("path", ["./experts/math", "experts/math/v2", "{local}/math", "experts/math"])
def test_check_names_a_model_path_that_is_no_directory_here_at_once(family, tmp_path, monkeypatch, hub_offline, path):
    """A relative model path that does not exist from the working directory is one problem line, `no such
    directory (relative to CWD)`, in well under the ~30 s mergekit spends retrying the Hub: at once where the
    path is local by its form (./, two or more /, an existing first folder), and offline where it may be a Hub
    repo id (org/name), which mergekit 0.1.5 cannot load offline."""
    import time

    (tmp_path / "local").mkdir()
    monkeypatch.chdir(tmp_path)
    path = path.format(local="local")
    cfg = _ota(family)
    cfg["models"][1]["model"] = path
    started = time.perf_counter()
    code, report = _check(tmp_path, cfg)
    assert time.perf_counter() - started < 10.0
    expected = f"model {path}: no such directory (relative to {tmp_path})"
    assert code == 1 and len(report["problems"]) == 1 and report["problems"][0].startswith(expected), report
    if path == "experts/math":
        assert "as a Hub repo id: HF_HUB_OFFLINE is set" in report["problems"][0]


def test_check_says_a_possible_repo_id_that_failed_online_is_no_directory_here(family, tmp_path, monkeypatch):
    """Online, a model path org/name that is no local directory is left to mergekit's Hub lookup; when that
    fails, the problem list also says the path is no directory relative to the working directory."""
    import huggingface_hub.constants
    import mergekit.architecture

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def no_network(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(mergekit.architecture, "get_architecture_info", no_network)
    monkeypatch.chdir(tmp_path)
    cfg = _ota(family)
    cfg["models"][1]["model"] = "experts/math"
    code, report = _check(tmp_path, cfg)
    assert code == 1 and report["problems"] == [
        "mergekit cannot plan this merge: OSError: We couldn't connect to 'https://huggingface.co' to load the files",
        f"model experts/math: no such directory (relative to {tmp_path}), so mergekit looked it up on the Hugging "
        "Face Hub as a repo id",
    ]


@pytest.fixture
def one_cuda_device_at_most(monkeypatch, request):
    """torch as built without CUDA (``"none"``) or with one CUDA device (``"one"``), whatever the machine has."""
    built = request.param == "one"
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: built)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: built)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: int(built))
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: built)
    return request.param


@pytest.mark.parametrize(
    "one_cuda_device_at_most, option, expected",
    [
        ("none", ("--cuda",), "--cuda: this torch (.*) is built without CUDA"),
        ("none", ("--gpu-rich",), "--gpu-rich: this torch (.*) is built without CUDA"),
        ("none", ("--multi-gpu",), "--multi-gpu: torch sees no accelerator"),
        (
            "one",
            ("--device", "cuda:1"),
            r"--device cuda:1: there is no cuda device 1: torch sees 1 \(cuda:0 to cuda:0\)",
        ),
        ("one", ("--device", "gpu"), "--device gpu: 'gpu' is not a torch device"),
        ("none", ("--device", "mps"), "--device mps: torch (.*) sees no mps device here"),
    ],
    indirect=["one_cuda_device_at_most"],
)
def test_check_and_merge_refuse_a_device_option_this_machine_cannot_honour(
    family, tmp_path, one_cuda_device_at_most, option, expected
):
    """`check CONFIG OUT --cuda` on a torch without CUDA (or --device naming a GPU that is not there) fails with
    one problem line naming the option, where it used to say ready and the merge then failed on torch's
    assertion; run_merge of an ota config refuses the same options with the same line, before OUT is created."""
    import re

    from mergekit.options import MergeOptions

    from mergekit_ota.errors import PreflightError

    config = _write_config(tmp_path, _ota(family), "line.yml")
    out = tmp_path / "merged"
    result = _invoke("check", config, str(out), *option, "--json")
    report = json.loads(result.stdout)
    assert result.exit_code == 1 and len(report["problems"]) == 1, result.output
    assert re.fullmatch(expected + ".*", report["problems"][0]), report["problems"]
    flags = {"--cuda": {"cuda": True}, "--gpu-rich": {"gpu_rich": True}, "--multi-gpu": {"multi_gpu": True}}
    options = flags.get(option[0]) or {"device": option[1]}
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge

    with pytest.raises(PreflightError) as caught:
        run_merge(MergeConfiguration.model_validate(_ota(family)), str(out), MergeOptions(quiet=True, **options))
    assert caught.value.problems == report["problems"]
    assert not out.exists()


def test_check_takes_a_mergekit_yaml_command_line(family, tmp_path):
    """`check` in front of a mergekit-yaml line: OUT_PATH and every mergekit-yaml option are accepted; the
    runtime options are named as ignored, the planning ones used; OUT_PATH is refused exactly where the merge
    would refuse it (a foreign non-empty directory), with nothing written there; an option mergekit-yaml does
    not know is a usage error, as mergekit-yaml's own."""
    config = _write_config(tmp_path, _ota(family), "line.yml")
    out = tmp_path / "merged"
    result = _invoke(
        "check", config, str(out), "--low-cpu-memory", "--out-shard-size", "1B", "-j", "2", "--allow-crimes"
    )
    assert result.exit_code == 0, result.output
    note = next(line for line in result.stdout.splitlines() if "ignored" in line)
    assert "--low-cpu-memory" in note and "--out-shard-size" in note and "--num-threads" in note
    assert "--allow-crimes" not in note and not out.exists()
    assert "ignored" not in _invoke("check", config).stdout  # mergekit-yaml's own defaults are not "given"
    options_first = _invoke("check", config, "--out-shard-size", "1B", str(out))
    assert options_first.exit_code == 0, options_first.output
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"\xff\xd8")
    refused = _invoke("check", config, str(foreign), "--json")
    report = json.loads(refused.stdout)
    assert refused.exit_code == 1 and any(
        p.startswith(f"output {foreign}:") and "holiday.jpg" in p for p in report["problems"]
    )
    assert sorted(os.listdir(foreign)) == ["holiday.jpg"]
    unknown = _invoke("check", config, str(out), "--no-such-flag")
    assert unknown.exit_code == 2 and "as mergekit-yaml would" in unknown.output and "--no-such-flag" in unknown.output


# ----------------------------------------------------------------------------- experts of another base


@pytest.fixture(scope="module")
def wider_family(tmp_path_factory):
    """One expert of another base (hidden size 96 against the family's 64), with a store matching its own weights."""
    from mergekit_ota.testing import make_family, tiny_llama_config

    return make_family(str(tmp_path_factory.mktemp("wide")), n_experts=1, config=tiny_llama_config(hidden_size=96))


@pytest.fixture(scope="module")
def longer_vocabulary(tmp_path_factory):
    """One expert whose vocabulary has 2 more rows (130 against 128), every other size the family's."""
    from mergekit_ota.testing import make_family, tiny_llama_config

    return make_family(str(tmp_path_factory.mktemp("vocab")), n_experts=1, config=tiny_llama_config(vocab_size=130))


def test_check_refuses_an_expert_of_another_base_naming_tensor_and_dimension(family, wider_family, tmp_path):
    """An expert whose weights have other sizes than the base's (its store matches its own weights) is a problem
    check finds from the headers, naming the expert, the tensor, the dimension and both sizes; the merge refuses it
    with the same problems before writing anything (mergekit would fail mid-merge pointing at vocabularies)."""
    from mergekit_ota.errors import PreflightError

    cfg = _ota(family)
    cfg["models"][1]["model"] = wider_family.experts[0]
    code, report = _check(tmp_path, cfg)
    assert code == 1
    wide = wider_family.experts[0]
    problems = [p for p in report["problems"] if wide in p]
    assert problems and len(problems) == len(report["problems"])
    head = next(p for p in problems if "'lm_head.weight'" in p)
    assert "(128, 96)" in head and "(128, 64)" in head and "dimension 1 is 96, not 64" in head
    assert family.base in head
    assert not any("vocabular" in p for p in problems)  # the sizes that differ are not the vocabulary's
    text = _invoke("check", _write_config(tmp_path, cfg, "wide.yml"))
    assert text.exit_code == 1 and not text.stdout.startswith("OK")
    out = tmp_path / "out"
    with pytest.raises(PreflightError) as caught:
        _merge(cfg, out)
    assert caught.value.problems == report["problems"]
    assert not out.exists()


def test_check_vocabulary_sizes_differ_only_with_a_tokenizer_or_truncation(family, longer_vocabulary, tmp_path):
    """An expert with 2 more vocabulary rows: without a tokenizer configuration the embedding and head are named
    with the vocabulary axis and the fix; with --unsafe-truncate-embeddings (vocabularies aligned by mergekit) the
    config passes."""
    cfg = _ota(family)
    cfg["models"][1]["model"] = longer_vocabulary.experts[0]
    code, report = _check(tmp_path, cfg)
    assert code == 1 and len(report["problems"]) == 2
    assert all("dimension 0 (the vocabulary axis) is 130, not 128" in p for p in report["problems"])
    assert all("tokenizer" in p for p in report["problems"])
    code, report = _check(tmp_path, cfg, "--unsafe-truncate-embeddings")
    assert code == 0, report["problems"]


def _problem_lines(output: str) -> list:
    return [line for line in output.splitlines() if line.startswith("  - ")]


def test_check_groups_a_problem_repeated_per_tensor_into_one_line_per_file(family, wider_family, tmp_path):
    """A store of another model given to each expert (every tensor's shape wrong): the JSON lists every tensor,
    the text and the merge's error one line per store with the count and the first tensors; an expert of another
    base is one line too."""
    from mergekit_ota.errors import PreflightError

    wrong = wider_family.stores[0]
    copy = str(tmp_path / "copy.safetensors")
    shutil.copy(wrong, copy)
    cfg = _ota(family, expert_parameters=({"curvature": wrong}, {"curvature": copy}))
    code, report = _check(tmp_path, cfg)
    tensors = len(load_file(family.stores[0]))
    assert code == 1 and len(report["problems"]) == 2 * tensors
    text = _invoke("check", _write_config(tmp_path, cfg, "grouped.yml"))
    lines = _problem_lines(text.stdout)
    assert text.exit_code == 1 and len(lines) == 2, text.stdout
    assert "FAILED" in text.stdout and "2 problem(s)" in text.stdout
    for line, path in zip(lines, (wrong, copy)):
        assert line.startswith(f"  - {path}: ") and f"{tensors} tensors" in line and f"{tensors - 3} more" in line
        assert "'model.embed_tokens.weight' (128, 96) vs (128, 64)" in line
    with pytest.raises(PreflightError) as caught:
        _merge(cfg, tmp_path / "out")
    assert str(caught.value).count("\n  - ") == 2
    other_base = _ota(family)
    other_base["models"][1]["model"] = wider_family.experts[0]
    text = _invoke("check", _write_config(tmp_path, other_base, "other.yml"))
    lines = _problem_lines(text.stdout)
    assert len(lines) == 1 and f"{tensors} tensors" in lines[0] and wider_family.experts[0] in lines[0]


def test_group_problems_keeps_single_problems_and_separates_kinds():
    """One problem of a kind is printed as it is; kinds and files are never merged; order is first appearance."""
    from mergekit_ota.errors import Problem, group_problems

    a = [Problem(f"f: tensor '{n}' is bad", kind="f: bad tensors", example=f"'{n}'") for n in "abcde"]
    b = Problem("g: tensor 'x' is bad", kind="g: bad tensors", example="'x'")
    assert group_problems([b]) == ["g: tensor 'x' is bad"]
    assert group_problems([a[0], "plain", b, *a[1:]]) == [
        "f: bad tensors (5 tensors: 'a', 'b', 'c' and 2 more)",
        "plain",
        "g: tensor 'x' is bad",
    ]
    assert group_problems(a[:2]) == ["f: bad tensors (2 tensors: 'a', 'b')"]
    assert a[0] == "f: tensor 'a' is bad" and json.loads(json.dumps(a[0])) == a[0]


def test_problems_are_grouped_by_their_fields_not_read_back_from_their_text():
    """Issue 27, point 4: a problem carries its tensor, expert, parameter and level, and is grouped by them: a
    tensor name with parentheses (which no pattern over the message could read back) is listed as it is, a lone one
    is its message, and a copy or pickle keeps every field."""
    import copy
    import pickle

    from mergekit_ota.errors import Problem, group_problems

    before, after = "ota needs at least one expert with weight > 0", "; weights a: 0.0"
    odd = [Problem.on_tensor(before, f"w({i}).weight", after, parameter="weight") for i in range(5)]
    assert group_problems(odd) == [f"{before} (5 tensors: w(0).weight, w(1).weight, w(2).weight and 2 more){after}"]
    assert group_problems(odd[:1]) == [f"{before} (tensor w(0).weight){after}"] == odd[:1]
    assert (odd[0].tensor, odd[0].parameter, odd[0].level, odd[0].expert) == ("w(0).weight", "weight", "tensor", None)
    config = Problem("model m: weight must be a finite number; got nan", parameter="weight", level="config")
    assert group_problems([config, config, odd[0]]) == [config, odd[0]]  # an exact repeat is printed once
    for kept in (pickle.loads(pickle.dumps(odd[1])), copy.deepcopy(odd[1])):
        assert kept == odd[1] and isinstance(kept, Problem) and kept.fields() == odd[1].fields()
