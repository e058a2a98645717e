"""``python -m benchmarks.perf``: see :mod:`benchmarks.perf.run`."""

from benchmarks.perf.run import main

main()
