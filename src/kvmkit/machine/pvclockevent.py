"""Host side of the paravirtual clock event device (docs/pv-clockevent.md).

Per vCPU: a register window on the MMIO bus (the pure model in
``kvmkit.devices.pvclockevent``), a timerfd on CLOCK_MONOTONIC armed with
TFD_TIMER_ABSTIME, an eventfd bound to the vCPU's interrupt with KVM_IRQFD,
and an eventfd bound to the DOORBELL register with KVM_IOEVENTFD, so a
doorbell completes inside the host kernel: the vCPU never exits to user
space for it and never waits for this side.

The timerfds and doorbell eventfds are served by the machine's one host
event loop, registered edge-triggered: an expiry is timerfd readable -> the
model decides -> eventfd_write on the irqfd -> KVM injects. No vCPU exit
reaches kvmkit on that path. Register writes (CONTROL, a DEADLINE in
register mode) come from the vCPU thread and arm the timerfd directly; the
model's lock orders them against the loop thread.

Interrupt routing: MSI to the vCPU's local APIC with the guest's vector
(a per-vCPU GSI carrying an MSI route), or an edge on an ISA GSI the guest
names. Routes are installed through the machine's :class:`GsiRouter`,
which owns KVM's routing table; a guest that never asks for MSI delivery
keeps KVM's default table.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from typing import Callable, Protocol

from ..devices import pvclockevent as pv
from ..devices.state import StateError, StateReader
from ..host.loop import EventLoop
from ..host.timerfd import TimerFd
from ..kvm.constants import Cap
from ..kvm.system import KvmError, Vm
from ..memory import GuestMemory
from .bus import Bus
from .pc import LAPIC_BASE, PcMap

log = logging.getLogger(__name__)


class GsiRouter(Protocol):
    """The machine's KVM interrupt routing, as far as this device needs it."""

    def msi_gsi(self, owner: str, address: int, data: int) -> int:
        """A GSI that delivers this MSI message (allocated once per ``owner``, re-pointed on later calls)."""
        ...


def lapic_msi(apic_id: int, vector: int) -> tuple[int, int]:
    """(address, data) of an MSI to one local APIC: fixed delivery, physical destination, edge."""
    return LAPIC_BASE | ((apic_id & 0xFF) << 12), vector & 0xFF


class KvmPvClockEventHost:
    """One vCPU's device on the host: timerfd, irqfd and doorbell; the model's :class:`PvClockEventHost`."""

    def __init__(self, owner: "PvClockEvents", index: int) -> None:
        self.owner = owner
        self.index = index
        self.timer = TimerFd()
        self.irq_efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.bell_efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.irqfd_gsi: int | None = None
        self.model: pv.PvClockEvent | None = None
        self.expiries = 0   # timerfd wake-ups seen by the host loop
        self.bells = 0      # doorbell wake-ups seen by the host loop
        self.armed_at = 0
        # Host loop wake-up minus the armed time, per timer wake-up (bounded):
        # the latency this Python side adds before the model even runs.
        self.wake_late_ns: collections.deque[int] = collections.deque(maxlen=100_000)

    # --- PvClockEventHost --------------------------------------------------------
    now = staticmethod(time.monotonic_ns)

    def arm(self, host_ns: int) -> None:
        self.armed_at = host_ns
        if not self.owner.closed:
            self.timer.set_abs(host_ns)

    def disarm(self) -> None:
        if not self.owner.closed:
            self.timer.set_abs(0)

    def fire(self) -> None:
        if not self.owner.closed:
            try:
                os.eventfd_write(self.irq_efd, 1)
            except BlockingIOError:
                pass  # counter saturated: an interrupt is pending anyway

    def route(self, route: tuple[str, int]) -> None:
        self.owner.set_route(self, route)

    # --- host loop -----------------------------------------------------------------
    def on_timer(self) -> None:
        self.wake_late_ns.append(time.monotonic_ns() - self.armed_at)
        self.expiries += 1
        assert self.model is not None
        self.model.timer_expired()

    def on_doorbell(self) -> None:
        self.bells += 1
        assert self.model is not None
        self.model.doorbell()

    def close(self) -> None:
        self.timer.close()
        for fd in (self.irq_efd, self.bell_efd):
            try:
                os.close(fd)
            except OSError:
                pass


