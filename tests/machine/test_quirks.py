"""The nested-PVM quirk pieces without KVM: detection, kernel parameters, IDT, SYSCALL restart."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from kvmkit.errors import KvmkitError
from kvmkit.machine import quirks as q
from kvmkit.x86 import RFLAGS_IF, RFLAGS_RF

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
