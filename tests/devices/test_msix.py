"""MSI-X: the capability, the table, the PBA, masking and pending bits, as PCI 3.0 6.8.2 and Linux use them.

Linux's sequence (drivers/pci/msi): set MSI-X Enable together with Function
Mask, program and unmask table entries with 32-bit accesses (reading Vector
Control back to flush), then clear Function Mask.
"""

from __future__ import annotations

import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmkit.devices.base import BusDevice
from kvmkit.devices.msix import MSIX_ENTRY_SIZE, Msix, MsixEntry
from kvmkit.devices.pci import PCI_STATUS_CAP_LIST, PciFunction

ENABLE = 1 << 15
FMASK = 1 << 14


class Host:
    """Records what the machine would do: one route per vector, one eventfd write per delivery."""

    def __init__(self) -> None:
        self.routes: dict[int, tuple[int, int, bool]] = {}
        self.events: list[tuple] = []
        self.delivered: list[int] = []

    def route_changed(self, vector: int, address: int, data: int, masked: bool) -> None:
        self.routes[vector] = (address, data, masked)
        self.events.append(("route", vector, address, data, masked))

    def deliver(self, vector: int) -> None:
        route = self.routes.get(vector)
        assert route is not None and not route[2], f"deliver({vector}) on a masked or unrouted vector"
        self.delivered.append(vector)
        self.events.append(("deliver", vector))


def make(vectors: int = 4, *, separate_pba_bar: bool = False) -> tuple[PciFunction, Msix, Host, list[bool]]:
    levels: list[bool] = []
    f = PciFunction(0x1AF4, 0x1041, 0x020000, irq=levels.append)
    f.add_bar(1, 0x1000, "mem32")
    if separate_pba_bar:
        f.add_bar(2, 0x4000, "mem64")
        m = Msix(vectors, 1, 0, 2, 0x2000)
    else:
        m = Msix(vectors, 1, 0, 1, 0x800)
    host = Host()
    m.host = host
    m.add_to(f)
    return f, m, host, levels


def ctrl_offset(m: Msix) -> int:
    assert m.cap_offset is not None
    return m.cap_offset + 2


def write_ctrl(f: PciFunction, m: Msix, value: int) -> None:
    f.config_write(ctrl_offset(m), 2, value)


def program(m: Msix, vector: int, address: int, data: int, *, unmask: bool) -> None:
    """What Linux's pci_write_msi_msg + unmask do: dword writes, then a read of Vector Control."""
    base = vector * MSIX_ENTRY_SIZE
    m.table.io_write(base + 0x0, 4, address & 0xFFFF_FFFF)
    m.table.io_write(base + 0x4, 4, address >> 32)
    m.table.io_write(base + 0x8, 4, data)
    if unmask:
        m.table.io_write(base + 0xC, 4, 0)
    m.table.io_read(base + 0xC, 4)


# --- capability -----------------------------------------------------------------


def test_capability_layout() -> None:
    f, m, _, _ = make(vectors=33, separate_pba_bar=True)
    cap = m.cap_offset
    assert cap == 0x40 and f.status & PCI_STATUS_CAP_LIST and f.config_read(0x34, 1) == cap
    assert f.config_read(cap, 2) == 0x0011  # ID 0x11, end of list
    assert f.config_read(cap + 2, 2) == 32  # Table Size = N - 1
    assert f.config_read(cap + 4, 4) == 0x0000_0001  # table at offset 0 of BAR 1
    assert f.config_read(cap + 8, 4) == 0x0000_2002  # PBA at 0x2000 of BAR 2
    assert m.table_size == 33 * 16 and m.pba_size == 8


def test_only_enable_and_function_mask_are_writable() -> None:
    f, m, _, _ = make()
    cap = m.cap_offset
    assert cap is not None
    before = int.from_bytes(f.config_bytes()[cap:cap + 12], "little")
    f.config_write(cap, 4, 0xFFFF_FFFF)
    f.config_write(cap + 4, 8, -1)
    after = int.from_bytes(f.config_bytes()[cap:cap + 12], "little")
    assert after == before | (ENABLE | FMASK) << 16
    assert m.enabled and m.function_masked
    f.config_write(cap + 3, 1, 0)  # byte write to the high half of Message Control
    assert not m.enabled and not m.function_masked
    assert f.config_read(cap + 2, 2) == 3


