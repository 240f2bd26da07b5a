"""Unit tests of the 16550A model against the datasheet and the Linux 8250 driver's probes."""

from __future__ import annotations

import pytest

from kvmkit.devices.base import ByteRegisterDevice
from kvmkit.devices.uart16550 import (
    DLL,
    DLM,
    FCR,
    IER,
    IIR,
    LCR,
    LSR,
    MCR,
    MSR,
    RBR,
    SCR,
    THR,
    Uart16550,
)

# Bits named as in the Linux driver's serial_reg.h, to keep the probes readable.
UART_IER_RDI, UART_IER_THRI, UART_IER_RLSI, UART_IER_MSI = 0x01, 0x02, 0x04, 0x08
UART_IIR_NO_INT = 0x01
UART_FCR_ENABLE_FIFO, UART_FCR_CLEAR_RCVR, UART_FCR_CLEAR_XMIT = 0x01, 0x02, 0x04
UART_FCR7_64BYTE = 0x20
UART_LCR_WLEN8, UART_LCR_DLAB = 0x03, 0x80
UART_LCR_CONF_MODE_A, UART_LCR_CONF_MODE_B = 0x80, 0xBF
UART_MCR_DTR, UART_MCR_RTS, UART_MCR_OUT1, UART_MCR_OUT2, UART_MCR_LOOP = 1, 2, 4, 8, 0x10
UART_LSR_DR, UART_LSR_OE, UART_LSR_BI = 0x01, 0x02, 0x10
UART_LSR_THRE, UART_LSR_TEMT, UART_LSR_FIFOE = 0x20, 0x40, 0x80
UART_EFR = 2  # the EFR sits at offset 2 on parts that have one (LCR=0xBF)


class Irq:
    """The UART's host side for tests: records the interrupt output, and calls on TX start / RX space."""

    def __init__(self, on_tx=None, on_rx_space=None) -> None:
        self.level = False
        self.calls: list[bool] = []
        self.on_tx = on_tx
        self.on_rx_space = on_rx_space

    def set_irq(self, level: bool) -> None:
        self.calls.append(level)
        self.level = level

    def tx_started(self) -> None:
        if self.on_tx is not None:
            self.on_tx()

    def rx_space(self) -> None:
        if self.on_rx_space is not None:
            self.on_rx_space()


def make(fifo: bool = True, **kw) -> tuple[Uart16550, Irq]:
    irq = Irq(**kw)
    return Uart16550(irq, fifo=fifo), irq


def enable_fifo(u: Uart16550, trigger_bits: int = 0) -> None:
    u.write(FCR, UART_FCR_ENABLE_FIFO | trigger_bits)


# ------------------------------------------------------------------ reset state


def test_reset_values_follow_datasheet() -> None:
    u, irq = make()
    assert u.read(IER) == 0
    assert u.read(IIR) == 0x01
    assert u.read(LCR) == 0
    assert u.read(MCR) == 0
    assert u.read(LSR) == 0x60
    assert u.read(MSR) == 0xB0  # CTS, DSR, DCD asserted by default
    assert u.read(SCR) == 0
    assert u.divisor == 12 and u.baud == 9600
    assert irq.calls == []


def test_reset_restores_state_and_lowers_irq() -> None:
    u, irq = make()
    u.write(MCR, UART_MCR_OUT2)
    u.write(IER, UART_IER_THRI)
    assert irq.level
    u.write(SCR, 0x55)
    u.write(THR, 0x41)
    u.receive(b"xy")
    u.reset()
    assert not irq.level and not u.irq_level
    assert u.read(SCR) == 0 and u.read(IER) == 0 and u.read(LSR) == 0x60
    assert u.tx_pending() == 0 and u.rx_level() == 0


def test_out_of_range_offsets() -> None:
    u, _ = make()
    for off in (-1, 8, 9, 1 << 40, -(1 << 70)):
        assert u.read(off) == 0xFF
        u.write(off, 0x12)
    assert u.read(SCR) == 0


def test_values_are_truncated_to_a_byte() -> None:
    u, _ = make()
    u.write(SCR, 0x1FF)
    assert u.read(SCR) == 0xFF
    u.write(SCR, -1)
    assert u.read(SCR) == 0xFF


# ------------------------------------------------------------ simple registers


def test_ier_keeps_bits_0_to_3() -> None:
    u, _ = make()
    u.write(IER, 0xFF)
    assert u.read(IER) == 0x0F


