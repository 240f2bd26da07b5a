"""Load a Linux kernel (bzImage or ELF) and everything it needs to start in 64-bit mode.

This is the 64-bit boot protocol of Documentation/arch/x86/boot.rst, minus
the kernel's own decompressor: the vmlinux is extracted in Python, its
segments are copied to their physical addresses, and the vCPU starts at the
ELF entry (startup_64) in long mode with paging on, an identity map covering
the kernel, boot_params and the command line, a GDT with __BOOT_CS/__BOOT_DS,
and RSI pointing at boot_params. The project's bundled guest is an ELF
entered the same way, so one loader serves both.

Nothing here touches KVM: :class:`BootInfo` carries every register value
the vCPU setup needs as plain numbers.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

from ..errors import BootError
from ..memory import GiB, MiB, GuestMemory, PCI_HOLE_START
from ..x86 import CR0_ET, CR0_MP, CR0_NE, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME, RFLAGS_FIXED
from . import layout
from .bzimage import is_bzimage, open_bzimage
from .elf import ElfImage, is_elf, linux_banner, load_elf, parse_elf
from .mptable import write_mptable
from .params import (
    SYNTH_CMDLINE_SIZE,
    SYNTH_INITRD_ADDR_MAX,
    E820Entry,
    build_boot_params,
    e820_map,
    synth_setup_header,
)

# The 64-bit entry state boot.rst asks for: protected mode with paging and PAE, long mode, interrupts off.
BOOT_CR0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG
BOOT_CR4 = CR4_PAE
BOOT_EFER = EFER_LME | EFER_LMA
BOOT_RFLAGS = RFLAGS_FIXED

# Page table entry bits
PTE_PRESENT = 1 << 0
PTE_RW = 1 << 1
PTE_PS = 1 << 7  # a large page (2 MiB in a PD, 1 GiB in a PDPT)

# GDT descriptors: flat 4 GiB, accessed bit preset so the CPU never writes the GDT.
GDT_NULL = 0
GDT_CODE64 = 0x00AF9B000000FFFF  # P, DPL0, code exec/read, L=1, G=1
GDT_DATA = 0x00CF93000000FFFF  # P, DPL0, data read/write, D/B=1, G=1


@dataclass(frozen=True)
class SegmentInfo:
    """A segment register's hidden part, in the terms of struct kvm_segment."""

    selector: int
    base: int
    limit: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int
    g: int
    avl: int = 0


BOOT_CODE_SEGMENT = SegmentInfo(selector=layout.BOOT_CS, base=0, limit=0xFFFF_FFFF, type=0xB, present=1, dpl=0, db=0, s=1, l=1, g=1)
BOOT_DATA_SEGMENT = SegmentInfo(selector=layout.BOOT_DS, base=0, limit=0xFFFF_FFFF, type=0x3, present=1, dpl=0, db=1, s=1, l=0, g=1)


@dataclass(frozen=True)
class BootInfo:
    """The vCPU's initial state and what the loader placed where.

    Register fields are what KVM_SET_REGS/KVM_SET_SREGS should receive:
    ``rip``, ``rsi`` (boot_params), ``rsp``, ``rflags``; ``cr0``/``cr3``/
    ``cr4``/``efer``; ``gdt_base``/``gdt_limit`` (IDT empty: the kernel
    installs its own before enabling interrupts); ``code_segment`` for CS and
    ``data_segment`` for DS, ES, FS, GS and SS.
    """

    rip: int
    rsi: int
    rsp: int
    rflags: int
    cr0: int
    cr3: int
    cr4: int
    efer: int
    gdt_base: int
    gdt_limit: int
    idt_base: int
    idt_limit: int
    code_selector: int
    data_selector: int
    code_segment: SegmentInfo
    data_segment: SegmentInfo
    # what was loaded
    kernel_format: str  # "bzImage" or "elf"
    compression: str | None
    protocol_version: int
    kernel_version: str | None
    kernel_start: int
    kernel_end: int  # end of the memory the kernel claims (init_size), not just its file
    boot_params_addr: int
    cmdline_addr: int
    cmdline_size: int  # bytes, NUL excluded
    initrd_addr: int
    initrd_size: int
    mptable_addr: int | None
    page_table_addr: int
    identity_map_size: int
    e820: tuple[E820Entry, ...]
    placements: tuple[tuple[str, int, int], ...] = field(default=())


