"""Host ends of a serial port: terminal, file, Unix socket, pty, socket pair, nothing.

A backend is a pair of non-blocking file descriptors (either may be absent)
plus how to read and write them; the serial port machinery on the host loop
decides when. ``read`` is only called when the guest has room for the
bytes, so a backend never has to buffer input; ``write`` may accept less
than it is given, and the port keeps the rest.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import stat
from typing import Callable

from ..errors import KvmkitError
from .terminal import EscapeFilter, RawTerminal

log = logging.getLogger(__name__)

SUN_PATH_MAX = 107  # bytes of a unix socket path (sun_path is 108, NUL included)


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
    lost_bytes = 0          # output the host end could not take and that is gone (a write error)

    @property
    def connected(self) -> bool:
        """False while a listening backend waits for a client (its output is kept for the next one)."""
        return True

    @property
    def client_gone(self) -> bool:
        """True when the client of a listening backend left (read EOF or a write error)."""
        return False

    def drop_client(self) -> None:
        """Close the departed client (called once its fds are out of the poll set)."""

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
        except OSError as e:
            # EIO, ENOSPC, EPIPE: the bytes have nowhere to go. Say so once,
            # in one sentence, and count what is lost from then on.
            if not self.lost_bytes:
                log.warning("writing guest output to %s failed (%s); the output is lost from here on, "
                            "and --stats counts it.", self.name, e.strerror or e)
            self.lost_bytes += len(data)
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
    """Guest output to a file; no input.

    The file is truncated, as QEMU's ``file:`` chardev does (``file:PATH,append``
    appends). A symbolic link at PATH is refused: someone else may have
    planted it to have the guest's output land in a file of theirs.
    """

    def __init__(self, path: str, append: bool = False) -> None:
        super().__init__(None, None, f"file:{path}")
        self.path = path
        self.append = append

    def open(self) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW
        flags |= os.O_APPEND if self.append else os.O_TRUNC
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise KvmkitError(f"serial output file {self.path} is a symbolic link, which kvmkit does not follow; "
                                  "name the file itself.") from None
            raise KvmkitError(f"cannot open serial output file {self.path}: {e.strerror}; choose a writable path.") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode) and not stat.S_ISCHR(os.fstat(fd).st_mode):
            os.close(fd)
            raise KvmkitError(f"serial output {self.path} is not a regular file or a character device; choose a file.")
        self.output_fd = fd

    def close(self) -> None:
        if self.output_fd is not None:
            os.close(self.output_fd)
            self.output_fd = None


class PtyBackend(FdBackend):
    """A pseudo-terminal; connect with e.g. ``screen /dev/pts/N``.

    Its path exists only once it is open, and the user cannot connect
    without it: so :meth:`open` sets :attr:`path` and says it, in QEMU's
    words, "char device redirected to /dev/pts/N (label COM2)". The message
    goes to ``on_open`` when one is given, else to this module's logger at
    WARNING, the level kvmkit shows by default (the CLI prints it on stderr
    as "kvmkit: ...", before the guest runs). ``label`` names the port.
    Opening is idempotent: a caller may open the backend early to learn the
    path, and the serial port's start keeps that pty.
    """

    def __init__(self, label: str = "", on_open: Callable[[str], None] | None = None) -> None:
        super().__init__(None, None, "pty")
        self.label = label
        self.on_open = on_open
        self.path: str | None = None   # /dev/pts/N once open (it stays set after close, for reports)
        self._slave_fd = -1

    @property
    def slave_name(self) -> str:
        """The pty's path, "" until it is open (the older name of :attr:`path`)."""
        return self.path or ""

    @property
    def redirect_message(self) -> str:
        """What opening says: QEMU's "char device redirected to PATH (label NAME)"; "" until open."""
        if self.path is None:
            return ""
        return f"char device redirected to {self.path}" + (f" (label {self.label})" if self.label else "")

    def open(self) -> None:
        if self.input_fd is not None:
            return  # already open (early, to tell the path): keep that pty
        import tty as _tty
        try:
            master, slave = os.openpty()
        except OSError as e:
            raise KvmkitError(f"cannot allocate a pseudo-terminal for {self.label or 'a serial port'}: "
                              f"{e.strerror}; is /dev/pts mounted?") from None
        _tty.setraw(slave)
        os.set_blocking(master, False)
        self.input_fd = self.output_fd = master
        self._slave_fd = slave
        self.path = os.ttyname(slave)
        self.name = f"pty:{self.path}"
        if self.on_open is not None:
            self.on_open(self.redirect_message)
        else:
            # COM1's terminal may already be raw (ports start in order), where
            # a bare newline does not return the cursor: end the line for it.
            log.warning("%s%s", self.redirect_message, "\r" if _stderr_is_raw_tty() else "")

    def close(self) -> None:
        for fd in (self.input_fd, self._slave_fd):
            if fd is not None and fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.input_fd = self.output_fd = None
        self._slave_fd = -1


