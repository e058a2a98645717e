"""The streaming store writer and rank-1 compression: files safetensors and CurvatureStore read back exactly,
and a merge with compressed stores equals a merge with the rank-1 estimate computed independently."""

from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergekit_ota.curvature.store import COL_SUFFIX, ROW_SUFFIX, CurvatureStore
from mergekit_ota.curvature.writer import (
    OutputLayout,
    StoreWriter,
    save_store,
    store_specs,
    stored_tensors,
)
from mergekit_ota.errors import ConfigError
from mergekit_ota.store_format import parse_size

_shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shapes=st.lists(_shapes, min_size=1, max_size=7),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    shard_bytes=st.one_of(st.none(), st.integers(1, 200)),
    seed=st.integers(0, 1000),
)
def test_streamed_shards_read_back_exactly_and_respect_the_shard_size(
    tmp_path_factory, shapes, dtype, shard_bytes, seed
):
    """Tensors of any shape (scalars and empty ones too) streamed into shards read back bit-exactly through
    safetensors and CurvatureStore; each shard holds at most shard_bytes of data or a single tensor; the index
    lists every tensor and every shard carries the metadata."""
    g = torch.Generator().manual_seed(seed)
    tensors = {f"t{i}.weight": torch.rand(shape, generator=g).to(dtype) for i, shape in enumerate(shapes)}
    out = tmp_path_factory.mktemp("w") / "store"
    specs = store_specs(((n, tuple(v.shape)) for n, v in tensors.items()), dtype, compress=False)
    with StoreWriter(OutputLayout.for_path(str(out)), specs, {"k": "v"}, shard_bytes) as writer:
        for name, value in tensors.items():
            writer.write(name, value)
        files = writer.commit()
    index = out / "exp_avg_sq.safetensors.index.json"
    shards = [f for f in files if f.endswith(".safetensors")]
    if len(shards) > 1:
        assert index.exists() and set(json.loads(index.read_text())["weight_map"]) == set(tensors)
    read = {}
    for file in shards:
        with safe_open(file, framework="pt") as handle:
            assert handle.metadata()["k"] == "v"
            keys = list(handle.keys())
            data = sum(handle.get_tensor(k).numel() * handle.get_tensor(k).element_size() for k in keys)
            assert shard_bytes is None or data <= shard_bytes or len(keys) == 1
            read.update({k: handle.get_tensor(k) for k in keys})
    assert set(read) == set(tensors)
    store = CurvatureStore(str(index) if len(shards) > 1 else shards[0])
    for name, value in tensors.items():
        assert read[name].dtype == dtype and torch.equal(read[name], value)
        assert torch.equal(store.load(name), value.float())


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 9), n=st.integers(1, 9), seed=st.integers(0, 10_000), scale=st.sampled_from([1.0, 1e-19, 1e6]))
def test_rank1_factors_are_exact_row_and_column_sums(m, n, seed, scale):
    """Stored r, c are v's row and column sums; the reconstruction outer(r, c)/sum(r) keeps every row and
    column sum of v (values near 1e-19 included)."""
    from mergekit_ota.math.rank1 import rank1_reconstruct

    v = torch.rand((m, n), generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    (rk, r), (ck, c) = stored_tensors("w", v.float(), compress=True)
    assert (rk, ck) == ("w" + ROW_SUFFIX, "w" + COL_SUFFIX)
    torch.testing.assert_close(r.double(), v.sum(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(c.double(), v.sum(0), rtol=1e-6, atol=0)
    v_hat = rank1_reconstruct(r, c).double()
    torch.testing.assert_close(v_hat.sum(1), v.sum(1), rtol=1e-5, atol=0)
    torch.testing.assert_close(v_hat.sum(0), v.sum(0), rtol=1e-5, atol=0)


def test_save_store_keeps_its_signature_and_replaces_the_file(tmp_path):
    """save_store(tensors, path, compress=, dtype=, metadata=) writes one file (replacing an older one) with
    format_version, compression, dtype and the caller's metadata in its header."""
    path = str(tmp_path / "s.safetensors")
    save_store({"a": torch.ones(2, 3)}, path)
    save_store(
        {"b": torch.rand(4, 5), "c": torch.rand(3)}, path, compress=True, dtype=torch.bfloat16, metadata={"step": "7"}
    )
    with safe_open(path, framework="pt") as handle:
        assert sorted(handle.keys()) == ["b" + COL_SUFFIX, "b" + ROW_SUFFIX, "c"]
        assert handle.metadata() == {"format_version": "1", "compression": "rank1", "dtype": "bfloat16", "step": "7"}
    assert os.listdir(tmp_path) == ["s.safetensors"]


def test_failed_write_leaves_nothing_behind(tmp_path):
    """An error part-way through a sharded write removes every temporary file; OUT never appears."""
    specs = store_specs([("a", (100,)), ("b", (100,))], torch.float32, compress=False)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="expected tensor 'b'"):
        with StoreWriter(OutputLayout.for_path(str(out)), specs, {}, 100) as writer:
            writer.write("a", torch.zeros(100))
            writer.write("c", torch.zeros(100))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2GB", 2 * 10**9),
        ("500MB", 5 * 10**8),
        ("1.5GiB", int(1.5 * 2**30)),
        ("4096", 4096),
        ("64kib", 65536),
        ("3M", 3 * 10**6),
    ],
)
def test_parse_size_reads_decimal_and_binary_units(text, expected):
    """Sizes: K/M/G/T(B) are powers of 1000, KiB/MiB/GiB/TiB powers of 1024, a bare number is bytes."""
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["5B", "two GB", "-1GB", "0"])
def test_parse_size_refuses_ambiguous_or_bad_sizes(text):
    """'5B' (bytes or billions?), words, negative and zero sizes are refused."""
    with pytest.raises(ConfigError):
        parse_size(text)


