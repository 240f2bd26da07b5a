"""PCI configuration space and mechanism #1: what Linux's probe code relies on, access by access.

The guest-facing tests go through the eight ports 0xCF8-0xCFF exactly as
arch/x86/pci/direct.c does (a dword ``outl`` to CONFIG_ADDRESS, then a
byte/word/dword access at 0xCFC + (register & 3)), so that lane handling is
tested together with the registers.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmkit.devices.base import BusDevice
from kvmkit.devices.pci import (
    CONFIG_SPACE_SIZE, MEM64_DECODE_LIMIT, PCI_COMMAND, PCI_COMMAND_INTX_DISABLE, PCI_COMMAND_IO,
    PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY, PCI_STATUS, PCI_STATUS_CAP_LIST, PCI_STATUS_INTERRUPT,
    PCI_STATUS_REC_MASTER_ABORT, PciBus, PciFunction, PciHostBridge,
)

SLOT = 3
COMMAND_DECODE = PCI_COMMAND_IO | PCI_COMMAND_MEMORY


class Recorder:
    """A BusDevice that records what reaches it (stands in for a BAR handler or the 0xCF9 register)."""

    def __init__(self, value: int = 0) -> None:
        self.value = value
        self.log: list[tuple[str, int, int, int]] = []

    def io_read(self, offset: int, size: int) -> int:
        self.log.append(("r", offset, size, self.value))
        return self.value & ((1 << (8 * size)) - 1)

    def io_write(self, offset: int, size: int, value: int) -> None:
        self.log.append(("w", offset, size, value))


class Guest:
    """Mechanism #1 as the guest uses it: CONFIG_ADDRESS by outl, data at 0xCFC + (reg & 3)."""

    def __init__(self, bus: PciBus) -> None:
        self.bus = bus

    def select(self, slot: int, reg: int, *, bus: int = 0, fn: int = 0, enable: bool = True) -> None:
        addr = (enable << 31) | (bus << 16) | (slot << 11) | (fn << 8) | (reg & 0xFC)
        self.bus.io_write(0, 4, addr)

    def read(self, slot: int, reg: int, size: int, **kw: int) -> int:
        self.select(slot, reg, **kw)
        return self.bus.io_read(4 + (reg & 3), size)

    def write(self, slot: int, reg: int, size: int, value: int, **kw: int) -> None:
        self.select(slot, reg, **kw)
        self.bus.io_write(4 + (reg & 3), size, value)


def make_function(**kw: object) -> PciFunction:
    f = PciFunction(0x1AF4, 0x1041, 0x020000, revision=0x01, subsystem_vendor_id=0x1AF4,
                    subsystem_id=0x0001, **kw)  # type: ignore[arg-type]
    return f


def make_machine() -> tuple[PciBus, PciFunction, Guest, list[tuple[int, int | None, int | None]]]:
    """A bus with a host bridge and one function with every kind of BAR."""
    bus = PciBus()
    bus.add(0, PciHostBridge())
    f = make_function()
    f.add_bar(0, 32, "io")
    f.add_bar(1, 0x1000, "mem32")
    f.add_bar(2, 0x4000, "mem64", prefetchable=True)
    f.add_bar(5, 0x10_0000, "mem32", prefetchable=True)
    changes: list[tuple[int, int | None, int | None]] = []
    f.on_bar_change = lambda i, old, new: changes.append((i, old, new))
    bus.add(SLOT, f)
    return bus, f, Guest(bus), changes


# --- header fields -----------------------------------------------------------


def test_identity_fields_and_their_read_only_bits() -> None:
    bus, f, g, _ = make_machine()
    assert g.read(SLOT, 0x00, 4) == 0x1041_1AF4
    assert g.read(SLOT, 0x08, 4) == 0x0200_0001  # class 02 00 00, revision 01
    assert g.read(SLOT, 0x2C, 4) == 0x0001_1AF4
    assert g.read(SLOT, 0x0E, 1) == 0x00  # type 0, single function
    assert g.read(SLOT, 0x3D, 1) == 0x01  # INTA#
    before = f.config_bytes()
    for reg in (0x00, 0x08, 0x2C, 0x28, 0x30, 0x38):
        g.write(SLOT, reg, 4, 0xFFFF_FFFF)
        g.write(SLOT, reg, 4, 0)
    g.write(SLOT, 0x0E, 2, 0xFFFF)  # header type + BIST
    g.write(SLOT, 0x3D, 1, 0x04)
    after = f.config_bytes()
    for off in list(range(0x00, 0x04)) + list(range(0x08, 0x0C)) + list(range(0x0D, 0x10)) + \
            list(range(0x28, 0x3C)) + [0x3D, 0x3E, 0x3F]:
        assert after[off] == before[off], f"read-only byte {off:#x} changed"


def test_command_only_decode_master_and_intx_disable_are_writable() -> None:
    _, f, g, _ = make_machine()
    g.write(SLOT, PCI_COMMAND, 2, 0xFFFF)
    assert g.read(SLOT, PCI_COMMAND, 2) == 0x0407
    assert f.bus_master
    g.write(SLOT, PCI_COMMAND, 2, 0)
    assert g.read(SLOT, PCI_COMMAND, 2) == 0
    assert not f.bus_master


