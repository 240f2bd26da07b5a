"""Host ends of a serial port: terminal, file, Unix socket, pty, socket pair, nothing.

A backend is a pair of non-blocking file descriptors (either may be absent)
plus how to read and write them; the serial port machinery on the host loop
decides when. ``read`` is only called when the guest has room for the
bytes, so a backend never has to buffer input; ``write`` may accept less
than it is given, and the port keeps the rest.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Callable

from ..errors import KvmkitError
from .terminal import EscapeFilter, RawTerminal


class Backend:
    """Base: no input, output discarded.

    A backend that waits for clients (a listening socket) names the fd to
    watch in ``listen_fd`` and takes a client in :meth:`accept`; with
    ``reconnects`` an end of input means "this client left", not "input is
    over for good".
    """

    name = "none"
    input_fd: int | None = None
    output_fd: int | None = None
    listen_fd: int | None = None
    reconnects = False

    def open(self) -> None:
        pass

    def accept(self) -> bool:
        """Take a waiting client; True when one is now connected."""
        return False

    def read(self, n: int) -> bytes | None:
        """Up to n bytes; b"" at end of input; None when nothing is available now."""
        return b""

    def write(self, data: bytes) -> int:
        return len(data)

    def close(self) -> None:
        pass


class NullBackend(Backend):
    name = "none"


class FdBackend(Backend):
    """Reads from ``input_fd`` and writes to ``output_fd`` without blocking."""

    def __init__(self, input_fd: int | None, output_fd: int | None, name: str = "fd") -> None:
        self.input_fd = input_fd
        self.output_fd = output_fd
        self.name = name

    def read(self, n: int) -> bytes | None:
        if self.input_fd is None:
            return b""
        try:
            return os.read(self.input_fd, n)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return b""

    def write(self, data: bytes) -> int:
        if self.output_fd is None:
            return len(data)
        try:
            return os.write(self.output_fd, data)
        except (BlockingIOError, InterruptedError):
            return 0
        except BrokenPipeError:
            # Nobody is listening any more: the bytes have nowhere to go.
            return len(data)


class StdioBackend(FdBackend):
    """The controlling terminal (or whatever stdin/stdout are), with the Ctrl-A escape."""

    def __init__(self, on_command: Callable[[str], None], in_fd: int = 0, out_fd: int = 1) -> None:
        super().__init__(in_fd, out_fd, "stdio")
        self.terminal = RawTerminal(in_fd, out_fd)
        self.escape = EscapeFilter(on_command) if os.isatty(in_fd) else None

    def open(self) -> None:
        self.terminal.enter()

    def read(self, n: int) -> bytes | None:
        data = super().read(n)
        if data and self.escape is not None:
            data = self.escape.feed(data)
            if not data:
                return None
        return data

    def close(self) -> None:
        self.terminal.restore()


class FileBackend(FdBackend):
    """Guest output appended to a file; no input."""

    def __init__(self, path: str) -> None:
        super().__init__(None, None, f"file:{path}")
        self.path = path

    def open(self) -> None:
        try:
            self.output_fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise KvmkitError(f"cannot open serial output file {self.path}: {e.strerror}; choose a writable path.") from None

    def close(self) -> None:
        if self.output_fd is not None:
            os.close(self.output_fd)
            self.output_fd = None


class PtyBackend(FdBackend):
    """A pseudo-terminal; connect with e.g. ``screen /dev/pts/N``."""

    def __init__(self) -> None:
        super().__init__(None, None, "pty")
        self.slave_name = ""
        self._slave_fd = -1

    def open(self) -> None:
        import tty as _tty
        master, slave = os.openpty()
        _tty.setraw(slave)
        os.set_blocking(master, False)
        self.input_fd = self.output_fd = master
        self._slave_fd = slave
        self.slave_name = os.ttyname(slave)
        self.name = f"pty:{self.slave_name}"

    def close(self) -> None:
        for fd in (self.input_fd, self._slave_fd):
            if fd is not None and fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.input_fd = self.output_fd = None


class UnixSocketBackend(FdBackend):
    """A listening Unix socket; the first client to connect is the console."""

    reconnects = True

    def __init__(self, path: str) -> None:
        super().__init__(None, None, f"unix:{path}")
        self.path = path
        self.listener: socket.socket | None = None
        self.conn: socket.socket | None = None
        self.on_connect: Callable[[], None] | None = None

    def open(self) -> None:
        p = Path(self.path)
        if p.is_socket():
            p.unlink()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(self.path)
        except OSError as e:
            s.close()
            raise KvmkitError(f"cannot listen on unix socket {self.path}: {e.strerror}; pick another path.") from None
        s.listen(1)
        s.setblocking(False)
        self.listener = s
        self.listen_fd = s.fileno()

    def accept(self) -> bool:
        if self.listener is None or self.conn is not None:
            return False
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return False
        conn.setblocking(False)
        self.conn = conn
        self.input_fd = self.output_fd = conn.fileno()
        return True

    def read(self, n: int) -> bytes | None:
        if self.conn is None:
            return None
        data = super().read(n)
        if data == b"":
            self._drop()
        return data if data else None

    def write(self, data: bytes) -> int:
        if self.conn is None:
            return 0  # keep it until someone connects: nothing is dropped
        try:
            return self.conn.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            self._drop()
            return 0

    def _drop(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
            self.input_fd = self.output_fd = None

    def close(self) -> None:
        self._drop()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            self.listen_fd = None
            try:
                os.unlink(self.path)
            except OSError:
                pass


class SharedOutputBackend(Backend):
    """Output only, into another backend's output: COM1's early boot messages on the terminal
    (or socket) that the virtio console owns. Opening and closing stay with the owner."""

    def __init__(self, owner: Backend) -> None:
        self.owner = owner
        self.name = f"shared:{owner.name}"

    # No output_fd of its own: the owner's stream watches that fd, and one fd
    # has one writer callback in the loop; a stalled share is retried on a timer.

    def read(self, n: int) -> bytes | None:
        return b""

    def write(self, data: bytes) -> int:
        return self.owner.write(data)


class SocketPairBackend(FdBackend):
    """One end of a socket pair; the other end is handed to a program (the Python API, tests)."""

    def __init__(self) -> None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        a.setblocking(False)
        self._sock = a
        self.peer = b
        super().__init__(a.fileno(), a.fileno(), "socketpair")

    def close(self) -> None:
        self._sock.close()


SERIAL_BACKENDS = "stdio, file:PATH, unix:PATH, pty, none or off"


def backend_kind(spec: str) -> str:
    """What a ``--serial`` spec names: stdio, none, off, pty, file or unix; one sentence if nothing."""
    if spec in ("stdio", "term", "terminal"):
        return "stdio"
    if spec in ("none", "null"):
        return "none"
    if spec in ("off", "pty"):
        return spec
    if spec.startswith(("file:", "unix:")) and len(spec) > 5:
        return spec[:4]
    raise KvmkitError(f"unknown serial backend {spec!r}; use {SERIAL_BACKENDS}.")


def parse_backend(spec: str, on_command: Callable[[str], None]) -> Backend:
    """``stdio``, ``file:PATH``, ``unix:PATH``, ``pty``, ``none`` (or ``off``) -> a backend, not yet opened."""
    kind = backend_kind(spec)
    if kind == "stdio":
        return StdioBackend(on_command)
    if kind == "pty":
        return PtyBackend()
    if kind == "file":
        return FileBackend(spec[5:])
    if kind == "unix":
        return UnixSocketBackend(spec[5:])
    return NullBackend()
