"""The report: figures, ``report.md`` (optionally ``report.html`` with the PNGs embedded),
and ``metrics.json`` (every per-tensor number, for your own analysis)."""

from __future__ import annotations

import base64
import html
import importlib
import json
import math
import os
import re
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Callable, Dict, List, Sequence, Tuple

from mergekit_ota.analysis import aggregate as agg
from mergekit_ota.analysis import figures as fig
from mergekit_ota.analysis.collect import Analysis
from mergekit_ota.analysis.findings import headline, masks_vary, num, pct, rule_text
from mergekit_ota.analysis.metrics import random_jaccard
from mergekit_ota.curvature.contents import SCALE_NOTE, scale_json, scale_table
from mergekit_ota.errors import OTAError

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
METRICS_JSON = "metrics.json"
#: how to install what the report needs (matplotlib, markdown): the ``analyze`` extra, not a core dependency
ANALYZE_EXTRA = "pip install 'mergekit-ota[analyze]'"


def require_report_packages(with_html: bool = False) -> None:
    """Raise a one-line :class:`~mergekit_ota.errors.OTAError` naming the ``analyze`` extra when a package the
    report needs cannot be imported: matplotlib (the figures) and, ``with_html``, markdown (``report.html``)."""
    missing = []
    for name in ["matplotlib"] + (["markdown"] if with_html else []):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise OTAError(
            f"mergekit-ota analyze needs {' and '.join(missing)} (the analyze extra, not installed with the merge "
            f"methods): {ANALYZE_EXTRA}"
        )


# ----------------------------------------------------------------------------- document model


@dataclass
class Document:
    """A report as blocks: ``(kind, payload)`` with kinds h1, h2, h3, p, ul, table, img, code."""

    blocks: List[Tuple[str, Any]] = field(default_factory=list)

    def add(self, kind: str, payload: Any) -> None:
        self.blocks.append((kind, payload))

    def images(self, images: Sequence[Tuple[str, str]]) -> None:
        """Add ``(file name, caption)`` figures."""
        for image in images:
            self.add("img", image)

    def markdown(self) -> str:
        out: List[str] = []
        for kind, payload in self.blocks:
            if kind in ("h1", "h2", "h3"):
                out.append("#" * int(kind[1]) + " " + payload)
            elif kind == "p":
                out.append(payload)
            elif kind == "ul":
                out.append("\n".join(f"- {item}" for item in payload))
            elif kind == "code":
                out.append(f"```\n{payload}\n```")
            elif kind == "table":
                header, rows = payload
                lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
                out.append("\n".join(lines))
            elif kind == "img":
                name, caption = payload
                text = caption.replace("*", "\\*").replace("_", "\\_")  # v*tau^2 is not emphasis
                out.append(f"![{text}]({name})\n\n*{text}*")
        return "\n\n".join(out) + "\n"

    def html(self, directory: str, title: str) -> str:
        """The Markdown rendered by the ``markdown`` library (tables, code blocks), each figure embedded as a
        base64 PNG so the page stands alone."""
        import markdown

        def embed(match: "re.Match[str]") -> str:
            with open(os.path.join(directory, match.group(1)), "rb") as fp:
                return 'src="data:image/png;base64,' + base64.b64encode(fp.read()).decode("ascii") + '"'

        body = markdown.markdown(_text_only(self.markdown()), extensions=["tables", "fenced_code"])
        body = re.sub(r'src="([^"/]+\.png)"', embed, body)
        return (
            "<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.45}"
            "table{border-collapse:collapse;font-size:90%}td,th{border:1px solid #ccc;padding:3px 7px}"
            f"img{{max-width:100%}}code{{background:#f3f3f3}}</style></head><body>\n{body}\n</body></html>"
        )


