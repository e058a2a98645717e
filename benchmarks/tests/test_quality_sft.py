"""The quality benchmark's sft tier: chat skills, chat-template encoding, fast scorer, answer-only loss,
paired statistics, selection on validation, and a smoke run of the whole tier on a tiny random Llama."""

from __future__ import annotations

import datetime
import json
import os
import time
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.quality import evaluate, skills, stats
from benchmarks.quality.train import IGNORE, answer_only_loss, collate

SKILL_NAMES = [s.name for s in skills.SKILLS]


@pytest.fixture(scope="module")
def tokenizer():
    return skills.chat_tokenizer_for_tests()


def _tiny_model(tok, seed=0):
    from transformers import LlamaForCausalLM

    from mergekit_ota.testing import tiny_llama_config

    config = tiny_llama_config(vocab_size=len(tok), hidden_size=32, tie_word_embeddings=True)
    config.max_position_embeddings = 256
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


# --- skills ---------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(name=st.sampled_from(SKILL_NAMES), seed=st.integers(0, 10**6), split=st.sampled_from(["train", "val", "test"]))
def test_every_answer_follows_its_convention_by_an_independent_check(name, seed, split):
    """Answers satisfy each skill's definition, checked without the skill's solver (dates via datetime)."""
    cue = skills.skill(name)
    message, answer = cue.items(1, split, seed)[0]
    assert message.startswith(cue.instruction + " ")
    source = message[len(cue.instruction) + 1 :]
    words = source.split()
    if cue.family == "phrase":
        assert 2 <= len(words) <= 4
        expected = {
            "snake": "_".join(words),
            "kebab": "-".join(words),
            "camel": words[0] + "".join(w[:1].upper() + w[1:] for w in words[1:]),
        }[name]
        assert answer == expected
    elif cue.family == "date":
        date = datetime.datetime.strptime(source, "%d %B %Y").date()
        fmt = {"iso_date": "%Y-%m-%d", "us_date": "%m/%d/%Y", "eu_date": "%d.%m.%Y"}[name]
        assert answer == date.strftime(fmt)
    else:
        assert 2 <= len(words) <= 3 and all(w[0].isupper() for w in words)
        assert answer == "".join(w[0] + "." for w in words)


@pytest.mark.parametrize("family", sorted(skills.FAMILIES))
def test_held_out_inputs_never_occur_in_any_skills_training_data(family):
    """Validation, test and training inputs of a family are disjoint across every skill that uses it, and
    each held-out split has well over 200 distinct inputs."""
    members = [s for s in skills.SKILLS if s.family == family]
    sources = {split: set() for split in ("train", "val", "test")}
    for cue in members:
        for split, count in (("train", 2000), ("val", 100), ("test", 250)):
            for message, _ in cue.items(count, split, seed=3):
                sources[split].add(message[len(cue.instruction) + 1 :])
    assert not (sources["val"] & sources["test"])
    assert not (sources["train"] & (sources["val"] | sources["test"]))
    assert len(sources["test"]) >= 250 and all(skills.split_of(family, s) == "test" for s in sources["test"])


def test_conflicting_skills_share_inputs_and_differ_only_in_cue_and_answer():
    """snake/camel (and the date conventions) read the same kind of input: the same input gives prompts that
    differ only in the instruction, and different answers."""
    for a, b in (("snake", "camel"), ("iso_date", "us_date")):
        sa, sb = skills.skill(a), skills.skill(b)
        assert sa.family == sb.family and sa.instruction != sb.instruction
        source = skills.inputs(sa.family, 1, "test", "x")[0]
        assert sa.message(source).endswith(source) and sb.message(source).endswith(source)
        assert sa.solve(source) != sb.solve(source)