def test_construction_errors() -> None:
    for args in ((0, 1, 0, 1, 0x800), (2049, 1, 0, 1, 0x8000), (4, 6, 0, 1, 0x800), (4, 1, 4, 1, 0x800),
                 (4, 1, 0, 1, 0x30), (64, 1, 0, 1, 0x3F8)):
        with pytest.raises(ValueError):
            Msix(*args)
    f = PciFunction(0x1AF4, 0x1041, 0x020000)
    f.add_bar(0, 32, "io")
    f.add_bar(1, 0x1000, "mem32")
    with pytest.raises(ValueError):
        Msix(4, 0, 0, 1, 0x800).add_to(f)  # the table in an I/O BAR
    with pytest.raises(ValueError):
        Msix(4, 1, 0, 3, 0x0).add_to(f)  # no BAR 3
    with pytest.raises(ValueError):
        Msix(256, 1, 0, 1, 0x1000).add_to(f)  # a 4 KiB table fills BAR 1: no room for the PBA
    m = Msix(4, 1, 0, 1, 0x800)
    m.add_to(f)
    with pytest.raises(ValueError):
        m.add_to(f)


# --- table --------------------------------------------------------------------------


def test_entries_reset_masked_with_zero_message() -> None:
    _, m, host, _ = make()
    for v in range(4):
        base = v * 16
        assert [m.table.io_read(base + o, 4) for o in (0, 4, 8, 12)] == [0, 0, 0, 1]
        assert m.entry(v) == MsixEntry(0, 0, True)
    assert host.events == []
    assert isinstance(m.table, BusDevice) and isinstance(m.pba, BusDevice)


def test_table_fields_and_reserved_bits() -> None:
    _, m, _, _ = make()
    m.table.io_write(16, 4, 0xFEE0_300F)  # address bits 1:0 read 0
    m.table.io_write(20, 4, 0x1234_5678)
    m.table.io_write(24, 4, 0xFFFF_FFFF)
    m.table.io_write(28, 4, 0xFFFF_FFFE)  # reserved bits 31:1 read 0: this unmasks
    assert [m.table.io_read(16 + o, 4) for o in (0, 4, 8, 12)] == [0xFEE0_300C, 0x1234_5678, 0xFFFF_FFFF, 0]


def test_qword_accesses() -> None:
    _, m, host, _ = make()
    m.table.io_write(32, 8, 0x0000_0001_FEE0_1000)
    m.table.io_write(40, 8, 0x0000_0000_0000_0041)  # data and unmask in one access
    assert m.table.io_read(32, 8) == 0x0000_0001_FEE0_1000
    assert m.table.io_read(40, 8) == 0x41
    assert host.routes[2] == (0x1_FEE0_1000, 0x41, True)  # MSI-X still disabled


def test_non_dword_table_accesses_are_ignored() -> None:
    _, m, host, _ = make()
    for off, size in ((0, 1), (0, 2), (2, 4), (4, 8), (12, 2), (13, 1), (-4, 4), (64, 4), (60, 8), (0, 3)):
        m.table.io_write(off, size, 0)
        assert m.table.io_read(off, size) == 0
    assert m.table.io_read(12, 4) == 1  # still masked: the byte/word writes did not unmask
    assert host.events == []


# --- masking, pending bits, delivery ---------------------------------------------------


def test_disabled_msix_returns_false_and_sets_nothing() -> None:
    f, m, host, _ = make()
    program(m, 0, 0xFEE0_0000, 0x30, unmask=True)
    assert not m.notify(0)
    assert not m.is_pending(0) and m.pba.io_read(0, 8) == 0
    assert host.delivered == []


def test_linux_enable_sequence_delivers() -> None:
    f, m, host, levels = make()
    write_ctrl(f, m, ENABLE | FMASK)
    assert host.events == []  # all entries still masked
    program(m, 0, 0xFEE0_0000, 0x30, unmask=True)
    program(m, 1, 0xFEE0_1000, 0x31, unmask=True)
    assert host.routes == {0: (0xFEE0_0000, 0x30, True), 1: (0xFEE0_1000, 0x31, True)}
    write_ctrl(f, m, ENABLE)
    assert host.routes[0] == (0xFEE0_0000, 0x30, False) and host.routes[1][2] is False
    assert m.notify(1) and m.notify(0)
    assert host.delivered == [1, 0]


def test_function_mask_holds_messages_pending() -> None:
    f, m, host, _ = make()
    program(m, 2, 0xFEE0_0000, 0x40, unmask=True)
    write_ctrl(f, m, ENABLE | FMASK)
    assert m.notify(2) and m.notify(2)
    assert host.delivered == []
    assert m.is_pending(2) and m.pba.io_read(0, 4) == 0b100 and m.pba.io_read(0, 8) == 0b100
    write_ctrl(f, m, ENABLE)
    assert host.delivered == [2]  # the two notifies coalesce into one message
    assert not m.is_pending(2) and m.pba.io_read(0, 4) == 0
    assert host.events[-2:] == [("route", 2, 0xFEE0_0000, 0x40, False), ("deliver", 2)]