def _text_only(source: str) -> str:
    """``source`` with every ``<`` that could open an HTML tag outside code escaped: an expert's label or a
    tensor's name is text (markdown passes raw HTML through; inside code spans and fences it escapes by itself)."""
    out, fenced = [], False
    for line in source.split("\n"):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            parts = re.split(r"(`+[^`]*`+)", line)  # code spans stay as they are
            line = "".join(p if p.startswith("`") else re.sub(r"<(?=[A-Za-z/!?])", "&lt;", p) for p in parts)
        out.append(line)
    return "\n".join(out)


# ----------------------------------------------------------------------------- figures


def _vmax(grid: agg.Grid) -> float:
    values = [v for _, _, v in grid.cells()]
    return max(values) if values and max(values) > 0 else 1.0


def _pair_name(analysis: Analysis, p: int) -> str:
    a, b = analysis.pairs[p]
    return f"{analysis.labels[a]} vs {analysis.labels[b]}"


def _figures(analysis: Analysis, directory: str) -> Dict[str, List[Tuple[str, str]]]:
    """Write every figure; return ``{section: [(file name, caption)]}``."""
    records = analysis.records
    labels = analysis.labels
    request = analysis.inputs.request
    out: Dict[str, List[Tuple[str, str]]] = {
        "similarity": [],
        "localisation": [],
        "mass": [],
        "rank": [],
        "overlap": [],
    }

    def save(section: str, name: str, caption: str) -> str:
        out[section].append((name, caption))
        return os.path.join(directory, name)

    d = pct(request.top_density)
    for p, (a, b) in enumerate(analysis.pairs):
        name = f"curvature_similarity_{fig.slug(labels[a])}_vs_{fig.slug(labels[b])}.png"
        fig.heatmaps(
            save("similarity", name, f"Curvature similarity per layer x module, {_pair_name(analysis, p)}"),
            [
                fig.Panel("cosine of sqrt(v)", agg.grid(records, agg.curvature_cosine(p)), cmap="magma"),
                fig.Panel("Spearman of v", agg.grid(records, agg.curvature_spearman(p)), -1.0, 1.0, "coolwarm"),
                fig.Panel(
                    f"Jaccard of top-{d} curvature", agg.grid(records, agg.top_curvature_jaccard(p)), cmap="magma"
                ),
            ],
            f"Curvature similarity: {_pair_name(analysis, p)}",
        )
    if len(labels) >= 3:
        matrices = []
        for title, metric in (
            ("cosine of sqrt(v)", agg.curvature_cosine),
            ("Spearman of v", agg.curvature_spearman),
            (f"Jaccard of top-{d} curvature", agg.top_curvature_jaccard),
        ):
            matrix = [[1.0 if i == j else float("nan") for j in range(len(labels))] for i in range(len(labels))]
            for p, (a, b) in enumerate(analysis.pairs):
                matrix[a][b] = matrix[b][a] = metric(p)(records)
            matrices.append((title, matrix))
        fig.pair_matrices(
            save(
                "similarity",
                "curvature_similarity_matrix.png",
                "Curvature similarity between every pair of experts (whole model)",
            ),
            labels,
            matrices,
            "Curvature similarity (whole model)",
        )

    modules = agg.by_module(records, agg.entries)
    total = sum(modules.values())
    series: Dict[str, List[float]] = {"share of entries": [v / total for v in modules.values()]}
    for i, label in enumerate(labels):
        if _masks_vary(analysis):
            kept = agg.by_module(records, agg.kept_entries(i))
            kept_total = sum(kept.values())
            series[f"{label}: share of FFG-kept entries"] = [kept[m] / kept_total for m in modules]
        sal = agg.by_module(records, agg.saliency_sum(i))
        sal_total = sum(sal.values())
        series[f"{label}: share of saliency"] = [sal[m] / sal_total if sal_total > 0 else float("nan") for m in modules]
    fig.grouped_bars(
        save(
            "localisation",
            "module_summary.png",
            "Where the experts learned, by module type: share of entries vs "
            "share of FFG-kept entries and of saliency v*tau^2",
        ),
        list(modules),
        series,
        "Where did the experts learn? (by module type)",
        "share",
        percent=True,
    )
    for i, label in enumerate(labels):
        panels = []
        if _masks_vary(analysis):
            kept = agg.grid(records, agg.kept_fraction(i))
            magnitude = agg.grid(records, agg.kept_fraction(i, magnitude=True))
            top = max(_vmax(kept), _vmax(magnitude))
            panels += [
                fig.Panel(f"FFG kept ({rule_text(analysis, i)})", kept, vmax=top, percent=True),
                fig.Panel("magnitude |tau| kept", magnitude, vmax=top, percent=True),
            ]
        total_saliency = agg.saliency_sum(i)(records)
        share = agg.grid(
            records, lambda rs, i=i, t=total_saliency: agg.saliency_sum(i)(rs) / t if t > 0 else float("nan")
        )
        panels.append(fig.Panel("share of saliency v*tau^2", share, vmax=_vmax(share), cmap="inferno", percent=True))
        fig.heatmaps(
            save(
                "localisation",
                f"ffg_localisation_{fig.slug(label)}.png",
                f"FFG localisation of {label} per layer x module",
            ),
            panels,
            f"FFG localisation: {label}",
        )
        fig.heatmaps(
            save(
                "localisation",
                f"mask_occupancy_{fig.slug(label)}.png",
                f"Row and column occupancy of {label}'s FFG and magnitude masks per layer x module",
            ),
            [
                fig.Panel("FFG: rows used", agg.grid(records, agg.occupancy_fraction(i, "rows")), percent=True),
                fig.Panel("FFG: columns used", agg.grid(records, agg.occupancy_fraction(i, "cols")), percent=True),
                fig.Panel(
                    "magnitude: rows used", agg.grid(records, agg.occupancy_fraction(i, "rows", True)), percent=True
                ),
                fig.Panel(
                    "magnitude: columns used", agg.grid(records, agg.occupancy_fraction(i, "cols", True)), percent=True
                ),
            ],
            f"Mask occupancy: {label}",
            columns=2,
        )

    _mass_figure(analysis, save)

    ranked = [r for r in records if r.experts[0].rank is not None]
    if ranked:
        series = {}
        for i, label in enumerate(labels):
            series[f"{label}: FFG"] = [r.experts[i].rank.effective_rank / r.experts[i].rank.full_rank for r in ranked]
            series[f"{label}: magnitude"] = [
                r.experts[i].magnitude_rank.effective_rank / r.experts[i].magnitude_rank.full_rank for r in ranked
            ]
        fig.grouped_bars(
            save(
                "rank",
                "mask_effective_rank.png",
                "Effective rank / min(m,n) of FFG vs magnitude masks, largest matrices",
            ),
            [_short(r.name) for r in ranked],
            series,
            "Mask effective rank / min(m, n)",
            "effective rank / min(m,n)",
        )

    if analysis.pairs:
        fig.heatmaps(
            save(
                "overlap",
                "mask_overlap.png",
                "Jaccard of the experts' FFG masks per layer x module (where their edits collide)",
            ),
            [
                fig.Panel(f"FFG masks: {_pair_name(analysis, p)}", grid, vmax=_vmax(grid), cmap="magma")
                for p in range(len(analysis.pairs))
                for grid in [agg.grid(records, agg.mask_jaccard(p))]
            ],
            "Overlap of FFG masks between experts (Jaccard)",
        )
    return out