class PvClockEvents:
    """Every vCPU's paravirtual clock event device on one machine."""

    def __init__(self, vm: Vm, mem: GuestMemory, pc: PcMap, mmio_bus: Bus, loop: EventLoop, router: GsiRouter,
                 guest_tsc: Callable[[], int] | None = None) -> None:
        ncpus = pc.config.cpus
        self.vm = vm
        self.guest_tsc = guest_tsc  # the guest's TSC now (vCPU 0), for moving the clock offset at a restore
        self.loop = loop
        self.router = router
        self.closed = False
        tsc_khz = vm.get_tsc_khz()
        self.tsc_khz = tsc_khz
        in_kernel_bell = bool(vm.check_extension(Cap.IOEVENTFD))
        self.hosts: list[KvmPvClockEventHost] = []
        for i in range(ncpus):
            h = KvmPvClockEventHost(self, i)
            window = pc.pvclockevent_window(i)
            if in_kernel_bell:
                try:
                    vm.ioeventfd(h.bell_efd, window + pv.REG_DOORBELL, 4)
                except KvmError as e:
                    log.warning("pv clock event: no in-kernel doorbell for vCPU %d (%s)", i, e)
                    in_kernel_bell = False
            h.model = pv.PvClockEvent(h, mem, tsc_khz=tsc_khz, doorbell_in_kernel=in_kernel_bell)
            mmio_bus.register(window, pv.WINDOW_SIZE, h.model, f"pvclockevent{i}")
            # Edge-triggered: every expiry and every doorbell signal wakes
            # the loop once, so neither fd needs a read() per event (one
            # syscall less per wake-up); the model ignores stale expiries.
            loop.add_reader(h.timer.fd, h.on_timer, edge=True)
            loop.add_reader(h.bell_efd, h.on_doorbell, edge=True)
            self.hosts.append(h)

    def set_route(self, h: KvmPvClockEventHost, route: tuple[str, int]) -> None:
        """Bind h's irqfd to the GSI that delivers ``route`` (called from the model, its lock held)."""
        kind, n = route
        if kind == "msi":
            gsi = self.router.msi_gsi(f"pvclockevent{h.index}", *lapic_msi(h.index, n))
        else:
            gsi = n
        if h.irqfd_gsi is not None and h.irqfd_gsi != gsi:
            try:
                self.vm.irqfd(h.irq_efd, h.irqfd_gsi, deassign=True)
            except KvmError:
                pass
            h.irqfd_gsi = None
        if h.irqfd_gsi is None:
            self.vm.irqfd(h.irq_efd, gsi)
            h.irqfd_gsi = gsi

    # --- snapshot ------------------------------------------------------------------------
    def save_state(self) -> dict[str, object]:
        """Each vCPU's device, with the host clock and the guest's TSC when they were read.

        The pair lets a restore move each device's clock offset by what the
        host clock gained over what the guest clock gained.
        """
        return {"host_ns": time.monotonic_ns(), "tsc": self.guest_tsc() if self.guest_tsc else 0,
                "vcpus": [h.model.save_state() for h in self.hosts if h.model]}

    def load_state(self, state: object) -> None:
        """Load every vCPU's device, its clock offset moved to this host's clock; :meth:`resync` arms them.

        A device's offset is host CLOCK_MONOTONIC minus the guest's clock.
        Between the save and now the host clock moved by some amount (or
        restarted, after a host reboot), while the guest clock moved by what
        its TSC moved: nothing where KVM restores the TSC, the whole gap on a
        host that cannot offset it (nested PVM runs the guest on the host's
        TSC). The offset takes the difference, so an armed deadline expires
        after the guest time it still had to run. A guest whose clock is not
        its TSC re-syncs through SYNC/SYNC_END as it does at boot.
        """
        r = StateReader(state, "the PV clock event devices", ("host_ns", "tsc", "vcpus"))
        saved_ns = r.take_int("host_ns", 0, pv.U64)
        saved_tsc = r.take_int("tsc", 0, pv.U64)
        saved = r.take_list("vcpus", len(self.hosts), min_len=len(self.hosts))
        host_gain = time.monotonic_ns() - saved_ns
        guest_gain = 0
        if self.guest_tsc is not None and saved_tsc and self.tsc_khz:
            guest_gain = (self.guest_tsc() - saved_tsc) * 1_000_000 // self.tsc_khz
        shift = host_gain - guest_gain
        rebased = []
        for one in saved:
            if not isinstance(one, dict) or type(one.get("delta")) is not int:
                raise StateError("The saved state of the PV clock event device has no integer 'delta' field.")
            one = dict(one, delta=one["delta"] + shift)
            sync = one.get("sync_start")
            if isinstance(sync, list) and len(sync) == 2 and type(sync[1]) is int:
                one["sync_start"] = [sync[0], max(0, sync[1] + shift)]
            rebased.append(one)
        for h, one in zip(self.hosts, rebased):
            assert h.model is not None
            h.model.load_state(one)

    def resync(self) -> None:
        """Tell the host what the loaded devices want: their interrupt routes, armed timers and shared deadlines."""
        for h in self.hosts:
            m = h.model
            assert m is not None
            with m.lock:
                if m.route is not None:
                    self.set_route(h, m.route)
                if m.armed_host_ns is not None:
                    h.arm(m.armed_host_ns)
            # A doorbell the host loop had not served when the state was saved
            # is lost with the old process; the guest waits on a deadline it
            # already handed over. Re-reading the shared block is idempotent.
            m.doorbell()

    def close(self) -> None:
        """Release the fds (idempotent); call after the host loop has stopped."""
        if self.closed:
            return
        self.closed = True
        for h in self.hosts:
            for fd in (h.timer.fd, h.bell_efd):
                self.loop.remove_reader(fd)
            if h.model is not None:
                h.model.release()
                with h.model.lock:  # no vCPU is inside the model while its fds go
                    h.close()

    def stats(self) -> list[dict[str, int]]:
        out = []
        for h in self.hosts:
            m = h.model
            assert m is not None
            out.append({"vcpu": h.index, "arms": m.arms, "fires": m.fires, "doorbells_seen": h.bells,
                        "timer_wakeups": h.expiries, "rearms_later": m.rearms_later, "count": m.count})
        return out
