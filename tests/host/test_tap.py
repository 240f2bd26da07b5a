"""The tap backend (host/tap.py): frames both ways through a real tap interface when the test may make one,
and the one-sentence errors (no /dev/net/tun, no CAP_NET_ADMIN, a bad name) everywhere."""

from __future__ import annotations

import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmkit.errors import KvmkitError
from kvmkit.host.tap import TUN_PATH, TapBackend, valid_ifname

SRC = Path(__file__).resolve().parents[2] / "src"
ETH_P_ALL = 0x0003
ETHERTYPE = 0x88B5            # IEEE 802 local experimental: nothing on the host answers it
GUEST_MAC = bytes.fromhex("020000c0ffee")
HOST_MAC = bytes.fromhex("020000facade")

can_make_taps = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists(TUN_PATH) or shutil.which("ip") is None,
                                   reason="making a tap needs root (CAP_NET_ADMIN), /dev/net/tun and ip(8)")


def unique_name() -> str:
    return f"kvt{os.getpid() % 100000}{int(time.monotonic() * 1000) % 1000}"[:15]


def frame(src: bytes, dst: bytes, tag: bytes) -> bytes:
    return dst + src + struct.pack("!H", ETHERTYPE) + tag.ljust(46, b"\0")


@can_make_taps
def test_frames_cross_a_real_tap_both_ways() -> None:
    name = unique_name()
    tap = TapBackend(name)
    packet = None
    try:
        assert tap.ifname == name and Path(f"/sys/class/net/{name}").exists()
        down = frame(GUEST_MAC, b"\xff" * 6, b"while down")
        assert tap.write_frames([[memoryview(down)]]) == 1               # taken, refused (EIO), counted
        assert (tap.tx_frames, tap.tx_errors) == (0, 1) and "Input/output error" in (tap.last_error or "")
        subprocess.run(["ip", "link", "set", "dev", name, "up"], check=True)
        packet = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        packet.bind((name, 0))
        packet.settimeout(5)
        out = frame(GUEST_MAC, b"\xff" * 6, b"from the guest")
        assert tap.write_frames([[memoryview(out)[:20], memoryview(out)[20:]]]) == 1   # writev, no join
        assert tap.tx_frames == 1 and not tap.output_pending
        deadline = time.monotonic() + 5
        while True:
            got = packet.recv(65536)
            if got[12:14] == struct.pack("!H", ETHERTYPE):
                break
            assert time.monotonic() < deadline
        assert got[:len(out)] == out
        back = frame(HOST_MAC, GUEST_MAC, b"from the host")
        packet.send(back)
        deadline = time.monotonic() + 5
        while True:
            f = tap.read_frame()
            if f is not None and bytes(f[12:14]) == struct.pack("!H", ETHERTYPE):
                break
            assert time.monotonic() < deadline, "the host's frame did not reach the tap's reader"
            select.select([tap.fileno()], [], [], 0.5)
        assert bytes(f) == back and tap.rx_frames >= 1
    finally:
        if packet is not None:
            packet.close()
        tap.close()
    assert not Path(f"/sys/class/net/{name}").exists()          # a tap kvmkit made goes with it


@can_make_taps
def test_a_kernel_named_tap_and_a_busy_name() -> None:
    tap = TapBackend(None)
    try:
        assert tap.ifname.startswith("tap") and Path(f"/sys/class/net/{tap.ifname}").exists()
        with pytest.raises(KvmkitError, match=f"{tap.ifname} is in use by another process"):
            TapBackend(tap.ifname)
    finally:
        tap.close()


@can_make_taps
def test_no_cap_net_admin_is_one_sentence() -> None:
    code = "from kvmkit.host.tap import TapBackend\ntry:\n    TapBackend('kvtnocap')\nexcept Exception as e:\n    print(e)"
    out = subprocess.run(["setpriv", "--bounding-set", "-net_admin", "--inh-caps", "-net_admin",
                          sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PYTHONPATH": str(SRC)})
    assert "creating kvtnocap needs CAP_NET_ADMIN" in out.stdout, out.stdout + out.stderr
    assert not Path("/sys/class/net/kvtnocap").exists()


def test_a_missing_tun_device_is_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(KvmkitError, match=r"does not exist, so no tap device can be made; load the tun module"):
        TapBackend("kvt0", path=str(tmp_path / "tun"))


@pytest.mark.parametrize("name, ok", [("tap0", True), ("a" * 15, True), ("a" * 16, False), ("", False),
                                      ("a/b", False), ("a b", False), ("..", False), ("eth0:1", False)])
def test_interface_names(name: str, ok: bool) -> None:
    assert valid_ifname(name) == ok
    if not ok:
        with pytest.raises(KvmkitError, match="is not an interface name"):
            TapBackend(name)