def mass_points(analysis: Analysis, i: int) -> Dict[str, Any]:
    """Expert ``i`` on its mass-vs-density curve (model-wide, from :attr:`Analysis.saliency`): ``at_mass``, the
    fraction of entries that keeps each saliency mass of ``MASS_CURVE`` (as check prints it); ``own``, the
    ``(density, mass)`` its FFG mask keeps (summed over the tensors); ``auto``, what ``density: auto`` at the
    request's ``saliency_mass`` keeps."""
    from mergekit_ota.methods.base import MASS_CURVE

    hist = analysis.saliency[i]
    records = analysis.records
    numel = sum(r.numel for r in records)
    total = sum(r.experts[i].saliency_sum for r in records)
    own = (
        sum(r.experts[i].kept for r in records) / numel if numel else float("nan"),
        sum(r.experts[i].kept_saliency for r in records) / total if total > 0 else float("nan"),
    )
    return {
        "at_mass": [(q, hist.kept_at(hist.threshold_for_mass(q))[0]) for q in MASS_CURVE],
        "own": own,
        "auto": hist.kept_at(hist.threshold_for_mass(analysis.inputs.request.saliency_mass)),
    }


def _mass_figure(analysis: Analysis, save: Callable[[str, str, str], str]) -> None:
    """Each expert's mass-vs-density curve with its FFG mask's point and ``density: auto``'s (``save(section, name,
    caption)`` records the figure and gives its path)."""
    labels = analysis.labels
    request = analysis.inputs.request
    curves = []
    for i, label in enumerate(labels):
        entries, masses = analysis.saliency[i].mass_curve()
        points = mass_points(analysis, i)
        marks = [("its FFG mask", *points["own"])]
        if request.experts[i].density != "auto":
            marks.append((f"auto, mass {request.saliency_mass:g}", *points["auto"]))
        curves.append(fig.Curve(label, entries, masses, marks))
    if any(c.entries for c in curves):
        fig.mass_curves(
            save(
                "mass",
                "saliency_mass_curve.png",
                "Share of saliency mass kept against the share of entries kept, "
                "per expert (model-wide, most salient first), with each expert's FFG mask and density: auto marked",
            ),
            [c for c in curves if c.entries],
            "Saliency mass vs density",
        )


