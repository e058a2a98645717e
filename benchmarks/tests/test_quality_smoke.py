"""The quality benchmark (benchmarks/quality): task generators, scorer, grafting configs, and a smoke run."""

from __future__ import annotations

import os
import re
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.quality import grafting, merges, tasks
from benchmarks.quality.evaluate import score_rows
from benchmarks.quality.train import IGNORE

PAD_ID = tasks.TOKEN_ID[tasks.PAD]
CAP_NAMES = [c.name for c in tasks.CAPABILITIES]


# --- task generators ------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(CAP_NAMES), seed=st.integers(0, 10**6), hard=st.booleans())
def test_every_generated_answer_is_correct_by_an_independent_check(name, seed, hard):
    """Answers satisfy each capability's definition (checked without the generator's solver)."""
    import random

    cap = tasks.capability(name)
    rng = random.Random(seed)
    size = cap.hard if hard else rng.choice(cap.easy)
    prompt, answer = cap.sample(rng, size, "train")
    if name == "reverse":
        assert len(prompt) == size and answer[::-1] == prompt
    elif name == "sort":
        assert Counter(answer) == Counter(prompt) and list(answer) == sorted(answer)
    elif name == "modadd":
        a, b = prompt.split("+")
        assert len(a) == len(b) == len(answer) == size
        assert all((int(x) + int(y) - int(z)) % 10 == 0 for x, y, z in zip(a, b, answer))
    elif name == "shift":
        assert len(prompt) == len(answer) == size
        assert all((ord(a) - ord(p)) % 26 == 1 for p, a in zip(prompt, answer))
    else:  # swap
        assert len(answer) == len(prompt) == size
        for i in range(0, size - 1, 2):
            assert (answer[i], answer[i + 1]) == (prompt[i + 1], prompt[i])
        if size % 2:
            assert answer[-1] == prompt[-1]


@pytest.mark.parametrize("name", CAP_NAMES)
def test_held_out_prompts_never_occur_in_training_data(name):
    """Validation, test and training prompts (pretraining and fine-tuning) are pairwise disjoint."""
    cap = tasks.capability(name)
    val = {p for p, _ in cap.examples(200, cap.hard, "val", 0)}
    test = {p for p, _ in cap.examples(200, cap.hard, "test", 0)}
    train = {p for size in (*cap.easy, cap.hard) for p, _ in cap.examples(2000, size, "train", 0)}
    assert val and test and train
    assert not (val & test) and not (val & train) and not (test & train)
    pretrain = tasks.pretraining_examples([cap], 2000, seed=3, hard_share=0.5)
    decoded = {"".join(tasks.VOCAB[i] for i in ids[2 : ids.index(tasks.TOKEN_ID[">"])]) for ids, _ in pretrain}
    assert sum(len(p) == len(next(iter(val))) for p in decoded) > 500  # many at the held-out (hard) size
    assert not (decoded & (val | test))


def test_held_out_sets_are_deterministic_distinct_and_fixed_length():
    """The same seed gives the same held-out set; examples are distinct and share one answer length."""
    for cap in tasks.CAPABILITIES:
        first = cap.examples(64, cap.hard, "test", 0, unique=True)
        assert first == cap.examples(64, cap.hard, "test", 0, unique=True)
        assert len({p for p, _ in first}) == 64
        assert len({len(a) for _, a in first}) == 1


def test_encoding_labels_exactly_the_answer_and_matches_the_saved_tokenizer():
    """Labels are -100 except on the answer tokens; the HF tokenizer saved with the models gives the same ids."""
    hf = tasks.hf_tokenizer()
    for cap in tasks.CAPABILITIES:
        prompt, answer = cap.examples(1, cap.hard, "val", 0)[0]
        ids, labels = tasks.encode(cap, (prompt, answer))
        assert labels[: len(ids) - len(answer)] == [IGNORE] * (len(ids) - len(answer))
        assert labels[-len(answer) :] == ids[-len(answer) :]
        assert "".join(tasks.VOCAB[i] for i in ids[-len(answer) :]) == answer
        assert hf(f"{cap.marker}{prompt}>{answer}")["input_ids"] == ids


# --- the scorer -----------------------------------------------------------------------


