"""Builders of crafted kernel images: the smallest files that pass (or, deliberately, fail) each validation step."""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct


def build_elf(
    segments: list[tuple[int, int, bytes, int]] | None = None,
    entry: int = 0x200000,
    machine: int = 62,
    elf_class: int = 2,
    data_enc: int = 1,
    extra: bytes = b"",
) -> bytes:
    """An ELF64 executable; segments are (vaddr, paddr, file bytes, memsz)."""
    if segments is None:
        segments = [(0x200000, 0x200000, b"\xf4" * 16, 0x2000)]  # hlt; one page of bss
    phoff = 64
    data_off = phoff + 56 * len(segments)
    data_off = (data_off + 15) & ~15
    body = bytearray()
    phdrs = bytearray()
    for vaddr, paddr, content, memsz in segments:
        off = data_off + len(body)
        phdrs += struct.pack("<IIQQQQQQ", 1, 7, off, vaddr, paddr, len(content), memsz, 0x1000)
        body += content + b"\0" * ((16 - len(content) % 16) % 16)
    ident = b"\x7fELF" + bytes([elf_class, data_enc, 1]) + b"\0" * 9
    ehdr = ident + struct.pack("<HHIQQQIHHHHHH", 2, machine, 1, entry, phoff, 0, 0, 64, 56, len(segments), 64, 0, 0)
    out = bytearray(ehdr + phdrs)
    out += b"\0" * (data_off - len(out))
    return bytes(out + body + extra)


def compress(data: bytes, how: str) -> bytes:
    """Compress like the kernel build does: the stream, then the size as a 32-bit word."""
    size = struct.pack("<I", len(data))
    if how == "gzip":
        return gzip.compress(data, mtime=0) + size
    if how == "xz":
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32) + size
    if how == "lzma":
        return lzma.compress(data, format=lzma.FORMAT_ALONE) + size
    if how == "bzip2":
        return bz2.compress(data) + size
    raise ValueError(how)


def build_bzimage(
    payload: bytes | None = None,
    version: int = 0x020F,
    setup_sects: int = 1,
    init_size: int = 0x400000,
    cmdline_size: int = 2047,
    xloadflags: int = 0x3,
    initrd_addr_max: int = 0x7FFFFFFF,
    kernel_version: bytes = b"6.1.0-crafted (test@kvmkit) #1",
) -> bytes:
    """A bzImage with a real setup header and ``payload`` (default: an xz ELF) after the setup sectors."""
    if payload is None:
        payload = compress(build_elf(), "xz")
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x200] = 0xEB
    setup[0x201] = 0x6A  # header runs to 0x26c
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    kv_off = 0x300
    setup[kv_off:kv_off + len(kernel_version) + 1] = kernel_version + b"\0"
    struct.pack_into("<H", setup, 0x20E, kv_off - 0x200)
    setup[0x211] = 0x01  # LOADED_HIGH
    struct.pack_into("<I", setup, 0x214, 0x100000)
    struct.pack_into("<I", setup, 0x22C, initrd_addr_max)
    struct.pack_into("<I", setup, 0x230, 0x200000)
    setup[0x234] = 1
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    payload_offset = 0x40  # a little decompressor stub would live before the payload
    struct.pack_into("<I", setup, 0x248, payload_offset)
    struct.pack_into("<I", setup, 0x24C, len(payload))
    struct.pack_into("<Q", setup, 0x258, 0x1000000)
    struct.pack_into("<I", setup, 0x260, init_size)
    pm = b"\x90" * payload_offset + payload + b"\0" * 64
    struct.pack_into("<I", setup, 0x1F4, (len(pm) + 15) // 16)
    return bytes(setup) + pm
