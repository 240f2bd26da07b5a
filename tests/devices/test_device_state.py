"""Snapshot state of the pure device models: a reloaded device behaves as the saved one, a damaged state changes nothing.

For each model:

* (a) hypothesis drives a device with a random access sequence, saves it,
  passes the state through JSON, loads it into a fresh device (which must
  not call its host), then gives both devices the same further random
  sequence: every read, every observable and every host call must match;
* (b) every damaged variant of a real state (a field missing, unknown,
  of the wrong type, out of range or oversized; see ``state_checks``) and
  the model's own inconsistencies raise StateError and leave the target
  device and its host untouched;
* (c) a directed test that what was in flight (a pending interrupt, an
  armed deadline, a half-full FIFO) survives.

The virtio transport and devices are in tests/devices/virtio/test_virtio_state.py.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmkit.devices import pvclockevent as p
from kvmkit.devices.cmos import REG_A, REG_B, REG_C, Cmos, memory_bytes
from kvmkit.devices.i8042 import I8042
from kvmkit.devices.misc import ExitPort, PortSink
from kvmkit.devices.msix import MSIX_ENTRY_SIZE, Msix
from kvmkit.devices.pci import PCI_COMMAND, PCI_STATUS, PciBus, PciFunction, PciHostBridge
from kvmkit.devices.pvclockevent import PvClockEvent
from kvmkit.devices.state import StateError
from kvmkit.devices.uart16550 import Uart16550
from kvmkit.memory import GuestMemory

from state_checks import as_json, assert_all_damage_refused, assert_refused, lockstep

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def saved(device: object) -> dict:
    return device.save_state()  # type: ignore[attr-defined]


# === 16550A UART ===================================================================

class UartLog:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def set_irq(self, level: bool) -> None:
        self.calls.append(("irq", level))

    def tx_started(self) -> None:
        self.calls.append(("tx_started",))

    def rx_space(self) -> None:
        self.calls.append(("rx_space",))


uart_ops = st.one_of(
    st.tuples(st.just("read"), st.integers(-1, 8)),
    st.tuples(st.just("write"), st.sampled_from([-1, 0, 0, 1, 3, 4, 5, 6, 7, 8]),
              st.one_of(st.integers(0, 0xFF), st.sampled_from([0x01, 0x07, 0x0B, 0x1F, 0x0F, 0x80, 0x03]))),
    st.tuples(st.just("write"), st.just(2), st.sampled_from([0x41, 0xC1, 0x81, 0x01, 0x07, 0x00, 0x4B])),  # FCR
    st.tuples(st.just("receive"), st.binary(max_size=20)),
    st.tuples(st.just("receive"), st.binary(min_size=1, max_size=3)),
    st.tuples(st.just("take_tx"), st.one_of(st.none(), st.integers(0, 17))),
    st.tuples(st.just("timeout")),
    st.tuples(st.just("timeout")),
    st.tuples(st.just("break")),
    st.tuples(st.just("modem"), st.booleans(), st.booleans(), st.booleans(), st.booleans()),
    st.tuples(st.just("reset")),
)
# FIFO on (trigger 4/14/1), OUT2, all interrupts; sometimes loopback; a character timeout pending.
uart_prelude = st.sampled_from([[], [("write", 2, 0x41), ("write", 4, 0x0B), ("write", 1, 0x0F)],
                                [("write", 2, 0xC1), ("write", 4, 0x1F), ("write", 1, 0x0F)],
                                [("write", 2, 0x01), ("write", 4, 0x08), ("write", 1, 0x05)],
                                [("write", 2, 0xC1), ("write", 4, 0x0B), ("write", 1, 0x0F), ("receive", b"hi"),
                                 ("timeout",)]])


def uart_apply(u: Uart16550, op: tuple) -> object:
    kind, result = op[0], None
    if kind == "read":
        result = u.read(op[1])
    elif kind == "write":
        u.write(op[1], op[2])
    elif kind == "receive":
        result = u.receive(op[1])
    elif kind == "take_tx":
        result = u.take_tx(op[1])
    elif kind == "timeout":
        u.character_timeout()
    elif kind == "break":
        u.send_break()
    elif kind == "modem":
        u.set_modem_status(cts=op[1], dsr=op[2], ri=op[3], dcd=op[4])
    else:
        u.reset()
    return result, u.peek_iir(), u.peek_lsr(), u.irq_level, u.cti_armed, u.rx_space(), u.tx_pending()


def driven_uart(ops: list, *, fifo: bool = True) -> tuple[Uart16550, UartLog]:
    log = UartLog()
    u = Uart16550(log, fifo=fifo)
    for op in ops:
        uart_apply(u, op)
    return u, log


@FUZZ
@given(fifo=st.booleans(), pre=uart_prelude, ops=st.lists(uart_ops, min_size=10, max_size=50))
def test_uart_restored_behaves_the_same(fifo: bool, pre: list, ops: list) -> None:
    a, log = driven_uart(pre, fifo=fifo)

    def restore(state: dict) -> tuple[Uart16550, list]:
        b, b_log = driven_uart([], fifo=fifo)
        b.load_state(state)
        return b, b_log.calls

    lockstep(a, ops, uart_apply, log.calls, saved, restore)


def busy_uart() -> Uart16550:
    """FIFO mode, trigger 4, OUT2, RDA+THRE+RLS enabled; TX holds 'xyz', RX holds 'a', 'b' and a break."""
    u, _ = driven_uart([("write", 2, 0x41), ("write", 4, 0x0B), ("write", 1, 0x07),
                        ("write", 0, ord("x")), ("write", 0, ord("y")), ("write", 0, ord("z")),
                        ("receive", b"ab"), ("break",), ("timeout",)])
    return u


def test_uart_pending_interrupt_and_fifos_survive() -> None:
    state = as_json(busy_uart().save_state())
    assert state["rx_fifo"] == "616200" and state["rx_fifo_errors"] == [0, 0, 0x10] and state["tx_fifo"] == "78797a"
    log = UartLog()
    u = Uart16550(log)
    u.load_state(state)
    assert log.calls == [] and u.irq_level and u.tx_pending() == 3
    assert u.read(2) == 0xCC                      # character timeout, FIFOs enabled
    assert u.read(5) == 0x81                      # DR, error in RX FIFO; THR not empty
    assert u.read(0) == ord("a") and u.read(0) == ord("b")
    assert u.read(2) == 0xC6                      # the break reached the top: receiver line status
    assert u.read(5) & 0x10                       # BI, then cleared by that read
    assert u.read(0) == 0 and not u.read(5) & 0x9F
    assert u.take_tx() == b"xyz"
    assert u.read(2) == 0xC2                      # THRE
    # 'a' read: no source left; the break at the top: RLS; LSR read; TX drained: THRE; IIR read clears it.
    assert log.calls == [("irq", level) for level in (False, True, False, True, False)]


def test_uart_damaged_states_are_refused() -> None:
    state = as_json(busy_uart().save_state())
    target, log = driven_uart([("write", 2, 0x01), ("write", 4, 0x08), ("receive", b"q")])
    observe = lambda: (target.save_state(), list(log.calls))  # noqa: E731
    assert assert_all_damage_refused(target.load_state, state, observe) > 100
    for field, value, why in [
        ("rx_fifo", "00" * 17, "RX FIFO longer than 16"),
        ("tx_fifo", "00" * 17, "TX FIFO longer than 16"),
        ("rx_fifo_errors", [0, 0], "one error entry per byte"),
        ("rx_fifo_errors", [0, 0, 0x02], "OE is not a per-byte error"),
        ("lsr_errors", 0x01, "DR is not latched"),
        ("thre_pending", True, "THRE with bytes in the TX FIFO"),
        ("irq_level", False, "a level the registers do not give"),
        ("msr", 0x30, "DCD line without the modem line"),
        ("fcr", 0xC0, "trigger bits without FIFO enable"),
        ("fifo", False, "a 16450's state"),
    ]:
        e = assert_refused(target.load_state, {**state, field: value}, observe)
        assert "16550A UART" in str(e) and field in str(e), why
    no_fifo = {**state, "fcr": 0, "irq_level": True, "cti_pending": False}
    assert_refused(target.load_state, {**no_fifo, "rx_fifo": "00" * 2, "rx_fifo_errors": [0, 0], "tx_fifo": ""},
                   observe)  # without FIFOs the capacity is one byte
    old, _ = driven_uart([], fifo=False)
    assert_refused(old.load_state, state, old.save_state)


# === CMOS RTC ========================================================================

class Clock:
    """A host clock in steps of 1/512 s: exact in binary and in whole nanoseconds, as the state stores it."""

    def __init__(self, t: float = 1_709_214_356.5) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


cmos_ops = st.one_of(
    st.tuples(st.just("index"), st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0xA, 0xB, 0xC, 0xD, 0x32, 0x10, 0x7F]),
              st.booleans()),
    st.tuples(st.just("data"), st.one_of(st.integers(0, 0xFF), st.sampled_from([0x80, 0x82, 0x86, 0x06, 0x02, 0x70,
                                                                                 0x26, 0x2F, 0x23, 0x59, 0xC0])),),
    st.tuples(st.just("read"), st.sampled_from([0, 1])),
    st.tuples(st.just("reg"), st.sampled_from([REG_C, REG_C, REG_A, 0, 2, 4])),  # select and read
    st.tuples(st.just("tick"), st.integers(0, 1024)),
    st.tuples(st.just("jump"), st.integers(0, 200_000)),
)


def cmos_apply(d: Cmos, op: tuple) -> object:
    kind, result = op[0], None
    if kind == "index":
        d.io_write(0, 1, op[1] | (0x80 if op[2] else 0))
    elif kind == "data":
        d.io_write(1, 1, op[1])
    elif kind == "read":
        result = d.io_read(op[1], 1)
    elif kind == "reg":
        d.io_write(0, 1, op[1])
        result = d.io_read(1, 1)
    elif kind == "tick":
        d.clock.t += op[1] / 512  # type: ignore[attr-defined]
    else:
        d.clock.t += op[1]  # type: ignore[attr-defined]
    return result, d.index, d.nmi_disabled


def make_cmos(t: float = 1_709_214_356.5) -> Cmos:
    return Cmos(Clock(t), nvram=memory_bytes(256 << 20, cpus=2))


@FUZZ
@given(ops=st.lists(cmos_ops, min_size=10, max_size=60))
def test_cmos_restored_behaves_the_same(ops: list) -> None:
    a = make_cmos()

    def restore(state: dict) -> tuple[Cmos, list]:
        b = make_cmos(a.clock.t)  # type: ignore[attr-defined]
        b.load_state(state)
        return b, []

    lockstep(a, ops, cmos_apply, [], saved, restore)


def rd(d: Cmos, index: int) -> int:
    d.io_write(0, 1, index)
    return d.io_read(1, 1)


def wr(d: Cmos, index: int, value: int) -> None:
    d.io_write(0, 1, index)
    d.io_write(1, 1, value)


def test_cmos_guest_set_time_alarm_and_frozen_clock_survive() -> None:
    a = make_cmos()
    wr(a, REG_B, 0x86)            # SET, binary, 24 h
    wr(a, 9, 99)                  # year 2099
    wr(a, 4, 7)                   # 07 h
    wr(a, REG_B, 0x26)            # run again, alarm interrupt enabled
    wr(a, 1, 0xC0)                # alarm: any second of 07:00
    wr(a, 3, 0)
    wr(a, 5, 7)
    wr(a, 0x40, 0x5A)             # NVRAM
    a.io_write(0, 1, 0x80 | REG_C)  # NMI masked, index at REG_C
    b = make_cmos(a.clock.t + 3600)  # restored an hour later on the host
    b.load_state(as_json(a.save_state()))
    assert rd(b, 9) == 99 and rd(b, 4) == 8 and rd(b, 0x40) == 0x5A  # the guest's clock ran on with the host's
    c = make_cmos()
    c.load_state(as_json(a.save_state()))
    assert c.nmi_disabled and c.index == REG_C
    assert c.io_read(1, 1) == a.io_read(1, 1)     # REG_C flags computed from the same last read
    wr(a, REG_B, 0x82)            # SET: the clock stands still
    frozen = as_json(a.save_state())
    assert frozen["frozen_ns"] is not None
    d = make_cmos(a.clock.t + 500)
    d.load_state(frozen)
    assert (rd(d, 4), rd(d, 2), rd(d, 0)) == (rd(a, 4), rd(a, 2), rd(a, 0))


def test_cmos_damaged_states_are_refused() -> None:
    a = make_cmos()
    wr(a, REG_B, 0x82)
    state = as_json(a.save_state())
    target = make_cmos()
    wr(target, 0x41, 7)
    assert assert_all_damage_refused(target.load_state, state, target.save_state) > 40
    ram = bytes.fromhex(state["ram"])
    for field, value in [("frozen_ns", None),                                       # SET without a frozen time
                         ("ram", ram[:REG_B].hex() + "12" + ram[REG_B + 1:].hex()),  # UIE set with SET
                         ("ram", ram[:REG_A].hex() + "a6" + ram[REG_A + 1:].hex()),  # UIP is read-only
                         ("ram", ram[:-1].hex()),                                    # 127 bytes
                         ("last_c_read_ns", -1)]:
        assert_refused(target.load_state, {**state, field: value}, target.save_state)


# === i8042, exit port, port 0x80 =======================================================

i8042_ops = st.one_of(
    st.tuples(st.just("w"), st.sampled_from([0, 4, 1]),
              st.one_of(st.sampled_from([0xD0, 0xD1, 0xFE, 0xF0, 0xF1, 0x00, 0x01, 0x03, 0xAA]), st.integers(0, 0xFF))),
    st.tuples(st.just("r"), st.sampled_from([0, 4, 1])),
)


def i8042_apply(k: I8042, op: tuple) -> object:
    if op[0] == "w":
        k.io_write(op[1], 1, op[2])
        return k.output_port
    return k.io_read(op[1], 1)


def make_i8042() -> tuple[I8042, list]:
    resets: list = []
    return I8042(lambda: resets.append("reset")), resets


@FUZZ
@given(ops=st.lists(i8042_ops, min_size=10, max_size=40))
def test_i8042_restored_behaves_the_same(ops: list) -> None:
    a, log = make_i8042()

    def restore(state: dict) -> tuple[I8042, list]:
        b, b_log = make_i8042()
        b.load_state(state)
        return b, b_log

    lockstep(a, ops, i8042_apply, log, saved, restore)


def test_i8042_command_and_output_byte_survive() -> None:
    a, _ = make_i8042()
    a.io_write(4, 1, 0xD0)                       # read output port: one byte waits at 0x60
    b, _ = make_i8042()
    b.load_state(as_json(a.save_state()))
    assert b.io_read(4, 1) & 1 and b.io_read(0, 1) == 0x03 and not b.io_read(4, 1) & 1
    a.io_write(4, 1, 0xD1)                       # write output port: waits for its data byte
    c, resets = make_i8042()
    c.load_state(as_json(a.save_state()))
    c.io_write(0, 1, 0x02)                       # reset line low
    assert resets == ["reset"] and c.output_port == 0x02


def test_small_devices_damaged_states_are_refused() -> None:
    a, _ = make_i8042()
    a.io_write(4, 1, 0xD1)
    k, resets = make_i8042()
    assert assert_all_damage_refused(k.load_state, as_json(a.save_state()), k.save_state) > 20
    for bad in ({"output_port": 3, "pending_command": 0xD0, "output_buffer": []},
                {"output_port": 3, "pending_command": None, "output_buffer": [1, 2]}):
        assert_refused(k.load_state, bad, k.save_state)
    assert resets == []
    exits: list[int] = []
    port = ExitPort(exits.append)
    port.load_state(as_json(port.save_state()))
    assert_all_damage_refused(port.load_state, {}, lambda: exits)
    port.io_write(0, 1, 0x103)
    assert exits == [3]
    sink = PortSink()
    sink.io_write(0, 1, 0x42)
    other = PortSink()
    other.load_state(as_json(sink.save_state()))
    assert other.io_read(0, 1) == 0x42 and other.writes == 0
    assert_all_damage_refused(other.load_state, sink.save_state(), other.save_state)


# === PV clock event device =========================================================

class PvHost:
    def __init__(self, now: int = 1_000_000) -> None:
        self.t = now
        self.log: list[tuple] = []

    def now(self) -> int:
        return self.t

    def arm(self, host_ns: int) -> None:
        self.log.append(("arm", host_ns))

    def disarm(self) -> None:
        self.log.append(("disarm",))

    def fire(self) -> None:
        self.log.append(("fire",))

    def route(self, route: tuple[str, int]) -> None:
        self.log.append(("route", route))


class ByteRam:
    """Guest RAM without ``view``: the model's read_u64/write_u64 path."""

    def __init__(self, data: bytes = bytes(0x4000)) -> None:
        self.buf = bytearray(data)

    def is_ram(self, gpa: int, size: int = 1) -> bool:
        return 0 <= gpa and gpa + size <= len(self.buf)

    def read_u64(self, gpa: int) -> int:
        return struct.unpack_from("<Q", self.buf, gpa)[0]

    def write_u64(self, gpa: int, value: int) -> None:
        struct.pack_into("<Q", self.buf, gpa, value)

    def write_u32(self, gpa: int, value: int) -> None:
        struct.pack_into("<I", self.buf, gpa, value)

    def read(self, gpa: int, size: int) -> bytes:
        return bytes(self.buf[gpa:gpa + size])


