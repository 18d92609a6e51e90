"""LongBench v1 and LongBench-E: the task table, data loading, prompt building, the Task.

Everything here follows the official THUDM/LongBench v1 code (``pred.py``,
``eval.py``, ``config/dataset2prompt.json``, ``config/dataset2maxlen.json``) so that
scores are comparable with published LongBench numbers.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

from kvbench.errors import KvbenchError
from kvbench.harness.model import kvbench_home
from kvbench.tasks.base import Task

SINGLE_DOC_QA = "single-doc QA"
MULTI_DOC_QA = "multi-doc QA"
SUMMARIZATION = "summarization"
FEW_SHOT = "few-shot"
SYNTHETIC = "synthetic"
CODE = "code"


@dataclass(frozen=True)
class TaskInfo:
    """One LongBench task as the official code runs and scores it."""

    name: str
    #: official prompt; ``{context}`` and ``{input}`` are filled from the sample
    prompt_template: str
    #: official generation budget (config/dataset2maxlen.json)
    max_new_tokens: int
    #: name of the scoring function in `kvbench.tasks.metrics`
    metric: str
    category: str
    #: "en", "zh" or "code"
    language: str
    #: official pred.py sends the prompt without the chat template (few-shot and code tasks)
    raw_prompt: bool
    #: official eval.py scores only the prediction's first line (after leading newlines)
    first_line_only: bool
    #: the task also exists as a LongBench-E dataset ``<name>_e``
    in_longbench_e: bool


# The official prompts, character for character (including their typos, e.g. "asconcisely").
PROMPT_TEMPLATES = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\n"
        "Story: {context}\n\n"
        "Now, answer the question based on the story asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\n"
        "Question: {input}\n\n"
        "Answer:"
    ),
    "qasper": (
        "You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\n"
        "Article: {context}\n\n"
        " Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\n"
        "Question: {input}\n\n"
        "Answer:"
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n"
        "{context}\n\n"
        "Now, answer the following question based on the above text, only give me the answer and do not output any other words.\n\n"
        "Question: {input}\nAnswer:"
    ),
    "multifieldqa_zh": (
        "阅读以下文字并用中文简短回答：\n\n"
        "{context}\n\n"
        "现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n"
        "问题：{input}\n回答："
    ),
    "hotpotqa": (
        "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\n"
        "The following are given passages.\n{context}\n\n"
        "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\n"
        "Question: {input}\nAnswer:"
    ),
    "2wikimqa": (
        "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\n"
        "The following are given passages.\n{context}\n\n"
        "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\n"
        "Question: {input}\nAnswer:"
    ),
    "musique": (
        "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\n"
        "The following are given passages.\n{context}\n\n"
        "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\n"
        "Question: {input}\nAnswer:"
    ),
    "dureader": (
        "请基于给定的文章回答下述问题。\n\n"
        "文章：{context}\n\n"
        "请基于上述文章回答下面的问题。\n\n"
        "问题：{input}\n回答："
    ),
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the report.\n\n"
        "Report:\n{context}\n\n"
        "Now, write a one-page summary of the report.\n\n"
        "Summary:"
    ),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\n"
        "Transcript:\n{context}\n\n"
        "Now, answer the query based on the above meeting transcript in one or more sentences.\n\n"
        "Query: {input}\nAnswer:"
    ),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\n"
        "News:\n{context}\n\n"
        "Now, write a one-page summary of all the news.\n\n"
        "Summary:"
    ),
    "vcsum": (
        "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n"
        "会议总结："
    ),
    "trec": (
        "Please determine the type of the question below. Here are some examples of questions.\n\n"
        "{context}\n{input}"
    ),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n"
        "{context}\n\n"
        "{input}"
    ),
    "samsum": (
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n"
        "{context}\n\n"
        "{input}"
    ),
    "lsht": (
        "请判断给定新闻的类别，下面是一些例子。\n\n"
        "{context}\n{input}"
    ),
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n"
        "{context}\n\n"
        "Please enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\n"
        "The final answer is: "
    ),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n"
        "{context}\n\n"
        "The following is an abstract.\n\n"
        "{input}\n\n"
        "Please enter the number of the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\n"
        "The answer is: "
    ),
    "passage_retrieval_zh": (
        "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n"
        "{context}\n\n"
        "下面是一个摘要\n\n"
        "{input}\n\n"
        "请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式\n\n"
        "答案是："
    ),
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

# One row per task, in the official order (pred.py's dataset list).
_TASK_ROWS = [
    # name                   category       language  metric                  max new  raw    first  LongBench-E
    #                                                                         tokens   prompt line
    ("narrativeqa",          SINGLE_DOC_QA, "en",     "qa_f1_score",          128,     False, False, False),
    ("qasper",               SINGLE_DOC_QA, "en",     "qa_f1_score",          128,     False, False, True),
    ("multifieldqa_en",      SINGLE_DOC_QA, "en",     "qa_f1_score",          64,      False, False, True),
    ("multifieldqa_zh",      SINGLE_DOC_QA, "zh",     "qa_f1_zh_score",       64,      False, False, False),
    ("hotpotqa",             MULTI_DOC_QA,  "en",     "qa_f1_score",          32,      False, False, True),
    ("2wikimqa",             MULTI_DOC_QA,  "en",     "qa_f1_score",          32,      False, False, True),
    ("musique",              MULTI_DOC_QA,  "en",     "qa_f1_score",          32,      False, False, False),
    ("dureader",             MULTI_DOC_QA,  "zh",     "rouge_zh_score",       128,     False, False, False),
    ("gov_report",           SUMMARIZATION, "en",     "rouge_score",          512,     False, False, True),
    ("qmsum",                SUMMARIZATION, "en",     "rouge_score",          512,     False, False, False),
    ("multi_news",           SUMMARIZATION, "en",     "rouge_score",          512,     False, False, True),
    ("vcsum",                SUMMARIZATION, "zh",     "rouge_zh_score",       512,     False, False, False),
    ("trec",                 FEW_SHOT,      "en",     "classification_score", 64,      True,  True,  True),
    ("triviaqa",             FEW_SHOT,      "en",     "qa_f1_score",          32,      True,  True,  True),
    ("samsum",               FEW_SHOT,      "en",     "rouge_score",          128,     True,  True,  True),
    ("lsht",                 FEW_SHOT,      "zh",     "classification_score", 64,      True,  True,  False),
    ("passage_count",        SYNTHETIC,     "en",     "count_score",          32,      False, False, True),
    ("passage_retrieval_en", SYNTHETIC,     "en",     "retrieval_score",      32,      False, False, True),
    ("passage_retrieval_zh", SYNTHETIC,     "zh",     "retrieval_zh_score",   32,      False, False, False),
    ("lcc",                  CODE,          "code",   "code_sim_score",       64,      True,  False, True),
    ("repobench-p",          CODE,          "code",   "code_sim_score",       64,      True,  False, True),
]

TASK_TABLE: dict[str, TaskInfo] = {
    name: TaskInfo(
        name=name,
        prompt_template=PROMPT_TEMPLATES[name],
        max_new_tokens=max_new_tokens,
        metric=metric,
        category=category,
        language=language,
        raw_prompt=raw_prompt,
        first_line_only=first_line_only,
        in_longbench_e=in_longbench_e,
    )
    for name, category, language, metric, max_new_tokens, raw_prompt, first_line_only, in_longbench_e in _TASK_ROWS
}

LONGBENCH_TASKS: list[str] = list(TASK_TABLE)
LONGBENCH_E_TASKS: list[str] = [name for name, info in TASK_TABLE.items() if info.in_longbench_e]

#: LongBench-E length buckets as official eval.py draws them: (label, exclusive upper bound of the sample's ``length``)
LENGTH_BUCKETS: tuple[tuple[str, float], ...] = (("0-4k", 4000), ("4-8k", 8000), ("8k+", math.inf))

LONGBENCH_HUB_REPO = "THUDM/LongBench"
LONGBENCH_HUB_ARCHIVE = "data.zip"

#: fields a LongBench sample must have: the prompt's, the scorer's, and a unique id
SAMPLE_FIELDS = ("_id", "context", "input", "answers", "length")


def resolve_longbench_name(name: str) -> tuple[TaskInfo, bool]:
    """The task of ``name`` ("qasper" or the LongBench-E "qasper_e") and whether it is the LongBench-E variant."""
    if name in TASK_TABLE:
        return TASK_TABLE[name], False
    base_name = name.removesuffix("_e")
    if name.endswith("_e") and base_name in LONGBENCH_E_TASKS:
        return TASK_TABLE[base_name], True
    raise KvbenchError(f"{name!r} is not a LongBench task; LongBench tasks: {', '.join(LONGBENCH_TASKS)} (and <task>_e for {', '.join(LONGBENCH_E_TASKS)})")


def length_bucket(length: int) -> str:
    """The LongBench-E bucket label ("0-4k", "4-8k", "8k+") of a sample's ``length``."""
    return next(label for label, upper_bound in LENGTH_BUCKETS if length < upper_bound)