def test_status_capability_bit_and_write_one_to_clear() -> None:
    _, f, g, _ = make_machine()
    assert g.read(SLOT, PCI_STATUS, 2) & PCI_STATUS_CAP_LIST == 0
    f.add_capability(0x09, b"\x00\x00")
    assert g.read(SLOT, PCI_STATUS, 2) == PCI_STATUS_CAP_LIST
    f.signal_status(PCI_STATUS_REC_MASTER_ABORT | PCI_STATUS_CAP_LIST)  # only error bits can be signalled
    assert g.read(SLOT, PCI_STATUS, 2) == PCI_STATUS_CAP_LIST | PCI_STATUS_REC_MASTER_ABORT
    g.write(SLOT, PCI_STATUS, 2, 0)  # writing 0 keeps W1C bits
    assert g.read(SLOT, PCI_STATUS, 2) & PCI_STATUS_REC_MASTER_ABORT
    g.write(SLOT, PCI_COMMAND, 4, PCI_STATUS_REC_MASTER_ABORT << 16)  # a dword write to COMMAND clears it
    assert g.read(SLOT, PCI_STATUS, 2) == PCI_STATUS_CAP_LIST
    g.write(SLOT, PCI_STATUS, 2, 0xFFFF)  # Capabilities List and Interrupt Status are read-only
    assert g.read(SLOT, PCI_STATUS, 2) == PCI_STATUS_CAP_LIST


def test_cache_line_size_and_interrupt_line_are_read_write() -> None:
    _, _, g, _ = make_machine()
    g.write(SLOT, 0x0C, 4, 0xFFFF_FFFF)
    assert g.read(SLOT, 0x0C, 4) == 0x0000_00FF  # latency timer, header type, BIST stay
    g.write(SLOT, 0x3C, 4, 0xFFFF_FF0B)
    assert g.read(SLOT, 0x3C, 4) == 0x0000_010B


# --- BAR sizing, as __pci_read_base does it --------------------------------------


def size_bar(g: Guest, reg: int) -> tuple[int, int]:
    """Linux's sequence: read, write ~0, read the mask, restore. Returns (original, mask)."""
    orig = g.read(SLOT, reg, 4)
    g.write(SLOT, reg, 4, 0xFFFF_FFFF)
    mask = g.read(SLOT, reg, 4)
    g.write(SLOT, reg, 4, orig)
    assert g.read(SLOT, reg, 4) == orig
    return orig, mask


@pytest.mark.parametrize("size", [0x1000, 0x2000, 0x10_0000, 1 << 31])
@pytest.mark.parametrize("prefetchable", [False, True])
def test_mem32_bar_sizing(size: int, prefetchable: bool) -> None:
    bus = PciBus()
    f = make_function()
    f.add_bar(0, size, "mem32", prefetchable=prefetchable)
    bus.add(SLOT, f)
    g = Guest(bus)
    type_bits = 0x8 if prefetchable else 0x0
    orig, mask = size_bar(g, 0x10)
    assert orig == type_bits
    assert mask == (~(size - 1) & 0xFFFF_FFFF) | type_bits
    # Linux's pci_size(): lowest set address bit of the mask is the size.
    addr_mask = mask & 0xFFFF_FFF0
    assert addr_mask & -addr_mask == size


@pytest.mark.parametrize("size", [0x4000, 1 << 32, 1 << 33])
def test_mem64_bar_sizing_low_and_high_dwords(size: int) -> None:
    bus = PciBus()
    f = make_function()
    f.add_bar(2, size, "mem64", prefetchable=True)
    bus.add(SLOT, f)
    g = Guest(bus)
    _, lo = size_bar(g, 0x18)
    _, hi = size_bar(g, 0x1C)
    assert lo & 0xF == 0xC  # 64-bit, prefetchable
    mask64 = (hi << 32) | (lo & ~0xF)
    assert mask64 == ~(size - 1) & 0xFFFF_FFFF_FFFF_FFFF
    # The upper register's sizing alone must not disturb the type bits of the lower one.
    assert g.read(SLOT, 0x18, 4) & 0xF == 0xC


@pytest.mark.parametrize("size", [4, 32, 256])
def test_io_bar_sizing(size: int) -> None:
    bus = PciBus()
    f = make_function()
    f.add_bar(4, size, "io")
    bus.add(SLOT, f)
    g = Guest(bus)
    orig, mask = size_bar(g, 0x20)
    assert orig == 0x1
    assert mask == (~(size - 1) & 0xFFFF_FFFC) | 0x1
    assert mask & 0x2 == 0  # bit 1 reserved


def test_unimplemented_bars_and_rom_read_zero_after_sizing() -> None:
    bus = PciBus()
    f = make_function()
    f.add_bar(1, 0x1000, "mem32")
    bus.add(SLOT, f)
    g = Guest(bus)
    for reg in (0x10, 0x18, 0x1C, 0x20, 0x24, 0x30):
        assert size_bar(g, reg) == (0, 0)