def ram_copy(mem: GuestMemory | ByteRam) -> GuestMemory | ByteRam:
    """What a snapshot does with guest RAM: the same bytes, in a new mapping."""
    if isinstance(mem, ByteRam):
        return ByteRam(bytes(mem.buf))
    new = GuestMemory(mem.size)
    new.write(0, mem.read(0, mem.size))
    return new


SHM = 0x1000
VEC = 0xEC
_CONTROLS = [p.CTRL_ENABLE | VEC << 8, p.CTRL_ENABLE | VEC << 8, p.CTRL_ENABLE | p.CTRL_SHARED | VEC << 8,
             p.CTRL_ENABLE | p.CTRL_RELATIVE | VEC << 8, p.CTRL_ENABLE | p.CTRL_ROUTE_GSI | 5 << 16, 0,
             p.CTRL_ENABLE | 0x10 << 8, p.CTRL_ENABLE | p.CTRL_ROUTE_GSI | 2 << 16,
             p.CTRL_ENABLE | p.CTRL_SHARED | p.CTRL_RELATIVE | VEC << 8]  # the last three are refused
_SOON = st.integers(-2000, 6000)    # ns from the guest's "now" (deadlines in the past are due at once)
_ANY64 = st.integers(0, (1 << 64) - 1)
_READS = [p.REG_STATUS, p.REG_STATUS + 4, p.REG_SYNC_ERROR, p.REG_GUEST_NOW, p.REG_DEADLINE, p.REG_CONTROL,
          p.REG_SHARED_GPA, p.REG_FEATURES]
