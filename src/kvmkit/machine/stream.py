"""The host end of a guest character stream: a COM port's or a virtio console's bytes to and from a backend.

Both consoles promise the same things, so they share this code:

* **Output is batched and bounded.** The device hands over bytes with
  :meth:`HostStream.append`, which takes at most :meth:`room` bytes; the
  host loop writes the buffer to the backend, at most one write per
  ``flush_interval`` while output streams (the first write after a quiet
  spell goes at once). When the backend stalls the buffer fills, ``append``
  takes less, and the device stops taking output from the guest (the UART
  leaves THRE clear; virtio leaves buffers in the ring): the guest waits,
  nothing is dropped. When a write frees room the device is told
  (:meth:`StreamDevice.output_room`).
* **Input is back-pressured.** The backend is read only when the device has
  room (:meth:`StreamDevice.input_room`), and only that much; bytes the
  device did not take after all (its room shrank meanwhile, e.g. a FIFO
  reset) are kept and offered first next time, never dropped. When the
  device is full the backend's fd leaves the poll set until the device
  calls :meth:`HostStream.resume_input`.
* **Clients come and go.** A listening backend (a unix socket) has its
  listener watched; a client that leaves ends input until the next one
  connects, whose arrival flushes what was kept for it.

Threads: the device side (``append``, ``room``, ``note``, ``resume_input``)
may be called from any thread with the device's ``lock`` held — the same
lock the stream takes (re-entrant). Backend I/O happens on the host loop
only. :class:`StreamDevice` callbacks are made on the loop thread without
the lock held.
"""

from __future__ import annotations

import select
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from ..host.backends import Backend
from ..host.loop import EventLoop

OUTPUT_LIMIT = 64 * 1024       # bytes kept for a stalled host end before the guest is held back
READ_CHUNK = 64 * 1024         # the most one read() takes from the backend
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

    def summary(self, name: str) -> str:
        """One line for ``--stats``: how the bytes crossed to and from the host."""
        per_kib = f" ({self.host_writes * 1024 / self.host_bytes_out:.1f} writes per KiB)" if self.host_bytes_out else ""
        return (f"{name}: {self.host_bytes_out} bytes out in {self.host_writes} host writes{per_kib}, "
                f"{self.host_bytes_in} bytes in, {self.input_pauses} input pauses, {self.output_stalls} output stalls")


class HostStream:
    """One backend, its output buffer and its input flow control."""

    def __init__(self, name: str, loop: EventLoop, backend: Backend, device: StreamDevice,
                 lock: threading.RLock, *, output_limit: int = OUTPUT_LIMIT, flush_interval: float = 0.0) -> None:
        self.name = name
        self.loop = loop
        self.backend = backend
        self.device = device
        self.lock = lock
        self.output_limit = output_limit
        self.flush_interval = flush_interval
        self.counters = StreamCounters()
        self.outbuf = bytearray()
        self._held_in = b""          # input read from the backend that the device did not take yet
        self._writing = False
        self._last_write = 0.0
        self._reading = False
        self._paused = False
        self._eof = False
        self._always_ready = False
        self._closed = False

    # --- device side (any thread, lock held) ---------------------------------------
    def room(self) -> int:
        room = self.output_limit - len(self.outbuf)
        if room <= 0:
            self.counters.output_stalls += 1
        return max(room, 0)

    def append(self, data: bytes | bytearray | memoryview) -> int:
        """Queue guest output for the host (up to :meth:`room`); returns how many bytes were taken."""
        with self.lock:
            n = min(len(data), self.output_limit - len(self.outbuf))
            if n <= 0:
                return 0
            self.outbuf += data[:n]
            if not self._writing:
                self._writing = True
                # At most one host write per flush interval while output
                # streams; the first write after a quiet spell goes at once.
                delay = self._last_write + self.flush_interval - time.monotonic()
                if delay <= 0:
                    self.loop.call_soon(self._flush)
                else:
                    self.loop.call_soon_later(delay, self._flush)
            return n

    def note(self, text: str) -> None:
        """kvmkit's own words (Ctrl-A s statistics, help) into the output, in order, past the bound."""
        with self.lock:
            self.outbuf += ("\r\n" + text.replace("\n", "\r\n") + "\r\n").encode()
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
        if self.backend.accept():
            self._resume()
            self._flush()

    def _flush(self) -> None:
        """Write what the buffer holds; keep the rest for when the host end is writable."""
        with self.lock:
            data = bytes(self.outbuf)
        if not data:
            self._writing = False
            return
        n = self.backend.write(data)
        if n > 0:
            self.counters.host_writes += 1
            self.counters.host_bytes_out += n
            self._last_write = time.monotonic()
            with self.lock:
                del self.outbuf[:n]
            self.device.output_room()
        with self.lock:
            remaining = len(self.outbuf)
        fd = self.backend.output_fd
        if remaining:
            if fd is not None:
                try:
                    self.loop.add_writer(fd, self._flush)
                except PermissionError:  # a regular file: writable again at once
                    self.loop.call_later(0.001, self._flush)
            elif self.backend.listen_fd is None:
                self.loop.call_later(RETRY_DELAY, self._flush)  # an output shared with another stream
            # else: a listening backend with no client yet; _accept flushes later.
        else:
            if fd is not None:
                self.loop.remove_writer(fd)
            with self.lock:
                # Bytes handed over since we looked saw _writing set and
                # left the flush to us: schedule it rather than strand them.
                self._writing = bool(self.outbuf)
                if self._writing:
                    self.loop.call_soon(self._flush)

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
            if fd_before is not None and not self._always_ready:
                self.loop.remove_reader(fd_before)
            self._reading = False
            if not self.backend.reconnects:
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
