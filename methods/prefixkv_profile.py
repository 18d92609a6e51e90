"""`kvbench profile --method prefixkv`: calibration prompts -> a PrefixKV per-layer budget profile.

The calibration set is a stratified sample of the chosen tasks (default: all of
LongBench): the samples of each task are shuffled with a fixed seed and taken
round-robin over the tasks, so ``--samples 42`` is two per LongBench task. Each
prompt is built exactly as `kvbench run` builds it (same template, same
middle truncation to ``--max-length`` or the context window minus the task's
generation length), prefilled once, and searched with the run's search
(`kvbench.methods.prefixkv.profile_prefixkv`); each layer's drop ratio is the
mean over the samples. The JSON lands where `kvbench run --method prefixkv`
looks for it (``KVBENCH_HOME/prefixkv/prefixkv_<model>_<ratio>.json``) unless
``--out`` says otherwise.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvbench.errors import KvbenchError
from kvbench.methods.prefixkv import config_path, profile_prefixkv, write_config

PROFILED_METHODS = ("prefixkv",)


def stratified_samples(samples_by_task: dict[str, list[dict[str, Any]]], count: int, seed: int = 0) -> list[tuple[str, dict]]:
    """``count`` (task, sample) pairs taken round-robin over the tasks, each task's samples shuffled by ``seed``."""
    if count <= 0:
        raise KvbenchError(f"--samples must be > 0, got {count}")
    queues = {}
    for task, samples in samples_by_task.items():
        shuffled = list(samples)
        random.Random(f"{seed}:{task}").shuffle(shuffled)
        queues[task] = shuffled
    chosen: list[tuple[str, dict]] = []
    while len(chosen) < count and any(queues.values()):
        for task, queue in queues.items():
            if queue and len(chosen) < count:
                chosen.append((task, queue.pop(0)))
    return chosen


def run_profile(
    method_name: str,
    model: str | None,
    ratio: float | None,
    data_dir: str | None = None,
    samples: int = 64,
    out: str | None = None,
    task_spec: str = "longbench",
    max_length: int | None = None,
    seed: int = 0,
    dtype: str = "auto",
    attn: str = "sdpa",
    device: str = "auto",
    device_map: str | None = None,
    trust_remote_code: bool = False,
    progress: Callable[[str], None] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Profile ``method_name`` on calibration prompts and write its config; returns (path, config)."""
    from kvbench.harness.model import load_model
    from kvbench.harness.run import max_prompt_length
    from kvbench.tasks import get_task, resolve_task_names

    if method_name not in PROFILED_METHODS:
        raise KvbenchError(f"only {', '.join(PROFILED_METHODS)} has an offline profile, got --method {method_name}")
    if ratio is None:
        raise KvbenchError("kvbench profile needs --ratio (the fraction of the prompt dropped, 0 <= R < 1)")
    if not 0 <= ratio < 1:
        raise KvbenchError(f"--ratio must be in [0, 1), got {ratio}")
    if samples <= 0:
        raise KvbenchError(f"--samples must be > 0, got {samples}")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise KvbenchError(f"--data-dir {data_dir}: no such folder")
    tasks = {name: get_task(name) for name in resolve_task_names(task_spec)}
    chosen = stratified_samples({name: task.load_samples(data_dir) for name, task in tasks.items()}, samples, seed)
    if not chosen:
        raise KvbenchError(f"no calibration samples found for {task_spec!r}")
    loaded = load_model(model, dtype=dtype, attn=attn, device=device, device_map=device_map,
                        trust_remote_code=trust_remote_code)
    prompts = []
    for name, sample in chosen:
        task = tasks[name]
        prompts.append(task.prompt_ids(sample, loaded.tokenizer, max_prompt_length(loaded, task, max_length)))

    def report(done: int, total: int) -> None:
        if progress is not None:
            progress(f"profiled {done}/{total} prompts")

    config = profile_prefixkv(loaded.model, prompts, ratio, model_name=loaded.name, progress=report)
    config["calibration"] = {
        "tasks": task_spec,
        "seed": seed,
        "max_length": max_length,
        "samples": [f"{name}:{sample['_id']}" for name, sample in chosen],
    }
    path = write_config(config, out if out is not None else config_path(loaded.name, ratio))
    return path, config
