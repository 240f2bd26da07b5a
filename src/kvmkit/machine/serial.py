"""A 16550A on the bus and its host end: batched output, back-pressured input.

The UART model is pure; this module decides *when* bytes cross between it
and the host, which is what makes a serial console fast or slow:

* Output leaves the TX FIFO in bursts, and never while the guest's
  interrupt handler is between its IIR reads. The 8250 driver's handler
  reads IIR until it names no interrupt; a FIFO that empties (and so raises
  THRE again) after the handler's IIR read and before its last one makes
  the IRQ line fall and rise inside the handler. The PIC latches that edge,
  the handler services the THRE it finds on its next IIR read, and the
  latched interrupt then finds nothing: Linux counts it unhandled in
  /proc/irq/4/spurious. At 115200 baud a real 16550A takes 1.4 ms to send
  16 bytes, far longer than the handler's pass, so the real part does not
  race it; a VMM that drains the FIFO on another CPU does. So a FIFO filled
  inside the handler is drained at the IIR read that ends it (the THRE
  interrupt then comes after the handler, and finds work), one filled
  outside it soon after by the host loop, a partial burst after a short
  flush interval, and a guest polling LSR (the printk console) gets its
  FIFO drained on the spot. One host write carries many bursts
  (machine/stream.py batches them).
* Output is buffered up to a bound. When the host end stalls and the
  buffer is full, the FIFO is simply not drained: THRE stays clear and the
  guest waits, as it would for a slow line. Nothing is dropped.
* Input is read from the host only when the RX FIFO has room, and only as
  many bytes as fit; when it is full the fd leaves the poll set until the
  guest reads RBR. Nothing is dropped there either.
"""

from __future__ import annotations

import threading
import time

from ..devices.state import StateError
from ..devices.base import ByteRegisterDevice, IrqCallback
from ..devices.uart16550 import FIFO_SIZE, IIR, IIR_NONE, LCR_DLAB, LSR, RBR, REGISTER_SPAN, THR, Uart16550
from ..host.backends import Backend
from ..host.loop import EventLoop, TimerHandle
from .stream import OUTPUT_LIMIT, HostStream

FLUSH_INTERVAL = 0.001         # seconds a partial TX burst may wait for more bytes
CTI_DELAY = 0.0005             # seconds of RX silence before the character timeout
RESUME_DELAY = 0.002           # seconds before input resumes for a guest that leaves bytes in the FIFO
_PENDING = TimerHandle(0.0, lambda: None)  # a character timeout asked of the loop and not armed yet


