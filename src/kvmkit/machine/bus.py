"""Address-range buses for port I/O and MMIO.

The vCPU loop hands every PIO/MMIO exit to a bus; the bus finds the device
whose window holds the address and passes the offset inside that window.
Guest accesses nobody claims behave as on a PC with nothing decoding them:
reads float to all ones, writes vanish. Both are counted, since a guest
poking at a missing device is worth seeing in ``--stats``.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass, field

from ..devices.base import BusDevice
from ..errors import KvmkitError
from ..profile.exits import format_addr, tally

log = logging.getLogger(__name__)


@dataclass(order=True)
class Mapping:
    base: int
    size: int
    device: BusDevice = field(compare=False)
    name: str = field(default="", compare=False)

    @property
    def end(self) -> int:
        return self.base + self.size


class BusConflict(KvmkitError):
    """Two devices claim overlapping windows (a wiring bug in the machine)."""


class Bus:
    """Maps [base, base+size) windows to devices; lookups are a bisect."""

    def __init__(self, name: str, address_limit: int) -> None:
        self.name = name
        self.address_limit = address_limit
        self._maps: list[Mapping] = []
        self._bases: list[int] = []
        self.unclaimed_reads = 0
        self.unclaimed_writes = 0
        self.device_errors = 0
        self.unclaimed: dict[int, int] = {}
        # addr -> Mapping (or None for unclaimed): guests hit the same few
        # ports millions of times, so skip the bisect after the first.
        self._cache: dict[int, Mapping | None] = {}

    def register(self, base: int, size: int, device: BusDevice, name: str = "") -> None:
        if size <= 0 or base < 0 or base + size > self.address_limit:
            raise BusConflict(f"{self.name}: window {base:#x}+{size:#x} for {name or device!r} is out of range")
        for m in self._maps:
            if base < m.end and m.base < base + size:
                raise BusConflict(f"{self.name}: {name or device!r} at {base:#x}+{size:#x} overlaps {m.name} at {m.base:#x}+{m.size:#x}")
        mapping = Mapping(base, size, device, name or type(device).__name__)
        i = bisect.bisect(self._bases, base)
        self._maps.insert(i, mapping)
        self._bases.insert(i, base)
        self._cache.clear()

    def unregister(self, base: int) -> None:
        """Remove the window starting at ``base`` (a PCI BAR the guest moved or turned off)."""
        i = bisect.bisect_left(self._bases, base)
        if i < len(self._bases) and self._bases[i] == base:
            del self._maps[i]
            del self._bases[i]
            self._cache.clear()

    def mappings(self) -> list[Mapping]:
        return list(self._maps)

    def _lookup(self, addr: int) -> Mapping | None:
        i = bisect.bisect(self._bases, addr) - 1
        m = self._maps[i] if i >= 0 else None
        if m is not None and addr >= m.end:
            m = None
        if len(self._cache) < 65536:
            self._cache[addr] = m
        return m

    def find(self, addr: int, size: int = 1) -> Mapping | None:
        try:
            m = self._cache[addr]
        except KeyError:
            m = self._lookup(addr)
        if m is not None and addr + size <= m.end:
            return m
        return None

    def summary(self) -> str:
        """One line for ``--stats`` when the guest touched unclaimed addresses or a device failed; else ""."""
        if not (self.unclaimed_reads or self.unclaimed_writes or self.device_errors):
            return ""
        top = sorted(self.unclaimed.items(), key=lambda kv: -kv[1])[:5]
        return (f"{self.name}: {self.unclaimed_reads} unclaimed reads, {self.unclaimed_writes} unclaimed writes"
                + (f", {self.device_errors} device errors" if self.device_errors else "")
                + (" (" + ", ".join(f"{format_addr(a)}x{n}" for a, n in top) + ")" if top else ""))

    def _count_unclaimed(self, addr: int) -> None:
        tally(self.unclaimed, addr)  # bounded: a guest sweeping addresses cannot grow it

    def resolve(self, addr: int) -> tuple[BusDevice, int] | None:
        """(device, offset) for a one-byte access at ``addr``, for callers that cache dispatch."""
        m = self.find(addr, 1)
        return (m.device, addr - m.base) if m is not None else None

    def device_failed(self, addr: int, what: str) -> None:
        self.device_errors += 1
        log.exception("%s: device %s at %#x raised", self.name, what, addr)

    def read(self, addr: int, size: int) -> int:
        """A guest read; never raises, whatever the device or address."""
        m = self.find(addr, size)
        if m is None:
            self.unclaimed_reads += 1
            self._count_unclaimed(addr)
            return (1 << (8 * size)) - 1
        try:
            return m.device.io_read(addr - m.base, size) & ((1 << (8 * size)) - 1)
        except Exception:  # a model bug must not take the VMM down with it
            self.device_errors += 1
            log.exception("%s: %s read at %#x size %d raised", self.name, m.name, addr, size)
            return (1 << (8 * size)) - 1

    def write(self, addr: int, size: int, value: int) -> None:
        """A guest write; never raises, whatever the device or address."""
        m = self.find(addr, size)
        if m is None:
            self.unclaimed_writes += 1
            self._count_unclaimed(addr)
            return
        try:
            m.device.io_write(addr - m.base, size, value & ((1 << (8 * size)) - 1))
        except Exception:
            self.device_errors += 1
            log.exception("%s: %s write at %#x size %d raised", self.name, m.name, addr, size)


class OffsetWindow:
    """One register of a device that spans several separate ports, at a fixed offset inside it
    (the i8042's data port 0x60 and command port 0x64 are one device)."""

    def __init__(self, device: BusDevice, offset: int) -> None:
        self.device = device
        self.offset = offset

    def io_read(self, offset: int, size: int) -> int:
        return self.device.io_read(self.offset + offset, size)

    def io_write(self, offset: int, size: int, value: int) -> None:
        self.device.io_write(self.offset + offset, size, value)