def _stderr_is_raw_tty() -> bool:
    """stderr is a terminal with output processing off (kvmkit's raw console): "\\n" alone does not end a line."""
    try:
        import termios
        return not termios.tcgetattr(2)[1] & termios.OPOST
    except Exception:  # not a terminal, or no termios
        return False


class UnixSocketBackend(FdBackend):
    """A listening Unix socket; one client at a time is the console.

    The socket is created mode 0600 whatever the umask. A live listener at
    the path (another kvmkit) is refused, a stale one replaced, anything else
    there refused. A second client while one is connected is told so and
    closed; a client that leaves ends input until the next one connects.
    """

    reconnects = True

    def __init__(self, path: str) -> None:
        super().__init__(None, None, f"unix:{path}")
        self.path = path
        self.listener: socket.socket | None = None
        self.conn: socket.socket | None = None
        self._gone = False
        self.refused = 0        # clients turned away while another was connected

    @property
    def connected(self) -> bool:
        return self.conn is not None and not self._gone

    @property
    def client_gone(self) -> bool:
        """The client left: an EOF or write error seen, or it hung up with input still unread
        (its socket reports POLLHUP even while bytes it sent wait in the buffer)."""
        if self._gone:
            return True
        if self.conn is None:
            return False
        p = select.poll()
        p.register(self.conn.fileno(), select.POLLRDHUP)
        if any(ev & (select.POLLHUP | select.POLLRDHUP | select.POLLERR) for _fd, ev in p.poll(0)):
            self._gone = True
        return self._gone

    def open(self) -> None:
        self.listener = listen_unix(self.path, "serial console")
        self.listen_fd = self.listener.fileno()

    def accept(self) -> bool:
        if self.listener is None:
            return False
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return False
        if self.conn is not None:
            self.refused += 1
            try:
                conn.send(f"kvmkit: {self.path} already has a client; try again when it has left.\r\n".encode())
            except OSError:
                pass
            conn.close()
            return False
        conn.setblocking(False)
        self.conn = conn
        self._gone = False
        self.input_fd = self.output_fd = conn.fileno()
        return True

    def read(self, n: int) -> bytes | None:
        if self.conn is None or self._gone:
            return None
        try:
            data = self.conn.recv(n)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            data = b""
        if not data:
            self._gone = True
        return data

    def write(self, data: bytes) -> int:
        if self.conn is None or self._gone:
            return 0  # kept by the stream for the next client
        try:
            return self.conn.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            self._gone = True
            return 0

    def drop_client(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        self._gone = False
        self.input_fd = self.output_fd = None

    def close(self) -> None:
        self.drop_client()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            self.listen_fd = None
            try:
                os.unlink(self.path)
            except OSError:
                pass


def listen_unix(path: str, what: str) -> socket.socket:
    """A listening unix socket at ``path``, mode 0600 whatever the umask; one sentence for what is in the way.

    A socket already at the path is probed: a live listener (another kvmkit)
    is refused rather than stolen, a stale one (its owner died) replaced.
    Anything else there, a symbolic link included, is refused.
    """
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise KvmkitError(f"the {what} path {path} is {len(os.fsencode(path))} bytes, more than the {SUN_PATH_MAX} "
                          "a unix socket address holds; choose a shorter path.")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise KvmkitError(f"cannot use {path} for the {what}: {e.strerror}.") from None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise KvmkitError(f"{path} exists and is not a socket; kvmkit will not replace it for the {what}; "
                              "choose another path or remove it.")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            try:
                os.unlink(path)  # stale: nobody listens there any more
            except FileNotFoundError:
                pass
        except OSError as e:
            raise KvmkitError(f"cannot probe the socket at {path} ({e.strerror}); choose another path.") from None
        else:
            raise KvmkitError(f"another program (another kvmkit?) is listening on {path}; choose another path "
                              f"for the {what} or stop that program.")
        finally:
            probe.close()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o077)  # the socket is born 0600: no window where others could connect
    try:
        s.bind(path)
    except OSError as e:
        s.close()
        raise KvmkitError(f"cannot listen on unix socket {path}: {e.strerror}; pick another path.") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    s.listen(4)
    s.setblocking(False)
    return s


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


SERIAL_BACKENDS = "stdio, file:PATH[,append], unix:PATH, pty, none or off"


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


def parse_backend(spec: str, on_command: Callable[[str], None], label: str = "") -> Backend:
    """``stdio``, ``file:PATH``, ``unix:PATH``, ``pty``, ``none`` (or ``off``) -> a backend, not yet opened.

    ``label`` names the port it serves ("COM2"); a pty says it when it tells its path.
    """
    kind = backend_kind(spec)
    if kind == "stdio":
        return StdioBackend(on_command)
    if kind == "pty":
        return PtyBackend(label)
    if kind == "file":
        path = spec[5:]
        return FileBackend(path[:-len(",append")], append=True) if path.endswith(",append") else FileBackend(path)
    if kind == "unix":
        return UnixSocketBackend(spec[5:])
    return NullBackend()
