"""The ctypes structures and ioctl numbers against the kernel's own C headers.

A C program is compiled against <linux/kvm.h> (package linux-libc-dev) and
prints sizeof/offsetof and request numbers; every figure must match.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from kvmkit.kvm import constants as c
from kvmkit.kvm import structs as s

STRUCTS = {
    "kvm_run": s.kvm_run, "kvm_regs": s.kvm_regs, "kvm_sregs": s.kvm_sregs,
    "kvm_segment": s.kvm_segment, "kvm_pic_state": s.kvm_pic_state, "kvm_irqchip": s.kvm_irqchip, "kvm_dtable": s.kvm_dtable, "kvm_fpu": s.kvm_fpu,
    "kvm_msr_entry": s.kvm_msr_entry, "kvm_msrs": s.kvm_msrs,
    "kvm_cpuid_entry2": s.kvm_cpuid_entry2, "kvm_cpuid2": s.kvm_cpuid2,
    "kvm_lapic_state": s.kvm_lapic_state, "kvm_vcpu_events": s.kvm_vcpu_events,
    "kvm_guest_debug": s.kvm_guest_debug, "kvm_translation": s.kvm_translation,
    "kvm_userspace_memory_region": s.kvm_userspace_memory_region,
    "kvm_irq_level": s.kvm_irq_level, "kvm_irqfd": s.kvm_irqfd, "kvm_ioeventfd": s.kvm_ioeventfd,
    "kvm_clock_data": s.kvm_clock_data, "kvm_pit_config": s.kvm_pit_config,
    "kvm_irq_routing_entry": s.kvm_irq_routing_entry, "kvm_irq_routing": s.kvm_irq_routing,
    "kvm_enable_cap": s.kvm_enable_cap, "kvm_stats_header": s.kvm_stats_header,
    "kvm_stats_desc": s.kvm_stats_desc,
    "kvm_mp_state": s.kvm_mp_state, "kvm_xsave": s.kvm_xsave, "kvm_xcr": s.kvm_xcr, "kvm_xcrs": s.kvm_xcrs,
    "kvm_debugregs": s.kvm_debugregs, "kvm_pit_channel_state": s.kvm_pit_channel_state,
    "kvm_pit_state2": s.kvm_pit_state2, "kvm_msr_filter": s.kvm_msr_filter,
    "kvm_msr_filter_range": s.kvm_msr_filter_range,
}

# (C expression for the offset, Python offset)
OFFSETS = {
    "offsetof(struct kvm_run, exit_reason)": s.kvm_run.exit_reason.offset,
    "offsetof(struct kvm_run, cr8)": s.kvm_run.cr8.offset,
    "offsetof(struct kvm_run, io)": s.kvm_run.exit.offset,
    "offsetof(struct kvm_run, io.port)": s.kvm_run.exit.offset + s.kvm_run_io.port.offset,
    "offsetof(struct kvm_run, io.count)": s.kvm_run.exit.offset + s.kvm_run_io.count.offset,
    "offsetof(struct kvm_run, io.data_offset)": s.kvm_run.exit.offset + s.kvm_run_io.data_offset.offset,
    "offsetof(struct kvm_run, mmio.data)": s.kvm_run.exit.offset + s.kvm_run_mmio.data.offset,
    "offsetof(struct kvm_run, mmio.len)": s.kvm_run.exit.offset + s.kvm_run_mmio.len.offset,
    "offsetof(struct kvm_run, mmio.is_write)": s.kvm_run.exit.offset + s.kvm_run_mmio.is_write.offset,
    "offsetof(struct kvm_run, internal.data)": s.kvm_run.exit.offset + s.kvm_run_internal.data.offset,
    "offsetof(struct kvm_run, emulation_failure.insn_size)": s.kvm_run.exit.offset + s.kvm_run_emulation_failure.insn_size.offset,
    "offsetof(struct kvm_run, emulation_failure.insn_bytes)": s.kvm_run.exit.offset + s.kvm_run_emulation_failure.insn_bytes.offset,
    "offsetof(struct kvm_run, system_event.ndata)": s.kvm_run.exit.offset + s.kvm_run_system_event.ndata.offset,
    "offsetof(struct kvm_run, system_event.data)": s.kvm_run.exit.offset + s.kvm_run_system_event.u.offset,
    "offsetof(struct kvm_run, fail_entry.cpu)": s.kvm_run.exit.offset + s.kvm_run_fail_entry.cpu.offset,
    "offsetof(struct kvm_run, kvm_valid_regs)": s.kvm_run.kvm_valid_regs.offset,
    "offsetof(struct kvm_run, s)": s.kvm_run.s.offset,
    "offsetof(struct kvm_sregs, gdt)": s.kvm_sregs.gdt.offset,
    "offsetof(struct kvm_sregs, efer)": s.kvm_sregs.efer.offset,
    "offsetof(struct kvm_sregs, interrupt_bitmap)": s.kvm_sregs.interrupt_bitmap.offset,
    "offsetof(struct kvm_vcpu_events, sipi_vector)": s.kvm_vcpu_events.sipi_vector.offset,
    "offsetof(struct kvm_vcpu_events, exception_payload)": s.kvm_vcpu_events.exception_payload.offset,
    "offsetof(struct kvm_fpu, mxcsr)": s.kvm_fpu.mxcsr.offset,
    "offsetof(struct kvm_ioeventfd, flags)": s.kvm_ioeventfd.flags.offset,
    "offsetof(struct kvm_irq_routing_entry, u)": s.kvm_irq_routing_entry.u.offset,
    "offsetof(struct kvm_clock_data, host_tsc)": s.kvm_clock_data.host_tsc.offset,
    "offsetof(struct kvm_stats_desc, name)": ctypes.sizeof(s.kvm_stats_desc),
    "offsetof(struct kvm_xcrs, xcrs)": s.kvm_xcrs.xcrs.offset,
    "offsetof(struct kvm_debugregs, dr7)": s.kvm_debugregs.dr7.offset,
    "offsetof(struct kvm_pit_channel_state, count_load_time)": s.kvm_pit_channel_state.count_load_time.offset,
    "offsetof(struct kvm_pit_state2, flags)": s.kvm_pit_state2.flags.offset,
    "offsetof(struct kvm_run, msr.index)": s.kvm_run.exit.offset + s.kvm_run_msr.index.offset,
    "offsetof(struct kvm_run, msr.data)": s.kvm_run.exit.offset + s.kvm_run_msr.data.offset,
    "offsetof(struct kvm_msr_filter_range, bitmap)": s.kvm_msr_filter_range.bitmap.offset,
}

IOCTLS = [name for name in dir(c) if name.startswith("KVM_") and name not in (
    "KVM_API_VERSION",) and isinstance(getattr(c, name), int) and (
    name.startswith(("KVM_GET_", "KVM_SET_", "KVM_CREATE_", "KVM_RUN", "KVM_CHECK_", "KVM_IRQ", "KVM_IOEVENTFD",
                     "KVM_TRANSLATE", "KVM_INTERRUPT", "KVM_ENABLE_CAP", "KVM_KVMCLOCK_CTRL",
                     "KVM_X86_SET_MSR_FILTER")))
    and not name.startswith(("KVM_IRQFD_FLAG", "KVM_IRQ_ROUTING_", "KVM_IRQCHIP_"))]

CAPS = {f"KVM_CAP_{cap.name}": int(cap) for cap in c.Cap}
EXITS = {f"KVM_EXIT_{e.name}": int(e) for e in c.ExitReason}
FLAGS = {name: getattr(c, name) for name in dir(c) if name.startswith((
    "KVM_IOEVENTFD_FLAG_", "KVM_IRQFD_FLAG_", "KVM_GUESTDBG_", "KVM_MEM_", "KVM_IRQ_ROUTING_",
    "KVM_IRQCHIP_", "KVM_STATS_", "KVM_SYSTEM_EVENT_", "KVM_VCPUEVENT_VALID_", "KVM_MP_STATE_", "KVM_MSR_"))}
FLAGS.update({f"KVM_SYSTEM_EVENT_{e.name}": int(e) for e in c.SystemEvent})
FLAGS.update({f"KVM_INTERNAL_ERROR_{e.name}": int(e) for e in c.InternalErrorSuberror})


@pytest.fixture(scope="module")
def c_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None or not Path("/usr/include/linux/kvm.h").exists():
        pytest.skip("needs gcc and <linux/kvm.h> (apt-get install gcc linux-libc-dev)")
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include <linux/kvm.h>', 'int main(void) {']
    exprs: dict[str, str] = {}
    for name in STRUCTS:
        exprs[f"sizeof(struct {name})"] = f"sizeof(struct {name})"
    for expr in OFFSETS:
        exprs[expr] = expr
    for name in IOCTLS + list(CAPS) + list(EXITS) + list(FLAGS):
        exprs[name] = name
    for key, expr in exprs.items():
        printf = f'  printf("%s=%llu\\n", "{key}", (unsigned long long)({expr}));'
        if key == expr and key.startswith("KVM_"):
            # Newer names may be missing from an older linux-libc-dev.
            printf = f"#ifdef {key}\n{printf}\n#endif"
        lines.append(printf)
    lines.append("  return 0; }")
    d = tmp_path_factory.mktemp("abi")
    src = d / "abi.c"
    src.write_text("\n".join(lines))
    exe = d / "abi"
    subprocess.run([cc, "-o", str(exe), str(src)], check=True, capture_output=True, text=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split("=", 1) for line in out.splitlines())}


@pytest.mark.parametrize("name", sorted(STRUCTS))
def test_struct_size(c_values: dict[str, int], name: str) -> None:
    assert ctypes.sizeof(STRUCTS[name]) == c_values[f"sizeof(struct {name})"]


@pytest.mark.parametrize("expr", sorted(OFFSETS))
def test_offsets(c_values: dict[str, int], expr: str) -> None:
    assert OFFSETS[expr] == c_values[expr]


@pytest.mark.parametrize("name", sorted(IOCTLS))
def test_ioctl_numbers(c_values: dict[str, int], name: str) -> None:
    if name not in c_values:
        pytest.skip(f"{name} is not in this host's <linux/kvm.h>")
    assert getattr(c, name) == c_values[name], name


@pytest.mark.parametrize("name", sorted(CAPS) + sorted(EXITS) + sorted(FLAGS))
def test_enum_values(c_values: dict[str, int], name: str) -> None:
    expected = {**CAPS, **EXITS, **FLAGS}[name]
    if name not in c_values:
        pytest.skip(f"{name} is not in this host's <linux/kvm.h>")
    assert expected == c_values[name], name