pv_ops = st.one_of(
    st.tuples(st.just("deadline"), _SOON), st.tuples(st.just("deadline"), _SOON),
    st.tuples(st.just("deadline"), st.just(p.NEVER)),
    st.tuples(st.just("tick"), st.integers(0, 3000)), st.tuples(st.just("tick"), st.integers(0, 3000)),
    st.tuples(st.just("expire")), st.tuples(st.just("expire")), st.tuples(st.just("bell")),
    st.tuples(st.just("shm"), _SOON), st.tuples(st.just("shm"), st.just(p.NEVER)),
    st.tuples(st.just("r"), st.sampled_from(_READS), st.sampled_from([4, 8])),
    st.tuples(st.just("r"), st.sampled_from(range(0, 0x58, 4)), st.sampled_from([4, 8])),
    st.tuples(st.just("sync"), st.sampled_from([8, 4]), st.integers(-500, 500),
              st.one_of(st.none(), st.integers(-500, 500))),
    st.tuples(st.just("w"), st.just(p.REG_CONTROL), st.just(4), st.sampled_from(_CONTROLS)),
    st.tuples(st.just("w"), st.sampled_from([p.REG_CONTROL, p.REG_DEADLINE, p.REG_DEADLINE + 4, p.REG_SYNC + 4,
                                             p.REG_SHARED_GPA, p.REG_SHARED_GPA + 4, p.REG_STATUS, p.REG_DOORBELL,
                                             0x60, 0x12]), st.sampled_from([4, 8, 2]), _ANY64),
    st.tuples(st.just("w"), st.just(p.REG_SHARED_GPA), st.just(8), st.sampled_from([SHM, SHM + 8, 0, 1 << 40])),
    st.tuples(st.just("w"), st.just(p.REG_STATUS), st.just(8), st.sampled_from([p.STS_W1C, p.STS_FIRED])),
)
pv_prelude = st.sampled_from([
    [],
    [("w", p.REG_CONTROL, 4, p.CTRL_ENABLE | VEC << 8)],
    [("w", p.REG_CONTROL, 4, p.CTRL_ENABLE | p.CTRL_RELATIVE | p.CTRL_ROUTE_GSI | 5 << 16)],
    [("w", p.REG_SHARED_GPA, 8, SHM), ("shm", p.NEVER), ("w", p.REG_CONTROL, 4, p.CTRL_ENABLE | p.CTRL_SHARED | VEC << 8)],
    [("w", p.REG_SHARED_GPA, 8, SHM), ("shm", p.NEVER), ("w", p.REG_CONTROL, 4, p.CTRL_ENABLE | p.CTRL_SHARED | VEC << 8),
     ("shm", 100), ("bell",), ("tick", 200), ("expire",)],  # fired: the block still holds the spent deadline
])


