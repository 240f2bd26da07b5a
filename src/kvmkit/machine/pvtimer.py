"""Host side of the paravirtual clock event device (docs/pv-clockevent.md).

Per vCPU: a register window on the MMIO bus (the pure model in
``kvmkit.devices.pvclockevent``), a timerfd on CLOCK_MONOTONIC armed with
TFD_TIMER_ABSTIME, an eventfd bound to the vCPU's interrupt with KVM_IRQFD,
and an eventfd bound to the DOORBELL register with KVM_IOEVENTFD, so a
doorbell completes inside the host kernel: the vCPU never exits to user
space for it and never waits for this side.

One host thread ("kvmkit-pvtimer") waits in epoll on every timerfd and
doorbell eventfd. An expiry is: timerfd readable -> the model decides ->
eventfd_write on the irqfd -> KVM injects. No vCPU exit reaches kvmkit on
that path. Register writes (CONTROL, a DEADLINE in register mode) come from
the vCPU thread and arm the timerfd directly; the model's lock orders them
against this thread.

Interrupt routing: MSI to the vCPU's local APIC with the guest's vector
(GSI 24 + vCPU index, an MSI routing entry), or an edge on an ISA GSI the
guest names. Installing MSI routes replaces KVM's routing table, so the
table written here always carries the PC's default IRQCHIP entries too.
It is written only when a guest first asks for MSI delivery; a guest that
never uses this device keeps KVM's own default table.
"""

from __future__ import annotations

import collections
import ctypes
import fcntl
import logging
import os
import select
import threading
import time
from typing import TYPE_CHECKING

from ..devices import pvclockevent as pv
from ..kvm import constants as kc
from ..kvm import structs as ks
from ..kvm.constants import Cap
from ..kvm.system import KvmError

if TYPE_CHECKING:
    from .machine import Machine

log = logging.getLogger(__name__)

PVCE_BASE = 0xFEA0_0000          # vCPU n's window at PVCE_BASE + n * 4 KiB
PVCE_MAX_CPUS = 256              # 1 MiB, below the IOAPIC at 0xfec00000
MSI_GSI_BASE = 24                # GSIs 24.. carry the per-vCPU MSI routes
KVM_GET_TSC_KHZ = (0xAE << 8) | 0xA3  # _IO(KVMIO, 0xa3), VM or vCPU fd

CLOCK_MONOTONIC = 1
TFD_TIMER_ABSTIME = 1
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = os.O_CLOEXEC


class _timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _timespec), ("it_value", _timespec)]


_libc = ctypes.CDLL(None, use_errno=True)
_timerfd_create = _libc.timerfd_create
_timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
_timerfd_create.restype = ctypes.c_int
_timerfd_settime = _libc.timerfd_settime
_timerfd_settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_timerfd_settime.restype = ctypes.c_int


class TimerFd:
    """A one-shot CLOCK_MONOTONIC timerfd armed at absolute times (ns)."""

    def __init__(self) -> None:
        fd = _timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_create: {os.strerror(err)}")
        self.fd = fd
        self._spec = _itimerspec()
        self._ptr = ctypes.addressof(self._spec)

    def set_abs(self, ns: int) -> None:
        """Arm for CLOCK_MONOTONIC time ``ns``; 0 disarms (a past time > 0 expires at once)."""
        v = self._spec.it_value
        v.tv_sec, v.tv_nsec = divmod(max(ns, 0), 1_000_000_000)
        if _timerfd_settime(self.fd, TFD_TIMER_ABSTIME, self._ptr, None) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_settime: {os.strerror(err)}")

    def read(self) -> int:
        """Expirations since the last read; 0 when none (the timer was re-armed meanwhile)."""
        try:
            return int.from_bytes(os.read(self.fd, 8), "little")
        except BlockingIOError:
            return 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class VcpuTimer:
    """The host resources behind one vCPU's window; the model's :class:`PvClockHost`."""

    def __init__(self, owner: "PvTimer", index: int) -> None:
        self.owner = owner
        self.index = index
        self.timer = TimerFd()
        self.irq_efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.bell_efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.irqfd_gsi: int | None = None
        self.model: pv.PvClockEvent | None = None
        self.expiries = 0   # timerfd wake-ups seen by the host thread
        self.bells = 0      # doorbell wake-ups seen by the host thread
        self.armed_at = 0
        # Host thread wake-up minus the armed time, per timer wake-up (bounded):
        # the latency this Python thread adds before the model even runs.
        self.wake_late_ns: collections.deque[int] = collections.deque(maxlen=100_000)

    # --- PvClockHost --------------------------------------------------------
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

    def close(self) -> None:
        self.timer.close()
        for fd in (self.irq_efd, self.bell_efd):
            try:
                os.close(fd)
            except OSError:
                pass