class _Shifted(torch.nn.Module):
    """A 'model' whose argmax at position t is input token t+1 plus ``offset`` (mod vocab)."""

    def __init__(self, offset: int = 0, wrong_last: bool = False):
        super().__init__()
        self.offset, self.wrong_last = offset, wrong_last

    def forward(self, input_ids, attention_mask=None):
        nxt = torch.roll(input_ids, -1, dims=1)
        lengths = (
            attention_mask.sum(-1) if attention_mask is not None else torch.full((len(input_ids),), input_ids.shape[1])
        )
        if self.wrong_last:  # wrong exactly at the position that predicts each row's last token
            nxt[torch.arange(len(nxt)), lengths - 2] += 1
        logits = torch.nn.functional.one_hot((nxt + self.offset) % len(tasks.VOCAB), len(tasks.VOCAB)).float()
        return type("Out", (), {"logits": logits})()


def _rows(n=24):
    rows = []
    for cap in tasks.CAPABILITIES:
        rows += [tasks.encode(cap, e) for e in cap.examples(n, cap.hard, "test", 0)]
    return rows


def test_oracle_scores_one_and_wrong_model_scores_zero():
    """A model right at every answer token scores 1.0; one wrong at every token scores 0.0; mixed lengths pad fine."""
    rows = _rows()
    right = score_rows(_Shifted(0), rows, PAD_ID, batch_size=7)
    assert right["exact_match"] == 1.0 and right["token_accuracy"] == 1.0
    wrong = score_rows(_Shifted(1), rows, PAD_ID, batch_size=7)
    assert wrong["exact_match"] == 0.0 and wrong["token_accuracy"] == 0.0
    assert wrong["loss"] > right["loss"]


def test_one_wrong_answer_token_fails_exact_match_but_not_the_other_tokens():
    """Wrong only at the last answer token: exact match 0, token accuracy = (L-1)/L per capability."""
    for cap in tasks.CAPABILITIES:
        rows = [tasks.encode(cap, e) for e in cap.examples(16, cap.hard, "test", 0)]
        answer_length = sum(1 for label in rows[0][1] if label != IGNORE)
        result = score_rows(_Shifted(0, wrong_last=True), rows, PAD_ID)
        assert result["exact_match"] == 0.0
        assert result["token_accuracy"] == pytest.approx((answer_length - 1) / answer_length)


class _CausalOracle(torch.nn.Module):
    """Predicts from the prefix only: the true next answer token, except for some rows/positions
    (chosen from the prompt and the answer tokens so far), where it predicts a wrong digit/letter."""

    def forward(self, input_ids, attention_mask=None):
        vocab = len(tasks.VOCAB)
        logits = torch.zeros(*input_ids.shape, vocab)
        sep = tasks.TOKEN_ID[">"]
        for row, ids in enumerate(input_ids.tolist()):
            if sep not in ids:
                continue
            cap = next(c for c in tasks.CAPABILITIES if tasks.TOKEN_ID[c.marker] == ids[1])
            s = ids.index(sep)
            prompt = "".join(tasks.VOCAB[i] for i in ids[2:s])
            answer = cap.solve(prompt)
            for t in range(s, len(ids)):
                done = ids[s + 1 : t + 1]
                if len(done) >= len(answer):
                    continue
                token = tasks.TOKEN_ID[answer[len(done)]]
                if (sum(done) + len(prompt) * len(done)) % 5 == 0 and len(done) > 0:
                    token = (token + 1) % vocab  # a deterministic, prefix-dependent mistake
                logits[row, t, token] = 1.0
        return type("Out", (), {"logits": logits})()


def _greedy(model, ids, answer_length):
    ids = list(ids)
    for _ in range(answer_length):
        logits = model(torch.tensor([ids])).logits
        ids.append(int(logits[0, -1].argmax()))
    return ids[-answer_length:]


def test_teacher_forced_exact_match_equals_greedy_decoding_row_by_row():
    """For a causal model, 'argmax right at every answer position' holds exactly when greedy decoding gives the
    answer."""
    model = _CausalOracle()
    both = {True: 0, False: 0}
    for cap in tasks.CAPABILITIES:
        for example in cap.examples(12, cap.hard, "test", 1):
            ids, labels = tasks.encode(cap, example)
            length = len(example[1])
            greedy = _greedy(model, ids[:-length], length) == ids[-length:]
            forced = score_rows(model, [(ids, labels)], PAD_ID)["exact_match"] == 1.0
            assert greedy == forced, example
            both[greedy] += 1
    assert both[True] and both[False]  # the oracle is right on some rows and wrong on others


