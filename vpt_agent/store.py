"""Tensors that cannot live in the graph state, kept per run beside the graph.

Each run (one question, keyed by the state's ``run_id``) holds its normalized image on the CPU
(tagged with its content hash), its live `Conversation` with the KV cache between rounds, what that
conversation consumed (the rounds it generated and the ids of the user turns it was fed), and the
outputs of tool nodes (crops, features) under their action's id until the next round feeds them.
Everything here can be rebuilt from the state, so entries may be evicted at any time: the store is
a bounded LRU.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from .model.conversation import Conversation


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


class VPTStore:
    """Bounded, thread-safe map run id -> `RunCache` (least recently used evicted first)."""

    def __init__(self, max_runs: int = 256) -> None:
        self.max_runs = max_runs
        self._runs: OrderedDict[str, RunCache] = OrderedDict()
        self._lock = threading.Lock()

    def run(self, run_id: str) -> RunCache:
        """The cache of `run_id`, created empty if absent (or evicted)."""
        with self._lock:
            cache = self._runs.pop(run_id, None) or RunCache()
            self._runs[run_id] = cache
            while len(self._runs) > self.max_runs:
                self._runs.popitem(last=False)
            return cache

    def drop(self, run_id: str) -> None:
        """Free a finished run's tensors."""
        with self._lock:
            self._runs.pop(run_id, None)

    def __contains__(self, run_id: str) -> bool:
        with self._lock:
            return run_id in self._runs

    def __len__(self) -> int:
        with self._lock:
            return len(self._runs)
