"""The run loop: every sample of every task through one method, one JSONL row per sample.

How a run goes, and why in this order (`kvbench run` refuses anything it can before the
weights load):

1. `RunPlan` (tasks, data, limit, max length, output folder) and the method are built and
   validated from the command line; the model's config alone (no weights) gives its
   layer count and context window, and ``method.prepare`` checks the method against it
   and loads the method's own files (classifier, profiles).
2. `open_run` loads and checks every planned sample, works out the run's identity
   (every setting that can change a row, see `run_identity`), takes the folder's lock,
   and compares the identity with the folder's ``run.json``: a difference is refused in
   one line naming it, so rows made under different settings never mix.
3. The weights load; ``run.json`` is written; `execute_runs` appends a row per finished
   sample (flushed and fsynced), skipping the ``_id``s already there, so a crash or a
   kill loses at most the samples in flight and a rerun resumes; ``scores.json`` is
   written at the end.

A grid (several run folders over the same plan) runs as one stream: each sample is
prefilled once for the folders that still lack it, and each folder's row lands in that
folder as soon as its configuration finishes decoding (`kvbench.engine.generate`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvbench.console import progress_bar
from kvbench.errors import KvbenchError
from kvbench.engine.generate import Generation, eos_token_ids, generate_stream
from kvbench.engine.prefill import DecodeRequest, prefill_kernels
from kvbench.harness.model import LoadedModel, ModelDescription
from kvbench.harness.parallel import World, barrier, main_decides, shard, total_over_processes
from kvbench.methods.base import Compressor, Method
from kvbench.paths import default_output_dir
from kvbench.runfolder import (
    RUN_FILE,
    SCORES_FILE,
    RunLock,
    append_row,
    check_writable_folder,
    identity_differences,
    read_finished_rows,
    read_json,
    read_rows_for_resume,
    result_path,
    run_dir_for,
    run_label,
    write_json,
)
from kvbench.tasks.base import Task, declares_question_part
from kvbench.tasks.metrics import scorer_settings

#: version of what run.json records; a folder written under another version is refused, never mixed
RUN_FORMAT = 2


@dataclass
class RunPlan:
    tasks: list[Task]
    data_dir: str | None = None
    limit: int | None = None
    max_length: int | None = None
    output_dir: Path = field(default_factory=default_output_dir)
    #: decode with the batch-invariant kernels (`kvbench.engine.invariant`), resolved for the device
    batch_invariant: bool = False
    #: compress each prompt's context without its question, which then extends the compressed cache whole
    question_agnostic: bool = False


#: the folder name's last part for a question-agnostic run
QUESTION_AGNOSTIC_LABEL = "question-agnostic"


def method_label(method: Method, question_agnostic: bool = False) -> str:
    """Folder name of a run: the method, its budget, every option set away from its default, and whether the
    context was compressed without the question."""
    budget = method.budget
    parts = [method.name] + ([str(budget)] if budget is not None else []) + (
        [QUESTION_AGNOSTIC_LABEL] if question_agnostic else [])
    return run_label(parts, method.non_default_options())


def max_prompt_length(context_window: int, task: Task, requested: int | None) -> int:
    """Prompt budget: --max-length, else the model's context window minus the task's generation length."""
    if requested is not None:
        if requested <= 0:
            raise KvbenchError(f"--max-length must be > 0, got {requested}")
        return requested
    if context_window <= task.max_new_tokens:
        raise KvbenchError(
            f"cannot derive --max-length: the model's context window ({context_window}) is not larger than "
            f"{task.name}'s generation length ({task.max_new_tokens}); pass --max-length"
        )
    return context_window - task.max_new_tokens


def sample_request(task: Task, sample: dict[str, Any], tokenizer, prompt_budget: int, stop_ids: set[int],
                   tag: Any = None, question_agnostic: bool = False) -> DecodeRequest:
    """A sample as the engine generates it: the task's prompt within ``prompt_budget`` tokens, the task's
    generation length, and what the method may read of the sample (its fields, task and prompt text).

    Question-agnostic, the request also says where the question's tokens begin, and the method's prompt
    text is the context alone (WindowKV's classifier reads it; no method reads the sample's other fields).
    """
    question_start = None
    if question_agnostic:
        prompt_ids, question_start = task.split_prompt_ids(sample, tokenizer, prompt_budget)
    else:
        prompt_ids = task.prompt_ids(sample, tokenizer, prompt_budget)
    prompt_text = task.prompt_text(sample)  # after the ids: a task may build its text with them (the needle, RULER)
    if question_agnostic:
        question = task.question_part(sample)
        if not prompt_text.endswith(question):
            raise KvbenchError(f"{task.name} sample {sample['_id']}: its question part does not end its prompt text")
        prompt_text = prompt_text[: len(prompt_text) - len(question)]
    method_view = {**sample, "task": task.name, "prompt_text": prompt_text}
    return DecodeRequest(prompt_ids, task.max_new_tokens, stop_ids, method_view, tag=tag, question_start=question_start)


def context_limit(context_window: int, task: Task, requested_max_length: int | None) -> int:
    """Tokens a prompt plus its answer may span: the model's window, or less under --max-length."""
    if requested_max_length is None:
        return context_window
    limit = requested_max_length + task.max_new_tokens
    return min(limit, context_window) if context_window else limit


