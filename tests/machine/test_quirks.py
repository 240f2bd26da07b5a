"""The nested-PVM quirk pieces without KVM: detection, kernel parameters, IDT, SYSCALL restart."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from kvmkit.errors import KvmkitError
from kvmkit.kvm import structs as s
from kvmkit.machine.cpu import build_cpuid
from kvmkit.machine import quirks as q
from kvmkit.x86 import EFER_LMA, EFER_LME, RFLAGS_IF, RFLAGS_RF, is_canonical

# --- detection ----------------------------------------------------------------------


def test_detects_pvm_module(tmp_path: Path) -> None:
    (tmp_path / "kvm").mkdir()
    (tmp_path / "kvm_intel").mkdir()
    assert q.detect_profile(tmp_path) == "none"
    (tmp_path / "kvm_pvm").mkdir()
    assert q.detect_profile(tmp_path) == "nested-pvm"


def test_missing_sysfs_means_no_quirks(tmp_path: Path) -> None:
    assert q.detect_profile(tmp_path / "nonexistent") == "none"


def test_resolve_profile(tmp_path: Path) -> None:
    assert q.resolve_profile("none", tmp_path) == "none"
    assert q.resolve_profile("nested-pvm", tmp_path) == "nested-pvm"
    assert q.resolve_profile("auto", tmp_path) == "none"
    (tmp_path / "kvm_pvm").mkdir()
    assert q.resolve_profile(None, tmp_path) == "nested-pvm"
    assert q.resolve_profile("none", tmp_path) == "none"  # the user can always turn it off
    with pytest.raises(KvmkitError, match="unknown quirk profile"):
        q.resolve_profile("pvm", tmp_path)


def test_this_host_is_detected_as_what_it_is() -> None:
    expected = "nested-pvm" if Path("/sys/module/kvm_pvm").is_dir() else "none"
    assert q.detect_profile() == expected


# --- command line ----------------------------------------------------------------------


def test_pvm_params_contents() -> None:
    p = q.pvm_cmdline_params(cpus=1, tsc_khz=2_000_000)
    assert "tsc_early_khz=20000000" in p
    assert "lpj=8000000" in p
    for word in ("noxsave", "tsc=reliable", "nowatchdog", "rcupdate.rcu_cpu_stall_suppress=1", "noapic",
                 "nosmp", "mitigations=off", "nopti", "nokaslr", "cryptomgr.notests", "rodata=off"):
        assert word in p
    clear = next(w for w in p if w.startswith("clearcpuid="))
    assert set(clear.split("=", 1)[1].split(",")) >= {"smap", "smep", "erms", "fsrm", "ssse3", "rdtscp", "pcid"}
    bl = next(w for w in p if w.startswith("initcall_blacklist="))
    assert "load_system_certificate_list" in bl and "kfunc_init" in bl
    assert "pci=off" not in p  # a fact of the machine, not of the host: machine/cmdline.py adds it
    assert "nosmp" not in q.pvm_cmdline_params(cpus=2, tsc_khz=None)
    assert "noapic" not in q.pvm_cmdline_params(cpus=2, tsc_khz=None)  # each CPU's pvce line needs the IO-APIC
    assert not any(w.startswith(("tsc_early_khz", "lpj")) for w in q.pvm_cmdline_params(cpus=2, tsc_khz=None))


def test_tsc_khz_from_cpuinfo(tmp_path: Path) -> None:
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nmodel name\t: X\ncpu MHz\t\t: 2596.126\n")
    assert q.host_tsc_khz(0, f) == 2596126
    assert q.host_tsc_khz(2_000_000, f) == 2_000_000  # KVM's figure first
    f.write_text("nothing here\n")
    assert q.host_tsc_khz(0, f) is None
    assert q.host_tsc_khz(0, tmp_path / "missing") is None


# --- the IDT -------------------------------------------------------------------------------

def gate(offset: int, present: bool = True, selector: int = 0x10) -> bytes:
    attr = 0x8E if present else 0x0E
    return struct.pack("<HHBBHII", offset & 0xFFFF, selector, 0, attr, (offset >> 16) & 0xFFFF, offset >> 32, 0)


def test_idt_gate_offset() -> None:
    assert q.idt_gate_offset(gate(0xFFFFFFFF81A00B40)) == 0xFFFFFFFF81A00B40
    assert q.idt_gate_offset(gate(0x1234, present=False)) is None
    assert q.idt_gate_offset(b"\0" * 8) is None


class FakeView:
    def __init__(self, base: int, data: bytes) -> None:
        self.base, self.data = base, data

    def read(self, addr: int, size: int) -> bytes:
        off = addr - self.base
        if off < 0 or off + size > len(self.data):
            raise KvmkitError("not mapped")
        return self.data[off:off + size]


def test_read_idt_handler_from_guest_idt() -> None:
    base = 0xFFFFFE0000000000
    idt = b"".join(gate(0xFFFFFFFF81000000 + v * 0x10) for v in range(256))
    view = FakeView(base, idt)
    assert q.read_idt_handler(view, base, 0xFFF, 14) == 0xFFFFFFFF810000E0  # type: ignore[arg-type]
    assert q.read_idt_handler(view, base, 14 * 16 + 14, 14) is None  # limit too small  # type: ignore[arg-type]
    assert q.read_idt_handler(view, base + 0x10000, 0xFFF, 14) is None  # unmapped  # type: ignore[arg-type]


# --- the system call path ---------------------------------------------------------------------

LSTAR = 0xFFFFFFFF81C00080
STAR = (0x0023 << 48) | (0x0010 << 32)
FMASK = 0x47700  # TF|DF|IF|IOPL|AC|NT, Linux's value


def test_syscall_fault_recognised() -> None:
    frame = q.ExceptionFrame(error_code=0x15, rip=LSTAR, cs=0x33, rflags=0x246, rsp=0x7FFC0000, ss=0x2B)
    assert q.is_syscall_fault(frame, LSTAR, LSTAR)
    assert not q.is_syscall_fault(frame, LSTAR + 1, LSTAR)
    kernel = q.ExceptionFrame(0x0, LSTAR, 0x10, 0x46, 0xFFFFC90000000000, 0x18)
    assert not q.is_syscall_fault(kernel, LSTAR, LSTAR)  # CPL0 fault at LSTAR: a real kernel bug, leave it
    other = q.ExceptionFrame(0x14, 0x401000, 0x33, 0x246, 0x7FFC0000, 0x2B)
    assert not q.is_syscall_fault(other, 0x401000, LSTAR)
    assert not q.is_syscall_fault(frame, 0, 0)


def test_syscall_entry_state_is_what_syscall_does() -> None:
    frame = q.ExceptionFrame(0x15, LSTAR, 0x33, 0x246, 0x7FFC1230, 0x2B)
    st = q.syscall_entry_state(frame, r11=0x10246, star=STAR, fmask=FMASK, lstar=LSTAR)
    assert st.rip == LSTAR
    assert st.rsp == 0x7FFC1230  # the user stack: entry_SYSCALL_64 switches stacks itself
    assert st.cs == 0x10 and st.ss == 0x18
    assert st.rflags == 0x2 | (0x10246 & ~FMASK & ~RFLAGS_RF)
    assert not st.rflags & RFLAGS_IF


def test_exception_frame_unpack() -> None:
    raw = struct.pack("<6Q", 0x15, LSTAR, 0x33, 0x246, 0x7FFC0000, 0x2B)
    f = q.ExceptionFrame.unpack(raw)
    assert (f.error_code, f.rip, f.cs, f.rflags, f.rsp, f.ss) == (0x15, LSTAR, 0x33, 0x246, 0x7FFC0000, 0x2B)


class FakeVcpu:
    """Just what on_debug touches: registers, segments, MSRs and an identity-mapped guest memory."""

    def __init__(self, regs: s.kvm_regs, sregs: s.kvm_sregs, msrs: dict[int, int]) -> None:
        self.id = 0
        self.regs, self.sregs, self.msrs = regs, sregs, msrs
        self.calls: list[str] = []

    def get_regs(self) -> s.kvm_regs:
        return s.kvm_regs.from_buffer_copy(bytes(self.regs))

    def set_regs(self, regs: s.kvm_regs) -> None:
        self.calls.append("set_regs")
        self.regs = regs

    def get_sregs(self) -> s.kvm_sregs:
        return s.kvm_sregs.from_buffer_copy(bytes(self.sregs))

    def set_sregs(self, sregs: s.kvm_sregs) -> None:
        self.calls.append("set_sregs")
        self.sregs = sregs

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        return {i: self.msrs.get(i, 0) for i in indices}

    def set_msrs(self, values: dict[int, int]) -> int:
        self.msrs.update(values)
        return len(values)

    def set_guest_debug(self, control: int, debugreg: list[int] | None = None) -> None:
        self.calls.append("set_guest_debug")
        self.debugreg = debugreg

    def translate(self, linear: int) -> s.kvm_translation:
        t = s.kvm_translation()
        t.linear_address, t.physical_address, t.valid = linear, linear & 0xFFFFF, 1
        return t


class FakeRam:
    def __init__(self) -> None:
        self.data = bytearray(1 << 20)

    def read_available(self, gpa: int, n: int) -> bytes:
        return bytes(self.data[gpa:gpa + n])

    def write(self, gpa: int, data: bytes) -> None:
        self.data[gpa:gpa + len(data)] = data


def syscall_fault(gate_cs: int) -> tuple[q.NestedPvmQuirks, FakeVcpu]:
    """A vCPU stopped on the watched #PF handler for a user SYSCALL, the fault's frame on its stack."""
    ram = FakeRam()
    quirks = q.NestedPvmQuirks(cpus=1, mem=ram, tsc_khz=None)  # type: ignore[arg-type]
    handler, kstack = 0xFFFFFFFF81A00000, 0xFFFFC90000008F00
    quirks._handler[0] = handler
    regs = s.kvm_regs(rip=handler, rsp=kstack, r11=0x246, rcx=0x401234)
    sregs = s.kvm_sregs()
    sregs.cr2 = LSTAR
    sregs.cs.selector = gate_cs
    sregs.fs.base = 0x4C8380  # the user's TLS: nothing about the restart may touch it
    frame = struct.pack("<6Q", 0x15, LSTAR, 0x33, 0x246, 0x7FFC1230, 0x2B)
    ram.write(kstack & 0xFFFFF, frame)
    vcpu = FakeVcpu(regs, sregs, {q.MSR_LSTAR: LSTAR, q.MSR_STAR: STAR, q.MSR_SYSCALL_MASK: FMASK})
    return quirks, vcpu


