"""The controlling terminal in raw mode, with kvmkit's escape key, always restored.

Raw mode sends every key to the guest, Ctrl-C included (the guest's shell
wants it). kvmkit keeps one key for itself, Ctrl-A, as screen and QEMU do:
Ctrl-A x quits, Ctrl-A Ctrl-A sends a literal Ctrl-A. The saved terminal
state is put back by a ``finally``, an atexit hook and the fatal-signal
handlers, so no exit path leaves the user's shell in raw mode.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import termios
import tty
from typing import Callable

CTRL_A = 0x01


class EscapeFilter:
    """Splits terminal input into bytes for the guest and escape commands for kvmkit."""

    def __init__(self, on_command: Callable[[str], None]) -> None:
        self.on_command = on_command
        self._armed = False

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        for b in data:
            if self._armed:
                self._armed = False
                if b == CTRL_A:
                    out.append(CTRL_A)
                elif b in (ord("x"), ord("X")):
                    self.on_command("quit")
                elif b in (ord("s"), ord("S")):
                    self.on_command("stats")
                elif b in (ord("h"), ord("H"), ord("?")):
                    self.on_command("help")
                # any other key after Ctrl-A is swallowed, as in QEMU
            elif b == CTRL_A:
                self._armed = True
            else:
                out.append(b)
        return bytes(out)


ESCAPE_HELP = "\r\nkvmkit: Ctrl-A x quit | Ctrl-A s exit statistics | Ctrl-A Ctrl-A send Ctrl-A\r\n"


class RawTerminal:
    """Puts a tty in raw mode and non-blocking I/O; :meth:`restore` undoes both (idempotent)."""

    def __init__(self, in_fd: int = 0, out_fd: int = 1) -> None:
        self.in_fd = in_fd
        self.out_fd = out_fd
        self._saved_attr: list | None = None
        self._saved_flags: dict[int, int] = {}
        self.active = False

    def enter(self) -> None:
        if os.isatty(self.in_fd):
            self._saved_attr = termios.tcgetattr(self.in_fd)
            tty.setraw(self.in_fd, termios.TCSANOW)
        # Save every fd's flags before changing any: stdin and stdout are often
        # one open file description, and saving the second after setting the
        # first would save (and later "restore") O_NONBLOCK.
        fds = sorted({self.in_fd, self.out_fd})
        self._saved_flags = {fd: fcntl.fcntl(fd, fcntl.F_GETFL) for fd in fds}
        for fd in fds:
            fcntl.fcntl(fd, fcntl.F_SETFL, self._saved_flags[fd] | os.O_NONBLOCK)
        self.active = True
        atexit.register(self.restore)

    def restore(self) -> None:
        if not self.active:
            return
        self.active = False
        for fd, flags in self._saved_flags.items():
            try:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags)
            except OSError:
                pass
        if self._saved_attr is not None:
            try:
                termios.tcsetattr(self.in_fd, termios.TCSAFLUSH, self._saved_attr)
            except termios.error:
                pass
        try:
            atexit.unregister(self.restore)
        except Exception:
            pass

    def __enter__(self) -> "RawTerminal":
        self.enter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()