def test_mcr_keeps_bits_0_to_4() -> None:
    u, _ = make()
    u.write(MCR, 0xFF)
    assert u.read(MCR) == 0x1F


def test_scr_holds_any_value() -> None:
    u, _ = make()
    for v in (0x00, 0x55, 0xAA, 0xFF):
        u.write(SCR, v)
        assert u.read(SCR) == v


def test_lsr_and_msr_writes_are_ignored() -> None:
    u, _ = make()
    u.write(LSR, 0x00)
    u.write(MSR, 0x00)
    assert u.read(LSR) == 0x60
    assert u.read(MSR) == 0xB0


def test_dlab_maps_divisor_latch() -> None:
    u, _ = make()
    u.write(IER, 0x05)
    u.write(LCR, UART_LCR_DLAB | UART_LCR_WLEN8)
    u.write(DLL, 0x01)
    u.write(DLM, 0x00)
    assert u.read(DLL) == 0x01 and u.read(DLM) == 0x00
    assert u.divisor == 1 and u.baud == 115200
    u.write(LCR, UART_LCR_WLEN8)
    assert u.read(IER) == 0x05  # IER untouched by the DLM write
    assert u.tx_pending() == 0  # the DLL write did not transmit
    assert u.read(LCR) == UART_LCR_WLEN8
    assert u.divisor == 1  # the latch keeps its value with DLAB=0


@pytest.mark.parametrize("dll,dlm,baud", [(0, 0, 0), (0xFF, 0xFF, 1), (3, 0, 38400), (0, 1, 450)])
def test_baud_never_divides_by_zero(dll: int, dlm: int, baud: int) -> None:
    u, _ = make()
    u.write(LCR, UART_LCR_DLAB)
    u.write(DLL, dll)
    u.write(DLM, dlm)
    assert u.divisor == dll | dlm << 8
    assert u.baud == baud


def test_divisor_zero_keeps_working() -> None:
    """QEMU CVE-2016-8669 divided by a zero divisor; the model must simply carry on."""
    u, _ = make()
    u.write(LCR, UART_LCR_DLAB)
    u.write(DLL, 0)
    u.write(DLM, 0)
    u.write(LCR, UART_LCR_WLEN8)
    u.write(THR, 0x41)
    assert u.take_tx() == b"A"


# ------------------------------------------------------------------- FIFO/FCR


def test_fcr_enable_sets_iir_fifo_bits() -> None:
    u, _ = make()
    assert u.read(IIR) & 0xC0 == 0
    u.write(FCR, UART_FCR_ENABLE_FIFO)
    assert u.read(IIR) == 0xC1
    u.write(FCR, 0)
    assert u.read(IIR) == 0x01


def test_iir_never_shows_64_byte_bit() -> None:
    u, _ = make()
    u.write(FCR, UART_FCR_ENABLE_FIFO | UART_FCR7_64BYTE)
    assert u.read(IIR) & 0x30 == 0
    u.write(LCR, UART_LCR_DLAB)
    u.write(FCR, UART_FCR_ENABLE_FIFO | UART_FCR7_64BYTE)
    assert u.read(IIR) & 0x30 == 0


def test_fifo_false_is_a_16450() -> None:
    u, _ = make(fifo=False)
    u.write(FCR, 0xC7)
    assert u.read(IIR) == 0x01
    assert u.rx_space() == 1
    assert u.receive(b"abc") == 1
    assert u.rx_space() == 0
    u.write(THR, 1)
    u.write(THR, 2)
    assert u.stats.tx_overruns == 1
    assert u.take_tx() == b"\x01"


def test_fifo_disabled_16550a_holds_one_byte() -> None:
    u, _ = make()
    assert u.rx_space() == 1
    assert u.receive(b"ab") == 1
    enable_fifo(u)
    assert u.rx_level() == 0  # changing mode clears the FIFOs
    assert u.rx_space() == 16


def test_rx_fifo_holds_16_and_applies_back_pressure() -> None:
    u, _ = make()
    enable_fifo(u)
    assert u.receive(bytes(range(20))) == 16
    assert u.rx_space() == 0
    assert u.receive(b"x") == 0
    assert not u.read(LSR) & UART_LSR_OE  # back pressure, never an overrun
    assert bytes(u.read(RBR) for _ in range(16)) == bytes(range(16))
    assert not u.read(LSR) & UART_LSR_DR


