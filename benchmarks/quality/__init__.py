"""Side-by-side merge-quality benchmark (``python -m benchmarks.quality.run --tier quick``).

Modules: ``tasks`` (synthetic capabilities, quick tier), ``domains`` and ``smollm`` (real data and
SmolLM2, full tier), ``skills`` (procedural chat skills in the model's chat template, sft tier),
``tiers`` (what each tier trains and scores), ``train`` (Trainer runs and the ``mergekit-ota
export`` of their curvature), ``merges`` (methods, grids, mergekit configs), ``grafting``
(single-expert grafting configs), ``evaluate`` (scoring, per item), ``stats`` (paired two-level
bootstrap intervals), ``report`` and ``report_sft`` (markdown and plots), ``cost`` (the sft tier's
measured unit costs), ``run`` (the pipeline and its cache).
"""
