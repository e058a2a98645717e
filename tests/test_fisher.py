"""`mergekit-ota fisher`: the empirical diagonal Fisher of a model on calibration data, as a curvature store."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

from mergekit_ota.cli.main import main
from mergekit_ota.fisher import data as calibration

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} ; {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama with a word-level tokenizer (t0 ... t63, ':', ';', role words) and a chat template."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = [f"t{i}" for i in range(56)] + [":", ";", "user", "assistant", "system", "<pad>", "<s>", "<unk>"]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(words),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    path = tmp_path_factory.mktemp("fisher") / "model"
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _texts(path, count, length=(4, 12)):
    g = torch.Generator().manual_seed(1)
    with open(path, "w", encoding="utf-8") as fp:
        for _ in range(count):
            n = int(torch.randint(length[0], length[1], (1,), generator=g))
            fp.write(
                json.dumps({"text": " ".join(f"t{int(i)}" for i in torch.randint(0, 56, (n,), generator=g))}) + "\n"
            )
    return str(path)


def _fisher(*args):
    return CliRunner().invoke(main, ["fisher", *map(str, args), "-q"])


def _naive(model_dir, data_path, samples, batch_size, max_length=512):
    """The estimator written the plain way: per mini-batch, transformers' own mean token loss (labels=...) on
    one padded forward, its gradient squared; the mean over mini-batches."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = calibration.rows(tokenizer, calibration.read_samples(data_path, samples), max_length)
    sums = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    batches = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.tensor([i + [tokenizer.pad_token_id] * (width - len(i)) for i, _ in chunk])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in chunk])
        mask = (torch.arange(width)[None] < torch.tensor([len(i) for i, _ in chunk])[:, None]).long()
        model.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                sums[n] += p.grad**2
        batches += 1
    return {n: s / batches for n, s in sums.items()}


def test_store_equals_an_independent_loop_and_records_how_it_was_made(model_dir, tmp_path):
    """The store holds, for every parameter, the mean over mini-batches of the squared gradient of transformers'
    own mean token loss (an independent loop), on Adam's bias-corrected scale (bias_corrected: true), with the
    samples, batches, batch size, estimator and the data's hash in its metadata."""
    data = _texts(tmp_path / "cal.jsonl", 30)
    out = tmp_path / "store.safetensors"
    result = _fisher(model_dir, data, out, "--samples", 20, "--batch-size", 6)
    assert result.exit_code == 0, result.output
    stored, expected = load_file(out), _naive(model_dir, data, 20, 6)
    assert set(stored) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(stored[name], value, rtol=1e-4, atol=1e-12)
    with safe_open(str(out), "pt") as fp:
        meta = fp.metadata()
    assert meta["source_kind"] == "fisher" and meta["bias_corrected"] == "true"
    assert (meta["fisher_samples"], meta["fisher_batches"], meta["fisher_batch_size"]) == ("20", "4", "6")
    assert meta["fisher_reduction"] == "mean" and meta["fisher_estimator"].startswith("mini-batch")
    samples = calibration.read_samples(data, 20)
    assert meta["fisher_data_sha256"] == calibration.data_hash(samples) != calibration.data_hash(samples[:19])


def test_micro_batches_and_the_per_example_estimator(model_dir, tmp_path):
    """Micro-batching only saves memory: the same store as whole mini-batches; --per-example is --batch-size 1."""
    data = _texts(tmp_path / "cal.jsonl", 16)
    for name, extra in (
        ("whole", ()),
        ("micro", ("--micro-batch-size", 3)),
        ("per-example", ("--per-example",)),
        ("batch1", ("--batch-size", 1)),
    ):
        args = ("--batch-size", 8) if name in ("whole", "micro") else ()
        assert _fisher(model_dir, data, tmp_path / f"{name}.safetensors", *args, *extra).exit_code == 0
    whole, micro = load_file(tmp_path / "whole.safetensors"), load_file(tmp_path / "micro.safetensors")
    for name in whole:
        torch.testing.assert_close(micro[name], whole[name], rtol=1e-4, atol=1e-12)
    per_example, batch1 = load_file(tmp_path / "per-example.safetensors"), load_file(tmp_path / "batch1.safetensors")
    assert all(torch.equal(per_example[n], batch1[n]) for n in whole)
    assert any(not torch.allclose(per_example[n], whole[n]) for n in whole)  # a different estimator
    clash = _fisher(model_dir, data, tmp_path / "clash.safetensors", "--per-example", "--batch-size", 8)
    assert clash.exit_code == 2 and "contradicts --batch-size 8" in clash.output
    assert not (tmp_path / "clash.safetensors").exists()


