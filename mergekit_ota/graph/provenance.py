"""Which curvature made a merge: a ``## Curvature`` section in its model card and ``mergekit_ota_curvature.json``.

The record belongs to one merge, never to the process: each plan of an ``ota``/``ffg`` merge
(:class:`~mergekit_ota.graph.planner.CurvaturePlan`) owns a :class:`MergeRecord`, and its
:class:`~mergekit_ota.graph.tasks.ModelWidePass` holds that record. The planner patch records
what it resolved (:func:`remember`, from ``plan_to_disk``): per expert, the store(s) it read
(path as resolved, and the repo, commit and file of a store in huggingface_hub's cache; its
metadata: ``step``, ``beta2``, ``compression``, ``dtype``, ``bias_corrected``) and what bias
correction did to it in this merge (the :class:`~mergekit_ota.methods.bias.BiasDecision`), plus
``curvature_scale``. The model-wide pass, when the merge makes one, adds what it decided
(:meth:`MergeRecord.note_model_wide`): per ``density: auto`` expert the density it chose
(fraction of entries, saliency mass kept, threshold, the mass-vs-density curve), and per expert
its ``curvature_scale`` statistic ``m_i``.

The ``run_merge`` guard (:mod:`mergekit_ota.integration`) waits for the record of the merge it
writes into its build directory in a :class:`Recording` (a context variable: it sees only the
planner that its own ``run_merge`` call runs, in its thread); :func:`remember` hands the plan's
record over where the output path is that build directory. A plan no guard waits for (``check``'s,
a ``MergePlanner`` used directly) keeps its record to itself, and nothing is left behind for the
next merge. Once mergekit's ``run_merge`` has written the weights, ``config.json``, its model card
(``README.md``) and ``mergekit_config.yml`` into the build directory, the guard calls
:func:`write_provenance`:

* :data:`PROVENANCE_FILE` holds the facts as JSON (always written: it is the machine-readable record);
* the card mergekit wrote *in this run* gets a ``## Curvature`` section appended (a card left
  from an earlier run, or none with ``write_model_card`` off, is not touched).
  mergekit's YAML front matter (hub metadata) and ``mergekit_config.yml`` stay as mergekit
  wrote them, so the config still loads as a mergekit config.

Both files are written through :class:`~mergekit_ota.io.atomic.StagedFiles` into the build
directory (staged, renamed into place together), before the output is swapped in: a failure
leaves each file whole, old or new, and the merge's weights are kept as after any late step.
"""

from __future__ import annotations

import json
import os
from contextvars import ContextVar, Token
from types import TracebackType
from typing import Any, Dict, List, Optional, Tuple, Type

from mergekit_ota.curvature.hub import hub_origin
from mergekit_ota.curvature.store import CurvatureStore, metadata_inputs
from mergekit_ota.curvature.writer import compression_label
from mergekit_ota.io.atomic import StagedFiles

PROVENANCE_FILE = "mergekit_ota_curvature.json"
CARD_FILE = "README.md"
SECTION_MARKER = "<!-- mergekit-ota: curvature provenance -->"
FORMAT_VERSION = 1
HEADER_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
FFG_BIAS_REASON = "not corrected: ffg uses the curvature as stored (bias correction changes only ota's weights)"


def _header_compression(store: CurvatureStore) -> str:
    """``none`` / ``rank1`` / ``partial-rank1`` from the tensors themselves (as ``export`` names it)."""
    matrices = [r for r in store.records.values() if len(r.shape) == 2]
    compressed = [r for r in store.records.values() if r.compressed]
    return compression_label(len(compressed), len(matrices))


def _header_dtype(store: CurvatureStore) -> str:
    names = sorted({HEADER_DTYPES.get(e.dtype, e.dtype) for r in store.records.values() for e in r.entries})
    return ",".join(names)