def summarize(values: list[int]) -> dict[str, float]:
    return {"mean": round(sum(values) / len(values), 2), "min": min(values), "max": max(values)}


def run_identity(model: ModelDescription, method: Method, compressor: Compressor, plan: RunPlan) -> dict[str, Any]:
    """Every setting that can change a row, besides each task's own (its data, and for tasks that truncate
    prompts the prompt budget ``--max-length`` resolves to: see `open_run`).

    Not part of it, because they never change a row: the device and the batch of
    decoding (bf16 rounding aside, which batch-invariant decoding removes, see the README),
    ``--limit`` and the needle grid (they choose samples), the data folder's path (its content
    is what counts). Batch-invariant decoding rounds otherwise than the plain kernels, so it is
    part of it, as ``"batch_invariant": true``; the plain path adds nothing, so folders written
    before the mode existed (all CPU runs, CUDA runs with --no-batch-invariant) keep matching.
    ``question_agnostic`` is recorded only when set, so folders of question-aware runs
    written before it existed still resume.
    """
    return {
        "format": RUN_FORMAT,
        "model": {"name": model.name, **model.identity},
        "dtype": model.dtype,
        "attention": model.attention,
        "method": method.name,
        "options": method.options(),
        "method_files": compressor.identity(),
        "scorer": scorer_settings(),
        **({"batch_invariant": True} if plan.batch_invariant else {}),
        **({"question_agnostic": True} if plan.question_agnostic else {}),
    }


@dataclass
class OpenRun:
    """A run folder checked against the plan and locked for this process (see `open_run`)."""

    run_dir: Path
    method: Method
    compressor: Compressor
    plan: RunPlan
    identity: dict[str, Any]
    task_identity: dict[str, dict[str, Any]]
    samples_by_task: dict[str, list[dict[str, Any]]]
    previous: dict[str, Any]
    #: held by the process that checked the folder (process 0 of a data-parallel launch)
    lock: RunLock | None
    world: World = World()

    def close(self) -> None:
        if self.lock is not None:
            self.lock.__exit__(None, None, None)

    def __enter__(self) -> OpenRun:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def open_run(model: ModelDescription, method: Method, compressor: Compressor, plan: RunPlan,
             world: World = World()) -> OpenRun:
    """Load and check the planned samples, lock the run folder and check its recorded identity.

    Every refusal happens here, before the weights load and before anything is written
    but the lock file. In a data-parallel launch process 0 locks and checks the folder and
    the others take its verdict (`kvbench.harness.parallel`).
    """
    samples_by_task = {}
    task_identity = {}
    if plan.question_agnostic:
        without = [task.name for task in plan.tasks if not declares_question_part(task)]
        if without:
            raise KvbenchError(f"--question-agnostic: {', '.join(without)} declares no context/question boundary")
    for task in plan.tasks:
        task.validate_for_model(context_limit(model.context_window, task, plan.max_length))
        prompt_budget = max_prompt_length(model.context_window, task, plan.max_length)
        samples = task.load_samples(plan.data_dir)
        samples_by_task[task.name] = samples[: plan.limit] if plan.limit is not None else samples
        task_identity[task.name] = task.identity(plan.data_dir)
        if task.truncates_prompts:
            # the budget as resolved (--max-length, or the window minus the generation length)
            task_identity[task.name]["max_prompt_tokens"] = prompt_budget
    identity = run_identity(model, method, compressor, plan)
    run_dir = run_dir_for(plan.output_dir, model.name, method_label(method, plan.question_agnostic))
    lock: RunLock | None = None

    def lock_and_check() -> dict[str, Any]:
        nonlocal lock
        check_writable_folder(plan.output_dir, "--output")
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise KvbenchError(f"--output {plan.output_dir}: cannot create {run_dir} ({error.strerror or error})") from None
        for task in plan.tasks:
            path = result_path(run_dir, task.name)
            if path.is_dir():
                raise KvbenchError(f"{path}: is a folder, expected the task's result file")
            if path.exists() and not os.access(path, os.W_OK):
                raise KvbenchError(f"{path}: cannot be written (read-only); its rows stay as they are")
        lock = RunLock(run_dir).__enter__()
        try:
            previous = read_json(run_dir / RUN_FILE) if (run_dir / RUN_FILE).exists() else {}
            _check_identity(run_dir, previous, identity, task_identity)
        except BaseException:
            lock.__exit__(None, None, None)
            raise
        return previous

    previous = main_decides(world, lock_and_check)
    return OpenRun(run_dir, method, compressor, plan, identity, task_identity, samples_by_task, previous, lock, world)


