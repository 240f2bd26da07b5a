"""A National/TI 16550A UART as its datasheet describes it, with no host I/O.

Why faithful: the Linux 8250 driver was written against the real part. It
probes for the FIFO (IIR bits 7:6), tests that THRE re-asserts when its
interrupt is re-enabled, and fills the transmit FIFO 16 bytes per interrupt.
A model that transmits one byte per interrupt, or never re-raises THRE,
drives the driver into "too much work for irq 4" or into its slow timer
fallback (UART_BUG_THRE): the complaint of the mail this project grew from
("Re: [patch 0/3] kvm tool: Serial emulation overhaul", Thomas Gleixner,
LKML, 12 December 2011; docs/architecture.md).

What this model deliberately simplifies for a VMM:

* There is no baud-rate timing. The transmit FIFO is drained only when the
  host calls :meth:`Uart16550.take_tx` (in batches), and the receive FIFO is
  filled only by :meth:`Uart16550.receive`, which never accepts more than
  fits (back pressure instead of overrun). TEMT equals THRE: there is no
  separate transmit shift register.
* The character-timeout interrupt (CTI) needs a clock the model does not
  have; the host runs a timer while :attr:`Uart16550.cti_armed` is true and
  calls :meth:`Uart16550.character_timeout` when it fires.
* The interrupt output is gated by MCR.OUT2 (bit 3), as the IBM PC wires
  OUT2 to the enable of the IRQ4/IRQ3 driver. Linux sets OUT2 whenever the
  port has an IRQ. In loopback mode the real OUT2 pin is forced inactive; the
  model keeps gating by the MCR bit so that interrupt-driven loopback
  self-tests still see interrupts (QEMU does not gate by OUT2 at all).

Reset values follow the datasheet (IER=0, IIR=0x01, FCR=0, LCR=0, MCR=0,
LSR=0x60). The divisor latch resets to 12 (9600 baud from the 1.8432 MHz
clock), the value PC firmware and QEMU leave there, so that :attr:`baud` is
meaningful before the guest programs it. The external modem lines default
to CTS, DSR and DCD asserted (a connected, ready terminal), i.e. MSR=0xB0.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from kvmkit.devices.state import StateReader

__all__ = ["Uart16550", "UartHost", "UartStats", "FIFO_SIZE", "CLOCK_HZ", "RESET_DIVISOR", "REGISTER_SPAN"]

FIFO_SIZE = 16
CLOCK_HZ = 1_843_200
"""The PC's UART crystal; the baud rate is CLOCK_HZ / (16 * divisor)."""
RESET_DIVISOR = 12

REGISTER_SPAN = 8  # eight consecutive I/O ports

# Register offsets (DLAB=0 names first; DLL/DLM when LCR.DLAB=1).
RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

# IER: which sources may interrupt.
IER_ERBFI = 0x01  # received data available (and character timeout)
IER_ETBEI = 0x02  # transmitter holding register empty
IER_ELSI = 0x04  # receiver line status
IER_EDSSI = 0x08  # modem status

# IIR interrupt IDs, in priority order.
IIR_NONE = 0x01
IIR_RLS = 0x06  # receiver line status
IIR_RDA = 0x04  # received data available
IIR_CTI = 0x0C  # character timeout indication
IIR_THRE = 0x02
IIR_MSR = 0x00
IIR_FIFO_ENABLED = 0xC0

FCR_ENABLE = 0x01
FCR_RX_RESET = 0x02
FCR_TX_RESET = 0x04
FCR_DMA_MODE = 0x08
TRIGGER_LEVELS = (1, 4, 8, 14)

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10

LSR_DR = 0x01
LSR_OE = 0x02
LSR_PE = 0x04
LSR_FE = 0x08
LSR_BI = 0x10
LSR_THRE = 0x20
LSR_TEMT = 0x40
LSR_RXFE = 0x80  # error in RX FIFO
LSR_BYTE_ERRORS = LSR_PE | LSR_FE | LSR_BI

MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04  # trailing edge of ring indicator
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_DELTAS = 0x0F

# An RX FIFO entry is the byte plus its LSR error bits shifted up by 8.
_ERR_SHIFT = 8

_STATE_KEYS = ("fifo", "rbr", "ier", "fcr", "lcr", "mcr", "lsr_errors", "msr", "scr", "dll", "dlm", "rx_fifo",
               "rx_fifo_errors", "tx_fifo", "thre_pending", "cti_pending", "rx_blocked", "cts", "dsr", "ri", "dcd",
               "irq_level")
