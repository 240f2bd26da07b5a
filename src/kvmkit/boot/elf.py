"""A small, strict ELF64 reader for x86-64 kernels.

It reads just what loading needs (the file header, PT_LOAD program headers
and the entry point) and validates all of it, because the file is untrusted:
a header pointing past the end of the file or a segment outside guest RAM is
a :class:`BootError`, never an IndexError or a write to the wrong place.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from ..errors import BootError, GuestMemoryError
from ..memory import GuestMemory

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
EM_X86_64 = 62
ET_EXEC = 2
ET_DYN = 3
PT_LOAD = 1
PHDR_SIZE = 56
EHDR_SIZE = 64
MAX_PHNUM = 256  # real kernels have a handful; this bounds the work on junk


@dataclass(frozen=True)
class Segment:
    """One PT_LOAD program header."""

    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    flags: int

    @property
    def end(self) -> int:
        """First physical address after the segment (bss included)."""
        return self.paddr + self.memsz


@dataclass(frozen=True)
class ElfImage:
    """A validated x86-64 ELF executable: entry point and loadable segments."""

    entry: int
    type: int
    segments: tuple[Segment, ...]

    @property
    def phys_start(self) -> int:
        return min(s.paddr for s in self.segments)

    @property
    def phys_end(self) -> int:
        return max(s.end for s in self.segments)

    @property
    def phys_entry(self) -> int:
        """The entry as a physical address, where a 64-bit boot jumps with paging identity-mapped.

        Linux links vmlinux with ``ENTRY(phys_startup_64)``, so its e_entry is
        already physical; other kernels may give a virtual entry, which is
        translated through the segment that contains it.
        """
        for s in self.segments:
            if s.paddr <= self.entry < s.paddr + max(s.memsz, 1):
                return self.entry
        for s in self.segments:
            if s.vaddr <= self.entry < s.vaddr + max(s.memsz, 1):
                return self.entry - s.vaddr + s.paddr
        raise BootError(f"the ELF entry point {self.entry:#x} lies in no loadable segment, so the kernel cannot be started; check how it was linked.")


def is_elf(data: bytes) -> bool:
    return data[:4] == ELF_MAGIC


def parse_elf(data: bytes) -> ElfImage:
    """Validate an ELF64 x86-64 executable and return its loadable segments."""
    if len(data) < EHDR_SIZE or data[:4] != ELF_MAGIC:
        raise BootError("the kernel file is not an ELF executable (no ELF header); pass a vmlinux ELF or a bzImage.")
    if data[4] != ELFCLASS64:
        raise BootError("the kernel ELF is 32-bit, but kvmkit boots 64-bit kernels only; build it for x86-64.")
    if data[5] != ELFDATA2LSB:
        raise BootError("the kernel ELF is big-endian, so it is not an x86-64 kernel; build it for x86-64.")
    (e_type, e_machine, _e_version, e_entry, e_phoff, _e_shoff, _e_flags, _e_ehsize,
     e_phentsize, e_phnum) = struct.unpack_from("<HHIQQQIHHH", data, 16)
    if e_machine != EM_X86_64:
        raise BootError(f"the kernel ELF is for machine type {e_machine}, not x86-64 (62); build it for x86-64.")
    if e_type not in (ET_EXEC, ET_DYN):
        raise BootError(f"the kernel ELF has type {e_type}, not an executable; link it as an executable.")
    if e_phnum == 0:
        raise BootError("the kernel ELF has no program headers, so there is nothing to load; link it as an executable.")
    if e_phentsize != PHDR_SIZE or e_phnum > MAX_PHNUM:
        raise BootError(f"the kernel ELF has malformed program headers ({e_phnum} of {e_phentsize} bytes); the file is damaged.")
    if e_phoff + e_phnum * PHDR_SIZE > len(data):
        raise BootError("the kernel ELF program headers run past the end of the file, so it is truncated; rebuild or download it again.")
    segments = []
    for i in range(e_phnum):
        p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _p_align = struct.unpack_from(
            "<IIQQQQQQ", data, e_phoff + i * PHDR_SIZE)
        if p_type != PT_LOAD or p_memsz == 0:
            continue
        if p_filesz > p_memsz:
            raise BootError(f"ELF segment {i} has more file bytes ({p_filesz:#x}) than memory bytes ({p_memsz:#x}); the file is damaged.")
        if p_offset + p_filesz > len(data):
            raise BootError(f"ELF segment {i} runs past the end of the file, so the kernel is truncated; rebuild or download it again.")
        if p_paddr + p_memsz > 1 << 52:
            raise BootError(f"ELF segment {i} at physical address {p_paddr:#x} is beyond any guest memory; link the kernel at a low physical address.")
        segments.append(Segment(p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_flags))
    if not segments:
        raise BootError("the kernel ELF has no loadable (PT_LOAD) segments; link it as an executable.")
    return ElfImage(entry=e_entry, type=e_type, segments=tuple(segments))


def load_elf(mem: GuestMemory, data: bytes, elf: ElfImage | None = None) -> ElfImage:
    """Copy every PT_LOAD segment to its physical address and zero its bss."""
    elf = elf or parse_elf(data)
    for s in elf.segments:
        if not mem.is_ram(s.paddr, s.memsz):
            raise BootError(
                f"the kernel segment at {s.paddr:#x}-{s.end:#x} does not fit in guest RAM ({mem.size >> 20} MiB); give the VM more memory with --mem."
            )
        try:
            mem.write(s.paddr, memoryview(data)[s.offset:s.offset + s.filesz])
            if s.memsz > s.filesz:
                mem.fill(s.paddr + s.filesz, s.memsz - s.filesz, 0)
        except GuestMemoryError as exc:  # is_ram said yes; keep the contract anyway
            raise BootError(f"the kernel segment at {s.paddr:#x} could not be written to guest RAM ({exc}); give the VM more memory with --mem.") from exc
    return elf


_BANNER_RE = re.compile(rb"Linux version [0-9][\x20-\x7e]{0,400}")


def linux_banner(data: bytes) -> str | None:
    """The kernel's linux_banner ("Linux version ..."), found by content.

    The vmlinux inside a bzImage is stripped of symbols, so the string is
    searched for rather than looked up as the ``linux_banner`` symbol.
    """
    m = _BANNER_RE.search(data)
    return m.group(0).decode("ascii").rstrip() if m else None
