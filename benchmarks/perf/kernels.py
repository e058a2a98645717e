"""One tensor's merge arithmetic, timed alone: ota + FFG (model-wide thresholds) with and without sign consensus.

``python -m benchmarks.perf.kernels [--numel N] [--repeats R]``: a base and 2 experts of ``N`` float32 entries
(seeded), curvature ``rand**4 * 1e-6``, each expert's threshold keeping 20% of its saliency; prints the fastest of
``R`` calls of :func:`mergekit_ota.math.ota.ota_merge` for each, and their ratio. No I/O, no mergekit: what the
sign-consensus pass costs per tensor, apart from reading the inputs (``benchmarks/perf`` times whole merges).
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from mergekit_ota.math.ffg import KeepRule
from mergekit_ota.math.ota import ota_merge


def fastest(call: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` timed calls (after one warm-up call), in seconds."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=16_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    n = args.numel
    base = torch.randn(n, generator=g)
    experts = [base + 0.01 * torch.randn(n, generator=g) for _ in range(2)]
    curvatures = [torch.rand(n, generator=g) ** 4 * 1e-6 for _ in range(2)]
    rules = [
        KeepRule(threshold=float((v * (e - base) ** 2).kthvalue(int(0.8 * n)).values))
        for v, e in zip(curvatures, experts)
    ]
    plain = fastest(lambda: ota_merge(base, experts, curvatures, [1.0, 1.0], rules=rules), args.repeats)
    consensus = fastest(
        lambda: ota_merge(base, experts, curvatures, [1.0, 1.0], rules=rules, consensus="sum"), args.repeats
    )
    print(
        f"{n:,} entries, 2 experts, torch threads {torch.get_num_threads()}: ota+FFG {plain:.3f} s, "
        f"with sign consensus {consensus:.3f} s ({consensus / plain:.2f}x)"
    )


if __name__ == "__main__":
    main()
