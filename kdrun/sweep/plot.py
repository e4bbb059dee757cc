"""``results.png`` of a sweep: a heat map of mean student test accuracy over two swept keys, or a line plot
over one (mean ± std over seeds, with the baseline and teacher means). matplotlib, Agg backend (no display).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

from kdrun.sweep.jobs import NOISE_P, SweepSummary
from kdrun.sweep.report import grid, grid_text, param

log = logging.getLogger("kdrun")


def write_png(summary: SweepSummary, path: Path) -> None:
    """A heat map of mean student test accuracy for two swept keys, a line plot for one; else none (a stale
    ``results.png`` is removed)."""
    if len(summary.cell_keys) == 2:
        heatmap(summary, grid(summary), path)
    elif len(summary.cell_keys) == 1:
        line(summary, path)
    else:
        path.unlink(missing_ok=True)
        log.info(f"no results.png: a plot needs one or two swept keys besides seed, this sweep has "
                 f"{len(summary.cell_keys)} ({', '.join(summary.cell_keys) or 'none'})")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mean_of(summary: SweepSummary, name: str):
    """The mean of a per-job figure over every completed job (e.g. the baseline and teacher test accuracy)."""
    values = [c.stats[f"{name}_mean"] for c in summary.cells if c.stats[f"{name}_mean"] is not None]
    return sum(values) / len(values) if values else None


def _subtitle(summary: SweepSummary) -> str:
    base, teacher = _mean_of(summary, "baseline"), _mean_of(summary, "teacher")
    parts = [f"{len(summary.jobs)} jobs"]
    if base is not None:
        parts.append(f"CE-only baseline {base:.2f} %")
    if teacher is not None:
        parts.append(f"teacher {teacher:.2f} %")
    return ", ".join(parts)


def mark(stats: dict) -> str:
    """A cell's mark for Δ vs the baseline: ``▲`` a significant gain, ``▼`` a significant loss (paired t-test
    p < :data:`NOISE_P`), ``~`` within noise; empty without a baseline."""
    if stats["delta_mean"] is None:
        return ""
    if stats["within_noise"]:
        return "~"
    return "▲" if stats["delta_mean"] > 0 else "▼"


MARK_COLOURS = {"▲": "tab:green", "▼": "tab:orange"}  # the corner marker of a significant cell
LEGEND = (f"▲ significant gain, ▼ significant loss vs baseline (paired t-test p < {NOISE_P});\n"
          f"~ within noise (p ≥ {NOISE_P} or n < 2); red box: best on val")


def heatmap(summary: SweepSummary, table, path: Path) -> None:
    """Rows: first swept key, columns: second; each cell: mean test %, Δ vs baseline and its mark (:func:`mark`), !
    if a job of it has warnings."""
    plt = _pyplot()
    fig = heatmap_figure(plt, summary, table)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def heatmap_figure(plt, summary: SweepSummary, table):
    """The heat map's figure, wide enough for its title and legend lines."""
    rows, cols, cells = table
    k1, k2 = summary.cell_keys
    values = [[cells[(r, c)].stats["test_mean"] if (r, c) in cells and cells[(r, c)].stats["n"] else math.nan
               for c in cols] for r in rows]
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(cols), 1.9 + 0.9 * len(rows)))
    image = ax.imshow(values, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, label="mean student test accuracy (%)")
    ax.set_xticks(range(len(cols)), [param(c) for c in cols])
    ax.set_yticks(range(len(rows)), [param(r) for r in rows])
    ax.set_xlabel(k2)
    ax.set_ylabel(k1)
    finite = [v for row in values for v in row if not math.isnan(v)]
    middle = (min(finite) + max(finite)) / 2 if finite else 0
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            _cell(plt, ax, i, j, cells.get((r, c)), middle)
    title = fig.suptitle(f"mean student test accuracy over seeds; Δ vs baseline\n{_subtitle(summary)}", fontsize=9)
    warned = "\n! = a job of the cell has warnings (listed in summary.md)" \
        if any(c.stats.get("warned") for c in cells.values()) else ""
    legend = fig.text(0.5, 0.02, LEGEND + warned, ha="center", va="bottom", fontsize=8)
    _fit(fig, [title, legend])
    return fig


