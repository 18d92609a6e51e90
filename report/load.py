"""Run folders into one table: one row per model x method x capacity x settings x task.

A run folder is what `kvbench run` writes: ``run.json`` at the start, one
``<task>.jsonl`` row per finished sample, ``scores.json`` at the end. A task's score
is taken from ``scores.json`` only when the task is complete (every planned sample
has a row); otherwise it is recomputed from the rows with the task's own scorer, so a
run in progress shows the score of what it has done so far, flagged as partial.

Reading never changes a file: a last line cut short by a run still writing it is
skipped, not repaired (the run loop repairs it when it resumes).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from kvbench.errors import KvbenchError
from kvbench.paths import default_output_dir
from kvbench.runfolder import RUN_FILE, SCORES_FILE, option_text, read_finished_rows, read_json, result_path
from kvbench.tasks.metrics import using_code_sim_matcher

#: columns that name a run; `settings` holds only the options that tell runs of one method apart, and
#: QUESTION_AGNOSTIC for a run that compressed its contexts without the question
RUN_KEY = ["model", "method", "capacity", "settings"]
#: how `settings` names a question-agnostic run (`kvbench run --question-agnostic`); the ``question`` column
#: says "agnostic" or "aware"
QUESTION_AGNOSTIC = "question-agnostic"
#: keys of a task's score dict that count samples rather than score them
_COUNT_KEYS = {"score", "n", "cells"}
#: hex digits of a content digest worth showing: enough to tell two files apart at a glance
SHORT_DIGEST = 12


def find_run_dirs(folder: str | Path) -> list[Path]:
    """``folder`` itself when it holds a run.json, else every folder below it that does."""
    folder = Path(folder)
    if not folder.exists():
        raise KvbenchError(f"no such run folder: {folder}")
    if not folder.is_dir():
        raise KvbenchError(f"not a folder: {folder}")
    if (folder / RUN_FILE).is_file():
        return [folder]
    run_dirs = sorted(path.parent for path in folder.rglob(RUN_FILE))
    if not run_dirs:
        raise KvbenchError(f"no run in {folder}: no {RUN_FILE} in it or in any folder below it")
    return run_dirs


def _run_info(run_dir: Path) -> dict[str, Any]:
    info = read_json(run_dir / RUN_FILE)
    missing = [key for key in ("model", "method", "tasks") if key not in info]
    if missing:
        raise KvbenchError(f"{run_dir / RUN_FILE}: missing {', '.join(missing)}")
    if not isinstance(info["tasks"], dict):
        raise KvbenchError(f"{run_dir / RUN_FILE}: 'tasks' must map task names to sample counts")
    return info


def _task_names(run_dir: Path, planned: dict[str, Any]) -> list[str]:
    """The planned tasks, then any other result file in the folder (a run that reused the folder
    with other tasks rewrote run.json; those rows are still results, of unknown planned count)."""
    others = sorted(path.stem for path in run_dir.glob("*.jsonl") if path.stem not in planned)
    return list(planned) + others


def _label_settings(runs: list[dict[str, Any]]) -> None:
    """Name in ``settings`` the options whose values differ between runs of one model and method."""
    by_method: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        by_method.setdefault((run["model"], run["method"]), []).append(run)
    for group in by_method.values():
        keys = sorted({key for run in group for key in run["all_settings"]} - {"capacity"})
        varying = [key for key in keys if len({option_text(run["all_settings"].get(key)) for run in group}) > 1]
        for run in group:
            # An unset option (null) is the method's default and needs no mention.
            options = [f"{key}={option_text(run['all_settings'][key])}" for key in varying
                       if run["all_settings"].get(key) is not None]
            run["settings"] = ", ".join(options + ([QUESTION_AGNOSTIC] if run["question"] == "agnostic" else []))


def settings_without_question(settings: str) -> str:
    """A run's ``settings`` as its question-aware twin's: without the question-agnostic mark."""
    return ", ".join(part for part in settings.split(", ") if part and part != QUESTION_AGNOSTIC)


class _Scorers:
    """Task objects from the registry, one per task name, for their scorers and categories."""

    def __init__(self):
        self._tasks: dict[str, Any] = {}

    def __call__(self, name: str, run_dir: Path):
        if name not in self._tasks:
            from kvbench.tasks import get_task

            try:
                self._tasks[name] = get_task(name)
            except KvbenchError as error:
                raise KvbenchError(f"{run_dir}: {error}") from None
        return self._tasks[name]


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _row_mean(rows: list[dict[str, Any]], read) -> float:
    """Mean over the rows that record a number for ``read(row)``; NaN when none does (older runs)."""
    values = [number for number in (_number(read(row)) for row in rows) if not math.isnan(number)]
    return sum(values) / len(values) if values else math.nan


def _kept_tokens(row: dict[str, Any]) -> Any:
    kept = row.get("kept_tokens")
    return kept.get("mean") if isinstance(kept, dict) else None


def _method_files_text(files: Any, prefix: str = "") -> str:
    """``name=digest`` for each file the method read (nested maps joined with "/"), digests shortened."""
    if not isinstance(files, dict):
        return ""
    parts = []
    for name, value in files.items():
        if isinstance(value, dict):
            parts.append(_method_files_text(value, f"{prefix}{name}/"))
        else:
            parts.append(f"{prefix}{name}={str(value)[:SHORT_DIGEST]}")
    return ", ".join(part for part in parts if part)


def _whole_number_or_none(value: Any, what: str, path: Path) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise KvbenchError(f"{path}: {what} must be a whole number or null, got {value!r}")


def _task_data(run: dict[str, Any], task_name: str) -> str:
    """A short digest of what the task's rows depend on besides model and method (its data, its prompt budget),
    as run.json records it; "" for runs from before it was recorded."""
    identity = run["task_identity"].get(task_name)
    if not isinstance(identity, dict) or not identity:
        return ""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()[:SHORT_DIGEST]


def _task_record(run: dict[str, Any], task_name: str, scores: dict[str, Any], scorers: _Scorers,
                 samples: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The task's row of the frame; with ``samples``, one record per finished row (run folder, task, sample id
    and the row's own scores, 0-100) is added to that list."""
    run_dir: Path = run["run_dir"]
    task = scorers(task_name, run_dir)
    rows = read_finished_rows(result_path(run_dir, task_name))
    planned = run["tasks"].get(task_name)
    total = int(planned) if isinstance(planned, (int, float)) else None
    complete = total is not None and len(rows) >= total
    saved = scores.get(task_name)
    saved_score = _number(saved.get("score")) if isinstance(saved, dict) else math.nan
    values, source = {}, "none"
    if rows and (samples is not None or not complete or math.isnan(saved_score)):
        with using_code_sim_matcher(run["code_sim_matcher"]):
            values, row_scores = task.score_with_samples(rows)  # each row scored once for both
        source = "rows"
        if samples is not None:
            samples += [{"run_dir": str(run_dir), "task": task_name, "_id": str(row["_id"]), **row_score}
                        for row, row_score in zip(rows, row_scores)]
    if complete and not math.isnan(saved_score):
        values, source = saved, SCORES_FILE
    record = {
        "run_dir": str(run_dir),
        "model": run["model"],
        "method": run["method"],
        "capacity": run["capacity"],
        "settings": run["settings"],
        "question": run["question"],
        "task": task_name,
        "category": task.category,
        "max_length": run["max_length"],
        "dtype": run["dtype"],
        "decoding": run["decoding"],
        "method_files": run["method_files"],
        "task_data": _task_data(run, task_name),
        "n_done": len(rows),
        "n_total": total,
        "complete": complete,
        "score": _number(values.get("score")),
        "score_source": source,
        "kept_tokens": _row_mean(rows, _kept_tokens),
        "kv_cache_mb": _row_mean(rows, lambda row: row.get("kv_cache_mb")),
    }
    record.update({key: _number(value) for key, value in values.items() if key not in _COUNT_KEYS})
    return record


