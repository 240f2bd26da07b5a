"""`--serial unix:PATH` under attack: reconnects, floods, a second client, umask 000, a live or stale socket.

Each test drives a SerialPort on a real host loop (no KVM) as the guest
would, and checks issue 12's items 1, 5 and 6: the console survives any
number of reconnects, a second client neither steals it nor makes the loop
spin, the socket is 0600 whatever the umask, another kvmkit's live socket is
never unlinked, and a path too long for a socket address is one sentence.
"""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from pathlib import Path

import pytest

from kvmkit.errors import KvmkitError
from kvmkit.host.backends import UnixSocketBackend, listen_unix
from kvmkit.host.loop import EventLoop
from kvmkit.machine.serial import SerialPort

THR, LSR, RBR = 0, 5, 0


def start(path: str) -> tuple[EventLoop, SerialPort]:
    loop = EventLoop()
    port = SerialPort("COM1", loop, UnixSocketBackend(path), lambda level: None)
    port.start()
    loop.start()
    port.io_write(2, 1, 0x07)  # FIFOs on
    return loop, port


def guest_write(port: SerialPort, data: bytes) -> None:
    for b in data:
        deadline = time.monotonic() + 5
        while port.uart.tx_pending() >= 16:
            assert time.monotonic() < deadline, "THRE never came back"
            port.io_read(LSR, 1)
            time.sleep(0.0005)
        port.io_write(THR, 1, b)
    port.io_read(LSR, 1)


def guest_read(port: SerialPort, n: int, timeout: float = 5) -> bytes:
    out = bytearray()
    deadline = time.monotonic() + timeout
    while len(out) < n:
        assert time.monotonic() < deadline, f"guest got {out!r}"
        if port.io_read(LSR, 1) & 1:
            out.append(port.io_read(RBR, 1))
        else:
            time.sleep(0.001)
    return bytes(out)


def guest_read_until(port: SerialPort, marker: bytes, timeout: float = 5) -> bytes:
    out = bytearray()
    deadline = time.monotonic() + timeout
    while not out.endswith(marker):
        assert time.monotonic() < deadline, f"guest got {bytes(out)!r}"
        if port.io_read(LSR, 1) & 1:
            out.append(port.io_read(RBR, 1))
        else:
            time.sleep(0.001)
    return bytes(out)


def connect(path: str) -> socket.socket:
    c = socket.socket(socket.AF_UNIX)
    c.connect(path)
    c.settimeout(5)
    return c


def recv_until(c: socket.socket, marker: bytes) -> bytes:
    got = b""
    while marker not in got:
        chunk = c.recv(65536)
        assert chunk, f"connection closed; got {got!r}"
        got += chunk
    return got


def loop_cpu_s(loop: EventLoop) -> float:
    assert loop.thread is not None and loop.thread.native_id is not None
    with open(f"/proc/self/task/{loop.thread.native_id}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def test_reconnects_any_number_of_times_with_input_and_output(tmp_path: Path) -> None:
    path = str(tmp_path / "c.sock")
    loop, port = start(path)
    try:
        for i in range(25):
            c = connect(path)
            guest_write(port, f"out{i};".encode())
            assert f"out{i};".encode() in recv_until(c, f"out{i};".encode())
            c.sendall(f"in{i:02d}".encode())
            got = guest_read_until(port, f"in{i:02d}".encode())
            # before it, at most what the departed flooder had already put into the UART's 16-byte FIFO
            assert set(got[:-4]) <= {ord("x")} and len(got) <= 16 + 4, got
            if i % 3 == 0:
                c.sendall(b"x" * 100_000)  # a flood, then gone: the guest takes what it reads, nothing breaks
            c.close()
            time.sleep(0.01)
        assert loop.errors == 0
    finally:
        loop.stop()
        port.close()


def test_a_second_client_is_told_and_closed_and_the_loop_does_not_spin(tmp_path: Path) -> None:
    path = str(tmp_path / "c.sock")
    loop, port = start(path)
    try:
        first = connect(path)
        time.sleep(0.05)
        before = loop_cpu_s(loop)
        second = connect(path)
        assert b"already has a client" in recv_until(second, b"\n")
        assert second.recv(100) == b""  # closed by kvmkit
        time.sleep(0.5)
        assert loop_cpu_s(loop) - before < 0.1, "the host loop spun on the listener"
        guest_write(port, b"still mine")
        assert b"still mine" in recv_until(first, b"still mine")
        first.close()
        third = connect(path)  # after the first left, a new client is the console again
        guest_write(port, b"now yours")
        assert b"now yours" in recv_until(third, b"now yours")
        third.close()
    finally:
        loop.stop()
        port.close()


def test_output_without_a_client_never_stalls_the_guest_and_the_next_client_hears_of_the_drop(tmp_path: Path) -> None:
    path = str(tmp_path / "c.sock")
    loop, port = start(path)
    try:
        t0 = time.monotonic()
        guest_write(port, b"A" * 100_000 + b"<end>")  # more than the 64 KiB kept
        assert time.monotonic() - t0 < 20
        c = connect(path)
        got = recv_until(c, b"<end>")
        assert b"earlier bytes of output were dropped while no client was connected" in got
        kept = got.split(b"]\r\n", 1)[1]
        assert kept.endswith(b"<end>") and 60_000 < len(kept) <= 64 * 1024
        assert port.counters.dropped_unconnected == 100_005 - len(kept)
        c.close()
    finally:
        loop.stop()
        port.close()


def test_socket_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    path = str(tmp_path / "c.sock")
    old = os.umask(0)
    try:
        s = listen_unix(path, "test")
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        s.close()


def test_a_live_socket_of_another_kvmkit_is_refused_not_unlinked(tmp_path: Path) -> None:
    path = str(tmp_path / "c.sock")
    other = listen_unix(path, "test")
    ino = os.stat(path).st_ino
    try:
        with pytest.raises(KvmkitError, match="listening on"):
            listen_unix(path, "test")
        assert os.stat(path).st_ino == ino  # still the other one's socket
    finally:
        other.close()


def test_a_stale_socket_is_replaced_and_other_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # the socket file stays, nobody listens: a killed kvmkit's
    s = listen_unix(str(path), "test")
    s.close()
    os.unlink(path)
    path.write_text("not a socket")
    with pytest.raises(KvmkitError, match="not a socket"):
        listen_unix(str(path), "test")
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(KvmkitError, match="not a socket"):
        listen_unix(str(path), "test")


def test_a_path_too_long_for_a_socket_address_is_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(KvmkitError, match=r"more than the 107 a unix socket address holds"):
        listen_unix(str(tmp_path / ("x" * 200)), "test")


def test_many_clients_in_parallel_leave_the_console_working(tmp_path: Path) -> None:
    path = str(tmp_path / "c.sock")
    loop, port = start(path)
    try:
        def pester() -> None:
            for _ in range(20):
                try:
                    s = connect(path)
                    s.sendall(b"zz")
                    s.close()
                except OSError:
                    pass
        threads = [threading.Thread(target=pester) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        time.sleep(0.1)
        while port.io_read(LSR, 1) & 1:  # whatever the pests managed to type
            port.io_read(RBR, 1)
            time.sleep(0.003)
        c = connect(path)
        guest_write(port, b"calm again")
        assert b"calm again" in recv_until(c, b"calm again")
        c.sendall(b"ok")
        assert guest_read(port, 2) == b"ok"
        assert loop.errors == 0
    finally:
        loop.stop()
        port.close()
