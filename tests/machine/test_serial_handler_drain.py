"""The TX FIFO is not drained while the guest's interrupt handler is between IIR reads.

Why: a FIFO that empties inside the handler makes the IRQ line fall (the
IIR read that reported THRE) and rise again before the handler's last IIR
read; the PIC latches that edge and the interrupt it delivers after the
handler finds nothing (Linux: "unhandled" in /proc/irq/4/spurious). These
tests drive SerialPort at the register level with a loop that only records
what it is asked to do, so that "the host loop drained it" cannot happen
behind the test's back.
"""

from __future__ import annotations

from typing import Callable

from kvmkit.host.backends import SocketPairBackend
from kvmkit.machine.serial import SerialPort

THR, IER, IIR, FCR, LCR, MCR, LSR = 0, 1, 2, 2, 3, 4, 5
IIR_NONE, IIR_THRE = 0x01, 0x02
LSR_THRE = 0x20


class RecordingLoop:
    """Stands for the host loop: keeps what was scheduled, runs it only when told."""

    def __init__(self) -> None:
        self.soon: list[Callable[[], None]] = []

    def call_soon(self, fn: Callable[[], None]) -> None:
        self.soon.append(fn)

    def call_soon_later(self, delay: float, fn: Callable[[], None]) -> None:
        pass  # the flush timer: a fallback these tests do not wait for

    def call_later(self, delay: float, fn: Callable[[], None]) -> object:
        return None

    def run_soon(self) -> None:
        soon, self.soon = self.soon, []
        for fn in soon:
            fn()


def _port(fifo: bool = True) -> tuple[SerialPort, RecordingLoop, list[bool]]:
    loop = RecordingLoop()
    levels: list[bool] = []
    port = SerialPort("COM1", loop, SocketPairBackend(), levels.append, fifo=fifo)  # type: ignore[arg-type]
    port.io_write(LCR, 1, 0x03)
    port.io_write(FCR, 1, 0x07)          # FIFO on, both cleared
    port.io_write(MCR, 1, 0x08)          # OUT2: the IRQ output reaches the PIC
    port.io_write(IER, 1, 0x02)          # ETBEI: THR is empty, so THRE is raised at once
    return port, loop, levels


def _rising_edges(levels: list[bool]) -> int:
    return sum(1 for a, b in zip([False] + levels, levels) if b and not a)


def test_a_fifo_filled_in_the_handler_leaves_at_the_handlers_last_iir_read() -> None:
    port, loop, levels = _port()
    edges = _rising_edges(levels)
    for _ in range(3):  # three interrupts, each one handler pass as Linux's 8250 makes it
        assert port.io_read(IIR, 1) & 0x0F == IIR_THRE
        assert port.io_read(LSR, 1) & LSR_THRE
        for b in b"0123456789abcdef":
            port.io_write(THR, 1, b)
        assert not loop.soon, "the host loop was asked to drain the FIFO inside the handler"
        loop.run_soon()
        assert port.uart.tx_pending() == 16
        # The handler's loop reads IIR again: nothing to do yet, so it returns ...
        assert port.io_read(IIR, 1) & 0x0F == IIR_NONE
        # ... and the burst has left, raising THRE for the next interrupt, which finds it.
        assert port.uart.tx_pending() == 0
        assert port.uart.irq_level
        assert _rising_edges(levels) == edges + 1
        edges += 1
    assert port.uart.stats.tx_bytes == 48


def test_a_fifo_filled_outside_a_handler_is_drained_by_the_host_loop() -> None:
    port, loop, _ = _port()
    port.io_write(IER, 1, 0x00)          # polled or IRQ-less use: no IIR reads at all
    for b in b"0123456789abcdef":
        port.io_write(THR, 1, b)
    assert loop.soon, "a full FIFO with no handler running must be drained by the host loop"
    loop.run_soon()
    assert port.uart.tx_pending() == 0


def test_an_iir_read_that_names_an_interrupt_but_no_later_one_does_not_stall_lsr_polling() -> None:
    port, loop, _ = _port()
    assert port.io_read(IIR, 1) & 0x0F == IIR_THRE   # "in the handler" from here on
    for b in b"0123456789abcdef":
        port.io_write(THR, 1, b)
    # A guest that now polls LSR (the printk console) gets its FIFO drained on the spot.
    assert port.io_read(LSR, 1) & LSR_THRE
    assert port.uart.tx_pending() == 0


def test_the_fifo_less_variant_keeps_the_old_tools_eager_drain() -> None:
    port, loop, _ = _port(fifo=False)
    assert port.io_read(IIR, 1) & 0x0F == IIR_THRE
    port.io_write(THR, 1, 0x41)
    assert loop.soon, "the 16450 variant (the old kvm tool's UART) drains at once, handler or not"
