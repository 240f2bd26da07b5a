"""The virtio-pci modern transport's registers, through its BAR, with a recording device."""

from __future__ import annotations

import struct
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmkit.devices.virtio import (
    ACKNOWLEDGE,
    DEVICE_NEEDS_RESET,
    DRIVER,
    DRIVER_OK,
    FEATURES_OK,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VIRTIO_MSI_NO_VECTOR,
)
from kvmkit.devices.virtio.device import VirtioDeviceBase
from kvmkit.devices.virtio import pci as vp
from kvmkit.devices.virtio.rng import VirtioRng
from kvmkit.memory import GuestMemory

from virtio_driver import Alloc, FakeIrqs, PciDriver

V1 = 1 << VIRTIO_F_VERSION_1


class FakeDevice(VirtioDeviceBase):
    device_type = 42
    num_queues = 3
    queue_max_size = 64
    features = (1 << 0) | (1 << 5) | (1 << VIRTIO_F_RING_PACKED)  # a ring bit the transport must not pass on

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple] = []
        self.config = bytearray(b"\x11\x22\x33\x44\x55\x66\x77\x88")

    def config_bytes(self) -> bytes:
        return bytes(self.config)

    def _activated(self) -> None:
        self.log.append(("activate", self.driver_features, len(self.queues)))

    def _reset(self) -> None:
        self.log.append(("reset",))

    def _notify(self, index: int) -> None:
        self.log.append(("notify", index))


@pytest.fixture
def mem() -> GuestMemory:
    return GuestMemory(16 << 20)


def make(mem: GuestMemory, *, msix: bool = True, vectors: int = 4, device=None):
    dev = device or FakeDevice()
    irqs = FakeIrqs(msix)
    t = vp.VirtioPciTransport(dev, mem, msix_vectors=vectors, interrupts=irqs)
    return dev, irqs, t, PciDriver(t, mem, Alloc())


# --- what the PCI model places ------------------------------------------------------------
def test_capability_bodies(mem: GuestMemory) -> None:
    _, _, t, _ = make(mem)
    caps = {c.cfg_type: c.body for c in t.capabilities}
    assert [c.cfg_type for c in t.capabilities] == [1, 2, 3, 4, 5]
    for cfg_type, body in caps.items():
        cap_len, ctype, bar, ident = body[:4]
        assert cap_len == len(body) + 2 and ctype == cfg_type and ident == 0 and body[4:6] == b"\0\0"
        assert bar == (t.bar_index if cfg_type != 5 else 0)
    def region(cfg_type):
        return struct.unpack_from("<II", caps[cfg_type], 6)
    assert region(1) == (vp.COMMON_OFFSET, 0x3C)
    assert region(3) == (vp.ISR_OFFSET, 1)
    assert region(4) == (vp.DEVICE_OFFSET, 8)
    notify_off, notify_len = region(2)
    (multiplier,) = struct.unpack_from("<I", caps[2], 14)
    assert multiplier == 4 and notify_len == 3 * 4
    assert [t.notify_offset(i) for i in range(3)] == [notify_off + 4 * i for i in range(3)]
    for off, length in (region(1), region(2), region(3), region(4)):
        assert off + length <= t.bar_size
    assert t.bar_size & (t.bar_size - 1) == 0 and t.bar_index == 4
    assert t.identity.vendor_id == 0x1AF4 and t.identity.device_id == 0x1040 + 42
    assert t.identity.revision >= 1 and t.identity.subsystem_id >= 0x40


def test_no_device_cfg_capability_without_config(mem: GuestMemory) -> None:
    _, _, t, _ = make(mem, device=VirtioRng(bytes))
    assert [c.cfg_type for c in t.capabilities] == [1, 2, 3, 5]


# --- feature negotiation and status -------------------------------------------------------
def test_features_offered(mem: GuestMemory) -> None:
    _, _, t, d = make(mem)
    offered = d.device_features()
    assert offered == (1 << 0) | (1 << 5) | V1 | (1 << VIRTIO_F_EVENT_IDX) | (1 << VIRTIO_F_INDIRECT_DESC)
    d.wr(vp.COMMON_DEVICE_FEATURE_SELECT, 4, 7)
    assert d.rd(vp.COMMON_DEVICE_FEATURE, 4) == 0


