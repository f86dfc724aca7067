"""`Engine`: continuous batching of VPT rounds for one loaded model, shared by every caller.

Any thread (or asyncio task) hands a `Round` to the model's engine and waits for it; one engine
thread runs the model. Between two decode steps it admits the rounds that are waiting (up to
`max_rows` rows in the batch and `max_prefill_tokens` new tokens per admission: beyond that they
queue), prefills them in one forward (their images resized and encoded together) and adds them to
the batch; then every row takes one token and the rows that stop leave (`vpt_agent.model.batch`
describes the KV cache layout). Other work on the model runs in that thread too, between steps, so
that one thread computes with torch's thread pool: `encode` computes a branch encoder's features
for a tool node, the images waiting for one branch in one encoder call.

There is no batching window: a lone round starts at once. Callers announce the work that leads to a
round (`preparing`: decoding an image, cropping); an idle engine that gets a round while others are
being prepared waits for them (at most `gather_seconds`), so that questions started together are
prefilled together instead of the first alone while the others queue behind it. The thread starts
with the first request and ends after `idle_seconds` without work, so an idle engine holds no
thread and no tensors.

A waiter wakes when its round ends, and to hand the tokens generated so far to its `on_tokens`
every `flush_seconds` (not at every token: with many rows that would wake every waiter at every
step). A round whose prefill fails is retried alone, so it fails alone; a failed decode step is
retried the same way. A waiter that is cancelled (an asyncio task, an exception in its thread)
marks its round, and the engine drops the row before its next step.
"""
from __future__ import annotations

import asyncio
import atexit
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ..errors import ConfigError, VPTError
from ..perception.reencode import branch_features
from .batch import Batch, Round
from .conversation import Turn
from .static_decode import static_decoder

Tokens = Callable[[Sequence[int]], None]
"""Receives the tokens a round generated since the last call."""


class _Job:
    """An image to encode with a branch encoder in the engine thread, and the outcome."""

    def __init__(self, branch: str, image: torch.Tensor) -> None:
        self.branch, self.image = branch, image
        self.done = threading.Event()
        self.result: torch.Tensor | None = None
        self.error: BaseException | None = None


class Engine:
    """The batching engine of one model; get it with `engine_for(model)`."""

    def __init__(
        self,
        model,
        *,
        max_rows: int = 64,
        max_prefill_tokens: int = 16384,
        gather_seconds: float = 0.1,
        flush_seconds: float = 0.05,
        idle_seconds: float = 2.0,
    ):
        self._model = weakref.ref(model)
        self.compile = False
        self.gather_seconds, self.flush_seconds, self.idle_seconds = gather_seconds, flush_seconds, idle_seconds
        self.configure(max_rows=max_rows, max_prefill_tokens=max_prefill_tokens)
        self._reset()

    def configure(self, *, max_rows: int | None = None, max_prefill_tokens: int | None = None,
                  compile: bool | None = None) -> None:
        """Rows decoded together at most, and new tokens prefilled per admission at most (a round
        longer than that is admitted alone); `compile`: decode over a static cache with compiled steps
        (`static_decode`; on the CPU the same steps, eagerly). Affects every graph on this model from
        its next batch."""
        if compile is not None:
            self.compile = bool(compile)
        for name, value in (("max_rows", max_rows), ("max_prefill_tokens", max_prefill_tokens)):
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ConfigError(f"{name} must be a positive int, got {value!r}")
                setattr(self, name, value)

    def close(self) -> None:
        """End the engine thread once the work in hand is done (later work starts it again)."""
        with self._cond:
            thread, self._closing = self._thread, True
            self._cond.notify()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _reset(self) -> None:
        self._closing = False
        self._cond = threading.Condition()
        self._waiting: deque[Round] = deque()
        self._jobs: deque[_Job] = deque()
        self._thread: threading.Thread | None = None
        self._batch: Batch | None = None
        self._waiters: dict[int, Callable[[], None]] = {}
        self._preparing = 0

    @property
    def rows(self) -> int:
        """Rows in the batch now."""
        batch = self._batch
        return len(batch) if batch is not None else 0

    # ------------------------------------------------------------------------------- callers
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

    def encode(self, branch: str, image: torch.Tensor) -> torch.Tensor:
        """Raw `branch` features of a uint8 (3, H, W) image (`branch_features`), computed in the
        engine thread between two steps, in one encoder call with the other images waiting for it."""
        job = _Job(branch, image)
        with self._cond:
            self._jobs.append(job)
            self._wake()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def generate(self, round_: Round, on_tokens: Tokens | None = None) -> Turn:
        """Run `round_` with whatever else is running and return its turn; `on_tokens` gets the
        tokens as they come (in this thread). Raises the round's error."""
        done = threading.Event()
        self._submit(round_, done.set)
        sent = 0
        try:
            while not done.wait(self.flush_seconds if on_tokens is not None else None):
                sent = _flush(round_, sent, on_tokens)
            _flush(round_, sent, on_tokens)
            return round_.turn()
        except BaseException:
            round_.cancelled = True
            raise

    async def agenerate(self, round_: Round, on_tokens: Tokens | None = None) -> Turn:
        """`generate` for asyncio: awaits without holding a thread; cancelling the task cancels the round."""
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def notify() -> None:
            try:
                loop.call_soon_threadsafe(done.set)
            except RuntimeError:  # the loop is closed: nobody waits any more
                round_.cancelled = True

        self._submit(round_, notify)
        sent = 0
        try:
            while not await _waited(done, self.flush_seconds if on_tokens is not None else None):
                sent = _flush(round_, sent, on_tokens)
            _flush(round_, sent, on_tokens)
            return round_.turn()
        except BaseException:
            round_.cancelled = True
            raise

    def _submit(self, round_: Round, notify: Callable[[], None]) -> None:
        with self._cond:
            self._waiters[id(round_)] = notify
            self._waiting.append(round_)
            self._wake()

    def _wake(self) -> None:
        """With the lock held: work arrived."""
        self._closing = False
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="vpt-engine", daemon=True)
            self._thread.start()
        self._cond.notify()

    # ---------------------------------------------------------------------------- the thread
    def _run(self) -> None:
        with torch.no_grad():
            while (work := self._next()) is not None:
                self._serve(*work)
                del work  # nothing of a finished round stays referenced while the thread waits

    def _serve(self, batch: Batch, jobs: list[_Job], newcomers: list[Round]) -> None:
        """One turn of the thread: encode, admit, step."""
        _encode(batch.model, jobs)
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

    def _next(self) -> tuple[Batch, list[_Job], list[Round]] | None:
        """Wait for work; the batch, the jobs and the rounds to admit now, or None when the thread should end."""
        with self._cond:
            while not self._waiting and not self._jobs and not self.rows:
                if self._closing or not self._cond.wait(self.idle_seconds) and not self._waiting and not self._jobs:
                    self._thread, self._batch = None, None
                    return None
            if not self.rows and not self._jobs:  # idle: rounds being prepared start with the waiting ones
                deadline = time.monotonic() + self.gather_seconds
                while self._preparing and not self._jobs and len(self._waiting) < self.max_rows:
                    if (left := deadline - time.monotonic()) <= 0:
                        break
                    self._cond.wait(left)
            jobs, self._jobs = list(self._jobs), deque()
            if not self.rows:  # a new batch on an idle engine: the model may have moved since the last one
                model = self._model()
                if model is None:
                    self._fail_waiting(VPTError("the model of this engine was deleted"))
                    for job in jobs:
                        job.error = VPTError("the model of this engine was deleted")
                        job.done.set()
                    self._thread = None
                    return None
                self._batch = Batch(model, static_decoder(model) if self.compile else None)
            newcomers, tokens = [], 0
            while self._waiting and len(self._batch) + len(newcomers) < self.max_rows:
                round_ = self._waiting[0]
                if round_.cancelled:
                    self._waiters.pop(id(self._waiting.popleft()), None)
                    continue
                size = _prefill_size(round_)
                if newcomers and tokens + size > self.max_prefill_tokens:
                    break
                newcomers.append(self._waiting.popleft())
                tokens += size
            return self._batch, jobs, newcomers

    def _end(self, round_: Round) -> None:
        """Wake the round's waiter: it stopped or failed."""
        notify = self._forget(round_)
        if notify is not None:
            notify()

    def _forget(self, round_: Round) -> Callable[[], None] | None:
        with self._cond:
            return self._waiters.pop(id(round_), None)

    def _fail_waiting(self, error: BaseException) -> None:
        while self._waiting:
            round_ = self._waiting.popleft()
            round_.error = error
            notify = self._waiters.pop(id(round_), None)
            if notify is not None:
                notify()


