"""Graph merges with tokenizer merging (tied embeddings, added tokens) and half-precision experts,
against an independent plain-torch reference."""

from __future__ import annotations

import os
import random

import pytest
import torch
from safetensors.torch import load_file

EMBED = "model.embed_tokens.weight"


def _ota_rows(rows, curvatures, eps=1e-12):
    """Reference OTA (power 0.5, weights 1) for one base row and expert rows: b + sum w tau / sum w."""
    base, experts = rows[0].double(), [r.double() for r in rows[1:]]
    w = [v.double().sqrt() + eps for v in curvatures]
    num = sum(wi * (t - base) for wi, t in zip(w, experts))
    return (base + num / sum(w)).float()


def _tokenizer(tokens):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[0]))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=tokens[0])


def _run(cfg, out, **options):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    import mergekit_ota

    mergekit_ota.install()  # register ota/ffg and patch mergekit (whether or not the start-up hook is on)

    run_merge(MergeConfiguration.model_validate(cfg), str(out), MergeOptions(quiet=True, **options))
    return load_file(os.path.join(out, "model.safetensors"))


@pytest.fixture(scope="module")
def union_family(tmp_path_factory):
    """Tied-embedding Llamas: base and expert 0 share a 128-token vocabulary; expert 1 has the same
    tokens in a shuffled order plus 4 added tokens (132 rows), its embedding and curvature rows shuffled alike."""
    from mergekit_ota.curvature.writer import save_store
    from mergekit_ota.testing import make_family, save_model, tiny_llama_config

    root = tmp_path_factory.mktemp("union")
    family = make_family(str(root), n_experts=2, config=tiny_llama_config(tie_word_embeddings=True))
    tokens = [f"t{i}" for i in range(128)]
    for path in (family.base, family.experts[0]):
        _tokenizer(tokens).save_pretrained(path)
    order = list(range(128))
    random.Random(0).shuffle(order)
    added = [f"x{i}" for i in range(4)]
    _tokenizer([tokens[i] for i in order] + added).save_pretrained(family.experts[1])

    g = torch.Generator().manual_seed(5)
    weights = load_file(os.path.join(family.experts[1], "model.safetensors"))
    curvature = load_file(family.stores[1])
    weights[EMBED] = torch.cat([weights[EMBED][order], torch.randn(4, weights[EMBED].shape[1], generator=g) * 0.02])
    curvature[EMBED] = torch.cat(
        [curvature[EMBED][order], 1e-6 * (1 + torch.rand(4, curvature[EMBED].shape[1], generator=g))]
    )
    save_model(family.experts[1], tiny_llama_config(tie_word_embeddings=True, vocab_size=132), weights)
    save_store(curvature, family.stores[1])
    return family


def test_union_tokenizer_permutes_curvature_rows_like_weight_rows(union_family, tmp_path):
    """With tokenizer_source: union, every shared token's merged embedding row equals OTA of that token's
    rows in each model (found through each model's own vocabulary, curvature rows alike); a token only
    expert 1 added gets expert 1's row (the others carry no curvature there)."""
    from transformers import AutoTokenizer

    family = union_family
    out = tmp_path / "o"
    merged = _run(
        {
            "merge_method": "ota",
            "base_model": family.base,
            "models": [{"model": e} for e in family.experts],
            "dtype": "float32",
            "tokenizer_source": "union",
            "parameters": {"curvature_scale": "none"},
        },
        out,
    )
    assert "lm_head.weight" not in merged  # tied: one tensor, its state under model.embed_tokens.weight
    vocab = AutoTokenizer.from_pretrained(out).get_vocab()
    assert merged[EMBED].shape[0] == len(vocab) == 132

    paths = [family.base, *family.experts]
    vocabs = [AutoTokenizer.from_pretrained(p).get_vocab() for p in paths]
    rows = [load_file(os.path.join(p, "model.safetensors"))[EMBED] for p in paths]
    curvature = [load_file(s)[EMBED] for s in family.stores]
    shared = [t for t in vocab if all(t in v for v in vocabs)]
    added = [t for t in vocab if t not in vocabs[0]]
    assert len(shared) == 128 and sorted(added) == ["x0", "x1", "x2", "x3"]
    for token in shared:
        expected = _ota_rows(
            [rows[m][vocabs[m][token]] for m in range(3)],
            [curvature[e][vocabs[e + 1][token]] for e in range(2)],
        )
        torch.testing.assert_close(merged[EMBED][vocab[token]], expected, atol=1e-6, rtol=1e-5, msg=token)
    for token in added:
        torch.testing.assert_close(merged[EMBED][vocab[token]], rows[2][vocabs[2][token]], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_experts_merge_with_float32_curvature(tmp_path, dtype):
    """Experts stored in bf16/fp16 merged with `dtype:` of the same kind equal the reference computed
    from the same half-precision weights with float32 curvature. The curvature spans 1e-12..1e-9
    (it would flush to zero in fp16), so a half-precision curvature path would give the plain mean."""
    from mergekit_ota.curvature.writer import save_store
    from mergekit_ota.testing import make_family

    torch_dtype = getattr(torch, dtype)
    family = make_family(str(tmp_path / "m"), n_experts=2, dtype=torch_dtype)
    g = torch.Generator().manual_seed(1)
    for store in family.stores:
        tiny = {k: 10 ** (-12 + 3 * torch.rand(v.shape, generator=g)) for k, v in load_file(store).items()}
        save_store(tiny, store)
    merged = _run(
        {
            "merge_method": "ota",
            "base_model": family.base,
            "models": [{"model": e} for e in family.experts],
            "dtype": dtype,
        },
        tmp_path / "o",
    )
    base = load_file(os.path.join(family.base, "model.safetensors"))
    experts = [load_file(os.path.join(e, "model.safetensors")) for e in family.experts]
    stores = [load_file(s) for s in family.stores]
    far_from_mean = 0
    for name, b in base.items():
        assert merged[name].dtype == torch_dtype
        expected = _ota_rows([b, experts[0][name], experts[1][name]], [s[name] for s in stores])
        torch.testing.assert_close(
            merged[name].float(), expected.to(torch_dtype).float(), atol=2e-3, rtol=1e-2, msg=name
        )
        mean = (experts[0][name].float() + experts[1][name].float()) / 2
        far_from_mean += int((merged[name].float() - mean).abs().max() > 1e-2)
    assert far_from_mean > len(base) // 2