@dataclass(frozen=True)
class KernelImage:
    """A kernel file, opened once: the ELF to load and what its header says.

    ``is_linux`` tells a Linux kernel (a bzImage, or an ELF with a Linux
    banner) from another ELF such as the bundled guest: the command line a
    Linux kernel gets depends on it.
    """

    elf_data: bytes
    elf: ElfImage
    setup_header: bytes
    fmt: str
    compression: str | None
    version: int
    kernel_version: str | None
    init_size: int
    cmdline_size: int
    initrd_addr_max: int

    @property
    def is_linux(self) -> bool:
        return self.fmt == "bzImage" or self.kernel_version is not None


def open_kernel(kernel: bytes, limit: int = 1 << 30) -> KernelImage:
    """Recognise and parse a bzImage or an x86-64 ELF; one sentence (BootError) for anything else.

    ``limit`` caps what the payload may decompress to: the guest's memory,
    since a kernel bigger than that could not be loaded anyway."""
    if is_bzimage(kernel):
        bz = open_bzimage(kernel, limit)
        hdr = bz.header
        if not hdr.is_64bit:
            raise BootError("the bzImage is a 32-bit kernel (XLF_KERNEL_64 is not set), and kvmkit boots 64-bit kernels only; use an x86-64 kernel.")
        elf = parse_elf(bz.vmlinux)
        return KernelImage(bz.vmlinux, elf, hdr.raw, "bzImage", bz.compression, hdr.version,
                       hdr.kernel_version or None, hdr.init_size, hdr.cmdline_size, hdr.initrd_addr_max)
    if is_elf(kernel):
        elf = parse_elf(kernel)
        banner = linux_banner(kernel)
        version = banner[len("Linux version "):] if banner else None
        return KernelImage(kernel, elf, synth_setup_header(), "elf", None, 0x020F, version,
                       elf.phys_end - elf.phys_start, SYNTH_CMDLINE_SIZE, SYNTH_INITRD_ADDR_MAX)
    raise BootError("the kernel file is neither a bzImage (no 'HdrS' header) nor an ELF executable; pass a Linux bzImage, a vmlinux or the bundled guest.")


def _check_fixed_overlap(name: str, start: int, size: int) -> None:
    for fixed, f_start, f_size in layout.FIXED_REGIONS:
        if layout.overlaps(start, size, f_start, f_size):
            raise BootError(
                f"the {name} at {start:#x}-{start + size:#x} overlaps the loader's {fixed} at {f_start:#x}; "
                f"link the kernel at or above {layout.KERNEL_MIN_ADDR:#x}."
            )


def write_gdt(mem: GuestMemory) -> tuple[int, int]:
    """Write the boot GDT; returns (base, limit) for KVM_SET_SREGS."""
    entries = (GDT_NULL, GDT_NULL, GDT_CODE64, GDT_DATA)  # 0x08 unused, as in Linux's boot GDT
    mem.write(layout.GDT_ADDR, struct.pack("<4Q", *entries))
    return layout.GDT_ADDR, len(entries) * 8 - 1