def test_syscall_restart_sets_only_the_general_registers() -> None:
    quirks, vcpu = syscall_fault(gate_cs=0x10)
    assert quirks.on_debug(vcpu, None)  # type: ignore[arg-type]
    assert vcpu.calls == ["set_regs"]  # no KVM_SET_SREGS: FS base, CRs, EFER and pending IRQs untouched
    assert (vcpu.regs.rip, vcpu.regs.rsp, vcpu.regs.rcx) == (LSTAR, 0x7FFC1230, 0x401234)
    assert not vcpu.regs.rflags & RFLAGS_IF
    assert vcpu.sregs.fs.base == 0x4C8380
    assert quirks.counters.syscalls == 1 and quirks.counters.sregs_restarts == 0


def test_syscall_restart_loads_star_segments_when_the_gate_differs() -> None:
    quirks, vcpu = syscall_fault(gate_cs=0x08)
    assert quirks.on_debug(vcpu, None)  # type: ignore[arg-type]
    assert vcpu.calls == ["set_sregs", "set_regs"]
    assert vcpu.sregs.cs.selector == 0x10 and vcpu.sregs.ss.selector == 0x18
    assert vcpu.sregs.fs.base == 0x4C8380
    assert quirks.counters.sregs_restarts == 1


def test_kvm_hypercall_features_are_hidden() -> None:
    """PV spinlock kicks, PV IPIs and PV yield are VMCALLs, which PVM's emulator never completes."""
    leaf = s.kvm_cpuid_entry2(function=q.KVM_CPUID_FEATURES, eax=0x01FFFFFF)
    (out,) = build_cpuid([leaf], apic_id=1, ncpus=2, clear=q.NestedPvmQuirks(cpus=2, mem=None, tsc_khz=None).cpuid_clear())  # type: ignore[arg-type]
    assert out.eax & (q.KVM_FEATURE_PV_UNHALT | q.KVM_FEATURE_PV_SEND_IPI | q.KVM_FEATURE_PV_SCHED_YIELD) == 0
    assert out.eax & 1  # the kvmclock and the rest stay