def pv_apply(dev: PvClockEvent, op: tuple) -> object:
    """One guest or host action; deadlines and SYNC times are relative to the guest's clock, as a guest's are."""
    kind, result = op[0], None
    now = dev.io_read(p.REG_GUEST_NOW, 8)
    if kind == "w":
        dev.io_write(op[1], op[2], op[3])
    elif kind == "r":
        result = dev.io_read(op[1], op[2])
    elif kind == "deadline":
        relative = dev.control & p.CTRL_RELATIVE
        dev.io_write(p.REG_DEADLINE, 8, op[1] if op[1] == p.NEVER else (op[1] % 8000 if relative else now + op[1]) & p.U64)
    elif kind == "sync":  # the handshake: SYNC (possibly in halves), then SYNC_END
        t1 = (now + op[2]) & p.U64
        if op[1] == 8:
            dev.io_write(p.REG_SYNC, 8, t1)
        else:
            dev.io_write(p.REG_SYNC, 4, t1 & 0xFFFF_FFFF)
            dev.io_write(p.REG_SYNC + 4, 4, t1 >> 32)
        if op[3] is not None:  # else the handshake is left open
            dev.io_write(p.REG_SYNC_END, 8, (t1 + op[3]) & p.U64)
    elif kind == "tick":
        dev.host.t += op[1]  # type: ignore[attr-defined]
    elif kind == "expire":
        dev.timer_expired()
    elif kind == "bell":
        dev.doorbell()
    else:
        dev.mem.write_u64(SHM + p.SHM_DEADLINE, op[1] if op[1] == p.NEVER else (now + op[1]) & p.U64)  # type: ignore
    return result, dev.armed_host_ns, dev.armed_deadline, dev.route, dev.mem.read(SHM, p.SHM_SIZE)  # type: ignore[union-attr]


