"""MP table: checksums, entries, and placement where Linux looks for it."""

from __future__ import annotations

import struct

import pytest

from kvmkit.boot import layout
from kvmkit.boot.mptable import write_mptable
from kvmkit.boot.params import E820_RESERVED, e820_map
from kvmkit.errors import BootError
from kvmkit.memory import GuestMemory, MiB


@pytest.fixture
def mem():
    m = GuestMemory(64 * MiB)
    yield m
    m.close()


def _scan(mem: GuestMemory) -> int:
    """Find the floating pointer as Linux's smp_scan_config does: 16-byte steps, signature, checksum."""
    for base, length in ((0, 0x400), (0x9FC00, 0x400), (0xF0000, 0x10000)):
        for addr in range(base, base + length, 16):
            fp = mem.read(addr, 16)
            if fp[:4] == b"_MP_" and fp[8] == 1 and sum(fp) % 256 == 0:
                return addr
    raise AssertionError("no MP floating pointer found")


def _entries(mem: GuestMemory, fp_addr: int):
    cfg = mem.read_u32(fp_addr + 4)
    length = mem.read_u16(cfg + 4)
    table = mem.read(cfg, length)
    assert table[:4] == b"PCMP"
    assert sum(table) % 256 == 0
    count = struct.unpack_from("<H", table, 34)[0]
    assert struct.unpack_from("<I", table, 36)[0] == 0xFEE00000
    out, pos = [], 44
    for _ in range(count):
        size = 20 if table[pos] == 0 else 8
        out.append(table[pos:pos + size])
        pos += size
    assert pos == length
    return cfg, out


@pytest.mark.parametrize("ncpus", [1, 2, 4, 40])
def test_table_contents(mem, ncpus: int) -> None:
    fp = write_mptable(mem, ncpus)
    assert fp == _scan(mem) == layout.MPTABLE_ADDR
    assert mem.read_u8(fp + 9) == 4  # spec 1.4
    assert mem.read_u8(fp + 11) == 0  # feature1: a config table is present
    cfg, entries = _entries(mem, fp)
    assert cfg == fp + 16
    types = [e[0] for e in entries]
    assert types == sorted(types)  # the spec orders entries by type
    cpus = [e for e in entries if e[0] == 0]
    assert [c[1] for c in cpus] == list(range(ncpus))
    assert [c[3] for c in cpus] == [3] + [1] * (ncpus - 1)  # enabled, BSP only on APIC id 0
    (bus,) = [e for e in entries if e[0] == 1]
    assert bus[2:8] == b"ISA   "
    (ioapic,) = [e for e in entries if e[0] == 2]
    assert ioapic[1] == ncpus and ioapic[3] & 1
    assert struct.unpack_from("<I", ioapic, 4)[0] == 0xFEC00000
    routes = {e[5]: (e[6], e[7]) for e in entries if e[0] == 3}
    assert routes[0] == (ncpus, 2)  # the timer on pin 2
    for irq in set(range(16)) - {0, 2}:
        assert routes[irq] == (ncpus, irq)
    assert 2 not in routes
    lints = sorted((e[1], e[7]) for e in entries if e[0] == 4)
    assert lints == [(1, 1), (3, 0)]  # NMI on LINT1, ExtINT on LINT0
    assert all(e[6] == 0xFF for e in entries if e[0] == 4)


def test_many_cpus_use_the_bios_area(mem) -> None:
    fp = write_mptable(mem, 64)
    assert _scan(mem) == fp
    cfg, entries = _entries(mem, fp)
    assert cfg == layout.MPTABLE_HIGH_ADDR
    assert len([e for e in entries if e[0] == 0]) == 64


@pytest.mark.parametrize("ncpus", [0, 255, -1])
def test_bad_cpu_count(mem, ncpus: int) -> None:
    with pytest.raises(BootError, match="CPU"):
        write_mptable(mem, ncpus)


def test_placement_is_reserved_and_clear_of_boot_structures(mem) -> None:
    fp = write_mptable(mem, 4)
    cfg, _ = _entries(mem, fp)
    size = mem.read_u16(cfg + 4)
    for name, start, length in layout.FIXED_REGIONS:
        if name != "bios_area":
            assert not layout.overlaps(fp, 16, start, length)
            assert not layout.overlaps(cfg, size, start, length)
    assert any(e.type == E820_RESERVED and e.addr <= fp and cfg + size <= e.end for e in e820_map(mem))


def test_tiny_memory() -> None:
    m = GuestMemory(512 * 1024)
    try:
        with pytest.raises(BootError, match="MP table"):
            write_mptable(m, 1)
    finally:
        m.close()
