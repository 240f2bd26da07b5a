"""Guest physical memory: mmap-backed RAM regions and bounds-checked access.

Loaders and devices reach guest RAM only through :class:`GuestMemory`, so a
guest-controlled address (a descriptor pointer, a boot header field) can
never read or write outside the mappings: every access is checked against
the region it starts in and must not run past its end.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from dataclasses import dataclass, field

from .errors import GuestMemoryError

MiB = 1 << 20
GiB = 1 << 30

# The 32-bit PCI hole: MMIO windows (IOAPIC 0xfec00000, local APIC
# 0xfee00000, BIOS flash) live between 3 GiB and 4 GiB, so RAM that does not
# fit below it continues at 4 GiB.
PCI_HOLE_START = 0xC000_0000
HIGH_RAM_START = 1 << 32


@dataclass
class MemoryRegion:
    """One contiguous run of guest RAM backed by an anonymous mapping."""

    slot: int
    gpa: int
    size: int
    mm: mmap.mmap = field(repr=False)
    backing_fd: int | None = field(default=None, repr=False)  # a snapshot's memory file, mapped copy-on-write

    @property
    def end(self) -> int:
        return self.gpa + self.size

    @property
    def host_address(self) -> int:
        """Host virtual address of the mapping, for KVM_SET_USER_MEMORY_REGION."""
        buf = (ctypes.c_char * self.size).from_buffer(self.mm)
        addr = ctypes.addressof(buf)
        del buf
        return addr

    def contains(self, gpa: int, size: int = 1) -> bool:
        return self.gpa <= gpa and gpa + size <= self.end


def ram_layout(mem_size: int) -> list[tuple[int, int]]:
    """Split ``mem_size`` bytes of RAM around the PCI hole: [(gpa, size), ...]."""
    if mem_size <= 0:
        raise GuestMemoryError("memory size must be positive; pass --mem with a size such as 256M")
    low = min(mem_size, PCI_HOLE_START)
    layout = [(0, low)]
    if mem_size > low:
        layout.append((HIGH_RAM_START, mem_size - low))
    return layout


class GuestMemory:
    """All guest RAM regions, with checked read/write by guest physical address."""

    def __init__(self, mem_size: int, backing: list[int] | None = None) -> None:
        """``backing``: one open file per region (a snapshot's memory), mapped MAP_PRIVATE: the guest
        sees the file's bytes, its writes stay in this process, the file never changes, and mapping
        costs the same for any size (pages are read from the file when first touched)."""
        self.size = mem_size
        self.regions: list[MemoryRegion] = []
        layout = ram_layout(mem_size)
        if backing is not None and len(backing) != len(layout):
            raise GuestMemoryError(f"{len(backing)} memory files for {len(layout)} RAM regions")
        for slot, (gpa, size) in enumerate(layout):
            fd = backing[slot] if backing is not None else None
            if fd is None:
                mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0))
            else:
                mm = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_NORESERVE", 0),
                               prot=mmap.PROT_READ | mmap.PROT_WRITE)
            self.regions.append(MemoryRegion(slot, gpa, size, mm, fd))

    def close(self) -> None:
        for region in self.regions:
            try:
                region.mm.close()
            except BufferError:
                # A ctypes view still exports the buffer; the mapping goes
                # with the process.
                pass
        self.regions = []

    def _region(self, gpa: int, size: int) -> MemoryRegion:
        if size < 0 or gpa < 0:
            raise GuestMemoryError(f"invalid guest memory access at {gpa:#x} size {size}")
        for region in self.regions:
            if region.contains(gpa, size):
                return region
        raise GuestMemoryError(f"guest physical range {gpa:#x}+{size:#x} is not RAM")

    def is_ram(self, gpa: int, size: int = 1) -> bool:
        return any(r.contains(gpa, size) for r in self.regions) if size >= 0 and gpa >= 0 else False

    def read(self, gpa: int, size: int) -> bytes:
        region = self._region(gpa, size)
        off = gpa - region.gpa
        return region.mm[off:off + size]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        region = self._region(gpa, len(data))
        off = gpa - region.gpa
        region.mm[off:off + len(data)] = bytes(data)

    def read_available(self, gpa: int, size: int) -> bytes:
        """The bytes at ``gpa`` as far as RAM goes, up to ``size``: for reading guest code or
        structures whose end is not known, where a short read is an answer, not an error."""
        if gpa < 0 or size <= 0:
            return b""
        for region in self.regions:
            if region.contains(gpa):
                off = gpa - region.gpa
                return region.mm[off:off + min(size, region.end - gpa)]
        return b""

    def view(self, gpa: int, size: int) -> memoryview:
        """A zero-copy view, for devices that share a page with the guest."""
        region = self._region(gpa, size)
        off = gpa - region.gpa
        return memoryview(region.mm)[off:off + size]

    def fill(self, gpa: int, size: int, byte: int = 0) -> None:
        self.write(gpa, bytes([byte]) * size)

    def read_u8(self, gpa: int) -> int:
        return self.read(gpa, 1)[0]

    def read_u16(self, gpa: int) -> int:
        return struct.unpack("<H", self.read(gpa, 2))[0]

    def read_u32(self, gpa: int) -> int:
        return struct.unpack("<I", self.read(gpa, 4))[0]

    def read_u64(self, gpa: int) -> int:
        return struct.unpack("<Q", self.read(gpa, 8))[0]

    def write_u8(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<B", value & 0xFF))

    def write_u16(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<H", value & 0xFFFF))

    def write_u32(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<I", value & 0xFFFF_FFFF))

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<Q", value & 0xFFFF_FFFF_FFFF_FFFF))

    def read_cstring(self, gpa: int, limit: int = 4096) -> bytes:
        """Read a NUL-terminated string of at most ``limit`` bytes."""
        out = bytearray()
        while len(out) < limit and self.is_ram(gpa + len(out)):
            b = self.read_u8(gpa + len(out))
            if b == 0:
                break
            out.append(b)
        return bytes(out)
