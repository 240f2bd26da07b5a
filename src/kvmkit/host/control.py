"""The control socket's mechanics: where it lives, how it is bound safely, and a line protocol that no client can abuse.

Each running VM listens on ``<runtime dir>/NAME.sock`` (docs/api.md). The
runtime dir is ``$XDG_RUNTIME_DIR/kvmkit``, or ``~/.kvmkit`` when that is
unset or unusable; it is 0700 and ours, or kvmkit refuses it, because the
socket pauses, stops and snapshots the VM and only its owner may do that.

The server side here knows nothing of VMs: :class:`ControlSocket` reads one
JSON object per line, hands it to a handler and writes its reply. Whatever a
client sends (garbage, megabytes without a newline, nothing at all, a byte
a minute), it costs at most one bounded buffer and one thread for a bounded
time, and the handler never sees it. The command table is
machine/control.py's.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import selectors
import socket
import stat
import struct
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import KvmkitError

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024        # bytes in one request line, newline excluded
MAX_DISCARD = 1024 * 1024      # bytes of an oversized line skipped to find its end before the client is dropped
MAX_REPLY = 16 * 1024 * 1024   # what a client accepts as one reply line
MAX_CLIENTS = 8
LISTEN_BACKLOG = 64            # connections the kernel holds before accept(); more get EAGAIN
CONNECT_RETRY_S = 0.01         # a client's pause before it tries a full backlog again
IDLE_TIMEOUT = 30.0            # seconds a connection may wait between requests
LINE_TIMEOUT = 10.0            # seconds from a request's first byte to its newline
SEND_TIMEOUT = 5.0             # seconds a reply may wait for a client that does not read
SUN_PATH_MAX = 107

_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")
_UCRED = struct.Struct("3i")   # struct ucred: pid, uid, gid

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class NameInUse(KvmkitError):
    """A live kvmkit already listens under the name."""

    def __init__(self, name: str, pid: int | None) -> None:
        self.name, self.pid = name, pid
        who = f" (pid {pid})" if pid else ""
        super().__init__(f"a VM named {name} is already running{who}; choose another --name.")


class NotRunning(KvmkitError):
    """No live VM under the name."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"no VM named {name} is running (kvmkit list shows the running ones).")


def validate_name(name: str) -> str:
    """The name becomes a file name: letters, digits, '-', '_' and '.', no leading '.', at most 64."""
    if not _NAME.fullmatch(name):
        raise KvmkitError(f"{name!r} is not a usable VM name; use at most 64 letters, digits, '-', '_' or '.', "
                          "not starting with '.'.")
    return name


def control_dir(create: bool = False) -> Path:
    """The directory of the control sockets, checked to be private; created 0700 when ``create``.

    Clients and servers resolve it the same way from the environment, so a
    ``kvmkit list`` finds what a ``kvmkit run`` of the same user made.
    """
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg and os.path.isabs(xdg) and os.path.isdir(xdg) and os.access(xdg, os.W_OK | os.X_OK):
        path = Path(xdg) / "kvmkit"
    else:
        path = Path.home() / ".kvmkit"
    check_private_dir(path, create)
    return path


