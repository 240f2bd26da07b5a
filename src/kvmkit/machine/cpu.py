"""vCPU state at reset: CPUID table, MSRs and the 64-bit boot register state.

Linux's 64-bit boot protocol (Documentation/arch/x86/boot.rst) enters the
kernel in long mode with paging on, an identity map covering the kernel,
boot_params, command line and initrd, a flat __BOOT_CS/__BOOT_DS GDT and
RSI pointing at boot_params. The bundled guest is entered the same way, so
there is one path to test.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..kvm import structs as s
from ..kvm.system import Vcpu

# Control register and EFER bits (Intel SDM vol. 3, 2.5 and 2.2.1).
CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_AM = 1 << 18
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11

MSR_IA32_MISC_ENABLE = 0x1A0
MISC_ENABLE_FAST_STRING = 1 << 0


@dataclass(frozen=True)
class LongModeEntry:
    """Register state for a 64-bit entry, as plain numbers (from the boot loader)."""

    rip: int
    rsi: int
    cr3: int
    gdt_base: int
    gdt_limit: int
    code_selector: int = 0x10
    data_selector: int = 0x18
    rsp: int = 0
    cr0: int = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG
    cr4: int = CR4_PAE
    efer: int = EFER_LME | EFER_LMA


def flat_segment(selector: int, code: bool) -> s.kvm_segment:
    """A flat 4 GiB ring-0 segment: 64-bit code, or read/write data."""
    seg = s.kvm_segment()
    seg.base = 0
    seg.limit = 0xFFFFFFFF
    seg.selector = selector
    seg.present = 1
    seg.dpl = 0
    seg.s = 1
    seg.g = 1
    if code:
        seg.type = 0xB  # execute/read, accessed
        seg.l = 1
        seg.db = 0
    else:
        seg.type = 0x3  # read/write, accessed
        seg.db = 1
    return seg


def set_long_mode(vcpu: Vcpu, entry: LongModeEntry) -> None:
    """Put a vCPU at a 64-bit entry point with the given tables already in guest RAM."""
    sregs = vcpu.get_sregs()
    sregs.cs = flat_segment(entry.code_selector, True)
    data = flat_segment(entry.data_selector, False)
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
    regs.rflags = 0x2  # bit 1 is reserved-set; interrupts off at entry
    vcpu.set_regs(regs)


# CPUID feature bits (leaf 1 ECX).
CPUID1_ECX_CX16 = 1 << 13
CPUID1_ECX_X2APIC = 1 << 21
CPUID1_ECX_HYPERVISOR = 1 << 31


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
                e.edx |= 1 << 28  # HTT: the logical processor count in EBX is valid
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
    regs.rflags = 0x2
    vcpu.set_regs(regs)