def test_chat_rows_label_exactly_the_answer_and_the_end_of_turn(tokenizer):
    """A row is the chat template's conversation up to the answer's end-of-turn token; labels are IGNORE on
    the whole generation prompt and equal the ids on the answer and its end-of-turn token."""
    end = skills.end_of_turn_id(tokenizer)
    for cue in skills.SKILLS:
        message, answer = cue.items(1, "val", 0)[0]
        ids, labels = skills.chat_row(tokenizer, message, answer)
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True)
        prompt = skills._ids(prompt)
        assert ids[: len(prompt)] == prompt and labels[: len(prompt)] == [IGNORE] * len(prompt)
        assert labels[len(prompt) :] == ids[len(prompt) :] and ids[-1] == end
        assert "".join(tokenizer.convert_ids_to_tokens(ids[len(prompt) : -1])) == answer
        text = "".join(tokenizer.convert_ids_to_tokens(ids))
        assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
        assert f"<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>" in text


# --- scoring and loss -----------------------------------------------------------------


def test_fast_scorer_matches_the_plain_scorer_item_by_item(tokenizer):
    """score_items (shared-prefix KV cache, head on answer positions only) gives score_rows' numbers and, per
    item, the exact match, token count, correct tokens and nats of scoring that row alone; with and without the
    prefix cache alike."""
    model = _tiny_model(tokenizer)
    rows = []
    for name in ("snake", "iso_date", "initials"):
        rows += skills.rows(tokenizer, skills.skill(name).items(6, "test", 0))
    # make some rows exact matches: rows whose answer is what this random model predicts
    forced = []
    for ids, labels in rows[:4]:
        start = next(t for t, label in enumerate(labels) if label != IGNORE)
        seq = ids[:start]
        for _ in range(len(ids) - start):
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
        forced.append((seq, [IGNORE] * start + seq[start:]))
    rows = forced + rows
    pad = tokenizer.pad_token_id
    plain = evaluate.score_rows(model, rows, pad, 5)
    fast = evaluate.score_items(model, rows, pad, 5)
    fast_no_prefix = evaluate.score_items(model, rows, pad, 5, share_prefix=False)
    for key in ("exact_match", "token_accuracy", "rows", "tokens"):
        assert fast[key] == plain[key] == fast_no_prefix[key]
    assert fast["loss"] == pytest.approx(plain["loss"], rel=1e-4)
    assert fast["items"] == fast_no_prefix["items"]
    alone = [evaluate.score_rows(model, [row], pad) for row in rows]
    singles = "".join(str(int(one["exact_match"])) for one in alone)
    assert fast["items"] == singles and "1" in singles and "0" in singles
    assert fast["row_tokens"] == [one["tokens"] for one in alone]
    assert fast["row_correct"] == [round(one["token_accuracy"] * one["tokens"]) for one in alone]
    assert fast["row_nats"] == pytest.approx([one["loss"] * one["tokens"] for one in alone], rel=1e-4)
    assert sum(fast["row_nats"]) / sum(fast["row_tokens"]) == pytest.approx(fast["loss"], rel=1e-5)


