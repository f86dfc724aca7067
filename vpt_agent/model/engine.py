"""`Engine`: continuous batching of VPT rounds for one loaded model, shared by every caller.

Any thread (or asyncio task) hands a `Round` to the model's engine and waits for it; one engine
thread runs the model. Between two decode steps it admits the rounds that are waiting (up to
`max_rows` rows in the batch and `max_prefill_tokens` new tokens per admission: beyond that they
queue), prefills them in one forward and adds them to the batch; then every row takes one token
and the rows that stop leave (`vpt_agent.model.batch` describes the KV cache layout).

There is no batching window: a lone round starts at once. Callers announce the work that leads to a
round (`preparing`: decoding an image, cropping, encoding); an idle engine that gets a round while
others are being prepared waits for them (at most `gather_seconds`), so that questions started
together are prefilled together instead of the first alone while the others queue behind it. The
thread starts with the first round and ends after `idle_seconds` without work, so an idle engine
holds no thread and no tensors.

A round whose prefill fails is retried alone, so it fails alone; a failed decode step is retried
the same way. A waiter that is cancelled (an asyncio task, an exception in its thread) marks its
round, and the engine drops the row before its next step.
"""
from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..errors import ConfigError, VPTError
from .batch import Batch, Round
from .conversation import Turn

Event = tuple[str, Any]
"""("token", id), ("done", None) or ("error", exception), sent to a round's waiter."""


