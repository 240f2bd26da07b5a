"""PCI bus 0 on the machine: the configuration ports, BAR placement, BAR windows and interrupts.

The PCI model (``kvmkit.devices.pci``) is pure; this module does what PC
firmware and the chipset do around it:

* **Configuration mechanism #1** answers at I/O ports 0xCF8-0xCFF; the
  host bridge is 00:00.0; devices take slots 1, 2, ... in the order the
  machine adds them.
* **BARs are placed before the guest runs**, as firmware would: 32-bit
  memory BARs in the PCI hole below the platform windows, 64-bit ones above
  all RAM (and above 4 GiB), each aligned to its size. The guest may move
  them: every change of where a BAR decodes (a BAR write, a COMMAND decode
  toggle, the sizing dance in between) moves its window on the MMIO bus
  and is passed to whoever watches the function (a virtio device re-binds
  its notify ioeventfds there).
* **INTx** goes to an ISA IRQ (a different one per slot while they last,
  recorded in the Interrupt Line register as firmware does, and in the MP
  table for the IOAPIC), so it works through the IOAPIC and, under
  ``noapic``, through the PIC.
* **MSI-X** vectors become KVM GSI routes (one per vector, through
  :class:`~kvmkit.machine.irq.GsiRoutes`) with one irqfd each: a device
  delivers an interrupt by writing an eventfd, from any thread, and no vCPU
  exit or kvmkit thread is involved in the injection.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Callable

from ..devices.pci import PciBus, PciFunction, PciHostBridge
from ..devices.state import StateError, StateReader
from ..errors import KvmkitError
from ..kvm.system import KvmError, Vm
from .bus import Bus, BusConflict
from .irq import GsiRoutes, IrqLine
from .pc import PCI_CONFIG_PORT, PCI_CONFIG_SPAN, PCI_INTX_IRQS, PCI_MMIO32_BASE, PCI_MMIO32_END, PcMap

log = logging.getLogger(__name__)

MAX_SLOTS = 32
BarWatcher = Callable[[int, "int | None", "int | None"], None]


class PciHost:
    """Bus 0, its windows on the machine's buses, and the address allocator for BARs."""

    def __init__(self, pio_bus: Bus, mmio_bus: Bus, pc: PcMap, ram_end: int, irq_line: Callable[[int], IrqLine]) -> None:
        self.pio_bus = pio_bus
        self.mmio_bus = mmio_bus
        self.irq_line = irq_line
        self.bus = PciBus()
        self.bus.add(0, PciHostBridge())
        pio_bus.register(PCI_CONFIG_PORT, PCI_CONFIG_SPAN, self.bus, "pci-config")
        self._next32 = PCI_MMIO32_BASE
        self._next64 = pc.pci_mmio64_base(ram_end)
        self._names: dict[int, str] = {}
        self._watchers: dict[int, list[BarWatcher]] = {}
        self.intx: dict[int, int] = {}  # slot -> ISA IRQ of its INTA# (for the MP table)

    @property
    def devices(self) -> dict[int, PciFunction]:
        return {slot: fn for slot, fn in self.bus.slots.items() if slot != 0}

    def add(self, function: PciFunction, name: str) -> int:
        """Put ``function`` in the next free slot, place its BARs and wire its INTx; returns the slot."""
        slot = len(self.bus.slots)
        if slot >= MAX_SLOTS:
            raise KvmkitError(f"PCI bus 0 is full ({MAX_SLOTS - 1} devices); use fewer devices.")
        self._names[slot] = name
        if function.interrupt_pin:
            irq = PCI_INTX_IRQS[(slot - 1) % len(PCI_INTX_IRQS)]
            function.irq = self.irq_line(irq).source()
            function.config_write(0x3C, 1, irq)  # Interrupt Line: the routing, as firmware records it
            self.intx[slot] = irq
        for bar in function.bars:
            function.set_bar_address(bar.index, self._place(bar.kind, bar.size, name))
        function.on_bar_change = lambda index, old, new, fn=function, s=slot: self._bar_changed(fn, s, index, old, new)
        self.bus.add(slot, function)
        return slot

    def watch(self, slot: int, watcher: BarWatcher) -> None:
        """Call ``watcher(bar, old, new)`` whenever a BAR of the device in ``slot`` moves (on the vCPU thread)."""
        self._watchers.setdefault(slot, []).append(watcher)

    def _place(self, kind: str, size: int, name: str) -> int:
        if kind == "mem32":
            addr = (self._next32 + size - 1) & ~(size - 1)
            if addr + size > PCI_MMIO32_END:
                raise KvmkitError(f"the 32-bit PCI window is full placing {name}; use fewer PCI devices.")
            self._next32 = addr + size
            return addr
        if kind == "mem64":
            addr = (self._next64 + size - 1) & ~(size - 1)
            self._next64 = addr + size
            return addr
        raise KvmkitError(f"{name} asks for an I/O BAR, which kvmkit's PCI host does not place; use a memory BAR.")

    def _bar_changed(self, function: PciFunction, slot: int, index: int, old: int | None, new: int | None) -> None:
        bar = function.bar(index)
        bus = self.pio_bus if bar.is_io else self.mmio_bus
        label = f"{self._names.get(slot, slot)}-bar{index}"
        if old is not None:
            bus.unregister(old)
        if new is not None and bar.handler is not None:
            try:
                bus.register(new, bar.size, bar.handler, label)
            except BusConflict as e:
                # The guest put a BAR over another device's window: as on a real
                # bus with two decoders, nothing sensible answers; kvmkit keeps the
                # first and says so once.
                log.warning("%s moved to %#x over another window, left unmapped: %s", label, new, e)
                new = None
        for watcher in self._watchers.get(slot, ()):
            watcher(index, old, new)

    # --- snapshot --------------------------------------------------------------------------
    def save_state(self) -> dict[str, object]:
        """CONFIG_ADDRESS and every function's configuration space, by slot (the host bridge too)."""
        return {"bus": self.bus.save_state(),
                "functions": {str(slot): fn.save_state() for slot, fn in sorted(self.bus.slots.items())}}

    def load_state(self, state: object) -> None:
        """Load the bus and its functions (the same devices in the same slots); :meth:`resync` maps them."""
        r = StateReader(state, "the PCI bus", ("bus", "functions"))
        functions = r.state["functions"]
        slots = self.bus.slots
        r.require(isinstance(functions, dict) and set(functions) == {str(s) for s in slots}, "functions",
                  "it does not hold the devices this machine has")
        backup = {slot: fn.save_state() for slot, fn in slots.items()}
        try:
            for slot, fn in slots.items():
                fn.load_state(functions[str(slot)])  # type: ignore[index]
            self.bus.load_state(r.state["bus"])
        except StateError:
            for slot, fn in slots.items():
                fn.load_state(backup[slot])
            raise

    def resync(self) -> None:
        """Map every BAR where the loaded configuration decodes it, tell the watchers, and drive INTx."""
        for slot, fn in sorted(self.devices.items()):
            for bar in fn.bars:
                address = fn.bar_address(bar.index)
                if address is not None:
                    self._bar_changed(fn, slot, bar.index, None, address)
            if fn.intx_asserted and fn.irq is not None:
                fn.irq(True)

    def config_accesses(self) -> int:
        return self.bus.stats.config_accesses

    def describe(self) -> list[str]:
        """One line per device: slot, IDs, BARs (for --verbose and tests)."""
        out = []
        for slot, fn in sorted(self.devices.items()):
            bars = ", ".join(f"bar{b.index} {b.kind} {b.size:#x}@{fn.bar_address(b.index) or 0:#x}" for b in fn.bars)
            irq = f" INTA# IRQ {self.intx[slot]}" if slot in self.intx else ""
            out.append(f"00:{slot:02x}.0 {fn.vendor_id:04x}:{fn.device_id:04x} {self._names.get(slot, '')}: {bars}{irq}")
        return out