def _cell(plt, ax, i: int, j: int, cell, middle: float) -> None:
    if cell is None or not cell.stats["n"]:
        ax.text(j, i, grid_text(cell), ha="center", va="center", color="red")
        return
    s = cell.stats
    text, sign = f"{s['test_mean']:.2f}", mark(s)
    if sign:
        text += f"\nΔ {s['delta_mean']:+.2f} {sign}"
    text += " !" if s.get("warned") else ""
    ax.text(j, i, text, ha="center", va="center", fontsize=8, color="black" if s["test_mean"] > middle else "white",
            fontweight="bold" if cell.best else "normal")
    if sign in MARK_COLOURS:
        ax.plot(j + 0.35, i - 0.3, marker="^" if sign == "▲" else "v", markersize=9, color=MARK_COLOURS[sign],
                markeredgecolor="black", markeredgewidth=0.6)
    if cell.best:
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))


def _fit(fig, texts) -> None:
    """Widen ``fig`` until every one of ``texts`` fits (a narrow grid clipped its title), then lay it out with
    room for the legend lines at the bottom."""
    renderer = fig.canvas.get_renderer()
    width, height = fig.get_size_inches()
    need = max(t.get_window_extent(renderer).width for t in texts) / fig.dpi + 0.3
    fig.set_size_inches(max(width, need), height)
    bottom = (texts[-1].get_window_extent(renderer).height / fig.dpi + 0.15) / height
    fig.tight_layout(rect=(0, bottom, 1, 1))


def _numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def line(summary: SweepSummary, path: Path) -> None:
    """Mean ± std of the student's test accuracy against the one swept key; baseline and teacher as lines. A key
    whose values are names (``loss=kd,dkd,crd``) gets a ranking instead (:func:`ranking`)."""
    plt = _pyplot()
    (key,) = summary.cell_keys
    cells = [c for c in summary.cells if c.stats["n"]]
    if not all(_numeric(c.params[key]) for c in cells):
        ranking(plt, summary, key, cells, path)
        return
    xs = list(range(len(cells)))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(xs, [c.stats["test_mean"] for c in cells], yerr=[c.stats["test_std"] or 0 for c in cells],
                marker="o", capsize=4, label="KD student (mean ± std over seeds)")
    for name, style in (("baseline", "--"), ("teacher", ":")):
        mean = _mean_of(summary, name)
        if mean is not None:
            ax.axhline(mean, linestyle=style, color="gray", label=f"{name} (mean {mean:.2f} %)")
    for x, cell in zip(xs, cells):
        if cell.best:
            ax.plot(x, cell.stats["test_mean"], marker="*", markersize=14, color="red", label="best on val")
    ax.set_xticks(xs, [param(c.params[key]) for c in cells])
    ax.set_xlabel(key)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"student test accuracy vs {key}\n{_subtitle(summary)}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ranking(plt, summary: SweepSummary, key: str, cells: list, path: Path) -> None:
    """The options of a named key (methods, say) ranked by mean test accuracy, best on top: mean ± std over seeds as
    error bars, the n and the Δ vs the baseline with its mark (:func:`mark`) beside each; baseline and teacher
    means as vertical lines."""
    cells = sorted(cells, key=lambda c: c.stats["test_mean"])
    ys = list(range(len(cells)))
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.38 * len(cells)))
    colours = [MARK_COLOURS.get(mark(c.stats), "tab:blue") for c in cells]
    for y, cell, colour in zip(ys, cells, colours):
        ax.errorbar(cell.stats["test_mean"], y, xerr=cell.stats["test_std"] or 0, marker="o", capsize=4,
                    color=colour, linestyle="none")
    for name, style in (("baseline", "--"), ("teacher", ":")):
        mean = _mean_of(summary, name)
        if mean is not None:
            ax.axvline(mean, linestyle=style, color="gray", label=f"{name} (mean {mean:.2f} %)")
    labels = []
    for cell in cells:
        stats, note = cell.stats, f"n={cell.stats['n']}"
        if stats["delta_mean"] is not None:
            note += f", Δ {stats['delta_mean']:+.2f} {mark(stats)}"
        labels.append(f"{param(cell.params[key])}  ({note})")
    ax.set_yticks(ys, labels, fontsize=8)
    ax.set_ylim(-0.7, len(cells) - 0.3)
    ax.set_xlabel("test accuracy (%), mean ± std over seeds")
    ax.set_title(f"student test accuracy by {key}, best on top\n{_subtitle(summary)}", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    fig.text(0.01, 0.005, "▲ green: significant gain, ▼ orange: significant loss vs baseline (paired t-test p < "
                          f"{NOISE_P}); ~ within noise", fontsize=6.5)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