class Engine:
    """The batching engine of one model; get it with `engine_for(model)`."""

    def __init__(
        self,
        model,
        *,
        max_rows: int = 64,
        max_prefill_tokens: int = 16384,
        gather_seconds: float = 0.1,
        idle_seconds: float = 2.0,
    ):
        self._model = weakref.ref(model)
        self.gather_seconds, self.idle_seconds = gather_seconds, idle_seconds
        self.configure(max_rows=max_rows, max_prefill_tokens=max_prefill_tokens)
        self._reset()

    def configure(self, *, max_rows: int | None = None, max_prefill_tokens: int | None = None) -> None:
        """Rows decoded together at most, and new tokens prefilled per admission at most (a round
        longer than that is admitted alone). Affects every graph on this model from the next step."""
        for name, value in (("max_rows", max_rows), ("max_prefill_tokens", max_prefill_tokens)):
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ConfigError(f"{name} must be a positive int, got {value!r}")
                setattr(self, name, value)

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._waiting: deque[Round] = deque()
        self._thread: threading.Thread | None = None
        self._batch: Batch | None = None
        self._senders: dict[int, Callable[[Event], None]] = {}
        self._preparing = 0

    @property
    def rows(self) -> int:
        """Rows in the batch now."""
        batch = self._batch
        return len(batch) if batch is not None else 0

    # ------------------------------------------------------------------------------- waiters
    @contextmanager
    def preparing(self) -> Iterator[None]:
        """Announce work that ends in a round (see the module docstring)."""
        with self._cond:
            self._preparing += 1
        try:
            yield
        finally:
            with self._cond:
                self._preparing -= 1
                self._cond.notify()

    def generate(self, round_: Round, on_token: Callable[[int], None] | None = None) -> Turn:
        """Run `round_` with whatever else is running and return its turn; `on_token` is called
        with each token in this thread. Raises the round's error."""
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._submit(round_, events.put, stream=on_token is not None)
        try:
            while True:
                kind, value = events.get()
                if kind == "token":
                    on_token(value)
                elif kind == "error":
                    raise value
                else:
                    return round_.turn()
        except BaseException:
            round_.cancelled = True
            raise

    async def agenerate(self, round_: Round, on_token: Callable[[int], None] | None = None) -> Turn:
        """`generate` for asyncio: awaits without holding a thread; cancelling the task cancels the round."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def send(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is closed: nobody waits any more
                round_.cancelled = True

        self._submit(round_, send, stream=on_token is not None)
        try:
            while True:
                kind, value = await events.get()
                if kind == "token":
                    on_token(value)
                elif kind == "error":
                    raise value
                else:
                    return round_.turn()
        except BaseException:
            round_.cancelled = True
            raise

    def _submit(self, round_: Round, send: Callable[[Event], None], stream: bool) -> None:
        if stream:
            round_.on_token = lambda token: send(("token", token))
        with self._cond:
            self._senders[id(round_)] = send
            self._waiting.append(round_)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="vpt-engine", daemon=True)
                self._thread.start()
            self._cond.notify()

    # ---------------------------------------------------------------------------- the thread
    def _run(self) -> None:
        with torch.no_grad():
            while (work := self._next()) is not None:
                batch, newcomers = work
                try:
                    for round_ in batch.join(newcomers):
                        self._end(round_)
                    cancelled = [r for r in batch.rounds if r.cancelled]
                    batch.drop(cancelled)
                    for round_ in cancelled:
                        self._forget(round_)
                    for round_ in batch.step():
                        self._end(round_)
                except BaseException as exc:  # a fault outside any forward: fail what is running, go on
                    for round_ in [*batch.rounds, *(r for r in newcomers if r.stop is None and r.error is None)]:
                        round_.error = round_.error or exc
                        self._end(round_)
                    with self._cond:
                        self._batch = None

    def _next(self) -> tuple[Batch, list[Round]] | None:
        """Wait for work; the batch and the rounds to admit now, or None when the thread should end."""
        with self._cond:
            while not self._waiting and not self.rows:
                model = self._model()
                if model is None or not self._cond.wait(self.idle_seconds) and not self._waiting:
                    self._thread, self._batch = None, None
                    return None
                del model
            if not self.rows:  # idle: rounds being prepared start together with the waiting ones
                deadline = time.monotonic() + self.gather_seconds
                while self._preparing and len(self._waiting) < self.max_rows:
                    if (left := deadline - time.monotonic()) <= 0:
                        break
                    self._cond.wait(left)
            if self._batch is None:
                model = self._model()
                if model is None:
                    self._fail_waiting(VPTError("the model of this engine was deleted"))
                    self._thread = None
                    return None
                self._batch = Batch(model)
            newcomers, tokens = [], 0
            while self._waiting and len(self._batch) + len(newcomers) < self.max_rows:
                round_ = self._waiting[0]
                if round_.cancelled:
                    self._senders.pop(id(self._waiting.popleft()), None)
                    continue
                size = _prefill_size(round_)
                if newcomers and tokens + size > self.max_prefill_tokens:
                    break
                newcomers.append(self._waiting.popleft())
                tokens += size
            return self._batch, newcomers

    def _end(self, round_: Round) -> None:
        """Tell the round's waiter that it stopped or failed."""
        send = self._forget(round_)
        if send is not None:
            send(("error", round_.error) if round_.error is not None else ("done", None))

    def _forget(self, round_: Round) -> Callable[[Event], None] | None:
        with self._cond:
            return self._senders.pop(id(round_), None)

    def _fail_waiting(self, error: BaseException) -> None:
        while self._waiting:
            round_ = self._waiting.popleft()
            round_.error = error
            send = self._senders.pop(id(round_), None)
            if send is not None:
                send(("error", error))


def _prefill_size(round_: Round) -> int:
    queued = round_.conversation.queued
    return len(queued.ids) if queued is not None else 1


_ENGINES: weakref.WeakKeyDictionary[Any, Engine] = weakref.WeakKeyDictionary()
_ENGINES_LOCK = threading.Lock()


def engine_for(model) -> Engine:
    """The batching engine of `model` (made on first use): every graph and thread using this model shares it."""
    with _ENGINES_LOCK:
        engine = _ENGINES.get(model)
        if engine is None:
            engine = _ENGINES[model] = Engine(model)
        return engine


def _after_fork() -> None:
    """A forked child has none of its parent's threads: its engines start empty."""
    global _ENGINES_LOCK
    _ENGINES_LOCK = threading.Lock()
    for engine in list(_ENGINES.values()):
        engine._reset()


os.register_at_fork(after_in_child=_after_fork)