def test_greedy_decoding_agrees_with_teacher_forced_exact_match(tokenizer):
    """model.generate's greedy answers (left-padded, stopping at end of turn) equal the stored answer exactly on
    the rows score_items calls exact matches, and only there (a tiny Llama that memorised some rows)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is fastest, and immune to a busy machine
    try:
        model = _tiny_model(tokenizer, seed=1).train()
        end = skills.end_of_turn_id(tokenizer)
        memorised = skills.rows(tokenizer, skills.skill("camel").items(3, "train", 0))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        batch = collate(memorised, tokenizer.pad_token_id)
        for _ in range(60):
            optimizer.zero_grad()
            model(**batch).loss.backward()
            optimizer.step()
        model.eval()
    finally:
        torch.set_num_threads(threads)
    rows = memorised + skills.rows(tokenizer, skills.skill("camel").items(5, "test", 0))
    items = evaluate.score_items(model, rows, tokenizer.pad_token_id, 4)["items"]
    decoded = evaluate.greedy_answers(model, tokenizer, rows, end, batch_size=3)
    greedy = "".join("1" if a == skills.answer_of(r) else "0" for a, r in zip(decoded, rows))
    assert items == greedy
    assert "1" in items and "0" in items, items


def test_answer_only_loss_equals_the_models_own_loss_and_gradients(tokenizer):
    """The Trainer's answer-only loss equals model(**inputs).loss, with and without num_items_in_batch, and
    gives the same gradients."""
    model = _tiny_model(tokenizer).train()
    rows = skills.rows(
        tokenizer, skills.skill("us_date").items(3, "train", 0) + skills.skill("snake").items(3, "train", 0)
    )
    batch = collate(rows, tokenizer.pad_token_id)
    reference = model(**batch).loss
    ours = answer_only_loss(model, batch)
    assert float(ours) == pytest.approx(float(reference), rel=1e-5)
    count = int((batch["labels"] != IGNORE).sum())
    assert float(answer_only_loss(model, batch, torch.tensor(count))) == pytest.approx(float(reference), rel=1e-5)
    reference.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ours.backward()
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[name], atol=1e-6, rtol=1e-4), name


# --- statistics -----------------------------------------------------------------------


def _seed(rng, n, accs):
    """A seed with models base/expert per skill and the given {key: accuracy} on two skills."""
    out = {}
    for key, acc in accs.items():
        out[key] = {s: (rng.random(n) < acc).astype(float) for s in ("a", "b")}
    return out


def _with_refs(seed, rng, n):
    seed["base"] = {s: np.zeros(n) for s in ("a", "b")}
    seed["expert/a"] = {"a": np.ones(n), "b": np.zeros(n)}
    seed["expert/b"] = {"a": np.zeros(n), "b": np.ones(n)}
    return seed


@settings(max_examples=40, deadline=None)
@given(n=st.integers(20, 120), p=st.floats(0.05, 0.95), seed=st.integers(0, 1000))
def test_gain_is_accuracy_rescaled_between_base_and_expert(n, p, seed):
    """With base 0 and expert 1 on every item, G equals the mean accuracy; a model equal to the experts has
    G = 1 and the base G = 0."""
    rng = np.random.default_rng(seed)
    data = _with_refs(_seed(rng, n, {"m": p}), rng, n)
    expected = np.mean([data["m"]["a"].mean(), data["m"]["b"].mean()])
    assert stats.gain(data, "m", ["a", "b"]) == pytest.approx(expected)
    data["perfect"] = {"a": np.ones(n), "b": np.ones(n)}
    assert stats.gain(data, "perfect", ["a", "b"]) == pytest.approx(1.0)
    assert stats.gain(data, "base", ["a", "b"]) == pytest.approx(0.0)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(30, 150), p=st.floats(0.2, 0.8), seed=st.integers(0, 1000))
def test_paired_difference_of_a_model_with_itself_is_exactly_zero_and_antisymmetric(n, p, seed):
    """G(m) - G(m) is 0 in every replicate (a tie with a zero-width interval); swapping a and b negates the
    estimate and mirrors the interval."""
    rng = np.random.default_rng(seed)
    data = _with_refs(_seed(rng, n, {"m": p, "q": 1 - p}), rng, n)
    same = stats.compare([data], "m", "m", ["a", "b"], replicates=300, random_seed=seed)
    assert same.pooled.value == 0 and same.pooled.low == 0 and same.pooled.high == 0
    assert same.pooled.verdict == "tie"
    ab = stats.compare([data], "m", "q", ["a", "b"], replicates=300, random_seed=seed)
    ba = stats.compare([data], "q", "m", ["a", "b"], replicates=300, random_seed=seed)
    assert ab.pooled.value == pytest.approx(-ba.pooled.value)
    assert ab.per_seed[0].low == pytest.approx(-ba.per_seed[0].high, abs=1e-9)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(150, 300), seed=st.integers(0, 1000))
def test_a_model_right_wherever_the_other_is_and_more_wins(n, seed):
    """If a is correct on a superset of b's items, every replicate difference is >= 0; with a clear margin the
    interval excludes 0 (win), and the reverse comparison is a loss."""
    rng = np.random.default_rng(seed)
    data = _with_refs(_seed(rng, n, {"b": 0.4}), rng, n)
    data["a"] = {s: np.maximum(data["b"][s], (rng.random(n) < 0.5).astype(float)) for s in ("a", "b")}
    r = stats.item_replicates(data, ["a", "b"], ["a", "b"], 300, rng)
    assert np.all(r["a"] - r["b"] >= -1e-12)
    assert stats.compare([data], "a", "b", ["a", "b"], replicates=500).pooled.verdict == "win"
    assert stats.compare([data], "b", "a", ["a", "b"], replicates=500).pooled.verdict == "loss"


def test_two_level_interval_spans_disagreeing_seeds_where_each_seed_alone_is_decisive():
    """Two seeds, one where a beats b by 0.3 and one where it loses by 0.3 (many items): each per-seed interval
    excludes 0, the pooled one (seeds resampled) spans both and is a tie."""
    rng = np.random.default_rng(0)
    n = 400
    seeds = []
    for sign in (1, -1):
        data = _with_refs(_seed(rng, n, {}), rng, n)
        good = (rng.random(n) < 0.8).astype(float)
        bad = (rng.random(n) < 0.5).astype(float)
        data["a"], data["b"] = (
            ({s: good for s in "ab"}, {s: bad for s in "ab"})
            if sign > 0
            else ({s: bad for s in "ab"}, {s: good for s in "ab"})
        )
        seeds.append(data)
    result = stats.compare(seeds, "a", "b", ["a", "b"], replicates=2000)
    assert [e.verdict for e in result.per_seed] == ["win", "loss"]
    assert result.pooled.verdict == "tie"
    assert result.pooled.low < -0.2 and result.pooled.high > 0.2


def test_two_level_replicates_average_one_item_replicate_per_drawn_seed():
    """With constant item replicates per seed, a two-level replicate is the mean of the drawn seeds' constants."""
    rng = np.random.default_rng(1)
    reps = stats.two_level([np.full(50, 1.0), np.full(50, 3.0)], 1000, rng)
    assert set(np.round(reps, 9)) <= {1.0, 2.0, 3.0} and {1.0, 2.0, 3.0} <= set(np.round(reps, 9))


