"""A 16550A on the bus and its host end: batched output, back-pressured input.

The UART model is pure; this module decides *when* bytes cross between it
and the host, which is what makes a serial console fast or slow:

* Output leaves the TX FIFO in bursts. A full FIFO is drained by the host
  loop soon after the guest's interrupt handler has returned, so the next
  THRE interrupt starts a fresh short handler pass instead of making the
  8250 driver loop ("too much work for irq"); a partial burst is drained
  after a short flush interval; a guest polling LSR (the printk console)
  gets its FIFO drained on the spot. One host write carries a whole burst.
* Output is buffered up to a bound. When the host end stalls and the
  buffer is full, the FIFO is simply not drained: THRE stays clear and the
  guest waits, as it would for a slow line. Nothing is dropped.
* Input is read from the host only when the RX FIFO has room, and only as
  many bytes as fit; when it is full the fd leaves the poll set until the
  guest reads RBR. Nothing is dropped there either.
"""

from __future__ import annotations

import select
import threading
import time
from dataclasses import dataclass

from ..devices.base import ByteRegisterDevice, IrqCallback
from ..devices.uart16550 import FIFO_SIZE, LCR_DLAB, LSR, RBR, REGISTER_SPAN, THR, Uart16550
from ..host.backends import Backend
from ..host.loop import EventLoop, TimerHandle

OUTPUT_LIMIT = 64 * 1024       # bytes kept for a stalled host end before THRE stays clear
FLUSH_INTERVAL = 0.001         # seconds a partial TX burst may wait for more bytes
CTI_DELAY = 0.0005             # seconds of RX silence before the character timeout
RESUME_DELAY = 0.002           # seconds before input resumes for a guest that leaves bytes in the FIFO


@dataclass
class SerialCounters:
    host_writes: int = 0       # write() calls to the host end
    host_bytes_out: int = 0
    host_reads: int = 0
    host_bytes_in: int = 0
    input_pauses: int = 0      # times input was stopped because the RX FIFO was full
    output_stalls: int = 0     # drains refused because the output buffer was full

    def summary(self, name: str) -> str:
        """One line for ``--stats``: how the bytes crossed to and from the host."""
        return (f"{name}: {self.host_bytes_out} bytes out in {self.host_writes} host writes, "
                f"{self.host_bytes_in} bytes in, {self.input_pauses} input pauses, {self.output_stalls} output stalls")


