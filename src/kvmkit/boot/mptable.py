"""An Intel MultiProcessor Specification 1.4 table.

kvmkit gives the guest no ACPI tables, so the MP table is how Linux learns
that there is a local APIC per CPU and an IOAPIC, and how ISA interrupts are
wired to IOAPIC pins. Without it Linux falls back to the PIC and PIT and does
not use the local APIC timer (see ENVIRONMENT.md). The wiring is a PC's: the
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
ISA_IRQS = 16
TIMER_IRQ = 0
TIMER_PIN = 2
CASCADE_IRQ = 2  # the PIC cascade: no device interrupt, and pin 2 already carries IRQ 0


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` plus itself sum to 0 modulo 256."""
    return (-sum(data)) & 0xFF


def config_table_size(ncpus: int) -> int:
    n_intsrc = ISA_IRQS - 1
    return HEADER_SIZE + ncpus * PROCESSOR_SIZE + ENTRY_SIZE * (1 + 1 + n_intsrc + 2)


def build_config_table(ncpus: int) -> bytes:
    """The MP configuration table (header and base entries) for ``ncpus`` CPUs."""
    if not 1 <= ncpus <= MAX_CPUS:
        raise BootError(f"the MP table can describe 1 to {MAX_CPUS} CPUs, not {ncpus}; choose a CPU count in that range.")
    ioapic_id = ncpus
    entries = bytearray()
    for apic_id in range(ncpus):
        flags = CPU_ENABLED | (CPU_BOOTPROCESSOR if apic_id == 0 else 0)
        entries += struct.pack("<BBBBII8x", MP_PROCESSOR, apic_id, LAPIC_VERSION, flags, CPU_SIGNATURE, CPU_FEATURES)
    entries += struct.pack("<BB6s", MP_BUS, ISA_BUS_ID, b"ISA   ")
    entries += struct.pack("<BBBBI", MP_IOAPIC, ioapic_id, IOAPIC_VERSION, 0x01, IOAPIC_ADDR)
    for irq in range(ISA_IRQS):
        if irq == CASCADE_IRQ:
            continue
        pin = TIMER_PIN if irq == TIMER_IRQ else irq
        # flags 0: polarity and trigger "conform to the bus" (ISA: active high, edge)
        entries += struct.pack("<BBHBBBB", MP_INTSRC, MP_INT, 0, ISA_BUS_ID, irq, ioapic_id, pin)
    entries += struct.pack("<BBHBBBB", MP_LINTSRC, MP_EXTINT, 0, ISA_BUS_ID, 0, 0xFF, 0)  # LINT0 of all CPUs
    entries += struct.pack("<BBHBBBB", MP_LINTSRC, MP_NMI, 0, ISA_BUS_ID, 0, 0xFF, 1)  # LINT1 of all CPUs
    count = ncpus + 1 + 1 + (ISA_IRQS - 1) + 2
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


def write_mptable(mem: GuestMemory, ncpus: int) -> int:
    """Write the MP table into the reserved BIOS area and return the floating pointer's address.

    The floating pointer sits in the last KiB of base memory, one of the
    places Linux scans; the config table follows it there when it fits
    (up to 40 CPUs) and otherwise goes to 0xf0000, also inside the area
    that the e820 map reserves.
    """
    table = build_config_table(ncpus)
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
