"""virtio-pci devices on the machine: a PCI function each, MSI-X through irqfds, notifies through ioeventfds.

The device models and the transport registers are pure
(``kvmkit.devices.virtio``); this module gives each one:

* a PCI function (IDs and class from the transport) with two memory BARs:
  BAR 1 (32-bit, 4 KiB) holds the MSI-X table and PBA, BAR 4 (64-bit) the
  virtio registers, as QEMU lays them out; vendor capabilities point into
  BAR 4;
* MSI-X vectors (one per queue plus the configuration vector) delivered
  through :class:`~kvmkit.machine.pci.KvmMsix`: a device thread writes an
  eventfd and KVM injects;
* one KVM ioeventfd per queue at the queue's notify address, re-bound when
  the guest moves BAR 4, so a driver's kick completes in the host kernel:
  the vCPU never exits to kvmkit for it;
* a thread that serves the kicks. Block I/O can block on the disk, so each
  disk has a worker thread of its own that waits on its queues' eventfds;
  the console and the entropy device are served by the host event loop.
  Neither ever runs on a vCPU thread (a notify write that does trap, when
  no ioeventfd is bound, is served inline and counted).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from typing import Iterator

from ..devices.msix import Msix
from ..devices.pci import PciFunction
from ..devices.state import StateError, StateReader
from ..devices.virtio import DRIVER_OK
from ..devices.virtio.device import VirtioDevice
from ..devices.virtio.pci import PCI_CAP_ID_VNDR, VIRTIO_PCI_CAP_PCI_CFG, VirtioPciTransport
from ..host.loop import EventLoop
from ..kvm.constants import Cap
from ..kvm.system import KvmError, Vm
from ..memory import GuestMemory
from .irq import GsiRoutes
from .pci import KvmMsix, PciHost

log = logging.getLogger(__name__)

MSIX_BAR = 1
MSIX_BAR_SIZE = 0x1000
MSIX_PBA_OFFSET = 0x800
VIRTIO_BAR = 4


class _MsixBar:
    """BAR 1: the MSI-X table at 0, the PBA at 0x800; nothing else answers."""

    def __init__(self, msix: Msix) -> None:
        self.msix = msix

    def io_read(self, offset: int, size: int) -> int:
        target = self.msix.route(MSIX_BAR, offset)
        return target[0].io_read(target[1], size) if target else 0

    def io_write(self, offset: int, size: int, value: int) -> None:
        target = self.msix.route(MSIX_BAR, offset)
        if target:
            target[0].io_write(target[1], size, value)


class NotifyWorker:
    """A thread that waits on a device's queue eventfds (edge-triggered) and serves the kicks."""

    def __init__(self, name: str, serve: "dict[int, tuple[VirtioPciDevice, int]]") -> None:
        self._ep = select.epoll()
        self._stop = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep.register(self._stop, select.EPOLLIN)
        self._serve = serve
        for fd in serve:
            self._ep.register(fd, select.EPOLLIN | select.EPOLLET)
        self.thread = threading.Thread(target=self._run, name=f"kvmkit-{name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                events = self._ep.poll()
            except InterruptedError:
                continue
            except (OSError, ValueError):
                return
            for fd, _mask in events:
                if fd == self._stop:
                    return
                dev, queue = self._serve[fd]
                dev.kick(queue)

    def close(self) -> None:
        try:
            os.eventfd_write(self._stop, 1)
        except OSError:
            pass
        if self.thread is not threading.current_thread():
            self.thread.join(timeout=10)
        self._ep.close()
        os.close(self._stop)


class VirtioPciDevice:
    """One virtio device on the machine's PCI bus, with its interrupt and notify plumbing.

    It is the transport's :class:`~kvmkit.devices.virtio.pci.VirtioInterrupts`.
    """

    def __init__(self, name: str, device: VirtioDevice, *, vm: Vm, mem: GuestMemory, pci: PciHost,
                 routes: GsiRoutes, loop: EventLoop, worker: bool) -> None:
        self.name = name
        self.device = device
        self.vm = vm
        self.loop = loop
        vectors = device.num_queues + 1
        self.transport = VirtioPciTransport(device, mem, msix_vectors=vectors, bar=VIRTIO_BAR, interrupts=self)
        ident = self.transport.identity
        self.function = PciFunction(ident.vendor_id, ident.device_id, ident.class_code, revision=ident.revision,
                                    subsystem_vendor_id=ident.subsystem_vendor_id, subsystem_id=ident.subsystem_id,
                                    interrupt_pin=1)
        self.msix_host = KvmMsix(vm, routes, name, vectors)
        self.msix_table = Msix(vectors, MSIX_BAR, 0, MSIX_BAR, MSIX_PBA_OFFSET, host=self.msix_host)
        self.function.add_bar(MSIX_BAR, MSIX_BAR_SIZE, "mem32", handler=_MsixBar(self.msix_table))
        self.function.add_bar(VIRTIO_BAR, self.transport.bar_size, "mem64", handler=self.transport.bar)
        for cap in self.transport.capabilities:
            live = self.transport.pci_cfg if cap.cfg_type == VIRTIO_PCI_CAP_PCI_CFG else None
            self.function.add_capability(PCI_CAP_ID_VNDR, cap.body, handler=live)
        self.msix_table.add_to(self.function)
        self.kick_errors = 0
        self._serving = threading.Lock()  # held while a kick is served; a snapshot holds it to find the device idle
        self._efds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(device.num_queues)]
        self._notify_len = 0 if vm.check_extension(Cap.IOEVENTFD_ANY_LENGTH) else 2
        self._bound_at: int | None = None
        self.slot = pci.add(self.function, name)
        pci.watch(self.slot, self._bar_moved)
        serve = {fd: (self, q) for q, fd in enumerate(self._efds)}
        self.worker: NotifyWorker | None = None
        if worker:
            self.worker = NotifyWorker(name, serve)
        else:
            for fd, (_dev, q) in serve.items():
                loop.add_reader(fd, lambda q=q: self.kick(q), edge=True)
        self._bar_moved(VIRTIO_BAR, None, self.function.bar_address(VIRTIO_BAR))

    # --- VirtioInterrupts (any thread) ----------------------------------------------
    def msix(self, vector: int) -> bool:
        return self.msix_table.notify(vector)

    def msix_enabled(self) -> bool:
        return self.msix_table.enabled

    def intx(self, level: bool) -> None:
        self.function.set_intx(level)

    # --- notifies ------------------------------------------------------------------------
    def kick(self, queue: int) -> None:
        """Serve a kick of ``queue`` (worker thread or host loop)."""
        with self._serving:
            try:
                self.transport.queue_notify(queue)
            except Exception:  # a model bug must not take the serving thread down
                self.kick_errors += 1
                log.exception("%s: queue %d kick failed", self.name, queue)

    @contextlib.contextmanager
    def quiesced(self) -> Iterator[None]:
        """No request of this device is being served while inside (kicks that come meanwhile wait).

        Only a device with a worker thread needs it: one served by the host
        loop is idle whenever code runs on the loop, which is where a
        snapshot is taken (and holding its lock there would deadlock).
        """
        if self.worker is None:
            yield
            return
        with self._serving:
            yield

    # --- snapshot ------------------------------------------------------------------------
    def save_state(self) -> dict[str, object]:
        """The transport (queues and device included) and the MSI-X table; the PCI host saves the function.

        Call it with the device :meth:`quiesced`: a request half served would
        be in neither the rings nor the device.
        """
        return {"transport": self.transport.save_state(), "msix": self.msix_table.save_state()}

    def load_state(self, state: object) -> None:
        r = StateReader(state, f"the virtio device {self.name}", ("transport", "msix"))
        backup = self.msix_table.save_state()
        self.msix_table.load_state(r.state["msix"])  # type: ignore[arg-type]
        try:
            self.transport.load_state(r.state["transport"])  # type: ignore[arg-type]
        except StateError:
            self.msix_table.load_state(backup)
            raise

    def resync(self) -> None:
        """Route every open MSI-X vector, and look at every queue once (a kick may have been lost at the save).

        The notify ioeventfds follow BAR 4, which the PCI host re-maps first.
        The re-kick goes through the queue's own eventfd, so it is served
        where kicks always are (worker thread or host loop), never here.
        """
        for vector in range(self.msix_table.vectors):
            entry = self.msix_table.entry(vector)
            self.msix_host.route_changed(vector, entry.address, entry.data, entry.masked)
        if self.transport.status & DRIVER_OK:
            for fd in self._efds:
                os.eventfd_write(fd, 1)

    def _bar_moved(self, index: int, old: int | None, new: int | None) -> None:
        """BAR 4 decodes somewhere else (or nowhere): move the notify ioeventfds with it."""
        if index != VIRTIO_BAR:
            return
        if self._bound_at is not None:
            for q, fd in enumerate(self._efds):
                try:
                    self.vm.ioeventfd(fd, self._bound_at + self.transport.notify_offset(q), self._notify_len, deassign=True)
                except KvmError:
                    pass
            self._bound_at = None
        if new is not None:
            try:
                for q, fd in enumerate(self._efds):
                    self.vm.ioeventfd(fd, new + self.transport.notify_offset(q), self._notify_len)
                self._bound_at = new
            except KvmError as e:
                # Kicks then trap into the BAR handler instead: slower, still correct.
                log.warning("%s: no in-kernel notify at %#x (%s)", self.name, new, e)

    def close(self) -> None:
        """Stop serving kicks and release guest RAM views (before RAM is unmapped)."""
        if self.worker is not None:
            self.worker.close()
        else:
            for fd in self._efds:
                self.loop.remove_reader(fd)
        self.transport.reset()
        self.msix_host.close()
        for fd in self._efds:
            os.close(fd)
        self._efds = []

    def stats(self) -> str:
        t = self.transport
        vq_errors = sum(q.error_count for q in t.queues)
        return (f"{self.name} (00:{self.slot:02x}.0): {sum(t.notifies)} kicks, {sum(self.msix_host.delivered)} MSI-X, "
                f"{t.intx_raised} INTx, {vq_errors} ring errors" + (f" ({t.last_error})" if t.last_error else ""))
