"""A small virtio driver for the tests: split rings in a real GuestMemory, and the PCI handshake.

It plays the guest's part the way Linux's virtio_ring/virtio_pci_modern do
(ring layout, avail publishing, used reclaim, status sequence), with the
knobs the tests need to misbehave on purpose.
"""

from __future__ import annotations

import struct

from kvmkit.devices.virtio import (
    ACKNOWLEDGE,
    DRIVER,
    DRIVER_OK,
    FEATURES_OK,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from kvmkit.devices.virtio import pci as vp
from kvmkit.devices.virtio.queue import Virtqueue
from kvmkit.memory import GuestMemory

DESC = struct.Struct("<QIHH")


class Alloc:
    """A bump allocator for guest buffers."""

    def __init__(self, start: int = 0x10_0000, end: int = 16 << 20) -> None:
        self.next = start
        self.end = end

    def __call__(self, size: int, align: int = 16) -> int:
        addr = (self.next + align - 1) & ~(align - 1)
        self.next = addr + size
        assert self.next <= self.end, "test allocator exhausted"
        return addr


class Ring:
    """The driver's side of one split virtqueue."""

    def __init__(self, mem: GuestMemory, base: int, size: int) -> None:
        self.mem = mem
        self.size = size
        self.desc = base
        self.avail = base + 16 * size
        self.used = (self.avail + 6 + 2 * size + 3) & ~3
        self.end = self.used + 6 + 8 * size
        mem.write(base, bytes(self.end - base))
        self.free = list(range(size))
        self.chains: dict[int, list[int]] = {}
        self.avail_idx = 0
        self.last_used = 0

    def start_at(self, idx: int) -> None:
        """Pretend 'idx' buffers went round already (both sides must agree; see Virtqueue.last_avail)."""
        self.avail_idx = self.last_used = idx
        self.mem.write_u16(self.avail + 2, idx)
        self.mem.write_u16(self.used + 2, idx)

    def write_desc(self, table: int, i: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        self.mem.write(table + 16 * i, DESC.pack(addr, length, flags, nxt))

    def add(self, bufs: list[tuple[int, int, bool]], *, publish: bool = True) -> int:
        """A chain of (addr, len, device_writable) buffers; returns its head."""
        idxs = [self.free.pop(0) for _ in bufs]
        for k, ((addr, length, writable), i) in enumerate(zip(bufs, idxs)):
            last = k == len(bufs) - 1
            flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            self.write_desc(self.desc, i, addr, length, flags, 0 if last else idxs[k + 1])
        self.chains[idxs[0]] = idxs
        if publish:
            self.publish(idxs[0])
        return idxs[0]

    def add_indirect(self, table: int, bufs: list[tuple[int, int, bool]], *,
                     prefix: list[tuple[int, int, bool]] = (), publish: bool = True) -> int:
        """Direct ``prefix`` buffers, then one INDIRECT descriptor for a table of ``bufs`` at ``table``."""
        for k, (addr, length, writable) in enumerate(bufs):
            last = k == len(bufs) - 1
            flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            self.write_desc(table, k, addr, length, flags, 0 if last else k + 1)
        idxs = [self.free.pop(0) for _ in range(len(prefix) + 1)]
        for k, (addr, length, writable) in enumerate(prefix):
            flags = (VIRTQ_DESC_F_WRITE if writable else 0) | VIRTQ_DESC_F_NEXT
            self.write_desc(self.desc, idxs[k], addr, length, flags, idxs[k + 1])
        self.write_desc(self.desc, idxs[-1], table, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT)
        self.chains[idxs[0]] = idxs
        if publish:
            self.publish(idxs[0])
        return idxs[0]

    def publish(self, head: int) -> None:
        self.mem.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.avail + 2, self.avail_idx)

    @property
    def used_idx(self) -> int:
        return self.mem.read_u16(self.used + 2)

    @property
    def used_flags(self) -> int:
        return self.mem.read_u16(self.used)

    @property
    def avail_event(self) -> int:
        return self.mem.read_u16(self.used + 4 + 8 * self.size)

    def set_used_event(self, value: int) -> None:
        self.mem.write_u16(self.avail + 4 + 2 * self.size, value & 0xFFFF)

    def set_avail_flags(self, value: int) -> None:
        self.mem.write_u16(self.avail, value)

    def take_used(self) -> list[tuple[int, int]]:
        """New used elements (id, len), reclaiming their descriptors."""
        out = []
        while self.last_used != self.used_idx:
            slot = self.used + 4 + 8 * (self.last_used % self.size)
            ident, length = struct.unpack("<II", self.mem.read(slot, 8))
            out.append((ident, length))
            self.free.extend(self.chains.pop(ident, []))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out


def device_queue(mem: GuestMemory, ring: Ring, *, event_idx: bool = False, indirect: bool = False,
                 max_size: int | None = None) -> Virtqueue:
    """A Virtqueue configured for ``ring`` the way the transport would do it."""
    q = Virtqueue(mem, max_size or ring.size)
    q.size = ring.size
    q.desc_addr, q.avail_addr, q.used_addr = ring.desc, ring.avail, ring.used
    q.event_idx = event_idx
    q.indirect = indirect
    assert q.enable(), q.last_error
    return q


class FakeIrqs:
    """The machine's interrupt side, recorded."""

    def __init__(self, msix: bool = True) -> None:
        self.enabled = msix
        self.sent: list[int] = []
        self.levels: list[bool] = []

    def msix(self, vector: int) -> bool:
        if not self.enabled:
            return False
        self.sent.append(vector)
        return True

    def msix_enabled(self) -> bool:
        return self.enabled

    def intx(self, level: bool) -> None:
        self.levels.append(level)

    @property
    def level(self) -> bool:
        return self.levels[-1] if self.levels else False


class PciDriver:
    """Drives a VirtioPciTransport through its BAR like a guest driver."""

    def __init__(self, transport: vp.VirtioPciTransport, mem: GuestMemory, alloc: Alloc) -> None:
        self.t = transport
        self.mem = mem
        self.alloc = alloc
        self.rings: list[Ring] = []

    def rd(self, off: int, size: int) -> int:
        return self.t.bar.io_read(vp.COMMON_OFFSET + off, size)

    def wr(self, off: int, size: int, value: int) -> None:
        self.t.bar.io_write(vp.COMMON_OFFSET + off, size, value)

    @property
    def status(self) -> int:
        return self.rd(vp.COMMON_DEVICE_STATUS, 1)

    def set_status(self, value: int) -> None:
        self.wr(vp.COMMON_DEVICE_STATUS, 1, value)

    def device_features(self) -> int:
        self.wr(vp.COMMON_DEVICE_FEATURE_SELECT, 4, 0)
        lo = self.rd(vp.COMMON_DEVICE_FEATURE, 4)
        self.wr(vp.COMMON_DEVICE_FEATURE_SELECT, 4, 1)
        return lo | self.rd(vp.COMMON_DEVICE_FEATURE, 4) << 32

    def write_features(self, features: int) -> None:
        for sel in (0, 1):
            self.wr(vp.COMMON_DRIVER_FEATURE_SELECT, 4, sel)
            self.wr(vp.COMMON_DRIVER_FEATURE, 4, (features >> (32 * sel)) & 0xFFFF_FFFF)

    def negotiate(self, features: int | None = None, *, drop: int = 0) -> int:
        self.set_status(0)
        self.set_status(ACKNOWLEDGE)
        self.set_status(ACKNOWLEDGE | DRIVER)
        offered = self.device_features()
        accepted = (offered if features is None else features) & ~drop
        self.write_features(accepted)
        self.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK)
        return accepted

    def setup_queue(self, index: int, size: int | None = None, vector: int = 0xFFFF) -> Ring:
        self.wr(vp.COMMON_QUEUE_SELECT, 2, index)
        max_size = self.rd(vp.COMMON_QUEUE_SIZE, 2)
        size = size or max_size
        if size != max_size:
            self.wr(vp.COMMON_QUEUE_SIZE, 2, size)
        base = self.alloc(16 * size + 6 + 2 * size + 3 + 6 + 8 * size, 4096)
        ring = Ring(self.mem, base, size)
        for off, addr in ((vp.COMMON_QUEUE_DESC, ring.desc), (vp.COMMON_QUEUE_DRIVER, ring.avail),
                          (vp.COMMON_QUEUE_DEVICE, ring.used)):
            self.wr(off, 4, addr & 0xFFFF_FFFF)       # 64-bit fields in two halves, as Linux does
            self.wr(off + 4, 4, addr >> 32)
        self.wr(vp.COMMON_QUEUE_MSIX_VECTOR, 2, vector)
        self.wr(vp.COMMON_QUEUE_ENABLE, 2, 1)
        return ring

    def init(self, features: int | None = None, *, drop: int = 0, sizes: dict[int, int] | None = None,
             vectors: dict[int, int] | None = None, config_vector: int = 0xFFFF) -> list[Ring]:
        """The whole §3.1.1 sequence; returns the rings, all queues enabled."""
        self.negotiate(features, drop=drop)
        assert self.status & FEATURES_OK, "the device refused our features"
        self.wr(vp.COMMON_CONFIG_MSIX_VECTOR, 2, config_vector)
        n = self.rd(vp.COMMON_NUM_QUEUES, 2)
        sizes = sizes or {}
        vectors = vectors or {}
        self.rings = [self.setup_queue(i, sizes.get(i), vectors.get(i, 0xFFFF)) for i in range(n)]
        self.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
        return self.rings

    def kick(self, queue: int) -> None:
        self.t.bar.io_write(self.t.notify_offset(queue), 2, queue)

    def config(self, off: int, size: int) -> int:
        return self.t.bar.io_read(vp.DEVICE_OFFSET + off, size)
