"""Peak memory of exporting native DeepSpeed ZeRO checkpoints, against the largest parameter.

    python -m benchmarks.export_memory --deepspeed-python .venv-fixtures/bin/python [--ranks 3]

Trains ``train_zero.py``'s 25M-parameter module (largest parameter: a 32 MiB embedding) for one step
under ZeRO-2 and ZeRO-3 (cached under ``benchmarks/.cache/export_memory``), then exports each in a fresh
interpreter while a thread samples ``RssAnon`` (what export allocates) and ``VmHWM`` (peak RSS, which
also counts the pages of the memory-mapped rank files export reads).  Writes
``benchmarks/results/export-memory-zero.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CACHE = os.path.join(ROOT, "benchmarks", ".cache", "export_memory")
RESULT = os.path.join(ROOT, "benchmarks", "results", "export-memory-zero.md")
LARGEST = 8192 * 1024 * 4

MEASURE = r"""
import json, sys, threading, time
from mergekit_ota.export.options import ExportOptions
from mergekit_ota.export.pipeline import export_curvature

def status(key):
    with open("/proc/self/status") as fp:
        return next(int(line.split()[1]) * 1024 for line in fp if line.startswith(key + ":"))

source, out, compress = sys.argv[1:4]
options = ExportOptions.parse(compress=compress)
with open("/proc/self/clear_refs", "w") as fp:
    fp.write("5")
rss, base = status("VmRSS"), status("RssAnon")
peak, done = [base], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], status("RssAnon"))
        time.sleep(0.0005)
thread = threading.Thread(target=sample)
thread.start()
start = time.perf_counter()
result = export_curvature(source, out, options)
seconds = time.perf_counter() - start
done.set()
thread.join()
print(json.dumps({"anon_growth": peak[0] - base, "hwm_growth": status("VmHWM") - rss, "seconds": seconds,
                  "tensors": result.tensors, "elements": result.full_fp32_bytes // 4}))
"""


def _train(python: str, stage: int, ranks: int) -> str:
    out = os.path.join(CACHE, f"zero{stage}-ranks{ranks}")
    if os.path.isfile(os.path.join(out, "latest")):
        return out
    deepspeed = os.path.join(os.path.dirname(python), "deepspeed")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    command = [
        deepspeed,
        "--num_gpus",
        str(ranks),
        os.path.join(HERE, "train_zero.py"),
        "--out",
        out,
        "--stage",
        str(stage),
    ]
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=1800)
    return out


def _rank_bytes(checkpoint: str) -> int:
    with open(os.path.join(checkpoint, "latest")) as fp:
        tag = os.path.join(checkpoint, fp.read().strip())
    return max(os.path.getsize(os.path.join(tag, f)) for f in os.listdir(tag) if f.endswith("_optim_states.pt"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--deepspeed-python", required=True, help="a Python with DeepSpeed installed")
    parser.add_argument("--ranks", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for stage in (2, 3):
        checkpoint = _train(args.deepspeed_python, stage, args.ranks)
        for compress in ("none", "rank1"):
            out = os.path.join(CACHE, f"store-{stage}-{compress}-{time.time_ns()}.safetensors")
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
            done = subprocess.run(
                [sys.executable, "-c", MEASURE, checkpoint, out, compress],
                capture_output=True,
                text=True,
                env=env,
                check=True,
            )
            measured = json.loads(done.stdout.strip().splitlines()[-1])
            os.remove(out)
            rows.append((stage, compress, measured, _rank_bytes(checkpoint)))
            print(stage, compress, measured)
    lines = [
        "# Export peak memory on native DeepSpeed ZeRO checkpoints",
        "",
        f"`python -m benchmarks.export_memory --deepspeed-python .venv-fixtures/bin/python --ranks {args.ranks}`: "
        f"a 25M-parameter module (16 x Linear(1024, 1024) and an 8192 x 1024 embedding, the largest parameter: "
        f"{LARGEST / 2**20:.0f} MiB as float32) trained one step under DeepSpeed on {args.ranks} CPU ranks; export in "
        "a "
        f"fresh interpreter. `RssAnon` growth is what export allocates; `VmHWM` growth also counts the pages of the "
        f"memory-mapped rank files it reads (given back after each parameter).",
        "",
        "| stage | compress | tensors | elements | largest rank file | RssAnon growth | x largest param | VmHWM growth "
        "| x largest param | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for stage, compress, m, rank_bytes in rows:
        lines.append(
            f"| ZeRO-{stage} | {compress} | {m['tensors']} | {m['elements']:,} | {rank_bytes / 2**20:.0f} MiB | "
            f"{m['anon_growth'] / 2**20:.1f} MiB | {m['anon_growth'] / LARGEST:.2f} | {m['hwm_growth'] / 2**20:.1f} "
            "MiB | "
            f"{m['hwm_growth'] / LARGEST:.2f} | {m['seconds']:.2f} |"
        )
    with open(RESULT, "w") as fp:
        fp.write("\n".join(lines) + "\n")
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
