"""Dynamic micro-batching: requests that are waiting when the model comes free share one run, up to max_batch.

A request that finds the model idle runs at once; batches form from the requests that queue up while a run is in
progress (max_wait > 0 adds a wait for company, as Triton's max_queue_delay does only when asked). Requests wait in
a bounded queue; a full queue refuses at once (the caller answers 503) instead of letting latency grow without
bound. A request of more than max_batch samples runs as pieces of max_batch, one piece queued at a time, so it takes
turns with the others and ONNX Runtime never plans memory for a larger batch than warm-up did. One worker coroutine
forms batches and runs the model in a single dedicated thread, so ONNX Runtime's intra-op threads get every core
and the event loop stays free for I/O.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)


class Runnable(Protocol):
    def run(self, x: np.ndarray) -> Any: ...  # an array, or a tuple of arrays, with len(x) rows each


class QueueFull(Exception):
    """The batcher already holds max_queue requests."""


class Closed(Exception):
    """The batcher is shutting down and takes no new work."""


@dataclass(eq=False)
class _Job:
    model: Runnable
    x: np.ndarray
    future: asyncio.Future = field(repr=False)
    explain: bool = False  # computed only for the requests that ask: they batch among themselves

    @property
    def n(self) -> int:
        return len(self.x)


class MicroBatcher:
    """Groups submitted arrays into batches per model; `submit` returns (outputs, model that ran them)."""

    def __init__(self, max_batch: int, max_wait_s: float, max_queue: int,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self._on_batch = on_batch
        self._pending: deque[_Job] = deque()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False

    @property
    def depth(self) -> int:
        return len(self._pending)

    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tlops-infer")
        self._worker = asyncio.create_task(self._loop(), name="tlops-batcher")

    async def submit(self, model: Runnable, x: np.ndarray, explain: bool = False) -> tuple[Any, Any]:
        """Run x (N, ...) through `model` (model.run(x, explain=True) when `explain`) in pieces of at most max_batch;
        (outputs for all N rows, the model).
        Raise QueueFull or Closed at once when a piece cannot be queued.

        Cancelling the caller (e.g. on its timeout) withdraws the piece that has not run yet.
        """
        if len(x) <= self.max_batch:
            return await self._submit(model, x, explain)
        parts = []
        for start in range(0, len(x), self.max_batch):
            y, _ = await self._submit(model, x[start:start + self.max_batch], explain)
            parts.append(y)
        return _concat(parts), model

    async def _submit(self, model: Runnable, x: np.ndarray, explain: bool) -> tuple[Any, Any]:
        if self._closing or self._wakeup is None:
            raise Closed("the service is shutting down")
        if len(self._pending) >= self.max_queue:
            raise QueueFull(f"{len(self._pending)} requests already queued (serve.max_queue)")
        job = _Job(model, x, asyncio.get_running_loop().create_future(), explain)
        self._pending.append(job)
        self._wakeup.set()
        try:
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:
            job.future.cancel()
            if job in self._pending:
                self._pending.remove(job)
            raise

    async def close(self) -> None:
        """Refuse new work, finish everything queued, then stop the worker and its thread."""
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._worker is not None:
            await self._worker
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def _loop(self) -> None:
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                await self._fill_window()
                batch = self._take_batch()
                if batch:
                    await self._run(batch)
            except Exception:  # a bug here must not stop every later request: log it and go on
                log.exception("batcher iteration failed")

    async def _fill_window(self) -> None:
        """Wait until max_batch samples are queued or max_wait has passed since the oldest arrived."""
        if self.max_wait_s <= 0:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while not self._closing and sum(j.n for j in self._pending) < self.max_batch:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take_batch(self) -> list[_Job]:
        """Queued jobs for the oldest job's model (and explain), in order, up to max_batch samples (the first always
        goes)."""
        batch: list[_Job] = []
        n = 0
        if not self._pending:  # every waiting caller gave up during the window
            return batch
        model, explain = self._pending[0].model, self._pending[0].explain
        for job in list(self._pending):
            if job.model is not model or job.explain != explain:
                continue  # preprocessed for another model (a swap happened): it goes in a later batch
            if batch and n + job.n > self.max_batch:
                break
            self._pending.remove(job)
            if job.future.done():  # the caller gave up (timeout, disconnect)
                continue
            batch.append(job)
            n += job.n
        return batch

    async def _run(self, batch: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        model = batch[0].model
        # One batch of several requests: the model joins them (a text model pads them to the longest sequence).
        x = batch[0].x if len(batch) == 1 else getattr(model, "join", np.concatenate)([j.x for j in batch])
        t0 = loop.time()
        try:
            run = functools.partial(model.run, explain=True) if batch[0].explain else model.run
            y = await loop.run_in_executor(self._executor, run, x)
        except Exception as e:  # reported to every caller in the batch; the batcher keeps serving
            log.exception("model run failed for a batch of %d", len(x))
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        if self._on_batch is not None:
            self._on_batch(len(x), loop.time() - t0)
        start = 0
        for job in batch:
            if not job.future.done():
                job.future.set_result((_rows(y, start, start + job.n), model))
            start += job.n


def _concat(parts: list[Any]) -> Any:
    """The outputs of consecutive pieces as one: arrays concatenated, or a tuple (NamedTuple too) of them."""
    first = parts[0]
    if isinstance(first, tuple):
        return type(first)(*(None if a is None else _join([p[i] for p in parts]) for i, a in enumerate(first)))
    return _join(parts)


def _join(arrays: list[np.ndarray]) -> np.ndarray:
    """Arrays along the first axis; a shorter last axis of a 3-D one (per-token shares of texts padded in other
    batches) padded with zeros."""
    if arrays[0].ndim == 3:
        width = max(a.shape[-1] for a in arrays)
        arrays = [np.pad(a, ((0, 0), (0, 0), (0, width - a.shape[-1]))) for a in arrays]
    return np.concatenate(arrays)


def _rows(y: Any, start: int, stop: int) -> Any:
    """Rows start:stop of a model's output: an array, or a tuple (NamedTuple too) of arrays or None."""
    if isinstance(y, tuple):
        return type(y)(*(None if a is None else a[start:stop] for a in y))
    return y[start:stop]
