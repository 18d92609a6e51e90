"""What the run loop needs from a task (a LongBench dataset, the needle test).

`kvbench.harness.run` is task-agnostic: for each task it asks for the samples,
turns each into prompt token ids with the model's tokenizer, decodes at most
``max_new_tokens`` tokens, post-processes the text, writes one JSONL row (the
fields of ``row_fields`` plus the run's own), and finally asks the task to score
the rows.
"""

from __future__ import annotations

from typing import Any


class Task:
    """Base class of a benchmark task; subclasses fill in every method."""

    #: task name, also the stem of its `<name>.jsonl` result file
    name: str
    #: LongBench category ("single-doc QA", ...) or "needle"
    category: str
    #: generation budget in tokens
    max_new_tokens: int
    #: whether prompts are cut to the run's maximum prompt length (so that length can change a row)
    truncates_prompts: bool = False
    #: whether a run of several tasks may go on without this one when its data cannot be had (offline hub):
    #: `load_samples` then raises `kvbench.errors.TaskDataUnavailable`
    data_may_be_missing: bool = False

    def load_samples(self, data_dir: str | None) -> list[dict[str, Any]]:
        """All samples of the task, each a dict with a unique string ``_id``."""
        raise NotImplementedError

    def identity(self, data_dir: str | None) -> dict[str, Any]:
        """What this task's rows depend on besides the model and the method: a digest of its data and its
        fixed options. A run folder refuses a rerun whose identity differs (see `kvbench.runfolder`)."""
        raise NotImplementedError

    def prompt_text(self, sample: dict[str, Any]) -> str:
        """The formatted prompt before truncation and chat template (what WindowKV's classifier reads)."""
        raise NotImplementedError

    def prompt_ids(self, sample: dict[str, Any], tokenizer, max_length: int) -> list[int]:
        """Token ids of the final prompt (truncated to max_length, chat template applied where due)."""
        raise NotImplementedError

    def stop_token_ids(self, tokenizer) -> set[int]:
        """Token ids that end generation for this task besides the model's EOS."""
        return set()

    def postprocess(self, prediction: str) -> str:
        """The prediction as the scorer wants it (e.g. first line only)."""
        return prediction

    def validate_for_model(self, max_context_tokens: int) -> None:
        """Refuse, before any model work, settings the model's context window cannot hold."""

    def settings(self) -> dict[str, Any]:
        """Task options recorded in the run's `run.json` (e.g. the needle grid); unlike ``identity``, they may
        change between reruns of a folder, as ``--limit`` may (they choose samples, not how a row is made)."""
        return {}

    def score_row(self, row: dict[str, Any]) -> dict[str, Any]:
        """Per-sample scores stored in the result row beside the prediction (none by default)."""
        return {}

    def row_fields(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Sample fields copied into the result row (answers, all_classes, length, ...)."""
        raise NotImplementedError

    def score(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Scores of finished result rows: at least {"score": float}, 0-100."""
        raise NotImplementedError

    def score_with_samples(self, rows: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, float]]]:
        """`score`, and each row's own scores (0-100): a metric's mean over the rows that have it is `score`'s
        value of that name (before any official rounding). What the report's bootstrap intervals resample."""
        raise NotImplementedError
