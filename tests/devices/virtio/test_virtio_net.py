"""virtio-net through the PCI transport: features and config, transmit batches and back pressure, receive
into posted buffers only (one chain, or merged over several), and hostile chains on both queues."""

from __future__ import annotations

import collections
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmkit.devices.state import StateError
from kvmkit.devices.virtio import VIRTIO_F_VERSION_1, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from kvmkit.devices.virtio import pci as vp
from kvmkit.devices.virtio.net import (
    DROP_REASONS,
    HDR_LEN,
    MAX_FRAME,
    NET_HDR,
    RECEIVEQ,
    TRANSMITQ,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_S_LINK_UP,
    VirtioNet,
)
from kvmkit.memory import GuestMemory

from virtio_driver import Alloc, FakeIrqs, PciDriver

MAC = bytes.fromhex("020000abcdef")
RAM = 16 << 20
CONFIG_VECTOR = 2


class Host:
    """A NetHost that records what it was given and hands out queued frames.

    ``budget``: frames taken per transmit call (None: all)."""

    def __init__(self, budget: int | None = None) -> None:
        self.budget = budget
        self.sent: list[bytes] = []
        self.batches: list[int] = []
        self.rx: collections.deque[bytes] = collections.deque()
        self.reads = 0
        self.rx_ready_calls = 0

    def transmit(self, frames) -> int:
        self.batches.append(len(frames))
        take = len(frames) if self.budget is None else min(self.budget, len(frames))
        self.sent += [b"".join(bytes(v) for v in f) for f in frames[:take]]
        return take

    def receive_frame(self) -> bytes | None:
        self.reads += 1
        return self.rx.popleft() if self.rx else None

    def rx_ready(self) -> None:
        self.rx_ready_calls += 1


class Nic:
    """A driver's view of one virtio-net device."""

    def __init__(self, host: Host | None = None, *, mrg: bool = True, features: int | None = None) -> None:
        self.host = host or Host()
        self.mem = GuestMemory(RAM)
        self.alloc = Alloc()
        self.dev = VirtioNet(self.host, MAC)
        self.irqs = FakeIrqs()
        self.t = vp.VirtioPciTransport(self.dev, self.mem, msix_vectors=3, interrupts=self.irqs)
        self.drv = PciDriver(self.t, self.mem, self.alloc)
        self.rx, self.tx = self.drv.init(features, drop=0 if mrg else 1 << VIRTIO_NET_F_MRG_RXBUF,
                                         vectors={RECEIVEQ: 0, TRANSMITQ: 1}, config_vector=CONFIG_VECTOR)

    def buf(self, data: bytes) -> int:
        addr = self.alloc(max(1, len(data)))
        self.mem.write(addr, data)
        return addr

    def send(self, pieces: list[bytes], *, kick: bool = True) -> int:
        """One TX chain of device-readable pieces (the header included by the caller)."""
        head = self.tx.add([(self.buf(p), len(p), False) for p in pieces])
        if kick:
            self.drv.kick(TRANSMITQ)
        return head

    def post(self, sizes: list[int]) -> tuple[int, list[int]]:
        """One RX chain of device-writable buffers; (head, their addresses)."""
        addrs = [self.alloc(n) for n in sizes]
        return self.rx.add([(a, n, True) for a, n in zip(addrs, sizes)]), addrs


def hdr(flags: int = 0, gso_type: int = 0) -> bytes:
    return NET_HDR.pack(flags, gso_type, 0, 0, 0, 0, 0)


def frame(n: int, seed: int = 0) -> bytes:
    body = bytes((seed + i) & 0xFF for i in range(max(0, n - 14)))
    return (b"\xff" * 6 + MAC + b"\x08\x00" + body)[:n]


def drops(nic: Nic) -> dict[str, int]:
    return {k: v for k, v in nic.dev.drops.items() if v}


# === features and configuration ===========================================================