def _masks_vary(analysis: Analysis) -> bool:
    return any(masks_vary(analysis, i) for i in range(len(analysis.labels)))


def _short(name: str) -> str:
    return name.removeprefix("model.").removesuffix(".weight")


# ----------------------------------------------------------------------------- the document


def _overview(doc: Document, analysis: Analysis, figures: Dict[str, List[Tuple[str, str]]], command: str) -> None:
    """The title, the inputs (experts, stores, masks) and the curvature scale table."""
    records = analysis.records
    labels = analysis.labels
    request = analysis.inputs.request
    total = int(agg.entries(records))
    doc.add("h1", "Where did the experts learn? (mergekit-ota analyze)")
    doc.add(
        "p",
        f"Base `{request.base}`, {len(labels)} expert(s), {len(records)} tensors ({total:,} entries per model). "
        f"Inputs from {request.source}. Took {sum(analysis.seconds.values()):.1f} s "
        f"({', '.join(f'{k} {v:.1f} s' for k, v in analysis.seconds.items())}).",
    )
    doc.add("code", command)
    rows = []
    for i, expert in enumerate(request.experts):
        threshold = analysis.thresholds.get(expert.label)
        rule = rule_text(analysis, i)
        if threshold is not None:
            rule += f"; saliency threshold {threshold[0]:.3g}, magnitude threshold on tau^2 {threshold[1]:.3g}"
        rows.append([expert.label, f"`{expert.model}`", f"`{expert.store}`", rule])
    doc.add("table", (["expert", "model", "curvature store", "FFG mask"], rows))
    if analysis.scales:
        columns, scale_rows = scale_table(analysis.scales)
        doc.add("p", f"Curvature scale of each expert (as `mergekit-ota inspect STORE STORE ...` shows): {SCALE_NOTE}")
        doc.add("table", (["expert", *columns[1:]], scale_rows))


def _headline(doc: Document, analysis: Analysis, figures: Dict[str, List[Tuple[str, str]]], command: str) -> None:
    """The headline findings and the notes on the inputs."""
    request = analysis.inputs.request
    doc.add("h2", "Headline findings")
    doc.add("ul", headline(analysis))
    if request.notes or analysis.inputs.skipped:
        notes = list(request.notes)
        if analysis.inputs.skipped:
            notes.append(f"Not analysed (not floating point): {', '.join(analysis.inputs.skipped)}")
        doc.add("ul", notes)


