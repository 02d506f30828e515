"""An asyncio micro-batcher: turns of different conversations share one model call.

Requests wait in a bounded queue. One worker takes the first waiting request, then collects more
until it holds ``max_batch`` or ``max_wait_ms`` have passed since it took the first (whatever is
already waiting is taken at once, so under load a batch fills from the backlog without waiting),
and runs ONE ``run(inputs)`` call (``Bundle.probabilities``: the inputs padded to the batch's
longest) in a one-thread executor, so the event loop keeps accepting requests meanwhile. A request
that finds the queue full gets :class:`Overloaded` at once (the server answers 503 + Retry-After).

Each request's result carries its row of probabilities, its queue wait, the model time of its batch
and the batch size. Imports nothing of the web stack.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np


class Overloaded(Exception):
    """The server cannot take this turn now; ``retry_after_s``: a hint of when to try again."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s

    @property
    def retry_after_header(self) -> str:
        """``Retry-After`` in whole seconds (HTTP's delta-seconds), at least 1."""
        return str(max(1, math.ceil(self.retry_after_s)))


@dataclass(frozen=True)
class BatchResult:
    probabilities: np.ndarray
    """This request's row, in the bundle's label order."""
    queue_ms: float
    """From :meth:`MicroBatcher.submit` to the start of the model call that ran it."""
    model_ms: float
    """Duration of that model call (the whole batch)."""
    batch_size: int


@dataclass
class _Request:
    input: Any
    future: asyncio.Future
    enqueued: float


class MicroBatcher:
    """Batches :meth:`submit` calls into ``run`` calls.

    ``run``: inputs -> an array with one row per input (called in a worker thread, one call at a
    time); ``on_batch(size, model_s)``: called on the event loop after each model call (metrics).
    Call :meth:`start` on the running loop before submitting, :meth:`stop` at shutdown.
    """

    def __init__(self, run: Callable[[Sequence[Any]], np.ndarray], max_batch: int = 8, max_wait_ms: float = 0.0,
                 queue_size: int = 64, on_batch: Callable[[int, float], None] | None = None) -> None:
        if max_batch < 1 or queue_size < 1 or max_wait_ms < 0:
            raise ValueError(f"need max_batch >= 1, queue_size >= 1, max_wait_ms >= 0; got {max_batch}, "
                             f"{queue_size}, {max_wait_ms}")
        self.run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.queue_size = queue_size
        self.on_batch = on_batch
        self.batches = 0
        self.model_s_avg = 0.0
        """Moving average of the model time per call (the Retry-After hint)."""
        self._queue: asyncio.Queue[_Request] | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def depth(self) -> int:
        """Requests waiting in the queue (not those in the running batch)."""
        return 0 if self._queue is None else self._queue.qsize()

    @property
    def alive(self) -> bool:
        return self._worker is not None and not self._worker.done()

    async def start(self) -> None:
        self._queue = asyncio.Queue(self.queue_size)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="erc-model")
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="erc-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        stopping = RuntimeError("the server is shutting down")
        while self._queue is not None and not self._queue.empty():
            _fail(self._queue.get_nowait(), stopping)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, x: Any) -> BatchResult:
        """Queue one input and wait for its result; :class:`Overloaded` when the queue is full."""
        if self._queue is None or not self.alive:
            raise RuntimeError("the batcher is not running")
        if self._queue.full():
            wait = (self.queue_size / self.max_batch + 1) * self.model_s_avg + self.max_wait_s
            raise Overloaded(f"the queue is full ({self.queue_size} turns waiting for the model); retry shortly",
                             retry_after_s=wait)
        request = _Request(x, asyncio.get_running_loop().create_future(), time.perf_counter())
        self._queue.put_nowait(request)
        return await request.future

    async def _work(self) -> None:
        assert self._queue is not None
        while True:
            batch: list[_Request] = []
            try:
                await self._collect(batch)
                await self._run_batch([r for r in batch if not r.future.done()])  # skip callers that gave up
            except asyncio.CancelledError:  # stop(): nobody is left waiting forever
                for r in batch:
                    _fail(r, RuntimeError("the server is shutting down"))
                raise

    async def _collect(self, batch: list[_Request]) -> None:
        loop = asyncio.get_running_loop()
        assert self._queue is not None
        batch.append(await self._queue.get())
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                return

    async def _run_batch(self, batch: list[_Request]) -> None:
        if not batch:
            return
        start = time.perf_counter()
        try:
            out = await asyncio.get_running_loop().run_in_executor(self._executor, self.run, [r.input for r in batch])
            if len(out) != len(batch):
                raise RuntimeError(f"the model returned {len(out)} rows for {len(batch)} inputs")
        except Exception as err:  # the model call failed: every request of the batch gets the error
            for r in batch:
                _fail(r, err)
            return
        model_s = time.perf_counter() - start
        self.batches += 1
        self.model_s_avg = model_s if self.batches == 1 else 0.9 * self.model_s_avg + 0.1 * model_s
        for i, r in enumerate(batch):
            if not r.future.done():
                r.future.set_result(BatchResult(out[i], 1000 * (start - r.enqueued), 1000 * model_s, len(batch)))
        if self.on_batch is not None:
            try:
                self.on_batch(len(batch), model_s)
            except Exception:  # metrics must never stop the worker
                pass


def _fail(request: _Request, err: BaseException) -> None:
    if not request.future.done():
        request.future.set_exception(err)
