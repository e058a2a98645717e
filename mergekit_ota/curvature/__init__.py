"""Curvature (Adam ``exp_avg_sq``) stores: locating, reading and validating them."""

from mergekit_ota.curvature.locate import locate_store
from mergekit_ota.curvature.store import CurvatureStore
from mergekit_ota.store_format import COL_SUFFIX, DEFAULT_STORE_NAME, ROW_SUFFIX

__all__ = [
    "COL_SUFFIX",
    "DEFAULT_STORE_NAME",
    "ROW_SUFFIX",
    "CurvatureStore",
    "locate_store",
]
