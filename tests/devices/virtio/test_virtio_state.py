"""Snapshot state of virtqueues, the virtio-pci transport and the virtio devices (see tests/devices/test_device_state.py).

A snapshot copies guest RAM, so each restored device here gets its own copy
of the original's RAM at the moment of the save; the rings, buffers and
the driver's side of everything live there. The "driver" posts buffers
from RAM alone (``post``), so that it acts identically on every copy.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmkit.devices.state import StateError
from kvmkit.devices.virtio import FEATURES_OK, VIRTIO_F_EVENT_IDX, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from kvmkit.devices.virtio import pci as vp
from kvmkit.devices.virtio.blk import VirtioBlk
from kvmkit.devices.virtio.console import RECEIVEQ, TRANSMITQ, VirtioConsole
from kvmkit.devices.virtio.queue import Virtqueue
from kvmkit.devices.virtio.rng import VirtioRng
from kvmkit.memory import GuestMemory

from virtio_driver import Alloc, PciDriver, Ring, device_queue

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from state_checks import as_json, assert_all_damage_refused, assert_refused, lockstep  # noqa: E402

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
RAM = 2 << 20
BUFS = 0x18_0000          # where posted buffers live (rings are allocated from 1 MiB up)


def ram_copy(mem: GuestMemory) -> GuestMemory:
    new = GuestMemory(mem.size)
    new.write(0, mem.read(0, mem.size))
    return new


def post(mem: GuestMemory, ring: Ring, bufs: list[tuple[int, int, bool]]) -> None:
    """Publish a chain of (addr, len, device-writable) buffers, driver state read from RAM: four descriptors per slot."""
    idx = mem.read_u16(ring.avail + 2)
    first = (idx * 4) % ring.size
    for k, (addr, length, writable) in enumerate(bufs):
        last = k == len(bufs) - 1
        flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
        mem.write(ring.desc + 16 * (first + k), struct.pack("<QIHH", addr, length, flags, 0 if last else first + k + 1))
    mem.write_u16(ring.avail + 4 + 2 * (idx % ring.size), first)
    mem.write_u16(ring.avail + 2, (idx + 1) & 0xFFFF)


def used_idx(rig: dict) -> int:
    """used.idx in this rig's RAM (a Ring object reads the RAM it was made with, the original's)."""
    return rig["mem"].read_u16(rig["ring"].used + 2)


# === Virtqueue =========================================================================

vq_ops = st.one_of(
    st.tuples(st.just("post"), st.lists(st.tuples(st.integers(0, 7), st.integers(0, 40), st.booleans()),
                                        min_size=1, max_size=3)),
    st.tuples(st.just("post"), st.lists(st.tuples(st.integers(0, 7), st.integers(0, 40), st.booleans()),
                                        min_size=1, max_size=3)),
    st.tuples(st.just("pop")), st.tuples(st.just("pop")),
    st.tuples(st.just("push"), st.integers(-1, 9), st.integers(0, 100)),
    st.tuples(st.just("push"), st.integers(-1, 9), st.integers(0, 100)),
    st.tuples(st.just("should_notify")),
    st.tuples(st.just("disable")), st.tuples(st.just("enable")),
    st.tuples(st.just("used_event"), st.integers(0, 12)),
    st.tuples(st.just("avail_flags"), st.integers(0, 1)),
    st.tuples(st.just("avail_idx"), st.sampled_from([1, 2, 40])),       # 40: ahead of the ring, breaks it
    st.tuples(st.just("avail_entry"), st.integers(0, 7), st.sampled_from([0, 4, 9])),
)


def vq_apply(rig: tuple, op: tuple) -> object:
    q, mem, ring = rig
    kind, result = op[0], None
    if kind == "post":
        post(mem, ring, [(BUFS + 0x100 * i, n, w) for i, n, w in op[1]])
    elif kind == "pop":
        chain = q.pop()
        result = None if chain is None else (chain.head, chain.error, [bytes(v) for v in chain.readable],
                                             [len(v) for v in chain.writable])
    elif kind == "push":
        q.push(op[1], op[2])
    elif kind == "should_notify":
        result = q.should_notify()
    elif kind == "disable":
        q.disable_notifications()
    elif kind == "enable":
        result = q.enable_notifications()
    elif kind == "used_event":
        mem.write_u16(ring.avail + 4 + 2 * ring.size, op[1])
    elif kind == "avail_flags":
        mem.write_u16(ring.avail, op[1])
    elif kind == "avail_idx":
        mem.write_u16(ring.avail + 2, (mem.read_u16(ring.avail + 2) + op[1]) & 0xFFFF)
    else:
        mem.write_u16(ring.avail + 4 + 2 * op[1], op[2])
    return result, q.available(), q.ready, q.broken, mem.read(ring.desc, ring.end - ring.desc)


def vq_rig(mem: GuestMemory, ring: Ring, log: list, *, event_idx: bool, indirect: bool) -> tuple:
    q = device_queue(mem, ring, event_idx=event_idx, indirect=indirect, max_size=16)
    q.on_broken = lambda why: log.append(("broken", why))
    return q, mem, ring


@FUZZ
@given(event_idx=st.booleans(), indirect=st.booleans(), ops=st.lists(vq_ops, min_size=10, max_size=50))
def test_virtqueue_restored_behaves_the_same(event_idx: bool, indirect: bool, ops: list) -> None:
    mem = GuestMemory(RAM)
    ring = Ring(mem, 0x10_0000, 8)
    log: list = []
    a = vq_rig(mem, ring, log, event_idx=event_idx, indirect=indirect)

    def restore(state: dict) -> tuple[tuple, list]:
        copy_log: list = []
        b_mem = ram_copy(mem)
        q = Virtqueue(b_mem, 16)
        q.on_broken = lambda why: copy_log.append(("broken", why))
        q.load_state(state)
        return (q, b_mem, ring), copy_log

    lockstep(a, ops, vq_apply, log, lambda rig: rig[0].save_state(), restore, every=2)


def test_virtqueue_indices_and_suppression_survive() -> None:
    mem = GuestMemory(RAM)
    ring = Ring(mem, 0x10_0000, 8)
    q = device_queue(mem, ring, event_idx=True, max_size=16)
    for n in (3, 4, 5):
        post(mem, ring, [(BUFS, n, True)])
    first = q.pop()
    assert first is not None
    q.push(first, 2)
    q.disable_notifications()
    state = as_json(q.save_state())
    assert state["last_avail_idx"] == 1 and state["used_idx"] == 1 and state["notifications_suppressed"]
    b_mem = ram_copy(mem)
    r = Virtqueue(b_mem, 16)
    r.load_state(state)
    assert b_mem.read(0, RAM) == mem.read(0, RAM)              # loading wrote nothing to RAM
    chain = r.pop()
    assert chain is not None and chain.write_len == 4 and r.available() == 1
    assert b_mem.read_u16(ring.used + 4 + 8 * ring.size) == 1   # suppressed: avail_event left behind
    assert r.enable_notifications() is True                     # the third buffer is still there


def test_virtqueue_damaged_states_are_refused() -> None:
    mem = GuestMemory(RAM)
    ring = Ring(mem, 0x10_0000, 8)
    q = device_queue(mem, ring, max_size=16)
    state = as_json(q.save_state())
    target = Virtqueue(mem, 16)
    observe = lambda: (target.save_state(), mem.read(ring.desc, ring.end - ring.desc))  # noqa: E731
    assert assert_all_damage_refused(target.load_state, state, observe) > 80
    for field, value in [("size", 12),                 # ready with a size that is not a power of two
                         ("size", 32),                 # above max_size
                         ("desc_addr", 0x10_0008),     # misaligned
                         ("used_addr", RAM),           # past the end of RAM
                         ("broken", True)]:            # ready and broken
        assert_refused(target.load_state, {**state, field: value}, observe)
    target.load_state({**state, "ready": False, "size": 12, "desc_addr": 1 << 60})  # not ready: the driver's values


# === the transport (with virtio-rng) =====================================================

class Irqs:
    """The machine's interrupt side, one log for everything the transport asks."""

    def __init__(self, log: list, enabled: bool = True) -> None:
        self.log, self.enabled = log, enabled

    def msix(self, vector: int) -> bool:
        self.log.append(("msix", vector, self.enabled))
        return self.enabled

    def msix_enabled(self) -> bool:
        return self.enabled

    def intx(self, level: bool) -> None:
        self.log.append(("intx", level))


