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
* After the run key, each run's mean tokens kept per layer and KV cache MiB over its
  rows: methods given one ``--capacity`` may keep different amounts (WindowKV keeps its
  observation window on top of the budget), and a reader comparing scores needs to see it.
* Given the bootstrap draws (`kvbench.report.uncertainty`), every value shows half the
  width of its 95% interval, "41.20 ± 1.3", and the CSV its low and high;
  `difference_tables` show each run's paired difference from the full cache.

RULER has tables of its own (`ruler_table` by length, `ruler_tasks_table` by task) and stays out of the
LongBench leaderboard.

`paper_table` lays LongBench out as the PyramidKV and WindowKV papers do (their 16
English tasks, blocks per KV size, their method order), to put results beside theirs.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from kvbench.intervals import LEVEL, RESAMPLES, average_draws, bounds
from kvbench.report.load import RUN_KEY, settings_without_question
from kvbench.report.uncertainty import Draws
from kvbench.tasks.longbench_spec import LENGTH_BUCKETS, LONGBENCH_E_TASKS, LONGBENCH_TASKS, TASK_TABLE
from kvbench.tasks.ruler import CATEGORY as RULER, RULER_TASKS, length_key

MISSING = "–"
PARTIAL_MARK = "*"
NEEDLE = "needle"
NEEDLE_SCORE_COLUMN = "Needle score (ROUGE-1 recall)"
#: the run columns a table may show, with their headers
INDEX_NAMES = {
    "model": "Model", "method": "Method", "max_length": "Max length", "capacity": "Capacity", "settings": "Settings",
    "kept_tokens": "Kept tok.", "kv_cache_mb": "KV MiB", "shared_samples": "Shared",
    "task": "Task",
}
#: per-run measurements: numbers, shown only when some run has one
MEASUREMENT_INDEX = {"kept_tokens", "kv_cache_mb"}
#: run columns shown only when some run has a value
OPTIONAL_INDEX = {"settings", "shared_samples"} | MEASUREMENT_INDEX
MEASUREMENTS_NOTE = ("Kept tok.: prompt tokens kept per layer; KV MiB: the KV cache's size; each the mean over the "
                     "run's samples (methods run at one --capacity may keep different amounts).")

#: The PyramidKV and WindowKV papers' LongBench table: their 16 English tasks in their order, under
#: their category headers, with their abbreviations.
PAPER_GROUPS: list[tuple[str, list[tuple[str, str]]]] = [
    ("Single-Doc QA", [("narrativeqa", "NrtvQA"), ("qasper", "Qasper"), ("multifieldqa_en", "MF-en")]),
    ("Multi-Doc QA", [("hotpotqa", "HotpotQA"), ("2wikimqa", "2WikiMQA"), ("musique", "Musique")]),
    ("Summarization", [("gov_report", "GovReport"), ("qmsum", "QMSum"), ("multi_news", "MultiNews")]),
    ("Few-shot Learning", [("trec", "TREC"), ("triviaqa", "TriviaQA"), ("samsum", "SAMSum")]),
    ("Synthetic", [("passage_count", "PCount"), ("passage_retrieval_en", "PRe")]),
    ("Code", [("lcc", "Lcc"), ("repobench-p", "RB-P")]),
]
PAPER_TASKS = [task for _, members in PAPER_GROUPS for task, _ in members]
#: the papers' method names, in their row order within a block (methods not named here follow, alphabetically)
PAPER_METHODS = {
    "fullkv": "FullKV", "streamingllm": "StreamingLLM", "h2o": "H2O", "snapkv": "SnapKV", "pyramidkv": "PyramidKV",
    "windowkv": "WindowKV", "prefixkv": "PrefixKV", "elastic": "Elastic Cache",
}


@dataclass
class Cell:
    value: float = math.nan
    complete: bool = False
    #: what the cell shows before any best mark
    text: str = MISSING
    best: bool = False
    #: the value's bootstrap means (`kvbench.intervals`), None without an interval
    draws: np.ndarray | None = field(default=None, repr=False)
    #: the 95% interval, NaN without one
    low: float = math.nan
    high: float = math.nan