def first_line(prediction: str) -> str:
    """What official eval.py keeps of a few-shot prediction: the first line after leading newlines."""
    return prediction.lstrip("\n").split("\n")[0]


# --- data ------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; any unreadable line is a KvbenchError naming file and line."""
    try:
        handle = open(path, "rb")
    except OSError as error:
        raise KvbenchError(f"{path}: cannot read ({error.strerror})") from None
    with handle:
        for line_number, raw_line in enumerate(handle, start=1):
            try:
                text = raw_line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise KvbenchError(f"{path}:{line_number}: not UTF-8 text (byte {error.start + 1} of the line)") from None
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as error:
                raise KvbenchError(f"{path}:{line_number}: not valid JSON ({error.msg} at character {error.pos + 1})") from None
            if not isinstance(row, dict):
                raise KvbenchError(f"{path}:{line_number}: expected a JSON object, found {type(row).__name__}")
            yield line_number, row


def load_task_samples(task_name: str, data_dir: str | os.PathLike | None = None, longbench_e: bool = False) -> list[dict[str, Any]]:
    """The samples of one LongBench task, from ``data_dir/<task>[_e].jsonl`` or else the Hugging Face hub."""
    if task_name not in TASK_TABLE:
        raise KvbenchError(f"{task_name!r} is not a LongBench task; LongBench tasks: {', '.join(LONGBENCH_TASKS)}")
    if longbench_e and task_name not in LONGBENCH_E_TASKS:
        raise KvbenchError(f"{task_name} has no LongBench-E variant; LongBench-E tasks: {', '.join(LONGBENCH_E_TASKS)}")
    file_name = f"{task_name}_e.jsonl" if longbench_e else f"{task_name}.jsonl"
    folder = Path(data_dir) if data_dir is not None else _hub_data_folder()
    path = folder / file_name
    if not path.is_file():
        raise KvbenchError(f"{path}: no such file (the data folder must hold <task>.jsonl files as in LongBench's data.zip)")
    samples = []
    seen_ids = set()
    for line_number, sample in read_jsonl(path):
        missing = [field for field in SAMPLE_FIELDS if field not in sample]
        if missing:
            raise KvbenchError(f"{path}:{line_number}: sample lacks {', '.join(missing)}")
        if sample["_id"] in seen_ids:
            raise KvbenchError(f"{path}:{line_number}: _id {sample['_id']!r} appears twice")
        seen_ids.add(sample["_id"])
        samples.append(sample)
    if not samples:
        raise KvbenchError(f"{path}: no samples")
    return samples


