"""Curvature (Adam ``exp_avg_sq``) stores: locating, reading and validating them."""

from mergekit_ota.curvature.locate import DEFAULT_STORE_NAME, locate_store
from mergekit_ota.curvature.store import COL_SUFFIX, ROW_SUFFIX, CurvatureStore

__all__ = [
    "COL_SUFFIX",
    "DEFAULT_STORE_NAME",
    "ROW_SUFFIX",
    "CurvatureStore",
    "locate_store",
]