def test_rank1_store_equals_the_compressed_full_store(model_dir, tmp_path):
    """--compress rank1 writes each matrix's row and column sums of the full Fisher, as export compresses."""
    from mergekit_ota.curvature.store import COL_SUFFIX, ROW_SUFFIX

    data = _texts(tmp_path / "cal.jsonl", 10)
    assert _fisher(model_dir, data, tmp_path / "full.safetensors").exit_code == 0
    assert _fisher(model_dir, data, tmp_path / "rank1.safetensors", "--compress", "rank1").exit_code == 0
    full, rank1 = load_file(tmp_path / "full.safetensors"), load_file(tmp_path / "rank1.safetensors")
    for name, value in full.items():
        if value.dim() == 2:
            torch.testing.assert_close(rank1[name + ROW_SUFFIX], value.double().sum(1).float(), rtol=1e-5, atol=0)
            torch.testing.assert_close(rank1[name + COL_SUFFIX], value.double().sum(0).float(), rtol=1e-5, atol=0)
        else:
            assert torch.equal(rank1[name], value)


def test_chat_samples_take_the_loss_on_assistant_tokens_only(model_dir):
    """A chat is rendered with the model's template; only the assistant turns' tokens are labelled."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sample = calibration.Sample(
        "x:1", messages=(("user", "t1 t2"), ("assistant", "t3 t4"), ("user", "t5"), ("assistant", "t6"))
    )
    ids, labels = calibration.to_row(tokenizer, sample, 512)
    words = tokenizer.convert_ids_to_tokens(ids)
    labelled = [w for w, label in zip(words, labels) if label != calibration.IGNORE]
    assert labelled == ["t3", "t4", ";", "t6", ";"]
    assert words[:5] == ["user", ":", "t1", "t2", ";"]


def test_prompt_completion_samples_take_the_loss_on_the_completion_only(model_dir):
    """A prompt-completion row is the prompt's tokens then the completion's, tokenized apart (as TRL does), and only
    the completion's tokens are labelled."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sample = calibration.Sample("x:1", prompt="t1 t2 t3", completion=" t4 t5")
    ids, labels = calibration.to_row(tokenizer, sample, 512)
    prompt = tokenizer("t1 t2 t3", add_special_tokens=True)["input_ids"]
    completion = tokenizer(" t4 t5", add_special_tokens=False)["input_ids"]
    assert ids == prompt + completion
    assert labels == [calibration.IGNORE] * len(prompt) + completion
    assert sample.has_answer and not calibration.Sample("x:2", text="t1 t2").has_answer
    # cut at max_length like every row; the hash tells a completion from a text of the same words
    assert calibration.to_row(tokenizer, sample, len(prompt) + 1) == (ids[: len(prompt) + 1], labels[: len(prompt) + 1])
    assert calibration.data_hash([sample]) != calibration.data_hash([calibration.Sample("x", text="t1 t2 t3 t4 t5")])


