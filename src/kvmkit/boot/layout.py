"""Where the loader puts things in guest physical memory.

Everything the loader writes besides the kernel and the initrd lives in the
low 1 MiB, at fixed addresses chosen so that none overlaps another, and the
legacy BIOS area (EBDA, VGA hole, BIOS ROM: 0x9fc00-0x100000) holds only the
MP table, which the e820 map reports as reserved. Keeping the addresses fixed
makes a guest's early state easy to read in a debugger or a trace.

    0x00500  GDT (4 descriptors)
    0x07000  boot_params, the "zero page" (4 KiB)
    0x08000  boot stack (grows down from 0x9000)
    0x09000  PML4
    0x0a000  PDPT
    0x0b000  page directories, 4 x 4 KiB (2 MiB pages for the first 4 GiB)
    0x20000  kernel command line (up to 64 KiB)
    0x9fc00  MP floating pointer + config table (last KiB of base memory)
    0xf0000  MP config table when it does not fit in that KiB
    0x100000 first address free for kernels and initrds
"""

from __future__ import annotations

GDT_ADDR = 0x0500
GDT_ENTRIES = 4
BOOT_PARAMS_ADDR = 0x7000
BOOT_PARAMS_SIZE = 0x1000
STACK_BASE = 0x8000
STACK_TOP = 0x9000
BOOT_STACK_POINTER = STACK_TOP - 0x10  # 16-byte aligned, below the PML4
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000
PD_COUNT = 4  # one page directory per GiB of the identity map
PAGE_TABLES_END = PD_ADDR + PD_COUNT * 0x1000
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000  # bytes reserved for the command line, NUL included

EBDA_START = 0x9FC00  # last KiB of 640 KiB base memory: start of the reserved BIOS area
MPTABLE_ADDR = EBDA_START
MPTABLE_HIGH_ADDR = 0xF0000  # BIOS ROM area, where the MP spec also allows the table
BIOS_END = 0x100000
KERNEL_MIN_ADDR = BIOS_END

# GDT selectors of the Linux boot protocol (boot.rst: __BOOT_CS 0x10, __BOOT_DS 0x18).
BOOT_CS = 0x10
BOOT_DS = 0x18

# (name, start, size) of every fixed structure, for overlap checks and `kvmkit inspect`.
FIXED_REGIONS: tuple[tuple[str, int, int], ...] = (
    ("gdt", GDT_ADDR, GDT_ENTRIES * 8),
    ("boot_params", BOOT_PARAMS_ADDR, BOOT_PARAMS_SIZE),
    ("stack", STACK_BASE, STACK_TOP - STACK_BASE),
    ("page_tables", PML4_ADDR, PAGE_TABLES_END - PML4_ADDR),
    ("cmdline", CMDLINE_ADDR, CMDLINE_MAX),
    ("bios_area", EBDA_START, BIOS_END - EBDA_START),
)


def overlaps(a_start: int, a_size: int, b_start: int, b_size: int) -> bool:
    return a_start < b_start + b_size and b_start < a_start + a_size


def align_down(value: int, align: int) -> int:
    return value & ~(align - 1)


def align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)
