"""PNG figures of the analysis (matplotlib's Agg renderer, no pyplot state, no display).

Layouts are fixed in inches (no constrained layout: it draws every figure twice).
Every function writes one PNG at ``path`` and returns it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from mergekit_ota.analysis.aggregate import Grid

DPI = 110
_ANNOTATE_MAX_CELLS = 160
_BAD = "#dddddd"


@dataclass
class Panel:
    """One heat map: a grid, its colour range and how its numbers read."""

    title: str
    grid: Grid
    vmin: float = 0.0
    vmax: float = 1.0
    cmap: str = "viridis"
    percent: bool = False


@dataclass
class _Margins:
    """Space around and between a grid of axes, in inches."""

    left: float = 0.9
    right: float = 0.15
    bottom: float = 0.85
    top: float = 0.6
    hgap: float = 1.0
    vgap: float = 1.25


def _figure(across: int, down: int, cell: Tuple[float, float], margins: _Margins):
    """A figure whose ``down x across`` axes are each ``cell`` inches (width, height)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width = margins.left + margins.right + across * cell[0] + (across - 1) * margins.hgap
    height = margins.bottom + margins.top + down * cell[1] + (down - 1) * margins.vgap
    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    figure.subplots_adjust(
        left=margins.left / width,
        right=1 - margins.right / width,
        bottom=margins.bottom / height,
        top=1 - margins.top / height,
        wspace=margins.hgap / cell[0],
        hspace=margins.vgap / cell[1],
    )
    return figure, figure.subplots(down, across, squeeze=False).reshape(-1)


def _save(figure, path: str) -> str:
    figure.savefig(path, dpi=DPI)
    return path


def _percent(value: float, _position: object = None) -> str:
    return f"{100 * value:.3g}%"


def _fmt(value: float, percent: bool) -> str:
    if percent:
        return f"{100 * value:.0f}" if value >= 0.095 else f"{100 * value:.1f}"
    return f"{value:.2f}"


def heatmaps(path: str, panels: Sequence[Panel], title: str, columns: int = 3) -> str:
    """Layer x module heat maps, ``columns`` per row of panels (rows: layers; columns: module
    types; percent panels annotated in %); empty cells grey."""
    import numpy as np
    from matplotlib import colormaps

    n_rows = max(len(p.grid.rows) for p in panels)
    n_cols = max(len(p.grid.cols) for p in panels)
    across = min(columns, len(panels))
    down = math.ceil(len(panels) / across)
    cell = (max(2.4, 0.45 * n_cols + 0.6), max(1.4, 0.28 * n_rows))
    figure, axes = _figure(across, down, cell, _Margins())
    for ax in axes[len(panels) :]:
        ax.set_axis_off()
    for ax, panel in zip(axes, panels):
        values = np.ma.masked_invalid(
            np.array(panel.grid.values, dtype=float).reshape(len(panel.grid.rows), len(panel.grid.cols))
        )
        cmap = colormaps[panel.cmap].with_extremes(bad=_BAD)
        image = ax.imshow(values, cmap=cmap, vmin=panel.vmin, vmax=panel.vmax, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(panel.grid.cols)), panel.grid.cols, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(panel.grid.rows)), panel.grid.row_labels, fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
        ax.set_title(panel.title, fontsize=9)
        if values.size <= _ANNOTATE_MAX_CELLS:
            span = (panel.vmax - panel.vmin) or 1.0
            for (a, b), value in np.ndenumerate(values.filled(np.nan)):
                if not math.isnan(value):
                    dark = (value - panel.vmin) / span < 0.6
                    ax.text(
                        b,
                        a,
                        _fmt(value, panel.percent),
                        ha="center",
                        va="center",
                        fontsize=6.5,
                        color="white" if dark else "black",
                    )
        bar = figure.colorbar(image, ax=ax, fraction=0.08, pad=0.03)
        bar.ax.tick_params(labelsize=7)
        if panel.percent:
            bar.ax.yaxis.set_major_formatter(_percent)
    figure.suptitle(title, fontsize=10)
    return _save(figure, path)


def grouped_bars(
    path: str,
    categories: Sequence[str],
    series: Dict[str, Sequence[float]],
    title: str,
    ylabel: str,
    percent: bool = False,
) -> str:
    """Bars per category, one colour per series (NaN bars drawn as 0)."""
    import numpy as np

    n = max(1, len(series))
    width = min(14.0, max(4.5, 0.32 * len(categories) * n))
    figure, (ax,) = _figure(1, 1, (width, 2.8), _Margins(left=0.8, bottom=1.2, top=0.4))
    step = 0.8 / n
    positions = np.arange(len(categories))
    for k, (name, values) in enumerate(series.items()):
        heights = np.array([np.nan if v is None else v for v in values], dtype=float)
        ax.bar(positions - 0.4 + step * (k + 0.5), np.nan_to_num(heights, nan=0.0), step, label=name)
    ax.set_xticks(positions, categories, rotation=35, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(categories) - 0.4)
    ax.set_ylabel(ylabel, fontsize=8)
    if percent:
        ax.yaxis.set_major_formatter(_percent)
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=7, ncols=min(n, 3))
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _save(figure, path)


def pair_matrices(path: str, labels: Sequence[str], matrices: List[Tuple[str, List[List[float]]]], title: str) -> str:
    """Expert x expert matrices (one panel per metric, colour range 0..1), values annotated."""
    import numpy as np
    from matplotlib import colormaps

    side = max(1.8, 0.45 * len(labels))
    longest = max(len(label) for label in labels)
    margins = _Margins(left=0.3 + 0.07 * longest, bottom=0.3 + 0.06 * longest, hgap=0.4 + 0.07 * longest)
    figure, axes = _figure(len(matrices), 1, (side, side), margins)
    for ax, (name, matrix) in zip(axes, matrices):
        values = np.ma.masked_invalid(np.array(matrix, dtype=float))
        ax.imshow(values, cmap=colormaps["magma"].with_extremes(bad=_BAD), vmin=0.0, vmax=1.0)
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        for (a, b), value in np.ndenumerate(values.filled(np.nan)):
            if not math.isnan(value):
                ax.text(
                    b,
                    a,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if value < 0.6 else "black",
                )
        ax.set_title(name, fontsize=9)
    figure.suptitle(title, fontsize=10)
    return _save(figure, path)


@dataclass
class Curve:
    """One expert's mass-vs-density curve and its marked points ``(label, density, mass)``."""

    label: str
    entries: Sequence[float]
    masses: Sequence[float]
    points: Sequence[Tuple[str, float, float]]


def mass_curves(path: str, curves: Sequence[Curve], title: str) -> str:
    """Saliency mass kept against the fraction of entries kept (log x), one line per expert, its points marked."""
    figure, (ax,) = _figure(1, 1, (5.2, 3.3), _Margins(left=0.8, bottom=0.7, top=0.45, right=2.3))
    markers = "osD^v"
    for curve in curves:
        (line,) = ax.plot(curve.entries, curve.masses, lw=1.3, label=curve.label)
        for j, (name, x, y) in enumerate(curve.points):
            ax.plot([x], [y], markers[j % len(markers)], color=line.get_color(), ms=5, label=f"{curve.label}: {name}")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(_percent)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("entries kept (largest saliency v*tau^2 first)", fontsize=8)
    ax.set_ylabel("share of saliency mass kept", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    ax.set_title(title, fontsize=10)
    return _save(figure, path)


def slug(label: str) -> str:
    """A file-name-safe version of an expert label."""
    cleaned = "".join(c if c.isalnum() or c in "-_" else "_" for c in label).strip("_")
    return cleaned or "expert"
