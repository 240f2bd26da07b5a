"""User-mode networking through passt: a passt kvmkit starts for the VM, or one the user started.

passt (Debian package ``passt``) turns the guest's Ethernet frames into
ordinary host sockets: the guest gets DHCP, DNS and outbound TCP/UDP/ICMP
without privileges, and connections to its default gateway reach the
host's own services. It speaks the framing of ``host/netstream.py`` (a
4-byte big-endian length before each frame), so the backend here is a
:class:`~kvmkit.host.netstream.StreamBackend` over its socket.

How kvmkit starts passt: ``passt --foreground --quiet --fd N``, where N is
one end of a socket pair kvmkit made and keeps the other end of. That is
passt's own way of being a child process, and it beats the listening
socket (``--socket PATH``) on the two points that matter here:

* **kvmkit dying, however it dies, ends passt.** ``--fd`` implies
  ``--one-off``: passt quits once its one connection closes, and the kernel
  closes kvmkit's end when kvmkit exits, SIGKILL included. There is no
  window in which passt waits for a client that will never come, as there
  is between ``--socket`` and the connect. ``PR_SET_PDEATHSIG`` would not
  do: the kernel clears it when passt changes its credentials (run as
  root, passt drops to ``nobody`` at start), it fires when the *thread*
  that forked exits rather than the process, and setting it needs a
  ``preexec_fn``, which is unsafe in a process that has threads.
* **No file system rendezvous.** Run as root, passt switches to ``nobody``
  before it binds its socket, so it could not create one in a private
  0700 directory of root's (it logs EACCES and runs on without a socket);
  a socket pair needs no directory, no permissions and no wait.

kvmkit still stops the passt it started on every way out of a machine:
:meth:`UserNetBackend.close` closes the connection, waits briefly for
passt to quit by itself, then terminates it and, if need be, kills it.
passt's messages go to an anonymous temporary file, read back only to
explain an early exit.

``--net user,socket=PATH`` connects to a passt the user started
(``passt --socket PATH``) instead; kvmkit then neither starts nor stops it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import BinaryIO

from ..errors import KvmkitError
from .netstream import MAX_FRAME, OUT_LIMIT, StreamBackend

CONNECT_TIMEOUT = 5.0   # seconds a user's passt has to accept the connection
QUIT_WAIT = 0.5         # seconds passt has to quit by itself once its connection is closed
TERM_WAIT = 1.0         # then after SIGTERM, before SIGKILL
LOG_TAIL = 4096         # bytes of passt's messages read back to explain an exit


def find_passt() -> str:
    """The passt executable on PATH; one sentence if there is none."""
    path = shutil.which("passt")
    if path is None:
        raise KvmkitError("--net user needs passt (Debian package passt), which is not installed here; "
                          "install it, or use --net tap.")
    return path


class PasstProcess:
    """A passt started for one VM; it lives until :meth:`stop` or until its connection closes."""

    def __init__(self, proc: subprocess.Popen[bytes], log: BinaryIO) -> None:
        self.proc = proc
        self._log = log

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    def start(cls, executable: str | None = None) -> tuple["PasstProcess", socket.socket]:
        """Start passt on one end of a new socket pair; returns it and kvmkit's end (blocking mode)."""
        exe = executable or find_passt()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        log = tempfile.TemporaryFile(prefix="kvmkit-passt-")
        try:
            proc = subprocess.Popen([exe, "--foreground", "--quiet", "--fd", str(theirs.fileno())],
                                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=log, close_fds=True)
        except OSError as e:
            ours.close()
            log.close()
            raise KvmkitError(f"cannot start passt ({exe}): {e.strerror or e}; check the passt installation, "
                              "or use --net tap.") from None
        finally:
            theirs.close()  # passt has its copy; ours would keep the connection open after passt exits
        return cls(proc, log), ours

    def exit_reason(self, wait: float = 0.2) -> str | None:
        """How passt ended ("passt exited with status 1: <its last message>"), or None if it runs.

        ``wait``: the connection closes a moment before the process is
        reaped, so an EOF is given that long to become an exit status."""
        try:
            status = self.proc.wait(wait)
        except subprocess.TimeoutExpired:
            return None
        what = f"passt exited with status {status}" if status >= 0 else f"passt was killed by signal {-status}"
        last = self.last_message()
        return f"{what}: {last}" if last else what

    def last_message(self) -> str:
        """passt's last line of its own (its "Failed to send ... to syslog" notes left out)."""
        try:
            size = self._log.seek(0, os.SEEK_END)
            self._log.seek(max(0, size - LOG_TAIL))
            text = self._log.read().decode(errors="replace")
        except (OSError, ValueError):
            return ""
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "to syslog" not in ln]
        return lines[-1] if lines else ""

    def stop(self) -> int:
        """End passt (it quits by itself once its connection is closed; else SIGTERM, then SIGKILL); reap it."""
        proc = self.proc
        try:
            if proc.poll() is None:
                try:
                    proc.wait(QUIT_WAIT)
                except subprocess.TimeoutExpired:
                    proc.terminate()
                    try:
                        proc.wait(TERM_WAIT)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
        finally:
            self._log.close()
        return proc.returncode


