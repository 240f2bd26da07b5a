"""ELF64 reader and loader: validation, loading with bss zeroing, entry translation."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmkit.boot.elf import linux_banner, load_elf, parse_elf
from kvmkit.errors import BootError
from kvmkit.memory import GuestMemory, MiB


@pytest.fixture
def mem():
    m = GuestMemory(16 * MiB)
    yield m
    m.close()


def test_parse_minimal(make_elf) -> None:
    elf = parse_elf(make_elf())
    assert elf.entry == 0x200000
    assert len(elf.segments) == 1
    s = elf.segments[0]
    assert (s.paddr, s.filesz, s.memsz) == (0x200000, 16, 0x2000)
    assert elf.phys_start == 0x200000 and elf.phys_end == 0x202000


def test_load_copies_and_zeroes_bss(mem, make_elf) -> None:
    mem.fill(0x200000, 0x3000, 0xFF)
    load_elf(mem, make_elf())
    assert mem.read(0x200000, 16) == b"\xf4" * 16
    assert mem.read(0x200010, 0x2000 - 16) == b"\0" * (0x2000 - 16)
    assert mem.read_u8(0x202000) == 0xFF  # nothing written past memsz


def test_virtual_entry_is_translated(make_elf) -> None:
    vbase = 0xFFFFFFFF81000000
    elf = parse_elf(make_elf(segments=[(vbase, 0x1000000, b"\x90" * 32, 0x1000)], entry=vbase + 0x10))
    assert elf.phys_entry == 0x1000010


def test_physical_entry_kept_like_vmlinux(make_elf) -> None:
    # vmlinux: ENTRY(phys_startup_64), plus a zero-based percpu segment
    vbase = 0xFFFFFFFF81000000
    elf = parse_elf(make_elf(segments=[(vbase, 0x1000000, b"\x90" * 32, 0x1000), (0, 0x1001000, b"\1" * 8, 0x1000)],
                             entry=0x1000000))
    assert elf.phys_entry == 0x1000000


def test_entry_outside_segments(make_elf) -> None:
    with pytest.raises(BootError, match="entry point"):
        parse_elf(make_elf(entry=0x900000)).phys_entry


@pytest.mark.parametrize("kwargs,match", [
    ({"elf_class": 1}, "32-bit"),
    ({"data_enc": 2}, "big-endian"),
    ({"machine": 3}, "x86-64"),
])
def test_wrong_kind_of_elf(make_elf, kwargs, match) -> None:
    with pytest.raises(BootError, match=match):
        parse_elf(make_elf(**kwargs))


def test_not_elf() -> None:
    with pytest.raises(BootError, match="not an ELF"):
        parse_elf(b"MZ" + b"\0" * 100)


def test_phdrs_past_end(make_elf) -> None:
    data = bytearray(make_elf())
    struct.pack_into("<Q", data, 32, len(data) - 10)  # e_phoff
    with pytest.raises(BootError, match="program headers run past"):
        parse_elf(bytes(data))


def test_segment_past_end_of_file(make_elf) -> None:
    data = make_elf()
    with pytest.raises(BootError, match="truncated"):
        parse_elf(data[:-8])


def test_filesz_larger_than_memsz(make_elf) -> None:
    with pytest.raises(BootError, match="file bytes"):
        parse_elf(make_elf(segments=[(0x200000, 0x200000, b"\x90" * 64, 16)]))


def test_no_load_segments(make_elf) -> None:
    data = bytearray(make_elf())
    struct.pack_into("<I", data, 64, 4)  # p_type = PT_NOTE
    with pytest.raises(BootError, match="PT_LOAD"):
        parse_elf(bytes(data))


def test_segment_outside_ram(mem, make_elf) -> None:
    with pytest.raises(BootError, match="does not fit in guest RAM"):
        load_elf(mem, make_elf(segments=[(0xF00000, 0xF00000, b"\x90", 0x200000)], entry=0xF00000))


def test_banner_found(make_elf) -> None:
    data = make_elf(extra=b"\0\0Linux version 6.1.0-test (x@y) #1 SMP\n\0more")
    assert linux_banner(data) == "Linux version 6.1.0-test (x@y) #1 SMP"
    assert linux_banner(make_elf()) is None


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(data: bytes) -> None:
    try:
        parse_elf(data)
    except BootError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 63 + 56), st.integers(0, 255)), min_size=1, max_size=10))
def test_fuzz_mutated_headers_never_escape_memory(make_elf, mutations) -> None:
    data = bytearray(make_elf())
    for off, val in mutations:
        data[off] = val
    m = GuestMemory(4 * MiB)
    try:
        elf = load_elf(m, bytes(data))
        assert all(m.is_ram(s.paddr, s.memsz) for s in elf.segments)
        elf.phys_entry
    except BootError as exc:
        assert str(exc).endswith(".")
    finally:
        m.close()