def load_runs(*paths: str | Path) -> pd.DataFrame:
    """Every run under ``paths`` (default: `kvbench run`'s output folder) as one DataFrame.

    Columns: run_dir, model, method, capacity (nullable int), settings (ending in "question-agnostic" for
    such runs), question ("aware" or "agnostic": whether the method saw the question), task, category,
    max_length (nullable int: none given, each task's from the model's window), dtype,
    decoding ("batch-invariant" or "plain", see `kvbench.engine.invariant`),
    method_files (``name=digest`` of the files the method read, digests shortened),
    task_data (a short digest of the task's data and prompt budget as run.json records
    them, "" when it does not: runs that agree on it answered the same prompts),
    n_done (rows in the folder, which may exceed n_total when a smaller --limit reused it),
    n_total (nullable: unknown for a task run.json does not plan), complete,
    score (0-100, NaN before the first row), score_source ("scores.json", "rows" or
    "none"), kept_tokens and kv_cache_mb (means over the task's rows of the tokens kept
    per layer and of the KV cache's MiB; NaN when the rows do not record them), then each
    task's extra scores (LongBench-E's "0-4k", "4-8k", "8k+"; the
    needle's "rouge1_f", "phrase_found"; a RULER task's score at each length, "4096", ...),
    NaN where a task has none.
    """
    return _load(paths, with_samples=False)[0]


