"""The report's pictures (PNG, matplotlib's Agg backend): needle heatmaps and score versus capacity."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a window, also on machines without a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import LinearSegmentedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

#: gkamradt's needle colours: red (missed) through yellow to green (found)
NEEDLE_COLORMAP = LinearSegmentedColormap.from_list("needle", ["#F0496E", "#EBB839", "#0CD79F"])
NO_CELL_COLOR = "#d9d9d9"
#: the score printed in each cell: near-black contrasts well with the map's red, yellow and green alike
#: (white would fade on the yellow and the green)
CELL_TEXT_COLOR = "#1a1a1a"
#: the opacity of an interval's band: the lines stay readable through overlapping bands
INTERVAL_ALPHA = 0.15


def needle_heatmap(cells: pd.DataFrame, title: str, path: Path) -> Path:
    """Depth percent (rows, 0 at the top) x context length (columns) of one run's cell scores, 0-100,
    each cell's score printed in it as a whole number.

    Cells not run yet are grey and empty.
    """
    grid = cells.pivot_table(index="depth_percent", columns="context_length", values="score", aggfunc="mean")
    grid = grid.sort_index().sort_index(axis=1)
    colormap = NEEDLE_COLORMAP.with_extremes(bad=NO_CELL_COLOR)
    # One size for the usual grids (up to 8 lengths x 11 depths), so that heatmaps side by side
    # compare cell for cell even when a run in progress has fewer columns.
    figure, axes = plt.subplots(figsize=(max(8.6, 0.7 * grid.shape[1] + 3), max(6.2, 0.38 * grid.shape[0] + 2)))
    image = axes.imshow(np.ma.masked_invalid(grid.to_numpy(dtype=float)), cmap=colormap, vmin=0, vmax=100,
                        aspect="auto", interpolation="nearest")
    for row, column in zip(*np.nonzero(grid.notna().to_numpy())):
        axes.text(column, row, f"{grid.iat[row, column]:.0f}", ha="center", va="center", fontsize=9,
                  color=CELL_TEXT_COLOR)
    axes.set_xticks(range(grid.shape[1]), [str(int(length)) for length in grid.columns], rotation=45, ha="right")
    axes.set_yticks(range(grid.shape[0]), [f"{depth:g}" for depth in grid.index])
    # Thin white lines between cells, as the reference figures draw them.
    axes.set_xticks(np.arange(-0.5, grid.shape[1]), minor=True)
    axes.set_yticks(np.arange(-0.5, grid.shape[0]), minor=True)
    axes.grid(which="minor", color="white", linewidth=1)
    axes.tick_params(which="minor", length=0)
    axes.set_xlabel("Context length (prompt tokens)")
    axes.set_ylabel("Depth percent")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label="Score (ROUGE-1 recall)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def capacity_figure(points: pd.DataFrame, title: str, path: Path) -> Path:
    """One panel per metric (category averages, Avg, needle): score versus KV capacity, a line per method.

    ``points`` has columns panel, label (method and settings), capacity (NA for a method
    without a budget, drawn as a dashed level), score, low and high (its 95% interval, NaN
    without one: drawn as a band around the line or the level) and complete; a point is
    hollow when its run has unfinished tasks in the panel.
    """
    panels = list(dict.fromkeys(points["panel"]))
    labels = sorted(set(points["label"]))
    # tab20 gives a distinct colour to up to 20 runs of a sweep; tab10 repeated colours past 10.
    colors = {label: plt.get_cmap("tab20")(position % 20) for position, label in enumerate(labels)}
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes_grid = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows + 0.8), squeeze=False)
    budgets = points["capacity"].dropna()
    for axes, panel in zip(axes_grid.flat, panels):
        panel_points = points[points["panel"] == panel]
        for label in labels:
            series = panel_points[panel_points["label"] == label]
            with_budget = series[series["capacity"].notna()].sort_values("capacity")
            without_budget = series[series["capacity"].isna()]
            color = colors[label]
            if not with_budget.empty:
                capacities = with_budget["capacity"].astype(float).to_numpy()
                scores = with_budget["score"].to_numpy(dtype=float)
                complete = with_budget["complete"].to_numpy(dtype=bool)
                axes.plot(capacities, scores, color=color, linewidth=1.5)
                lows, highs = with_budget["low"].to_numpy(dtype=float), with_budget["high"].to_numpy(dtype=float)
                axes.fill_between(capacities, lows, highs, color=color, alpha=INTERVAL_ALPHA, linewidth=0)
                # bars too: a band needs two points, and a lone capacity of a run in progress has one
                bounded = ~np.isnan(lows)
                # the score is the official one (rounded, or from scores.json) and the interval comes from the
                # rows, so a score may sit a hair outside it: a bar never gets a negative length
                below = np.clip(scores[bounded] - lows[bounded], 0, None)
                above = np.clip(highs[bounded] - scores[bounded], 0, None)
                axes.errorbar(capacities[bounded], scores[bounded], yerr=[below, above],
                              fmt="none", ecolor=color, elinewidth=1, capsize=3)
                axes.scatter(capacities[complete], scores[complete], color=color, zorder=3)
                axes.scatter(capacities[~complete], scores[~complete], facecolors="white", edgecolors=color, zorder=3)
            for level in without_budget.itertuples(index=False):
                axes.axhline(level.score, color=color, linestyle="--", linewidth=1.2)
                if not math.isnan(level.low):
                    axes.axhspan(level.low, level.high, color=color, alpha=INTERVAL_ALPHA, linewidth=0)
        if budgets.nunique() > 1:
            axes.set_xscale("log", base=2)
            axes.set_xticks(sorted(budgets.astype(float).unique()), [str(int(b)) for b in sorted(budgets.unique())])
        if not (panel_points["score"].fillna(0) > 0).any():
            # All scores zero: without explicit limits matplotlib zooms into a 1e-17 wide range.
            axes.set_ylim(-1, 10)
        axes.set_title(panel)
        axes.set_xlabel("KV capacity (tokens)")
        axes.set_ylabel("Score")
        axes.grid(alpha=0.3)
    for axes in list(axes_grid.flat)[len(panels):]:
        axes.set_visible(False)
    with_budgets = set(points.loc[points["capacity"].notna(), "label"])
    handles = [
        plt.Line2D([], [], color=colors[label], marker="o", label=label) if label in with_budgets
        else plt.Line2D([], [], color=colors[label], linestyle="--", label=f"{label} (no budget)")
        for label in labels
    ]
    if points["low"].notna().any():
        handles.append(Patch(color="grey", alpha=INTERVAL_ALPHA, label="95% interval"))
    if not points["complete"].all():
        handles.append(plt.Line2D([], [], color="grey", marker="o", markerfacecolor="white", linestyle="",
                                  label="unfinished tasks"))
    figure.legend(handles=handles, loc="lower center", ncol=min(4, len(handles)), frameon=False)
    figure.suptitle(title)
    legend_rows = math.ceil(len(handles) / min(4, len(handles)))
    figure.tight_layout(rect=(0, (0.35 + 0.25 * legend_rows) / figure.get_figheight(), 1, 1))
    # "tight" keeps a legend wider than the panels inside the picture.
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path
