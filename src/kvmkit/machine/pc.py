"""The PC kvmkit builds: which device sits at which port, MMIO window and IRQ.

One table, computed from the :class:`~kvmkit.machine.config.VmConfig`,
that the machine wires devices by and that ``kvmkit inspect``-style tools,
tests and the docs can read without creating a VM. The addresses are the
ones every PC BIOS and every Linux driver assumes (COM1 at 0x3f8 on IRQ 4,
the i8042 at 0x60/0x64, the CMOS RTC at 0x70), plus kvmkit's own: the exit
port at 0x501 and the PV clock event device's per-vCPU windows just below
the IOAPIC.

Physical address space above RAM (low RAM ends at 3 GiB at most, see
:mod:`kvmkit.memory`)::

    0xC000_0000  PCI hole: 32-bit PCI BARs (PCI_MMIO32_BASE .. PCI_MMIO32_END)
    0xFEA0_0000  PV clock event windows, 4 KiB per vCPU (up to 256)
    0xFEC0_0000  IOAPIC (in-kernel)
    0xFEE0_0000  local APIC (in-kernel)
    0xFFFB_C000  KVM's identity-map page and real-mode TSS (Intel hosts)
    4 GiB        RAM above the hole, then 64-bit PCI BARs above all RAM
"""

from __future__ import annotations

from dataclasses import dataclass

from ..boot.mptable import IOAPIC_ADDR as IOAPIC_BASE
from ..boot.mptable import LAPIC_ADDR as LAPIC_BASE
from ..devices.cmos import CMOS_INDEX
from ..devices.i8042 import I8042_COMMAND, I8042_DATA
from ..devices.misc import EXIT_PORT
from ..devices.pvclockevent import WINDOW_SIZE as PVCE_WINDOW_SIZE
from ..devices.uart16550 import REGISTER_SPAN as UART_SPAN
from ..errors import KvmkitError
from ..memory import HIGH_RAM_START, PCI_HOLE_START
from .config import VmConfig

PIO = "pio"
MMIO = "mmio"

# COM1..COM4: (I/O base, ISA IRQ), as every PC BIOS assigns them.
COM_PORTS = ((0x3F8, 4), (0x2F8, 3), (0x3E8, 4), (0x2E8, 3))
POST_PORT = 0x80     # POST codes; Linux also uses it as an I/O delay
CMOS_SPAN = 2        # index and data

PVCE_BASE = 0xFEA0_0000      # vCPU n's window at PVCE_BASE + n * 4 KiB
PVCE_MAX_CPUS = 256          # 1 MiB, below the IOAPIC
# IOAPIC_BASE and LAPIC_BASE: where the in-kernel chips answer (the MP table tells the guest).
# Addresses KVM needs for its own use on Intel hosts: three pages for the
# real-mode TSS and one for the identity map, just below the BIOS area.
TSS_ADDR = 0xFFFB_D000
IDENTITY_MAP_ADDR = 0xFFFB_C000

I8042_IRQ_KBD = 1                    # the keyboard's output buffer full
I8042_IRQ_AUX = 12                   # the AUX port's (kvmkit has no AUX device)
PCI_CONFIG_PORT = 0xCF8              # configuration mechanism #1: CONFIG_ADDRESS 0xCF8, CONFIG_DATA 0xCFC
PCI_CONFIG_SPAN = 8
# ISA IRQs for PCI INTx, one per slot while they last (slot 1 -> 11, ...): free
# on kvmkit's PC (COM ports 3/4, RTC 8, PIT 0, i8042 1/12), and distinct so
# that an edge-triggered PIC line (noapic) is never shared.
PCI_INTX_IRQS = (11, 5, 9, 10)
PCI_MMIO32_BASE = PCI_HOLE_START
PCI_MMIO32_END = 0xFE00_0000         # leave 0xFE00_0000.. to the platform windows above
PCI_MMIO64_ALIGN = 1 << 30


@dataclass(frozen=True)
class Placement:
    """One device window: its name, its bus (``pio`` or ``mmio``), base, size and ISA IRQ if any."""

    name: str
    space: str
    base: int
    size: int
    irq: int | None = None

    @property
    def end(self) -> int:
        return self.base + self.size


class PcMap:
    """The machine's device map for one configuration."""

    def __init__(self, config: VmConfig) -> None:
        self.config = config
        p: list[Placement] = [
            Placement("i8042-data", PIO, I8042_DATA, 1, irq=I8042_IRQ_KBD),
            Placement("i8042-cmd", PIO, I8042_COMMAND, 1),
            Placement("cmos", PIO, CMOS_INDEX, CMOS_SPAN, irq=8),
            Placement("post", PIO, POST_PORT, 1),
            Placement("exit-port", PIO, EXIT_PORT, 1),
        ]
        for idx, (base, irq) in enumerate(COM_PORTS):
            if config.serial[idx] != "off":
                p.append(Placement(f"COM{idx + 1}", PIO, base, UART_SPAN, irq=irq))
        if self.has_pv_clockevent:
            if config.cpus > PVCE_MAX_CPUS:
                raise KvmkitError(f"the PV clock event device has windows for {PVCE_MAX_CPUS} vCPUs; "
                                  "use fewer --cpus or turn it off.")
            p += [Placement(f"pvclockevent{i}", MMIO, self.pvclockevent_window(i), PVCE_WINDOW_SIZE)
                  for i in range(config.cpus)]
        if config.has_pci:
            p.append(Placement("pci-config", PIO, PCI_CONFIG_PORT, PCI_CONFIG_SPAN))
        p += [Placement("ioapic", MMIO, IOAPIC_BASE, 0x1000), Placement("lapic", MMIO, LAPIC_BASE, 0x1000)]
        self.placements = sorted(p, key=lambda x: (x.space, x.base))
        self._by_name = {x.name: x for x in self.placements}

    @property
    def has_pv_clockevent(self) -> bool:
        return self.config.pv_clockevent and self.config.irqchip

    @staticmethod
    def pvclockevent_window(vcpu: int) -> int:
        return PVCE_BASE + vcpu * PVCE_WINDOW_SIZE

    def __getitem__(self, name: str) -> Placement:
        return self._by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def serial_ports(self) -> list[tuple[int, Placement]]:
        """(index, placement) of every COM port present (``--serial off`` removes one)."""
        return [(i, self._by_name[f"COM{i + 1}"]) for i in range(len(COM_PORTS)) if f"COM{i + 1}" in self._by_name]

    def level_irqs(self) -> tuple[int, ...]:
        """ISA IRQs wired level-triggered: the PCI INTx lines (PCI interrupts are levels; the PIC's
        ELCR and the MP table say so, as PC firmware does). The COM ports' stay edge-triggered, as
        on every PC: Linux's 8250 driver, tried on a level-triggered IRQ 4, ended up polling."""
        return tuple(sorted(PCI_INTX_IRQS)) if self.config.has_pci else ()

    def pci_mmio64_base(self, ram_end: int) -> int:
        """Where 64-bit BARs go: above all RAM (and above 4 GiB), on a 1 GiB boundary."""
        top = max(ram_end, HIGH_RAM_START)
        return (top + PCI_MMIO64_ALIGN - 1) & ~(PCI_MMIO64_ALIGN - 1)

    def describe(self) -> str:
        """The map as a table, for ``--verbose`` and the docs."""
        rows = []
        for x in self.placements:
            irq = f"IRQ {x.irq}" if x.irq is not None else ""
            rows.append(f"{x.space:4}  {x.base:#011x}-{x.end - 1:#011x}  {x.name:16} {irq}".rstrip())
        return "\n".join(rows)