def test_vector_mask_holds_messages_pending() -> None:
    f, m, host, _ = make()
    write_ctrl(f, m, ENABLE)
    program(m, 3, 0xFEE0_2000, 0x50, unmask=False)
    assert m.notify(3)
    assert m.is_pending(3) and host.delivered == []
    program(m, 0, 0xFEE0_2000, 0x51, unmask=True)
    assert m.notify(0) and host.delivered == [0]
    m.table.io_write(3 * 16 + 12, 4, 0)  # unmask vector 3
    assert host.delivered == [0, 3] and not m.is_pending(3)
    m.table.io_write(3 * 16 + 12, 4, 1)  # mask again: nothing pending, nothing sent
    assert host.delivered == [0, 3] and host.routes[3][2] is True


def test_pending_survives_disable_and_is_sent_on_reenable() -> None:
    f, m, host, _ = make()
    program(m, 1, 0xFEE0_0000, 0x60, unmask=False)
    write_ctrl(f, m, ENABLE)
    assert m.notify(1) and m.is_pending(1)
    write_ctrl(f, m, 0)
    assert not m.notify(1)  # disabled: INTx fallback, the old pending bit stays
    assert m.is_pending(1)
    m.table.io_write(16 + 12, 4, 0)  # unmasked while disabled: still held
    assert host.delivered == []
    write_ctrl(f, m, ENABLE)
    assert host.delivered == [1] and not m.is_pending(1)


def test_clear_pending_and_out_of_range_vectors() -> None:
    f, m, host, _ = make()
    write_ctrl(f, m, ENABLE | FMASK)
    m.notify(0)
    m.clear_pending(0)
    m.clear_pending(99)
    assert not m.is_pending(0)
    assert m.notify(4) and m.notify(-1) and m.notify(0xFFFF)  # virtio's NO_VECTOR: nothing to send
    write_ctrl(f, m, ENABLE)
    assert host.delivered == [] and m.pba.io_read(0, 8) == 0
    with pytest.raises(ValueError):
        m.entry(4)


def test_route_changes_report_every_message_change() -> None:
    f, m, host, _ = make()
    write_ctrl(f, m, ENABLE)
    program(m, 0, 0xFEE0_0000, 0x30, unmask=True)
    host.events.clear()
    m.table.io_write(8, 4, 0x31)  # data changed while unmasked (undefined for the guest, but reported)
    m.table.io_write(8, 4, 0x31)  # same value: no event
    assert host.events == [("route", 0, 0xFEE0_0000, 0x31, False)]
    write_ctrl(f, m, ENABLE | FMASK)
    assert host.events[-1] == ("route", 0, 0xFEE0_0000, 0x31, True)


def test_pba_is_read_only_and_qword_readable() -> None:
    f, m, _, _ = make(vectors=70, separate_pba_bar=True)
    write_ctrl(f, m, ENABLE | FMASK)
    for v in (0, 63, 64, 69):
        m.notify(v)
    m.pba.io_write(0, 8, 0)
    m.pba.io_write(8, 4, 0)
    assert m.pba.io_read(0, 8) == (1 << 63) | 1
    assert m.pba.io_read(4, 4) == 1 << 31
    assert m.pba.io_read(8, 8) == (1 << 0) | (1 << 5)
    assert m.pba.io_read(16, 4) == 0 and m.pba.io_read(1, 1) == 0 and m.pba.io_read(2, 4) == 0


def test_enable_inhibits_intx() -> None:
    f, m, _, levels = make()
    f.set_intx(True)
    assert levels == [True]
    write_ctrl(f, m, ENABLE)
    assert levels == [True, False]
    write_ctrl(f, m, 0)
    assert levels == [True, False, True]


def test_device_thread_notifies_while_vcpu_masks() -> None:
    """notify() from a worker while the 'vCPU' flips masks: every notify ends delivered or pending."""
    f, m, host, _ = make(vectors=2)
    write_ctrl(f, m, ENABLE)
    program(m, 0, 0xFEE0_0000, 0x30, unmask=True)
    stop = threading.Event()
    count = [0]

    def worker() -> None:
        while not stop.is_set():
            assert m.notify(0)
            count[0] += 1

    t = threading.Thread(target=worker)
    t.start()
    try:
        for i in range(2000):
            m.table.io_write(12, 4, i & 1)
            if i % 7 == 0:
                write_ctrl(f, m, ENABLE | (FMASK if i & 8 else 0))
    finally:
        stop.set()
        t.join()
    write_ctrl(f, m, ENABLE)
    m.table.io_write(12, 4, 0)
    assert not m.is_pending(0)
    assert 0 < len(host.delivered) <= count[0]