def load_runs_and_samples(*paths: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`load_runs`' frame, and every finished row's own scores: one row per sample with run_dir, task, _id
    and its scores (0-100) under the frame's metric names (score, LongBench-E's bucket of its length, the
    needle's rouge1_f and phrase_found; NaN where a sample has none). A task's score is their mean, up
    to the official rounding (and over all the folder's rows where a smaller --limit reused it)."""
    return _load(paths, with_samples=True)


def _load(paths: tuple[str | Path, ...], with_samples: bool) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    run_dirs: list[Path] = []
    for path in paths or (default_output_dir(),):
        run_dirs += [run_dir for run_dir in find_run_dirs(path) if run_dir not in run_dirs]
    runs = []
    for run_dir in run_dirs:
        info = _run_info(run_dir)
        settings = info.get("settings") or {}
        identity = info.get("identity") if isinstance(info.get("identity"), dict) else {}
        runs.append({
            "run_dir": run_dir,
            # runs from before the matcher was recorded were scored with fuzzywuzzy's pure-Python matcher
            "code_sim_matcher": (identity.get("scorer") or {}).get("code_sim_matcher", "difflib"),
            "model": str(info["model"]),
            "method": str(info["method"]),
            "capacity": _whole_number_or_none(info.get("capacity"), "capacity", run_dir / RUN_FILE),
            "max_length": _whole_number_or_none(info.get("max_length", identity.get("max_length")), "max_length",
                                                run_dir / RUN_FILE),
            "dtype": str(info.get("dtype") or identity.get("dtype") or ""),
            "decoding": "batch-invariant" if identity.get("batch_invariant") else "plain",
            "method_files": _method_files_text(identity.get("method_files")),
            "tasks": info["tasks"],
            "task_identity": info["task_identity"] if isinstance(info.get("task_identity"), dict) else {},
            "all_settings": settings if isinstance(settings, dict) else {},
            "question": "agnostic" if info.get("question_agnostic") is True else "aware",
        })
    _label_settings(runs)
    scorers = _Scorers()
    records = []
    samples: list[dict[str, Any]] | None = [] if with_samples else None
    for run in runs:
        scores_path = run["run_dir"] / SCORES_FILE
        scores = read_json(scores_path) if scores_path.is_file() else {}
        records += [_task_record(run, name, scores, scorers, samples)
                    for name in _task_names(run["run_dir"], run["tasks"])]
    if not records:
        raise KvbenchError(f"the runs in {', '.join(str(path) for path in run_dirs)} plan no task")
    frame = pd.DataFrame.from_records(records)
    for column in ("capacity", "max_length", "n_total"):
        frame[column] = frame[column].astype("Int64")
    _refuse_duplicates(frame)
    if samples is None:
        return frame, None
    return frame, pd.DataFrame.from_records(samples, columns=list(dict.fromkeys(
        ["run_dir", "task", "_id", "score"] + [key for record in samples for key in record])))


def _refuse_duplicates(frame: pd.DataFrame) -> None:
    """Two folders with the same run and task would make two rows that a table cannot tell apart."""
    keyed = frame.assign(capacity=frame["capacity"].astype("string").fillna("none"))
    duplicated = keyed[keyed.duplicated(RUN_KEY + ["task"], keep=False)]
    if not duplicated.empty:
        first = duplicated.iloc[0]
        folders = duplicated[(duplicated[RUN_KEY + ["task"]] == first[RUN_KEY + ["task"]]).all(axis=1)]["run_dir"]
        raise KvbenchError(
            f"{first['task']} of {first['model']} {first['method']} capacity {first['capacity']} is in more than one "
            f"run folder ({', '.join(folders)}); report on one of them at a time"
        )


def needle_cells(runs: pd.DataFrame) -> pd.DataFrame:
    """The needle grid of every run in ``runs`` that has a needle task: one row per finished cell
    with the run's key, context_length, depth_percent and the cell's scores (0-100)."""
    scorers = _Scorers()
    records: list[dict[str, Any]] = []
    for run in runs[runs["category"] == "needle"].itertuples(index=False):
        task = scorers(run.task, Path(run.run_dir))
        path = result_path(Path(run.run_dir), run.task)
        for row in read_finished_rows(path):
            length, depth = _number(row.get("context_length")), _number(row.get("depth_percent"))
            if math.isnan(length) or math.isnan(depth):
                raise KvbenchError(f"{path}: row {row['_id']!r} has no numeric context_length and depth_percent, "
                                   "which place it in the needle grid")
            cell = task.score_row(row)
            records.append({
                **{key: getattr(run, key) for key in RUN_KEY},
                "task": run.task,
                "context_length": int(length),
                "depth_percent": depth,
                "score": cell["rouge1_recall"],
                "rouge1_f": cell["rouge1_f"],
                "phrase_found": cell["phrase_found"],
                "pred": row.get("pred", ""),
            })
    cells = pd.DataFrame.from_records(records, columns=RUN_KEY + [
        "task", "context_length", "depth_percent", "score", "rouge1_f", "phrase_found", "pred"])
    return cells.astype({"capacity": "Int64"})
