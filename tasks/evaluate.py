"""Scoring LongBench predictions as official ``eval.py`` does: `kvbench eval` and each run's scores.

Prediction files are LongBench's pred format, one JSON object a line with
``pred``, ``answers``, ``all_classes`` and ``length``; the file's stem names the
task ("qasper.jsonl", or "qasper_e.jsonl" for LongBench-E).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kvbench.errors import KvbenchError
from kvbench.intervals import DEFAULT_SEED, average_draws, bounds, paired_difference_draws, resampled_means
from kvbench.runfolder import check_id
from kvbench.tasks.jsonl import read_jsonl
from kvbench.tasks.longbench_spec import LENGTH_BUCKETS, LONGBENCH_TASKS, length_bucket, resolve_longbench_name
from kvbench.tasks.metrics import rouge_score, rouge_zh_score, score_prediction

BUCKET_LABELS = [label for label, _ in LENGTH_BUCKETS]


def score_rows(task: str, rows: list[dict[str, Any]], longbench_e: bool = False) -> dict[str, float | None]:
    """Scores (0-100) of one task's result rows: {"score": ...}, and with ``longbench_e`` one per length bucket.

    A bucket without samples scores None. ``task`` is "qasper" or "qasper_e".
    """
    return score_rows_and_samples(task, rows, longbench_e)[0]


def score_rows_and_samples(task: str, rows: list[dict[str, Any]],
                           longbench_e: bool = False) -> tuple[dict[str, float | None], list[dict[str, float]]]:
    """`score_rows`, and each row's scores (0-100) whose means over the rows are those (before the official
    rounding): "score", and with ``longbench_e`` the score again under the row's length bucket."""
    located_rows = [(f"{task} row {number}", row) for number, row in enumerate(rows, start=1)]
    scores = _located_sample_scores(task, located_rows, longbench_e)
    official = _official_scores(scores, [row.get("length") for _, row in located_rows], longbench_e)
    return official, [{"score": 100 * score, **({length_bucket(row["length"]): 100 * score} if longbench_e else {})}
                      for score, (_, row) in zip(scores, located_rows)]


def _located_sample_scores(task: str, located_rows: list[tuple[str, dict[str, Any]]], longbench_e: bool) -> list[float]:
    """Each row's score (0-1) by the task's metric; the rows each come with where they are from ("file:line"),
    used in every error."""
    info, _ = resolve_longbench_name(task)
    if not located_rows:
        raise KvbenchError(f"{task}: no rows to score")
    for location, row in located_rows:
        _check_row(location, row, need_length=longbench_e)
    # Official eval.py keeps the all_classes of a file's last line and scores every line with it.
    last_location, last_row = located_rows[-1]
    all_classes = last_row.get("all_classes")
    if info.metric == "classification_score" and not isinstance(all_classes, list):
        raise KvbenchError(f"{last_location}: {task} is scored against its class names, but all_classes is {all_classes!r}")
    sample_scores = []
    for location, row in located_rows:
        try:
            sample_scores.append(score_prediction(task, row["pred"], row["answers"], all_classes))
        except KvbenchError as error:
            raise KvbenchError(f"{location}: {error}") from None
    return sample_scores


def _official_scores(sample_scores: list[float], lengths: list[Any], longbench_e: bool) -> dict[str, float | None]:
    scores: dict[str, float | None] = {"score": _official_task_score(sample_scores)}
    if longbench_e:
        scores.update(_official_bucket_scores(sample_scores, lengths))
    return scores


def _check_row(location: str, row: dict[str, Any], need_length: bool) -> None:
    if "pred" not in row:
        raise KvbenchError(f"{location}: no 'pred' field")
    if not isinstance(row["pred"], str):
        raise KvbenchError(f"{location}: 'pred' is {type(row['pred']).__name__}, expected a string")
    if "answers" not in row:
        raise KvbenchError(f"{location}: no 'answers' field")
    answers = row["answers"]
    if not isinstance(answers, list) or not all(isinstance(answer, str) for answer in answers):
        raise KvbenchError(f"{location}: 'answers' must be a list of strings")
    if need_length:
        length = row.get("length")
        if not isinstance(length, int) or isinstance(length, bool):
            raise KvbenchError(f"{location}: LongBench-E scoring needs an integer 'length', found {length!r}")