def make_pv(mem: GuestMemory | ByteRam, now: int = 1_000_000) -> PvClockEvent:
    return PvClockEvent(PvHost(now), mem, tsc_khz=2_500_000, doorbell_in_kernel=True)


@FUZZ
@given(views=st.booleans(), pre=pv_prelude, ops=st.lists(pv_ops, min_size=10, max_size=50))
def test_pv_clock_event_restored_behaves_the_same(views: bool, pre: list, ops: list) -> None:
    a = make_pv(GuestMemory(1 << 20) if views else ByteRam())
    for op in pre:
        pv_apply(a, op)

    def restore(state: dict) -> tuple[PvClockEvent, list]:
        b = make_pv(ram_copy(a.mem), a.host.t)  # type: ignore[arg-type, attr-defined]
        b.load_state(state)
        return b, b.host.log  # type: ignore[attr-defined]

    lockstep(a, ops, pv_apply, a.host.log, saved, restore, every=2)  # type: ignore[attr-defined]


def test_pv_clock_event_armed_deadline_survives() -> None:
    a = make_pv(ByteRam())
    a.io_write(p.REG_CONTROL, 4, p.CTRL_ENABLE | VEC << 8)
    a.io_write(p.REG_DEADLINE, 8, 1_500_000)
    a.io_write(p.REG_STATUS, 8, p.STS_W1C)
    b = make_pv(ram_copy(a.mem))  # type: ignore[arg-type]
    b.load_state(as_json(a.save_state()))
    assert b.host.log == []  # type: ignore[attr-defined]
    assert b.armed_host_ns == 1_500_000 and b.armed_deadline == 1_500_000 and b.route == ("msi", VEC)
    assert b.io_read(p.REG_STATUS, 8) & p.STS_ARMED
    b.host.t = 1_500_000  # type: ignore[attr-defined]
    b.timer_expired()
    assert b.host.log == [("fire",)] and b.io_read(p.REG_STATUS, 8) == p.STS_FIRED | 1 << 32  # type: ignore[attr-defined]


def test_pv_clock_event_shared_block_and_half_written_deadline_survive() -> None:
    a = make_pv(GuestMemory(1 << 20))
    a.io_write(p.REG_SHARED_GPA, 8, SHM)
    a.mem.write_u64(SHM + p.SHM_DEADLINE, p.NEVER)  # type: ignore[union-attr]
    a.io_write(p.REG_CONTROL, 4, p.CTRL_ENABLE | p.CTRL_SHARED | VEC << 8)
    a.mem.write_u64(SHM + p.SHM_DEADLINE, 1_004_000)  # type: ignore[union-attr]
    a.doorbell()
    a.io_write(p.REG_SYNC, 4, 123)                    # low half of SYNC: not committed yet
    b = make_pv(ram_copy(a.mem))  # type: ignore[arg-type]
    b.load_state(as_json(a.save_state()))
    assert b.armed_deadline == 1_004_000 and b.shared_gpa == SHM and b.host.log == []  # type: ignore[attr-defined]
    b.mem.write_u64(SHM + p.SHM_DEADLINE, 1_002_000)  # type: ignore[union-attr]
    b.doorbell()                                       # earlier: re-armed from the restored block
    assert b.host.log == [("arm", 1_002_000)] and b.mem.read_u64(SHM + p.SHM_ARMED) == 1_002_000  # type: ignore
    b.io_write(p.REG_SYNC + 4, 4, 0)                  # the high half commits the saved low half
    b.io_write(p.REG_SYNC_END, 8, 125)
    assert b.io_read(p.REG_SYNC_ERROR, 8) == 1


