"""Server state: the (possibly still loading) engine, the request queue, and running one generation.

Concurrency model: the engine is single-user, so exactly one generation runs at a time.  A request first
passes admission (:meth:`Scheduler.acquire`): if a generation is running and ``max_queue`` requests already
wait, it is refused with 429 and a ``Retry-After`` estimate; otherwise it waits its turn (FIFO, an
``asyncio.Lock``).  The generation then runs in a one-thread executor and hands its chunks to the event
loop through an ``asyncio.Queue``; the slot is released when that thread has finished, never earlier, so a
cancelled generation cannot overlap the next one.  Cancelling sets a ``threading.Event`` that the engine
checks before every prefill chunk and decode step.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Iterator, Optional

from kimi_local.server.errors import APIError
from kimi_local.server.metrics import Metrics
from kimi_local.server.settings import ServerSettings

log = logging.getLogger("kimi_local.server")


class Scheduler:
    """Admission control and mutual exclusion for the single engine."""

    def __init__(self, max_queue: int):
        self.max_queue = max(0, int(max_queue))
        self.waiting = 0
        self.running = 0
        self._lock: Optional[asyncio.Lock] = None
        self._durations: collections.deque = collections.deque(maxlen=16)
        self._started = 0.0

    def retry_after(self) -> int:
        """Seconds a refused client should wait: the average generation time times the queue ahead."""
        avg = sum(self._durations) / len(self._durations) if self._durations else 2.0
        return max(1, int(avg * (self.waiting + 1) + 0.999))

    async def acquire(self) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        if (self._lock.locked() or self.waiting) and self.waiting >= self.max_queue:
            ra = self.retry_after()
            raise APIError(429, f"server busy: one generation is running and {self.waiting} request(s) are "
                                f"queued (--max-queue {self.max_queue}); retry in about {ra} s",
                           code="rate_limit_exceeded", headers={"Retry-After": str(ra)})
        self.waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self.waiting -= 1
        self.running = 1
        self._started = time.monotonic()

    def release(self) -> None:
        self._durations.append(time.monotonic() - self._started)
        self.running = 0
        assert self._lock is not None
        self._lock.release()


_END = object()


class Generation:
    """A generation running in the worker thread; iterate it (async) for ``GenerationChunk``s.

    Created only after :meth:`Scheduler.acquire` succeeded; the scheduler slot is released when the
    worker thread finishes.  ``cancel()`` is idempotent and safe after the end.
    """

    def __init__(self, state: "ServerState", chunks: Iterator, cancel: threading.Event):
        self._cancel = cancel
        self._queue: asyncio.Queue = asyncio.Queue()
        self._state = state
        self.cancelled = False
        loop = asyncio.get_running_loop()

        def put(item: Any) -> None:
            loop.call_soon_threadsafe(self._queue.put_nowait, item)

        def work() -> None:
            final = None
            try:
                for chunk in chunks:
                    if chunk.finish_reason is not None:
                        final = chunk
                    put(chunk)
            except BaseException as e:  # handed to the consumer, which answers 500 / an error event
                put(e)
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()  # releases the engine lock even if the loop above stopped early
                put(_END)
                if final is not None:
                    state.metrics.record_generation(final.timings, cancelled=final.finish_reason == "cancelled")

        future = loop.run_in_executor(state.executor, work)
        future.add_done_callback(lambda _: state.scheduler.release())

    def cancel(self) -> None:
        if not self._cancel.is_set():
            self.cancelled = True
            self._cancel.set()

    async def __aiter__(self) -> AsyncIterator:
        while True:
            item = await self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class ServerState:
    """Everything the routes share: settings, the engine once loaded, the scheduler and the metrics."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.metrics = Metrics()
        self.scheduler = Scheduler(settings.max_queue)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kimi-generate")
        self.engine: Any = None
        self.model_dir: Optional[str] = None
        self.model_id: str = settings.alias or "kimi-local"
        self.template: Optional[str] = None
        self.created = int(time.time())
        self.load_done = 0
        self.load_total = 0
        self.load_error: Optional[str] = None
        self.load_started = time.monotonic()

    # ------------------------------------------------------------------ loading

    def progress(self, done_bytes: int, total_bytes: int) -> None:
        self.load_done, self.load_total = int(done_bytes), int(total_bytes)

    @property
    def load_fraction(self) -> float:
        return min(1.0, self.load_done / self.load_total) if self.load_total else 0.0

    def set_engine(self, engine: Any, model_dir: Optional[str] = None) -> None:
        """Make ``engine`` serve requests.  ``model_dir`` gives the model id and the chat template."""
        self.model_dir = model_dir
        if model_dir:
            path = os.path.join(model_dir, "chat_template.jinja")
            if os.path.isfile(path):
                with open(path, "r", encoding="utf-8") as f:
                    self.template = f.read()
            if not self.settings.alias:
                self.model_id = os.path.basename(os.path.normpath(model_dir)) or self.model_id
            try:
                self.created = int(os.path.getmtime(os.path.join(model_dir, "config.json")))
            except OSError:
                pass
        self.engine = engine
        log.info("model %s ready (context %d tokens)", self.model_id, engine.ctx_len)

    def load_in_background(self, model_dir: Optional[str], load_fn) -> threading.Thread:
        """Run ``load_fn(model_dir, progress) -> (engine, model_dir)`` in a thread; errors go to /health."""

        def target() -> None:
            try:
                engine, resolved = load_fn(model_dir, self.progress)
                self.set_engine(engine, resolved)
            except BaseException as e:  # the server stays up and says why in /health
                self.load_error = f"{type(e).__name__}: {e}"
                log.error("model failed to load: %s", self.load_error)

        t = threading.Thread(target=target, name="kimi-load", daemon=True)
        t.start()
        return t

    def require_engine(self) -> Any:
        if self.engine is not None:
            return self.engine
        if self.load_error:
            raise APIError(503, f"model failed to load: {self.load_error}")
        raise APIError(503, f"Loading model ({100 * self.load_fraction:.0f}%)", headers={"Retry-After": "5"})

    # ------------------------------------------------------------------ generating

    async def start_generation(self, chunks: Iterator, cancel: threading.Event) -> Generation:
        """Wait for the engine (or raise 429), then start ``chunks`` in the worker thread."""
        try:
            await self.scheduler.acquire()
        except BaseException:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
            raise
        try:
            return Generation(self, chunks, cancel)
        except BaseException:
            self.scheduler.release()
            raise

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