def check_private_dir(path: Path, create: bool) -> bool:
    """True if ``path`` is a directory only we can enter (False if absent and not created); else one sentence."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not create:
            return False
        try:
            os.mkdir(path, 0o700)  # born no wider than 0700, whatever the umask
            os.chmod(path, 0o700)  # a umask that masks owner bits would leave it unusable
        except FileExistsError:
            pass  # another kvmkit made it first: check what is there
        except OSError as e:
            raise KvmkitError(f"cannot create the control socket directory {path}: {e.strerror}; "
                              "set XDG_RUNTIME_DIR or HOME to a writable directory.") from None
        st = os.lstat(path)
    except OSError as e:
        raise KvmkitError(f"cannot use {path} for control sockets: {e.strerror}.") from None
    why = None
    if stat.S_ISLNK(st.st_mode):
        why = "it is a symbolic link; remove it"
    elif not stat.S_ISDIR(st.st_mode):
        why = "it is not a directory; remove it"
    elif st.st_uid != os.getuid():
        why = f"it belongs to uid {st.st_uid}, not to you; remove it"
    elif st.st_mode & 0o077:
        why = f"other users have access (mode {stat.S_IMODE(st.st_mode):04o}); run chmod 700 {path}"
    if why:
        raise KvmkitError(f"kvmkit will not keep control sockets in {path}: {why}.")
    return True


def socket_path(directory: Path, name: str) -> Path:
    path = directory / f"{validate_name(name)}.sock"
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise KvmkitError(f"the control socket path {path} is longer than the {SUN_PATH_MAX} bytes a unix socket "
                          "address holds; choose a shorter --name or a shorter XDG_RUNTIME_DIR.")
    return path


def peer_pid(sock: socket.socket) -> int | None:
    try:
        pid, _uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    except OSError:
        return None
    return pid or None


def _peer_uid(sock: socket.socket) -> int | None:
    try:
        return _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))[1]
    except OSError:
        return None


class _DirLock:
    """flock on the directory: probe, unlink and bind (or unlink at close) happen as one step between kvmkits,
    so a kvmkit between bind() and listen() (which refuses connections) is never mistaken for a dead one."""

    def __init__(self, directory: Path) -> None:
        self.fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def __enter__(self) -> "_DirLock":
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # releases the lock


def _probe(path: Path, name: str) -> None:
    """Remove a stale socket (its kvmkit died: nobody accepts) or raise :class:`NameInUse` for a live one."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise KvmkitError(f"{path} exists and is not a socket; remove it or choose another --name.")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    except TimeoutError:
        raise NameInUse(name, None) from None  # a full backlog: someone is there
    except OSError as e:
        raise KvmkitError(f"cannot probe the control socket {path} ({e.strerror}); choose another --name.") from None
    else:
        raise NameInUse(name, peer_pid(probe))
    finally:
        probe.close()


