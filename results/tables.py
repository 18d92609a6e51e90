"""The report's tables, built from `load_runs`' frame and written as markdown, HTML or CSV.

Conventions (LongBench's leaderboard, adapted to runs that may be unfinished):

* One row per run (model, method, capacity, settings), sorted by those; a method
  without a budget shows capacity "–".
* LongBench tasks in LongBench's order, grouped by category; each category's average
  over its tasks; "Avg" is the mean of the category averages (LongBench's leaderboard
  number), "Task avg" the mean over tasks (the number KV-cache papers such as
  SnapKV and PyramidKV print).
* An unfinished task shows its partial score with its progress, "12.30 (5/10)", and
  "?" for the total when run.json does not plan the task. An average over an
  unfinished or missing task is shown with a "*" (over the tasks it has) and never
  takes part in best marks; "–" is a task the run does not have.
* The best complete value of each column is marked (bold in markdown and HTML) when at
  least two runs have one to compare.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from kvbench.results.load import RUN_KEY

MISSING = "–"
PARTIAL_MARK = "*"
NEEDLE = "needle"
INDEX_NAMES = {"model": "Model", "method": "Method", "capacity": "Capacity", "settings": "Settings"}


@dataclass
class Cell:
    value: float = math.nan
    complete: bool = False
    #: what the cell shows before any best mark
    text: str = MISSING
    best: bool = False


@dataclass
class Table:
    """A table of runs: numbers for CSV, cells with flags for markdown and HTML."""

    #: file stem of its CSV
    name: str
    title: str
    runs: pd.DataFrame  # one row per run, the RUN_KEY columns
    columns: list[str]
    cells: list[list[Cell]]  # [run][column]
    #: header groups over consecutive columns, (label, span), for HTML
    groups: list[tuple[str, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: whether the columns hold numbers (right-aligned) rather than text
    numeric: bool = True

    def index_columns(self) -> list[str]:
        """The key columns worth showing: settings only when some run has any."""
        return [key for key in RUN_KEY if key != "settings" or (self.runs["settings"] != "").any()]

    def index_text(self, run: int) -> list[str]:
        values = self.runs.iloc[run]
        return [MISSING if pd.isna(values[key]) else str(values[key]) for key in self.index_columns()]

    def numbers(self) -> pd.DataFrame:
        """The values, with a ``<column> complete`` flag beside each, for CSV."""
        frame = self.runs[self.index_columns()].reset_index(drop=True).copy()
        for position, column in enumerate(self.columns):
            frame[column] = [row[position].value for row in self.cells]
            frame[f"{column} complete"] = [row[position].complete for row in self.cells]
        return frame


def _format(value: float) -> str:
    return f"{value:.2f}"


def task_cell(row: pd.Series | None, metric: str = "score") -> Cell:
    """One run's task: its score (or another of its metrics), with its progress when unfinished."""
    if row is None:
        return Cell()
    value = float(row.get(metric, math.nan))
    if row["complete"]:
        return Cell(value, True, _format(value))
    total = "?" if pd.isna(row["n_total"]) else str(int(row["n_total"]))
    shown = MISSING if math.isnan(value) else _format(value)
    return Cell(value, False, f"{shown} ({int(row['n_done'])}/{total})")


def average_cell(parts: list[Cell]) -> Cell:
    """Mean of the parts that have a value; complete only when every part is."""
    values = [cell.value for cell in parts if not math.isnan(cell.value)]
    if not values:
        return Cell()
    value = float(np.mean(values))
    complete = all(cell.complete for cell in parts)
    return Cell(value, complete, _format(value) + ("" if complete else PARTIAL_MARK))


def mark_best(cells: list[list[Cell]]) -> None:
    """Mark each column's highest complete value, where two or more runs have one."""
    for column in range(len(cells[0]) if cells else 0):
        candidates = [row[column] for row in cells if row[column].complete and not math.isnan(row[column].value)]
        if len(candidates) < 2:
            continue
        best = max(cell.value for cell in candidates)
        for cell in candidates:
            cell.best = bool(np.isclose(cell.value, best))


def sorted_runs(frame: pd.DataFrame) -> pd.DataFrame:
    runs = frame[RUN_KEY].drop_duplicates()
    return runs.sort_values(RUN_KEY, na_position="last").reset_index(drop=True)