# --- properties ------------------------------------------------------------------------

_OP = st.one_of(
    st.tuples(st.just("table_w"), st.integers(-8, 4 * 16 + 8), st.sampled_from([1, 2, 4, 8]),
              st.integers(0, (1 << 64) - 1)),
    st.tuples(st.just("table_r"), st.integers(-8, 4 * 16 + 8), st.sampled_from([1, 2, 4, 8]), st.just(0)),
    st.tuples(st.just("pba"), st.integers(-8, 16), st.sampled_from([1, 2, 4, 8]), st.integers(0, 255)),
    st.tuples(st.just("cfg"), st.integers(0x40, 0x4C), st.sampled_from([1, 2, 4, 8]),
              st.integers(0, (1 << 64) - 1)),
    # what drivers do: Message Control values, Vector Control, whole messages
    st.tuples(st.just("cfg"), st.just(0x42), st.just(2), st.sampled_from([0, ENABLE, ENABLE | FMASK, FMASK])),
    st.tuples(st.just("table_w"), st.sampled_from([12, 28, 44, 60]), st.just(4), st.integers(0, 1)),
    st.tuples(st.just("table_w"), st.sampled_from([0, 8, 16, 24, 32, 40, 48, 56]), st.just(8),
              st.integers(0, (1 << 64) - 1)),
    st.tuples(st.just("notify"), st.integers(-1, 5), st.just(0), st.just(0)),
    st.tuples(st.just("notify"), st.integers(0, 3), st.just(0), st.just(0)),
    st.tuples(st.just("clear"), st.integers(0, 3), st.just(0), st.just(0)),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_OP, max_size=60))
def test_random_traffic_keeps_pending_bits_exact(ops: list[tuple[str, int, int, int]]) -> None:
    """PBA bit set iff a notify met a masked vector and nothing has delivered or cleared it since."""
    f, m, host, _ = make(vectors=4)
    expect_pending = [False] * 4
    expect_delivered: list[int] = []

    def state() -> tuple[bool, bool, list[bool], list[tuple[int, int]]]:
        ctrl = f.config_read(ctrl_offset(m), 2)
        vmask = [bool(m.table.io_read(v * 16 + 12, 4) & 1) for v in range(4)]
        msgs = [(m.table.io_read(v * 16, 8), m.table.io_read(v * 16 + 8, 4)) for v in range(4)]
        return bool(ctrl & ENABLE), bool(ctrl & FMASK), vmask, msgs

    for kind, offset, size, value in ops:
        if kind == "table_w":
            m.table.io_write(offset, size, value)
        elif kind == "table_r":
            assert 0 <= m.table.io_read(offset, size) < 1 << (8 * size)
        elif kind == "pba":
            m.pba.io_write(offset, size, value)
            assert 0 <= m.pba.io_read(offset, size) < 1 << (8 * size)
        elif kind == "cfg":
            f.config_write(offset, size, value)
        elif kind == "notify":
            enabled, fmask, vmask, _ = state()
            assert m.notify(offset) == enabled
            if enabled and 0 <= offset < 4:
                if fmask or vmask[offset]:
                    expect_pending[offset] = True
                else:
                    expect_delivered.append(offset)
        else:
            m.clear_pending(offset)
            expect_pending[offset] = False
        enabled, fmask, vmask, msgs = state()
        for v in range(4):
            open_ = enabled and not fmask and not vmask[v]
            if open_ and expect_pending[v]:
                expect_pending[v] = False
                expect_delivered.append(v)
            assert m.is_pending(v) == expect_pending[v]
            assert bool(m.pba.io_read(0, 8) >> v & 1) == expect_pending[v]
            want = MsixEntry(msgs[v][0], msgs[v][1], not open_)
            assert m.entry(v) == want
            if want != MsixEntry(0, 0, True):
                assert host.routes[v] == (want.address, want.data, want.masked)
        assert sorted(host.delivered) == sorted(expect_delivered)
        assert f.config_read(m.cap_offset or 0, 2) == 0x0011
        assert f.config_read(ctrl_offset(m), 2) & 0x3FFF == 3


def test_route_finds_table_and_pba() -> None:
    _, m, _, _ = make(vectors=4, separate_pba_bar=True)
    assert m.route(1, 0) == (m.table, 0)
    assert m.route(1, 63) == (m.table, 63)
    assert m.route(1, 64) is None
    assert m.route(2, 0x2000) == (m.pba, 0)
    assert m.route(2, 0x2008) is None and m.route(2, 0) is None and m.route(0, 0) is None