def _check_identity(run_dir: Path, previous: dict[str, Any], identity: dict[str, Any],
                    task_identity: dict[str, dict[str, Any]]) -> None:
    """Refuse a folder whose rows were made under other settings, naming the first differences."""
    if not previous:
        if any(run_dir.glob("*.jsonl")):
            raise KvbenchError(f"{run_dir}: holds result files but no {RUN_FILE}, so their settings are unknown; "
                               "move them away or use another --output")
        return
    recorded = previous.get("identity")
    if not isinstance(recorded, dict) or recorded.get("format") != RUN_FORMAT:
        raise KvbenchError(f"{run_dir / RUN_FILE}: written by another kvbench version, without the settings this "
                           "version checks; use another --output, or move the folder away")
    differences = identity_differences(recorded, identity)
    recorded_tasks = previous.get("task_identity") or {}
    for task, current in task_identity.items():
        if task in recorded_tasks:
            differences += identity_differences(recorded_tasks[task], current, prefix=f"{task}.")
    if differences:
        shown = "; ".join(differences[:3]) + (f"; and {len(differences) - 3} more" if len(differences) > 3 else "")
        raise KvbenchError(f"{run_dir} holds rows made under other settings ({shown}): use another --output, "
                           "or move that folder away")


def _write_run_file(run: OpenRun, model: ModelDescription, device: str, prefill: dict[str, str]) -> None:
    previous = run.previous
    planned = {name: len(samples) for name, samples in run.samples_by_task.items()}
    write_json(run.run_dir / RUN_FILE, {
        "model": model.name,
        "method": run.method.name,
        "capacity": run.method.budget,
        "settings": run.method.options(),
        "max_length": run.plan.max_length,
        "question_agnostic": run.plan.question_agnostic,
        "dtype": model.dtype,
        "attention": model.attention,
        # the prefill's kernels: attention's, fastest first, and whose RMSNorms, rotary embedding and MLP gate run
        # (they change rounding only, like the device)
        **prefill,
        "device": device,
        "batch_invariant": run.plan.batch_invariant,
        "data_dir": None if run.plan.data_dir is None else str(Path(run.plan.data_dir).resolve()),
        # A folder reused for more tasks keeps what earlier runs recorded for theirs.
        "tasks": {**previous.get("tasks", {}), **planned},
        "task_settings": {**previous.get("task_settings", {}),
                          **{task.name: task.settings() for task in run.plan.tasks if task.settings()}},
        "identity": run.identity,
        "task_identity": {**previous.get("task_identity", {}), **run.task_identity},
    })


@dataclass
class RunSummary:
    run_dir: Path
    scores: dict[str, dict[str, Any]]
    samples_done: int
    seconds: float


def execute_run(run: OpenRun, loaded: LoadedModel, report: Callable[[str], None] | None = None,
                batch_size: int = 1) -> RunSummary:
    """`execute_runs` for one run folder."""
    return execute_runs([run], loaded, report, batch_size)[0]