def _official_task_score(sample_scores: list[float]) -> float:
    """eval.py's ``scorer``: a running sum, then 100 × sum / n rounded to 2 places (Python's round)."""
    total = 0.0
    for score in sample_scores:
        total += score
    return round(100 * total / len(sample_scores), 2)


def _official_bucket_scores(sample_scores: list[float], lengths: list[int]) -> dict[str, float | None]:
    """eval.py's ``scorer_e``: per length bucket, numpy's mean × 100 rounded by numpy (not Python's round)."""
    bucket_scores: dict[str, list[float]] = {label: [] for label in BUCKET_LABELS}
    for score, length in zip(sample_scores, lengths):
        bucket_scores[length_bucket(length)].append(score)
    return {label: float(round(100 * np.mean(scores), 2)) if scores else None for label, scores in bucket_scores.items()}


def _score_file(path: Path, longbench_e: bool, rows: list[tuple[int, dict]] | None = None
                ) -> tuple[dict[str, float | None], pd.Series]:
    """One ``<task>.jsonl`` prediction file's official scores, and each row's score (0-100) under its ``_id``
    (its line number when the file has no ids); ``rows``: the file's (line number, row) pairs, if read already."""
    rows = read_jsonl(path) if rows is None else rows
    located_rows = [(f"{path}:{line_number}", row) for line_number, row in rows]
    if not located_rows:
        raise KvbenchError(f"{path}: no predictions")
    scores = _located_sample_scores(path.stem, located_rows, longbench_e)
    ids = [row.get("_id", location) for location, row in located_rows]
    if len(set(map(str, ids))) != len(ids):
        ids = [location for location, _ in located_rows]
    official = _official_scores(scores, [row.get("length") for _, row in located_rows], longbench_e)
    return official, pd.Series(100 * np.asarray(scores), index=[str(key) for key in ids], dtype=float)


