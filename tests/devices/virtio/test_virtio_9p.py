"""virtio-9p through the PCI transport: the mount tag, Linux's zero-copy chain layouts, hostile chains,
and a snapshot refused while the share is mounted. The file server is the real one (host/p9server.py)
over a temporary directory."""

from __future__ import annotations

import errno
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmkit.devices.state import StateError
from kvmkit.devices.virtio import pci as vp
from kvmkit.devices.virtio.p9 import MAX_TAG, VIRTIO_9P_MOUNT_TAG, VirtioP9, valid_tag
from kvmkit.host import p9wire as w
from kvmkit.host.p9server import P9Server
from kvmkit.memory import GuestMemory

from virtio_driver import Alloc, FakeIrqs, PciDriver

MSIZE = 64 * 1024


class Share:
    """A driver's view of one virtio-9p device: each call is one chain, like Linux's 9pnet_virtio."""

    def __init__(self, root: Path, *, readonly: bool = False, tag: str = "hostshare") -> None:
        self.mem = GuestMemory(16 << 20)
        self.alloc = Alloc()
        self.server = P9Server(root, readonly=readonly)
        self.dev = VirtioP9(self.server, tag)
        self.irqs = FakeIrqs()
        self.t = vp.VirtioPciTransport(self.dev, self.mem, msix_vectors=2, interrupts=self.irqs)
        self.drv = PciDriver(self.t, self.mem, self.alloc)
        [self.ring] = self.drv.init(vectors={0: 1})
        self.tag = 0

    def chain(self, out: list[bytes], in_sizes: list[int]) -> tuple[int, list[bytes]]:
        """Post device-readable ``out`` buffers and device-writable ones of ``in_sizes``; (length used, their bytes)."""
        bufs, ins = [], []
        for data in out:
            addr = self.alloc(max(1, len(data)))
            self.mem.write(addr, data)
            bufs.append((addr, len(data), False))
        for size in in_sizes:
            addr = self.alloc(max(1, size))
            ins.append((addr, size))
            bufs.append((addr, size, True))
        head = self.ring.add(bufs)
        self.drv.kick(0)
        [(used_head, length)] = self.ring.take_used()
        assert used_head == head
        return length, [self.mem.read(a, n) for a, n in ins]

    def rpc(self, mtype: int, *, in_size: int = MSIZE, **fields: object) -> w.Message:
        self.tag = (self.tag + 1) % 0xFFFF
        length, [reply] = self.chain([w.build(mtype, self.tag, **fields)], [in_size])
        msg = w.parse_message(reply[:length], MSIZE)
        assert msg.tag == self.tag
        return msg

    def mount(self) -> None:
        assert self.rpc(w.TVERSION, msize=MSIZE, version="9P2000.L")["version"] == "9P2000.L"
        self.rpc(w.TATTACH, fid=0, afid=w.NOFID, uname="root", aname="", n_uname=0)


def test_config_space_holds_the_mount_tag(tmp_path: Path) -> None:
    s = Share(tmp_path, tag="hostshare")
    assert s.drv.device_features() >> VIRTIO_9P_MOUNT_TAG & 1
    assert s.drv.config(0, 2) == len("hostshare")
    assert bytes(s.drv.config(2 + i, 1) for i in range(len("hostshare"))) == b"hostshare"
    assert valid_tag("a" * MAX_TAG) and not valid_tag("a" * (MAX_TAG + 1))
    for bad in ("", "two words", "slash/tag", "ünï"):
        assert not valid_tag(bad)
        with pytest.raises(ValueError):
            VirtioP9(s.server, bad)


def test_a_file_written_and_read_back_in_linux_zero_copy_layouts(tmp_path: Path) -> None:
    """Twrite's header and data in separate buffers (size counts both); Rread's 11-byte header, then pages."""
    s = Share(tmp_path)
    s.mount()
    s.rpc(w.TWALK, fid=0, newfid=1, wnames=[])
    s.rpc(w.TLCREATE, fid=1, name="f", flags=w.DOTL_CREATE | 2, mode=0o644, gid=0)
    data = bytes(range(256)) * 64                      # 16 KiB, split over 4 "pages"
    whole = w.build(w.TWRITE, 77, fid=1, offset=0, data=data)
    header = whole[:w.TWRITE_HEADER]
    pages = [data[i:i + 4096] for i in range(0, len(data), 4096)]
    length, [reply] = s.chain([header, *pages], [w.RREAD_HEADER])
    assert w.parse_message(reply[:length], MSIZE)["count"] == len(data)
    assert (tmp_path / "f").read_bytes() == data
    req = w.build(w.TREAD, 78, fid=1, offset=100, count=10000)
    length, (hdr, p1, p2, p3) = s.chain([req], [w.RREAD_HEADER, 4096, 4096, 4096])
    assert length == w.RREAD_HEADER + 10000
    size, mtype, tag, count = struct.unpack("<IBHI", hdr)
    assert (size, mtype, tag, count) == (w.RREAD_HEADER + 10000, w.RREAD, 78, 10000)
    assert (p1 + p2 + p3)[:10000] == data[100:10100]
    assert s.irqs.sent and s.dev.requests == 6 and s.dev.unanswered == 0