def test_bar_low_bits_are_read_only_and_address_is_size_aligned() -> None:
    _, f, g, _ = make_machine()
    g.write(SLOT, 0x14, 4, 0xFEBF_1FFF)  # mem32 4 KiB
    assert g.read(SLOT, 0x14, 4) == 0xFEBF_1000
    g.write(SLOT, 0x10, 4, 0x0000_C03E)  # io 32 bytes
    assert g.read(SLOT, 0x10, 4) == 0x0000_C021
    g.write(SLOT, 0x24, 4, 0xE012_3456)  # mem32 prefetchable 1 MiB
    assert g.read(SLOT, 0x24, 4) == 0xE010_0008


def test_bar_programmed_byte_by_byte() -> None:
    _, f, g, _ = make_machine()
    g.write(SLOT, PCI_COMMAND, 2, COMMAND_DECODE)
    for i, byte in enumerate((0x00, 0x20, 0xBF, 0xFE)):
        g.write(SLOT, 0x14 + i, 1, byte)
    assert g.read(SLOT, 0x14, 4) == 0xFEBF_2000
    assert f.bar_address(1) == 0xFEBF_2000


# --- every byte lane, every size, every register -----------------------------------


def test_reads_through_cfc_at_every_lane_and_size() -> None:
    bus, f, g, _ = make_machine()
    f.add_capability(0x09, bytes(range(1, 15)))
    f.set_bar_address(1, 0xFEBF_0000)
    f.set_bar_address(2, 0x8_0000_0000)
    snap = f.config_bytes() + b"\xff" * 8
    for reg in range(0, CONFIG_SPACE_SIZE, 4):
        g.select(SLOT, reg)
        for lane in range(4):
            for size in (1, 2, 4):
                got = bus.io_read(4 + lane, size)
                want = 0
                for i in range(size):
                    # lanes past 0xCFF are not CONFIG_DATA: an unclaimed port reads 0xFF
                    byte = snap[reg + lane + i] if lane + i < 4 else 0xFF
                    want |= byte << (8 * i)
                assert got == want, (reg, lane, size)


def test_writes_through_cfc_at_every_lane_and_size() -> None:
    """Interrupt Line is the only fully writable header byte: hit it from every lane and size."""
    bus, f, g, _ = make_machine()
    for lane in range(4):
        for size in (1, 2, 4):
            g.select(SLOT, 0x3C)
            bus.io_write(0, 4, 0x8000_0000 | (SLOT << 11) | 0x3C)
            bus.io_write(4 + lane, size, 0xA5A5_A5A5)
            snap = f.config_bytes()
            covers_line = lane == 0
            assert snap[0x3C] == (0xA5 if covers_line else 0)
            assert snap[0x3D] == 0x01 and snap[0x3E] == 0 and snap[0x3F] == 0
            assert snap[0x40] == 0  # never spills into the next register
            f.config_write(0x3C, 1, 0)


def test_unaligned_config_accesses_cross_fields() -> None:
    _, f, _, _ = make_machine()
    assert f.config_read(0x01, 2) == 0x411A  # high byte of vendor ID, low byte of device ID
    assert f.config_read(0x03, 4) == 0x0000_0010
    assert f.config_read(0x3B, 4) == 0x0001_0000  # reserved, line 0, pin 1, min_gnt 0
    f.config_write(0x3B, 2, 0x7788)  # reserved byte ignores, interrupt line takes 0x77
    assert f.config_read(0x3C, 2) == 0x0177
    f.config_write(0x03, 4, 0x0707_0707)  # device ID high byte RO, COMMAND low byte writable
    assert f.config_read(0x00, 8) == 0x0000_0407_1041_1AF4  # COMMAND takes bits 0-2 and 10


def test_accesses_beyond_256_bytes() -> None:
    _, f, _, _ = make_machine()
    f.config_write(0x3C, 1, 0x42)
    assert f.config_read(0xFF, 4) == 0xFFFF_FF00
    assert f.config_read(0xFE, 8) == 0xFFFF_FFFF_FFFF_0000
    assert f.config_read(0x100, 4) == 0xFFFF_FFFF
    assert f.config_read(-1, 2) == 0xF4FF
    assert f.config_read(1 << 40, 4) == 0xFFFF_FFFF
    before = f.config_bytes()
    f.config_write(0xFE, 8, -1)
    f.config_write(-4, 4, 0xFFFF_FFFF)
    f.config_write(300, 2, 0)
    assert f.config_bytes() == before
    assert f.config_read(0, 0) == 0 and f.config_read(0, 9) == 0
    f.config_write(0x3C, 16, 0)  # a size no bus produces: ignored
    assert f.config_read(0x3C, 1) == 0x42


# --- capabilities -------------------------------------------------------------


