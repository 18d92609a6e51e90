"""Data-parallel runs: `torchrun` / `accelerate launch -m kvbench run ...` over several processes.

Each process (one per GPU, or several on a CPU) loads its own model copy and takes every
``world``-th planned sample of each task (``index % world == rank``), so the shards never
overlap and do not depend on what is already done: a rerun with any number of processes
resumes. All processes append to the run folder's one ``<task>.jsonl`` (`runfolder.append_row`
serialises appends between processes). Process 0 alone holds the folder's lock, checks and
writes ``run.json`` and writes ``scores.json`` once every process has finished; the others
wait for its verdict, so a refused folder is refused by all of them with the same line.

Processes talk through torch.distributed's gloo backend (CPU tensors, small messages), set
up from the variables torchrun and accelerate export (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from kvbench.errors import KvbenchError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


#: the variables a launcher exports that say where this process stands
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _whole_number(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise KvbenchError(f"{name}={text!r} must be a whole number (as torchrun sets it)") from None


def current_world() -> World:
    """This process's place among the launched processes (a single process when not launched).

    Checks the launcher's variables for consistency first: torch's rendezvous would otherwise
    fail on them with a traceback, or wait for processes that never come.
    """
    size = _whole_number("WORLD_SIZE", 1)
    if size < 1:
        raise KvbenchError(f"WORLD_SIZE={size}: a launch has at least one process")
    if size > 1 and "RANK" not in os.environ:
        raise KvbenchError(f"WORLD_SIZE={size} without RANK: set both (torchrun and accelerate launch do)")
    rank = _whole_number("RANK", 0)
    if not 0 <= rank < size:
        raise KvbenchError(f"RANK={rank} with WORLD_SIZE={size}: the rank must be from 0 to {size - 1}")
    local_size = _whole_number("LOCAL_WORLD_SIZE", size)
    if not 1 <= local_size <= size:
        raise KvbenchError(f"LOCAL_WORLD_SIZE={local_size} with WORLD_SIZE={size}: "
                           f"a machine runs from 1 to {size} of the processes")
    local_rank = _whole_number("LOCAL_RANK", rank % local_size)
    if not 0 <= local_rank < local_size:
        raise KvbenchError(f"LOCAL_RANK={local_rank} with {local_size} process(es) on this machine: "
                           f"the local rank must be from 0 to {local_size - 1}")
    if size > 1:
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            raise KvbenchError(f"WORLD_SIZE={size} needs {' and '.join(missing)} to meet the other processes "
                               "(torchrun and accelerate launch set them)")
        port = _whole_number("MASTER_PORT", 0)
        if not 1 <= port <= 65535:
            raise KvbenchError(f"MASTER_PORT={port} must be a port number from 1 to 65535")
    return World(rank, size, local_rank)


def start(world: World) -> None:
    """Join the process group (gloo), once."""
    if world.distributed and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", rank=world.rank, world_size=world.size)


def finish(world: World) -> None:
    if world.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        torch.distributed.barrier()


def main_decides(world: World, decide: Callable[[], T]) -> T:
    """Run ``decide`` on process 0 and give every process its result, or raise its KvbenchError everywhere."""
    if not world.distributed:
        return decide()
    verdict: list[Any] = [None, None]
    if world.is_main:
        try:
            verdict = [decide(), None]
        except KvbenchError as error:
            verdict = [None, str(error)]
    torch.distributed.broadcast_object_list(verdict, src=0)
    if verdict[1] is not None:
        raise KvbenchError(verdict[1])
    return verdict[0]


def total_over_processes(world: World, count: int) -> int:
    """``count`` summed over every process (itself when not launched)."""
    if not world.distributed:
        return count
    tensor = torch.tensor([count], dtype=torch.long)
    torch.distributed.all_reduce(tensor)
    return int(tensor.item())


def shard(items: list[T], world: World) -> list[T]:
    """This process's share: every ``size``-th item from ``rank``."""
    return items[world.rank :: world.size]


def device_for(world: World, device: str, device_map: str | None) -> str:
    """One model copy per GPU: process ``local_rank`` takes ``cuda:local_rank``."""
    if not world.distributed:
        return device
    if device_map is not None:
        raise KvbenchError("--device-map spreads one model over GPUs; a data-parallel launch gives each process "
                           "its own copy: use one or the other")
    if device == "cpu" or not torch.cuda.is_available():
        return "cpu" if device in ("auto", "cpu") else device
    if world.local_rank >= torch.cuda.device_count():
        raise KvbenchError(f"process {world.rank} has local rank {world.local_rank}, but this machine has "
                           f"{torch.cuda.device_count()} GPUs")
    torch.cuda.set_device(world.local_rank)
    return f"cuda:{world.local_rank}"
