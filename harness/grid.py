"""`kvbench run`: one method, or a grid of methods x capacities, over one model loaded once.

A grid runs as one stream (`kvbench.harness.run.execute_runs`): each sample is prefilled
once for every configuration whose folder lacks it, and the configurations' caches decode
side by side in one batch; each folder gets exactly the rows, run.json and scores.json a
run of its configuration alone would write.

Everything that can be refused is refused before the weights load: the methods and
their options, the tasks and their options, the output folder, the model's config,
each method against the model (`Method.prepare`), every planned sample and every run
folder's recorded settings (`kvbench.harness.run.open_run`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvbench.errors import KvbenchError, TaskDataUnavailable
from kvbench.harness.model import (
    check_attention_backend,
    check_device_map,
    describe_model,
    load_model,
    load_model_config,
    resolve_device,
    resolve_dtype,
    resolve_model_source,
)
from kvbench.engine.invariant import check_batch_invariant_device, check_invariance, resolve_batch_invariant
from kvbench.harness.parallel import current_world, device_for, finish, start
from kvbench.harness.run import RunPlan, execute_runs, open_run
from kvbench.methods import build_method, check_options_exist, get_method_class
from kvbench.methods.base import Method
from kvbench.paths import default_output_dir
from kvbench.runfolder import check_writable_folder
from kvbench.tasks import build_tasks
from kvbench.tasks.base import Task


@dataclass
class GridRequest:
    """What `kvbench run` was asked for, as given on the command line."""

    method_names: list[str]
    capacities: list[int] = field(default_factory=list)
    #: options set on the command line (unset ones left out)
    method_options: dict[str, Any] = field(default_factory=dict)
    task_spec: str = "longbench"
    task_options: dict[str, Any] = field(default_factory=dict)
    data_dir: str | None = None
    limit: int | None = None
    max_length: int | None = None
    output: str | None = None
    model: str | None = None
    dtype: str = "auto"
    attn: str = "sdpa"
    device: str = "auto"
    device_map: str | None = None
    trust_remote_code: bool = False
    #: rows decoded together; None: auto (`kvbench.engine.generate.auto_batch_size`, memory permitting)
    batch_size: int | None = None
    #: --batch-invariant / --no-batch-invariant; None: the default for the device (`resolve_batch_invariant`)
    batch_invariant: bool | None = None
    #: compress each prompt's context without its question (`RunPlan.question_agnostic`)
    question_agnostic: bool = False


def grid_methods(method_names: list[str], capacities: list[int], options: dict[str, Any]) -> list[Method]:
    """One configured method per (method, capacity) of the grid, in the order given, without repeats.

    An option (capacity included) applies to the listed methods that declare it; one that
    none of them declares is refused, as is a capacity list for methods without a budget.
    """
    classes = [get_method_class(name) for name in dict.fromkeys(method_names)]
    declared = {cls.name: {spec.name for spec in cls.option_specs()} for cls in classes}
    check_options_exist(list(declared), options)
    if capacities and not any("capacity" in names for names in declared.values()):
        raise KvbenchError(f"--capacity: {', '.join(declared)} keeps every token and takes no capacity")
    methods: list[Method] = []
    for cls in classes:
        own = {key: value for key, value in options.items() if key in declared[cls.name]}
        budgets = capacities if capacities and "capacity" in declared[cls.name] else [None]
        for budget in dict.fromkeys(budgets):
            methods.append(build_method(cls.name, **own, capacity=budget))
    return methods


def tasks_with_data(tasks: list[Task], data_dir: str | None, note: Callable[[str], None] | None) -> list[Task]:
    """The tasks whose data can be had. Tasks that may miss theirs (RULER's QA offline) are left out in one
    note when other tasks remain; when none would remain, the first reason is the error."""
    missing: list[tuple[Task, TaskDataUnavailable]] = []
    for task in tasks:
        if task.data_may_be_missing:
            try:
                task.load_samples(data_dir)
            except TaskDataUnavailable as error:
                missing.append((task, error))
    if not missing:
        return tasks
    if len(missing) == len(tasks):
        raise missing[0][1]
    if note is not None:
        note(f"note: running without {', '.join(task.name for task, _ in missing)}: "
             f"{'; '.join(str(error) for _, error in missing)}")
    left_out = {id(task) for task, _ in missing}
    return [task for task in tasks if id(task) not in left_out]


def run_grid(request: GridRequest, echo: Callable[[str], None] = print,
             progress: Callable[[str], None] | None = None) -> list[Path]:
    """Validate everything, load the model once, fill each run folder; returns the folders.

    Under torchrun / accelerate launch each process takes its share of every run's samples
    (`kvbench.harness.parallel`); process 0 speaks for all of them.
    """
    world = current_world()
    methods = grid_methods(request.method_names, request.capacities, request.method_options)
    tasks = build_tasks(request.task_spec, **request.task_options)
    tasks = tasks_with_data(tasks, request.data_dir, (progress or echo) if world.is_main else None)
    check_attention_backend(request.attn)
    check_device_map(request.device_map)
    device = device_for(world, request.device, request.device_map)
    resolve_dtype(request.dtype, resolve_device(device))
    output_dir = Path(request.output) if request.output else default_output_dir()
    check_writable_folder(output_dir, "--output")
    decode_device = "cpu" if request.device_map == "cpu" else resolve_device(device)
    check_batch_invariant_device(request.batch_invariant, decode_device)
    source = resolve_model_source(request.model)
    config = load_model_config(source, request.trust_remote_code)
    description, info = describe_model(source, config, request.dtype, request.attn, device)
    shared: dict = {}
    compressors = [method.prepare(info, shared) for method in methods]
    batch_invariant = resolve_batch_invariant(request.batch_invariant, decode_device, getattr(config, "model_type", None))
    plan = RunPlan(tasks=tasks, data_dir=request.data_dir, limit=request.limit, max_length=request.max_length,
                   output_dir=output_dir, batch_invariant=batch_invariant,
                   question_agnostic=request.question_agnostic)
    if not world.is_main:
        echo = progress = None
    start(world)
    runs = []
    try:
        for method, compressor in zip(methods, compressors):
            runs.append(open_run(description, method, compressor, plan, world))
        loaded = load_model(source, dtype=request.dtype, attn=request.attn, device=device,
                            device_map=request.device_map, trust_remote_code=request.trust_remote_code)
        if batch_invariant:
            check_invariance(loaded.model)  # before run.json is written
        started = time.perf_counter()
        summaries = execute_runs(runs, loaded, report=progress, batch_size=request.batch_size)
        samples = sum(summary.samples_done for summary in summaries)
        for summary in summaries:
            if echo is not None:
                echo(f"results: {summary.run_dir}")
                for task_name, score in summary.scores.items():
                    value = "-" if score.get("score") is None else f"{score['score']:.2f}"
                    echo(f"  {task_name:24s} n={score['n']:<5d} {value}")
        seconds = time.perf_counter() - started
        rate = f", {samples / seconds:.3f} samples/s" if samples and seconds > 0 else ""
        processes = f" over {world.size} processes" if world.distributed else ""
        if echo is not None:
            echo(f"{samples} new samples in {seconds:.1f} s{rate}{processes}; rows in "
                 f"{', '.join(str(run.run_dir) for run in runs)}")
    finally:
        for run in runs:
            run.close()
        finish(world)
    return [run.run_dir for run in runs]