def linux_find_capabilities(read: "callable") -> list[tuple[int, int]]:  # type: ignore[valid-type]
    """drivers/pci/pci.c __pci_find_next_cap_ttl: follow pointers, dword aligned, at most 48 hops."""
    found = []
    if not read(PCI_STATUS, 2) & PCI_STATUS_CAP_LIST:
        return found
    pos = read(0x34, 1)
    ttl = 48
    while ttl:
        ttl -= 1
        if pos < 0x40:
            break
        pos &= ~3
        ent = read(pos, 2)
        cap_id = ent & 0xFF
        if cap_id == 0xFF:
            break
        found.append((pos, cap_id))
        pos = ent >> 8
    return found


def test_capability_chain_walks_like_linux() -> None:
    _, f, g, _ = make_machine()
    offsets = [f.add_capability(0x09, b"\x10\x01"),  # vendor specific, 4 bytes
               f.add_capability(0x05, bytes(11)),  # 13 bytes: the next one starts dword-aligned
               f.add_capability(0x10, bytes(58))]
    assert offsets == [0x40, 0x44, 0x54]
    assert f.capability_offsets == offsets
    assert g.read(SLOT, 0x34, 1) == 0x40
    walked = linux_find_capabilities(lambda off, size: g.read(SLOT, off, size))
    assert walked == [(0x40, 0x09), (0x44, 0x05), (0x54, 0x10)]
    assert g.read(SLOT, 0x42, 2) == 0x0110


def test_capabilities_must_fit_in_256_bytes() -> None:
    f = make_function()
    f.add_capability(0x09, bytes(190))  # 0x40 + 192 = 0x100 exactly
    with pytest.raises(ValueError):
        f.add_capability(0x09, b"")
    g = make_function()
    with pytest.raises(ValueError):
        g.add_capability(0x09, bytes(191))
    with pytest.raises(ValueError):
        g.add_capability(0xFF, b"")  # 0xFF would end Linux's walk
    with pytest.raises(ValueError):
        g.add_capability(0x09, b"\x00\x00", writable=b"\xff")


def test_capability_write_mask_and_hook() -> None:
    f = make_function()
    calls: list[tuple[bytes, bytes]] = []
    off = f.add_capability(0x09, b"\x11\x22\x33\x44", writable=b"\x00\xff\x0f\x00",
                           on_write=lambda old, new: calls.append((old, new)))
    f.config_write(off, 2, 0xFFFF)  # ID and next pointer are read-only; the write covers no body byte
    assert f.config_read(off, 2) == 0x0009
    assert calls == []
    f.config_write(off + 2, 4, 0xAABB_CCDD)
    assert f.capability_body(off) == bytes([0x11, 0xCC, 0x3B, 0x44])
    assert calls == [(b"\x11\x22\x33\x44", bytes([0x11, 0xCC, 0x3B, 0x44]))]
    f.config_write(off + 5, 1, 0xFF)  # read-only body byte: no hook
    assert len(calls) == 1
    f.set_capability_body(off, b"\x01\x02\x03\x04")  # device side: no hook, RO bytes too
    assert f.config_read(off + 2, 4) == 0x0403_0201
    assert len(calls) == 1


# --- decode and on_bar_change -----------------------------------------------------


def test_linux_sizing_with_decode_enabled_reports_off_then_on() -> None:
    _, f, g, changes = make_machine()
    f.set_bar_address(1, 0xFEBF_0000)
    g.write(SLOT, PCI_COMMAND, 2, COMMAND_DECODE)
    assert changes == [(1, None, 0xFEBF_0000)]
    changes.clear()
    # __pci_read_base: disable decode, size, restore, re-enable.
    cmd = g.read(SLOT, PCI_COMMAND, 2)
    g.write(SLOT, PCI_COMMAND, 2, cmd & ~COMMAND_DECODE)
    size_bar(g, 0x14)
    g.write(SLOT, PCI_COMMAND, 2, cmd)
    assert changes == [(1, 0xFEBF_0000, None), (1, None, 0xFEBF_0000)]
    assert f.bar_address(1) == 0xFEBF_0000


def test_sizing_with_decode_left_on_never_maps_the_sizing_value() -> None:
    _, f, g, changes = make_machine()
    f.set_bar_address(0, 0xC000)
    f.set_bar_address(1, 0xFEBF_0000)
    f.set_bar_address(2, 0xFE00_0000)  # 64-bit BAR below 4 GiB, high dword 0
    g.write(SLOT, PCI_COMMAND, 2, COMMAND_DECODE)
    changes.clear()
    for reg in (0x10, 0x14, 0x18, 0x1C):
        size_bar(g, reg)
    for index, old, new in changes:
        assert new is None or new in (0xC000, 0xFEBF_0000, 0xFE00_0000), changes
    assert changes == [(0, 0xC000, None), (0, None, 0xC000),
                       (1, 0xFEBF_0000, None), (1, None, 0xFEBF_0000),
                       (2, 0xFE00_0000, None), (2, None, 0xFE00_0000),
                       (2, 0xFE00_0000, None), (2, None, 0xFE00_0000)]