def test_fcr_flush_rx_and_tx() -> None:
    u, _ = make()
    enable_fifo(u)
    u.receive(b"abc")
    u.write(THR, 1)
    u.write(FCR, UART_FCR_ENABLE_FIFO | UART_FCR_CLEAR_RCVR)
    assert u.rx_level() == 0 and u.tx_pending() == 1
    u.write(FCR, UART_FCR_ENABLE_FIFO | UART_FCR_CLEAR_XMIT)
    assert u.tx_pending() == 0
    assert u.read(LSR) == 0x60


def test_tx_reset_raises_thre() -> None:
    """A transmitter reset leaves THR empty: THRE is pending again (as in QEMU)."""
    u, _ = make()
    enable_fifo(u)
    u.write(IER, UART_IER_THRI)
    assert u.read(IIR) == 0xC2
    assert u.read(IIR) == 0xC1
    u.write(FCR, UART_FCR_ENABLE_FIFO | UART_FCR_CLEAR_XMIT)
    assert u.read(IIR) == 0xC2
    u.write(FCR, 0)  # leaving FIFO mode resets the transmitter too
    assert u.read(IIR) == 0x02


def test_fcr_other_bits_ignored_without_enable() -> None:
    u, _ = make()
    u.receive(b"a")
    u.write(FCR, 0xC2)  # clear and trigger 14 but FIFO enable 0
    assert u.rx_level() == 1
    assert u.read(IIR) == 0x01


@pytest.mark.parametrize("bits,level", [(0x00, 1), (0x40, 4), (0x80, 8), (0xC0, 14)])
def test_rx_trigger_levels(bits: int, level: int) -> None:
    u, _ = make()
    enable_fifo(u, bits)
    u.write(IER, UART_IER_RDI)
    u.receive(b"x" * (level - 1))
    assert u.read(IIR) == 0xC1
    u.receive(b"x")
    assert u.read(IIR) == 0xC4
    u.read(RBR)
    if level > 1:
        assert u.read(IIR) == 0xC1


# ------------------------------------------------------------------ interrupts


def test_irq_gated_by_out2() -> None:
    u, irq = make()
    u.write(IER, UART_IER_THRI)
    assert u.read(IIR) == 0x02
    u.write(IER, 0)
    u.write(IER, UART_IER_THRI)
    assert not irq.level and irq.calls == []
    u.write(MCR, UART_MCR_OUT2)
    assert irq.level and u.irq_level
    u.write(MCR, 0)
    assert not irq.level
    assert irq.calls == [True, False]


def test_irq_called_only_on_change() -> None:
    u, irq = make()
    u.write(MCR, UART_MCR_OUT2)
    u.write(IER, UART_IER_RDI)
    enable_fifo(u)
    for b in b"abc":
        u.receive(bytes([b]))
    assert irq.calls == [True]
    u.read(RBR)
    u.read(RBR)
    assert irq.calls == [True]
    u.read(RBR)
    assert irq.calls == [True, False]


def test_priority_rls_rda_thre_msr() -> None:
    u, _ = make()
    enable_fifo(u)
    u.write(IER, 0x0F)
    u.set_modem_status(cts=False)  # DCTS pending
    assert u.read(IIR) == 0xC2  # THRE beats MSR
    # the THRE read cleared THRE; now MSR shows
    assert u.read(IIR) == 0xC0
    u.receive(b"a")
    assert u.read(IIR) == 0xC4
    u.send_break()
    assert u.read(IIR) == 0xC4  # BI byte is not at the top yet
    u.read(RBR)  # the break byte reaches the top
    assert u.read(IIR) == 0xC6
    lsr = u.read(LSR)
    assert lsr & UART_LSR_BI and lsr & UART_LSR_DR and lsr & UART_LSR_FIFOE
    assert u.read(IIR) == 0xC4
    assert u.read(RBR) == 0
    assert u.read(IIR) == 0xC0  # MSR still pending
    u.read(MSR)
    assert u.read(IIR) == 0xC1


def test_iir_ids_are_never_ored() -> None:
    u, _ = make()
    enable_fifo(u)
    u.write(IER, 0x0F)
    u.set_modem_status(dcd=False)
    u.receive(b"a")
    u.send_break()
    seen = set()
    for _ in range(10):
        iir = u.read(IIR)
        seen.add(iir & 0x0F)
        assert iir & 0x0F in (0x0, 0x1, 0x2, 0x4, 0x6, 0xC)
        u.read(RBR)
        u.read(LSR)
    u.read(MSR)
    assert u.read(IIR) == 0xC1