def entropy(n: int) -> bytes:
    return bytes((7 * i + n) & 0xFF for i in range(n))


class Rng(VirtioRng):
    """virtio-rng with a configuration space, so that config_generation has something to cover."""

    def config_bytes(self) -> bytes:
        return b"\x11\x22\x33\x44\x55\x66\x77\x88"


C = vp.COMMON_OFFSET
_COMMON = [(vp.COMMON_DEVICE_FEATURE_SELECT, 4, [0, 1, 2]), (vp.COMMON_DRIVER_FEATURE_SELECT, 4, [0, 1, 5]),
           (vp.COMMON_DRIVER_FEATURE, 4, [0, 1, 1 << VIRTIO_F_EVENT_IDX, 0xFFFF_FFFF]),
           (vp.COMMON_CONFIG_MSIX_VECTOR, 2, [0, 1, 2, 0xFFFF]), (vp.COMMON_DEVICE_STATUS, 1, [0, 1, 3, 11, 15, 0x80]),
           (vp.COMMON_QUEUE_SELECT, 2, [0, 0, 1]), (vp.COMMON_QUEUE_SIZE, 2, [4, 8, 6]),
           (vp.COMMON_QUEUE_MSIX_VECTOR, 2, [0, 1, 7, 0xFFFF]), (vp.COMMON_QUEUE_ENABLE, 2, [1, 0]),
           (vp.COMMON_QUEUE_DESC, 8, [0x10_0000, 0x10_0008]), (vp.COMMON_QUEUE_DRIVER, 4, [0x10_0080, 0]),
           (vp.COMMON_QUEUE_DEVICE, 8, [0x10_00A0, 0x10_0100])]
