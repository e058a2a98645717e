"""A Muon expert's completed store against an all-Fisher store of the same expert, merged (docs/export.md).

    python -m benchmarks.partial_store

Builds the experts exactly as ``tests/test_partial_store.py`` does (its fixture: a tiny Llama, a Muon+AdamW expert
and an AdamW expert trained here, exported, the Muon store completed with ``fisher --only-missing`` and an
all-Fisher store of the same expert), prints the calibration ``c`` and, under ``curvature_scale`` mean and none,
the relative distance of the merged task vector from the all-Fisher store's merge for: the completed store, the
same store without ``c``, and a plain average of the experts.
"""

import json
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
import test_partial_store as t  # noqa: E402
from merging import merge  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402


class _Factory:
    """The one method of pytest's ``tmp_path_factory`` the fixture uses, under one temporary root."""

    def __init__(self, root: str) -> None:
        self.root = root

    def mktemp(self, name):  # type: ignore[no-untyped-def]
        from pathlib import Path

        return Path(tempfile.mkdtemp(prefix=name, dir=self.root))


def distance(merged, reference, base):  # type: ignore[no-untyped-def]
    """``|merged - reference| / |reference - base|`` over every tensor (float64)."""
    num = sum(float((merged[k] - reference[k]).double().pow(2).sum()) for k in base)
    return (num / sum(float((reference[k] - base[k]).double().pow(2).sum()) for k in base)) ** 0.5


def main() -> None:
    with tempfile.TemporaryDirectory() as root:
        report(root)


def report(root: str) -> None:
    """Build, merge and print (module docstring), everything under ``root``."""
    paths = t.experts.__wrapped__(_Factory(root))
    meta = t._metadata(paths["completed"])
    cal = json.loads(meta["curvature_calibration"])
    print("calibration", cal)
    base = load_file(os.path.join(paths["base"], "model.safetensors"))
    weights = [load_file(os.path.join(paths[n], "model.safetensors")) for n in ("muon", "adam")]
    average = {k: (weights[0][k] + weights[1][k]) / 2 for k in base}
    out = tempfile.mkdtemp(dir=root)
    uncalibrated = os.path.join(out, "uncalibrated")
    os.makedirs(uncalibrated)
    tensors = t._store(paths["completed"])
    for name in json.loads(meta["curvature_estimators"])["data Fisher"]:
        tensors[name] = tensors[name] / cal["factor"]
    save_file(tensors, os.path.join(uncalibrated, "exp_avg_sq.safetensors"), metadata=meta)
    for scale in ("mean", "none"):
        merged = {
            name: merge(t._config(paths, store, curvature_scale=scale), os.path.join(out, f"{name}-{scale}"))
            for name, store in (("fisher", paths["all_fisher"]), ("completed", paths["completed"]),
                                ("uncalibrated", uncalibrated))
        }  # fmt: skip
        fisher = merged.pop("fisher")
        found = {name: round(distance(m, fisher, base), 3) for name, m in {**merged, "average": average}.items()}
        print(f"curvature_scale {scale}: distance from the all-Fisher merge", found)


if __name__ == "__main__":
    main()