def test_thre_interrupt_cleared_by_iir_read_and_thr_write() -> None:
    u, irq = make()
    u.write(MCR, UART_MCR_OUT2)
    u.write(IER, UART_IER_THRI)
    assert irq.level
    assert u.read(IIR) == 0x02
    assert not irq.level
    assert u.read(IIR) == 0x01  # the read consumed it
    u.write(IER, 0)
    u.write(IER, UART_IER_THRI)
    assert irq.level
    u.write(THR, 0x41)
    assert not irq.level
    assert u.read(LSR) & (UART_LSR_THRE | UART_LSR_TEMT) == 0
    assert u.take_tx() == b"A"
    assert irq.level  # FIFO drained: THRE again
    assert u.read(LSR) & 0x60 == 0x60


def test_thre_not_reraised_when_ier_rewritten_with_thri_already_set() -> None:
    u, _ = make()
    u.write(IER, UART_IER_THRI)
    assert u.read(IIR) == 0x02
    u.write(IER, UART_IER_THRI | UART_IER_RDI)
    assert u.read(IIR) == 0x01


def test_thre_not_raised_when_enabled_with_fifo_full() -> None:
    u, _ = make()
    enable_fifo(u)
    u.write(THR, 1)
    u.write(IER, UART_IER_THRI)
    assert u.read(IIR) == 0xC1
    u.take_tx()
    assert u.read(IIR) == 0xC2


def test_partial_take_tx_keeps_thre_clear() -> None:
    u, irq = make(on_tx=None)
    enable_fifo(u)
    u.write(MCR, UART_MCR_OUT2)
    u.write(IER, UART_IER_THRI)
    u.read(IIR)
    for b in b"hello":
        u.write(THR, b)
    assert u.take_tx(2) == b"he"
    assert u.take_tx(0) == b""
    assert u.take_tx(-5) == b""
    assert not irq.level and not u.read(LSR) & UART_LSR_THRE
    assert u.tx_pending() == 3
    assert u.take_tx() == b"llo"
    assert irq.level
    assert u.take_tx() == b""


def test_tx_fifo_overrun_counted() -> None:
    u, _ = make()
    enable_fifo(u)
    for i in range(20):
        u.write(THR, i)
    assert u.tx_pending() == 16
    assert u.stats.tx_overruns == 4
    assert u.take_tx() == bytes(range(16))
    assert u.stats.tx_bytes == 16


def test_on_tx_called_on_empty_to_non_empty() -> None:
    calls = []
    u, _ = make(on_tx=lambda: calls.append(1))
    enable_fifo(u)
    u.write(THR, 1)
    u.write(THR, 2)
    assert calls == [1]
    u.take_tx()
    u.write(THR, 3)
    assert calls == [1, 1]


def test_console_write_path_restores_ier() -> None:
    """serial8250_console_write: save IER, write 0, poll LSR, write, restore IER."""
    u, irq = make()
    enable_fifo(u)
    u.write(MCR, UART_MCR_OUT2 | UART_MCR_DTR | UART_MCR_RTS)
    u.write(IER, UART_IER_RDI | UART_IER_RLSI | UART_IER_THRI)
    u.read(IIR)  # THRE taken by the ISR, nothing to send
    assert not irq.level
    ier = u.read(IER)
    u.write(IER, 0)
    for ch in b"console\n":
        assert u.read(LSR) & UART_LSR_THRE
        u.write(THR, ch)
        u.take_tx()  # the host drains while the guest polls
    assert u.read(LSR) & (UART_LSR_THRE | UART_LSR_TEMT) == 0x60
    u.write(IER, ier)
    assert irq.level and u.read(IIR) == 0xC2


def test_rda_clears_when_fifo_below_trigger() -> None:
    u, irq = make()
    enable_fifo(u, 0x40)  # trigger 4
    u.write(MCR, UART_MCR_OUT2)
    u.write(IER, UART_IER_RDI)
    u.receive(b"abcd")
    assert irq.level
    u.read(RBR)
    assert not irq.level