transport_ops = st.one_of(
    st.sampled_from(_COMMON).flatmap(lambda f: st.tuples(st.just("wr"), st.just(f[0]), st.just(f[1]),
                                                         st.one_of(st.sampled_from(f[2]), st.integers(0, 0xFFFF)))),
    st.tuples(st.just("rd"), st.integers(0, 0x3F), st.sampled_from([1, 2, 4])),
    st.tuples(st.just("isr")), st.tuples(st.just("isr")),
    st.tuples(st.just("cfg"), st.integers(0, 8), st.sampled_from([1, 4])),
    st.tuples(st.just("post"), st.integers(0, 64)), st.tuples(st.just("post"), st.integers(1, 64)),
    st.tuples(st.just("kick"), st.integers(0, 1)), st.tuples(st.just("kick"), st.just(0)),
    st.tuples(st.just("used"), st.integers(0, 1)),
    st.tuples(st.just("config_changed")),
    st.tuples(st.just("msix"), st.booleans()),
    st.tuples(st.just("pci_cfg_w"), st.sampled_from([4, 8, 12, 16]), st.sampled_from([1, 4]),
              st.sampled_from([vp.DEFAULT_BAR, 0, 4, 0x14, 0x1000, 0xAB])),
    st.tuples(st.just("pci_cfg_r"), st.sampled_from([4, 8, 12, 16]), st.sampled_from([1, 4])),
)


