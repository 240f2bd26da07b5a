"""KVM constants: ioctl requests, exit reasons, capabilities, flags.

Request numbers are computed from the structures in :mod:`structs` (see
:mod:`ioctl`); the values of enumerations are the kernel's.
"""

from __future__ import annotations

import ctypes
from enum import IntEnum

from . import structs as s
from .ioctl import IO, IOR, IOW, IOWR

# /dev/kvm
KVM_GET_API_VERSION = IO(0x00)
KVM_CREATE_VM = IO(0x01)
KVM_CHECK_EXTENSION = IO(0x03)
KVM_GET_VCPU_MMAP_SIZE = IO(0x04)
KVM_GET_SUPPORTED_CPUID = IOWR(0x05, s.kvm_cpuid2)
KVM_GET_MSR_INDEX_LIST = IOWR(0x02, ctypes.sizeof(ctypes.c_uint32))  # struct kvm_msr_list: nmsrs + indices[]

# VM
KVM_CREATE_VCPU = IO(0x41)
KVM_SET_USER_MEMORY_REGION = IOW(0x46, s.kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = IO(0x47)
KVM_SET_IDENTITY_MAP_ADDR = IOW(0x48, ctypes.c_uint64)
KVM_CREATE_IRQCHIP = IO(0x60)
KVM_GET_IRQCHIP = IOWR(0x62, s.kvm_irqchip)
KVM_SET_IRQCHIP = IOR(0x63, s.kvm_irqchip)
KVM_IRQ_LINE = IOW(0x61, s.kvm_irq_level)
KVM_IRQ_LINE_STATUS = IOWR(0x67, s.kvm_irq_level)
KVM_SET_GSI_ROUTING = IOW(0x6A, s.kvm_irq_routing)
KVM_IRQFD = IOW(0x76, s.kvm_irqfd)
KVM_CREATE_PIT2 = IOW(0x77, s.kvm_pit_config)
KVM_IOEVENTFD = IOW(0x79, s.kvm_ioeventfd)
KVM_SET_CLOCK = IOW(0x7B, s.kvm_clock_data)
KVM_GET_CLOCK = IOR(0x7C, s.kvm_clock_data)
KVM_GET_PIT2 = IOR(0x9F, s.kvm_pit_state2)
KVM_SET_PIT2 = IOW(0xA0, s.kvm_pit_state2)
KVM_ENABLE_CAP = IOW(0xA3, s.kvm_enable_cap)
KVM_X86_SET_MSR_FILTER = IOW(0xC6, s.kvm_msr_filter)
KVM_GET_STATS_FD = IO(0xCE)

# vCPU
KVM_RUN = IO(0x80)
KVM_GET_REGS = IOR(0x81, s.kvm_regs)
KVM_SET_REGS = IOW(0x82, s.kvm_regs)
KVM_GET_SREGS = IOR(0x83, s.kvm_sregs)
KVM_SET_SREGS = IOW(0x84, s.kvm_sregs)
KVM_TRANSLATE = IOWR(0x85, s.kvm_translation)
KVM_INTERRUPT = IOW(0x86, s.kvm_interrupt)
KVM_GET_MSRS = IOWR(0x88, s.kvm_msrs)
KVM_SET_MSRS = IOW(0x89, s.kvm_msrs)
KVM_GET_FPU = IOR(0x8C, s.kvm_fpu)
KVM_SET_FPU = IOW(0x8D, s.kvm_fpu)
KVM_GET_LAPIC = IOR(0x8E, s.kvm_lapic_state)
KVM_SET_LAPIC = IOW(0x8F, s.kvm_lapic_state)
KVM_SET_CPUID2 = IOW(0x90, s.kvm_cpuid2)
KVM_GET_CPUID2 = IOWR(0x91, s.kvm_cpuid2)
KVM_SET_GUEST_DEBUG = IOW(0x9B, s.kvm_guest_debug)
KVM_GET_VCPU_EVENTS = IOR(0x9F, s.kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = IOW(0xA0, s.kvm_vcpu_events)
KVM_GET_MP_STATE = IOR(0x98, s.kvm_mp_state)
KVM_SET_MP_STATE = IOW(0x99, s.kvm_mp_state)
KVM_GET_DEBUGREGS = IOR(0xA1, s.kvm_debugregs)
KVM_SET_DEBUGREGS = IOW(0xA2, s.kvm_debugregs)
KVM_GET_XSAVE = IOR(0xA4, s.kvm_xsave)
KVM_SET_XSAVE = IOW(0xA5, s.kvm_xsave)
KVM_GET_XCRS = IOR(0xA6, s.kvm_xcrs)
KVM_SET_XCRS = IOW(0xA7, s.kvm_xcrs)
KVM_KVMCLOCK_CTRL = IO(0xAD)
KVM_GET_XSAVE2 = IOR(0xCF, s.kvm_xsave)
KVM_GET_TSC_KHZ = IO(0xA3)

KVM_API_VERSION = 12


class ExitReason(IntEnum):
    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    NMI = 16
    INTERNAL_ERROR = 17
    WATCHDOG = 21
    EPR = 23
    SYSTEM_EVENT = 24
    IOAPIC_EOI = 26
    HYPERV = 27
    X86_RDMSR = 29
    X86_WRMSR = 30
    DIRTY_RING_FULL = 31
    AP_RESET_HOLD = 32
    X86_BUS_LOCK = 33
    XEN = 34
    NOTIFY = 37
    MEMORY_FAULT = 39


def exit_reason_name(reason: int) -> str:
    try:
        return ExitReason(reason).name
    except ValueError:
        return f"EXIT_{reason}"


KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1


class InternalErrorSuberror(IntEnum):
    EMULATION = 1
    SIMUL_EX = 2
    DELIVERY_EV = 3
    UNEXPECTED_EXIT_REASON = 4


KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1 << 0


class SystemEvent(IntEnum):
    SHUTDOWN = 1
    RESET = 2
    CRASH = 3
    WAKEUP = 4
    SUSPEND = 5
    SEV_TERM = 6


class Cap(IntEnum):
    IRQCHIP = 0
    HLT = 1
    USER_MEMORY = 3
    SET_TSS_ADDR = 4
    EXT_CPUID = 7
    NR_VCPUS = 9
    NR_MEMSLOTS = 10
    PIT = 11
    SYNC_MMU = 16
    IOMMU = 18
    DESTROY_MEMORY_REGION_WORKS = 21
    USER_NMI = 22
    SET_GUEST_DEBUG = 23
    IRQ_ROUTING = 25
    IRQ_INJECT_STATUS = 26
    ADJUST_CLOCK = 39
    PIT2 = 33
    SET_IDENTITY_MAP_ADDR = 37
    IOEVENTFD = 36
    IOEVENTFD_NO_LENGTH = 100
    IOEVENTFD_ANY_LENGTH = 122
    IRQFD = 32
    VCPU_EVENTS = 41
    MAX_VCPUS = 66
    TSC_DEADLINE_TIMER = 72
    IMMEDIATE_EXIT = 136
    EXIT_ON_EMULATION_FAILURE = 204
    BINARY_STATS_FD = 203
    X86_USER_SPACE_MSR = 188
    X86_MSR_FILTER = 189
    X2APIC_API = 129
    SPLIT_IRQCHIP = 121
    DEBUGREGS = 50
    XSAVE = 55
    XCRS = 56
    KVMCLOCK_CTRL = 76
    XSAVE2 = 208


# Flags and values used by the machine layer.
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2
KVM_PIT_SPEAKER_DUMMY = 1
KVM_CLOCK_TSC_STABLE = 2
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1
KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4
# KVM_CAP_X86_USER_SPACE_MSR: which refused MSR accesses exit to userspace; KVM_X86_SET_MSR_FILTER
KVM_MSR_EXIT_REASON_FILTER = 1 << 2
KVM_MSR_FILTER_DEFAULT_ALLOW = 0
KVM_MSR_FILTER_WRITE = 1 << 1
KVM_GUESTDBG_ENABLE = 0x00000001
KVM_GUESTDBG_SINGLESTEP = 0x00000002
KVM_GUESTDBG_USE_SW_BP = 0x00010000
KVM_GUESTDBG_USE_HW_BP = 0x00020000
KVM_GUESTDBG_INJECT_DB = 0x00040000
KVM_GUESTDBG_INJECT_BP = 0x00080000
KVM_VCPUEVENT_VALID_NMI_PENDING = 0x00000001
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x00000002
KVM_VCPUEVENT_VALID_SHADOW = 0x00000004
KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2

# KVM binary statistics descriptor flags.
KVM_STATS_TYPE_SHIFT = 0
KVM_STATS_TYPE_MASK = 0xF << KVM_STATS_TYPE_SHIFT
KVM_STATS_UNIT_SHIFT = 4
KVM_STATS_UNIT_MASK = 0xF << KVM_STATS_UNIT_SHIFT
KVM_STATS_BASE_SHIFT = 8
KVM_STATS_BASE_MASK = 0xF << KVM_STATS_BASE_SHIFT