@dataclass
class Table:
    """A table of runs: numbers for CSV, cells with flags for markdown and HTML."""

    #: file stem of its CSV
    name: str
    title: str
    #: one row per run: its key columns, then any per-run measurement of INDEX_NAMES
    runs: pd.DataFrame
    columns: list[str]
    cells: list[list[Cell]]  # [run][column]
    #: header groups over consecutive columns, (label, span), for HTML
    groups: list[tuple[str, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: whether the columns hold numbers (right-aligned) rather than text
    numeric: bool = True
    #: rows spanning the table before a run's row, (run position, label): the paper layout's blocks
    blocks: list[tuple[int, str]] = field(default_factory=list)
    #: one "Method" column shown instead of the run columns (the paper layout: its blocks name the rest)
    row_labels: list[str] | None = None

    def index_columns(self) -> list[str]:
        """The run columns worth showing: the optional ones only when some run has a value."""
        return [key for key in self.runs.columns if key in INDEX_NAMES and (
            key not in OPTIONAL_INDEX or (self.runs[key].notna() & (self.runs[key] != "")).any())]

    def index_header(self) -> list[str]:
        """Headers of the columns before the values, in markdown and HTML."""
        if self.row_labels is not None:
            return [INDEX_NAMES["method"]]
        return [INDEX_NAMES[key] for key in self.index_columns()]

    def index_numeric(self) -> list[bool]:
        """Which of the columns before the values hold numbers (right-aligned)."""
        if self.row_labels is not None:
            return [False]
        return [key in MEASUREMENT_INDEX | {"shared_samples"} for key in self.index_columns()]

    def index_text(self, run: int) -> list[str]:
        if self.row_labels is not None:
            return [self.row_labels[run]]
        values = self.runs.iloc[run]
        return [_index_value_text(values[key]) for key in self.index_columns()]

    def numbers(self) -> pd.DataFrame:
        """The values, with a ``<column> complete`` flag beside each and, in a table with intervals, the
        ``<column> low`` and ``<column> high`` of each value's 95% interval, for CSV."""
        frame = self.runs[self.index_columns()].reset_index(drop=True).copy()
        intervals = any(cell.draws is not None for row in self.cells for cell in row)
        for position, column in enumerate(self.columns):
            frame[column] = [row[position].value for row in self.cells]
            if intervals:
                frame[f"{column} low"] = [row[position].low for row in self.cells]
                frame[f"{column} high"] = [row[position].high for row in self.cells]
            frame[f"{column} complete"] = [row[position].complete for row in self.cells]
        return frame


def _format(value: float) -> str:
    return f"{value:.2f}"


def _index_value_text(value) -> str:
    """A run column's value: "–" when absent, a measurement to one decimal (tokens, MiB), else as it is."""
    if pd.isna(value) or value == "":
        return MISSING
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def _with_interval(value: float, draws: np.ndarray | None) -> tuple[str, float, float]:
    """The value's text, "41.20 ± 1.3" (half the 95% interval's width) where it has draws, and the bounds."""
    if draws is None:
        return _format(value), math.nan, math.nan
    low, high = bounds(draws)
    return f"{_format(value)} ± {(high - low) / 2:.1f}", low, high


def task_cell(row: pd.Series | None, metric: str = "score", draws: Draws | None = None) -> Cell:
    """One run's task: its score (or another of its metrics), with its interval where ``draws`` has one, and
    its progress when unfinished."""
    if row is None:
        return Cell()
    value = float(row.get(metric, math.nan))
    resampled = None if draws is None or math.isnan(value) else draws.get((row["run_dir"], row["task"], metric))
    text, low, high = _with_interval(value, resampled)
    if row["complete"]:
        return Cell(value, True, text, draws=resampled, low=low, high=high)
    total = "?" if pd.isna(row["n_total"]) else str(int(row["n_total"]))
    shown = MISSING if math.isnan(value) else text
    return Cell(value, False, f"{shown} ({int(row['n_done'])}/{total})", draws=resampled, low=low, high=high)


def average_cell(parts: list[Cell]) -> Cell:
    """Mean of the parts that have a value; complete only when every part is. Its interval averages the parts'
    draws, each part resampled alone (so each keeps its weight), where every such part has draws."""
    valued = [cell for cell in parts if not math.isnan(cell.value)]
    if not valued:
        return Cell()
    value = float(np.mean([cell.value for cell in valued]))
    complete = all(cell.complete for cell in parts)
    resampled = average_draws([cell.draws for cell in valued]) if all(
        cell.draws is not None for cell in valued) else None
    text, low, high = _with_interval(value, resampled)
    return Cell(value, complete, text + ("" if complete else PARTIAL_MARK), draws=resampled, low=low, high=high)


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


def _lookup(frame: pd.DataFrame, keys: list[str] = RUN_KEY) -> dict[tuple, pd.Series]:
    """(run key..., task) -> the frame's row, with NA values made comparable."""
    return {
        (*_run_key(row, keys), row["task"]): row for _, row in frame.iterrows()
    }


def _run_key(row: pd.Series, keys: list[str] = RUN_KEY) -> tuple:
    return tuple(None if pd.isna(row[key]) else row[key] for key in keys)


def same_run(frame: pd.DataFrame, run: pd.Series) -> pd.Series:
    """Which rows of ``frame`` belong to the run named by ``run``'s key columns."""
    key = _run_key(run)
    return pd.Series([_run_key(row) == key for _, row in frame.iterrows()], index=frame.index, dtype=bool)


def with_measurements(runs: pd.DataFrame, frame: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with each run's mean kept tokens per layer and KV cache MiB over its rows in ``frame``."""
    rows = frame.groupby(RUN_KEY, dropna=False, sort=False)
    measured = {
        _run_key(group.iloc[0]): (_mean_over_rows(group, "kept_tokens"), _mean_over_rows(group, "kv_cache_mb"))
        for _, group in rows
    }
    values = [measured[_run_key(run)] for _, run in runs.iterrows()]
    return runs.assign(kept_tokens=[kept for kept, _ in values], kv_cache_mb=[mib for _, mib in values])


def measurement_notes(runs: pd.DataFrame) -> list[str]:
    """The note explaining the measurement columns, when some run has them to show."""
    return [MEASUREMENTS_NOTE] if runs[["kept_tokens", "kv_cache_mb"]].notna().any(axis=None) else []


def _mean_over_rows(tasks: pd.DataFrame, column: str) -> float:
    """The mean over all rows of the tasks' per-task means, each weighted by its task's rows."""
    known = tasks[column].notna() & (tasks["n_done"] > 0)
    if not known.any():
        return math.nan
    return float(np.average(tasks.loc[known, column], weights=tasks.loc[known, "n_done"]))


def _ordered_tasks(tasks: set[str]) -> list[str]:
    order = {name: position for position, name in enumerate(LONGBENCH_TASKS)}
    return sorted(tasks, key=lambda name: (order.get(name.removesuffix("_e"), len(order)), name))


def is_longbench_e(task: str) -> bool:
    return task.endswith("_e") and task.removesuffix("_e") in LONGBENCH_E_TASKS


def leaderboard_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of the leaderboard's tasks: LongBench and any other task that is neither needle, RULER nor
    LongBench-E."""
    return frame[~frame["category"].isin([NEEDLE, RULER]) & ~frame["task"].map(is_longbench_e)]


def interval_notes(draws: Draws | None, seed: int | None) -> list[str]:
    """The note saying how to read the intervals, in a table that has them."""
    if draws is None:
        return []
    return [f"41.20 ± 1.3: the score and half the width of its {LEVEL:.0%} bootstrap interval over the samples "
            f"({RESAMPLES} resamples, seed {seed}; an average resamples within each task, so each keeps its weight; "
            "none for a single sample). The CSV has each interval's low and high."]


def leaderboard(frame: pd.DataFrame, draws: Draws | None = None, seed: int | None = None) -> Table | None:
    """LongBench (and any other non-needle, non-LongBench-E) tasks by category, with averages; with ``draws``
    (`kvbench.report.uncertainty.task_draws` made from ``seed``), each value's interval."""
    tasks_frame = leaderboard_rows(frame)
    if tasks_frame.empty:
        return None
    tasks = _ordered_tasks(set(tasks_frame["task"]))
    category_of = dict(zip(tasks_frame["task"], tasks_frame["category"]))
    categories = list(dict.fromkeys(category_of[task] for task in tasks))
    runs = with_measurements(sorted_runs(tasks_frame), tasks_frame)
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
            members = [task_cell(rows.get((*key, task)), draws=draws) for task in tasks
                       if category_of[task] == category]
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
            *interval_notes(draws, seed),
            *measurement_notes(runs),
            f"12.30 (5/10): an unfinished task, scored on its 5 finished samples of 10. "
            f"{PARTIAL_MARK}: an average over unfinished or missing tasks; it is not ranked. "
            f"{MISSING}: not run. Bold: the best complete value of a column.",
        ],
    )


def longbench_e_table(frame: pd.DataFrame, draws: Draws | None = None, seed: int | None = None) -> Table | None:
    """LongBench-E: per length bucket, the mean over the run's LongBench-E tasks, and their mean score (with
    ``draws``, each with its interval)."""
    e_frame = frame[frame["task"].map(is_longbench_e)]
    if e_frame.empty:
        return None
    buckets = [label for label, _ in LENGTH_BUCKETS]
    tasks = _ordered_tasks(set(e_frame["task"]))
    runs = with_measurements(sorted_runs(e_frame), e_frame)
    rows = _lookup(e_frame)
    cells = []
    for _, run in runs.iterrows():
        key = _run_key(run)
        task_rows = [rows.get((*key, task)) for task in tasks]
        row_cells = []
        for metric in buckets + ["score"]:
            row_cells.append(average_cell([task_cell(row, metric, draws) for row in task_rows]))
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
            *interval_notes(draws, seed),
            *measurement_notes(runs),
        ],
    )


