"""`mergekit-ota compare`: the demo's experts (briefly trained), 2 methods x 2 points, end to end; resume after an
interrupted run; every bad input refused before any merge, with nothing written outside OUT."""

from __future__ import annotations

import functools
import json
import os
import sys

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from mergekit_ota.cli.main import main
from mergekit_ota.compare import grid, stats

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"  # the demo's words only: t0 ... t63
STEPS = 30  # AdamW steps per expert: enough for each to beat the base on its own skill
ROWS = 8  # held-out rows per skill (half selection, half report)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's base and two experts (mergekit_ota.demo: count up in t0-t31, count down in t32-t63), each with
    its curvature exported from its Trainer checkpoint; a ties config over them; held-out rows of both skills."""
    from mergekit_ota import demo as demo_module
    from mergekit_ota.testing import random_state_dict, save_model, tiny_llama_config

    root = tmp_path_factory.mktemp("compare_demo")
    config = tiny_llama_config(vocab_size=demo_module.VOCAB, hidden_size=64, num_layers=2)
    base = str(root / "models" / "base")
    save_model(base, config, random_state_dict(config, 0))
    tokenizer = demo_module._tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE  # for the chat rows' test (the experts keep the demo's tokenizer)
    tokenizer.save_pretrained(base)
    train, test = demo_module._split(0)
    experts = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i, skill in enumerate(demo_module.SKILLS):
            path = str(root / "models" / f"expert_{'ab'[i]}")
            checkpoint = demo_module.train_expert(base, path, skill, train, STEPS, i + 1, quiet=True)
            store = os.path.join(path, "exp_avg_sq.safetensors")
            result = CliRunner().invoke(main, ["export", checkpoint, store, "--quiet"])
            assert result.exit_code == 0, result.output
            experts.append(path)
    finally:
        torch.set_num_threads(threads)
    cfg = root / "merge.yml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "merge_method": "ties",
                "base_model": base,
                "models": [{"model": e, "parameters": {"weight": 1.0, "density": 0.5}} for e in experts]
                + [{"model": base}],
                "dtype": "float32",
            }
        )
    )
    data = root / "heldout.jsonl"
    demo_module.write_heldout(str(data), test[:ROWS])  # what `make demo` writes as demo_out/heldout.jsonl
    return {"root": root, "config": str(cfg), "data": str(data), "base": base, "experts": experts}


SMALL = ["--methods", "ties,ota", "--grid", "ties:density=0.3,0.6", "--grid", "ota:power=0.5,1.0"]
FAST = ["--replicates", "400", "--device", "cpu"]


def _compare(demo, out, *extra):
    return CliRunner().invoke(main, ["compare", demo["config"], demo["data"], str(out), *SMALL, *FAST, *extra])


class Counter:
    """``mergekit.merge.run_merge`` counting its calls (and raising KeyboardInterrupt after call ``stop``); it keeps
    run_merge's signature, which mergekit-ota's compatibility check reads."""

    def __init__(self, monkeypatch, stop=None):
        from mergekit import merge

        self.calls, self.stop, real = [], stop, merge.run_merge

        @functools.wraps(real)
        def counting(merge_config, out_path, options, config_source=None):
            self.calls.append(merge_config.merge_method)
            result = real(merge_config, out_path, options, config_source)
            if self.stop is not None and len(self.calls) == self.stop:
                raise KeyboardInterrupt  # Ctrl-C once this merge is written, before it is scored
            return result

        monkeypatch.setattr(merge, "run_merge", counting)


def test_end_to_end_with_resume(demo, tmp_path, monkeypatch):
    out = tmp_path / "out"
    interrupted = Counter(monkeypatch, stop=2)
    result = _compare(demo, out)
    assert result.exit_code == 1 and "Aborted" in result.output and len(interrupted.calls) == 2
    cached = os.listdir(out / "cache")
    assert len(cached) == 1 + 2 + 1  # base, 2 experts, the first point
    assert not (out / "report.md").exists()
    assert not (out / "merges").exists()  # the interrupted merge is gone

    rerun = Counter(monkeypatch)
    result = _compare(demo, out, "--keep-merges")
    assert result.exit_code == 0, result.output
    assert rerun.calls == ["ties", "ota", "ota"]  # the first point came from the cache
    for name in ("report.md", "results.json", "best.yml", "compare.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    points = [m for m in results["models"] if m["kind"] == "point"]
    assert [p["cached"] for p in points] == [True, False, False, False]
    assert "[1/4] ties (density=0.3): loss " in result.output and "(cached)" in result.output  # one line a point
    assert "[4/4] ota (power=1): loss " in result.output
    assert [p["setting"] for p in points] == ["density=0.3", "density=0.6", "power=0.5", "power=1"]
    assert {r["half"] for r in results["rows"]} == {"selection", "report"}
    assert results["experts"] == {"up": demo["experts"][0], "down": demo["experts"][1]}
    report = (out / "report.md").read_text()
    assert "Statistic: **G**" in report and "vs ties (95%)" in report
    assert "| ota |" in report and "| ties (baseline) |" in report
    print(report)

    # each point is what mergekit-yaml makes of its config: best.yml through the mergekit-yaml command itself
    from mergekit.scripts.run_yaml import main as mergekit_yaml
    from safetensors.torch import load_file

    best = yaml.safe_load((out / "best.yml").read_text())
    winner = next(p for p in points if p["config"] == best)
    cli_out = tmp_path / "via_mergekit_yaml"
    run = CliRunner().invoke(mergekit_yaml, [str(out / "best.yml"), str(cli_out), "--random-seed", "0", "--quiet"])
    assert run.exit_code == 0, run.output
    kept = load_file(str(out / winner["merged_to"] / "model.safetensors"))
    made = load_file(str(cli_out / "model.safetensors"))
    assert kept.keys() == made.keys() and all(torch.equal(kept[k], made[k]) for k in kept)

    # the same command again: every point from the cache, the same report
    again = Counter(monkeypatch)
    result = _compare(demo, out)
    assert result.exit_code == 0, result.output
    assert again.calls == []
    assert (out / "report.md").read_text().split("## Costs")[0] == report.split("## Costs")[0]

    # --force starts afresh: every point merged again, the old cache gone
    fresh = Counter(monkeypatch)
    result = _compare(demo, out, "--force")
    assert result.exit_code == 0, result.output
    assert fresh.calls == ["ties", "ties", "ota", "ota"]
    assert len(os.listdir(out / "cache")) == 3 + 4 and not (out / "merges").exists()
    assert sorted(os.listdir(tmp_path)) == ["out", "via_mergekit_yaml"]  # the replacement was swapped in


def test_statistics_match_a_direct_computation(demo, tmp_path):
    """G per capability from results.json by hand equals the report's numbers (the summary's point estimates)."""
    from mergekit_ota.compare.summary import summarize

    out = tmp_path / "out"
    result = _compare(demo, out)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    summary = summarize(results)
    rows = results["rows"]
    by_path = {m.get("path"): m for m in results["models"]}

    def loss(model, cap):
        idx = [i for i, r in enumerate(rows) if r["capability"] == cap and r["half"] == "report"]
        return sum(model["scores"]["nats"][i] for i in idx) / sum(model["scores"]["tokens"][i] for i in idx)

    for method in summary.methods:
        gains = []
        for cap, expert in results["experts"].items():
            base = loss(by_path[results["base"]], cap)
            g = (base - loss(method.model, cap)) / (base - loss(by_path[expert], cap))
            assert method.per_capability[cap].value == pytest.approx(g)
            gains.append(g)
        assert method.value.value == pytest.approx(np.mean(gains))
        low, high = method.value.low, method.value.high
        assert low <= method.value.value <= high


def test_chat_rows_report_exact_match(demo, tmp_path, monkeypatch):
    """Chat rows: the loss on the assistant turn only, and greedy exact match of it reported."""
    from mergekit_ota import demo as demo_module

    rows = []
    for skill, task in zip(demo_module.SKILLS, ("up", "down")):
        for start, step in demo_module._split(0)[1][:4]:
            words = [f"t{t}" for t in skill.sequence(start, step)]
            messages = [
                {"role": "user", "content": " ".join(words[:6])},
                {"role": "assistant", "content": " ".join(words[6:])},
            ]
            rows.append({"task": task, "messages": messages})
    data = _jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["compare", demo["config"], data, str(out), "--methods", "linear,task_arithmetic", *FAST]
    )
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert all(r["answer"] for r in results["rows"]) and results["experts"] == {}
    assert {tuple(m["scores"]["tokens"]) for m in results["models"]} == {(4,) * 8}  # the 4 answer tokens only
    report = (out / "report.md").read_text()
    assert "Statistic: **mean held-out loss**" in report and "exact match (answer rows)" in report

    # without matplotlib (an optional extra): no figure, one line saying so, the rest written
    from mergekit_ota.compare.report import write_outputs

    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    lines, again = [], tmp_path / "again"
    again.mkdir()
    write_outputs(str(again), results, lines.append)
    assert sorted(os.listdir(again)) == ["best.yml", "report.md", "results.json"]
    assert lines[0] == (
        "no figure: matplotlib is not installed (pip install 'mergekit-ota[analyze]'); the report and results are "
        "written"
    )
    # 2 report-half rows per capability (4 rows each): the intervals are reported, but no verdict is drawn from them
    assert lines[1:] == ["no verdicts: report-half rows: up 2, down 2 (a verdict needs at least 10 per capability)"]
    assert "**No verdicts (n/a):** report-half rows: up 2, down 2" in report
    table = report.split("| method |", 1)[1].split("\n\n", 1)[0]
    assert "| n/a |" in table and "| win |" not in table and "| loss |" not in table


def test_rows_naming_their_half_keep_it_and_completions_report_exact_match(demo, tmp_path, monkeypatch):
    """Rows that name their half (a user's own validation/test split) are in that half, whatever --split says;
    prompt-completion rows are scored on the completion only, with exact match reported as for chats."""
    from mergekit_ota import demo as demo_module

    rows = []
    for skill, task in zip(demo_module.SKILLS, ("up", "down")):
        for index, (start, step) in enumerate(demo_module._split(0)[1][:6]):
            words = [f"t{t}" for t in skill.sequence(start, step)]
            half = "selection" if index < 2 else "report"  # 2 and 4: not what --split 0.5 would give
            rows.append({"task": task, "half": half, "prompt": " ".join(words[:6]), "completion": " " + words[6]})
    data = _jsonl(tmp_path / "pinned.jsonl", rows)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["compare", demo["config"], data, str(out), "--methods", "linear", "--split", "0.9", *FAST]
    )
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert [r["half"] for r in results["rows"]] == [r["half"] for r in rows]
    assert all(r["answer"] for r in results["rows"])
    assert {tuple(m["scores"]["tokens"]) for m in results["models"]} == {(1,) * 12}  # the completion's one token
    assert "exact match (answer rows)" in (out / "report.md").read_text()


def test_a_half_named_on_some_rows_of_a_capability_or_misspelt_is_refused(demo, tmp_path, monkeypatch):
    rows = [{"task": "up", "half": "selection", "text": "t1 t2 t3"}, {"task": "up", "half": "report", "text": "t2 t3"}]
    mixed = _jsonl(tmp_path / "mixed.jsonl", rows + [{"task": "up", "text": "t3 t4 t5"}])
    output = _bad(demo, tmp_path, monkeypatch, *SMALL, data=mixed)
    assert "mixed.jsonl:3: names no 'half', but" in output and "mixed.jsonl:1" in output
    typo = _jsonl(tmp_path / "typo.jsonl", rows + [{"task": "up", "half": "test", "text": "t3 t4 t5"}])
    assert "typo.jsonl:3: 'half' must be 'selection' or 'report'; got 'test'" in _bad(
        demo, tmp_path, monkeypatch, *SMALL, data=typo
    )
    one_sided = _jsonl(tmp_path / "one.jsonl", [{"task": "up", "half": "selection", "text": "t1 t2 t3"}] * 3)
    assert "its report half would have none as its rows name them" in _bad(
        demo, tmp_path, monkeypatch, *SMALL, data=one_sided
    )


def test_row_scores_are_transformers_own_loss(demo):
    """Per-row nats summed over a row's labelled tokens, over its token count, is transformers' mean token loss of
    that row (labels=...); batching with padding changes nothing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_ota.compare.score import score_rows
    from mergekit_ota.fisher import data as fisher_data

    model = AutoModelForCausalLM.from_pretrained(demo["experts"][0], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(demo["base"])
    samples = fisher_data.read_samples(demo["data"], 100)
    rows = [
        (ids[: 4 + i % 6], labels[: 4 + i % 6])
        for i, (ids, labels) in enumerate(fisher_data.rows(tokenizer, samples, 64))
    ]
    scores = score_rows(model, rows, pad_id=0, batch_size=5)
    for i, (ids, labels) in enumerate(rows):
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
        assert scores.tokens[i] == len(ids) - 1
        assert scores.nats[i] / scores.tokens[i] == pytest.approx(float(loss), rel=1e-5)
        predicted = model(input_ids=torch.tensor([ids])).logits[0, :-1].argmax(-1)
        assert scores.correct[i] == int((predicted == torch.tensor(ids[1:])).sum())
        assert scores.exact[i] == (scores.correct[i] == scores.tokens[i])


def _tree(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def _bad(demo, tmp_path, monkeypatch, *args, config=None, data=None):
    """Run compare expecting a refusal: exit 1, one `Error:` message, no merge, nothing written anywhere."""
    calls = Counter(monkeypatch)
    before = _tree(demo["root"])
    out = tmp_path / "out"
    command = ["compare", config or demo["config"], data or demo["data"], str(out), *FAST, *args]
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: "), result.output
    assert calls.calls == []
    assert not out.exists()
    assert _tree(demo["root"]) == before
    return result.output


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_data_without_labelled_tokens_is_refused(demo, tmp_path, monkeypatch):
    data = _jsonl(tmp_path / "empty.jsonl", [{"task": "up", "text": "t1"}] * 4)
    assert "no token to take the loss on" in _bad(demo, tmp_path, monkeypatch, *SMALL, data=data)


def test_a_capability_without_rows_in_one_half_is_refused(demo, tmp_path, monkeypatch):
    rows = [{"task": "up", "expert": "expert_a", "text": "t1 t2 t3 t4"}] * 4
    rows += [{"task": "down", "expert": "expert_b", "text": "t40 t39 t38"}]
    data = _jsonl(tmp_path / "one.jsonl", rows)
    output = _bad(demo, tmp_path, monkeypatch, *SMALL, data=data)
    assert "capability 'down' has 1 row(s)" in output


def test_an_expert_the_config_does_not_name_is_refused(demo, tmp_path, monkeypatch):
    data = _jsonl(tmp_path / "x.jsonl", [{"task": "up", "expert": "expert_z", "text": "t1 t2 t3"}] * 4)
    output = _bad(demo, tmp_path, monkeypatch, *SMALL, data=data)
    assert "expert 'expert_z' is not an expert of the merge config" in output


def test_an_unknown_method_is_refused(demo, tmp_path, monkeypatch):
    output = _bad(demo, tmp_path, monkeypatch, "--methods", "ties,tiez_dare")
    assert "'tiez_dare' is neither a compare method" in output


def test_a_grid_value_the_method_refuses_is_refused(demo, tmp_path, monkeypatch):
    output = _bad(demo, tmp_path, monkeypatch, "--methods", "ota", "--grid", "ota:density=0.2,1.5")
    assert "ota (density=1.5)" in output and "density" in output
    assert "ota (density=0.2)" not in output


def test_a_grid_key_the_method_does_not_take_is_refused(demo, tmp_path, monkeypatch):
    output = _bad(demo, tmp_path, monkeypatch, "--methods", "ties", "--grid", "ties:densty=0.2,0.4")
    assert "densty" in output


def test_a_malformed_grid_option_is_refused(demo, tmp_path, monkeypatch):
    assert "expected METHOD:KEY=V1,V2" in _bad(demo, tmp_path, monkeypatch, "--methods", "ties", "--grid", "ties")


def test_an_unrelated_out_is_refused(demo, tmp_path, monkeypatch):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = CliRunner().invoke(main, ["compare", demo["config"], demo["data"], str(out), *SMALL, *FAST, "--force"])
    assert result.exit_code == 1 and "not the output of an earlier mergekit-ota compare" in result.output
    assert os.listdir(out) == ["notes.txt"]


def test_default_grids_have_at_most_four_points():
    assert [m.name for m in grid.DEFAULT_METHODS] == [
        "linear",
        "task_arithmetic",
        "ties",
        "dare_ties",
        "ota",
        "ota+ffg",
        "ffg+consensus",
    ]
    assert all(1 <= len(m.grid) <= grid.MAX_DEFAULT_POINTS for m in grid.DEFAULT_METHODS)


def test_grid_option_values_are_typed():
    axis = grid.GridAxis.parse("ota:density=0.1,auto,1")
    assert axis.values == (0.1, "auto", 1)
    methods = grid.resolve(["ota+ffg"], ["ota+ffg:density=0.05,0.1", "ota+ffg:lambda=1.0"])
    assert methods[0].grid == ({"density": 0.05, "lambda": 1.0}, {"density": 0.1, "lambda": 1.0})
    assert methods[0].shared == {"density_scope": "model"}


def test_paired_bootstrap_verdicts():
    """A model better on every row wins; the same model against itself ties with a zero-width interval."""
    rng = np.random.default_rng(0)
    tokens = np.full(40, 10.0)
    base = rng.uniform(20, 30, 40)
    expert = base - 8
    seed = {
        "base": {"c": stats.ratio_items(base, tokens)},
        "expert/c": {"c": stats.ratio_items(expert, tokens)},
        "good": {"c": stats.ratio_items(base - 6 + rng.normal(0, 0.1, 40), tokens)},
        "poor": {"c": stats.ratio_items(base - 2 + rng.normal(0, 0.1, 40), tokens)},
    }
    better = stats.compare([seed], "good", "poor", ["c"], replicates=500).per_seed[0]
    assert better.verdict == "win" and better.value == pytest.approx(0.5, abs=0.05)
    assert stats.compare([seed], "poor", "good", ["c"], replicates=500).per_seed[0].verdict == "loss"
    same = stats.compare([seed], "good", "good", ["c"], replicates=500).per_seed[0]
    assert same.verdict == "tie" and same.low == same.high == 0
    by_loss = stats.compare([seed], "good", "poor", ["c"], replicates=500, statistic=stats.LOSS).per_seed[0]
    assert by_loss.verdict == "win" and by_loss.value == pytest.approx(0.4, abs=0.02)


def test_chat_turns_are_scored_through_their_end_of_turn_token_only(tmp_path):
    """compare labels an assistant turn as generation writes it: up to and including the first end-of-turn (EOS)
    token, not the template's text after it (ChatML's newline after ``<|im_end|>``), which a model fine-tuned on
    answers only need not predict (the sft tier's experts: exact match 0 and loss x200 on their own skill when it
    was labelled); fisher's rows keep the whole rendered turn."""
    from mergekit_ota import demo as demo_module
    from mergekit_ota.compare.dataset import read_dataset
    from mergekit_ota.fisher import data as fisher_data

    tokenizer = demo_module._tokenizer()
    tokenizer.eos_token = "t63"
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} t63 t62 {% endfor %}"
    messages = [{"role": "user", "content": "t1 t2"}, {"role": "assistant", "content": "t3 t4"}]
    data = _jsonl(tmp_path / "chat.jsonl", [{"messages": messages}, {"messages": messages + messages}])

    def labelled(rows):
        return [[t for t in labels if t != fisher_data.IGNORE] for _, labels in rows]

    t = tokenizer.convert_tokens_to_ids
    ours = labelled(read_dataset(data, tokenizer, 64, [], 0.5, 0).rows)
    assert ours == [[t("t3"), t("t4"), t("t63")], [t("t3"), t("t4"), t("t63")] * 2]
    samples = fisher_data.read_samples(data, 10)
    assert labelled(fisher_data.rows(tokenizer, samples, 64)) == [
        [t("t3"), t("t4"), t("t63"), t("t62")],
        [t("t3"), t("t4"), t("t63"), t("t62")] * 2,
    ]


def test_a_run_killed_outright_is_resumed_not_refused(demo, tmp_path, monkeypatch, capsys):
    """A compare killed without a chance to clean up (SIGTERM, kill -9) leaves its claim and a half-written merge
    in OUT; rerunning takes the dead run's claim over and resumes from its cached points (a merge of another
    command's output with a dead claim is still refused: tests/test_safe_io.py)."""
    import socket
    import subprocess

    from mergekit_ota.io.output import CLAIM_FILE

    out = tmp_path / "out"
    interrupted = Counter(monkeypatch, stop=2)
    assert _compare(demo, out).exit_code == 1 and len(interrupted.calls) == 2
    probe = subprocess.Popen(["true"])
    probe.wait()  # a pid that no process has now: the killed run's
    (out / CLAIM_FILE).write_text(json.dumps({"pid": probe.pid, "host": socket.gethostname(), "started": "then"}))
    (out / "merges" / ".partial").mkdir(parents=True)
    (out / "merges" / ".partial" / "model.safetensors").write_bytes(b"half")
    rerun = Counter(monkeypatch)
    result = _compare(demo, out)
    assert result.exit_code == 0, result.output
    assert len(rerun.calls) == 3  # the 4 points less the one the killed run finished
    assert "taking over the claim of a run that is no longer running" in result.output + capsys.readouterr().err
    assert not (out / CLAIM_FILE).exists() and not (out / "merges" / ".partial").exists()
