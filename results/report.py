"""`kvbench report`: every run under some folders as tables (markdown, CSV), pictures and one HTML page.

Written into the output folder:

* ``report.md``: the tables ready to paste, with links to the PNG files beside it;
* ``report.html``: one self-contained page, tables and pictures (base64) inside;
* ``runs.csv`` (one row per run and task, as `load_runs` gives it), one CSV per table
  (``longbench.csv``, ``longbench_e.csv``, ``needle.csv``, each value with a
  ``complete`` flag) and ``needle_cells.csv`` (every needle cell's answer and scores);
* PNGs: ``needle-<run>.png`` heatmaps and ``capacity-<model>.png`` score-versus-capacity
  figures (written for the md and html formats).
"""

from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterable

import pandas as pd

from kvbench.errors import KvbenchError
from kvbench.results import plots
from kvbench.results.load import RUN_KEY, default_runs_dir, load_runs, needle_cells
from kvbench.results.tables import (
    NEEDLE,
    Cell,
    Table,
    leaderboard,
    longbench_e_table,
    needle_table,
    same_run,
    sorted_runs,
    to_html,
    to_markdown,
)

FORMATS = ("md", "csv", "html")
REPORT_FOLDER = "report"

PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; }
h1 { margin-bottom: 0.2rem; }
.meta, .note { color: #666; font-size: 0.9rem; }
table.scores { border-collapse: collapse; margin: 0.6rem 0; font-size: 0.88rem; }
table.scores th, table.scores td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; }
table.scores th { background: #f3f3f3; }
table.scores th.group { background: #e4e9f2; }
table.scores th.avg, table.scores td.avg { background: #f7f7fb; }
td.key { white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.partial { color: #a05a00; font-style: italic; }
.scroll { overflow-x: auto; }
.figures { display: flex; flex-wrap: wrap; gap: 1rem; }
figure { margin: 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figure.heatmap img { width: 34rem; }
"""


@dataclass
class Picture:
    section: str
    caption: str
    path: Path


def parse_formats(text: str) -> list[str]:
    formats = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [part for part in formats if part not in FORMATS]
    if unknown or not formats:
        raise KvbenchError(f"--format: expected a comma list of {', '.join(FORMATS)}, got {text!r}")
    return formats


def _slug(*parts: object) -> str:
    text = "-".join(str(part) for part in parts if not pd.isna(part) and str(part) != "")
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text)


def _run_title(run: pd.Series) -> str:
    capacity = "" if pd.isna(run["capacity"]) else f" {run['capacity']}"
    settings = f" ({run['settings']})" if run["settings"] else ""
    return f"{run['model']} · {run['method']}{capacity}{settings}"


def overview_table(frame: pd.DataFrame) -> Table:
    """Each run's progress: samples finished of planned per task, and its folder."""
    runs = sorted_runs(frame)
    cells = []
    for _, run in runs.iterrows():
        mine = frame[same_run(frame, run)]
        done = int(mine["n_done"].sum())
        planned = "?" if mine["n_total"].isna().any() else str(int(mine["n_total"].sum()))
        complete = bool(mine["complete"].all())
        tasks = ", ".join(mine["task"])
        folders = ", ".join(dict.fromkeys(mine["run_dir"]))
        cells.append([Cell(text=tasks, complete=True), Cell(text=f"{done}/{planned}", complete=complete),
                      Cell(text=folders, complete=True)])
    return Table(name="runs", title="Runs", runs=runs, columns=["Tasks", "Samples done", "Folder"], cells=cells,
                 numeric=False)


def _needle_pictures(frame: pd.DataFrame, out: Path) -> list[Picture]:
    cells = needle_cells(frame)
    pictures = []
    needle_rows = frame[frame["category"] == NEEDLE].sort_values(RUN_KEY + ["task"], na_position="last")
    for _, row in needle_rows.iterrows():
        mine = cells[(cells["task"] == row["task"]) & same_run(cells, row)]
        if mine.empty:
            continue
        planned = "?" if pd.isna(row["n_total"]) else row["n_total"]
        progress = "" if row["complete"] else f"  ({row['n_done']}/{planned} cells)"
        title = f"{_run_title(row)}\nNeedle average {row['score']:.1f}{progress}"
        other_needle = row["task"] if row["task"] != NEEDLE else None
        name = _slug("needle", row["model"], row["method"], row["capacity"], row["settings"], other_needle)
        path = out / f"{name}.png"
        plots.needle_heatmap(mine, title, path)
        pictures.append(Picture("Needle-in-a-Haystack", title.replace("\n", " — "), path))
    return pictures


def _capacity_pictures(tables: list[Table], out: Path) -> list[Picture]:
    """Score versus capacity per model, from the leaderboard's averages and the needle score."""
    records = []
    for table in tables:
        panels = {
            "longbench": [column for column in table.columns
                          if column == "Avg" or (column.endswith(" avg") and column != "Task avg")],
            "needle": table.columns[:1],
        }.get(table.name, [])
        for run_position, (_, run) in enumerate(table.runs.iterrows()):
            label = run["method"] + (f" ({run['settings']})" if run["settings"] else "")
            for column in panels:
                cell = table.cells[run_position][table.columns.index(column)]
                if math.isnan(cell.value):
                    continue
                panel = {"needle": "Needle"}.get(table.name, "LongBench Avg" if column == "Avg" else column.removesuffix(" avg"))
                records.append({"model": run["model"], "label": label, "capacity": run["capacity"], "panel": panel,
                                "score": cell.value, "complete": cell.complete})
    if not records:
        return []
    points = pd.DataFrame.from_records(records)
    pictures = []
    for model, model_points in points.groupby("model", sort=True):
        if model_points["capacity"].nunique() < 2:
            continue  # fewer than two budgets: no curve to draw
        title = f"{model}: score versus KV capacity"
        path = plots.capacity_figure(model_points, title, out / f"{_slug('capacity', model)}.png")
        pictures.append(Picture("Score versus capacity", title, path))
    return pictures


def _sections(tables: list[Table], overview: Table) -> list[tuple[str, Table | None]]:
    """The report's sections in page order: the score tables, the capacity figures, the runs."""
    return [(table.title, table) for table in tables] + [("Score versus capacity", None), ("Runs", overview)]


def _markdown(tables: list[Table], overview: Table, pictures: list[Picture], sources: list[Path]) -> str:
    lines = ["# kvbench report", "", f"Runs under {', '.join(f'`{source}`' for source in sources)}.", ""]
    for title, table in _sections(tables, overview):
        images = [f"![{picture.caption}]({picture.path.name})" for picture in pictures if picture.section == title]
        if table is None and not images:
            continue
        lines += [f"## {title}", ""]
        if table is not None:
            lines.append(to_markdown(table))
        lines += [image + "\n" for image in images]
    return "\n".join(lines)


def _embedded(picture: Picture) -> str:
    """The picture inside the page; its title is drawn in it, so no caption repeats it."""
    data = base64.b64encode(picture.path.read_bytes()).decode("ascii")
    kind = "heatmap" if picture.section == "Needle-in-a-Haystack" else "chart"
    return f'<figure class="{kind}"><img src="data:image/png;base64,{data}" alt="{html.escape(picture.caption)}"></figure>'


def _html_page(tables: list[Table], overview: Table, pictures: list[Picture], sources: list[Path]) -> str:
    body = [
        "<h1>kvbench report</h1>",
        f'<p class="meta">Runs under {html.escape(", ".join(str(source) for source in sources))}; '
        f"generated {datetime.now():%Y-%m-%d %H:%M}.</p>",
    ]
    for title, table in _sections(tables, overview):
        figures = [_embedded(picture) for picture in pictures if picture.section == title]
        if table is None and not figures:
            continue
        body.append(f"<h2>{html.escape(title)}</h2>")
        if table is not None:
            body.append(f'<div class="scroll">{to_html(table)}</div>')
        if figures:
            body.append('<div class="figures">' + "".join(figures) + "</div>")
    return ("<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>kvbench report</title>"
            f"<style>{PAGE_STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(paths: Iterable[str | Path] = (), out: str | Path | None = None,
                 formats: Iterable[str] = FORMATS) -> list[Path]:
    """Read every run under ``paths`` (default: `kvbench run`'s output folder) and write the report
    into ``out`` (default: ``<first folder>/report``). Returns the files written."""
    sources = [Path(path) for path in paths] or [default_runs_dir()]
    formats = list(formats)
    frame = load_runs(*sources)
    if not frame["n_done"].any():
        raise KvbenchError(f"the runs under {', '.join(map(str, sources))} have no finished sample yet")
    out = Path(out) if out is not None else sources[0] / REPORT_FOLDER
    out.mkdir(parents=True, exist_ok=True)

    tables = [table for table in (leaderboard(frame), longbench_e_table(frame), needle_table(frame)) if table]
    overview = overview_table(frame)
    written: list[Path] = []
    if "csv" in formats:
        frame.to_csv(out / "runs.csv", index=False)
        written.append(out / "runs.csv")
        for table in tables:
            table.numbers().to_csv(out / f"{table.name}.csv", index=False)
            written.append(out / f"{table.name}.csv")
        cells = needle_cells(frame)
        if not cells.empty:
            cells.to_csv(out / "needle_cells.csv", index=False)
            written.append(out / "needle_cells.csv")
    if "md" in formats or "html" in formats:
        pictures = _needle_pictures(frame, out) + _capacity_pictures(tables, out)
        written += [picture.path for picture in pictures]
        if "md" in formats:
            (out / "report.md").write_text(_markdown(tables, overview, pictures, sources), encoding="utf-8")
            written.append(out / "report.md")
        if "html" in formats:
            (out / "report.html").write_text(_html_page(tables, overview, pictures, sources), encoding="utf-8")
            written.append(out / "report.html")
    return written