def transport_apply(rig: dict, op: tuple) -> object:
    t, mem, ring = rig["t"], rig["mem"], rig["ring"]
    kind, result = op[0], None
    if kind == "wr":
        t.bar.io_write(C + op[1], op[2], op[3])
    elif kind == "rd":
        result = t.bar.io_read(C + op[1], op[2])
    elif kind == "isr":
        result = t.bar.io_read(vp.ISR_OFFSET, 1)
    elif kind == "cfg":
        result = t.bar.io_read(vp.DEVICE_OFFSET + op[1], op[2])
    elif kind == "post":
        post(mem, ring, [(BUFS, op[1], True)])
    elif kind == "kick":
        t.bar.io_write(t.notify_offset(op[1]), 2, op[1])
    elif kind == "used":
        t.used(op[1])
    elif kind == "config_changed":
        t.config_changed()
    elif kind == "msix":
        rig["irqs"].enabled = op[1]
    elif kind == "pci_cfg_w":
        t.pci_cfg.io_write(op[1], op[2], op[3])
    else:
        result = t.pci_cfg.io_read(op[1], op[2])
    common = [t.bar.io_read(C + off, 4) for off in range(0, vp.COMMON_CFG_LEN, 4)]  # no read side effects
    return result, common, t.driver_ok, t.isr, t.intx_level, mem.read(ring.desc, ring.end - ring.desc), mem.read(BUFS, 64)


def transport_rig(mem: GuestMemory, ring: Ring | None = None, *, msix: bool = True) -> dict:
    log: list = []
    irqs = Irqs(log, msix)
    t = vp.VirtioPciTransport(Rng(entropy), mem, msix_vectors=2, interrupts=irqs)
    rig = {"t": t, "mem": mem, "irqs": irqs, "log": log, "ring": ring}
    if ring is None:
        [rig["ring"]] = PciDriver(t, mem, Alloc(0x10_0000, RAM)).init(sizes={0: 8}, vectors={0: 0}, config_vector=1)
        log.clear()
    return rig


@FUZZ
@given(msix=st.booleans(), ops=st.lists(transport_ops, min_size=10, max_size=50))
def test_transport_restored_behaves_the_same(msix: bool, ops: list) -> None:
    a = transport_rig(GuestMemory(RAM), msix=msix)

    def restore(state: dict) -> tuple[dict, list]:
        b = transport_rig(ram_copy(a["mem"]), a["ring"], msix=a["irqs"].enabled)
        b["t"].load_state(state)
        return b, b["log"]

    lockstep(a, ops, transport_apply, a["log"], lambda rig: rig["t"].save_state(), restore, every=3)


def test_transport_pending_interrupt_and_negotiation_survive() -> None:
    a = transport_rig(GuestMemory(RAM), msix=False)
    t = a["t"]
    post(a["mem"], a["ring"], [(BUFS, 16, True)])
    t.bar.io_write(t.notify_offset(0), 2, 0)           # served at once: used buffer, ISR bit, INTx up
    assert t.intx_level and a["log"] == [("msix", 0, False), ("intx", True)]
    t.bar.io_write(C + vp.COMMON_QUEUE_SELECT, 2, 0)
    b = transport_rig(ram_copy(a["mem"]), a["ring"], msix=False)
    b["t"].load_state(as_json(t.save_state()))
    u = b["t"]
    assert b["log"] == [] and u.intx_level and u.driver_ok and u.device.active and u.device.queues == u.queues
    assert u.status == t.status and u.driver_features == t.driver_features
    assert u.bar.io_read(C + vp.COMMON_QUEUE_MSIX_VECTOR, 2) == 0 and u.bar.io_read(C + vp.COMMON_QUEUE_ENABLE, 2) == 1
    assert u.bar.io_read(vp.ISR_OFFSET, 1) == vp.ISR_QUEUE and b["log"] == [("intx", False)]
    post(b["mem"], b["ring"], [(BUFS + 0x100, 8, True)])
    u.bar.io_write(u.notify_offset(0), 2, 0)           # the restored queue serves the next buffer
    assert used_idx(b) == 2 and b["mem"].read(BUFS + 0x100, 8) == entropy(8)


