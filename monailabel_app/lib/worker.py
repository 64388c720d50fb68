"""The one thread that runs the model, fed by a bounded priority queue.

The model is not shared between threads (heat maps switch attention recording on and off and take
gradients), so every use of it goes through this worker: interactive requests first, background
embedding of the datastore when nothing else waits. Requests past ``max_queue`` are refused at once
(the server answers 503 with Retry-After) instead of piling up.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from concurrent.futures import Future

log = logging.getLogger(__name__)

INTERACTIVE, BACKGROUND = 0, 1


class QueueFull(RuntimeError):
    """Too many interactive requests are waiting; ``retry_after`` is a guess in whole seconds."""

    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"the inference queue is full ({waiting} requests waiting); try again in about {retry_after} s")
        self.waiting = waiting
        self.retry_after = retry_after


class InferenceWorker:
    def __init__(self, max_queue: int, threads: int | None = None, name: str = "hlip-infer"):
        self.max_queue = max_queue
        self.threads = threads
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._lock = threading.Lock()
        self._waiting = 0  # interactive jobs queued, not yet started
        self._busy = False
        self._seconds = 1.0  # running mean of an interactive job's duration
        self.done = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> "InferenceWorker":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._queue.put((-1, next(self._order), None, None, None))
        self._thread.join(timeout)

    def submit(self, fn, priority: int = INTERACTIVE) -> Future:
        """Run ``fn()`` on the worker; returns a Future. Raises QueueFull for an interactive job
        when ``max_queue`` of them already wait."""
        future: Future = Future()
        with self._lock:
            if self._stop.is_set():
                raise RuntimeError("the inference worker is stopped")
            if priority == INTERACTIVE:
                if self._waiting >= self.max_queue:
                    raise QueueFull(self._waiting, self.retry_after())
                self._waiting += 1
        self._queue.put((priority, next(self._order), fn, future, priority == INTERACTIVE))
        return future

    def retry_after(self) -> int:
        return max(1, int(round(self._seconds * (self._waiting + 1))))

    def status(self) -> dict:
        return {"busy": self._busy, "waiting": self._waiting, "max_queue": self.max_queue, "done": self.done,
                "mean_seconds": round(self._seconds, 3)}

    def _run(self) -> None:
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)  # intra-op threads are per process; set where the model runs
        while True:
            _, _, fn, future, interactive = self._queue.get()
            if fn is None:
                break
            if interactive:
                with self._lock:
                    self._waiting -= 1
            if not future.set_running_or_notify_cancel():
                continue
            self._busy = True
            start = time.perf_counter()
            try:
                future.set_result(fn())
            except BaseException as e:  # the caller decides what an error means
                future.set_exception(e)
            finally:
                self._busy = False
                self.done += 1
                if interactive:
                    self._seconds = 0.8 * self._seconds + 0.2 * (time.perf_counter() - start)
        while not self._queue.empty():  # fail what is left so no caller waits forever
            _, _, fn, future, _ = self._queue.get_nowait()
            if future is not None and future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError("the server is shutting down"))