def test_features_config_and_link_status() -> None:
    nic = Nic()
    offered = nic.drv.device_features()
    for bit in (VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_F_VERSION_1):
        assert offered >> bit & 1, bit
    for bit in (VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, 7, 8, 11, 12, VIRTIO_NET_F_MTU,
                VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MQ):   # no offloads, no control or multiqueue
        assert not offered >> bit & 1, bit
    assert nic.t.identity.device_id == 0x1041
    assert bytes(nic.drv.config(i, 1) for i in range(6)) == MAC
    assert nic.drv.config(6, 2) == VIRTIO_NET_S_LINK_UP
    nic.dev.set_link(False)
    assert nic.drv.config(6, 2) == 0 and CONFIG_VECTOR in nic.irqs.sent
    for bad in (b"\x03\0\0\0\0\x01", bytes(6), b"\x02\0\0"):   # multicast, zero, short
        with pytest.raises(ValueError):
            VirtioNet(Host(), bad)


# === transmit ==============================================================================

def test_transmit_strips_the_header_in_any_layout_one_batch_per_kick() -> None:
    nic = Nic()
    f1, f2, f3 = frame(60, 1), frame(1514, 2), frame(300, 3)
    heads = [nic.send([hdr(), f1], kick=False),                       # header alone, then the frame
             nic.send([hdr() + f2], kick=False),                      # header and frame in one buffer
             nic.send([hdr()[:5], hdr()[5:] + f3[:100], f3[100:200], f3[200:]], kick=False)]  # split anywhere
    nic.drv.kick(TRANSMITQ)
    assert nic.host.sent == [f1, f2, f3] and nic.host.batches == [3]
    assert nic.tx.take_used() == [(h, 0) for h in heads]
    assert nic.irqs.sent == [1]                                       # one interrupt for the batch
    assert (nic.dev.tx_frames, nic.dev.tx_bytes) == (3, 60 + 1514 + 300) and not drops(nic)


def test_transmit_drops_and_counts_bad_chains_and_frames() -> None:
    nic = Nic()
    good = frame(64, 9)
    heads = [
        nic.send([hdr()[:8]], kick=False),                              # header cut short
        nic.send([hdr(), frame(13)], kick=False),                       # runt
        nic.send([hdr(), frame(MAX_FRAME + 1)], kick=False),            # oversize
        nic.send([hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM), good], kick=False),  # checksum offload, not offered
        nic.send([hdr(gso_type=1), good], kick=False),                  # TSO, not offered
        nic.tx.add([(nic.buf(hdr() + good), HDR_LEN + 64, True)]),       # write-only chain
        nic.tx.add([(nic.buf(hdr()), HDR_LEN, False), (nic.alloc(64), 64, True)]),  # a writable buffer in it
        nic.tx.add([(RAM + 4096, 100, False)]),                         # outside guest RAM
        nic.send([hdr(), good], kick=False),                            # and one good frame among them
    ]
    nic.drv.kick(TRANSMITQ)
    assert nic.host.sent == [good]
    assert nic.tx.take_used() == [(h, 0) for h in heads]              # every chain completed, in order
    assert drops(nic) == {"tx_short_header": 1, "tx_runt": 1, "tx_oversize": 1, "tx_offload": 2,
                          "tx_writable": 2, "tx_bad_chain": 1}
    assert nic.dev.tx_frames == 1
    # the largest frame allowed goes through
    big = frame(MAX_FRAME, 4)
    nic.send([hdr(), big])
    assert nic.host.sent[-1] == big


def test_transmit_back_pressure_keeps_frames_in_the_ring_until_resumed() -> None:
    host = Host(budget=1)
    nic = Nic(host)
    frames = [frame(60 + i, i) for i in range(5)]
    heads = [nic.send([hdr(), f], kick=False) for f in frames]
    nic.drv.kick(TRANSMITQ)
    assert host.sent == frames[:1] and nic.tx.take_used() == [(heads[0], 0)]
    assert nic.dev.tx_blocked
    with pytest.raises(StateError, match="not taken"):
        nic.dev.save_state()                                          # frames in flight: no snapshot now
    nic.drv.kick(TRANSMITQ)                                          # kicks while blocked offer nothing
    assert len(host.batches) == 1
    done = []
    while nic.dev.tx_blocked:
        nic.dev.tx_resume()
        done += nic.tx.take_used()
    assert host.sent == frames and [h for h, _ in done] == heads[1:]  # in order, none lost, none twice
    assert nic.dev.save_state() == {}


