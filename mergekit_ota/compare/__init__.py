"""``mergekit-ota compare``: which merge method, at which setting, is best for the user's own experts.

:mod:`.grid` (the compared methods and their default grids, ``--methods``/``--grid``), :mod:`.configs` (CONFIG's
base and experts, each grid point's mergekit config, cache keys), :mod:`.dataset` (DATA as token rows by
capability, split in a selection and a report half), :mod:`.preflight` (every point checked by ``check``'s code
before any merge), :mod:`.score` (per-row loss, token accuracy and exact match), :mod:`.merge` (one point merged by
mergekit's ``run_merge``, scored, deleted), :mod:`.cache` (finished points in OUT), :mod:`.run` (the order of
work, OUT's rules, ``results.json``), :mod:`.stats` (the paired bootstrap and gain kept: the one home of these
statistics), :mod:`.select` (choices on the selection half), :mod:`.summary` (the verdicts, from
``results.json`` alone) and :mod:`.report` (``report.md``, ``best.yml``, the figure). See docs/compare.md.
"""