# What load_state copies from its checked scratch UART: everything but the host, stats and has_fifo.
_STATE_ATTRS = ("ier", "lcr", "mcr", "scr", "dll", "dlm", "_fcr", "_rx", "_tx", "_rx_errors", "_lsr_err", "_rbr",
                "_thre_pending", "_cti_pending", "_rx_blocked", "_msr", "_ext_cts", "_ext_dsr", "_ext_ri", "_ext_dcd",
                "_level")


class UartHost(Protocol):
    """What the UART tells its host side. Called with the model's caller's lock held: do not re-enter."""

    def set_irq(self, level: bool) -> None:
        """The interrupt output changed level (only on a change)."""
        ...

    def tx_started(self) -> None:
        """The transmit FIFO went from empty to non-empty: schedule a take_tx()."""
        ...

    def rx_space(self) -> None:
        """The receive FIFO has room again after a read: more input may be offered."""
        ...


class _NoHost:
    """A UART connected to nothing (tests and the FIFO-less comparison device)."""

    def set_irq(self, level: bool) -> None:
        pass

    def tx_started(self) -> None:
        pass

    def rx_space(self) -> None:
        pass


@dataclass
class UartStats:
    """Counters for measuring how the guest drives the port.

    Interrupt counters count rising edges of the interrupt output, credited
    to the source the IIR would name at that moment: that is what costs the
    guest an interrupt entry.
    """

    rx_bytes: int = 0  # bytes the host delivered into the RX FIFO
    tx_bytes: int = 0  # bytes the host took out of the TX FIFO
    thre_interrupts: int = 0
    rx_interrupts: int = 0  # RDA and CTI
    other_interrupts: int = 0  # RLS and MSR
    tx_overruns: int = 0  # THR writes dropped because the TX FIFO was full
    rx_overruns: int = 0  # loopback bytes lost to a full RX FIFO (OE)
    rx_discarded: int = 0  # bytes the guest threw away with an RX FIFO reset (FCR), as on the real part