def evaluate_path(path: str | os.PathLike, longbench_e: bool = False, seed: int = DEFAULT_SEED) -> pd.DataFrame:
    """Score a folder of ``<task>.jsonl`` prediction files, or one such file.

    Returns one row per task file, in LongBench's task order, with columns task
    (the file's stem), category, n, score, score_low and score_high (its 95% bootstrap
    interval over the file's samples, `kvbench.intervals`, drawn from ``seed``; NaN for
    one sample), and with ``longbench_e`` one column per length bucket. In a folder, other
    files are left alone: ``.jsonl`` files whose stem is not a LongBench task (a run's
    ``needle.jsonl``) are listed, one "name: reason" each, in ``attrs["skipped"]``; the
    rest (``scores.json``) are ignored. ``attrs["samples"]`` holds each task's per-sample
    scores (by ``_id``) and ``attrs["draws"]`` their bootstrap means (None for one sample).
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(child for child in path.iterdir() if child.suffix == ".jsonl" and child.is_file())
    elif path.is_file():
        files = [path]
    else:
        raise KvbenchError(f"{path}: no such file or folder")
    records = []
    skipped = []
    samples: dict[str, pd.Series] = {}
    draws: dict[str, np.ndarray | None] = {}
    for file in files:
        try:
            info, is_longbench_e = resolve_longbench_name(file.stem)
        except KvbenchError:
            if file == path:
                raise KvbenchError(f"{path}: {file.stem!r} is not a LongBench task, so there is no metric to score it with") from None
            skipped.append(f"{file.name}: not a LongBench task")
            continue
        scores, samples[file.stem] = _score_file(file, longbench_e)
        draws[file.stem] = resampled_means(samples[file.stem].to_numpy(), file.stem, seed)
        low, high = bounds(draws[file.stem]) if draws[file.stem] is not None else (math.nan, math.nan)
        order = (LONGBENCH_TASKS.index(info.name), is_longbench_e)
        records.append((order, {"task": file.stem, "category": info.category, "n": len(samples[file.stem]),
                                "score": scores.pop("score"), "score_low": low, "score_high": high, **scores}))
    if not records:
        raise KvbenchError(f"{path}: no LongBench prediction files (<task>.jsonl) to score")
    columns = ["task", "category", "n", "score", "score_low", "score_high"] + (BUCKET_LABELS if longbench_e else [])
    table = pd.DataFrame([record for _, record in sorted(records, key=lambda item: item[0])], columns=columns)
    table.attrs.update(skipped=skipped, samples=samples, draws=draws, seed=seed)
    return table


def _score_columns(table: pd.DataFrame) -> list[str]:
    return [column for column in ["score", *BUCKET_LABELS, "difference", "rougeL_vs_reference"]
            if column in table.columns]


def _interval_text(low: float, high: float) -> str:
    return "-" if pd.isna(low) else f"{low:.2f}..{high:.2f}"


def _average_interval(table: pd.DataFrame, draws_key: str) -> str:
    """The interval of the average over the tasks, each task resampled alone; "-" when a task has none."""
    draws = [table.attrs[draws_key].get(task) for task in table["task"]]
    if not draws or any(part is None for part in draws):
        return "-"
    return _interval_text(*bounds(average_draws(draws)))


def format_score_table(table: pd.DataFrame) -> str:
    """The table `kvbench eval` prints: one line per task, then the average of the task scores ("-": no samples),
    each score's 95% interval after it (the average's resamples each task alone), and with a reference run the
    paired difference from it on the shared samples, with its interval and how many samples were shared."""
    score_columns = _score_columns(table)
    intervals = {"score": ("score_low", "score_high", "draws"),
                 "difference": ("difference_low", "difference_high", "difference_draws")}

    def number(value) -> str:
        return "-" if pd.isna(value) else f"{value:.2f}"

    header, lines = ["task", "category", "n"], [[row["task"], row["category"], str(row["n"])] for _, row in table.iterrows()]
    average = ["average", "", ""]
    for column in score_columns:
        header.append(column)
        for line, value in zip(lines, table[column]):
            line.append(number(value))
        average.append(number(table[column].mean()))
        if column in intervals:
            low, high, draws_key = intervals[column]
            header.append("95% interval")
            for line, (_, row) in zip(lines, table.iterrows()):
                line.append(_interval_text(row[low], row[high]))
            average.append(_average_interval(table, draws_key))
        if column == "difference":
            header.append("shared")
            for line, shared in zip(lines, table["n_matched"]):
                line.append(str(shared))
            average.append(str(table["n_matched"].sum()))
    lines.append(average)
    widths = [max(len(line[index]) for line in [header, *lines]) for index in range(len(header))]
    text_columns = 2  # task and category read left-aligned, the numbers right-aligned

    def render(cells: list[str]) -> str:
        return "  ".join(
            cell.ljust(width) if index < text_columns else cell.rjust(width) for index, (cell, width) in enumerate(zip(cells, widths))
        ).rstrip()

    return "\n".join(render(cells) for cells in [header, *lines])


def scores_as_json(table: pd.DataFrame) -> dict[str, Any]:
    """{task: score}, or with bucket or reference columns {task: {"score": ..., "0-4k": ..., ...}}; an empty bucket
    is null. A reference run adds the paired difference with its interval and the shared samples' count."""
    columns = _score_columns(table)
    columns += [column for column in ("difference_low", "difference_high", "n_matched") if column in table.columns]

    def plain(value) -> float | int | None:
        if pd.isna(value):
            return None
        return int(value) if isinstance(value, (int, np.integer)) else float(value)

    if columns == ["score"]:
        return {row["task"]: plain(row["score"]) for _, row in table.iterrows()}
    return {row["task"]: {column: plain(row[column]) for column in columns} for _, row in table.iterrows()}


