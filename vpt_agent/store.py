"""Tensors that cannot live in the graph state, kept per run beside the graph.

Each run (one question, keyed by the state's ``run_id``) holds its image on the model's device
(tagged with its content hash), the live `VPTSession` with its KV cache, the list of events that
session has consumed, and tool outputs (crops, features) not yet fed to it. Everything here can
be rebuilt from the state, so entries may be evicted at any time: the store is a bounded LRU.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from .model.session import VPTSession

Event = tuple[str, Any]
"""("turn", token ids) or ("action", parsed action JSON): what a session has consumed, in order."""


@dataclass
class RunCache:
    image: torch.Tensor | None = None
    image_key: str | None = None
    session: VPTSession | None = None
    fed: list[Event] = field(default_factory=list)
    outputs: dict[int, Any] = field(default_factory=dict)
    """Action index -> crops (list of tensors) or features (tensor), computed by a tool node."""


class VPTStore:
    """Bounded, thread-safe map run id -> `RunCache` (least recently used evicted first)."""

    def __init__(self, max_runs: int = 32) -> None:
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
