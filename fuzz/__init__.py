"""A structured fuzzer for what mergekit-ota reads: ``python -m fuzz --cases N --seed S``.

Seeds (:mod:`fuzz.seeds`) are real inputs of every kind; the mutation engine (:mod:`fuzz.mutate`)
changes one node of a file's tree (pickles, safetensors headers, indexes, DCP metadata, merge configs)
or its bytes; the runner (:mod:`fuzz.runner`) runs each case through ``inspect``, ``export``, ``check``
or the store reader in a fresh temporary directory, with a time limit, and classifies the outcome.
"""
