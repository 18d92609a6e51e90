"""LongBench's scoring functions, with the semantics of the official ``metrics.py`` and ``eval.py``.

Each metric compares one prediction with one gold answer and returns 0-1; the
official names are kept so that a row of the task table (``TaskInfo.metric``)
names its function here. ``score_prediction`` adds what eval.py does around the
metrics: the first-line cut of few-shot predictions and the max over answers.

The official code's quirks are kept on purpose, since published numbers carry
them; each is noted where it happens.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import functools
import logging
import re
import string
import sys
from collections import Counter
from collections.abc import Callable, Sequence

from rouge import Rouge

from kvbench.errors import KvbenchError
from kvbench.tasks.longbench_spec import first_line, resolve_longbench_name



@functools.cache
def _jieba():
    """jieba, imported when a Chinese answer is first scored (it is only needed there)."""
    import jieba

    # jieba logs its dictionary loading to stderr; keep `kvbench eval`'s output to the table.
    jieba.setLogLevel(logging.WARNING)
    return jieba

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ENGLISH_PUNCTUATION = set(string.punctuation)
# The official list of Chinese punctuation, as it is (it has "》" but not "《").
_CHINESE_PUNCTUATION = set(
    string.punctuation
    + "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)


def normalize_answer(text: str) -> str:
    """English answer normalisation (SQuAD style): lower case, no punctuation, no articles, single spaces."""
    text = "".join(char for char in text.lower() if char not in _ENGLISH_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh_answer(text: str) -> str:
    """Chinese answer normalisation: lower case, no Chinese or English punctuation, no whitespace."""
    return "".join("".join(char for char in text.lower() if char not in _CHINESE_PUNCTUATION).split())


def _token_f1(prediction_tokens: Sequence[str], ground_truth_tokens: Sequence[str]) -> float:
    """F1 of the multiset overlap of two token lists (0 when nothing overlaps)."""
    overlap = sum((Counter(prediction_tokens) & Counter(ground_truth_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(prediction_tokens)
    recall = overlap / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str) -> float:
    """Token F1 of the normalised English answers."""
    return _token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def _chinese_tokens(text: str) -> list[str]:
    """jieba words, each normalised, punctuation-only words dropped."""
    return [token for token in (normalize_zh_answer(word) for word in _jieba().cut(text, cut_all=False)) if token]


def qa_f1_zh_score(prediction: str, ground_truth: str) -> float:
    """Token F1 over jieba words of the Chinese answers."""
    return _token_f1(_chinese_tokens(prediction), _chinese_tokens(ground_truth))


# The `rouge` package reconstructs each longest common subsequence recursively, so a long
# sentence pair overflows Python's recursion limit, and the official scorer's bare `except`
# turns that into a score of 0. Where that happens depends on how deep the stack already is:
# inside official eval.py (run as `python eval.py`, CPython 3.11) this many further nested
# calls fit at the moment rouge is called from `rouge_score`, and one fewer from
# `rouge_zh_score`, which calls `rouge_score`. Measured with `_stack_headroom` placed there.
_OFFICIAL_ROUGE_HEADROOM = 996
_OFFICIAL_ROUGE_ZH_HEADROOM = _OFFICIAL_ROUGE_HEADROOM - 1


def _stack_headroom(depth: int = 0) -> int:
    """How many more nested Python calls fit here before RecursionError, found by trying."""
    try:
        return _stack_headroom(depth + 1)
    except RecursionError:
        return depth


def _rouge_l_f(prediction: str, ground_truth: str, official_headroom: int) -> float:
    """ROUGE-L F of the `rouge` package, 0 wherever the official scorer gets an exception.

    The recursion limit is shifted for the call so that rouge has exactly the stack
    headroom it has in official eval.py, whatever the depth of our caller; a sentence
    pair then overflows (and scores 0) here exactly when it does there.
    """
    recursion_limit = sys.getrecursionlimit()
    sys.setrecursionlimit(recursion_limit + official_headroom - _stack_headroom())
    try:
        scores = Rouge().get_scores([prediction], [ground_truth], avg=True)
    except Exception:  # official: empty hypothesis or reference (ValueError), recursion overflow, ...
        return 0.0
    finally:
        sys.setrecursionlimit(recursion_limit)
    return scores["rouge-l"]["f"]


def rouge_score(prediction: str, ground_truth: str) -> float:
    """ROUGE-L F (summary level, `rouge` package); 0 for an empty prediction and where rouge fails."""
    return _rouge_l_f(prediction, ground_truth, _OFFICIAL_ROUGE_HEADROOM)


def rouge_zh_score(prediction: str, ground_truth: str) -> float:
    """ROUGE-L F over jieba words joined by spaces."""
    return _rouge_l_f(
        " ".join(_jieba().cut(prediction, cut_all=False)),
        " ".join(_jieba().cut(ground_truth, cut_all=False)),
        _OFFICIAL_ROUGE_ZH_HEADROOM,
    )


def classification_score(prediction: str, ground_truth: str, all_classes: Sequence[str]) -> float:
    """1/k when the gold class is among the k class names found in the prediction, else 0.

    Class names that are part of the gold class (but not it) are dropped from the
    matches first. The official code drops them from the list it is iterating over,
    which skips the match right after each one dropped; that walk is reproduced here.
    """
    matches = [class_name for class_name in all_classes if class_name in prediction]
    index = 0
    while index < len(matches):
        match = matches[index]
        if match in ground_truth and match != ground_truth:
            matches.remove(match)
        index += 1
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def _share_of_numbers_equal_to(prediction: str, wanted: str) -> float:
    """The fraction of the digit runs in the prediction that equal ``wanted`` (0 when it has none)."""
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(number == wanted for number in numbers) / len(numbers)


def _paragraph_number(ground_truth: str, pattern: str) -> str:
    found = re.findall(pattern, ground_truth)
    if not found:
        raise KvbenchError(f"gold answer {ground_truth!r} names no paragraph (expected {pattern!r})")
    return found[0]


def retrieval_score(prediction: str, ground_truth: str) -> float:
    """Share of the numbers in the prediction that are the gold paragraph's ("Paragraph 12")."""
    return _share_of_numbers_equal_to(prediction, _paragraph_number(ground_truth, r"Paragraph (\d+)"))


