"""``mergekit-ota analyze``: where did the experts learn?

Streams a base model, its experts and their curvature stores one tensor at a time and
measures, per layer x module type: how similar the experts' curvature is, where FFG
masks keep entries (and how low-rank they are), and where the experts' masks collide.

Modules: :mod:`names` (layer / module type from a weight name), :mod:`metrics` (pure
tensor metrics), :mod:`inputs` (validated user inputs, model files), :mod:`collect`
(the streaming walk), :mod:`aggregate` (per-cell summaries), :mod:`figures`,
:mod:`findings` (the headline sentences), :mod:`report` (report.md / report.html),
:mod:`output` (staged output directory).
"""
