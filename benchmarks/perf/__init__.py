"""Speed and memory benchmark of ``ota``/``ffg`` against mergekit's own methods.

    .venv/bin/python -m benchmarks.perf            # default grid (~30 min on 2 idle cores)
    .venv/bin/python -m benchmarks.perf --smoke    # seconds: tiny model, 1 repeat
    .venv/bin/python -m benchmarks.perf --sizes 150M --experts 2 --methods task_arithmetic,ota

Modules: ``sizes`` (model tiers), ``models`` (cached model families), ``variants``
(the merge configurations compared), ``child`` (one measured merge, run in its own
process), ``machine`` (what it ran on), ``report`` (medians, ratios, fits, markdown),
``run`` (command line and schedule).
"""
