"""Side-by-side merge-quality benchmark (``python -m benchmarks.quality.run --tier quick``).

Modules: ``tasks`` (synthetic capabilities, quick tier), ``domains`` and ``smollm`` (real data and
SmolLM2, full tier), ``tiers`` (what each tier trains and scores), ``train`` (Trainer runs and the
``mergekit-ota export`` of their curvature), ``merges`` (methods, grids, mergekit configs),
``grafting`` (single-expert grafting configs), ``evaluate`` (scoring), ``report`` (markdown and
plot), ``run`` (the pipeline and its cache).
"""