def test_rda_without_fifo() -> None:
    u, irq = make(fifo=False)
    u.write(MCR, UART_MCR_OUT2)
    u.write(IER, UART_IER_RDI)
    u.receive(b"q")
    assert u.read(IIR) == 0x04 and irq.level
    assert u.read(RBR) == ord("q")
    assert u.read(IIR) == 0x01 and not irq.level


def test_character_timeout() -> None:
    u, irq = make()
    enable_fifo(u, 0xC0)  # trigger 14
    u.write(MCR, UART_MCR_OUT2)
    u.write(IER, UART_IER_RDI)
    assert not u.cti_armed
    u.character_timeout()
    assert u.read(IIR) == 0xC1  # nothing in the FIFO: no timeout
    u.receive(b"abc")
    assert u.cti_armed and not irq.level
    u.character_timeout()
    assert irq.level and u.read(IIR) == 0xCC
    assert not u.cti_armed  # already pending
    assert u.read(RBR) == ord("a")  # one read clears CTI
    assert u.read(IIR) == 0xC1 and not irq.level
    assert u.cti_armed  # data still below the trigger: timer again
    u.character_timeout()
    assert u.read(IIR) == 0xCC
    u.read(RBR)
    u.read(RBR)
    assert not u.cti_armed


def test_cti_needs_fifo_mode() -> None:
    u, _ = make()
    u.write(IER, UART_IER_RDI)
    u.receive(b"a")
    assert not u.cti_armed
    u.character_timeout()
    assert u.read(IIR) == 0x04  # plain RDA in 16450 mode


def test_cti_cleared_by_rx_flush() -> None:
    u, _ = make()
    enable_fifo(u, 0x80)
    u.write(IER, UART_IER_RDI)
    u.receive(b"a")
    u.character_timeout()
    assert u.read(IIR) == 0xCC
    u.write(FCR, UART_FCR_ENABLE_FIFO | UART_FCR_CLEAR_RCVR)
    assert u.read(IIR) == 0xC1


def test_on_rx_space_after_back_pressure() -> None:
    """The host reads only what fits, so a FIFO filled exactly counts as blocked too."""
    calls = []
    u, _ = make(on_rx_space=lambda: calls.append(1))
    enable_fifo(u)
    assert u.receive(bytes(15)) == 15
    u.read(RBR)
    assert calls == []  # never full, nothing refused: no call
    assert u.receive(bytes(5)) == 2
    assert calls == []
    u.read(RBR)
    assert calls == [1]
    u.read(RBR)
    assert calls == [1]  # once per blocking
    assert u.receive(bytes(2)) == 2  # fills it exactly
    u.read(RBR)
    assert calls == [1, 1]


def test_on_rx_space_when_loopback_ends() -> None:
    calls = []
    u, _ = make(on_rx_space=lambda: calls.append(1))
    u.write(MCR, UART_MCR_LOOP)
    assert u.rx_space() == 0
    assert u.receive(b"a") == 0
    u.write(MCR, 0)
    assert calls == [1]
    assert u.receive(b"a") == 1


def test_stats_count_interrupt_edges() -> None:
    u, _ = make()
    enable_fifo(u)
    u.write(MCR, UART_MCR_OUT2)
    u.write(IER, UART_IER_RDI | UART_IER_THRI)
    assert u.stats.thre_interrupts == 1
    u.read(IIR)
    u.receive(b"ab")
    assert u.stats.rx_interrupts == 1 and u.stats.rx_bytes == 2
    u.read(RBR)
    u.read(RBR)
    u.write(THR, 0x41)
    u.take_tx()
    assert u.stats.thre_interrupts == 2 and u.stats.tx_bytes == 1


# -------------------------------------------------------------- line status


def test_break_is_nul_with_bi_and_dr() -> None:
    u, _ = make()
    enable_fifo(u)
    u.send_break()
    lsr = u.read(LSR)
    assert lsr & (UART_LSR_BI | UART_LSR_DR) == UART_LSR_BI | UART_LSR_DR
    assert lsr & UART_LSR_FIFOE
    lsr = u.read(LSR)
    assert not lsr & UART_LSR_BI  # cleared by the read
    assert lsr & UART_LSR_FIFOE  # the error byte is still in the FIFO
    assert u.read(RBR) == 0
    assert u.read(LSR) == 0x60


def test_break_without_fifo_has_no_fifo_error_bit() -> None:
    u, _ = make(fifo=False)
    u.send_break()
    assert u.read(LSR) == UART_LSR_BI | UART_LSR_DR | 0x60


