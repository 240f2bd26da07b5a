"""Exit paths driven by tiny real-mode guests: string I/O, MMIO, unclaimed accesses, malformed input.

These need nothing but KVM, so each exit kind is checked in isolation,
without the bundled guest.
"""

from __future__ import annotations

import pytest

from kvmkit.machine.cpu import set_real_mode
from kvmkit.machine.config import VmConfig
from kvmkit.machine.machine import Machine

pytestmark = pytest.mark.kvm

LOAD = 0x1000
EXIT = bytes([0xBA, 0x01, 0x05, 0xB0, 0x00, 0xEE, 0xF4])  # mov dx,0x501; mov al,0; out dx,al; hlt


class Recorder:
    def __init__(self, size: int = 0x100) -> None:
        self.mem = bytearray(range(256)) * (size // 256 or 1)
        self.log: list[tuple] = []

    def io_read(self, offset: int, size: int) -> int:
        self.log.append(("r", offset, size))
        return int.from_bytes(self.mem[offset:offset + size], "little")

    def io_write(self, offset: int, size: int, value: int) -> None:
        self.log.append(("w", offset, size, value))
        self.mem[offset:offset + size] = value.to_bytes(size, "little")


def run_blob(code: bytes, mem_size: int = 2 << 20, setup=None, timeout: float = 30) -> Machine:
    m = Machine(VmConfig(mem_size=mem_size, serial=["off"] * 4))
    assert m.mem is not None
    m.mem.write(LOAD, code)
    if setup:
        setup(m)
    set_real_mode(m.runners[0].vcpu, LOAD)
    m.start()
    assert m.wait(timeout) is not None, "guest did not stop"
    m.shutdown()
    return m


def test_rep_outsb_and_insb_are_string_io_with_count():
    dev = Recorder()
    data = b"kvmkit!!"
    code = bytes([
        0xBE, 0x00, 0x20,        # mov si, 0x2000
        0xBA, 0x10, 0x05,        # mov dx, 0x510
        0xB9, 0x08, 0x00,        # mov cx, 8
        0xF3, 0x6E,              # rep outsb
        0xBF, 0x00, 0x30,        # mov di, 0x3000
        0xB9, 0x04, 0x00,        # mov cx, 4
        0xF3, 0x6D,              # rep insw  (4 x 16-bit)
    ]) + EXIT

    def setup(m: Machine) -> None:
        m.pio_bus.register(0x510, 2, dev, "rec")
        m.mem.write(0x2000, data)

    m = run_blob(code, setup=setup)
    try:
        assert m.status == 0
        writes = [e[3] for e in dev.log if e[0] == "w"]
        assert bytes(writes) == data
        reads = [e for e in dev.log if e[0] == "r"]
        assert len(reads) >= 4 and all(e[2] == 2 for e in reads)
        # the in-data landed in guest memory, little endian: the recorder's
        # first two bytes, of which byte 0 is the last byte outsb wrote
        assert m.mem.read(0x3000, 8) == bytes([data[-1], 1]) * 4
        st = m.exit_stats()[0]
        assert st.pio[(0x510, "out")] >= 1
    finally:
        m.close()


def test_mmio_read_and_write_reach_the_mmio_bus():
    dev = Recorder()
    code = bytes([
        0xB8, 0x00, 0x90,        # mov ax, 0x9000
        0x8E, 0xD8,              # mov ds, ax        -> ds:0 = 0x90000 (not RAM with 512 KiB)
        0xC6, 0x06, 0x10, 0x00, 0x42,   # mov byte [0x10], 0x42
        0xC7, 0x06, 0x20, 0x00, 0x34, 0x12,  # mov word [0x20], 0x1234
        0xA0, 0x05, 0x00,        # mov al, [0x5]
        0xBA, 0x00, 0x05,        # mov dx, 0x500
        0xEE,                    # out dx, al  (report what was read)
    ]) + EXIT
    port = Recorder()

    def setup(m: Machine) -> None:
        m.mmio_bus.register(0x90000, 0x100, dev, "mmio-rec")
        m.pio_bus.register(0x500, 1, port, "port")

    m = run_blob(code, mem_size=512 << 10, setup=setup)
    try:
        assert m.status == 0
        assert ("w", 0x10, 1, 0x42) in dev.log
        assert ("w", 0x20, 2, 0x1234) in dev.log
        assert ("r", 0x5, 1) in dev.log
        assert port.log[-1] == ("w", 0, 1, 5)
        st = m.exit_stats()[0]
        assert st.mmio[(0x90000, "w")] == 2 and st.mmio[(0x90000, "r")] == 1
    finally:
        m.close()


def test_unclaimed_port_reads_all_ones_and_is_counted():
    port = Recorder()
    code = bytes([
        0xBA, 0x34, 0x12,        # mov dx, 0x1234
        0xEC,                    # in al, dx
        0xBA, 0x00, 0x05,        # mov dx, 0x500
        0xEE,                    # out dx, al
    ]) + EXIT

    def setup(m: Machine) -> None:
        m.pio_bus.register(0x500, 1, port, "port")

    m = run_blob(code, setup=setup)
    try:
        assert port.log == [("w", 0, 1, 0xFF)]
        assert m.pio_bus.unclaimed_reads == 1
        assert m.pio_bus.unclaimed[0x1234] == 1
    finally:
        m.close()


def test_exit_port_status_and_stats_table():
    m = run_blob(bytes([0xBA, 0x01, 0x05, 0xB0, 0x2A, 0xEE, 0xF4]))
    try:
        assert m.status == 42
        assert "exit port" in m.stop_message
        table = m.stats_table()
        assert "IO" in table and "0x0501 out" in table
    finally:
        m.close()


def test_a_device_that_raises_does_not_stop_the_vm():
    class Broken:
        def io_read(self, offset, size):
            raise RuntimeError("boom")

        def io_write(self, offset, size, value):
            raise RuntimeError("boom")

    code = bytes([0xBA, 0x00, 0x05, 0xEE, 0xEC]) + EXIT

    def setup(m: Machine) -> None:
        m.pio_bus.register(0x500, 1, Broken(), "broken")

    m = run_blob(code, setup=setup)
    try:
        assert m.status == 0
        assert m.pio_bus.device_errors == 2
    finally:
        m.close()


def test_hlt_with_interrupts_off_keeps_vcpu_in_kernel_and_stop_kicks_it():
    import threading
    import time
    code = bytes([0xFA, 0xF4, 0xEB, 0xFD])  # cli; hlt; jmp $-1
    m = Machine(VmConfig(serial=["off"] * 4))
    try:
        m.mem.write(LOAD, code)
        set_real_mode(m.runners[0].vcpu, LOAD)
        m.start()
        time.sleep(0.3)
        assert m.status is None
        t0 = time.monotonic()
        threading.Thread(target=m.request_stop, args=(130, "test stop")).start()
        assert m.wait(10) == 130
        assert time.monotonic() - t0 < 5
        assert not m.runners[0].thread.is_alive()
        m.shutdown()
    finally:
        m.close()


def test_hlt_without_irqchip_exits_to_user_space():
    m = Machine(VmConfig(serial=["off"] * 4, irqchip=False))
    try:
        m.mem.write(LOAD, bytes([0xFA, 0xF4]))  # cli; hlt
        set_real_mode(m.runners[0].vcpu, LOAD)
        m.start()
        assert m.wait(30) == 0
        m.shutdown()
        assert "halted" in m.stop_message
        assert m.exit_stats()[0].exits[5] == 1  # KVM_EXIT_HLT
    finally:
        m.close()