def write_identity_map(mem: GuestMemory, gb_pages: bool = False) -> tuple[int, int]:
    """Write an identity-mapped page table; returns (cr3, bytes mapped).

    With 2 MiB pages it maps the first 4 GiB, which holds the kernel,
    boot_params, the command line, the initrd and the APIC/IOAPIC windows;
    Linux builds its own page tables for the rest before it needs them. With
    1 GiB pages (only if the CPUID given to the guest has pdpe1gb) one PDPT
    maps all RAM up to 512 GiB for guests that want it.
    """
    mem.fill(layout.PML4_ADDR, layout.PAGE_TABLES_END - layout.PML4_ADDR, 0)
    mem.write_u64(layout.PML4_ADDR, layout.PDPT_ADDR | PTE_PRESENT | PTE_RW)
    if gb_pages:
        ram_end = max(r.end for r in mem.regions)
        n = min(512, max(4, -(-ram_end // GiB)))
        mem.write(layout.PDPT_ADDR, struct.pack(f"<{n}Q", *((i * GiB) | PTE_PRESENT | PTE_RW | PTE_PS for i in range(n))))
        return layout.PML4_ADDR, n * GiB
    for i in range(layout.PD_COUNT):
        pd = layout.PD_ADDR + i * 0x1000
        mem.write_u64(layout.PDPT_ADDR + i * 8, pd | PTE_PRESENT | PTE_RW)
        base = i * GiB
        mem.write(pd, struct.pack("<512Q", *((base + j * 2 * MiB) | PTE_PRESENT | PTE_RW | PTE_PS for j in range(512))))
    return layout.PML4_ADDR, layout.PD_COUNT * GiB


def place_initrd(mem: GuestMemory, size: int, kernel_end: int, initrd_addr_max: int) -> int:
    """Highest page-aligned address for an initrd of ``size`` bytes, above the kernel.

    High is where boot.rst recommends it: the kernel's early allocations
    grow up from its own end, and low RAM stays free. It stays below 3 GiB
    (the end of low RAM: the PCI hole follows) and below initrd_addr_max.
    """
    low = mem.regions[0]
    limit = min(initrd_addr_max + 1, low.end, PCI_HOLE_START, 1 << 32)
    addr = layout.align_down(limit - size, 0x1000)
    if size > limit or addr < layout.align_up(kernel_end, 0x1000):
        room = max(0, limit - layout.align_up(kernel_end, 0x1000))
        raise BootError(
            f"the initrd ({size / MiB:.1f} MiB) does not fit between the kernel's end at {kernel_end:#x} and {limit:#x} "
            f"({room / MiB:.1f} MiB free); give the VM more memory with --mem or use a smaller initrd."
        )
    return addr


# What Linux's initrd code can unpack or mount (init/initramfs.c, lib/decompress.c,
# init/do_mounts_rd.c): cpio archives, their compressed forms, and the filesystem
# images of the old initrd path. Anything else is almost always the wrong file.
_CPIO_MAGICS = (b"070701", b"070702", b"070707", b"\xc7\x71", b"\x71\xc7")  # newc, crc, odc; binary both ways
_COMPRESSED_MAGICS = (
    b"\x1f\x8b",                    # gzip
    b"\x1f\x9e",                    # old gzip
    b"\xfd7zXZ\x00",                 # xz
    b"\x28\xb5\x2f\xfd",            # zstd
    b"\x02\x21\x4c\x18",            # lz4 legacy (what the kernel reads)
    b"\x04\x22\x4d\x18",            # lz4 frame
    b"BZh",                          # bzip2
    b"\x5d\x00\x00",                # lzma
    b"\x89LZO",                      # lzop
)
_FS_MAGICS = ((0, b"-rom1fs-"), (0, b"hsqs"), (0, b"\x45\x3d\xcd\x28"), (1080, b"\x53\xef"))  # romfs, squashfs, cramfs, ext2/3/4
_ZEROS = re.compile(rb"\0*")


def check_initrd(data: bytes, name: str = "the initrd") -> None:
    """Refuse an initrd that Linux could not use, with one sentence naming ``name``.

    A wrong ``-i`` file (a text file, a kernel, a disk image) otherwise
    boots a kernel that panics far later with "VFS: Unable to mount root
    fs", which points nowhere near the mistake. Like the kernel's unpacker,
    this skips the zero padding that may precede an archive.
    """
    zeros = _ZEROS.match(data)
    start = zeros.end() if zeros else 0
    if data.startswith(_CPIO_MAGICS + _COMPRESSED_MAGICS, start):
        return
    if any(data[off:off + len(magic)] == magic for off, magic in _FS_MAGICS):
        return
    what = "is empty" if not data else "is not an initramfs (neither a cpio archive nor a compressed one)"
    raise BootError(f"{name} {what}; build one with `kvmkit initramfs` or pass the right file to -i.")


def load_linux(
    mem: GuestMemory,
    kernel: bytes | KernelImage,
    initrd: bytes | None = None,
    cmdline: str = "",
    *,
    ncpus: int = 1,
    mptable: bool = True,
    gb_pages: bool = False,
    pci_irqs: list[tuple[int, int]] | None = None,
    level_irqs: tuple[int, ...] = (),
    initrd_name: str = "the initrd",
) -> BootInfo:
    """Load ``kernel`` (bzImage or x86-64 ELF), initrd and command line into ``mem``.

    Raises :class:`BootError` with a one-sentence reason for anything that
    would not boot, before the guest ever runs; ``initrd_name`` (the file
    the user gave) is how such a sentence names the initrd.
    """
    k = kernel if isinstance(kernel, KernelImage) else open_kernel(kernel)
    elf = k.elf
    for s in elf.segments:
        _check_fixed_overlap("kernel segment", s.paddr, s.memsz)
    kernel_start = elf.phys_start
    kernel_end = max(elf.phys_end, kernel_start + k.init_size)
    if not mem.is_ram(kernel_start, kernel_end - kernel_start):
        need = -(-kernel_end // MiB)
        raise BootError(
            f"the kernel needs RAM from {kernel_start:#x} to {kernel_end:#x} (init_size {k.init_size / MiB:.1f} MiB) "
            f"but the VM has {mem.size // MiB} MiB; give it at least {need} MiB with --mem."
        )
    if not mem.is_ram(0, layout.BIOS_END):
        raise BootError("the VM has less than 1 MiB of RAM, too little for boot_params and page tables; give it more memory with --mem.")

    raw_cmdline = cmdline.encode("utf-8")
    if b"\0" in raw_cmdline:
        raise BootError("the kernel command line contains a NUL character; remove it.")
    max_cmdline = min(k.cmdline_size, layout.CMDLINE_MAX - 1)
    if len(raw_cmdline) > max_cmdline:
        raise BootError(
            f"the kernel command line is {len(raw_cmdline)} bytes but this kernel accepts at most {max_cmdline}; shorten it."
        )

    initrd_addr = initrd_size = 0
    if initrd is not None:
        initrd_size = len(initrd)
        initrd_addr = place_initrd(mem, initrd_size, kernel_end, k.initrd_addr_max)
        check_initrd(initrd, initrd_name)

    load_elf(mem, k.elf_data, elf)
    mem.write(layout.CMDLINE_ADDR, raw_cmdline + b"\0")
    if initrd:
        mem.write(initrd_addr, initrd)
    mp_addr = write_mptable(mem, ncpus, pci_irqs, level_irqs) if mptable else None
    e820 = e820_map(mem)
    mem.write(layout.BOOT_PARAMS_ADDR, build_boot_params(k.setup_header, e820, layout.CMDLINE_ADDR, initrd_addr, initrd_size))
    gdt_base, gdt_limit = write_gdt(mem)
    cr3, mapped = write_identity_map(mem, gb_pages)
    rip = elf.phys_entry
    if rip >= mapped:
        raise BootError(f"the kernel entry point {rip:#x} is above the {mapped // GiB} GiB identity map; link the kernel lower.")

    placements = [(name, start, size) for name, start, size in layout.FIXED_REGIONS if name != "bios_area"]
    placements += [(f"kernel segment {i}", s.paddr, s.memsz) for i, s in enumerate(elf.segments)]
    if initrd:
        placements.append(("initrd", initrd_addr, initrd_size))
    if mp_addr is not None:
        placements.append(("mptable", mp_addr, layout.BIOS_END - mp_addr))
    placements.sort(key=lambda p: p[1])
    return BootInfo(
        rip=rip,
        rsi=layout.BOOT_PARAMS_ADDR,
        rsp=layout.BOOT_STACK_POINTER,
        rflags=BOOT_RFLAGS,
        cr0=BOOT_CR0,
        cr3=cr3,
        cr4=BOOT_CR4,
        efer=BOOT_EFER,
        gdt_base=gdt_base,
        gdt_limit=gdt_limit,
        idt_base=0,
        idt_limit=0,
        code_selector=layout.BOOT_CS,
        data_selector=layout.BOOT_DS,
        code_segment=BOOT_CODE_SEGMENT,
        data_segment=BOOT_DATA_SEGMENT,
        kernel_format=k.fmt,
        compression=k.compression,
        protocol_version=k.version,
        kernel_version=k.kernel_version,
        kernel_start=kernel_start,
        kernel_end=kernel_end,
        boot_params_addr=layout.BOOT_PARAMS_ADDR,
        cmdline_addr=layout.CMDLINE_ADDR,
        cmdline_size=len(raw_cmdline),
        initrd_addr=initrd_addr,
        initrd_size=initrd_size,
        mptable_addr=mp_addr,
        page_table_addr=cr3,
        identity_map_size=mapped,
        e820=tuple(e820),
        placements=tuple(placements),
    )
