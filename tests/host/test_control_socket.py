"""The control socket under attack, without KVM: permissions, names, stale and live sockets, hostile clients.

A ControlSocket with a toy handler stands for a VM's: what is checked here
is that no client (garbage, floods, silence, a byte at a time, too many of
them, another user) gets past the line protocol or holds a thread or memory
for long, and that the socket file is private and goes away with its server.
"""

from __future__ import annotations

import json
import os
import pwd
import socket
import stat
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any, Iterator

import pytest

from kvmkit.errors import KvmkitError
from kvmkit.host.control import (MAX_REQUEST, ControlSocket, NameInUse, NotRunning, call, check_private_dir,
                                 control_dir, request, running, socket_names, socket_path, validate_name)


def handler(req: dict[str, Any]) -> dict[str, Any]:
    cmd = req.get("cmd")
    if cmd == "info":
        return {"name": "t", "pid": os.getpid(), "state": "running"}
    if cmd == "echo":
        return {"echo": req}
    if cmd == "slow":
        time.sleep(0.4)
        return {"slept": True}
    if cmd == "crash":
        raise RuntimeError("a bug")
    raise KvmkitError(f"unknown command {cmd!r}.")


@pytest.fixture
def ctl_dir(tmp_path: Path) -> Path:
    d = tmp_path / "ctl"
    check_private_dir(d, create=True)
    return d


@pytest.fixture
def servers() -> Iterator[list[ControlSocket]]:
    made: list[ControlSocket] = []
    yield made
    for s in made:
        s.close()


def serve(made: list[ControlSocket], directory: Path, name: str = "t", **limits: Any) -> ControlSocket:
    s = ControlSocket(directory, name, handler, **limits)
    made.append(s)
    s.start()
    return s


def connect(path: Path) -> socket.socket:
    c = socket.socket(socket.AF_UNIX)
    c.settimeout(5)
    c.connect(str(path))
    return c


_unread: dict[int, bytes] = {}  # replies that came in one recv with an earlier one, by socket


def read_reply(c: socket.socket) -> dict[str, Any]:
    """One reply line (two replies may arrive in one recv: the second waits for the next call)."""
    got = _unread.pop(id(c), b"")
    while b"\n" not in got:
        chunk = c.recv(65536)
        assert chunk, f"closed; got {got!r}"
        got += chunk
    line, rest = got.split(b"\n", 1)
    if rest:
        _unread[id(c)] = rest
    return json.loads(line)


def ask(c: socket.socket, line: bytes) -> dict[str, Any]:
    c.sendall(line)
    return read_reply(c)


