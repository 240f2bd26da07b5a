"""vCPU state at reset: CPUID table and the 64-bit boot register state.

Linux's 64-bit boot protocol (Documentation/arch/x86/boot.rst) enters the
kernel in long mode with paging on, an identity map covering the kernel,
boot_params, command line and initrd, a flat __BOOT_CS/__BOOT_DS GDT and
RSI pointing at boot_params. The bundled guest is entered the same way, so
there is one path to test.
"""

from __future__ import annotations

from dataclasses import replace

from ..boot.linux import BOOT_CODE_SEGMENT, BOOT_DATA_SEGMENT, BootInfo, SegmentInfo
from ..kvm import structs as s
from ..kvm.system import Vcpu
from ..x86 import CPUID1_ECX_HYPERVISOR, CPUID1_EDX_HTT, CR0_PE, CR0_PG, RFLAGS_FIXED


def kvm_segment(info: SegmentInfo) -> s.kvm_segment:
    """A segment register's hidden part for KVM_SET_SREGS, from the loader's description."""
    seg = s.kvm_segment()
    for name in ("selector", "base", "limit", "type", "present", "dpl", "db", "s", "l", "g", "avl"):
        setattr(seg, name, getattr(info, name))
    return seg


def flat_segment(selector: int, code: bool) -> s.kvm_segment:
    """A flat 4 GiB ring-0 segment, 64-bit code or read/write data, with ``selector``:
    the boot protocol's segments, also what SYSCALL loads from STAR."""
    return kvm_segment(replace(BOOT_CODE_SEGMENT if code else BOOT_DATA_SEGMENT, selector=selector))


def set_long_mode(vcpu: Vcpu, entry: BootInfo) -> None:
    """Put a vCPU at the 64-bit entry the loader prepared (its tables are already in guest RAM)."""
    sregs = vcpu.get_sregs()
    sregs.cs = kvm_segment(entry.code_segment)
    data = kvm_segment(entry.data_segment)
    sregs.ds = data
    sregs.es = data
    sregs.fs = data
    sregs.gs = data
    sregs.ss = data
    sregs.gdt.base = entry.gdt_base
    sregs.gdt.limit = entry.gdt_limit
    sregs.cr0 = entry.cr0
    sregs.cr3 = entry.cr3
    sregs.cr4 = entry.cr4
    sregs.efer = entry.efer
    vcpu.set_sregs(sregs)
    regs = s.kvm_regs()
    regs.rip = entry.rip
    regs.rsi = entry.rsi
    regs.rsp = entry.rsp
    regs.rflags = entry.rflags
    vcpu.set_regs(regs)


def build_cpuid(supported: list[s.kvm_cpuid_entry2], apic_id: int, ncpus: int,
                clear: dict[tuple[int, str], int] | None = None) -> list[s.kvm_cpuid_entry2]:
    """The guest's CPUID table: what KVM supports, with this vCPU's topology and a feature mask.

    ``clear`` maps (leaf, register) to bits to remove, e.g. {(1, "ecx"): CX16}:
    the documented way to hide a feature from the guest.
    """
    out = []
    for src in supported:
        e = s.kvm_cpuid_entry2.from_buffer_copy(bytes(src))
        if e.function == 1:
            e.ebx = (e.ebx & 0x0000FFFF) | (min(ncpus, 255) << 16) | ((apic_id & 0xFF) << 24)
            e.ecx |= CPUID1_ECX_HYPERVISOR
            if ncpus > 1:
                e.edx |= CPUID1_EDX_HTT
        elif e.function in (0xB, 0x1F):
            e.edx = apic_id
        if clear:
            for reg in ("eax", "ebx", "ecx", "edx"):
                mask = clear.get((e.function, reg))
                if mask:
                    setattr(e, reg, getattr(e, reg) & ~mask)
        out.append(e)
    return out


def set_real_mode(vcpu: Vcpu, ip: int, cs: int = 0, sp: int = 0x8000) -> None:
    """Start a vCPU in real mode at cs:ip (flat tests and benchmarks use a tiny 16-bit blob)."""
    sregs = vcpu.get_sregs()
    for name in ("cs", "ds", "es", "fs", "gs", "ss"):
        seg = getattr(sregs, name)
        seg.selector = cs if name == "cs" else 0
        seg.base = (cs << 4) if name == "cs" else 0
        seg.limit = 0xFFFF
    sregs.cr0 &= ~(CR0_PE | CR0_PG)
    vcpu.set_sregs(sregs)
    regs = s.kvm_regs()
    regs.rip = ip
    regs.rsp = sp
    regs.rflags = RFLAGS_FIXED
    vcpu.set_regs(regs)