def test_command_toggles_only_the_matching_space() -> None:
    _, f, g, changes = make_machine()
    f.set_bar_address(0, 0xC040)
    f.set_bar_address(1, 0xFEBF_0000)
    f.set_bar_address(2, 0x8_0000_0000)
    f.set_bar_address(5, 0xE000_0000)
    assert changes == []  # nothing decodes before COMMAND enables it
    assert f.bar_address(0) is None
    g.write(SLOT, PCI_COMMAND, 2, PCI_COMMAND_IO)
    assert changes == [(0, None, 0xC040)]
    changes.clear()
    g.write(SLOT, PCI_COMMAND, 2, PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)
    assert changes == [(1, None, 0xFEBF_0000), (2, None, 0x8_0000_0000), (5, None, 0xE000_0000)]
    changes.clear()
    g.write(SLOT, PCI_COMMAND, 2, PCI_COMMAND_MEMORY)
    assert changes == [(0, 0xC040, None)]
    changes.clear()
    g.write(SLOT, PCI_COMMAND, 1, PCI_COMMAND_MEMORY)  # same value again: nothing
    assert changes == []


def test_guest_moves_a_bar() -> None:
    _, f, g, changes = make_machine()
    f.set_bar_address(2, 0x8_0000_0000)
    g.write(SLOT, PCI_COMMAND, 2, PCI_COMMAND_MEMORY)
    changes.clear()
    g.write(SLOT, 0x18, 4, 0xC000_000C)  # low dword first: a transient address, as on hardware
    g.write(SLOT, 0x1C, 4, 0x0)
    assert changes == [(2, 0x8_0000_0000, 0x8_C000_0000), (2, 0x8_C000_0000, 0xC000_0000)]
    assert f.bar_address(2) == 0xC000_0000
    changes.clear()
    g.write(SLOT, 0x18, 4, 0)  # address 0 = unprogrammed
    assert changes == [(2, 0xC000_0000, None)]


def test_decode_limits() -> None:
    _, f, g, _ = make_machine()
    g.write(SLOT, PCI_COMMAND, 2, COMMAND_DECODE)
    g.write(SLOT, 0x10, 4, 0xFFE0)  # io: last 32 ports, ends at 0xFFFF: inside the 64 KiB space
    assert f.bar_address(0) == 0xFFE0
    g.write(SLOT, 0x10, 4, 0x1_0000)  # past the port space
    assert f.bar_address(0) is None
    g.write(SLOT, 0x14, 4, 0xFFFF_E000)  # mem32 below the top page
    assert f.bar_address(1) == 0xFFFF_E000
    g.write(SLOT, 0x14, 4, 0xFFFF_F000)  # would cover 0xFFFFFFFF
    assert f.bar_address(1) is None
    g.write(SLOT, 0x18, 4, 0xFFFF_C000)  # mem64 straddling 4 GiB
    g.write(SLOT, 0x1C, 4, 0)
    assert f.bar_address(2) is None
    g.write(SLOT, 0x1C, 4, 0x1)  # the same low dword above 4 GiB is fine
    assert f.bar_address(2) == 0x1_FFFF_C000
    g.write(SLOT, 0x1C, 4, MEM64_DECODE_LIMIT >> 32)
    assert f.bar_address(2) is None
    g.write(SLOT, 0x1C, 4, (MEM64_DECODE_LIMIT >> 32) - 1)
    assert f.bar_address(2) == MEM64_DECODE_LIMIT - 0x4000


def test_set_bar_address_validates_and_reports() -> None:
    _, f, g, changes = make_machine()
    g.write(SLOT, PCI_COMMAND, 2, COMMAND_DECODE)
    f.set_bar_address(1, 0xFEBF_0000)
    assert changes == [(1, None, 0xFEBF_0000)]
    for index, addr in ((1, 0xFEBF_0800), (1, 1 << 32), (0, 0x1_0000), (0, 0xC010), (2, 0x2000)):
        with pytest.raises(ValueError):
            f.set_bar_address(index, addr)
    with pytest.raises(ValueError):
        f.set_bar_address(3, 0x1000)  # upper half of the mem64 BAR
    with pytest.raises(ValueError):
        f.bar_address(4)


def test_bar_declaration_errors() -> None:
    f = make_function()
    for args, kw in (((0, 0x800, "mem32"), {}), ((0, 0x3000, "mem32"), {}), ((0, 2, "io"), {}),
                     ((0, 512, "io"), {}), ((0, 32, "io"), {"prefetchable": True}),
                     ((5, 0x1000, "mem64"), {}), ((6, 0x1000, "mem32"), {}), ((-1, 0x1000, "mem32"), {}),
                     ((0, 0x1000, "rom"), {}), ((0, 1 << 32, "mem32"), {})):
        with pytest.raises(ValueError):
            f.add_bar(*args, **kw)  # type: ignore[arg-type]
    f.add_bar(1, 0x1000, "mem64")
    with pytest.raises(ValueError):
        f.add_bar(2, 0x1000, "mem32")  # upper half of BAR 1
    with pytest.raises(ValueError):
        f.add_bar(0, 0x1000, "mem64")  # its upper half is BAR 1
    with pytest.raises(ValueError):
        PciFunction(0xFFFF, 0, 0)
    with pytest.raises(ValueError):
        PciFunction(0x1AF4, 0x1000, 1 << 24)
    with pytest.raises(ValueError):
        PciFunction(0x1AF4, 0x1000, 0, interrupt_pin=5)


