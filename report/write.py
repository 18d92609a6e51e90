"""`kvbench report`: every run under some folders as tables (markdown, CSV), pictures and one HTML page.

Written into the output folder:

* ``report.md``: the tables ready to paste, with links to the PNG files beside it;
* ``paper.md``: the LongBench table alone in the papers' layout (see `tables.paper_table`);
* ``report.html``: one self-contained page, tables and pictures (base64) inside;
* ``runs.csv`` (one row per run and task, as `load_runs` gives it, with each score's 95%
  interval in ``score_low`` and ``score_high``), one CSV per table (``longbench.csv``,
  ``ruler.csv``, ``ruler_tasks.csv``, ``paper.csv``, ``longbench_e.csv``, ``needle.csv``, and the
  paired differences from the full cache ``longbench_vs_fullkv.csv`` and ``needle_vs_fullkv.csv``;
  each value with its interval's ``low`` and ``high`` and a ``complete`` flag) and
  ``needle_cells.csv`` (every needle cell's answer and scores);
  floats rounded to 2 decimals, whole numbers (capacity, max length) written as such and
  a missing value as an empty field;
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
from kvbench.paths import default_output_dir
from kvbench.report import plots
from kvbench.intervals import DEFAULT_SEED, bounds
from kvbench.report.load import RUN_KEY, load_runs_and_samples, needle_cells
from kvbench.report.tables import (
    NEEDLE,
    NEEDLE_SCORE_COLUMN,
    RULER,
    Table,
    difference_tables,
    leaderboard,
    leaderboard_rows,
    longbench_e_table,
    needle_table,
    paper_table,
    question_table,
    ruler_table,
    ruler_tasks_table,
    runs_table,
    same_run,
    task_cell,
    to_html,
    to_markdown,
)
from kvbench.report.uncertainty import Draws, paired_differences, task_draws
from kvbench.runfolder import check_writable_folder

FORMATS = ("md", "csv", "html")
REPORT_FOLDER = "report"
CAPACITY_SECTION = "Score versus capacity"
#: decimals of every float in the CSVs: scores are official to the hundredth; tokens and MiB need no more
CSV_DECIMALS = 2

PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; }
h1 { margin-bottom: 0.2rem; }
.meta, .note { color: #666; font-size: 0.9rem; }
table.scores { border-collapse: collapse; margin: 0.6rem 0; font-size: 0.88rem; }
table.scores th, table.scores td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; }
table.scores th { background: #f3f3f3; }
table.scores th.group { background: #e4e9f2; }
table.scores th.avg, table.scores td.avg { background: #f7f7fb; }
table.scores tr.block th { background: #eef1f6; text-align: left; }
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


def _needle_pictures(frame: pd.DataFrame, cells: pd.DataFrame, draws: Draws, out: Path) -> list[Picture]:
    pictures = []
    needle_rows = frame[frame["category"] == NEEDLE].sort_values(RUN_KEY + ["task"], na_position="last")
    for _, row in needle_rows.iterrows():
        mine = cells[(cells["task"] == row["task"]) & same_run(cells, row)]
        if mine.empty:
            continue
        planned = "?" if pd.isna(row["n_total"]) else row["n_total"]
        progress = "" if row["complete"] else f"  ({row['n_done']}/{planned} cells)"
        average = task_cell(row, draws=draws)
        interval = "" if math.isnan(average.low) else f" ± {(average.high - average.low) / 2:.1f}"
        title = f"{_run_title(row)}\nNeedle average {row['score']:.1f}{interval}{progress}"
        other_needle = row["task"] if row["task"] != NEEDLE else None
        name = _slug("needle", row["model"], row["method"], row["capacity"], row["settings"], other_needle)
        path = out / f"{name}.png"
        plots.needle_heatmap(mine, title, path)
        pictures.append(Picture("Needle-in-a-Haystack", title.replace("\n", " — "), path))
    return pictures


def _capacity_points(frame: pd.DataFrame, tables: list[Table]) -> pd.DataFrame:
    """The points of the score-versus-capacity figures: each run's category averages and Avg (from the
    leaderboard), its RULER average over lengths and its needle score.

    A point is hollow (unfinished) only when the run itself has an unfinished task among those it
    planned in the panel's categories; a task that only other runs have does not make it so.
    """
    leaderboard_frame = leaderboard_rows(frame)
    leaderboard_categories = list(dict.fromkeys(leaderboard_frame["category"]))
    # table name -> (its rows of the frame, [(panel, the table's column, the categories of its tasks)])
    panels_of = {
        "longbench": (leaderboard_frame,
                      [(category, f"{category} avg", [category]) for category in leaderboard_categories]
                      + [("LongBench Avg", "Avg", leaderboard_categories)]),
        "needle": (frame[frame["category"] == NEEDLE], [("Needle", NEEDLE_SCORE_COLUMN, [NEEDLE])]),
        "ruler": (frame[frame["category"] == RULER], [("RULER Avg", "Avg", [RULER])]),
    }
    records = []
    for table in tables:
        if table.name not in panels_of:
            continue
        rows, panels = panels_of[table.name]
        for run_position, (_, run) in enumerate(table.runs.iterrows()):
            mine = rows[same_run(rows, run)]
            label = run["method"] + (f" ({run['settings']})" if run["settings"] else "")
            for panel, column, categories in panels:
                cell = table.cells[run_position][table.columns.index(column)]
                if math.isnan(cell.value):
                    continue
                planned = mine[mine["category"].isin(categories) & mine["n_total"].notna()]
                records.append({"model": run["model"], "label": label, "capacity": run["capacity"], "panel": panel,
                                "score": cell.value, "low": cell.low, "high": cell.high,
                                "complete": bool(planned["complete"].all())})
    points = pd.DataFrame.from_records(records, columns=["model", "label", "capacity", "panel", "score", "low", "high",
                                                         "complete"])
    return points.astype({"capacity": "Int64"})


def _capacity_pictures(frame: pd.DataFrame, tables: list[Table], out: Path) -> tuple[list[Picture], list[str]]:
    """Score versus capacity per model, and a note for each model whose runs give no curve to draw."""
    points = _capacity_points(frame, tables)
    pictures, notes = [], []
    for model, model_points in points.groupby("model", sort=True):
        capacities = sorted(model_points["capacity"].dropna().unique())
        if len(capacities) < 2:
            having = f"one KV capacity ({capacities[0]})" if capacities else "no KV capacity"
            notes.append(f"{model}: no plot, since its runs have {having}; "
                         "a curve needs runs at two or more capacities.")
            continue
        title = f"{model}: score versus KV capacity"
        path = plots.capacity_figure(model_points, title, out / f"{_slug('capacity', model)}.png")
        pictures.append(Picture(CAPACITY_SECTION, title, path))
    return pictures, notes


def _sections(tables: list[Table], runs: Table, capacity_notes: list[str]) -> list[tuple[str, Table | None, list[str]]]:
    """The report's sections in page order, (title, table, notes): the score tables, the capacity
    figures (their notes say why a model has none), the runs."""
    return ([(table.title, table, []) for table in tables]
            + [(CAPACITY_SECTION, None, capacity_notes), ("Runs", runs, [])])


def _markdown(tables: list[Table], runs: Table, pictures: list[Picture], capacity_notes: list[str],
              sources: list[Path]) -> str:
    lines = ["# kvbench report", "", f"Runs under {', '.join(f'`{source}`' for source in sources)}.", ""]
    for title, table, notes in _sections(tables, runs, capacity_notes):
        images = [f"![{picture.caption}]({picture.path.name})" for picture in pictures if picture.section == title]
        if table is None and not images and not notes:
            continue
        lines += [f"## {title}", ""]
        if table is not None:
            lines.append(to_markdown(table))
        lines += [image + "\n" for image in images] + [note + "\n" for note in notes]
    return "\n".join(lines)


def _embedded(picture: Picture) -> str:
    """The picture inside the page; its title is drawn in it, so no caption repeats it."""
    data = base64.b64encode(picture.path.read_bytes()).decode("ascii")
    kind = "heatmap" if picture.section == "Needle-in-a-Haystack" else "chart"
    return f'<figure class="{kind}"><img src="data:image/png;base64,{data}" alt="{html.escape(picture.caption)}"></figure>'


def _html_page(tables: list[Table], runs: Table, pictures: list[Picture], capacity_notes: list[str],
               sources: list[Path]) -> str:
    body = [
        "<h1>kvbench report</h1>",
        f'<p class="meta">Runs under {html.escape(", ".join(str(source) for source in sources))}; '
        f"generated {datetime.now():%Y-%m-%d %H:%M}.</p>",
    ]
    for title, table, notes in _sections(tables, runs, capacity_notes):
        figures = [_embedded(picture) for picture in pictures if picture.section == title]
        if table is None and not figures and not notes:
            continue
        body.append(f"<h2>{html.escape(title)}</h2>")
        if table is not None:
            body.append(f'<div class="scroll">{to_html(table)}</div>')
        if figures:
            body.append('<div class="figures">' + "".join(figures) + "</div>")
        body += [f'<p class="note">{html.escape(note)}</p>' for note in notes]
    return ("<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>kvbench report</title>"
            f"<style>{PAGE_STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def _write_csv(frame: pd.DataFrame, path: Path) -> Path:
    """``frame`` as CSV, floats rounded; nullable integer columns stay whole numbers, NA an empty field."""
    frame.round({column: CSV_DECIMALS for column in frame.columns if pd.api.types.is_float_dtype(frame[column])}
                ).to_csv(path, index=False)
    return path


def _with_score_intervals(frame: pd.DataFrame, draws: Draws) -> pd.DataFrame:
    """``frame`` with score_low and score_high, each task's 95% interval (NaN without one), after its score."""
    intervals = [draws.get((row.run_dir, row.task, "score")) for row in frame.itertuples(index=False)]
    low, high = zip(*(bounds(part) if part is not None else (math.nan, math.nan) for part in intervals))
    position = frame.columns.get_loc("score") + 1
    frame = frame.copy()
    frame.insert(position, "score_low", low)
    frame.insert(position + 1, "score_high", high)
    return frame


