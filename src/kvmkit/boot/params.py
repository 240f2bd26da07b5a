"""The Linux boot_params structure ("zero page") and the e820 memory map.

A kernel entered at its 64-bit entry point never runs the real-mode setup
code that would normally fill boot_params from BIOS calls, so the loader
fills it instead: the setup header (copied from the bzImage, or synthesised
for a bare ELF), where the command line and initrd are, and the e820 map that
tells the kernel which physical memory is RAM. Offsets are those of
arch/x86/include/uapi/asm/bootparam.h and Documentation/arch/x86/zero-page.rst.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import BootError
from ..memory import GuestMemory
from . import layout
from .bzimage import BOOT_FLAG_MAGIC, CAN_USE_HEAP, HDRS_MAGIC, LOADED_HIGH, SETUP_HEADER_START


# boot_params offsets
ACPI_RSDP_ADDR = 0x070
EXT_RAMDISK_IMAGE = 0x0C0
EXT_RAMDISK_SIZE = 0x0C4
EXT_CMD_LINE_PTR = 0x0C8
E820_ENTRIES = 0x1E8
SENTINEL = 0x1EF
E820_TABLE = 0x2D0
E820_ENTRY_SIZE = 20
E820_MAX_ENTRIES = 128

# setup header offsets (same in the image and in boot_params)
HDR_BOOT_FLAG = 0x1FE
HDR_JUMP = 0x200
HDR_HEADER = 0x202
HDR_VERSION = 0x206
HDR_TYPE_OF_LOADER = 0x210
HDR_LOADFLAGS = 0x211
HDR_CODE32_START = 0x214
HDR_RAMDISK_IMAGE = 0x218
HDR_RAMDISK_SIZE = 0x21C
HDR_HEAP_END_PTR = 0x224
HDR_CMD_LINE_PTR = 0x228
HDR_INITRD_ADDR_MAX = 0x22C
HDR_KERNEL_ALIGNMENT = 0x230
HDR_CMDLINE_SIZE = 0x238

TYPE_OF_LOADER_UNDEFINED = 0xFF  # boot.rst: a loader without an assigned id
SYNTH_VERSION = 0x020F
SYNTH_CMDLINE_SIZE = 2047  # x86 COMMAND_LINE_SIZE is 2048, NUL included
SYNTH_INITRD_ADDR_MAX = 0x7FFFFFFF
HEAP_END_PTR = 0xFE00 - 0x200  # boot.rst: heap end as an offset from the real-mode setup start

E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
E820_NVS = 4
E820_UNUSABLE = 5


@dataclass(frozen=True)
class E820Entry:
    """One e820 range: ``type`` is E820_RAM, E820_RESERVED, ..."""

    addr: int
    size: int
    type: int

    @property
    def end(self) -> int:
        return self.addr + self.size

    def pack(self) -> bytes:
        return struct.pack("<QQI", self.addr, self.size, self.type)


def e820_map(mem: GuestMemory) -> list[E820Entry]:
    """The e820 map for ``mem``: RAM, with the legacy BIOS area below 1 MiB reserved.

    0x9fc00-0x100000 (EBDA, VGA window, BIOS ROM) is reported reserved so the
    kernel leaves alone the MP table placed there and does not treat the VGA
    window as RAM, as it would not be on a PC.
    """
    out: list[E820Entry] = []
    for region in mem.regions:
        start, end = region.gpa, region.end
        if start < layout.EBDA_START:
            low_end = min(end, layout.EBDA_START)
            out.append(E820Entry(start, low_end - start, E820_RAM))
        if start < layout.BIOS_END and end > layout.EBDA_START:
            r_start = max(start, layout.EBDA_START)
            out.append(E820Entry(r_start, layout.BIOS_END - r_start, E820_RESERVED))
        if end > layout.BIOS_END:
            r_start = max(start, layout.BIOS_END)
            out.append(E820Entry(r_start, end - r_start, E820_RAM))
    return out


def synth_setup_header() -> bytes:
    """A setup header for a kernel given as a bare ELF, which has none of its own.

    It carries only what the 64-bit kernel reads back: the magic numbers, a
    protocol version new enough for every field the loader fills, and the
    limits the loader itself checks against.
    """
    hdr = bytearray(layout.BOOT_PARAMS_SIZE)
    struct.pack_into("<H", hdr, HDR_BOOT_FLAG, BOOT_FLAG_MAGIC)
    hdr[HDR_JUMP] = 0xEB  # short jmp, as in a real image
    hdr[HDR_JUMP + 1] = 0x6A  # header ends at 0x26c (kernel_info_offset included)
    hdr[HDR_HEADER:HDR_HEADER + 4] = HDRS_MAGIC
    struct.pack_into("<H", hdr, HDR_VERSION, SYNTH_VERSION)
    hdr[HDR_LOADFLAGS] = LOADED_HIGH
    struct.pack_into("<I", hdr, HDR_CODE32_START, layout.KERNEL_MIN_ADDR)
    struct.pack_into("<I", hdr, HDR_INITRD_ADDR_MAX, SYNTH_INITRD_ADDR_MAX)
    struct.pack_into("<I", hdr, HDR_KERNEL_ALIGNMENT, 0x200000)
    struct.pack_into("<I", hdr, HDR_CMDLINE_SIZE, SYNTH_CMDLINE_SIZE)
    return bytes(hdr[SETUP_HEADER_START:0x26C])


def build_boot_params(
    setup_header: bytes,
    e820: list[E820Entry],
    cmdline_addr: int,
    initrd_addr: int = 0,
    initrd_size: int = 0,
) -> bytes:
    """The 4096-byte zero page, ready to be written to guest memory."""
    if len(e820) > E820_MAX_ENTRIES:
        raise BootError(f"the memory map has {len(e820)} ranges but boot_params holds at most {E820_MAX_ENTRIES}; use a simpler memory layout.")
    end = SETUP_HEADER_START + len(setup_header)
    if end > E820_TABLE or len(setup_header) < HDR_CMDLINE_SIZE + 4 - SETUP_HEADER_START:
        raise BootError("the kernel's setup header has an impossible length; the image is damaged.")
    bp = bytearray(layout.BOOT_PARAMS_SIZE)
    bp[SETUP_HEADER_START:end] = setup_header
    bp[HDR_TYPE_OF_LOADER] = TYPE_OF_LOADER_UNDEFINED
    bp[HDR_LOADFLAGS] |= CAN_USE_HEAP | LOADED_HIGH
    struct.pack_into("<H", bp, HDR_HEAP_END_PTR, HEAP_END_PTR)
    struct.pack_into("<I", bp, HDR_CMD_LINE_PTR, cmdline_addr & 0xFFFF_FFFF)
    struct.pack_into("<I", bp, EXT_CMD_LINE_PTR, cmdline_addr >> 32)
    struct.pack_into("<I", bp, HDR_RAMDISK_IMAGE, initrd_addr & 0xFFFF_FFFF)
    struct.pack_into("<I", bp, HDR_RAMDISK_SIZE, initrd_size & 0xFFFF_FFFF)
    struct.pack_into("<I", bp, EXT_RAMDISK_IMAGE, initrd_addr >> 32)
    struct.pack_into("<I", bp, EXT_RAMDISK_SIZE, initrd_size >> 32)
    struct.pack_into("<Q", bp, ACPI_RSDP_ADDR, 0)  # no ACPI: Linux falls back to the MP table
    bp[SENTINEL] = 0  # a non-zero sentinel makes Linux discard fields it thinks stale
    bp[E820_ENTRIES] = len(e820)
    for i, entry in enumerate(e820):
        off = E820_TABLE + i * E820_ENTRY_SIZE
        bp[off:off + E820_ENTRY_SIZE] = entry.pack()
    return bytes(bp)