def ruler_lengths(frame: pd.DataFrame) -> list[int]:
    """The lengths some RULER row of ``frame`` has a score at (the tasks' per-length scores), shortest first."""
    return sorted(int(column) for column in frame.columns
                  if column.isdigit() and frame[column].notna().any())


def ruler_table(frame: pd.DataFrame, draws: Draws | None = None, seed: int | None = None) -> Table | None:
    """RULER as its paper reports it: at each length the mean over the tasks, then "Avg", the mean over lengths
    (with ``draws``, each value's interval: a length's samples resampled within each task)."""
    ruler_frame = frame[frame["category"] == RULER]
    if ruler_frame.empty:
        return None
    lengths = ruler_lengths(ruler_frame)
    tasks = [task for task in RULER_TASKS if task in set(ruler_frame["task"])]
    runs = with_measurements(sorted_runs(ruler_frame), ruler_frame)
    rows = _lookup(ruler_frame)
    cells = []
    for _, run in runs.iterrows():
        key = _run_key(run)
        by_length = [average_cell([task_cell(rows.get((*key, task)), length_key(length), draws) for task in tasks])
                     for length in lengths]
        cells.append(by_length + [average_cell(by_length)])
    mark_best(cells)
    return Table(
        name="ruler",
        title="RULER by length",
        runs=runs,
        columns=[str(length) for length in lengths] + ["Avg"],
        cells=cells,
        groups=[("Length (tokens, prompt + answer)", len(lengths)), ("", 1)],
        notes=[
            f"At each length the mean over the RULER tasks run ({', '.join(tasks)}) of their score at that length "
            "(string_match_all; string_match_part for qa_1 and qa_2), 0-100; Avg: the mean over the lengths. "
            f"{PARTIAL_MARK}: some task unfinished or missing; not ranked.",
            *interval_notes(draws, seed),
            *measurement_notes(runs),
        ],
    )


