"""Debian's stock 6.1 kernel on kvmkit, end to end, in one boot (minutes on a nested-PVM host).

`kvmkit run --kernel <stock bzImage> --initrd <busybox initramfs>` runs on a
pseudo terminal, as a user would run it. The test types into the busybox
shell and checks, in order:

1. the banner "Linux version 6.1" on COM1 (earlyprintk);
2. the kernel's own 8250 driver finding kvmkit's UART as a 16550A on
   0x3f8 / IRQ 4, and never "too much work for irq";
3. /init's marker, an interactive shell prompt, commands typed into it
   (`uname -r`, `cat /proc/interrupts`, `echo` through the interrupt-driven
   TTY path), and `poweroff -f` ending kvmkit with status 0.

Each milestone's host time is printed (seconds since kvmkit was started,
so kvmkit's own start-up and the kernel's decompression are included) and
kept in the test report: `pytest -s tests/linux` shows them.
"""

from __future__ import annotations

import os
import pty
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from kvmkit.boot.initramfs import INIT_MARKER

pytestmark = [pytest.mark.slow, pytest.mark.kvm]

SHELL_PROMPT_LIMIT = 200.0  # seconds from start to the shell prompt, on this project's nested-PVM machines
APPEND = "console=ttyS0 earlyprintk=serial,ttyS0,115200"
MEM = "128M"


class Milestones:
    """Collects everything read from the console and timestamps the first match of each pattern."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.t0 = time.monotonic()
        self.buf = bytearray()
        self.pos = 0
        self.times: dict[str, float] = {}
        self.cond = threading.Condition()
        self.eof = False
        self.thread = threading.Thread(target=self._reader, daemon=True)
        self.thread.start()

    def _reader(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 65536)
            except OSError:
                data = b""
            with self.cond:
                if not data:
                    self.eof = True
                    self.cond.notify_all()
                    return
                self.buf += data
                self.cond.notify_all()

    def wait(self, name: str, pattern: str | re.Pattern[bytes], timeout: float) -> float:
        """Wait for ``pattern`` after the previous match; record and return the host time."""
        rx = re.compile(re.escape(pattern.encode())) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                m = rx.search(self.buf, self.pos)
                if m:
                    self.pos = m.end()
                    t = time.monotonic() - self.t0
                    self.times[name] = t
                    print(f"milestone {t:7.1f} s  {name}", file=sys.stderr, flush=True)
                    return t
                left = deadline - time.monotonic()
                if left <= 0 or self.eof:
                    tail = self.buf[-3000:].decode("utf-8", "replace")
                    raise AssertionError(f"{name}: {pattern!r} not seen within {timeout} s "
                                         f"(at {time.monotonic() - self.t0:.0f} s); console tail:\n{tail}")
                self.cond.wait(min(left, 1.0))

    @property
    def text(self) -> str:
        with self.cond:
            return self.buf.decode("utf-8", "replace")


def test_stock_kernel_to_busybox_shell_and_poweroff(stock_bzimage: Path, busybox_initrd: Path,
                                                      record_property: Callable[[str, object], None]) -> None:
    master, slave = pty.openpty()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    argv = [sys.executable, "-m", "kvmkit", "run", "--kernel", str(stock_bzimage), "--initrd", str(busybox_initrd),
            "--append", APPEND, "--mem", MEM, "--stats"]
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=subprocess.PIPE, env=env, start_new_session=True)
    os.close(slave)
    ms = Milestones(master)
    try:
        ms.wait("banner", "Linux version 6.1", 120)
        ms.wait("console enabled", "console [ttyS0] enabled", 300)
        ms.wait("8250 driver", "ttyS0 at I/O 0x3f8 (irq = 4, base_baud = 115200) is a 16550A", 300)
        ms.wait("init", "Run /init as init process", 200)
        ms.wait("init output", INIT_MARKER, 60)
        t_prompt = ms.wait("shell prompt", re.compile(rb"\n[^\n]*[#$] "), 60)  # ash may follow it with ESC[6n

        os.write(master, b"uname -r\r")
        ms.wait("uname -r", re.compile(rb"\r\n6\.1\.0-\d+-amd64\r\n"), 60)
        os.write(master, b"cat /proc/interrupts\r")
        ms.wait("/proc/interrupts", re.compile(rb"\s4:\s+[1-9]\d*\s+[^\r\n]*ttyS0"), 60)
        os.write(master, b"echo kvmkit-$((6 * 7))\r")
        ms.wait("echo", "kvmkit-42", 60)
        os.write(master, b"poweroff -f\r")
        status = proc.wait(120)
        ms.wait("poweroff", re.compile(rb"$"), 1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        stderr = proc.stderr.read().decode("utf-8", "replace") if proc.stderr else ""
        os.close(master)
        for name, t in ms.times.items():
            record_property(f"milestone {name}", f"{t:.1f}")
        print(stderr, file=sys.stderr)

    text = ms.text
    assert status == 0, stderr
    assert "too much work for irq" not in text
    assert "Kernel panic" not in text
    assert t_prompt <= SHELL_PROMPT_LIMIT, f"shell prompt after {t_prompt:.0f} s"