class Uart16550:
    """One 16550A (``fifo=True``) or 16450-style UART (``fifo=False``).

    ``fifo=False`` models the part without FIFOs: 1-byte holding registers,
    FCR writes ignored, IIR bits 7:6 always 00. That is what the old kvm tool
    emulated, kept for comparison benchmarks.
    """

    def __init__(self, host: UartHost | None = None, *, fifo: bool = True) -> None:
        self.host: UartHost = host if host is not None else _NoHost()
        self.has_fifo = fifo
        self.stats = UartStats()
        self._level = False
        # External modem inputs (True = asserted), as the host sets them.
        self._ext_cts = True
        self._ext_dsr = True
        self._ext_ri = False
        self._ext_dcd = True
        self._rx: deque[int] = deque()
        self._tx: deque[int] = deque()
        self._init_registers()

    # ------------------------------------------------------------------ state

    def _init_registers(self) -> None:
        self.ier = 0
        self.lcr = 0
        self.mcr = 0
        self.scr = 0
        self.dll = RESET_DIVISOR & 0xFF
        self.dlm = RESET_DIVISOR >> 8
        self._fcr = 0  # FIFO enable, DMA mode and trigger bits as last written
        self._rx.clear()
        self._tx.clear()
        self._rx_errors = 0  # entries in the RX FIFO carrying an error bit
        self._lsr_err = 0  # OE|PE|FE|BI latched until the next LSR read
        self._rbr = 0  # last byte popped: what RBR shows when the FIFO is empty
        self._thre_pending = True  # THR is empty; shown only with IER.ETBEI
        self._cti_pending = False
        self._rx_blocked = False  # receive() refused bytes; tell the host when space frees
        self._msr = self._effective_lines()

    def reset(self) -> None:
        """Master reset: registers and FIFOs as at power-on; counters are kept."""
        self._init_registers()
        self._update()
        self._notify_rx_space()

    @property
    def fifo_enabled(self) -> bool:
        return bool(self._fcr & FCR_ENABLE)

    def _capacity(self) -> int:
        return FIFO_SIZE if self._fcr & FCR_ENABLE else 1

    def _trigger(self) -> int:
        if self._fcr & FCR_ENABLE:
            return TRIGGER_LEVELS[self._fcr >> 6]
        return 1

    @property
    def divisor(self) -> int:
        return (self.dlm << 8) | self.dll

    @property
    def baud(self) -> int:
        """Line speed in bit/s; 0 for divisor 0, where the baud generator is stopped."""
        d = self.divisor
        return CLOCK_HZ // (16 * d) if d else 0

    @property
    def irq_level(self) -> bool:
        return self._level

    @property
    def loopback(self) -> bool:
        return bool(self.mcr & MCR_LOOP)

    # ------------------------------------------------------------- interrupts

    def _interrupt_id(self) -> int:
        """The one source the IIR reports: highest priority wins, never ORed."""
        ier = self.ier
        if ier & IER_ELSI and self._lsr_err:
            return IIR_RLS
        if ier & IER_ERBFI:
            n = len(self._rx)
            if n and n >= self._trigger():
                return IIR_RDA
            if self._cti_pending:
                return IIR_CTI
        if ier & IER_ETBEI and self._thre_pending:
            return IIR_THRE
        if ier & IER_EDSSI and self._msr & MSR_DELTAS:
            return IIR_MSR
        return IIR_NONE

    def _update(self) -> None:
        """Recompute the interrupt output; call irq() only on a change of level."""
        iid = self._interrupt_id()
        level = iid != IIR_NONE and bool(self.mcr & MCR_OUT2)
        if level != self._level:
            self._level = level
            if level:
                if iid == IIR_THRE:
                    self.stats.thre_interrupts += 1
                elif iid == IIR_RDA or iid == IIR_CTI:
                    self.stats.rx_interrupts += 1
                else:
                    self.stats.other_interrupts += 1
            self.host.set_irq(level)

    # ------------------------------------------------------------ guest side

    def read(self, offset: int) -> int:
        """A guest byte read; side effects as on the part (RBR pops, LSR/MSR clear)."""
        if offset == RBR:
            if self.lcr & LCR_DLAB:
                return self.dll
            return self._read_rbr()
        if offset == IER:
            return self.dlm if self.lcr & LCR_DLAB else self.ier
        if offset == IIR:
            iid = self._interrupt_id()
            if iid == IIR_THRE:
                # Reading the IIR that reports THRE is one of its two clears.
                self._thre_pending = False
                self._update()
            return iid | (IIR_FIFO_ENABLED if self._fcr & FCR_ENABLE else 0)
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == LSR:
            return self._read_lsr()
        if offset == MSR:
            value = self._msr
            if value & MSR_DELTAS:
                self._msr = value & ~MSR_DELTAS
                self._update()
            return value
        if offset == SCR:
            return self.scr
        return 0xFF

    def _read_rbr(self) -> int:
        rx = self._rx
        if rx:
            entry = rx.popleft()
            self._rbr = entry & 0xFF
            if entry >> _ERR_SHIFT:
                self._rx_errors -= 1
            if rx:
                # The next byte reaches the top: its errors become visible.
                self._lsr_err |= rx[0] >> _ERR_SHIFT
        self._cti_pending = False
        self._update()
        if self._rx_blocked:
            self._notify_rx_space()
        return self._rbr

    def _lsr(self) -> int:
        value = self._lsr_err
        if self._rx:
            value |= LSR_DR
        if not self._tx:
            value |= LSR_THRE | LSR_TEMT
        if self._rx_errors and self._fcr & FCR_ENABLE:
            value |= LSR_RXFE
        return value

    def _read_lsr(self) -> int:
        value = self._lsr()
        if self._lsr_err:
            self._lsr_err = 0
            self._update()
        return value

    def write(self, offset: int, value: int) -> None:
        """A guest byte write; only the low 8 bits of ``value`` reach the part."""
        value &= 0xFF
        if offset == THR:
            if self.lcr & LCR_DLAB:
                self.dll = value
            else:
                self._write_thr(value)
        elif offset == IER:
            if self.lcr & LCR_DLAB:
                self.dlm = value
            else:
                self._write_ier(value)
        elif offset == FCR:
            self._write_fcr(value)
        elif offset == LCR:
            self.lcr = value
        elif offset == MCR:
            self._write_mcr(value)
        elif offset == SCR:
            self.scr = value
        # LSR and MSR writes are factory-test only on the part: ignored.

    def _write_thr(self, value: int) -> None:
        self._thre_pending = False
        if self.mcr & MCR_LOOP:
            # The transmitter feeds the receiver; the byte never reaches the host,
            # and the holding register is empty again at once.
            self._rx_push(value, 0)
            if not self._tx:  # bytes queued before loopback still wait for the host
                self._thre_pending = True
            self._update()
            return
        tx = self._tx
        if len(tx) >= self._capacity():
            self.stats.tx_overruns += 1
            self._update()
            return
        tx.append(value)
        self._update()
        if len(tx) == 1:
            self.host.tx_started()

    def _write_ier(self, value: int) -> None:
        value &= 0x0F
        if value & IER_ETBEI and not self.ier & IER_ETBEI and not self._tx:
            # Enabling ETBEI with THR empty raises THRE at once (the driver's
            # console path and its UART_BUG_THRE probe depend on this).
            self._thre_pending = True
        self.ier = value
        self._update()

    def _write_fcr(self, value: int) -> None:
        if not self.has_fifo:
            return  # a 16450 has no FCR
        old = self._fcr
        if not value & FCR_ENABLE:
            if old & FCR_ENABLE:
                # Leaving FIFO mode clears both FIFOs; other bits are not programmed.
                self._fcr = 0
                self._clear_rx()
                self._clear_tx(False)
                self._after_rx_change()
            return
        self._fcr = value & (FCR_ENABLE | FCR_DMA_MODE | 0xC0)
        rx_reset = bool(value & FCR_RX_RESET) or not old & FCR_ENABLE
        tx_reset = bool(value & FCR_TX_RESET) or not old & FCR_ENABLE
        if rx_reset:
            self._clear_rx()
        if tx_reset:
            self._clear_tx(bool(value & FCR_TX_RESET))
        self._after_rx_change()

    def _clear_rx(self) -> None:
        self.stats.rx_discarded += len(self._rx)
        self._rx.clear()
        self._rx_errors = 0
        self._lsr_err &= LSR_OE  # the errors belonged to bytes now gone
        self._cti_pending = False

    def _clear_tx(self, explicit: bool) -> None:
        """Empty the TX FIFO; a transmitter reset leaves THR empty, so THRE is raised.

        Raised also when the FIFO was already empty (and on a FIFO mode
        change, which resets the transmitter too), as QEMU does: the driver
        treats a spare THRE interrupt as "nothing to send" and stops TX.
        """
        self._thre_pending = True
        self._tx.clear()

    def _after_rx_change(self) -> None:
        self._update()
        if self._rx_blocked:
            self._notify_rx_space()

    def _write_mcr(self, value: int) -> None:
        value &= 0x1F
        was_loop = self.mcr & MCR_LOOP
        self.mcr = value
        self._set_lines(self._effective_lines())
        self._update()
        if was_loop and not value & MCR_LOOP and self._rx_blocked:
            self._notify_rx_space()

    # ---------------------------------------------------------- modem status

    def _effective_lines(self) -> int:
        """MSR bits 7:4 as the receiver sees them (internal wiring in loopback)."""
        mcr = self.mcr
        if mcr & MCR_LOOP:
            lines = 0
            if mcr & MCR_RTS:
                lines |= MSR_CTS
            if mcr & MCR_DTR:
                lines |= MSR_DSR
            if mcr & MCR_OUT1:
                lines |= MSR_RI
            if mcr & MCR_OUT2:
                lines |= MSR_DCD
            return lines
        return (
            (MSR_CTS if self._ext_cts else 0)
            | (MSR_DSR if self._ext_dsr else 0)
            | (MSR_RI if self._ext_ri else 0)
            | (MSR_DCD if self._ext_dcd else 0)
        )

    def _set_lines(self, lines: int) -> None:
        old = self._msr
        changed = (old ^ lines) & 0xF0
        deltas = old & MSR_DELTAS
        if changed & MSR_CTS:
            deltas |= MSR_DCTS
        if changed & MSR_DSR:
            deltas |= MSR_DDSR
        if changed & MSR_DCD:
            deltas |= MSR_DDCD
        if changed & MSR_RI and not lines & MSR_RI:
            deltas |= MSR_TERI  # only the trailing edge (RI going off) counts
        self._msr = lines | deltas

    def set_modem_status(
        self,
        *,
        cts: bool | None = None,
        dsr: bool | None = None,
        ri: bool | None = None,
        dcd: bool | None = None,
    ) -> None:
        """Host side: drive the modem input lines (None leaves a line as it is).

        In loopback mode the inputs are disconnected; the new levels take
        effect (with their delta bits) when loopback is left.
        """
        if cts is not None:
            self._ext_cts = bool(cts)
        if dsr is not None:
            self._ext_dsr = bool(dsr)
        if ri is not None:
            self._ext_ri = bool(ri)
        if dcd is not None:
            self._ext_dcd = bool(dcd)
        self._set_lines(self._effective_lines())
        self._update()

    # ------------------------------------------------------------- host side

    def _rx_push(self, byte: int, errors: int) -> bool:
        """Put one received character in the RX FIFO, or overrun."""
        rx = self._rx
        if len(rx) >= self._capacity():
            self._lsr_err |= LSR_OE
            self.stats.rx_overruns += 1
            if not self._fcr & FCR_ENABLE:
                # A 16450 overwrites RBR; a 16550A keeps the FIFO and loses the new byte.
                old = rx.pop()
                if old >> _ERR_SHIFT:
                    self._rx_errors -= 1
                rx.append(byte | errors << _ERR_SHIFT)
                if errors:
                    self._rx_errors += 1
                self._lsr_err |= errors
            return False
        if not rx:
            self._lsr_err |= errors
        rx.append(byte | errors << _ERR_SHIFT)
        if errors:
            self._rx_errors += 1
        return True

    def rx_space(self) -> int:
        """How many bytes :meth:`receive` would accept now."""
        if self.mcr & MCR_LOOP:
            return 0
        return self._capacity() - len(self._rx)

    def receive(self, data: bytes) -> int:
        """Host to guest: deliver bytes; returns how many were taken (never overruns).

        The caller keeps the rest and offers it again after ``UartHost.rx_space``,
        which fires once the guest frees space after a refusal or after this
        call filled the FIFO exactly (a host that reads only ``rx_space()``
        bytes from its input never sees a refusal).
        """
        space = self.rx_space()
        n = min(len(data), space)
        if n:
            self._rx.extend(data[:n])  # plain bytes: no error bits to latch
            self.stats.rx_bytes += n
        if n < len(data) or self.rx_space() == 0:
            # Full (or more was offered than fit): tell the host when the
            # guest makes room, so it can resume reading its input.
            self._rx_blocked = True
        self._update()
        return n

    def send_break(self) -> None:
        """A break on the line: the part stores a NUL with BI set (and DR)."""
        if self.mcr & MCR_LOOP:
            return  # the serial input is disconnected in loopback
        if self.rx_space() <= 0:
            self._lsr_err |= LSR_OE
            self.stats.rx_overruns += 1
            self._rx_blocked = True
        else:
            self._rx_push(0, LSR_BI)
            self.stats.rx_bytes += 1
        self._update()

    def take_tx(self, max_bytes: int | None = None) -> bytes:
        """Host drains the TX FIFO; an emptied FIFO sets THRE and its interrupt."""
        tx = self._tx
        n = len(tx)
        if max_bytes is not None:
            n = max(0, min(n, max_bytes))
        if not n:
            return b""
        out = bytes(tx.popleft() for _ in range(n))
        self.stats.tx_bytes += n
        if not tx:
            self._thre_pending = True
        self._update()
        return out

    def tx_pending(self) -> int:
        return len(self._tx)

    @property
    def cti_armed(self) -> bool:
        """Whether the host should run its ~4-character-time timeout timer."""
        if not self._fcr & FCR_ENABLE or self._cti_pending:
            return False
        return 0 < len(self._rx) < self._trigger()

    def character_timeout(self) -> None:
        """The host's timeout timer fired: data waited below the trigger level."""
        if self._fcr & FCR_ENABLE and 0 < len(self._rx) < self._trigger():
            self._cti_pending = True
            self._update()

    def _notify_rx_space(self) -> None:
        if self.rx_space() > 0:
            self._rx_blocked = False
            self.host.rx_space()

    # --------------------------------------------------------------- snapshot

    def save_state(self) -> dict[str, object]:
        """Registers, both FIFOs (RX with each byte's PE/FE/BI bits), latches and the modem lines.

        Not saved: :attr:`stats` (they describe this run) and the host. After
        :meth:`load_state` the machine re-syncs what the host derives from
        the model: the line from :attr:`irq_level`, a drain if
        :meth:`tx_pending`, the CTI timer if :attr:`cti_armed`, and input if
        :meth:`rx_space` (the model told the old host, never the new one).
        """
        return {
            "fifo": self.has_fifo, "rbr": self._rbr, "ier": self.ier, "fcr": self._fcr, "lcr": self.lcr,
            "mcr": self.mcr, "lsr_errors": self._lsr_err, "msr": self._msr, "scr": self.scr,
            "dll": self.dll, "dlm": self.dlm,
            "rx_fifo": bytes(e & 0xFF for e in self._rx).hex(),
            "rx_fifo_errors": [e >> _ERR_SHIFT for e in self._rx],
            "tx_fifo": bytes(self._tx).hex(),
            "thre_pending": self._thre_pending, "cti_pending": self._cti_pending, "rx_blocked": self._rx_blocked,
            "cts": self._ext_cts, "dsr": self._ext_dsr, "ri": self._ext_ri, "dcd": self._ext_dcd,
            "irq_level": self._level,
        }

    def load_state(self, state: Mapping[str, object]) -> None:
        """Become the UART :meth:`save_state` described; StateError (and no change) if it is damaged.

        The fields are put into a scratch UART first, so that its own
        interrupt and modem logic checks them (an IIR source, MSR lines and
        an interrupt level that the registers imply); the host hears nothing.
        """
        r = StateReader(state, "the 16550A UART", _STATE_KEYS)
        r.require(r.take_bool("fifo") == self.has_fifo, "fifo",
                  f"it was saved from a UART {'without' if self.has_fifo else 'with'} FIFOs")
        u = Uart16550(fifo=self.has_fifo)
        u._rbr, u.lcr, u.scr, u.dll, u.dlm, u._msr = (r.take_int(k, 0, 0xFF)
                                                      for k in ("rbr", "lcr", "scr", "dll", "dlm", "msr"))
        u.ier = r.take_int("ier", 0, 0x0F)
        u.mcr = r.take_int("mcr", 0, 0x1F)
        u._fcr = r.take_int("fcr", 0, 0xFF)
        r.require(u._fcr & ~(FCR_ENABLE | FCR_DMA_MODE | 0xC0) == 0 and (u._fcr == 0 or u._fcr & FCR_ENABLE)
                  and (self.has_fifo or u._fcr == 0), "fcr", f"{u._fcr:#x} is not an FCR this UART can hold")
        u._lsr_err = r.take_int("lsr_errors", 0, LSR_OE | LSR_BYTE_ERRORS)
        r.require(not u._lsr_err & ~(LSR_OE | LSR_BYTE_ERRORS), "lsr_errors", "it has bits other than OE, PE, FE and BI")
        rx = r.take_hex_bytes("rx_fifo", u._capacity())
        errors = r.take_int_list("rx_fifo_errors", 0, LSR_BYTE_ERRORS, u._capacity())
        r.require(len(errors) == len(rx) and all(not e & ~LSR_BYTE_ERRORS for e in errors), "rx_fifo_errors",
                  "it needs one PE/FE/BI value per received byte")
        u._rx.extend(b | e << _ERR_SHIFT for b, e in zip(rx, errors))
        u._rx_errors = sum(1 for e in errors if e)
        u._tx.extend(r.take_hex_bytes("tx_fifo", u._capacity()))
        u._thre_pending, u._cti_pending, u._rx_blocked, u._ext_cts, u._ext_dsr, u._ext_ri, u._ext_dcd = (
            r.take_bool(k) for k in ("thre_pending", "cti_pending", "rx_blocked", "cts", "dsr", "ri", "dcd"))
        u._level = r.take_bool("irq_level")
        r.require(u._msr & 0xF0 == u._effective_lines(), "msr", "its line bits disagree with MCR and the modem lines")
        r.require(not (u._thre_pending and u._tx), "thre_pending", "THR cannot be empty with bytes in the TX FIFO")
        r.require(not u._cti_pending or bool(u._fcr & FCR_ENABLE and u._rx), "cti_pending",
                  "a character timeout needs FIFO mode and received data")
        r.require(u._level == (u._interrupt_id() != IIR_NONE and bool(u.mcr & MCR_OUT2)), "irq_level",
                  "it is not the level the registers give")
        for name in _STATE_ATTRS:
            setattr(self, name, getattr(u, name))

    # -------------------------------------------------------------- helpers

    def peek_iir(self) -> int:
        """IIR as a read would return it, without the read's side effect."""
        return self._interrupt_id() | (IIR_FIFO_ENABLED if self._fcr & FCR_ENABLE else 0)

    def peek_lsr(self) -> int:
        """LSR as a read would return it, without clearing the error bits."""
        return self._lsr()

    def rx_level(self) -> int:
        return len(self._rx)