def write_report(paths: Iterable[str | Path] = (), out: str | Path | None = None,
                 formats: Iterable[str] = FORMATS, seed: int = DEFAULT_SEED) -> list[Path]:
    """Read every run under ``paths`` (default: `kvbench run`'s output folder) and write the report
    into ``out`` (default: ``<first folder>/report``), its bootstrap intervals drawn from ``seed``.
    Returns the files written."""
    sources = [Path(path) for path in paths] or [default_output_dir()]
    formats = list(formats)
    if out is not None:
        out = Path(out)
        check_writable_folder(out, "--out")  # before reading and scoring every run
    frame, samples = load_runs_and_samples(*sources)
    if not frame["n_done"].any():
        raise KvbenchError(f"the runs under {', '.join(map(str, sources))} have no finished sample yet")
    if out is None:
        out = sources[0] / REPORT_FOLDER
        check_writable_folder(out, "the report folder")
    out.mkdir(parents=True, exist_ok=True)

    draws = task_draws(samples, seed)
    differences, difference_draws = paired_differences(frame, samples, seed)
    tables = [table for table in (leaderboard(frame, draws, seed), ruler_table(frame, draws, seed),
                                  ruler_tasks_table(frame, draws, seed),
                                  paper_table(frame, draws, seed), longbench_e_table(frame, draws, seed),
                                  needle_table(frame, draws, seed),
                                  question_table(frame))
              if table]
    tables += difference_tables(differences, difference_draws, seed)
    runs = runs_table(frame)
    cells = needle_cells(frame)  # every needle cell, scored once for the CSV and the heatmaps
    written: list[Path] = []
    if "csv" in formats:
        written.append(_write_csv(_with_score_intervals(frame, draws), out / "runs.csv"))
        written += [_write_csv(table.numbers(), out / f"{table.name}.csv") for table in tables]
        if not cells.empty:
            written.append(_write_csv(cells, out / "needle_cells.csv"))
    if "md" in formats or "html" in formats:
        capacity_pictures, capacity_notes = _capacity_pictures(frame, tables, out)
        pictures = _needle_pictures(frame, cells, draws, out) + capacity_pictures
        written += [picture.path for picture in pictures]
        if "md" in formats:
            (out / "report.md").write_text(_markdown(tables, runs, pictures, capacity_notes, sources), encoding="utf-8")
            written.append(out / "report.md")
            paper = next((table for table in tables if table.name == "paper"), None)
            if paper is not None:
                (out / "paper.md").write_text(f"## {paper.title}\n\n{to_markdown(paper)}", encoding="utf-8")
                written.append(out / "paper.md")
        if "html" in formats:
            (out / "report.html").write_text(_html_page(tables, runs, pictures, capacity_notes, sources),
                                             encoding="utf-8")
            written.append(out / "report.html")
    return written
