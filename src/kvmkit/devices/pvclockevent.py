"""Paravirtual clock event device: a per-vCPU one-shot timer in nanoseconds.

The register model only. It knows nothing of timerfds, eventfds or KVM: it
decides "arm the host timer at host time T", "disarm" or "raise the
interrupt now" and says so through :class:`PvClockEventHost` callbacks, which
``kvmkit.machine.pvclockevent`` implements with a timerfd, an irqfd and an
ioeventfd. The ABI is specified in ``docs/pv-clockevent.md``; the constants
below are its register map.

Times: the guest programs deadlines on *its* clock (Linux: CLOCK_MONOTONIC
as ``set_next_ktime`` hands it over). The host timer runs on the host's
CLOCK_MONOTONIC. ``host = guest + delta``; delta starts at 0 and is set by
the SYNC/SYNC_END handshake (the guest brackets one trapping write between
two readings of its clock, the host stamps the write: delta is known to
within half the bracket).

Thread safety: register accesses come from a vCPU thread, expiries and
doorbells from the host event loop; one lock serialises them. Callbacks
are made with the lock held, so they must not call back into the model.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Protocol

from kvmkit.devices.state import StateReader

# --- register map (offsets in the per-vCPU 4 KiB window) --------------------
REG_ID = 0x00           # RO u32: PVCE_MAGIC
REG_VERSION = 0x04      # RO u32: major << 16 | minor
REG_FEATURES = 0x08     # RO u32: FEAT_*
REG_TSC_KHZ = 0x0C      # RO u32: guest TSC frequency in kHz (0 = unknown)
REG_CONTROL = 0x10      # RW u32: CTRL_*
REG_DEADLINE = 0x18     # RW u64: absolute guest ns, or relative ns in CTRL_RELATIVE mode
REG_STATUS = 0x20       # RO u64, low bits write-1-to-clear: STS_*, count in bits 32..63
REG_SYNC = 0x28         # WO u64: guest clock at the start of the handshake (host stamps it)
REG_SYNC_END = 0x30     # WO u64: guest clock after the SYNC write returned
REG_SYNC_ERROR = 0x38   # RO u64: half-width of the last handshake's interval (ns); ~0 = none
REG_GUEST_NOW = 0x40    # RO u64: the host's reading of the guest clock (host now - delta)
REG_SHARED_GPA = 0x48   # RW u64: guest-physical address of the shared deadline block (0 = none)
REG_DOORBELL = 0x50     # WO u32: "re-read the shared block" (served in the kernel by an ioeventfd)
WINDOW_SIZE = 0x1000    # one page per vCPU

PVCE_MAGIC = 0x45435650  # "PVCE" in little-endian bytes
PVCE_VERSION = 0x0001_0000

FEAT_ABSOLUTE = 1 << 0
FEAT_RELATIVE = 1 << 1
FEAT_SHARED = 1 << 2
FEAT_DOORBELL_IN_KERNEL = 1 << 3  # the doorbell write completes without a userspace exit
FEAT_SYNC = 1 << 4

CTRL_ENABLE = 1 << 0
CTRL_RELATIVE = 1 << 1
CTRL_SHARED = 1 << 2
CTRL_ROUTE_GSI = 1 << 3  # 0: MSI to this vCPU's local APIC with VECTOR; 1: edge on GSI
CTRL_VECTOR_SHIFT = 8
CTRL_VECTOR_MASK = 0xFF << CTRL_VECTOR_SHIFT
CTRL_GSI_SHIFT = 16
CTRL_GSI_MASK = 0xFF << CTRL_GSI_SHIFT
CTRL_VALID = CTRL_ENABLE | CTRL_RELATIVE | CTRL_SHARED | CTRL_ROUTE_GSI | CTRL_VECTOR_MASK | CTRL_GSI_MASK

STS_FIRED = 1 << 0      # an expiry was delivered since the bit was last cleared
STS_MISSED = 1 << 1     # a deadline was already past when programmed (delivered at once)
STS_ERROR = 1 << 2      # the last CONTROL/SHARED_GPA/SYNC_END write was refused
STS_ARMED = 1 << 3      # RO: the host timer is armed
STS_W1C = STS_FIRED | STS_MISSED | STS_ERROR

# --- shared deadline block (guest RAM, 64-byte aligned) ---------------------
SHM_DEADLINE = 0x00     # u64, guest writes: absolute guest ns; >= NEVER = no deadline
SHM_ARMED = 0x08        # u64, host writes: the deadline the host timer is armed for; NEVER = none
SHM_COUNT = 0x10        # u32, host writes: expiries delivered
SHM_SIZE = 0x40
SHM_ALIGN = 0x40

NEVER = 1 << 63         # deadlines at or above this never expire
U64 = (1 << 64) - 1
MIN_VECTOR = 32         # vectors 0..31 are exceptions
MAX_GSI = 23            # IOAPIC pins; GSI 0 (the PIT) and 2 (the cascade) are refused

# A locked instruction (the uncontended mutex's cmpxchg) orders the host's
# store of ARMED before its re-read of DEADLINE, as the guest's mfence does.
_FENCE = threading.Lock()

_REGS64 = (REG_DEADLINE, REG_SYNC, REG_SYNC_END, REG_SHARED_GPA)  # writable 64-bit registers
_LATCHED = {"deadline": REG_DEADLINE, "sync": REG_SYNC, "sync_end": REG_SYNC_END, "shared_gpa": REG_SHARED_GPA}
_STATE_KEYS = ("features", "tsc_khz", "control", "deadline", "status", "count", "delta", "sync_error", "shared_gpa",
               "sync_start", "latch", "armed", "target_deadline", "fired_shared", "route")


def _route_ok(route: list[object]) -> bool:
    """A route a CONTROL write can set: ("msi", vector 32-255) or ("gsi", 1-23 but not 2)."""
    kind, n = route
    if type(n) is not int:
        return False
    return (kind == "msi" and MIN_VECTOR <= n <= 0xFF) or (kind == "gsi" and 0 < n <= MAX_GSI and n != 2)


class PvClockEventHost(Protocol):
    """What the model asks of the host side (all called with the model's lock held)."""

    def now(self) -> int:
        """Host CLOCK_MONOTONIC in ns."""
        ...

    def arm(self, host_ns: int) -> None:
        """(Re)arm this vCPU's host timer for an absolute host CLOCK_MONOTONIC time."""
        ...

    def disarm(self) -> None:
        ...

    def fire(self) -> None:
        """Raise this vCPU's timer interrupt now (edge)."""
        ...

    def route(self, route: tuple[str, int]) -> None:
        """Deliver future interrupts as ("msi", vector) to this vCPU, or as an edge on ("gsi", n)."""
        ...


class GuestRam(Protocol):
    """The part of :class:`kvmkit.memory.GuestMemory` the shared block needs."""

    def is_ram(self, gpa: int, size: int = 1) -> bool: ...

    def read_u64(self, gpa: int) -> int: ...

    def write_u64(self, gpa: int, value: int) -> None: ...

    def write_u32(self, gpa: int, value: int) -> None: ...


class PvClockEvent:
    """One vCPU's register window."""

    def __init__(self, host: PvClockEventHost, mem: GuestRam | None = None, *, tsc_khz: int = 0,
                 doorbell_in_kernel: bool = False) -> None:
        self.host = host
        self.mem = mem
        self.lock = threading.Lock()
        self.tsc_khz = tsc_khz & 0xFFFF_FFFF
        self.features = FEAT_ABSOLUTE | FEAT_RELATIVE | FEAT_SYNC | (FEAT_SHARED if mem is not None else 0)
        if doorbell_in_kernel and mem is not None:
            self.features |= FEAT_DOORBELL_IN_KERNEL
        self.control = 0
        self.deadline = NEVER
        self.status = 0
        self.count = 0
        self.delta = 0                   # host ns - guest ns
        self.sync_error = U64
        self.shared_gpa = 0
        self._sync_start: tuple[int, int] | None = None  # (guest t1, host stamp)
        self._latch: dict[int, int] = {}  # low dwords of 64-bit registers written in halves
        self._target: int | None = None  # host ns the timer is armed for
        self._guest_target = NEVER       # the guest deadline behind _target
        self._fired_shared = NEVER       # shared-block deadline that already fired
        self._route: tuple[str, int] | None = None
        self._shm_q: memoryview | None = None  # the shared block as u64s / u32s, when RAM offers views
        self._shm_i: memoryview | None = None
        # counters for tests and --stats
        self.arms = 0
        self.fires = 0
        self.doorbells = 0
        self.rearms_later = 0            # host-side re-arms for a deadline moved later without an exit

    # --- bus interface --------------------------------------------------------
    def io_read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4, 8) or offset < 0 or offset % size:
            return 0
        base = offset & ~7
        with self.lock:
            value = self._read64(base)
        return (value >> (8 * (offset - base))) & ((1 << (8 * size)) - 1)

    def io_write(self, offset: int, size: int, value: int) -> None:
        if size not in (4, 8) or offset < 0 or offset % size:
            return  # byte/word writes and unaligned writes are ignored (ABI: "defined as no-ops")
        value &= (1 << (8 * size)) - 1
        with self.lock:
            base = offset & ~7
            if base in _REGS64:
                if size == 8:
                    self._latch.pop(base, None)
                    self._write64(base, value)
                elif offset == base:
                    self._latch[base] = value
                else:  # high dword commits the register
                    self._write64(base, self._latch.pop(base, 0) | (value << 32))
            elif offset == REG_CONTROL:
                self._write_control(value & 0xFFFF_FFFF)
            elif offset == REG_STATUS:
                self.status &= ~(value & STS_W1C)
            elif offset == REG_DOORBELL:
                self._doorbell()

    # --- host side ------------------------------------------------------------
    def timer_expired(self) -> None:
        """The host timer went off (possibly stale: a re-arm may have raced it)."""
        with self.lock:
            if self._target is None or not self.control & CTRL_ENABLE:
                return
            if self.host.now() < self._target:
                return  # stale expiry; the timer is already armed for the later target
            self._target = None
            if self.control & CTRL_SHARED:
                self._evaluate_shared(expired=True)
            else:
                self._fire()

    def doorbell(self) -> None:
        """The guest rang the doorbell (through the ioeventfd, or a trapped write)."""
        with self.lock:
            self._doorbell()

    def release(self) -> None:
        """Drop the views of guest RAM (before the RAM is unmapped)."""
        with self.lock:
            for v in (self._shm_q, self._shm_i):
                if v is not None:
                    v.release()
            self._shm_q = self._shm_i = None
            self.shared_gpa = 0
            self._cancel()
            self.control &= ~CTRL_ENABLE

    @property
    def route(self) -> tuple[str, int] | None:
        return self._route

    @property
    def armed_host_ns(self) -> int | None:
        return self._target

    @property
    def armed_deadline(self) -> int | None:
        """The guest-clock deadline the host timer is armed for (None: not armed); host time is this + delta."""
        return self._guest_target if self._target is not None else None

    # --- snapshot ---------------------------------------------------------------
    def save_state(self) -> dict[str, object]:
        """Registers, half-written 64-bit registers, the handshake, the armed deadline and the route.

        Host time appears only in ``delta`` (host ns - guest ns) and in the
        host stamp of a SYNC awaiting its SYNC_END: the armed timer is saved
        as its guest deadline, so a restore under another host clock has
        only those two to rebase. Not saved: the statistics (arms, fires,
        doorbells, rearms_later), the host and guest RAM (the shared block's
        contents are guest RAM, which the snapshot holds anyway).
        """
        with self.lock:
            latch = {name: self._latch.get(reg) for name, reg in _LATCHED.items()}
            return {
                "features": self.features, "tsc_khz": self.tsc_khz, "control": self.control,
                "deadline": self.deadline, "status": self.status, "count": self.count, "delta": self.delta,
                "sync_error": self.sync_error, "shared_gpa": self.shared_gpa,
                "sync_start": None if self._sync_start is None else list(self._sync_start),
                "latch": latch, "armed": self._target is not None, "target_deadline": self._guest_target,
                "fired_shared": self._fired_shared,
                "route": None if self._route is None else list(self._route),
            }

    def load_state(self, state: Mapping[str, object]) -> None:
        """Become the device :meth:`save_state` described; StateError (and no change) if it is damaged.

        The host hears nothing: the machine then routes :attr:`route`, arms
        its timer at :attr:`armed_host_ns` (if not None), and the shared
        block is found again at :attr:`shared_gpa` (no RAM is read here).
        """
        r = StateReader(state, "the PV clock event device", _STATE_KEYS)
        r.require(r.take_int("features", 0, U64) == self.features, "features",
                  "it was saved from a device with other features (shared block, in-kernel doorbell)")
        tsc_khz = r.take_int("tsc_khz", 0, 0xFFFF_FFFF)
        control = r.take_int("control", 0, CTRL_VALID)
        deadline, sync_error, guest_target, fired_shared = (r.take_int(k, 0, U64) for k in (
            "deadline", "sync_error", "target_deadline", "fired_shared"))
        status = r.take_int("status", 0, STS_W1C)
        count = r.take_int("count", 0, 0xFFFF_FFFF)
        delta = r.take_int("delta", -U64, U64)
        shared_gpa = r.take_int("shared_gpa", 0, U64)
        r.require(control & ~CTRL_VALID == 0, "control", "it has bits outside the register")
        r.require(not shared_gpa or self._shared_ok(shared_gpa), "shared_gpa",
                  "it is not a 64-byte aligned block of guest RAM")
        sync = r.take_list("sync_start", 2, min_len=2) if r.state["sync_start"] is not None else None
        r.require(sync is None or all(type(v) is int and 0 <= v <= U64 for v in sync), "sync_start",
                  "it is not a guest time and a host time")
        lr = r.take_state("latch", _LATCHED)
        latch = {reg: lr.take_optional_int(name, 0, 0xFFFF_FFFF) for name, reg in _LATCHED.items()}
        route = r.take_list("route", 2, min_len=2) if r.state["route"] is not None else None
        r.require(route is None or _route_ok(route), "route", "it is not an MSI vector 32-255 or a GSI 1-23 other than 2")
        armed = r.take_bool("armed")
        if control & CTRL_ENABLE:
            gsi, vector = (control & CTRL_GSI_MASK) >> CTRL_GSI_SHIFT, (control & CTRL_VECTOR_MASK) >> CTRL_VECTOR_SHIFT
            r.require(route == (["gsi", gsi] if control & CTRL_ROUTE_GSI else ["msi", vector]), "route",
                      "an enabled device is routed as CONTROL says")
            r.require(not control & CTRL_SHARED or bool(shared_gpa and not control & CTRL_RELATIVE), "control",
                      "shared-block mode needs a block and absolute deadlines")
        r.require(not armed or bool(control & CTRL_ENABLE and guest_target < NEVER and guest_target + delta >= 0),
                  "armed", "only an enabled device with a deadline is armed")
        with self.lock:
            self.tsc_khz, self.control, self.deadline, self.status, self.count = tsc_khz, control, deadline, status, count
            self.delta, self.sync_error, self._guest_target, self._fired_shared = delta, sync_error, guest_target, fired_shared
            self._sync_start = None if sync is None else (sync[0], sync[1])
            self._latch = {reg: v for reg, v in latch.items() if v is not None}
            self._route = None if route is None else (route[0], route[1])
            self._target = guest_target + delta if armed else None
            self._set_shared_gpa(shared_gpa)

    # --- registers --------------------------------------------------------------
    def _read64(self, base: int) -> int:
        if base == REG_ID:
            return PVCE_MAGIC | (PVCE_VERSION << 32)
        if base == REG_FEATURES:
            return self.features | (self.tsc_khz << 32)
        if base == REG_CONTROL:
            return self.control
        if base == REG_DEADLINE:
            return self.deadline
        if base == REG_STATUS:
            armed = STS_ARMED if self._target is not None else 0
            return (self.status | armed) | ((self.count & 0xFFFF_FFFF) << 32)
        if base == REG_SYNC_ERROR:
            return self.sync_error
        if base == REG_GUEST_NOW:
            return (self.host.now() - self.delta) & U64
        if base == REG_SHARED_GPA:
            return self.shared_gpa
        return 0

    def _write64(self, base: int, value: int) -> None:
        if base == REG_DEADLINE:
            self.deadline = value
            if self.control & CTRL_SHARED:
                self._shm_write(SHM_DEADLINE, value)
                self._doorbell()
            elif self.control & CTRL_ENABLE:
                self._program(value)
        elif base == REG_SYNC:
            self._sync_start = (value, self.host.now())
        elif base == REG_SYNC_END:
            self._sync_end(value)
        elif base == REG_SHARED_GPA:
            if self.control & CTRL_ENABLE and self.control & CTRL_SHARED:
                self.status |= STS_ERROR  # cannot move the block while it is in use
                return
            if value and not self._shared_ok(value):
                self.status |= STS_ERROR
                return
            self._set_shared_gpa(value)

    def _set_shared_gpa(self, value: int) -> None:
        self.shared_gpa = value
        self._shm_q = self._shm_i = None
        view = getattr(self.mem, "view", None)
        if value and view is not None:
            try:  # zero-copy: the host loop reads the block on every event
                raw = view(value, SHM_SIZE)
                self._shm_q, self._shm_i = raw.cast("Q"), raw.cast("I")
            except Exception:
                self._shm_q = self._shm_i = None

    def _shared_ok(self, gpa: int) -> bool:
        return (self.mem is not None and gpa % SHM_ALIGN == 0 and gpa + SHM_SIZE <= U64
                and self.mem.is_ram(gpa, SHM_SIZE))

    def _write_control(self, value: int) -> None:
        value &= CTRL_VALID
        self._cancel()
        self._fired_shared = NEVER
        if value & CTRL_ROUTE_GSI:
            gsi = (value & CTRL_GSI_MASK) >> CTRL_GSI_SHIFT
            route = ("gsi", gsi)
            bad = gsi > MAX_GSI or gsi in (0, 2)
        else:
            vector = (value & CTRL_VECTOR_MASK) >> CTRL_VECTOR_SHIFT
            route = ("msi", vector)
            bad = vector < MIN_VECTOR
        if value & CTRL_ENABLE:
            bad = bad or bool(value & CTRL_SHARED and not self.shared_gpa)
            bad = bad or bool(value & CTRL_SHARED and value & CTRL_RELATIVE)
            if bad:
                self.status |= STS_ERROR
                value &= ~CTRL_ENABLE
        self.control = value
        if value & CTRL_ENABLE and route != self._route:
            self._route = route
            self.host.route(route)
        if value & CTRL_ENABLE and value & CTRL_SHARED:
            self._shm_write(SHM_ARMED, NEVER)
            self._evaluate_shared()

    def _sync_end(self, t2: int) -> None:
        start = self._sync_start
        self._sync_start = None
        if start is None or t2 < start[0]:
            self.status |= STS_ERROR
            return
        t1, host_stamp = start
        self.delta = host_stamp - (t1 + t2) // 2
        self.sync_error = (t2 - t1 + 1) // 2
        # A timer armed under the old delta is moved to the new one.
        if self._target is not None and self._guest_target < NEVER:
            if self.control & CTRL_SHARED:
                self._cancel()
                self._evaluate_shared()
            else:
                self._arm_guest(self._guest_target, programmed=False)

    # --- arming -----------------------------------------------------------------
    def _cancel(self) -> None:
        if self._target is not None:
            self._target = None
            self.host.disarm()

    def _program(self, value: int) -> None:
        """A DEADLINE write in register mode (the device is enabled)."""
        if value >= NEVER:
            self._cancel()
            return
        if self.control & CTRL_RELATIVE:
            guest = self.host.now() - self.delta + value
        else:
            guest = value
        self._arm_guest(guest)

    def _arm_guest(self, guest_deadline: int, programmed: bool = True) -> bool:
        """Arm for a guest-clock deadline; fire at once if it is due. True if it fired.

        ``programmed``: the guest just asked for it, so a due deadline is a
        late program (STS_MISSED), not an ordinary expiry."""
        target = guest_deadline + self.delta
        self._guest_target = guest_deadline
        if target <= self.host.now():
            if self._target is not None:
                self._target = None
                self.host.disarm()
            if programmed:
                self.status |= STS_MISSED
            self._fire()
            return True
        self._target = target
        self.arms += 1
        self.host.arm(target)
        return False

    def _fire(self) -> None:
        self.count = (self.count + 1) & 0xFFFF_FFFF
        self.fires += 1
        self.status |= STS_FIRED
        if self.control & CTRL_SHARED:
            self._fired_shared = self._guest_target
            self._shm_write(SHM_ARMED, NEVER)
            self._shm_write32(SHM_COUNT, self.count)
        self.host.fire()

    # --- shared block --------------------------------------------------------------
    def _doorbell(self) -> None:
        self.doorbells += 1
        if self.control & CTRL_ENABLE and self.control & CTRL_SHARED:
            self._evaluate_shared()

    def _evaluate_shared(self, expired: bool = False) -> None:
        """Bring the host timer in line with the block's deadline.

        Ordering (docs/pv-clockevent.md, "Shared block"): publish ARMED, then
        read DEADLINE again; if the guest changed it meanwhile, go round. The
        guest writes DEADLINE, then reads ARMED. One of the two sides always
        sees the other's store, so a deadline moved earlier is never lost.
        """
        for _ in range(64):  # a guest rewriting the block forever gets a bounded loop
            d = self._shm_read(SHM_DEADLINE)
            if d is None:
                return
            if d >= NEVER or d == self._fired_shared:
                self._cancel()
                self._shm_write(SHM_ARMED, NEVER)
                with _FENCE:
                    pass
                if self._shm_read(SHM_DEADLINE) == d:
                    return
                continue
            self._shm_write(SHM_ARMED, d)
            with _FENCE:
                pass
            if self._shm_read(SHM_DEADLINE) != d:
                continue
            if self._target is not None and self._guest_target == d:
                return  # already armed for it
            on_time = expired and d == self._guest_target
            if expired and d > self._guest_target:
                self.rearms_later += 1  # moved later with no exit: the host re-arms
            if not self._arm_guest(d, programmed=not on_time):
                return
            # It fired (ARMED is NEVER again): go round once more, so a deadline
            # the guest stored while we fired is not lost (it may have read the
            # old ARMED and not rung).
            expired = False

    def _shm_read(self, off: int) -> int | None:
        if self._shm_q is not None:
            return self._shm_q[off >> 3]
        if not self.shared_gpa or self.mem is None:
            return None
        try:
            return self.mem.read_u64(self.shared_gpa + off)
        except Exception:
            return None

    def _shm_write(self, off: int, value: int) -> None:
        if self._shm_q is not None:
            self._shm_q[off >> 3] = value & U64
        elif self.shared_gpa and self.mem is not None:
            try:
                self.mem.write_u64(self.shared_gpa + off, value & U64)
            except Exception:
                pass

    def _shm_write32(self, off: int, value: int) -> None:
        if self._shm_i is not None:
            self._shm_i[off >> 2] = value & 0xFFFF_FFFF
        elif self.shared_gpa and self.mem is not None:
            try:
                self.mem.write_u32(self.shared_gpa + off, value & 0xFFFF_FFFF)
            except Exception:
                pass