def retrieval_zh_score(prediction: str, ground_truth: str) -> float:
    """Share of the numbers in the prediction that are the gold paragraph's ("段落12")."""
    return _share_of_numbers_equal_to(prediction, _paragraph_number(ground_truth, r"段落(\d+)"))


def count_score(prediction: str, ground_truth: str) -> float:
    """Share of the numbers in the prediction that are the gold count."""
    return _share_of_numbers_equal_to(prediction, str(ground_truth))


# fuzzywuzzy's `fuzz.ratio`, which official metrics.py calls, runs on whichever matcher is installed:
# python-Levenshtein's ratio when that package is there, difflib's pure-Python SequenceMatcher
# otherwise. The two disagree on some pairs (1.3-1.4 points on lcc and repobench-p), and the
# published numbers of KVCache-Factory, PyramidKV and WindowKV come from installs with
# python-Levenshtein. The matcher is therefore chosen explicitly (`--code-sim-matcher`, default
# levenshtein) and recorded with every score.
CODE_SIM_MATCHERS = ("levenshtein", "difflib")
_code_sim_matcher = contextvars.ContextVar("code_sim_matcher", default=CODE_SIM_MATCHERS[0])


@contextlib.contextmanager
def using_code_sim_matcher(matcher: str):
    """Score code with ``matcher`` ("levenshtein" or "difflib") inside the block."""
    if matcher not in CODE_SIM_MATCHERS:
        raise KvbenchError(f"--code-sim-matcher must be one of {', '.join(CODE_SIM_MATCHERS)}, got {matcher!r}")
    token = _code_sim_matcher.set(matcher)
    try:
        yield
    finally:
        _code_sim_matcher.reset(token)


def scorer_settings() -> dict[str, str]:
    """The scorer's choices that can change a score: recorded with every run (`kvbench eval` prints the matcher)."""
    return {"code_sim_matcher": _code_sim_matcher.get()}


def fuzz_ratio(first: str, second: str, matcher: str) -> int:
    """fuzzywuzzy's ``fuzz.ratio`` (0-100) on the chosen matcher: 100 for equal strings, 0 when one is
    empty, else the matcher's similarity x 100 rounded to the nearest integer."""
    if first == second:
        return 100
    if not first or not second:
        return 0
    if matcher == "levenshtein":
        import Levenshtein

        similarity = Levenshtein.ratio(first, second)
    else:
        similarity = difflib.SequenceMatcher(None, first, second).ratio()
    return int(round(100 * similarity))


def code_sim_score(prediction: str, ground_truth: str) -> float:
    """fuzzywuzzy ratio (0-1, in hundredths) of the first code line of the prediction and the gold line.

    The first code line is the first line (after leading newlines) with no backtick,
    "#" or "//" — so a line holding a URL or a "#" inside a string is skipped too.
    """
    code_lines = (line for line in prediction.lstrip("\n").split("\n") if not any(mark in line for mark in ("`", "#", "//")))
    return fuzz_ratio(next(code_lines, ""), ground_truth, _code_sim_matcher.get()) / 100


METRICS: dict[str, Callable[..., float]] = {
    metric.__name__: metric
    for metric in (
        qa_f1_score,
        qa_f1_zh_score,
        rouge_score,
        rouge_zh_score,
        classification_score,
        retrieval_score,
        retrieval_zh_score,
        count_score,
        code_sim_score,
    )
}


def score_prediction(task: str, prediction: str, answers: Sequence[str], all_classes: Sequence[str] | None) -> float:
    """One sample's score (0-1) as official eval.py computes it: the best over the gold answers.

    ``task`` is a LongBench task name ("trec" or "trec_e"); ``all_classes`` is only
    read by the classification tasks (trec, lsht).
    """
    info, _ = resolve_longbench_name(task)
    if info.first_line_only:
        prediction = first_line(prediction)
    metric = METRICS[info.metric]
    if metric is classification_score:
        if not isinstance(all_classes, (list, tuple)):
            raise KvbenchError(f"{task} is scored against its class names, but all_classes is {all_classes!r}")
        metric = functools.partial(classification_score, all_classes=all_classes)
    best = 0.0
    for answer in answers:
        best = max(best, metric(prediction, answer))
    return best