def test_reset_forgets_frames_waiting_for_the_host() -> None:
    host = Host(budget=0)
    nic = Nic(host)
    nic.send([hdr(), frame(60)])
    assert nic.dev.tx_blocked
    nic.drv.set_status(0)                                            # the driver resets the device
    assert not nic.dev.tx_blocked and nic.dev.save_state() == {}
    host.budget = None
    nic.dev.tx_resume()                                              # not active: touches no ring
    assert host.sent == []


# === receive ===============================================================================

def test_nothing_is_read_from_the_host_while_no_buffer_is_posted() -> None:
    nic = Nic()
    nic.host.rx.extend([frame(60), frame(70)])
    assert nic.dev.receive() == 0 and nic.host.reads == 0 and nic.dev.rx_waiting
    head, [addr] = nic.post([2048])
    nic.drv.kick(RECEIVEQ)
    assert nic.host.rx_ready_calls == 1                              # "buffers arrived: offer again"
    assert nic.dev.receive() == 1 and nic.host.reads == 1           # one buffer: one frame read, no more
    assert nic.dev.rx_waiting and list(nic.host.rx) == [frame(70)]
    nic.drv.kick(RECEIVEQ)                                           # a kick with no new buffer...
    assert nic.host.rx_ready_calls == 2                              # ...is passed on once per wait


def test_receive_into_one_chain_without_mergeable_buffers() -> None:
    nic = Nic(mrg=False)
    f = frame(1514, 5)
    head, [addr] = nic.post([HDR_LEN + 1514 + 4])
    nic.host.rx.append(f)
    assert nic.dev.receive() == 1
    assert nic.rx.take_used() == [(head, HDR_LEN + 1514)]
    assert NET_HDR.unpack(nic.mem.read(addr, HDR_LEN)) == (0, 0, 0, 0, 0, 0, 1)   # num_buffers 1
    assert nic.mem.read(addr + HDR_LEN, 1514) == f
    assert nic.irqs.sent == [0]
    # a frame larger than the next chain is dropped; the chain comes back empty; the next frame fits the next one
    small, _ = nic.post([HDR_LEN + 100])
    fits, [addr2] = nic.post([HDR_LEN + 100])
    nic.host.rx.extend([frame(200), frame(90, 7)])
    assert nic.dev.receive() == 1
    assert nic.rx.take_used() == [(small, 0), (fits, HDR_LEN + 90)]
    assert nic.mem.read(addr2 + HDR_LEN, 90) == frame(90, 7)
    assert drops(nic) == {"rx_no_buffers": 1} and nic.dev.rx_frames == 2


def test_mergeable_buffers_spread_a_frame_and_count_them() -> None:
    nic = Nic()
    chains = [nic.post([1000]) for _ in range(4)]
    f = frame(2500, 11)
    nic.host.rx.append(f)
    assert nic.dev.receive() == 1
    used = nic.rx.take_used()
    assert used == [(chains[0][0], 1000), (chains[1][0], 1000), (chains[2][0], 512)]
    first = chains[0][1][0]
    assert NET_HDR.unpack(nic.mem.read(first, HDR_LEN))[6] == 3      # num_buffers
    got = nic.mem.read(first + HDR_LEN, 988) + nic.mem.read(chains[1][1][0], 1000) + nic.mem.read(chains[2][1][0], 512)
    assert got == f
    # chains of several descriptors merge too; the header may span descriptors
    head, addrs = nic.post([5, 7, 100])
    more = nic.post([2000])
    f2 = frame(400, 3)
    nic.host.rx.append(f2)
    nic.dev.receive()
    assert nic.rx.take_used() == [(chains[3][0], 412)] and NET_HDR.unpack(nic.mem.read(chains[3][1][0], 12))[6] == 1
    f3 = frame(150, 8)
    nic.host.rx.append(f3)
    nic.dev.receive()
    assert nic.rx.take_used() == [(head, 112), (more[0], 50)]
    raw = nic.mem.read(addrs[0], 5) + nic.mem.read(addrs[1], 7) + nic.mem.read(addrs[2], 100) + nic.mem.read(more[1][0], 50)
    assert NET_HDR.unpack(raw[:12])[6] == 2 and raw[12:] == f3