def test_a_bare_b_suffix_is_refused_saying_why():
    """'5B' names the ambiguity (bytes or billions, as mergekit's --out-shard-size counts parameters) and the fix."""
    with pytest.raises(ConfigError) as raised:
        parse_size("5B")
    assert "ambiguous: 5 bytes or 5 billion" in str(raised.value) and "--out-shard-size" in str(raised.value)
    assert "e.g. 5GB" in str(raised.value)


def test_merge_with_compressed_stores_equals_merge_with_rank1_estimate(tmp_path):
    """run_merge (ota) with stores compressed by `export --compress rank1` equals run_merge with full stores of
    v_hat = outer(v.sum(1), v.sum(0)) / v.sum() computed here in float64 (1-D tensors whole)."""
    from click.testing import CliRunner
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    import mergekit_ota
    from mergekit_ota.cli.export import export_command
    from mergekit_ota.testing import make_family, tiny_llama_config

    mergekit_ota.install()  # register ota/ffg and patch mergekit (whether or not the start-up hook is on)

    family = make_family(str(tmp_path / "fam"), n_experts=2, config=tiny_llama_config(hidden_size=32))
    compressed, reference = [], []
    for i, store in enumerate(family.stores):
        packed = tmp_path / f"rank1_{i}.safetensors"
        result = CliRunner().invoke(export_command, [store, str(packed), "--compress", "rank1", "--quiet"])
        assert result.exit_code == 0, result.output
        compressed.append(str(packed))
        v_hat = {}
        for name, v in load_file(store).items():
            v = v.double()
            v_hat[name] = (torch.outer(v.sum(1), v.sum(0)) / v.sum() if v.dim() == 2 else v).float().contiguous()
        reference.append(str(tmp_path / f"ref_{i}.safetensors"))
        save_file(v_hat, reference[-1])

    def merge(stores, out):
        models = [{"model": e, "parameters": {"curvature": s, "density": 0.5}} for e, s in zip(family.experts, stores)]
        config = {"merge_method": "ota", "base_model": family.base, "models": models, "dtype": "float32"}
        run_merge(MergeConfiguration.model_validate(config), str(out), MergeOptions(quiet=True, copy_tokenizer=False))
        return load_file(str(out / "model.safetensors"))

    got, expected = merge(compressed, tmp_path / "a"), merge(reference, tmp_path / "b")
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
    full = merge(family.stores, tmp_path / "c")
    assert any(not torch.allclose(full[n], got[n]) for n in got)  # compression does change the merge


def test_single_file_output_refuses_to_exceed_the_shard_size(tmp_path):
    """A .safetensors OUT is one file: a store larger than --shard-size there is refused before writing."""
    specs = store_specs([("a", (100,)), ("b", (100,))], torch.float32, compress=False)
    with pytest.raises(ConfigError, match="sharded store"):
        StoreWriter(OutputLayout.for_path(str(tmp_path / "one.safetensors")), specs, {}, 500)
    assert os.listdir(tmp_path) == []