# --- merge configs --------------------------------------------------------------------


def test_every_method_gets_at_most_four_settings_and_valid_mergekit_configs():
    """The tuning budget is at most 4 grid points per method and each config validates as a MergeConfiguration."""
    from mergekit.config import MergeConfiguration

    import mergekit_ota

    mergekit_ota.install()  # register ota/ffg and patch mergekit (whether or not the start-up hook is on)

    fisher = {n: {"a": f"fa{n}.safetensors", "b": f"fb{n}.safetensors"} for n in merges.FISHER_NS}
    experts = merges.Experts(
        "base",
        {"a": "ea", "b": "eb"},
        {"a": "va.safetensors", "b": "vb.safetensors"},
        {"a": "ra.safetensors", "b": "rb.safetensors"},
        fisher,
    )
    points = merges.settings(experts)
    counts = Counter(p.method for p in points)
    assert set(counts) == {m.name for m in merges.methods()} - merges.STUDY_ONLY  # the study's only when named
    assert max(counts.values()) <= 4
    assert len({p.slug for p in points}) == len(points)
    for point in points:
        MergeConfiguration.model_validate(point.config)
        curvature = [m["parameters"].get("curvature") for m in point.config["models"]]
        if "rank-1" in point.method:
            assert curvature == ["ra.safetensors", "rb.safetensors"]
        elif "data Fisher" in point.method:
            n = int(point.method.split("N=")[1].split(",")[0].rstrip(")"))
            assert curvature == [fisher[n]["a"], fisher[n]["b"]]
        elif point.method.startswith(("ota", "ffg")):
            assert curvature == ["va.safetensors", "vb.safetensors"]


def test_magnitude_and_random_grafts_are_exactly_masked_task_vectors(tmp_path):
    """Single-expert `ties` = base + top-k(|tau|) per tensor (k = max(1, int(d*numel))); `dare_linear`
    without rescale keeps each entry either at the expert's or the base's value (about d of them)."""
    from safetensors.torch import load_file

    from mergekit_ota.testing import make_family, tiny_llama_config

    family = make_family(str(tmp_path / "models"), n_experts=1, config=tiny_llama_config(vocab_size=64, hidden_size=32))
    base = load_file(os.path.join(family.base, "model.safetensors"))
    expert = load_file(os.path.join(family.experts[0], "model.safetensors"))
    density = 0.2
    for selector in ("magnitude (per tensor)", "random"):
        config = grafting.graft_config(selector, family.base, family.experts[0], family.stores[0], density)
        out = tmp_path / selector.split()[0]
        merges.run_config(config, str(out))
        merged = load_file(os.path.join(out, "model.safetensors"))
        kept = total = 0
        for name, b in base.items():
            tau = (expert[name] - b).flatten()
            got = (merged[name] - b).flatten()
            if selector == "random":
                assert torch.all((got == 0) | torch.isclose(got, tau, rtol=1e-5, atol=1e-7)), name
                kept += int((got != 0).sum())
                total += int((tau != 0).sum())
            else:
                k = max(1, int(density * tau.numel()))
                mask = torch.zeros_like(tau, dtype=torch.bool)
                mask[torch.topk(tau.abs(), k).indices] = True
                assert torch.allclose(got, tau * mask, atol=1e-7), name
        if selector == "random":
            assert abs(kept / total - density) < 0.03


# --- the pipeline end to end ----------------------------------------------------------