def wait_for(cond, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition never came true"
        time.sleep(0.01)


# --- where the socket lives ---------------------------------------------------------------------
def test_socket_is_0600_under_umask_000_and_its_dir_0700(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         servers: list[ControlSocket]) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    born: dict[str, int] = {}
    real_chmod = os.chmod

    def chmod(path: Any, mode: int, **kw: Any) -> None:  # what the file was before kvmkit's chmod fixed it
        born.setdefault(str(path), stat.S_IMODE(os.lstat(path).st_mode))
        real_chmod(path, mode, **kw)
    monkeypatch.setattr(os, "chmod", chmod)
    old = os.umask(0)
    try:
        d = control_dir(create=True)
        s = serve(servers, d)
    finally:
        os.umask(old)
    # never reachable by others, not even between bind() and chmod()
    assert born.get(str(s.path), 0o600) & 0o077 == 0 and born.get(str(d), 0o700) & 0o077 == 0, born
    assert d == tmp_path / "kvmkit"
    assert stat.S_IMODE(os.lstat(d).st_mode) == 0o700
    st = os.lstat(s.path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert s.path == d / "t.sock"


def test_the_dir_falls_back_to_home_when_xdg_runtime_dir_is_unset_or_unusable(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    assert control_dir(create=True) == tmp_path / ".kvmkit"
    for bad in ("", "relative/dir", str(tmp_path / "missing")):
        monkeypatch.setenv("XDG_RUNTIME_DIR", bad)
        assert control_dir() == tmp_path / ".kvmkit"
    assert stat.S_IMODE(os.lstat(tmp_path / ".kvmkit").st_mode) == 0o700


def test_an_unsafe_dir_is_refused_in_one_sentence(tmp_path: Path) -> None:
    d = tmp_path / "ctl"
    d.mkdir(mode=0o700)
    d.chmod(0o770)
    with pytest.raises(KvmkitError, match=r"other users have access \(mode 0770\); run chmod 700"):
        check_private_dir(d, create=True)
    d.chmod(0o705)
    with pytest.raises(KvmkitError, match="other users have access"):
        check_private_dir(d, create=False)
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(KvmkitError, match="is a symbolic link"):
        check_private_dir(link, create=True)
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(KvmkitError, match="not a directory"):
        check_private_dir(f, create=True)
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, pwd.getpwnam("nobody").pw_uid, -1)
        with pytest.raises(KvmkitError, match="belongs to uid"):
            check_private_dir(theirs, create=True)
    check_private_dir(real, create=True)  # and a good one passes


def test_names_are_checked() -> None:
    for good in ("vm-1a2b", "web_01", "a.b", "x" * 64, "-x"):
        assert validate_name(good) == good
    for bad in ("", ".hidden", "a/b", "../x", "x" * 65, "sp ace", "é", "a\nb"):
        with pytest.raises(KvmkitError, match="not a usable VM name"):
            validate_name(bad)


def test_a_path_too_long_for_a_socket_address_is_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(KvmkitError, match="longer than the 107 bytes"):
        socket_path(tmp_path / ("d" * 90), "x" * 40)


def test_a_stale_socket_is_replaced(ctl_dir: Path, servers: list[ControlSocket]) -> None:
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(ctl_dir / "t.sock"))
    dead.close()  # the file stays, nobody listens: a killed kvmkit's
    with pytest.raises(NotRunning, match="no VM named t is running"):
        call("t", "info", directory=ctl_dir)
    s = serve(servers, ctl_dir)
    assert call("t", "info", directory=ctl_dir)["state"] == "running"
    assert s.path.exists()


def test_a_live_name_is_refused_with_its_pid_and_left_alone(ctl_dir: Path, servers: list[ControlSocket]) -> None:
    first = serve(servers, ctl_dir)
    ino = os.stat(first.path).st_ino
    with pytest.raises(NameInUse, match=rf"a VM named t is already running \(pid {os.getpid()}\); choose another --name"):
        ControlSocket(ctl_dir, "t", handler)
    assert os.stat(first.path).st_ino == ino
    assert call("t", "echo", directory=ctl_dir, x=1)["echo"] == {"cmd": "echo", "x": 1}


def test_something_else_at_the_path_is_refused(ctl_dir: Path) -> None:
    (ctl_dir / "t.sock").write_text("mine")
    with pytest.raises(KvmkitError, match="exists and is not a socket"):
        ControlSocket(ctl_dir, "t", handler)
    assert (ctl_dir / "t.sock").read_text() == "mine"


def test_the_socket_is_removed_on_close_and_close_is_idempotent(ctl_dir: Path) -> None:
    s = ControlSocket(ctl_dir, "t", handler)
    s.start()
    c = connect(s.path)
    wait_for(lambda: s.client_count == 1)
    s.close()
    assert not s.path.exists()
    assert c.recv(100) == b""  # an idle client is let go at once
    s.close()
    with pytest.raises(NotRunning):
        call("t", "info", directory=ctl_dir)
    never_started = ControlSocket(ctl_dir, "u", handler)
    never_started.close()
    assert not never_started.path.exists()


def test_close_leaves_a_socket_that_is_not_its_own(ctl_dir: Path) -> None:
    s = ControlSocket(ctl_dir, "t", handler)
    s.start()
    os.unlink(s.path)
    other = socket.socket(socket.AF_UNIX)
    other.bind(str(s.path))
    try:
        s.close()
        assert s.path.exists()
    finally:
        other.close()


def test_a_reply_in_flight_when_the_server_closes_still_arrives(ctl_dir: Path) -> None:
    """``kvmkit stop``: the VM stops, kvmkit closes the socket, and the client still hears "ok"."""
    s = ControlSocket(ctl_dir, "t", handler)
    s.start()
    c = connect(s.path)
    c.sendall(b'{"cmd": "slow"}\n')
    wait_for(lambda: s.client_count == 1)
    time.sleep(0.1)
    s.close()
    assert read_reply(c) == {"ok": True, "slept": True}
    assert c.recv(100) == b""


# --- hostile clients ----------------------------------------------------------------------------
def test_bad_requests_get_error_replies_and_the_connection_goes_on(ctl_dir: Path,
                                                                  servers: list[ControlSocket]) -> None:
    s = serve(servers, ctl_dir)
    c = connect(s.path)
    bad = {
        b"this is not json\n": "not valid JSON",
        b"\xff\xfe\x00\n": "not valid JSON",
        b'[1, 2, 3]\n': "not a JSON object",
        b'"info"\n': "not a JSON object",
        b"null\n": "not a JSON object",
        b"[" * 100_000 + b"\n": "longer than 65536 bytes",
        b"[" * 60_000 + b"\n": "nested too deeply",
        b'{"cmd": "nope"}\n': "unknown command 'nope'",
        b'{"cmd": "crash"}\n': "RuntimeError: a bug",
        b'{"cmd": "echo", "pad": "' + b"x" * (MAX_REQUEST + 10) + b'"}\n': "longer than 65536 bytes",
        b"\n": "not valid JSON",
    }
    for line, error in bad.items():
        reply = ask(c, line)
        assert reply["ok"] is False and error in reply["error"], (line[:40], reply)
        assert ask(c, b'{"cmd": "info"}\n')["state"] == "running"
    # two requests in one write, and one split across writes
    c.sendall(b'{"cmd": "echo", "n": 1}\n{"cmd": "echo", "n": 2}\n{"cmd": "ec')
    assert read_reply(c)["echo"]["n"] == 1
    assert read_reply(c)["echo"]["n"] == 2
    assert ask(c, b'ho", "n": 3}\n')["echo"]["n"] == 3
    exact = b'{"cmd": "echo", "p": "' + b"y" * (MAX_REQUEST - 24) + b'"}\n'
    assert len(exact) == MAX_REQUEST + 1
    assert ask(c, exact)["ok"] is True  # the limit itself is allowed


def test_more_clients_than_the_bound_are_told_and_closed(ctl_dir: Path, servers: list[ControlSocket]) -> None:
    s = serve(servers, ctl_dir, max_clients=3)
    held = [connect(s.path) for _ in range(3)]
    wait_for(lambda: s.client_count == 3)
    extra = connect(s.path)
    reply = read_reply(extra)
    assert reply == {"ok": False, "error": "3 clients are already connected; try again later."}
    assert extra.recv(100) == b""
    assert s.client_count == 3
    for c in held:  # the ones in still work
        assert ask(c, b'{"cmd": "info"}\n')["ok"] is True
    held.pop().close()
    wait_for(lambda: s.client_count == 2)
    assert call("t", "info", directory=ctl_dir)["ok"] is True
    for c in held:
        c.close()


def test_an_idle_client_is_timed_out(ctl_dir: Path, servers: list[ControlSocket]) -> None:
    s = serve(servers, ctl_dir, idle_timeout=0.3)
    c = connect(s.path)
    t0 = time.monotonic()
    reply = read_reply(c)
    assert reply["error"] == "no request came within 0.3 s; closing the connection."
    assert c.recv(100) == b""
    assert 0.25 < time.monotonic() - t0 < 2
    wait_for(lambda: s.client_count == 0)


def test_a_byte_at_a_time_client_is_timed_out(ctl_dir: Path, servers: list[ControlSocket]) -> None:
    s = serve(servers, ctl_dir, idle_timeout=5, line_timeout=0.4)
    c = connect(s.path)
    t0 = time.monotonic()
    for b in b'{"cmd": "info"                         }':  # it would finish after 4 s
        try:
            c.send(bytes([b]))
        except OSError:
            break  # dropped: the reply below was sent first
        time.sleep(0.1)
        if time.monotonic() - t0 > 1.0:
            break
    reply = read_reply(c)
    assert reply["error"] == "the request was not completed within 0.4 s; closing the connection."
    wait_for(lambda: s.client_count == 0, timeout=2)
    assert time.monotonic() - t0 < 2


def test_a_flood_without_newlines_is_dropped_in_bounded_memory(ctl_dir: Path, servers: list[ControlSocket]) -> None:
    s = serve(servers, ctl_dir)
    flood = b"x" * (10 * 1024 * 1024)
    c = connect(s.path)
    c.settimeout(10)
    tracemalloc.start()
    try:
        sent = 0
        view = memoryview(flood)
        try:
            while sent < len(flood):
                sent += c.send(view[sent:sent + 256 * 1024])
        except (BrokenPipeError, ConnectionResetError):
            pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sent < len(flood), "the server swallowed all 10 MB"
    assert peak < 2 * 1024 * 1024, f"{peak} bytes were allocated while reading the flood"
    reply = read_reply(c)
    assert "longer than 65536 bytes and has no end in sight; closing the connection" in reply["error"]
    wait_for(lambda: s.client_count == 0)
    assert call("t", "info", directory=ctl_dir)["ok"] is True  # and the next client is served


def test_many_clients_connecting_at_once_leave_it_working(ctl_dir: Path, servers: list[ControlSocket]) -> None:
    s = serve(servers, ctl_dir, max_clients=4)

    def pester() -> None:
        for _ in range(25):
            try:
                c = connect(s.path)
                c.sendall(b'{"cmd": "info"}\n{"cmd": "ec')
                c.close()
            except OSError:
                pass
    threads = [threading.Thread(target=pester) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wait_for(lambda: s.client_count == 0)
    assert call("t", "echo", directory=ctl_dir, ok2=True)["echo"]["ok2"] is True


def _connect_as_nobody(path: Path) -> str:
    """Connect from a forked child running as 'nobody'; what happened, as a word."""
    nobody = pwd.getpwnam("nobody")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest, no exceptions escaping
        word = b"other"
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            c = socket.socket(socket.AF_UNIX)
            c.settimeout(2)
            c.connect(str(path))
            word = b"closed"
            c.sendall(b'{"cmd": "info"}\n')
            if c.recv(100):
                word = b"answered"
        except PermissionError:
            word = b"denied"
        except (BrokenPipeError, ConnectionResetError):
            pass  # connected, then shut out: "closed"
        except OSError:
            word = b"other"
        except BaseException:
            pass
        finally:
            os.write(w, word)
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        word = f.read().decode()
    os.waitpid(pid, 0)
    return word


@pytest.mark.skipif(os.geteuid() != 0, reason="becoming another user (os.setuid) needs root")
def test_another_user_cannot_connect(servers: list[ControlSocket]) -> None:
    base = Path(tempfile.mkdtemp(prefix="kvmkit-ctl-", dir="/tmp"))  # not under pytest's 0700 tmp dir
    try:
        base.chmod(0o711)
        d = base / "kvmkit"
        check_private_dir(d, create=True)
        s = serve(servers, d)
        assert _connect_as_nobody(s.path) == "denied"
        # each lock alone keeps 'nobody' out: the 0700 directory, the 0600 socket, the peer's uid
        os.chmod(s.path, 0o666)
        assert _connect_as_nobody(s.path) == "denied"
        os.chmod(s.path, 0o600)
        d.chmod(0o711)
        assert _connect_as_nobody(s.path) == "denied"
        os.chmod(s.path, 0o666)
        assert _connect_as_nobody(s.path) == "closed"
    finally:
        for srv in servers:
            srv.close()
        for p in sorted(base.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        base.rmdir()


# --- the client side ----------------------------------------------------------------------------
def test_the_client_helpers(ctl_dir: Path, servers: list[ControlSocket]) -> None:
    serve(servers, ctl_dir, name="a")
    serve(servers, ctl_dir, name="b")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(ctl_dir / "dead.sock"))
    dead.close()
    (ctl_dir / "notes.txt").write_text("not a socket")
    assert socket_names(ctl_dir) == ["a", "b", "dead"]
    assert [i["name"] for i in running(ctl_dir)] == ["t", "t"]  # the toy handler's; the dead one skipped
    assert request(ctl_dir / "a.sock", {"cmd": "nope"}) == {"ok": False, "error": "unknown command 'nope'."}
    with pytest.raises(KvmkitError, match=r"^unknown command 'nope'\.$"):
        call("a", "nope", directory=ctl_dir)
    with pytest.raises(NotRunning, match=r"no VM named zz is running \(kvmkit list shows the running ones\)"):
        call("zz", "info", directory=ctl_dir)
    with pytest.raises(KvmkitError, match="not a usable VM name"):
        call("../a", "info", directory=ctl_dir)
    assert socket_names(ctl_dir / "missing") == []


def test_a_client_waits_out_a_full_listen_backlog(tmp_path: Path) -> None:
    """A flood that fills the backlog makes a VM busy, not gone: request() tries again until its deadline."""
    from kvmkit.host.control import request
    path = tmp_path / "busy.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(0)
    fillers = []
    for _ in range(8):  # fill the backlog: further connects get EAGAIN
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.setblocking(False)
        try:
            c.connect(str(path))
        except BlockingIOError:
            c.close()
            break
        fillers.append(c)

    def serve_later() -> None:
        time.sleep(0.3)
        srv.settimeout(3)
        for _ in range(len(fillers) + 1):
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.settimeout(2)
            try:
                data = conn.recv(100)
                if data:
                    conn.sendall(b'{"ok": true, "late": true}\n')
            except OSError:
                pass
            conn.close()
    for c in fillers:
        c.close()
    t = threading.Thread(target=serve_later)
    t.start()
    try:
        assert request(path, {"cmd": "info"}, timeout=5.0) == {"ok": True, "late": True}
    finally:
        t.join()
        srv.close()
