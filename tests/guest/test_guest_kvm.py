"""Boot the bundled guest under /dev/kvm through its 64-bit (Linux boot
protocol) entry, with a deliberately tiny stand-in loader and port handler:
just enough to check the guest's own side (entry, IDT, ring 3, the exit
port, interrupt-driven COM1 input, the exits its fault commands promise)
independently of kvmkit's machine layer. Whole-VMM tests belong elsewhere.
"""

from __future__ import annotations

import ctypes
import mmap
import shutil
import struct
import time

import pytest

from kvmkit.boot.bundled import bundled_guest
from kvmkit.errors import KvmkitError

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(shutil.which("make") is None or shutil.which("gcc") is None,
                       reason="gcc and make are needed to build the bundled guest"),
]

MEM = 64 << 20
BOOT_PARAMS, CMDLINE, GDT, PML4 = 0x7000, 0x20000, 0x500, 0x9000


def boot_kvm(script: str, typed: str = "", timeout: float = 60.0) -> tuple[str, str]:
    """Run the guest; return (how it ended, COM1 output). typed: lines sent
    one per "kvmkit> " prompt, each raising ISA IRQ 4."""
    try:
        from kvmkit.kvm.constants import ExitReason
        from kvmkit.kvm.system import Kvm
        kvm = Kvm()
    except (KvmkitError, ImportError) as e:
        pytest.skip(f"no usable /dev/kvm: {e}")
    vm = kvm.create_vm()
    mem = mmap.mmap(-1, MEM, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    vm.set_tss_addr(0xFFFBD000)
    vm.create_irqchip()
    vm.create_pit2()
    vm.set_user_memory_region(0, 0, MEM, ctypes.addressof(ctypes.c_char.from_buffer(mem)))

    data = bundled_guest().read_bytes()
    entry, phoff = struct.unpack_from("<QQ", data, 24)
    for i in range(struct.unpack_from("<H", data, 56)[0]):
        p_type, _, off, _, paddr, filesz, _, _ = struct.unpack_from("<IIQQQQQQ", data, phoff + 56 * i)
        if p_type == 1:
            mem[paddr:paddr + filesz] = data[off:off + filesz]
    mem[GDT:GDT + 32] = struct.pack("<4Q", 0, 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF)
    mem[PML4:PML4 + 8] = struct.pack("<Q", (PML4 + 0x1000) | 3)
    for i in range(4):
        mem[PML4 + 0x1000 + 8 * i:PML4 + 0x1008 + 8 * i] = struct.pack("<Q", (PML4 + 0x2000 + 0x1000 * i) | 3)
    mem[PML4 + 0x2000:PML4 + 0x2000 + 8 * 2048] = struct.pack("<2048Q", *((i << 21) | 0x83 for i in range(2048)))
    cmd = f"console=ttyS0 -- {script}".encode() + b"\0"
    mem[CMDLINE:CMDLINE + len(cmd)] = cmd
    mem[BOOT_PARAMS + 0x228:BOOT_PARAMS + 0x22C] = struct.pack("<I", CMDLINE)
    e820 = [(0, 0x9FC00, 1), (0x9FC00, 0x400, 2), (0x100000, MEM - 0x100000, 1)]
    mem[BOOT_PARAMS + 0x1E8] = len(e820)
    for i, entry_ in enumerate(e820):
        mem[BOOT_PARAMS + 0x2D0 + 20 * i:BOOT_PARAMS + 0x2E4 + 20 * i] = struct.pack("<QQI", *entry_)

    vcpu = vm.create_vcpu(0)
    vcpu.set_cpuid2(kvm.supported_cpuid())
    sr = vcpu.get_sregs()
    for name in ("cs", "ds", "es", "fs", "gs", "ss"):
        seg = getattr(sr, name)
        seg.base, seg.limit, seg.present, seg.s, seg.g, seg.dpl = 0, 0xFFFFFFFF, 1, 1, 1, 0
        if name == "cs":
            seg.selector, seg.type, seg.l, seg.db = 0x10, 11, 1, 0
        else:
            seg.selector, seg.type, seg.l, seg.db = 0x18, 3, 0, 1
    sr.gdt.base, sr.gdt.limit = GDT, 31
    sr.cr3, sr.cr4, sr.cr0, sr.efer = PML4, 0x20, 0x80000031, 0x500
    vcpu.set_sregs(sr)
    regs = vcpu.get_regs()
    regs.rip, regs.rsi, regs.rflags, regs.rsp = entry, BOOT_PARAMS, 2, 0x8000
    vcpu.set_regs(regs)

    out, rx, lines = bytearray(), bytearray(), [ln.encode() + b"\r" for ln in typed.splitlines()]
    run, deadline, lcr = vcpu.run, time.monotonic() + timeout, 0
    try:
        while time.monotonic() < deadline:
            vcpu.kvm_run()
            reason = run.exit_reason
            if reason == ExitReason.IO:
                io = run.io
                buf = vcpu.io_data(io.data_offset, io.size * io.count)
                if io.direction == 1 and io.port == 0x501:
                    return f"status {buf[0]}", out.decode(errors="replace")
                if io.direction == 1 and io.port == 0x3FB:
                    lcr = buf[0]
                elif io.direction == 1 and io.port == 0x3F8 and not lcr & 0x80:  # THR, not DLL
                    out += bytes(buf)
                    if out.endswith(b"kvmkit> ") and lines:
                        rx += lines.pop(0)
                        vm.irq_line(4, True)
                        vm.irq_line(4, False)
                elif io.direction == 0:
                    if io.port == 0x3F8 and rx:
                        value = rx.pop(0)
                    else:   # LSR: THRE|TEMT (+DR); IIR: FIFOs on, RX data or none
                        value = {0x3FD: 0x61 if rx else 0x60, 0x3FA: 0xC4 if rx else 0xC1}.get(io.port, 0xFF)
                    for i in range(len(buf)):
                        buf[i] = value
            elif reason == ExitReason.MMIO:
                if not run.mmio.is_write:
                    ctypes.memset(ctypes.addressof(run.mmio.data), 0xFF, 8)
            else:
                return ExitReason(reason).name, out.decode(errors="replace")
        return "timeout", out.decode(errors="replace")
    finally:
        vcpu.close()
        vm.close()
        kvm.close()


def test_script_user_mode_and_pio_loop():
    how, out = boot_kvm("echo hi; user-test; pio-loop 100 0x80; pio-read-loop 100 0x80; ud2; poweroff 7")
    assert out.startswith("kvmkit guest "), out
    assert "boot: linux64, memory: 63 MiB RAM" in out
    assert "\r\nhi\r\n" in out
    assert "hello from user mode" in out and "user-test: ok" in out
    assert "pio-loop: 100 x outb 0x80 at CPL3:" in out
    assert "pio-read-loop: 100 x inb 0x80 at CPL3:" in out
    assert "ud2: caught #UD" in out
    assert how == "status 7", out


def test_unexpected_exception_exits_3():
    how, out = boot_kvm("gp-fault")
    assert "guest exception 13 at rip=" in out
    assert how == "status 3"


def test_triple_fault_is_shutdown():
    how, out = boot_kvm("triple-fault")
    assert how == "SHUTDOWN", out


def test_bad_insn_is_internal_error():
    how, out = boot_kvm("bad-insn")
    assert how == "INTERNAL_ERROR", out


def test_interactive_input_by_interrupt():
    how, out = boot_kvm("echo s; shell", typed="echo typed\nticks\npoweroff 9")
    assert "\r\ntyped\r\n" in out
    assert "irq 4: " in out
    assert how == "status 9", out