def test_pv_clock_event_damaged_states_are_refused() -> None:
    a = make_pv(ByteRam())
    a.io_write(p.REG_CONTROL, 4, p.CTRL_ENABLE | VEC << 8)
    a.io_write(p.REG_DEADLINE, 8, 1_500_000)
    a.io_write(p.REG_SYNC, 8, 5)
    state = as_json(a.save_state())
    target = make_pv(ByteRam())
    target.io_write(p.REG_SHARED_GPA, 8, SHM)
    observe = lambda: (target.save_state(), list(target.host.log))  # type: ignore[attr-defined]  # noqa: E731
    assert assert_all_damage_refused(target.load_state, state, observe) > 80
    disabled = p.CTRL_RELATIVE | VEC << 8
    for field, value in [("control", disabled),                       # armed but disabled
                         ("route", ["msi", 0x30]),                    # not the vector CONTROL names
                         ("route", ["gsi", 2]),
                         ("control", p.CTRL_ENABLE | p.CTRL_SHARED | VEC << 8),  # shared mode without a block
                         ("shared_gpa", SHM + 8),                     # misaligned
                         ("shared_gpa", 1 << 40),                     # not RAM
                         ("target_deadline", p.NEVER),                # armed for "never"
                         ("features", 0),
                         ("sync_start", [1, 2, 3]),
                         ("latch", {"deadline": 1 << 32, "sync": None, "sync_end": None, "shared_gpa": None})]:
        assert_refused(target.load_state, {**state, field: value}, observe)
    no_ram = PvClockEvent(PvHost(), None)
    shared = make_pv(ByteRam())
    shared.io_write(p.REG_SHARED_GPA, 8, SHM)
    assert_refused(no_ram.load_state, as_json(shared.save_state()), no_ram.save_state)


# === PCI functions and the bus =======================================================

class Recorder:
    """A BusDevice (0xCF9 passthrough, or a live capability) that logs what reaches it."""

    def __init__(self, log: list, name: str) -> None:
        self.log, self.name = log, name

    def io_read(self, offset: int, size: int) -> int:
        self.log.append((self.name, "r", offset, size))
        return 0x5A5A5A5A5A5A5A5A & ((1 << (8 * size)) - 1)

    def io_write(self, offset: int, size: int, value: int) -> None:
        self.log.append((self.name, "w", offset, size, value))


def pci_rig() -> tuple[PciBus, PciHostBridge, PciFunction, int, list]:
    log: list = []
    bus = PciBus(passthrough=Recorder(log, "cf9"))
    bridge = PciHostBridge()
    bus.add(0, bridge)
    f = PciFunction(0x1AF4, 0x1041, 0x020000, irq=lambda level: log.append(("irq", level)))
    f.add_bar(0, 32, "io")
    f.add_bar(1, 0x1000, "mem32")
    f.add_bar(2, 0x4000, "mem64")
    f.on_bar_change = lambda i, old, new: log.append(("bar", i, old, new))
    cap = f.add_capability(0x09, b"\x11\x22\x33\x44", writable=b"\x00\xff\x0f\x00",
                           on_write=lambda old, new: log.append(("cap", old, new)))
    f.add_capability(0x09, bytes(6), handler=Recorder(log, "live"))
    bus.add(3, f)
    return bus, bridge, f, cap, log


_REGS = [0x00, 0x04, 0x06, 0x0C, 0x10, 0x14, 0x18, 0x1C, 0x30, 0x34, 0x3C, 0x40, 0x44, 0x4C, 0x50]
pci_ops = st.one_of(
    st.tuples(st.just("select"), st.sampled_from([0, 3, 3, 3, 5]), st.sampled_from(_REGS + [0x80, 0xFC]),
              st.booleans()),
    st.tuples(st.just("w"), st.integers(0, 3), st.sampled_from([1, 2, 4]),
              st.one_of(st.sampled_from([0xFFFF_FFFF, 0x7, 0x407, 0x0, 0xC000, 0xFEBF_0000, 0xF800_0000, 0x1000]),
                        st.integers(0, 0xFFFF_FFFF))),
    st.tuples(st.just("r"), st.integers(0, 3), st.sampled_from([1, 2, 4])),
    st.tuples(st.just("raw_w"), st.integers(-2, 9), st.integers(1, 8), st.integers(0, (1 << 64) - 1)),
    st.tuples(st.just("raw_r"), st.integers(-2, 9), st.integers(1, 8)),
    st.tuples(st.just("intx"), st.booleans()),
    st.tuples(st.just("inhibit"), st.booleans()),
    st.tuples(st.just("signal"), st.integers(0, 0xFFFF)),
    st.tuples(st.just("body"), st.binary(min_size=4, max_size=4)),
)


def pci_apply(rig: tuple, op: tuple) -> object:
    bus, _bridge, f, cap, _log = rig
    kind, result = op[0], None
    if kind == "select":
        bus.io_write(0, 4, (op[3] << 31) | (op[1] << 11) | op[2])
    elif kind == "w":
        bus.io_write(4 + op[1], op[2], op[3])
    elif kind == "r":
        result = bus.io_read(4 + op[1], op[2])
    elif kind == "raw_w":
        bus.io_write(op[1], op[2], op[3])
    elif kind == "raw_r":
        result = bus.io_read(op[1], op[2])
    elif kind == "intx":
        f.set_intx(op[1])
    elif kind == "inhibit":
        f.set_intx_inhibit(op[1])
    elif kind == "signal":
        f.signal_status(op[1])
    else:
        f.set_capability_body(cap, op[1])
    return result, f.intx_asserted, [f.bar_address(i) for i in (0, 1, 2)], f.command, f.status