def _encode(model, jobs: list[_Job]) -> None:
    """Each branch's images in one encoder call; if that fails, one by one (a bad image fails alone)."""
    groups: dict[str, list[_Job]] = {}
    for job in jobs:
        groups.setdefault(job.branch, []).append(job)
    for branch, group in groups.items():
        try:
            for job, features in zip(group, branch_features(model, branch, [job.image for job in group])):
                job.result = features
        except BaseException as exc:
            if len(group) > 1:
                for job in group:
                    _encode(model, [job])
                continue
            group[0].error = exc
        for job in group:
            job.done.set()


async def _waited(event: asyncio.Event, timeout: float | None) -> bool:
    """`threading.Event.wait` for an asyncio event: whether it was set within `timeout` seconds."""
    try:
        await asyncio.wait_for(event.wait(), timeout)
        return True
    except TimeoutError:
        return False


def _flush(round_: Round, sent: int, on_tokens: Tokens | None) -> int:
    """Hand the round's new tokens to `on_tokens`; how many it has had."""
    tokens = round_.tokens[sent:]
    if tokens and on_tokens is not None:
        on_tokens(tokens)
    return sent + len(tokens)


def _prefill_size(round_: Round) -> int:
    queued = round_.conversation.queued
    return len(queued.ids) if queued is not None else 1


_ENGINES: weakref.WeakKeyDictionary[Any, Engine] = weakref.WeakKeyDictionary()
"""Model -> its engine."""
_ALL: weakref.WeakSet[Engine] = weakref.WeakSet()
"""Every engine alive, also one whose model is gone while its thread runs on."""
_ENGINES_LOCK = threading.Lock()


def engine_for(model) -> Engine:
    """The batching engine of `model` (made on first use): every graph and thread using this model shares it."""
    with _ENGINES_LOCK:
        engine = _ENGINES.get(model)
        if engine is None:
            engine = _ENGINES[model] = Engine(model)
            _ALL.add(engine)
        return engine


@atexit.register
def _close_all() -> None:
    """Engine threads end before the interpreter does (a daemon thread stopped inside torch aborts it)."""
    for engine in list(_ALL):
        engine.close()


def _after_fork() -> None:
    """A forked child has none of its parent's threads: its engines start empty."""
    global _ENGINES_LOCK
    _ENGINES_LOCK = threading.Lock()
    for engine in list(_ALL):
        engine._reset()


os.register_at_fork(after_in_child=_after_fork)
