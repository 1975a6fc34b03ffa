"""The server's request queue: items arriving within a short window run as one engine batch.

Every caller (each API request, each page submission) puts its items on one bounded queue and
waits on futures. A single worker thread takes the oldest waiting item, keeps collecting items
of the same prompt bucket for ``window_s`` or until the engine's ``rows`` are full, and runs them
as one batch, so concurrent requests share the image encoders and the decoding loop (a batch
costs what its longest prompt costs, so one long question does not slow a batch of short ones;
the others wait, in order, for the next batch). A full queue refuses at once
(:class:`QueueFull`, with a retry estimate); a caller that waits past its timeout gets
:class:`RequestTimeout` and its items still in the queue are dropped unrun.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from concurrent.futures import Future
from typing import Sequence

from m2sa_jax.inference.engine import Item, Segmented, SegmentEngine

log = logging.getLogger(__name__)


class QueueFull(Exception):
    def __init__(self, retry_after_s: int):
        super().__init__(f"the server is busy: its queue is full; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class RequestTimeout(Exception):
    pass


class _Entry:
    __slots__ = ("item", "future", "submitted", "started")

    def __init__(self, item: Item):
        self.item, self.future = item, Future()
        self.submitted, self.started = time.perf_counter(), None


class Batcher:
    """One worker thread feeding ``engine`` batches of up to ``engine.rows`` items.

    Arguments:
      engine: a warmed-up :class:`SegmentEngine` (or one that warms up before :meth:`start`).
      window_s: how long the first item of a batch waits for company.
      max_queue: items waiting at most; beyond it :meth:`submit` raises :class:`QueueFull`.
      timeout_s: default limit for :meth:`segment`, queueing included.
    """

    def __init__(self, engine: SegmentEngine, *, window_s: float = 0.02, max_queue: int = 64,
                 timeout_s: float = 120.0):
        self.engine, self.window_s, self.timeout_s = engine, window_s, timeout_s
        self.max_queue = max_queue
        self._queue: collections.deque[_Entry] = collections.deque()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.batch_seconds = 1.0          # running mean of one batch's duration
        self.batches = 0

    # --- callers --------------------------------------------------------------------------

    def pending(self) -> int:
        return len(self._queue)

    def submit(self, items: Sequence[Item]) -> list[_Entry]:
        """Queues all of ``items`` or none of them."""
        with self._cond:
            if len(self._queue) + len(items) > self.max_queue:
                for e in [e for e in self._queue if e.future.cancelled()]:
                    self._queue.remove(e)                        # timed out while queued
            if len(self._queue) + len(items) > self.max_queue:
                raise QueueFull(self._retry_after())
            entries = [_Entry(it) for it in items]
            self._queue.extend(entries)
            self._cond.notify()
        return entries

    def _retry_after(self) -> int:
        waiting_batches = len(self._queue) / max(1, self.engine.rows) + 1
        return max(1, math.ceil(waiting_batches * self.batch_seconds))

    def wait(self, entries: Sequence[_Entry], timeout_s: float | None = None
             ) -> list[tuple[Segmented, float]]:
        """(result, seconds spent queued) per entry; :class:`RequestTimeout` past the limit."""
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        out = []
        try:
            for e in entries:
                result = e.future.result(timeout=max(0.0, deadline - time.monotonic()))
                out.append((result, e.started - e.submitted))
        except TimeoutError:
            for e in entries:
                e.future.cancel()             # not yet started: the worker skips it
            raise RequestTimeout(
                f"no answer within {self.timeout_s if timeout_s is None else timeout_s:g} s "
                f"(the server is busy or the request is large); retry later") from None
        return out

    def segment(self, items: Sequence[Item], timeout_s: float | None = None
                ) -> list[tuple[Segmented, float]]:
        return self.wait(self.submit(items), timeout_s)

    # --- the worker ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="m2sa-batcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _collect(self) -> list[_Entry]:
        """The oldest live entry and, within the window, more of its prompt bucket."""
        with self._cond:
            first = None
            while first is None and not self._stop.is_set():
                while self._queue and first is None:
                    e = self._queue.popleft()
                    if e.future.set_running_or_notify_cancel():     # skips timed-out entries
                        first = e
                if first is None:
                    self._cond.wait(timeout=0.2)
            if first is None:
                return []
            batch, bucket = [first], self.engine.bucket_of(first.item)
            deadline = time.monotonic() + self.window_s
            while len(batch) < self.engine.rows:
                for e in [e for e in self._queue if e.future.cancelled()]:
                    self._queue.remove(e)
                same = [e for e in self._queue if self.engine.bucket_of(e.item) == bucket]
                for e in same[:self.engine.rows - len(batch)]:
                    self._queue.remove(e)
                    if e.future.set_running_or_notify_cancel():
                        batch.append(e)
                remaining = deadline - time.monotonic()
                if len(batch) >= self.engine.rows or remaining <= 0:
                    break
                self._cond.wait(timeout=remaining)
            return batch

    def _loop(self) -> None:
        while not self._stop.is_set():
            batch = self._collect()
            if not batch:
                continue
            start = time.perf_counter()
            for e in batch:
                e.started = start
            try:
                results = self.engine.run([e.item for e in batch])
            except Exception as exc:           # a failed batch fails its callers, not the server
                log.exception("batch of %d failed", len(batch))
                for e in batch:
                    e.future.set_exception(exc)
                continue
            for e, r in zip(batch, results):
                e.future.set_result(r)
            seconds = time.perf_counter() - start
            self.batches += 1
            self.batch_seconds = seconds if self.batches == 1 else 0.8 * self.batch_seconds + 0.2 * seconds