def _lookup(frame: pd.DataFrame) -> dict[tuple, pd.Series]:
    """(run key..., task) -> the frame's row, with NA capacities made comparable."""
    return {
        (*_run_key(row), row["task"]): row for _, row in frame.iterrows()
    }


def _run_key(row: pd.Series) -> tuple:
    return tuple(None if pd.isna(row[key]) else row[key] for key in RUN_KEY)


def same_run(frame: pd.DataFrame, run: pd.Series) -> pd.Series:
    """Which rows of ``frame`` belong to the run named by ``run``'s key columns."""
    key = _run_key(run)
    return pd.Series([_run_key(row) == key for _, row in frame.iterrows()], index=frame.index, dtype=bool)


def _ordered_tasks(tasks: set[str]) -> list[str]:
    from kvbench.tasks.longbench import LONGBENCH_TASKS

    order = {name: position for position, name in enumerate(LONGBENCH_TASKS)}
    return sorted(tasks, key=lambda name: (order.get(name.removesuffix("_e"), len(order)), name))


def is_longbench_e(task: str) -> bool:
    from kvbench.tasks.longbench import LONGBENCH_E_TASKS

    return task.endswith("_e") and task.removesuffix("_e") in LONGBENCH_E_TASKS


def leaderboard(frame: pd.DataFrame) -> Table | None:
    """LongBench (and any other non-needle, non-LongBench-E) tasks by category, with averages."""
    tasks_frame = frame[(frame["category"] != NEEDLE) & ~frame["task"].map(is_longbench_e)]
    if tasks_frame.empty:
        return None
    tasks = _ordered_tasks(set(tasks_frame["task"]))
    category_of = dict(zip(tasks_frame["task"], tasks_frame["category"]))
    categories = list(dict.fromkeys(category_of[task] for task in tasks))
    runs = sorted_runs(tasks_frame)
    rows = _lookup(tasks_frame)

    columns: list[str] = []
    groups: list[tuple[str, int]] = []
    for category in categories:
        members = [task for task in tasks if category_of[task] == category]
        columns += members + [f"{category} avg"]
        groups.append((category, len(members) + 1))
    columns += ["Avg", "Task avg"]
    groups.append(("Overall", 2))

    cells = []
    for _, run in runs.iterrows():
        key = _run_key(run)
        row_cells: list[Cell] = []
        category_averages: list[Cell] = []
        task_cells: list[Cell] = []
        for category in categories:
            members = [task_cell(rows.get((*key, task))) for task in tasks if category_of[task] == category]
            average = average_cell(members)
            row_cells += members + [average]
            category_averages.append(average)
            task_cells += members
        row_cells += [average_cell(category_averages), average_cell(task_cells)]
        cells.append(row_cells)
    mark_best(cells)
    return Table(
        name="longbench",
        title="LongBench",
        runs=runs,
        columns=columns,
        cells=cells,
        groups=groups,
        notes=[
            "Avg: mean of the category averages (LongBench's leaderboard); Task avg: mean over tasks.",
            f"12.30 (5/10): an unfinished task, scored on its 5 finished samples of 10. "
            f"{PARTIAL_MARK}: an average over unfinished or missing tasks; it is not ranked. "
            f"{MISSING}: not run. Bold: the best complete value of a column.",
        ],
    )


def longbench_e_table(frame: pd.DataFrame) -> Table | None:
    """LongBench-E: per length bucket, the mean over the run's LongBench-E tasks, and their mean score."""
    from kvbench.tasks.longbench import LENGTH_BUCKETS

    e_frame = frame[frame["task"].map(is_longbench_e)]
    if e_frame.empty:
        return None
    buckets = [label for label, _ in LENGTH_BUCKETS]
    tasks = _ordered_tasks(set(e_frame["task"]))
    runs = sorted_runs(e_frame)
    rows = _lookup(e_frame)
    cells = []
    for _, run in runs.iterrows():
        key = _run_key(run)
        task_rows = [rows.get((*key, task)) for task in tasks]
        row_cells = []
        for metric in buckets + ["score"]:
            row_cells.append(average_cell([task_cell(row, metric) for row in task_rows]))
        cells.append(row_cells)
    mark_best(cells)
    return Table(
        name="longbench_e",
        title="LongBench-E by length",
        runs=runs,
        columns=buckets + ["All"],
        cells=cells,
        notes=[
            f"Mean over the LongBench-E tasks ({', '.join(tasks)}) of each length bucket's score; "
            f"All: mean of the tasks' scores. {PARTIAL_MARK}: some task unfinished or missing; not ranked.",
        ],
    )


