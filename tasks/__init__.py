"""The task registry: task name -> how to build its `Task`, and the names `--tasks` accepts."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from kvbench.errors import KvbenchError, unknown_name_message
from kvbench.tasks.base import Task
from kvbench.tasks.longbench import LongBenchTask
from kvbench.tasks.longbench_spec import LONGBENCH_E_TASKS, LONGBENCH_TASKS
from kvbench.tasks.needle import NeedleTask
from kvbench.tasks.ruler import RULER_TASKS, RulerTask

#: task name -> callable building the task from keyword options
TASK_FACTORIES: dict[str, Callable[..., Task]] = {
    **{name: functools.partial(LongBenchTask, name) for name in LONGBENCH_TASKS},
    **{f"{name}_e": functools.partial(LongBenchTask, f"{name}_e") for name in LONGBENCH_E_TASKS},
    "needle": NeedleTask,
    **{name: functools.partial(RulerTask, name) for name in RULER_TASKS},
    # Other task families add one entry each here.
}

#: names that stand for several tasks
TASK_GROUPS: dict[str, list[str]] = {
    "longbench": list(LONGBENCH_TASKS),
    "longbench-e": [f"{name}_e" for name in LONGBENCH_E_TASKS],
    "ruler": list(RULER_TASKS),
}


def get_task(name: str, **options) -> Task:
    """The task called ``name``, built with the options its factory takes.

    Options the task does not take, and options left at None (the task's default),
    are not passed, so one set of command-line options serves a list of mixed tasks;
    `build_tasks` refuses an option that no task of the list takes.
    """
    try:
        factory = TASK_FACTORIES[name]
    except KeyError:
        raise KvbenchError(unknown_name_message("task", name, [*TASK_GROUPS, *TASK_FACTORIES])) from None
    accepted = inspect.signature(factory).parameters
    return factory(**{key: value for key, value in options.items() if key in accepted and value is not None})


def build_tasks(spec: str, **options) -> list[Task]:
    """The tasks of a ``--tasks`` spec, each built with the options it takes; an option set (not None) that
    none of them takes is refused, since running without it would record another experiment."""
    names = resolve_task_names(spec)
    unused = [key for key, value in options.items() if value is not None
              and not any(key in inspect.signature(TASK_FACTORIES[name]).parameters for name in names)]
    if unused:
        flags = ", ".join(f"--{key.replace('_', '-')}" for key in unused)
        raise KvbenchError(f"{flags} applies to no task of --tasks {spec!r} (needle options need --tasks needle, RULER's --tasks ruler)")
    return [get_task(name, **options) for name in names]


def resolve_task_names(spec: str) -> list[str]:
    """Task names of a comma list of task and group names ("longbench", "longbench-e", "ruler"), in order, without repeats."""
    names: list[str] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        if item in TASK_GROUPS:
            expanded = TASK_GROUPS[item]
        elif item in TASK_FACTORIES:
            expanded = [item]
        else:
            raise KvbenchError(unknown_name_message("task", item, [*TASK_GROUPS, *TASK_FACTORIES]))
        names.extend(name for name in expanded if name not in names)
    if not names:
        raise KvbenchError(f"no task named in {spec!r}")
    return names