def test_bad_input_is_a_clear_error_and_writes_nothing(model_dir, tmp_path):
    """Empty data, data not JSON, a chat with no assistant turn, samples truncated before any labelled token,
    a NaN weight (non-finite gradients) and a directory that is not a model: each one line naming the problem
    (file and line, or parameter), exit 1, and no store."""
    from transformers import AutoModelForCausalLM

    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "t1 t2"}\nnot json\n')
    (tmp_path / "noassistant.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "t1"}]}) + "\n")
    long_prompt = " ".join(["t1"] * 40)
    (tmp_path / "late.jsonl").write_text(
        json.dumps({"messages": [{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "t2"}]})
        + "\n"
    )
    broken = tmp_path / "nan_model"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(broken)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.exists(os.path.join(model_dir, name)):
            with open(os.path.join(model_dir, name), "rb") as src, open(broken / name, "wb") as dst:
                dst.write(src.read())
    (tmp_path / "nocompletion.jsonl").write_text(json.dumps({"prompt": "t1 t2", "completion": ""}) + "\n")
    (tmp_path / "listprompt.jsonl").write_text(
        json.dumps({"prompt": [{"role": "user", "content": "t1"}], "completion": "t2"}) + "\n"
    )
    good = _texts(tmp_path / "good.jsonl", 4)
    cases = [
        (model_dir, tmp_path / "nocompletion.jsonl", "nocompletion.jsonl:1: a prompt-completion sample needs"),
        (model_dir, tmp_path / "listprompt.jsonl", "listprompt.jsonl:1: a prompt-completion sample needs"),
        (model_dir, tmp_path / "empty.jsonl", "holds no calibration sample"),
        (model_dir, tmp_path / "bad.jsonl", "bad.jsonl:2: not valid JSON"),
        (model_dir, tmp_path / "noassistant.jsonl", "noassistant.jsonl:1: a chat sample needs an assistant turn"),
        (model_dir, tmp_path / "late.jsonl", "late.jsonl:1: no token to take the loss on within --max-length 16"),
        (str(broken), good, "is not finite"),
        (str(tmp_path), good, "not a model directory"),
    ]
    for index, (model, data, message) in enumerate(cases):
        out = tmp_path / f"out{index}.safetensors"
        result = _fisher(model, data, out, "--max-length", 16)
        assert result.exit_code == 1 and message in result.output, (message, result.output)
        assert not out.exists() and not [n for n in os.listdir(tmp_path) if n.startswith(f"out{index}")]


def test_a_device_torch_cannot_use_is_refused_before_the_model_loads(model_dir, tmp_path, monkeypatch):
    """`--device cuda` on a torch without CUDA (or an index past the last device) is one line naming the option,
    exit 1, no store, and nothing loaded: before, torch's AssertionError came out as a traceback."""
    import mergekit_ota.fisher as fisher_module

    def never(*_args, **_kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(fisher_module, "_load", never)
    data = _texts(tmp_path / "good.jsonl", 2)
    devices = ["cuda:99", "npu", "xpu:7"] if torch.cuda.is_available() else ["cuda", "cuda:1", "npu"]
    for device in devices:
        out = tmp_path / "out.safetensors"
        result = CliRunner().invoke(main, ["fisher", model_dir, str(data), str(out), "--device", device])
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert f"--device {device}:" in result.output, result.output
        assert not out.exists()


_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=False), st.text(max_size=6), st.just("")
)
_VALUES = st.recursive(
    _SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
)
_KEYS = ("text", "prompt", "completion", "messages", "task", "expert", "half", "role", "content")
_MESSAGE = st.fixed_dictionaries(
    {}, optional={"role": _VALUES | st.sampled_from(["user", "assistant"]), "content": _VALUES}
)
_ROW = st.fixed_dictionaries(
    {},
    optional={
        **{key: _VALUES for key in _KEYS},
        "messages": st.lists(_MESSAGE, max_size=3) | _VALUES,
        "half": st.sampled_from(["selection", "report", "test", ""]) | _VALUES,
    },
)


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(_ROW | _VALUES, min_size=1, max_size=4))
def test_any_json_row_is_a_sample_or_a_refusal_naming_its_line(rows, tmp_path_factory):
    """Whatever JSON a data row holds (texts, prompts and completions, chats, task/expert/half fields of any type),
    reading it gives samples or a ConfigError that names the file and line; compare's split of what was read gives
    halves or a ConfigError: never another exception."""
    from mergekit_ota.compare import dataset
    from mergekit_ota.errors import ConfigError

    path = tmp_path_factory.mktemp("rows") / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    try:
        samples = calibration.read_samples(str(path), 100)
    except ConfigError as error:
        assert str(path) in str(error)
        return
    assert len(samples) == len(rows)
    for sample, row in zip(samples, rows):
        assert not (sample.messages and sample.completion)  # one form per sample: the first that fits
        assert sample.messages or sample.completion or row["text"] == sample.text
        json.loads(sample.canonical())
    try:
        halves = dataset.split([s.task or dataset.ALL for s in samples], 0.5, 0, samples)
    except ConfigError:
        return
    assert set(halves) <= {dataset.SELECTION, dataset.REPORT}
