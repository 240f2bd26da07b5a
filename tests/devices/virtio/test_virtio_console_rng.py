"""virtio-console (back pressure both ways, nothing lost) and virtio-rng (bounded), through the transport."""

from __future__ import annotations

import os

import pytest

from kvmkit.devices.virtio import pci as vp
from kvmkit.devices.virtio.console import IOV_MAX, RECEIVEQ, TRANSMITQ, VIRTIO_CONSOLE_F_SIZE, VirtioConsole
from kvmkit.devices.virtio.rng import MAX_REQUEST, VirtioRng
from kvmkit.memory import GuestMemory

from virtio_driver import Alloc, FakeIrqs, PciDriver


class Host:
    """A console host end that takes at most ``budget`` bytes per output call (None: all)."""

    def __init__(self, budget: int | None = None) -> None:
        self.budget = budget
        self.out = bytearray()
        self.calls = 0
        self.rx_ready_calls = 0
        self.console: VirtioConsole | None = None
        self.pending_rx = b""

    def output(self, bufs) -> int:
        self.calls += 1
        data = b"".join(bytes(b) for b in bufs)
        take = len(data) if self.budget is None else min(self.budget, len(data))
        self.out += data[:take]
        return take

    def rx_ready(self) -> None:
        self.rx_ready_calls += 1
        if self.pending_rx and self.console is not None:   # allowed: called without the device lock
            n = self.console.receive(self.pending_rx)
            self.pending_rx = self.pending_rx[n:]


def setup(host: Host, *, size=(80, 25), msix: bool = True):
    mem = GuestMemory(16 << 20)
    alloc = Alloc()
    con = VirtioConsole(host, size=size)
    host.console = con
    irqs = FakeIrqs(msix)
    t = vp.VirtioPciTransport(con, mem, msix_vectors=3, interrupts=irqs)
    drv = PciDriver(t, mem, alloc)
    rx, tx = drv.init(vectors={0: 0, 1: 1}, config_vector=2)
    return con, drv, rx, tx, mem, alloc, irqs


def send(drv, tx, mem, alloc, chunks: list[bytes]) -> list[int]:
    heads = []
    for c in chunks:
        addr = alloc(len(c))
        mem.write(addr, c)
        heads.append(tx.add([(addr, len(c), False)]))
    drv.kick(TRANSMITQ)
    return heads


def test_transmit_in_one_output_call() -> None:
    host = Host()
    con, drv, rx, tx, mem, alloc, irqs = setup(host)
    heads = send(drv, tx, mem, alloc, [b"hello, ", b"virtio ", b"console\n"])
    assert host.out == b"hello, virtio console\n" and host.calls == 1
    assert tx.take_used() == [(h, 0) for h in heads]
    assert irqs.sent == [1]


def test_transmit_back_pressure_one_byte_at_a_time() -> None:
    host = Host(budget=1)
    con, drv, rx, tx, mem, alloc, irqs = setup(host)
    chunks = [os.urandom(n) for n in (5, 1, 17, 3)]
    heads = send(drv, tx, mem, alloc, chunks)
    assert host.out == chunks[0][:1] and tx.take_used() == []   # host full: nothing completed
    drv.kick(TRANSMITQ)                                          # kicks while blocked change nothing
    assert host.out == chunks[0][:1]
    done = []
    for _ in range(100):
        con.tx_resume()
        done += tx.take_used()
        if len(host.out) == sum(map(len, chunks)):
            break
    con.tx_resume()
    done += tx.take_used()
    assert bytes(host.out) == b"".join(chunks)
    assert [h for h, _ in done] == heads                         # each completed once, in order
    # a chain is returned only after its last byte was taken
    more = send(drv, tx, mem, alloc, [b"ab"])
    assert tx.take_used() == []
    con.tx_resume()
    assert tx.take_used() == [(more[0], 0)] and host.out.endswith(b"ab")


def test_transmit_many_buffers_respects_iov_max() -> None:
    host = Host()
    con, drv, rx, tx, mem, alloc, irqs = setup(host)
    seen = []
    host.output = lambda bufs: (seen.append(len(bufs)), sum(len(b) for b in bufs))[1]
    for round_ in range(10):                     # 10 * 128 one-byte chains (queue size 128)
        for _ in range(tx.size):
            addr = alloc(1)
            tx.add([(addr, 1, False)], publish=True)
        drv.kick(TRANSMITQ)
        assert len(tx.take_used()) == tx.size
    assert max(seen) <= IOV_MAX and sum(seen) == 10 * tx.size


