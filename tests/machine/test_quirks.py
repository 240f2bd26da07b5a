"""The nested-PVM quirk pieces without KVM: detection, command line, decoder, IDT, SYSCALL restart."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmkit.errors import KvmkitError
from kvmkit.kvm import structs as s
from kvmkit.machine import quirks as q

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
    for word in ("noxsave", "tsc=reliable", "nowatchdog", "rcupdate.rcu_cpu_stall_suppress=1", "noapic", "pci=off",
                 "nosmp", "mitigations=off", "nopti", "nokaslr", "cryptomgr.notests", "rodata=off"):
        assert word in p
    clear = next(w for w in p if w.startswith("clearcpuid="))
    assert set(clear.split("=", 1)[1].split(",")) >= {"smap", "smep", "erms", "fsrm", "ssse3", "rdtscp", "pcid"}
    bl = next(w for w in p if w.startswith("initcall_blacklist="))
    assert "load_system_certificate_list" in bl and "kfunc_init" in bl
    assert "nosmp" not in q.pvm_cmdline_params(cpus=2, tsc_khz=None)
    assert not any(w.startswith(("tsc_early_khz", "lpj")) for w in q.pvm_cmdline_params(cpus=2, tsc_khz=None))


def test_compose_appends_after_user_params() -> None:
    assert q.compose_cmdline("console=ttyS0", ["pci=off", "nopti"]) == "console=ttyS0 pci=off nopti"
    assert q.compose_cmdline("", ["pci=off"]) == "pci=off"


def test_compose_keeps_user_choice() -> None:
    out = q.compose_cmdline("console=ttyS0 pci=conf1 nokaslr", ["pci=off", "nokaslr", "nopti"])
    assert out == "console=ttyS0 pci=conf1 nokaslr nopti"


def test_compose_keeps_init_arguments_last() -> None:
    out = q.compose_cmdline("console=ttyS0 -- single nopti", ["nopti", "pci=off"])
    assert out == "console=ttyS0 nopti pci=off -- single nopti"
    assert q.compose_cmdline("-- x", ["a"]) == "a -- x"


def test_profile_cmdline_fits_the_kernel_limit() -> None:
    words = q.pvm_cmdline_params(cpus=1, tsc_khz=9_999_999)
    assert len(q.compose_cmdline("console=ttyS0 earlyprintk=serial root=/dev/vda", words)) < 2047


def test_tsc_khz_from_cpuinfo(tmp_path: Path) -> None:
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nmodel name\t: X\ncpu MHz\t\t: 2596.126\n")
    assert q.host_tsc_khz(None, f) == 2596126
    f.write_text("nothing here\n")
    assert q.host_tsc_khz(None, f) is None
    assert q.host_tsc_khz(None, tmp_path / "missing") is None


# --- instruction decoder ----------------------------------------------------------------

@pytest.mark.parametrize("code,kind,length", [
    (b"\xcc", "int3", 1),
    (b"\x9b", "fwait", 1),
    (b"\x0f\xae\xe8", "fence", 3),  # lfence
    (b"\x0f\xae\xf0", "fence", 3),  # mfence
    (b"\x0f\xae\xf8", "fence", 3),  # sfence
    (b"\x0f\x09", "wbinvd", 2),
    (b"\x0f\x01\xca", "clac", 3),
    (b"\x0f\x01\xcb", "stac", 3),
    (b"\x0f\x18\x0e", "prefetch", 3),  # prefetcht0 (%rsi)
    (b"\x0f\x18\x46\x40", "prefetch", 4),  # prefetcht0 0x40(%rsi)
    (b"\x0f\x0d\x8f\x00\x01\x00\x00", "prefetch", 7),  # prefetchw 0x100(%rdi)
    (b"\x0f\xae\x3f", "cacheflush", 3),  # clflush (%rdi)
    (b"\x66\x0f\xae\x38", "cacheflush", 4),  # clflushopt (%rax)
    (b"\x66\x0f\xae\x30", "cacheflush", 4),  # clwb (%rax)
    (b"\x0f\xae\x54\x24\x04", "ldmxcsr", 5),  # ldmxcsr 0x4(%rsp)
    (b"\x0f\xae\x5d\xf0", "stmxcsr", 4),  # stmxcsr -0x10(%rbp)
    (b"\x0f\xae\x15\x10\x00\x00\x00", "ldmxcsr", 7),  # ldmxcsr 0x10(%rip)
    (b"\x41\x0f\xae\x54\x24\x08", "ldmxcsr", 6),  # ldmxcsr 0x8(%r12)
    (b"\x65\x0f\xae\x14\x25\x00\x10\x00\x00", "ldmxcsr", 9),  # ldmxcsr %gs:0x1000
    (b"\x0f\xae\x94\x88\x00\x02\x00\x00", "ldmxcsr", 8),  # ldmxcsr 0x200(%rax,%rcx,4)
])
def test_decode_recognised(code: bytes, kind: str, length: int) -> None:
    insn = q.decode(code + b"\x90" * 4)
    assert insn is not None and insn.kind == kind and insn.length == length


@pytest.mark.parametrize("code", [
    b"\x90", b"\x0f\xc7\x0f",  # cmpxchg16b stays an error
    b"\x0f\xae\x2f",  # xrstor (%rdi)
    b"\x0f\xae\x27",  # xsave
    b"\x0f\xae\x0f",  # fxrstor
    b"\x0f\x18\xc0",  # 0f 18 with a register operand is a hint NOP, not emulated here
    b"\x0f\x01\xd0",  # xgetbv
    b"", b"\x0f", b"\x0f\xae", b"\x66\x66\x66",
    b"\x0f\xae\x94\x88\x00\x02",  # truncated displacement
])
def test_decode_leaves_others(code: bytes) -> None:
    assert q.decode(code) is None


def _regs(**kw: int) -> s.kvm_regs:
    r = s.kvm_regs()
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def test_effective_address_forms() -> None:
    regs = _regs(rax=0x1000, rcx=0x10, rsp=0x8000, rbp=0x9000, r12=0x5000)
    ea = lambda code, rip=0x400000: q.effective_address(q.decode(code).mem, regs, rip + q.decode(code).length, lambda seg: 0x77000 if seg == "gs" else 0)  # noqa: E731
    assert ea(b"\x0f\xae\x54\x24\x04") == 0x8004
    assert ea(b"\x0f\xae\x5d\xf0") == 0x8FF0
    assert ea(b"\x0f\xae\x15\x10\x00\x00\x00") == 0x400000 + 7 + 0x10
    assert ea(b"\x41\x0f\xae\x54\x24\x08") == 0x5008
    assert ea(b"\x65\x0f\xae\x14\x25\x00\x10\x00\x00") == 0x77000 + 0x1000
    assert ea(b"\x0f\xae\x94\x88\x00\x02\x00\x00") == 0x1000 + 0x10 * 4 + 0x200
    assert ea(b"\x0f\xae\x10") == 0x1000  # (%rax)


def test_effective_address_wraps_to_64_bits() -> None:
    regs = _regs(rbp=0x10)
    insn = q.decode(b"\x0f\xae\x5d\xf0")  # -0x10(%rbp) - 0x20 below zero
    regs.rbp = 0x8
    assert q.effective_address(insn.mem, regs, 0) == (0x8 - 0x10) & (2**64 - 1)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=20))
def test_decode_never_raises(code: bytes) -> None:
    insn = q.decode(code)
    if insn is not None:
        assert 1 <= insn.length <= len(code)


def test_no_op_length() -> None:
    assert q.no_op_length(b"\xf3\x0f\x1e\xfa\x0f\x1f\x00") == 4  # endbr64
    assert q.no_op_length(b"\x0f\x1f\x00\xfc") == 3  # nopl (%rax): clac patched out
    assert q.no_op_length(b"\x0f\x1f\x44\x00\x00") == 5
    assert q.no_op_length(b"\x66\x0f\x1f\x44\x00\x00") == 6
    assert q.no_op_length(b"\x90") == 1
    assert q.no_op_length(b"\x0f\x01\xca") == 0  # clac itself is not a no-op
    assert q.no_op_length(b"\x56") == 0  # push %rsi
    assert q.no_op_length(b"") == 0


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
    assert st.rflags == 0x2 | (0x10246 & ~FMASK & ~q.RFLAGS_RF)
    assert not st.rflags & q.RFLAGS_IF


def test_exception_frame_unpack() -> None:
    raw = struct.pack("<6Q", 0x15, LSTAR, 0x33, 0x246, 0x7FFC0000, 0x2B)
    f = q.ExceptionFrame.unpack(raw)
    assert (f.error_code, f.rip, f.cs, f.rflags, f.rsp, f.ss) == (0x15, LSTAR, 0x33, 0x246, 0x7FFC0000, 0x2B)