def test_smoke_run_writes_a_well_formed_report_and_reuses_its_cache(tmp_path):
    """--smoke: report rows for every method and reference, scores in [0, 1], the plot opens;
    a rerun trains nothing again and gives the same table."""
    import matplotlib.image

    from benchmarks.quality import run

    threads = torch.get_num_threads()
    argv = [
        "--tier",
        "quick",
        "--smoke",
        "--methods",
        "ota",
        "ties",
        merges.fisher_method(16),
        "--cache",
        str(tmp_path / "cache"),
        "--results",
        str(tmp_path / "results"),
    ]
    try:
        data = run.main(argv)
        report = (tmp_path / "results" / "quality-quick-smoke.md").read_text()
        png = tmp_path / "results" / "quality-quick-smoke-grafting.png"
        image = matplotlib.image.imread(str(png))
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100

        table = report.split("## Results (test split)", 1)[1].split("### Findings", 1)[0]
        rows = {line.split("|")[1].strip().strip("*"): line for line in table.splitlines() if line.startswith("| ")}
        expected = ["base", "expert reverse", "expert modadd", "ota", "ties"]
        assert all(name in rows for name in expected), rows.keys()
        for name in expected:
            cells = [c.strip().strip("*") for c in rows[name].split("|")[2:4]]
            assert all(0.0 <= float(c) <= 1.0 for c in cells), rows[name]
        assert "![grafting curves](quality-quick-smoke-grafting.png)" in report
        assert re.search(r"\| FFG \(per tensor\) \| [0-9n]", report)
        work = data["invocation"]["work"]
        assert os.path.isfile(os.path.join(work, "curvature", "modadd-rank1.safetensors"))
        # data Fisher: the store, the ota row against ota, the measurement table, FFG's curve with it
        assert os.path.isfile(os.path.join(work, "curvature", "modadd-fisher16.safetensors"))
        section = report.split("### Data Fisher instead of Adam's exp_avg_sq", 1)[1]
        assert re.search(r"\| ota \(data Fisher, N=16\) - ota \| [-+0-9n]", section), section[:600]
        assert re.search(r"\| modadd/16 \| [-0-9.]+ \[", section)
        assert any(key.startswith(f"graft/modadd/{grafting.FISHER}/") for key in data["models"])
        assert os.path.isfile(os.path.join(work, "configs", merges.slug("ota p=0.5, λ=1") + ".yml"))

        stamp = os.path.getmtime(os.path.join(work, "experts", "modadd", "run.json"))
        again = run.main(argv)
        assert os.path.getmtime(os.path.join(work, "experts", "modadd", "run.json")) == stamp
        assert again["models"] == data["models"]
        second = (tmp_path / "results" / "quality-quick-smoke.md").read_text()
        assert table in second
    finally:
        torch.set_num_threads(threads)


def test_seed_report_lists_every_seed_and_its_mean_and_names_a_missing_run(tmp_path):
    """Two --smoke seeds: the seeds report has, per method, each seed's test G at its validation-chosen point
    (over the skills that are gain skills in both seeds), their mean, one rank per seed, and pooled paired
    intervals; a seed never run is an error naming the command."""
    from benchmarks.quality import compare, paired, run, seeds
    from mergekit_ota.compare import stats

    threads = torch.get_num_threads()
    common = [
        "--tier",
        "quick",
        "--smoke",
        "--methods",
        "ota",
        "ties",
        "--cache",
        str(tmp_path / "cache"),
        "--results",
        str(tmp_path / "results"),
    ]
    try:
        for seed in (0, 1):
            run.main(common + ["--seed", str(seed)])
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "results" / "quality-quick-smoke-seed1.md").is_file()
    path = seeds.main(
        [
            "--tier",
            "quick",
            "--smoke",
            "--seeds",
            "0",
            "1",
            "--cache",
            str(tmp_path / "cache"),
            "--results",
            str(tmp_path / "results"),
        ]
    )
    text = open(path).read()
    loaded = [seeds.load_seed("quick", s, str(tmp_path / "cache"), smoke=True) for s in (0, 1)]
    skills = paired.common_skills([(r["suite"], r["data"]) for r in loaded])
    assert skills, "the smoke experts must lower their own held-out loss (else G is undefined and this checks nothing)"
    for method in ("ota", "ties"):
        per_seed = []
        for r in loaded:
            key = paired.choose(r["suite"], r["data"], skills)[method]["key"]
            per_seed.append(stats.gain(paired.seed_items(r["suite"], r["data"], "test"), key, skills))
        row = next(line for line in text.splitlines() if line.startswith(f"| {method} |"))
        cells = [c.strip().strip("*") for c in row.split("|")[2:-1]]
        assert [float(c) for c in cells[:2]] == pytest.approx(per_seed, abs=5e-4)
        assert float(cells[2]) == pytest.approx(sum(per_seed) / 2, abs=5e-4)
        assert len(cells[4].split(",")) == 2
    assert "## Paired differences" in text and "two-level bootstrap" in text
    assert compare.is_ours("ota") and not compare.is_ours("ties")
    with pytest.raises(FileNotFoundError, match="--seed 7"):
        seeds.main(
            [
                "--tier",
                "quick",
                "--smoke",
                "--seeds",
                "0",
                "7",
                "--cache",
                str(tmp_path / "cache"),
                "--results",
                str(tmp_path / "results"),
            ]
        )


