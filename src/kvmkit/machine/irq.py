"""Interrupts from device models to KVM: ISA lines (KVM_IRQ_LINE) and the GSI routing table.

On ISA, COM1 and COM3 share IRQ 4 (and COM2/COM4 IRQ 3): a line is the OR
of its sources, so one port lowering its output must not silence the other.

MSI (the PV clock event device's per-vCPU interrupts, PCI MSI-X vectors) is
delivered through KVM's GSI routing: each message gets a GSI above the
IOAPIC's 24 pins with an MSI route, and the device writes an eventfd bound
to that GSI with KVM_IRQFD. KVM_SET_GSI_ROUTING replaces the whole table, so
:class:`GsiRoutes` owns it and always writes the PC's default IRQCHIP
entries with the MSI ones.
"""

from __future__ import annotations

import threading
from typing import Callable

from ..devices.base import IrqCallback
from ..kvm import constants as kc
from ..kvm import structs as ks

IOAPIC_PINS = 24
MSI_GSI_BASE = IOAPIC_PINS   # GSIs from here on carry MSI routes
MAX_GSI = 1024               # KVM_MAX_IRQ_ROUTES is 4096 on x86; a bound on what devices may ask for


class IrqLine:
    """One GSI, driven by any number of level sources, ORed."""

    def __init__(self, gsi: int, set_level: Callable[[int, bool], None]) -> None:
        self.gsi = gsi
        self._set_level = set_level
        self._levels: list[bool] = []
        self._level = False
        self._lock = threading.Lock()
        self.raises = 0

    def source(self) -> IrqCallback:
        """A callback for one device output on this line."""
        idx = len(self._levels)
        self._levels.append(False)

        def set_source(level: bool) -> None:
            with self._lock:
                self._levels[idx] = bool(level)
                new = any(self._levels)
                if new == self._level:
                    return
                self._level = new
                if new:
                    self.raises += 1
                self._set_level(self.gsi, new)

        return set_source

    @property
    def level(self) -> bool:
        return self._level


def routing_table(msi: dict[int, tuple[int, int]]) -> list[ks.kvm_irq_routing_entry]:
    """The PC's default IRQCHIP routes plus one MSI route per entry of ``msi`` (GSI -> (address, data)).

    GSIs 0-15 reach the 8259 pair (pin 2 of the master is the cascade and
    carries none) and GSIs 0-23 the IOAPIC, GSI 0 (the PIT) at pin 2 as the
    MP table tells the guest.
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
    for gsi in range(IOAPIC_PINS):
        if gsi == 0:
            irqchip(0, kc.KVM_IRQCHIP_IOAPIC, 2)
        elif gsi != 2:
            irqchip(gsi, kc.KVM_IRQCHIP_IOAPIC, gsi)
    for gsi, (address, data) in sorted(msi.items()):
        e = ks.kvm_irq_routing_entry(gsi=gsi, type=kc.KVM_IRQ_ROUTING_MSI)
        e.msi.address_lo = address & 0xFFFF_FFFF
        e.msi.address_hi = address >> 32
        e.msi.data = data & 0xFFFF_FFFF
        entries.append(e)
    return entries


class GsiRoutes:
    """KVM's GSI routing table for one VM: the PC defaults plus MSI routes handed out by owner name.

    The table is written only when a device first asks for an MSI route: a
    guest that never uses one keeps KVM's own default table.
    """

    def __init__(self, install: Callable[[list[ks.kvm_irq_routing_entry]], None]) -> None:
        self._install = install
        self._lock = threading.Lock()
        self._gsi: dict[str, int] = {}
        self._msi: dict[int, tuple[int, int]] = {}

    def msi_gsi(self, owner: str, address: int, data: int) -> int:
        """The GSI that delivers (address, data) for ``owner``; the same GSI on every later call."""
        with self._lock:
            gsi = self._gsi.get(owner)
            if gsi is None:
                gsi = MSI_GSI_BASE + len(self._gsi)
                if gsi >= MAX_GSI:
                    raise ValueError(f"more than {MAX_GSI - MSI_GSI_BASE} MSI routes asked for")
                self._gsi[owner] = gsi
            if self._msi.get(gsi) != (address, data):
                self._msi[gsi] = (address, data)
                self._install(routing_table(self._msi))
            return gsi

    @property
    def msi_routes(self) -> dict[int, tuple[int, int]]:
        with self._lock:
            return dict(self._msi)