def test_features_ok_and_driver_ok(mem: GuestMemory) -> None:
    dev, _, t, d = make(mem)
    accepted = d.negotiate(V1 | 1)
    assert d.status == ACKNOWLEDGE | DRIVER | FEATURES_OK
    d.wr(vp.COMMON_DRIVER_FEATURE_SELECT, 4, 0)
    assert d.rd(vp.COMMON_DRIVER_FEATURE, 4) == 1
    d.write_features(V1 | 0x20)                 # ignored once FEATURES_OK is set
    assert t.driver_features == accepted
    d.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
    assert t.driver_ok and dev.log == [("reset",), ("activate", V1 | 1, 3)]


@pytest.mark.parametrize("features", [1, V1 | (1 << 3), V1 | (1 << VIRTIO_F_RING_PACKED)])
def test_features_ok_refused(mem: GuestMemory, features: int) -> None:
    """Not VERSION_1, or a bit that was not offered: FEATURES_OK does not stick (§3.1.1)."""
    dev, _, t, d = make(mem)
    d.negotiate(features)
    assert not d.status & FEATURES_OK and t.feature_refusals == 1
    d.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
    assert not d.status & DRIVER_OK and not t.driver_ok
    assert ("activate", features, 3) not in dev.log


def test_reset_returns_everything_to_power_on(mem: GuestMemory) -> None:
    dev, irqs, t, d = make(mem, msix=False)
    d.init(config_vector=1)
    t.used(0)
    assert t.isr == 1 and irqs.level
    d.set_status(0)
    assert d.status == 0 and not t.driver_ok and not irqs.level and t.isr == 0
    assert dev.log[-1] == ("reset",) and not dev.active
    assert d.rd(vp.COMMON_CONFIG_MSIX_VECTOR, 2) == VIRTIO_MSI_NO_VECTOR
    for i in range(3):
        d.wr(vp.COMMON_QUEUE_SELECT, 2, i)
        assert d.rd(vp.COMMON_QUEUE_ENABLE, 2) == 0
        assert d.rd(vp.COMMON_QUEUE_SIZE, 2) == 64
        assert d.rd(vp.COMMON_QUEUE_DESC, 8) == 0
        assert d.rd(vp.COMMON_QUEUE_MSIX_VECTOR, 2) == VIRTIO_MSI_NO_VECTOR
    assert d.rd(vp.COMMON_DRIVER_FEATURE, 4) == 0
    d.init()                                     # and it comes up again
    assert t.driver_ok
    t.reset()                                    # the machine's reset: same effect
    assert d.status == 0 and not t.queues[0].ready and t.queues[0]._desc is None


# --- queue configuration --------------------------------------------------------------------
def test_queue_registers(mem: GuestMemory) -> None:
    _, _, t, d = make(mem)
    d.negotiate()
    assert d.rd(vp.COMMON_NUM_QUEUES, 2) == 3
    d.wr(vp.COMMON_QUEUE_SELECT, 2, 2)
    assert d.rd(vp.COMMON_QUEUE_SIZE, 2) == 64 and d.rd(vp.COMMON_QUEUE_NOTIFY_OFF, 2) == 2
    d.wr(vp.COMMON_QUEUE_SIZE, 2, 16)
    d.wr(vp.COMMON_QUEUE_DESC, 4, 0x1234_5000)   # low half
    d.wr(vp.COMMON_QUEUE_DESC + 4, 4, 0x0)       # high half
    d.wr(vp.COMMON_QUEUE_DRIVER, 8, 0x1234_6000)  # one 64-bit write
    d.wr(vp.COMMON_QUEUE_DEVICE + 4, 4, 0xAB)    # high first, then low
    d.wr(vp.COMMON_QUEUE_DEVICE, 4, 0x7000)
    assert d.rd(vp.COMMON_QUEUE_DESC, 4) == 0x1234_5000 and d.rd(vp.COMMON_QUEUE_DESC + 4, 4) == 0
    assert d.rd(vp.COMMON_QUEUE_DRIVER, 8) == 0x1234_6000
    assert d.rd(vp.COMMON_QUEUE_DEVICE, 8) == 0xAB_0000_7000
    q = t.queues[2]
    assert (q.size, q.desc_addr, q.avail_addr, q.used_addr) == (16, 0x1234_5000, 0x1234_6000, 0xAB_0000_7000)
    d.wr(vp.COMMON_QUEUE_SELECT, 2, 3)           # no such queue
    assert d.rd(vp.COMMON_QUEUE_SIZE, 2) == 0 and d.rd(vp.COMMON_QUEUE_ENABLE, 2) == 0
    d.wr(vp.COMMON_QUEUE_SIZE, 2, 8)             # ignored, no exception


