"""Whether the devices a merge is told to use exist here: cheap run-time preconditions of mergekit's options.

``mergekit-yaml --cuda`` on a torch without CUDA plans the whole merge, then fails on
torch's ``AssertionError`` ("Torch not compiled with CUDA enabled") at the first tensor;
``--device cuda:3`` on a one-GPU machine fails the same way with "invalid device
ordinal". :func:`merge_option_problems` says so at once, one line per option, for
``mergekit-ota check`` and before an ``ota``/``ffg`` merge claims its output.
"""

from __future__ import annotations

from typing import Any, List, Optional

ALWAYS_THERE = frozenset({"cpu", "meta"})


def device_problem(device: str) -> Optional[str]:
    """Why torch cannot compute on ``device`` (``cuda``, ``cuda:1``, ``mps``, ``xpu``, ...) here, or ``None``.

    A device is usable when its string parses (``torch.device``), its backend reports it available
    (``torch.<type>.is_available()``, ``torch.backends.mps`` for ``mps``) and its index, if any, is below
    the backend's ``device_count()``.
    """
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        return f"{device!r} is not a torch device (expected e.g. cpu, cuda, cuda:1, mps, xpu)"
    kind = parsed.type
    if kind in ALWAYS_THERE:
        return None
    if kind == "cuda" and not torch.backends.cuda.is_built():
        return (
            f"this torch ({torch.__version__}) is built without CUDA; install a CUDA build of torch or drop the option"
        )
    backend = torch.backends.mps if kind == "mps" else getattr(torch, kind, None)
    available = getattr(backend, "is_available", None)
    if not callable(available) or not available():
        return f"torch ({torch.__version__}) sees no {kind} device here"
    count = getattr(getattr(torch, kind, None), "device_count", None)
    if parsed.index is not None and callable(count) and parsed.index >= count():
        return f"there is no {kind} device {parsed.index}: torch sees {count()} ({kind}:0 to {kind}:{count() - 1})"
    return None


def _accelerator_available() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return bool(torch.cuda.is_available())


def merge_option_problems(options: Any) -> List[str]:
    """One line per option of a ``MergeOptions`` whose device is not here (see :func:`device_problem`).

    The device named is ``options.device`` (``--device``, or ``cuda`` from ``--cuda``/``--gpu-rich``;
    mergekit resolves ``auto`` when it parses the options); ``--multi-gpu`` needs an accelerator torch sees.
    """
    problems = []
    device = str(getattr(options, "device", None) or "cpu")
    if getattr(options, "gpu_rich", False):
        flag = "--gpu-rich"
    elif getattr(options, "cuda", False) and device == "cuda":
        flag = "--cuda"
    else:
        flag = f"--device {device}"
    problem = device_problem(device)
    if problem:
        problems.append(f"{flag}: {problem}")
    if getattr(options, "multi_gpu", False) and not problem and not _accelerator_available():
        problems.append("--multi-gpu: torch sees no accelerator (CUDA, XPU, ...) device here")
    return problems
