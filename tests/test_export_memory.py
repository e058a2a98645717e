"""Export streams: its memory stays near the largest tensor, not the checkpoint's size."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

TENSORS, NUMEL = 40, 1 << 20  # 40 tensors of 4 MiB = 160 MiB of exp_avg_sq

# Runs in a fresh interpreter: a warm-up export (so lazy imports are done), then the measured one while a
# thread samples RssAnon (anonymous resident memory: what export allocates); VmHWM, reset before the export,
# also counts the pages of the memory-mapped checkpoint that export reads.
MEASURE = r"""
import json, sys, threading, time
from mergekit_ota.export.options import ExportOptions
from mergekit_ota.export.pipeline import export_curvature

def status(key):
    with open("/proc/self/status") as fp:
        return next(int(line.split()[1]) * 1024 for line in fp if line.startswith(key + ":"))

small, big, out_dir = sys.argv[1:4]
report = {}
for compress in ("none", "rank1"):
    options = ExportOptions.parse(bias_correct=True, compress=compress)
    export_curvature(small, f"{out_dir}/warmup-{compress}.safetensors", options)
    try:  # reset the peak RSS (VmHWM), which counts mapped file pages too
        with open("/proc/self/clear_refs", "w") as fp:
            fp.write("5")
        rss = status("VmRSS")
    except OSError:
        rss = None
    base = status("RssAnon")
    peak, done = [base], threading.Event()
    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], status("RssAnon"))
            time.sleep(0.0005)
    thread = threading.Thread(target=sample)
    thread.start()
    start = time.perf_counter()
    result = export_curvature(big, f"{out_dir}/store-{compress}", options)
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    hwm = status("VmHWM") - rss if rss is not None else None
    report[compress] = {"base": base, "peak": peak[0], "hwm_growth": hwm, "seconds": seconds, "bytes":
    result.bytes_on_disk}
print(json.dumps(report))
"""


def _optimizer_file(path: str, tensors: int, numel: int) -> None:
    """A named (param_names) Adam state dict of ``tensors`` 1-D exp_avg_sq tensors of ``numel`` floats."""
    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.weight" for i in range(tensors)]
    state = {
        i: {"step": torch.tensor(5.0), "exp_avg_sq": torch.rand((numel // 1024, 1024), generator=g)}
        for i in range(tensors)
    }
    groups = [{"params": list(range(tensors)), "param_names": names, "betas": (0.9, 0.999), "lr": 1e-3}]
    torch.save({"state": state, "param_groups": groups}, path)


def _measure(tmp_path) -> dict:
    small, big = str(tmp_path / "small.pt"), str(tmp_path / "big.pt")
    _optimizer_file(small, 2, 4096)
    _optimizer_file(big, TENSORS, NUMEL)
    out = tmp_path / "out"
    out.mkdir()
    # glibc keeps freed 4 MiB blocks in its heap after raising its mmap threshold; a fixed threshold makes
    # RssAnon show what export holds rather than what the allocator keeps for reuse
    env = {**os.environ, "MERGEKIT_OTA_DISABLE": "1", "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, small, big, str(out)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_export_peak_memory_stays_near_the_largest_tensor(tmp_path):
    """Exporting 160 MiB of exp_avg_sq (40 x 4 MiB, bias-corrected so every tensor is copied, then written in
    full or rank-1 compressed) raises anonymous memory, and the peak RSS including the memory-mapped
    checkpoint's pages, by a few tensors at most: far below the checkpoint's size."""
    checkpoint = TENSORS * NUMEL * 4
    largest = NUMEL * 4
    for kind, measured in _measure(tmp_path).items():
        grown, hwm = measured["peak"] - measured["base"], measured["hwm_growth"]
        print(
            f"{kind}: exporting {checkpoint / 2**20:.0f} MiB in {measured['seconds']:.2f} s: RssAnon grew "
            f"{grown / 2**20:.1f} MiB, peak RSS (VmHWM) {hwm / 2**20 if hwm is not None else float('nan'):.1f} MiB"
        )
        assert grown < 4 * largest, (kind, measured)
        if hwm is not None:  # mapped pages are given back tensor by tensor
            assert hwm < 6 * largest, (kind, measured)
