"""The instruction decoder the nested-PVM quirks complete instructions with (pure: bytes in)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmkit.kvm import structs as s
from kvmkit.machine import x86insn as x

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
    insn = x.decode(code + b"\x90" * 4)
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
    assert x.decode(code) is None


def _regs(**kw: int) -> s.kvm_regs:
    r = s.kvm_regs()
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def test_effective_address_forms() -> None:
    regs = _regs(rax=0x1000, rcx=0x10, rsp=0x8000, rbp=0x9000, r12=0x5000)
    ea = lambda code, rip=0x400000: x.effective_address(x.decode(code).mem, regs, rip + x.decode(code).length, lambda seg: 0x77000 if seg == "gs" else 0)  # noqa: E731
    assert ea(b"\x0f\xae\x54\x24\x04") == 0x8004
    assert ea(b"\x0f\xae\x5d\xf0") == 0x8FF0
    assert ea(b"\x0f\xae\x15\x10\x00\x00\x00") == 0x400000 + 7 + 0x10
    assert ea(b"\x41\x0f\xae\x54\x24\x08") == 0x5008
    assert ea(b"\x65\x0f\xae\x14\x25\x00\x10\x00\x00") == 0x77000 + 0x1000
    assert ea(b"\x0f\xae\x94\x88\x00\x02\x00\x00") == 0x1000 + 0x10 * 4 + 0x200
    assert ea(b"\x0f\xae\x10") == 0x1000  # (%rax)


def test_effective_address_wraps_to_64_bits() -> None:
    regs = _regs(rbp=0x10)
    insn = x.decode(b"\x0f\xae\x5d\xf0")  # -0x10(%rbp) - 0x20 below zero
    regs.rbp = 0x8
    assert x.effective_address(insn.mem, regs, 0) == (0x8 - 0x10) & (2**64 - 1)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=20))
def test_decode_never_raises(code: bytes) -> None:
    insn = x.decode(code)
    if insn is not None:
        assert 1 <= insn.length <= len(code)


def test_no_op_length() -> None:
    assert x.no_op_length(b"\xf3\x0f\x1e\xfa\x0f\x1f\x00") == 4  # endbr64
    assert x.no_op_length(b"\x0f\x1f\x00\xfc") == 3  # nopl (%rax): clac patched out
    assert x.no_op_length(b"\x0f\x1f\x44\x00\x00") == 5
    assert x.no_op_length(b"\x66\x0f\x1f\x44\x00\x00") == 6
    assert x.no_op_length(b"\x90") == 1
    assert x.no_op_length(b"\x0f\x01\xca") == 0  # clac itself is not a no-op
    assert x.no_op_length(b"\x56") == 0  # push %rsi
    assert x.no_op_length(b"") == 0