def test_bar_records_its_handler() -> None:
    handler = Recorder()
    f = make_function()
    bar = f.add_bar(0, 0x1000, "mem64", prefetchable=True, handler=handler)
    assert f.bar(0) is bar and bar.handler is handler and bar.type_bits == 0xC
    assert f.bars == [bar]
    assert isinstance(handler, BusDevice)


# --- INTx ------------------------------------------------------------------------


def test_intx_follows_status_and_interrupt_disable() -> None:
    levels: list[bool] = []
    f = make_function(irq=levels.append)
    f.set_intx(True)
    assert levels == [True] and f.intx_asserted
    assert f.status & PCI_STATUS_INTERRUPT
    f.set_intx(True)  # no edge without a change
    assert levels == [True]
    f.config_write(PCI_COMMAND, 2, PCI_COMMAND_INTX_DISABLE)
    assert levels == [True, False]
    assert f.status & PCI_STATUS_INTERRUPT  # the status bit still shows the request
    f.set_intx(False)
    assert not f.status & PCI_STATUS_INTERRUPT
    f.set_intx(True)
    assert levels == [True, False]
    f.config_write(PCI_COMMAND, 2, 0)
    assert levels == [True, False, True]
    f.set_intx_inhibit(True)  # MSI-X enabled
    assert levels == [True, False, True, False]
    f.set_intx_inhibit(False)
    f.set_intx(False)
    assert levels == [True, False, True, False, True, False]


def test_function_without_a_pin_never_asserts() -> None:
    levels: list[bool] = []
    f = make_function(interrupt_pin=0, irq=levels.append)
    f.set_intx(True)
    assert levels == [] and f.status & PCI_STATUS_INTERRUPT


# --- mechanism #1 -------------------------------------------------------------------


def test_config_address_latches_only_on_dword_writes() -> None:
    bus, _, g, _ = make_machine()
    bus.io_write(0, 4, 0x8000_1804)
    for off, size in ((0, 1), (1, 1), (2, 1), (3, 1), (0, 2), (2, 2), (1, 2)):
        bus.io_write(off, size, 0)
    assert bus.io_read(0, 4) == 0x8000_1804
    assert bus.io_read(0, 1) == 0xFF and bus.io_read(2, 2) == 0xFFFF  # not CONFIG_ADDRESS: unclaimed
    bus.io_write(0, 4, 0xFFFF_FFFF)
    assert bus.io_read(0, 4) == 0x80FF_FFFC  # reserved bits 30:24 and 1:0 read 0


def test_linux_pci_check_type1() -> None:
    """arch/x86/pci/direct.c: outb(1, 0xCFB); save; outl(0x80000000); must read it back; restore."""
    bus, _, _, _ = make_machine()
    bus.io_write(0, 4, 0x8000_0010)
    bus.io_write(3, 1, 0x01)
    tmp = bus.io_read(0, 4)
    assert tmp == 0x8000_0010
    bus.io_write(0, 4, 0x8000_0000)
    assert bus.io_read(0, 4) == 0x8000_0000
    # pci_sanity_check: a host bridge (class 0x0600) or an Intel device on bus 0.
    g = Guest(bus)
    assert g.read(0, 0x0A, 2) == 0x0600
    assert g.read(0, 0x00, 4) == 0x1237_8086
    bus.io_write(0, 4, tmp)
    # pci_check_type2 must fail: its byte writes to 0xCF8/0xCFA do not read back as 0.
    bus.io_write(3, 1, 0)
    bus.io_write(0, 1, 0)
    bus.io_write(2, 1, 0)
    assert bus.io_read(0, 1) != 0 or bus.io_read(2, 1) != 0


def test_passthrough_gets_cf9() -> None:
    rcr = Recorder(value=0x02)
    bus = PciBus(passthrough=rcr)
    bus.io_write(0, 4, 0x8000_0000)
    bus.io_write(1, 1, 0x06)  # a PIIX reset control write: 0xCF9
    assert bus.io_read(1, 1) == 0x02
    assert rcr.log == [("w", 1, 1, 0x06), ("r", 1, 1, 0x02)]
    assert bus.io_read(0, 4) == 0x8000_0000
    assert bus.stats.other == 2 and bus.stats.address_writes == 1 and bus.stats.address_reads == 1