class ControlSocket:
    """A listening control socket and the daemon threads that serve it.

    One accept thread, one short-lived thread per client (at most
    ``max_clients``; more are told so and closed). ``handler`` gets each
    well-formed request object and returns the reply's fields; a
    :class:`KvmkitError` it raises becomes an error reply.
    """

    def __init__(self, directory: Path, name: str, handler: Handler, *, max_clients: int = MAX_CLIENTS,
                 idle_timeout: float = IDLE_TIMEOUT, line_timeout: float = LINE_TIMEOUT,
                 send_timeout: float = SEND_TIMEOUT) -> None:
        self.name = validate_name(name)
        self.path = socket_path(directory, name)
        self.handler = handler
        self.max_clients = max_clients
        self.idle_timeout, self.line_timeout, self.send_timeout = idle_timeout, line_timeout, send_timeout
        self._lock = threading.Lock()
        self._clients: dict[socket.socket, threading.Thread] = {}
        self._closed = False
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            with _DirLock(directory):
                _probe(self.path, name)
                old = os.umask(0o177)  # the socket file is born 0600: never reachable by others, even for an instant
                try:
                    self._sock.bind(str(self.path))
                finally:
                    os.umask(old)
                os.chmod(self.path, 0o600)
                st = os.stat(self.path)
                self._ident = (st.st_dev, st.st_ino)
                self._sock.listen(LISTEN_BACKLOG)
        except OSError as e:
            self._abandon()
            raise KvmkitError(f"cannot listen on the control socket {self.path}: {e.strerror}.") from None
        except BaseException:
            self._abandon()
            raise
        self._sock.setblocking(False)

    def _abandon(self) -> None:
        self._sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._closed = True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._accept_loop, name=f"kvmkit-control-{self.name}", daemon=True)
        self._thread.start()

    def close(self, grace: float = 2.0) -> None:
        """Stop serving and remove the socket file; idempotent. A reply being written gets ``grace`` seconds."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            clients = dict(self._clients)
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(grace)
        try:
            with _DirLock(self.path.parent):
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self._ident:  # never another kvmkit's socket
                    os.unlink(self.path)
        except OSError:
            pass
        self._sock.close()
        for conn in clients:
            try:
                conn.shutdown(socket.SHUT_RD)  # a waiting reader sees EOF; a reply in flight still goes out
            except OSError:
                pass
        deadline = time.monotonic() + grace
        for t in clients.values():
            t.join(max(0.0, deadline - time.monotonic()))
        os.close(self._wake_r)
        os.close(self._wake_w)

    @property
    def client_count(self) -> int:
        with self._lock:
            return len(self._clients)

    # --- serving -----------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._sock, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._closed:
                for key, _ in sel.select():
                    if key.fileobj == self._wake_r or self._closed:
                        return
                    self._accept()

    def _accept(self) -> None:
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.warning("control socket: accept failed: %s", e.strerror)
            time.sleep(0.05)  # e.g. out of fds: do not spin
            return
        uid = _peer_uid(conn)
        if uid not in (os.getuid(), 0):  # the 0600 mode already says so; this is the second lock on the door
            conn.close()
            return
        with self._lock:
            if self._closed:
                conn.close()
                return
            full = len(self._clients) >= self.max_clients
            if not full:
                t = threading.Thread(target=self._serve, args=(conn,), name="kvmkit-control-client", daemon=True)
                self._clients[conn] = t
        if full:
            conn.setblocking(False)
            try:
                conn.send(_encode(_error(f"{self.max_clients} clients are already connected; try again later.")))
            except OSError:
                pass
            conn.close()
            return
        t.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            reader = LineReader(conn, MAX_REQUEST, MAX_DISCARD)
            while not self._closed:
                line = reader.read_line(self.idle_timeout, self.line_timeout)
                if line is None:
                    return  # the client left
                if isinstance(line, LineError):
                    self._send(conn, _error(line.message))
                    if line.fatal:
                        return
                    continue
                if not self._send(conn, self._answer(line)):
                    return
        except OSError:
            pass
        finally:
            with self._lock:
                self._clients.pop(conn, None)
            conn.close()

    def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except RecursionError:
            return _error("the request is nested too deeply; send one flat JSON object per line.")
        except ValueError:
            return _error("the request is not valid JSON; send one JSON object per line.")
        if not isinstance(request, dict):
            return _error("the request is not a JSON object; send one object per line, e.g. {\"cmd\": \"info\"}.")
        try:
            reply = self.handler(request)
        except KvmkitError as e:
            return _error(str(e))
        except Exception as e:
            log.warning("control socket: the handler failed on %r", request.get("cmd"), exc_info=True)
            return _error(f"kvmkit failed on this request ({type(e).__name__}: {e}); this is a bug in kvmkit.")
        return {"ok": True, **reply}

    def _send(self, conn: socket.socket, reply: dict[str, Any]) -> bool:
        try:
            conn.settimeout(self.send_timeout)
            conn.sendall(_encode(reply))
            return True
        except OSError:
            return False


class LineError:
    """What a bad line costs: an error reply, and the connection if it cannot be resynchronised."""

    def __init__(self, message: str, fatal: bool) -> None:
        self.message, self.fatal = message, fatal


class LineReader:
    """Lines from a socket with a hard cap on what is kept: a request longer than ``limit`` is skipped to its
    newline (up to ``discard`` bytes, then the client is dropped), and every line has a deadline."""

    def __init__(self, conn: socket.socket, limit: int, discard: int) -> None:
        self.conn, self.limit, self.discard = conn, limit, discard
        self.buf = bytearray()
        self.peak = 0  # the most bytes ever held: the tests' memory bound

    def read_line(self, idle_timeout: float, line_timeout: float) -> bytes | LineError | None:
        """The next line (without its newline), a :class:`LineError`, or None at EOF."""
        deadline = time.monotonic() + (line_timeout if self.buf else idle_timeout)
        started = bool(self.buf)
        skipped = 0
        while True:
            nl = self.buf.find(b"\n")
            if nl >= 0 and not skipped:
                if nl > self.limit:
                    del self.buf[:nl + 1]
                    return LineError(f"the request is longer than {self.limit} bytes; it was ignored.", False)
                line = bytes(self.buf[:nl])
                del self.buf[:nl + 1]
                return line
            if nl >= 0:  # the end of a line being skipped
                del self.buf[:nl + 1]
                return LineError(f"the request is longer than {self.limit} bytes; it was ignored.", False)
            if len(self.buf) > self.limit:
                skipped += len(self.buf)
                self.buf.clear()
                if skipped > self.discard:
                    return LineError(f"the request is longer than {self.limit} bytes and has no end in sight; "
                                     "closing the connection.", True)
            left = deadline - time.monotonic()
            if left <= 0:
                what = "the request was not completed" if started else "no request came"
                timeout = line_timeout if started else idle_timeout
                return LineError(f"{what} within {timeout:g} s; closing the connection.", True)
            self.conn.settimeout(left)
            try:
                chunk = self.conn.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                return None
            if not started:
                started = True
                deadline = time.monotonic() + line_timeout
            self.buf += chunk
            self.peak = max(self.peak, len(self.buf))


def _error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


def _encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, default=str).encode() + b"\n"


# --- the client side ----------------------------------------------------------------------------
def request(path: Path, obj: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Send one request and read its reply (``ok`` false included); OSError if nobody answers at ``path``."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        deadline = time.monotonic() + timeout
        while True:
            s.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                s.connect(str(path))
                break
            except BlockingIOError:
                # The listen backlog is full (other clients, or a flood, not yet
                # accepted): a busy VM, not a dead one. Try again until the deadline.
                if time.monotonic() >= deadline:
                    raise TimeoutError("the listen backlog stayed full") from None
                time.sleep(CONNECT_RETRY_S)
        s.sendall(json.dumps(obj).encode() + b"\n")
        buf = bytearray()
        while b"\n" not in buf:
            if len(buf) > MAX_REPLY:
                raise OSError(f"a reply longer than {MAX_REPLY} bytes")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("timed out")
            s.settimeout(left)
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionResetError("closed before the reply")
            buf += chunk
    finally:
        s.close()
    try:
        reply = json.loads(buf[:buf.index(b"\n")])
    except ValueError:
        raise OSError("a reply that is not JSON") from None
    if not isinstance(reply, dict):
        raise OSError("a reply that is not a JSON object")
    return reply


def call(name: str, cmd: str, directory: Path | None = None, timeout: float = 5.0,
         params: dict[str, Any] | None = None, **args: Any) -> dict[str, Any]:
    """Run one command on the VM called ``name``: its reply, or one sentence (no such VM, an error reply).

    ``timeout`` is how long to wait for the reply; the command's arguments
    are ``args``, or ``params`` for one whose name clashes (stop's "timeout").
    """
    directory = control_dir() if directory is None else directory
    path = socket_path(directory, name)
    try:
        reply = request(path, {"cmd": cmd, **(params or {}), **args}, timeout)
    except (FileNotFoundError, ConnectionRefusedError):
        raise NotRunning(name) from None
    except TimeoutError:
        raise KvmkitError(f"the VM named {name} did not answer within {timeout:g} s; try again.") from None
    except OSError as e:
        raise KvmkitError(f"the VM named {name} did not answer properly ({e}); try again.") from None
    if not reply.get("ok"):
        raise KvmkitError(str(reply.get("error") or "the VM refused the request without saying why."))
    return reply


def socket_names(directory: Path | None = None) -> list[str]:
    """The names that have a socket file (live or not) in the control directory, sorted."""
    directory = control_dir() if directory is None else directory
    names = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    for entry in entries:
        name = entry.name[:-5]
        if not entry.name.endswith(".sock") or not _NAME.fullmatch(name):
            continue
        try:
            if stat.S_ISSOCK(entry.stat(follow_symlinks=False).st_mode):
                names.append(name)
        except OSError:
            pass  # gone meanwhile
    return sorted(names)


def running(directory: Path | None = None, timeout: float = 1.0) -> list[dict[str, Any]]:
    """``info`` from every live VM; dead sockets (and VMs that do not answer in time) are left out."""
    directory = control_dir() if directory is None else directory
    out = []
    for name in socket_names(directory):
        try:
            reply = request(socket_path(directory, name), {"cmd": "info"}, timeout)
        except (OSError, KvmkitError):
            continue
        if reply.get("ok"):
            reply.pop("ok")
            out.append(reply)
    return out