def test_rls_interrupt_cleared_by_lsr_read() -> None:
    u, irq = make()
    enable_fifo(u)
    u.write(MCR, UART_MCR_OUT2)
    u.write(IER, UART_IER_RLSI)
    u.send_break()
    assert irq.level and u.read(IIR) == 0xC6
    u.read(LSR)
    assert not irq.level and u.read(IIR) == 0xC1


def test_break_into_full_fifo_sets_oe() -> None:
    u, _ = make()
    enable_fifo(u)
    u.receive(bytes(16))
    u.send_break()
    assert u.read(LSR) & UART_LSR_OE
    assert not u.read(LSR) & UART_LSR_OE


# ------------------------------------------------------------------- loopback


def test_loopback_thr_goes_to_rx_not_host() -> None:
    u, _ = make()
    enable_fifo(u)
    u.write(MCR, UART_MCR_LOOP)
    u.write(THR, 0x5A)
    assert u.take_tx() == b"" and u.tx_pending() == 0
    assert u.read(LSR) & (UART_LSR_DR | 0x60) == UART_LSR_DR | 0x60
    assert u.read(RBR) == 0x5A
    assert u.stats.tx_bytes == 0


def test_loopback_overrun_sets_oe_fifo_mode() -> None:
    u, _ = make()
    enable_fifo(u)
    u.write(MCR, UART_MCR_LOOP)
    for i in range(17):
        u.write(THR, i)
    lsr = u.read(LSR)
    assert lsr & UART_LSR_OE
    assert bytes(u.read(RBR) for _ in range(16)) == bytes(range(16))  # new byte lost


def test_loopback_overrun_without_fifo_overwrites_rbr() -> None:
    u, _ = make(fifo=False)
    u.write(MCR, UART_MCR_LOOP)
    u.write(THR, 1)
    u.write(THR, 2)
    assert u.read(LSR) & UART_LSR_OE
    assert u.read(RBR) == 2


def test_loopback_rejects_host_input_and_break() -> None:
    u, _ = make()
    u.write(MCR, UART_MCR_LOOP)
    assert u.receive(b"abc") == 0
    u.send_break()
    assert u.rx_level() == 0


def test_loopback_msr_mirrors_mcr() -> None:
    u, _ = make()
    u.read(MSR)
    u.write(MCR, UART_MCR_LOOP)
    # CTS, DSR, DCD dropped (external 1 -> internal 0): deltas
    assert u.read(MSR) == 0x0B
    u.write(MCR, UART_MCR_LOOP | UART_MCR_RTS)
    assert u.read(MSR) == 0x11
    u.write(MCR, UART_MCR_LOOP | UART_MCR_RTS | UART_MCR_DTR)
    assert u.read(MSR) == 0x32
    u.write(MCR, UART_MCR_LOOP | 0x0F)
    assert u.read(MSR) == 0xF8
    u.write(MCR, UART_MCR_LOOP | UART_MCR_RTS | UART_MCR_DTR | UART_MCR_OUT2)  # OUT1 off: RI off
    assert u.read(MSR) == 0xB4  # TERI
    assert u.read(MSR) == 0xB0


def test_linux_loopback_test() -> None:
    """autoconfig(): MCR = LOOP|0x0A must read MSR & 0xF0 == 0x90."""
    u, _ = make()
    save = u.read(MCR)
    u.write(MCR, UART_MCR_LOOP | 0x0A)
    status1 = u.read(MSR) & 0xF0
    u.write(MCR, save)
    assert status1 == 0x90


def test_msr_deltas_from_host_and_interrupt() -> None:
    u, irq = make()
    u.write(MCR, UART_MCR_OUT2)
    u.write(IER, UART_IER_MSI)
    u.set_modem_status(ri=True)
    assert not irq.level  # RI rising is not an event
    u.set_modem_status(ri=False)
    assert irq.level
    assert u.read(IIR) == 0x00
    assert u.read(MSR) == 0xB4
    assert not irq.level
    u.set_modem_status(cts=False, dsr=False, dcd=False)
    assert u.read(MSR) == 0x0B
    assert u.read(MSR) == 0x00


def test_modem_status_in_loopback_applies_on_exit() -> None:
    u, _ = make()
    u.write(MCR, UART_MCR_LOOP | 0x0F)
    u.read(MSR)
    u.set_modem_status(cts=False)
    assert u.read(MSR) == 0xF0  # external lines disconnected
    u.write(MCR, 0)
    assert u.read(MSR) == 0xA0 | 0x01 | 0x04 | 0x00  # CTS off, RI trailing edge


