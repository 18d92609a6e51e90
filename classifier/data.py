"""Training data for the task classifier: LongBench prompts labelled by their task's category.

The reference ships neither weights nor training data. We label every LongBench
prompt (the official template filled with the sample, what WindowKV's classifier
reads at run time) by its task's category: single- and multi-doc QA are "qa"
(information localisation), summarization, few-shot, synthetic and code are
"other" (aggregation).
"""

from __future__ import annotations

import os
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kvbench.classifier.model import LABELS
from kvbench.errors import KvbenchError
from kvbench.tasks.longbench import fill_template, load_task_samples
from kvbench.tasks.longbench_spec import (CODE, FEW_SHOT, MULTI_DOC_QA, SINGLE_DOC_QA, SUMMARIZATION, SYNTHETIC,
                                          TASK_TABLE)

CATEGORY_LABELS = {
    SINGLE_DOC_QA: LABELS.index("qa"),
    MULTI_DOC_QA: LABELS.index("qa"),
    SUMMARIZATION: LABELS.index("other"),
    FEW_SHOT: LABELS.index("other"),
    SYNTHETIC: LABELS.index("other"),
    CODE: LABELS.index("other"),
}
#: --held-out-tasks keywords besides a comma list of task names
HELD_OUT_TASK_CHOICES = ("per-category", "all", "none")


def label_of_category(category: str) -> int:
    """Label index (0 = qa, 1 = other) of a LongBench category."""
    try:
        return CATEGORY_LABELS[category]
    except KeyError:
        raise KvbenchError(f"category {category!r} has no classifier label; known: {', '.join(CATEGORY_LABELS)}") from None


@dataclass(frozen=True)
class LabelledPrompt:
    task: str
    sample_id: str
    text: str
    label: int


def parse_task_names(task_list: str | None) -> list[str] | None:
    """The tasks of a comma list, each checked against the task table (None stays None: every task)."""
    if task_list is None:
        return None
    names = [name.strip() for name in task_list.split(",") if name.strip()]
    if not names:
        raise KvbenchError("--tasks is empty")
    unknown = [name for name in names if name not in TASK_TABLE]
    if unknown:
        raise KvbenchError(f"--tasks: {', '.join(unknown)} not LongBench task(s); known: {', '.join(TASK_TABLE)}")
    return names


def load_labelled_prompts(data_dirs: Sequence[str | os.PathLike], task_names: Sequence[str] | None = None,
                          max_samples_per_task: int | None = None, seed: int = 0) -> list[LabelledPrompt]:
    """Labelled prompts from the folders' ``<task>.jsonl`` files, or from the hub when no folder is given.

    ``task_names`` None means every LongBench task the folders hold (all 21 from the
    hub); a list of names must each be found. A task may appear in several folders
    (e.g. longbench-mini and the full longbench): its samples are merged and a
    prompt seen twice counts once. Duplicates are found by prompt text, not
    ``_id``: longbench-mini's samples are copies of full LongBench samples under
    other ids, and a copy on each side of the held-out split would inflate the
    held-out accuracy. ``max_samples_per_task`` keeps a seeded random subset of each task.
    """
    requested = list(task_names) if task_names is not None else list(TASK_TABLE)
    prompts_by_task: dict[str, dict[str, LabelledPrompt]] = defaultdict(dict)

    def add_samples(name: str, samples: list[dict]) -> None:
        info = TASK_TABLE[name]
        label = label_of_category(info.category)
        for sample in samples:
            text = fill_template(info, sample)
            prompts_by_task[name].setdefault(text, LabelledPrompt(name, str(sample["_id"]), text, label))

    if data_dirs:
        for data_dir in data_dirs:
            folder = Path(data_dir)
            if not folder.is_dir():
                raise KvbenchError(f"--data-dir {folder}: no such folder")
            present = [name for name in requested if (folder / f"{name}.jsonl").is_file()]
            if not present:
                raise KvbenchError(f"--data-dir {folder}: no <task>.jsonl file of the requested LongBench tasks")
            for name in present:
                add_samples(name, load_task_samples(name, folder))
        absent = [name for name in requested if name not in prompts_by_task]
        if task_names is not None and absent:
            raise KvbenchError(f"no <task>.jsonl for {', '.join(absent)} in {', '.join(map(str, data_dirs))}")
    else:
        for name in requested:
            add_samples(name, load_task_samples(name))

    rng = random.Random(seed)
    prompts = []
    for name in requested:
        task_prompts = list(prompts_by_task.get(name, {}).values())
        if max_samples_per_task is not None and len(task_prompts) > max_samples_per_task:
            task_prompts = rng.sample(task_prompts, max_samples_per_task)
        prompts.extend(task_prompts)
    if not prompts:
        raise KvbenchError("no samples to train on")
    return prompts


def split_held_out(prompts: Sequence[LabelledPrompt], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) indices, stratified by task (hence by label): each task gives ``fraction`` of its samples.

    A task with a single sample stays in training. The held-out share of a task is
    rounded, but at least one sample once the task has two.
    """
    if not 0 < fraction < 1:
        raise KvbenchError(f"--held-out-fraction must be between 0 and 1, got {fraction}")
    indices_by_task: dict[str, list[int]] = defaultdict(list)
    for index, prompt in enumerate(prompts):
        indices_by_task[prompt.task].append(index)
    rng = random.Random(seed)
    train, held_out = [], []
    for indices in indices_by_task.values():
        shuffled = rng.sample(indices, len(indices))
        count = min(max(1, round(fraction * len(shuffled))), len(shuffled) - 1)
        held_out.extend(shuffled[:count])
        train.extend(shuffled[count:])
    if not held_out:
        raise KvbenchError("too few samples for a held-out split (every task has a single sample)")
    return sorted(train), sorted(held_out)


def choose_held_out_tasks(choice: str, prompts: Sequence[LabelledPrompt]) -> list[str]:
    """Tasks to hold out whole, one at a time: "per-category" (the first task of each category, in
    LongBench's order), "all", "none", or a comma list of task names present in the data."""
    present = [name for name in TASK_TABLE if any(prompt.task == name for prompt in prompts)]
    if choice == "none":
        return []
    if choice == "all":
        return present
    if choice == "per-category":
        first_of_category: dict[str, str] = {}
        for name in present:
            first_of_category.setdefault(TASK_TABLE[name].category, name)
        return list(first_of_category.values())
    names = [name.strip() for name in choice.split(",") if name.strip()]
    absent = [name for name in names if name not in present]
    if not names or absent:
        raise KvbenchError(f"--held-out-tasks {choice!r}: expected {', '.join(HELD_OUT_TASK_CHOICES)} or a comma list "
                           f"of tasks in the data ({', '.join(present)})")
    return names