def test_per_item_strings_round_trip_and_bad_ones_are_refused():
    """score_items' per-item strings read back as 0/1 arrays; anything else is an error."""
    assert stats.as_items("0110").tolist() == [0, 1, 1, 0]
    for bad in ("", "01x", "2"):
        with pytest.raises(ValueError):
            stats.as_items(bad)


# --- selection --------------------------------------------------------------------------


def test_grid_point_and_best_baseline_are_chosen_on_validation_never_on_test():
    """choose() takes each method's point with the best validation G even where another wins on test, and
    best_baseline() the baseline with the best mean validation G."""
    from benchmarks.quality import paired
    from benchmarks.quality.tiers import SftSettings, sft_suite

    suite = sft_suite(SftSettings(skills=("snake", "camel")))

    def record(val, test, n=10):
        return {
            split: {c: {"items": "1" * int(v * n) + "0" * (n - int(v * n))} for c in ("snake", "camel")}
            for split, v in (("val", val), ("test", test))
        }

    models = {
        "base": record(0.0, 0.0),
        "expert/snake": record(1.0, 1.0),
        "expert/camel": record(1.0, 1.0),
        "merge/ties/a": record(0.4, 0.9),
        "merge/ties/b": record(0.6, 0.2),
        "merge/linear/c": record(0.5, 0.8),
    }
    data = {
        "models": models,
        "settings": [
            {"method": "ties", "label": "a", "key": "merge/ties/a"},
            {"method": "ties", "label": "b", "key": "merge/ties/b"},
            {"method": "linear", "label": "c", "key": "merge/linear/c"},
        ],
    }
    chosen = paired.choose(suite, data)
    assert chosen["ties"]["label"] == "b" and chosen["ties"]["val"] == pytest.approx(0.6)
    assert paired.best_baseline([chosen]) == "ties"


# --- the tier end to end ------------------------------------------------------------------