def _similarity(doc: Document, analysis: Analysis, figures: Dict[str, List[Tuple[str, str]]], command: str) -> None:
    """1. Curvature similarity between experts."""
    records = analysis.records
    request = analysis.inputs.request
    doc.add("h2", "1. Curvature similarity between experts")
    if analysis.pairs:
        d = pct(request.top_density)
        doc.add(
            "p",
            f"Per tensor and expert pair (a, b): cosine similarity of sqrt(v_a) and sqrt(v_b); Spearman rank "
            f"correlation of v_a and v_b (ties get average ranks; tensors above {request.spearman_sample:,} "
            "entries use a fixed pseudo-random sample of that many entries, drawn with replacement and seeded by the "
            "tensor name); "
            f"Jaccard of the top-{d} entries of v_a and v_b (per tensor; unrelated random sets would give "
            f"{num(random_jaccard(request.top_density, request.top_density), 3)}). Whole-model and cell values are "
            f"computed over the concatenated tensors (Spearman: entry-weighted mean). Scaling an expert's "
            f"curvature (e.g. Adam bias correction) changes none of these.",
        )
        rows = []
        for p in range(len(analysis.pairs)):
            per_tensor = agg.per_tensor(records, agg.curvature_cosine(p))
            rows.append(
                [
                    _pair_name(analysis, p),
                    num(agg.curvature_cosine(p)(records), 3),
                    f"{num(sum(per_tensor) / len(per_tensor), 3)} [{num(min(per_tensor), 3)}, "
                    f"{num(max(per_tensor), 3)}]"
                    if per_tensor
                    else "n/a",
                    num(agg.curvature_spearman(p)(records), 3),
                    num(agg.top_curvature_jaccard(p)(records), 3),
                ]
            )
        doc.add(
            "table",
            (
                ["pair", "cosine (whole model)", "cosine per tensor: mean [min, max]", "Spearman", f"top-{d} Jaccard"],
                rows,
            ),
        )
        by_module_rows = []
        metrics = [agg.by_module(records, agg.curvature_cosine(p)) for p in range(len(analysis.pairs))]
        for module in metrics[0]:
            by_module_rows.append([module] + [num(m[module], 3) for m in metrics])
        doc.add("h3", "Cosine of sqrt(v) by module type")
        doc.add("table", (["module"] + [_pair_name(analysis, p) for p in range(len(analysis.pairs))], by_module_rows))
        doc.images(figures["similarity"])
    else:
        doc.add("p", "Only one expert: nothing to compare.")


def _localisation(doc: Document, analysis: Analysis, figures: Dict[str, List[Tuple[str, str]]], command: str) -> None:
    """2. Where FFG's masks fall, by module type."""
    records = analysis.records
    labels = analysis.labels
    total = int(agg.entries(records))
    doc.add("h2", "2. FFG localisation")
    doc.add(
        "p",
        "FFG keeps the entries of tau = expert - base with the largest saliency s = v * tau^2 "
        "(`mergekit_ota.math.ffg`: per tensor the k = max(1, int(d * numel)) largest; model-wide one "
        "threshold per expert from a log-histogram of all its saliencies, as the merge does). The magnitude "
        "baseline keeps the largest |tau| by the same rule (for an absolute threshold: as many entries per "
        "tensor as FFG). Occupancy: fraction of a matrix's rows (columns) in which the mask keeps at least "
        "one entry. Share of saliency: a cell's part of the expert's total sum of v * tau^2, the "
        "diagonal-Fisher estimate of the loss its edit is worth.",
    )
    modules = agg.by_module(records, agg.entries)
    header = ["module", "share of entries"]
    columns = []
    for i, label in enumerate(labels):
        header += [f"{label}: FFG kept", f"{label}: magnitude kept", f"{label}: share of saliency"]
        total_saliency = agg.saliency_sum(i)(records)
        columns += [
            agg.by_module(records, agg.kept_fraction(i)),
            agg.by_module(records, agg.kept_fraction(i, magnitude=True)),
            agg.by_module(
                records, lambda rs, i=i, t=total_saliency: agg.saliency_sum(i)(rs) / t if t > 0 else float("nan")
            ),
        ]
    rows = [[m, pct(modules[m] / total)] + [pct(c[m]) for c in columns] for m in modules]
    overall = ["**all**", "100%"]
    for i in range(len(labels)):
        overall += [pct(agg.kept_fraction(i)(records)), pct(agg.kept_fraction(i, magnitude=True)(records)), "100%"]
    rows.append(overall)
    doc.add("table", (header, rows))
    doc.images(figures["localisation"])


