"""Scoring LongBench predictions as official ``eval.py`` does: `kvbench eval` and each run's scores.

Prediction files are LongBench's pred format, one JSON object a line with
``pred``, ``answers``, ``all_classes`` and ``length``; the file's stem names the
task ("qasper.jsonl", or "qasper_e.jsonl" for LongBench-E).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kvbench.errors import KvbenchError
from kvbench.runfolder import check_id
from kvbench.tasks.jsonl import read_jsonl
from kvbench.tasks.longbench_spec import LENGTH_BUCKETS, LONGBENCH_TASKS, length_bucket, resolve_longbench_name
from kvbench.tasks.metrics import rouge_score, rouge_zh_score, score_prediction

BUCKET_LABELS = [label for label, _ in LENGTH_BUCKETS]


def score_rows(task: str, rows: list[dict[str, Any]], longbench_e: bool = False) -> dict[str, float | None]:
    """Scores (0-100) of one task's result rows: {"score": ...}, and with ``longbench_e`` one per length bucket.

    A bucket without samples scores None. ``task`` is "qasper" or "qasper_e".
    """
    located_rows = [(f"{task} row {number}", row) for number, row in enumerate(rows, start=1)]
    return _score_located_rows(task, located_rows, longbench_e)


def _score_located_rows(task: str, located_rows: list[tuple[str, dict[str, Any]]], longbench_e: bool) -> dict[str, float | None]:
    """`score_rows` for rows that each come with where they are from ("file:line"), used in every error."""
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
    scores: dict[str, float | None] = {"score": _official_task_score(sample_scores)}
    if longbench_e:
        scores.update(_official_bucket_scores(sample_scores, [row["length"] for _, row in located_rows]))
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


def score_file(path: Path, longbench_e: bool = False) -> tuple[int, dict[str, float | None]]:
    """(number of predictions, scores) of one ``<task>.jsonl`` prediction file."""
    located_rows = [(f"{path}:{line_number}", row) for line_number, row in read_jsonl(path)]
    if not located_rows:
        raise KvbenchError(f"{path}: no predictions")
    return len(located_rows), _score_located_rows(path.stem, located_rows, longbench_e)


def evaluate_path(path: str | os.PathLike, longbench_e: bool = False) -> pd.DataFrame:
    """Score a folder of ``<task>.jsonl`` prediction files, or one such file.

    Returns one row per task file, in LongBench's task order, with columns task
    (the file's stem), category, n, score, and with ``longbench_e`` one column per
    length bucket. In a folder, other files are left alone: ``.jsonl`` files whose
    stem is not a LongBench task (a run's ``needle.jsonl``) are listed, one
    "name: reason" each, in ``attrs["skipped"]``; the rest (``scores.json``) are ignored.
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
    for file in files:
        try:
            info, is_longbench_e = resolve_longbench_name(file.stem)
        except KvbenchError:
            if file == path:
                raise KvbenchError(f"{path}: {file.stem!r} is not a LongBench task, so there is no metric to score it with") from None
            skipped.append(f"{file.name}: not a LongBench task")
            continue
        count, scores = score_file(file, longbench_e)
        order = (LONGBENCH_TASKS.index(info.name), is_longbench_e)
        records.append((order, {"task": file.stem, "category": info.category, "n": count, **scores}))
    if not records:
        raise KvbenchError(f"{path}: no LongBench prediction files (<task>.jsonl) to score")
    columns = ["task", "category", "n", "score"] + (BUCKET_LABELS if longbench_e else [])
    table = pd.DataFrame([record for _, record in sorted(records, key=lambda item: item[0])], columns=columns)
    table.attrs["skipped"] = skipped
    return table


def _score_columns(table: pd.DataFrame) -> list[str]:
    return [column for column in ["score", *BUCKET_LABELS, "rougeL_vs_reference"] if column in table.columns]


def format_score_table(table: pd.DataFrame) -> str:
    """The table `kvbench eval` prints: one line per task, then the average of the task scores ("-": no samples)."""
    score_columns = _score_columns(table)

    def number(value) -> str:
        return "-" if pd.isna(value) else f"{value:.2f}"

    header = ["task", "category", "n", *score_columns]
    lines = [[row["task"], row["category"], str(row["n"]), *(number(row[column]) for column in score_columns)] for _, row in table.iterrows()]
    lines.append(["average", "", "", *(number(table[column].mean()) for column in score_columns)])
    widths = [max(len(line[index]) for line in [header, *lines]) for index in range(len(header))]
    text_columns = 2  # task and category read left-aligned, the numbers right-aligned

    def render(cells: list[str]) -> str:
        return "  ".join(
            cell.ljust(width) if index < text_columns else cell.rjust(width) for index, (cell, width) in enumerate(zip(cells, widths))
        ).rstrip()

    return "\n".join(render(cells) for cells in [header, *lines])


def scores_as_json(table: pd.DataFrame) -> dict[str, Any]:
    """{task: score}, or with bucket columns {task: {"score": ..., "0-4k": ..., ...}}; an empty bucket is null."""
    columns = _score_columns(table)

    def plain(value) -> float | None:
        return None if pd.isna(value) else float(value)

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


def _predictions_by_id(path: Path) -> dict[str, str]:
    rows = {}
    for line_number, row in read_jsonl(path):
        if "_id" not in row or "pred" not in row:
            raise KvbenchError(f"{path}:{line_number}: a row needs `_id` and `pred` to be compared across runs")
        check_id(row["_id"], f"{path}:{line_number}")
        rows[row["_id"]] = row["pred"]
    return rows


def fidelity_to_reference(table: pd.DataFrame, path: str | os.PathLike, reference: str | os.PathLike) -> pd.DataFrame:
    """Add ``rougeL_vs_reference``: mean ROUGE-L F (x100) of each prediction against the reference run's
    prediction for the same ``_id`` (the PrefixKV / Elastic Cache papers' fidelity to the full cache).

    Chinese tasks use the jieba-tokenised ROUGE-L as their metric does; identical predictions score 100
    even when empty (the `rouge` package refuses empty strings). ``n_matched`` counts the shared ids.
    """
    path, reference = Path(path), Path(reference)
    if not reference.is_dir():
        raise KvbenchError(f"--against-run {reference}: no such folder")
    folder = path if path.is_dir() else path.parent
    fidelity, matched = [], []
    for task in table["task"]:
        info, _ = resolve_longbench_name(task)
        reference_file = reference / f"{task}.jsonl"
        if not reference_file.is_file():
            fidelity.append(None)
            matched.append(0)
            continue
        ours, theirs = _predictions_by_id(folder / f"{task}.jsonl"), _predictions_by_id(reference_file)
        shared = [key for key in ours if key in theirs]
        rouge = rouge_zh_score if info.language == "zh" else rouge_score
        values = [1.0 if ours[key] == theirs[key] else rouge(ours[key], theirs[key]) for key in shared]
        fidelity.append(round(100 * float(np.mean(values)), 2) if values else None)
        matched.append(len(shared))
    table = table.copy()
    table["n_matched"] = matched
    table["rougeL_vs_reference"] = fidelity
    return table
