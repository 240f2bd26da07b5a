"""Just enough of an x86-64 instruction decoder to complete what a nested KVM cannot emulate.

On the nested-PVM host some CPL0 instructions end KVM_RUN with an emulation
failure (docs/quirks.md). kvmkit finishes them itself: it must know each
one's length and, for ldmxcsr/stmxcsr, its memory operand. This module
recognises exactly those instructions (and the no-op instructions at the
start of Linux's exception entry points) and nothing else; anything it does
not know is ``None``, and the caller reports the failure as before.

Pure: bytes in, a description out. Encodings follow the Intel SDM vol. 2
(legacy prefixes, REX, ModRM/SIB, displacements; 0F AE group 15).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

from ..kvm import structs as s

# x86 register numbers (ModRM/SIB encoding) to kvm_regs field names.
GPR_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
_LEGACY_PREFIXES = {0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0x66, 0x67}


@dataclass(frozen=True)
class MemOperand:
    """A ModRM memory operand: ``segment:[base + index*scale + disp]`` or ``[rip + disp]``."""

    base: int | None
    index: int | None
    scale: int
    disp: int
    rip_relative: bool = False
    segment: str | None = None  # "fs" or "gs" when overridden (others have base 0 in 64-bit mode)
    addr32: bool = False


@dataclass(frozen=True)
class Insn:
    """A decoded instruction kvmkit can complete: what it is, how long, its memory operand."""

    kind: str  # int3, fwait, fence, prefetch, cacheflush, wbinvd, clac, stac, ldmxcsr, stmxcsr
    length: int
    mem: MemOperand | None = None


def _modrm(code: bytes, pos: int, rex: int, segment: str | None, addr32: bool) -> tuple[int, int, MemOperand | None, int] | None:
    """Decode ModRM (+SIB, displacement) at ``pos``: (mod, reg, memory operand, position after)."""
    if pos >= len(code):
        return None
    modrm = code[pos]
    pos += 1
    mod, reg, rm = modrm >> 6, (modrm >> 3) & 7, modrm & 7
    if mod == 3:
        return mod, reg, None, pos
    base: int | None = rm | ((rex & 1) << 3)
    index: int | None = None
    scale = 1
    rip_relative = False
    disp_size = {0: 0, 1: 1, 2: 4}[mod]
    if rm == 4:
        if pos >= len(code):
            return None
        sib = code[pos]
        pos += 1
        scale = 1 << (sib >> 6)
        idx = ((sib >> 3) & 7) | ((rex & 2) << 2)
        index = None if idx == 4 else idx
        b = sib & 7
        base = b | ((rex & 1) << 3)
        if b == 5 and mod == 0:
            base = None
            disp_size = 4
    elif rm == 5 and mod == 0:
        base = None
        rip_relative = True
        disp_size = 4
    if pos + disp_size > len(code):
        return None
    if disp_size == 1:
        disp = struct.unpack_from("<b", code, pos)[0]
    elif disp_size == 4:
        disp = struct.unpack_from("<i", code, pos)[0]
    else:
        disp = 0
    pos += disp_size
    return mod, reg, MemOperand(base, index, scale, disp, rip_relative, segment, addr32), pos


def decode(code: bytes) -> Insn | None:
    """Recognise an instruction kvmkit completes for KVM (64-bit mode); None for anything else."""
    pos = 0
    segment = None
    opsize = False
    addr32 = False
    while pos < min(len(code), 14) and code[pos] in _LEGACY_PREFIXES:
        p = code[pos]
        if p == 0x64:
            segment = "fs"
        elif p == 0x65:
            segment = "gs"
        elif p == 0x66:
            opsize = True
        elif p == 0x67:
            addr32 = True
        pos += 1
    rex = 0
    if pos < len(code) and 0x40 <= code[pos] <= 0x4F:
        rex = code[pos]
        pos += 1
    if pos >= len(code):
        return None
    op = code[pos]
    pos += 1
    if op == 0xCC:
        return Insn("int3", pos)
    if op == 0x9B:
        return Insn("fwait", pos)
    if op != 0x0F or pos >= len(code):
        return None
    op2 = code[pos]
    pos += 1
    if op2 in (0x08, 0x09):  # invd, wbinvd: caches are coherent in a VM
        return Insn("wbinvd", pos)
    if op2 == 0x01 and pos < len(code) and code[pos] in (0xCA, 0xCB):
        return Insn("clac" if code[pos] == 0xCA else "stac", pos + 1)
    if op2 not in (0xAE, 0x18, 0x0D):
        return None
    m = _modrm(code, pos, rex, segment, addr32)
    if m is None:
        return None
    mod, reg, mem, end = m
    if op2 == 0x18:  # prefetchnta/t0/t1/t2
        return Insn("prefetch", end, mem) if mem is not None and reg <= 3 else None
    if op2 == 0x0D:  # prefetch/prefetchw (3DNow!/AMD)
        return Insn("prefetch", end, mem) if mem is not None else None
    # 0F AE group 15
    if mem is None:
        if reg in (5, 6, 7) and not opsize:
            return Insn("fence", end)
        return None
    if reg == 2 and not opsize:
        return Insn("ldmxcsr", end, mem)
    if reg == 3 and not opsize:
        return Insn("stmxcsr", end, mem)
    if reg == 7 or (reg == 6 and opsize):  # clflush, clflushopt (66), clwb (66 /6)
        return Insn("cacheflush", end, mem)
    return None


def effective_address(mem: MemOperand, regs: s.kvm_regs, next_rip: int, segment_base: Callable[[str], int] = lambda seg: 0) -> int:
    """The linear address of a memory operand, given the registers and the next instruction's RIP."""
    if mem.rip_relative:
        ea = next_rip + mem.disp
    else:
        ea = mem.disp
        if mem.base is not None:
            ea += getattr(regs, GPR_NAMES[mem.base])
        if mem.index is not None:
            ea += getattr(regs, GPR_NAMES[mem.index]) * mem.scale
    if mem.addr32:
        ea &= 0xFFFF_FFFF
    if mem.segment:
        ea += segment_base(mem.segment)
    return ea & 0xFFFF_FFFF_FFFF_FFFF


def no_op_length(code: bytes) -> int:
    """Length of the instruction at the start of ``code`` if it has no effect, else 0.

    Linux's exception entry points begin with ``endbr64`` (kernel IBT) or a
    NOP that an alternative (clac without SMAP) left behind.
    """
    if code[:4] == b"\xf3\x0f\x1e\xfa":  # endbr64
        return 4
    if code[:1] == b"\x90":
        return 1
    if code[:2] == b"\x66\x90":
        return 2
    pos = 0
    while pos < len(code) and code[pos] in (0x66, 0x2E, 0x3E):
        pos += 1
    if code[pos:pos + 2] == b"\x0f\x1f":  # nopl/nopw with a ModRM operand
        m = _modrm(code, pos + 2, 0, None, False)
        if m is not None:
            return m[3]
    return 0
