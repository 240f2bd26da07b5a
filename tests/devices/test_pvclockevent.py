"""The paravirtual clock event register model, without KVM: a fake host clock and RAM."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from kvmkit.devices import pvclockevent as p
from kvmkit.devices.pvclockevent import PvClockEvent


class FakeHost:
    def __init__(self, now: int = 1_000_000) -> None:
        self.t = now
        self.armed: int | None = None
        self.fired = 0
        self.routes: list[tuple[str, int]] = []
        self.log: list[tuple] = []

    def now(self) -> int:
        return self.t

    def arm(self, host_ns: int) -> None:
        self.armed = host_ns
        self.log.append(("arm", host_ns))

    def disarm(self) -> None:
        self.armed = None
        self.log.append(("disarm",))

    def fire(self) -> None:
        self.fired += 1
        self.log.append(("fire",))

    def route(self, route: tuple[str, int]) -> None:
        self.routes.append(route)


class FakeRam:
    def __init__(self, size: int = 0x10000) -> None:
        self.buf = bytearray(size)
        self.reads = 0

    def is_ram(self, gpa: int, size: int = 1) -> bool:
        return 0 <= gpa and gpa + size <= len(self.buf)

    def read_u64(self, gpa: int) -> int:
        self.reads += 1
        return struct.unpack_from("<Q", self.buf, gpa)[0]

    def write_u64(self, gpa: int, value: int) -> None:
        struct.pack_into("<Q", self.buf, gpa, value)

    def write_u32(self, gpa: int, value: int) -> None:
        struct.pack_into("<I", self.buf, gpa, value)


VEC = 0xEC
ENABLE = p.CTRL_ENABLE | (VEC << p.CTRL_VECTOR_SHIFT)


def make(shared: bool = False, now: int = 1_000_000):
    host = FakeHost(now)
    ram = FakeRam()
    dev = PvClockEvent(host, ram, tsc_khz=2_500_000, doorbell_in_kernel=True)
    if shared:
        dev.io_write(p.REG_SHARED_GPA, 8, 0x1000)
        ram.write_u64(0x1000 + p.SHM_DEADLINE, p.NEVER)
        dev.io_write(p.REG_CONTROL, 4, ENABLE | p.CTRL_SHARED)
    else:
        dev.io_write(p.REG_CONTROL, 4, ENABLE)
    return dev, host, ram


def expire(dev: PvClockEvent, host: FakeHost) -> None:
    """Advance the fake clock to the armed time and deliver the timer expiry."""
    assert host.armed is not None
    host.t = max(host.t, host.armed)
    host.armed = None  # a one-shot host timer is spent once it went off
    dev.timer_expired()


def test_identification():
    dev, _, _ = make()
    assert dev.io_read(p.REG_ID, 4) == p.PVCE_MAGIC
    assert dev.io_read(p.REG_VERSION, 4) == p.PVCE_VERSION
    assert dev.io_read(p.REG_ID, 8) == p.PVCE_MAGIC | p.PVCE_VERSION << 32
    feats = dev.io_read(p.REG_FEATURES, 4)
    assert feats & p.FEAT_ABSOLUTE and feats & p.FEAT_SHARED and feats & p.FEAT_DOORBELL_IN_KERNEL
    assert dev.io_read(p.REG_TSC_KHZ, 4) == 2_500_000
    assert dev.io_read(p.REG_ID, 1) == 0x50  # 'P'
    assert dev.io_read(0x800, 8) == 0


def test_absolute_deadline_arms_then_fires_once():
    dev, host, _ = make()
    assert host.routes == [("msi", VEC)]
    dev.io_write(p.REG_DEADLINE, 8, 1_500_000)
    assert host.armed == 1_500_000 and host.fired == 0
    assert dev.io_read(p.REG_STATUS, 8) & p.STS_ARMED
    host.t = 1_499_999
    dev.timer_expired()  # early/stale: nothing
    assert host.fired == 0
    expire(dev, host)
    assert host.fired == 1
    st_ = dev.io_read(p.REG_STATUS, 8)
    assert st_ & p.STS_FIRED and not st_ & p.STS_MISSED and not st_ & p.STS_ARMED
    assert st_ >> 32 == 1
    dev.timer_expired()  # a second expiry without a new deadline never fires
    assert host.fired == 1
    dev.io_write(p.REG_STATUS, 4, p.STS_FIRED)
    assert not dev.io_read(p.REG_STATUS, 4) & p.STS_FIRED


def test_past_deadline_fires_at_once_and_sets_missed():
    dev, host, _ = make()
    dev.io_write(p.REG_DEADLINE, 8, 10)
    assert host.fired == 1 and host.armed is None
    assert dev.io_read(p.REG_STATUS, 4) & p.STS_MISSED
    dev.io_write(p.REG_DEADLINE, 8, host.t)  # "now" is due too
    assert host.fired == 2


def test_relative_mode_uses_host_now():
    dev, host, _ = make()
    dev.io_write(p.REG_CONTROL, 4, ENABLE | p.CTRL_RELATIVE)
    dev.io_write(p.REG_DEADLINE, 8, 5000)
    assert host.armed == host.t + 5000


def test_never_and_disable_cancel():
    dev, host, _ = make()
    dev.io_write(p.REG_DEADLINE, 8, 2_000_000)
    dev.io_write(p.REG_DEADLINE, 8, p.NEVER)
    assert host.armed is None
    dev.io_write(p.REG_DEADLINE, 8, 2_000_000)
    dev.io_write(p.REG_CONTROL, 4, 0)
    assert host.armed is None
    host.t = 3_000_000
    dev.timer_expired()
    assert host.fired == 0
    dev.io_write(p.REG_DEADLINE, 8, 10)  # disabled: stored, never fires
    assert host.fired == 0 and host.armed is None
    assert dev.io_read(p.REG_DEADLINE, 8) == 10


def test_bad_vector_refuses_enable():
    host = FakeHost()
    dev = PvClockEvent(host, None)
    dev.io_write(p.REG_CONTROL, 4, p.CTRL_ENABLE | (5 << p.CTRL_VECTOR_SHIFT))
    assert not dev.io_read(p.REG_CONTROL, 4) & p.CTRL_ENABLE
    assert dev.io_read(p.REG_STATUS, 4) & p.STS_ERROR
    assert host.routes == []
    dev.io_write(p.REG_DEADLINE, 8, 1)
    assert host.fired == 0
    # shared mode without a shared block (and no RAM) is refused too
    dev.io_write(p.REG_CONTROL, 4, ENABLE | p.CTRL_SHARED)
    assert not dev.io_read(p.REG_CONTROL, 4) & p.CTRL_ENABLE
    assert not dev.io_read(p.REG_FEATURES, 4) & p.FEAT_SHARED


def test_gsi_routing():
    host = FakeHost()
    dev = PvClockEvent(host, None)
    for gsi in (0, 2, 24, 255):
        dev.io_write(p.REG_CONTROL, 4, p.CTRL_ENABLE | p.CTRL_ROUTE_GSI | gsi << p.CTRL_GSI_SHIFT)
        assert not dev.io_read(p.REG_CONTROL, 4) & p.CTRL_ENABLE
    assert host.routes == []
    dev.io_write(p.REG_CONTROL, 4, p.CTRL_ENABLE | p.CTRL_ROUTE_GSI | 10 << p.CTRL_GSI_SHIFT)
    assert dev.io_read(p.REG_CONTROL, 4) & p.CTRL_ENABLE
    assert host.routes == [("gsi", 10)]
    dev.io_write(p.REG_CONTROL, 4, 0)
    dev.io_write(p.REG_CONTROL, 4, p.CTRL_ENABLE | p.CTRL_ROUTE_GSI | 10 << p.CTRL_GSI_SHIFT)
    assert host.routes == [("gsi", 10)]  # unchanged route: not re-installed


def test_deadline_in_two_halves():
    dev, host, _ = make()
    value = 0x1_2345_6789
    dev.io_write(p.REG_DEADLINE, 4, value & 0xFFFFFFFF)
    assert host.armed is None  # the low half only latches
    dev.io_write(p.REG_DEADLINE + 4, 4, value >> 32)
    assert host.armed == value
    assert dev.io_read(p.REG_DEADLINE + 4, 4) == value >> 32


def test_sync_handshake_sets_delta():
    dev, host, _ = make(now=10_000_000)
    # guest clock = host - 7_000_000; the write is stamped 300 ns after t1
    dev.io_write(p.REG_SYNC, 8, 3_000_000 - 300)
    host.t += 500
    dev.io_write(p.REG_SYNC_END, 8, 3_000_000 + 300)
    assert dev.delta == 7_000_000
    assert dev.io_read(p.REG_SYNC_ERROR, 8) == 300
    assert dev.io_read(p.REG_GUEST_NOW, 8) == host.t - 7_000_000
    dev.io_write(p.REG_DEADLINE, 8, 3_100_000)
    assert host.armed == 10_100_000
    # SYNC_END without SYNC, or going backwards: refused, delta kept
    dev.io_write(p.REG_SYNC_END, 8, 5)
    assert dev.io_read(p.REG_STATUS, 4) & p.STS_ERROR and dev.delta == 7_000_000


def test_resync_moves_an_armed_timer():
    dev, host, _ = make(now=10_000_000)
    dev.io_write(p.REG_DEADLINE, 8, 12_000_000)
    assert host.armed == 12_000_000
    dev.io_write(p.REG_SYNC, 8, 9_000_000)
    dev.io_write(p.REG_SYNC_END, 8, 9_000_000)  # guest is 1 ms behind
    assert host.armed == 13_000_000


# --- shared block -------------------------------------------------------------
def guest_program(dev: PvClockEvent, ram: FakeRam, deadline: int) -> bool:
    """What the guest driver does: store the deadline, read ARMED, ring if earlier."""
    ram.write_u64(0x1000 + p.SHM_DEADLINE, deadline)
    armed = struct.unpack_from("<Q", ram.buf, 0x1000 + p.SHM_ARMED)[0]
    if deadline < armed:
        dev.io_write(p.REG_DOORBELL, 4, 1)
        return True
    return False


def test_shared_first_program_rings_later_moves_do_not():
    dev, host, ram = make(shared=True)
    assert host.armed is None and host.fired == 0
    assert ram.read_u64(0x1000 + p.SHM_ARMED) == p.NEVER
    assert guest_program(dev, ram, 2_000_000)  # from idle: one doorbell
    assert host.armed == 2_000_000 and ram.read_u64(0x1000 + p.SHM_ARMED) == 2_000_000
    assert not guest_program(dev, ram, 2_500_000)  # later: no exit
    assert not guest_program(dev, ram, 3_000_000)
    assert host.armed == 2_000_000
    expire(dev, host)  # the host timer goes off at the old time: re-arm, no interrupt
    assert host.fired == 0 and host.armed == 3_000_000 and dev.rearms_later == 1
    expire(dev, host)
    assert host.fired == 1 and host.armed is None
    assert not dev.io_read(p.REG_STATUS, 4) & p.STS_MISSED
    assert ram.read_u64(0x1000 + p.SHM_ARMED) == p.NEVER
    assert struct.unpack_from("<I", ram.buf, 0x1000 + p.SHM_COUNT)[0] == 1
    dev.doorbell()  # a stray doorbell does not fire the same deadline again
    assert host.fired == 1 and host.armed is None


def test_shared_earlier_rings_and_rearms():
    dev, host, ram = make(shared=True)
    guest_program(dev, ram, 5_000_000)
    assert guest_program(dev, ram, 4_000_000)
    assert host.armed == 4_000_000
    assert guest_program(dev, ram, 10)  # already past: fires at once
    assert host.fired == 1 and dev.io_read(p.REG_STATUS, 4) & p.STS_MISSED


def test_shared_never_disarms():
    dev, host, ram = make(shared=True)
    guest_program(dev, ram, 5_000_000)
    ram.write_u64(0x1000, p.NEVER)
    dev.doorbell()
    assert host.armed is None
    host.t = 6_000_000
    dev.timer_expired()
    assert host.fired == 0


def test_shared_race_guest_moves_earlier_while_host_publishes():
    """The host publishes ARMED and re-reads DEADLINE, so an earlier deadline written meanwhile is seen."""
    dev, host, ram = make(shared=True)
    guest_program(dev, ram, 5_000_000)
    real_write = ram.write_u64

    def racing_write(gpa: int, value: int) -> None:
        real_write(gpa, value)
        if gpa == 0x1000 + p.SHM_ARMED and value == 6_000_000:
            # the guest stores an earlier deadline and reads the *old* ARMED
            # (5_000_000 < 4_000_000 is false, so it would not ring)
            real_write(0x1000 + p.SHM_DEADLINE, 4_000_000)

    ram.write_u64 = racing_write  # type: ignore[method-assign]
    ram.write_u64(0x1000, 6_000_000)  # guest moved it later (no doorbell) ...
    expire(dev, host)  # ... the host handles the old expiry and meets the race
    assert host.armed == 4_000_000 or host.fired == 1


def test_shared_deadline_stored_while_the_host_fires_is_not_lost():
    """The guest stores D1 and reads the old ARMED (no doorbell) just as the host fires D0."""
    dev, host, ram = make(shared=True)
    guest_program(dev, ram, 2_000_000)
    real_write = ram.write_u64
    raced = []

    def racing_write(gpa: int, value: int) -> None:
        if gpa == 0x1000 + p.SHM_ARMED and value == p.NEVER and not raced:
            raced.append(1)
            # before the host's store lands: guest stores D1, sees ARMED == D0 < D1, does not ring
            real_write(0x1000 + p.SHM_DEADLINE, 3_000_000)
            assert ram.read_u64(0x1000 + p.SHM_ARMED) == 2_000_000
        real_write(gpa, value)

    ram.write_u64 = racing_write  # type: ignore[method-assign]
    expire(dev, host)
    assert raced and host.fired == 1
    assert host.armed == 3_000_000  # the host went round and found D1
    assert ram.read_u64(0x1000 + p.SHM_ARMED) == 3_000_000


def test_resync_in_shared_mode_moves_the_timer():
    dev, host, ram = make(shared=True, now=10_000_000)
    guest_program(dev, ram, 12_000_000)
    dev.io_write(p.REG_SYNC, 8, 9_000_000)
    dev.io_write(p.REG_SYNC_END, 8, 9_000_000)
    assert host.armed == 13_000_000 and host.fired == 0


def test_shared_block_validation():
    host = FakeHost()
    ram = FakeRam(0x2000)
    dev = PvClockEvent(host, ram)
    for bad in (0x1001, 0x1FF0, 0x10_0000, (1 << 64) - 64):
        dev.io_write(p.REG_STATUS, 4, p.STS_ERROR)
        dev.io_write(p.REG_SHARED_GPA, 8, bad)
        assert dev.io_read(p.REG_STATUS, 4) & p.STS_ERROR
        assert dev.io_read(p.REG_SHARED_GPA, 8) == 0
    dev.io_write(p.REG_SHARED_GPA, 8, 0x1000)
    dev.io_write(p.REG_CONTROL, 4, ENABLE | p.CTRL_SHARED)
    dev.io_write(p.REG_SHARED_GPA, 8, 0x1040)  # moving it while enabled: refused
    assert dev.io_read(p.REG_SHARED_GPA, 8) == 0x1000
    dev.io_write(p.REG_CONTROL, 4, ENABLE | p.CTRL_SHARED | p.CTRL_RELATIVE)  # no relative shared mode
    assert not dev.io_read(p.REG_CONTROL, 4) & p.CTRL_ENABLE


class ViewRam(FakeRam):
    def view(self, gpa: int, size: int) -> memoryview:
        return memoryview(self.buf)[gpa:gpa + size]


def test_shared_block_through_a_zero_copy_view():
    host = FakeHost()
    ram = ViewRam()
    dev = PvClockEvent(host, ram)
    ram.write_u64(0x1000, p.NEVER)
    dev.io_write(p.REG_SHARED_GPA, 8, 0x1000)
    dev.io_write(p.REG_CONTROL, 4, ENABLE | p.CTRL_SHARED)
    assert guest_program(dev, ram, 2_000_000)
    reads = ram.reads
    assert host.armed == 2_000_000 and ram.read_u64(0x1000 + p.SHM_ARMED) == 2_000_000
    expire(dev, host)
    assert host.fired == 1 and struct.unpack_from("<I", ram.buf, 0x1000 + p.SHM_COUNT)[0] == 1
    assert ram.reads == reads + 1  # the model itself went through the view
    dev.release()
    assert dev.io_read(p.REG_SHARED_GPA, 8) == 0 and not dev.io_read(p.REG_CONTROL, 4) & p.CTRL_ENABLE
    bytearray_resizable = ram.buf
    bytearray_resizable.extend(b"\0")  # no view is left holding the buffer


def test_deadline_register_in_shared_mode_writes_the_block():
    dev, host, ram = make(shared=True)
    dev.io_write(p.REG_DEADLINE, 8, 7_000_000)
    assert ram.read_u64(0x1000) == 7_000_000 and host.armed == 7_000_000


# --- garbage ---------------------------------------------------------------------
@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["r", "w", "exp", "bell", "tick"]),
                          st.integers(0, 0x1000), st.sampled_from([1, 2, 3, 4, 8, 16]),
                          st.integers(0, (1 << 64) - 1)), max_size=60))
def test_fuzz_never_raises_and_disabled_never_fires(ops):
    host = FakeHost()
    ram = FakeRam()
    dev = PvClockEvent(host, ram)
    enabled_at_fire = True
    for kind, off, size, val in ops:
        if kind == "r":
            v = dev.io_read(off, size)
            assert 0 <= v < (1 << (8 * min(size, 8)))
        elif kind == "w":
            dev.io_write(off, size, val)
        elif kind == "exp":
            dev.timer_expired()
        elif kind == "bell":
            dev.doorbell()
        else:
            host.t += val % 10_000_000
        before = host.fired
        if not dev.control & p.CTRL_ENABLE:
            dev.timer_expired()
            dev.doorbell()
            enabled_at_fire = host.fired == before
            assert enabled_at_fire, "a disabled device fired"
            assert host.armed is None or dev.armed_host_ns is None
