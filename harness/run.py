"""The run loop: every sample of every task through one method, one JSONL row per sample.

Rows are appended and flushed as each sample finishes, so a crash or a kill
loses at most the sample in flight; a rerun skips the ``_id``s already written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from kvbench.errors import KvbenchError
from kvbench.harness.generate import eos_token_ids, generate_greedy
from kvbench.harness.model import LoadedModel
from kvbench.methods.base import Method
from kvbench.tasks.base import Task

REPO_ROOT = Path(__file__).resolve().parents[1]


def default_output_dir() -> Path:
    """`results/` of the checkout when kvbench runs from one, else ./results."""
    return REPO_ROOT / "results" if (REPO_ROOT / "setup.cfg").is_file() else Path.cwd() / "results"


def run_label(method: Method) -> str:
    """Folder name of a run: the method, its budget, and every option set away from its default."""
    budget = method.budget_label()
    parts = [method.name] + ([budget] if budget else [])
    parts += [f"{name}={value}" for name, value in method.non_default_options().items()]
    return "-".join(str(part).replace("/", "_") for part in parts)


def parse_result_file(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Rows of a ``<task>.jsonl`` result file ([] when absent), and the byte length of a last line
    left unfinished by a writer that was killed or is still writing (0 when there is none).

    Both the run loop (which drops that line and redoes the sample) and the report (which only
    reads, possibly while a run appends) go through here, so they agree on what a finished row is.
    """
    if not path.is_file():
        return [], 0
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) and not line.endswith("\n"):
                return rows, len(line.encode("utf-8"))
            raise KvbenchError(f"{path}:{number}: not a JSON line; delete or repair the file") from None
        if not isinstance(row, dict) or "_id" not in row:
            raise KvbenchError(f"{path}:{number}: a result row must be a JSON object with an _id")
        rows.append(row)
    return rows, 0


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Finished rows of a result file. A last line cut short by a kill is cut off the file (and rewritten on resume)."""
    rows, unfinished_bytes = parse_result_file(path)
    if unfinished_bytes:
        with open(path, "rb+") as handle:
            handle.truncate(os.path.getsize(path) - unfinished_bytes)
    return rows


def append_row(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write through a temporary file so a kill never leaves half a JSON file."""
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    partial.replace(path)


@dataclass
class RunPlan:
    tasks: list[Task]
    data_dir: str | None = None
    limit: int | None = None
    max_length: int | None = None
    output_dir: Path = field(default_factory=default_output_dir)


def max_prompt_length(loaded: LoadedModel, task: Task, requested: int | None) -> int:
    """Prompt budget: --max-length, else the model's context window minus the task's generation length."""
    if requested is not None:
        if requested <= 0:
            raise KvbenchError(f"--max-length must be > 0, got {requested}")
        return requested
    if loaded.context_window <= task.max_new_tokens:
        raise KvbenchError(
            f"cannot derive --max-length: the model's context window ({loaded.context_window}) is not larger than "
            f"{task.name}'s generation length ({task.max_new_tokens}); pass --max-length"
        )
    return loaded.context_window - task.max_new_tokens


def context_limit(loaded: LoadedModel, task: Task, requested_max_length: int | None) -> int:
    """Tokens a prompt plus its answer may span: the model's window, or less under --max-length."""
    window = loaded.context_window
    if requested_max_length is None:
        return window
    limit = requested_max_length + task.max_new_tokens
    return min(limit, window) if window else limit


def summarize(values: list[int]) -> dict[str, float]:
    return {"mean": round(sum(values) / len(values), 2), "min": min(values), "max": max(values)}


def run_benchmark(loaded: LoadedModel, method: Method, plan: RunPlan) -> tuple[Path, dict[str, dict[str, Any]]]:
    """Run every planned sample not already in the run folder; return the folder and per-task scores."""
    samples_by_task = {}
    for task in plan.tasks:
        task.validate_for_model(context_limit(loaded, task, plan.max_length))
        samples = task.load_samples(plan.data_dir)
        samples_by_task[task.name] = samples[: plan.limit] if plan.limit is not None else samples
    run_dir = Path(plan.output_dir) / loaded.name / run_label(method)
    run_dir.mkdir(parents=True, exist_ok=True)
    # A folder reused for more tasks keeps what earlier runs recorded for theirs.
    previous = json.loads((run_dir / "run.json").read_text(encoding="utf-8")) if (run_dir / "run.json").is_file() else {}
    write_json(
        run_dir / "run.json",
        {
            "model": loaded.name,
            "method": method.name,
            "capacity": method.capacity,
            "settings": method.settings(),
            "tasks": {**previous.get("tasks", {}),
                      **{name: len(samples) for name, samples in samples_by_task.items()}},
            "task_settings": {**previous.get("task_settings", {}),
                              **{task.name: task.settings() for task in plan.tasks if task.settings()}},
            "max_length": plan.max_length,
            "device": str(loaded.model.device),
            "dtype": str(loaded.model.dtype).replace("torch.", ""),
            "attention": loaded.model.config._attn_implementation.removeprefix("kvbench_"),
        },
    )
    method.bind_model(loaded.name, loaded.model.config.num_hidden_layers)
    stop_ids = eos_token_ids(loaded.model, loaded.tokenizer)
    scores_path = run_dir / "scores.json"
    scores = json.loads(scores_path.read_text(encoding="utf-8")) if scores_path.is_file() else {}
    for task in plan.tasks:
        path = run_dir / f"{task.name}.jsonl"
        done = {row["_id"] for row in read_rows(path)}
        todo = [sample for sample in samples_by_task[task.name] if sample["_id"] not in done]
        max_length = max_prompt_length(loaded, task, plan.max_length)
        task_stop_ids = stop_ids | task.stop_token_ids(loaded.tokenizer)
        for sample in tqdm(todo, desc=f"{task.name} ({method.name})", unit="sample", initial=len(done),
                           total=len(samples_by_task[task.name])):
            prompt_ids = task.prompt_ids(sample, loaded.tokenizer, max_length)
            method_view = {**sample, "task": task.name, "prompt_text": task.prompt_text(sample)}
            generation = generate_greedy(loaded.model, prompt_ids, method, task.max_new_tokens, task_stop_ids,
                                         method_view)
            text = loaded.tokenizer.decode(generation.token_ids, skip_special_tokens=True)
            prediction = task.postprocess(text)
            fields = task.row_fields(sample)
            row = {
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
                **method.sample_record(),
            }
            append_row(path, row)
        wanted = {sample["_id"] for sample in samples_by_task[task.name]}
        rows = [row for row in read_rows(path) if row["_id"] in wanted]
        scores[task.name] = task.score(rows) if rows else {"score": None}
        scores[task.name]["n"] = len(rows)
    write_json(scores_path, scores)
    return run_dir, {task.name: scores[task.name] for task in plan.tasks}