def _scored(val: float, test: float, caps=("reverse", "sort"), rows: int = 100) -> dict:
    """A results.json record: exact match ``val``/``test`` on every capability, as per-item strings."""

    def part(value: float) -> dict:
        hits = round(value * rows)
        return {"exact_match": hits / rows, "rows": rows, "tokens": 8 * rows, "items": "1" * hits + "0" * (rows - hits)}

    return {split: {cap: part(value) for cap in caps} for split, value in (("val", val), ("test", test))}


def test_each_method_is_chosen_on_validation_never_on_test():
    """The reported grid point maximises validation G, even where another point wins on test; its test G and
    norm. are those of that point."""
    from benchmarks.quality import report
    from benchmarks.quality.tiers import QuickSettings, quick_suite

    suite = quick_suite(QuickSettings(capabilities=("reverse", "sort")))
    models = {
        "base": _scored(0.1, 0.1),
        "expert/reverse": _scored(0.8, 0.8),
        "expert/sort": _scored(0.8, 0.8),
        "merge/m/a": _scored(0.4, 0.7),
        "merge/m/b": _scored(0.6, 0.2),
        "merge/n/c": _scored(0.3, 0.3),
    }
    settings = [
        {"method": "m", "label": "a", "key": "merge/m/a"},
        {"method": "m", "label": "b", "key": "merge/m/b"},
        {"method": "n", "label": "c", "key": "merge/n/c"},
    ]
    chosen = {c["method"]: c for c in report.select(suite, {"models": models, "settings": settings})}
    assert chosen["m"]["label"] == "b" and chosen["n"]["label"] == "c"
    assert chosen["m"]["val"] == pytest.approx((0.6 - 0.1) / (0.8 - 0.1))
    assert chosen["m"]["gain"] == pytest.approx((0.2 - 0.1) / (0.8 - 0.1))
    assert chosen["m"]["test"] == pytest.approx(0.2 / 0.8)


def test_gain_averages_only_capabilities_whose_expert_beats_the_base():
    """A capability whose expert gains < MIN_GAIN over the base on validation is left out of G (dividing by
    noise), not allowed to make it n/a; norm. still averages over every capability."""
    from benchmarks.quality import paired, report
    from benchmarks.quality.tiers import QuickSettings, quick_suite

    suite = quick_suite(QuickSettings(capabilities=("reverse", "sort")))

    def record(reverse: float, sort: float) -> dict:
        a, b = _scored(reverse, reverse, ("reverse",)), _scored(sort, sort, ("sort",))
        return {split: {**a[split], **b[split]} for split in ("val", "test")}

    models = {"base": record(0.2, 0.5), "expert/reverse": record(0.8, 0.5), "expert/sort": record(0.2, 0.52)}
    assert paired.gain_skills(suite, {"models": models}) == ["reverse"]
    assert report.norm(suite, models, record(0.5, 0.52), "test") == pytest.approx((0.5 / 0.8 + 0.52 / 0.52) / 2)
    models["expert/reverse"] = record(0.21, 0.5)
    assert paired.gain_skills(suite, {"models": models}) == []