def needle_table(frame: pd.DataFrame) -> Table | None:
    """Needle-in-a-Haystack per run: ROUGE-1 recall (the score), F1 and how often the answer appears."""
    needle_frame = frame[frame["category"] == NEEDLE]
    if needle_frame.empty:
        return None
    runs = sorted_runs(needle_frame)
    rows = _lookup(needle_frame)
    metrics = [("score", "Needle score (ROUGE-1 recall)"), ("rouge1_f", "ROUGE-1 F1"), ("phrase_found", "Answer found (%)")]
    tasks = _ordered_tasks(set(needle_frame["task"]))
    cells = []
    for _, run in runs.iterrows():
        key = _run_key(run)
        row_cells = []
        for metric, _ in metrics:
            parts = [task_cell(rows.get((*key, task)), metric) for task in tasks]
            # One needle task (the usual case) shows its progress; several are averaged.
            row_cells.append(parts[0] if len(parts) == 1 else average_cell(parts))
        cells.append(row_cells)
    mark_best(cells)
    return Table(
        name="needle",
        title="Needle-in-a-Haystack",
        runs=runs,
        columns=[label for _, label in metrics],
        cells=cells,
        notes=[
            "Mean over the grid's cells (context length x depth) of ROUGE-1 recall of the answer's words, "
            "ROUGE-1 F1, and the percent of cells whose answer contains the expected phrase word for word. "
            "(5/10): cells finished of planned.",
        ],
    )


# -- rendering ------------------------------------------------------------------------------------


def to_markdown(table: Table) -> str:
    """A GitHub markdown table, best values in **bold**, notes below."""
    header = [INDEX_NAMES[key] for key in table.index_columns()] + table.columns
    align = [":--"] * len(table.index_columns()) + ["--:" if table.numeric else ":--"] * len(table.columns)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    for run, row in enumerate(table.cells):
        texts = table.index_text(run) + [f"**{cell.text}**" if cell.best else cell.text for cell in row]
        lines.append("| " + " | ".join(text.replace("|", "\\|") for text in texts) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(f"{note}  " for note in table.notes) + "\n"


def to_html(table: Table) -> str:
    """An HTML table (no page around it): grouped header, best values bold, unfinished cells styled."""
    index = table.index_columns()
    parts = ['<table class="scores">', "<thead>"]
    if table.groups:
        parts.append("<tr>" + f'<th colspan="{len(index)}"></th>' + "".join(
            f'<th colspan="{span}" class="group">{html.escape(label)}</th>' for label, span in table.groups) + "</tr>")
    averages = [column.endswith(" avg") or column in ("Avg", "All") for column in table.columns]
    parts.append("<tr>" + "".join(f"<th>{INDEX_NAMES[key]}</th>" for key in index) + "".join(
        f'<th class="{"avg" if average else "task"}">{html.escape(column)}</th>'
        for column, average in zip(table.columns, averages)) + "</tr>")
    parts.append("</thead>\n<tbody>")
    for run, row in enumerate(table.cells):
        cells_html = "".join(f'<td class="key">{html.escape(text)}</td>' for text in table.index_text(run))
        for cell, average in zip(row, averages):
            classes = ["num" if table.numeric else "text"] + (["avg"] if average else []) + ([] if cell.complete or cell.text == MISSING else ["partial"])
            text = html.escape(cell.text)
            cells_html += f'<td class="{" ".join(classes)}">{f"<b>{text}</b>" if cell.best else text}</td>'
        parts.append(f"<tr>{cells_html}</tr>")
    parts.append("</tbody></table>")
    parts += [f'<p class="note">{html.escape(note)}</p>' for note in table.notes]
    return "\n".join(parts)