def test_missing_functions_read_all_ones_and_ignore_writes() -> None:
    bus, f, g, _ = make_machine()
    before = f.config_bytes()
    for kw in ({"bus": 1}, {"fn": 1}, {"enable": False}):
        assert g.read(SLOT, 0x00, 4, **kw) == 0xFFFF_FFFF
        assert g.read(SLOT, 0x00, 2, **kw) == 0xFFFF
        assert g.read(SLOT, 0x3C, 1, **kw) == 0xFF
        g.write(SLOT, 0x3C, 1, 0x55, **kw)
        g.write(SLOT, PCI_COMMAND, 2, 0x7, **kw)
    for slot in (1, 2, 31):
        assert g.read(slot, 0x00, 2) == 0xFFFF
    assert f.config_bytes() == before
    assert bus.stats.unclaimed == 3 * 5 + 3


def test_stats_count_config_cycles() -> None:
    bus, _, g, _ = make_machine()
    g.read(SLOT, 0x00, 4)
    g.write(SLOT, 0x3C, 1, 1)
    g.read(7, 0x00, 2)
    s = bus.stats
    assert (s.address_writes, s.data_reads, s.data_writes, s.unclaimed) == (3, 2, 1, 1)
    assert s.config_accesses == 3


def test_accesses_straddling_the_window() -> None:
    bus, f, g, _ = make_machine()
    g.select(SLOT, 0x00)
    assert bus.io_read(7, 2) == 0xFF10  # 0xCFF = device ID high byte, 0xD00 is not ours
    assert bus.io_read(6, 4) == 0xFFFF_1041
    assert bus.io_read(2, 4) == 0x1AF4_FFFF  # 0xCFA-0xCFB unclaimed, 0xCFC-0xCFD data
    assert bus.io_read(0, 8) == (0x1041_1AF4 << 32) | (0x8000_0000 | SLOT << 11)
    g.select(SLOT, 0x3C)
    bus.io_write(2, 4, 0x1234_5678)  # lanes 0xCFC-0xCFD: interrupt line takes 0x34; CONFIG_ADDRESS untouched
    assert f.config_read(0x3C, 1) == 0x34
    assert bus.config_address == 0x8000_0000 | SLOT << 11 | 0x3C
    for off in (-3, 8, 100):
        assert bus.io_read(off, 2) == 0xFFFF
        bus.io_write(off, 4, 0)
    assert bus.io_read(0, 3) == 0xFFFFFF and bus.io_read(0, 0) == 0 and bus.io_read(0, 16) == 0


def test_bus_add_errors_and_lookup() -> None:
    bus = PciBus()
    host = PciHostBridge()
    bus.add(0, host)
    with pytest.raises(ValueError):
        bus.add(0, make_function())
    with pytest.raises(ValueError):
        bus.add(32, make_function())
    with pytest.raises(ValueError):
        bus.add(1, object())  # type: ignore[arg-type]
    assert bus.function(0) is host and bus.function(0, 1) is None and bus.function(5) is None
    assert bus.slots == {0: host}
    assert bus.config_read(0, 0, 0, 0x0B, 1) == 0x06
    assert bus.config_read(1, 0, 0, 0, 4) == 0xFFFF_FFFF
    bus.config_write(0, 0, 0, 0x3C, 1, 9)
    assert host.config_read(0x3C, 1) == 9


def test_host_bridge_identity() -> None:
    host = PciHostBridge()
    assert host.config_read(0x00, 4) == 0x1237_8086
    assert host.config_read(0x08, 4) == 0x0600_0002
    assert host.config_read(0x0E, 1) == 0 and host.interrupt_pin == 0
    assert host.bars == []


# --- properties: any guest traffic ---------------------------------------------------

_INTERESTING = [0, 3, 0x407, 0xFFFF_FFFF, -1, 0xFFFF_F000, 0xFFFF_C00C, 0xFEBF_0000, 0xC001, 0x1_0000]
_ACCESS = st.one_of(
    st.tuples(
        st.sampled_from(["port_r", "port_w", "cfg_r", "cfg_w", "sel", "intx"]),
        st.one_of(st.integers(min_value=0, max_value=0x40),  # mostly the header
                  st.integers(min_value=-8, max_value=CONFIG_SPACE_SIZE + 8)),
        st.sampled_from([1, 2, 4, 8]),
        st.one_of(st.integers(min_value=0, max_value=(1 << 64) - 1), st.sampled_from(_INTERESTING)),
    ),
    # COMMAND toggles and BAR writes with the values sizing and firmware use
    st.tuples(st.just("cfg_w"), st.sampled_from([0x04, 0x10, 0x14, 0x18, 0x1C, 0x20, 0x24]),
              st.sampled_from([2, 4, 8]), st.sampled_from(_INTERESTING)),
)


