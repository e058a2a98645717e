"""Wall time of ota/ffg against mergekit's own methods on one generated model family.

    .venv/bin/python benchmarks/merge_time.py --hidden 768 --layers 8 --vocab 8000 --repeats 3

In-process `run_merge` (imports excluded), methods alternated, median of the repeats, and the
ratio to `task_arithmetic` measured in the same run.  (The full speed/memory suite is issue 5.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--experts", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import mergekit_ota  # noqa: F401
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from mergekit_ota.synthetic import make_family, tiny_llama_config

    root = tempfile.mkdtemp(prefix="mergekit-ota-bench-")
    config = tiny_llama_config(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers)
    family = make_family(os.path.join(root, "models"), n_experts=args.experts, config=config)
    from safetensors import safe_open

    with safe_open(os.path.join(family.base, "model.safetensors"), "pt") as f:
        params = sum(f.get_slice(k).get_shape().numel() if hasattr(f.get_slice(k).get_shape(), "numel")
                     else __import__("math").prod(f.get_slice(k).get_shape()) for k in f.keys())  # fmt: skip

    def cfg(method: str, per_expert: dict, shared: dict | None = None) -> dict:
        c = {"merge_method": method, "base_model": family.base, "dtype": "float32",
             "models": [{"model": e, "parameters": dict(per_expert)} for e in family.experts]}  # fmt: skip
        if shared:
            c["parameters"] = shared
        return c

    methods = {
        "task_arithmetic": cfg("task_arithmetic", {"weight": 1.0}),
        "linear": {k: v for k, v in cfg("linear", {"weight": 1.0}).items() if k != "base_model"},
        "ties": cfg("ties", {"weight": 1.0, "density": 0.2}),
        "dare_ties": cfg("dare_ties", {"weight": 1.0, "density": 0.2}),
        "ota": cfg("ota", {}),
        "ota+ffg tensor": cfg("ota", {"density": 0.2}),
        "ota+ffg model": cfg("ota", {"density": 0.2}, {"density_scope": "model"}),
        "ffg": cfg("ffg", {"density": 0.2}),
    }
    times: dict = {name: [] for name in methods}
    for repeat in range(args.repeats):
        for name, c in methods.items():
            out = os.path.join(root, "out", f"{repeat}-{name.replace(' ', '_')}")
            started = time.perf_counter()
            run_merge(MergeConfiguration.model_validate(c), out, MergeOptions(quiet=True, copy_tokenizer=False, random_seed=0))
            times[name].append(time.perf_counter() - started)
    reference = statistics.median(times["task_arithmetic"])
    print(f"\n{params / 1e6:.1f}M parameters, base + {args.experts} experts, fp32, {os.cpu_count()} CPUs, "
          f"median of {args.repeats}")  # fmt: skip
    print("| method | seconds | x task_arithmetic |\n|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {median / reference:.2f} |")


if __name__ == "__main__":
    main()