def test_sft_smoke_run_stores_per_item_results_and_reuses_every_cached_stage(tmp_path):
    """--tier sft --smoke (tiny random Llama, SmolLM2's chat template): experts trained for their unequal
    steps, the multi-task reference for their sum, stores with step/beta2 metadata, per-item results of the
    right length for every model and merge (validation for every grid point, test for the point each method
    chose), a report with every section; a rerun trains and merges nothing."""
    from safetensors import safe_open

    from benchmarks.quality import run

    threads = torch.get_num_threads()
    argv = [
        "--tier",
        "sft",
        "--smoke",
        "--seeds",
        "0",
        "--methods",
        "ota",
        "ota (no base)",
        "ota (scale: median)",
        "ties",
        "ota+ffg (model-wide)",
        "ota+ffg (model-wide, density: auto)",
        "task_arithmetic",
        "linear",
        "--cache",
        str(tmp_path / "cache"),
        "--results",
        str(tmp_path / "results"),
        "--threads",
        "1",
    ]
    started = time.perf_counter()
    try:
        out = run.main(argv)
        first = time.perf_counter() - started
        data = out["seeds"][0]
        training = data["training"]
        assert training["expert/snake"]["steps"] == 2 and training["expert/camel"]["steps"] == 4
        assert training["multitask"]["steps"] == 6
        suite_sizes = {"val": 8, "test": 12}
        scored = [k for k in data["models"] if not k.startswith("graft/")]
        assert {"base", "expert/snake", "expert/camel", "multitask", "merge/ota (no base)/p=0.5"} <= set(scored)
        tested = Counter(k.split("/")[1] for k in scored if k.startswith("merge/") and "test" in data["models"][k])
        assert tested == {
            m: 1
            for m in (
                "ota",
                "ota (no base)",
                "ota (scale: median)",
                "ties",
                "task_arithmetic",
                "linear",
                "ota+ffg (model-wide)",
                "ota+ffg (model-wide, density: auto)",
            )
        }
        for key in scored:
            for split, size in suite_sizes.items():
                if split not in data["models"][key] and key.startswith("merge/"):
                    continue  # test: only each method's point chosen on validation
                for cap in ("snake", "camel"):
                    items = data["models"][key][split][cap]["items"]
                    assert len(items) == size and set(items) <= {"0", "1"}
                    assert data["models"][key][split][cap]["exact_match"] == pytest.approx(items.count("1") / size)
        check = data["models"]["expert/camel"]["greedy_check"]
        assert all(c["agree"] == c["items"] == 4 for c in check.values())
        stores = [
            os.path.join(dirpath, f)
            for dirpath, _, files in os.walk(tmp_path / "cache")
            for f in files
            if f.startswith("curvature-") and f.endswith(".safetensors")
        ]
        steps = set()
        for store in stores:
            with safe_open(store, "pt") as fp:
                meta = fp.metadata()
            assert meta["beta2"] == "0.999"
            steps.add(meta["step"])
        assert len(stores) == 4 and steps == {"2", "4"}
        text = open(out["report"]).read()
        for section in (
            "## Base and experts on held-out test items",
            "## Interference",
            "## Results (test split)",
            "## Paired differences",
            "Like for like",
            "## Tuning grids",
            "## Grafting one expert",
            "## Unit costs",
            "## Run time",
            "**multitask**",
            "| ota (no base) | p {0.5, 1} |",
            "## Curvature on one scale",
            "| ota (scale: median) - ota |",
            "`curvature_scale` for ota",
            "## density: auto",
            "| ota+ffg (model-wide, density: auto) - ota+ffg (model-wide) |",
        ):
            assert section in text, section
        for cap in ("snake", "camel"):  # each auto graft records the density auto chose (from the provenance)
            for mass in (0.5, 0.9):
                density = data["models"][f"graft/{cap}/FFG (auto)/{mass:g}"]["density_auto"]
                assert len(density) == 1 and 0 < next(iter(density.values())) < 1
        stamp = {p: os.path.getmtime(p) for p in stores}
        results = os.path.join(data["invocation"]["work"], "results.json")
        before = json.load(open(results))["models"]
        again = run.main(argv)
        assert {p: os.path.getmtime(p) for p in stores} == stamp
        assert again["seeds"][0]["models"] == before
    finally:
        torch.set_num_threads(threads)
    assert first < 60, f"the sft smoke run took {first:.0f}s"


