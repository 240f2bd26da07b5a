"""The host event loop: one thread that owns every host file descriptor.

vCPU threads never touch the terminal, files or sockets; they post work here
with :meth:`EventLoop.call_soon` (which wakes the loop through an eventfd)
and go straight back into KVM_RUN. Everything that can block — a write to a
stalled terminal, a read from a socket — happens on this thread, through
non-blocking fds and epoll, so a slow host can delay output but never stall
the guest's CPUs.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import selectors
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)

Callback = Callable[[], None]


class TimerHandle:
    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callback) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop:
    """epoll-based loop: readers, writers, thread-safe calls and timers."""

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._sel.register(self._wake_fd, selectors.EVENT_READ, ("wake", None, None))
        self._pending: list[Callback] = []
        self._pending_lock = threading.Lock()
        self._timers: list[tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()
        self._readers: dict[int, Callback] = {}
        self._writers: dict[int, Callback] = {}
        self._stop = False
        self._thread: threading.Thread | None = None
        self.errors = 0

    # --- registration (call on the loop thread, or before start) -------------
    def _update(self, fd: int) -> None:
        mask = (selectors.EVENT_READ if fd in self._readers else 0) | (selectors.EVENT_WRITE if fd in self._writers else 0)
        try:
            key = self._sel.get_key(fd)
        except KeyError:
            key = None
        if key is None:
            if mask:
                self._sel.register(fd, mask, ("fd", None, None))
        elif mask:
            self._sel.modify(fd, mask, ("fd", None, None))
        else:
            self._sel.unregister(fd)

    def add_reader(self, fd: int, callback: Callback) -> None:
        self._readers[fd] = callback
        self._update(fd)

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None:
            self._update(fd)

    def add_writer(self, fd: int, callback: Callback) -> None:
        self._writers[fd] = callback
        self._update(fd)

    def remove_writer(self, fd: int) -> None:
        if self._writers.pop(fd, None) is not None:
            self._update(fd)

    def call_later(self, delay: float, callback: Callback) -> TimerHandle:
        """Schedule on the loop thread (call from the loop thread)."""
        handle = TimerHandle(time.monotonic() + max(0.0, delay), callback)
        heapq.heappush(self._timers, (handle.when, next(self._seq), handle))
        return handle

    # --- thread-safe ---------------------------------------------------------
    def call_soon(self, callback: Callback) -> None:
        """Run ``callback`` on the loop thread; safe from any thread, never blocks."""
        with self._pending_lock:
            first = not self._pending
            self._pending.append(callback)
        if first:
            try:
                os.eventfd_write(self._wake_fd, 1)
            except BlockingIOError:
                pass

    def call_soon_later(self, delay: float, callback: Callback) -> None:
        """Thread-safe :meth:`call_later`."""
        self.call_soon(lambda: self.call_later(delay, callback))

    # --- running ---------------------------------------------------------------
    def _run_callback(self, cb: Callback) -> None:
        try:
            cb()
        except Exception:
            self.errors += 1
            log.exception("host event loop callback failed")

    def run_once(self, timeout: float | None = None) -> None:
        if self._timers:
            wait = max(0.0, self._timers[0][0] - time.monotonic())
            timeout = wait if timeout is None else min(timeout, wait)
        for key, mask in self._sel.select(timeout):
            kind = key.data[0]
            if kind == "wake":
                try:
                    os.eventfd_read(self._wake_fd)
                except BlockingIOError:
                    pass
                continue
            fd = key.fd
            if mask & selectors.EVENT_READ and fd in self._readers:
                self._run_callback(self._readers[fd])
            if mask & selectors.EVENT_WRITE and fd in self._writers:
                self._run_callback(self._writers[fd])
        with self._pending_lock:
            pending, self._pending = self._pending, []
        for cb in pending:
            self._run_callback(cb)
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, handle = heapq.heappop(self._timers)
            if not handle.cancelled:
                self._run_callback(handle.callback)

    def run(self) -> None:
        while not self._stop:
            self.run_once(0.5)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="kvmkit-host", daemon=True)
        self._thread.start()

    def stop(self, join: bool = True) -> None:
        self._stop = True
        try:
            os.eventfd_write(self._wake_fd, 1)
        except OSError:
            pass
        if join and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    @property
    def on_loop_thread(self) -> bool:
        return self._thread is threading.current_thread()

    def close(self) -> None:
        self.stop()
        self._sel.close()
        os.close(self._wake_fd)