def store_facts(path: str) -> Dict[str, Any]:
    """One store as a merge used it: its resolved path, the metadata fields a reader needs (parsed), and the
    whole ``__metadata__`` as stored. ``compression``/``dtype`` come from the tensors where the metadata lacks them."""
    store = CurvatureStore.open(path)
    metadata = {str(k): str(v) for k, v in store.metadata.items()}
    found, _ = metadata_inputs(metadata)
    return {
        "path": path,
        "hub": hub_origin(path),
        "step": found.get("optimizer_step"),
        "beta2": found.get("beta2"),
        "compression": metadata.get("compression") or _header_compression(store),
        "dtype": metadata.get("dtype") or _header_dtype(store),
        "bias_corrected_in_store": found.get("bias_corrected", False),
        "metadata": metadata,
    }


def plan_record(plan: Any) -> Dict[str, Any]:
    """The provenance of a finished :class:`~mergekit_ota.graph.planner.CurvaturePlan` (plain data, no planner)."""
    method = str(plan.planner.config.merge_method)
    mode = plan.curvature_scale if method == "ota" else None
    experts: Dict[str, Dict[str, Any]] = {}
    for (model, _curvature), path in plan.stores.items():
        if path is None:
            continue
        label = str(model)
        entry = experts.setdefault(label, {"model": label, "stores": [], "bias_correction": None})
        if all(s["path"] != path for s in entry["stores"]):
            facts = store_facts(path)
            if plan.untouched.get(path):  # weights its adapter leaves as the base's: curvature 0 (planner, tasks)
                facts["curvature_zero"] = sorted(plan.untouched[path])
            entry["stores"].append(facts)
        decision = plan.bias.get(model)
        if decision is not None and entry["bias_correction"] is None:
            applied = decision.corrected and mode == "none"
            entry["bias_correction"] = {
                "applied": applied,
                "factor": decision.multiplier if applied else 1.0,
                "step": decision.step,
                "beta2": decision.beta2,
                "reason": plan.bias_reason(decision),
            }
    for entry in experts.values():
        if entry["bias_correction"] is None and method == "ffg":
            entry["bias_correction"] = {
                "applied": False,
                "factor": 1.0,
                "step": None,
                "beta2": None,
                "reason": FFG_BIAS_REASON,
            }
    from mergekit_ota import __version__

    return {
        "format_version": FORMAT_VERSION,
        "written_by": f"mergekit-ota {__version__}",
        "merge_method": method,
        "curvature_scale": mode,
        "curvature_scale_computed": plan.scale_pass if mode not in (None, "none") else None,
        "experts": list(experts.values()),
    }


class MergeRecord:
    """The provenance of one merge as it is gathered: its plan's record (:func:`plan_record`, made when the plan is
    written to disk) and what its model-wide pass decided. Each plan owns one; no two merges share one."""

    def __init__(self) -> None:
        self.plan: Optional[Dict[str, Any]] = None
        self.auto: Dict[Any, Any] = {}  # expert -> its density: auto AutoChoice
        self.statistics: Dict[Any, float] = {}  # expert -> its curvature_scale statistic m_i

    def note_model_wide(self, auto: Optional[Dict[Any, Any]], statistics: Optional[Dict[Any, float]]) -> None:
        """Called by this merge's model-wide pass: each ``density: auto`` expert's
        :class:`~mergekit_ota.methods.base.AutoChoice` and each expert's ``curvature_scale`` statistic, by expert."""
        self.auto = dict(auto or {})
        self.statistics = dict(statistics or {})

    def result(self) -> Optional[Dict[str, Any]]:
        """The record of the plan with what the model-wide pass decided, per expert (``None`` before the plan was
        written to disk)."""
        if self.plan is None:
            return None
        record = {**self.plan, "experts": [dict(entry) for entry in self.plan["experts"]]}
        by_model = {entry["model"]: entry for entry in record["experts"]}
        for model, choice in self.auto.items():
            if str(model) in by_model:
                by_model[str(model)]["density_auto"] = {
                    "saliency_mass": choice.target,
                    "density": choice.kept,
                    "mass_kept": choice.mass,
                    "threshold": choice.threshold,
                    "entries": choice.entries,
                    "density_at_mass": {f"{q:g}": d for q, d in choice.curve},
                }
        for model, value in self.statistics.items():
            if str(model) in by_model:
                by_model[str(model)]["curvature_scale_statistic"] = value
        return record