class PvTimer:
    """Every vCPU's paravirtual clock event device, and the thread that serves them."""

    def __init__(self, machine: "Machine", ncpus: int, base: int = PVCE_BASE) -> None:
        if not 1 <= ncpus <= PVCE_MAX_CPUS:
            raise ValueError(f"pv timer supports 1..{PVCE_MAX_CPUS} vCPUs")
        assert machine.vm is not None and machine.mem is not None
        self.machine = machine
        self.vm = machine.vm
        self.base = base
        self.closed = False
        self._routes: dict[int, tuple[str, int]] = {}
        self._msi_table_installed = False
        self._route_lock = threading.Lock()
        try:
            tsc_khz = fcntl.ioctl(self.vm.fd, KVM_GET_TSC_KHZ)
        except OSError:
            tsc_khz = 0
        in_kernel_bell = bool(self.vm.check_extension(Cap.IOEVENTFD))
        self.cpus: list[VcpuTimer] = []
        self._stop_efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep = select.epoll()
        self._ep.register(self._stop_efd, select.EPOLLIN)
        self._dispatch: dict[int, tuple[VcpuTimer, bool]] = {}
        for i in range(ncpus):
            vt = VcpuTimer(self, i)
            window = base + i * pv.WINDOW_SIZE
            if in_kernel_bell:
                try:
                    self.vm.ioeventfd(vt.bell_efd, window + pv.REG_DOORBELL, 4)
                except KvmError as e:
                    log.warning("pv timer: no in-kernel doorbell for vCPU %d (%s)", i, e)
                    in_kernel_bell = False
            vt.model = pv.PvClockEvent(vt, machine.mem, tsc_khz=tsc_khz, doorbell_in_kernel=in_kernel_bell)
            machine.mmio_bus.register(window, pv.WINDOW_SIZE, vt.model, f"pvclockevent{i}")
            # Edge-triggered: every expiry and every doorbell signal wakes
            # epoll once, so neither fd needs a read() per event (one
            # syscall less per wake-up); the model ignores stale expiries.
            self._ep.register(vt.timer.fd, select.EPOLLIN | select.EPOLLET)
            self._ep.register(vt.bell_efd, select.EPOLLIN | select.EPOLLET)
            self._dispatch[vt.timer.fd] = (vt, True)
            self._dispatch[vt.bell_efd] = (vt, False)
            self.cpus.append(vt)
        self._thread = threading.Thread(target=self._run, name="kvmkit-pvtimer", daemon=True)
        self._thread.start()

    # --- interrupt routing -----------------------------------------------------------
    def set_route(self, vt: VcpuTimer, route: tuple[str, int]) -> None:
        """Bind vt's irqfd to the GSI that delivers ``route`` (called from the model, lock held)."""
        with self._route_lock:
            kind, n = route
            if kind == "msi":
                gsi = MSI_GSI_BASE + vt.index
                self._routes[vt.index] = route
                self._install_table()
            else:
                gsi = n
            if vt.irqfd_gsi is not None and vt.irqfd_gsi != gsi:
                try:
                    self.vm.irqfd(vt.irq_efd, vt.irqfd_gsi, deassign=True)
                except KvmError:
                    pass
                vt.irqfd_gsi = None
            if vt.irqfd_gsi is None:
                self.vm.irqfd(vt.irq_efd, gsi)
                vt.irqfd_gsi = gsi

    def _install_table(self) -> None:
        self.vm.set_gsi_routing(routing_table({i: r[1] for i, r in self._routes.items() if r[0] == "msi"}))
        self._msi_table_installed = True

    # --- the host thread ----------------------------------------------------------------
    def _run(self) -> None:
        ep = self._ep
        dispatch = self._dispatch
        stop_fd = self._stop_efd
        while not self.closed:
            try:
                events = ep.poll()
            except InterruptedError:
                continue
            except (OSError, ValueError):
                return
            for fd, _mask in events:
                if fd == stop_fd:
                    return
                vt, is_timer = dispatch[fd]
                try:
                    if is_timer:
                        vt.wake_late_ns.append(time.monotonic_ns() - vt.armed_at)
                        vt.expiries += 1
                        vt.model.timer_expired()  # type: ignore[union-attr]
                    else:
                        vt.bells += 1
                        vt.model.doorbell()  # type: ignore[union-attr]
                except BlockingIOError:
                    pass
                except Exception:
                    log.exception("pv timer: vCPU %d host event failed", vt.index)

    def close(self) -> None:
        """Stop the thread and release the fds (idempotent)."""
        if self.closed:
            return
        self.closed = True
        try:
            os.eventfd_write(self._stop_efd, 1)
        except OSError:
            pass
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        for vt in self.cpus:
            if vt.model is not None:
                vt.model.release()
                with vt.model.lock:  # no vCPU is inside the model while its fds go
                    vt.close()
        self._ep.close()
        os.close(self._stop_efd)

    def stats(self) -> list[dict[str, int]]:
        out = []
        for vt in self.cpus:
            m = vt.model
            assert m is not None
            out.append({"vcpu": vt.index, "arms": m.arms, "fires": m.fires, "doorbells_seen": vt.bells,
                        "timer_wakeups": vt.expiries, "rearms_later": m.rearms_later, "count": m.count})
        return out


