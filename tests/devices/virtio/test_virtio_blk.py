"""virtio-blk end to end without KVM: guest rings in a GuestMemory, the PCI transport, a RawImage on a temp file."""

from __future__ import annotations

import errno
import os
import struct
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmkit.devices.virtio import blk as vb
from kvmkit.devices.virtio import pci as vp
from kvmkit.devices.virtio.blk import VirtioBlk
from kvmkit.host.blockfile import DiskImageError, RawImage, _advance
from kvmkit.memory import GuestMemory

from virtio_driver import Alloc, FakeIrqs, PciDriver

DISK = 1 << 20           # 2048 sectors
SECTORS = DISK // 512


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * (DISK // 256))
    return path


class Guest:
    """A virtio-blk driver: builds requests as Linux's virtblk does (header, data, status)."""

    def __init__(self, backend, *, features: int | None = None, drop: int = 0, serial=None) -> None:
        self.mem = GuestMemory(16 << 20)
        self.alloc = Alloc()
        self.dev = VirtioBlk(backend, serial=serial)
        self.irqs = FakeIrqs()
        self.t = vp.VirtioPciTransport(self.dev, self.mem, msix_vectors=2, interrupts=self.irqs)
        self.drv = PciDriver(self.t, self.mem, self.alloc)
        [self.ring] = self.drv.init(features, drop=drop, vectors={0: 1})

    def request(self, rtype: int, sector: int = 0, *, out: bytes = b"", inlen: int = 0,
                status: bool = True, publish: bool = True) -> dict:
        hdr = self.alloc(16)
        self.mem.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
        bufs = [(hdr, 16, False)]
        if out:
            addr = self.alloc(len(out))
            self.mem.write(addr, out)
            bufs.append((addr, len(out), False))
        req = {"in": None, "status": None}
        if inlen:
            req["in"] = self.alloc(inlen)
            bufs.append((req["in"], inlen, True))
        if status:
            req["status"] = self.alloc(1)
            self.mem.write_u8(req["status"], 0xEE)
            bufs.append((req["status"], 1, True))
        req["inlen"] = inlen
        req["head"] = self.ring.add(bufs, publish=publish)
        return req

    def run(self, *reqs: dict) -> list[tuple[int, bytes, int]]:
        """Kick; for each request: (status, data read, used len)."""
        self.drv.kick(0)
        used = dict(self.ring.take_used())
        out = []
        for r in reqs:
            status = self.mem.read_u8(r["status"]) if r["status"] else None
            data = self.mem.read(r["in"], r["inlen"]) if r["in"] else b""
            out.append((status, data, used[r["head"]]))
        return out

    def one(self, *args, **kw) -> tuple[int, bytes, int]:
        return self.run(self.request(*args, **kw))[0]


@pytest.fixture
def guest(image: Path):
    with RawImage(image, serial="kvmkit-disk-0") as disk:
        yield Guest(disk)


def test_config_and_features(guest: Guest) -> None:
    g = guest
    assert g.drv.config(0, 4) | g.drv.config(4, 4) << 32 == SECTORS
    assert g.drv.config(0x14, 4) == 512                     # blk_size
    assert g.drv.config(0x0C, 4) == vb.SEG_MAX and g.drv.config(0x08, 4) == vb.SIZE_MAX
    assert g.drv.config(0x22, 2) == 1                       # num_queues
    assert g.drv.config(0x38, 1) == 1                       # write_zeroes_may_unmap
    f = g.t.driver_features
    for bit in (vb.VIRTIO_BLK_F_FLUSH, vb.VIRTIO_BLK_F_DISCARD, vb.VIRTIO_BLK_F_WRITE_ZEROES,
                vb.VIRTIO_BLK_F_SEG_MAX, vb.VIRTIO_BLK_F_SIZE_MAX, vb.VIRTIO_BLK_F_BLK_SIZE):
        assert f >> bit & 1
    assert not f >> vb.VIRTIO_BLK_F_RO & 1


def test_read(guest: Guest, image: Path) -> None:
    status, data, used = guest.one(vb.VIRTIO_BLK_T_IN, 3, inlen=1024)
    assert status == vb.VIRTIO_BLK_S_OK and used == 1025
    assert data == image.read_bytes()[3 * 512:5 * 512]


def test_read_into_a_scattered_buffer(guest: Guest, image: Path) -> None:
    g = guest
    hdr, a, b = g.alloc(16), g.alloc(700), g.alloc(325)
    g.mem.write(hdr, struct.pack("<IIQ", vb.VIRTIO_BLK_T_IN, 0, 1))
    # status byte in the same descriptor as the data's tail: framing is free (§2.7.4)
    head = g.ring.add([(hdr, 8, False), (hdr + 8, 8, False), (a, 700, True), (b, 325, True)])
    g.drv.kick(0)
    assert g.ring.take_used() == [(head, 1025)]
    assert g.mem.read(a, 700) + g.mem.read(b, 324) == image.read_bytes()[512:1536]
    assert g.mem.read_u8(b + 324) == vb.VIRTIO_BLK_S_OK


def test_write_then_flush(guest: Guest, image: Path) -> None:
    payload = os.urandom(1536)
    assert guest.one(vb.VIRTIO_BLK_T_OUT, 10, out=payload)[::2] == (vb.VIRTIO_BLK_S_OK, 1)
    assert guest.one(vb.VIRTIO_BLK_T_FLUSH)[0] == vb.VIRTIO_BLK_S_OK
    assert image.read_bytes()[10 * 512:10 * 512 + 1536] == payload


def test_get_id(guest: Guest) -> None:
    status, data, used = guest.one(vb.VIRTIO_BLK_T_GET_ID, inlen=20)
    assert status == vb.VIRTIO_BLK_S_OK and data == b"kvmkit-disk-0".ljust(20, b"\0") and used == 21
    status, data, used = guest.one(vb.VIRTIO_BLK_T_GET_ID, inlen=4)
    assert data == b"kvmk" and used == 5


def segment(sector: int, count: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", sector, count, flags)


def test_discard_and_write_zeroes(guest: Guest, image: Path) -> None:
    g = guest
    status = g.one(vb.VIRTIO_BLK_T_DISCARD, out=segment(8, 16))[0]
    assert status in (vb.VIRTIO_BLK_S_OK, vb.VIRTIO_BLK_S_UNSUPP)   # the file system may not punch holes
    for flags in (0, vb.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP):
        base = 100 if flags else 200
        assert g.one(vb.VIRTIO_BLK_T_WRITE_ZEROES, out=segment(base, 9, flags))[0] == vb.VIRTIO_BLK_S_OK
        data = image.read_bytes()
        assert data[base * 512:(base + 9) * 512] == bytes(9 * 512)
        assert data[(base + 9) * 512:(base + 10) * 512] == bytes(range(256)) * 2   # the next sector untouched
    assert len(image.read_bytes()) == DISK


@pytest.mark.parametrize("rtype, payload, expected", [
    (vb.VIRTIO_BLK_T_DISCARD, segment(0, 1, vb.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP), vb.VIRTIO_BLK_S_UNSUPP),
    (vb.VIRTIO_BLK_T_WRITE_ZEROES, segment(0, 1, 4), vb.VIRTIO_BLK_S_UNSUPP),    # unknown flag
    (vb.VIRTIO_BLK_T_WRITE_ZEROES, segment(0, 1) * 2, vb.VIRTIO_BLK_S_IOERR),    # max_write_zeroes_seg is 1
    (vb.VIRTIO_BLK_T_WRITE_ZEROES, segment(SECTORS, 1), vb.VIRTIO_BLK_S_IOERR),  # past the end
    (vb.VIRTIO_BLK_T_WRITE_ZEROES, segment(0, vb.MAX_WRITE_ZEROES_SECTORS + 1), vb.VIRTIO_BLK_S_IOERR),
    (vb.VIRTIO_BLK_T_DISCARD, b"\0" * 10, vb.VIRTIO_BLK_S_IOERR),                # not whole segments
    (vb.VIRTIO_BLK_T_DISCARD, b"", vb.VIRTIO_BLK_S_IOERR),
])
def test_bad_discard_write_zeroes(guest: Guest, image: Path, rtype: int, payload: bytes, expected: int) -> None:
    before = image.read_bytes()
    assert guest.one(rtype, out=payload)[0] == expected
    assert image.read_bytes() == before


def test_bad_requests_fail_with_ioerr(guest: Guest, image: Path) -> None:
    g = guest
    before = image.read_bytes()
    cases = [
        g.request(vb.VIRTIO_BLK_T_IN, SECTORS - 1, inlen=1024),        # runs past the end
        g.request(vb.VIRTIO_BLK_T_IN, SECTORS, inlen=512),
        g.request(vb.VIRTIO_BLK_T_IN, (1 << 64) - 1, inlen=512),       # sector * 512 beyond 2^64
        g.request(vb.VIRTIO_BLK_T_IN, (1 << 55), inlen=512),           # sector * 512 wraps to 0 in u64
        g.request(vb.VIRTIO_BLK_T_IN, 0, inlen=100),                   # not whole sectors
        g.request(vb.VIRTIO_BLK_T_IN, 0, out=b"x" * 512, inlen=512),   # data in the wrong direction
        g.request(vb.VIRTIO_BLK_T_OUT, 0, out=b"x" * 512, inlen=512),  # device-writable data on a write
        g.request(vb.VIRTIO_BLK_T_OUT, SECTORS, out=b"y" * 512),
        g.request(vb.VIRTIO_BLK_T_GET_ID, 0, out=b"z", inlen=20),
    ]
    for status, _, used in g.run(*cases):
        assert status == vb.VIRTIO_BLK_S_IOERR and used == 1
    assert image.read_bytes() == before
    assert g.one(77)[::2] == (vb.VIRTIO_BLK_S_UNSUPP, 1)


def test_malformed_chains_complete_with_nothing(guest: Guest) -> None:
    g = guest
    no_status = g.request(vb.VIRTIO_BLK_T_IN, 0, status=False)
    hdr = g.alloc(8)
    st = g.alloc(1)
    short = g.ring.add([(hdr, 8, False), (st, 1, True)])           # 8-byte header
    bad = g.ring.add([(1 << 40, 16, False), (st, 1, True)])        # header outside RAM
    g.drv.kick(0)
    used = dict(g.ring.take_used())
    assert used[no_status["head"]] == 0 and used[bad] == 0
    assert used[short] == 1 and g.mem.read_u8(st) == vb.VIRTIO_BLK_S_IOERR
    assert g.dev.stats["no_status"] == 1 and g.dev.stats["bad_chain"] == 1
    assert g.t.queues[0].errors == {"buffer_outside_ram": 1} and not g.t.status & 64


def test_read_only_disk(image: Path) -> None:
    before = image.read_bytes()
    with RawImage(image, read_only=True) as disk:
        g = Guest(disk)
        assert g.t.driver_features >> vb.VIRTIO_BLK_F_RO & 1
        assert not g.t.driver_features >> vb.VIRTIO_BLK_F_DISCARD & 1
        assert g.one(vb.VIRTIO_BLK_T_OUT, 0, out=b"w" * 512)[0] == vb.VIRTIO_BLK_S_IOERR
        assert g.one(vb.VIRTIO_BLK_T_IN, 0, inlen=512)[0] == vb.VIRTIO_BLK_S_OK
        assert g.one(vb.VIRTIO_BLK_T_FLUSH)[0] == vb.VIRTIO_BLK_S_OK
        with pytest.raises(OSError):
            disk.writev(0, [memoryview(bytearray(512))])
    assert image.read_bytes() == before


class CountingBackend:
    def __init__(self, size: int = DISK) -> None:
        self.size = size
        self.read_only = False
        self.data = bytearray(size)
        self.flushes = 0
        self.fail: OSError | None = None

    def readv(self, offset, bufs):
        if self.fail:
            raise self.fail
        n = 0
        for b in bufs:
            b[:] = self.data[offset + n:offset + n + len(b)]
            n += len(b)
        return n

    def writev(self, offset, bufs):
        n = 0
        for b in bufs:
            self.data[offset + n:offset + n + len(b)] = b
            n += len(b)
        return n

    def flush(self):
        self.flushes += 1

    def discard(self, offset, length):
        raise OSError(errno.EOPNOTSUPP, "no")

    def write_zeroes(self, offset, length, unmap):
        self.data[offset:offset + length] = bytes(length)


def test_writes_are_stable_without_negotiated_flush() -> None:
    b = CountingBackend()
    g = Guest(b, drop=1 << vb.VIRTIO_BLK_F_FLUSH)
    g.one(vb.VIRTIO_BLK_T_OUT, 0, out=b"a" * 512)
    assert b.flushes == 1
    g2 = Guest(CountingBackend())
    g2.one(vb.VIRTIO_BLK_T_OUT, 0, out=b"a" * 512)
    assert g2.dev.backend.flushes == 0


def test_backend_errors(guest: Guest) -> None:
    b = CountingBackend()
    g = Guest(b)
    assert g.one(vb.VIRTIO_BLK_T_DISCARD, out=segment(0, 8))[0] == vb.VIRTIO_BLK_S_UNSUPP
    b.fail = OSError(errno.EIO, "disk on fire")
    assert g.one(vb.VIRTIO_BLK_T_IN, 0, inlen=512)[0] == vb.VIRTIO_BLK_S_IOERR
    assert "disk on fire" in g.dev.last_error


def test_unnegotiated_discard_is_unsupported() -> None:
    g = Guest(CountingBackend(), drop=1 << vb.VIRTIO_BLK_F_WRITE_ZEROES)
    assert g.one(vb.VIRTIO_BLK_T_WRITE_ZEROES, out=segment(0, 1))[0] == vb.VIRTIO_BLK_S_UNSUPP


def test_one_interrupt_per_batch_and_event_idx() -> None:
    g = Guest(CountingBackend())
    reqs = [g.request(vb.VIRTIO_BLK_T_IN, i, inlen=512) for i in range(20)]
    results = g.run(*reqs)
    assert all(s == vb.VIRTIO_BLK_S_OK for s, _, _ in results)
    assert g.irqs.sent == [1]
    # EVENT_IDX: the driver asks for an interrupt only after used entry 25
    g.ring.set_used_event(25)
    g.run(*[g.request(vb.VIRTIO_BLK_T_FLUSH) for _ in range(3)])    # used 20 -> 23
    assert g.irqs.sent == [1]
    g.run(*[g.request(vb.VIRTIO_BLK_T_FLUSH) for _ in range(3)])    # 23 -> 26 passes 25
    assert g.irqs.sent == [1, 1]


def test_requests_posted_before_driver_ok_are_served() -> None:
    b = CountingBackend()
    g = Guest.__new__(Guest)
    g.mem, g.alloc = GuestMemory(16 << 20), Alloc()
    g.dev = VirtioBlk(b)
    g.irqs = FakeIrqs()
    g.t = vp.VirtioPciTransport(g.dev, g.mem, msix_vectors=2, interrupts=g.irqs)
    g.drv = PciDriver(g.t, g.mem, g.alloc)
    g.drv.negotiate()
    g.ring = g.drv.setup_queue(0)
    req = g.request(vb.VIRTIO_BLK_T_FLUSH)
    g.drv.set_status(15)                         # DRIVER_OK
    assert g.ring.take_used() == [(req["head"], 1)]


# --- RawImage -----------------------------------------------------------------------------------
def test_lock_refuses_a_second_writer(image: Path) -> None:
    with RawImage(image):
        with pytest.raises(DiskImageError, match=r"is in use by another process \(locked\)"):
            RawImage(image)
        with pytest.raises(DiskImageError, match="in use"):
            RawImage(image, read_only=True)
    RawImage(image).close()                      # released on close


def test_readers_share(image: Path) -> None:
    with RawImage(image, read_only=True), RawImage(image, read_only=True):
        with pytest.raises(DiskImageError, match="in use"):
            RawImage(image)


def test_refuses_what_is_not_a_disk(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (tmp_path, fifo, Path(os.devnull)):
        with pytest.raises(DiskImageError, match="is not a regular file or a block device"):
            RawImage(path, read_only=True)
    with pytest.raises(DiskImageError, match="does not exist"):
        RawImage(tmp_path / "missing.img")
    with pytest.raises(DiskImageError, match="at most 20"):
        RawImage(fifo, serial="x" * 21)


def test_message_is_one_sentence(image: Path) -> None:
    with RawImage(image):
        with pytest.raises(DiskImageError) as e:
            RawImage(image)
    msg = str(e.value)
    assert "\n" not in msg and msg.count(". ") == 0


def test_reads_past_eof_are_zeros(image: Path) -> None:
    with RawImage(image) as disk:
        os.truncate(image, 1000)                 # shrunk by someone else
        a, b = memoryview(bytearray(b"\xff" * 600)), memoryview(bytearray(b"\xff" * 600))
        assert disk.readv(500, [a, b]) == 1200
        assert bytes(a) == (bytes(range(256)) * 4)[500:1000] + bytes(100) and bytes(b) == bytes(600)


def test_writev_scatter_and_bounds(image: Path) -> None:
    with RawImage(image) as disk:
        bufs = [memoryview(bytearray(b"x" * n)) for n in (1, 511, 512)]
        assert disk.writev(512, bufs) == 1024
        assert image.read_bytes()[512:1536] == b"x" * 1024
        with pytest.raises(OSError):
            disk.writev(DISK - 512, [memoryview(bytearray(1024))])
        assert len(image.read_bytes()) == DISK


def test_advance() -> None:
    bufs = [memoryview(b"abc"), memoryview(b"de"), memoryview(b"fgh")]
    assert [bytes(v) for v in _advance(bufs, 4)] == [b"e", b"fgh"]
    assert [bytes(v) for v in _advance(bufs, 5)] == [b"fgh"]
    assert _advance(bufs, 8) == []


# --- any request: a status or nothing, never an exception ------------------------------------------
@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(
    st.sampled_from([0, 1, 4, 8, 11, 13, 2, 0x80000000, 0xFFFFFFFF]),
    st.sampled_from([0, 1, SECTORS - 1, SECTORS, 1 << 55, (1 << 64) - 1]),
    st.sampled_from([b"", b"\0" * 16, b"\xab" * 512, segment(0, 1), segment(SECTORS - 1, 2, 1), b"\1" * 7]),
    st.sampled_from([0, 1, 20, 512, 513, 4096]),
    st.booleans()), min_size=1, max_size=8))
def test_request_fuzz(reqs) -> None:
    b = CountingBackend()
    g = Guest(b)
    before = bytes(b.data)
    posted = [g.request(t, sector, out=out, inlen=inlen, status=status) for t, sector, out, inlen, status in reqs]
    results = g.run(*posted)
    wrote = False
    for (t, sector, out, inlen, status), (st_byte, _, used) in zip(reqs, results):
        if not status:
            assert used == 0 or (inlen and used <= inlen)  # the last writable byte served as status
            continue
        assert st_byte in (vb.VIRTIO_BLK_S_OK, vb.VIRTIO_BLK_S_IOERR, vb.VIRTIO_BLK_S_UNSUPP)
        assert 1 <= used <= inlen + 1
        wrote |= st_byte == vb.VIRTIO_BLK_S_OK and t in (1, 13)
    if not wrote:
        assert bytes(b.data) == before or any(not s for *_, s in reqs)


def test_kicks_racing_resets(image: Path) -> None:
    """An ioeventfd thread kicking while a vCPU resets and re-initialises: no exception, no stray I/O."""
    with RawImage(image) as disk:
        g = Guest(disk)
        stop = threading.Event()
        errors: list[BaseException] = []

        def kicker() -> None:
            try:
                while not stop.is_set():
                    g.t.queue_notify(0)
            except BaseException as e:  # pragma: no cover - the test reports it
                errors.append(e)

        th = threading.Thread(target=kicker)
        th.start()
        try:
            for _ in range(30):
                g.alloc = g.drv.alloc = Alloc()
                [g.ring] = g.drv.init(vectors={0: 1})
                for i in range(4):
                    g.request(vb.VIRTIO_BLK_T_IN, i, inlen=512)
                g.drv.set_status(0)
        finally:
            stop.set()
            th.join(5)
        assert not errors and g.t.status == 0