def test_replies_that_do_not_fit_and_chains_without_a_request(tmp_path: Path) -> None:
    s = Share(tmp_path)
    s.mount()
    (tmp_path / "big").write_bytes(b"x" * 5000)
    s.rpc(w.TWALK, fid=0, newfid=1, wnames=["big"])
    s.rpc(w.TLOPEN, fid=1, flags=0)
    # Room for an Rlerror but not for the Rread: the guest gets EMSGSIZE with its tag.
    length, [reply] = s.chain([w.build(w.TREAD, 9, fid=1, offset=0, count=5000)], [100])
    msg = w.parse_message(reply[:length], MSIZE)
    assert (msg.type, msg.tag, msg["ecode"]) == (w.RLERROR, 9, errno.EMSGSIZE)
    # No room even for that, no request at all, a header cut short, and no writable buffer: 0 bytes, counted.
    before = s.dev.unanswered
    assert s.chain([w.build(w.TREAD, 10, fid=1, offset=0, count=10)], [5])[0] == 0
    assert s.chain([], [64])[0] == 0
    assert s.chain([b"\x07\0\0"], [64])[0] == 0
    assert s.chain([w.build(w.TCLUNK, 11, fid=1)], [])[0] == 0
    assert s.dev.unanswered == before + 4
    # A descriptor outside guest RAM: the chain is refused whole, the device goes on.
    head = s.ring.add([(1 << 40, 64, False), (s.alloc(64), 64, True)])
    s.drv.kick(0)
    assert s.ring.take_used() == [(head, 0)]
    assert s.rpc(w.TGETATTR, fid=0, request_mask=w.GETATTR_BASIC).type == w.RGETATTR


def test_a_request_longer_than_msize_is_cut_and_refused_with_its_tag(tmp_path: Path) -> None:
    s = Share(tmp_path)
    s.mount()
    s.rpc(w.TWALK, fid=0, newfid=1, wnames=[])
    s.rpc(w.TLCREATE, fid=1, name="f", flags=w.DOTL_CREATE | 2, mode=0o644, gid=0)
    huge = s.server.max_msize + 4096
    header = struct.pack("<IBHIQI", w.TWRITE_HEADER + huge, w.TWRITE, 5, 1, 0, huge)
    length, [reply] = s.chain([header, b"y" * huge], [64])
    msg = w.parse_message(reply[:length], MSIZE)
    assert msg.type == w.RLERROR and msg.tag == 5
    assert s.dev.bytes_in <= 10 * MSIZE + s.server.max_msize
    assert (tmp_path / "f").read_bytes() == b""


def test_snapshot_is_refused_while_the_share_is_mounted(tmp_path: Path) -> None:
    s = Share(tmp_path)
    assert s.dev.save_state() == {}                   # nothing attached: nothing to lose
    s.mount()
    with pytest.raises(StateError, match="mounted"):
        s.dev.save_state()
    s.rpc(w.TCLUNK, fid=0)                            # what the guest's umount does
    assert s.dev.save_state() == {}


def test_a_read_only_share_refuses_writes_through_the_device(tmp_path: Path) -> None:
    (tmp_path / "keep").write_text("kept\n")
    s = Share(tmp_path, readonly=True)
    s.mount()
    s.rpc(w.TWALK, fid=0, newfid=1, wnames=[])
    msg = s.rpc(w.TLCREATE, fid=1, name="new", flags=w.DOTL_CREATE | 2, mode=0o644, gid=0)
    assert (msg.type, msg["ecode"]) == (w.RLERROR, errno.EROFS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chains=st.lists(st.tuples(st.lists(st.binary(max_size=64), max_size=3),
                                 st.lists(st.integers(0, 200), max_size=3)), min_size=1, max_size=8))
def test_random_chains_never_break_the_device(tmp_path_factory: pytest.TempPathFactory, chains) -> None:
    root = tmp_path_factory.mktemp("fuzz")
    s = Share(root)
    s.mount()
    for out, ins in chains:
        if not out and not ins:
            continue
        length, replies = s.chain(out, ins)
        assert 0 <= length <= sum(ins)
        if length:
            w.read_header(b"".join(replies)[:length], MSIZE)   # what comes back is a well-formed message
    assert s.rpc(w.TGETATTR, fid=0, request_mask=w.GETATTR_BASIC).type == w.RGETATTR
    assert list(root.iterdir()) == []
