"""User networking through a real passt (host/netuser.py): kvmkit starts it, talks DHCP and TCP to it like a
guest, and it is gone afterwards, also when kvmkit is SIGKILLed; a passt the user started is connected to
and left running; and each way of failing is one sentence."""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from kvmkit.errors import KvmkitError
from kvmkit.host import netuser
from kvmkit.host.netuser import UserNetBackend, open_user_net

from netpackets import DHCPOFFER, TCP_ACK, TCP_SYN, dhcp_discover, parse_dhcp, parse_tcp, tcp_syn

PASST = shutil.which("passt")
needs_passt = pytest.mark.skipif(PASST is None, reason="passt is not installed (Debian package passt; "
                                 "tools/install-deps --test installs it)")
SRC = Path(__file__).resolve().parents[2] / "src"
GUEST_MAC = bytes.fromhex("02000000beef")


def send(be: UserNetBackend, frame: bytes) -> None:
    assert be.write_frames([[memoryview(frame)]]) == 1
    assert be.flush()


def wait_for(be: UserNetBackend, match: Callable[[bytes], object], timeout: float = 5.0) -> object:
    """Read frames until ``match`` returns something true; that value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        frame = be.read_frame()
        if frame is None:
            assert be.down is None, be.why_down()
            select.select([be.fileno()], [], [], max(0.0, deadline - time.monotonic()))
            continue
        found = match(bytes(frame))
        if found:
            return found
    raise AssertionError(f"no matching frame from passt within {timeout} s")


def dhcp(be: UserNetBackend, xid: int = 0x4B564D4B) -> dict:
    send(be, dhcp_discover(GUEST_MAC, xid))
    offer = wait_for(be, lambda f: (d := parse_dhcp(f)) and d["xid"] == xid and d)
    assert isinstance(offer, dict)
    return offer


def gone(pid: int) -> bool:
    """The process has exited (reaped, or a zombie its new parent has not reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


@needs_passt
def test_kvmkit_starts_passt_gets_a_dhcp_offer_and_stops_it() -> None:
    be = open_user_net()
    assert be.passt is not None
    pid = be.passt.pid
    assert not gone(pid)
    offer = dhcp(be)
    assert offer["options"][53] == bytes([DHCPOFFER])
    assert offer["yiaddr"] != bytes(4) and 3 in offer["options"]          # an address, and a router
    be.close()
    assert be.passt.proc.returncode is not None and gone(pid)
    assert be.down == "closed by kvmkit"


@needs_passt
def test_a_tcp_connection_to_the_gateway_reaches_a_host_server_on_loopback() -> None:
    """What a guest does with `nc GATEWAY PORT`: passt maps the gateway address to the host."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    be = open_user_net()
    try:
        offer = dhcp(be)
        me, gateway = offer["yiaddr"], offer["options"][3][:4]
        send(be, tcp_syn(GUEST_MAC, offer["server_mac"], me, gateway, 40000, port, 1000))
        synack = wait_for(be, lambda f: (t := parse_tcp(f)) and t["dport"] == 40000 and t)
        assert isinstance(synack, dict)
        assert synack["flags"] & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK and synack["ack"] == 1001
        assert synack["src"] == gateway and synack["sport"] == port
        server.settimeout(5)
        conn, peer = server.accept()                                        # passt connected on our behalf
        assert peer[0] == "127.0.0.1"
        conn.close()
    finally:
        be.close()
        server.close()


@needs_passt
def test_passt_ends_when_kvmkit_is_killed() -> None:
    code = ("import sys, time; from kvmkit.host.netuser import open_user_net; b = open_user_net(); "
            "print(b.passt.pid, flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(SRC)})
    try:
        pid = int(child.stdout.readline())
        assert not gone(pid)
        child.send_signal(signal.SIGKILL)            # no Python cleanup runs: only the kernel closes its fds
        child.wait(5)
        deadline = time.monotonic() + 5
        while not gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gone(pid), "passt outlived the kvmkit that started it"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()


@needs_passt
def test_an_early_exit_is_explained_with_passts_last_words(tmp_path: Path) -> None:
    fake = tmp_path / "passt"
    fake.write_text("#!/bin/sh\necho 'Failed to send 20 bytes to syslog' >&2\necho 'no usable interface' >&2\nexit 3\n")
    fake.chmod(0o755)
    be = open_user_net(executable=str(fake))
    deadline = time.monotonic() + 5
    while be.read_frame() is None and be.down is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert be.why_down() == "it closed the connection (passt exited with status 3: no usable interface)"
    be.close()


@needs_passt
def test_a_passt_the_user_started_is_connected_to_and_left_running(tmp_path: Path) -> None:
    path = tmp_path / "passt.socket"
    # As root passt would drop to nobody, who cannot create a socket in pytest's 0700 directory.
    user = ["--runas", f"{os.getuid()}:{os.getgid()}"]
    proc = subprocess.Popen([PASST, "--foreground", "--quiet", "--socket", str(path), *user],  # type: ignore[list-item]
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        be = open_user_net(path)
        assert be.passt is None and be.describe() == f"passt at {path}"
        assert dhcp(be)["options"][53] == bytes([DHCPOFFER])
        be.close()
        time.sleep(0.2)
        assert proc.poll() is None                              # not kvmkit's to stop
    finally:
        proc.terminate()
        proc.wait(5)


def test_connect_errors_are_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(KvmkitError, match="no passt socket exists at .*passt --socket"):
        open_user_net(tmp_path / "missing")
    stale = tmp_path / "stale"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()                                                   # the file stays; nothing listens
    with pytest.raises(KvmkitError, match="nothing accepts connections"):
        open_user_net(stale)


def test_missing_passt_is_one_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netuser.shutil, "which", lambda name: None)
    with pytest.raises(KvmkitError, match="needs passt .*Debian package passt.*--net tap"):
        open_user_net()