def independent_decode(f: PciFunction, index: int) -> int | None:
    """Where a BAR decodes, recomputed from the bytes the guest sees."""
    snap = f.config_bytes()
    bar = f.bar(index)
    command = int.from_bytes(snap[4:6], "little")
    raw = int.from_bytes(snap[0x10 + 4 * index:0x14 + 4 * index], "little")
    if bar.kind == "io":
        addr = raw & ~3
        ok = command & 1 and addr and addr + bar.size <= 1 << 16
        return addr if ok else None
    if bar.kind == "mem64":
        raw |= int.from_bytes(snap[0x14 + 4 * index:0x18 + 4 * index], "little") << 32
    addr = raw & ~0xF
    end = addr + bar.size
    ok = command & 2 and addr and end <= MEM64_DECODE_LIMIT and not (addr < 1 << 32 <= end)
    return addr if ok else None


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_ACCESS, max_size=60), st.booleans())
def test_random_traffic_keeps_config_space_well_formed(ops: list[tuple[str, int, int, int]], firmware: bool) -> None:
    levels: list[bool] = []
    bus = PciBus()
    f = make_function(irq=levels.append)
    f.add_bar(0, 32, "io")
    f.add_bar(1, 0x1000, "mem32")
    f.add_bar(2, 0x4000, "mem64", prefetchable=True)
    f.add_bar(4, 1 << 33, "mem64")
    caps = [f.add_capability(0x09, bytes(6), writable=b"\xff" * 6),
            f.add_capability(0x05, bytes(12), writable=bytes(2) + b"\xff" * 10)]
    reported: dict[int, int | None] = {i: None for i in (0, 1, 2, 4)}

    def on_change(index: int, old: int | None, new: int | None) -> None:
        assert old == reported[index] and old != new
        reported[index] = new

    f.on_bar_change = on_change
    if firmware:  # start as firmware leaves it: BARs assigned, decode on
        for index, addr in ((0, 0xC000), (1, 0xFEBF_0000), (2, 0xFE00_0000), (4, 0x4_0000_0000)):
            f.set_bar_address(index, addr)
        f.config_write(PCI_COMMAND, 2, COMMAND_DECODE)
    bus.add(SLOT, f)
    bus.add(0, PciHostBridge())
    type_bits = {0x10: 0x1, 0x14: 0x0, 0x18: 0xC, 0x20: 0x4}
    for kind, offset, size, value in ops:
        if kind == "port_r":
            assert 0 <= bus.io_read(offset % 12 - 2, size) < 1 << (8 * size)
        elif kind == "port_w":
            bus.io_write(offset % 12 - 2, size, value)
        elif kind == "cfg_r":
            assert 0 <= f.config_read(offset, size) < 1 << (8 * size)
        elif kind == "cfg_w":
            f.config_write(offset, size, value)
        elif kind == "sel":
            bus.io_write(0, 4, (0x8000_0000 if value & 1 else 0) | (SLOT << 11) | (offset & 0xFC))
        else:
            f.set_intx(bool(value & 1))
        snap = f.config_bytes()
        assert snap[0:4] == b"\xf4\x1a\x41\x10"
        for reg, bits in type_bits.items():
            assert snap[reg] & 0xF == bits
        walked = linux_find_capabilities(f.config_read)
        assert walked == [(caps[0], 0x09), (caps[1], 0x05)]
        command = int.from_bytes(snap[4:6], "little")
        assert command & ~0x0407 == 0
        for index in (0, 1, 2, 4):
            assert f.bar_address(index) == independent_decode(f, index) == reported[index]
            addr = f.bar_address(index)
            if addr is not None and f.bar(index).kind != "io":
                assert not addr < 1 << 32 <= addr + f.bar(index).size  # never over 0xFFFFFFFF
        status = int.from_bytes(snap[6:8], "little")
        want_irq = bool(status & PCI_STATUS_INTERRUPT) and not command & PCI_COMMAND_INTX_DISABLE
        assert f.intx_asserted == want_irq
        assert levels == [] or levels[-1] == want_irq


def test_live_capability_handler_owns_its_body() -> None:
    """virtio's PCI_CFG window: reads have side effects, so every body access goes to the handler."""
    win = Recorder(value=0x1122_3344)
    f = make_function()
    first = f.add_capability(0x05, bytes(2))
    live = f.add_capability(0x09, bytes(18), handler=win)
    last = f.add_capability(0x10, bytes(2))
    assert (first, live, last) == (0x40, 0x44, 0x58)
    assert f.config_read(live, 2) == 0x5809  # ID and next pointer stay the model's
    assert win.log == []
    assert f.config_read(live + 16, 4) == 0x1122_3344
    f.config_write(live + 18, 2, 0xBEEF)
    assert win.log == [("r", 16, 4, 0x1122_3344), ("w", 18, 2, 0xBEEF)]
    win.log.clear()
    # A dword straddling the ID byte and the body is split: 2 plain bytes, 2 handler bytes.
    assert f.config_read(live, 4) == 0x3344_5809
    assert win.log == [("r", 2, 2, 0x1122_3344)]
    win.log.clear()
    assert f.config_read(live + 16, 8) == 0x0010_1122_3344  # body end, then the next capability
    assert win.log == [("r", 16, 4, 0x1122_3344)]
    assert linux_find_capabilities(f.config_read) == [(0x40, 0x05), (0x44, 0x09), (0x58, 0x10)]
    with pytest.raises(ValueError):
        f.add_capability(0x09, bytes(2), handler=win, writable=b"\xff\xff")
