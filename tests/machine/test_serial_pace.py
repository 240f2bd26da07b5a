"""--serial-pace: output leaves at the line speed the guest programmed, and nothing is lost.

Driven at the register level (as a polling console driver would) against a
real host loop and socket, at 9600 baud so the line time dominates.
"""

from __future__ import annotations

import time

from kvmkit.host.backends import SocketPairBackend
from kvmkit.host.loop import EventLoop
from kvmkit.machine.serial import SerialPort

THR, IER, LCR, LSR = 0, 1, 3, 5
LSR_THRE = 0x20


def _send(pace: bool, data: bytes, divisor: int = 12) -> tuple[float, bytes]:
    loop = EventLoop()
    backend = SocketPairBackend()
    port = SerialPort("COM1", loop, backend, lambda level: None, pace=pace)
    port.start()
    loop.start()
    peer = backend.peer
    peer.settimeout(10)
    try:
        port.io_write(LCR, 1, 0x83)          # DLAB, 8N1
        port.io_write(0, 1, divisor & 0xFF)  # DLL
        port.io_write(1, 1, divisor >> 8)    # DLM
        port.io_write(LCR, 1, 0x03)
        port.io_write(2, 1, 0x07)            # FIFO on, cleared
        t0 = time.monotonic()
        for i in range(0, len(data), 16):
            deadline = time.monotonic() + 10
            while not port.io_read(LSR, 1) & LSR_THRE:
                assert time.monotonic() < deadline, "THRE never came back"
                time.sleep(0.0002)
            for b in data[i:i + 16]:
                port.io_write(THR, 1, b)
        got = b""
        while len(got) < len(data):
            got += peer.recv(4096)
        return time.monotonic() - t0, got
    finally:
        loop.stop()
        port.close()
        peer.close()


def test_paced_output_takes_the_line_time_at_9600_baud():
    data = bytes(range(48, 48 + 64))
    elapsed, got = _send(True, data)
    assert got == data
    line_time = len(data) * 10 / 9600  # 8N1: 10 bits a character
    assert elapsed >= line_time * 0.9, (elapsed, line_time)


def test_unpaced_output_is_not_held_to_the_line_time():
    data = bytes(range(48, 48 + 64))
    elapsed, got = _send(False, data)
    assert got == data
    assert elapsed < len(data) * 10 / 9600 / 2


def test_stopped_baud_generator_sends_nothing():
    loop = EventLoop()
    backend = SocketPairBackend()
    port = SerialPort("COM1", loop, backend, lambda level: None, pace=True)
    port.start()
    loop.start()
    try:
        port.io_write(LCR, 1, 0x83)
        port.io_write(0, 1, 0)
        port.io_write(1, 1, 0)               # divisor 0: no clock
        port.io_write(LCR, 1, 0x03)
        port.io_write(THR, 1, 0x41)
        time.sleep(0.05)
        assert not port.io_read(LSR, 1) & LSR_THRE
        assert port.counters.host_bytes_out == 0
    finally:
        loop.stop()
        port.close()
        backend.peer.close()
