"""QEMU's qtest protocol, for tests that compare a device model with QEMU's, one port access at a time.

``qemu-system-x86_64 -machine pc -S -qtest stdio`` starts a frozen PC whose
I/O ports a test reads and writes one line at a time; it is a reference
implementation nobody on this project wrote.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess

QEMU = shutil.which("qemu-system-x86_64")


class QTest:
    """One frozen QEMU PC driven over the qtest text protocol; ``extra`` are more QEMU arguments."""

    def __init__(self, *extra: str, intercept_ioapic: bool = False) -> None:
        assert QEMU is not None
        self.proc = subprocess.Popen(
            [QEMU, "-machine", "pc", "-display", "none", "-nodefaults", "-serial", "null",
             "-S", "-qtest", "stdio", "-qtest-log", os.devnull, *extra],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0,
        )
        self._buf = b""
        self.irq: dict[int, bool] = {}  # IOAPIC pin -> level, with intercept_ioapic
        if intercept_ioapic:
            self.cmd("irq_intercept_in ioapic")

    def _line(self, sent: str) -> str:
        """One reply line; reads the pipe unbuffered so select() sees all pending data."""
        assert self.proc.stdout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            ready, _, _ = select.select([fd], [], [], 10)
            if not ready:
                raise TimeoutError(f"QEMU did not answer {sent!r}")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"QEMU exited (rc={self.proc.poll()}) on {sent!r}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode().strip()

    def cmd(self, line: str) -> str:
        assert self.proc.stdin
        self.proc.stdin.write((line + "\n").encode())
        self.proc.stdin.flush()
        while True:
            reply = self._line(line)
            if reply.startswith("IRQ "):
                _, what, num = reply.split()
                self.irq[int(num)] = what == "raise"
                continue
            if reply.startswith("FAIL"):
                raise RuntimeError(f"qtest: {line!r} -> {reply}")
            return reply

    def out(self, port: int, size: int, value: int) -> None:
        assert self.cmd(f"out{'bwl'[size // 2]} {port:#x} {value:#x}") == "OK"

    def inp(self, port: int, size: int) -> int:
        reply = self.cmd(f"in{'bwl'[size // 2]} {port:#x}")
        assert reply.startswith("OK ")
        return int(reply.split()[1], 16)

    def outb(self, port: int, value: int) -> None:
        self.out(port, 1, value)

    def inb(self, port: int) -> int:
        return self.inp(port, 1)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)