def _mass_curve(doc: Document, analysis: Analysis, figures: Dict[str, List[Tuple[str, str]]], command: str) -> None:
    """2. Saliency mass against density, per expert."""
    labels = analysis.labels
    request = analysis.inputs.request
    doc.add("h3", "Saliency mass against density")
    doc.add(
        "p",
        "Each expert's entries ranked by saliency s = v * tau^2 over its whole model: the share of the total "
        "saliency carried by the most salient fraction of entries (the curve `density: auto` reads, from the "
        "same log-histogram: the fewest entries holding `saliency_mass` of the total). Reverting an entry "
        "costs about s/2 of loss, so the mass kept is the share of the expert's edit FFG keeps, to first order. "
        "The curve is the most mass any mask of that size keeps: a per-tensor mask lies on or below it.",
    )
    header = ["expert"] + [f"density at {pct(q)} mass" for q, _ in mass_points(analysis, 0)["at_mass"]]
    header += ["its FFG mask: density, mass kept", f"auto (saliency_mass {request.saliency_mass:g}): density"]
    rows = []
    for i, label in enumerate(labels):
        points = mass_points(analysis, i)
        rows.append(
            [label]
            + [pct(d) for _, d in points["at_mass"]]
            + [f"{pct(points['own'][0])}, {pct(points['own'][1])}", pct(points["auto"][0])]
        )
    doc.add("table", (header, rows))
    doc.images(figures["mass"])


def _rank(doc: Document, analysis: Analysis, figures: Dict[str, List[Tuple[str, str]]], command: str) -> None:
    """2. The rank of the masks."""
    records = analysis.records
    labels = analysis.labels
    doc.add("h3", "Rank of the masks")
    doc.add(
        "p",
        "For the largest matrices (`--rank-top`), singular values sigma of the 0/1 mask "
        "(`torch.linalg.svdvals`): effective rank exp(H(p)), p_k = sigma_k / sum(sigma), H the Shannon "
        "entropy (equals k for k equal singular values, 1 for a rank-1 mask); and the 90%-energy rank, "
        "the fewest singular values with 90% of sum(sigma^2). Both are given relative to min(m, n). "
        "A uniformly random mask is close to full rank.",
    )
    ranked = [r for r in records if r.experts[0].rank is not None]
    if ranked:
        header = ["matrix", "shape"]
        for label in labels:
            header += [f"{label}: FFG eff. rank (90% rank)", f"{label}: magnitude"]
        rows = []
        for r in ranked:
            row = [_short(r.name), "x".join(map(str, r.shape))]
            for e in r.experts:
                for rank in (e.rank, e.magnitude_rank):
                    row.append(
                        f"{num(rank.effective_rank / rank.full_rank, 3)} "
                        f"({num(rank.energy_rank_90 / rank.full_rank, 3)})"
                    )
            rows.append(row)
        doc.add("table", (header, rows))
        doc.images(figures["rank"])
    else:
        doc.add("p", "No matrix analysed (`--rank-top 0` or no 2-D tensors).")