def long_mode_vcpu_with_idt(handler: int) -> tuple[q.NestedPvmQuirks, FakeVcpu]:
    """A 64-bit vCPU whose IDT (at 0x2000, identity-mapped) has its #PF gate at ``handler``."""
    ram = FakeRam()
    quirks = q.NestedPvmQuirks(cpus=2, mem=ram, tsc_khz=None)  # type: ignore[arg-type]
    ram.write(0x2000 + 14 * 16, gate(handler))
    sregs = s.kvm_sregs()
    sregs.efer = EFER_LME | EFER_LMA
    sregs.idt.base, sregs.idt.limit = 0x2000, 256 * 16 - 1
    return quirks, FakeVcpu(s.kvm_regs(), sregs, {})


def test_the_lstar_write_arms_the_breakpoint_at_once() -> None:
    """A secondary CPU's syscall_init() is the moment it can make system calls: no waiting for a kick."""
    handler = 0xFFFFFFFF81A00000
    quirks, vcpu = long_mode_vcpu_with_idt(handler)
    assert quirks.on_lstar_write(vcpu, LSTAR)  # type: ignore[arg-type]
    assert vcpu.msrs[q.MSR_LSTAR] == LSTAR
    assert vcpu.calls == ["set_guest_debug"] and vcpu.debugreg is not None and vcpu.debugreg[0] == handler
    assert quirks.counters.lstar_writes == 1 and quirks.counters.rearms == 1


