"""x86-64 architectural constants, named as the Intel SDM (vol. 3) names them.

One definition for the boot loader (which builds the entry state), the vCPU
set-up and the nested-PVM quirks (which restart a SYSCALL by hand), so a bit
is never written down twice.
"""

from __future__ import annotations

# CR0 (SDM 2.5)
CR0_PE = 1 << 0   # protected mode
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5   # native x87 error reporting
CR0_WP = 1 << 16
CR0_AM = 1 << 18
CR0_PG = 1 << 31  # paging

# CR4
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12  # five-level paging: 57-bit linear addresses

# IA32_EFER (SDM 2.2.1)
EFER_LME = 1 << 8   # long mode enable
EFER_LMA = 1 << 10  # long mode active (KVM wants it with LME for a 64-bit start)

# RFLAGS (SDM 2.3)
RFLAGS_FIXED = 1 << 1  # reserved, always one
RFLAGS_IF = 1 << 9
RFLAGS_RF = 1 << 16
RFLAGS_AC = 1 << 18

# MSRs of the SYSCALL instruction (SDM vol. 4)
MSR_STAR = 0xC000_0081
MSR_LSTAR = 0xC000_0082
MSR_SYSCALL_MASK = 0xC000_0084

# Exception vectors
BP_VECTOR = 3
PF_VECTOR = 14

# DR7: G0 (global enable of breakpoint 0, execute, 1 byte) and the always-one bit 10.
DR7_G0 = 1 << 1
DR7_FIXED = 1 << 10

# CPUID leaf 1 ECX
CPUID1_ECX_CX16 = 1 << 13
CPUID1_ECX_HYPERVISOR = 1 << 31
# CPUID leaf 1 EDX
CPUID1_EDX_HTT = 1 << 28  # the logical processor count in EBX is valid


def is_canonical(address: int, la57: bool = False) -> bool:
    """Bits 63 down to the top implemented linear-address bit (47, or 56 with LA57) all equal (SDM 3.3.7.1).
    A non-canonical value in LSTAR and the other address MSRs makes WRMSR fault with #GP."""
    top = 56 if la57 else 47
    upper = (address & (1 << 64) - 1) >> top
    return upper in (0, (1 << (64 - top)) - 1)