class Recording:
    """The ``run_merge`` guard's wait for the record of the merge written into ``build``, while its ``with``
    block runs: :func:`remember` hands over the record of the plan written to ``build`` (in this context only)."""

    def __init__(self, build: str) -> None:
        self.build = os.path.abspath(build)
        self.merge: Optional[MergeRecord] = None
        self._token: Optional[Token] = None

    def __enter__(self) -> "Recording":
        self._token = _RECORDING.set(self)
        return self

    def __exit__(
        self, kind: Optional[Type[BaseException]], error: Optional[BaseException], trace: Optional[TracebackType]
    ) -> None:
        if self._token is not None:
            _RECORDING.reset(self._token)
            self._token = None

    def record(self) -> Optional[Dict[str, Any]]:
        """The merge's record (:meth:`MergeRecord.result`), or ``None`` when no plan of ours was written to
        ``build`` (another method, or a failure before planning ended)."""
        return self.merge.result() if self.merge is not None else None


_RECORDING: ContextVar[Optional[Recording]] = ContextVar("mergekit_ota_provenance_recording", default=None)


def remember(out_path: str, plan: Any) -> None:
    """Record ``plan``'s provenance (``plan_to_disk``) in its :class:`MergeRecord` (``plan.provenance``), and hand
    that to the :class:`Recording` waiting for the merge into ``out_path``, if one is."""
    recording = _RECORDING.get()
    if recording is None or recording.build != os.path.abspath(out_path):
        return  # no guard waits for this merge's record (check's plan, a planner used directly)
    plan.provenance.plan = plan_record(plan)
    recording.merge = plan.provenance


def summary_lines(record: Optional[Dict[str, Any]]) -> List[str]:
    """One line per expert of a finished merge's record, what a user needs to see without ``-v`` (the merge prints
    them to stderr once): whether its curvature was bias-corrected (ota), its ``curvature_scale`` statistic ``m_i``,
    and what ``density: auto`` kept. An ``ffg`` expert without ``density: auto`` has no line."""
    if record is None:
        return []
    mode = record.get("curvature_scale")
    lines = []
    for expert in record["experts"]:
        parts = []
        bias = expert.get("bias_correction") or {}
        statistic = expert.get("curvature_scale_statistic")
        if mode not in (None, "none"):
            value = "not computed" if statistic is None else f"{statistic:.4g}"
            parts.append(f"curvature divided by its {mode} {value} (curvature_scale: {mode}; replaces bias correction)")
        elif record["merge_method"] == "ota" and bias:
            if bias.get("applied"):
                parts.append(f"bias-corrected x{bias['factor']:.4g} (step {bias['step']}, beta2 {bias['beta2']})")
            else:
                parts.append(str(bias.get("reason") or "not bias-corrected"))
        auto = expert.get("density_auto")
        if auto:
            parts.append(
                f"density: auto keeps {100 * auto['density']:.2f}% of its {auto['entries']:,} entries "
                f"({100 * auto['mass_kept']:.2f}% of its saliency mass, target {auto['saliency_mass']:g})"
            )
        if parts:
            lines.append(f"mergekit-ota: expert {expert['model']}: " + "; ".join(parts))
    return lines


def card_state(build: str) -> Optional[Tuple[int, int, int]]:
    """What identifies the card in ``build`` now (inode, size, mtime), to tell later whether this run wrote it."""
    try:
        stat = os.stat(os.path.join(build, CARD_FILE))
    except OSError:
        return None
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _cell(text: Any, code: bool = False) -> str:
    value = "—" if text is None or text == "" else str(text)
    value = value.replace("|", "\\|").replace("\n", " ")
    return f"`{value}`" if code and text not in (None, "") else value


def _where(store: Dict[str, Any]) -> str:
    """A store as a reader of the card can find it: ``repo@commit:file`` for a Hub store, else its path."""
    hub = store.get("hub")
    return f"{hub['repo']}@{hub['commit'][:12]}:{hub['file']}" if hub else store["path"]


