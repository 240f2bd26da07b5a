"""The PC map: where each device sits, which IRQs are level-triggered, and that the machine wires it so."""

from __future__ import annotations

import struct

import pytest

from kvmkit.boot.mptable import build_config_table
from kvmkit.machine.config import VmConfig
from kvmkit.machine.pc import MMIO, PIO, PcMap


def test_the_map_has_the_pc_addresses_and_no_overlap() -> None:
    pc = PcMap(VmConfig(cpus=2, serial=["stdio", "none", "off", "none"], disks=["/dev/null"]))
    assert (pc["COM1"].base, pc["COM1"].irq) == (0x3F8, 4) and (pc["COM2"].base, pc["COM2"].irq) == (0x2F8, 3)
    assert "COM3" not in pc and pc["COM4"].base == 0x2E8
    assert pc["pci-config"].base == 0xCF8 and pc["pvclockevent1"].base == 0xFEA0_1000
    for space in (PIO, MMIO):
        spans = sorted((p.base, p.end) for p in pc.placements if p.space == space)
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])), spans
    assert pc.level_irqs() == (5, 9, 10, 11)                      # PCI INTx; the COM ports stay edge
    assert PcMap(VmConfig(serial=["stdio", "off", "off", "off"])).level_irqs() == ()


def test_mp_table_declares_level_irqs_active_high_level() -> None:
    table = build_config_table(1, None, level_irqs=(11,))
    flags = {}
    pos = 44
    while pos < len(table):
        kind = table[pos]
        if kind == 0:
            pos += 20
            continue
        if kind == 3:
            _t, _it, fl, _bus, irq, _ap, _pin = struct.unpack_from("<BBHBBBB", table, pos)
            flags[irq] = fl
        pos += 8
    assert flags[11] == 0x0D and flags[4] == 0 and flags[1] == 0


@pytest.mark.kvm
def test_the_machine_programs_the_pic_elcr_for_them() -> None:
    from kvmkit.kvm.constants import KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE
    from kvmkit.machine.machine import Machine
    m = Machine(VmConfig(serial=["none", "none", "off", "off"], rng=True))
    try:
        assert m.vm is not None
        master = m.vm.get_irqchip(KVM_IRQCHIP_PIC_MASTER).chip.pic.elcr
        slave = m.vm.get_irqchip(KVM_IRQCHIP_PIC_SLAVE).chip.pic.elcr
        assert master == 1 << 5                                  # PCI slot 2's INTA#; COM1/COM2 stay edge
        assert slave == (1 << (9 - 8)) | (1 << (10 - 8)) | (1 << (11 - 8))
    finally:
        m.close()