def execute_runs(runs: list[OpenRun], loaded: LoadedModel, report: Callable[[str], None] | None = None,
                 batch_size: int | None = 1) -> list[RunSummary]:
    """Run every planned sample not already in each folder (this process's share of them in a data-parallel
    launch), each sample prefilled once for all the folders lacking it, up to ``batch_size`` rows decoded
    together (None: auto); write each run.json first, each row as it finishes, and each scores.json last.

    The runs share one plan (a grid: the same tasks and samples, different methods)."""
    plan = runs[0].plan
    world = runs[0].world
    if world.is_main:
        for run in runs:
            _write_run_file(run, ModelDescription.of(loaded), str(loaded.model.device),
                            prefill_kernels(loaded.model))
            for task in plan.tasks:
                read_rows_for_resume(result_path(run.run_dir, task.name))  # cut a line a crash left unfinished
    barrier(world)  # nobody appends before a cut line is gone
    stop_ids = eos_token_ids(loaded.model, loaded.tokenizer)
    work: list[tuple[Task, dict[str, Any], tuple[int, ...]]] = []
    planned_total = missing_total = 0
    for task in plan.tasks:
        done = [{row["_id"] for row in read_finished_rows(result_path(run.run_dir, task.name))} for run in runs]
        mine = shard(runs[0].samples_by_task[task.name], world)
        planned_total += len(mine) * len(runs)
        for sample in mine:
            lacking = tuple(index for index, ids in enumerate(done) if sample["_id"] not in ids)
            if lacking:
                work.append((task, sample, lacking))
                missing_total += len(lacking)

    work = longest_generations_first(work, lambda item: item[0].max_new_tokens)

    def requests():
        limits = {task.name: max_prompt_length(loaded.context_window, task, plan.max_length) for task in plan.tasks}
        task_stop_ids = {task.name: stop_ids | task.stop_token_ids(loaded.tokenizer) for task in plan.tasks}
        for task, sample, lacking in work:
            request = sample_request(task, sample, loaded.tokenizer, limits[task.name], task_stop_ids[task.name],
                                     tag=(task, sample), question_agnostic=plan.question_agnostic)
            request.configurations = lacking
            yield request

    started = time.perf_counter()
    samples_done = [0] * len(runs)
    bar = progress_bar(None, desc=runs[0].run_dir.name if len(runs) == 1 else f"{len(runs)} runs", unit="row",
                       initial=planned_total - missing_total, total=planned_total, disable=not world.is_main)
    compressors = [run.compressor for run in runs]
    with bar:
        for generation in generate_stream(loaded.model, compressors, requests(), batch_size, say=report,
                                          batch_invariant=plan.batch_invariant):
            task, sample = generation.tag
            run = runs[generation.configuration]
            append_row(result_path(run.run_dir, task.name), _sample_row(loaded, task, sample, generation))
            samples_done[generation.configuration] += 1
            bar.update(1)
    barrier(world)
    seconds = time.perf_counter() - started
    return [RunSummary(run.run_dir, _write_scores(run), total_over_processes(world, done), seconds)
            for run, done in zip(runs, samples_done)]


def longest_generations_first(items: list, generation_length: Callable[[Any], int]) -> list:
    """``items`` in the order a run prefills them: the longest generations first (otherwise in order). Their rows
    then decode beside the later samples' prefills and rows; taken last (LongBench's summaries come mid-list), they
    decode on their own at the end of the run, a tail of steps with few rows (a grid's rows share those steps)."""
    return sorted(items, key=lambda item: -generation_length(item))


def _write_scores(run: OpenRun) -> dict[str, dict[str, Any]]:
    """Score the planned samples' rows of each task into scores.json (process 0); the planned tasks' scores."""
    if not run.world.is_main:
        return {task.name: {} for task in run.plan.tasks}
    scores_path = run.run_dir / SCORES_FILE
    scores = read_json(scores_path) if scores_path.exists() else {}
    for task in run.plan.tasks:
        wanted = {sample["_id"] for sample in run.samples_by_task[task.name]}
        rows = [row for row in read_finished_rows(result_path(run.run_dir, task.name)) if row["_id"] in wanted]
        scores[task.name] = task.score(rows) if rows else {"score": None}
        scores[task.name]["n"] = len(rows)
    write_json(scores_path, scores)
    return {task.name: scores[task.name] for task in run.plan.tasks}


def _sample_row(loaded: LoadedModel, task: Task, sample: dict[str, Any], generation: Generation) -> dict[str, Any]:
    text = loaded.tokenizer.decode(generation.token_ids, skip_special_tokens=True)
    prediction = task.postprocess(text)
    fields = task.row_fields(sample)
    return {
        "_id": sample["_id"],
        "pred": prediction,
        **fields,
        **task.score_row({"pred": prediction, **fields}),
        "prompt_tokens": generation.prompt_tokens,
        "kept_tokens": summarize(generation.kept_per_layer),
        "new_tokens": len(generation.token_ids),
        "prefill_seconds": round(generation.prefill_seconds, 4),
        "decode_seconds": round(generation.decode_seconds, 4),
        "kv_cache_mb": round(generation.kv_cache_bytes / 2**20, 3),
        "peak_memory_mb": None if generation.peak_memory_bytes is None
        else round(generation.peak_memory_bytes / 2**20, 1),
        **generation.method_record,
    }


def run_benchmark(loaded: LoadedModel, method: Method, plan: RunPlan,
                  report: Callable[[str], None] | None = None, batch_size: int = 1) -> RunSummary:
    """Everything of a run with the model already loaded (tests, notebooks): prepare, open, execute."""
    compressor = method.prepare(loaded.info)
    with open_run(ModelDescription.of(loaded), method, compressor, plan) as run:
        return execute_run(run, loaded, report, batch_size)
