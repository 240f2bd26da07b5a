"""Everything KVM keeps for a vCPU and a VM, as bytes that can be saved and put back.

A snapshot must carry the state KVM holds in the kernel: a vCPU's
registers are only the start (the FPU/SSE/AVX area, XCR0, every MSR KVM
lists, the local APIC page, pending exceptions and NMIs, the run state,
debug registers), and the VM has its PICs, IOAPIC, PIT and clock. The
structures are kept as their raw bytes: they are the kernel's ABI, their
sizes are checked on the way back, and nothing here interprets them.

Order matters when putting state back (Firecracker and QEMU agree on it):
the run state first, then registers, special registers, the XSAVE area and
XCRs, debug registers, the local APIC, MSRs in KVM's own list order (the
TSC before the TSC deadline), and pending events last, because setting
the APIC or the MP state would otherwise discard them. Callers must have
completed any pending I/O exit first (KVM_RUN with immediate_exit set),
or the half-done instruction is lost.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

from . import structs as s
from .constants import KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE
from .system import Vcpu, Vm

__all__ = ["VcpuState", "VmState", "save_vcpu", "restore_vcpu", "save_vm", "restore_vm", "readable_msrs"]

IRQCHIPS = (KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC)
MSR_BATCH = 64


@dataclass
class VcpuState:
    """One vCPU as KVM holds it. Byte fields are the kernel structures verbatim."""

    mp_state: int
    regs: bytes
    sregs: bytes
    xsave: bytes
    xcrs: bytes
    debugregs: bytes
    lapic: bytes
    events: bytes
    msrs: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class VmState:
    """The in-kernel devices and clock of a VM: PIC master, PIC slave and IOAPIC, the PIT, kvmclock."""

    irqchips: list[bytes]
    pit: bytes
    clock_ns: int


def _raw(st: ctypes.Structure) -> bytes:
    return bytes(memoryview(st).cast("B"))


def _struct(kind: type[ctypes.Structure], data: bytes, what: str) -> ctypes.Structure:
    if len(data) != ctypes.sizeof(kind):
        raise ValueError(f"{what} is {len(data)} bytes, this host's KVM uses {ctypes.sizeof(kind)}")
    return kind.from_buffer_copy(data)


def readable_msrs(vcpu: Vcpu, indices: list[int]) -> list[tuple[int, int]]:
    """(index, value) for every MSR in ``indices`` this vCPU lets KVM_GET_MSRS read, in list order.

    KVM_GET_MSRS stops at the first MSR it cannot read (one the host CPU or
    the guest's CPUID lacks) and says how many it did; the rest are tried
    again from the one after it.
    """
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < len(indices):
        batch = indices[pos:pos + MSR_BATCH]
        values = vcpu.get_msrs(batch)
        got = len(values)
        out.extend((index, values[index]) for index in batch[:got])
        pos += got if got == len(batch) else got + 1
    return out


def save_vcpu(vcpu: Vcpu, msr_indices: list[int]) -> VcpuState:
    """Read a stopped vCPU's whole state (call it outside KVM_RUN, pending I/O completed)."""
    mp_state = vcpu.get_mp_state()  # first: it may process pending INIT/SIPI events
    return VcpuState(
        mp_state=mp_state,
        regs=_raw(vcpu.get_regs()),
        sregs=_raw(vcpu.get_sregs()),
        xsave=vcpu.get_xsave(),
        xcrs=_raw(vcpu.get_xcrs()),
        debugregs=_raw(vcpu.get_debugregs()),
        lapic=_raw(vcpu.get_lapic()),
        msrs=readable_msrs(vcpu, msr_indices),
        events=_raw(vcpu.get_vcpu_events()),
    )


def restore_vcpu(vcpu: Vcpu, st: VcpuState) -> None:
    """Put a saved state into a fresh vCPU (same CPUID already set). Raises ValueError on a size
    mismatch or a refused MSR, KvmError when KVM refuses a structure."""
    regs = _struct(s.kvm_regs, st.regs, "the saved register set")
    sregs = _struct(s.kvm_sregs, st.sregs, "the saved special registers")
    xcrs = _struct(s.kvm_xcrs, st.xcrs, "the saved XCRs")
    debugregs = _struct(s.kvm_debugregs, st.debugregs, "the saved debug registers")
    lapic = _struct(s.kvm_lapic_state, st.lapic, "the saved local APIC")
    events = _struct(s.kvm_vcpu_events, st.events, "the saved vCPU events")
    if len(st.xsave) < 4096 or len(st.xsave) % 4:
        raise ValueError(f"the saved XSAVE area is {len(st.xsave)} bytes, not a whole area of at least 4096")
    vcpu.set_mp_state(st.mp_state)
    vcpu.set_regs(regs)  # type: ignore[arg-type]
    vcpu.set_sregs(sregs)  # type: ignore[arg-type]
    vcpu.set_xsave(st.xsave)
    vcpu.set_xcrs(xcrs)  # type: ignore[arg-type]
    vcpu.set_debugregs(debugregs)  # type: ignore[arg-type]
    vcpu.set_lapic(lapic)  # type: ignore[arg-type]
    msrs = dict(st.msrs)
    done = vcpu.set_msrs(msrs) if msrs else 0
    if done != len(msrs):
        index = st.msrs[done][0]
        raise ValueError(f"KVM refused MSR {index:#x} (value {msrs[index]:#x}): this host's CPU or KVM differs from the one that saved it")
    vcpu.set_vcpu_events(events)  # type: ignore[arg-type]


def save_vm(vm: Vm) -> VmState:
    """The in-kernel irqchips, PIT and kvmclock of a VM whose vCPUs are all stopped."""
    return VmState(irqchips=[_raw(vm.get_irqchip(chip)) for chip in IRQCHIPS],
                   pit=_raw(vm.get_pit2()), clock_ns=int(vm.get_clock().clock))


def restore_vm(vm: Vm, st: VmState) -> None:
    """Put the saved irqchips, PIT and clock into a fresh VM (irqchip and PIT created)."""
    if len(st.irqchips) != len(IRQCHIPS):
        raise ValueError(f"the saved VM has {len(st.irqchips)} interrupt controllers, not {len(IRQCHIPS)}")
    chips = [_struct(s.kvm_irqchip, raw, "a saved interrupt controller") for raw in st.irqchips]
    pit = _struct(s.kvm_pit_state2, st.pit, "the saved PIT")
    for want, chip in zip(IRQCHIPS, chips):
        if chip.chip_id != want:  # type: ignore[attr-defined]
            raise ValueError(f"saved interrupt controller {chip.chip_id} is out of order")  # type: ignore[attr-defined]
        vm.set_irqchip(chip)  # type: ignore[arg-type]
    vm.set_pit2(pit)  # type: ignore[arg-type]
    vm.set_clock(st.clock_ns)