def ruler_tasks_table(frame: pd.DataFrame, draws: Draws | None = None, seed: int | None = None) -> Table | None:
    """RULER per task: each task's score over all its lengths, and the mean over the tasks (with ``draws``, each
    value's interval)."""
    ruler_frame = frame[frame["category"] == RULER]
    if ruler_frame.empty:
        return None
    tasks = [task for task in RULER_TASKS if task in set(ruler_frame["task"])]
    runs = with_measurements(sorted_runs(ruler_frame), ruler_frame)
    rows = _lookup(ruler_frame)
    cells = []
    for _, run in runs.iterrows():
        task_cells = [task_cell(rows.get((*_run_key(run), task)), "score", draws) for task in tasks]
        cells.append(task_cells + [average_cell(task_cells)])
    mark_best(cells)
    return Table(
        name="ruler_tasks",
        title="RULER by task",
        runs=runs,
        columns=tasks + ["Avg"],
        cells=cells,
        notes=["Each task's score over its samples at every length run; Avg: the mean over the tasks. "
               "12.30 (5/10): an unfinished task, scored on its 5 finished samples of 10.",
               *interval_notes(draws, seed)],
    )


def needle_table(frame: pd.DataFrame, draws: Draws | None = None, seed: int | None = None) -> Table | None:
    """Needle-in-a-Haystack per run: ROUGE-1 recall (the score), F1 and how often the answer appears (with
    ``draws``, each average over the cells with its interval)."""
    needle_frame = frame[frame["category"] == NEEDLE]
    if needle_frame.empty:
        return None
    runs = with_measurements(sorted_runs(needle_frame), needle_frame)
    rows = _lookup(needle_frame)
    metrics = [("score", NEEDLE_SCORE_COLUMN), ("rouge1_f", "ROUGE-1 F1"), ("phrase_found", "Answer found (%)")]
    tasks = _ordered_tasks(set(needle_frame["task"]))
    cells = []
    for _, run in runs.iterrows():
        key = _run_key(run)
        row_cells = []
        for metric, _ in metrics:
            parts = [task_cell(rows.get((*key, task)), metric, draws) for task in tasks]
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
            *interval_notes(draws, seed),
            *measurement_notes(runs),
        ],
    )


