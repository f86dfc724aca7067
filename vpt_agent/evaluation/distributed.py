"""Ranks of a data-parallel evaluation, over torch.distributed (gloo: only Python objects travel).

Rank 0 is the process that owns the output folder; it broadcasts the work, and gathers every
rank's lines after each round. The ranks come either from ``--workers N`` (N - 1 local processes
spawned beside the command) or from a launcher such as torchrun, which starts one process per GPU
on every node and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from multiprocessing.connection import wait
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..errors import VPTError

TIMEOUT = timedelta(hours=1)
"""How long a rank waits for the others at a collective (model loading and one round)."""


class RankError(VPTError):
    """Another rank of the evaluation stopped (its own error is printed where it ran)."""


class Group:
    """The ranks of one evaluation; this one is rank 0 of 1 and talks to no one."""

    rank = 0
    world = 1
    local_rank = 0
    """Index of this rank on its node (picks its GPU)."""

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj`, on every rank."""
        return obj

    def gather(self, obj: Any) -> list[Any] | None:
        """On rank 0 every rank's `obj`, in rank order; None on the others."""
        return [obj]


class TorchGroup(Group):
    """The default torch.distributed process group (gloo)."""

    def __init__(self, local_rank: int) -> None:
        self.rank, self.world, self.local_rank = dist.get_rank(), dist.get_world_size(), local_rank

    def broadcast(self, obj: Any) -> Any:
        box = [obj]
        with _rank_errors():
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        out = [None] * self.world if self.rank == 0 else None
        with _rank_errors():
            dist.gather_object(obj, out, dst=0)
        return out


@contextmanager
def _rank_errors() -> Iterator[None]:
    try:
        yield
    except RuntimeError as exc:  # gloo: "Connection closed by peer ..."
        raise RankError(f"another rank stopped ({str(exc).splitlines()[0][:200]})") from exc


def launched() -> bool:
    """Whether a launcher started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextmanager
def launched_group() -> Iterator[TorchGroup]:
    """Join the ranks a launcher started (``env://``)."""
    dist.init_process_group("gloo", timeout=TIMEOUT)
    try:
        yield TorchGroup(int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    finally:
        dist.destroy_process_group()


@contextmanager
def local_group(world: int, follower: Callable[[Group], None]) -> Iterator[Group]:
    """This process as rank 0 of `world`, ranks 1.. running `follower(group)` in spawned processes.
    Each rank gets an equal share of the CPU cores."""
    if world == 1:
        yield Group()
        return
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
    context = mp.get_context("spawn")
    workers = [
        context.Process(target=_run_follower, args=(rank, world, store.port, follower), daemon=True)
        for rank in range(1, world)
    ]
    for worker in workers:
        worker.start()
    threads = torch.get_num_threads()
    torch.set_num_threads(_threads(world))
    try:
        dist.init_process_group("gloo", store=store, rank=0, world_size=world, timeout=TIMEOUT)
        yield TorchGroup(0)
    finally:
        torch.set_num_threads(threads)
        if dist.is_initialized():
            dist.destroy_process_group()
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.terminate()


def _run_follower(rank: int, world: int, port: int, follower: Callable[[Group], None]) -> None:
    """A spawned rank: join rank 0's group and follow it; errors print one line (rank 0 reports).
    It ends when rank 0's process does, even if that one is killed."""
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    torch.set_num_threads(_threads(world))
    warnings.simplefilter("ignore")  # rank 0 shows the same warnings once
    try:
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=TIMEOUT)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=TIMEOUT)
        follower(TorchGroup(rank))
    except KeyboardInterrupt:
        pass
    except Exception as exc:
        print(f"vpt-agent: worker {rank}: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _exit_with_parent() -> None:
    """End this process at once when the one that spawned it ends."""
    wait([multiprocessing.parent_process().sentinel])
    os._exit(1)


def _threads(world: int) -> int:
    return max(1, (os.cpu_count() or 1) // world)