class KvmMsix:
    """The machine side of one function's MSI-X table: a KVM MSI route and an irqfd per vector.

    It is the model's :class:`~kvmkit.devices.msix.MsixHost`. A vector gets
    its route (and its GSI) the first time the guest unmasks it with a
    message; later changes re-point the same GSI. Delivery is a write to the
    vector's eventfd, which KVM turns into the MSI without any kvmkit thread.
    """

    def __init__(self, vm: Vm, routes: GsiRoutes, owner: str, vectors: int) -> None:
        self.vm = vm
        self.routes = routes
        self.owner = owner
        self._efd = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(vectors)]
        self._gsi: list[int | None] = [None] * vectors
        self._lock = threading.Lock()
        self.delivered = [0] * vectors
        self.closed = False

    def route_changed(self, vector: int, address: int, data: int, masked: bool) -> None:
        if masked or self.closed:
            return  # a masked vector's messages stay pending in the PBA; the route can wait
        with self._lock:
            try:
                gsi = self.routes.msi_gsi(f"{self.owner}-msix{vector}", address, data)
                if self._gsi[vector] is None:
                    self.vm.irqfd(self._efd[vector], gsi)
                    self._gsi[vector] = gsi
            except (KvmError, ValueError) as e:
                log.warning("%s: MSI-X vector %d cannot be routed: %s", self.owner, vector, e)

    def deliver(self, vector: int) -> None:
        if self.closed or self._gsi[vector] is None:
            return
        self.delivered[vector] += 1
        try:
            os.eventfd_write(self._efd[vector], 1)
        except BlockingIOError:
            pass  # the counter is saturated: an interrupt is pending anyway

    def close(self) -> None:
        self.closed = True
        for vector, fd in enumerate(self._efd):
            gsi = self._gsi[vector]
            if gsi is not None:
                try:
                    self.vm.irqfd(fd, gsi, deassign=True)
                except KvmError:
                    pass
            os.close(fd)
        self._efd = []