class SerialPort:
    """Bus device for one COM port: the UART model (whose :class:`UartHost` this is) and its host stream."""

    def __init__(self, name: str, loop: EventLoop, backend: Backend, irq: IrqCallback,
                 *, fifo: bool = True, output_limit: int = OUTPUT_LIMIT, pace: bool = False) -> None:
        self.name = name
        self.loop = loop
        self.lock = threading.RLock()
        self._irq = irq
        self.uart = Uart16550(self, fifo=fifo)
        # A 16-bit or 32-bit access reads or writes consecutive registers, as on the real part.
        self._regs = ByteRegisterDevice(self, REGISTER_SPAN)
        self.fifo_size = FIFO_SIZE if fifo else 1
        # The FIFO-less variant stands for the old kvm tool's UART, which
        # wrote every character to the terminal: no write coalescing there.
        self.stream = HostStream(name, loop, backend, self, self.lock, output_limit=output_limit,
                                 **({} if fifo else {"hold": 0.0}))
        self.counters = self.stream.counters
        self._drain_soon = False
        self._drain_timer = False
        self._cti: TimerHandle | None = None
        self._last_thr = 0.0
        # The guest read an IIR that named an interrupt and has not yet read
        # one that names none: its handler is running (see the module notes).
        self._in_handler = False
        self._closed = False
        # --serial-pace: one character leaves per character time at the
        # programmed line speed; _line_free is when the transmitter is idle.
        self.pace = pace
        self._line_free = 0.0
        self._pace_timer = False

    @property
    def backend(self) -> Backend:
        return self.stream.backend

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
            if self.uart.tx_pending() >= fifo_size and not self._drain_soon and not self._in_handler:
                self._drain_soon = True
                self.loop.call_soon(self._drain_from_loop)

    def read(self, reg: int) -> int:
        """One register read (ByteRegisters), with the host end's side effects; lock held."""
        if reg == LSR and self.uart.tx_pending():
            # A guest polling for THRE (console write, startup tests):
            # hand the burst to the host now rather than make it spin.
            self._drain_locked()
        byte = self.uart.read(reg)
        if reg == IIR and self.uart.has_fifo:  # the FIFO-less variant stands for the old kvm tool: no such care
            if byte & IIR_NONE:
                # The handler's last IIR read: what it queued leaves now, and
                # the THRE interrupt that follows finds it done.
                self._in_handler = False
                if self.uart.tx_pending():
                    self._drain_locked()
            else:
                # If it fills the FIFO, wait for that last read (or, for a
                # guest that never makes it, the flush timer).
                self._in_handler = True
        elif reg == RBR and not self.uart.lcr & LCR_DLAB:
            if self.stream.paused and self.uart.rx_level() == 0:
                # The guest emptied the RX FIFO: refill it in one read
                # rather than a byte at a time as slots free up.
                self.stream.resume_input()
            elif self._cti is None and self.uart.cti_armed:
                # It read part of it and no timeout is running: the bytes left
                # below the trigger level get their character timeout again,
                # as on the real part, or a guest waiting for an interrupt
                # would never see them. (At most one wake-up of the host loop
                # per timeout, not one per byte read.)
                self._cti = _PENDING
                self.loop.call_soon(self._arm_cti)
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
        if not self._closed:
            self.stream.resume_input_later(RESUME_DELAY)

    # --- StreamDevice (host loop) --------------------------------------------
    def input_room(self) -> int:
        with self.lock:
            return self.uart.rx_space()

    def input(self, data: bytes) -> int:
        with self.lock:
            taken = self.uart.receive(data)
            cti = self.uart.cti_armed
        if cti:
            self._arm_cti()
        return taken

    def _arm_cti(self) -> None:
        """(Re)start the character-timeout timer (host loop): bytes below the trigger level wait."""
        if self._cti is not None and self._cti is not _PENDING:
            self._cti.cancel()
        self._cti = self.loop.call_later(CTI_DELAY, self._character_timeout)

    def output_room(self) -> None:
        with self.lock:
            if self.uart.tx_pending():
                self._drain_locked()

    def host_note(self, text: str) -> None:
        """kvmkit's own words (Ctrl-A s statistics, help) into this port's output stream, in order."""
        self.stream.note(text)

    # --- snapshot -------------------------------------------------------------
    def save_state(self) -> dict[str, object]:
        """The UART's state and where the guest's handler stands; what waits in the host stream is not
        the guest's any more (it is written out by this run, not by a restored one)."""
        with self.lock:
            return {"uart": self.uart.save_state(), "in_handler": self._in_handler}

    def load_state(self, state: object) -> None:
        if not isinstance(state, dict) or not isinstance(state.get("in_handler"), bool) or "uart" not in state:
            raise StateError(f"{self.name}: the saved serial port state is damaged; take the snapshot again.")
        with self.lock:
            self.uart.load_state(state["uart"])
            self._in_handler = state["in_handler"]

    def resync(self) -> None:
        """After a restore: the IRQ line as the UART drives it, and the timers its state asks for."""
        with self.lock:
            self._irq(self.uart.irq_level)
            if self.uart.tx_pending():
                self.loop.call_soon(self._drain_from_loop)
            if self.uart.cti_armed and self._cti is None:
                self._cti = _PENDING
                self.loop.call_soon(self._arm_cti)

    # --- host side (loop thread) ----------------------------------------------
    def start(self) -> None:
        self.stream.start()

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
        """Move TX FIFO bytes to the host stream, as far as its bound and the pace allow."""
        room = self.stream.room()
        if room <= 0:
            return 0
        if self.pace and self.uart.tx_pending():
            room = min(room, self._paced_allowance())
            if room == 0:
                return 0
        data = self.uart.take_tx(room)
        if data:
            self.stream.append(data)
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

    def _character_timeout(self) -> None:
        self._cti = None
        with self.lock:
            self.uart.character_timeout()

    def close(self) -> None:
        """Flush what is buffered (bounded wait) and close the host end."""
        self._closed = True
        self.pace = False  # what is left goes out now, not at line speed
        with self.lock:
            try:
                self._drain_locked()
            except Exception:
                pass
        self.stream.close()