class UserNetBackend(StreamBackend):
    """The stream backend over passt's connection; owns the passt it started, if it started one."""

    kind = "user"

    def __init__(self, sock: socket.socket, passt: PasstProcess | None, *, name: str = "net",
                 max_frame: int = MAX_FRAME, out_limit: int = OUT_LIMIT, socket_path: Path | None = None) -> None:
        super().__init__(sock, name=name, max_frame=max_frame, out_limit=out_limit)
        self.passt = passt
        self.socket_path = socket_path

    def describe(self) -> str:
        if self.passt is not None:
            return f"passt (pid {self.passt.pid}, started by kvmkit)"
        return f"passt at {self.socket_path}"

    def why_down(self) -> str | None:
        """Why the backend is down, with passt's exit status and last message when it was ours."""
        if self.down is None:
            return None
        if self.passt is not None and self.down != "closed by kvmkit":
            reason = self.passt.exit_reason()
            if reason is not None:
                return f"{self.down} ({reason})"
        return self.down

    def close(self) -> None:
        super().close()
        if self.passt is not None:
            self.passt.stop()


def connect_passt(path: str | Path, timeout: float = CONNECT_TIMEOUT) -> socket.socket:
    """A connection to the passt listening at ``path`` (started as ``passt --socket PATH``)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    hint = f"start it with 'passt --socket {path}' first, or write --net user to let kvmkit start one"
    try:
        sock.connect(str(path))
    except FileNotFoundError:
        sock.close()
        raise KvmkitError(f"no passt socket exists at {path}; {hint}.") from None
    except ConnectionRefusedError:
        sock.close()
        raise KvmkitError(f"nothing accepts connections at {path} (a passt that exited leaves its socket "
                          f"behind); {hint}.") from None
    except PermissionError:
        sock.close()
        raise KvmkitError(f"cannot connect to the passt socket {path}: permission denied; run kvmkit as the "
                          "user that started passt.") from None
    except TimeoutError:
        sock.close()
        raise KvmkitError(f"the passt at {path} did not accept the connection within {timeout:.0f} s "
                          "(another VM may be connected to it; each VM needs its own passt).") from None
    except OSError as e:
        sock.close()
        raise KvmkitError(f"cannot connect to the passt socket {path}: {e.strerror or e}.") from None
    sock.setblocking(False)
    return sock


def open_user_net(socket_path: str | Path | None = None, *, name: str = "net", max_frame: int = MAX_FRAME,
                  out_limit: int = OUT_LIMIT, executable: str | None = None) -> UserNetBackend:
    """``--net user``: start a passt of our own (``socket_path`` None) or connect to the user's."""
    if socket_path is not None:
        return UserNetBackend(connect_passt(socket_path), None, name=name, max_frame=max_frame,
                              out_limit=out_limit, socket_path=Path(socket_path))
    passt, sock = PasstProcess.start(executable)
    try:
        return UserNetBackend(sock, passt, name=name, max_frame=max_frame, out_limit=out_limit)
    except BaseException:
        sock.close()
        passt.stop()
        raise
