"""The interface between device models and the buses that carry guest accesses.

A device model is pure: it knows nothing of KVM or host I/O. The bus calls
``io_read``/``io_write`` with the offset inside the device's window and the
access size in bytes (1, 2, 4 or 8); the device reports its interrupt output
through an :data:`IrqCallback`. Both sides are untrusted on the guest's
behalf, so a device must accept any offset/size/value without raising.
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

IrqCallback = Callable[[bool], None]
"""Called with the new level of a device's interrupt output (True = asserted)."""


def no_irq(level: bool) -> None:
    """Interrupt sink for a device that is not wired to any line."""


@runtime_checkable
class BusDevice(Protocol):
    """What a PIO or MMIO bus dispatches guest accesses to."""

    def io_read(self, offset: int, size: int) -> int:
        """Value of a ``size``-byte read at ``offset`` (little endian)."""
        ...

    def io_write(self, offset: int, size: int, value: int) -> None:
        """A ``size``-byte write of ``value`` at ``offset``."""
        ...


class ByteRegisters(Protocol):
    """A device with 8-bit registers, as the datasheets of legacy parts number them."""

    def read(self, offset: int) -> int: ...

    def write(self, offset: int, value: int) -> None: ...


class ByteRegisterDevice:
    """Adapts an 8-bit register file to the bus: a wide access becomes byte accesses.

    A 16-bit ``inw`` on a 16550 reads two consecutive registers on real
    hardware; doing the same keeps side effects (an RBR read pops the FIFO)
    where the guest put them.
    """

    def __init__(self, regs: ByteRegisters, span: int) -> None:
        self.regs = regs
        self.span = span

    def io_read(self, offset: int, size: int) -> int:
        value = 0
        for i in range(size):
            reg = offset + i
            byte = self.regs.read(reg) if 0 <= reg < self.span else 0xFF
            value |= (byte & 0xFF) << (8 * i)
        return value

    def io_write(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            reg = offset + i
            if 0 <= reg < self.span:
                self.regs.write(reg, (value >> (8 * i)) & 0xFF)