def test_loss_gain_is_the_share_of_the_experts_loss_drop_and_resamples_rows_as_ratios():
    """For a loss headline, G = (loss_base - loss) / (loss_base - loss_expert), each capability's loss the
    ratio nats / tokens summed over its rows (a row of 10 tokens weighs 10x a row of 1), and a skill counts as a
    gain skill when its expert's loss is lower by MIN_GAIN."""
    from benchmarks.quality import paired
    from benchmarks.quality.tiers import FullSettings, full_suite
    from mergekit_ota.compare import stats

    suite = full_suite(FullSettings(domains=("code", "prose")))

    def record(code: tuple, prose: tuple) -> dict:
        def part(nats: list) -> dict:
            tokens = [10, 1]
            return {
                "loss": sum(nats) / sum(tokens),
                "token_accuracy": 0.5,
                "rows": 2,
                "tokens": 11,
                "items": "00",
                "row_tokens": tokens,
                "row_correct": [5, 0],
                "row_nats": list(nats),
            }

        return {split: {"code": part(code), "prose": part(prose)} for split in ("val", "test")}

    models = {
        "base": record((30.0, 3.0), (30.0, 3.0)),
        "expert/code": record((20.0, 2.0), (30.0, 3.0)),
        "expert/prose": record((30.0, 3.0), (29.9, 3.0)),
        "merged": record((25.0, 2.5), (30.0, 3.0)),
    }
    assert paired.gain_skills(suite, {"models": models}) == ["code"]  # prose's expert lowers loss by 0.009 only
    items = paired.seed_items(suite, {"models": models}, "test")
    assert stats.accuracy(items, "base", "code") == pytest.approx(33 / 11)
    assert stats.gain(items, "merged", ["code"]) == pytest.approx((33 / 11 - 27.5 / 11) / (33 / 11 - 22 / 11))
    with pytest.raises(KeyError, match="row_nats"):
        bare = {
            k: {s: {c: {x: y for x, y in v.items() if x != "row_nats"} for c, v in r[s].items()} for s in r}
            for k, r in models.items()
        }
        paired.seed_items(suite, {"models": bare}, "test")


class _CharTokenizer:
    """A stand-in for a HF tokenizer: one id per character (what `domains` needs of one)."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_full_tier_arithmetic_rows_score_exactly_the_true_sum_and_splits_are_disjoint():
    """`a + b = c` rows label only c (and its leading space), c is the true sum, held-out problems never train."""
    from benchmarks.quality import domains

    tok = _CharTokenizer()
    problems = {}
    for split in ("train", "val", "test"):
        rows = domains.arithmetic_rows(tok, split, 40, seed=0)
        texts = ["".join(map(chr, ids)) for ids, _ in rows]
        for (ids, labels), text in zip(rows, texts):
            a, rest = text.split(" + ")
            b, c = rest.split(" =")
            assert int(c) == int(a) + int(b) and len(a) == len(b) == 3
            scored = "".join(chr(i) for i, label in zip(ids, labels) if label != IGNORE)
            assert scored == f" {c.strip()}" and labels[-len(scored) :] == ids[-len(scored) :]
        problems[split] = {t.split(" =")[0] for t in texts}
    assert not (problems["val"] & problems["train"]) and not (problems["test"] & problems["train"])
    assert not (problems["val"] & problems["test"])


def test_full_tier_code_rows_are_full_length_and_every_token_scored():
    """Code rows (the stdlib's own sources) have exactly seq_len tokens, all labelled; splits give different text."""
    from benchmarks.quality import domains

    tok = _CharTokenizer()
    rows = {split: domains.text_rows(tok, "code", split, 64, 3) for split in ("train", "val", "test")}
    for split_rows in rows.values():
        assert len(split_rows) == 3
        assert all(len(ids) == 64 and labels == ids for ids, labels in split_rows)
    assert rows["val"][0][0] != rows["test"][0][0] != rows["train"][0][0]


def test_the_defaults_study_merges_every_scale_variant_of_density_auto_at_each_mass():
    """run.py --study defaults: each curvature_scale variant of the q-grid method keeps density: auto for every
    expert (a variant once lost it and ran as plain ota) and its own scale, over q x lambda."""
    from mergekit.config import MergeConfiguration

    experts = merges.Experts("base", {"a": "ea", "b": "eb"}, {"a": "va.safetensors", "b": "vb.safetensors"})
    points = merges.settings(experts, only=merges.DEFAULTS_STUDY)
    assert {p.method for p in points} == set(merges.DEFAULTS_STUDY)
    study = [p for p in points if p.method in merges.STUDY_ONLY]
    assert len(study) == len(merges.STUDY_ONLY) * len(merges.AUTO_MASSES) * len(merges.MEAN_LAMBDAS)
    scales = set()
    for point in study:
        MergeConfiguration.model_validate(point.config)
        assert [m["parameters"]["density"] for m in point.config["models"]] == ["auto", "auto"], point.method
        assert point.config["parameters"]["saliency_mass"] in merges.AUTO_MASSES
        scales.add((point.config["parameters"]["curvature_scale"], point.config["parameters"].get("bias_correction")))
    assert scales == {("none", None), ("none", False), ("mean", None), ("median", None)}