def _overlap(doc: Document, analysis: Analysis, figures: Dict[str, List[Tuple[str, str]]], command: str) -> None:
    """3. Mask overlap between experts."""
    records = analysis.records
    labels = analysis.labels
    doc.add("h2", "3. Mask overlap between experts")
    if analysis.pairs:
        kept = [agg.kept_fraction(i)(records) for i in range(len(labels))]
        rows = []
        for p, (a, b) in enumerate(analysis.pairs):
            rows.append(
                [
                    _pair_name(analysis, p),
                    num(agg.mask_jaccard(p)(records), 3),
                    num(random_jaccard(kept[a], kept[b]), 3),
                    pct(agg.sign_conflict_rate(p)(records)),
                ]
            )
        doc.add(
            "p",
            "Jaccard |F_a and F_b| / |F_a or F_b| of the FFG masks, against independent random masks keeping "
            "the same fractions (d_a d_b / (d_a + d_b - d_a d_b)); opposite signs: among entries both keep, the "
            "fraction where tau_a and tau_b point in opposite directions (where merging the grafted experts "
            "cancels edits).",
        )
        doc.add("table", (["pair", "FFG mask Jaccard", "random baseline", "opposite signs"], rows))
        doc.images(figures["overlap"])
    else:
        doc.add("p", "Only one expert: nothing to compare.")


def _files(doc: Document, analysis: Analysis, figures: Dict[str, List[Tuple[str, str]]], command: str) -> None:
    """The files section."""
    doc.add("h2", "Files")
    doc.add(
        "p",
        f"`{METRICS_JSON}` holds every per-tensor number above (counts and sums, so any grouping can be recomputed).",
    )


SECTIONS = (_overview, _headline, _similarity, _localisation, _mass_curve, _rank, _overlap, _files)


def build_document(analysis: Analysis, figures: Dict[str, List[Tuple[str, str]]], command: str) -> Document:
    """The report, section by section (:data:`SECTIONS`), each a function that adds its blocks to the document."""
    doc = Document()
    for section in SECTIONS:
        section(doc, analysis, figures, command)
    return doc


# ----------------------------------------------------------------------------- writing


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if is_dataclass(value):
        return {f.name: _jsonable(getattr(value, f.name)) for f in fields(value)}
    if hasattr(value, "_asdict"):
        return {k: _jsonable(v) for k, v in value._asdict().items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value


def metrics_json(analysis: Analysis) -> Dict[str, Any]:
    request = analysis.inputs.request
    return {
        "request": request.model_dump(),
        "pairs": [[analysis.labels[a], analysis.labels[b]] for a, b in analysis.pairs],
        "model_wide_thresholds": {k: {"saliency": v[0], "tau_squared": v[1]} for k, v in analysis.thresholds.items()},
        "curvature_scale": scale_json(analysis.scales),
        "saliency_mass_curve": {label: mass_points(analysis, i) for i, label in enumerate(analysis.labels)},
        "seconds": analysis.seconds,
        "skipped": analysis.inputs.skipped,
        "tensors": [_jsonable(r) for r in analysis.records],
    }


def write_report(analysis: Analysis, directory: str, command: str, with_html: bool = False) -> List[str]:
    """Write figures, ``report.md`` (and ``report.html``) and ``metrics.json`` into ``directory``;
    return the files written."""
    require_report_packages(with_html)
    figures = _figures(analysis, directory)
    document = build_document(analysis, figures, command)
    written = [name for section in figures.values() for name, _ in section]
    with open(os.path.join(directory, REPORT_MD), "w", encoding="utf-8") as fp:
        fp.write(document.markdown())
    written.append(REPORT_MD)
    if with_html:
        with open(os.path.join(directory, REPORT_HTML), "w", encoding="utf-8") as fp:
            fp.write(document.html(directory, "mergekit-ota analyze"))
        written.append(REPORT_HTML)
    with open(os.path.join(directory, METRICS_JSON), "w", encoding="utf-8") as fp:
        json.dump(_jsonable(metrics_json(analysis)), fp, indent=1)
    written.append(METRICS_JSON)
    return written
