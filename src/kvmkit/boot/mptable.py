"""An Intel MultiProcessor Specification 1.4 table.

kvmkit gives the guest no ACPI tables, so the MP table is how Linux learns
that there is a local APIC per CPU and an IOAPIC, and how ISA interrupts are
wired to IOAPIC pins. Without it Linux falls back to the PIC and PIT and does
not use the local APIC timer (docs/linux-boot.md). The wiring is a PC's: the
8254 timer's IRQ 0 arrives at IOAPIC pin 2, the other ISA IRQs at the pin of
the same number, the 8259 PIC as ExtINT on LINT0 and NMI on LINT1.
"""

from __future__ import annotations

import struct

from ..errors import BootError
from ..memory import GuestMemory
from . import layout

MP_FLOATING_SIGNATURE = b"_MP_"
MP_CONFIG_SIGNATURE = b"PCMP"
MP_SPEC_REV = 4  # version 1.4
LAPIC_ADDR = 0xFEE00000
IOAPIC_ADDR = 0xFEC00000
LAPIC_VERSION = 0x14  # an integrated (xAPIC) local APIC
IOAPIC_VERSION = 0x11  # what KVM's in-kernel IOAPIC reports
MAX_CPUS = 254  # APIC ids 0..N-1 plus the IOAPIC's id N must fit in 0..254

# entry types, in the order the spec requires them to appear
MP_PROCESSOR = 0
MP_BUS = 1
MP_IOAPIC = 2
MP_INTSRC = 3
MP_LINTSRC = 4

# interrupt types
MP_INT = 0
MP_NMI = 1
MP_SMI = 2
MP_EXTINT = 3

CPU_ENABLED = 0x01
CPU_BOOTPROCESSOR = 0x02
CPU_SIGNATURE = 0x600  # family 6
CPU_FEATURES = (1 << 0) | (1 << 9)  # FPU, APIC