def test_transport_damaged_states_are_refused() -> None:
    a = transport_rig(GuestMemory(RAM))
    state = as_json(a["t"].save_state())
    mem = GuestMemory(RAM)
    target = transport_rig(mem)
    t = target["t"]
    observe = lambda: (t.save_state(), t.device.active, list(target["log"]), mem.read(0x10_0000, 0x1000))  # noqa: E731
    assert assert_all_damage_refused(t.load_state, state, observe) > 150
    status = state["device_status"]
    for field, value in [("device_status", status & ~FEATURES_OK),          # DRIVER_OK without FEATURES_OK
                         ("device_status", status | vp.DEVICE_NEEDS_RESET),  # no queue broke
                         ("device_status", status | 0x20),                  # undefined bit
                         ("driver_features", 1),                            # FEATURES_OK without VERSION_1
                         ("queue_msix_vectors", [2]),                       # two vectors: 0 and 1
                         ("config_msix_vector", 5),
                         ("intx", True),                                    # INTx with nothing in the ISR
                         ("pci_cfg", "ff" + state["pci_cfg"][2:]),          # a byte of the PCI model's
                         ("queues", state["queues"] * 2),                   # one queue
                         ("device", {"cols": 80, "rows": 25, "rx_waiting": False})]:  # another device's state
        assert_refused(t.load_state, {**state, field: value}, observe)
    bad_queue = {**state["queues"][0], "size": 6}
    assert_refused(t.load_state, {**state, "queues": [bad_queue]}, observe)
    console = vp.VirtioPciTransport(VirtioConsole(ConsoleHost()), mem, msix_vectors=3)
    assert_refused(console.load_state, state, console.save_state)


# === virtio-console =======================================================================

class ConsoleHost:
    """A host end taking at most ``budget`` bytes per output call; it offers ``pending`` input when asked."""

    def __init__(self, log: list | None = None, budget: int | None = None, pending: bytes = b"") -> None:
        self.log = log if log is not None else []
        self.budget, self.pending = budget, pending
        self.console: VirtioConsole | None = None

    def output(self, bufs) -> int:
        data = b"".join(bytes(b) for b in bufs)
        taken = len(data) if self.budget is None else min(self.budget, len(data))
        self.log.append(("output", data[:taken]))
        return taken

    def rx_ready(self) -> None:
        self.log.append(("rx_ready",))
        if self.pending and self.console is not None:
            self.pending = self.pending[self.console.receive(self.pending):]


def console_rig(mem: GuestMemory, rings: list[Ring] | None = None, host: ConsoleHost | None = None,
                size: tuple[int, int] = (80, 25)) -> dict:
    log: list = []
    host = host or ConsoleHost()
    host.log = log
    con = VirtioConsole(host, size=size)
    host.console = con
    t = vp.VirtioPciTransport(con, mem, msix_vectors=3, interrupts=Irqs(log))
    rig = {"t": t, "con": con, "host": host, "mem": mem, "log": log, "rings": rings}
    if rings is None:
        rig["rings"] = PciDriver(t, mem, Alloc(0x10_0000, RAM)).init(sizes={0: 8, 1: 8}, vectors={0: 0, 1: 1},
                                                                    config_vector=2)
        log.clear()
    return rig


console_ops = st.one_of(
    st.tuples(st.just("tx"), st.binary(min_size=1, max_size=12)), st.tuples(st.just("tx"), st.binary(max_size=4)),
    st.tuples(st.just("rxbuf"), st.integers(0, 8)), st.tuples(st.just("rxbuf"), st.integers(1, 8)),
    st.tuples(st.just("receive"), st.binary(max_size=12)),
    st.tuples(st.just("budget"), st.one_of(st.none(), st.integers(0, 6))),
    st.tuples(st.just("resume")),
    st.tuples(st.just("pending"), st.binary(max_size=8)),
    st.tuples(st.just("resize"), st.integers(0, 300), st.integers(0, 100)),
    st.tuples(st.just("isr")),
)