def _short_reason(reason: Optional[str], path: str) -> Optional[str]:
    """The planner's reason with the store's path (in the column beside it) said as "its store"."""
    return (
        reason.replace(f"the metadata of {path}", "its store's metadata").replace(path, "its store")
        if reason
        else reason
    )


def card_section(record: Dict[str, Any]) -> str:
    """The markdown appended to the model card: one table row per expert and store (a Hub store named by repo,
    commit and file), then ``curvature_scale``."""
    method = record["merge_method"]
    lines = [
        SECTION_MARKER,
        "## Curvature",
        "",
        f"This model was merged with mergekit-ota's `{method}` method, which weights each expert "
        f"by its Adam second moment (`exp_avg_sq`, the curvature). Each expert used this curvature "
        f"(the same facts, machine-readable: `{PROVENANCE_FILE}`):",
        "",
        "| expert | curvature store | step | beta2 | compression | dtype | bias correction in this merge |",
        "|---|---|---|---|---|---|---|",
    ]
    for expert in record["experts"]:
        bias = expert["bias_correction"] or {}
        for store in expert["stores"]:
            cells = [
                _cell(expert["model"], code=True),
                _cell(_where(store), code=True),
                _cell(store["step"]),
                _cell(store["beta2"]),
                _cell(store["compression"]),
                _cell(store["dtype"]),
                _cell(_short_reason(bias.get("reason"), store["path"])),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    zero = [
        (e["model"], len(s["curvature_zero"]))
        for e in record["experts"]
        for s in e["stores"]
        if s.get("curvature_zero")
    ]
    if zero:
        lines += [
            "",
            "Weights a LoRA expert's adapter leaves as the base's (task vector 0) had curvature 0 for it:",
            "",
        ]
        lines += [f"- `{model}`: {count} weight(s)" for model, count in zero]
    autos = [(e["model"], e["density_auto"]) for e in record["experts"] if e.get("density_auto")]
    if autos:
        lines += ["", "`density: auto` chose, per expert, from its own saliency `v * tau**2`:", ""]
        lines += [
            f"- `{model}`: keeps {100 * a['density']:.2f}% of its {a['entries']:,} entries, holding "
            f"{100 * a['mass_kept']:.2f}% of its saliency mass (target {a['saliency_mass']:g})"
            for model, a in autos
        ]
    mode = record["curvature_scale"]
    if mode is not None:
        lines.append("")
        if mode == "none":
            lines.append(
                "curvature_scale: `none` (each expert's curvature is used on its own scale, bias-corrected as above)."
            )
        else:
            lines.append(
                f"curvature_scale: `{mode}`: each expert's curvature is divided by its own model-wide {mode}, "
                f"computed {record['curvature_scale_computed']}."
            )
    return "\n".join(lines) + "\n"


def _with_section(card: str, section: str) -> str:
    """``card`` with ``section`` at its end (replacing a section appended before)."""
    at = card.find(SECTION_MARKER)
    if at >= 0:
        card = card[:at]
    return card.rstrip("\n") + "\n\n" + section


def write_provenance(
    build: str, record: Optional[Dict[str, Any]], card_before: Optional[Tuple[int, int, int]]
) -> List[str]:
    """Write :data:`PROVENANCE_FILE` into ``build`` and append :func:`card_section` to the card this run wrote
    (``card_state`` differs from ``card_before``); staged and renamed together. Returns the files written."""
    if record is None:
        return []
    files: List[Tuple[str, bytes]] = [
        (os.path.join(build, PROVENANCE_FILE), (json.dumps(record, indent=2) + "\n").encode("utf-8"))
    ]
    card = os.path.join(build, CARD_FILE)
    state = card_state(build)
    if state is not None and state != card_before:
        with open(card, "r", encoding="utf-8") as fp:
            text = fp.read()
        files.append((card, _with_section(text, card_section(record)).encode("utf-8")))
    with StagedFiles(needed=sum(len(data) for _, data in files)) as staged:
        for path, data in files:
            staged.open(path)
            staged.write(data)
        return staged.commit()