FLOATING_SIZE = 16
HEADER_SIZE = 44
PROCESSOR_SIZE = 20
ENTRY_SIZE = 8
ISA_BUS_ID = 0
PCI_BUS_TYPE = b"PCI   "
ISA_BUS_TYPE = b"ISA   "
ISA_IRQS = 16
# Level-triggered, active-high interrupt entries (PCI INTx, and the ISA IRQs
# kvmkit wires level): the line kvmkit drives is the OR of its sources, and
# KVM's IOAPIC takes "high" as asserted.
PCI_INT_FLAGS = 0x0D  # polarity 01 (active high), trigger 11 (level)
TIMER_IRQ = 0
TIMER_PIN = 2
CASCADE_IRQ = 2  # the PIC cascade: no device interrupt, and pin 2 already carries IRQ 0


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` plus itself sum to 0 modulo 256."""
    return (-sum(data)) & 0xFF


def build_config_table(ncpus: int, pci_irqs: list[tuple[int, int]] | None = None,
                       level_irqs: tuple[int, ...] = ()) -> bytes:
    """The MP configuration table (header and base entries) for ``ncpus`` CPUs.

    ``pci_irqs`` lists (slot, ISA IRQ) for the INTA# of each device on PCI
    bus 0; with it the table gains a PCI bus (ID 0; the ISA bus becomes ID
    1) and one level-triggered interrupt source per device, on the IOAPIC
    pin of that IRQ, whose ISA entry is then left out. ISA IRQs in
    ``level_irqs`` are declared level-triggered, active high.
    """
    if not 1 <= ncpus <= MAX_CPUS:
        raise BootError(f"the MP table can describe 1 to {MAX_CPUS} CPUs, not {ncpus}; choose a CPU count in that range.")
    ioapic_id = ncpus
    isa_bus = ISA_BUS_ID if pci_irqs is None else ISA_BUS_ID + 1
    pci_pins = {irq for _slot, irq in pci_irqs or ()}
    entries = bytearray()
    count = 0

    def add(entry: bytes) -> None:
        nonlocal count
        entries.extend(entry)
        count += 1

    for apic_id in range(ncpus):
        flags = CPU_ENABLED | (CPU_BOOTPROCESSOR if apic_id == 0 else 0)
        add(struct.pack("<BBBBII8x", MP_PROCESSOR, apic_id, LAPIC_VERSION, flags, CPU_SIGNATURE, CPU_FEATURES))
    if pci_irqs is not None:
        add(struct.pack("<BB6s", MP_BUS, 0, PCI_BUS_TYPE))
    add(struct.pack("<BB6s", MP_BUS, isa_bus, ISA_BUS_TYPE))
    add(struct.pack("<BBBBI", MP_IOAPIC, ioapic_id, IOAPIC_VERSION, 0x01, IOAPIC_ADDR))
    for irq in range(ISA_IRQS):
        if irq == CASCADE_IRQ or irq in pci_pins:
            continue
        pin = TIMER_PIN if irq == TIMER_IRQ else irq
        # flags 0: polarity and trigger "conform to the bus" (ISA: active high, edge)
        flags = PCI_INT_FLAGS if irq in level_irqs else 0
        add(struct.pack("<BBHBBBB", MP_INTSRC, MP_INT, flags, isa_bus, irq, ioapic_id, pin))
    for slot, irq in pci_irqs or ():
        # Source bus IRQ for PCI: device number in bits 6:2, INTA# = 0 in bits 1:0.
        add(struct.pack("<BBHBBBB", MP_INTSRC, MP_INT, PCI_INT_FLAGS, 0, slot << 2, ioapic_id, irq))
    add(struct.pack("<BBHBBBB", MP_LINTSRC, MP_EXTINT, 0, isa_bus, 0, 0xFF, 0))  # LINT0 of all CPUs
    add(struct.pack("<BBHBBBB", MP_LINTSRC, MP_NMI, 0, isa_bus, 0, 0xFF, 1))  # LINT1 of all CPUs
    length = HEADER_SIZE + len(entries)
    header = bytearray(struct.pack(
        "<4sHBB8s12sIHHIHBB",
        MP_CONFIG_SIGNATURE, length, MP_SPEC_REV, 0, b"KVMKIT  ", b"KVMKIT VM   ",
        0, 0, count, LAPIC_ADDR, 0, 0, 0))
    table = header + entries
    table[7] = checksum(bytes(table))
    return bytes(table)


def build_floating_pointer(config_addr: int) -> bytes:
    """The 16-byte MP floating pointer structure that points at the config table."""
    fp = bytearray(struct.pack("<4sIBBBBBBBB", MP_FLOATING_SIGNATURE, config_addr, 1, MP_SPEC_REV, 0, 0, 0, 0, 0, 0))
    fp[10] = checksum(bytes(fp))
    return bytes(fp)


def write_mptable(mem: GuestMemory, ncpus: int, pci_irqs: list[tuple[int, int]] | None = None,
                  level_irqs: tuple[int, ...] = ()) -> int:
    """Write the MP table into the reserved BIOS area and return the floating pointer's address.

    The floating pointer sits in the last KiB of base memory, one of the
    places Linux scans; the config table follows it there when it fits
    (up to 40 CPUs) and otherwise goes to 0xf0000, also inside the area
    that the e820 map reserves.
    """
    table = build_config_table(ncpus, pci_irqs, level_irqs)
    fp_addr = layout.MPTABLE_ADDR
    if FLOATING_SIZE + len(table) <= 0x400:
        config_addr = fp_addr + FLOATING_SIZE
    else:
        config_addr = layout.MPTABLE_HIGH_ADDR
    if not mem.is_ram(fp_addr, FLOATING_SIZE) or not mem.is_ram(config_addr, len(table)):
        raise BootError(f"guest RAM ({mem.size >> 10} KiB) does not reach the BIOS area where the MP table goes; give the VM at least 2 MiB with --mem.")
    mem.write(config_addr, table)
    mem.write(fp_addr, build_floating_pointer(config_addr))
    return fp_addr