def console_apply(rig: dict, op: tuple) -> object:
    t, con, host, mem = rig["t"], rig["con"], rig["host"], rig["mem"]
    rx, tx = rig["rings"]
    kind, result = op[0], None
    if kind == "tx":
        mem.write(BUFS + 0x40 * (mem.read_u16(tx.avail + 2) % 8), op[1])
        post(mem, tx, [(BUFS + 0x40 * (mem.read_u16(tx.avail + 2) % 8), len(op[1]), False)])
        t.bar.io_write(t.notify_offset(TRANSMITQ), 2, TRANSMITQ)
    elif kind == "rxbuf":
        post(mem, rx, [(BUFS + 0x1000 + 0x40 * (mem.read_u16(rx.avail + 2) % 8), op[1], True)])
        t.bar.io_write(t.notify_offset(RECEIVEQ), 2, RECEIVEQ)
    elif kind == "receive":
        result = con.receive(op[1])
    elif kind == "budget":
        host.budget = op[1]
    elif kind == "resume":
        con.tx_resume()
    elif kind == "pending":
        host.pending = op[1]
    elif kind == "resize":
        con.resize(op[1], op[2])
    else:
        result = t.bar.io_read(vp.ISR_OFFSET, 1)
    return result, host.pending, con.config_read(0, 8), mem.read(0x10_0000, 0x800), mem.read(BUFS + 0x1000, 0x200)


def console_save(rig: dict) -> dict | None:
    """The transport's state, or None while the console holds output the host has not taken."""
    try:
        return rig["t"].save_state()
    except StateError:
        assert rig["con"]._tx_pending, "StateError without output in flight"
        return None


@FUZZ
@given(ops=st.lists(console_ops, min_size=10, max_size=50))
def test_console_restored_behaves_the_same(ops: list) -> None:
    a = console_rig(GuestMemory(RAM))

    def restore(state: dict) -> tuple[dict, list]:
        host = ConsoleHost(budget=a["host"].budget, pending=a["host"].pending)
        b = console_rig(ram_copy(a["mem"]), a["rings"], host, size=(1, 1))
        b["t"].load_state(state)
        return b, b["log"]

    lockstep(a, ops, console_apply, a["log"], console_save, restore, every=2)


def test_console_output_in_flight_is_refused_then_saved_once_drained() -> None:
    a = console_rig(GuestMemory(RAM), host=ConsoleHost(budget=2))
    console_apply(a, ("tx", b"hello"))
    before = a["t"].save_state
    with pytest.raises(StateError, match="virtio console has guest output"):
        before()
    a["host"].budget = None
    a["con"].tx_resume()
    state = as_json(a["t"].save_state())
    assert state["device"] == {"cols": 80, "rows": 25, "rx_waiting": True}
    b = console_rig(ram_copy(a["mem"]), a["rings"], size=(1, 1))
    b["t"].load_state(state)
    assert b["con"].config_read(0, 4) == 80 | 25 << 16
    assert console_apply(b, ("rxbuf", 4))[0] is None and b["log"] == [("rx_ready",)]  # still owed its rx_ready
    assert b["con"].receive(b"hey") == 3 and b["mem"].read(BUFS + 0x1000, 3) == b"hey"


def test_console_damaged_states_are_refused() -> None:
    con = VirtioConsole(ConsoleHost(), size=(80, 25))
    state = as_json(con.save_state())
    assert assert_all_damage_refused(con.load_state, state, con.save_state) > 20
    assert_refused(con.load_state, {**state, "cols": 1 << 16}, con.save_state)