def pci_save(rig: tuple) -> dict:
    bus, bridge, f, _, _ = rig
    return as_json({"bus": bus.save_state(), "bridge": bridge.save_state(), "function": f.save_state()})


def pci_load(rig: tuple, state: dict) -> None:
    bus, bridge, f, _, _ = rig
    bus.load_state(state["bus"])
    bridge.load_state(state["bridge"])
    f.load_state(state["function"])


def pci_config(reg: int, size: int, value: int) -> list[tuple]:
    return [("select", 3, reg & 0xFC, True), ("w", reg & 3, size, value)]


pci_prelude = st.sampled_from([
    [],
    pci_config(0x10, 4, 0xC000) + pci_config(0x14, 4, 0xFEBF_0000) + pci_config(0x18, 4, 0xF800_0000)
    + pci_config(PCI_COMMAND, 2, 0x7) + [("intx", True)],
    pci_config(0x14, 4, 0xFEBF_0000) + pci_config(PCI_COMMAND, 2, 0x2) + pci_config(0x3C, 1, 11) + [("select", 3, 0x40, True)],
])


@FUZZ
@given(pre=pci_prelude, ops=st.lists(pci_ops, min_size=10, max_size=50))
def test_pci_restored_behaves_the_same(pre: list, ops: list) -> None:
    a = pci_rig()
    for op in pre:
        pci_apply(a, op)

    def restore(state: dict) -> tuple[tuple, list]:
        b = pci_rig()
        pci_load(b, state)
        return b, b[4]

    lockstep(a, ops, pci_apply, a[4], pci_save, restore, every=2)


def test_pci_bar_decode_and_asserted_intx_survive() -> None:
    a = pci_rig()
    _, _, f, _, _ = a
    f.config_write(0x14, 4, 0xFEBF_0000)
    f.config_write(0x10, 4, 0xC000)
    f.config_write(PCI_COMMAND, 2, 0x7)
    f.config_write(0x3C, 1, 11)
    f.set_intx(True)
    f.signal_status(1 << 13)
    a[0].io_write(0, 4, 0x8000_1800 | 0x3C)
    b = pci_rig()
    pci_load(b, pci_save(a))
    bus, _, g, _, log = b
    assert log == []                                   # no on_bar_change, no irq: the machine re-syncs
    assert g.bar_address(1) == 0xFEBF_0000 and g.bar_address(0) == 0xC000 and g.bar_address(2) is None
    assert g.intx_asserted and g.status & (1 << 3) and g.status & (1 << 13)
    assert bus.io_read(4, 1) == 11                     # CONFIG_ADDRESS still selects 00:03.0 register 0x3C
    g.set_intx(False)
    assert log == [("irq", False)]
    g.config_write(PCI_COMMAND, 2, 0)
    assert ("bar", 1, 0xFEBF_0000, None) in log


def test_pci_damaged_states_are_refused() -> None:
    a = pci_rig()
    a[2].config_write(PCI_COMMAND, 2, 0x7)
    a[2].set_intx(True)
    state = pci_save(a)
    bus, bridge, f, _, log = pci_rig()
    f.config_write(0x14, 4, 0xFEBF_0000)
    log.clear()
    observe = lambda: (f.save_state(), bus.save_state(), list(log))  # noqa: E731
    assert assert_all_damage_refused(f.load_state, state["function"], observe) > 20
    assert_all_damage_refused(bus.load_state, state["bus"], observe)
    cfg = bytes.fromhex(state["function"]["config"])

    def with_byte(off: int, value: int) -> dict:
        return {**state["function"], "config": (cfg[:off] + bytes([value]) + cfg[off + 1:]).hex()}

    assert "read-only" in str(assert_refused(f.load_state, with_byte(0, 0x86), observe))  # another vendor
    assert_refused(f.load_state, with_byte(0x10, 0x00), observe)         # I/O BAR's space bit cleared
    assert_refused(f.load_state, with_byte(PCI_STATUS, 0x10), observe)   # Interrupt Status without intx_level
    assert_refused(f.load_state, {**state["function"], "intx": False}, observe)  # not the level the bytes give
    assert_refused(bridge.load_state, state["function"], bridge.save_state)     # another device's bytes
    assert_refused(bus.load_state, {"config_address": 0x8000_0003}, observe)      # reserved bits


# === MSI-X ==========================================================================

class MsixLog:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def route_changed(self, vector: int, address: int, data: int, masked: bool) -> None:
        self.events.append(("route", vector, address, data, masked))

    def deliver(self, vector: int) -> None:
        self.events.append(("deliver", vector))


def msix_rig(vectors: int = 4) -> tuple[PciFunction, Msix, MsixLog]:
    log = MsixLog()
    f = PciFunction(0x1AF4, 0x1041, 0x020000, irq=lambda level: log.events.append(("irq", level)))
    f.add_bar(1, 0x1000, "mem32")
    m = Msix(vectors, 1, 0, 1, 0x800, host=log)
    m.add_to(f)
    return f, m, log