def test_queue_enable_uses_negotiated_ring_features(mem: GuestMemory) -> None:
    _, _, t, d = make(mem)
    d.init(drop=1 << VIRTIO_F_INDIRECT_DESC)
    q = t.queues[0]
    assert q.ready and q.event_idx and not q.indirect
    d.wr(vp.COMMON_QUEUE_SELECT, 2, 0)
    assert d.rd(vp.COMMON_QUEUE_ENABLE, 2) == 1
    old = q.desc_addr
    d.wr(vp.COMMON_QUEUE_DESC, 8, 0x9000)        # a live queue's layout does not move
    assert q.desc_addr == old


def test_bad_queue_layout_sets_needs_reset(mem: GuestMemory) -> None:
    _, irqs, t, d = make(mem)
    d.negotiate()
    d.wr(vp.COMMON_CONFIG_MSIX_VECTOR, 2, 3)
    d.wr(vp.COMMON_QUEUE_SELECT, 2, 0)
    d.wr(vp.COMMON_QUEUE_SIZE, 2, 5)             # not a power of two
    d.wr(vp.COMMON_QUEUE_ENABLE, 2, 1)
    assert d.status & DEVICE_NEEDS_RESET and d.rd(vp.COMMON_QUEUE_ENABLE, 2) == 0
    assert irqs.sent == []                       # not DRIVER_OK yet: no notification...
    d.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
    assert irqs.sent == [3]                      # ...until the driver is listening
    d.set_status(0)
    assert d.status == 0


def test_broken_ring_at_run_time(mem: GuestMemory) -> None:
    _, irqs, t, d = make(mem)
    rings = d.init(config_vector=2)
    mem.write_u16(rings[1].avail + 2, 1000)      # avail.idx far ahead
    t.queues[1].pop()
    assert d.status & DEVICE_NEEDS_RESET and irqs.sent == [2] and "ahead" in t.last_error
    assert t.isr & vp.ISR_CONFIG


# --- notifications and interrupts ----------------------------------------------------------------
def test_notify_region_and_direct_notify(mem: GuestMemory) -> None:
    dev, _, t, d = make(mem)
    d.kick(1)                                    # before DRIVER_OK: dropped
    d.init()
    d.kick(1)
    t.queue_notify(2)                            # the ioeventfd path
    t.queue_notify(3)                            # out of range: dropped
    t.queue_notify(-1)
    assert [e for e in dev.log if e[0] == "notify"] == [("notify", 1), ("notify", 2)]
    assert t.notifies == [0, 1, 1]


def test_msix_vectors_and_no_vector(mem: GuestMemory) -> None:
    _, irqs, t, d = make(mem, vectors=2)
    d.init(vectors={0: 1, 1: 2, 2: 0}, config_vector=0)
    d.wr(vp.COMMON_QUEUE_SELECT, 2, 0)
    assert d.rd(vp.COMMON_QUEUE_MSIX_VECTOR, 2) == 1
    d.wr(vp.COMMON_QUEUE_SELECT, 2, 1)
    assert d.rd(vp.COMMON_QUEUE_MSIX_VECTOR, 2) == VIRTIO_MSI_NO_VECTOR   # 2 >= 2 vectors: mapping failed
    t.used(0)
    t.used(1)                                    # NO_VECTOR with MSI-X on: nothing at all
    t.used(2)
    assert irqs.sent == [1, 0] and irqs.levels == [] and t.isr == 0
    t.config_changed()
    assert irqs.sent == [1, 0, 0] and t.isr == vp.ISR_CONFIG


