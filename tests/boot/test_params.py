"""boot_params bytes at the offsets of bootparam.h, and the e820 map."""

from __future__ import annotations

import struct

import pytest

from kvmkit.boot import layout
from kvmkit.boot.params import (
    E820_RAM,
    E820_RESERVED,
    E820Entry,
    build_boot_params,
    e820_map,
    synth_setup_header,
)
from kvmkit.errors import BootError
from kvmkit.memory import GiB, GuestMemory, MiB


def test_e820_small_vm() -> None:
    mem = GuestMemory(256 * MiB)
    try:
        assert e820_map(mem) == [
            E820Entry(0, 0x9FC00, E820_RAM),
            E820Entry(0x9FC00, 0x100000 - 0x9FC00, E820_RESERVED),
            E820Entry(0x100000, 256 * MiB - 0x100000, E820_RAM),
        ]
    finally:
        mem.close()


def test_e820_above_the_pci_hole() -> None:
    mem = GuestMemory(4 * GiB)
    try:
        e = e820_map(mem)
        assert e[-2] == E820Entry(0x100000, 3 * GiB - 0x100000, E820_RAM)
        assert e[-1] == E820Entry(4 * GiB, 1 * GiB, E820_RAM)
        assert sum(x.size for x in e if x.type == E820_RAM) == 4 * GiB - (0x100000 - 0x9FC00)
    finally:
        mem.close()


def test_e820_entries_never_overlap() -> None:
    mem = GuestMemory(5 * GiB)
    try:
        e = e820_map(mem)
        for a, b in zip(e, e[1:]):
            assert a.end <= b.addr
    finally:
        mem.close()


def _bp(**kw) -> bytes:
    e820 = [E820Entry(0, 0x9FC00, E820_RAM), E820Entry(0x100000, 0x7F00000, E820_RAM)]
    args = dict(setup_header=synth_setup_header(), e820=e820, cmdline_addr=0x20000)
    args.update(kw)
    return build_boot_params(**args)


def test_boot_params_offsets() -> None:
    bp = _bp(initrd_addr=0x7F00000, initrd_size=0x123456)
    assert len(bp) == 4096
    assert struct.unpack_from("<H", bp, 0x1FE)[0] == 0xAA55
    assert bp[0x202:0x206] == b"HdrS"
    assert struct.unpack_from("<H", bp, 0x206)[0] == 0x020F
    assert bp[0x210] == 0xFF  # type_of_loader
    assert bp[0x211] & 0x80  # CAN_USE_HEAP
    assert bp[0x211] & 0x01  # LOADED_HIGH
    assert struct.unpack_from("<I", bp, 0x228)[0] == 0x20000  # cmd_line_ptr
    assert struct.unpack_from("<I", bp, 0x0C8)[0] == 0  # ext_cmd_line_ptr
    assert struct.unpack_from("<I", bp, 0x218)[0] == 0x7F00000  # ramdisk_image
    assert struct.unpack_from("<I", bp, 0x21C)[0] == 0x123456  # ramdisk_size
    assert struct.unpack_from("<II", bp, 0x0C0) == (0, 0)
    assert struct.unpack_from("<Q", bp, 0x070)[0] == 0  # acpi_rsdp_addr
    assert struct.unpack_from("<I", bp, 0x238)[0] == 2047  # cmdline_size
    assert bp[0x1EF] == 0  # sentinel
    assert bp[0x1E8] == 2  # e820_entries
    assert struct.unpack_from("<QQI", bp, 0x2D0) == (0, 0x9FC00, 1)
    assert struct.unpack_from("<QQI", bp, 0x2D0 + 20) == (0x100000, 0x7F00000, 1)
    assert bp[0x2D0 + 40:0x2D0 + 60] == b"\0" * 20


def test_ext_fields_for_high_addresses() -> None:
    bp = _bp(cmdline_addr=0x1_0002_0000, initrd_addr=0x2_0000_1000, initrd_size=0x1_0000_0010)
    assert struct.unpack_from("<I", bp, 0x228)[0] == 0x20000
    assert struct.unpack_from("<I", bp, 0x0C8)[0] == 1
    assert struct.unpack_from("<I", bp, 0x218)[0] == 0x1000
    assert struct.unpack_from("<I", bp, 0x0C0)[0] == 2
    assert struct.unpack_from("<I", bp, 0x21C)[0] == 0x10
    assert struct.unpack_from("<I", bp, 0x0C4)[0] == 1


def test_copied_header_is_kept(stock_image: bytes) -> None:
    from kvmkit.boot.bzimage import parse_setup_header

    hdr = parse_setup_header(stock_image)
    bp = _bp(setup_header=hdr.raw)
    end = 0x1F1 + len(hdr.raw)
    for off in range(0x1F1, end):
        if 0x210 <= off <= 0x211 or 0x218 <= off < 0x220 or 0x224 <= off < 0x22C:
            continue  # fields the loader fills
        assert bp[off] == stock_image[off], hex(off)
    assert struct.unpack_from("<I", bp, 0x238)[0] == 2047


def test_too_many_e820_entries() -> None:
    with pytest.raises(BootError, match="at most 128"):
        _bp(e820=[E820Entry(i * 0x1000, 0x1000, E820_RAM) for i in range(129)])


def test_bad_header_length() -> None:
    with pytest.raises(BootError, match="setup header"):
        _bp(setup_header=b"\0" * 8)


def test_mptable_area_is_reserved() -> None:
    mem = GuestMemory(64 * MiB)
    try:
        reserved = [e for e in e820_map(mem) if e.type == E820_RESERVED]
        assert any(e.addr <= layout.MPTABLE_ADDR and layout.MPTABLE_HIGH_ADDR + 0x10000 <= e.end for e in reserved)
    finally:
        mem.close()
