"""Serial backends end to end through a SerialPort and the host loop (no KVM)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from kvmkit.errors import KvmkitError
from kvmkit.host.backends import FileBackend, PtyBackend, UnixSocketBackend, parse_backend
from kvmkit.host.loop import EventLoop
from kvmkit.machine.serial import SerialPort

THR, IER, LSR, MCR = 0, 1, 5, 4


def _port(backend):
    loop = EventLoop()
    port = SerialPort("COM1", loop, backend, lambda level: None)
    port.start()
    loop.start()
    port.io_write(2, 1, 0x07)  # FIFOs on
    return loop, port


def _write(port: SerialPort, data: bytes) -> None:
    for b in data:
        deadline = time.monotonic() + 5
        while port.uart.tx_pending() >= 16:
            assert time.monotonic() < deadline
            port.io_read(LSR, 1)
            time.sleep(0.0005)
        port.io_write(THR, 1, b)
    port.io_read(LSR, 1)  # a polling driver hands the last burst over


def _wait(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_unix_socket_keeps_output_until_a_client_connects(tmp_path: Path):
    path = str(tmp_path / "com1.sock")
    loop, port = _port(UnixSocketBackend(path))
    try:
        _write(port, b"early bytes ")
        time.sleep(0.05)
        c = socket.socket(socket.AF_UNIX)
        c.connect(path)
        c.settimeout(5)
        _write(port, b"and late ones")
        got = b""
        while len(got) < len(b"early bytes and late ones"):
            got += c.recv(100)
        assert got == b"early bytes and late ones"
        c.sendall(b"typed")
        _wait(lambda: port.uart.rx_level() == 5)
        assert bytes(port.io_read(0, 1) for _ in range(5)) == b"typed"
        c.close()
    finally:
        loop.stop()
        port.close()


def test_pty_backend_round_trip():
    backend = PtyBackend()
    loop, port = _port(backend)
    try:
        assert backend.slave_name.startswith("/dev/pts/")
        fd = os.open(backend.slave_name, os.O_RDWR | os.O_NOCTTY)
        _write(port, b"to the pty")
        got = b""
        deadline = time.monotonic() + 5
        while len(got) < 10 and time.monotonic() < deadline:
            got += os.read(fd, 100)
        assert got == b"to the pty"
        os.write(fd, b"hi")
        _wait(lambda: port.uart.rx_level() == 2)
        os.close(fd)
    finally:
        loop.stop()
        port.close()


@pytest.mark.parametrize("append", [False, True])
def test_file_backend_truncates_or_appends(tmp_path: Path, append: bool):
    """file:PATH truncates as QEMU's file chardev does; file:PATH,append keeps what was there."""
    out = tmp_path / "com.log"
    out.write_bytes(b"before\n")
    loop, port = _port(parse_backend(f"file:{out}" + (",append" if append else ""), lambda c: None))
    try:
        _write(port, b"guest output\n")
        _wait(lambda: out.read_bytes().endswith(b"guest output\n"))
    finally:
        loop.stop()
        port.close()
    assert out.read_bytes() == (b"before\n" if append else b"") + b"guest output\n"


def test_file_backend_refuses_a_planted_symlink(tmp_path: Path):
    """Someone else's symlink at the path must not make the guest's output land in their target (issue 12, item 4)."""
    target = tmp_path / "victim"
    target.write_bytes(b"precious\n")
    link = tmp_path / "com.log"
    link.symlink_to(target)
    with pytest.raises(KvmkitError, match="symbolic link"):
        FileBackend(str(link)).open()
    assert target.read_bytes() == b"precious\n"


def test_backend_specs():
    assert isinstance(parse_backend("pty", lambda c: None), PtyBackend)
    assert isinstance(parse_backend("unix:/tmp/x.sock", lambda c: None), UnixSocketBackend)
    with pytest.raises(KvmkitError):
        parse_backend("file:", lambda c: None)


def test_a_failing_output_file_is_said_once_and_counted_not_a_traceback(caplog):
    """Issue 12, item 12: EIO/ENOSPC on file: outputs printed tracebacks, then dropped output silently."""
    import logging
    caplog.set_level(logging.WARNING)
    loop, port = _port(FileBackend("/dev/full"))  # every write fails with ENOSPC
    try:
        _write(port, b"x" * 5000)
        _wait(lambda: port.counters.lost_bytes >= 5000)
        _write(port, b"y" * 100)
        _wait(lambda: port.counters.lost_bytes == 5100)
        assert loop.errors == 0
    finally:
        loop.stop()
        port.close()
    warnings = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(warnings) == 1 and "No space left on device" in warnings[0].getMessage()
    assert "5100 bytes lost to write errors" in port.counters.summary("COM1")