def test_report_computes_interference_multitask_and_verdicts_from_per_item_results(tmp_path):
    """On synthetic per-item results of two seeds: the interference figure is the test G of task arithmetic /
    linear at their validation-chosen point and the tier 'counts' below 0.85; a method right on a superset of
    the best baseline's items (with a wide margin) is a pooled 'win'; the multi-task row is present."""
    from benchmarks.quality import paired, report_sft
    from benchmarks.quality.tiers import SftSettings, sft_suite

    suite = sft_suite(SftSettings(skills=("snake", "camel")))
    n = {"val": 60, "test": 200}
    rng = np.random.default_rng(0)
    runs = []
    for seed in (0, 1):

        def bits(p, split):
            return "".join("1" if x else "0" for x in rng.random(n[split]) < p)

        def record(p, splits=("val", "test")):
            return {split: {c: {"items": bits(p, split)} for c in ("snake", "camel")} for split in splits}

        base = record(0.0)
        models = {
            "base": base,
            "expert/snake": record(1.0),
            "expert/camel": record(1.0),
            "multitask": record(0.95),
            "merge/task_arithmetic/λ=0.5": record(0.5),
            "merge/task_arithmetic/λ=1": record(0.3, ("val",)),
            "merge/linear/default": record(0.4),
            "merge/ties/d=0.1": record(0.55),
        }
        ties = models["merge/ties/d=0.1"]
        models["merge/ota/p=0.5"] = {
            split: {
                c: {
                    "items": "".join(
                        "1" if a == "1" or i % 2 == 0 else "0" for i, a in enumerate(ties[split][c]["items"])
                    )
                }
                for c in ("snake", "camel")
            }
            for split in ("val", "test")
        }
        settings_ = [
            {"method": k.split("/")[1], "label": k.split("/")[2], "key": k} for k in models if k.startswith("merge/")
        ]
        data = {"models": models, "settings": settings_, "grids": {}, "densities": [], "training": {}, "stages": {}}
        runs.append((seed, suite, data))
    path = report_sft.write(runs, str(tmp_path), "sft-test")
    text = open(path).read()
    ta = np.mean(
        [
            stats.gain(paired.seed_items(suite, d, "test"), "merge/task_arithmetic/λ=0.5", ["snake", "camel"])
            for _, _, d in runs
        ]
    )
    row = next(line for line in text.splitlines() if line.startswith("| task_arithmetic |"))
    assert row.split("|")[2].strip().startswith(f"{ta:.3f}")
    assert "the tier **counts**" in text
    assert "Best baseline on validation: **ties**" in text
    paired = text.split("## Paired differences", 1)[1]
    ota = next(line for line in paired.splitlines() if line.startswith("| ota |"))
    assert ota.split("|")[3].strip() == "win"
    assert "**multitask** (union, same total steps)" in text


def test_default_sft_settings_meet_the_tiers_design_rules():
    """>= 4 skills, at least one pair sharing an input family (conflicting conventions), expert lengths 2-10x
    apart, the multi-task reference trained for the experts' total, >= 200 test items, the same optimizer and
    learning rate for every expert, and per-run cache keys that change only with that run's own settings."""
    from benchmarks.quality.tiers import SftSettings, sft_suite

    settings_ = SftSettings()
    assert len(settings_.skills) >= 4 and settings_.test_items >= 200 and settings_.val_items > 0
    families = Counter(skills.skill(s).family for s in settings_.skills)
    assert max(families.values()) >= 2
    steps = [settings_.steps_of(s) for s in settings_.skills]
    assert 2 <= max(steps) / min(steps) <= 10
    suite = sft_suite(settings_)
    assert suite.multitask_settings.steps == sum(steps)
    per_expert = {s: suite.settings_of(s) for s in settings_.skills}
    assert len({(t.learning_rate, t.batch_size, t.scheduler, t.weight_decay) for t in per_expert.values()}) == 1
    other = sft_suite(
        settings_.model_copy(update={"expert_steps": {**settings_.expert_steps, "snake": 33}, "val_items": 7})
    )
    assert other.run_key("camel") == suite.run_key("camel")
    assert other.run_key("snake") != suite.run_key("snake") and other.run_key("multitask") != suite.run_key("multitask")