def _hub_data_folder() -> Path:
    """The ``data/`` folder of LongBench's data.zip: downloaded to the hub cache, extracted once beside it."""
    try:
        archive = Path(hf_hub_download(LONGBENCH_HUB_REPO, LONGBENCH_HUB_ARCHIVE, repo_type="dataset"))
    except LocalEntryNotFoundError:
        raise KvbenchError(
            f"LongBench is not in the Hugging Face cache and the hub cannot be reached; "
            f"pass --data-dir DIR where DIR holds <task>.jsonl files (the data/ folder of {LONGBENCH_HUB_REPO}'s {LONGBENCH_HUB_ARCHIVE})"
        ) from None
    except HfHubHTTPError as error:
        reason = str(error).splitlines()[0]
        raise KvbenchError(f"cannot download {LONGBENCH_HUB_REPO}/{LONGBENCH_HUB_ARCHIVE} ({reason}); pass --data-dir DIR with <task>.jsonl files") from None
    # The hub caches the archive under snapshots/<revision>/, so the revision names the extraction.
    extracted = kvbench_home() / "longbench" / archive.parent.name
    _extract_once(archive, extracted)
    return extracted / "data"


def _extract_once(archive: Path, target: Path) -> None:
    """Unzip ``archive`` into ``target`` unless done before; a half-finished extraction is never visible."""
    if target.is_dir():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".extracting-", dir=target.parent))
    try:
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(staging)
        try:
            staging.rename(target)
        except OSError:
            # Another process finished the same extraction first; theirs is as good as ours.
            if not target.is_dir():
                raise
    except zipfile.BadZipFile:
        raise KvbenchError(f"{archive}: not a readable zip archive; delete it so that it is downloaded again") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --- prompts ---------------------------------------------------------------------------------


