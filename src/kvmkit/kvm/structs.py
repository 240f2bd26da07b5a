"""ctypes mirrors of the x86-64 KVM ABI structures from <linux/kvm.h> and <asm/kvm.h>.

Field names are the kernel's, so the kernel documentation
(Documentation/virt/kvm/api.rst) reads directly onto them. Sizes and
offsets are checked against the C headers by tests/kvm/test_abi.py.
"""

from __future__ import annotations

from ctypes import (
    Structure,
    Union,
    c_char,
    c_int16,
    c_int32,
    c_int64,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
)

u8, u16, u32, u64, s16, s32, s64 = c_uint8, c_uint16, c_uint32, c_uint64, c_int16, c_int32, c_int64


# --- kvm_run and its exit union -------------------------------------------------

class kvm_run_hw(Structure):
    _fields_ = [("hardware_exit_reason", u64)]


class kvm_run_fail_entry(Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class kvm_run_ex(Structure):
    _fields_ = [("exception", u32), ("error_code", u32)]


class kvm_run_io(Structure):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32), ("data_offset", u64)]


class kvm_debug_exit_arch(Structure):
    _fields_ = [("exception", u32), ("pad", u32), ("pc", u64), ("dr6", u64), ("dr7", u64)]


class kvm_run_mmio(Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class kvm_run_internal(Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_emulation_failure(Structure):
    _fields_ = [
        ("suberror", u32),
        ("ndata", u32),
        ("flags", u64),
        ("insn_size", u8),
        ("insn_bytes", u8 * 15),
    ]


class _system_event_u(Union):
    _fields_ = [("flags", u64), ("data", u64 * 16)]


class kvm_run_system_event(Structure):
    _anonymous_ = ("u",)
    _fields_ = [("type", u32), ("ndata", u32), ("u", _system_event_u)]


class kvm_run_msr(Structure):
    _fields_ = [("error", u8), ("pad", u8 * 7), ("reason", u32), ("index", u32), ("data", u64)]


class kvm_run_exit(Union):
    _fields_ = [
        ("hw", kvm_run_hw),
        ("fail_entry", kvm_run_fail_entry),
        ("ex", kvm_run_ex),
        ("io", kvm_run_io),
        ("debug", kvm_debug_exit_arch),
        ("mmio", kvm_run_mmio),
        ("internal", kvm_run_internal),
        ("emulation_failure", kvm_run_emulation_failure),
        ("system_event", kvm_run_system_event),
        ("msr", kvm_run_msr),
        ("padding", c_char * 256),
    ]


class kvm_run(Structure):
    _anonymous_ = ("exit",)
    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("exit", kvm_run_exit),
        ("kvm_valid_regs", u64),
        ("kvm_dirty_regs", u64),
        ("s", c_char * 2048),
    ]


# --- registers ------------------------------------------------------------------

class kvm_regs(Structure):
    _fields_ = [(name, u64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
        "rip", "rflags")]


class kvm_segment(Structure):
    _fields_ = [
        ("base", u64), ("limit", u32), ("selector", u16), ("type", u8),
        ("present", u8), ("dpl", u8), ("db", u8), ("s", u8), ("l", u8),
        ("g", u8), ("avl", u8), ("unusable", u8), ("padding", u8),
    ]


class kvm_dtable(Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(Structure):
    _fields_ = [
        ("cs", kvm_segment), ("ds", kvm_segment), ("es", kvm_segment),
        ("fs", kvm_segment), ("gs", kvm_segment), ("ss", kvm_segment),
        ("tr", kvm_segment), ("ldt", kvm_segment),
        ("gdt", kvm_dtable), ("idt", kvm_dtable),
        ("cr0", u64), ("cr2", u64), ("cr3", u64), ("cr4", u64), ("cr8", u64),
        ("efer", u64), ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_fpu(Structure):
    _fields_ = [
        ("fpr", (u8 * 16) * 8), ("fcw", u16), ("fsw", u16), ("ftwx", u8),
        ("pad1", u8), ("last_opcode", u16), ("last_ip", u64), ("last_dp", u64),
        ("xmm", (u8 * 16) * 16), ("mxcsr", u32), ("pad2", u32),
    ]


class kvm_msr_entry(Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(Structure):
    """Header only; the entries follow it (see :func:`msrs_buffer`)."""

    _fields_ = [("nmsrs", u32), ("pad", u32)]


def msrs_buffer(n: int) -> type[Structure]:
    class _kvm_msrs_n(Structure):
        _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", kvm_msr_entry * n)]
    return _kvm_msrs_n


class kvm_cpuid_entry2(Structure):
    _fields_ = [
        ("function", u32), ("index", u32), ("flags", u32),
        ("eax", u32), ("ebx", u32), ("ecx", u32), ("edx", u32), ("padding", u32 * 3),
    ]


class kvm_cpuid2(Structure):
    """Header only; the entries follow it (see :func:`cpuid2_buffer`)."""

    _fields_ = [("nent", u32), ("padding", u32)]


def cpuid2_buffer(n: int) -> type[Structure]:
    class _kvm_cpuid2_n(Structure):
        _fields_ = [("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * n)]
    return _kvm_cpuid2_n


KVM_APIC_REG_SIZE = 0x400


class kvm_lapic_state(Structure):
    _fields_ = [("regs", c_char * KVM_APIC_REG_SIZE)]


class _vcpu_events_exception(Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("has_error_code", u8), ("pending", u8), ("error_code", u32)]


class _vcpu_events_interrupt(Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class _vcpu_events_nmi(Structure):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class _vcpu_events_smi(Structure):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class _vcpu_events_triple_fault(Structure):
    _fields_ = [("pending", u8)]


class kvm_vcpu_events(Structure):
    _fields_ = [
        ("exception", _vcpu_events_exception),
        ("interrupt", _vcpu_events_interrupt),
        ("nmi", _vcpu_events_nmi),
        ("sipi_vector", u32),
        ("flags", u32),
        ("smi", _vcpu_events_smi),
        ("triple_fault", _vcpu_events_triple_fault),
        ("reserved", u8 * 26),
        ("exception_has_payload", u8),
        ("exception_payload", u64),
    ]


class kvm_xsave(Structure):
    """The legacy 4 KiB XSAVE area (KVM_GET_XSAVE); see :func:`xsave_buffer` for KVM_GET_XSAVE2's larger one."""

    _fields_ = [("region", u32 * 1024)]


def xsave_buffer(size: int) -> type[Structure]:
    """An XSAVE area of ``size`` bytes (KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2)), at least the legacy 4 KiB."""
    class _kvm_xsave_n(Structure):
        _fields_ = [("region", u32 * (max(size, 4096) // 4))]
    return _kvm_xsave_n


KVM_MAX_XCRS = 16


class kvm_xcr(Structure):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class kvm_xcrs(Structure):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", kvm_xcr * KVM_MAX_XCRS), ("padding", u64 * 16)]


class kvm_debugregs(Structure):
    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64), ("reserved", u64 * 9)]


class kvm_guest_debug_arch(Structure):
    _fields_ = [("debugreg", u64 * 8)]


class kvm_guest_debug(Structure):
    _fields_ = [("control", u32), ("pad", u32), ("arch", kvm_guest_debug_arch)]


class kvm_mp_state(Structure):
    _fields_ = [("mp_state", u32)]


class kvm_translation(Structure):
    _fields_ = [
        ("linear_address", u64), ("physical_address", u64), ("valid", u8),
        ("writeable", u8), ("usermode", u8), ("pad", u8 * 5),
    ]


# --- VM-level structures --------------------------------------------------------

class kvm_userspace_memory_region(Structure):
    _fields_ = [
        ("slot", u32), ("flags", u32), ("guest_phys_addr", u64),
        ("memory_size", u64), ("userspace_addr", u64),
    ]


class _irq_level_u(Union):
    _fields_ = [("irq", u32), ("status", s32)]


class kvm_irq_level(Structure):
    _anonymous_ = ("u",)
    _fields_ = [("u", _irq_level_u), ("level", u32)]


class kvm_irqfd(Structure):
    _fields_ = [("fd", u32), ("gsi", u32), ("flags", u32), ("resamplefd", u32), ("pad", u8 * 16)]


class kvm_ioeventfd(Structure):
    _fields_ = [
        ("datamatch", u64), ("addr", u64), ("len", u32), ("fd", s32),
        ("flags", u32), ("pad", u8 * 36),
    ]


class kvm_clock_data(Structure):
    _fields_ = [
        ("clock", u64), ("flags", u32), ("pad0", u32), ("realtime", u64),
        ("host_tsc", u64), ("pad", u32 * 4),
    ]


class kvm_pic_state(Structure):
    _fields_ = [(name, u8) for name in (
        "last_irr", "irr", "imr", "isr", "priority_add", "irq_base", "read_reg_select", "poll", "special_mask",
        "init_state", "auto_eoi", "rotate_on_auto_eoi", "special_fully_nested_mode", "init4", "elcr", "elcr_mask")]


class _irqchip_u(Union):
    _fields_ = [("dummy", c_char * 512), ("pic", kvm_pic_state)]


class kvm_irqchip(Structure):
    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", _irqchip_u)]


class kvm_pit_config(Structure):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class kvm_pit_channel_state(Structure):
    _fields_ = [
        ("count", u32), ("latched_count", u16), ("count_latched", u8), ("status_latched", u8),
        ("status", u8), ("read_state", u8), ("write_state", u8), ("write_latch", u8),
        ("rw_mode", u8), ("mode", u8), ("bcd", u8), ("gate", u8), ("count_load_time", s64),
    ]


class kvm_pit_state2(Structure):
    _fields_ = [("channels", kvm_pit_channel_state * 3), ("flags", u32), ("reserved", u32 * 9)]


class kvm_irq_routing_irqchip(Structure):
    _fields_ = [("irqchip", u32), ("pin", u32)]


class kvm_irq_routing_msi(Structure):
    _fields_ = [("address_lo", u32), ("address_hi", u32), ("data", u32), ("devid", u32)]


class _irq_routing_u(Union):
    _fields_ = [("irqchip", kvm_irq_routing_irqchip), ("msi", kvm_irq_routing_msi), ("pad", u32 * 8)]


class kvm_irq_routing_entry(Structure):
    _anonymous_ = ("u",)
    _fields_ = [("gsi", u32), ("type", u32), ("flags", u32), ("pad", u32), ("u", _irq_routing_u)]


class kvm_irq_routing(Structure):
    """Header only; the entries follow it (see :func:`irq_routing_buffer`)."""

    _fields_ = [("nr", u32), ("flags", u32)]


def irq_routing_buffer(n: int) -> type[Structure]:
    class _kvm_irq_routing_n(Structure):
        _fields_ = [("nr", u32), ("flags", u32), ("entries", kvm_irq_routing_entry * n)]
    return _kvm_irq_routing_n


class kvm_msr_filter_range(Structure):
    _fields_ = [("flags", u32), ("nmsrs", u32), ("base", u32), ("pad", u32), ("bitmap", u64)]


KVM_MSR_FILTER_MAX_RANGES = 16


class kvm_msr_filter(Structure):
    _fields_ = [("flags", u32), ("pad", u32), ("ranges", kvm_msr_filter_range * KVM_MSR_FILTER_MAX_RANGES)]


class kvm_enable_cap(Structure):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class kvm_interrupt(Structure):
    _fields_ = [("irq", u32)]


# --- binary statistics (KVM_GET_STATS_FD) -------------------------------------

class kvm_stats_header(Structure):
    _fields_ = [
        ("flags", u32), ("name_size", u32), ("num_desc", u32),
        ("id_offset", u32), ("desc_offset", u32), ("data_offset", u32),
    ]


class kvm_stats_desc(Structure):
    """Fixed part; ``name_size`` bytes of name follow each descriptor."""

    _fields_ = [
        ("flags", u32), ("exponent", s16), ("size", u16), ("offset", u32),
        ("bucket_size", u32),
    ]


__all__ = [name for name in dir() if name.startswith("kvm_") or name.endswith("_buffer")] + ["KVM_NR_INTERRUPTS", "KVM_APIC_REG_SIZE"]
