"""``--serial COMn=pty`` says which pty (issue 13): the path is known once the backend opens, and said then.

The old code printed "COM2 is on ..." from the CLI before the port opened,
when the pty had no path yet, so it never printed anything. The backend now
tells the path when it opens, in QEMU's words ("char device redirected to
/dev/pts/N (label COM2)").
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
import tty
from pathlib import Path

import pytest

from kvmkit.host import backends
from kvmkit.host.backends import PtyBackend, parse_backend
from kvmkit.host.loop import EventLoop
from kvmkit.machine.serial import SerialPort

SRC = str(Path(__file__).resolve().parents[2] / "src")
THR, LSR = 0, 5


def _redirects(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "redirected" in r.getMessage()]


def test_a_pty_says_its_path_when_the_port_opens_it(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="kvmkit.host.backends")
    backend = parse_backend("pty", lambda c: None, label="COM2")
    assert isinstance(backend, PtyBackend)
    assert backend.path is None and backend.slave_name == "" and backend.redirect_message == ""
    assert _redirects(caplog) == []  # not before it exists
    loop = EventLoop()
    port = SerialPort("COM2", loop, backend, lambda level: None)
    port.start()
    loop.start()
    try:
        path = backend.path
        assert path is not None and re.fullmatch(r"/dev/pts/\d+", path) and os.path.exists(path)
        assert backend.slave_name == path
        assert _redirects(caplog) == [f"char device redirected to {path} (label COM2)"]
        # The path said is the one the guest's bytes come out of.
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
        try:
            port.io_write(2, 1, 0x07)  # FIFOs on
            for b in b"via the pty":
                port.io_write(THR, 1, b)
            port.io_read(LSR, 1)  # a polling driver hands the burst over
            got = b""
            deadline = time.monotonic() + 5
            while len(got) < 11 and time.monotonic() < deadline:
                got += os.read(fd, 100)
            assert got == b"via the pty"
        finally:
            os.close(fd)
    finally:
        loop.stop()
        port.close()
    assert backend.input_fd is None and backend.path == path  # closed; the path stays for reports


def test_opening_early_keeps_the_pty_and_says_it_once(caplog: pytest.LogCaptureFixture) -> None:
    """A caller (the CLI) may open the backend to learn the path before the port starts; start keeps that pty."""
    caplog.set_level(logging.WARNING, logger="kvmkit.host.backends")
    said: list[str] = []
    backend = PtyBackend("COM3", on_open=said.append)
    try:
        backend.open()
        first, fd = backend.path, backend.input_fd
        backend.open()
        assert (backend.path, backend.input_fd) == (first, fd)
        assert said == [f"char device redirected to {first} (label COM3)"]
        assert _redirects(caplog) == []  # on_open replaces the log line
    finally:
        backend.close()
    backend.close()  # twice is harmless
    assert backend.input_fd is None


def test_without_a_label_the_message_names_just_the_path(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="kvmkit.host.backends")
    backend = PtyBackend()
    try:
        backend.open()
        assert _redirects(caplog) == [f"char device redirected to {backend.path}"]
    finally:
        backend.close()


def test_on_a_raw_terminal_the_line_still_ends(caplog: pytest.LogCaptureFixture) -> None:
    """COM1's terminal is raw by the time COM2 opens: the message carries the "\\r" a raw tty needs."""
    master, slave = os.openpty()
    saved = os.dup(2)
    try:
        os.dup2(slave, 2)
        assert not backends._stderr_is_raw_tty()  # a new pty is cooked
        tty.setraw(2)
        assert backends._stderr_is_raw_tty()
        caplog.set_level(logging.WARNING, logger="kvmkit.host.backends")
        backend = PtyBackend("COM2")
        try:
            backend.open()
        finally:
            backend.close()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(slave)
        os.close(master)
    assert _redirects(caplog) == [f"char device redirected to {backend.path} (label COM2)\r"]


@pytest.mark.kvm
def test_kvmkit_run_tells_the_pty_of_a_serial_port() -> None:
    """End to end: `kvmkit run --serial COM2=pty` prints the path on stderr before the guest runs."""
    p = subprocess.run([sys.executable, "-m", "kvmkit", "run", "--serial", "COM2=pty", "echo", "hi", ";", "poweroff", "4"],
                       env={**os.environ, "PYTHONPATH": SRC}, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 4, p.stderr
    # "(label COM2)" once the machine passes the port's name to parse_backend; the path in any case.
    m = re.search(r"^kvmkit: char device redirected to (/dev/pts/\d+)( \(label COM2\))?$", p.stderr, re.M)
    assert m, p.stderr
    assert "hi" in p.stdout
