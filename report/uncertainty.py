"""The report's intervals: each task's bootstrap draws, and each run's paired difference from the full cache.

Draws are keyed by (run folder, task, metric), one array of `kvbench.intervals.RESAMPLES`
means each (None where fewer than two samples leave nothing to resample); the tables average
them into the intervals of their averages (`kvbench.intervals.average_draws`).

The reference of a run's task is the full-cache (``fullkv``) run of the same model that
answered the same prompts: same task, same task data and prompt budget (run.json's task
identity), same max length and dtype. Where several qualify (fullkv runs with other
settings), the one with the most finished samples, then the first by settings, is taken.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from kvbench.intervals import paired_difference_draws, resampled_means

FULL_CACHE = "fullkv"
#: what must agree between a run's task and its full-cache reference: the same prompts, answered alike
REFERENCE_MATCH = ["model", "task", "task_data", "max_length", "dtype"]

Draws = dict[tuple[str, str, str], "np.ndarray | None"]


def _metrics(samples: pd.DataFrame) -> list[str]:
    return [column for column in samples.columns if column not in ("run_dir", "task", "_id")]


def task_draws(samples: pd.DataFrame, seed: int) -> Draws:
    """Bootstrap means of every run's task and metric. Runs of a task with the same samples are stacked into
    one matrix and resampled together (ordered by sample id, so the same resample draws the same samples)."""
    draws: Draws = {}
    for (task,), task_samples in samples.groupby(["task"], sort=False):
        for metric in _metrics(samples):
            scored = task_samples[task_samples[metric].notna()].sort_values(["run_dir", "_id"])
            by_run = {run_dir: group[metric].to_numpy() for run_dir, group in scored.groupby("run_dir", sort=False)}
            by_size: dict[int, list[str]] = {}
            for run_dir, scores in by_run.items():
                by_size.setdefault(len(scores), []).append(run_dir)
            for run_dirs in by_size.values():
                means = resampled_means(np.stack([by_run[run_dir] for run_dir in run_dirs]), f"{task}/{metric}", seed)
                for position, run_dir in enumerate(run_dirs):
                    draws[(run_dir, task, metric)] = None if means is None else means[position]
    return draws


def _reference_rows(frame: pd.DataFrame) -> pd.Series:
    """For each row of ``frame`` (a run's task) that is not itself a full-cache run, the index of its reference
    row; rows without one are left out."""
    keyed = frame.assign(**{column: frame[column].astype("string").fillna("") for column in REFERENCE_MATCH})
    references = (keyed[keyed["method"] == FULL_CACHE]
                  .sort_values(["n_done", "settings"], ascending=[False, True])
                  .drop_duplicates(REFERENCE_MATCH)
                  .reset_index()
                  .rename(columns={"index": "reference"}))
    candidates = keyed[keyed["method"] != FULL_CACHE].reset_index()
    matched = candidates.merge(references[REFERENCE_MATCH + ["reference"]], on=REFERENCE_MATCH)
    return pd.Series(matched["reference"].to_numpy(), index=matched["index"].to_numpy())


def paired_differences(frame: pd.DataFrame, samples: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, Draws]:
    """Every run's difference from its full-cache reference, task by task, on the samples both finished.

    Returns a frame shaped like ``frame`` (one row per run and task that has a reference, with
    the reference's folder in ``reference_dir``) whose ``score`` is the mean over the shared
    samples of (the run's sample score - the reference's), ``n_done`` the number of shared
    samples, ``complete`` whether both tasks are complete; and the differences' draws under the
    "score" metric, so the tables show them as they show scores.
    """
    references = _reference_rows(frame)
    scored = samples[samples["score"].notna()]
    scores = {key: group.set_index("_id")["score"] for key, group in scored.groupby(["run_dir", "task"], sort=False)}
    nothing = pd.Series([], dtype=float)
    records: list[dict[str, Any]] = []
    draws: Draws = {}
    for row_index, reference_index in references.items():
        row, reference = frame.loc[row_index], frame.loc[reference_index]
        ours = scores.get((row["run_dir"], row["task"]), nothing)
        theirs = scores.get((reference["run_dir"], row["task"]), nothing)
        shared = ours.index.intersection(theirs.index).sort_values()
        ours, theirs = ours.loc[shared].to_numpy(), theirs.loc[shared].to_numpy()
        difference = ours - theirs
        draws[(row["run_dir"], row["task"], "score")] = paired_difference_draws(ours, theirs, f"{row['task']}/score",
                                                                                seed)
        records.append({
            **row.to_dict(),
            "reference_dir": reference["run_dir"],
            "score": float(difference.mean()) if len(shared) else math.nan,
            "n_done": len(shared),
            "complete": bool(row["complete"] and reference["complete"]),
            "kept_tokens": math.nan,
            "kv_cache_mb": math.nan,
        })
    differences = pd.DataFrame.from_records(records, columns=[*frame.columns, "reference_dir"])
    # a task's other metrics (buckets, the needle's F1) are not compared: only the score is
    metric_columns = [column for column in _metrics(samples) if column != "score" and column in differences]
    differences[metric_columns] = math.nan
    return differences.astype({column: frame[column].dtype for column in ("capacity", "max_length", "n_total")}), draws
