"""`mergekit-ota analyze`: metrics, name parsing, the streaming walk and the report.

Metric tests check mathematical properties (invariances, brute-force definitions,
constructed masks whose answer is known); walk tests use tiny Llama-named checkpoints
with constructed curvature; end-to-end tests run the CLI on `make_family` models.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import yaml
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from mergekit_ota.analysis import aggregate as agg
from mergekit_ota.analysis.collect import collect
from mergekit_ota.analysis.findings import headline
from mergekit_ota.analysis.inputs import (
    AnalysisRequest,
    ExpertSource,
    open_inputs,
    request_from_arguments,
    split_expert_argument,
)
from mergekit_ota.analysis.metrics import (
    average_ranks,
    cosine,
    effective_rank,
    energy_rank,
    jaccard,
    mask_rank,
    mask_singular_values,
    occupancy,
    random_jaccard,
    spearman,
)
from mergekit_ota.analysis.names import parse_name
from mergekit_ota.analysis.output import StagedDirectory
from mergekit_ota.cli.main import main
from mergekit_ota.curvature.writer import save_store
from mergekit_ota.errors import ConfigError, PreflightError
from mergekit_ota.math.ffg import kept_count

FEW = settings(max_examples=25, deadline=None)
seeds = st.integers(min_value=0, max_value=2**31 - 1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- metrics


@FEW
@given(seed=seeds, n=st.integers(2, 300), scale=st.floats(1e-6, 1e6))
def test_cosine_of_sqrt_curvature_is_scale_invariant(seed, n, scale):
    """cos(sqrt(v), sqrt(c*v)) = 1 for any c > 0 (an expert's curvature scaled, e.g. bias-corrected)."""
    v = torch.rand(n, generator=gen(seed)) * 1e-6
    assert cosine(v.sqrt(), (v * scale).sqrt()) == pytest.approx(1.0, abs=1e-6)


@FEW
@given(seed=seeds, n=st.integers(2, 200))
def test_average_ranks_match_brute_force_definition(seed, n):
    """rank_i = #{x_j < x_i} + (#{x_j == x_i} + 1) / 2, ties included (values drawn from few levels)."""
    x = torch.randint(0, max(2, n // 3), (n,), generator=gen(seed)).float()
    expected = [float((x < xi).sum()) + (float((x == xi).sum()) + 1) / 2 for xi in x]
    assert average_ranks(x).tolist() == pytest.approx(expected)


@FEW
@given(seed=seeds, n=st.integers(3, 200))
def test_spearman_is_one_under_monotone_maps_and_minus_one_reversed(seed, n):
    """Spearman's rho is 1 for x vs exp(x) (and vs 5x), -1 for x vs -x^3."""
    x = torch.randn(n, generator=gen(seed), dtype=torch.float64)
    assert spearman(x, x.exp()) == pytest.approx(1.0)
    assert spearman(x, 5 * x) == pytest.approx(1.0)
    assert spearman(x, -(x**3)) == pytest.approx(-1.0)


@FEW
@given(seed=seeds, shape=st.tuples(st.integers(1, 20), st.integers(1, 20)), d=st.floats(0.05, 0.9))
def test_jaccard_matches_set_definition_identical_one_disjoint_zero(seed, shape, d):
    """J(A, B) = |A and B| / |A or B| as Python sets; J(A, A) = 1; J(A, not A) = 0."""
    g = gen(seed)
    a = torch.rand(shape, generator=g) < d
    b = torch.rand(shape, generator=g) < d
    sa = {i for i, t in enumerate(a.reshape(-1).tolist()) if t}
    sb = {i for i, t in enumerate(b.reshape(-1).tolist()) if t}
    if sa | sb:
        assert jaccard(a, b) == pytest.approx(len(sa & sb) / len(sa | sb))
    if sa:
        assert jaccard(a, a) == 1.0
        assert jaccard(a, ~a) == 0.0


def test_random_jaccard_baseline_matches_simulated_random_masks():
    """Independent random masks of fractions d_a, d_b have Jaccard ~ d_a d_b / (d_a + d_b - d_a d_b)."""
    g = gen(0)
    for d_a, d_b in [(0.05, 0.05), (0.2, 0.05), (0.5, 0.3)]:
        a = torch.rand(400_000, generator=g) < d_a
        b = torch.rand(400_000, generator=g) < d_b
        assert jaccard(a, b) == pytest.approx(random_jaccard(d_a, d_b), rel=0.05)


@FEW
@given(seed=seeds, m=st.integers(2, 30), n=st.integers(2, 30), data=st.data())
def test_mask_confined_to_one_row_has_row_occupancy_one_over_m(seed, m, n, data):
    """A mask inside row r using c distinct columns: row occupancy 1/m, column occupancy c/n."""
    row = data.draw(st.integers(0, m - 1))
    columns = data.draw(st.sets(st.integers(0, n - 1), min_size=1))
    mask = torch.zeros(m, n, dtype=torch.bool)
    mask[row, sorted(columns)] = True
    occ = occupancy(mask)
    assert occ.row_fraction == pytest.approx(1 / m)
    assert occ.col_fraction == pytest.approx(len(columns) / n)


@FEW
@given(seed=seeds, m=st.integers(1, 80), n=st.integers(1, 80))
def test_rank_one_mask_has_effective_rank_one(seed, m, n):
    """outer(a, b) of two non-empty 0/1 vectors: effective rank 1 and 90%-energy rank 1."""
    g = gen(seed)
    a = torch.rand(m, generator=g) < 0.5
    b = torch.rand(n, generator=g) < 0.5
    a[0] = b[-1] = True
    rank = mask_rank(torch.outer(a, b))
    assert rank.effective_rank == pytest.approx(1.0, abs=1e-6)
    assert rank.energy_rank_90 == 1


@pytest.mark.parametrize("blocks,size,tall", [(3, 4, 1), (5, 2, 7), (2, 6, 3)])
def test_k_disjoint_equal_blocks_have_effective_rank_k(blocks, size, tall):
    """A block-diagonal 0/1 mask of k equal all-ones blocks has k equal singular values: effective
    rank k, and the 90%-energy rank is ceil(0.9 k) (square and elongated masks)."""
    mask = torch.block_diag(*[torch.ones(size * tall, size) for _ in range(blocks)]).bool()
    rank = mask_rank(mask)
    assert rank.effective_rank == pytest.approx(blocks, rel=1e-6)
    assert rank.energy_rank_90 == math.ceil(0.9 * blocks)
    assert effective_rank(torch.zeros(4)) == 0.0 and energy_rank(torch.zeros(4)) == 0


@pytest.mark.parametrize("shape", [(300, 40), (40, 300), (64, 60)])
def test_mask_singular_values_equal_svdvals(shape):
    """The Gram-matrix route for elongated masks gives torch.linalg.svdvals' values."""
    mask = torch.rand(shape, generator=gen(1)) < 0.1
    expected = torch.linalg.svdvals(mask.double())
    assert torch.allclose(mask_singular_values(mask), expected, atol=1e-6 * float(expected[0]))


# ----------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name,layer,module",
    [
        ("model.layers.0.self_attn.q_proj.weight", 0, "q"),
        ("model.layers.11.self_attn.k_proj.weight", 11, "k"),
        ("model.layers.3.self_attn.v_proj.bias", 3, "v"),
        ("model.layers.3.self_attn.o_proj.weight", 3, "o"),
        ("model.layers.2.mlp.gate_proj.weight", 2, "gate"),
        ("model.layers.2.mlp.up_proj.weight", 2, "up"),
        ("model.layers.2.mlp.down_proj.weight", 2, "down"),
        ("model.layers.5.input_layernorm.weight", 5, "norms"),
        ("model.layers.5.post_attention_layernorm.weight", 5, "norms"),
        ("model.layers.5.self_attn.q_norm.weight", 5, "norms"),
        ("model.layers.1.block_sparse_moe.experts.4.w2.weight", 1, "down"),
        ("model.layers.1.block_sparse_moe.gate.weight", 1, "other"),
        ("model.embed_tokens.weight", None, "embeddings"),
        ("lm_head.weight", None, "lm_head"),
        ("model.norm.weight", None, "norms"),
        ("vision_tower.patch_embed.proj.weight", None, "other"),
    ],
)
def test_llama_style_names_parse_to_layer_and_module(name, layer, module):
    """Llama/Mistral/Qwen names give their decoder layer and module type; unknown names are 'other'."""
    parsed = parse_name(name)
    assert (parsed.layer, parsed.module) == (layer, module)


# ----------------------------------------------------------------------------- constructed checkpoints

SHAPES = {
    "model.embed_tokens.weight": (48, 16),
    "model.layers.0.self_attn.q_proj.weight": (16, 16),
    "model.layers.0.input_layernorm.weight": (16,),
    "model.layers.1.mlp.down_proj.weight": (16, 32),
    "lm_head.weight": (48, 16),
}


def _write_model(directory, weights, curvature=None, compress=False):
    os.makedirs(directory, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(directory, "model.safetensors"))
    if curvature is not None:
        save_store(curvature, os.path.join(directory, "exp_avg_sq.safetensors"), compress=compress)
    return str(directory)


def _random_tensors(seed, scale=1.0, positive=False):
    g = gen(seed)
    out = {}
    for name, shape in SHAPES.items():
        x = torch.randn(shape, generator=g) * scale
        out[name] = x.abs() + 1e-9 if positive else x
    return out


def _analyse(base, experts, **options):
    request = request_from_arguments(base, experts, **options)
    return collect(open_inputs(request), quiet=True)


@pytest.fixture
def base_dir(tmp_path):
    return _write_model(tmp_path / "base", _random_tensors(0))


def _expert(tmp_path, base_dir, name, seed, curvature=None):
    base = _random_tensors(0)
    tau = _random_tensors(seed, scale=0.01)
    return _write_model(
        tmp_path / name,
        {k: base[k] + tau[k] for k in base},
        curvature if curvature is not None else _random_tensors(seed + 100, scale=1e-6, positive=True),
    )


def test_identical_experts_have_similarity_one_and_full_mask_overlap(tmp_path, base_dir):
    """Two copies of one expert (same weights, same curvature): per tensor cosine 1, Spearman 1,
    top-d curvature Jaccard 1, FFG mask Jaccard 1 and no sign conflicts."""
    a = _expert(tmp_path, base_dir, "a", 1)
    b = _expert(tmp_path, base_dir, "b", 1)
    analysis = _analyse(base_dir, [a, b], density=0.2, spearman_sample=100)
    assert any(r.pairs[0].spearman_entries == 100 < r.numel for r in analysis.records)  # sampled
    for record in analysis.records:
        pair = record.pairs[0]
        assert agg.curvature_cosine(0)([record]) == pytest.approx(1.0, abs=1e-9)
        assert pair.spearman == pytest.approx(1.0)
        assert pair.top_overlap.intersection == pair.top_overlap.union > 0
        assert pair.mask_overlap.intersection == pair.mask_overlap.union > 0
        assert pair.sign_conflicts == 0
    text = " ".join(headline(analysis))
    assert "strikingly similar" in text and "= **1.00**" in text


def test_scaled_curvature_gives_similarity_one(tmp_path, base_dir):
    """Expert B = expert A's weights with curvature c * v_A: cosine, Spearman and both Jaccards are 1
    (saliency scales by c, so the FFG masks are the same too)."""
    v = _random_tensors(7, scale=1e-6, positive=True)
    a = _expert(tmp_path, base_dir, "a", 1, curvature=v)
    b = _expert(tmp_path, base_dir, "b", 1, curvature={k: 37.5 * x for k, x in v.items()})
    analysis = _analyse(base_dir, [a, b], density=0.1)
    records = analysis.records
    assert agg.curvature_cosine(0)(records) == pytest.approx(1.0, abs=1e-6)
    assert agg.curvature_spearman(0)(records) == pytest.approx(1.0)
    assert agg.top_curvature_jaccard(0)(records) == 1.0
    assert agg.mask_jaccard(0)(records) == 1.0


def test_task_vector_in_one_row_gives_row_occupancy_one_over_m(tmp_path, base_dir):
    """An expert that changed only row 5 of q_proj (distinct values, uniform curvature), at a density
    keeping 4 entries there: q_proj's FFG mask uses 1 of 16 rows and 4 of 16 columns."""
    base = _random_tensors(0)
    weights = dict(base)
    name = "model.layers.0.self_attn.q_proj.weight"
    delta = torch.zeros(16, 16)
    delta[5] = torch.linspace(0.1, 1.6, 16)
    weights[name] = base[name] + delta
    ones = {k: torch.ones(s) for k, s in SHAPES.items()}
    expert = _write_model(tmp_path / "row", weights, ones)
    analysis = _analyse(base_dir, [expert], density=4 / 256)
    record = next(r for r in analysis.records if r.name == name)
    occ = record.experts[0].occupancy
    assert (occ.rows_used, occ.rows, occ.cols_used, occ.cols) == (1, 16, 4, 16)
    assert agg.occupancy_fraction(0, "rows")([record]) == pytest.approx(1 / 16)


def test_disjoint_edits_give_zero_mask_overlap(tmp_path, base_dir):
    """Experts that edited disjoint halves of every tensor (curvature only there): FFG masks at a
    density below one half never collide (Jaccard 0, in every cell)."""
    base = _random_tensors(0)
    experts = []
    for half in (0, 1):
        weights, curvature = {}, {}
        for k, x in base.items():
            flat = torch.zeros(x.numel())
            part = slice(0, x.numel() // 2) if half == 0 else slice(x.numel() // 2, None)
            flat[part] = 1.0
            edit = flat.reshape(x.shape)
            weights[k] = x + 0.05 * edit * (1 + torch.rand(x.shape, generator=gen(half)))
            curvature[k] = edit * 1e-6
        experts.append(_write_model(tmp_path / f"half{half}", weights, curvature))
    analysis = _analyse(base_dir, experts, density=0.25)
    assert agg.mask_jaccard(0)(analysis.records) == 0.0
    assert all(v == 0.0 for _, _, v in agg.grid(analysis.records, agg.mask_jaccard(0)).cells())


@pytest.mark.parametrize("compress", [False, True])
def test_per_tensor_density_keeps_exactly_kept_count_in_every_tensor(tmp_path, base_dir, compress):
    """density_scope tensor: every tensor keeps k = kept_count(numel, d) entries in both the FFG and
    the magnitude mask, so every layer x module cell's kept fraction is d up to that rounding."""
    v = _random_tensors(3, scale=1e-6, positive=True)
    base = _random_tensors(0)
    tau = _random_tensors(4, scale=0.01)
    expert = _write_model(tmp_path / "e", {k: base[k] + tau[k] for k in base}, v, compress=compress)
    d = 0.13
    analysis = _analyse(base_dir, [expert], density=d)
    for record in analysis.records:
        assert record.experts[0].kept == kept_count(record.numel, d)
        assert record.experts[0].magnitude_kept == kept_count(record.numel, d)
    for _, _, value in agg.grid(analysis.records, agg.kept_fraction(0)).cells():
        assert value == pytest.approx(d, abs=1 / 16)


def test_absolute_threshold_keeps_salient_entries_and_magnitude_matches_the_count(tmp_path, base_dir):
    """An expert with an absolute threshold T (as in a config): FFG keeps exactly the entries with
    v * tau^2 >= T (counted here directly), and the magnitude baseline keeps as many per tensor."""
    base = _random_tensors(0)
    tau = _random_tensors(5, scale=0.01)
    v = _random_tensors(6, scale=1e-6, positive=True)
    expert = _write_model(tmp_path / "t", {k: base[k] + tau[k] for k in base}, v)
    threshold = 2e-11
    request = AnalysisRequest(
        base=base_dir,
        experts=[
            ExpertSource(
                label="t", model=expert, store=os.path.join(expert, "exp_avg_sq.safetensors"), threshold=threshold
            )
        ],
    )
    analysis = collect(open_inputs(request), quiet=True)
    for record in analysis.records:
        t = (base[record.name] + tau[record.name]) - base[record.name]
        expected = int((v[record.name] * t.square() >= threshold).sum())
        assert record.experts[0].kept == expected
        assert record.experts[0].magnitude_kept == expected
    assert 0 < sum(r.experts[0].kept for r in analysis.records) < sum(r.numel for r in analysis.records)


def test_expert_lacking_a_tensor_or_with_a_wrong_shape_is_named_before_any_output(tmp_path, base_dir):
    """An expert without a tensor the base has, or with another shape, fails preflight naming both."""
    weights = _random_tensors(0)
    del weights["lm_head.weight"]
    weights["model.layers.0.input_layernorm.weight"] = torch.ones(17)
    expert = _write_model(tmp_path / "bad", weights, _random_tensors(1, positive=True))
    with pytest.raises(PreflightError) as error:
        open_inputs(request_from_arguments(base_dir, [expert]))
    message = str(error.value)
    assert "lacks tensor lm_head.weight" in message
    assert "model.layers.0.input_layernorm.weight" in message and "[17]" in message


def test_expert_argument_with_explicit_store(tmp_path, base_dir):
    """EXPERT:STORE reads the curvature from STORE (here outside the expert's directory)."""
    expert = _expert(tmp_path, base_dir, "a", 1)
    elsewhere = str(tmp_path / "stores" / "a.safetensors")
    save_store(_random_tensors(9, positive=True), elsewhere)
    assert split_expert_argument(f"{expert}:{elsewhere}") == (expert, elsewhere)
    request = request_from_arguments(base_dir, [f"{expert}:{elsewhere}"])
    assert request.experts[0].store == elsewhere


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    from mergekit_ota.testing import make_family

    root = tmp_path_factory.mktemp("families")
    return {
        "full": make_family(str(root / "full"), n_experts=2, seed=1),
        "rank1": make_family(str(root / "rank1"), n_experts=3, seed=2, compress=True),
    }


def _pngs_open(directory):
    from matplotlib.image import imread

    names = [n for n in os.listdir(directory) if n.endswith(".png")]
    for name in names:
        image = imread(os.path.join(directory, name))
        assert image.shape[0] > 50 and image.shape[1] > 50, name
    return names


@pytest.mark.parametrize("kind", ["full", "rank1"])
def test_cli_writes_report_and_figures_and_refuses_existing_out(tmp_path, families, kind):
    """`analyze --base B E1 E2 [E3] --out DIR` (full and rank-1 stores) writes report.md, report.html,
    metrics.json and PNGs that open; a second run into DIR is refused without --force."""
    family = families[kind]
    out = tmp_path / "report"
    args = [
        "analyze",
        "--base",
        family.base,
        *family.experts,
        "--out",
        str(out),
        "--quiet",
        "--html",
        "--rank-top",
        "3",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    assert "Headline findings" in report and "mean cosine similarity" in report
    names = _pngs_open(out)
    assert "module_summary.png" in names and "mask_overlap.png" in names
    for name in names:
        assert f"]({name})" in report
    assert (out / "report.html").read_text().count("data:image/png;base64,") == len(names)
    metrics = json.loads((out / "metrics.json").read_text())
    assert (
        len(metrics["tensors"]) == 21 and len(metrics["pairs"]) == len(family.experts) * (len(family.experts) - 1) // 2
    )

    if len(family.experts) >= 3:
        assert "curvature_similarity_matrix.png" in names
    cosines = [
        p["cosine"]["dot"] / math.sqrt(p["cosine"]["xx"] * p["cosine"]["yy"])
        for t in metrics["tensors"]
        for p in t["pairs"]
    ]
    assert f"expert pairs = **{sum(cosines) / len(cosines):.2f}**" in report  # the headline states the data's number

    refused = CliRunner().invoke(main, args)
    assert refused.exit_code != 0 and "--force" in refused.output
    assert (out / "report.md").read_text() == report


def test_force_replaces_only_an_earlier_report_and_a_failure_keeps_it(tmp_path):
    """StagedDirectory: --force replaces a directory an earlier analyze made; an error while writing
    leaves the earlier report untouched and no temporary directory behind."""
    out = tmp_path / "report"
    with StagedDirectory(str(out)) as staging:
        open(os.path.join(staging, "report.md"), "w").write("first")
    with pytest.raises(ConfigError, match="--force"):
        StagedDirectory(str(out)).__enter__()
    with pytest.raises(RuntimeError):
        with StagedDirectory(str(out), force=True) as staging:
            open(os.path.join(staging, "report.md"), "w").write("broken")
            raise RuntimeError("failed half way")
    assert (out / "report.md").read_text() == "first"
    with StagedDirectory(str(out), force=True) as staging:
        open(os.path.join(staging, "report.md"), "w").write("second")
    assert (out / "report.md").read_text() == "second"
    assert sorted(os.listdir(tmp_path)) == ["report"]


def test_cli_never_replaces_a_foreign_directory_and_leaves_nothing_on_error(tmp_path, families):
    """--force does not replace a directory analyze did not make; a failing run creates no --out."""
    family = families["full"]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    result = CliRunner().invoke(
        main, ["analyze", "--base", family.base, *family.experts, "--out", str(foreign), "--force"]
    )
    assert result.exit_code != 0 and (foreign / "precious.txt").read_text() == "keep me"

    out = tmp_path / "never"
    result = CliRunner().invoke(
        main, ["analyze", "--base", family.base, family.experts[0] + ":/no/such/store.safetensors", "--out", str(out)]
    )
    assert result.exit_code != 0 and "does not exist" in result.output
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".never")]


def test_cli_from_merge_config_uses_its_densities_and_model_scope(tmp_path, families):
    """`analyze config.yml` takes base, experts, density and density_scope from a mergekit config; with
    density_scope model each expert's overall kept fraction is its density (to the histogram's ~0.3%).
    (The densities are below the 10% of entries make_family's experts edit: above it, the model-wide
    threshold is 0 and keeps everything, as in the merge.)"""
    family = families["rank1"]
    config = {
        "merge_method": "ota",
        "base_model": family.base,
        "models": [
            {"model": family.experts[0], "parameters": {"density": 0.05}},
            {"model": family.experts[1], "parameters": {"density": 0.02, "curvature": family.stores[1]}},
        ],
        "parameters": {"density_scope": "model"},
    }
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["analyze", str(path), "--out", str(out), "--quiet", "--rank-top", "0"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    total = sum(math.prod(t["shape"]) for t in metrics["tensors"])
    for i, density in enumerate((0.05, 0.02)):
        kept = sum(t["experts"][i]["kept"] for t in metrics["tensors"])
        magnitude = sum(t["experts"][i]["magnitude_kept"] for t in metrics["tensors"])
        assert kept / total == pytest.approx(density, rel=0.01)
        assert magnitude / total == pytest.approx(density, rel=0.01)
    report = (out / "report.md").read_text()
    for label, density in zip(("expert_0", "expert_1"), ("0.05", "0.02")):
        assert f"FFG masks of **{label}** at d={density} (model-wide)" in report


def test_expert_labels_name_the_run_of_a_trainer_checkpoint_and_stay_unique():
    """`runs/math/checkpoint-500` is labelled `math`; plain directories keep their names; clashes get #i."""
    from mergekit_ota.analysis.inputs import unique_labels

    assert unique_labels(["runs/math/checkpoint-500", "runs/code/checkpoint-20/", "models/prose"]) == [
        "math",
        "code",
        "prose",
    ]
    assert unique_labels(["a/x", "b/x"]) == ["x#0", "x#1"]


def test_cli_from_a_density_auto_config_keeps_what_the_merge_keeps_and_draws_the_mass_curve(tmp_path, families):
    """`analyze config.yml` with `density: auto` (model-wide, saliency_mass 0.9): each expert's FFG mask keeps the
    density the merge records in its provenance for the same config, at least 0.9 of its saliency mass (to one
    histogram bin), and the report's mass-vs-density table shows that density at 90% mass; the figure is drawn.
    With density_scope: tensor written the config is refused with the merge's message, and nothing is written."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from mergekit_ota.graph.provenance import PROVENANCE_FILE

    family = families["full"]
    config = {
        "merge_method": "ota",
        "base_model": family.base,
        "models": [{"model": e, "parameters": {"density": "auto"}} for e in family.experts],
        "parameters": {"density_scope": "model", "saliency_mass": 0.9},
        "dtype": "float32",
    }
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["analyze", str(path), "--out", str(out), "--quiet", "--rank-top", "0"])
    assert result.exit_code == 0, result.output
    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "merged"), MergeOptions(quiet=True))
    with open(tmp_path / "merged" / PROVENANCE_FILE, encoding="utf-8") as fp:
        chosen = {e["model"]: e["density_auto"] for e in json.load(fp)["experts"]}
    metrics = json.loads((out / "metrics.json").read_text())
    total = sum(math.prod(t["shape"]) for t in metrics["tensors"])
    report = (out / "report.md").read_text()
    for i, expert in enumerate(family.experts):
        kept = sum(t["experts"][i]["kept"] for t in metrics["tensors"])
        mass = sum(t["experts"][i]["kept_saliency"] for t in metrics["tensors"]) / sum(
            t["experts"][i]["saliency_sum"] for t in metrics["tensors"]
        )
        assert kept / total == pytest.approx(chosen[expert]["density"], abs=1e-9)
        assert mass >= 0.9 - 0.01
        curve = metrics["saliency_mass_curve"][f"expert_{i}"]
        assert dict(map(tuple, curve["at_mass"]))[0.9] == pytest.approx(kept / total, abs=1e-9)
        assert "density: auto (saliency_mass 0.9, model-wide)" in report
    assert "saliency_mass_curve.png" in _pngs_open(out)

    config["parameters"]["density_scope"] = "tensor"
    path.write_text(yaml.safe_dump(config))
    refused = CliRunner().invoke(main, ["analyze", str(path), "--out", str(tmp_path / "never")])
    assert refused.exit_code != 0 and "got density_scope: tensor" in refused.output, refused.output
    assert "Traceback" not in refused.output and not (tmp_path / "never").exists()


def test_the_html_report_shows_labels_and_captions_as_text():
    """report.html: an HTML tag in a label or a paragraph is shown, not interpreted (code spans keep their text); a
    figure caption's v*tau^2 is not emphasis; metrics.json never holds a bare NaN (a dict's NaN becomes null)."""
    from mergekit_ota.analysis.report import Document, _jsonable

    doc = Document()
    doc.add("p", "expert <b>bold</b> and `x < y`")
    doc.add("table", (["expert"], [["<i>label</i>"]]))
    rendered = doc.html("/nonexistent", "t")
    body = rendered.split("<body>", 1)[1]
    assert "<b>" not in body and "&lt;b&gt;bold" in body.replace("&lt;b>", "&lt;b&gt;")
    assert "<i>" not in body and "<code>x &lt; y</code>" in body
    figure = Document()
    figure.add("img", ("missing.png", "share of saliency v*tau^2"))
    assert "*share of saliency v\\*tau^2*" in figure.markdown()
    assert _jsonable({"own": (float("nan"), 0.5), "nested": {"x": float("inf")}}) == {
        "own": [None, 0.5],
        "nested": {"x": None},
    }


@pytest.mark.parametrize(
    "hidden, html, named",
    [(("matplotlib",), False, "matplotlib"), (("markdown",), True, "markdown"), (("matplotlib", "markdown"), True, "")],
)
def test_analyze_without_its_extra_says_in_one_line_which_extra_to_install(tmp_path, monkeypatch, hidden, html, named):
    """matplotlib and markdown are the `analyze` extra, not core dependencies: without them (imports made to fail
    in-process) `analyze` exits 1 with one `Error:` line naming the missing package and the pip command, before
    it reads an input or creates OUT; markdown is needed only for --html."""
    import sys

    for name in hidden:
        for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            monkeypatch.delitem(sys.modules, loaded)
        monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError
    out = tmp_path / "report"
    args = ["analyze", "--base", str(tmp_path / "no-base"), str(tmp_path / "no-expert"), "--out", str(out)]
    result = CliRunner().invoke(main, args + (["--html"] if html else []))
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert lines[0].endswith("pip install 'mergekit-ota[analyze]'") and named in lines[0]
    if hidden == ("matplotlib", "markdown"):
        assert "matplotlib and markdown" in lines[0]
    assert not out.exists()


def test_analyze_without_html_does_not_need_markdown(monkeypatch):
    """markdown only renders report.html: a report without --html goes ahead when only markdown is missing."""
    import sys

    from mergekit_ota.analysis.report import require_report_packages
    from mergekit_ota.errors import OTAError

    monkeypatch.setitem(sys.modules, "markdown", None)
    require_report_packages(with_html=False)
    with pytest.raises(OTAError, match=r"needs markdown .*pip install 'mergekit-ota\[analyze\]'"):
        require_report_packages(with_html=True)
