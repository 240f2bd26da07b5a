"""The host event loop: one thread that owns every host file descriptor.

vCPU threads never touch the terminal, files, sockets or host timers; they
post work here with :meth:`EventLoop.call_soon` (which wakes the loop
through an eventfd) and go straight back into KVM_RUN. Everything that can
block — a write to a stalled terminal, a read from a socket — happens on
this thread, through non-blocking fds and epoll, so a slow host can delay
output but never stall the guest's CPUs.

It is one loop for every device's host end: the serial ports and the PV
clock event device's timerfds and doorbells alike. The clock event device
registers its fds edge-triggered (``edge=True``): an expiry or a doorbell
then wakes the loop once and needs no read() to re-arm, which keeps its
wake-up path as short as the dedicated thread it used to have
(benchmarks/timer.py, host CPU per cycle, docs/architecture.md).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import select
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)

Callback = Callable[[], None]

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_ET = select.EPOLLET


class TimerHandle:
    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callback) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop:
    """epoll loop: readers (level- or edge-triggered), writers, thread-safe calls and timers."""

    def __init__(self) -> None:
        self._ep = select.epoll()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep.register(self._wake_fd, _IN)
        self._pending: list[Callback] = []
        self._pending_lock = threading.Lock()
        self._timers: list[tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()
        self._readers: dict[int, Callback] = {}
        self._writers: dict[int, Callback] = {}
        self._edge: set[int] = set()
        self._registered: dict[int, int] = {}  # fd -> epoll mask in force
        self._stop = False
        self._thread: threading.Thread | None = None
        self.errors = 0

    # --- registration (call on the loop thread, or before start) -------------
    def _update(self, fd: int) -> None:
        mask = (_IN if fd in self._readers else 0) | (_OUT if fd in self._writers else 0)
        if mask and fd in self._edge:
            mask |= _ET
        old = self._registered.get(fd)
        if old == mask:
            return
        if not mask:
            del self._registered[fd]
            try:
                self._ep.unregister(fd)
            except (OSError, ValueError):
                pass  # the fd was closed under us: epoll already forgot it
            return
        try:
            if old is None:
                self._ep.register(fd, mask)  # PermissionError for regular files: the caller polls those
            else:
                self._ep.modify(fd, mask)
        except FileExistsError:  # an fd number reused after a close epoll saw
            self._ep.modify(fd, mask)
        except FileNotFoundError:  # closed and reopened under the same number
            self._ep.register(fd, mask)
        self._registered[fd] = mask

    def add_reader(self, fd: int, callback: Callback, *, edge: bool = False) -> None:
        """Call ``callback`` when ``fd`` is readable; with ``edge`` once per new event (EPOLLET)."""
        self._readers[fd] = callback
        if edge:
            self._edge.add(fd)
        try:
            self._update(fd)
        except BaseException:
            self._readers.pop(fd, None)
            self._edge.discard(fd)
            raise

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None:
            self._edge.discard(fd)
            self._update(fd)

    def add_writer(self, fd: int, callback: Callback) -> None:
        self._writers[fd] = callback
        try:
            self._update(fd)
        except BaseException:
            self._writers.pop(fd, None)
            raise

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
        try:
            events = self._ep.poll(-1 if timeout is None else timeout)
        except InterruptedError:
            events = []
        readers = self._readers
        writers = self._writers
        for fd, mask in events:
            if fd == self._wake_fd:
                try:
                    os.eventfd_read(self._wake_fd)
                except BlockingIOError:
                    pass
                continue
            if mask & (_IN | select.EPOLLHUP | select.EPOLLERR):
                cb = readers.get(fd)
                if cb is not None:
                    self._run_callback(cb)
            if mask & (_OUT | select.EPOLLHUP | select.EPOLLERR):
                cb = writers.get(fd)
                if cb is not None:
                    self._run_callback(cb)
        if self._pending:
            with self._pending_lock:
                pending, self._pending = self._pending, []
            for cb in pending:
                self._run_callback(cb)
        if self._timers:
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

    @property
    def thread(self) -> threading.Thread | None:
        """The loop's thread once started (benchmarks read its CPU time)."""
        return self._thread

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
        if self._wake_fd < 0:
            return
        self.stop()
        self._ep.close()
        os.close(self._wake_fd)
        self._wake_fd = -1