def test_a_non_canonical_lstar_is_refused_unwritten() -> None:
    quirks, vcpu = long_mode_vcpu_with_idt(0xFFFFFFFF81A00000)
    assert not quirks.on_lstar_write(vcpu, 0x0000800000000000)  # type: ignore[arg-type]
    assert q.MSR_LSTAR not in vcpu.msrs and vcpu.calls == []


def test_no_idt_is_read_outside_long_mode() -> None:
    quirks, vcpu = long_mode_vcpu_with_idt(0xFFFFFFFF81A00000)
    vcpu.sregs.efer = 0
    assert quirks.on_lstar_write(vcpu, LSTAR)  # type: ignore[arg-type]
    assert vcpu.calls == [] and quirks.counters.rearms == 0


@pytest.mark.parametrize("address, la57, ok", [
    (0, False, True), (0x00007FFFFFFFFFFF, False, True), (0x0000800000000000, False, False),
    (0xFFFF800000000000, False, True), (0xFFFF7FFFFFFFFFFF, False, False), (0xFFFFFFFFFFFFFFFF, False, True),
    (0x0000800000000000, True, True), (0x00FFFFFFFFFFFFFF, True, True), (0x0100000000000000, True, False),
    (0xFF00000000000000, True, True), (0xFEFFFFFFFFFFFFFF, True, False),
])
def test_is_canonical(address: int, la57: bool, ok: bool) -> None:
    assert is_canonical(address, la57) is ok
