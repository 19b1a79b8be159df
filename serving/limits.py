"""What one request may cost, bounded before the expensive part: the service-wide budget of decoded samples, the
deadline a decoding thread checks between images, and giving freed memory back to the system after a burst."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class BudgetSpent(Exception):
    """The service holds as many decoded samples as serve.max_inflight_samples allows."""


class TooLarge(Exception):
    """One request declares more samples than the whole budget: it could never be served."""


class Budget:
    """Decoded samples held at once, service-wide: reserved before decoding starts, released when the answer is
    built. Never a queue: a reservation that does not fit fails at once (the caller answers 503 + Retry-After).

    The last `headroom` samples are for small requests (at most `headroom` samples each): large requests cannot
    take them, so a client sending one image is served while others flood the service with batches."""

    def __init__(self, capacity: int, headroom: int = 0) -> None:
        self.capacity, self.headroom = capacity, min(headroom, capacity)
        self.used = 0
        self.peak = 0  # the most held at once since the last trim (see Trimmer)
        self._lock = threading.Lock()

    def reserve(self, n: int) -> None:
        limit = self.capacity if n <= self.headroom else self.capacity - self.headroom
        if n > limit:
            raise TooLarge(f"{n} samples in one request; the service holds at most {limit} of a request this size "
                           "at once (serve.max_inflight_samples less max_batch for small requests)")
        with self._lock:
            if self.used + n > limit:
                raise BudgetSpent(f"{self.used} of {self.capacity} samples in flight (serve.max_inflight_samples)")
            self.used += n
            self.peak = max(self.peak, self.used)

    def release(self, n: int) -> None:
        with self._lock:
            self.used -= n


class Ticket:
    """One request's reservation, shared by the event loop and the thread decoding for it: the samples are released
    when both are done with them, so a request the loop gave up on (its timeout) holds its share until its thread,
    which stops at its next deadline check, has let go of the decoded images."""

    def __init__(self, budget: Budget, on_release: Callable[[], None] | None = None) -> None:
        self._budget, self._on_release = budget, on_release
        self._held, self._owners = 0, 2
        self._lock = threading.Lock()

    def reserve(self, n: int) -> None:
        """From the decoding thread, before it decodes; DeadlineExceeded if the loop has given up already."""
        with self._lock:
            if self._owners < 2:
                raise DeadlineExceeded()
            self._budget.reserve(n)
            self._held = n

    def done(self) -> None:
        """Each owner once, when it lets go (the thread when it ends, the loop when the answer is built)."""
        with self._lock:
            self._owners -= 1
            n = self._held if self._owners == 0 else 0
            if n:
                self._held = 0
        if n:
            self._budget.release(n)
            if self._on_release is not None:
                self._on_release()


class DeadlineExceeded(Exception):
    """The request ran past serve.timeout_ms (or was abandoned) while its inputs were being decoded."""


class Deadline:
    """When a request's work must stop. The event loop cancels it when it stops waiting; a decoding thread calls
    check() between images, so it never works more than one image past the deadline."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds
        self._cancelled = False

    def cancel(self) -> None:
        self._cancelled = True

    def check(self) -> None:
        if self._cancelled or time.monotonic() > self.at:
            raise DeadlineExceeded()


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "malloc_trim") else None  # glibc only
    except OSError:
        return None


class Trimmer:
    """After a burst, give the freed heap back to the system (glibc's malloc_trim): decoded batches are freed when
    answered, but glibc keeps freed memory for reuse, and a hostile burst would otherwise set the service's RSS for
    good. Trims `delay_s` after the budget drains, if it held at least `min_samples` since the last trim."""

    def __init__(self, budget: Budget, min_samples: int, delay_s: float = 0.5) -> None:
        self.budget, self.min_samples, self.delay_s = budget, min_samples, delay_s
        self._scheduled = False

    def after_release(self, loop: asyncio.AbstractEventLoop) -> None:
        """Call after each release, from any thread."""
        if _libc() is None or self._scheduled or self.budget.used or self.budget.peak < self.min_samples:
            return
        self._scheduled = True
        loop.call_soon_threadsafe(loop.call_later, self.delay_s, lambda: loop.run_in_executor(None, self._trim))

    def _trim(self) -> None:
        self._scheduled = False
        if self.budget.used:  # another burst began: its end trims
            return
        self.budget.peak = 0
        _libc().malloc_trim(0)
