"""Dynamic batching: one worker thread owns the model and runs queued jobs in batches.

A batch starts when ``max_batch`` jobs wait or when the oldest waiting job has waited
``max_wait_s`` (a job that queued while the worker was busy has usually waited that long, so a
busy server batches whatever accumulated without further delay). Admission is bounded: at most
``max_queue`` requests hold a slot (waiting or being encoded); the rest are refused at once
(HTTP 503) instead of piling up memory and latency.
"""
from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

from .engine import Engine, Job


class Batcher:
    def __init__(self, engine: Engine, max_batch: int = 8, max_wait_s: float = 0.01, max_queue: int = 64,
                 on_batch: Callable[[int], None] | None = None):
        for name, value, low in (("max_batch", max_batch, 1), ("max_queue", max_queue, 1)):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.engine = engine
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self.on_batch = on_batch
        self.slots = 0  # requests admitted and not yet answered
        self._queue: collections.deque[tuple[float, Job]] = collections.deque()
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="ps3-serve-worker", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def admit(self) -> bool:
        """Take a slot for a request; False when all ``max_queue`` slots are held."""
        with self._cv:
            if self.slots >= self.max_queue:
                return False
            self.slots += 1
            return True

    def release(self) -> None:
        with self._cv:
            self.slots -= 1

    def submit(self, job: Job) -> None:
        with self._cv:
            self._queue.append((time.monotonic(), job))
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        """Drop a job whose client left or timed out: out of the queue if it still waits (a job
        already being encoded finishes, and its result is discarded)."""
        job.future.cancel()
        with self._cv:
            for item in self._queue:
                if item[1] is job:
                    self._queue.remove(item)
                    break

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=30)

    def _next_batch(self) -> list[Job] | None:
        with self._cv:
            while True:
                if self._stop:
                    return None
                if self._queue:
                    due = self._queue[0][0] + self.max_wait_s
                    now = time.monotonic()
                    if len(self._queue) >= self.max_batch or now >= due:
                        n = min(self.max_batch, len(self._queue))
                        return [self._queue.popleft()[1] for _ in range(n)]
                    self._cv.wait(due - now)
                else:
                    self._cv.wait()

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if self.on_batch is not None:
                self.on_batch(len(batch))
            self.engine.run(batch)
