"""`kvbench profile --method prefixkv`: calibration prompts through the engine -> a PrefixKV per-layer budget profile.

The calibration set is a stratified sample of the chosen tasks (default: all of
LongBench): the samples of each task are shuffled with a fixed seed and taken
round-robin over the tasks, so ``--samples 42`` is two per LongBench task. Each
prompt is built exactly as `kvbench run` builds it (same template, same
middle truncation to ``--max-length`` or the context window minus the task's
generation length), prefilled once through the kvbench hook, and searched with
the run's search (`kvbench.methods.prefixkv.layer_drop_ratios`); each layer's drop
ratio is the mean over the samples. The JSON lands where `kvbench run --method prefixkv`
looks for it (``KVBENCH_HOME/prefixkv/prefixkv_<model>_<ratio>.json``) unless
``--out`` says otherwise.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kvbench.errors import KvbenchError
from kvbench.engine.generate import generate_greedy, model_info
from kvbench.methods.base import Compressor, LayerPrefill, SampleCompression, Selection
from kvbench.methods.fullkv import FullKV
from kvbench.methods.importance import attention_importance
from kvbench.methods.prefixkv import CONFIG_FORMAT, config_path, layer_drop_ratios, write_config
from kvbench.runfolder import check_writable_folder

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


class _ScoreCollector(SampleCompression):
    """Records each layer's importance scores during a prefill; keeps the whole cache."""

    def __init__(self):
        super().__init__(FullKV())
        self.scores: list[torch.Tensor] = []

    def select(self, layer: LayerPrefill) -> Selection | None:
        self.scores.append(attention_importance(layer).cpu())
        return None


class _CollectingCompressor(Compressor):
    def __init__(self, model, collector: _ScoreCollector):
        super().__init__(collector.method, model_info(model))
        self.collector = collector

    def start_sample(self, prompt_length: int, sample: dict | None = None) -> SampleCompression:
        self.collector.scores = []
        return self.collector


def profile_prefixkv(
    model,
    prompts: list[list[int]],
    ratio: float,
    model_name: str | None = None,
    start_size: int = 4,
    protect_size: int = 1,
    progress=None,
) -> dict[str, Any]:
    """Offline PrefixKV profile: per-layer drop ratios averaged over calibration prompts.

    Each prompt is prefilled once through the kvbench hook (full cache, one token
    decoded); its per-layer scores go through the same search a run uses, with
    the budget ``round(ratio * L * layers)``. Returns the config dict that
    `write_config` stores and ``--prefix-config`` reads.
    """
    if not 0 <= ratio < 1:
        raise KvbenchError(f"--ratio must be in [0, 1), got {ratio}")
    if not prompts:
        raise KvbenchError("profiling PrefixKV needs at least one calibration prompt")
    num_layers = model.config.num_hidden_layers
    collector = _ScoreCollector()
    compressor = _CollectingCompressor(model, collector)
    sums = [0.0] * num_layers
    lengths = []
    for index, prompt in enumerate(prompts):
        generate_greedy(model, prompt, compressor, max_new_tokens=1, eos_token_ids=set())
        if len(collector.scores) != num_layers:
            raise KvbenchError(f"the hook saw {len(collector.scores)} attention layers, the model has {num_layers}")
        ratios = layer_drop_ratios(torch.stack(collector.scores), ratio, start_size, protect_size)
        sums = [total + r for total, r in zip(sums, ratios)]
        lengths.append(len(prompt))
        if progress is not None:
            progress(index + 1, len(prompts))
    return {
        "format": CONFIG_FORMAT,
        "method": "prefixkv",
        "model": model_name or compressor.model.name,
        "num_layers": num_layers,
        "ratio": float(ratio),
        "layer_ratios": [total / len(prompts) for total in sums],
        "samples": len(prompts),
        "prompt_tokens_mean": sum(lengths) / len(lengths),
        "start_size": start_size,
        "protect_size": protect_size,
    }


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
    if out is not None:
        if Path(out).is_dir():
            raise KvbenchError(f"--out {out}: is a folder, expected a file name")
        check_writable_folder(Path(out).parent, "--out")
    tasks = {name: get_task(name) for name in resolve_task_names(task_spec)}
    chosen = stratified_samples({name: task.load_samples(data_dir) for name, task in tasks.items()}, samples, seed)
    if not chosen:
        raise KvbenchError(f"no calibration samples found for {task_spec!r}")
    loaded = load_model(model, dtype=dtype, attn=attn, device=device, device_map=device_map,
                        trust_remote_code=trust_remote_code)
    prompts = []
    for name, sample in chosen:
        task = tasks[name]
        prompts.append(task.prompt_ids(sample, loaded.tokenizer, max_prompt_length(loaded.context_window, task, max_length)))

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
