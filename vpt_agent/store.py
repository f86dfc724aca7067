"""Tensors that cannot live in the graph state, kept per run beside the graph.

Each run (one question, keyed by the state's ``run_id``) holds its normalized image on the CPU
(tagged with its content hash), its live `Conversation` with the KV cache between rounds, what that
conversation consumed (the rounds it generated and the ids of the user turns it was fed), and the
outputs of tool nodes (crops, features) under their action's id until the next round feeds them.
Everything here can be rebuilt from the state, so a run's entry may be evicted between its nodes.

The store is bounded in bytes (`max_bytes`, the tensors' storage, counted once per storage): past the
bound, runs that no node is using are evicted, least recently used first, and rebuild what they need
on their next node. A run in the middle of a node (`using`) is never evicted, so the store exceeds
the bound by at most what the runs in flight hold (their number is bounded by the caller:
`graph.batch` keeps `max_batch_rows` in flight). A run's entry is freed when it ends or a node fails.
"""
from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from .model.conversation import Conversation

DEFAULT_MAX_BYTES = 2 * 2**30


@dataclass
class RunCache:
    image: torch.Tensor | None = None
    image_key: str | None = None
    conversation: Conversation | None = None
    turns: list[list[int]] = field(default_factory=list)
    """The rounds `conversation` generated (or replayed), in order."""
    user_turns: list[str] = field(default_factory=list)
    """The ids of the user turns `conversation` was fed, in order."""
    outputs: dict[str, Any] = field(default_factory=dict)
    """Action id -> crops (list of tensors) or features (tensor) from a tool node, not fed yet."""

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor the entry holds (crops are views of the image)."""
        if self.image is not None:
            yield self.image
        if self.conversation is not None:
            for keys, values in self.conversation.cache or ():
                yield keys
                yield values
        for output in self.outputs.values():
            yield from output if isinstance(output, list) else (output,)


class VPTStore:
    """Thread-safe map run id -> `RunCache`, bounded in bytes (see the module docstring)."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._runs: OrderedDict[str, RunCache] = OrderedDict()
        self._sizes: dict[str, int] = {}
        """Bytes of each run as its last node left it (a run changes only while a node uses it)."""
        self._in_use: Counter[str] = Counter()
        self._lock = threading.Lock()

    @contextmanager
    def using(self, run_id: str) -> Iterator[RunCache]:
        """The cache of `run_id` (created empty if absent or evicted), not evicted until the block ends."""
        with self._lock:
            cache = self._runs.pop(run_id, None) or RunCache()
            self._runs[run_id] = cache
            self._in_use[run_id] += 1
        try:
            yield cache
        finally:
            size = _nbytes(cache)
            with self._lock:
                self._in_use[run_id] -= 1
                if not self._in_use[run_id]:
                    del self._in_use[run_id]
                if self._runs.get(run_id) is cache:
                    self._sizes[run_id] = size
                self._evict()

    def drop(self, run_id: str) -> None:
        """Free a run's tensors (a node using it keeps its own reference until it ends)."""
        with self._lock:
            self._runs.pop(run_id, None)
            self._sizes.pop(run_id, None)

    def nbytes(self) -> int:
        """Bytes of tensor storage the store holds."""
        with self._lock:
            return sum(map(_nbytes, self._runs.values()))

    def _evict(self) -> None:
        """With the lock held: idle runs, oldest first, until under the bound."""
        total = sum(self._sizes.values())
        for run_id in [run_id for run_id in self._runs if run_id not in self._in_use]:
            if total <= self.max_bytes:
                break
            del self._runs[run_id]
            total -= self._sizes.pop(run_id, 0)

    def __contains__(self, run_id: str) -> bool:
        with self._lock:
            return run_id in self._runs

    def __len__(self) -> int:
        with self._lock:
            return len(self._runs)


def _nbytes(cache: RunCache) -> int:
    """Bytes of the storages of a run's tensors, each counted once (crops are views of the image)."""
    storages = {}
    for tensor in cache.tensors():
        storage = tensor.untyped_storage()
        storages[(storage.data_ptr(), tensor.device)] = storage.nbytes()
    return sum(storages.values())