def routing_table(msi_vectors: dict[int, int]) -> list[ks.kvm_irq_routing_entry]:
    """The PC's default IRQCHIP routes plus one MSI route per vCPU (GSI 24 + index).

    GSIs 0-15 reach the 8259 pair (pin 2 of the master is the cascade and
    carries none) and GSIs 0-23 the IOAPIC, GSI 0 (the PIT) at pin 2 as the
    MP table tells the guest. The MSI message is fixed delivery, physical
    destination mode, to the local APIC whose ID is the vCPU index.
    """
    entries = []

    def irqchip(gsi: int, chip: int, pin: int) -> None:
        e = ks.kvm_irq_routing_entry(gsi=gsi, type=kc.KVM_IRQ_ROUTING_IRQCHIP)
        e.irqchip.irqchip = chip
        e.irqchip.pin = pin
        entries.append(e)

    for gsi in range(16):
        if gsi != 2:
            irqchip(gsi, kc.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else kc.KVM_IRQCHIP_PIC_SLAVE, gsi % 8)
    for gsi in range(24):
        if gsi == 0:
            irqchip(0, kc.KVM_IRQCHIP_IOAPIC, 2)
        elif gsi != 2:
            irqchip(gsi, kc.KVM_IRQCHIP_IOAPIC, gsi)
    for index, vector in sorted(msi_vectors.items()):
        e = ks.kvm_irq_routing_entry(gsi=MSI_GSI_BASE + index, type=kc.KVM_IRQ_ROUTING_MSI)
        e.msi.address_lo = 0xFEE0_0000 | ((index & 0xFF) << 12)
        e.msi.address_hi = 0
        e.msi.data = vector & 0xFF  # fixed delivery, edge
        entries.append(e)
    return entries
