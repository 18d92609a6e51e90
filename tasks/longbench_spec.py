"""LongBench v1 and LongBench-E as the official code defines them: the task table and its small rules.

Everything here follows the official THUDM/LongBench v1 code (``pred.py``,
``eval.py``, ``config/dataset2prompt.json``, ``config/dataset2maxlen.json``) so that
scores are comparable with published LongBench numbers. Data loading and prompt
building are in `kvbench.tasks.longbench`, the metrics in `kvbench.tasks.metrics`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvbench.errors import KvbenchError, unknown_name_message

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

    @property
    def question_template(self) -> str:
        """The end of the prompt template a question-agnostic run keeps out of compression: from the start of
        the line holding the question field ``{input}`` (its label, "Question: ", goes with it; never before
        the end of ``{context}``) to the end, answer prefix included. Templates without a question field
        (summaries, passage_count, lcc) end with a request after the document ("Now, write a one-page
        summary...", "Next line of code:"): that request is their question part."""
        template = self.prompt_template
        context_end = template.index("{context}") + len("{context}")
        if "{input}" not in template:
            return template[context_end:]
        line_start = template.rfind("\n", 0, template.index("{input}")) + 1
        return template[max(context_end, line_start):]


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


def resolve_longbench_name(name: str) -> tuple[TaskInfo, bool]:
    """The task of ``name`` ("qasper" or the LongBench-E "qasper_e") and whether it is the LongBench-E variant."""
    if name in TASK_TABLE:
        return TASK_TABLE[name], False
    base_name = name.removesuffix("_e")
    if name.endswith("_e") and base_name in LONGBENCH_E_TASKS:
        return TASK_TABLE[base_name], True
    known = LONGBENCH_TASKS + [f"{task}_e" for task in LONGBENCH_E_TASKS]
    raise KvbenchError(unknown_name_message("LongBench task", name, known))


def length_bucket(length: int) -> str:
    """The LongBench-E bucket label ("0-4k", "4-8k", "8k+") of a sample's ``length``."""
    return next(label for label, upper_bound in LENGTH_BUCKETS if length < upper_bound)


def first_line(prediction: str) -> str:
    """What official eval.py keeps of a few-shot prediction: the first line after leading newlines."""
    return prediction.lstrip("\n").split("\n")[0]


