"""Work off the GUI thread: a cancel flag that can also abort a blocked socket, a progress
holder, and a background task that a GUI polls (Slicer's widget polls it from a QTimer, so no
Qt object is ever touched from the worker thread).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Generic, Optional, TypeVar

from .errors import Cancelled

log = logging.getLogger(__name__)

T = TypeVar("T")


class CancelToken:
    """Set once by ``cancel()`` (from any thread). Long work calls ``check()`` between chunks;
    a blocking request registers an ``on_cancel`` callback that closes its socket, so that a
    request waiting for the server is abandoned at once."""

    def __init__(self):
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def cancel(self) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # an abort that fails must not stop the others
                log.debug("cancel callback failed", exc_info=True)

    def check(self) -> None:
        """Raise ``Cancelled`` when cancelled."""
        if self._event.is_set():
            raise Cancelled()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True when cancelled meanwhile."""
        return self._event.wait(max(0.0, seconds))

    def on_cancel(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` on cancel (at once when already cancelled). Returns a function that
        unregisters it."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)

                def remove() -> None:
                    with self._lock:
                        if callback in self._callbacks:
                            self._callbacks.remove(callback)

                return remove
        callback()
        return lambda: None


class Progress:
    """Thread-safe (fraction, message) with an optional listener; ``fraction`` is None while the
    amount of work is unknown (e.g. waiting for the server). Call it as ``progress(0.4, "text")``."""

    def __init__(self, listener: Optional[Callable[[Optional[float], str], None]] = None):
        self._lock = threading.Lock()
        self._fraction: Optional[float] = 0.0
        self._message = ""
        self.listener = listener

    def __call__(self, fraction: Optional[float], message: str = "") -> None:
        if fraction is not None:
            fraction = min(1.0, max(0.0, float(fraction)))
        with self._lock:
            self._fraction, self._message = fraction, message or self._message
        if self.listener is not None:
            self.listener(fraction, message)

    def snapshot(self) -> tuple[Optional[float], str]:
        with self._lock:
            return self._fraction, self._message

    def scaled(self, start: float, end: float) -> Callable[[Optional[float], str], None]:
        """A progress callback for one stage of the work that maps [0, 1] onto [start, end]."""

        def report(fraction: Optional[float], message: str = "") -> None:
            self(None if fraction is None else start + (end - start) * fraction, message)

        return report


class BackgroundTask(Generic[T]):
    """Runs ``work(progress, cancel)`` on a daemon thread.

    The caller polls: ``done`` (bool), ``progress.snapshot()``, then ``result()`` which returns
    the value or raises the work's exception (``Cancelled`` after ``cancel()``)."""

    def __init__(self, work: Callable[[Progress, CancelToken], T], name: str = "SlicerHLIP task"):
        self.work = work
        self.name = name
        self.progress = Progress()
        self.cancel_token = CancelToken()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._value: Optional[T] = None
        self._error: Optional[BaseException] = None
        self._finished = threading.Event()
        self.started_at: Optional[float] = None
        self.seconds: Optional[float] = None

    def start(self) -> "BackgroundTask[T]":
        self.started_at = time.perf_counter()
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self._value = self.work(self.progress, self.cancel_token)
        except BaseException as e:  # handed to the GUI thread by result()
            self._error = e
        finally:
            self.seconds = time.perf_counter() - (self.started_at or time.perf_counter())
            self._finished.set()

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    def cancel(self) -> None:
        self.cancel_token.cancel()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until done (for scripts and tests, never on the GUI thread); True when done."""
        return self._finished.wait(timeout)

    def result(self) -> T:
        if not self._finished.is_set():
            raise RuntimeError(f"{self.name} is still running")
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]
