"""Finished models' scores, cached in ``OUT/cache/<key>.json`` so an interrupted ``compare`` resumes.

The key (:func:`mergekit_ota.compare.configs.cache_key`) names everything a model's scores depend on; an
entry is written whole or not at all (:func:`mergekit_ota.io.atomic.write_text`), and one that does not parse,
or names another key, counts as missing.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

CACHE_DIR = "cache"


class Cache:
    """Finished models' scores in ``OUT/cache/<key>.json`` (each written whole or not at all)."""

    def __init__(self, root: str):
        self.root = os.path.join(root, CACHE_DIR)

    def path(self, key: str) -> str:
        return os.path.join(self.root, f"{key}.json")

    def get(self, key: str) -> Optional[Dict[str, Any]]:
        from mergekit_ota.errors import CurvatureError
        from mergekit_ota.io.safetensors import parse_json

        try:
            with open(self.path(key), "rb") as fp:
                entry = parse_json(fp.read(), self.path(key), "compare cache entry")
        except (OSError, CurvatureError):
            return None  # unreadable or not ours: the point is merged and scored again
        return entry if isinstance(entry, dict) and entry.get("key") == key else None

    def put(self, key: str, entry: Dict[str, Any]) -> None:
        from mergekit_ota.io.atomic import write_text

        os.makedirs(self.root, exist_ok=True)
        write_text(self.path(key), json.dumps({**entry, "key": key}))
