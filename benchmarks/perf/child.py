"""One measured merge in a fresh process: imports first, then ``run_merge`` with memory sampled.

    python -m benchmarks.perf.child JOB.json RESULT.json

``JOB.json`` holds ``config`` (a mergekit configuration dict), ``out`` (output
directory) and ``out_shard_size`` (bytes).  ``RESULT.json`` receives: ``import_s``
(torch, mergekit and mergekit_ota imports), ``merge_s`` (in-process ``run_merge``
wall time), ``peak_rss`` (``VmHWM`` after resetting it once the imports are done,
when the kernel allows), ``peak_anon`` (highest ``RssAnon`` seen by a thread
sampling ``/proc/self/status`` every 5 ms during the merge), ``read_bytes`` and
``rchar`` (``/proc/self/io`` deltas over the merge), all byte values in bytes;
``cpu_s`` (user + system CPU seconds of all threads), ``minor_faults`` and
``major_faults`` (``getrusage`` deltas over the merge): CPU time is far less
sensitive than wall time to other processes sharing the cores.
"""

from __future__ import annotations

import json
import resource
import sys
import threading
import time
from typing import Dict

SAMPLE_SECONDS = 0.005


def _status() -> Dict[str, int]:
    """Memory fields of ``/proc/self/status`` in bytes."""
    values = {}
    with open("/proc/self/status", encoding="ascii") as fp:
        for line in fp:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def _io() -> Dict[str, int]:
    with open("/proc/self/io", encoding="ascii") as fp:
        return {key: int(value) for key, value in (line.split(": ") for line in fp)}


def _reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fp:
            fp.write("5")
        return True
    except OSError:
        return False


class PeakSampler(threading.Thread):
    """Highest ``RssAnon`` and ``VmRSS`` seen while running."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_anon = 0
        self.peak_rss = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def sample(self) -> None:
        status = _status()
        self.peak_anon = max(self.peak_anon, status["RssAnon"])
        self.peak_rss = max(self.peak_rss, status["VmRSS"])
        self.samples += 1

    def run(self) -> None:
        while not self._stop_event.wait(SAMPLE_SECONDS):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.sample()


def measure(job: Dict) -> Dict:
    started = time.perf_counter()
    import torch  # noqa: F401
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    import mergekit_ota

    mergekit_ota.install()  # register ota/ffg and patch mergekit (whether or not the start-up hook is on)

    import_s = time.perf_counter() - started
    config = MergeConfiguration.model_validate(job["config"])
    options = MergeOptions(quiet=True, copy_tokenizer=False, out_shard_size=int(job["out_shard_size"]), random_seed=0)
    hwm_reset = _reset_peak_rss()
    before = _status()
    io_before = _io()
    sampler = PeakSampler()
    sampler.sample()
    sampler.start()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    try:
        run_merge(config, job["out"], options)
    finally:
        merge_s = time.perf_counter() - started
        sampler.stop()
    io_after = _io()
    after = _status()
    used = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "import_s": import_s,
        "merge_s": merge_s,
        "peak_rss": after["VmHWM"] if hwm_reset else sampler.peak_rss,
        "peak_rss_source": "VmHWM" if hwm_reset else "sampled VmRSS",
        "peak_anon": sampler.peak_anon,
        "anon_before": before["RssAnon"],
        "rss_before": before["VmRSS"],
        "read_bytes": io_after["read_bytes"] - io_before["read_bytes"],
        "rchar": io_after["rchar"] - io_before["rchar"],
        "samples": sampler.samples,
        "cpu_s": (used.ru_utime + used.ru_stime) - (usage.ru_utime + usage.ru_stime),
        "minor_faults": used.ru_minflt - usage.ru_minflt,
        "major_faults": used.ru_majflt - usage.ru_majflt,
    }


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0], encoding="utf-8") as fp:
        job = json.load(fp)
    try:
        result = measure(job)
    except Exception as error:  # report, do not hide: the parent prints it and stops
        result = {"error": f"{type(error).__name__}: {error}"}
    with open(argv[1], "w", encoding="utf-8") as fp:
        json.dump(result, fp)
    if "error" in result:
        sys.exit(1)


if __name__ == "__main__":
    main()