def question_table(frame: pd.DataFrame) -> Table | None:
    """Question-aware beside question-agnostic: for each run made both ways (same model, method, capacity and
    options), each task's score both ways and the change, then the mean over the tasks both have."""
    both = frame.assign(settings=frame["settings"].map(settings_without_question))
    pairs = []
    for _, group in both.groupby(RUN_KEY, dropna=False, sort=False):
        aware, agnostic = (_lookup(group[group["question"] == side], ["question"]) for side in ("aware", "agnostic"))
        tasks = _ordered_tasks({task for (_, task) in aware} & {task for (_, task) in agnostic})
        if tasks:
            pairs.append((group.iloc[0], tasks, aware, agnostic))
    if not pairs:
        return None
    runs, cells = [], []
    for run, tasks, aware, agnostic in sorted(pairs, key=lambda pair: _sort_key(pair[0])):
        task_pairs = [(task_cell(aware[("aware", task)]), task_cell(agnostic[("agnostic", task)])) for task in tasks]
        if len(tasks) > 1:
            task_pairs.append(tuple(average_cell([pair[side] for pair in task_pairs]) for side in (0, 1)))
        for task, (aware_cell, agnostic_cell) in zip(tasks + ["Task avg"], task_pairs):
            runs.append({**{key: run[key] for key in RUN_KEY}, "task": task})
            cells.append([aware_cell, agnostic_cell, _change_cell(aware_cell, agnostic_cell)])
    return Table(
        name="question",
        title="Question-aware vs question-agnostic",
        runs=pd.DataFrame(runs).astype({"capacity": "Int64"}),
        columns=["Question-aware", "Question-agnostic", "Change"],
        cells=cells,
        notes=[
            "Question-aware: the method compressed the whole prompt, question included (as the LongBench papers "
            "run it); question-agnostic (kvbench run --question-agnostic): it compressed the context alone, and "
            "the question then joined the compressed cache whole. Change: agnostic minus aware. "
            f"Task avg: over the tasks run both ways; {PARTIAL_MARK}: over unfinished tasks.",
        ],
    )