msix_ops = st.one_of(
    st.tuples(st.just("tw"), st.integers(0, 3), st.sampled_from([0, 4, 8, 12]), st.sampled_from([4, 8]),
              st.one_of(st.sampled_from([0, 1, 0xFEE0_0000, 0xFEE0_1003, 0x4041]), st.integers(0, (1 << 64) - 1))),
    st.tuples(st.just("tw_raw"), st.integers(-4, 80), st.integers(1, 8), st.integers(0, (1 << 64) - 1)),
    st.tuples(st.just("tr"), st.integers(-4, 80), st.sampled_from([4, 8, 2])),
    st.tuples(st.just("pba"), st.sampled_from([0, 4]), st.sampled_from([4, 8])),
    st.tuples(st.just("ctrl"), st.sampled_from([0, 0x8000, 0xC000, 0x4000, 0xFFFF])),
    st.tuples(st.just("notify"), st.integers(-1, 5)),
    st.tuples(st.just("clear"), st.integers(0, 3)),
    st.tuples(st.just("intx"), st.booleans()),
)


def msix_apply(rig: tuple, op: tuple) -> object:
    f, m, _ = rig
    kind, result = op[0], None
    if kind == "tw":  # an aligned dword or qword, as a driver writes
        if op[2] % op[3] == 0:
            m.table.io_write(op[1] * MSIX_ENTRY_SIZE + op[2], op[3], op[4])
    elif kind == "tw_raw":
        m.table.io_write(op[1], op[2], op[3])
    elif kind == "tr":
        result = m.table.io_read(op[1], op[2])
    elif kind == "pba":
        result = m.pba.io_read(op[1], op[2])
    elif kind == "ctrl":
        assert m.cap_offset is not None
        f.config_write(m.cap_offset + 2, 2, op[1])
    elif kind == "notify":
        result = m.notify(op[1])
    elif kind == "clear":
        m.clear_pending(op[1])
    else:
        f.set_intx(op[1])
    return (result, m.enabled, m.function_masked, [m.entry(v) for v in range(m.vectors)],
            [m.is_pending(v) for v in range(m.vectors)], f.intx_asserted)


def msix_save(rig: tuple) -> dict:
    return as_json({"function": rig[0].save_state(), "msix": rig[1].save_state()})


def msix_load(rig: tuple, state: dict) -> None:
    rig[0].load_state(state["function"])
    rig[1].load_state(state["msix"])


msix_prelude = st.sampled_from([[], [("ctrl", 0xC000), ("tw", 1, 0, 4, 0xFEE0_0000), ("tw", 1, 8, 4, 0x41),
                                     ("tw", 1, 12, 4, 0), ("notify", 1)]])


@FUZZ
@given(pre=msix_prelude, ops=st.lists(msix_ops, min_size=10, max_size=50))
def test_msix_restored_behaves_the_same(pre: list, ops: list) -> None:
    a = msix_rig()
    for op in pre:
        msix_apply(a, op)

    def restore(state: dict) -> tuple[tuple, list]:
        b = msix_rig()
        msix_load(b, state)
        return b, b[2].events

    lockstep(a, ops, msix_apply, a[2].events, msix_save, restore, every=2)


def test_msix_pending_vector_survives_and_is_sent_when_unmasked() -> None:
    a = msix_rig()
    f, m, _ = a
    assert m.cap_offset is not None
    f.config_write(m.cap_offset + 2, 2, 0xC000)          # enable with Function Mask, as Linux does
    m.table.io_write(2 * MSIX_ENTRY_SIZE, 4, 0xFEE0_0000)
    m.table.io_write(2 * MSIX_ENTRY_SIZE + 8, 4, 0x41)
    m.table.io_write(2 * MSIX_ENTRY_SIZE + 12, 4, 0)
    assert m.notify(2) and m.is_pending(2)
    b = msix_rig()
    msix_load(b, msix_save(a))
    g, n, log = b
    assert log.events == [] and n.is_pending(2) and n.enabled and n.function_masked
    assert n.entry(2).address == 0xFEE0_0000 and n.entry(2).data == 0x41 and n.entry(2).masked
    assert n.pba.io_read(0, 8) == 1 << 2
    assert n.cap_offset is not None
    g.config_write(n.cap_offset + 2, 2, 0x8000)          # clear Function Mask
    assert ("route", 2, 0xFEE0_0000, 0x41, False) in log.events and log.events[-1] == ("deliver", 2)
    assert not n.is_pending(2)


def test_msix_damaged_states_are_refused() -> None:
    a = msix_rig()
    a[1].table.io_write(0, 4, 0xFEE0_0000)
    state = msix_save(a)["msix"]
    f, m, log = msix_rig()
    observe = lambda: (m.save_state(), [m.entry(v) for v in range(4)], list(log.events))  # noqa: E731
    assert assert_all_damage_refused(m.load_state, state, observe) > 20
    table = bytes.fromhex(state["table"])
    open_vector = {**state, "enabled": True, "table": (table[:12] + bytes(4) + table[16:]).hex(), "pba": "01" + "00" * 7}
    assert_refused(m.load_state, open_vector, observe)                              # pending on an open vector
    assert_refused(m.load_state, {**state, "pba": "10" + "00" * 7}, observe)       # vector 4 of a 4-vector table
    assert_refused(m.load_state, {**state, "table": "03" + state["table"][2:]}, observe)  # address bits 1:0
    assert_refused(m.load_state, {**state, "table": state["table"][:-2] + "03"}, observe)  # reserved control bit
    _, bigger, _ = msix_rig(8)
    assert_refused(bigger.load_state, state, bigger.save_state)                     # another table size


def test_state_error_names_the_device_and_field() -> None:
    u = Uart16550()
    with pytest.raises(StateError, match=r"16550A UART.*'ier'"):
        u.load_state({**u.save_state(), "ier": 0x10})
    with pytest.raises(StateError, match=r"CMOS RTC has no 'ram' field"):
        Cmos().load_state({k: v for k, v in Cmos().save_state().items() if k != "ram"})
