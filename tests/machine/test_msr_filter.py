"""The guest's WRMSR to LSTAR reaches the nested-PVM quirks through KVM's MSR filter.

Tiny real-mode guests (CPL0, so WRMSR is allowed) write LSTAR; the profile's
hook must write the value for the guest, and a value KVM refuses must give
the guest #GP, as the CPU does, not a crash of the VMM.
"""

from __future__ import annotations

import struct

import pytest

from kvmkit.kvm.constants import Cap
from kvmkit.kvm.system import Kvm
from kvmkit.machine.config import VmConfig
from kvmkit.machine.cpu import set_real_mode
from kvmkit.machine.machine import Machine
from kvmkit.x86 import MSR_LSTAR

pytestmark = pytest.mark.kvm

LOAD = 0x1000
GP_HANDLER = 0x1800


def wrmsr_lstar(value: int) -> bytes:
    lo, hi = value & 0xFFFFFFFF, value >> 32
    return (b"\x66\xb9" + struct.pack("<I", MSR_LSTAR)    # mov ecx, LSTAR
            + b"\x66\xb8" + struct.pack("<I", lo)           # mov eax, low half
            + b"\x66\xba" + struct.pack("<I", hi)           # mov edx, high half
            + b"\x0f\x30"                                   # wrmsr
            + b"\xba\x01\x05\xb0\x00\xee\xf4")              # exit status 0; hlt


GP_EXIT = b"\xba\x01\x05\xb0\x07\xee\xf4"  # #GP: exit status 7


def run(value: int) -> Machine:
    kvm = Kvm()
    if not (kvm.check_extension(Cap.X86_USER_SPACE_MSR) and kvm.check_extension(Cap.X86_MSR_FILTER)):
        pytest.skip("this KVM has no MSR filter")
    m = Machine(VmConfig(mem_size=2 << 20, serial=["off"] * 4, quirks="nested-pvm"))
    assert m.mem is not None
    m.mem.write(LOAD, wrmsr_lstar(value))
    m.mem.write(GP_HANDLER, GP_EXIT)
    m.mem.write(13 * 4, struct.pack("<HH", GP_HANDLER, 0))  # real-mode IVT entry 13
    set_real_mode(m.runners[0].vcpu, LOAD)
    m.start()
    assert m.wait(30) is not None, "guest did not stop"
    m.shutdown()
    return m


def test_the_guests_lstar_write_reaches_the_profile_and_takes_effect() -> None:
    value = 0xFFFFFFFF81A00080
    m = run(value)
    try:
        assert m.status == 0
        assert m.quirks.counters.lstar_writes == 1
        assert m.runners[0].vcpu.get_msrs([MSR_LSTAR])[MSR_LSTAR] == value
        assert m.quirks.counters.rearms == 0  # real mode: no IDT to watch yet
    finally:
        m.close()


def test_a_non_canonical_lstar_gives_the_guest_gp() -> None:
    m = run(0x0000800000000000)
    try:
        assert m.status == 7
        assert m.quirks.counters.lstar_writes == 0
        assert m.runners[0].vcpu.get_msrs([MSR_LSTAR])[MSR_LSTAR] == 0
    finally:
        m.close()