def test_receive_with_and_without_buffers() -> None:
    host = Host()
    con, drv, rx, tx, mem, alloc, irqs = setup(host)
    assert con.receive(b"early") == 0            # the guest posted nothing yet
    bufs = [alloc(4) for _ in range(3)]
    heads = [rx.add([(b, 4, True)]) for b in bufs]
    drv.kick(RECEIVEQ)
    assert host.rx_ready_calls == 1              # "buffers arrived"
    assert con.receive(b"0123456789") == 10
    assert rx.take_used() == [(heads[0], 4), (heads[1], 4), (heads[2], 2)]
    assert mem.read(bufs[0], 4) + mem.read(bufs[1], 4) + mem.read(bufs[2], 2) == b"0123456789"
    assert irqs.sent == [0]
    assert con.receive(b"x") == 0                # all used up


def test_receive_nothing_lost_with_one_byte_buffers() -> None:
    host = Host()
    con, drv, rx, tx, mem, alloc, irqs = setup(host)
    data = os.urandom(300)
    host.pending_rx = data
    got = bytearray()
    for _ in range(1000):
        if not host.pending_rx:
            break
        addr = alloc(1)
        head = rx.add([(addr, 1, True)])         # the guest reposts one 1-byte buffer...
        drv.kick(RECEIVEQ)                       # ...and kicks: rx_ready -> receive
        for h, n in rx.take_used():
            assert h == head and n == 1
            got += mem.read(addr, 1)
    assert bytes(got) == data and host.pending_rx == b""


def test_resize_sends_a_config_change() -> None:
    host = Host()
    con, drv, rx, tx, mem, alloc, irqs = setup(host)
    assert drv.t.driver_features >> VIRTIO_CONSOLE_F_SIZE & 1
    assert (drv.config(0, 2), drv.config(2, 2), drv.config(4, 4)) == (80, 25, 1)
    con.resize(132, 43)
    assert irqs.sent == [2] and (drv.config(0, 2), drv.config(2, 2)) == (132, 43)


def test_bad_tx_chain_is_completed_and_counted() -> None:
    host = Host()
    con, drv, rx, tx, mem, alloc, irqs = setup(host)
    head = tx.add([(1 << 40, 8, False)])
    drv.kick(TRANSMITQ)
    assert tx.take_used() == [(head, 0)] and con.bad_chains == 1 and host.out == b""


def test_reset_drops_pending_output() -> None:
    host = Host(budget=0)
    con, drv, rx, tx, mem, alloc, irqs = setup(host)
    send(drv, tx, mem, alloc, [b"stuck"])
    drv.set_status(0)
    con.tx_resume()                              # inactive: nothing happens, no exception
    assert host.out == b"" and con.receive(b"x") == 0


# --- rng --------------------------------------------------------------------------------------------
def rng_setup(entropy):
    mem = GuestMemory(16 << 20)
    alloc = Alloc()
    dev = VirtioRng(entropy)
    irqs = FakeIrqs()
    t = vp.VirtioPciTransport(dev, mem, msix_vectors=1, interrupts=irqs)
    drv = PciDriver(t, mem, alloc)
    [ring] = drv.init(vectors={0: 0})
    return dev, drv, ring, mem, alloc, irqs


def test_rng_fills_and_bounds_requests() -> None:
    asked = []

    def entropy(n: int) -> bytes:
        asked.append(n)
        return bytes([0xA5]) * n

    dev, drv, ring, mem, alloc, irqs = rng_setup(entropy)
    small, big = alloc(64), alloc(4 << 20)
    h1 = ring.add([(small, 64, True)])
    h2 = ring.add([(big, 2 << 20, True), (big + (2 << 20), 2 << 20, True)])
    drv.kick(0)
    assert ring.take_used() == [(h1, 64), (h2, MAX_REQUEST)]
    assert asked == [64, MAX_REQUEST]
    assert mem.read(small, 64) == b"\xa5" * 64 and mem.read(big + MAX_REQUEST, 1) == b"\0"
    assert irqs.sent == [0]


def test_rng_failures_and_odd_chains() -> None:
    def entropy(n: int) -> bytes:
        raise OSError(11, "try again")

    dev, drv, ring, mem, alloc, irqs = rng_setup(entropy)
    h1 = ring.add([(alloc(16), 16, True)])
    h2 = ring.add([(alloc(16), 16, False)])      # device-readable only: nothing to fill
    h3 = ring.add([(1 << 40, 16, True)])         # outside RAM
    drv.kick(0)
    assert ring.take_used() == [(h1, 0), (h2, 0), (h3, 0)]
    assert dev.failures == 1 and dev.requests == 3


@pytest.mark.parametrize("returned", [b"", b"\x01" * 3, b"\x02" * 100])
def test_rng_short_or_long_entropy(returned: bytes) -> None:
    dev, drv, ring, mem, alloc, irqs = rng_setup(lambda n: returned)
    addr = alloc(32)
    head = ring.add([(addr, 32, True)])
    drv.kick(0)
    assert ring.take_used() == [(head, min(32, len(returned)))]
