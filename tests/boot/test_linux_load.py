"""load_linux end to end (no KVM): the stock Debian kernel and crafted images."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from kvmkit.boot import layout
from kvmkit.boot.inspect import describe_kernel
from kvmkit.boot.linux import (
    BOOT_CR0,
    BOOT_CR4,
    BOOT_EFER,
    CR0_PE,
    CR0_PG,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    check_initrd,
    load_linux,
)
from kvmkit.errors import BootError
from kvmkit.memory import GiB, GuestMemory, MiB

CMDLINE = "console=ttyS0 nokaslr"
CPIO = b"070701"  # the newc magic: enough for the loader to take the bytes as an initramfs


@pytest.fixture
def mem256():
    m = GuestMemory(256 * MiB)
    yield m
    m.close()


@pytest.fixture
def mem16():
    m = GuestMemory(16 * MiB)
    yield m
    m.close()


def _walk(mem: GuestMemory, cr3: int, va: int) -> int:
    """Translate ``va`` through the 4-level page table like the MMU would."""
    pml4e = mem.read_u64(cr3 + ((va >> 39) & 511) * 8)
    assert pml4e & 1
    pdpte = mem.read_u64((pml4e & ~0xFFF) + ((va >> 30) & 511) * 8)
    assert pdpte & 1
    if pdpte & 0x80:
        return (pdpte & ~((1 << 30) - 1) & ((1 << 52) - 1)) | (va & ((1 << 30) - 1))
    pde = mem.read_u64((pdpte & ~0xFFF) + ((va >> 21) & 511) * 8)
    assert pde & 1 and pde & 0x80
    return (pde & ~((1 << 21) - 1) & ((1 << 52) - 1)) | (va & ((1 << 21) - 1))


def test_stock_kernel_load(mem256, stock_image, stock_parsed) -> None:
    initrd = CPIO + bytes(range(256)) * 1000
    info = load_linux(mem256, stock_image, initrd, CMDLINE)
    assert info.kernel_format == "bzImage" and info.compression == "xz"
    assert info.kernel_version.startswith("6.1.")
    assert info.rip == 0x1000000 and info.kernel_start == 0x1000000
    assert info.rsi == info.boot_params_addr == layout.BOOT_PARAMS_ADDR
    # the kernel's first segment is in memory at its physical address
    vmlinux = stock_parsed.vmlinux
    off = struct.unpack_from("<Q", vmlinux, 64 + 8)[0]  # first phdr p_offset
    assert mem256.read(0x1000000, 4096) == vmlinux[off:off + 4096]
    # boot_params
    bp = mem256.read(info.rsi, 4096)
    assert bp[0x202:0x206] == b"HdrS" and bp[0x210] == 0xFF and bp[0x211] & 0x80
    assert struct.unpack_from("<I", bp, 0x228)[0] == info.cmdline_addr
    assert mem256.read_cstring(info.cmdline_addr) == CMDLINE.encode()
    assert struct.unpack_from("<II", bp, 0x218) == (info.initrd_addr, len(initrd))
    assert bp[0x1E8] == len(info.e820) == 3
    # initrd: page aligned, as high as possible in RAM, clear of the kernel's init_size
    assert info.initrd_addr % 4096 == 0
    assert info.initrd_addr + len(initrd) <= 256 * MiB < info.initrd_addr + len(initrd) + 4096
    assert info.initrd_addr >= info.kernel_end == 0x1000000 + stock_parsed.header.init_size
    assert mem256.read(info.initrd_addr, len(initrd)) == initrd
    assert info.mptable_addr == layout.MPTABLE_ADDR and mem256.read(info.mptable_addr, 4) == b"_MP_"


def test_cpu_state(mem16, make_elf) -> None:
    info = load_linux(mem16, make_elf(), None, "")
    assert info.cr0 == BOOT_CR0 and info.cr0 & CR0_PE and info.cr0 & CR0_PG
    assert info.cr4 == BOOT_CR4 and info.cr4 & CR4_PAE
    assert info.efer == BOOT_EFER == EFER_LME | EFER_LMA
    assert info.rflags == 0x2
    assert (info.code_selector, info.data_selector) == (0x10, 0x18)
    assert info.code_segment.l == 1 and info.code_segment.db == 0 and info.code_segment.type == 0xB
    assert info.data_segment.l == 0 and info.data_segment.type == 0x3
    # GDT: null, unused, 64-bit code at 0x10, data at 0x18
    gdt = struct.unpack("<4Q", mem16.read(info.gdt_base, info.gdt_limit + 1))
    assert gdt[0] == 0 and gdt[1] == 0
    code, data = gdt[2], gdt[3]
    assert (code >> 47) & 1 and (code >> 53) & 1 and not (code >> 54) & 1  # P, L, not D
    assert (code >> 40) & 0xF == info.code_segment.type
    assert (data >> 47) & 1 and (data >> 40) & 0xF == info.data_segment.type
    # identity map over the first 4 GiB with 2 MiB pages
    assert info.cr3 == layout.PML4_ADDR and info.identity_map_size == 4 * GiB
    for va in (0, info.rip, info.rsi, 0x1000000 + 12345, 0xFEE00000, 4 * GiB - 1):
        assert _walk(mem16, info.cr3, va) == va
    assert info.rsp % 16 == 0 and layout.STACK_BASE < info.rsp <= layout.STACK_TOP


def test_gb_pages_map_all_ram() -> None:
    mem = GuestMemory(6 * GiB)
    try:
        from kvmkit.boot.linux import write_identity_map

        cr3, mapped = write_identity_map(mem, gb_pages=True)
        assert mapped == 7 * GiB  # RAM ends at 4 GiB + 3 GiB
        assert _walk(mem, cr3, 6 * GiB + 5) == 6 * GiB + 5
    finally:
        mem.close()


def test_bundled_style_elf(mem16, make_elf) -> None:
    mem16.fill(0x200000, 0x3000, 0xAA)
    info = load_linux(mem16, make_elf(), CPIO + b"initrd!", "quiet")
    assert info.kernel_format == "elf" and info.compression is None
    assert info.rip == 0x200000
    assert mem16.read(0x200000, 16) == b"\xf4" * 16 and mem16.read(0x200010, 16) == b"\0" * 16
    bp = mem16.read(info.rsi, 4096)
    assert struct.unpack_from("<H", bp, 0x1FE)[0] == 0xAA55
    assert bp[0x202:0x206] == b"HdrS" and struct.unpack_from("<H", bp, 0x206)[0] == 0x020F
    assert mem16.read(info.initrd_addr, 13) == CPIO + b"initrd!"
    assert info.initrd_addr + 13 <= 16 * MiB and info.initrd_addr >= info.kernel_end


def test_placements_do_not_overlap(mem256, make_bzimage) -> None:
    info = load_linux(mem256, make_bzimage(), CPIO + b"x" * 10000, "a=b")
    spans = sorted(info.placements, key=lambda p: p[1])
    for (n1, s1, l1), (n2, s2, l2) in zip(spans, spans[1:]):
        assert s1 + l1 <= s2, (n1, n2)


def test_not_a_kernel(mem16) -> None:
    with pytest.raises(BootError, match="neither a bzImage"):
        load_linux(mem16, b"#!/bin/sh\necho hi\n" * 100, None, "")


def test_protocol_too_old(mem16, make_bzimage) -> None:
    with pytest.raises(BootError, match="2.06"):
        load_linux(mem16, make_bzimage(version=0x0205), None, "")


def test_32bit_kernel(mem16, make_bzimage) -> None:
    with pytest.raises(BootError, match="32-bit"):
        load_linux(mem16, make_bzimage(xloadflags=0), None, "")


def test_memory_smaller_than_init_size(stock_image) -> None:
    mem = GuestMemory(64 * MiB)
    try:
        with pytest.raises(BootError, match="init_size.*--mem"):
            load_linux(mem, stock_image, None, CMDLINE)
    finally:
        mem.close()


def test_memory_smaller_than_crafted_init_size(mem16, make_bzimage) -> None:
    with pytest.raises(BootError, match="at least 34 MiB"):
        load_linux(mem16, make_bzimage(init_size=32 * MiB), None, "")


def test_cmdline_longer_than_cmdline_size(mem16, make_bzimage) -> None:
    load_linux(mem16, make_bzimage(cmdline_size=100), None, "x" * 100)
    with pytest.raises(BootError, match="101 bytes.*at most 100"):
        load_linux(mem16, make_bzimage(cmdline_size=100), None, "x" * 101)


def test_stock_cmdline_limit(mem256, stock_image) -> None:
    with pytest.raises(BootError, match="at most 2047"):
        load_linux(mem256, stock_image, None, "a" * 2048)


def test_initrd_too_large(mem16, make_bzimage) -> None:
    with pytest.raises(BootError, match="initrd.*does not fit.*--mem"):
        load_linux(mem16, make_bzimage(), b"\0" * (12 * MiB), "")


def test_a_file_that_is_no_initramfs_is_refused_in_one_sentence(mem16, make_elf) -> None:
    with pytest.raises(BootError) as info:
        load_linux(mem16, make_elf(), b"root:x:0:0:root:/root:/bin/bash\n" * 40, "", initrd_name="/etc/passwd")
    msg = str(info.value)
    assert msg.startswith("/etc/passwd is not an initramfs (neither a cpio archive nor a compressed one); ")
    assert "kvmkit initramfs" in msg and msg.count(". ") == 0 and msg.endswith(".")
    with pytest.raises(BootError, match="^the initrd is empty; build one with `kvmkit initramfs`"):
        load_linux(mem16, make_elf(), b"", "")


@pytest.mark.parametrize("head", [
    b"070701", b"070702", b"070707", b"\xc7\x71", b"\x71\xc7",                      # cpio newc, crc, odc, binary
    b"\x1f\x8b\x08", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd", b"\x02\x21\x4c\x18",    # gzip, xz, zstd, lz4 legacy
    b"\x04\x22\x4d\x18", b"BZh9", b"\x5d\x00\x00\x80\x00", b"\x89LZO\x00",          # lz4 frame, bzip2, lzma, lzop
    b"\0" * 512 + b"070701",                                                        # zero padding, as Linux skips it
])
def test_cpio_and_compressed_initrds_are_taken(head: bytes) -> None:
    check_initrd(head + b"\x01" * 100)


@pytest.mark.kvm
def test_run_with_a_text_file_as_initrd_is_one_sentence(tmp_path: Path, make_bzimage) -> None:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(make_bzimage())
    p = subprocess.run([sys.executable, "-m", "kvmkit", "run", "-m", "64M", "-k", str(kernel), "-i", "/etc/passwd"],
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")},
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith("kvmkit: "), (p.stdout, p.stderr)
    assert "is not an initramfs (neither a cpio archive nor a compressed one); build one with `kvmkit initramfs`" in lines[0]


def test_old_style_initrd_filesystem_images_are_taken() -> None:
    for image in (b"-rom1fs-", b"hsqs", b"\x45\x3d\xcd\x28", bytes(1080) + b"\x53\xef"):  # romfs, squashfs, cramfs, ext2
        check_initrd(image + bytes(1024))


def test_the_real_initramfs_writer_output_is_taken() -> None:
    from kvmkit.boot.initramfs import file, write_cpio
    check_initrd(write_cpio([file("init", b"#!/bin/sh\n")]))
    check_initrd(write_cpio([file("init", b"#!/bin/sh\n")], compress=True))


@pytest.mark.parametrize("data", [
    b"#!/bin/sh\necho hi\n", b"\x7fELF\x02\x01\x01" + bytes(100), b"MZ" + bytes(600), b"\0" * 4096,
    b"07070",  # a cut-off magic
])
def test_other_files_are_not_initramfs(data: bytes) -> None:
    with pytest.raises(BootError, match="is (not an initramfs|empty)"):
        check_initrd(data)


def test_initrd_respects_initrd_addr_max(mem256, make_bzimage) -> None:
    info = load_linux(mem256, make_bzimage(initrd_addr_max=0x1FFFFFF), CPIO + b"r" * 4994, "")
    assert info.initrd_addr + 5000 <= 0x2000000
    assert info.initrd_addr == (0x2000000 - 5000) & ~0xFFF


def test_elf_overlapping_boot_structures(mem16, make_elf) -> None:
    with pytest.raises(BootError, match="overlaps the loader's boot_params"):
        load_linux(mem16, make_elf(segments=[(0x7000, 0x7000, b"\x90", 0x100)], entry=0x7000), None, "")


def test_nul_in_cmdline(mem16, make_elf) -> None:
    with pytest.raises(BootError, match="NUL"):
        load_linux(mem16, make_elf(), None, "a\0b")


def test_describe_stock_kernel(stock_bzimage) -> None:
    d = describe_kernel(stock_bzimage)
    assert d["format"] == "bzImage" and d["compression"] == "xz"
    assert d["protocol"] >= "2.15" and d["kernel_version"].startswith("6.1.")
    assert d["entry_phys"] == 0x1000000 and d["load_start"] == 0x1000000
    assert d["kernel_64"] and d["vmlinux_size"] > d["payload_size"]


def test_describe_elf_and_junk(tmp_path, make_elf) -> None:
    p = tmp_path / "guest.elf"
    p.write_bytes(make_elf(extra=b"Linux version 9.9.9-x\0"))
    d = describe_kernel(p)
    assert d["format"] == "elf" and d["entry"] == 0x200000 and d["kernel_version"] == "9.9.9-x"
    (tmp_path / "junk").write_bytes(b"junk" * 100)
    with pytest.raises(BootError, match="neither"):
        describe_kernel(tmp_path / "junk")
    with pytest.raises(BootError, match="does not exist"):
        describe_kernel(tmp_path / "missing")
    with pytest.raises(BootError, match="not a regular file"):
        describe_kernel("/dev/zero")  # used to read until the host ran out of memory