def test_intx_when_msix_is_disabled(mem: GuestMemory) -> None:
    _, irqs, t, d = make(mem, msix=False)
    d.init(vectors={0: 1})
    t.used(0)
    t.used(0)
    assert irqs.levels == [True] and t.isr == vp.ISR_QUEUE
    t.config_changed()
    assert t.isr == vp.ISR_QUEUE | vp.ISR_CONFIG and irqs.levels == [True]
    assert t.bar.io_read(vp.ISR_OFFSET, 1) == 3  # read clears and lowers the line
    assert irqs.levels == [True, False] and t.isr == 0
    assert t.bar.io_read(vp.ISR_OFFSET, 1) == 0 and irqs.levels == [True, False]


def test_config_space_and_generation(mem: GuestMemory) -> None:
    dev, _, t, d = make(mem)
    d.init()
    assert d.config(0, 4) == 0x44332211 and d.config(6, 2) == 0x8877 and d.config(7, 2) == 0x88
    assert d.config(8, 4) == 0 and d.config(0x800, 4) == 0
    gen = d.rd(vp.COMMON_CONFIG_GENERATION, 1)
    dev.config[0] = 0x99
    t.config_changed()
    assert d.config(0, 1) == 0x99
    assert d.rd(vp.COMMON_CONFIG_GENERATION, 1) != gen


def test_pci_cfg_window(mem: GuestMemory) -> None:
    _, _, t, d = make(mem)
    w = t.pci_cfg
    w.io_write(4, 1, t.bar_index)
    w.io_write(8, 4, vp.COMMON_OFFSET + vp.COMMON_NUM_QUEUES)
    w.io_write(12, 4, 2)
    assert w.io_read(16, 4) & 0xFFFF == 3
    w.io_write(8, 4, vp.COMMON_OFFSET + vp.COMMON_DEVICE_STATUS)
    w.io_write(12, 4, 1)
    w.io_write(16, 1, ACKNOWLEDGE)
    assert d.status == ACKNOWLEDGE
    assert w.io_read(12, 4) == 1 and w.io_read(2, 1) == 20 and w.io_read(3, 1) == vp.VIRTIO_PCI_CAP_PCI_CFG
    w.io_write(12, 4, 3)                         # not 1, 2 or 4: no access
    w.io_write(16, 4, 0)
    assert d.status == ACKNOWLEDGE
    w.io_write(4, 1, 0)                          # another BAR: no access
    w.io_write(12, 4, 1)
    w.io_write(16, 1, 0)
    assert d.status == ACKNOWLEDGE


def test_reset_waits_for_the_device_worker(mem: GuestMemory) -> None:
    """Status 0 from a vCPU while a worker is inside the device: reset happens after, never during."""
    inside = threading.Event()
    release = threading.Event()
    order: list[str] = []

    class Slow(FakeDevice):
        def _notify(self, index: int) -> None:
            inside.set()
            release.wait(5)
            order.append("work done")

        def _reset(self) -> None:
            order.append("reset")

    dev, _, t, d = make(mem, device=Slow())
    d.init()
    order.clear()
    worker = threading.Thread(target=t.queue_notify, args=(0,))
    worker.start()
    assert inside.wait(5)
    resetter = threading.Thread(target=d.set_status, args=(0,))
    resetter.start()
    resetter.join(0.1)
    assert resetter.is_alive()                   # waiting for the worker
    release.set()
    worker.join(5)
    resetter.join(5)
    assert order == ["work done", "reset"] and d.status == 0


# --- any register sequence: never an exception ------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.sampled_from([0x0, 0x1000, 0x2000, 0x3000, 0x3FF0, 0x5000]),
                          st.integers(0, 0x40), st.sampled_from([1, 2, 3, 4, 8]), st.integers(0, (1 << 64) - 1)),
                max_size=60),
       st.booleans())
def test_register_fuzz(ops, msix: bool) -> None:
    mem = FUZZ_MEM
    dev, irqs, t, d = make(mem, msix=msix)
    for is_write, region, off, size, value in ops:
        if is_write:
            t.bar.io_write(region + off, size, value)
        else:
            got = t.bar.io_read(region + off, size)
            assert 0 <= got < (1 << (8 * size)) if size in (1, 2, 4, 8) else got == 0
        t.pci_cfg.io_write(off % 24, size, value)
        t.pci_cfg.io_read(off % 24, size)
    assert d.status & ~0xFF == 0


FUZZ_MEM = GuestMemory(16 << 20)
