"""The virtio-net host end on a real host loop (machine/net.py): frames between a device's rings and a stream
backend over a socket pair, back pressure both ways, and the link going down with the backend. No KVM: the
device sits on a PCI transport over plain guest memory, and its kicks are served on the loop as in a VM."""

from __future__ import annotations

import fcntl
import socket
import struct
import sys
import termios
import time
from pathlib import Path
from typing import Callable

import pytest

from kvmkit.devices.virtio import pci as vp
from kvmkit.devices.virtio.net import HDR_LEN, MAX_FRAME, NET_HDR, RECEIVEQ, TRANSMITQ
from kvmkit.host.loop import EventLoop
from kvmkit.host.netstream import StreamBackend, frame_header
from kvmkit.machine.net import VirtioNetEnd
from kvmkit.memory import GuestMemory

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "devices" / "virtio"))
from virtio_driver import Alloc, FakeIrqs, PciDriver  # noqa: E402

MAC = bytes.fromhex("020000123456")
CONFIG_VECTOR = 2


def eventually(cond: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def frame(n: int, seed: int) -> bytes:
    return (b"\xff" * 6 + MAC + b"\x88\xb5" + bytes((seed + i) & 0xFF for i in range(n)))[:n]


class Rig:
    def __init__(self, *, out_limit: int = 1 << 20, sndbuf: int | None = None) -> None:
        ours, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        if sndbuf is not None:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        self.ours = ours
        self.backend = StreamBackend(ours, max_frame=MAX_FRAME, out_limit=out_limit)
        self.loop = EventLoop()
        self.end = VirtioNetEnd("virtio-net0", self.loop, self.backend, MAC)
        self.mem = GuestMemory(32 << 20)
        self.alloc = Alloc(end=32 << 20)
        self.irqs = FakeIrqs()
        self.t = vp.VirtioPciTransport(self.end.device, self.mem, msix_vectors=3, interrupts=self.irqs)
        self.drv = PciDriver(self.t, self.mem, self.alloc)
        self.rx, self.tx = self.drv.init(vectors={RECEIVEQ: 0, TRANSMITQ: 1}, config_vector=CONFIG_VECTOR)
        self.end.start()
        self.loop.start()

    def kick(self, queue: int) -> None:
        """As KVM's ioeventfd does: the kick is served on the host loop."""
        self.loop.call_soon(lambda: self.drv.kick(queue))

    def post_rx(self, count: int, size: int = 2048) -> list[tuple[int, int]]:
        out = []
        for _ in range(count):
            addr = self.alloc(size)
            out.append((self.rx.add([(addr, size, True)]), addr))
        self.kick(RECEIVEQ)
        return out

    def send_tx(self, frames: list[bytes]) -> list[int]:
        heads = []
        for f in frames:
            addr = self.alloc(HDR_LEN + len(f))
            self.mem.write(addr, bytes(HDR_LEN) + f)
            heads.append(self.tx.add([(addr, HDR_LEN + len(f), False)]))
        self.kick(TRANSMITQ)
        return heads

    def unread(self) -> int:
        """Bytes waiting in kvmkit's end of the socket (not read by kvmkit)."""
        return struct.unpack("i", fcntl.ioctl(self.ours.fileno(), termios.FIONREAD, b"\0" * 4))[0]

    def close(self) -> None:
        self.loop.stop()
        self.t.reset()
        self.end.close()
        self.loop.close()
        self.peer.close()


@pytest.fixture
def rig():
    made: list[Rig] = []

    def make(**kw) -> Rig:
        made.append(Rig(**kw))
        return made[-1]
    yield make
    for r in made:
        r.close()


def test_host_frames_reach_posted_buffers_and_wait_while_none_are(rig) -> None:
    r = rig()
    frames = [frame(60 + 10 * i, i) for i in range(5)]
    r.peer.sendall(b"".join(frame_header(len(f)) + f for f in frames))
    time.sleep(0.2)
    assert r.unread() == sum(4 + len(f) for f in frames)         # no buffer posted: kvmkit read nothing
    assert r.end.pumps <= 1
    bufs = r.post_rx(2)
    used: list[tuple[int, int]] = []
    eventually(lambda: used.extend(r.rx.take_used()) or len(used) == 2)
    time.sleep(0.1)
    assert len(used) == 2 and r.end.device.rx_waiting             # ring empty again: waiting, not spinning
    pumps = r.end.pumps
    time.sleep(0.2)
    assert r.end.pumps == pumps
    bufs += r.post_rx(3)
    eventually(lambda: used.extend(r.rx.take_used()) or len(used) == 5)
    for (head, addr), (uhead, length), f in zip(bufs, used, frames):
        assert uhead == head and length == HDR_LEN + len(f)
        assert NET_HDR.unpack(r.mem.read(addr, HDR_LEN))[6] == 1 and r.mem.read(addr + HDR_LEN, len(f)) == f
    assert 0 in r.irqs.sent


def test_guest_frames_reach_the_peer_in_order(rig) -> None:
    r = rig()
    frames = [frame(60 + i, i) for i in range(40)]
    heads = r.send_tx(frames)
    want = b"".join(frame_header(len(f)) + f for f in frames)
    r.peer.settimeout(5)
    got = bytearray()
    while len(got) < len(want):
        got += r.peer.recv(1 << 16)
    assert bytes(got) == want
    used: list[tuple[int, int]] = []
    eventually(lambda: used.extend(r.tx.take_used()) or len(used) == len(heads))
    assert [h for h, _ in used] == heads


def test_a_slow_peer_holds_the_guests_frames_in_the_ring_then_takes_them_all(rig) -> None:
    r = rig(out_limit=1, sndbuf=4096)                               # the bound: one largest frame
    frames = [frame(1500, i) for i in range(200)]
    heads = r.send_tx(frames)
    eventually(lambda: r.end.device.tx_blocked)
    time.sleep(0.1)
    done = r.tx.take_used()
    assert len(done) < len(heads)                                  # the rest wait in the ring, unacknowledged
    assert r.backend.tx_dropped == 0
    want = b"".join(frame_header(len(f)) + f for f in frames)
    r.peer.settimeout(5)
    got = bytearray()
    while len(got) < len(want):
        got += r.peer.recv(1 << 16)
    assert bytes(got) == want                                      # none lost, none twice, in order
    eventually(lambda: done.extend(r.tx.take_used()) or len(done) == len(heads))
    assert [h for h, _ in done] == heads and not r.end.device.tx_blocked


def test_the_link_goes_down_with_the_backend_and_frames_are_counted_as_dropped(rig) -> None:
    r = rig()
    r.post_rx(1)
    assert r.drv.config(6, 2) == 1                                 # VIRTIO_NET_S_LINK_UP
    r.peer.close()
    eventually(lambda: r.drv.config(6, 2) == 0)
    assert CONFIG_VECTOR in r.irqs.sent and r.backend.down == "it closed the connection"
    heads = r.send_tx([frame(60, 1), frame(60, 2)])
    used: list[tuple[int, int]] = []
    eventually(lambda: used.extend(r.tx.take_used()) or len(used) == 2)
    assert [h for h, _ in used] == heads and r.backend.tx_dropped == 2
    assert "down: it closed the connection" in r.end.summary()