# === virtio-blk and virtio-rng =============================================================

class Disk:
    def __init__(self, size: int = 1 << 20, read_only: bool = False, data: bytes | None = None) -> None:
        self.data = bytearray(data if data is not None else bytes(range(256)) * (size // 256))
        self.size, self.read_only = len(self.data), read_only

    def readv(self, offset: int, bufs: list[memoryview]) -> int:
        n = 0
        for b in bufs:
            b[:] = self.data[offset + n:offset + n + len(b)]
            n += len(b)
        return n

    def writev(self, offset: int, bufs: list[memoryview]) -> int:
        n = 0
        for b in bufs:
            self.data[offset + n:offset + n + len(b)] = bytes(b)
            n += len(b)
        return n

    def flush(self) -> None:
        pass

    def discard(self, offset: int, length: int) -> None:
        pass

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self.data[offset:offset + length] = bytes(length)


def blk_rig(mem: GuestMemory, disk: Disk, ring: Ring | None = None, serial: str = "disk-1") -> dict:
    log: list = []
    dev = VirtioBlk(disk, serial=serial)
    t = vp.VirtioPciTransport(dev, mem, msix_vectors=2, interrupts=Irqs(log))
    rig = {"t": t, "mem": mem, "log": log, "ring": ring, "disk": disk}
    if ring is None:
        [rig["ring"]] = PciDriver(t, mem, Alloc(0x10_0000, RAM)).init(sizes={0: 16}, vectors={0: 1})
        log.clear()
    return rig


def blk_request(rig: dict, rtype: int, sector: int, data: bytes = b"", inlen: int = 0) -> tuple[int, bytes]:
    mem, t = rig["mem"], rig["t"]
    mem.write(BUFS, struct.pack("<IIQ", rtype, 0, sector) + data)
    bufs = [(BUFS, 16 + len(data), False)]
    if inlen:
        bufs.append((BUFS + 0x1000, inlen, True))
    bufs.append((BUFS + 0x3000, 1, True))
    post(mem, rig["ring"], bufs)
    t.bar.io_write(t.notify_offset(0), 2, 0)
    return mem.read_u8(BUFS + 0x3000), mem.read(BUFS + 0x1000, inlen)


def test_blk_restored_serves_requests_where_the_saved_one_stopped() -> None:
    a = blk_rig(GuestMemory(RAM), Disk())
    assert blk_request(a, 1, 8, b"\xAA" * 512) == (0, b"")            # a write, completed before the save
    state = as_json(a["t"].save_state())
    assert state["device"] == {"capacity": 2048, "block_size": 512, "read_only": False, "serial": b"disk-1".hex()}
    b = blk_rig(ram_copy(a["mem"]), Disk(data=bytes(a["disk"].data)), a["ring"])
    b["t"].load_state(state)
    assert b["log"] == []
    ring = b["ring"]
    b["mem"].write_u16(ring.avail + 4 + 2 * ring.size, 1)              # EVENT_IDX: interrupt me after the next one
    assert blk_request(b, 0, 8, inlen=512) == (0, b"\xAA" * 512)      # a read on the restored disk
    assert used_idx(b) == 2 and b["log"] == [("msix", 1, True)]


def test_blk_and_rng_damaged_states_are_refused() -> None:
    blk = VirtioBlk(Disk(), serial="disk-1")
    state = as_json(blk.save_state())
    assert assert_all_damage_refused(blk.load_state, state, blk.save_state) > 20
    for other in (VirtioBlk(Disk(size=1 << 21), serial="disk-1"), VirtioBlk(Disk(read_only=True), serial="disk-1"),
                  VirtioBlk(Disk(), serial="disk-2")):
        assert_refused(other.load_state, state, other.save_state)  # the guest knows another disk
    rng = VirtioRng(entropy)
    assert rng.save_state() == {}
    assert_all_damage_refused(rng.load_state, {}, rng.save_state)