# -------------------------------------------------- Linux 8250 driver probes


def linux_autoconfig(u: Uart16550) -> str:
    """The probe sequence of autoconfig()/autoconfig_16550a() in 8250_port.c, as a 16550A sees it."""
    # scratch test on IER
    scratch = u.read(IER)
    u.write(IER, 0)
    scratch2 = u.read(IER) & 0x0F
    u.write(IER, 0x0F)
    scratch3 = u.read(IER) & 0x0F
    u.write(IER, scratch)
    if scratch2 != 0 or scratch3 != 0x0F:
        return "no uart"
    # loopback test
    save_mcr = u.read(MCR)
    save_lcr = u.read(LCR)
    u.write(MCR, UART_MCR_LOOP | 0x0A)
    status1 = u.read(MSR) & 0xF0
    u.write(MCR, save_mcr)
    if status1 != 0x90:
        return "no uart (loopback)"
    u.write(LCR, UART_LCR_CONF_MODE_B)
    u.write(UART_EFR, 0)
    u.write(LCR, 0)
    u.write(FCR, UART_FCR_ENABLE_FIFO)
    kind = u.read(IIR) >> 6
    if kind == 0:
        port = "8250"
        # autoconfig_8250: SCR must hold values to be a 16450
        save = u.read(SCR)
        u.write(SCR, 0xA5)
        s1 = u.read(SCR)
        u.write(SCR, 0x5A)
        s2 = u.read(SCR)
        u.write(SCR, save)
        if s1 == 0xA5 and s2 == 0x5A:
            port = "16450"
    elif kind == 1:
        port = "unknown"
    elif kind == 2:
        port = "16550"
    else:
        port = autoconfig_16550a(u)
    u.write(LCR, save_lcr)
    u.write(MCR, save_mcr)
    u.write(FCR, UART_FCR_ENABLE_FIFO)
    u.write(FCR, UART_FCR_ENABLE_FIFO | UART_FCR_CLEAR_RCVR | UART_FCR_CLEAR_XMIT)
    u.write(FCR, 0)
    u.read(RBR)
    u.write(IER, 0)
    return port


def autoconfig_16550a(u: Uart16550) -> str:
    # EFR with DLAB set (ST16C650V1)
    u.write(LCR, UART_LCR_CONF_MODE_A)
    if u.read(UART_EFR) == 0:
        return "ST16650 or FSL64"
    # EFR with LCR=0xBF (ST16C650V2, TI16C752)
    u.write(LCR, UART_LCR_CONF_MODE_B)
    if u.read(UART_EFR) == 0:
        return "EFR part"
    # National SuperIO: LOOP bit visible in EXCR1 at LCR=0xE0
    u.write(LCR, 0)
    status1 = u.read(MCR) & ~UART_MCR_LOOP & 0xFF
    u.write(LCR, 0xE0)
    status2 = u.read(2)
    if not ((status2 ^ status1) & UART_MCR_LOOP):
        u.write(LCR, 0)
        u.write(MCR, status1 ^ UART_MCR_LOOP)
        u.write(LCR, 0xE0)
        status2 = u.read(2)
        u.write(LCR, 0)
        u.write(MCR, status1)
        if (status2 ^ status1) & UART_MCR_LOOP:
            return "NS16550A"
    # TI16750: IIR bit 5 only with DLAB set and FCR bit 5
    u.write(LCR, 0)
    u.write(FCR, UART_FCR_ENABLE_FIFO | UART_FCR7_64BYTE)
    status1 = u.read(IIR) & 0xE0
    u.write(FCR, 0)
    u.write(LCR, UART_LCR_CONF_MODE_A)
    u.write(FCR, UART_FCR_ENABLE_FIFO | UART_FCR7_64BYTE)
    status2 = u.read(IIR) & 0xE0
    u.write(FCR, 0)
    u.write(LCR, 0)
    if status1 == 0xC0 and status2 == 0xE0:
        return "16750"
    # XScale: IER bit 6 (UUE) writable
    ier = u.read(IER)
    u.write(IER, ier & ~0x40)
    if not u.read(IER) & 0x40:
        u.write(IER, ier | 0x40)
        if u.read(IER) & 0x40:
            u.write(IER, ier)
            return "XScale"
    u.write(IER, ier)
    return "16550A"