def _sort_key(run: pd.Series) -> tuple:
    return tuple((1, "") if pd.isna(run[key]) else (0, run[key]) for key in RUN_KEY)


def _change_cell(aware: Cell, agnostic: Cell) -> Cell:
    if math.isnan(aware.value) or math.isnan(agnostic.value):
        return Cell()
    change = agnostic.value - aware.value
    complete = aware.complete and agnostic.complete
    return Cell(change, complete, f"{change:+.2f}" + ("" if complete else PARTIAL_MARK))


def paper_table(frame: pd.DataFrame, draws: Draws | None = None, seed: int | None = None) -> Table | None:
    """LongBench as the PyramidKV and WindowKV papers lay it out: their 16 English tasks under their
    headers, then "Avg." (the unweighted mean of the 16); one block per model, max length and KV
    size, FullKV's first, then each capacity from the smallest; their method order within a block;
    bold marks the best complete value of a column within its block. With ``draws``, each value's interval."""
    tasks_frame = frame[frame["task"].isin(PAPER_TASKS)]
    if tasks_frame.empty:
        return None
    present = set(tasks_frame["task"])
    columns: list[str] = []
    groups: list[tuple[str, int]] = []
    shown_tasks: list[str] = []
    for group, members in PAPER_GROUPS:
        shown = [(task, abbreviation) for task, abbreviation in members if task in present]
        if shown:
            shown_tasks += [task for task, _ in shown]
            columns += [abbreviation for _, abbreviation in shown]
            groups.append((group, len(shown)))
    columns.append("Avg.")
    groups.append(("", 1))

    # max_length is part of a row's key here: a block holds runs that saw the same prompts.
    keys = RUN_KEY + ["max_length"]
    runs = tasks_frame[["model", "max_length", "capacity", "method", "settings"]].drop_duplicates()
    runs = runs.assign(block_order=runs.apply(_paper_block_order, axis=1),
                       method_order=runs["method"].map(_paper_method_order))
    runs = (runs.sort_values(["model", "max_length", "block_order", "method_order", "settings"], na_position="last")
            .drop(columns=["block_order", "method_order"]).reset_index(drop=True))
    rows = _lookup(tasks_frame, keys)

    cells: list[list[Cell]] = []
    blocks: list[tuple[int, str]] = []
    for position, (_, run) in enumerate(runs.iterrows()):
        label = _paper_block_label(run)
        if not blocks or blocks[-1][1] != label:
            blocks.append((position, label))
        task_cells = {task: task_cell(rows.get((*_run_key(run, keys), task)), draws=draws) for task in PAPER_TASKS}
        cells.append([task_cells[task] for task in shown_tasks] + [average_cell(list(task_cells.values()))])
    for (start, _), (end, _) in zip(blocks, blocks[1:] + [(len(cells), "")]):
        mark_best(cells[start:end])

    chinese = [name for name, info in TASK_TABLE.items() if info.language == "zh"]
    not_run = [abbreviation for _, members in PAPER_GROUPS for task, abbreviation in members if task not in present]
    return Table(
        name="paper",
        title="LongBench, as in the papers",
        runs=runs,
        columns=columns,
        cells=cells,
        groups=groups,
        blocks=blocks,
        row_labels=[PAPER_METHODS.get(run["method"], run["method"])
                    + (f" ({run['settings']})" if run["settings"] else "") for _, run in runs.iterrows()],
        notes=[
            "The layout of the PyramidKV and WindowKV papers' LongBench tables: their 16 English tasks; Chinese "
            f"tasks ({', '.join(chinese)}) are left out, as there. KV Size: tokens kept per layer (--capacity); "
            f"{MISSING}: runs without one.",
            f"Avg.: the unweighted mean of the 16 tasks; {PARTIAL_MARK} when some are unfinished or not run "
            "(not ranked)." + (f" Not run: {', '.join(not_run)}." if not_run else ""),
            "12.30 (5/10): an unfinished task, scored on its 5 finished samples of 10. "
            "Bold: the best complete value of a column within its block.",
            *interval_notes(draws, seed),
        ],
    )