def test_a_frame_larger_than_every_posted_buffer_together_is_dropped() -> None:
    nic = Nic()
    a, _ = nic.post([100])
    b, _ = nic.post([100])
    nic.host.rx.append(frame(500))
    assert nic.dev.receive() == 0
    assert nic.rx.take_used() == [(a, 0), (b, 0)] and drops(nic) == {"rx_no_buffers": 1}
    assert nic.dev.rx_waiting                                          # ring empty now: reading stops


def test_hostile_receive_chains_are_returned_empty_and_skipped() -> None:
    nic = Nic()
    read_only = nic.rx.add([(nic.alloc(2048), 2048, False)])
    mixed = nic.rx.add([(nic.alloc(16), 16, False), (nic.alloc(2048), 2048, True)])
    tiny = nic.rx.add([(nic.alloc(8), 8, True)])                       # no room for the header
    outside = nic.rx.add([(RAM + 8192, 2048, True)])
    good, [addr] = nic.post([2048])
    f = frame(100, 2)
    nic.host.rx.append(f)
    assert nic.dev.receive() == 1
    assert nic.rx.take_used() == [(read_only, 0), (mixed, 0), (tiny, 0), (outside, 0), (good, 112)]
    assert nic.mem.read(addr + HDR_LEN, 100) == f
    assert drops(nic) == {"rx_bad_chain": 4}


def test_runt_and_oversized_host_frames_are_dropped_without_using_buffers() -> None:
    nic = Nic()
    head, _ = nic.post([70000])
    nic.host.rx.extend([b"\x01" * 13, bytes(MAX_FRAME + 1), frame(MAX_FRAME, 1)])
    assert nic.dev.receive() == 1
    assert nic.rx.take_used() == [(head, HDR_LEN + MAX_FRAME)]
    assert drops(nic) == {"rx_runt": 1, "rx_oversize": 1}


def test_state_is_empty_and_checked() -> None:
    nic = Nic()
    assert nic.dev.save_state() == {}
    nic.dev.load_state({})
    with pytest.raises(StateError):
        nic.dev.load_state({"tx_pending": 1})
    assert set(nic.dev.drops) == set(DROP_REASONS)


# === a guest that writes anything ===========================================================

descriptor = st.tuples(st.integers(0, RAM + 4096), st.integers(0, 3000),
                       st.sampled_from([0, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 4, 7]),
                       st.integers(0, 20))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tx_descs=st.lists(descriptor, min_size=1, max_size=16), rx_descs=st.lists(descriptor, min_size=1, max_size=16),
       tx_heads=st.lists(st.integers(0, 20), max_size=10), rx_heads=st.lists(st.integers(0, 20), max_size=10),
       host_frames=st.lists(st.integers(0, 4000), max_size=8), mrg=st.booleans(), budget=st.sampled_from([None, 0, 1]),
       header_bytes=st.binary(min_size=12, max_size=12))
def test_random_rings_never_raise(tx_descs, rx_descs, tx_heads, rx_heads, host_frames, mrg, budget, header_bytes) -> None:
    host = Host(budget)
    nic = Nic(host, mrg=mrg)
    data = nic.alloc(4096)
    nic.mem.write(data, header_bytes + os.urandom(4096 - 12))
    for ring, descs, heads in ((nic.tx, tx_descs, tx_heads), (nic.rx, rx_descs, rx_heads)):
        for i, (addr, length, flags, nxt) in enumerate(descs):
            # half the buffers point at the prepared data, the rest anywhere (inside RAM or not)
            ring.write_desc(ring.desc, i % ring.size, data if addr % 2 else addr, length, flags, nxt)
        for h in heads:
            ring.publish(h)
    host.rx.extend(frame(n) for n in host_frames)
    nic.drv.kick(TRANSMITQ)
    nic.drv.kick(RECEIVEQ)
    nic.dev.receive()
    nic.dev.tx_resume()
    for ring in (nic.tx, nic.rx):
        for h, n in ring.take_used():
            assert 0 <= h < ring.size and n >= 0
    assert nic.dev.tx_frames == len(host.sent)
    assert nic.dev.rx_frames + sum(v for k, v in nic.dev.drops.items() if k.startswith("rx_") and k != "rx_bad_chain") \
        <= len(host_frames)
    assert struct.calcsize("<BBHHHHH") == HDR_LEN