def test_linux_autoconfig_detects_16550a() -> None:
    u, irq = make()
    assert linux_autoconfig(u) == "16550A"
    assert u.read(LCR) == 0 and u.read(MCR) == 0 and u.read(IER) == 0
    assert not irq.level


def test_linux_autoconfig_detects_16450_without_fifo() -> None:
    u, _ = make(fifo=False)
    assert linux_autoconfig(u) == "16450"


def test_linux_autoconfig_with_outb_probe_via_bus_adapter() -> None:
    """The same registers through the bus adapter, as the PIO bus will call them."""
    u, _ = make()
    dev = ByteRegisterDevice(u, 8)
    dev.io_write(FCR, 1, UART_FCR_ENABLE_FIFO)
    assert dev.io_read(IIR, 1) == 0xC1
    assert dev.io_read(LSR, 2) == 0xB060  # LSR then MSR
    assert dev.io_read(7, 2) == 0xFF00  # SCR then out of the window


def linux_startup(u: Uart16550) -> set[str]:
    """serial8250_startup() up to enabling interrupts: returns the bugs it would set."""
    bugs: set[str] = set()
    # clear FIFOs, then read the interrupt registers clear
    u.write(FCR, UART_FCR_ENABLE_FIFO)
    u.write(FCR, UART_FCR_ENABLE_FIFO | UART_FCR_CLEAR_RCVR | UART_FCR_CLEAR_XMIT)
    u.write(FCR, 0)
    for reg in (LSR, RBR, IIR, MSR):
        u.read(reg)
    if u.read(LSR) == 0xFF:
        bugs.add("no uart")
    # UART_BUG_THRE: THRE must re-assert when THRI is re-enabled
    assert u.read(LSR) & UART_LSR_THRE
    u.write(IER, UART_IER_THRI)
    iir1 = u.read(IIR)
    u.write(IER, 0)
    u.write(IER, UART_IER_THRI)
    iir = u.read(IIR)
    u.write(IER, 0)
    if not iir1 & UART_IIR_NO_INT and iir & UART_IIR_NO_INT:
        bugs.add("UART_BUG_THRE")
    if iir1 & UART_IIR_NO_INT:
        bugs.add("no THRE at all")
    u.write(LCR, UART_LCR_WLEN8)
    u.write(MCR, UART_MCR_OUT2 | UART_MCR_DTR | UART_MCR_RTS)
    # UART_BUG_TXEN: enabling THRI must give an interrupt at once
    u.write(IER, UART_IER_THRI)
    lsr = u.read(LSR)
    iir = u.read(IIR)
    u.write(IER, 0)
    if lsr & UART_LSR_TEMT and iir & UART_IIR_NO_INT:
        bugs.add("UART_BUG_TXEN")
    for reg in (LSR, RBR, IIR, MSR):
        u.read(reg)
    u.write(IER, UART_IER_RLSI | UART_IER_RDI)
    return bugs


@pytest.mark.parametrize("fifo", [True, False])
def test_linux_startup_sets_no_bugs(fifo: bool) -> None:
    u, irq = make(fifo=fifo)
    assert linux_startup(u) == set()
    assert not irq.level
    u.write(FCR, UART_FCR_ENABLE_FIFO | 0x80)  # set_termios: trigger 8
    u.receive(b"12345678")
    assert irq.level


def test_linux_tx_path_one_interrupt_per_16_bytes() -> None:
    """With a FIFO, the driver's tx_chars fills 16 bytes per THRE interrupt."""
    u, irq = make()
    linux_startup(u)
    u.write(FCR, UART_FCR_ENABLE_FIFO)
    data = bytes(range(64))
    sent = bytearray()
    pos = 0
    u.write(IER, UART_IER_RDI | UART_IER_RLSI | UART_IER_THRI)  # start_tx
    handled = 0
    while len(sent) < len(data):
        if irq.level:
            iir = u.read(IIR)
            handled += 1
            if iir & 0x0F == 0x02:
                for _ in range(16):
                    if pos == len(data):
                        break
                    u.write(THR, data[pos])
                    pos += 1
        sent += u.take_tx()
    assert bytes(sent) == data
    assert handled == 4  # one interrupt per 16 bytes
    assert irq.level and u.read(IIR) == 0xC2  # the final "all sent" THRE
    assert u.stats.tx_overruns == 0
