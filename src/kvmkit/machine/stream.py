"""The host end of a guest character stream: a COM port's or a virtio console's bytes to and from a backend.

Both consoles promise the same things, so they share this code:

* **Output is batched by what a person can perceive, and bounded.** The
  device hands over bytes with :meth:`HostStream.append`, which takes at
  most :meth:`room` bytes; the host loop writes them to the backend:

  - at once when they answer recent input (``ECHO_WINDOW`` after the guest
    took host input: a key's echo, a command's prompt), so typing feels
    like a local terminal;
  - at once when ``BATCH`` bytes are waiting (a stream at full speed);
  - otherwise ``hold`` after the first unwritten byte (8 ms), collecting
    what the guest writes meanwhile into the same write(). Linux's printk
    console puts one character at a time (polling LSR for THRE), a few per
    millisecond on an emulating host: a 1 ms window made about 170 writes
    per KiB of boot log, the 8 ms one makes a fifth of that, well under
    what a terminal user notices (docs/serial.md has the figures).

  When the backend stalls the buffer fills, ``append`` takes less, and the
  device stops taking output from the guest (the UART leaves THRE clear;
  virtio leaves buffers in the ring): the guest waits, nothing is dropped.
  When a write frees room the device is told (:meth:`StreamDevice.output_room`).
* **Input is back-pressured.** The backend is read only when the device has
  room (:meth:`StreamDevice.input_room`), and only that much; bytes the
  device did not take after all (its room shrank meanwhile, e.g. a FIFO
  reset) are kept and offered first next time, never dropped. When the
  device is full the backend's fd leaves the poll set until the device
  calls :meth:`HostStream.resume_input`.
* **Clients come and go.** A listening backend (a unix socket) has its
  listener watched; a client that leaves ends input until the next one
  connects. While no client is connected the guest never waits for one:
  its output goes on into the buffer, which keeps the last ``output_limit``
  bytes (64 KiB), and the next client gets them, preceded by one line
  saying how many older bytes were dropped, if any. A second client while
  one is connected is told so and closed.

Threads: the device side (``append``, ``room``, ``note``, ``resume_input``)
may be called from any thread with the device's ``lock`` held — the same
lock the stream takes (re-entrant). Backend I/O happens on the host loop
only. :class:`StreamDevice` callbacks are made on the loop thread without
the lock held.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from ..host.backends import Backend
from ..host.loop import EventLoop

log = logging.getLogger(__name__)

OUTPUT_LIMIT = 64 * 1024       # bytes kept for a stalled host end before the guest is held back
READ_CHUNK = 64 * 1024         # the most one read() takes from the backend
HOLD = 0.008                   # seconds a byte may wait for more output before it is written
BATCH = 4096                   # bytes that are written at once, whatever the hold
ECHO_WINDOW = 0.1              # seconds after host input during which output is written at once
RETRY_DELAY = 0.05             # seconds before a stalled write with no fd to watch is tried again


class StreamDevice(Protocol):
    """What the stream asks of the device it serves (loop thread, device lock not held)."""

    def input_room(self) -> int:
        """How many bytes the guest side can take now (0: pause input)."""
        ...

    def input(self, data: bytes) -> int:
        """Deliver host input; returns how many bytes were taken (the stream keeps the rest)."""
        ...

    def output_room(self) -> None:
        """A write freed room in the output buffer: hand over more output if the guest has it."""
        ...


@dataclass
class StreamCounters:
    host_writes: int = 0       # write() calls to the host end
    host_bytes_out: int = 0
    host_reads: int = 0
    host_bytes_in: int = 0
    input_pauses: int = 0      # times input was stopped because the guest side was full
    output_stalls: int = 0     # hand-overs refused because the output buffer was full
    hold_ns_max: int = 0       # the longest a byte waited in the buffer before its write() began
    hold_ns_total: int = 0     # summed over writes: how long each write's first byte had waited
    dropped_unconnected: int = 0  # oldest output dropped while no client was connected (said to the next one)
    lost_bytes: int = 0        # output a failing host end could not take (said once when it happened)

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))

    def summary(self, name: str) -> str:
        """One line for ``--stats``: how the bytes crossed to and from the host."""
        per_kib = f" ({self.host_writes * 1024 / self.host_bytes_out:.1f} writes per KiB)" if self.host_bytes_out else ""
        lost = [f"{n} bytes {what}" for n, what in ((self.dropped_unconnected, "dropped while no client was connected"),
                                                     (self.lost_bytes, "lost to write errors")) if n]
        return (f"{name}: {self.host_bytes_out} bytes out in {self.host_writes} host writes{per_kib}, "
                f"{self.host_bytes_in} bytes in, {self.input_pauses} input pauses, {self.output_stalls} output stalls"
                + "".join(f", {x}" for x in lost))


class HostStream:
    """One backend, its output buffer and its input flow control."""

    def __init__(self, name: str, loop: EventLoop, backend: Backend, device: StreamDevice,
                 lock: threading.RLock, *, output_limit: int = OUTPUT_LIMIT, hold: float = HOLD) -> None:
        """``hold`` 0 writes every hand-over at once (the FIFO-less UART that stands for the old kvm tool)."""
        self.name = name
        self.loop = loop
        self.backend = backend
        self.device = device
        self.lock = lock
        self.output_limit = output_limit
        self.hold = hold
        self.counters = StreamCounters()
        self.outbuf = bytearray()
        self._held_in = b""          # input read from the backend that the device did not take yet
        self._writing = False        # a flush is scheduled or under way
        self._urgent = False         # an immediate flush is scheduled
        self._first_unwritten = 0    # monotonic ns of the oldest byte in outbuf
        self._last_input = -1e9      # when the guest last took host input
        self._dropped = 0            # output dropped since the last client left (told to the next one)
        self._reading = False
        self._paused = False
        self._eof = False
        self._always_ready = False
        self._closed = False
        # Called with every batch of guest output as it is taken (device thread,
        # lock held): readers such as the panic watch, which must see bytes the
        # host end never takes (no client connected) too.
        self.watchers: list[Callable[[bytes | bytearray | memoryview], None]] = []
        # Called on the loop thread before each write to the backend (the
        # boot status line erases itself there, before the guest's text).
        self.before_write: Callable[[], None] | None = None

    # --- device side (any thread, lock held) ---------------------------------------
    def room(self) -> int:
        if not self.backend.connected:
            return self.output_limit  # nobody to wait for: the buffer keeps the newest bytes
        room = self.output_limit - len(self.outbuf)
        if room <= 0:
            self.counters.output_stalls += 1
        return max(room, 0)

    def append(self, data: bytes | bytearray | memoryview) -> int:
        """Queue guest output for the host (up to :meth:`room`); returns how many bytes were taken."""
        with self.lock:
            if not self.backend.connected:
                n = len(data)
                self._watch(data)
                self.outbuf += data
                excess = len(self.outbuf) - self.output_limit
                if excess > 0:
                    del self.outbuf[:excess]
                    self.counters.dropped_unconnected += excess
                    self._dropped += excess
                return n
            n = min(len(data), self.output_limit - len(self.outbuf))
            if n <= 0:
                return 0
            if not self.outbuf:
                self._first_unwritten = time.monotonic_ns()
            self._watch(data[:n])
            self.outbuf += data[:n]
            urgent = (self.hold <= 0 or len(self.outbuf) >= BATCH
                      or time.monotonic() - self._last_input < ECHO_WINDOW)
            if urgent and not self._urgent:
                self._urgent = self._writing = True
                self.loop.call_soon(self._flush)
            elif not self._writing:
                self._writing = True
                self.loop.call_soon_later(self.hold, self._flush)
            return n

    def _watch(self, data: bytes | bytearray | memoryview) -> None:
        for watcher in self.watchers:
            try:
                watcher(data)  # no copy here: a watcher that keeps bytes copies them itself
            except Exception:  # a reader's bug must not cost the guest its console
                log.exception("%s: console watcher failed", self.name)

    def note(self, text: str) -> None:
        """kvmkit's own words (Ctrl-A s statistics, help) into the output, in order, past the bound."""
        with self.lock:
            if not self.outbuf:
                self._first_unwritten = time.monotonic_ns()
            self.outbuf += ("\r\n" + text.replace("\n", "\r\n") + "\r\n").encode()
            self._writing = True
        self.loop.call_soon(self._flush)

    @property
    def paused(self) -> bool:
        """Input is stopped because the device was full (the device resumes it)."""
        return self._paused

    def resume_input(self) -> None:
        """The device has room again: read the backend (thread-safe; runs on the loop)."""
        self.loop.call_soon(self._resume)

    def resume_input_later(self, delay: float) -> None:
        self.loop.call_soon_later(delay, self._resume)

    # --- host side (loop thread) -----------------------------------------------------
    def start(self) -> None:
        self.backend.open()
        if self.backend.listen_fd is not None:
            self.loop.add_reader(self.backend.listen_fd, self._accept)
        self._resume()

    def _accept(self) -> None:
        if self.backend.client_gone:
            # The previous client hung up while its input waited (the guest was
            # not reading): it is gone, and what it typed goes with it.
            self._held_in = b""
            self._client_left()
        if self.backend.accept():
            with self.lock:
                if self._dropped:
                    self.outbuf[:0] = (f"\r\n[kvmkit: {self._dropped} earlier bytes of output were dropped while no "
                                       "client was connected]\r\n").encode()
                    self._dropped = 0
                self._first_unwritten = time.monotonic_ns()
            self._resume()
            self._flush()

    def _client_left(self) -> None:
        """The client of a listening backend went away: its fds leave the poll set, then it is closed."""
        fd = self.backend.input_fd
        if fd is not None:
            self.loop.remove_reader(fd)
            self.loop.remove_writer(fd)
        self._reading = False
        self.backend.drop_client()

    def _flush(self) -> None:
        """Write what the buffer holds; keep the rest for when the host end is writable."""
        with self.lock:
            self._urgent = False
            data = bytes(self.outbuf)
            first = self._first_unwritten
        if not data:
            with self.lock:
                self._writing = bool(self.outbuf)
            return
        held = time.monotonic_ns() - first
        if self.before_write is not None:
            self.before_write()
        n = self.backend.write(data)
        if n == 0 and self.backend.client_gone:
            self._client_left()
            return  # kept for the next client
        self.counters.lost_bytes = self.backend.lost_bytes
        if n > 0:
            c = self.counters
            c.host_writes += 1
            c.host_bytes_out += n
            c.hold_ns_total += held
            c.hold_ns_max = max(c.hold_ns_max, held)
            with self.lock:
                del self.outbuf[:n]
                self._first_unwritten = time.monotonic_ns()
            self.device.output_room()
        fd = self.backend.output_fd
        if n < len(data):
            # The backend took less: wait until it can take more (nothing is dropped).
            if fd is not None:
                try:
                    self.loop.add_writer(fd, self._flush)
                except PermissionError:  # a regular file: writable again at once
                    self.loop.call_later(0.001, self._flush)
            elif self.backend.listen_fd is None:
                self.loop.call_later(RETRY_DELAY, self._flush)  # an output shared with another stream
            # else: a listening backend with no client yet; _accept flushes later.
            return
        if fd is not None:
            self.loop.remove_writer(fd)
        with self.lock:
            # Bytes handed over since we looked (output_room() drains the
            # device) saw _writing set and left the flush to us: schedule it
            # by the same rule as append(), rather than strand them.
            if not self.outbuf:
                self._writing = False
                return
            if self._urgent:
                return
            if self.hold <= 0 or len(self.outbuf) >= BATCH or time.monotonic() - self._last_input < ECHO_WINDOW:
                self._urgent = True
                self.loop.call_soon(self._flush)
            else:
                self.loop.call_later(self.hold, self._flush)

    def _resume(self) -> None:
        fd = self.backend.input_fd
        if self._eof or self._closed:
            return
        self._paused = False
        if self._held_in:
            self._offer()
            if self._held_in:
                return
        if fd is None or self._reading:
            return
        self._reading = True
        if self._always_ready:
            self.loop.call_soon(self._on_input)
            return
        try:
            self.loop.add_reader(fd, self._on_input)
        except PermissionError:
            # epoll refuses regular files and /dev/null: they are always
            # readable, so poll them from the loop while there is room.
            self._always_ready = True
            self.loop.call_soon(self._on_input)

    def _pause(self) -> None:
        if not self._paused:
            self._paused = True
            self.counters.input_pauses += 1
        if self._reading:
            self._reading = False
            fd = self.backend.input_fd
            if fd is not None and not self._always_ready:
                self.loop.remove_reader(fd)

    def _offer(self) -> None:
        """Give the device what was held back; pause while anything is left."""
        taken = self.device.input(self._held_in)
        if taken:
            self._last_input = time.monotonic()
        self._held_in = self._held_in[taken:]
        if self._held_in:
            self._pause()

    def _on_input(self) -> None:
        if not self._reading or self._closed:
            return
        space = min(self.device.input_room(), READ_CHUNK)
        if space <= 0:
            self._pause()
            return
        fd_before = self.backend.input_fd
        data = self.backend.read(space)
        if data is None:
            return
        if data == b"":
            if self.backend.reconnects:
                self._client_left()
                return
            if fd_before is not None and not self._always_ready:
                self.loop.remove_reader(fd_before)
            self._reading = False
            self._eof = True
            return
        self.counters.host_reads += 1
        self.counters.host_bytes_in += len(data)
        self._held_in = data
        self._offer()
        if self._held_in:
            return
        if self.device.input_room() <= 0:
            self._pause()
        elif self._always_ready:
            self.loop.call_soon(self._on_input)

    def close(self, drain: bool = True) -> None:
        """Write what is buffered (bounded wait, for a stalled terminal) and close the backend."""
        self._closed = True
        with self.lock:
            data = bytes(self.outbuf)
            self.outbuf.clear()
        if data and drain:
            self._write_all_blocking(data)
        self.backend.close()

    def _write_all_blocking(self, data: bytes, timeout: float = 2.0) -> None:
        deadline = time.monotonic() + timeout
        fd = self.backend.output_fd
        while data and time.monotonic() < deadline:
            n = self.backend.write(data)
            if n > 0:
                self.counters.host_writes += 1
                self.counters.host_bytes_out += n
                data = data[n:]
            elif fd is not None:
                select.select([], [fd], [], max(0.0, deadline - time.monotonic()))
            else:
                break
