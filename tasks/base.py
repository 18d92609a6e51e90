"""What the run loop needs from a task (a LongBench dataset, the needle test).

`kvbench.harness.run` is task-agnostic: for each task it asks for the samples,
turns each into prompt token ids with the model's tokenizer, decodes at most
``max_new_tokens`` tokens, post-processes the text, writes one JSONL row (the
fields of ``row_fields`` plus the run's own), and finally asks the task to score
the rows.
"""

from __future__ import annotations

from typing import Any

from kvbench.errors import KvbenchError


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

    def question_part(self, sample: dict[str, Any]) -> str:
        """The end of ``prompt_text(sample)`` from where the question begins: what a question-agnostic run
        (`kvbench run --question-agnostic`) keeps out of compression, to extend the compressed context with.
        A task without this boundary cannot run question-agnostic (`declares_question_part`)."""
        raise KvbenchError(f"task {self.name} declares no context/question boundary; it cannot run --question-agnostic")

    def split_prompt_ids(self, sample: dict[str, Any], tokenizer, max_length: int) -> tuple[list[int], int]:
        """``prompt_ids`` and the index of the question part's first token in them (question-agnostic runs): by
        default found from `question_part`'s text on the final ids (`question_token_start`); a task that builds
        its prompt's ids in parts gives its own split."""
        prompt_ids = self.prompt_ids(sample, tokenizer, max_length)
        return prompt_ids, question_token_start(tokenizer, prompt_ids, self.question_part(sample))

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


def declares_question_part(task: Task) -> bool:
    """Whether ``task`` says where its prompts' question begins (so it can run question-agnostic)."""
    return type(task).question_part is not Task.question_part


def _comparable(text: str) -> str:
    """Text as decoded ids are compared with: no whitespace (decoding may tidy the spaces around punctuation)
    and case-folded (uncased tokenizers decode in lower case)."""
    return "".join(text.split()).casefold()


def question_token_start(tokenizer, prompt_ids: list[int], question_text: str) -> int:
    """Index of the first prompt token of the question part: the last ``k`` such that the tokens from ``k`` on
    still hold all of ``question_text`` (so a token that straddles the boundary goes with the question).

    Found on the final ids (after truncation and chat template) by bisection over decoded suffixes, which
    hold the question for every ``k`` up to the answer and for none beyond (compared as `_comparable` text).
    Refused in one line when the prompt lacks the question (truncation cut into it) or the question is the
    whole prompt (no context left to compress).
    """
    wanted = _comparable(question_text)
    if not wanted:
        raise KvbenchError("the question part of a prompt is empty")

    def holds_question(start: int) -> bool:
        return wanted in _comparable(tokenizer.decode(prompt_ids[start:], skip_special_tokens=False))

    # The question ends the prompt: look back over doubling spans, then bisect inside the first that holds it,
    # so a long prompt costs a few short decodes rather than decodes of the whole prompt.
    length = len(prompt_ids)
    span = 64
    while span < length and not holds_question(length - span):
        span *= 2
    low = max(length - span, 0)  # holds_question(low), once checked below for the whole prompt
    if low == 0 and not holds_question(0):
        raise KvbenchError(f"the prompt ({length} tokens) does not hold its question part whole "
                           f"({question_text[:60]!r}...): truncation cut into it; raise --max-length")
    high = length - 1  # the answer is at most the last token
    while low < high:
        middle = (low + high + 1) // 2
        if holds_question(middle):
            low = middle
        else:
            high = middle - 1
    if low < 2:  # a prefill of one token has nothing to compress (the hook compresses prompts of 2 or more)
        raise KvbenchError(f"the question part is the whole prompt ({len(prompt_ids)} tokens): no context to compress")
    return low
