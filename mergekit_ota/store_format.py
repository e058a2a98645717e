"""A curvature store's vocabulary: file names, tensor key suffixes, metadata keys, sizes.

The one home of what both sides of a store agree on: the readers (:mod:`mergekit_ota.curvature`) and the
exporter and training callback that write stores (:mod:`mergekit_ota.export`, :mod:`mergekit_ota.training`)
import these names from here, so neither side imports the other for them. Nothing here imports torch.

* names: a store is ``exp_avg_sq.safetensors``, or shards ``exp_avg_sq-0000i-of-0000N.safetensors`` with
  ``exp_avg_sq.safetensors.index.json``; a directory is searched for them in :data:`SEARCHED`'s order;
* keys: a rank-1 compressed 2-D tensor ``NAME`` is stored as ``NAME:rank1_row`` and ``NAME:rank1_col``;
* metadata (safetensors ``__metadata__``, strings only): ``step``, ``beta2`` and ``bias_corrected`` read by
  :func:`metadata_inputs`; the JSON lists of names ``parameters_without_state`` and ``mapping_by_order`` read by
  :func:`metadata_names` (the one parser of both);
* LoRA adapters (``export`` of a PEFT checkpoint, ``docs/lora.md``): :data:`ADAPTER` (``"lora"``) says the store
  came from an adapter's optimizer state, :data:`ADAPTER_CONFIG` holds the adapter's settings (JSON object),
  :data:`ADAPTER_UNTOUCHED` the JSON list of base weights the adapter does not change (their task vector is 0)
  and :data:`ADAPTER_AGREEMENT` the JSON object ``{weight: agreement}`` of each adapted matrix's two scale
  estimates (:mod:`mergekit_ota.math.lora`); :func:`metadata_names` reads the list like the other two;
  :data:`ADAPTER_FINGERPRINT` is the weights fingerprint (:mod:`mergekit_ota.curvature.fingerprint`) of every
  tensor of the adapter's ``adapter_model.safetensors``, which a merge of ``BASE+ADAPTER`` compares with its
  adapter's (a LoRA store has no ``weights_fingerprint``: its optimizer never saw the folded weights);
* partial stores (``export`` of an optimizer that keeps momentum only for some tensors, e.g. Muon's matrices):
  :data:`MISSING` is the JSON object ``{tensor: reason}`` of the parameters the store has no curvature for; the
  merge refuses them naming :func:`complete_command`, the ``fisher --only-missing`` run that writes the complete
  store. A store whose tensors came from more than one estimator records :data:`ESTIMATORS`, the JSON object
  ``{estimator: [tensor, ...]}``, and :data:`CALIBRATION`, the JSON object saying how the added estimator was
  put on the scale of the store's own (:mod:`mergekit_ota.fisher.complete`); :func:`metadata_object` reads
  both objects;
* sizes: :func:`parse_size` reads a shard size such as ``"2GB"``.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Tuple

from mergekit_ota.errors import ConfigError, CurvatureError
from mergekit_ota.io.safetensors import INDEX_SUFFIX, parse_json

__all__ = [
    "ADAPTER",
    "ADAPTER_AGREEMENT",
    "ADAPTER_CONFIG",
    "ADAPTER_FINGERPRINT",
    "ADAPTER_UNTOUCHED",
    "COL_SUFFIX",
    "DEFAULT_SHARD_BYTES",
    "DEFAULT_STORE_NAME",
    "EXPORT_SUBDIR",
    "FORMAT_VERSION",
    "INDEX_SUFFIX",
    "MAPPING_BY_ORDER",
    "METADATA_KEYS",
    "ROW_SUFFIX",
    "SEARCHED",
    "STORE_STEM",
    "TRUE_WORDS",
    "WITHOUT_STATE",
    "CALIBRATION",
    "ESTIMATOR",
    "ESTIMATORS",
    "MISSING",
    "complete_command",
    "metadata_inputs",
    "metadata_names",
    "metadata_object",
    "missing_tensors",
    "parse_size",
]

DEFAULT_STORE_NAME = "exp_avg_sq.safetensors"
STORE_STEM = DEFAULT_STORE_NAME.removesuffix(".safetensors")  # shards are STORE_STEM-0000i-of-0000N.safetensors
EXPORT_SUBDIR = "export"
_NAMES = (DEFAULT_STORE_NAME + INDEX_SUFFIX, DEFAULT_STORE_NAME)
#: store files looked for in a directory or Hub repo, relative to it (``/``-separated), in order
SEARCHED: Tuple[str, ...] = _NAMES + tuple(f"{EXPORT_SUBDIR}/{name}" for name in _NAMES)

ROW_SUFFIX = ":rank1_row"
COL_SUFFIX = ":rank1_col"

FORMAT_VERSION = "1"
DEFAULT_SHARD_BYTES = 5_000_000_000  # a directory or index output's default shard size ("5GB")

WITHOUT_STATE = "parameters_without_state"  # JSON list: model parameters the source had no optimizer state for
MAPPING_BY_ORDER = "mapping_by_order"  # JSON list: exported names matched by the parameter order alone
ADAPTER = "adapter"  # "lora": curvature derived from a LoRA adapter's optimizer state (math/lora.py)
ADAPTER_CONFIG = "adapter_config"  # JSON object: peft_type, r, lora_alpha, use_rslora, modules_to_save, ...
ADAPTER_UNTOUCHED = "adapter_untouched"  # JSON list: base weights the adapter leaves as they are (tau = 0)
ADAPTER_AGREEMENT = "adapter_scale_agreement"  # JSON object: {weight: min(P, Q) / max(P, Q)} per adapted matrix
ADAPTER_FINGERPRINT = "adapter_fingerprint"  # sha256:... of every tensor of adapter_model.safetensors (fingerprint.py)
MISSING = "missing_curvature"  # JSON object {tensor: reason}: no curvature in this store (momentum-only optimizer)
ESTIMATOR = "curvature_estimator"  # text: the estimator of every tensor where it is not Adam's v (e.g. Sophia's)
ESTIMATORS = "curvature_estimators"  # JSON object {estimator: [tensor, ...]}: where each tensor's curvature came from
CALIBRATION = "curvature_calibration"  # JSON object: how a completed store's added tensors were put on its scale
TRUE_WORDS = {"1", "true", "yes"}
#: metadata key -> (merge parameter, type), as ``export`` and the training callback write them
METADATA_KEYS = (("step", "optimizer_step", int), ("beta2", "beta2", float))


def metadata_inputs(metadata: Mapping[str, str]) -> Tuple[Dict[str, Any], List[str]]:
    """``optimizer_step``, ``beta2`` and ``bias_corrected`` as a store's metadata records them
    (keys ``step``, ``beta2``, ``bias_corrected``), and the keys whose value is not a number."""
    found: Dict[str, Any] = {}
    bad: List[str] = []
    for key, name, kind in METADATA_KEYS:
        if metadata.get(key) not in (None, ""):
            try:
                found[name] = kind(metadata[key])
            except ValueError:
                bad.append(key)
    if metadata.get("bias_corrected") not in (None, ""):
        found["bias_corrected"] = str(metadata["bias_corrected"]).lower() in TRUE_WORDS
    return found, bad


def metadata_names(metadata: Mapping[str, str], key: str, path: str) -> List[str]:
    """Metadata field ``key`` of ``path`` holding a JSON list of names (:data:`WITHOUT_STATE`,
    :data:`MAPPING_BY_ORDER`, :data:`ADAPTER_UNTOUCHED`); ``[]`` when absent; anything else (a JSON string, a
    number, a list of non-strings, text that is not JSON) is a :class:`CurvatureError` naming the file and key."""
    text = metadata.get(key)
    if text in (None, ""):
        return []
    value = parse_json(str(text).encode("utf-8", "surrogatepass"), f"{path} metadata '{key}'", "JSON list")
    if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
        raise CurvatureError(f"{path}: metadata '{key}' must be a JSON list of names; found {str(text)[:80]!r}")
    return value


def metadata_object(metadata: Mapping[str, str], key: str, path: str) -> Dict[str, Any]:
    """Metadata field ``key`` of ``path`` holding a JSON object (:data:`MISSING`, :data:`ESTIMATORS`,
    :data:`CALIBRATION`); ``{}`` when absent; text that is not a JSON object is a :class:`CurvatureError` naming the
    file and key."""
    text = metadata.get(key)
    if text in (None, ""):
        return {}
    value = parse_json(str(text).encode("utf-8", "surrogatepass"), f"{path} metadata '{key}'", "JSON object")
    if not isinstance(value, dict):
        raise CurvatureError(f"{path}: metadata '{key}' must be a JSON object; found {str(text)[:80]!r}")
    return value


def missing_tensors(metadata: Mapping[str, str], path: str) -> Dict[str, str]:
    """:data:`MISSING` of the store ``path``: ``{tensor: reason}`` (reasons as strings), ``{}`` when absent."""
    value = metadata_object(metadata, MISSING, path)
    if not all(isinstance(reason, str) for reason in value.values()):
        raise CurvatureError(f"{path}: metadata '{MISSING}' must map tensor names to reasons (strings)")
    return value


def complete_command(store: str, model: str = "MODEL", data: str = "DATA") -> str:
    """The command that completes the partial store ``store`` (:data:`MISSING`) into a new one."""
    return f"mergekit-ota fisher {model} {data} OUT --only-missing {store}"


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(value: str) -> int:
    """Bytes in ``"2GB"``, ``"500MB"``, ``"1.5GiB"``, ``"4096"`` (K/M/G/T decimal, KiB/MiB/GiB/TiB binary)."""
    match = _SIZE.match(str(value))
    if not match:
        bare = re.match(
            r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)\s*$", str(value).lower().removesuffix("b").strip(), re.IGNORECASE
        )
        if bare and str(value).strip()[-1:] in "bB" and not bare.group(2):
            raise ConfigError(
                f"size {value!r} is ambiguous: {bare.group(1)} bytes or {bare.group(1)} billion (as mergekit's "
                f"--out-shard-size counts parameters)? A store's shards are files: write bytes with a unit, "
                f"e.g. {bare.group(1)}GB"
            )
        raise ConfigError(f"cannot read size {value!r}: write a number of bytes with a unit, e.g. 2GB, 500MB, 1.5GiB")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    scale = _UNITS[unit[:1]] if "i" not in unit else 1024 ** " kmgt".index(unit[0])
    size = int(number * scale)
    if size <= 0:
        raise ConfigError(f"size {value!r} must be positive")
    return size
