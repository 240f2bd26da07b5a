"""The bundled guest's 8250-style driver against kvmkit's 16550A, end to end.

``serial-selftest <port> tx|rx <bytes>`` (guest/serial8250.c) probes the
port as Linux's 8250 driver does, then moves a xorshift32 stream through
it interrupt-driven; these tests are the host end of COM2 (a socket pair)
and check every byte, the probe's verdict and the driver's
"too much work for irq" counter. See docs/serial.md.
"""

from __future__ import annotations

import re
import socket
import threading
import time
import zlib

import pytest

from kvmkit import VirtualMachine
from kvmkit.host.backends import NullBackend, SocketPairBackend
from kvmkit.selftest import SUMMARY, stream

pytestmark = pytest.mark.kvm


def test_stream_definition():
    # The first states of xorshift32(1): 0x00042021, 0x04080601, 0x9dcca8c5 ...
    assert stream(3) == bytes([0x21, 0x01, 0xC5])


def _summary(vm: VirtualMachine, timeout: float) -> dict[str, str]:
    vm.console.wait_for(re.compile(r"serial-selftest: COM2 \S+ (tx|rx) \d+ bytes in .*crc=0x[0-9a-f]{8}"), timeout=timeout)
    m = list(SUMMARY.finditer(vm.console.text))
    assert m, vm.console.text[-2000:]
    return m[-1].groupdict()


def _vm(script: str, com2: SocketPairBackend, fifo: bool = True) -> VirtualMachine:
    return VirtualMachine(script=script + "; shell", serial_fifo=fifo,
                          extra_ports=[com2, NullBackend(), NullBackend()])


def guest_to_host(n: int, fifo: bool = True, timeout: float = 120.0) -> tuple[dict[str, str], bytes, str]:
    com2 = SocketPairBackend()
    got = bytearray()

    def reader() -> None:
        while len(got) < n:
            data = com2.peer.recv(65536)
            if not data:
                return
            got.extend(data)

    with _vm(f"serial-selftest 2 tx {n}", com2, fifo) as vm:
        t = threading.Thread(target=reader, daemon=True)
        t.start()
        s = _summary(vm, timeout)
        t.join(10)
        text = vm.console.text
    return s, bytes(got), text


def host_to_guest(n: int, fifo: bool = True, timeout: float = 120.0) -> tuple[dict[str, str], str]:
    com2 = SocketPairBackend()
    with _vm(f"serial-selftest 2 rx {n}", com2, fifo) as vm:
        # Only once the driver has set the port up: its probe resets the FIFOs.
        vm.console.wait_for(f"ready to receive {n} bytes", timeout=60)
        threading.Thread(target=com2.peer.sendall, args=(stream(n),), daemon=True).start()
        s = _summary(vm, timeout)
        port = vm.machine.serial_ports[1]
        assert port.counters.host_bytes_in == n
        text = vm.console.text
    return s, text


def _check(s: dict[str, str], direction: str, n: int, uart: str = "16550A") -> None:
    assert s["type"] == uart and s["dir"] == direction and int(s["bytes"]) == n
    assert int(s["errors"]) == 0
    assert int(s["overflows"]) == 0, "the driver hit its 512-pass limit (too much work for irq)"
    assert int(s["lsr_errors"]) == 0
    assert int(s["crc"], 16) == zlib.crc32(stream(n))


def test_probe_reports_16550a_without_bugs():
    s, got, text = guest_to_host(4096)
    assert "COM2 at 0x2f8 irq 3: 16550A (fifo 16, tx_loadsz 16), bugs: none" in text
    _check(s, "tx", 4096)
    assert got == stream(4096)


def test_guest_to_host_64k_exact():
    n = 64 * 1024
    s, got, _ = guest_to_host(n)
    _check(s, "tx", n)
    assert len(got) == n and got == stream(n)


def test_host_to_guest_64k_exact():
    n = 64 * 1024
    s, _ = host_to_guest(n)
    _check(s, "rx", n)


def test_no_fifo_variant_is_a_16450_and_lossless():
    n = 4096
    s, got, text = guest_to_host(n, fifo=False)
    assert "16450 (fifo 1, tx_loadsz 1)" in text
    assert s["type"] == "16450" and int(s["errors"]) == 0 and got == stream(n)
    s, _ = host_to_guest(n, fifo=False)
    assert s["type"] == "16450" and int(s["errors"]) == 0


@pytest.mark.slow
def test_guest_to_host_1m_exact():
    n = 1 << 20
    s, got, _ = guest_to_host(n, timeout=300)
    _check(s, "tx", n)
    assert got == stream(n)


@pytest.mark.slow
def test_host_to_guest_1m_exact():
    n = 1 << 20
    s, _ = host_to_guest(n, timeout=300)
    _check(s, "rx", n)


def test_stalled_host_end_loses_nothing_and_the_vcpu_keeps_running():
    n = 256 * 1024
    com2 = SocketPairBackend()
    # Small socket buffers, so the stall reaches the port's own bound soon.
    com2._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    com2.peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    got = bytearray()
    reading = threading.Event()
    reading.set()

    def reader() -> None:
        while len(got) < n:
            reading.wait()
            data = com2.peer.recv(4096)
            if not data:
                return
            got.extend(data)
            if len(got) >= 16 * 1024 and not stalled_once.is_set():
                stalled_once.set()
                reading.clear()  # the host end stops reading

    stalled_once = threading.Event()
    with _vm(f"serial-selftest 2 tx {n}", com2) as vm:
        port = vm.machine.serial_ports[1]
        t = threading.Thread(target=reader, daemon=True)
        t.start()
        assert stalled_once.wait(120)
        # Wait until the output buffer is full and the guest is held back.
        deadline = time.monotonic() + 60
        while port.counters.output_stalls == 0 and len(port.stream.outbuf) < port.stream.output_limit:
            assert time.monotonic() < deadline, "the stalled host end never filled the output bound"
            time.sleep(0.05)
        held = len(got)
        sent_before = port.uart.stats.tx_bytes
        time.sleep(3)
        # The guest waits for THRE (nothing drained), it does not spin or drop ...
        assert len(got) == held
        assert port.uart.stats.tx_bytes - sent_before <= 16
        assert port.uart.stats.tx_overruns == 0
        # ... and its vCPU still serves the console.
        vm.console.send("\r")
        vm.console.wait_for(re.compile(r"serial-selftest: COM2 tx progress \d+/262144 bytes"), timeout=30)
        reading.set()
        s = _summary(vm, 300)
        t.join(30)
    _check(s, "tx", n)
    assert bytes(got) == stream(n)