def write_scores_json(table: pd.DataFrame, path: str | os.PathLike) -> None:
    try:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(scores_as_json(table), handle, ensure_ascii=False, indent=2)
            handle.write("\n")
    except OSError as error:
        raise KvbenchError(f"{path}: cannot write ({error.strerror})") from None


def _predictions_by_id(path: Path, rows: list[tuple[int, dict]]) -> dict[str, str]:
    """``_id`` -> prediction of a file's (line number, row) pairs."""
    predictions = {}
    for line_number, row in rows:
        if "_id" not in row or "pred" not in row:
            raise KvbenchError(f"{path}:{line_number}: a row needs `_id` and `pred` to be compared across runs")
        check_id(row["_id"], f"{path}:{line_number}")
        predictions[row["_id"]] = row["pred"]
    return predictions


def compare_with_reference(table: pd.DataFrame, path: str | os.PathLike, reference: str | os.PathLike) -> pd.DataFrame:
    """Compare each task with a reference run's (e.g. the full cache's) predictions of the same ``_id``s:

    * ``difference``: the mean over the shared samples of the score minus the reference's score
      of the same sample (a paired difference), ``difference_low`` / ``difference_high`` its 95%
      bootstrap interval (drawn from the table's seed; NaN for fewer than two shared samples);
    * ``rougeL_vs_reference``: mean ROUGE-L F (x100) of each prediction against the reference's
      (the PrefixKV / Elastic Cache papers' fidelity to the full cache). Chinese tasks use the
      jieba-tokenised ROUGE-L as their metric does; identical predictions score 100 even when empty
      (the `rouge` package refuses empty strings).

    ``n_matched`` counts the shared ids. The reference's rows are scored by the same metric,
    under the same code_sim matcher as the table.
    """
    path, reference = Path(path), Path(reference)
    if not reference.is_dir():
        raise KvbenchError(f"--against-run {reference}: no such folder")
    folder = path if path.is_dir() else path.parent
    columns: dict[str, list] = {name: [] for name in ("n_matched", "difference", "difference_low", "difference_high",
                                                      "rougeL_vs_reference")}
    difference_draws: dict[str, np.ndarray | None] = {}
    for task in table["task"]:
        info, is_longbench_e = resolve_longbench_name(task)
        reference_file = reference / f"{task}.jsonl"
        if not reference_file.is_file():
            for name, empty in zip(columns, (0, None, None, None, None)):
                columns[name].append(empty)
            difference_draws[task] = None
            continue
        our_file = folder / f"{task}.jsonl"
        reference_rows = list(read_jsonl(reference_file))  # read once: its predictions and its scores
        ours = _predictions_by_id(our_file, list(read_jsonl(our_file)))
        theirs = _predictions_by_id(reference_file, reference_rows)
        shared = [key for key in ours if key in theirs]
        rouge = rouge_zh_score if info.language == "zh" else rouge_score
        values = [1.0 if ours[key] == theirs[key] else rouge(ours[key], theirs[key]) for key in shared]
        our_scores = table.attrs["samples"][task].reindex(shared).to_numpy()
        reference_scores = _score_file(reference_file, is_longbench_e, reference_rows)[1].reindex(shared).to_numpy()
        draws = paired_difference_draws(our_scores, reference_scores, task, table.attrs["seed"])
        low, high = bounds(draws) if draws is not None else (None, None)
        for name, value in zip(columns, (len(shared), float(np.mean(our_scores - reference_scores)) if shared else None,
                                         low, high, round(100 * float(np.mean(values)), 2) if values else None)):
            columns[name].append(value)
        difference_draws[task] = draws
    table = table.copy()
    for name, values in columns.items():
        table[name] = pd.Series(values, index=table.index, dtype="Int64" if name == "n_matched" else float)
    table.attrs["difference_draws"] = difference_draws
    return table