class SerialPort:
    """Bus device for one COM port: the UART model plus its host end (the model's :class:`UartHost`)."""

    def __init__(self, name: str, loop: EventLoop, backend: Backend, irq: IrqCallback,
                 *, fifo: bool = True, output_limit: int = OUTPUT_LIMIT, pace: bool = False) -> None:
        self.name = name
        self.loop = loop
        self.backend = backend
        self.lock = threading.RLock()
        self._irq = irq
        self.uart = Uart16550(self, fifo=fifo)
        # A 16-bit or 32-bit access reads or writes consecutive registers, as on the real part.
        self._regs = ByteRegisterDevice(self, REGISTER_SPAN)
        self.fifo_size = FIFO_SIZE if fifo else 1
        # The FIFO-less variant stands for the old kvm tool's UART, which
        # wrote every character to the terminal: no write coalescing there.
        self.flush_interval = FLUSH_INTERVAL if fifo else 0.0
        self.output_limit = output_limit
        self.outbuf = bytearray()
        self.counters = SerialCounters()
        self._drain_soon = False
        self._drain_timer = False
        self._reading = False
        self._writing = False
        self._eof = False
        self._cti: TimerHandle | None = None
        self._always_ready = False
        self._input_paused = False
        self._last_thr = 0.0
        self._last_write = 0.0
        self._closed = False
        # --serial-pace: one character leaves per character time at the
        # programmed line speed; _line_free is when the transmitter is idle.
        self.pace = pace
        self._line_free = 0.0
        self._pace_timer = False

    # --- guest side (vCPU threads) -------------------------------------------
    def io_read(self, offset: int, size: int) -> int:
        with self.lock:
            return self._regs.io_read(offset, size)

    def io_write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            self._regs.io_write(offset, size, value)
            if offset == THR:
                self._last_thr = time.monotonic()
            fifo_size = self.fifo_size if self.uart.fifo_enabled else 1
            if self.uart.tx_pending() >= fifo_size and not self._drain_soon:
                self._drain_soon = True
                self.loop.call_soon(self._drain_from_loop)

    def read(self, reg: int) -> int:
        """One register read (ByteRegisters), with the host end's side effects; lock held."""
        if reg == LSR and self.uart.tx_pending():
            # A guest polling for THRE (console write, startup tests):
            # hand the burst to the host now rather than make it spin.
            self._drain_locked()
        byte = self.uart.read(reg)
        if reg == RBR and self._input_paused and not self.uart.lcr & LCR_DLAB and self.uart.rx_level() == 0:
            # The guest emptied the RX FIFO: refill it in one read
            # rather than a byte at a time as slots free up.
            self._input_paused = False
            self.loop.call_soon(self._resume_input)
        return byte

    def write(self, reg: int, value: int) -> None:
        """One register write (ByteRegisters); lock held."""
        self.uart.write(reg, value)

    # --- UartHost (called by the model, lock held) ---------------------------
    def set_irq(self, level: bool) -> None:
        self._irq(level)

    def tx_started(self) -> None:
        if not self._drain_timer and not self._closed:
            self._drain_timer = True
            self.loop.call_soon_later(FLUSH_INTERVAL, self._flush_timer)

    def rx_space(self) -> None:
        # A guest that drains the FIFO completely resumes input from read();
        # this covers one that stops part way, a little later so that the
        # host reads a batch rather than the one byte that just freed.
        if not self._reading and not self._closed:
            self.loop.call_soon_later(RESUME_DELAY, self._resume_input)

    def host_note(self, text: str) -> None:
        """kvmkit's own words (Ctrl-A s statistics, help) into this port's output stream, in order."""
        with self.lock:
            self.outbuf += ("\r\n" + text.replace("\n", "\r\n") + "\r\n").encode()
        self.loop.call_soon(self._flush_output)

    # --- host side (loop thread) ----------------------------------------------
    def start(self) -> None:
        self.backend.open()
        if self.backend.listen_fd is not None:
            self.loop.add_reader(self.backend.listen_fd, self._accept)
        self._resume_input()

    def _accept(self) -> None:
        if self.backend.accept():
            self._resume_input()
            self._flush_output()

    def char_time(self) -> float:
        """Seconds one character takes on the wire at the programmed LCR and divisor; inf if stopped."""
        baud = self.uart.baud
        if baud <= 0:
            return float("inf")
        lcr = self.uart.lcr
        bits = 1 + (5 + (lcr & 0x3)) + (1 if lcr & 0x08 else 0) + (2 if lcr & 0x04 else 1)
        return bits / baud

    def _paced_allowance(self) -> int:
        """With pacing, how many bytes may leave now (0 or 1), and when to come back."""
        now = time.monotonic()
        if now < self._line_free:
            self._schedule_paced(self._line_free - now)
            return 0
        ct = self.char_time()
        if ct == float("inf"):
            return 0  # divisor 0: the baud generator is stopped, nothing is sent
        self._line_free = now + ct
        if self.uart.tx_pending() > 1:
            self._schedule_paced(ct)
        return 1

    def _schedule_paced(self, delay: float) -> None:
        if not self._pace_timer and not self._closed:
            self._pace_timer = True
            self.loop.call_soon_later(delay, self._paced_timer)

    def _paced_timer(self) -> None:
        with self.lock:
            self._pace_timer = False
            self._drain_locked()

    def _drain_locked(self) -> int:
        """Move TX FIFO bytes to the output buffer, as far as the bound and the pace allow."""
        room = self.output_limit - len(self.outbuf)
        if room <= 0:
            self.counters.output_stalls += 1
            return 0
        if self.pace and self.uart.tx_pending():
            room = min(room, self._paced_allowance())
            if room == 0:
                return 0
        data = self.uart.take_tx(room)
        if data:
            self.outbuf += data
            if not self._writing:
                self._writing = True
                # At most one host write per flush interval while output
                # streams; the first write after a quiet spell goes at once.
                delay = self._last_write + self.flush_interval - time.monotonic()
                if delay <= 0:
                    self.loop.call_soon(self._flush_output)
                else:
                    self.loop.call_soon_later(delay, self._flush_output)
        return len(data)

    def _drain_from_loop(self) -> None:
        with self.lock:
            self._drain_soon = False
            self._drain_locked()

    def _flush_timer(self) -> None:
        with self.lock:
            self._drain_timer = False
            if not self.uart.tx_pending():
                return
            quiet = time.monotonic() - self._last_thr
            if quiet < FLUSH_INTERVAL / 2:
                # The guest is still filling the FIFO: a full burst will come
                # (and be drained at once), so don't cut it in two.
                self._drain_timer = True
                self.loop.call_later(FLUSH_INTERVAL - quiet, self._flush_timer)
                return
            self._drain_locked()

    def _flush_output(self) -> None:
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
            remaining = len(self.outbuf)
            if self.uart.tx_pending() and remaining < self.output_limit:
                self._drain_locked()
                remaining = len(self.outbuf)
        fd = self.backend.output_fd
        if remaining:
            if fd is not None:
                try:
                    self.loop.add_writer(fd, self._on_writable)
                except PermissionError:  # a regular file: writable again at once
                    self.loop.call_later(0.001, self._flush_output)
            # else: a socket backend with no client yet; _accept flushes later.
        else:
            if fd is not None:
                self.loop.remove_writer(fd)
            with self.lock:
                # Bytes a vCPU drained since we looked saw _writing set and
                # left the flush to us: schedule it rather than strand them.
                self._writing = bool(self.outbuf)
                if self._writing:
                    self.loop.call_soon(self._flush_output)

    def _on_writable(self) -> None:
        self._flush_output()

    def _resume_input(self) -> None:
        fd = self.backend.input_fd
        if fd is None or self._eof or self._closed:
            return
        self._input_paused = False
        if not self._reading:
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

    def _pause_input(self) -> None:
        fd = self.backend.input_fd
        if self._reading:
            self._reading = False
            self._input_paused = True
            self.counters.input_pauses += 1
            if fd is not None and not self._always_ready:
                self.loop.remove_reader(fd)

    def _on_input(self) -> None:
        if not self._reading or self._closed:
            return
        with self.lock:
            space = self.uart.rx_space()
        if space <= 0:
            self._pause_input()
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
        with self.lock:
            accepted = self.uart.receive(data)
            # rx_space() said there was room for all of it.
            assert accepted == len(data), (accepted, len(data))
            full = self.uart.rx_space() == 0
            cti = self.uart.cti_armed
        if full:
            self._pause_input()
        elif self._always_ready:
            self.loop.call_soon(self._on_input)
        if cti:
            if self._cti is not None:
                self._cti.cancel()
            self._cti = self.loop.call_later(CTI_DELAY, self._character_timeout)

    def _character_timeout(self) -> None:
        self._cti = None
        with self.lock:
            self.uart.character_timeout()

    def close(self) -> None:
        """Flush what is buffered (best effort, non-blocking) and close the host end."""
        self._closed = True
        self.pace = False  # what is left goes out now, not at line speed
        with self.lock:
            try:
                self._drain_locked()
            except Exception:
                pass
            data = bytes(self.outbuf)
            self.outbuf.clear()
        if data:
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