def fill_template(info: TaskInfo, sample: dict[str, Any]) -> str:
    """The task's official prompt with the sample's fields filled in."""
    try:
        return info.prompt_template.format(**sample)
    except KeyError as error:
        raise KvbenchError(f"{info.name} sample {sample.get('_id', '?')!r} has no field {error.args[0]!r}") from None


def truncate_middle(tokenizer, text: str, max_length: int) -> str:
    """``text`` cut to its first and last ``max_length // 2`` tokens, as official pred.py does.

    The tokens are counted as pred.py counts them (with the tokenizer's special tokens)
    and the halves are decoded without special tokens and joined with nothing between.
    """
    if max_length < 2:
        raise KvbenchError(f"max_length must be at least 2 tokens, got {max_length}")
    token_ids = tokenizer(text, truncation=False)["input_ids"]
    if len(token_ids) <= max_length:
        return text
    half = max_length // 2
    head = tokenizer.decode(token_ids[:half], skip_special_tokens=True)
    tail = tokenizer.decode(token_ids[-half:], skip_special_tokens=True)
    return head + tail


def build_prompt_ids(info: TaskInfo, sample: dict[str, Any], tokenizer, max_length: int) -> list[int]:
    """Token ids of the prompt the model reads: filled, middle-truncated, in the chat template where official code uses one."""
    prompt = truncate_middle(tokenizer, fill_template(info, sample), max_length)
    if info.raw_prompt or not getattr(tokenizer, "chat_template", None):
        return list(tokenizer(prompt)["input_ids"])
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])


# --- the task --------------------------------------------------------------------------------


class LongBenchTask(Task):
    """One LongBench dataset ("qasper") or its LongBench-E variant ("qasper_e")."""

    def __init__(self, name: str):
        self.info, self.longbench_e = resolve_longbench_name(name)
        self.name = name
        self.category = self.info.category
        self.max_new_tokens = self.info.max_new_tokens

    def load_samples(self, data_dir: str | None) -> list[dict[str, Any]]:
        return load_task_samples(self.info.name, data_dir, longbench_e=self.longbench_e)

    def prompt_text(self, sample: dict[str, Any]) -> str:
        return fill_template(self.info, sample)

    def prompt_ids(self, sample: dict[str, Any], tokenizer, max_length: int) -> list[int]:
        return build_prompt_ids(self.info, sample, tokenizer, max_length)

    def stop_token_ids(self, tokenizer) -> set[int]:
        # Official pred.py ends samsum generation at the first newline token as well as at EOS.
        if self.info.name == "samsum":
            return {tokenizer.encode("\n", add_special_tokens=False)[-1]}
        return set()

    def postprocess(self, prediction: str) -> str:
        return first_line(prediction) if self.info.first_line_only else prediction

    def row_fields(self, sample: dict[str, Any]) -> dict[str, Any]:
        return {
            "answers": sample["answers"],
            "all_classes": sample.get("all_classes"),
            "length": sample["length"],
            "language": self.info.language,
        }

    def score(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        # Imported here because kvbench.tasks.evaluate imports this module's table.
        from kvbench.tasks.evaluate import score_rows

        return score_rows(self.name, rows, longbench_e=self.longbench_e)