def difference_tables(differences: pd.DataFrame, draws: Draws, seed: int) -> list[Table]:
    """Each run's paired difference from its full-cache run (`kvbench.report.uncertainty.paired_differences`),
    laid out as the LongBench table and as the needle table's score; bold where the interval leaves out 0."""
    layouts = [(leaderboard, leaderboard_rows(differences), "longbench_vs_fullkv", "LongBench: difference from FullKV"),
               (needle_table, differences[differences["category"] == NEEDLE], "needle_vs_fullkv",
                "Needle-in-a-Haystack: difference from FullKV")]
    tables = []
    for build, rows, name, title in layouts:
        table = build(rows, draws, seed) if not rows.empty else None
        if table is None:
            continue
        if build is needle_table:  # only the score is compared
            table.columns, table.cells = table.columns[:1], [row[:1] for row in table.cells]
        for row in table.cells:
            for cell in row:
                cell.best = bool(cell.low > 0 or cell.high < 0)  # False for NaN bounds
                if cell.value > 0:
                    cell.text = f"+{cell.text}"
        shared = {_run_key(group.iloc[0]): int(group["n_done"].sum())
                  for _, group in rows.groupby(RUN_KEY, dropna=False, sort=False)}
        table.runs = table.runs.assign(shared_samples=[shared[_run_key(run)] for _, run in table.runs.iterrows()])
        table.name, table.title = name, title
        table.notes = [
            "Paired difference from the full-cache (fullkv) run of the same model that answered the same prompts "
            "(same task data, max length and dtype): the mean over the samples both runs finished of this run's "
            "score minus fullkv's on the same sample. Shared: the samples compared; (5/10): 5 shared of the 10 "
            "planned.",
            f"+1.20 ± 0.8: the difference and half the width of its {LEVEL:.0%} bootstrap interval ({RESAMPLES} "
            f"resamples of the shared samples, seed {seed}; averages resample within each task). Bold: the interval "
            "leaves out 0, a difference beyond what resampling the samples explains (too readily with a few "
            f"samples a task: the bootstrap needs about 10). {PARTIAL_MARK}: over unfinished or missing tasks.",
        ]
        tables.append(table)
    return tables


def _paper_block_order(run: pd.Series) -> tuple[int, float]:
    """FullKV's block first, then the capacities from the smallest, then runs of other methods without one."""
    if pd.isna(run["capacity"]):
        return (0, 0.0) if run["method"] == "fullkv" else (2, 0.0)
    return (1, float(run["capacity"]))


def _paper_block_label(run: pd.Series) -> str:
    if pd.isna(run["capacity"]):
        size = "Full" if run["method"] == "fullkv" else MISSING
    else:
        size = str(run["capacity"])
    length = "" if pd.isna(run["max_length"]) else f", Max Input Length = {run['max_length']}"
    return f"{run['model']}{length}, KV Size = {size}"


def _paper_method_order(method: str) -> tuple[int, str]:
    names = list(PAPER_METHODS)
    return (names.index(method), "") if method in names else (len(names), method)


def runs_table(frame: pd.DataFrame) -> Table:
    """Each run's settings that tell runs apart beyond the key (max length, dtype, the method's files, decoding),
    its progress (samples finished of planned) and its folders."""
    runs = sorted_runs(frame)
    cells = []
    for _, run in runs.iterrows():
        mine = frame[same_run(frame, run)]
        # A folder reused with a smaller --limit holds more rows than run.json now plans: count at most the planned.
        done = sum(rows if pd.isna(planned) else min(rows, planned)
                   for rows, planned in zip(mine["n_done"], mine["n_total"]))
        planned = "?" if mine["n_total"].isna().any() else str(int(mine["n_total"].sum()))
        texts = [_distinct(mine["max_length"].astype("string").fillna("auto")), _distinct(mine["dtype"]),
                 _distinct(mine["method_files"]), _distinct(mine["decoding"]), ", ".join(mine["task"])]
        cells.append([Cell(text=text or MISSING, complete=True) for text in texts]
                     + [Cell(text=f"{done}/{planned}", complete=bool(mine["complete"].all())),
                        Cell(text=_distinct(mine["run_dir"]), complete=True)])
    return Table(name="runs", title="Runs", runs=runs,
                 columns=["Max length", "Dtype", "Method files", "Decoding", "Tasks", "Samples done", "Folder"],
                 cells=cells,
                 numeric=False,
                 notes=["Max length auto: each task's from the model's context window. Method files: content "
                        "digests (shortened) of the files the method read, WindowKV's classifier or PrefixKV's "
                        "profiles. Decoding: batch-invariant (a sample's tokens do not depend on the decode batch) "
                        "or plain kernels."])


def _distinct(values: pd.Series) -> str:
    """The column's different values, in order of appearance (a run of several folders may show several)."""
    return ", ".join(dict.fromkeys(str(value) for value in values if str(value)))


# -- rendering ------------------------------------------------------------------------------------


def to_markdown(table: Table) -> str:
    """A GitHub markdown table, best values in **bold**, notes below."""
    header = table.index_header() + table.columns
    align = ["--:" if numeric else ":--" for numeric in table.index_numeric()] + [
        "--:" if table.numeric else ":--"] * len(table.columns)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    blocks = dict(table.blocks)
    for run, row in enumerate(table.cells):
        if run in blocks:
            # Markdown has no spanning cell: the block's label in bold in the first, the others left empty.
            lines.append("| " + " | ".join([f"**{_escape_pipes(blocks[run])}**"] + [""] * (len(header) - 1)) + " |")
        texts = table.index_text(run) + [f"**{cell.text}**" if cell.best else cell.text for cell in row]
        lines.append("| " + " | ".join(_escape_pipes(text) for text in texts) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(f"{note}  " for note in table.notes) + "\n"


def _escape_pipes(text: str) -> str:
    return text.replace("|", "\\|")


def to_html(table: Table) -> str:
    """An HTML table (no page around it): grouped header, best values bold, unfinished cells styled."""
    index = table.index_header()
    parts = ['<table class="scores">', "<thead>"]
    if table.groups:
        parts.append("<tr>" + f'<th colspan="{len(index)}"></th>' + "".join(
            f'<th colspan="{span}" class="group">{html.escape(label)}</th>' for label, span in table.groups) + "</tr>")
    averages = [column.endswith(" avg") or column in ("Avg", "Avg.", "All") for column in table.columns]
    parts.append("<tr>" + "".join(f"<th>{html.escape(name)}</th>" for name in index) + "".join(
        f'<th class="{"avg" if average else "task"}">{html.escape(column)}</th>'
        for column, average in zip(table.columns, averages)) + "</tr>")
    parts.append("</thead>\n<tbody>")
    blocks = dict(table.blocks)
    for run, row in enumerate(table.cells):
        if run in blocks:
            parts.append(f'<tr class="block"><th colspan="{len(index) + len(table.columns)}">'
                         f"{html.escape(blocks[run])}</th></tr>")
        cells_html = "".join(f'<td class="{"key num" if numeric else "key"}">{html.escape(text)}</td>'
                             for text, numeric in zip(table.index_text(run), table.index_numeric()))
        for cell, average in zip(row, averages):
            classes = ["num" if table.numeric else "text"] + (["avg"] if average else []) + ([] if cell.complete or cell.text == MISSING else ["partial"])
            text = html.escape(cell.text)
            cells_html += f'<td class="{" ".join(classes)}">{f"<b>{text}</b>" if cell.best else text}</td>'
        parts.append(f"<tr>{cells_html}</tr>")
    parts.append("</tbody></table>")
    parts += [f'<p class="note">{html.escape(note)}</p>' for note in table.notes]
    return "\n".join(parts)
